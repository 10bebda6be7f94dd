"""Segmentation metrics: the confusion matrix is the single source of every metric.

``confusion_matrix`` counts pixels into a (C, C) int64 matrix, rows = ground truth,
columns = prediction. ``scores`` derives every number from that matrix; the Keras
metrics used during training (``MeanIoU``, ``PixelAccuracy``) accumulate the same
matrix with Keras's own confusion-matrix metric and give the same mIoU / pixel accuracy.

Conventions
-----------
* **Ignored (void) class** (``ignore_index``): pixels whose *label* is the ignored
  class are not counted at all, so its row of the matrix is zero (``scores`` also
  zeroes that row when given a matrix that counted it). Its *column* stays:
  predicting void on a non-void pixel is an error of that pixel's class (it is in
  the row sums, so it lowers that class's recall and IoU, and the pixel accuracy).
  The ignored class itself gets ``None`` for every per-class entry (iou, accuracy,
  dice and support) and takes part in no mean.
* Pixels whose label is outside ``0..C-1`` (e.g. 255) are skipped like void pixels.
  A prediction outside ``0..C-1`` on a counted pixel is a bug and raises ``ValueError``.
* **Absent classes**: a class with no ground-truth pixel and no prediction has
  ``iou = dice = None`` and is left out of ``mean_iou`` (exactly as Keras's MeanIoU
  leaves out classes whose IoU denominator is 0). A class that is only predicted
  (support 0, predictions > 0) has IoU 0 and dice 0 and *does* count in the mean.
* ``accuracy`` (recall) of a class is ``None`` when its support is 0; ``mean_accuracy``
  averages the classes with support > 0.
* ``pixel_accuracy`` = trace / all counted pixels; ``fw_iou`` = sum over classes of
  support share x IoU.
* If no pixel was counted, the summary metrics are ``None`` (undefined, not 0).
* Every number is a plain Python ``float`` in [0, 1] or ``None`` (JSON-ready).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import keras
import numpy as np
from keras import ops

from fcn_cli.images import atomic_write_bytes

__all__ = [
    "confusion_matrix",
    "scores",
    "ConfusionMatrix",
    "MeanIoU",
    "PixelAccuracy",
    "write_confusion_csv",
    "plot_confusion",
    "metrics_table",
]


# --------------------------------------------------------------------------- numpy side


def confusion_matrix(y_true, y_pred, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(C, C) int64 pixel counts, rows = ground truth, columns = prediction.

    ``y_true`` and ``y_pred`` are integer arrays of the same shape (any shape). Pixels whose
    label equals ``ignore_index`` or lies outside ``0..num_classes-1`` are not counted.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"labels {t.shape} and predictions {p.shape} differ in shape")
    if t.size and not (np.issubdtype(t.dtype, np.integer) and np.issubdtype(p.dtype, np.integer)):
        raise ValueError(f"labels and predictions must be integer arrays, got {t.dtype} and {p.dtype}")
    t = t.reshape(-1).astype(np.int64, copy=False)
    p = p.reshape(-1).astype(np.int64, copy=False)
    valid = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        valid &= t != ignore_index
    if not valid.all():
        t = t[valid]
        p = p[valid]
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        bad = p[(p < 0) | (p >= num_classes)][0]
        raise ValueError(f"prediction {int(bad)} is not a class index (0..{num_classes - 1})")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _unit(x: float) -> float:
    """A plain float clamped to [0, 1] (guards against last-bit rounding)."""
    return float(min(1.0, max(0.0, float(x))))


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return _unit(sum(kept) / len(kept)) if kept else None


def scores(cm, ignore_index: int | None = None) -> dict:
    """Every metric from one confusion matrix (see the module docstring for the conventions).

    Returns ``{"pixel_accuracy", "mean_accuracy", "mean_iou", "mean_dice", "fw_iou",
    "pixels", "ignore_index", "per_class": [{"iou", "accuracy", "dice", "support"}, ...]}``.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    if cm.size and cm.min() < 0:
        raise ValueError("confusion matrix has negative counts")
    cm = cm.astype(np.int64, copy=True)
    num_classes = cm.shape[0]
    ignored = ignore_index if ignore_index is not None and 0 <= ignore_index < num_classes else None
    if ignored is not None:
        cm[ignored, :] = 0  # void pixels are never counted, whatever the matrix says

    tp = np.diag(cm)
    support = cm.sum(axis=1)  # ground-truth pixels per class
    predicted = cm.sum(axis=0)  # predictions per class (on counted pixels)
    total = int(cm.sum())

    per_class: list[dict] = []
    for c in range(num_classes):
        if c == ignored:
            per_class.append({"iou": None, "accuracy": None, "dice": None, "support": None})
            continue
        t, s, p = int(tp[c]), int(support[c]), int(predicted[c])
        union = s + p - t
        per_class.append(
            {
                "iou": _unit(t / union) if union > 0 else None,
                "accuracy": _unit(t / s) if s > 0 else None,
                "dice": _unit(2 * t / (s + p)) if s + p > 0 else None,
                "support": s,
            }
        )

    if total > 0:
        pixel_accuracy = _unit(int(tp.sum()) / total)
        fw = sum(e["support"] * e["iou"] for e in per_class if e["support"] and e["iou"] is not None)
        fw_iou = _unit(fw / total)
    else:
        pixel_accuracy = fw_iou = None
    return {
        "pixel_accuracy": pixel_accuracy,
        "mean_accuracy": _mean([e["accuracy"] for e in per_class]),
        "mean_iou": _mean([e["iou"] for e in per_class]),
        "mean_dice": _mean([e["dice"] for e in per_class]),
        "fw_iou": fw_iou,
        "pixels": total,
        "ignore_index": ignored,
        "per_class": per_class,
    }


