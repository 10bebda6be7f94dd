"""tf.data pipeline: shapes, dtypes, weights, augmentation consistency, determinism, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from fcn_cli import pipeline  # noqa: E402
from fcn_cli.classes import CAMVID  # noqa: E402
from fcn_cli.datasets import Pair  # noqa: E402
from fcn_cli.errors import FcnError  # noqa: E402
from fcn_cli.pipeline import Augment  # noqa: E402

VOID = CAMVID.ignore_index


def _camvid_root() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "camvid"


def _camvid_pairs(split: str = "train", count: int | None = None) -> list[Pair]:
    root = _camvid_root()
    if not (root / split).is_dir():
        pytest.skip(f"real CamVid not found at {root}")
    photos = sorted((root / split).glob("*.png"))[:count]
    return [Pair(p, root / f"{split}annot" / p.name, p.name) for p in photos]


@pytest.fixture(scope="module")
def camvid6() -> list[Pair]:
    return _camvid_pairs("train", 6)


@pytest.fixture(scope="module")
def camvid6_arrays(camvid6):
    return pipeline.load_arrays(camvid6, CAMVID)


def _batches(dataset) -> list[tuple[np.ndarray, ...]]:
    return [tuple(t.numpy() for t in batch) for batch in dataset]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y)) for x, y in zip(a, b)
    )


# ----------------------------------------------------------------------------- synthetic data


def _write_halves(folder: Path, name: str, size=(96, 128), split=0.4) -> Pair:
    """A photo whose left part is red and right part blue; its mask (0 left, 1 right) follows
    the photo, so any augmentation applied to one and not the other shows up."""
    h, w = size
    cut = int(w * split)
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :cut] = (230, 20, 20)
    image[:, cut:] = (20, 20, 230)
    mask = np.zeros((h, w), np.uint8)
    mask[:, cut:] = 1
    (folder / "img").mkdir(exist_ok=True)
    (folder / "ann").mkdir(exist_ok=True)
    Image.fromarray(image).save(folder / "img" / name)
    Image.fromarray(mask, mode="L").save(folder / "ann" / name)
    return Pair(folder / "img" / name, folder / "ann" / name, name)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- real CamVid


def test_training_batches_shapes_dtypes_and_void_weights(camvid6, camvid6_arrays):
    ds = pipeline.training_dataset(
        camvid6, CAMVID, image_size=(224, 224), batch_size=4, augment=Augment(scale=(1.0, 1.5), jitter=0.3),
        arrays=camvid6_arrays,
    )
    batches = _batches(ds)
    assert len(batches) == 1  # 6 pairs, batch 4: the remainder is dropped in training
    images, labels, weights = batches[0]
    assert images.shape == (4, 224, 224, 3) and images.dtype == np.float32
    assert labels.shape == (4, 224, 224) and labels.dtype == np.int32
    assert weights.shape == (4, 224, 224) and weights.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 255.0
    assert 0 <= labels.min() and labels.max() <= VOID
    assert set(np.unique(weights)) <= {0.0, 1.0}
    # scale >= 1 never pads, so the weight is 0 exactly at void pixels.
    assert (labels == VOID).any()
    np.testing.assert_array_equal(weights, (labels != VOID).astype(np.float32))


def test_validation_is_plain_resize_in_file_order_and_keeps_remainder(camvid6, camvid6_arrays):
    val = _batches(pipeline.validation_dataset(camvid6, CAMVID, image_size=(224, 224), batch_size=4, arrays=camvid6_arrays))
    assert [b[0].shape[0] for b in val] == [4, 2]
    plain = _batches(
        pipeline.training_dataset(
            camvid6, CAMVID, image_size=(224, 224), batch_size=4, augment=Augment.none(), shuffle=False,
            arrays=camvid6_arrays,
        )
    )
    assert _same(val[:1], plain)
    np.testing.assert_array_equal(val[1][2], (val[1][1] != VOID).astype(np.float32))
    # Read a pass at a time: no autotuner, whose sleeping thread every dropped iterator waits for.
    val_ds = pipeline.validation_dataset(camvid6, CAMVID, image_size=(224, 224), batch_size=4, arrays=camvid6_arrays)
    assert val_ds.options().autotune.enabled is False


def test_class_weights_apply_and_void_stays_zero(camvid6, camvid6_arrays):
    table = np.arange(1, 13, dtype=np.float32)
    kwargs = dict(image_size=(96, 128), batch_size=6, augment=Augment.none(), arrays=camvid6_arrays, class_weights=table)
    _, labels, weights = _batches(pipeline.training_dataset(camvid6, CAMVID, **kwargs))[0]
    np.testing.assert_array_equal(weights, np.where(labels == VOID, 0.0, table[labels]))
    _, labels, weights = _batches(pipeline.training_dataset(camvid6, CAMVID, ignore_void=False, **kwargs))[0]
    np.testing.assert_array_equal(weights, table[labels])
    with pytest.raises(FcnError, match="12"):
        pipeline.training_dataset(camvid6, CAMVID, class_weights=[1.0, 2.0], arrays=camvid6_arrays)


def test_same_seed_same_batches_every_epoch_other_seed_differs(camvid6, camvid6_arrays):
    def make(seed):
        return pipeline.training_dataset(
            camvid6, CAMVID, image_size=(64, 96), batch_size=2, seed=seed,
            augment=Augment(scale=(0.5, 1.5), jitter=0.2), arrays=camvid6_arrays,
        )

    first, second = make(7), make(7)
    epochs_a = [_batches(first), _batches(first)]
    epochs_b = [_batches(second), _batches(second)]
    assert _same(epochs_a[0], epochs_b[0]) and _same(epochs_a[1], epochs_b[1])
    assert not _same(epochs_a[0], epochs_a[1])  # reshuffled / re-augmented each epoch
    assert not _same(epochs_a[0], _batches(make(8)))


def test_streaming_matches_in_memory(camvid6, camvid6_arrays):
    kwargs = dict(image_size=(64, 96), batch_size=3, seed=3, augment=Augment(scale=(0.5, 1.5), jitter=0.2))
    cached = _batches(pipeline.training_dataset(camvid6, CAMVID, arrays=camvid6_arrays, **kwargs))
    streamed = _batches(pipeline.training_dataset(camvid6, CAMVID, cache_budget=0, **kwargs))
    assert _same(cached, streamed)
    val = dict(image_size=(64, 96), batch_size=4)
    assert _same(
        _batches(pipeline.validation_dataset(camvid6, CAMVID, arrays=camvid6_arrays, **val)),
        _batches(pipeline.validation_dataset(camvid6, CAMVID, cache_budget=0, **val)),
    )


def test_evaluation_items_native_resolution(camvid6, camvid6_arrays):
    lazy = list(pipeline.evaluation_items(camvid6[:2], CAMVID))
    cached = list(pipeline.evaluation_items(camvid6[:2], CAMVID, arrays=camvid6_arrays))
    for (name, image, label), (name2, image2, label2), pair in zip(lazy, cached, camvid6):
        assert name == name2 == pair.name
        assert image.shape == (360, 480, 3) and image.dtype == np.uint8
        assert label.shape == (360, 480) and label.dtype == np.uint8
        np.testing.assert_array_equal(image, image2)
        np.testing.assert_array_equal(label, label2)


def test_estimate_decoded_bytes(camvid6):
    assert pipeline.estimate_decoded_bytes(camvid6) == 6 * 360 * 480 * 4
    assert pipeline.default_cache_budget() > 0


def test_pipeline_throughput_over_camvid_train():
    pairs = _camvid_pairs("train")
    rates = pipeline.pipeline_throughput(pairs, CAMVID, image_size=(224, 224), batch_size=8, passes=2)
    assert len(rates) == 2 and all(r > 0 for r in rates)
    print(
        f"\ntraining_dataset over {len(pairs)} CamVid train pairs at 224x224, batch 8: "
        f"first pass (with decode) {rates[0]:.0f} images/s, second pass (cached) {rates[1]:.0f} images/s"
    )


# ----------------------------------------------------------------------------- synthetic


def test_flip_and_scale_keep_image_and_label_aligned(tmp_path):
    pair = _write_halves(tmp_path, "halves.png")
    pairs = [pair] * 16
    ds = pipeline.training_dataset(
        pairs, CAMVID, image_size=(64, 96), batch_size=16, seed=1, ignore_void=False,
        augment=Augment(flip=True, scale=(0.6, 1.6), jitter=0.3),
    )
    images, labels, weights = _batches(ds)[0]
    red, blue = images[..., 0], images[..., 2]
    valid = weights > 0
    # Away from the blended boundary the colour says which side a pixel came from.
    assert not ((red > blue + 60) & valid & (labels != 0)).any()
    assert not ((blue > red + 60) & valid & (labels != 1)).any()
    # Both orientations occur: label 1 (the wider, originally right part) on the left sometimes.
    columns = np.arange(96)[None, None, :]
    flipped = [
        (columns * ((lab == 1) & v)).sum() / max(((lab == 1) & v).sum(), 1)
        < (columns * ((lab == 0) & v)).sum() / max(((lab == 0) & v).sum(), 1)
        for lab, v in zip(labels, valid)
    ]
    assert any(flipped) and not all(flipped)


def test_padding_gets_zero_weight_under_downscaling(tmp_path):
    pair = _write_halves(tmp_path, "halves.png", size=(64, 64))
    ds = pipeline.training_dataset(
        [pair] * 4, CAMVID, image_size=(64, 64), batch_size=4, seed=2,
        augment=Augment(flip=False, scale=(0.5, 0.5)),
    )
    images, labels, weights = _batches(ds)[0]
    assert set(np.unique(weights)) == {0.0, 1.0}
    corners = []
    for image, weight in zip(images, weights):
        rows, cols = np.nonzero(weight)
        assert weight.sum() == 32 * 32  # exactly the 32x32 scaled photo counts
        assert rows.max() - rows.min() == 31 and cols.max() - cols.min() == 31
        corners.append((rows.min(), cols.min()))
        # Padding is filled with the mean colour the model subtracts.
        np.testing.assert_allclose(image[weight == 0], np.broadcast_to(pipeline.PAD_COLOR, image[weight == 0].shape), atol=1e-3)
    assert len(set(corners)) > 1  # placed at random offsets, not always top-left


def test_images_of_different_native_sizes(tmp_path):
    pairs = [_write_halves(tmp_path, "a.png", size=(96, 128)), _write_halves(tmp_path, "b.png", size=(50, 70))]
    for ds in (
        pipeline.training_dataset(pairs, CAMVID, image_size=(32, 64), batch_size=2, augment=Augment(scale=(0.5, 2.0))),
        pipeline.validation_dataset(pairs, CAMVID, image_size=(32, 64), batch_size=2),
    ):
        (images, labels, weights), = _batches(ds)
        assert images.shape == (2, 32, 64, 3) and labels.shape == weights.shape == (2, 32, 64)


def test_small_set_still_yields_one_short_training_batch(tmp_path):
    pairs = [_write_halves(tmp_path, "a.png")] * 3
    (images, _, _), = _batches(pipeline.training_dataset(pairs, CAMVID, image_size=(64, 64), batch_size=8))
    assert images.shape[0] == 3


@pytest.mark.parametrize("size", [(100, 224), (224, 0), (224,)])
def test_image_size_must_be_multiple_of_32(tmp_path, size):
    pairs = [_write_halves(tmp_path, "a.png")]
    with pytest.raises(FcnError, match="multiples of 32"):
        pipeline.training_dataset(pairs, CAMVID, image_size=size)
    with pytest.raises(FcnError, match="multiples of 32"):
        pipeline.validation_dataset(pairs, CAMVID, image_size=size)


def test_bad_augment_values():
    with pytest.raises(FcnError):
        Augment(scale=(1.5, 0.5))
    with pytest.raises(FcnError):
        Augment(jitter=-0.1)
    # A share that could never place a crop is refused, not recorded and ignored.
    with pytest.raises(FcnError, match="acts on crops only"):
        Augment(scale=(0.5, 1.0), class_uniform=0.5)
    Augment(scale=(0.5, 1.01), class_uniform=0.5)
    with pytest.raises(FcnError, match="class-uniform"):
        Augment(class_uniform=1.5)
    assert Augment.none() == Augment(flip=False, scale=(1.0, 1.0), jitter=0.0)


def _crops(share: float, draws: int = 64):
    """Crops of 32x32 from a 128x128 photo (scale 4 of image_size: no resize) whose pixel values are
    their own coordinates, a 3x3 pedestrian in one corner of a road; each crop's label and its offset."""
    yy, xx = np.mgrid[:128, :128]
    image = tf.constant(np.stack([yy, xx, np.zeros_like(yy)], -1), tf.float32)
    label = np.full((128, 128), 3, np.int32)  # road
    label[120:123, 4:7] = 9  # pedestrian
    label[:8] = VOID  # void is never a class to centre on
    augment = Augment(flip=False, scale=(4.0, 4.0), class_uniform=share)
    out = []
    for i in range(draws):
        crop, crop_label, valid = pipeline._augmented(image, tf.constant(label), (32, 32), augment,
                                                      tf.constant([i, 7], tf.int64), CAMVID)
        crop = crop.numpy()
        y0, x0 = int(crop[0, 0, 0]), int(crop[0, 0, 1])
        # A real crop: every pixel is where the photo had it, and the label moved with it.
        assert (crop[..., 0] == yy[y0:y0 + 32, x0:x0 + 32]).all() and (crop[..., 1] == xx[y0:y0 + 32, x0:x0 + 32]).all()
        assert (crop_label.numpy() == label[y0:y0 + 32, x0:x0 + 32]).all() and valid.numpy().all()
        out.append((crop_label.numpy(), (y0, x0)))
    return out


