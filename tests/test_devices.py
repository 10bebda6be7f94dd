"""Device rules (made-up device lists), fcn's kernels on and off, and checkpoints plain Keras can read."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from fcn_cli.devices import Device, plan

CPU = Device("CPU")


def gpu(major, minor=0):
    return Device("GPU", f"sm_{major}{minor}", (major, minor))


@pytest.mark.parametrize("devices, precision, strategy, accel", [
    ([CPU], "mixed_bfloat16", "one", True),  # the CPU verdict (faked below as bf16)
    ([CPU, gpu(8, 0)], "mixed_bfloat16", "one", False),  # A100
    ([CPU, gpu(9, 0), gpu(9, 0)], "mixed_bfloat16", "mirrored", False),  # 2x H100
    ([CPU, gpu(7, 5)], "mixed_float16", "one", False),  # T4
    ([CPU, gpu(7, 0), gpu(8, 6)], "mixed_float16", "mirrored", False),  # mixed: the oldest decides
    ([CPU, gpu(6, 1)], "float32", "one", False),  # Pascal
])
def test_decision_table(devices, precision, strategy, accel, monkeypatch):
    monkeypatch.delenv("FCN_ACCEL", raising=False)
    asked = []
    chosen = plan(devices, cpu_precision=lambda: asked.append(1) or "mixed_bfloat16")
    assert (chosen.precision, chosen.strategy, chosen.accel) == (precision, strategy, accel)
    assert bool(asked) == (devices == [CPU])  # the CPU probe is asked only when a CPU decides
    assert chosen.precision in chosen.why and chosen.strategy in chosen.why


def test_explicit_choices_and_the_switches(monkeypatch):
    monkeypatch.delenv("FCN_ACCEL", raising=False)
    assert plan([CPU, gpu(8, 0)], precision="float32").precision == "float32"
    assert plan([CPU, gpu(8, 0), gpu(8, 0)], strategy="one").strategy == "one"
    assert plan([CPU], workers=3).strategy == "multi-worker"
    monkeypatch.setenv("FCN_ACCEL", "0")
    off = plan([CPU])
    assert not off.accel and "FCN_ACCEL=0" in off.why


def _tiny(accel: bool):
    import keras

    from fcn_cli.model import build_fcn

    keras.utils.set_random_seed(3)
    return build_fcn("fcn8", 12, None, width=1 / 16, head_width=16, accel=accel)


def test_fcn_kernels_off_means_stock_layers_with_the_same_outputs():
    fast, plain = _tiny(True), _tiny(False)
    kinds = {type(layer).__name__ for layer in plain.layers}
    assert "MatmulConv2D" not in kinds and "SmallMapConv2D" not in kinds
    assert {"MatmulConv2D", "SmallMapConv2D"} <= {type(layer).__name__ for layer in fast.layers}
    plain.set_weights(fast.get_weights())
    photo = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(plain(photo)), np.asarray(fast(photo)), rtol=1e-4, atol=1e-4)


def test_best_checkpoint_loads_in_plain_keras_without_fcn(tmp_path, monkeypatch):
    """best.keras, written as fcn train writes it, read by keras.saving.load_model with fcn_cli unimportable."""
    from fcn_cli.runs import RunFolder, load_checkpoint

    run = RunFolder.create(tmp_path / "models", "fcn8")
    model = _tiny(True)
    photo = np.random.default_rng(1).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    np.save(tmp_path / "photo.npy", photo)
    np.save(tmp_path / "expected.npy", np.asarray(model(photo)))
    best = run.save_checkpoint(model, "best", {"variant": "fcn8", "epoch": 1})
    with zipfile.ZipFile(best) as zf:
        assert "fcn>" not in zf.read("config.json").decode()
    code = f"""
import sys
sys.modules["fcn_cli"] = None  # any import of fcn_cli now fails: plain Keras only
import numpy as np, keras
model = keras.saving.load_model({str(best)!r})
got = np.asarray(model(np.load({str(tmp_path / 'photo.npy')!r})))
np.testing.assert_allclose(got, np.load({str(tmp_path / 'expected.npy')!r}), rtol=1e-4, atol=1e-4)
print(sorted({{type(layer).__name__ for layer in model.layers}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Conv2D" in proc.stdout and "MatmulConv2D" not in proc.stdout
    # fcn puts its kernels back where they pay, and leaves them out where they are switched off.
    monkeypatch.delenv("FCN_ACCEL", raising=False)
    served, _ = load_checkpoint(best, for_inference=True)
    assert "MatmulConv2D" in {type(layer).__name__ for layer in served.layers}
    monkeypatch.setenv("FCN_ACCEL", "0")
    served, _ = load_checkpoint(best, for_inference=True)
    assert not {"MatmulConv2D", "SmallMapConv2D"} & {type(layer).__name__ for layer in served.layers}
    np.testing.assert_allclose(np.asarray(served(photo)), np.load(tmp_path / "expected.npy"), rtol=1e-4, atol=1e-4)


def test_last_checkpoint_keeps_fcn_kernels_for_resume(tmp_path):
    from fcn_cli.runs import RunFolder

    run = RunFolder.create(tmp_path / "models", "fcn8")
    path = run.save_checkpoint(_tiny(True), "last", {"variant": "fcn8", "epoch": 1})
    with zipfile.ZipFile(path) as zf:
        config = json.loads(zf.read("config.json"))
    assert "fcn>MatmulConv2D" in json.dumps(config)
