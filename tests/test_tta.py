"""Multi-scale test-time augmentation (``flip``, ``scales``): the average of every view's logits, by hand."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fcn_cli.errors import FcnError
from fcn_cli.inference import iter_predictions, pad_to_multiple, predict_batch, resize_logits, scaled_size, tta_scales

SIZE = (64, 96)  # the inference size of these tests (resize mode)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(yy * 2) % 256, (xx * 3) % 256, ((xx + yy) * 2) % 256], -1)
    return ((smooth + rng.integers(0, 64, (h, w, 3))) % 256).astype(np.uint8)


def _one(model, image, mode="native", size=None, **kw) -> np.ndarray:
    return predict_batch(model, [image], mode, size, batch_size=2, output="logits", **kw)[0]


def _net(model, image: np.ndarray) -> np.ndarray:
    """(H, W, C) logits of one float image of any size: padded to 32, run, cropped."""
    padded, (h, w) = pad_to_multiple(np.asarray(image, np.float32)[None], 32)
    return np.asarray(model.predict_on_batch(padded))[0, :h, :w]


def _by_hand(model, image: np.ndarray, scales, flip: bool) -> np.ndarray:
    """The mean over scales (and mirrors) of: resize by s, run, resize back to the image's size."""
    hw = image.shape[:2]
    views = []
    for s in scales:
        x = np.asarray(image, np.float32) if s == 1 else resize_logits(image, scaled_size(hw, s))
        for mirrored in ((False, True) if flip else (False,)):
            lg = _net(model, x[:, ::-1])[:, ::-1] if mirrored else _net(model, x)
            views.append(lg if s == 1 else resize_logits(lg, hw))
    return np.mean(views, axis=0)


def test_scales_round_each_side_to_a_multiple_of_32():
    assert scaled_size(SIZE, 0.75) == (64, 64)  # 48 -> 64, 72 -> 64
    assert scaled_size(SIZE, 1.25) == (96, 128)  # 80 -> 96, 120 -> 128
    assert scaled_size((70, 90), 1.0) == (70, 90)  # scale 1 is the plain pass (padded, not resized)
    assert scaled_size((40, 40), 0.25) == (32, 32)  # never under 32


@pytest.mark.parametrize("mode", ["native", "resize"])
def test_scale_one_without_flip_is_the_plain_path(model, mode):
    photos = [_photo(64, 96, 0), _photo(70, 90, 1)]
    for output in ("logits", "labels"):
        plain = predict_batch(model, photos, mode, SIZE, batch_size=2, output=output)
        same = predict_batch(model, photos, mode, SIZE, batch_size=2, output=output, flip=False, scales=[1, 1.0])
        for a, b in zip(plain, same):
            assert a.dtype == b.dtype and np.array_equal(a, b), (mode, output)


