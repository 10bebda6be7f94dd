"""tf.data input pipelines: decoded pairs -> (images, labels, sample weights) batches.

The only module that knows tf.data. Callers import it lazily (it imports TensorFlow).

Batches are ``(images float32 (B, H, W, 3) RGB in 0..255, labels int32 (B, H, W),
sample_weight float32 (B, H, W))``. The model subtracts its own mean, so images stay in 0..255.
A weight is 0 at ignored (void) pixels and at padding added by scale augmentation, else 1 or
``class_weights[label]``; labels of those pixels keep whatever value they have.

Caching: by default every pair is decoded once (``load_arrays``, in a thread pool) and kept in
memory as uint8 arrays -- CamVid is about 250 MB decoded -- so epochs cost only resizing and
augmentation. When the decoded set would exceed ``cache_budget`` (default 40% of RAM) the
training and validation sets *stream* instead: each element is decoded inside the tf.data map.
Both modes feed the same per-element graph, so for the same seed they give identical batches.

Determinism: the shuffle is seeded and reshuffles every epoch; per-element augmentation uses
stateless random ops keyed by (a per-epoch random salt from a seeded ``Dataset.random``, element
index). Two fresh pipelines with the same seed therefore give the same batches, epoch after epoch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from fcn_cli import images
from fcn_cli.classes import ClassTable
from fcn_cli.datasets import Pair
from fcn_cli.errors import FcnError

Arrays = tuple[list[np.ndarray], list[np.ndarray]]

# Padding added by scale augmentation is filled with the ImageNet mean the model subtracts, so it
# looks like zeros to the network instead of a black frame; its weight is 0 either way.
PAD_COLOR = (123.68, 116.779, 103.939)
# How many failing files one error message names before summarising the rest.
MAX_LISTED_ERRORS = 10
# Share of physical RAM the decoded (uint8) data set may use before the pipeline streams instead.
CACHE_SHARE_OF_RAM = 0.4
# Marks an FcnError raised inside tf.numpy_function, so streaming_error() can recover it.
_STREAM_ERROR_TAG = "FcnError: "


@dataclass(frozen=True)
class Augment:
    """Training augmentation recipe.

    flip: random horizontal flip (image and label together).
    scale: (low, high) -- resize to image_size * s, s ~ U(low, high), then pad / random-crop
        back to image_size. (1.0, 1.0) means a plain resize.
    jitter: strength j of colour jitter on the image only: brightness, contrast and saturation
        each scaled by a factor ~ U(1 - j, 1 + j). 0 turns it off.
    class_uniform: share p of crops placed around a random pixel of a class drawn uniformly from the
        classes in the photo (void excluded), so a class that covers 1% of the pixels is in the crop as
        often as the road ("class-uniform sampling", Zhu et al., CVPR 2019); the other crops are placed
        uniformly. Acts only where scaling made the photo larger than image_size, so it needs a scale
        above 1. 0 turns it off.
    """

    flip: bool = True
    scale: tuple[float, float] = (1.0, 1.0)
    jitter: float = 0.0
    class_uniform: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high:
            raise FcnError(f"augmentation scale {self.scale}: need 0 < low <= high, e.g. (0.5, 2.0)")
        if not 0 <= self.jitter < 1:
            raise FcnError(f"augmentation jitter {self.jitter}: need a strength in [0, 1), e.g. 0.2")
        if not 0 <= self.class_uniform <= 1:
            raise FcnError(f"class-uniform share {self.class_uniform}: need a share in [0, 1], e.g. 0.5")
        # The share places crops; a photo never zoomed above image_size has no crop to place.
        if self.class_uniform > 0 and high <= 1:
            raise FcnError(f"class-uniform share {self.class_uniform:g} acts on crops only, and scale {low:g},{high:g} "
                           "never makes a photo larger than the input: give a scale with high above 1 "
                           "(--scale 1.5,2.0) or a share of 0")

    @classmethod
    def none(cls) -> "Augment":
        """The plain recipe: resize only."""
        return cls(flip=False, scale=(1.0, 1.0), jitter=0.0)


# ----------------------------------------------------------------------------- decoding


def _decode_pair(pair: Pair, classes: ClassTable) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) of one pair; FcnError naming the file when it cannot be read or sizes differ."""
    image = images.read_image(pair.image)
    label = images.read_mask(pair.mask, classes)
    if image.shape[:2] != label.shape:
        (ih, iw), (mh, mw) = image.shape[:2], label.shape
        raise FcnError(
            f"{pair.mask}: annotation is {mw}x{mh} but its photo {pair.image} is {iw}x{ih}; "
            "an annotation must have its photo's size"
        )
    return image, label


