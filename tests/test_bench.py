"""`make bench` must keep running: its training/inference part at quick sizes, both flavours."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _part(*args: str) -> dict:
    out = subprocess.run([sys.executable, "bench/speed.py", "--part", "train", "--quick", *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("@@BENCH@@")]
    assert lines, out.stdout[-2000:]
    return json.loads(lines[-1].removeprefix("@@BENCH@@"))


@pytest.mark.parametrize("flavor", ["product", "baseline"])
def test_bench_train_and_inference_part_runs(flavor):
    result = _part("--flavor", flavor)
    assert result["train"]["images_per_s"] > 0 and result["inference"]["images_per_s"] > 0
    assert result["flops_forward_per_image"] > 0 and result["params"] > 0
    if flavor == "product":
        # Inference is measured as `fcn predict` runs it: best.keras through load_for_inference.
        assert "load_for_inference" in result["inference"]["path"]
        assert result["checkpoint"]["last"]["with_optimizer_state"] and result["checkpoint"]["best"]["bytes"] > 0
    else:
        assert result["precision"] == "float32"
