"""Reliability guarantees: atomic checkpoints, stable links, divergence, hostile checkpoints, no code
execution on load, bad input at scale, huge photos, pad/crop properties, odd image formats.

Every test here states one guarantee and fails if it breaks. Models are tiny (width 1/16, head 16),
images 32-64 px, except the one 8000x6000 photo that is the point of its test.
"""

from __future__ import annotations

import ast
import csv
import errno
import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from rich.console import Console

from fcn_cli import images
from fcn_cli.classes import CAMVID
from fcn_cli.errors import FcnError

REPO = Path(__file__).resolve().parents[1]
META = {"variant": "fcn8", "classes": CAMVID.to_dict(), "image_size": [64, 64], "width": 1 / 16, "head_width": 16}
TINY32 = ["--width", "0.0625", "--head-width", "16", "--backbone-weights", "none", "--image-size", "32x32",
          "--precision", "float32"]


# --------------------------------------------------------------------------- helpers


def fcn(*args, cwd=None, timeout=300):
    """Run the real CLI (`python -m fcn_cli ...`) in a subprocess; wide COLUMNS so rich never wraps a path."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    env.pop("FCN_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fcn_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


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
    import keras

    from fcn_cli.model import build_fcn

    keras.utils.set_random_seed(seed)
    model = build_fcn("fcn8", num_classes, backbone_weights=None, width=1 / 16, head_width=16)
    if random_scores:  # score layers start at zero; random ones make predictions (and saved bytes) differ
        rng = np.random.default_rng(seed)
        for layer in model.layers:
            if layer.name.startswith("score"):
                kernel, bias = layer.get_weights()
                layer.set_weights([rng.normal(0, 1.0, kernel.shape).astype("float32"),
                                   rng.normal(0, 0.5, bias.shape).astype("float32")])
    return model


def perturb(model, value: float | None = 1.0) -> None:
    """Change the weights so the next save has different bytes (value None: NaN, like a diverged model)."""
    layer = model.get_layer("score_fr")
    kernel, bias = layer.get_weights()
    if value is None:
        layer.set_weights([np.full_like(kernel, np.nan), np.full_like(bias, np.nan)])
    else:
        layer.set_weights([kernel + value, bias + value])


def hidden(folder: Path) -> list[str]:
    """Leftovers of atomic writes: every dot file or *.tmp in the folder."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming width x height with (almost) no pixel data: a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    from fcn_cli.runs import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "fcn8.keras"
    save_checkpoint(model, path, META)
    return path


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """4 train, 2 val, 2 test synthetic scenes of 32x32 (SegNet layout)."""
    from fcn_cli.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("small") / "synth"
    generate_synthetic(root, count=4, size=(32, 32), seed=0)
    return root


# =========================================================================== 1. atomic checkpoints


def _fail_weights_midway(monkeypatch, final: Path):
    """The weights stream into the temporary file; after 20 kB the disk is full."""
    from fcn_cli import keras_file

    real_pwrite = keras_file.os.pwrite
    seen = {"left": 20_000}

    def pwrite(fd, data, offset):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        seen["path"] = path
        assert path != final and path.parent == final.parent, "must save to a temporary file beside the target"
        data = memoryview(data).cast("B")
        if len(data) > seen["left"]:
            real_pwrite(fd, data[: seen["left"]], offset)  # some bytes land, then the disk is full
            seen["left"] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        seen["left"] -= len(data)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(keras_file.os, "pwrite", pwrite)
    return seen


def _fail_keras_fallback_midway(monkeypatch, final: Path):
    """A Keras whose internals moved: its own model.save writes part of a file, then the disk is full."""
    import keras

    from fcn_cli import keras_file

    seen = {}

    def partial_save(self, filepath, *args, **kwargs):
        filepath = Path(filepath)
        seen["path"] = filepath
        assert filepath != final and filepath.parent == final.parent, "must save to a temporary file beside the target"
        with open(filepath, "wb") as fh:
            fh.write(b"PK\x03\x04" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", partial_save)
    monkeypatch.setattr("fcn_cli.runs.save_keras", keras_file._save_with_keras)
    return seen


def _fail_metadata_append(monkeypatch, final: Path):
    """The weights are in; adding fcn.json runs out of space."""
    real = zipfile.ZipFile.writestr

    def writestr(self, name, data, *args, **kwargs):
        arcname = getattr(name, "filename", name)
        if arcname == "fcn.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, data, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", writestr)
    return {}


def _fail_fsync(monkeypatch, final: Path):
    """Delayed allocation: the data only fails to reach the disk at fsync."""

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    return {}