def _default_workers() -> int:
    # The cores this process may use (cgroup/affinity aware), not the host's.
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, 2 * cores))


def _raise_collected(errors: list[str], total: int, what: str) -> None:
    """One FcnError listing every failure (the first MAX_LISTED_ERRORS, then a count)."""
    if not errors:
        return
    if len(errors) == 1:  # the common case stays one line: the file, the problem, the fix
        raise FcnError(f"{errors[0]} (1 of {total} pairs {what}; fix or remove it before training)")
    listed = errors[:MAX_LISTED_ERRORS]
    more = len(errors) - len(listed)
    lines = [f"{len(errors)} of {total} pairs {what}; fix or remove these files before training:"]
    lines += [f"  - {e}" for e in listed]
    if more:
        lines.append(f"  ... and {more} more")
    raise FcnError("\n".join(lines))


def load_arrays(
    pairs: Sequence[Pair],
    classes: ClassTable,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Arrays:
    """Decode every pair in a thread pool (Pillow releases the GIL while decoding).

    Returns (images, labels) as lists of (H, W, 3) and (H, W) uint8 arrays in the order of
    ``pairs``. Every failure is collected first, so one FcnError names all bad files at once
    instead of stopping at the first. ``progress(n)`` is called after each decoded pair.
    """
    pairs = list(pairs)

    def decode(pair: Pair):
        try:
            return _decode_pair(pair, classes)
        except FcnError as exc:
            return str(exc)
        finally:
            if progress is not None:
                progress(1)

    with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
        results = list(pool.map(decode, pairs))
    _raise_collected([r for r in results if isinstance(r, str)], len(pairs), "cannot be read")
    return [r[0] for r in results], [r[1] for r in results]


def evaluation_items(
    pairs: Sequence[Pair], classes: ClassTable, arrays: Arrays | None = None
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, native uint8 image, native uint8 label) one pair at a time, decoding lazily
    when ``arrays`` is None, so evaluation can score each annotation at its own resolution."""
    for i, pair in enumerate(pairs):
        if arrays is not None:
            yield pair.name, arrays[0][i], arrays[1][i]
        else:
            image, label = _decode_pair(pair, classes)
            yield pair.name, image, label


# ----------------------------------------------------------------------------- cache or stream


def estimate_decoded_bytes(pairs: Sequence[Pair]) -> int:
    """Bytes the decoded set takes in memory (3 bytes/pixel image + 1 byte/pixel label),
    from image headers only (no pixel decoding)."""
    total = 0
    for pair in pairs:
        h, w = images.image_size(pair.image)
        total += 4 * h * w
    return total


def default_cache_budget() -> int:
    """CACHE_SHARE_OF_RAM of physical memory, in bytes."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        import psutil

        ram = psutil.virtual_memory().total
    return int(CACHE_SHARE_OF_RAM * ram)


def _check_headers(pairs: Sequence[Pair]) -> None:
    """Cheap up-front check for streaming mode: every header opens and sizes agree.

    A rotated (EXIF) photo may legitimately have its annotation's size swapped, so a swap passes
    here; decoding checks the upright size. Corrupt pixel data is only found when decoded.
    """
    errors = []
    for pair in pairs:
        try:
            ih, iw = images.image_size(pair.image)
            mh, mw = images.image_size(pair.mask)
        except FcnError as exc:
            errors.append(str(exc))
            continue
        if (mh, mw) not in ((ih, iw), (iw, ih)):
            errors.append(
                f"{pair.mask}: annotation is {mw}x{mh} but its photo {pair.image} is {iw}x{ih}; "
                "an annotation must have its photo's size"
            )
    _raise_collected(errors, len(pairs), "cannot be used")


def _source(pairs: Sequence[Pair], classes: ClassTable, arrays: Arrays | None, cache_budget: int | None):
    """A function index -> (image, label) uint8 arrays: a lookup in decoded arrays, or a decode
    when the set is too big for the cache budget (streaming)."""
    if arrays is None:
        budget = default_cache_budget() if cache_budget is None else cache_budget
        if estimate_decoded_bytes(pairs) > budget:
            _check_headers(pairs)
            pairs = list(pairs)

            def decode(i):
                try:
                    return _decode_pair(pairs[int(i)], classes)
                except FcnError as exc:
                    # tf.numpy_function re-raises this as a tf.errors.OpError whose message
                    # contains ours (file name and fix); streaming_error() recovers it.
                    raise ValueError(f"{_STREAM_ERROR_TAG}{exc}") from None

            return decode
        arrays = load_arrays(pairs, classes)
    if len(arrays[0]) != len(pairs) or len(arrays[1]) != len(pairs):
        raise ValueError(f"arrays hold {len(arrays[0])} images / {len(arrays[1])} labels for {len(pairs)} pairs")
    image_list, label_list = arrays
    return lambda i: (image_list[int(i)], label_list[int(i)])


def streaming_error(exc: BaseException) -> FcnError | None:
    """The FcnError behind a tf.errors.OpError raised while iterating a streaming dataset
    (a file that became unreadable after the up-front header check), else None.

    Training code catches tf.errors.OpError around fit and re-raises this, so the user sees
    the file name and fix in one line instead of a TensorFlow traceback.
    """
    text = getattr(exc, "message", None) or str(exc)
    start = text.find(_STREAM_ERROR_TAG)
    if start < 0:
        return None
    return FcnError(text[start + len(_STREAM_ERROR_TAG) :].splitlines()[0].strip())


def _fetch(source, index):
    """Graph-side call of ``source``: (image (h, w, 3) uint8, label (h, w) uint8) of any size."""
    image, label = tf.numpy_function(source, [index], (tf.uint8, tf.uint8), stateful=False)
    image.set_shape([None, None, 3])
    label.set_shape([None, None])
    return image, label


# ----------------------------------------------------------------------------- per-element graph


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(v) for v in image_size)
    if len(size) != 2 or any(v <= 0 or v % 32 for v in size):
        raise FcnError(
            f"image size {tuple(image_size)}: height and width must be positive multiples of 32 "
            "(FCN-8s downsamples by 32), e.g. 224x224 or 352x480"
        )
    return size


