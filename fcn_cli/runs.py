"""The run folder and checkpoints: the one place that writes a run's files.

A run folder (``models/fcn8-20261129-031500/``) holds ``config.json``, ``log.csv`` (one row per
finished epoch), ``state.json`` (epochs done, best score), ``last.keras``, ``best.keras`` and
``curves.png``. ``models/<variant>.keras`` is a link to the best checkpoint of the latest run.

Every file is written to a temporary name in its folder and renamed, so a run killed at any moment
leaves complete files from its last finished epoch. Only the chief writes; other workers of a
multi-worker run write into a private temporary folder that is removed at the end (the pattern of
TensorFlow's multi-worker guide).

Checkpoints are standard ``.keras`` zips with one extra entry, ``fcn.json``: the class table,
training size and variant, so ``fcn evaluate`` / ``fcn predict`` need no other file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from fcn_cli.accel.checkpoint_io import load_weights, save_keras
from fcn_cli.errors import FcnError, write_error
from fcn_cli.images import _umask_mode, atomic_write_bytes

META_ENTRY = "fcn.json"
LOG_FIELDS = ("epoch", "loss", "val_loss", "val_pixel_accuracy", "val_miou", "lr", "seconds", "images_per_s")


def _write(path: Path, data: bytes, fix: str = "free disk space or choose a writable --out") -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise write_error(path, exc, fix) from None


def ensure_writable_folder(folder: Path, what: str, fix: str) -> None:
    """Create ``folder`` if needed; one FcnError line when it cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FcnError(f"{folder}: cannot create the {what} ({exc.strerror or exc}); {fix}") from None
    if not os.access(folder, os.W_OK):
        raise FcnError(f"{folder}: {what} is not writable; {fix}")


def write_json(path: Path, data: dict, fix: str = "free disk space or choose a writable --out") -> None:
    _write(Path(path), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), fix)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FcnError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise FcnError(f"{path}: unreadable JSON ({exc})") from None


# --- checkpoints ------------------------------------------------------------------------------


def save_checkpoint(model, path: Path, meta: dict, portable: bool = False) -> None:
    """Save ``model`` (with optimizer state) to ``path`` atomically, with ``meta`` embedded.

    ``portable``: fcn's kernels are written as the stock Conv2D they compute, so that plain Keras
    (``keras.saving.load_model``, no fcn_cli) reads the file; fcn puts its kernels back when it loads.
    """
    commit_checkpoint(prepare_checkpoint(model, path, meta, portable), path)


def prepare_checkpoint(model, path: Path, meta: dict, portable: bool = False) -> Path:
    """Write the complete checkpoint to a temporary file beside ``path``; nothing else changes yet."""
    path = Path(path)
    tmp = None
    try:
        # Creating the temporary file is part of the write: a read-only or full folder fails here.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".keras", dir=path.parent)
        try:
            os.fchmod(fd, _umask_mode())
        finally:
            os.close(fd)
        from fcn_cli.accel.swap import stock_model

        save_keras(stock_model(model) if portable else model, tmp,
                   {META_ENTRY: json.dumps(meta, indent=2, sort_keys=True).encode()})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        return Path(tmp)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def commit_checkpoint(tmp: Path, path: Path) -> None:
    """Rename a prepared checkpoint into place (atomic on one file system)."""
    try:
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(Path(path), exc) from None


def _write_error(path: Path, exc: OSError) -> FcnError:
    return write_error(path, exc, "the previous checkpoint is intact; free disk space or choose a writable --out")


