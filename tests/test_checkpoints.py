"""Checkpoint writes are atomic and the stable link only ever points at a complete best checkpoint:
whatever fails (a full disk, fsync, rename, a read-only folder, Ctrl-C mid-write), what a user had stays."""

from __future__ import annotations

import errno
import os
import zipfile
from pathlib import Path

import pytest
from helpers import META, hidden, tiny_model

from fcn_cli.errors import FcnError

# =========================================================================== 1. atomic checkpoints


ENOSPC, EACCES, EROFS = "No space left on device", "Permission denied", "Read-only file system"
FAILURES = {}  # what fails -> (how to make it fail, what the one-line error must say)


def failure(what: str, says: str):
    """Register a way for a checkpoint write to fail."""
    def register(make_it_fail):
        FAILURES[what] = (make_it_fail, says)
        return make_it_fail
    return register


@failure("disk fills while the weights stream out", ENOSPC)
def _fail_weights_midway(monkeypatch, final: Path):
    """The weights stream into the temporary file; after 20 kB the disk is full."""
    from fcn_cli.accel import checkpoint_io as keras_file

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


@failure("Keras's own saver (fallback) writes half a file", ENOSPC)
def _fail_keras_fallback_midway(monkeypatch, final: Path):
    """A Keras whose internals moved: its own model.save writes part of a file, then the disk is full."""
    import keras

    from fcn_cli.accel import checkpoint_io as keras_file

    seen = {}

    def partial_save(self, filepath, *args, **kwargs):
        filepath = Path(filepath)
        seen["path"] = filepath
        assert filepath != final and filepath.parent == final.parent, "must save to a temporary file beside the target"
        with open(filepath, "wb") as fh:
            fh.write(b"PK\x03\x04" + b"\0" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", partial_save)
    monkeypatch.setattr("fcn_cli.runs.save_keras", keras_file.save_with_keras)
    return seen


@failure("adding fcn.json fails", ENOSPC)
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


@failure("fsync fails", ENOSPC)
def _fail_fsync(monkeypatch, final: Path):
    """Delayed allocation: the data only fails to reach the disk at fsync."""

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    return {}


@failure("rename refused", EACCES)
def _fail_rename(monkeypatch, final: Path):
    """The final rename is refused."""

    def replace(src, dst, *args, **kwargs):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", replace)
    return {}


@failure("read-only folder", EROFS)
def _read_only_folder(monkeypatch, final: Path):
    """A read-only output folder. Tests run as root, and root writes into a chmod 0555 folder anyway,
    so the refusal the kernel would give a normal user (or a read-only mount) is simulated here."""
    import tempfile

    def mkstemp(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return {}




@pytest.fixture
def previous(tmp_path, model):
    """A run folder holding a good last.keras (epoch 1); returns (path, its bytes)."""
    from fcn_cli.runs import save_checkpoint

    path = tmp_path / "run" / "last.keras"
    path.parent.mkdir()
    save_checkpoint(model, path, {**META, "epoch": 1})
    return path, path.read_bytes()


@pytest.mark.usefixtures("levers_on")  # several failures strike inside the one-pass writer
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


@pytest.mark.usefixtures("levers_on")
def test_interrupt_during_checkpoint_write_keeps_the_previous_one(previous, monkeypatch):
    from fcn_cli.runs import save_checkpoint

    path, before = previous

    from fcn_cli.accel import checkpoint_io as keras_file

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