def _weight_table(classes: ClassTable, class_weights: Sequence[float] | None) -> tf.Tensor | None:
    if class_weights is None:
        return None
    weights = np.asarray(class_weights, dtype=np.float32).reshape(-1)
    if weights.size != classes.num_classes or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise FcnError(
            f"class weights: need {classes.num_classes} finite non-negative numbers (one per class), "
            f"got {weights.size}"
        )
    return tf.constant(weights)


def _sample_weight(label, valid, classes: ClassTable, ignore_void: bool, weight_table):
    """valid * class weight, and 0 at the ignored class (labels there keep their value)."""
    weight = valid
    if weight_table is not None:
        weight = weight * tf.gather(weight_table, label)
    if ignore_void and classes.ignore_index is not None:
        weight = weight * tf.cast(label != classes.ignore_index, tf.float32)
    return weight


def _resize(image, label, size):
    """Bilinear image (float32 0..255), nearest label (int32)."""
    image = tf.image.resize(image, size, method="bilinear")
    label = tf.image.resize(label[..., None], size, method="nearest")[..., 0]
    return image, tf.cast(label, tf.int32)


def _class_uniform_pixel(label, classes: ClassTable, seed):
    """(y, x) of a random pixel of a class drawn uniformly from the classes in ``label`` (the ignored one
    excluded), and whether there was such a class."""
    class_seed, pixel_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    n = classes.num_classes
    present = tf.math.bincount(tf.reshape(label, [-1]), minlength=n, maxlength=n) > 0
    if classes.ignore_index is not None:
        present &= tf.range(n) != classes.ignore_index
    chosen = tf.random.stateless_categorical(tf.where(present, 0.0, -1e9)[None], 1, class_seed, tf.int32)[0, 0]
    pixels = tf.cast(tf.where(tf.equal(label, chosen)), tf.int32)
    count = tf.shape(pixels)[0]
    pick = tf.random.stateless_uniform([], pixel_seed, 0, tf.maximum(count, 1), dtype=tf.int32)
    return tf.gather(tf.concat([pixels, tf.zeros([1, 2], tf.int32)], 0), pick), tf.reduce_any(present)


