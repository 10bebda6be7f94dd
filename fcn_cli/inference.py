"""Running a trained FCN on photos of any size: logits (or class indices) at each photo's own resolution.

Shared by ``evaluate`` and ``predict``. Two ways for a photo to meet the model (``mode``):

* ``"resize"``: the photo is resized to the model's training size (bilinear, no antialiasing, half-pixel
  centres: ``tf.image.resize``'s rule, what the training pipeline did to validation images, computed
  here in numpy so that exported ONNX models predict without TensorFlow), run, and the
  logits are resized back to the photo's size (bilinear, half-pixel centres: the rule of
  ``tf.image.resize``). Photos of every size share one batch.
* ``"native"``: the photo is padded at the bottom/right to a multiple of 32 (mirror padding,
  ``pad_to_multiple``), run at its own scale, and the logits cropped back. Photos of equal
  size share a batch. A photo over ``TILE_BUDGET`` pixels runs in overlapping tiles
  (``TILE`` x ``TILE``, ``OVERLAP`` px shared, logits averaged where tiles overlap), one band of
  tile rows at a time, so an 8000x6000 photo never needs the whole network's activations, nor
  (for class indices) its whole logit volume, in memory at once.

A checkpoint without a training size (a plain .keras from elsewhere) cannot be resized to it, so
``"resize"`` falls back to ``"native"`` there (:func:`effective_mode`).

Test-time augmentation (mmsegmentation's ``--aug-test``; ``flip``, ``scales``): each batch, already
at its base size (the inference size in resize mode, the photo's own size or a tile in native mode),
also runs resized by each scale (sides rounded to multiples of 32) and mirrored; the logits of every
view come back to the base size and are averaged before the argmax.

Calls go through ``model(x, training=False)`` on whole batches, never ``model.predict`` per image.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcn_cli.classes import CAMVID, ClassTable, load_classes
from fcn_cli.errors import FcnError

MODES = ("resize", "native")
MULTIPLE = 32  # the network's total stride: inputs must be multiples of it
TILE = 512  # tile side in native mode (a multiple of 32)
OVERLAP = 64  # pixels neighbouring tiles share (rounded up to a multiple of 32)
TILE_BUDGET = 2_500_000  # pixels: larger photos are tiled in native mode; also caps one forward pass
WINDOW_BATCHES = 4  # photos are grouped by size within windows of batch_size * this many
BAND_FLOATS = 8_000_000  # floats per band when upsampling / argmax-ing big logit maps (32 MB)
MAX_SCALE = 4.0  # largest test-time scale: 16x the pixels of a plain pass is already more than anyone waits for


# --------------------------------------------------------------------------- any image size


def pad_to_multiple(images: np.ndarray, multiple: int = 32) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad a (B, H, W, C) batch at the bottom/right to the next multiple; returns it and the original (H, W).

    Symmetric padding (mirror with the edge row repeated) keeps image statistics at the border.
    """
    h, w = images.shape[1:3]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        images = np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="symmetric")
    return images, (h, w)


