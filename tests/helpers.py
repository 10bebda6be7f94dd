"""Helpers the test files share: the real CLI in a subprocess, the one-line-error check, a tiny FCN.

Fixtures built from these (one tiny model and checkpoint per session, generated sets) are in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from fcn_cli.classes import CAMVID

# What a checkpoint of the tiny model says about itself.
META = {"variant": "fcn8", "classes": CAMVID.to_dict(), "image_size": [64, 64], "width": 1 / 16, "head_width": 16}
# `fcn train` flags for a tiny model: seconds per epoch on 2 cores.
TINY = ["--width", "0.0625", "--head-width", "16", "--backbone-weights", "none", "--image-size", "64x64",
        "--batch-size", "4", "--precision", "float32"]
TINY32 = ["--width", "0.0625", "--head-width", "16", "--backbone-weights", "none", "--image-size", "32x32",
          "--precision", "float32"]


def fcn(*args, cwd=None, timeout=600, check=None, columns=400):
    """Run the real CLI (`python -m fcn_cli ...`) in a subprocess; wide COLUMNS so rich never wraps a path.

    ``check``: the exit code it must return (stdout and stderr shown when it does not)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": str(columns)}
    env.pop("FCN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "fcn_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)
    if check is not None:
        assert proc.returncode == check, f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def predict_in_process(inputs, output, checkpoint, **kw):
    """fcn_cli.predict.predict with its console captured: the PredictResult, with ``.log`` the text printed."""
    import io

    from rich.console import Console

    from fcn_cli.predict import predict

    console = Console(file=io.StringIO(), width=300)
    result = predict([str(i) for i in inputs], None if output is None else str(output), checkpoint,
                     console=console, **kw)
    result.log = console.file.getvalue()
    return result


def documented_keys(schema: str) -> set[str]:
    """The top-level keys docs/json.md lists for ``schema`` (e.g. "fcn.evaluate/1")."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "json.md").read_text()
    section = text.split(f"## {schema}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))


def one_line_error(proc, *needles, code=2) -> str:
    """Exit code ``code`` (2: usage or data error), exactly one non-empty stderr line, no traceback, every needle in it."""
    assert proc.returncode == code, f"rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-2000:]}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def tiny_model(num_classes: int = 12, seed: int = 0, random_scores: bool = True):
    """FCN-8s at 1/16 width with a 16-wide head. Score layers start at zero (all logits 0); with
    ``random_scores`` they get random weights, so predictions (and saved bytes) vary."""
    import keras

    from fcn_cli.model import build_fcn

    keras.utils.set_random_seed(seed)
    model = build_fcn("fcn8", num_classes, backbone_weights=None, width=1 / 16, head_width=16)
    if random_scores:
        rng = np.random.default_rng(seed)
        for layer in model.layers:
            if layer.name.startswith("score"):
                kernel, bias = layer.get_weights()
                layer.set_weights([rng.normal(0, 1.0, kernel.shape).astype("float32"),
                                   rng.normal(0, 0.5, bias.shape).astype("float32")])
    return model


def hidden(folder) -> list[str]:
    """Leftovers of atomic writes: every dot file or *.tmp in the folder."""
    from pathlib import Path

    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))