def _pad_or_crop(image, label, valid, size, seed, anchor=None):
    """Random placement of a scaled element on an image_size canvas: a random crop where it is
    larger, a random offset in mean-coloured padding (valid = 0) where it is smaller. ``anchor``:
    ((y, x), use); where ``use``, the crop keeps pixel (y, x) inside, at a uniformly random place in it."""
    target = tf.constant(size, tf.int32)
    have = tf.shape(image)[:2]
    slack = tf.abs(have - target)
    u = tf.random.stateless_uniform([2], seed)
    low, high = tf.zeros([2], tf.int32), slack
    if anchor is not None:  # crop offsets that keep the pixel inside: [y - size + 1, y] within [0, slack]
        pixel, use = anchor
        cropped = use & (have > target)
        low = tf.where(cropped, tf.maximum(pixel - target + 1, 0), low)
        high = tf.where(cropped, tf.minimum(pixel, slack), high)
    offset = low + tf.cast(u * tf.cast(high - low + 1, tf.float32), tf.int32)
    offset = tf.minimum(offset, high)  # guard against u * (n + 1) rounding up to n + 1
    pad_before = tf.where(have < target, offset, 0)
    pad_after = tf.maximum(target - have, 0) - pad_before
    crop_at = tf.where(have > target, offset, 0)

    # One stacked tensor so image, label and validity move together.
    stack = tf.concat([image, tf.cast(label, tf.float32)[..., None], valid[..., None]], axis=-1)
    paddings = tf.stack([tf.stack([pad_before[0], pad_after[0]]), tf.stack([pad_before[1], pad_after[1]]), [0, 0]])
    stack = tf.pad(stack, paddings)
    stack = stack[crop_at[0] : crop_at[0] + size[0], crop_at[1] : crop_at[1] + size[1]]
    stack.set_shape([size[0], size[1], 5])
    image, label, valid = stack[..., :3], tf.cast(stack[..., 3], tf.int32), stack[..., 4]
    image = tf.where(valid[..., None] > 0, image, tf.constant(PAD_COLOR, tf.float32))
    return image, label, valid


def _color_jitter(image, strength: float, seed):
    """Brightness, contrast and saturation factors ~ U(1 - s, 1 + s), in that order, on 0..255."""
    brightness, contrast, saturation = tf.unstack(
        tf.random.stateless_uniform([3], seed, 1.0 - strength, 1.0 + strength)
    )
    image = image * brightness
    gray = tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
    image = tf.reduce_mean(gray) + contrast * (image - tf.reduce_mean(gray))
    gray = tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
    image = gray + saturation * (image - gray)
    return tf.clip_by_value(image, 0.0, 255.0)


