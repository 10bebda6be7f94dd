"""What runs beside ``model.fit`` in a training run: the recorder that commits the run folder, the
guard against runaway or diverged runs, Ctrl-C and SIGTERM as requests, and the progress bar."""

from __future__ import annotations

import contextlib
import math
import signal
import statistics
import threading
import time
from pathlib import Path

from fcn_cli.train import checkpoint_meta


def _keras_callback_base():
    import keras

    return keras.callbacks.Callback


class EpochRecorder(_keras_callback_base()):
    """After each finished epoch: log row, state and best weights; written to the run folder in commits.

    A commit writes last.keras, log.csv, state.json, best.keras (when the best moved) and curves.png:
    one consistent snapshot of the run. Writing the full FCN-8s with its Adam state takes seconds
    (1.6 GB), so commits are spaced to keep their time under ``cfg.checkpoint_overhead`` of the
    wall time: the first epoch always commits (that measures the cost), later ones when the time
    since the last commit pays for one, and the last epoch, a time-limit stop and Ctrl-C always do.
    A kill between commits loses only the epochs since the last one; --resume redoes them.
    The best weights are held in an uncompiled twin of the model until the next commit, so a
    later, worse epoch never leaks into best.keras (which carries no optimizer state: it is what
    evaluate and predict load).
    """

    def __init__(self, run, cfg, classes, precision, state, rows, console, strategy=None, every_epoch=False):
        super().__init__()
        # Workers of a multi-worker run must agree on when to save: timing-based spacing could differ.
        self.every_epoch = every_epoch
        self.run, self.cfg, self.classes, self.precision = run, cfg, classes, precision
        self.state, self.rows, self.console = dict(state), list(rows), console
        self.strategy = strategy
        self.diverged = None
        self.stable = None
        self._started = time.perf_counter()
        self._t0 = None
        self._images = 0
        self._twin = None  # uncompiled copy of the model holding the best weights
        self._best_meta = None  # set while best weights wait for the next commit
        self._meta = None  # metadata of the last finished, uncommitted epoch
        self._commit_s = None
        self._committed_at = time.perf_counter()
        self.commits = []  # what each commit cost: {"epoch", "seconds"}
        self.epoch_ends_s = []  # from self._started to the end of each on_epoch_end (whole-epoch timing)

    def on_train_begin(self, logs=None):
        import keras

        # Made here, where every worker of a distributed run is in step (variables are created in
        # the strategy's scope); from the config, not keras.models.clone_model: a clone of a
        # compiled model is compiled too, and its optimizer state would end up in best.keras.
        if self._twin is None:
            from fcn_cli.accel.swap import portable_config

            # Stock layers: best.keras is what users take home, and plain Keras must read it.
            with self.strategy.scope() if self.strategy is not None else contextlib.nullcontext():
                self._twin = keras.Model.from_config(portable_config(self.model.get_config()))

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._images = 0
        self._train_seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        self._images += self.cfg.batch_size
        self._train_seconds = time.perf_counter() - self._t0
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged = (self.state["epochs_done"] + 1, float(loss))
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged:
            self.commit_best_only()
            return  # never let a NaN model replace the last good checkpoint
        logs = logs or {}
        # The last batch's update can blow the weights up after every batch loss was finite:
        # a non-finite epoch or validation loss is divergence too, and this model is not saved.
        for key in ("loss", "val_loss"):
            value = logs.get(key)
            if value is not None and not math.isfinite(float(value)):
                self.diverged = (epoch + 1, float(value))
                self.model.stop_training = True
                self.commit_best_only()
                return
        runaway = runaway_loss(logs.get("loss"), [r.get("loss") for r in self.rows])
        if runaway:
            self.diverged = (epoch + 1, float(logs["loss"]), runaway)
            self.model.stop_training = True
            self.commit_best_only()
            return
        seconds = time.perf_counter() - self._t0
        miou = float(logs.get("val_miou", float("nan")))
        row = {
            "epoch": epoch + 1,
            "loss": float(logs.get("loss", float("nan"))),
            "val_loss": float(logs.get("val_loss", float("nan"))),
            "val_pixel_accuracy": float(logs.get("val_pixel_accuracy", float("nan"))),
            "val_miou": miou,
            "lr": _current_lr(self.model),
            "seconds": round(seconds, 2),
            # Training images per second of the epoch's training part (validation excluded).
            "images_per_s": round(self._images / self._train_seconds, 3) if self._train_seconds > 0 else None,
        }
        self._meta = checkpoint_meta(self.cfg, self.classes, self.precision, epoch + 1, miou)
        best = self.state["best_miou"]
        if math.isfinite(miou) and (best is None or miou > best):
            self._hold_best(self._meta)
            self.state.update(best_miou=miou, best_epoch=epoch + 1)
        self.state["epochs_done"] = epoch + 1
        self.rows.append(row)
        stopping = bool(self.cfg.time_limit) and self._would_overrun(seconds)
        if stopping or epoch + 1 >= self.cfg.epochs or self._commit_due():
            self.commit(self.model)
        self.epoch_ends_s.append(round(time.perf_counter() - self._started, 3))
        if stopping:
            self.console.print(f"time limit of {self.cfg.time_limit:g} min reached after epoch {epoch + 1}")
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self._meta is not None and not self.diverged:  # an early stop left epochs uncommitted
            self.commit(self.model)

    def _commit_due(self) -> bool:
        if self._commit_s is None or self.every_epoch or self.cfg.checkpoint_overhead >= 1:
            return True
        since = time.perf_counter() - self._committed_at
        return self._commit_s <= self.cfg.checkpoint_overhead * (since + self._commit_s)

    def _hold_best(self, meta: dict) -> None:
        if self._twin is None:  # driven without fit() (tests)
            self.on_train_begin()
        self._best_meta = None  # an interrupted copy must never be written as a best
        for dst, src in zip(self._twin.weights, self.model.weights):
            dst.assign(src)
        self._best_meta = meta

    def commit(self, model, meta: dict | None = None) -> None:
        """Write the run's state: ``model`` as last.keras (with ``meta``, default the last finished
        epoch's), log, state, then the held best weights and the stable link, then the curves."""
        started = time.perf_counter()
        meta = meta or self._meta
        self.run.end_epoch(model, meta, self.rows, self.state)
        self._meta = None
        self.commit_best_only()
        self.run.plot_curves(self.rows)
        self._committed_at = time.perf_counter()
        self._commit_s = self._committed_at - started
        self.commits.append({"epoch": self.state["epochs_done"], "seconds": round(self._commit_s, 3)})

    def commit_mid_epoch(self, model) -> None:
        """Commit after an interruption: mid-epoch weights go to last.keras, labelled (like the log
        and the state) with the last finished epoch."""
        self.commit(model, checkpoint_meta(self.cfg, self.classes, self.precision, self.state["epochs_done"], None))

    def commit_best_only(self) -> None:
        if self._best_meta is None:
            return
        self.run.save_checkpoint(self._twin, "best", self._best_meta)
        self._best_meta = None
        self.stable = self.run.link_stable(Path(self.cfg.out) / f"{self.cfg.variant}.keras")

    def _would_overrun(self, last_epoch_seconds: float) -> bool:
        elapsed = time.perf_counter() - self._started
        return elapsed + last_epoch_seconds > self.cfg.time_limit * 60


