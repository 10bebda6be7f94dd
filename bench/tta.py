"""Multi-scale test-time augmentation on real CamVid val: mIoU, the thin classes, and images/s per setting.

    .venv/bin/python bench/tta.py            # the bench-camvid checkpoint, ../shared/camvid, about 5 minutes

Each setting runs ``fcn_cli.evaluate.evaluate`` (resize mode, the checkpoint's inference size, 11 classes,
void ignored, scored at the annotations' own 480x360) ``--repeats`` times; the figures are the last run's
(the first pays for tracing the forward at each new input size). Writes bench/results/tta-<stamp>.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: fcn_cli importable without installing
    sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "camvid"
DEFAULT_MODEL = ROOT / "bench" / "results" / "camvid-20261203-101700" / "ours" / "fcn8.keras"

SETTINGS = {  # name: (scales, flip)
    "none": ((1.0,), False),
    "flip": ((1.0,), True),
    "scales 0.75,1,1.25": ((0.75, 1.0, 1.25), False),
    "scales 0.75,1,1.25 + flip": ((0.75, 1.0, 1.25), True),
    "scales 0.5-1.5 + flip": ((0.5, 0.75, 1.0, 1.25, 1.5), True),
}
THIN = ("column/pole", "traffic light (sign/symbol)", "pedestrian")


def measure(model: Path, data: Path, scales, flip: bool, repeats: int, batch_size: int, scratch: Path) -> dict:
    from rich.console import Console

    from fcn_cli.evaluate import evaluate

    runs = []
    for _ in range(max(1, repeats)):
        result = evaluate(model, data, split="val", json_path=scratch / "eval.json", mode="resize",
                          batch_size=batch_size, console=Console(file=io.StringIO()), flip=flip, scales=scales)
        runs.append(result)
    last = runs[-1]
    iou = {e["name"]: e["iou"] for e in last["per_class"]}
    return {
        "tta": last["tta"],
        "mean_iou": last["mean_iou"],
        "pixel_accuracy": last["pixel_accuracy"],
        "thin_iou": {name: iou[name] for name in THIN},
        "per_class_iou": iou,
        "images": last["images"],
        "images_per_s": [r["images_per_s"] for r in runs],
        "same_scores_every_run": all(r["confusion_matrix"] == last["confusion_matrix"] for r in runs),
    }


def cpu() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = sorted({f for line in text.splitlines() if line.startswith("flags") for f in line.split()
                    if f.startswith("amx") or f == "avx512_bf16"})
    return {"model_name": name, "amx_bf16_flags": flags, "usable_cores": len(os.sched_getaffinity(0))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--settings", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    report = {"model": str(args.model), "data": str(args.data), "split": "val", "mode": "resize",
              "batch_size": args.batch_size, "repeats": args.repeats, "machine": cpu(), "settings": {}}
    with tempfile.TemporaryDirectory(prefix="fcn-tta-") as scratch:  # evaluate's own report and confusion files
        for name in args.settings:
            scales, flip = SETTINGS[name]
            row = measure(args.model, args.data, scales, flip, args.repeats, args.batch_size, Path(scratch))
            report["settings"][name] = row
            thin = ", ".join(f"{k.split(' ')[0]} {v:.3f}" for k, v in row["thin_iou"].items())
            print(f"{name:28s} mIoU {row['mean_iou']:.4f}  {thin}  images/s {row['images_per_s']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tta-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
