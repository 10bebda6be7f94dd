#!/usr/bin/env python
"""Inference speed of fcn's exported models against the Keras path, with their parity, in one run.

    .venv/bin/python bench/export_speed.py            # full FCN-8s, 224x224, batch 8 (about 15 minutes on 2 cores)
    .venv/bin/python bench/export_speed.py --quick    # 1/8 width, 64x64: a smoke run of every code path

Speed: the full FCN-8s (random weights: speed does not depend on them) exported to a SavedModel, ONNX
and TFLite (float32, fp16 weights, int8), each timed on fixed batches of 8 224x224 images in its own
runtime (``fcn_cli.exported``, what ``fcn predict --model FILE`` runs), beside the Keras paths: fcn's
(``load_for_inference``: the precision the probe verified, fcn's CPU kernels) and plain Keras float32.
Each row has images/s (median of the timed batches after warm-up), the export's size and its parity.

Parity of a random network says little (its logits are near ties everywhere: recorded, not judged), so
the same rows are measured again on ``--checkpoint`` (default: the newest CamVid checkpoint under
bench/results/, when there is one) with ``--data`` (default ../shared/camvid): the share of pixels whose
class agrees with Keras on generated scenes and 16 CamVid validation photos, each runtime's speed at the
checkpoint's inference size, and ``fcn predict`` end to end through Keras and through ONNX Runtime. The
full-width model has no ONNX row: tf2onnx ran out of this machine's 24 GB converting it.

Output: bench/results/export-<timestamp>.json (export-quick-... for --quick). Every process's peak
resident memory is its own: each runtime is measured in a child process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARK = "@@EXPORT@@"
FULL = dict(width=1.0, head_width=4096, size=224, batch=8, warmup=2, repeats=5)
QUICK = dict(width=1 / 8, head_width=64, size=64, batch=2, warmup=1, repeats=2)
# (name, format, quantize) in the order they are exported and timed
ROWS = [("savedmodel", "savedmodel", "none"), ("onnx", "onnx", "none"), ("tflite", "tflite", "none"),
        ("tflite-fp16", "tflite", "fp16"), ("tflite-int8", "tflite", "int8")]


def _child(*args: str, timeout: int = 1800) -> dict:
    """Run this script's ``--part`` in a fresh process; its one result line, or an error record."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"rc={proc.returncode}: " + " | ".join(tail)[-400:], "wall_s": round(time.perf_counter() - started, 1)}
    return json.loads(lines[-1].removeprefix(MARK))


def _emit(result: dict) -> None:
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(MARK + json.dumps(result), flush=True)


def part_checkpoint(dest: str, width: float, head_width: int, size: int) -> None:
    """A full (or --quick) FCN-8s checkpoint with random weights, the score layers too."""
    import keras

    from fcn_cli.classes import CAMVID
    from fcn_cli.model import build_fcn
    from fcn_cli.runs import save_checkpoint

    from fcn_cli.fit import choose_precision

    # The precision `fcn train --precision auto` takes here: fcn's Keras path serves a checkpoint in it.
    policy = choose_precision("auto")
    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(0)
    model = build_fcn("fcn8", 12, None, width=width, head_width=head_width, accel=False)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if layer.name.startswith("score"):
            layer.set_weights([rng.normal(0, 0.01, w.shape).astype("float32") for w in layer.get_weights()])
    save_checkpoint(model, Path(dest), {"variant": "fcn8", "classes": CAMVID.to_dict(), "image_size": [size, size]},
                    portable=True)
    _emit({"params": int(model.count_params()), "precision": policy})


def part_export(checkpoint: str, fmt: str, out: str, quantize: str, data: str | None, keep: str | None = None) -> None:
    """``keep``: write the file whatever its parity (the speed rows' random network has near-tie logits
    everywhere, so its agreement says nothing; it is recorded all the same)."""
    from fcn_cli import export as exporter

    if keep:
        exporter.PARITY[quantize] = 0.0
    report = exporter.export(Path(checkpoint), fmt, Path(out), quantize=quantize, data=Path(data) if data else None)
    _emit({"bytes": report["bytes"], "export_s": report["seconds"], "parity": report["parity"]})