def epochs_that_fit(done: int, elapsed_s: float, epoch_s: float, limit_s: float, cap: int) -> int:
    """Epochs a run ends with when the ``done`` ones took ``elapsed_s`` and each more takes ``epoch_s``:
    the same rule as the time-limit stop (an epoch starts only if it can finish in time), capped at ``cap``."""
    more = max(0, math.floor((limit_s - elapsed_s) / epoch_s)) if epoch_s > 0 else cap
    return max(done, min(cap, done + more))


class ScheduleFitter(_keras_callback_base()):
    """Under --time-limit, end the decaying learning rate where the time ends, not where --epochs would.

    A poly or cosine schedule is planned over ``--epochs``; when fewer epochs fit in the time limit, the
    stop would cut the run with the rate still near its peak (budgeted training, Li et al. 2020: a
    schedule that reaches its floor at the budget beats one cut short). After each epoch this callback
    estimates what an epoch costs and moves the end of the run's FittedDecay (schedules.py) to the last
    epoch that fits: one variable assignment, read by the traced step at its next call. The estimate: the
    session's first epoch from its steady steps plus its validation (its first step traces the graph);
    then the median wall time from one epoch's end to the next (validation, the first wait for data
    included; the odd commit, at most --checkpoint-overhead of the time, left to the margin). The plan
    keeps 5% of the time to spare, so that a slower last epoch rarely makes the time-limit stop
    (EpochRecorder, whose clock starts with this one's) come before the schedule's end; an epoch after
    the end trains at the floor rate. The end moves out again only while it is ahead (past it the rate
    would leave its floor) and for 10% more epochs, never past --epochs. A resumed run is planned before
    its first step, from its log's epoch times. Not for multi-worker runs, whose workers must agree.
    """

    MARGIN = 1.05  # the epoch time the plan assumes, over the measured one

    def __init__(self, cfg, steps_per_epoch: int, console, clock=time.perf_counter, resumed=None):
        """``resumed``: (epochs done, seconds an epoch took) of a resumed run, from its log."""
        super().__init__()
        self.cfg, self.steps, self.console, self.clock = cfg, steps_per_epoch, console, clock
        self.resumed = resumed
        self.planned = []  # (after epoch, epochs the schedule now ends with)
        # From creation, like EpochRecorder's clock, which decides the stop: made next to it, they agree.
        self._started = clock()

    def _schedule(self):
        from fcn_cli.schedules import FittedDecay, lr_schedule

        schedule = lr_schedule(self.model.optimizer)
        return schedule if self.cfg.time_limit and isinstance(schedule, FittedDecay) else None

    def on_train_begin(self, logs=None):
        self._last_end, self._walls = None, []  # wall time from each epoch's end to the next's
        schedule = self._schedule()
        if schedule is not None and self.resumed:
            done, epoch_s = self.resumed
            self._plan(schedule, done, epoch_s)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_t0, self._first_batch_end, self._last_batch_end, self._batches = self.clock(), None, None, 0

    def on_train_batch_end(self, batch, logs=None):
        now = self.clock()
        self._batches += 1
        self._first_batch_end = self._first_batch_end or now
        self._last_batch_end = now

    def on_epoch_end(self, epoch, logs=None):
        schedule = self._schedule()
        if schedule is None or not self._batches:
            return
        now = self.clock()
        if self._last_end is not None:
            self._walls.append(now - self._last_end)
            epoch_s = statistics.median(self._walls)
        else:
            if self._batches > 1:  # the first step traced the graph: steady steps, then validation
                step_s = (self._last_batch_end - self._first_batch_end) / (self._batches - 1)
                epoch_s = step_s * self.steps + (now - self._last_batch_end)
            else:
                epoch_s = now - self._epoch_t0
        self._last_end = now
        self._plan(schedule, epoch + 1, epoch_s)

    def _plan(self, schedule, done: int, epoch_s: float) -> None:
        plan = epochs_that_fit(done, self.clock() - self._started, epoch_s * self.MARGIN,
                               limit_s=self.cfg.time_limit * 60, cap=self.cfg.epochs)
        current = math.ceil(schedule.end / self.steps)
        ahead = schedule.end > done * self.steps  # past its end the rate is at its floor: it stays there
        if plan > current and not (ahead and plan >= current + max(1, 0.1 * current)):
            return
        if plan != current:
            schedule.move_end(plan * self.steps)
            self.planned.append((done, plan))
            self.console.print(f"time limit: {plan} of {self.cfg.epochs} epochs fit; the {self.cfg.schedule} "
                               f"schedule now ends at epoch {plan}")