def crop_to(outputs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop (B, H', W', ...) model outputs back to the original (H, W) of :func:`pad_to_multiple`."""
    h, w = size
    return outputs[:, :h, :w]


# --------------------------------------------------------------------------- loading


def load_for_inference(model_path: str | Path, classes_file: str | Path | None = None):
    """(model, classes, image_size or None, meta) from a checkpoint.

    Classes: the ``--classes`` file when given (the model's output count must match it), else the
    table embedded in the checkpoint, else CamVid's. ``image_size`` is the (H, W) "resize" mode
    uses, from the metadata (:func:`meta_image_size`), or None when the checkpoint records none.
    """
    from fcn_cli.exported import format_of

    path = Path(model_path)
    if format_of(path) is not None:
        return _load_exported(path, classes_file)
    from fcn_cli.runs import load_checkpoint

    if classes_file is not None:
        classes = load_classes(classes_file)
        model, meta = load_checkpoint(path, num_classes=classes.num_classes, for_inference=True)
    else:
        model, meta = load_checkpoint(path, for_inference=True)
        embedded = meta.get("classes")
        if isinstance(embedded, dict):
            classes = ClassTable.from_dict(embedded, source=f"{path} (embedded class table)")
            origin = "its embedded class table"
        else:
            classes = CAMVID
            origin = "CamVid's class table (the checkpoint records none)"
        outputs = model.output_shape[-1]
        if outputs != classes.num_classes:
            raise FcnError(
                f"{path}: model predicts {outputs} classes but {origin} has {classes.num_classes}; "
                "give the matching --classes file"
            )
    # Keras turns XLA on for uncompiled models when a GPU is visible; XLA compiles once per input
    # shape, and photos of many sizes, edge tiles and last partial batches are many shapes.
    model.jit_compile = False
    return model, classes, meta_image_size(meta), meta


def _load_exported(path: Path, classes_file):
    """load_for_inference for a file of ``fcn export``: the class table and size from its metadata."""
    from fcn_cli.exported import open_exported

    model = open_exported(path)
    if model.outputs_labels:
        raise FcnError(f"{path}: exported with --labels (class indices, no logits to resize or average); "
                       "export without --labels for fcn predict and evaluate")
    classes = load_classes(classes_file) if classes_file is not None else \
        ClassTable.from_dict(model.meta["classes"], source=f"{path} (exported class table)")
    if classes.num_classes != model.num_classes:
        raise FcnError(f"{path}: model predicts {model.num_classes} classes but the class table has "
                       f"{classes.num_classes}; give the matching --classes file")
    size = model.fixed_size or meta_image_size({"inference_size": model.meta.get("inference_size")})
    return model, classes, size, model.meta


def meta_image_size(meta: dict) -> tuple[int, int] | None:
    """The size "resize" mode uses, from checkpoint metadata: the recorded inference size (the
    training size times the mean zoom of scale augmentation, see ``train.inference_size``), else the
    training size (checkpoints from before inference sizes were recorded), else None."""
    if not isinstance(meta, dict):
        return None
    for key in ("inference_size", "image_size"):
        try:
            h, w = (int(v) for v in meta.get(key))
        except (TypeError, ValueError):
            continue
        if h > 0 and w > 0:
            return h, w
    return None


def tta_scales(scales) -> tuple[float, ...]:
    """Test-time scales, checked: positive numbers up to ``MAX_SCALE``, duplicates dropped, sorted.

    Accepts a sequence of numbers, one number, or a comma-separated string ("0.75,1,1.25"); None is (1.0,).
    """
    if scales is None:
        return (1.0,)
    if isinstance(scales, str):
        scales = [part.strip() for part in scales.split(",")]
    elif isinstance(scales, (int, float)):
        scales = [scales]
    shown = ",".join(str(v) for v in scales)
    try:
        values = sorted({float(v) for v in scales})
    except (TypeError, ValueError):
        values = []
    if not values or not all(0.0 < v <= MAX_SCALE for v in values):  # also rejects nan
        raise FcnError(f"--tta scales={shown}: give one or more numbers above 0 and at most {MAX_SCALE:g}, "
                       "comma-separated (e.g. --tta scales=0.75,1,1.25)")
    return tuple(values)


def scaled_size(hw: Sequence[int], scale: float) -> tuple[int, int]:
    """(H, W) times ``scale``, each side rounded to a multiple of 32 (at least 32); scale 1 keeps (H, W)
    as it is (the plain pass pads it instead, so TTA's scale 1 is exactly the plain prediction)."""
    if scale == 1.0:
        return int(hw[0]), int(hw[1])
    return tuple(max(MULTIPLE, int(v * scale / MULTIPLE + 0.5) * MULTIPLE) for v in hw)


def effective_mode(mode: str, image_size: Sequence[int] | None) -> tuple[str, tuple[int, int] | None]:
    """(mode actually used, training size): "resize" without a known training size runs "native"."""
    if mode not in MODES:
        raise FcnError(f"mode {mode!r}: choose 'resize' or 'native'")
    size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
    if size is not None and (size[0] < 1 or size[1] < 1):
        raise FcnError(f"image size {size}: height and width must be positive")
    if mode == "resize" and size is None:
        return "native", None
    return mode, size


# --------------------------------------------------------------------------- public API


def logits_for(
    model,
    image: np.ndarray,
    mode: str = "resize",
    image_size: Sequence[int] | None = None,
    tile: int = TILE,
    overlap: int = OVERLAP,
    tile_budget: int | None = None,
) -> np.ndarray:
    """float32 (H, W, C) logits of one (H, W, 3) uint8 photo, at the photo's own resolution."""
    ((_, out),) = iter_predictions(
        model, [(None, image)], mode, image_size, batch_size=1, output="logits",
        tile=tile, overlap=overlap, tile_budget=tile_budget,
    )
    return out


def labels_for(model, image: np.ndarray, mode: str = "resize", image_size: Sequence[int] | None = None, **kwargs) -> np.ndarray:
    """(H, W) class indices (argmax of :func:`logits_for`), computed band by band."""
    ((_, out),) = iter_predictions(model, [(None, image)], mode, image_size, batch_size=1, output="labels", **kwargs)
    return out


def predict_batch(
    model,
    images: Sequence[np.ndarray],
    mode: str = "resize",
    image_size: Sequence[int] | None = None,
    batch_size: int = 4,
    output: str = "logits",
    **kwargs,
) -> list[np.ndarray]:
    """Per photo, float32 (H, W, C) logits (``output="logits"``) or (H, W) uint8 class indices
    (``output="labels"``), in input order; photos are batched ``batch_size`` at a time."""
    return [out for _, out in iter_predictions(
        model, ((i, im) for i, im in enumerate(images)), mode, image_size, batch_size, output=output, **kwargs
    )]


def iter_predictions(
    model,
    items: Iterable[tuple[Any, np.ndarray]],
    mode: str = "resize",
    image_size: Sequence[int] | None = None,
    batch_size: int = 4,
    output: str = "labels",
    tile: int = TILE,
    overlap: int = OVERLAP,
    tile_budget: int | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> Iterator[tuple[Any, np.ndarray]]:
    """(key, result) for each (key, (H, W, 3) uint8 photo) of ``items``, in order, lazily.

    ``output="labels"`` gives (H, W) uint8 class indices without ever holding a big photo's full
    logit volume; ``"logits"`` gives float32 (H, W, C). Photos are taken in windows of
    ``batch_size * WINDOW_BATCHES``, grouped (all together in resize mode, by size in native mode)
    and run ``batch_size`` at a time, never more than ``tile_budget`` pixels per forward pass.
    ``flip=True`` averages the logits of each photo and of its mirror image (test-time augmentation:
    twice the compute). ``scales`` (:func:`tta_scales`) adds views resized by each factor, run and
    resized back; the logits of every scale (and mirror) are averaged (compute grows with the sum
    of the squared scales, times two with ``flip``).
    """
    if output not in ("labels", "logits"):
        raise ValueError(f"output must be 'labels' or 'logits', got {output!r}")
    mode, size = effective_mode(mode, image_size)
    scales = tta_scales(scales)
    fixed = getattr(model, "fixed_size", None)  # an export with a fixed height and width (fcn_cli.exported)
    if fixed and (mode != "resize" or tuple(size) != fixed):
        raise FcnError(f"{model.path}: exported for {fixed[0]}x{fixed[1]} images only; run it in resize mode at "
                       "that size (no --image-size, no --mode native), or export with --dynamic")
    if fixed and scales != (1.0,):
        raise FcnError(f"{model.path}: exported for {fixed[0]}x{fixed[1]} images only, so it cannot run other "
                       f"scales (--tta scales={','.join(f'{s:g}' for s in scales)}); export with --dynamic, "
                       "or drop the scales (--tta flip alone works)")
    runner = _Runner(
        model, mode, size, max(1, int(batch_size)), output,
        tile=tile, overlap=overlap, budget=TILE_BUDGET if tile_budget is None else max(1, int(tile_budget)),
        flip=flip, scales=scales,
    )
    window: list[tuple[Any, np.ndarray]] = []
    limit = runner.batch_size * WINDOW_BATCHES
    for key, image in items:
        window.append((key, _checked(image)))
        if len(window) >= limit:
            yield from runner.run_window(window)
            window = []
    if window:
        yield from runner.run_window(window)


def prefetch(iterable: Iterable, depth: int = 8) -> Iterator:
    """Iterate ``iterable`` in a background thread, ``depth`` items ahead (decoding overlaps inference).

    An exception in the producer is re-raised here, at the point it happened in the sequence.
    """
    done = object()
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce():
        try:
            for item in iterable:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=produce, name="fcn-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        # Unblock a producer waiting on a full queue, then let it finish.
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


# --------------------------------------------------------------------------- resizing


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source taps of ``tf.image.resize`` (half-pixel centres, no antialiasing)."""
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    lo = np.clip(base, 0, in_size - 1).astype(np.intp)
    hi = np.clip(base + 1, 0, in_size - 1).astype(np.intp)
    frac = (src - base).astype(np.float32)
    return lo, hi, frac


class _Upsampler:
    """Bilinear resize of (h, w, C) logits to (H, W, C), produced in row bands."""

    def __init__(self, logits: np.ndarray, out_hw: tuple[int, int]):
        h, w = logits.shape[:2]
        self.height, self.width = out_hw
        lo, hi, f = _taps(w, self.width)
        f = f[None, :, None]
        self.cols = logits[:, lo] * (1.0 - f) + logits[:, hi] * f  # (h, W, C): widths first, it is small
        self.rows = _taps(h, self.height)

    def band(self, y0: int, y1: int) -> np.ndarray:
        lo, hi, f = (a[y0:y1] for a in self.rows)
        f = f[:, None, None]
        return self.cols[lo] * (1.0 - f) + self.cols[hi] * f


def resize_logits(logits: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(h, w, C) -> (H, W, C) float32, bilinear with half-pixel centres (same as ``tf.image.resize``)."""
    up = _Upsampler(np.asarray(logits, np.float32), tuple(out_hw))
    return up.band(0, up.height)


def _band_rows(width: int, channels: int) -> int:
    return max(1, BAND_FLOATS // max(1, width * channels))


# --------------------------------------------------------------------------- the runner

_LABEL_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def labels_model(model):
    """The same network (shared weights) with the argmax over classes as its output, one per model
    (its compiled forward is traced once); None for a model that is not a graph of layers (a
    subclassed model), which then argmaxes in numpy."""
    if not hasattr(model, "inputs"):  # not a graph of Keras layers (an exported model, a subclassed one)
        return None
    if model not in _LABEL_MODELS:
        import keras

        try:
            argmax = keras.Model(model.inputs, keras.ops.argmax(model.outputs[0], axis=-1))
            argmax.jit_compile = model.jit_compile
        except (AttributeError, ValueError, TypeError):
            argmax = None
        _LABEL_MODELS[model] = argmax
    return _LABEL_MODELS[model]


def _checked(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image {image.shape}")
    return image


class _Sink:
    """Collects one photo's result band by band: full logits, or argmax class indices."""

    def __init__(self, hw: tuple[int, int], channels: int, output: str):
        self.output = output
        if output == "logits":
            self.out = np.empty((*hw, channels), np.float32)
        else:
            self.out = np.empty(hw, np.uint8 if channels <= 256 else np.uint16)

    def put(self, y0: int, band: np.ndarray) -> None:
        """``band``: (rows, W, C) logits, or (rows, W) class indices already (see _Runner.forward)."""
        if self.output == "logits" or band.ndim == 2:
            self.out[y0 : y0 + band.shape[0]] = band
        else:
            self.out[y0 : y0 + band.shape[0]] = np.argmax(band, axis=-1)


class _Runner:
    def __init__(self, model, mode, size, batch_size, output, tile, overlap, budget, flip=False, scales=(1.0,)):
        self.model = model
        self.flip = bool(flip)
        self.scales = tuple(scales)
        self.tta = self.flip or self.scales != (1.0,)
        self.mode = mode
        self.size = size
        self.batch_size = batch_size
        self.output = output
        self.budget = budget
        self.tile = max(MULTIPLE, int(tile) // MULTIPLE * MULTIPLE)
        overlap = -(-max(0, int(overlap)) // MULTIPLE) * MULTIPLE
        self.overlap = min(overlap, self.tile - MULTIPLE)
        shape = getattr(model, "output_shape", None)  # a subclassed model has none until it runs
        self.channels = int(shape[-1]) if isinstance(shape, tuple) and shape and shape[-1] else None

    # one forward pass ---------------------------------------------------------------------
    def forward(self, batch: np.ndarray, labels: bool = False) -> np.ndarray:
        """(B, H, W, 3) -> (B, H, W, C) float32 logits, or with ``labels`` (B, H, W) class indices,
        for any H, W (padded to 32 and cropped back); averaged over the TTA views when there are any."""
        argmax = labels_model(self.model) if labels and not self.tta else None
        if argmax is not None:
            # The argmax inside the compiled forward: 12x less to copy out, no numpy pass (3% at 224x224).
            return _run(batch, argmax)
        logits = self._views(batch) if self.tta else _run(batch, self.model).astype(np.float32, copy=False)
        self.channels = self.channels or logits.shape[-1]
        return np.argmax(logits, axis=-1) if labels else logits

    def _views(self, batch: np.ndarray) -> np.ndarray:
        """Mean logits of the batch at every scale (and mirrored), at the batch's own size."""
        hw = batch.shape[1:3]
        total = None
        for scale in self.scales:
            size = scaled_size(hw, scale)
            # The same numpy bilinear as the resize mode's images (tf.image.resize's rule, no TensorFlow).
            x = batch if size == hw else np.stack([resize_logits(im, size) for im in batch])
            logits = _run(x, self.model).astype(np.float32, copy=False)
            if self.flip:
                # Mirror in, mirror back: road scenes are left-right symmetric, so the two views agree in kind.
                logits = logits + _run(x[:, :, ::-1], self.model)[:, :, ::-1]
            if size != hw:  # resizing is linear: the mirror pair's sum comes back in one resize
                logits = np.stack([resize_logits(lg, hw) for lg in logits])
            total = logits if total is None else total + logits
        return total / (len(self.scales) * (2 if self.flip else 1))

    def _pass_pixels(self, hw: tuple[int, int]) -> int:
        """Pixels of one image's largest forward pass: its largest test-time scale, when there is one."""
        return max(int(np.prod(scaled_size(hw, s))) for s in self.scales)

    def _per_pass(self, hw: tuple[int, int]) -> int:
        return max(1, min(self.batch_size, self.budget // max(1, self._pass_pixels(hw))))

    # a window of photos -------------------------------------------------------------------
    def run_window(self, window: list[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray]]:
        results: dict[int, np.ndarray] = {}
        if self.mode == "resize":
            self._resized(list(range(len(window))), window, results)
        else:
            groups: dict[tuple[int, int], list[int]] = {}
            for i, (_, image) in enumerate(window):
                h, w = image.shape[:2]
                if self._pass_pixels((h, w)) > self.budget:  # a large test-time scale can tip a photo into tiles
                    results[i] = self._tiled(image)
                else:
                    groups.setdefault((h, w), []).append(i)
            for (h, w), members in groups.items():
                step = self._per_pass((-(-h // MULTIPLE) * MULTIPLE, -(-w // MULTIPLE) * MULTIPLE))
                for start in range(0, len(members), step):
                    chunk = members[start : start + step]
                    outs = self.forward(np.stack([window[i][1] for i in chunk]), labels=self.output == "labels")
                    for i, out in zip(chunk, outs):
                        sink = _Sink((h, w), self.channels, self.output)
                        sink.put(0, out)
                        results[i] = sink.out
        for i, (key, _) in enumerate(window):
            yield key, results.pop(i)

    def _resized(self, members: list[int], window, results: dict) -> None:
        h, w = self.size
        step = self._per_pass((h, w))
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            # A photo already at the inference size skips both resizes (they would be identities).
            at_size = [window[i][1].shape[:2] == (h, w) for i in chunk]
            batch = np.stack([
                window[i][1].astype(np.float32) if same
                else resize_logits(window[i][1], (h, w))  # tf.image.resize's bilinear, in numpy (no TensorFlow)
                for i, same in zip(chunk, at_size)
            ])
            # Class indices straight from the network when no photo needs its logits resized back.
            outs = self.forward(batch, labels=self.output == "labels" and all(at_size))
            for i, same, lg in zip(chunk, at_size, outs):
                native = window[i][1].shape[:2]
                sink = _Sink(native, self.channels, self.output)
                if same:
                    sink.put(0, lg)
                    results[i] = sink.out
                    continue
                up = _Upsampler(lg, native)
                rows = _band_rows(native[1], lg.shape[-1])
                for y0 in range(0, native[0], rows):
                    sink.put(y0, up.band(y0, min(native[0], y0 + rows)))
                results[i] = sink.out

    # one big photo in tiles ---------------------------------------------------------------
    def _tiled(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        padded = pad_to_multiple(image[None], MULTIPLE)[0][0]
        hp, wp = padded.shape[:2]
        th, tw = min(self.tile, hp), min(self.tile, wp)
        ys = _starts(hp, th, self.tile - self.overlap)
        xs = _starts(wp, tw, self.tile - self.overlap)
        # How many tiles cover each row / column: the averaging weights, known up front.
        cover_y = _coverage(hp, ys, th)
        cover_x = _coverage(wp, xs, tw)
        step = self._per_pass((th, tw))
        sink: _Sink | None = None
        carry: np.ndarray | None = None  # accumulated rows [ys[r], previous band's end)
        for r, y0 in enumerate(ys):
            acc = None
            for start in range(0, len(xs), step):
                cols = xs[start : start + step]
                out = self.forward(np.stack([padded[y0 : y0 + th, x0 : x0 + tw] for x0 in cols]))
                if acc is None:
                    acc = np.zeros((th, wp, out.shape[-1]), np.float32)
                    if carry is not None:
                        acc[: carry.shape[0]] += carry
                    if sink is None:
                        sink = _Sink((h, w), out.shape[-1], self.output)
                for x0, lg in zip(cols, out):
                    acc[:, x0 : x0 + tw] += lg
            final = (ys[r + 1] if r + 1 < len(ys) else y0 + th) - y0
            rows_out = min(final, h - y0)
            if rows_out > 0:
                band_rows = _band_rows(w, acc.shape[-1])
                for b0 in range(0, rows_out, band_rows):
                    b1 = min(rows_out, b0 + band_rows)
                    weight = cover_y[y0 + b0 : y0 + b1, None, None] * cover_x[None, :w, None]
                    sink.put(y0 + b0, acc[b0:b1, :w] / weight)
            carry = acc[final:].copy() if final < th else None
        return sink.out


def _run(images: np.ndarray, model) -> np.ndarray:
    """One forward pass of (B, H, W, 3) images of any H, W (padded to a multiple of 32, cropped back)."""
    padded, hw = pad_to_multiple(images, MULTIPLE)
    # predict_on_batch runs a compiled forward (tf.function / jax.jit, shapes relaxed after a
    # retrace): graph-level fusions and no per-layer Python, 15% faster than eager here.
    return crop_to(np.asarray(model.predict_on_batch(np.asarray(padded, np.float32))), hw)


def _starts(total: int, size: int, stride: int) -> list[int]:
    """Tile origins covering [0, total): every ``stride``, the last one flush with the end."""
    stride = max(1, stride)
    last = total - size
    starts = list(range(0, last, stride))
    starts.append(last)
    return starts


def _coverage(total: int, starts: list[int], size: int) -> np.ndarray:
    cover = np.zeros(total, np.float32)
    for s in starts:
        cover[s : s + size] += 1.0
    return cover


__all__ = [
    "MODES",
    "MAX_SCALE",
    "TILE",
    "OVERLAP",
    "TILE_BUDGET",
    "load_for_inference",
    "meta_image_size",
    "effective_mode",
    "tta_scales",
    "scaled_size",
    "logits_for",
    "labels_for",
    "predict_batch",
    "iter_predictions",
    "prefetch",
    "resize_logits",
]
