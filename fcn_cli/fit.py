"""The fit: strategy, precision, optimizer and compile, then ``model.fit`` with the run's callbacks.

The model is built, compiled and its optimizer created inside a ``tf.distribute`` strategy scope, so
one code path serves one CPU, several GPUs and several machines. Which precision and strategy come
from the device rules (``fcn_cli.devices``) and, on a CPU, the precision probe (``fcn_cli.precision``).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from fcn_cli.errors import FcnError, RuntimeFailure, TrainingFailed
from fcn_cli.train import Resumed, TrainConfig, TrainResult

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "one", "mirrored", "multi-worker")


def choose_precision(requested: str = "auto", console=None) -> str:
    """The Keras dtype policy to train with.

    GPUs: bf16 on Ampere and newer, float16 (loss-scaled) on Volta/Turing. CPUs: only a path that
    this machine's precision probe showed to learn what float32 learns (fcn_cli.precision).
    """
    if requested not in PRECISIONS:
        raise FcnError(f"unknown --precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    from fcn_cli import devices, precision

    found = devices.local_devices()
    if any(d.kind == "GPU" for d in found):
        return devices.plan(found, requested).precision
    return precision.choose(requested, console).precision


def precision_line(requested: str, policy: str) -> tuple[str, str | None]:
    """(what was chosen and why, a warning or None) for the run's first lines."""
    from fcn_cli import precision

    choice = precision.current(requested)
    if choice is None or choice.precision != policy:
        return f"{policy}: GPU rules" if policy != requested else f"{policy}: as asked", None
    return choice.line, choice.warning


def make_strategy(name: str = "auto"):
    """(strategy, description). auto: multi-worker when TF_CONFIG names a cluster, mirrored on >1 GPU."""
    import json

    import tensorflow as tf

    if name not in STRATEGIES:
        raise FcnError(f"unknown --strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    from fcn_cli import devices

    cluster = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}").get("cluster", {})
    workers = sum(len(v) for v in cluster.values()) if cluster else 0
    # Multi-worker collectives must be set up before TensorFlow looks at its devices: TF_CONFIG decides alone.
    if devices.plan([], strategy=name, workers=workers).strategy == "multi-worker":
        if not cluster:
            raise FcnError("--strategy multi-worker needs TF_CONFIG naming the cluster (see README)")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return strategy, f"multi-worker ({workers} workers, {strategy.num_replicas_in_sync} replicas)"
    found = devices.local_devices()
    gpus = [d for d in found if d.kind == "GPU"]
    if devices.plan(found, strategy=name, workers=workers).strategy == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
        return strategy, f"mirrored ({strategy.num_replicas_in_sync} replicas)"
    strategy = tf.distribute.get_strategy()
    return strategy, f"one device ({'GPU' if gpus else 'CPU'})"


def is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


# --- building blocks --------------------------------------------------------------------------


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int):
    import keras

    from fcn_cli.schedules import FittedDecay

    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        lr = cfg.lr
    elif cfg.schedule == "poly":
        # The "poly" policy of DeepLab/FCN follow-ups: lr * (1 - t/T)^0.9. Fitted: --time-limit may move T.
        lr = FittedDecay(keras.optimizers.schedules.PolynomialDecay(cfg.lr, total, end_learning_rate=cfg.lr * 0.01,
                                                                    power=0.9))
    elif cfg.schedule == "cosine":
        lr = FittedDecay(keras.optimizers.schedules.CosineDecay(cfg.lr, total, alpha=0.01))
    else:
        raise FcnError(f"unknown --schedule {cfg.schedule!r}; choose constant, poly or cosine")
    if cfg.optimizer == "adam":
        from fcn_cli import accel

        return accel.adam(lr)  # Keras's Adam, in one fused kernel per variable where the levers are on
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    raise FcnError(f"unknown --optimizer {cfg.optimizer!r}; choose adam or sgd")