# An epoch's mean training loss this many times the lowest epoch's, and above the first epoch's (where
# the untrained network started), is a run that has left its basin. Measured (bench/NOTES.md, "What fcn
# does about it"): healthy runs stayed within 1.04x of their lowest epoch (demo, CamVid); the AMX-broken
# demo passed 4x at epoch 5 and went on to 479x, the broken CamVid run of issue 15 to 1e11x, no NaN.
RUNAWAY_FACTOR = 4.0


def runaway_loss(loss, earlier: list) -> str | None:
    """Why this epoch's training loss means a runaway run, or None (NaN is caught per batch)."""
    finite = [float(v) for v in earlier if v is not None and math.isfinite(float(v))]
    if loss is None or not finite or not math.isfinite(float(loss)):
        return None
    best = min(finite)
    if float(loss) > RUNAWAY_FACTOR * best and float(loss) > finite[0]:
        return f"{float(loss) / best:.0f}x the lowest epoch loss {best:.4g}" if float(loss) >= 10 * best else \
            f"{float(loss) / best:.1f}x the lowest epoch loss {best:.4g}"
    return None


class Preempted(KeyboardInterrupt):
    """SIGTERM during fit (Kubernetes, Slurm, a spot or preemptible VM about to go): the run stops and
    commits as after Ctrl-C, and fcn exits 143."""