class ConfusionMatrix:
    """Accumulates a (C, C) int64 confusion matrix over batches / images / workers."""

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self._cm = np.zeros((self.num_classes, self.num_classes), np.int64)

    @property
    def matrix(self) -> np.ndarray:
        """The accumulated counts (a copy)."""
        return self._cm.copy()

    def update(self, y_true, y_pred) -> "ConfusionMatrix":
        self._cm += confusion_matrix(y_true, y_pred, self.num_classes, self.ignore_index)
        return self

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class one (ignore {self.ignore_index})"
            )
        self._cm += other._cm
        return self

    def reset(self) -> None:
        self._cm[...] = 0

    def scores(self) -> dict:
        return scores(self._cm, self.ignore_index)

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, pixels={int(self._cm.sum())})"


# --------------------------------------------------------------------------- Keras side


class _ConfusionMetricMixin:
    """Shared behaviour of the training metrics: Keras's confusion matrix over integer labels and logits;
    sample weights never reach the matrix."""

    def __init__(self, num_classes: int, ignore_class: int | None = None, name: str | None = None, dtype=None):
        super().__init__(num_classes=int(num_classes), name=name, dtype=dtype, ignore_class=ignore_class,
                         sparse_y_true=True, sparse_y_pred=False)

    def update_state(self, y_true, y_pred, sample_weight=None):
        # Keras hands compiled metrics the training sample weights (void mask, class
        # weights). Class weights must not distort the counts, and void pixels are
        # already dropped through ``ignore_class``, so the weights are ignored.
        del sample_weight
        y_pred = ops.convert_to_tensor(y_pred)
        if keras.backend.standardize_dtype(y_pred.dtype) in ("bfloat16", "float16"):
            # argmax is exact on the widened values; not every kernel takes half floats.
            y_pred = ops.cast(y_pred, "float32")
        return super().update_state(y_true, y_pred, sample_weight=None)

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "ignore_class": self.ignore_class,
            "name": self.name,
            "dtype": self._dtype,
        }