def _augmented(image, label, size, augment: Augment, seed, classes: ClassTable):
    """Scale, pad/crop (class-uniform where asked, over ``classes``), flip (image, label and validity
    together), then colour jitter (image only)."""
    scale_seed, place_seed, flip_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    s = tf.random.stateless_uniform([], scale_seed, augment.scale[0], augment.scale[1])
    scaled = tf.maximum(tf.cast(tf.round(tf.constant(size, tf.float32) * s), tf.int32), 1)
    image, label = _resize(image, label, scaled)
    valid = tf.ones(tf.shape(label), tf.float32)
    anchor = None
    if augment.class_uniform > 0:
        # Its own seeds, split off the placement's, so the other draws stay as they were without it.
        use_seed, pixel_seed = tf.unstack(tf.random.experimental.stateless_split(place_seed, 2))
        pixel, found = _class_uniform_pixel(label, classes, pixel_seed)
        anchor = pixel, found & (tf.random.stateless_uniform([], use_seed) < augment.class_uniform)
    image, label, valid = _pad_or_crop(image, label, valid, size, place_seed, anchor)
    if augment.flip:
        flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        image, label, valid = tf.cond(
            flip,
            lambda: (image[:, ::-1], label[:, ::-1], valid[:, ::-1]),
            lambda: (image, label, valid),
        )
    if augment.jitter > 0:
        image = _color_jitter(image, augment.jitter, jitter_seed)
    return image, label, valid


# ----------------------------------------------------------------------------- datasets


def _training_element(image, label, seed, size, augment, classes, ignore_void, weight_table):
    """Augmented (image, label, sample_weight): the training recipe for one element."""
    image, label, valid = _augmented(image, label, size, augment, seed, classes)
    return image, label, _sample_weight(label, valid, classes, ignore_void, weight_table)


def _validation_element(image, label, size, classes, ignore_void):
    """Plain-resized (image, label, sample_weight): weight 1 except at the ignored class."""
    image, label = _resize(image, label, size)
    return image, label, _sample_weight(label, tf.ones(size, tf.float32), classes, ignore_void, None)