def test_class_uniform_crops_find_a_small_class_as_often_as_the_large_one():
    """Road and pedestrian are the two classes present: with share 1 about half the crops are placed around a
    pedestrian pixel; random crops almost never cover the 3x3 patch in the corner (7 in 97 offsets per axis)."""
    random = [(crop == 9).any() for crop, _ in _crops(0.0)]
    uniform = [(crop == 9).any() for crop, _ in _crops(1.0)]
    assert np.mean(random) < 0.2 and np.mean(uniform) > 0.35, (np.mean(random), np.mean(uniform))
    # The class is the draw, not the placement: the pedestrian sits anywhere in its crops, not always centred.
    offsets = {offset for crop, offset in _crops(1.0) if (crop == 9).any()}
    assert len(offsets) > 5


@pytest.mark.parametrize("pixel", [(0, 0), (127, 95), (0, 95), (64, 0), (127, 40)])
def test_an_anchored_crop_always_holds_its_pixel(pixel):
    """Anchors at corners and edges: the crop (32 of 128 rows) always holds the pixel; the other axis
    (96 columns on a 128-wide canvas) is padded, whole, as without an anchor."""
    yy, xx = np.mgrid[:128, :96]
    image = tf.constant(np.stack([yy, xx, np.zeros_like(yy)], -1), tf.float32)
    label, valid = tf.zeros((128, 96), tf.int32), tf.ones((128, 96))
    anchor = (tf.constant(pixel, tf.int32), tf.constant(True))
    rows = set()
    for i in range(40):
        crop, _, kept = pipeline._pad_or_crop(image, label, valid, (32, 128), tf.constant([i, 3], tf.int64), anchor)
        crop, kept = crop.numpy(), kept.numpy() > 0
        assert (kept & (crop[..., 0] == pixel[0]) & (crop[..., 1] == pixel[1])).sum() == 1
        assert kept.sum(axis=1).tolist() == [96] * 32
        rows.add(int(crop[kept][0, 0]))
    assert len(rows) > 1 or pixel[0] in (0, 127)  # placed at random where the edge leaves room


