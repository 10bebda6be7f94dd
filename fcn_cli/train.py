"""A training run: its configuration, what its checkpoints say about it, and :func:`train`, which
starts one or resumes one from its run folder.

The story of a run, file by file: ``train_data`` checks the data and makes the pipelines; ``fit``
chooses strategy and precision, builds and compiles the model in the strategy's scope and calls
``model.fit``; ``callbacks`` commit each finished epoch through ``runs.RunFolder`` (the one place that
writes a run's files, chief-only and atomic) and stop runs that diverge.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fcn_cli.errors import FcnError


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
    loss: str = "ce"  # losses.LOSSES
    ignore_void: bool = True
    flip: bool = True
    scale: tuple[float, float] = (1.0, 1.0)
    jitter: float = 0.0
    class_uniform: float = 0.0  # share of class-uniform crops (pipeline.Augment)
    seed: int = 0
    out: str = "models"
    classes: str | None = None
    precision: str = "auto"
    strategy: str = "auto"
    max_steps: int | None = None  # cap on steps per epoch (smoke tests, benchmarks)
    time_limit: float | None = None  # minutes; stop after the last epoch that fits
    checkpoint_overhead: float = 0.02  # largest share of wall time spent writing checkpoints (1: every epoch)
    tensorboard: bool = False  # scalars, per-class IoU and validation masks per epoch in <run>/tensorboard
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



def _record_resume(folder: Path, run, cfg: TrainConfig, data) -> None:
    """Check that moved data is the same data, then store what changed (the chief: a worker's RunFolder is
    its own temporary folder), so the next --resume continues from today's settings, not the first run's."""
    from fcn_cli.runs import RunFolder

    saved = RunFolder(folder).read_config()
    if cfg.data != saved.get("data") and (data.n_train, data.n_val) != (saved.get("train_pairs"), saved.get("val_pairs")):
        raise FcnError(
            f"--data {cfg.data}: {data.n_train} training and {data.n_val} validation pairs, but the run trained on "
            f"{saved.get('train_pairs')} and {saved.get('val_pairs')} from {saved.get('data')}; resume with the data "
            "it started with, or start a new run"
        )
    changed = {name: getattr(cfg, name) for name in RESUMABLE if saved.get(name) != getattr(cfg, name)}
    if changed and run.is_chief:
        run.write_config({**saved, **changed})


# --- the run ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    best_miou: float | None
    best_epoch: int | None
    stable_path: Path | None
    rows: list
    interrupted: str | None = None  # "SIGINT" or "SIGTERM" when a signal stopped the run
    seconds: float = 0.0
    images_per_s: float | None = None
    commits: list = field(default_factory=list)  # {"epoch": last finished epoch, "seconds": wall time of the commit}
    epoch_ends_s: list = field(default_factory=list)  # seconds from just before fit to each epoch's end, commit incl.


# What may change when a run resumes: how long it goes on, how it commits, where its data now lives and
# what it logs. Everything else shapes the weights or the schedule already under way.
RESUMABLE = ("epochs", "time_limit", "checkpoint_overhead", "data", "tensorboard")


def resume_config(folder: Path, changes: dict, flag=lambda name: "--" + name.replace("_", "-")) -> TrainConfig:
    """The configuration a run folder continues with: its own, with the RESUMABLE keys of ``changes`` (values
    in config.json's form) applied; another key whose value differs from the run's is refused in one line
    naming ``flag(key)`` and the value the run keeps."""
    from fcn_cli.runs import RunFolder

    saved = RunFolder(Path(folder)).read_config()
    for name, value in changes.items():
        stored = saved.get(name, TrainConfig.__dataclass_fields__[name].default
                           if name in TrainConfig.__dataclass_fields__ else None)
        # A requeued job re-issues its whole command line: the values the run already has are no change.
        if name not in RESUMABLE and value != stored:
            allowed = ", ".join(flag(n) for n in RESUMABLE)
            raise FcnError(
                f"{flag(name)}: a resumed run keeps its own settings ({name} = {json.dumps(stored)} in "
                f"{Path(folder) / 'config.json'}); only {allowed} may change on --resume. Drop {flag(name)}, or "
                f"start a new run from its weights with --init-from {Path(folder) / 'last.keras'}"
            )
    return TrainConfig.from_json({**saved, **{k: v for k, v in changes.items() if k in RESUMABLE}})


@dataclass
class Resumed:
    """Where a resumed run stands: its last.keras, state and the log rows up to that checkpoint."""

    last: Path
    state: dict
    rows: list


def resumed_run(folder: Path) -> Resumed:
    """Read a run folder to continue. Every worker reads the run's own files; only the chief writes them.

    last.keras is the commit record: the epoch embedded in it is the last one whose weights exist, and
    log rows past it are dropped. best.keras is the record of the best: a kill between the state and
    its write must not leave a best score whose weights were never saved.
    """
    from fcn_cli.runs import RunFolder, read_checkpoint_meta

    source = RunFolder(Path(folder))
    if not source.last.exists():
        raise FcnError(f"{source.last}: no checkpoint to resume from; start a new run")
    state = source.read_state()
    state["epochs_done"] = int(read_checkpoint_meta(source.last).get("epoch", state["epochs_done"]))
    rows = [r for r in source.read_log() if r["epoch"] <= state["epochs_done"]]
    best_meta = read_checkpoint_meta(source.best) if source.best.exists() else {}
    best_miou = best_meta.get("val_miou")
    state["best_miou"] = float(best_miou) if isinstance(best_miou, (int, float)) else None
    state["best_epoch"] = best_meta.get("epoch") if state["best_miou"] is not None else None
    return Resumed(source.last, state, rows)


def train(cfg: TrainConfig, console=None, resume: str | None = None) -> TrainResult:
    """Train per ``cfg``, or continue the run folder ``resume`` with ``cfg`` from :func:`resume_config`;
    returns where everything went."""
    from rich.console import Console

    from fcn_cli.runs import RunFolder

    from fcn_cli.fit import choose_precision, fit_run, is_chief, make_strategy, precision_line
    from fcn_cli.train_data import prepare_data

    console = console or Console()
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
    if resume:
        _record_resume(Path(resume), run, cfg, data)
    try:
        return fit_run(cfg, data, run, strategy, strategy_desc, precision, console,
                       resumed_run(resume) if resume else None)
    finally:
        run.close()
