"""fcn predict and the shared inference: sizes, formats, batching, tiles, and safe writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import predict_in_process
from PIL import Image

from fcn_cli import images
from fcn_cli.classes import CAMVID
from fcn_cli.errors import FcnError

PALETTE = set(CAMVID.colors)


def _photo(h: int = 70, w: int = 90, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(yy * 2) % 256, (xx * 3) % 256, ((xx + yy) * 2) % 256], -1)
    return ((smooth + rng.integers(0, 64, (h, w, 3))) % 256).astype(np.uint8)


def _save(path: Path, array: np.ndarray | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_photo() if array is None else array).save(path, **kw)
    return path


_predict = predict_in_process


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------- sizes and colours


def test_non_multiple_of_32_photo_gives_palette_mask_of_its_size(checkpoint, tmp_path):
    photo = _save(tmp_path / "street.png")
    result = _predict([photo], tmp_path / "mask.png", checkpoint)
    assert result.written == [tmp_path / "mask.png"] and not result.failed
    mask = _rgb(tmp_path / "mask.png")
    assert mask.shape == (70, 90, 3)
    colours = {tuple(c) for c in mask.reshape(-1, 3)}
    assert colours <= PALETTE and len(colours) > 1
    assert Image.open(tmp_path / "mask.png").info.get("Software") == "fcn predict"
    assert "wrote 1 colour mask" in result.log


def test_default_output_is_predictions_folder_in_cwd(checkpoint, tmp_path, monkeypatch):
    photo = _save(tmp_path / "in" / "street.jpg")
    monkeypatch.chdir(tmp_path)
    result = _predict([photo], None, checkpoint, mode="native")
    assert result.written == [Path("predictions") / "street.png"]
    assert _rgb(tmp_path / "predictions" / "street.png").shape == (70, 90, 3)


def test_folder_input_mirrors_subfolders(checkpoint, tmp_path):
    src = tmp_path / "photos"
    _save(src / "a" / "x.jpg")
    _save(src / "a" / "b" / "y.png", _photo(40, 50))
    _save(src / "z.png", _photo(64, 64))
    (src / "notes.txt").write_text("not an image")
    _save(src / ".hidden" / "h.png")
    out = tmp_path / "out"
    result = _predict([src], out, checkpoint, batch_size=2)
    assert not result.failed
    assert sorted(p.relative_to(out).as_posix() for p in result.written) == ["a/b/y.png", "a/x.png", "z.png"]
    assert _rgb(out / "a" / "b" / "y.png").shape == (40, 50, 3)
    assert _rgb(out / "z.png").shape == (64, 64, 3)


def test_symlinked_photos_keep_the_folder_structure(checkpoint, tmp_path):
    real = _save(tmp_path / "store" / "real.png")
    (tmp_path / "set" / "sub").mkdir(parents=True)
    (tmp_path / "set" / "sub" / "link.png").symlink_to(real)
    out = tmp_path / "out"
    result = _predict([tmp_path / "set"], out, checkpoint)
    assert result.written == [out / "sub" / "link.png"]


def test_files_and_globs_mirror_relative_to_their_common_parent(checkpoint, tmp_path):
    _save(tmp_path / "set" / "one" / "p.png")
    _save(tmp_path / "set" / "two" / "q.jpg")
    out = tmp_path / "out"
    result = _predict([str(tmp_path / "set" / "**" / "*.*")], out, checkpoint)
    assert sorted(p.relative_to(out).as_posix() for p in result.written) == ["one/p.png", "two/q.png"]


def test_raw_writes_class_indices(checkpoint, tmp_path):
    photo = _save(tmp_path / "street.png")
    colour = _predict([photo], tmp_path / "colour.png", checkpoint).written[0]
    raw = _predict([photo], tmp_path / "raw.png", checkpoint, raw=True).written[0]
    img = Image.open(raw)
    assert img.mode == "P" and img.size == (90, 70)
    indices = np.asarray(img)
    assert indices.max() < 12
    # Same prediction: the colour mask is the raw one through the palette, and read_mask reads it back.
    assert np.array_equal(CAMVID.colorize(indices), _rgb(colour))
    assert np.array_equal(images.read_mask(raw, CAMVID), indices)


def test_overlay_and_legend(checkpoint, tmp_path):
    photo_a = _save(tmp_path / "in" / "a.png")
    _save(tmp_path / "in" / "b.png", _photo(33, 47))
    out = tmp_path / "out"
    result = _predict([tmp_path / "in"], out, checkpoint, overlay=True, legend=True)
    assert sorted(p.name for p in result.overlays) == ["a_overlay.png", "b_overlay.png"]
    assert result.legend == out / "legend.png" and (out / "legend.png").is_file()
    overlay = _rgb(out / "a_overlay.png")
    mask = _rgb(out / "a.png")
    photo = _rgb(photo_a)
    assert overlay.shape == photo.shape
    expected = np.rint(photo.astype(np.float32) * 0.5 + mask.astype(np.float32) * 0.5)
    assert np.abs(overlay.astype(int) - expected.astype(int)).max() <= 1
    legend = _rgb(out / "legend.png")
    legend_colours = {tuple(c) for c in legend.reshape(-1, 3)}
    assert PALETTE <= legend_colours  # one swatch per class
    assert _rgb(out / "b_overlay.png").shape == (33, 47, 3)


# --------------------------------------------------------------------------- failures and safety


def test_corrupt_file_is_reported_and_the_rest_written(checkpoint, tmp_path):
    src = tmp_path / "in"
    _save(src / "good1.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _save(src / "good2.jpg")
    out = tmp_path / "out"
    result = _predict([src], out, checkpoint)
    assert sorted(p.name for p in result.written) == ["good1.png", "good2.png"]
    assert [p.name for p, _ in result.failed] == ["broken.png"]
    assert "broken.png" in result.failed[0][1] and "decode" in result.failed[0][1]
    assert not (out / "broken.png").exists()
    assert "1 failed" in result.log


def test_output_that_would_replace_an_input_is_refused(checkpoint, tmp_path):
    photo = _save(tmp_path / "street.png")
    before = photo.read_bytes()
    result = _predict([photo], photo, checkpoint)
    assert not result.written and result.failed and "input" in result.failed[0][1]
    assert photo.read_bytes() == before
    # Same for a folder written into itself: the PNG inputs keep their bytes, the JPEG gets its mask.
    _save(tmp_path / "street2.jpg")
    result = _predict([tmp_path], tmp_path, checkpoint)
    assert photo.read_bytes() == before
    assert [p.name for p in result.written] == ["street2.png"]
    assert [p.name for p, _ in result.failed] == ["street.png"]


def test_foreign_file_needs_overwrite_but_own_output_is_replaced(checkpoint, tmp_path):
    photo = _save(tmp_path / "street.png")
    out = tmp_path / "out"
    foreign = _save(out / "street.png", np.full((5, 5, 3), 7, np.uint8))
    before = foreign.read_bytes()
    result = _predict([photo], out, checkpoint)
    assert not result.written and "--overwrite" in result.failed[0][1] and "street.png" in result.failed[0][1]
    assert foreign.read_bytes() == before
    result = _predict([photo], out, checkpoint, overwrite=True)
    assert result.written == [out / "street.png"] and not result.failed
    # Our own earlier output is replaced without --overwrite (raw index PNG -> colour PNG).
    assert not _predict([photo], out, checkpoint, raw=True).failed
    assert Image.open(out / "street.png").mode == "P"
    assert not _predict([photo], out, checkpoint).failed
    assert Image.open(out / "street.png").mode == "RGB"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_earlier_outputs_in_a_searched_folder_are_not_inputs(checkpoint, tmp_path):
    src = tmp_path / "in"
    _save(src / "a.jpg")
    first = _predict([src], src, checkpoint, overlay=True)
    assert [p.name for p in first.written] == ["a.png"]
    again = _predict([src], src, checkpoint, overlay=True)
    assert [p.name for p in again.written] == ["a.png"] and len(again.skipped) == 2 and not again.failed


def test_nothing_found_is_an_error(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FcnError, match="no images found"):
        _predict([tmp_path / "empty"], tmp_path / "out", checkpoint)


def test_several_inputs_need_an_output_folder(checkpoint, tmp_path):
    a, b = _save(tmp_path / "a.png"), _save(tmp_path / "b.png")
    with pytest.raises(FcnError, match="output folder"):
        _predict([a, b], tmp_path / "mask.png", checkpoint)


def test_summary_is_plain_json_with_null_video_fields(checkpoint, tmp_path):
    import json

    src = tmp_path / "in"
    _save(src / "a.png")
    (src / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    summary = _predict([src], out, checkpoint, overlay=True, legend=True).summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["schema"] == "fcn.predict/1" and summary["output"] == str(out)
    assert summary["written"] == [str(out / "a.png")] and summary["overlays"] == [str(out / "a_overlay.png")]
    assert summary["legend"] == str(out / "legend.png") and summary["skipped"] == []
    assert [f["input"] for f in summary["failed"]] == [str(src / "broken.png")]
    assert "broken.png" in summary["failed"][0]["reason"]
    assert summary["frames"] is None and summary["fps"] is None and summary["audio_dropped"] is None


def test_too_large_photo_is_refused_with_a_clear_message(checkpoint, tmp_path, monkeypatch):
    _save(tmp_path / "in" / "small.png", _photo(20, 30))
    big = _save(tmp_path / "in" / "big.png")  # 70x90 = 6300 pixels
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    result = _predict([tmp_path / "in"], tmp_path / "out", checkpoint)
    assert [p.name for p in result.written] == ["small.png"]
    assert [p for p, _ in result.failed] == [big]
    assert "pixel limit" in result.failed[0][1] and "downscale" in result.failed[0][1]


# --------------------------------------------------------------------------- formats


def test_odd_formats_and_exif_rotation_give_masks_of_the_upright_size(checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    photo = _photo()
    Image.fromarray(photo).convert("L").save(src / "gray.png")
    rgba = np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba).save(src / "rgba.png")
    Image.fromarray((photo[..., 0].astype(np.uint16) * 257)).save(src / "deep16.png")
    assert Image.open(src / "deep16.png").mode.startswith("I")
    Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(src / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(photo).save(src / "rotated.jpg", exif=exif)  # stored 90 wide x 70 high
    out = tmp_path / "out"
    result = _predict([src], out, checkpoint, batch_size=3)
    assert not result.failed and len(result.written) == 5
    for name in ("gray", "rgba", "deep16", "palette"):
        assert _rgb(out / f"{name}.png").shape == (70, 90, 3), name
    assert _rgb(out / "rotated.png").shape == (90, 70, 3)  # upright: 70 wide x 90 high


# --------------------------------------------------------------------------- inference


def test_bilinear_logit_resize_matches_tf_image_resize():
    import tensorflow as tf

    from fcn_cli.inference import resize_logits

    x = np.random.default_rng(0).normal(size=(7, 9, 5)).astype(np.float32)
    for size in ((20, 31), (3, 4), (7, 9), (13, 5)):
        expected = tf.image.resize(x, size, method="bilinear").numpy()
        np.testing.assert_allclose(resize_logits(x, size), expected, atol=1e-5)


def test_tiles_match_the_whole_photo():
    import keras

    from fcn_cli.inference import labels_for, logits_for

    # A per-pixel model: tiling must reproduce the untiled result exactly (padding, overlaps, crop).
    keras.utils.set_random_seed(0)
    pointwise = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(5, 1)])
    photo = _photo(150, 230, seed=3)
    whole = logits_for(pointwise, photo, "native")
    tiled = logits_for(pointwise, photo, "native", tile=64, overlap=32, tile_budget=1000)
    assert whole.shape == tiled.shape == (150, 230, 5)
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-3)
    labels = labels_for(pointwise, photo, "native", tile=64, overlap=32, tile_budget=1000)
    assert np.array_equal(labels, whole.argmax(-1))


def test_tiles_agree_with_the_whole_photo_on_the_fcn(model):
    from fcn_cli.inference import logits_for

    photo = _photo(200, 300, seed=1)
    whole = logits_for(model, photo, "native")
    tiled = logits_for(model, photo, "native", tile=128, overlap=64, tile_budget=1000)
    assert tiled.shape == whole.shape == (200, 300, 12)
    # Tiles see less context than the whole photo (VGG's receptive field is ~400 px), so close, not equal.
    assert (tiled.argmax(-1) == whole.argmax(-1)).mean() > 0.7
    assert np.abs(tiled - whole).mean() < 0.25 * np.abs(whole).mean()


def test_predict_batch_groups_sizes_and_keeps_order(model):
    from fcn_cli.inference import labels_for, logits_for, predict_batch

    photos = [_photo(70, 90, 0), _photo(40, 50, 1), _photo(70, 90, 2), _photo(33, 64, 3), _photo(70, 90, 4)]
    for mode in ("native", "resize"):
        batched = predict_batch(model, photos, mode, (64, 64), batch_size=2)
        assert [b.shape[:2] for b in batched] == [p.shape[:2] for p in photos]
        for photo, got in zip(photos, batched):
            np.testing.assert_allclose(got, logits_for(model, photo, mode, (64, 64)), atol=1e-4)
        labels = predict_batch(model, photos, mode, (64, 64), batch_size=3, output="labels")
        assert all(lab.dtype == np.uint8 for lab in labels)
        assert np.array_equal(labels[3], labels_for(model, photos[3], mode, (64, 64)))


def test_native_tiles_through_predict(checkpoint, tmp_path):
    photo = _save(tmp_path / "wide.png", _photo(100, 260))
    result = _predict([photo], tmp_path / "m.png", checkpoint, mode="native", tile=64, overlap=32, tile_budget=2000)
    assert not result.failed and _rgb(tmp_path / "m.png").shape == (100, 260, 3)


def test_bad_mode_is_a_clear_error(model):
    from fcn_cli.inference import logits_for

    with pytest.raises(FcnError, match="native"):
        logits_for(model, _photo(), "stretch", (64, 64))


def test_flip_tta_averages_the_mirror_view():
    from fcn_cli.inference import iter_predictions
    from fcn_cli.model import build_fcn

    model = build_fcn("fcn8", 12, None, width=1 / 16, head_width=16)
    rng = np.random.default_rng(11)
    for layer in model.layers:  # a model that is not left-right symmetric
        if layer.trainable_weights:
            layer.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in layer.get_weights()])
    photo = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    plain = dict(iter_predictions(model, [(0, photo)], "native", None, output="logits"))[0]
    mirror = dict(iter_predictions(model, [(0, photo[:, ::-1].copy())], "native", None, output="logits"))[0]
    tta = dict(iter_predictions(model, [(0, photo)], "native", None, output="logits", flip=True))[0]
    assert not np.allclose(plain, mirror[:, ::-1])
    np.testing.assert_allclose(tta, 0.5 * (plain + mirror[:, ::-1]), atol=1e-4)


def test_labels_from_the_compiled_argmax_equal_the_argmax_of_the_logits(model):
    from fcn_cli.inference import predict_batch

    photos = [_photo(64, 64, 0), _photo(64, 64, 1), _photo(70, 90, 2)]
    for mode in ("native", "resize"):  # resize: two photos at the inference size, one resized
        logits = predict_batch(model, photos, mode, (64, 64), batch_size=3, output="logits")
        labels = predict_batch(model, photos, mode, (64, 64), batch_size=3, output="labels")
        for lg, lab in zip(logits, labels):
            assert lab.dtype == np.uint8 and np.array_equal(lab, lg.argmax(-1)), mode


def test_a_subclassed_model_predicts_through_the_numpy_argmax():
    import keras

    from fcn_cli.inference import labels_model, predict_batch

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.score = keras.layers.Conv2D(5, 1)

        def call(self, x):
            return self.score(x)

    net = Net()
    photos = [_photo(40, 50, 0), _photo(64, 64, 1)]
    labels = predict_batch(net, photos, "native", batch_size=2, output="labels")
    logits = predict_batch(net, photos, "native", batch_size=2, output="logits")
    assert labels_model(net) is None
    assert [lab.shape for lab in labels] == [(40, 50), (64, 64)]
    assert all(np.array_equal(lab, lg.argmax(-1)) for lab, lg in zip(labels, logits))