def test_flip_alone_is_the_mirror_average(model):
    photo = _photo(70, 90)
    plain = _one(model, photo)
    mirror = _one(model, photo[:, ::-1].copy())
    assert not np.allclose(plain, mirror[:, ::-1])  # the model is not left-right symmetric
    np.testing.assert_allclose(_one(model, photo, flip=True), 0.5 * (plain + mirror[:, ::-1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("flip", [False, True])
def test_multi_scale_is_the_hand_computed_average(model, flip):
    scales = (0.75, 1.0, 1.25)
    # Resize mode, a photo at the inference size: the base is the photo.
    at_size = _photo(*SIZE, seed=2)
    got = _one(model, at_size, "resize", SIZE, flip=flip, scales=scales)
    np.testing.assert_allclose(got, _by_hand(model, at_size, scales, flip), rtol=0, atol=1e-4)
    assert not np.allclose(got, _one(model, at_size, "resize", SIZE, flip=flip), atol=1e-3)  # the scales count
    # Resize mode, another size: resized to the base, averaged there, resized to the photo's size.
    other = _photo(50, 70, seed=3)
    base = resize_logits(other, SIZE)
    want = resize_logits(_by_hand(model, base, scales, flip), (50, 70))
    np.testing.assert_allclose(_one(model, other, "resize", SIZE, flip=flip, scales=scales), want, rtol=0, atol=1e-4)
    # Native mode: the base is the photo's own 70x90 (scale 1 padded to 96x96, the others resized).
    native = _photo(70, 90, seed=4)
    np.testing.assert_allclose(_one(model, native, flip=flip, scales=scales),
                               _by_hand(model, native, scales, flip), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["native", "resize"])
def test_labels_are_the_argmax_of_the_averaged_logits(model, mode):
    photos = [_photo(64, 96, 5), _photo(70, 90, 6), _photo(100, 130, 7)]
    # tile_budget 20000: at scale 1.5 only the 100x130 photo is over it, so it alone runs in 64x64 tiles in
    # native mode, each tile at every scale.
    kw = {"flip": True, "scales": (0.5, 1.0, 1.5), "tile": 64, "overlap": 32, "tile_budget": 20000}
    logits = predict_batch(model, photos, mode, SIZE, batch_size=2, output="logits", **kw)
    labels = predict_batch(model, photos, mode, SIZE, batch_size=2, output="labels", **kw)
    for photo, lg, lab in zip(photos, logits, labels):
        assert lg.shape == (*photo.shape[:2], 12) and lab.shape == photo.shape[:2]
        assert lab.dtype == np.uint8 and np.array_equal(lab, lg.argmax(-1))


class _Recorder:
    """A stand-in model that records each forward pass's shape (not a graph: no in-graph argmax)."""

    def __init__(self, fixed_size=None):
        self.path, self.fixed_size, self.shapes = Path("m.onnx"), fixed_size, []

    def predict_on_batch(self, x):
        self.shapes.append(x.shape)
        return np.zeros((*x.shape[:3], 12), np.float32)


def test_the_largest_scale_counts_against_the_pixel_budget():
    photos = [_photo(64, 64, i) for i in range(4)]
    plain, scaled = _Recorder(), _Recorder()
    budget = 4 * 64 * 64
    predict_batch(plain, photos, "native", None, batch_size=4, tile_budget=budget)
    predict_batch(scaled, photos, "native", None, batch_size=4, tile_budget=budget, scales=(1.0, 2.0))
    assert plain.shapes == [(4, 64, 64, 3)]
    assert sorted(set(scaled.shapes)) == [(1, 64, 64, 3), (1, 128, 128, 3)]
    assert all(b * h * w <= budget for b, h, w, _ in scaled.shapes)


@pytest.mark.parametrize("bad", [[], [0], [-1, 1], [4.5], ["x"], [float("nan")], "1,,2"])
def test_bad_scales_are_one_line_naming_tta(model, bad):
    with pytest.raises(FcnError, match="--tta") as info:
        list(iter_predictions(model, [(0, _photo(64, 64))], "native", None, scales=bad))
    assert "\n" not in str(info.value)


def test_scales_are_deduplicated_and_sorted():
    assert tta_scales([1.25, 1, 0.75, 1.0]) == (0.75, 1.0, 1.25)
    assert tta_scales("0.75, 1,1.25") == (0.75, 1.0, 1.25)
    assert tta_scales(None) == tta_scales(1) == (1.0,)
    assert tta_scales([4]) == (4.0,)


def test_a_fixed_size_export_refuses_other_scales():
    photo = _photo(*SIZE)
    fixed = _Recorder(fixed_size=SIZE)
    flipped = predict_batch(fixed, [photo], "resize", SIZE, flip=True)  # mirrors keep the size: fine
    assert flipped[0].shape[:2] == SIZE and {s[1:3] for s in fixed.shapes} == {SIZE}
    with pytest.raises(FcnError, match="--dynamic") as info:
        predict_batch(fixed, [photo], "resize", SIZE, scales=(0.75, 1.0))
    message = str(info.value)
    assert "\n" not in message and "m.onnx" in message and "scales" in message


def test_evaluate_reports_the_tta_it_ran(small_set, checkpoint, tmp_path):
    from fcn_cli.evaluate import evaluate

    quiet = Console(file=io.StringIO(), width=120)
    report = tmp_path / "val.json"
    result = evaluate(checkpoint, small_set, split="val", json_path=report, batch_size=2, console=quiet,
                      flip=True, scales=(1.25, 1, 0.75, 1.25))
    saved = json.loads(report.read_text())
    assert saved["schema"] == result["schema"] == "fcn.evaluate/1"
    assert saved["tta"] == {"scales": [0.75, 1.0, 1.25], "flip": True} and "flip_tta" not in saved
    assert saved["images"] == 2
    plain = evaluate(checkpoint, small_set, split="val", json_path=tmp_path / "plain.json", console=quiet)
    assert plain["tta"] == {"scales": [1.0], "flip": False}

    with pytest.raises(FcnError, match="--tta"):
        evaluate(checkpoint, small_set, split="val", json_path=tmp_path / "bad.json", console=quiet, scales=(0,))
    assert not (tmp_path / "bad.json").exists()