def _batched(dataset, batch_size: int, drop_remainder: bool = False):
    return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def _read_in_passes(dataset):
    """``dataset`` without tf.data's autotuning, for data read one finite pass at a time.

    The autotuner's thread sleeps between optimizations, the period doubling from 10 ms up to 60 s,
    and dropping an iterator waits for it to wake: after every validation pass inside `fit`, 4.6 s
    with nothing running (full FCN-8s; bench/NOTES.md). Without it, AUTOTUNE parallelism is one call
    per core.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


@dataclass(frozen=True)
class Records:
    """TFRecord shard files (fcn data pack) as a training source: streamed, records interleaved from several
    shards in parallel and shuffled in a seeded buffer. The root is the list of files, so tf.distribute can
    give each worker its own shards."""

    files: Sequence[str]
    shuffle_buffer: int = 512


def training_dataset(
    pairs: Sequence[Pair] | Records,
    classes: ClassTable,
    *,
    image_size: Sequence[int] = (224, 224),
    batch_size: int = 8,
    augment: Augment = Augment(),
    seed: int = 0,
    ignore_void: bool = True,
    class_weights: Sequence[float] | None = None,
    shuffle: bool = True,
    arrays: Arrays | None = None,
    cache_budget: int | None = None,
) -> tf.data.Dataset:
    """Shuffled, augmented (images, labels, sample_weight) batches; see the module docstring.

    ``pairs``: image/mask pairs, or :class:`Records` to stream from shards. ``arrays``: already decoded
    (images, labels) for ``pairs`` (from load_arrays), so a caller decodes once for several datasets.
    Otherwise pairs are decoded here, or streamed when estimate_decoded_bytes(pairs) > cache_budget
    (bytes; default 40% of RAM; 0 always streams).

    The last partial batch is dropped when there is at least one full batch (always, from shards), so every
    training step sees batch_size elements (a static batch dimension); a set of pairs smaller than one
    batch still yields that one short batch rather than nothing.
    """
    size = _check_image_size(image_size)
    if batch_size < 1:
        raise FcnError(f"batch size {batch_size}: must be at least 1")
    if isinstance(pairs, Records):
        from fcn_cli.shards import records

        keys = records(list(pairs.files)).shuffle(pairs.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

        def fetch(record):
            image, label, _, _, number = record
            return image, label, number

        drop_remainder = True
    else:
        if not pairs:
            raise FcnError("training set is empty; check the data folder and split")
        source = _source(pairs, classes, arrays, cache_budget)
        keys = tf.data.Dataset.range(len(pairs))
        if shuffle:
            keys = keys.shuffle(len(pairs), seed=seed, reshuffle_each_iteration=True)

        def fetch(index):
            return (*_fetch(source, index), index)

        drop_remainder = len(pairs) >= batch_size
    weight_table = _weight_table(classes, class_weights)

    def element(key, salt):
        image, label, number = fetch(key)
        return _training_element(image, label, tf.stack([salt, number]), size, augment, classes, ignore_void,
                                 weight_table)

    # A fresh deterministic salt per element and epoch: same seed -> same augmentation sequence.
    salts = tf.data.Dataset.random(seed=seed + 104_729, rerandomize_each_iteration=True)
    elements = tf.data.Dataset.zip(keys, salts).map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _batched(elements, batch_size, drop_remainder=drop_remainder)


def validation_dataset(
    pairs: Sequence[Pair],
    classes: ClassTable,
    *,
    image_size: Sequence[int],
    batch_size: int = 8,
    ignore_void: bool = True,
    arrays: Arrays | None = None,
    cache_budget: int | None = None,
) -> tf.data.Dataset:
    """(images, labels, sample_weight) batches in file order: plain resize, no augmentation,
    the remainder batch kept."""
    size = _check_image_size(image_size)
    if batch_size < 1:
        raise FcnError(f"batch size {batch_size}: must be at least 1")
    if not pairs:
        raise FcnError("validation set is empty; check the data folder and split")
    source = _source(pairs, classes, arrays, cache_budget)

    def element(index):
        return _validation_element(*_fetch(source, index), size, classes, ignore_void)

    elements = tf.data.Dataset.range(len(pairs)).map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _read_in_passes(_batched(elements, batch_size))


def records_validation_dataset(
    files: Sequence[str], classes: ClassTable, *, image_size: Sequence[int], batch_size: int = 8, ignore_void: bool = True
) -> tf.data.Dataset:
    """validation_dataset's batches from TFRecord shards, in shard order."""
    from fcn_cli.shards import records

    size = _check_image_size(image_size)

    def element(image, label, *_):
        return _validation_element(image, label, size, classes, ignore_void)

    return _read_in_passes(_batched(records(list(files)).map(element, num_parallel_calls=tf.data.AUTOTUNE), batch_size))


def pipeline_throughput(
    pairs: Sequence[Pair],
    classes: ClassTable,
    image_size: Sequence[int] = (224, 224),
    batch_size: int = 8,
    passes: int = 2,
    augment: Augment = Augment(scale=(0.75, 1.25), jitter=0.2),
) -> list[float]:
    """Images per second of training_dataset, one figure per pass over ``pairs``.

    The first pass includes decoding every pair (building the in-memory cache); later passes
    read the cache. Nothing else runs, so this is the pipeline's ceiling, not training speed.
    """
    started = time.perf_counter()
    dataset = training_dataset(pairs, classes, image_size=image_size, batch_size=batch_size, augment=augment)
    rates = []
    for _ in range(passes):
        count = 0
        for images_batch, _, _ in dataset:
            count += int(images_batch.shape[0])
        now = time.perf_counter()
        rates.append(count / (now - started))
        started = now
    return rates