def compile_model(model, optimizer, num_classes: int, ignore_index, loss: str = "ce"):
    from fcn_cli.losses import segmentation_loss
    from fcn_cli.metrics import MeanIoU, PixelAccuracy

    model.compile(
        optimizer=optimizer,
        loss=segmentation_loss(loss, num_classes),
        metrics=[
            MeanIoU(num_classes, ignore_class=ignore_index, name="miou"),
            PixelAccuracy(num_classes, ignore_class=ignore_index, name="pixel_accuracy"),
        ],
    )
    return model


def tensorboard_callbacks(run, data, samples: int = 3) -> list:
    """Keras's TensorBoard callback (loss, validation scores, learning rate per epoch) and fcn's extras
    (per-class IoU, validation photos with their masks), into ``<run>/tensorboard``: a worker's
    RunFolder is its own temporary folder, so only the chief's logs remain."""
    import keras
    import numpy as np

    from fcn_cli.callbacks import TensorBoardExtras

    log_dir = run.path / "tensorboard"
    images, labels, *_ = next(iter(data.val))
    images, labels = np.asarray(images)[:samples], np.asarray(labels)[:samples]
    return [keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False, update_freq="epoch"),
            TensorBoardExtras(log_dir, data.classes, images, labels)]


# --- the fit --------------------------------------------------------------------------------


