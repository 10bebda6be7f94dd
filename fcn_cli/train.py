"""The training loop: strategy scope, precision policy, compile, callbacks, fit, resume.

Everything a run writes goes through ``runs.RunFolder`` (chief-only, atomic). The model is built,
compiled and its optimizer created inside a ``tf.distribute`` strategy scope, so one code path serves
one CPU, several GPUs and several machines.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fcn_cli.errors import FcnError, TrainingFailed

PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "one", "mirrored", "multi-worker")


@dataclass
class TrainConfig:
    data: str = "data/camvid"
    variant: str = "fcn8"
    batch_size: int = 8
    epochs: int = 30
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "poly"
    image_size: tuple[int, int] = (224, 224)
    eval_size: tuple[int, int] | None = None  # validation / inference size; None: see inference_size()
    backbone_weights: str = "imagenet"
    width: float = 1.0
    head_width: int = 4096
    init_from: str | None = None
    class_weights: str = "none"
    ignore_void: bool = True
    flip: bool = True
    scale: tuple[float, float] = (1.0, 1.0)
    jitter: float = 0.0
    seed: int = 0
    out: str = "models"
    classes: str | None = None
    precision: str = "auto"
    strategy: str = "auto"
    max_steps: int | None = None  # cap on steps per epoch (smoke tests, benchmarks)
    time_limit: float | None = None  # minutes; stop after the last epoch that fits
    checkpoint_overhead: float = 0.02  # largest share of wall time spent writing checkpoints (1: every epoch)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data["image_size"] = list(self.image_size)
        data["scale"] = list(self.scale)
        data["eval_size"] = list(self.eval_size) if self.eval_size else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["image_size"] = tuple(known.get("image_size", (224, 224)))
        known["scale"] = tuple(known.get("scale", (1.0, 1.0)))
        if known.get("eval_size"):
            known["eval_size"] = tuple(known["eval_size"])
        elif "eval_size" not in data:  # a run from before inference sizes: it validated at image_size
            known["eval_size"] = known["image_size"]
        return cls(**known)


def inference_size(cfg: TrainConfig) -> tuple[int, int]:
    """The size validation and inference resize photos to.

    Scale augmentation shows the network objects zoomed by s ~ U(low, high) on average (low + high) / 2
    times larger than a plain resize to ``image_size`` would; testing at ``image_size`` then shows
    objects smaller than in training (the train/test resolution discrepancy of Touvron et al., 2019,
    "FixRes"). The default therefore scales ``image_size`` by the mean zoom, rounded to multiples of 32.
    """
    if cfg.eval_size:
        return int(cfg.eval_size[0]), int(cfg.eval_size[1])
    zoom = (float(cfg.scale[0]) + float(cfg.scale[1])) / 2
    return tuple(max(32, 32 * round(v * zoom / 32)) for v in cfg.image_size)


# --- hardware choices -------------------------------------------------------------------------


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

    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "constant":
        lr = cfg.lr
    elif cfg.schedule == "poly":
        # The "poly" policy of DeepLab/FCN follow-ups: lr * (1 - t/T)^0.9.
        lr = keras.optimizers.schedules.PolynomialDecay(cfg.lr, total, end_learning_rate=cfg.lr * 0.01, power=0.9)
    elif cfg.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(cfg.lr, total, alpha=0.01)
    else:
        raise FcnError(f"unknown --schedule {cfg.schedule!r}; choose constant, poly or cosine")
    if cfg.optimizer == "adam":
        from fcn_cli.model import accel_default
        from fcn_cli.optimizers import FusedAdam

        # Keras's Adam in one kernel per variable where fcn's CPU kernels are on (bench/NOTES.md).
        return FusedAdam(lr) if accel_default() else keras.optimizers.Adam(lr)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    raise FcnError(f"unknown --optimizer {cfg.optimizer!r}; choose adam or sgd")


def compile_model(model, optimizer, num_classes: int, ignore_index):
    import keras

    from fcn_cli.metrics import MeanIoU, PixelAccuracy

    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            MeanIoU(num_classes, ignore_class=ignore_index, name="miou"),
            PixelAccuracy(num_classes, ignore_class=ignore_index, name="pixel_accuracy"),
        ],
    )
    return model


CLASS_WEIGHTS = ("none", "median", "median-sqrt")


def class_weight_vector(masks, classes, how: str):
    """None, or loss weights per class from the decoded training masks (see weights_from_stats)."""
    import numpy as np

    if how == "none":
        return None
    n = classes.num_classes
    pixels = np.zeros(n, np.int64)
    present = np.zeros(n, np.int64)
    for m in masks:
        counts = np.bincount(m.reshape(-1), minlength=n)[:n]
        pixels += counts
        present += np.where(counts > 0, m.size, 0)
    return weights_from_stats(pixels, present, classes, how)


def weights_from_stats(pixels, present, classes, how: str):
    """median: SegNet's median-frequency balancing; median-sqrt: its square root, a milder push for
    rare classes that over-predicts them less (measured on CamVid, bench/NOTES.md)."""
    import numpy as np

    from fcn_cli.datasets import median_frequency_weights

    if how not in CLASS_WEIGHTS:
        raise FcnError(f"unknown --class-weights {how!r}; choose one of {', '.join(CLASS_WEIGHTS)}")
    if how == "none":
        return None
    weights = median_frequency_weights(pixels, present, classes.ignore_index)
    return np.sqrt(weights).astype(np.float32) if how == "median-sqrt" else weights


def checkpoint_meta(cfg: TrainConfig, classes, precision: str, epoch: int, val_miou) -> dict:
    from fcn_cli import __version__

    return {
        "variant": cfg.variant,
        "classes": classes.to_dict(),
        "image_size": list(cfg.image_size),
        "inference_size": list(inference_size(cfg)),
        "width": cfg.width,
        "head_width": cfg.head_width,
        "precision": precision,
        "epoch": epoch,
        "val_miou": val_miou,
        "fcn_version": __version__,
    }


# --- the run ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_miou: float | None
    best_epoch: int | None
    stable_path: Path | None
    rows: list
    interrupted: bool = False
    seconds: float = 0.0
    images_per_s: float | None = None
    commits: list = field(default_factory=list)  # {"epoch": last finished epoch, "seconds": wall time of the commit}
    epoch_ends_s: list = field(default_factory=list)  # seconds from just before fit to each epoch's end, commit incl.


def train(cfg: TrainConfig, console=None, resume: str | None = None) -> TrainResult:
    """Train per ``cfg`` (or continue the run folder ``resume``); returns where everything went."""
    from rich.console import Console

    from fcn_cli.runs import RunFolder

    console = console or Console()
    if resume is not None:
        run_path = Path(resume)
        saved = RunFolder(run_path).read_config()
        epochs = cfg.epochs if cfg.extra.get("epochs_given") else saved.get("epochs")
        cfg = TrainConfig.from_json({**saved, "epochs": epochs})

    import keras

    # The strategy comes first: multi-worker collectives must be set up before any other TF op.
    strategy, strategy_desc = make_strategy(cfg.strategy)
    chief = is_chief(strategy)
    # Then the data: every problem with the user's files shows before any model is built.
    data = prepare_data(cfg, console, strategy)
    precision = choose_precision(cfg.precision, console)
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(cfg.seed)
    why, warning = precision_line(cfg.precision, precision)
    console.print(f"[bold]strategy[/] {strategy_desc}")
    console.print(f"[bold]precision[/] {why}", highlight=False)
    if warning:
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)

    run = RunFolder.open(resume, chief) if resume else RunFolder.create(Path(cfg.out), cfg.variant, chief)
    try:
        return _fit(cfg, data, run, strategy, strategy_desc, precision, console, Path(resume) if resume else None)
    finally:
        run.close()


@dataclass
class _Data:
    classes: object
    train: object
    val: object
    steps_per_epoch: int
    n_train: int
    n_val: int


def prepare_data(cfg: TrainConfig, console, strategy=None) -> _Data:
    from fcn_cli import pipeline, shards
    from fcn_cli.classes import load_classes
    from fcn_cli.datasets import find_dataset, quick_check, require_data_folder

    classes = load_classes(cfg.classes)
    data_dir = Path(cfg.data)
    require_data_folder(data_dir)
    val_size = inference_size(cfg)
    for flag, (h, w), examples in (("--image-size", cfg.image_size, "224x224, 352x480"), ("--eval-size", val_size, "224x288")):
        if h % 32 or w % 32 or h < 32 or w < 32:
            raise FcnError(f"{flag} {h}x{w}: height and width must be multiples of 32 (e.g. {examples})")
    augment = pipeline.Augment(flip=cfg.flip, scale=tuple(cfg.scale), jitter=cfg.jitter)
    if shards.is_shard_folder(data_dir):
        train_ds, val_ds, n_train, n_val, weights = _shard_datasets(cfg, classes, data_dir, augment, val_size)
        policy = "FILE"  # each worker reads its own shards
    else:
        dataset = find_dataset(data_dir)
        train_pairs = dataset.pairs("train")
        val_split = "val" if dataset.splits.get("val") else "test"
        val_pairs = dataset.pairs(val_split)
        problems = quick_check(dataset, classes, ["train", val_split])
        if problems:
            listing = "; ".join(str(p) for p in problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise FcnError(f"{data_dir}: {len(problems)} problem(s) in the data set: {listing} (run `fcn data check {data_dir}`)")
        with console.status(f"decoding {len(train_pairs)} train + {len(val_pairs)} {val_split} pairs"):
            train_arrays = pipeline.load_arrays(train_pairs, classes)
            val_arrays = pipeline.load_arrays(val_pairs, classes)
        weights = class_weight_vector(train_arrays[1], classes, cfg.class_weights)
        train_ds = pipeline.training_dataset(
            train_pairs, classes, image_size=cfg.image_size, batch_size=cfg.batch_size, augment=augment,
            seed=cfg.seed, ignore_void=cfg.ignore_void, class_weights=weights, arrays=train_arrays,
        )
        val_ds = pipeline.validation_dataset(
            val_pairs, classes, image_size=val_size, batch_size=cfg.batch_size, arrays=val_arrays,
        )
        n_train, n_val = len(train_pairs), len(val_pairs)
        policy = "DATA"  # in-memory arrays: every worker takes its share of each global batch
    steps = n_train // cfg.batch_size if n_train >= cfg.batch_size else 1
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    # Endless, with steps_per_epoch marking epochs: Keras keeps one iterator when the size is unknown.
    train_ds = train_ds.repeat()
    train_ds, val_ds = (_with_shard_policy(ds, policy) for ds in (train_ds, val_ds))
    return _Data(classes, train_ds, val_ds, steps, n_train, n_val)


def _shard_datasets(cfg, classes, data_dir: Path, augment, val_size):
    import tensorflow as tf

    from fcn_cli import pipeline, shards

    shard_set = shards.ShardSet.open(data_dir)
    if shard_set.classes().num_classes != classes.num_classes:
        raise FcnError(f"{data_dir}: shards were packed with {shard_set.classes().num_classes} classes, the class "
                       f"table has {classes.num_classes}; give the --classes file used for packing")
    val_split = "val" if "val" in shard_set.splits() else "test"
    weights = None
    if cfg.class_weights != "none":
        weights = weights_from_stats(*shard_set.class_stats("train"), classes, cfg.class_weights)
    train_ds = pipeline.records_training_dataset(
        shard_set.files("train"), classes, image_size=cfg.image_size, batch_size=cfg.batch_size, augment=augment,
        seed=cfg.seed, ignore_void=cfg.ignore_void, class_weights=weights,
    )
    val_ds = pipeline.records_validation_dataset(shard_set.files(val_split), classes, image_size=val_size,
                                                 batch_size=cfg.batch_size)
    # The index knows the count; telling tf.data lets Keras end each validation pass cleanly.
    batches = -(-shard_set.count(val_split) // cfg.batch_size)
    val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(batches))
    return train_ds, val_ds, shard_set.count("train"), shard_set.count(val_split), weights


def _with_shard_policy(dataset, policy: str):
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = getattr(tf.data.experimental.AutoShardPolicy, policy)
    return dataset.with_options(options)


def _fit(cfg, data, run, strategy, strategy_desc, precision, console, resume_dir: Path | None) -> TrainResult:
    import keras

    from fcn_cli.model import build_fcn, transfer_weights
    from fcn_cli.runs import RunFolder, load_checkpoint, read_checkpoint_meta

    classes = data.classes
    resuming = resume_dir is not None
    # Every worker reads the run's own files; only the chief writes them.
    source = RunFolder(resume_dir) if resuming else run
    state = source.read_state() if resuming else {"epochs_done": 0, "best_miou": None, "best_epoch": None}
    rows = []
    if resuming:
        # last.keras is the commit record: the epoch embedded in it is the last one whose weights we have.
        if not source.last.exists():
            raise FcnError(f"{source.last}: no checkpoint to resume from; start a new run")
        state["epochs_done"] = int(read_checkpoint_meta(source.last).get("epoch", state["epochs_done"]))
        rows = [r for r in source.read_log() if r["epoch"] <= state["epochs_done"]]
        # best.keras is the record of the best: a kill between the state and its write must not
        # leave a best score whose weights were never saved.
        best_meta = read_checkpoint_meta(source.best) if source.best.exists() else {}
        best_miou = best_meta.get("val_miou")
        state["best_miou"] = float(best_miou) if isinstance(best_miou, (int, float)) else None
        state["best_epoch"] = best_meta.get("epoch") if state["best_miou"] is not None else None
    with strategy.scope():
        if resuming:
            model, _ = load_checkpoint(source.last, classes.num_classes, compile=True)
        else:
            model = build_fcn(cfg.variant, classes.num_classes, cfg.backbone_weights, cfg.width, cfg.head_width)
            if cfg.init_from:
                source, _ = load_checkpoint(Path(cfg.init_from), classes.num_classes)
                copied = transfer_weights(source, model)
                if not copied:
                    raise FcnError(f"{cfg.init_from}: no layer matches this model; give a checkpoint of the same --width/--head-width")
                console.print(f"initialized {len(copied)} layers from {cfg.init_from}")
            compile_model(model, make_optimizer(cfg, data.steps_per_epoch), classes.num_classes, classes.ignore_index)

    if not resuming:
        run.write_config({**cfg.to_json(), "precision_used": precision, "precision_path": _precision_record(cfg),
                          "strategy_used": strategy_desc,
                          "train_pairs": data.n_train, "val_pairs": data.n_val, "steps_per_epoch": data.steps_per_epoch})
    recorder = EpochRecorder(run, cfg, classes, precision, state, rows, console, strategy,
                             every_epoch=_is_multi_worker(strategy))
    progress = RichProgress(console, data.steps_per_epoch, cfg.batch_size, cfg.epochs)
    started = time.perf_counter()
    interrupted = False
    if _is_multi_worker(strategy):
        _multi_worker_shim(model)
    if state["epochs_done"] < cfg.epochs:
        try:
            with strategy.scope(), StopOnCtrlC() as stop:
                model.fit(
                    data.train, validation_data=data.val, epochs=cfg.epochs, initial_epoch=state["epochs_done"],
                    steps_per_epoch=data.steps_per_epoch, callbacks=[progress, recorder, stop], verbose=0, shuffle=False,
                )
        except _peer_errors() as exc:
            progress.stop()
            raise FcnError(
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
        except KeyboardInterrupt:
            interrupted = True
            progress.stop()
            if recorder.diverged:
                recorder.commit_best_only()  # the live model is the diverged one: never save it
            else:
                recorder.commit_mid_epoch(model)
                console.print(f"[yellow]interrupted[/]: saved {run.last}; continue with `fcn train --resume {run.path}`")
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


def _multi_worker_shim(model) -> None:
    """Work around Keras 3's fit() under MultiWorkerMirroredStrategy (keras-team/keras#20585).

    Keras reduces a per-replica data batch eagerly before the first step (which the collective
    strategy cannot do) and means scalar logs over axis 0. Both are avoided here: the model runs
    fit() inside the strategy's scope without a pinned strategy (so the build is deferred into the
    distributed step), and scalar logs are averaged across replicas with axis=None.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = getattr(tf_trainer, "_fcn_original_reduce_per_replica", tf_trainer.reduce_per_replica)

    def reduce_per_replica(values, strategy, reduction):
        if tf_trainer._collective_all_reduce_multi_worker(strategy) and reduction in ("auto", "mean"):
            import keras

            return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    tf_trainer._fcn_original_reduce_per_replica = original
    tf_trainer.reduce_per_replica = reduce_per_replica
    model._distribute_strategy = None


