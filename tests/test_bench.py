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


def test_gpu_check_runs_on_the_cpu_at_tiny_width(tmp_path):
    """bench/gpu_check.py is what one lent GPU run executes: it must work before that run, here under JAX."""
    pytest.importorskip("jax", reason="the GPU check runs under KERAS_BACKEND=jax; install the jax extra")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["learns"]["ok"] and result["ceiling"]["gflops"] > 0
    for run in result["runs"]:
        assert run["train"]["images_per_s"] > 0 and run["inference"]["images_per_s"] > 0
        assert 0 < run["train"]["fraction_of_bf16_matmul_ceiling"]