def part_time(model_path: str, how: str, size, batch: int, warmup: int, repeats: int) -> None:
    """images/s of batches of ``batch`` size x size images through one runtime."""
    if how == "keras-float32":
        import keras

        from fcn_cli.export import reference_model
        from fcn_cli.runs import load_checkpoint

        model = reference_model(load_checkpoint(Path(model_path))[0])
        forward, label = model.predict_on_batch, "plain Keras float32 (stock layers), predict_on_batch"
        del keras
    else:
        from fcn_cli.inference import load_for_inference

        model = load_for_inference(Path(model_path))[0]
        forward = model.predict_on_batch
        label = "fcn_cli.inference.load_for_inference(...).predict_on_batch"
    h, w = (int(v) for v in str(size).split("x")) if "x" in str(size) else (int(size), int(size))
    images = np.random.default_rng(0).uniform(0, 255, (batch, h, w, 3)).astype(np.float32)
    times = []
    for _ in range(warmup + repeats):
        started = time.perf_counter()
        forward(images)
        times.append(time.perf_counter() - started)
    step = statistics.median(times[warmup:])
    _emit({"images_per_s": round(batch / step, 3), "step_s_median": round(step, 4), "step_s": [round(t, 4) for t in times],
           "warmup": warmup, "how": label})


ONNX_FULL_MODEL = ("not measured: tf2onnx (1.17, through Keras's export) ran out of memory converting the full "
                   "134M-parameter FCN-8s on this 24 GB machine (killed by the kernel at 23.2 GB peak RSS); see the "
                   "trained checkpoint's rows for ONNX Runtime")


def _rows(checkpoint: Path, work: Path, timing: list[str], calibration: Path, keep: bool, skip: dict) -> dict:
    """The Keras rows, then each export of ``checkpoint`` with its parity and its runtime's speed."""
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, how in (("keras-fcn", "fcn"), ("keras-float32", "keras-float32")):
        print(f"[time] {name}", flush=True)
        rows[name] = _child("--part", "time", "--args", str(checkpoint), how, *timing)
    for name, fmt, quantize in ROWS:
        if name in skip:
            rows[name] = {"skipped": skip[name]}
            continue
        target = work / ({"savedmodel": "fcn8_savedmodel"}.get(fmt) or f"{name}.{fmt}")
        print(f"[export + time] {name}", flush=True)
        made = _child("--part", "export", "--args", str(checkpoint), fmt, str(target), quantize,
                      str(calibration) if quantize == "int8" or not keep else "", "keep" if keep else "")
        row = {"export": made}
        if "error" not in made and target.exists():
            row.update(_child("--part", "time", "--args", str(target), "exported", *timing))
        rows[name] = row
    return rows