class StopOnSignal(_keras_callback_base()):
    """Ctrl-C (SIGINT) or SIGTERM during fit as a request: the running batch ends, then KeyboardInterrupt
    (Preempted for SIGTERM) leaves fit from here, and the caller commits a consistent snapshot.

    Python raises KeyboardInterrupt wherever the main thread happens to be, and inside a weakref
    or ``__del__`` callback (TensorFlow runs many) it is printed and dropped: the run went on as if
    nothing was pressed (seen in tests/test_cli.py). A second signal of the same kind acts at once
    (a second Ctrl-C interrupts, a second SIGTERM kills).
    """

    DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

    def __init__(self):
        super().__init__()
        self.requested = None  # the signal number asked for
        self._previous = {}

    def __enter__(self):
        # Only in place of Python's own handlers: an ignored signal (nohup, a background job) stays ignored.
        if threading.current_thread() is threading.main_thread():
            for signum, default in self.DEFAULTS.items():
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._request)
        return self

    def __exit__(self, exc_type, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        if exc_type is None:  # a request after the last batch (during the final commit, say) still stops
            self._stop_if_requested()
        return False

    def _request(self, signum, frame):
        self.requested = signum
        signal.signal(signum, self.DEFAULTS[signum])

    def _stop_if_requested(self, *args, **kwargs):
        if self.requested is not None:
            signum, self.requested = self.requested, None
            raise Preempted if signum == signal.SIGTERM else KeyboardInterrupt

    # At batch ends, where a step has finished; not at on_epoch_end, where a commit may just have run
    # (the stop commits again). A request after the last batch is raised on leaving the block.
    on_train_batch_end = on_test_batch_end = _stop_if_requested


def _current_lr(model) -> float:
    opt = model.optimizer
    lr = opt.learning_rate
    try:
        return float(lr(opt.iterations)) if callable(lr) else float(lr)
    except Exception:
        return float(opt._get_current_learning_rate()) if hasattr(opt, "_get_current_learning_rate") else float("nan")


class RichProgress(_keras_callback_base()):
    """A rich progress bar per epoch (step, loss, images/s), then a line with the validation scores.

    When the console is not a terminal (a CI log, a file, a pipe) a bar's redraws would fill the log:
    each epoch is then one line with its training and validation figures."""

    def __init__(self, console, steps, batch_size, epochs):
        super().__init__()
        self.console, self.steps, self.batch_size, self.epochs = console, steps, batch_size, epochs
        self.live = bool(console.is_terminal)
        self.progress = None
        self.task = None
        self._t0 = 0.0
        self._train = (float("nan"), 0.0)  # the epoch's last (loss, images/s)

    def _new_progress(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.2f} img/s"),
            TimeElapsedColumn(),
            console=self.console,
        )

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._train = (float("nan"), 0.0)
        if not self.live:
            return
        self.progress = self._new_progress()
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=self.steps, epoch=epoch + 1, epochs=self.epochs, loss=float("nan"), rate=0.0
        )

    def on_train_batch_end(self, batch, logs=None):
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        self._train = (float((logs or {}).get("loss", float("nan"))), (batch + 1) * self.batch_size / elapsed)
        if self.progress is not None:
            self.progress.update(self.task, completed=batch + 1, loss=self._train[0], rate=self._train[1])

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.stop()
        scores = (f"val loss {logs.get('val_loss', float('nan')):.4f}  "
                  f"val pixel acc {logs.get('val_pixel_accuracy', float('nan')):.3f}  "
                  f"val mIoU {logs.get('val_miou', float('nan')):.3f}")
        if self.live:
            self.console.print(f"  {scores}")
            return
        loss, rate = self._train
        self.console.print(f"epoch {epoch + 1}/{self.epochs}  loss {logs.get('loss', loss):.4f}  {rate:.2f} img/s  "
                           f"{time.perf_counter() - self._t0:.0f} s  {scores}", highlight=False,
                           soft_wrap=True)  # a log line stays one line, whatever width rich assumes off a terminal

    def stop(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class TensorBoardExtras(_keras_callback_base()):
    """What ``keras.callbacks.TensorBoard`` does not write, into its ``validation`` folder each epoch:
    the IoU of every class (from the validation confusion matrix the mIoU metric holds after the
    validation pass) and a few validation photos beside their ground truth and predicted masks."""

    def __init__(self, log_dir: Path, classes, images, labels):
        super().__init__()
        self.log_dir, self.classes = Path(log_dir), classes
        self.images, self.labels = images, labels  # a few validation photos (N, H, W, 3) and masks (N, H, W)
        self.writer = None

    def on_train_begin(self, logs=None):
        import tensorflow as tf

        self.writer = tf.summary.create_file_writer(str(self.log_dir / "validation"))

    def on_epoch_end(self, epoch, logs=None):
        import numpy as np
        import tensorflow as tf

        from fcn_cli.metrics import scores

        matrix = self._confusion()
        with self.writer.as_default(step=epoch):
            if matrix is not None:
                per_class = scores(matrix, self.classes.ignore_index)["per_class"]
                for name, entry in zip(self.classes.names, per_class):
                    if entry["iou"] is not None:
                        tf.summary.scalar(f"iou/{name}", entry["iou"])
            predicted = np.argmax(np.asarray(self.model(self.images, training=False), np.float32), axis=-1)
            # photo | ground truth | prediction, one row per photo
            rows = [np.concatenate([np.asarray(photo, np.uint8), self.classes.colorize(truth), self.classes.colorize(guess)], axis=1)
                    for photo, truth, guess in zip(self.images, self.labels, predicted)]
            tf.summary.image("validation: photo | truth | prediction", np.stack(rows), max_outputs=len(rows))
        self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()

    def _confusion(self):
        import numpy as np

        from fcn_cli.metrics import MeanIoU

        found = [m for m in _all_metrics(self.model.metrics) if isinstance(m, MeanIoU)]
        return np.asarray(found[0].total_cm, np.int64) if found else None


def _all_metrics(metrics):
    for metric in metrics:
        yield metric
        yield from _all_metrics(getattr(metric, "metrics", None) or [])