def _fail_rename(monkeypatch, final: Path):
    """The final rename is refused."""

    def replace(src, dst, *args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", replace)
    return {}


def _read_only_folder(monkeypatch, final: Path):
    """A read-only output folder. Tests run as root, and root writes into a chmod 0555 folder anyway,
    so the refusal the kernel would give a normal user (or a read-only mount) is simulated here."""
    import tempfile

    def mkstemp(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return {}


FAILURES = {
    "disk fills while the weights stream out": (_fail_weights_midway, "No space left on device"),
    "Keras's own saver (fallback) writes half a file": (_fail_keras_fallback_midway, "No space left on device"),
    "adding fcn.json fails": (_fail_metadata_append, "No space left on device"),
    "fsync fails": (_fail_fsync, "No space left on device"),
    "rename refused": (_fail_rename, "Permission denied"),
    "read-only folder": (_read_only_folder, "Read-only file system"),
}


@pytest.fixture
def previous(tmp_path, model):
    """A run folder holding a good last.keras (epoch 1); returns (path, its bytes)."""
    from fcn_cli.runs import save_checkpoint

    path = tmp_path / "run" / "last.keras"
    path.parent.mkdir()
    save_checkpoint(model, path, {**META, "epoch": 1})
    return path, path.read_bytes()


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_checkpoint_write_keeps_the_previous_one_intact(failure, previous, monkeypatch):
    from fcn_cli.runs import load_checkpoint, save_checkpoint

    path, before = previous
    newer = tiny_model(seed=1)  # different weights: different bytes if anything got through
    make_it_fail, reason = FAILURES[failure]
    seen = make_it_fail(monkeypatch, path)
    try:
        save_checkpoint(newer, path, {**META, "epoch": 2})
    except FcnError as exc:
        message = str(exc)
    else:
        pytest.fail("the failed write was not reported")
    finally:
        monkeypatch.undo()
    assert str(path) in message and "previous checkpoint is intact" in message and reason in message, message
    assert "\n" not in message
    assert path.read_bytes() == before, "the previous checkpoint changed"
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.keras"], "temporary files left behind"
    if "path" in seen:
        assert not seen["path"].exists()
    _, meta = load_checkpoint(path, num_classes=12)
    assert meta["epoch"] == 1


def test_interrupt_during_checkpoint_write_keeps_the_previous_one(previous, monkeypatch):
    from fcn_cli.runs import save_checkpoint

    path, before = previous

    from fcn_cli import keras_file

    real_crc = keras_file._crc32

    def interrupted(fd, start, size):  # Ctrl-C after the weights are out, before the zip is closed
        real_crc(fd, start, size)
        raise KeyboardInterrupt

    monkeypatch.setattr(keras_file, "_crc32", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model(seed=1), path, META)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.keras"]


def _run_with_epoch(tmp_path):
    from fcn_cli.runs import RunFolder

    run = RunFolder.create(tmp_path / "models", "fcn8")
    rows = [{"epoch": 1, "loss": 1.0, "val_loss": 1.1, "val_pixel_accuracy": 0.5, "val_miou": 0.2, "lr": 1e-3,
             "seconds": 1.0, "images_per_s": 4.0}]
    run.write_epoch(rows, {"epochs_done": 1, "best_miou": 0.2, "best_epoch": 1})
    return run, rows


@pytest.mark.parametrize("failure", ["fsync fails", "rename refused", "read-only folder"])
def test_failed_log_write_is_one_error_and_keeps_log_and_state(failure, tmp_path, monkeypatch):
    run, rows = _run_with_epoch(tmp_path)
    log, state = (run.path / "log.csv").read_bytes(), (run.path / "state.json").read_bytes()
    make_it_fail, reason = FAILURES[failure]
    make_it_fail(monkeypatch, run.path / "log.csv")
    with pytest.raises(FcnError) as info:
        run.write_epoch(rows + [{**rows[0], "epoch": 2}], {"epochs_done": 2, "best_miou": 0.2, "best_epoch": 1})
    monkeypatch.undo()
    message = str(info.value)
    assert "log.csv" in message and reason in message and "\n" not in message
    assert (run.path / "log.csv").read_bytes() == log and (run.path / "state.json").read_bytes() == state
    assert hidden(run.path) == []


# =========================================================================== 2. the stable link


def _run_with_best(tmp_path, model, name="fcn8-20260101-000000"):
    from fcn_cli.runs import RunFolder, save_checkpoint

    out = tmp_path / "models"
    (out / name).mkdir(parents=True)
    run = RunFolder(out / name)
    save_checkpoint(model, run.best, META)
    return out, run


def test_link_is_switched_atomically_to_a_complete_best(tmp_path, model, monkeypatch):
    from fcn_cli.runs import read_checkpoint_meta

    out, old = _run_with_best(tmp_path, model, "fcn8-old")
    assert old.link_stable(out / "fcn8.keras") == out / "fcn8.keras"
    _, new = _run_with_best(tmp_path, model, "fcn8-new")
    stable = out / "fcn8.keras"
    real_replace = os.replace
    checked = []

    def replace(src, dst, *args, **kwargs):
        if Path(dst) == stable:
            # The moment the link switches, its new target is a complete checkpoint, and the old
            # link still answers (the switch is one rename, never unlink + symlink).
            assert os.path.islink(src)
            target = Path(src).parent / os.readlink(src)
            read_checkpoint_meta(target)
            assert stable.resolve() == old.best.resolve()
            checked.append(target)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    assert new.link_stable(stable) == stable
    assert checked and stable.is_symlink() and stable.resolve() == new.best.resolve()
    assert not os.path.isabs(os.readlink(stable)), "the link should be relative, so models/ can move"
    assert hidden(out) == []


def test_link_never_points_at_a_missing_checkpoint(tmp_path):
    """BUG (see report): link_stable links to best.keras even when the run has none yet."""
    from fcn_cli.runs import RunFolder

    run = RunFolder.create(tmp_path / "models", "fcn8")
    stable = tmp_path / "models" / "fcn8.keras"
    run.link_stable(stable)
    assert not os.path.lexists(stable), "a link to a checkpoint that does not exist"


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_users_own_file_at_the_stable_path_is_never_replaced(what, tmp_path, model):
    out, run = _run_with_best(tmp_path, model)
    stable = out / "fcn8.keras"
    if what == "file":
        stable.write_bytes(b"my own model, not a link")
    else:
        stable.mkdir()
        (stable / "keep.txt").write_text("mine")
    assert run.link_stable(stable) is None
    if what == "file":
        assert not stable.is_symlink() and stable.read_bytes() == b"my own model, not a link"
    else:
        assert (stable / "keep.txt").read_text() == "mine"
    assert hidden(out) == []


@pytest.mark.parametrize("step", ["symlink", "replace"])
def test_failed_link_switch_keeps_the_old_link_and_leaves_nothing(step, tmp_path, model, monkeypatch):
    out, old = _run_with_best(tmp_path, model, "fcn8-old")
    stable = out / "fcn8.keras"
    old.link_stable(stable)
    _, new = _run_with_best(tmp_path, model, "fcn8-new")

    def refuse(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, step, refuse)
    assert new.link_stable(stable) is None
    monkeypatch.undo()
    assert stable.is_symlink() and stable.resolve() == old.best.resolve()
    assert hidden(out) == []


# =========================================================================== 3. divergence


def _recorder(tmp_path, **overrides):
    """(EpochRecorder, RunFolder, model) on a tiny compiled model; callbacks driven by hand."""
    from fcn_cli import train
    from fcn_cli.model import build_fcn
    from fcn_cli.runs import RunFolder

    # Every epoch commits unless a test asks otherwise: these tests are about what one write does.
    overrides = {"checkpoint_overhead": 1.0, **overrides}
    cfg = train.TrainConfig(out=str(tmp_path / "models"), variant="fcn8", image_size=(32, 32), width=1 / 16,
                            head_width=16, backbone_weights="none", epochs=5, batch_size=2, precision="float32",
                            **overrides)
    run = RunFolder.create(Path(cfg.out), cfg.variant)
    net = build_fcn("fcn8", 12, None, cfg.width, cfg.head_width)
    train.compile_model(net, train.make_optimizer(cfg, 2), 12, CAMVID.ignore_index)
    state = {"epochs_done": 0, "best_miou": None, "best_epoch": None}
    recorder = train.EpochRecorder(run, cfg, CAMVID, "float32", state, [], Console(file=io.StringIO()))
    recorder.set_model(net)
    return recorder, run, net


def _epoch(recorder, epoch, batch_losses, logs):
    recorder.on_epoch_begin(epoch)
    for i, loss in enumerate(batch_losses):
        recorder.on_train_batch_end(i, {"loss": loss})
    recorder.on_epoch_end(epoch, logs)


GOOD = {"loss": 2.0, "val_loss": 2.1, "val_pixel_accuracy": 0.3, "val_miou": 0.1}


def _snapshot(run, stable):
    return {name: (run.path / name).read_bytes() for name in ("last.keras", "best.keras", "log.csv", "state.json")}, \
        os.readlink(stable)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_batch_stops_training_and_keeps_the_last_good_epoch(bad, tmp_path):
    recorder, run, net = _recorder(tmp_path)
    stable = tmp_path / "models" / "fcn8.keras"
    _epoch(recorder, 0, [2.2, 1.9], GOOD)
    assert run.last.is_file() and stable.is_symlink()
    before = _snapshot(run, stable)

    perturb(net, None)  # what a diverged model's weights look like
    recorder.on_epoch_begin(1)
    recorder.on_train_batch_end(0, {"loss": 1.8})
    assert not net.stop_training
    recorder.on_train_batch_end(1, {"loss": bad})
    assert net.stop_training and recorder.diverged[0] == 2
    # Keras still calls on_epoch_end; a better-looking val mIoU must not tempt it into saving.
    recorder.on_epoch_end(1, {"loss": bad, "val_loss": bad, "val_pixel_accuracy": 0.9, "val_miou": 0.9})
    assert _snapshot(run, stable) == before
    rows = list(csv.DictReader(open(run.path / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1]
    assert json.loads((run.path / "state.json").read_text())["epochs_done"] == 1
    assert hidden(run.path) == []


def test_non_finite_validation_loss_is_divergence_too(tmp_path):
    """BUG (see report): the last batch's update can blow the weights up while every batch loss
    (computed before that update) was finite; only the validation loss shows it. Such an epoch
    must not replace last.keras / best.keras nor move the stable link."""
    recorder, run, net = _recorder(tmp_path)
    stable = tmp_path / "models" / "fcn8.keras"
    _epoch(recorder, 0, [2.2, 1.9], GOOD)
    before = _snapshot(run, stable)
    perturb(net, 1e30)
    _epoch(recorder, 1, [1.8, 1.7], {"loss": 1.75, "val_loss": float("nan"), "val_pixel_accuracy": 0.27,
                                     "val_miou": 0.5})
    assert recorder.diverged and net.stop_training
    assert _snapshot(run, stable) == before


def test_disk_full_at_epoch_end_is_one_error_and_keeps_the_last_epoch(tmp_path, monkeypatch):
    recorder, run, net = _recorder(tmp_path)
    stable = tmp_path / "models" / "fcn8.keras"
    _epoch(recorder, 0, [2.2, 1.9], GOOD)
    before = _snapshot(run, stable)
    perturb(net)
    _fail_fsync(monkeypatch, run.last)
    with pytest.raises(FcnError, match="previous checkpoint is intact"):
        _epoch(recorder, 1, [1.8], {**GOOD, "val_miou": 0.5})
    monkeypatch.undo()
    assert _snapshot(run, stable) == before
    assert hidden(run.path) == []


def test_time_limit_stops_after_a_saved_epoch(tmp_path):
    recorder, run, net = _recorder(tmp_path, time_limit=1e-6)
    _epoch(recorder, 0, [2.0], GOOD)
    assert net.stop_training and not recorder.diverged
    assert run.last.is_file() and json.loads((run.path / "state.json").read_text())["epochs_done"] == 1


def _optimizer_arrays(checkpoint: Path) -> int:
    import h5py

    with zipfile.ZipFile(checkpoint) as zf, h5py.File(io.BytesIO(zf.read("model.weights.h5")), "r") as h5:
        names = []
        h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sum(name.startswith("optimizer") for name in names)


def test_commits_are_spaced_by_their_cost_and_best_weights_wait_in_memory(tmp_path):
    from fcn_cli.runs import load_checkpoint, read_checkpoint_meta

    recorder, run, net = _recorder(tmp_path, checkpoint_overhead=0.05)
    probe = np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    net.train_on_batch(np.repeat(probe, 2, 0), np.zeros((2, 32, 32), np.int32))  # Adam's moments exist now
    scores = [0.1, 0.5, 0.3, 0.2, 0.25]  # best at epoch 2, five epochs planned
    _epoch(recorder, 0, [2.0], {**GOOD, "val_miou": scores[0]})
    assert read_checkpoint_meta(run.last)["epoch"] == 1  # the first epoch commits: it measures the cost
    recorder._commit_s = 1e6  # from now on a commit "costs" more than the run: only forced ones happen
    expected_best = None
    for epoch in (1, 2, 3):
        perturb(net)
        _epoch(recorder, epoch, [2.0], {**GOOD, "val_miou": scores[epoch]})
        if epoch == 1:
            expected_best = net.predict(probe, verbose=0)
        # Nothing written: the files still describe epoch 1, consistently.
        assert read_checkpoint_meta(run.last)["epoch"] == 1
        assert [int(r["epoch"]) for r in csv.DictReader(open(run.path / "log.csv"))] == [1]
        assert json.loads((run.path / "state.json").read_text())["epochs_done"] == 1
        assert read_checkpoint_meta(run.best)["epoch"] == 1
    perturb(net)
    _epoch(recorder, 4, [2.0], {**GOOD, "val_miou": scores[4]})  # the last planned epoch always commits
    assert read_checkpoint_meta(run.last)["epoch"] == 5
    assert [int(r["epoch"]) for r in csv.DictReader(open(run.path / "log.csv"))] == [1, 2, 3, 4, 5]
    state = json.loads((run.path / "state.json").read_text())
    assert state["epochs_done"] == 5 and state["best_epoch"] == 2
    best, meta = load_checkpoint(run.best)
    assert meta["epoch"] == 2
    np.testing.assert_allclose(best.predict(probe, verbose=0), expected_best, rtol=1e-6, atol=1e-6)
    # best.keras is for inference: no optimizer state (Adam's two moments make last.keras about 3x larger).
    assert getattr(best, "optimizer", None) is None
    assert _optimizer_arrays(run.best) == 0 and _optimizer_arrays(run.last) > 0
    assert hidden(run.path) == []


@pytest.mark.slow
def test_a_runaway_loss_without_nan_stops_the_run(small_set, tmp_path):
    """Adam at lr 0.3, constant, float32, seed 0: epoch 1 loss 2.9, epoch 2 about 1.5e4 and finite.

    NaN checks alone would train on; the runaway rule stops at epoch 2 and keeps epoch 1's best.keras.
    """
    from fcn_cli.runs import read_checkpoint_meta

    out = tmp_path / "models"
    proc = fcn("train", "--data", small_set, "--out", out, *TINY32, "--batch-size", "2", "--epochs", "6",
               "--optimizer", "adam", "--lr", "0.3", "--schedule", "constant", "--checkpoint-overhead", "1")
    line = one_line_error(proc, "diverged at epoch 2", "x the lowest epoch loss", "--lr", "best.keras", code=3)
    loss = float(line.split("(loss ")[1].split(",")[0])
    assert np.isfinite(loss) and loss > 100  # it exploded without reaching NaN
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    assert read_checkpoint_meta(run / "best.keras")["epoch"] == 1
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1]  # the runaway epoch is never logged as a good one


def test_time_limit_and_early_stop_commit_what_is_pending(tmp_path):
    from fcn_cli.runs import read_checkpoint_meta

    recorder, run, net = _recorder(tmp_path, checkpoint_overhead=0.05)
    _epoch(recorder, 0, [2.0], GOOD)
    recorder._commit_s = 1e6
    _epoch(recorder, 1, [2.0], {**GOOD, "val_miou": 0.4})
    assert read_checkpoint_meta(run.last)["epoch"] == 1
    recorder.on_train_end()  # fit ended early (e.g. stop_training): pending epochs are written
    assert read_checkpoint_meta(run.last)["epoch"] == 2 and read_checkpoint_meta(run.best)["epoch"] == 2
    recorder.cfg.time_limit = 1e-6
    _epoch(recorder, 2, [2.0], GOOD)
    assert net.stop_training and read_checkpoint_meta(run.last)["epoch"] == 3


@pytest.mark.slow
def test_absurd_learning_rate_exits_3_saying_diverged(small_set, tmp_path):
    """SGD at lr 1e12, float32, constant schedule, seed 0: deterministic divergence in 3 steps.

    The score layers start at zero, so step 1 changes only them (no gradient reaches the encoder);
    step 2 then sends ~1e12-scale gradients into every convolution; the next forward pass
    overflows float32 (activations > 3.4e38), so logits are inf and the loss NaN. Measured: epoch 1
    batch loss 3.7e11, epoch 1 val loss NaN, epoch 2 first batch loss NaN.
    """
    from fcn_cli.runs import load_checkpoint

    out = tmp_path / "models"
    proc = fcn("train", "--data", small_set, "--out", out, *TINY32, "--batch-size", "2", "--epochs", "3",
               "--optimizer", "sgd", "--lr", "1e12", "--schedule", "constant")
    one_line_error(proc, "diverged", "--lr", code=3)
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    rows = list(csv.DictReader(open(run / "log.csv"))) if (run / "log.csv").exists() else []
    for row in rows:  # every epoch the log keeps was a finite one
        assert np.isfinite(float(row["loss"])) and np.isfinite(float(row["val_loss"])), row
    # "the last good checkpoint" the message names really is good: finite logits.
    photo = np.asarray(Image.open(next((small_set / "val").iterdir())).convert("RGB"), np.float32)[None]
    for name in ("last.keras", "best.keras"):
        if (run / name).exists():
            net, _ = load_checkpoint(run / name, num_classes=12)
            assert np.isfinite(np.asarray(net(photo, training=False))).all(), f"{name} is a diverged model"


# =========================================================================== 4. hostile checkpoints


def _truncated(src: Path, dest: Path) -> Path:
    data = src.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


def _folder(src: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    return dest


def _foreign_zip(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr("readme.txt", "a zip, but not a Keras model")
    return dest


def _random_bytes(src: Path, dest: Path) -> Path:
    dest.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    return dest


def _bit_flip(src: Path, dest: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the weights: the zip CRC catches it
    dest.write_bytes(bytes(data))
    return dest


def _garbage_inside(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr("config.json", "{not json")
        zf.writestr("model.weights.h5", b"not hdf5")
    return dest


def _edit_config(src: Path, dest: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    config = json.loads(entries["config.json"])

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == "Dropout":
                edit(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(dest, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return dest


def _unregistered_class(src: Path, dest: Path) -> Path:
    def edit(node):
        node.update(module=None, class_name="SneakyLayer", registered_name="Custom>SneakyLayer")

    return _edit_config(src, dest, edit)


HOSTILE = {
    "truncated": (_truncated, "truncated"),
    "a folder": (_folder, "folder"),
    "a zip that is not a model": (_foreign_zip, "not a Keras model"),
    "random bytes": (_random_bytes, "not a Keras"),
    "a flipped bit": (_bit_flip, ""),
    "garbage inside a model-shaped zip": (_garbage_inside, "cannot load"),
    "an unregistered custom class": (_unregistered_class, "cannot load"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_broken_checkpoints_are_one_clear_error(case, checkpoint, tmp_path):
    from fcn_cli.runs import load_checkpoint

    make, needle = HOSTILE[case]
    path = make(checkpoint, tmp_path / "model.keras")
    with pytest.raises(FcnError) as info:
        load_checkpoint(path, num_classes=12)
    message = str(info.value)
    assert str(path) in message and needle in message and "\n" not in message, message


def test_five_class_model_with_the_twelve_class_table_is_refused(tmp_path):
    from fcn_cli.inference import load_for_inference
    from fcn_cli.runs import load_checkpoint, save_checkpoint

    path = tmp_path / "five.keras"
    save_checkpoint(tiny_model(num_classes=5), path, {"image_size": [32, 32]})  # no class table inside
    with pytest.raises(FcnError, match="5 classes but the class table has 12"):
        load_checkpoint(path, num_classes=12)
    with pytest.raises(FcnError) as info:  # predict / evaluate without --classes: CamVid's 12 classes
        load_for_inference(path)
    assert str(path) in str(info.value) and "5 classes" in str(info.value) and "12" in str(info.value)


@pytest.fixture(scope="module")
def lambda_checkpoint(tmp_path_factory):
    """A real .keras whose Lambda layer writes a sentinel file whenever it runs; (path, sentinel)."""
    import keras

    folder = tmp_path_factory.mktemp("lambda")
    sentinel = folder / "code-ran"
    payload = lambda x, p=str(sentinel): (__import__("pathlib").Path(p).write_text("pwned"), x)[1]  # noqa: E731
    net = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Lambda(payload), keras.layers.Conv2D(12, 1)])
    path = folder / "lambda.keras"
    net.save(path)
    assert sentinel.exists(), "the payload should run when the model is built (it did, here, on purpose)"
    sentinel.unlink()
    return path, sentinel


def test_lambda_in_a_checkpoint_is_refused_and_never_runs(lambda_checkpoint):
    from fcn_cli.runs import load_checkpoint

    path, sentinel = lambda_checkpoint
    with pytest.raises(FcnError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "Lambda" in message and "\n" not in message, message
    assert not sentinel.exists(), "loading a checkpoint ran code from it"


def test_checkpoint_naming_an_importable_module_does_not_import_it(checkpoint, tmp_path, monkeypatch):
    """A config that names a module on sys.path: safe loading must not import it (import = code)."""
    from fcn_cli.runs import load_checkpoint

    sentinel = tmp_path / "imported"
    (tmp_path / "fcn_probe_module.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('imported')\nclass Probe:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def edit(node):
        node.update(module="fcn_probe_module", class_name="Probe", registered_name="fcn_probe_module>Probe")

    path = _edit_config(checkpoint, tmp_path / "probe.keras", edit)
    with pytest.raises(FcnError, match="cannot load"):
        load_checkpoint(path)
    assert not sentinel.exists() and "fcn_probe_module" not in sys.modules


@pytest.mark.slow
def test_cli_evaluate_refuses_a_truncated_checkpoint_in_one_line(checkpoint, small_set, tmp_path):
    path = _truncated(checkpoint, tmp_path / "half.keras")
    one_line_error(fcn("evaluate", "--model", path, "--data", small_set, "--json", tmp_path / "r.json"),
                   str(path), "truncated")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_cli_evaluate_refuses_a_lambda_checkpoint_in_one_line(lambda_checkpoint, small_set, tmp_path):
    path, sentinel = lambda_checkpoint
    one_line_error(fcn("evaluate", "--model", path, "--data", small_set, "--json", tmp_path / "r.json"),
                   str(path), "Lambda")
    assert not sentinel.exists()


# =========================================================================== 5. no code from data


PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def unsafe_constructs(source: str, filename: str = "<src>") -> list[str]:
    """Every eval/exec call, pickle-family import, allow_pickle=True, load_model(safe_mode=<not True>)
    and enable_unsafe_deserialization() in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLERS:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if isinstance(func, ast.Name) and name in ("eval", "exec"):
                found.append(f"{where} {name}(...)")
            if name == "enable_unsafe_deserialization":
                found.append(f"{where} {name}()")
            for kw in node.keywords:
                literal = kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
                if kw.arg == "allow_pickle" and literal is not False:
                    found.append(f"{where} allow_pickle={literal}")
                if name == "load_model" and kw.arg == "safe_mode" and literal is not True:
                    found.append(f"{where} load_model(safe_mode={literal})")
    return found


def test_the_scanner_catches_each_unsafe_construct():
    planted = (
        "import pickle\nfrom dill import loads\nimport numpy as np\nimport keras\n"
        "eval('1')\nexec('x = 1')\nnp.load('a.npy', allow_pickle=True)\n"
        "keras.saving.load_model('m.keras', safe_mode=False)\nkeras.config.enable_unsafe_deserialization()\n"
    )
    assert len(unsafe_constructs(planted)) == 7
    safe = ("import numpy as np\nnp.load('a.npy', allow_pickle=False)\nmodel.evaluate(x)\n"
            "load_model(p, safe_mode=True)\n")
    assert unsafe_constructs(safe) == []


def test_no_pickle_eval_exec_or_unsafe_loading_in_the_package():
    files = sorted((REPO / "fcn_cli").rglob("*.py"))
    assert len(files) >= 15
    found = []
    for path in files:
        found += unsafe_constructs(path.read_text(), str(path.relative_to(REPO)))
    assert found == []
    # The one model loader is explicit about safe mode (so a change of Keras's default cannot flip it).
    assert "safe_mode=True" in (REPO / "fcn_cli" / "runs.py").read_text()


# =========================================================================== 6. bad input at scale


@pytest.mark.slow
def test_one_corrupt_mask_among_2000_pairs_is_named_before_any_run_folder(tmp_path):
    """2,000 train pairs of 32x32 PNGs: 8 encoded variants written by byte copy (about 0.2 s here),
    one mask truncated to half its bytes (its header still opens: only decoding finds it)."""
    root = tmp_path / "big"
    rng = np.random.default_rng(0)

    def png(array) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    photos = [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    masks = [png(rng.integers(0, 11, (32, 32), dtype=np.uint8)) for _ in range(8)]
    for split, n in (("train", 2000), ("val", 2)):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(n):
            (root / split / f"f{i:05d}.png").write_bytes(photos[i % 8])
            (root / f"{split}annot" / f"f{i:05d}.png").write_bytes(masks[i % 8])
    victim = root / "trainannot" / "f01234.png"
    victim.write_bytes(victim.read_bytes()[: len(masks[1234 % 8]) // 2])

    out = tmp_path / "models"
    line = one_line_error(fcn("train", "--data", root, "--out", out, "--epochs", "1", *TINY32), str(victim),
                          "1 of 2000")
    assert line.count(".png") == 1, "only the corrupt file is named"
    assert not out.exists() or not any(out.iterdir()), "a run folder was created before the data was checked"


# =========================================================================== 7. predict with a bad file


@pytest.mark.slow
def test_cli_predict_writes_the_good_masks_names_the_bad_and_exits_1(checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(src / "good1.png")
    Image.fromarray(rng.integers(0, 256, (33, 64, 3), dtype=np.uint8)).save(src / "good2.jpg")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    png_header_only(src / "huge.png", 20_000, 10_000)  # 200 MP: over the 120 MP limit, 120 bytes on disk
    out = tmp_path / "out"
    proc = fcn("predict", src, "-o", out, "--model", checkpoint)
    assert proc.returncode == 1, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good1.png", "good2.png"]
    assert Image.open(out / "good1.png").size == (50, 40) and Image.open(out / "good2.png").size == (64, 33)
    said = proc.stdout + proc.stderr
    assert str(src / "broken.png") in said and "decode" in said
    assert str(src / "huge.png") in said and "120,000,000-pixel limit" in said
    assert "2 failed" in said


# =========================================================================== 8. very large images


@pytest.mark.slow
def test_8000x6000_photo_in_resize_mode_gives_a_mask_of_its_size(checkpoint, tmp_path):
    """Two flat colours compress to ~150 kB on disk, 144 MB decoded. Measured here: 0.6 s to write,
    ~6 s to predict (decode, resize, band-wise upsampling and argmax, PNG write), 1.8 GB peak RSS."""
    from fcn_cli.predict import predict

    photo = Image.new("RGB", (8000, 6000), (90, 120, 200))
    photo.paste((128, 64, 128), (0, 3000, 8000, 6000))
    path = tmp_path / "huge.png"
    photo.save(path)
    del photo
    assert path.stat().st_size < 1_000_000  # cheap on disk ...
    assert images.image_size(path) == (6000, 8000) and 8000 * 6000 < images.MAX_PIXELS  # ... 144 MB decoded
    result = predict([str(path)], str(tmp_path / "mask.png"), checkpoint, console=Console(file=io.StringIO()))
    assert not result.failed and result.written == [tmp_path / "mask.png"]
    with Image.open(tmp_path / "mask.png") as mask:
        assert mask.size == (8000, 6000)
        sample = np.asarray(mask.convert("RGB"))[::97, ::89].reshape(-1, 3)
    assert {tuple(c) for c in sample} <= set(CAMVID.colors)


def test_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(photo)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(mask)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels decoded before the size check")

    from PIL import ImageFile

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # what PNG / JPEG files really call
    for read in (images.read_image, lambda p: images.read_mask(p, CAMVID)):
        path = photo if read is images.read_image else mask
        with pytest.raises(FcnError) as info:
            read(path)
        message = str(info.value)
        assert str(path) in message and "40x40" in message and "1,000-pixel limit" in message
        assert "\n" not in message


def test_over_the_pixel_limit_in_training_data_names_the_file_and_limit(tmp_path, monkeypatch):
    from fcn_cli import pipeline
    from fcn_cli.datasets import Pair

    pairs = []
    for name, side in (("small", 20), ("large", 40)):
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / f"{name}.png")
        Image.fromarray(np.zeros((side, side), np.uint8)).save(tmp_path / f"{name}_mask.png")
        pairs.append(Pair(tmp_path / f"{name}.png", tmp_path / f"{name}_mask.png", name))
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(FcnError) as info:
        pipeline.load_arrays(pairs, CAMVID, workers=1)
    message = str(info.value)
    assert "large.png" in message and "1,000-pixel limit" in message and "small" not in message


def test_a_header_claiming_200_megapixels_is_refused_cheaply(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 20_000, 10_000)
    assert path.stat().st_size < 200
    with pytest.raises(FcnError) as info:
        images.read_image(path)
    assert "20000x10000" in str(info.value) and "120,000,000-pixel limit" in str(info.value)


# =========================================================================== 9. pad / crop properties


@settings(deadline=None, max_examples=50)
@given(
    batch=st.integers(1, 2),
    height=st.integers(1, 200),
    width=st.integers(1, 200),
    channels=st.integers(1, 3),
    dtype=st.sampled_from([np.uint8, np.float32]),
)
def test_pad_to_multiple_and_crop_to_round_trip(batch, height, width, channels, dtype):
    from fcn_cli.model import crop_to, pad_to_multiple

    x = (np.arange(batch * height * width * channels) % 251).reshape(batch, height, width, channels).astype(dtype)
    padded, hw = pad_to_multiple(x, 32)
    assert hw == (height, width)
    ph, pw = padded.shape[1:3]
    assert padded.shape[0] == batch and padded.shape[3] == channels and padded.dtype == x.dtype
    assert ph % 32 == 0 and pw % 32 == 0
    assert height <= ph < height + 32 and width <= pw < width + 32
    np.testing.assert_array_equal(crop_to(padded, hw), x)  # the original sits at the top left, untouched
    # Mirror padding: the rows / columns just past the edge repeat the edge backwards.
    k = min(ph - height, height)
    np.testing.assert_array_equal(padded[:, height:height + k, :width], x[:, height - k:][:, ::-1])
    k = min(pw - width, width)
    np.testing.assert_array_equal(padded[:, :height, width:width + k], x[:, :, width - k:][:, :, ::-1])


# =========================================================================== 10. odd formats as training data


def _odd_format_set(root: Path) -> dict[str, np.ndarray]:
    """A SegNet-layout set whose train photos are gray, RGBA, 16-bit, palette PNGs and an
    EXIF-rotated JPEG, each with an index mask of its upright size; returns the expected RGB."""
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
    h, w = 40, 24
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 6, xx * 10, (yy + xx) * 4], -1).astype(np.uint8)
    expected = {}
    train = root / "train"

    gray = base[..., 0]
    Image.fromarray(gray).save(train / "gray.png")
    expected["gray.png"] = np.repeat(gray[..., None], 3, axis=2)

    rgba = np.dstack([base, np.full((h, w), 255, np.uint8)])
    rgba[: h // 2, :, 3] = 0  # top half fully transparent: shown over white
    Image.fromarray(rgba).save(train / "rgba.png")
    expected["rgba.png"] = np.where(rgba[..., 3:] == 0, 255, base).astype(np.uint8)

    deep = (base[..., 1].astype(np.uint16) * 257)
    Image.fromarray(deep).save(train / "deep16.png")
    assert Image.open(train / "deep16.png").mode.startswith("I")
    expected["deep16.png"] = np.repeat(base[..., 1:2], 3, axis=2)

    Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(train / "palette.png")
    expected["palette.png"] = np.asarray(Image.open(train / "palette.png").convert("RGB"))

    upright = np.zeros((h, w, 3), np.uint8)
    upright[: h // 2] = (255, 0, 0)  # red on top, blue below, as a viewer shows it
    upright[h // 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1))).save(train / "rotated.jpg", exif=exif, quality=95)
    assert Image.open(train / "rotated.jpg").size == (h, w)  # stored sideways: 40 wide, 24 high
    expected["rotated.jpg"] = upright

    for name in expected:
        Image.fromarray((yy // 10).astype(np.uint8)).save(root / "trainannot" / f"{Path(name).stem}.png")
    Image.fromarray(base).save(root / "val" / "v.png")
    Image.fromarray(np.zeros((h, w), np.uint8)).save(root / "valannot" / "v.png")
    return expected


def test_odd_photo_formats_decode_to_upright_rgb_for_training(tmp_path):
    from fcn_cli import pipeline
    from fcn_cli.datasets import find_dataset

    expected = _odd_format_set(tmp_path / "set")
    pairs = find_dataset(tmp_path / "set").pairs("train")
    assert sorted(p.image.name for p in pairs) == sorted(expected)
    photos, labels = pipeline.load_arrays(pairs, CAMVID, workers=2)
    for pair, photo, label in zip(pairs, photos, labels):
        name = pair.image.name
        assert photo.shape == (40, 24, 3) and photo.dtype == np.uint8, name
        assert label.shape == (40, 24), name
        if name.endswith(".jpg"):  # lossy: compare away from the red/blue edge (chroma is subsampled)
            for rows in (slice(0, 16), slice(24, 40)):
                assert np.abs(photo[rows].astype(int) - expected[name][rows].astype(int)).max() <= 12, name
        else:
            assert np.abs(photo.astype(int) - expected[name].astype(int)).max() <= 1, name


def test_training_precheck_accepts_an_exif_rotated_photo_with_an_upright_mask(tmp_path):
    """BUG (see report): `fcn train` runs quick_check on file headers, which compares the photo's
    stored (sideways) size with the mask's, and refuses a pair that `fcn data check` and the
    pipeline both accept."""
    from fcn_cli.datasets import check_dataset, find_dataset, quick_check

    _odd_format_set(tmp_path / "set")
    dataset = find_dataset(tmp_path / "set")
    assert check_dataset(dataset, CAMVID).ok  # the full decode agrees the set is fine
    assert [str(p) for p in quick_check(dataset, CAMVID, ["train", "val"])] == []


def test_ctrl_c_during_fit_stops_at_the_next_batch_and_a_second_one_at_once():
    import os
    import signal

    from fcn_cli.train import StopOnCtrlC

    before = signal.getsignal(signal.SIGINT)
    with StopOnCtrlC() as stop:
        assert signal.getsignal(signal.SIGINT) is not before
        os.kill(os.getpid(), signal.SIGINT)  # wherever it lands (a weakref callback, say), nothing raises there
        time.sleep(0.05)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.on_train_batch_end(0)
        stop.on_train_batch_end(1)  # one request, one stop
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C: Python's own, at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
    # The handler comes back whatever leaves the block; a request after the last batch still stops.
    with pytest.raises(RuntimeError):
        with StopOnCtrlC():
            raise RuntimeError("fit failed")
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        with StopOnCtrlC():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_ctrl_c_stays_ignored_during_fit():
    import os
    import signal

    from fcn_cli.train import StopOnCtrlC

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopOnCtrlC() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            stop.on_train_batch_end(0)
            assert not stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