def _predict_e2e(model_path: Path, photo: Path, out: Path) -> dict:
    env = {**os.environ, "COLUMNS": "200"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fcn_cli", "predict", str(photo), "--model", str(model_path), "-o", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    wall = time.perf_counter() - started
    return {"seconds": round(wall, 2)} if proc.returncode == 0 else {"error": proc.stderr.strip()[-300:]}


def _newest_camvid_checkpoint() -> Path | None:
    found = sorted((ROOT / "bench" / "results").glob("camvid-*/ours/fcn8.keras"))
    return found[-1].resolve() if found else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1/8-width model at 64x64: a smoke run of every path")
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint for the parity figures")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "camvid", help="photos for parity and int8")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        {"checkpoint": part_checkpoint, "export": part_export, "time": part_time}[args.part](*_typed(args.args))
        return 0

    sizes = QUICK if args.quick else FULL
    data = args.data if (args.data / "train").is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="fcn-export-bench-"))
    started = time.perf_counter()
    result = {"schema": "fcn-bench-export/1", "mode": "quick" if args.quick else "full",
              "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": {"variant": "fcn8", "width": sizes["width"], "head_width": sizes["head_width"],
                        "image_size": [sizes["size"], sizes["size"]], "batch": sizes["batch"], "weights": "random"},
              "machine": _machine(), "rows": {}, "errors": {}}
    checkpoint = work / "fcn8.keras"
    print("[checkpoint]", flush=True)
    result["model"].update(_child("--part", "checkpoint", "--args", str(checkpoint), str(sizes["width"]),
                                  str(sizes["head_width"]), str(sizes["size"])))
    # int8 calibrates on photos; without CamVid, on a generated set
    calibration = data
    if calibration is None:
        from fcn_cli.synthetic import generate_synthetic

        calibration = work / "synthetic"
        generate_synthetic(calibration, count=24, size=(sizes["size"], sizes["size"]), seed=0)
    timing = [str(sizes[k]) for k in ("size", "batch", "warmup", "repeats")]
    skip = {} if args.quick else {"onnx": ONNX_FULL_MODEL}
    result["rows"] = _rows(checkpoint, work / "random", timing, calibration, keep=True, skip=skip)
    trained = args.checkpoint or _newest_camvid_checkpoint()
    if trained is not None and data is not None and not args.quick:
        # The trained checkpoint: parity that means something, and ONNX Runtime's speed on a model tf2onnx can convert.
        from fcn_cli.inference import meta_image_size
        from fcn_cli.runs import read_checkpoint_meta

        h, w = meta_image_size(read_checkpoint_meta(trained)) or (224, 224)
        print(f"[trained checkpoint {trained}, {h}x{w}]", flush=True)
        trained_timing = [f"{h}x{w}", *timing[1:]]
        result["trained"] = {"checkpoint": str(trained), "data": str(data), "image_size": [h, w],
                             "rows": _rows(trained, work / "trained", trained_timing, data, keep=False, skip={})}
        photo = work / "street.png"
        from PIL import Image

        from fcn_cli.synthetic import render_scene

        Image.fromarray(render_scene(np.random.default_rng(1), 360, 480)[0]).save(photo)
        e2e = {}
        for name, path in (("keras", trained), ("onnx", work / "trained" / "onnx.onnx")):
            print(f"[fcn predict 480x360] {name}", flush=True)
            e2e[name] = _predict_e2e(path, photo, work / f"mask-{name}.png")
        result["trained"]["predict_480x360_end_to_end"] = e2e
    result["wall_s"] = round(time.perf_counter() - started, 1)
    stem = "export-quick" if args.quick else "export"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    _summary(result)
    return 0


def _typed(values: list[str]) -> list:
    out = []
    for v in values or []:
        try:
            out.append(int(v))
        except ValueError:
            try:
                out.append(float(v))
            except ValueError:
                out.append(v or None)
    return out


def _machine() -> dict:
    flags = set()
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "isa": sorted(f for f in flags if f.startswith("amx") or f == "avx512_bf16")}


def _summary(result: dict) -> None:
    for title, rows in (("random full-width FCN-8s", result["rows"]), ("trained checkpoint", result.get("trained", {}).get("rows", {}))):
        if not rows:
            continue
        print(title)
        base = rows.get("keras-float32", {}).get("images_per_s")
        for name, row in rows.items():
            rate = row.get("images_per_s")
            parity = (row.get("export") or {}).get("parity") or {}
            problem = row.get("skipped") or row.get("error") or (row.get("export") or {}).get("error")
            ratio = f" ({rate / base:.2f}x plain Keras float32)" if rate and base else ""
            print(f"  {name:14s} " + (f"{rate} images/s{ratio}" if rate else str(problem)[:120])
                  + (f", parity {parity.get('agreement')}" if parity else ""))


if __name__ == "__main__":
    sys.exit(main())