@keras.saving.register_keras_serializable(package="fcn")
class MeanIoU(_ConfusionMetricMixin, keras.metrics.MeanIoU):
    """Mean IoU from logits (B, H, W, C) and integer labels (B, H, W).

    The ignored class is dropped from the counts (its row) *and* from the mean, so the
    value equals ``scores(cm, ignore_index)["mean_iou"]`` (0 while nothing was counted).
    """

    def __init__(self, num_classes: int, ignore_class: int | None = None, name: str = "mean_iou", dtype=None):
        super().__init__(num_classes, ignore_class, name, dtype)
        kept = [c for c in range(self.num_classes) if c != ignore_class]
        if kept:  # keep predictions of void (its column) out of the mean, like ``scores``
            self.target_class_ids = kept


@keras.saving.register_keras_serializable(package="fcn")
class PixelAccuracy(_ConfusionMetricMixin, keras.metrics.MeanIoU):
    """Global pixel accuracy (trace / sum of the confusion matrix), void pixels not counted."""

    def __init__(self, num_classes: int, ignore_class: int | None = None, name: str = "pixel_accuracy", dtype=None):
        super().__init__(num_classes, ignore_class, name, dtype)

    def result(self):
        cm = ops.cast(self.total_cm, "float32")
        correct = ops.sum(ops.diagonal(cm))
        total = ops.sum(cm)
        return ops.where(total > 0, correct / ops.maximum(total, 1.0), 0.0)


# --------------------------------------------------------------------------- files and tables


def _check_names(cm: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    cm = np.asarray(cm)
    names = [str(n) for n in names]
    if cm.ndim != 2 or cm.shape != (len(names), len(names)):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(names)} class names")
    return cm, names


def write_confusion_csv(cm, names: Sequence[str], path: str | Path) -> None:
    """Atomically write the raw counts as CSV: header ``true \\ predicted,<names>``, one row per true class."""
    cm, names = _check_names(cm, names)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["true \\ predicted", *names])
    for name, row in zip(names, cm):
        writer.writerow([name, *(int(v) for v in row)])
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def plot_confusion(cm, names: Sequence[str], path: str | Path, normalize: bool = True) -> None:
    """Atomically write a PNG heatmap of the matrix (rows = truth), row-normalised by default."""
    cm, names = _check_names(cm, names)
    # Agg canvas directly: no pyplot, no global backend switch, safe off the main thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = cm.astype(np.float64)
    if normalize:
        rows = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    else:
        values = counts
    n = len(names)
    side = max(5.0, 0.55 * n + 3.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else " (pixels)"))
    if n <= 40:
        size = 7 if n <= 15 else 5
        for i in range(n):
            for j in range(n):
                v = values[i, j]
                text = f"{v:.2f}" if normalize else f"{int(counts[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=size,
                        color="white" if v > 0.5 * vmax else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def metrics_table(result: dict, names: Sequence[str], ignore_index: int | None = None):
    """A rich table: one row per class (IoU, accuracy, Dice, pixels), then the summary rows."""
    from rich.table import Table

    per_class = result["per_class"]
    if len(per_class) != len(names):
        raise ValueError(f"{len(per_class)} per-class entries but {len(names)} class names")
    table = Table(title="Segmentation metrics")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("Dice", justify="right")
    table.add_column("pixels", justify="right")
    for index, (name, entry) in enumerate(zip(names, per_class)):
        if index == ignore_index:
            table.add_row(f"{name} (ignored)", "—", "—", "—", "—", style="dim")
            continue
        support = entry.get("support")
        table.add_row(
            str(name),
            _fmt(entry.get("iou")),
            _fmt(entry.get("accuracy")),
            _fmt(entry.get("dice")),
            "—" if support is None else f"{support:,}",
        )
    table.add_section()
    table.add_row("mean over classes (mIoU, class-avg acc)", _fmt(result.get("mean_iou")),
                  _fmt(result.get("mean_accuracy")), _fmt(result.get("mean_dice")), "", style="bold")
    table.add_row("frequency-weighted IoU", _fmt(result.get("fw_iou")), "", "", "", style="bold")
    pixels = result.get("pixels")
    table.add_row("pixel accuracy (global)", "", _fmt(result.get("pixel_accuracy")), "",
                  "" if pixels is None else f"{pixels:,}", style="bold")
    return table