def _peer_errors():
    """TensorFlow's errors for a lost peer in a collective (multi-worker) step."""
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError)


def _data_errors():
    """What tf.data raises for a file that stopped decoding or a corrupt shard record."""
    import tensorflow as tf

    return (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.UnknownError)


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
            from fcn_cli.model import portable_config

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


class StopOnCtrlC(_keras_callback_base()):
    """Ctrl-C during fit as a request: the running batch ends, then KeyboardInterrupt leaves fit from here.

    Python raises KeyboardInterrupt wherever the main thread happens to be, and inside a weakref
    or ``__del__`` callback (TensorFlow runs many) it is printed and dropped: the run went on as if
    nothing was pressed (seen in tests/test_cli.py). A second Ctrl-C interrupts at once.
    """

    def __init__(self):
        super().__init__()
        self.requested = False
        self._previous = None

    def __enter__(self):
        # Only in place of Python's own handler: an ignored SIGINT (nohup, a background job) stays ignored.
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._request)
        return self

    def __exit__(self, exc_type, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if exc_type is None:  # a request after the last batch (during the final commit, say) still stops
            self._stop_if_requested()
        return False

    def _request(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _stop_if_requested(self, *args, **kwargs):
        if self.requested:
            self.requested = False
            raise KeyboardInterrupt

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
    """A rich progress bar per epoch (step, loss, images/s), then a line with the validation scores."""

    def __init__(self, console, steps, batch_size, epochs):
        super().__init__()
        self.console, self.steps, self.batch_size, self.epochs = console, steps, batch_size, epochs
        self.progress = None
        self.task = None
        self._t0 = 0.0

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
        self.progress = self._new_progress()
        self.progress.start()
        self._t0 = time.perf_counter()
        self.task = self.progress.add_task(
            "train", total=self.steps, epoch=epoch + 1, epochs=self.epochs, loss=float("nan"), rate=0.0
        )

    def on_train_batch_end(self, batch, logs=None):
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        loss = float((logs or {}).get("loss", float("nan")))
        self.progress.update(self.task, completed=batch + 1, loss=loss, rate=(batch + 1) * self.batch_size / elapsed)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.stop()
        self.console.print(
            f"  val loss {logs.get('val_loss', float('nan')):.4f}  "
            f"val pixel acc {logs.get('val_pixel_accuracy', float('nan')):.3f}  "
            f"val mIoU {logs.get('val_miou', float('nan')):.3f}"
        )

    def stop(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