def fit_run(cfg: TrainConfig, data, run, strategy, strategy_desc, precision, console,
            resumed: Resumed | None = None) -> TrainResult:
    """Build the model (or load ``resumed``'s last.keras) in ``strategy``'s scope, fit it with the run's
    callbacks, and say how it went."""
    from fcn_cli.callbacks import EpochRecorder, Preempted, RichProgress, ScheduleFitter, StopOnSignal
    from fcn_cli.model import build_fcn, transfer_weights
    from fcn_cli.runs import load_checkpoint
    from fcn_cli.schedules import end_schedule_at

    classes = data.classes
    resuming = resumed is not None
    state = dict(resumed.state) if resuming else {"epochs_done": 0, "best_miou": None, "best_epoch": None}
    rows = list(resumed.rows) if resuming else []
    with strategy.scope():
        if resuming:
            model, _ = load_checkpoint(resumed.last, classes.num_classes, compile=True)
            # The schedule ends with the run's --epochs (which a resume may extend), not where a time limit
            # (ScheduleFitter) or the earlier --epochs left it in last.keras; a time limit then fits it anew.
            end_schedule_at(model.optimizer, cfg.epochs * data.steps_per_epoch)
        else:
            model = build_fcn(cfg.variant, classes.num_classes, cfg.backbone_weights, cfg.width, cfg.head_width)
            if cfg.init_from:
                source, _ = load_checkpoint(Path(cfg.init_from), classes.num_classes)
                copied = transfer_weights(source, model)
                if not copied:
                    raise FcnError(f"{cfg.init_from}: no layer matches this model; give a checkpoint of the same --width/--head-width")
                console.print(f"initialized {len(copied)} layers from {cfg.init_from}")
            compile_model(model, make_optimizer(cfg, data.steps_per_epoch), classes.num_classes, classes.ignore_index,
                          cfg.loss)

    if not resuming:
        run.write_config({**cfg.to_json(), "precision_used": precision, "precision_path": _precision_record(cfg),
                          "strategy_used": strategy_desc,
                          "train_pairs": data.n_train, "val_pairs": data.n_val, "steps_per_epoch": data.steps_per_epoch})
    recorder = EpochRecorder(run, cfg, classes, precision, state, rows, console, strategy,
                             every_epoch=_is_multi_worker(strategy))
    # Made with the recorder, so both time the limit from one moment; called before it, so the checkpoint
    # it writes holds the schedule as re-planned.
    fitter = [] if _is_multi_worker(strategy) else [
        ScheduleFitter(cfg, data.steps_per_epoch, console, resumed=_resumed_pace(state, rows))]
    progress = RichProgress(console, data.steps_per_epoch, cfg.batch_size, cfg.epochs)
    extras = tensorboard_callbacks(run, data) if cfg.tensorboard else []
    started = time.perf_counter()
    interrupted = None
    if _is_multi_worker(strategy):
        from fcn_cli.accel.multi_worker import patch_fit

        patch_fit(model)
    if state["epochs_done"] < cfg.epochs:
        try:
            with strategy.scope(), StopOnSignal() as stop:
                model.fit(
                    data.train, validation_data=data.val, epochs=cfg.epochs, initial_epoch=state["epochs_done"],
                    steps_per_epoch=data.steps_per_epoch, callbacks=[progress, *fitter, recorder, stop, *extras], verbose=0,
                    shuffle=False,
                )
        except _peer_errors() as exc:
            progress.stop()
            raise RuntimeFailure(
                f"a worker stopped answering ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); the last "
                f"finished epoch is in {run.path if run.is_chief else 'the chief run folder'}; restart every worker "
                f"with `fcn train --resume RUN_FOLDER`"
            ) from None
        except _data_errors() as exc:
            progress.stop()
            from fcn_cli.pipeline import streaming_error

            if not recorder.diverged:  # keep the epochs finished since the last commit
                recorder.commit_mid_epoch(model)

            raise (streaming_error(exc) or FcnError(
                f"{cfg.data}: reading the data failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}); "
                f"run `fcn data check {cfg.data}`"
            )) from None
        except KeyboardInterrupt as exc:
            interrupted = "SIGTERM" if isinstance(exc, Preempted) else "SIGINT"
            progress.stop()
            if recorder.diverged:
                recorder.commit_best_only()  # the live model is the diverged one: never save it
            else:
                recorder.commit_mid_epoch(model)
                console.print(f"[yellow]interrupted[/] ({interrupted}): saved {run.last}; "
                              f"continue with `fcn train --resume {run.path}`", soft_wrap=True)
    progress.stop()
    if recorder.diverged:
        epoch, loss, *why = recorder.diverged
        best = recorder.state.get("best_epoch")
        kept = (f"kept {run.best} (epoch {best}, val mIoU {recorder.state['best_miou']:.3f})"
                if best and run.best.exists() else
                f"the last good checkpoint is {run.last if run.last.exists() else 'none (first epoch)'}")
        raise TrainingFailed(
            f"training diverged at epoch {epoch} (loss {loss:.4g}{', ' + why[0] if why else ''}); {kept}; "
            "try a lower --lr, or --precision float32 (and `fcn doctor` to check this machine)",
            epoch=epoch, loss=loss,
        )
    seconds = time.perf_counter() - started
    rates = [r["images_per_s"] for r in recorder.rows if r.get("images_per_s")]
    return TrainResult(
        run.path, recorder.state["epochs_done"], recorder.state["best_miou"], recorder.state["best_epoch"],
        recorder.stable, recorder.rows, interrupted, seconds, (sum(rates) / len(rates)) if rates else None,
        recorder.commits, recorder.epoch_ends_s,
    )


def _resumed_pace(state: dict, rows: list) -> tuple[int, float] | None:
    """(epochs done, median seconds of the logged epochs after the first, which traced the graph) of a
    resumed run, for ScheduleFitter; None for a new run or one without timed epochs."""
    seconds = [float(r["seconds"]) for r in rows[1:] or rows if r.get("seconds")]
    if not state["epochs_done"] or not seconds:
        return None
    return state["epochs_done"], statistics.median(seconds)


def _precision_record(cfg: TrainConfig) -> dict | None:
    """The numeric path and the probe's verdict behind it, for config.json."""
    from fcn_cli import precision

    choice = precision.current(cfg.precision)
    if choice is None or choice.path is None:
        return None
    return {"path": choice.path.name, "label": choice.path.label, "isa_cap": os.environ.get(precision.ISA_ENV),
            "why": choice.line, "probe": [{k: v for k, v in t.items() if k != "kernels"} for t in choice.verdict.trials]
            if choice.verdict else None}


def _is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _peer_errors():
    """TensorFlow's errors for a lost peer in a collective (multi-worker) step."""
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError)


def _data_errors():
    """What tf.data raises for a file that stopped decoding or a corrupt shard record."""
    import tensorflow as tf

    return (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.UnknownError)