# ----------------------------------------------------------------------------- decode errors


def test_load_arrays_names_only_the_truncated_file(tmp_path):
    pairs = [_write_halves(tmp_path, f"{i}.png") for i in range(5)]
    _truncate(pairs[2].image)
    with pytest.raises(FcnError) as info:
        pipeline.load_arrays(pairs, CAMVID, workers=2)
    message = str(info.value)
    assert "1 of 5 pairs" in message
    assert str(pairs[2].image) in message
    assert all(str(p.image) not in message and str(p.mask) not in message for i, p in enumerate(pairs) if i != 2)


def test_load_arrays_lists_ten_then_counts_the_rest(tmp_path):
    pairs = [_write_halves(tmp_path, f"{i:02d}.png", size=(8, 8)) for i in range(13)]
    for pair in pairs[:12]:
        _truncate(pair.mask)
    with pytest.raises(FcnError) as info:
        pipeline.load_arrays(pairs, CAMVID)
    message = str(info.value)
    assert "12 of 13 pairs" in message and "and 2 more" in message
    assert sum(str(p.mask) in message for p in pairs) == 10


def test_size_mismatch_names_the_mask(tmp_path):
    pair = _write_halves(tmp_path, "a.png", size=(96, 128))
    Image.fromarray(np.zeros((90, 128), np.uint8), mode="L").save(pair.mask)
    with pytest.raises(FcnError, match="annotation is 128x90") as info:
        pipeline.load_arrays([pair], CAMVID)
    assert str(pair.mask) in str(info.value)
    with pytest.raises(FcnError, match="annotation is 128x90"):  # streaming checks headers up front
        pipeline.training_dataset([pair], CAMVID, image_size=(64, 64), cache_budget=0)


def test_streaming_decode_error_is_recoverable(tmp_path):
    pairs = [_write_halves(tmp_path, f"{i}.png") for i in range(2)]
    _truncate(pairs[1].image)  # the header still opens: only decoding finds it
    ds = pipeline.training_dataset(pairs, CAMVID, image_size=(64, 64), batch_size=1, cache_budget=0, shuffle=False)
    with pytest.raises(tf.errors.OpError) as info:
        _batches(ds)
    error = pipeline.streaming_error(info.value)
    assert isinstance(error, FcnError) and str(pairs[1].image) in str(error) and "\n" not in str(error)
    assert pipeline.streaming_error(RuntimeError("something else")) is None
