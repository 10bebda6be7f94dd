"""Training guards: a NaN, non-finite or runaway loss stops the run and keeps the last good epoch; commits
are spaced by their cost; a time limit and Ctrl-C commit what is pending."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY32, fcn, hidden, one_line_error
from PIL import Image
from rich.console import Console

from fcn_cli.classes import CAMVID
from fcn_cli.errors import FcnError


def perturb(model, value: float | None = 1.0) -> None:
    """Change the weights so the next save has different bytes (value None: NaN, like a diverged model)."""
    layer = model.get_layer("score_fr")
    kernel, bias = layer.get_weights()
    if value is None:
        layer.set_weights([np.full_like(kernel, np.nan), np.full_like(bias, np.nan)])
    else:
        layer.set_weights([kernel + value, bias + value])


# =========================================================================== 3. divergence


def _recorder(tmp_path, **overrides):
    """(EpochRecorder, RunFolder, model) on a tiny compiled model; callbacks driven by hand."""
    from fcn_cli import callbacks, fit, train
    from fcn_cli.model import build_fcn
    from fcn_cli.runs import RunFolder

    # Every epoch commits unless a test asks otherwise: these tests are about what one write does.
    overrides = {"checkpoint_overhead": 1.0, **overrides}
    cfg = train.TrainConfig(out=str(tmp_path / "models"), variant="fcn8", image_size=(32, 32), width=1 / 16,
                            head_width=16, backbone_weights="none", epochs=5, batch_size=2, precision="float32",
                            **overrides)
    run = RunFolder.create(Path(cfg.out), cfg.variant)
    net = build_fcn("fcn8", 12, None, cfg.width, cfg.head_width)
    fit.compile_model(net, fit.make_optimizer(cfg, 2), 12, CAMVID.ignore_index)
    state = {"epochs_done": 0, "best_miou": None, "best_epoch": None}
    recorder = callbacks.EpochRecorder(run, cfg, CAMVID, "float32", state, [], Console(file=io.StringIO()))
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
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
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


def test_ctrl_c_during_fit_stops_at_the_next_batch_and_a_second_one_at_once():
    import os
    import signal

    from fcn_cli.callbacks import StopOnSignal

    before = signal.getsignal(signal.SIGINT)
    with StopOnSignal() as stop:
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
        with StopOnSignal():
            raise RuntimeError("fit failed")
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):
        with StopOnSignal():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_ctrl_c_stays_ignored_during_fit():
    import os
    import signal

    from fcn_cli.callbacks import StopOnSignal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            stop.on_train_batch_end(0)
            assert not stop.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_during_fit_stops_at_the_next_batch_as_preempted():
    import os
    import signal

    from fcn_cli.callbacks import Preempted, StopOnSignal

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # whatever the test runner set: the default, as in fcn
    try:
        with StopOnSignal() as stop:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
            os.kill(os.getpid(), signal.SIGTERM)  # would end the process without the handler
            time.sleep(0.05)
            assert stop.requested == signal.SIGTERM
            with pytest.raises(Preempted):
                stop.on_train_batch_end(0)
            stop.on_train_batch_end(1)  # one request, one stop
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


# =========================================================================== schedule fitted to --time-limit


@pytest.mark.parametrize("done, elapsed, epoch_s, limit, cap, ends", [
    (1, 40.0, 30.0, 60.0, 20, 1),     # the next epoch would overrun: the schedule ends now
    (1, 4.0, 3.0, 15.0, 20, 4),       # 11 s left: three more 3-s epochs
    (2, 8.0, 3.0, 600.0, 20, 20),     # plenty of time: never beyond --epochs
    (3, 70.0, 10.0, 60.0, 20, 3),     # already past the limit
])
def test_epochs_that_fit_follow_the_time_limit_stop_rule(done, elapsed, epoch_s, limit, cap, ends):
    from fcn_cli.callbacks import epochs_that_fit

    assert epochs_that_fit(done, elapsed, epoch_s, limit, cap) == ends


def test_schedule_ends_at_the_last_epoch_that_fits_the_time_limit(tmp_path):
    """20 epochs planned, 13.2 s allowed, each epoch 3 s by the (fake) clock (1 s per step, 1 s of validation):
    after the first epoch (10.2 s left: 3 more at 3.15 s, the plan's 5% margin) the poly schedule's end moves
    to epoch 4 without tracing the step again, and after 4 epochs of model.fit the rate is at its floor."""
    import keras

    from fcn_cli import callbacks, fit, train
    from fcn_cli.model import build_fcn

    cfg = train.TrainConfig(out=str(tmp_path), variant="fcn8", image_size=(32, 32), width=1 / 16, head_width=16,
                            backbone_weights="none", epochs=20, batch_size=2, precision="float32", time_limit=0.22,
                            schedule="poly", lr=1e-3)
    net = build_fcn("fcn8", 12, None, cfg.width, cfg.head_width)
    fit.compile_model(net, fit.make_optimizer(cfg, 2), 12, CAMVID.ignore_index)
    now = [0.0]

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            now[0] += 1

        on_epoch_end = on_train_batch_end

    out = io.StringIO()
    fitter = callbacks.ScheduleFitter(cfg, 2, Console(file=out, width=200), clock=lambda: now[0])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 11, (4, 32, 32)).astype("int32")
    before = net.get_layer("score_fr").get_weights()[0].copy()
    net.make_train_function()
    first_step = net.train_function
    net.fit(x, y, batch_size=2, epochs=4, callbacks=[Tick(), fitter], verbose=0, shuffle=False)
    assert fitter.planned == [(1, 4)]
    assert net.optimizer._learning_rate.end == 8
    assert net.train_function is first_step  # the end is a variable of the traced step: no retrace
    assert int(net.optimizer.iterations.numpy()) == 8
    assert callbacks._current_lr(net) == pytest.approx(cfg.lr * 0.01)
    assert not np.allclose(net.get_layer("score_fr").get_weights()[0], before)
    assert "4 of 20 epochs fit; the poly schedule now ends at epoch 4" in out.getvalue()


def test_schedule_keeps_its_plan_when_the_epochs_fit(tmp_path):
    from fcn_cli import callbacks, fit, train
    from fcn_cli.model import build_fcn

    cfg = train.TrainConfig(out=str(tmp_path), variant="fcn8", image_size=(32, 32), width=1 / 16, head_width=16,
                            backbone_weights="none", epochs=3, batch_size=2, precision="float32", time_limit=60.0)
    net = build_fcn("fcn8", 12, None, cfg.width, cfg.head_width)
    fit.compile_model(net, fit.make_optimizer(cfg, 2), 12, CAMVID.ignore_index)
    fitter = callbacks.ScheduleFitter(cfg, 2, Console(file=io.StringIO()))
    x = np.zeros((4, 32, 32, 3), "float32")
    net.fit(x, np.zeros((4, 32, 32), "int32"), batch_size=2, epochs=3, callbacks=[fitter], verbose=0)
    assert fitter.planned == [] and net.optimizer._learning_rate.end == 6


def _unit_with_poly(decay_steps: int):
    """A one-weight model on SGD with a fitted poly schedule: enough for ScheduleFitter, which reads the
    optimizer."""
    import keras

    from fcn_cli.schedules import FittedDecay

    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    schedule = keras.optimizers.schedules.PolynomialDecay(0.1, decay_steps, end_learning_rate=0.001, power=0.9)
    net.compile(optimizer=keras.optimizers.SGD(FittedDecay(schedule)), loss="mse")
    return net


def _drive(fitter, epochs: int, now: list, step_s: float = 1.0, val_s: float = 1.0, wait_s: float = 0.0) -> None:
    """Epochs of 2 steps by the fake clock ``now``: ``wait_s`` for the first batch's data, ``step_s`` per
    step, ``val_s`` of validation."""
    fitter.on_train_begin()
    for epoch in range(epochs):
        fitter.on_epoch_begin(epoch)
        now[0] += wait_s
        for batch in range(2):
            now[0] += step_s
            fitter.on_train_batch_end(batch)
        now[0] += val_s
        fitter.on_epoch_end(epoch)


def _time_limited(tmp_path, epochs: int, seconds: float):
    from fcn_cli import train

    return train.TrainConfig(out=str(tmp_path), epochs=epochs, time_limit=seconds / 60, schedule="poly")


def test_schedule_moves_out_again_when_the_first_epoch_overstated_its_time(tmp_path):
    """Epoch 1: 9 s of validation tracing make it look like 11 s (4 epochs fit in 60 s); epoch 2 takes 3 s:
    the end moves out to the epochs that fit with 5% to spare (37 s left / 3.15 s: 11 more, so 13)."""
    from fcn_cli import callbacks

    now = [0.0]
    net = _unit_with_poly(60)
    fitter = callbacks.ScheduleFitter(_time_limited(tmp_path, 30, 60), 2, Console(file=io.StringIO()),
                                      clock=lambda: now[0])
    fitter.set_model(net)
    fitter.on_train_begin()
    for epoch, times in enumerate([(10, 11, 20), (21, 22, 23), (24, 25, 26)]):
        fitter.on_epoch_begin(epoch)
        for batch, t in enumerate(times[:-1]):
            now[0] = t
            fitter.on_train_batch_end(batch)
        now[0] = times[-1]
        fitter.on_epoch_end(epoch)
    # Epoch 3 (3 s, 34 s left): 10 more fit with the margin, 13 in all: no move.
    assert fitter.planned == [(1, 4), (2, 13)]
    assert net.optimizer._learning_rate.end == 26


def test_the_wait_for_each_epochs_first_batch_is_a_cost_of_every_epoch(tmp_path):
    """Steps of 0.1 s, but each epoch's first batch waits 2 s for data (a shuffle buffer filling): the first
    epoch's steady steps and validation say 0.5 s, so the plan keeps all 100 epochs; from the second epoch
    on, whole epochs (2.5 s) say 22, and the end moves there and stays, before the stop (after epoch 24)."""
    from fcn_cli import callbacks

    now = [0.0]
    net = _unit_with_poly(200)
    fitter = callbacks.ScheduleFitter(_time_limited(tmp_path, 100, 60), 2, Console(file=io.StringIO()),
                                      clock=lambda: now[0])
    fitter.set_model(net)
    _drive(fitter, 6, now, step_s=0.1, val_s=0.3, wait_s=2.0)
    assert fitter.planned == [(2, 22)] and net.optimizer._learning_rate.end == 44


@pytest.mark.parametrize("loss_scaled", [False, True], ids=["plain", "mixed_float16 loss scaling"])
def test_the_traced_step_trains_with_the_moved_end(tmp_path, loss_scaled):
    """What the traced step really applies, not what the schedule object says: a linear unit whose loss is
    its mean output moves its weight by exactly -lr each step (SGD without momentum, inputs of 1), so the
    weights after each batch read back the rate of every step. 2 steps on the 20-epoch plan, then 6 on the
    4-epoch one, from the step traced once. Through mixed_float16's LossScaleOptimizer too, which wraps the
    optimizer that holds the schedule."""
    import keras

    from fcn_cli import callbacks, train
    from fcn_cli.schedules import FittedDecay

    cfg = train.TrainConfig(out=str(tmp_path), epochs=20, batch_size=2, time_limit=0.22, schedule="poly", lr=0.1)
    poly = dict(initial_learning_rate=0.1, end_learning_rate=0.001, power=0.9)
    optimizer = keras.optimizers.SGD(FittedDecay(keras.optimizers.schedules.PolynomialDecay(decay_steps=40, **poly)))
    if loss_scaled:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    net.compile(optimizer=optimizer, loss=lambda y, p: keras.ops.mean(p))
    now, weights = [0.0], []

    class Tick(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            now[0] += 1
            weights.append(float(net.get_weights()[0][0, 0]))

        def on_epoch_end(self, epoch, logs=None):
            now[0] += 1

    fitter = callbacks.ScheduleFitter(cfg, 2, Console(file=io.StringIO()), clock=lambda: now[0])
    net.make_train_function()
    first_step = net.train_function
    net.fit(np.ones((4, 1), "float32"), np.zeros((4, 1), "float32"), batch_size=2, epochs=4,
            callbacks=[Tick(), fitter], verbose=0, shuffle=False)
    assert fitter.planned == [(1, 4)] and net.train_function is first_step
    applied = -np.diff([0.0, *weights])
    old, new = (keras.optimizers.schedules.PolynomialDecay(decay_steps=n, **poly) for n in (40, 8))
    expected = [float(old(0)), float(old(1)), *(float(new(step)) for step in range(2, 8))]
    np.testing.assert_allclose(applied, expected, rtol=1e-4)


def test_the_end_does_not_move_out_once_the_schedule_has_reached_it(tmp_path):
    """12.21 s allowed, 3-s epochs: the end moves to epoch 3. After it, 3.21 s are left: a 4th epoch fits by
    the margin's 3.15 s, but the rate has reached its floor; moving the end out would raise it again."""
    from fcn_cli import callbacks

    now = [0.0]
    net = _unit_with_poly(40)
    fitter = callbacks.ScheduleFitter(_time_limited(tmp_path, 20, 12.21), 2, Console(file=io.StringIO()),
                                      clock=lambda: now[0])
    fitter.set_model(net)
    _drive(fitter, 4, now)
    assert fitter.planned == [(1, 3)] and net.optimizer._learning_rate.end == 6


def test_the_time_limit_counts_from_the_fitters_creation_like_the_stop(tmp_path):
    """30 s pass between making the callbacks and the first step (fit's setup): the stop counts them
    (EpochRecorder's clock starts at its creation), so the plan does too: 27 s are left after epoch 1."""
    from fcn_cli import callbacks

    now = [0.0]
    net = _unit_with_poly(60)
    fitter = callbacks.ScheduleFitter(_time_limited(tmp_path, 30, 60), 2, Console(file=io.StringIO()),
                                      clock=lambda: now[0])
    fitter.set_model(net)
    now[0] = 30.0
    _drive(fitter, 1, now)
    assert fitter.planned == [(1, 9)]  # 1 + floor(27 / 3.15); 19 if the clock started with the first step


def test_a_resumed_run_is_planned_before_its_first_step(tmp_path):
    """Resumed after 3 epochs of 3 s (its log) with a new minute: 19 more fit with the margin, so the
    schedule ends at epoch 22 before any resumed step runs, not after a first epoch on the old end."""
    from fcn_cli import callbacks

    net = _unit_with_poly(60)
    out = io.StringIO()
    fitter = callbacks.ScheduleFitter(_time_limited(tmp_path, 30, 60), 2, Console(file=out, width=200),
                                      clock=lambda: 0.0, resumed=(3, 3.0))
    fitter.set_model(net)
    fitter.on_train_begin()
    assert fitter.planned == [(3, 22)] and net.optimizer._learning_rate.end == 44
    assert "22 of 30 epochs fit" in out.getvalue()


def test_resumed_pace_reads_the_log_past_the_traced_first_epoch():
    from fcn_cli.fit import _resumed_pace

    rows = [{"epoch": 1, "seconds": 30.0}, {"epoch": 2, "seconds": 3.0}, {"epoch": 3, "seconds": 4.0},
            {"epoch": 4, "seconds": 3.5}]
    assert _resumed_pace({"epochs_done": 4}, rows) == (4, 3.5)
    assert _resumed_pace({"epochs_done": 1}, rows[:1]) == (1, 30.0)
    assert _resumed_pace({"epochs_done": 0}, []) is None