def read_checkpoint_meta(path: Path, verify: bool = True) -> dict:
    """The metadata of a checkpoint, checking first that it is a complete .keras file (``verify``: every
    member's CRC too, a read of the whole file; without it only the zip's directory and members)."""
    path = Path(path)
    if path.is_dir():
        raise FcnError(f"{path}: is a folder; give a .keras checkpoint file (e.g. models/fcn8.keras)")
    if not path.exists():
        hint = "train one with `fcn train` or give --model PATH"
        raise FcnError(f"{path}: checkpoint not found; {hint}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if not {"config.json", "model.weights.h5"} <= names:
                raise FcnError(f"{path}: not a Keras model file (no config.json / weights inside)")
            bad = zf.testzip() if verify else None
            if bad is not None:
                raise FcnError(f"{path}: checkpoint is corrupt (entry {bad} fails its CRC); use another checkpoint")
            return json.loads(zf.read(META_ENTRY)) if META_ENTRY in names else {}
    except zipfile.BadZipFile:
        raise FcnError(f"{path}: not a Keras .keras model (not a zip archive, or truncated); give a checkpoint written by fcn train") from None
    except (OSError, ValueError) as exc:
        raise FcnError(f"{path}: cannot read checkpoint ({exc})") from None


def load_checkpoint(path: Path, num_classes: int | None = None, compile: bool = False, for_inference: bool = False):
    """(model, meta) from a .keras file, in Keras safe mode: no code inside the file is run.

    ``for_inference``: the model is built from :func:`fcn_cli.accel.serving.serving_config` (where the
    levers are on: weights in the compute dtype, head kernels in the product's fast layout), with
    identical outputs.
    """
    import keras

    import fcn_cli.losses  # noqa: F401  registers the loss a compiled checkpoint names
    import fcn_cli.metrics  # noqa: F401  registers the custom metrics a compiled checkpoint names
    import fcn_cli.schedules  # noqa: F401  registers the learning-rate schedule a compiled checkpoint names
    from fcn_cli import accel
    from fcn_cli.accel.serving import serving_config
    from fcn_cli.accel.swap import accelerated_config, with_layers_of
    from fcn_cli.precision import bf16_verified

    accel.register_serializables()  # last.keras may name fcn's kernels and FusedAdam

    path = Path(path)
    meta = read_checkpoint_meta(path)
    try:
        if for_inference:
            with zipfile.ZipFile(path) as zf:
                saved = json.loads(zf.read("config.json"))
            bf16 = bf16_verified()
            # The weights are keyed by the layer classes the file was written with; fcn's kernels
            # (where they pay here) get them layer by layer from a model of those classes.
            written = serving_config(saved, bf16=bf16)
            wanted = serving_config(accelerated_config(saved), bf16=bf16)
            model = keras.saving.deserialize_keras_object(written, safe_mode=True)
            load_weights(model, path)  # float32 values, cast into the compute-dtype variables
            if wanted != written:
                model = with_layers_of(model, keras.saving.deserialize_keras_object(wanted, safe_mode=True))
        else:
            model = keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FcnError(f"{path}: cannot load the model ({first}); give a checkpoint written by fcn train") from None
    out_shape = model.output_shape
    if not (isinstance(out_shape, tuple) and len(out_shape) == 4 and model.input_shape[-1] == 3):
        raise FcnError(f"{path}: not a segmentation model (output {out_shape}); give a checkpoint written by fcn train")
    if num_classes is not None and out_shape[-1] != num_classes:
        raise FcnError(
            f"{path}: model predicts {out_shape[-1]} classes but the class table has {num_classes}; "
            "give the matching --classes file or another checkpoint"
        )
    return model, meta


# --- the run folder ---------------------------------------------------------------------------


@dataclass
class RunFolder:
    """Writes a run's files, and only on the chief. ``path`` is where this process writes."""

    path: Path
    is_chief: bool = True
    _tmp: str | None = field(default=None, repr=False)

    @classmethod
    def create(cls, out: Path, variant: str, is_chief: bool = True) -> "RunFolder":
        out = Path(out)
        if not is_chief:
            tmp = tempfile.mkdtemp(prefix="fcn-worker-")
            return cls(Path(tmp), False, tmp)
        ensure_writable_folder(out, "output folder", "choose a writable --out")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(100):
            path = out / (f"{variant}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir()
                return cls(path, True)
            except FileExistsError:
                continue
        raise FcnError(f"{out}: cannot create a new run folder")

    @classmethod
    def open(cls, path: Path, is_chief: bool = True) -> "RunFolder":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FcnError(f"{path}: not a run folder (no config.json); give a folder under models/ written by fcn train")
        if not is_chief:
            tmp = tempfile.mkdtemp(prefix="fcn-worker-")
            return cls(Path(tmp), False, tmp)
        for stale in path.glob(".*"):  # temporary files of a write that a kill interrupted
            if stale.is_file() and stale.suffix in (".keras", ".tmp"):
                stale.unlink(missing_ok=True)
        return cls(path, True)

    def close(self) -> None:
        """Remove a worker's private folder."""
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # files
    @property
    def last(self) -> Path:
        return self.path / "last.keras"

    @property
    def best(self) -> Path:
        return self.path / "best.keras"

    def write_config(self, config: dict) -> None:
        write_json(self.path / "config.json", config)

    def read_config(self) -> dict:
        return read_json(self.path / "config.json")

    def read_state(self) -> dict:
        path = self.path / "state.json"
        return read_json(path) if path.exists() else {"epochs_done": 0, "best_miou": None, "best_epoch": None}

    def write_epoch(self, rows: list[dict], state: dict) -> None:
        """The CSV log and the state, each replaced atomically (after the checkpoint of that epoch)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        _write(self.path / "log.csv", buf.getvalue().encode())
        write_json(self.path / "state.json", state)

    def read_log(self) -> list[dict]:
        path = self.path / "log.csv"
        if not path.exists():
            return []
        with open(path, newline="") as fh:
            return [
                {k: (float(v) if k != "epoch" else int(v)) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(fh)
            ]

    def save_checkpoint(self, model, which: str, meta: dict) -> Path:
        path = self.path / f"{which}.keras"
        # best.keras is what users take home: readable by plain Keras. last.keras keeps fcn's kernels
        # for --resume, whose optimizer state belongs to them.
        save_checkpoint(model, path, meta, portable=which == "best")
        return path

    def end_epoch(self, model, meta: dict, rows: list[dict], state: dict) -> None:
        """last.keras, log.csv and state.json for a finished epoch, consistent at any instant of a kill.

        The checkpoint is written completely first (a full disk changes nothing), then the log and
        state, then the checkpoint is renamed into place. --resume trusts the epoch embedded in
        last.keras and drops log rows past it.
        """
        pending = prepare_checkpoint(model, self.last, meta)
        try:
            self.write_epoch(rows, state)
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        commit_checkpoint(pending, self.last)

    def link_stable(self, stable: Path) -> Path | None:
        """Point ``stable`` (e.g. models/fcn8.keras) at this run's best checkpoint, atomically.

        Replaces only a link (the tool's own output), never a regular file a user put there.
        """
        if not self.is_chief:
            return None
        stable = Path(stable)
        if stable.exists() and not stable.is_symlink():
            return None
        if not self.best.is_file():  # never a link to a checkpoint that is not there (yet)
            return None
        target = os.path.relpath(self.best, stable.parent)
        tmp = stable.parent / f".{stable.name}.{os.getpid()}.tmp"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(target, tmp)
            os.replace(tmp, stable)
        except OSError:
            tmp.unlink(missing_ok=True)
            return None
        return stable

    def plot_curves(self, rows: list[dict]) -> None:
        """curves.png: training/validation loss and validation mIoU / pixel accuracy per epoch."""
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
        for key, label in (("loss", "train loss"), ("val_loss", "val loss")):
            ax1.plot(epochs, [r.get(key, float("nan")) for r in rows], marker=".", label=label)
        ax1.set_xlabel("epoch")
        ax1.set_title("loss")
        ax1.legend()
        for key, label in (("val_miou", "val mIoU"), ("val_pixel_accuracy", "val pixel accuracy")):
            ax2.plot(epochs, [r.get(key, float("nan")) for r in rows], marker=".", label=label)
        ax2.set_ylim(0, 1)
        ax2.set_xlabel("epoch")
        ax2.set_title("validation")
        ax2.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        _write(self.path / "curves.png", buf.getvalue())


def resolve_model_path(model: str | Path | None, out: Path, variant: str = "fcn8") -> Path:
    """The checkpoint a command should use: --model, or the stable link of the default variant."""
    if model is not None:
        return Path(model)
    for candidate in (variant, "fcn8", "fcn16", "fcn32", "fcn4"):
        path = Path(out) / f"{candidate}.keras"
        if path.exists():
            return path
    raise FcnError(f"{Path(out) / (variant + '.keras')}: no trained model yet; run `fcn train` first or give --model PATH")
