"""fcn predict on a video: a mask video at the clip's size and rate, overlays, audio, and safe writing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import fcn, hidden, one_line_error, predict_in_process

from fcn_cli.classes import CAMVID
from fcn_cli.errors import FcnError

imageio = pytest.importorskip("imageio.v2")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")

FRAMES, HEIGHT, WIDTH, FPS = 20, 96, 128, 10


def _pan(height: int, width: int, count: int, step: int = 2) -> list[np.ndarray]:
    """A camera panning across one synthetic street scene, ``step`` px per frame."""
    from fcn_cli.synthetic import render_scene

    scene, _ = render_scene(np.random.default_rng(0), height, width + step * count)
    return [np.ascontiguousarray(scene[:, step * i : step * i + width]) for i in range(count)]


def _read(path: Path) -> tuple[list[np.ndarray], dict]:
    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return [np.asarray(f) for f in reader.iter_data()], reader.get_meta_data()
    finally:
        reader.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """20 frames of 96x128 at 10 fps, no audio; tests copy it, never write beside it."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    writer = imageio.get_writer(str(path), format="FFMPEG", fps=FPS, macro_block_size=1, ffmpeg_log_level="quiet")
    for frame in _pan(HEIGHT, WIDTH, FRAMES):
        writer.append_data(frame)
    writer.close()
    return path


@pytest.fixture(scope="module")
def audio_clip(clip) -> Path:
    """``clip`` with a sine-tone audio track (ffmpeg's lavfi source), video copied as is."""
    path = clip.with_name("talk.mp4")
    proc = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(clip), "-f", "lavfi",
         "-i", "sine=frequency=440:duration=2", "-map", "0:v", "-map", "1:a", "-c:v", "copy", "-c:a", "aac",
         "-shortest", str(path)],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"this ffmpeg cannot make a clip with audio: {proc.stderr.strip()[:200]}")
    return path


_predict = predict_in_process


def _palette_distance(frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the largest channel difference to the nearest class colour, and that class."""
    pixels = np.concatenate([f.reshape(-1, 3) for f in frames]).astype(np.int16)
    distance = np.abs(pixels[:, None, :] - CAMVID.palette.astype(np.int16)[None]).max(-1)
    return distance.min(-1), distance.argmin(-1)


# --------------------------------------------------------------------------- the video path


def test_cli_writes_mask_and_overlay_videos_at_the_clip_size_and_rate(checkpoint, model, clip, tmp_path):
    from fcn_cli.inference import predict_batch

    out = tmp_path / "out.mp4"
    proc = fcn("predict", clip, "-o", out, "--overlay", "--model", checkpoint, check=0)
    assert f"wrote {out}: {FRAMES} frames at" in proc.stdout and "frames/s" in proc.stdout
    assert "audio" not in proc.stdout + proc.stderr
    masks, meta = _read(out)
    assert len(masks) == FRAMES and meta["fps"] == FPS
    assert all(m.shape == (HEIGHT, WIDTH, 3) for m in masks)
    # Lossy, so not exact, but in 4:4:4 each pixel's colour still maps back to the class predicted for it
    # (``model`` is the checkpoint's network; it ran at the checkpoint's 64x64).
    source, _ = _read(clip)
    expected = np.stack(predict_batch(model, source, "resize", (64, 64), output="labels"))
    distance, nearest = _palette_distance(masks)
    assert (nearest == expected.reshape(-1)).mean() > 0.99
    assert np.median(distance) <= 4 and len(np.unique(nearest)) > 1
    overlays, overlay_meta = _read(tmp_path / "out_overlay.mp4")
    assert len(overlays) == FRAMES and overlays[0].shape == (HEIGHT, WIDTH, 3) and overlay_meta["fps"] == FPS
    # The overlay is the mask blended over the frame.
    expected = 0.5 * source[5].astype(np.float32) + 0.5 * masks[5].astype(np.float32)
    assert np.abs(overlays[5].astype(np.float32) - expected).mean() < 12
    assert not hidden(tmp_path)


def test_default_output_audio_note_and_summary(checkpoint, audio_clip, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _predict([audio_clip], None, checkpoint, batch_size=3)
    target = Path("predictions") / "talk_mask.mp4"
    assert result.written == [target] and result.output == target and (tmp_path / target).is_file()
    assert result.frames == FRAMES and result.fps == FPS and result.audio_dropped is True
    notes = [line for line in result.log.splitlines() if "audio" in line]
    assert len(notes) == 1 and "talk.mp4" in notes[0] and "dropped" in notes[0]
    _, meta = _read(tmp_path / target)
    assert not meta.get("audio_codec")
    summary = result.summary()
    assert summary["schema"] == "fcn.predict/1"
    assert summary["written"] == [str(target)] and summary["overlays"] == [] and summary["legend"] is None
    assert summary["frames"] == FRAMES and summary["fps"] == FPS and summary["audio_dropped"] is True
    assert summary["failed"] == [] and summary["skipped"] == [] and summary["seconds"] > 0


def test_existing_output_is_refused_and_left_untouched(checkpoint, clip, tmp_path):
    out = tmp_path / "mine.mp4"
    out.write_bytes(b"precious")
    with pytest.raises(FcnError, match="mine.mp4.*--overwrite"):
        _predict([clip], out, checkpoint)
    assert out.read_bytes() == b"precious"
    # An existing overlay is refused as well, before anything is written.
    (tmp_path / "new_overlay.mp4").write_bytes(b"keep")
    with pytest.raises(FcnError, match="new_overlay.mp4"):
        _predict([clip], tmp_path / "new.mp4", checkpoint, overlay=True)
    assert not (tmp_path / "new.mp4").exists()
    result = _predict([clip], out, checkpoint, overwrite=True)
    assert result.written == [out] and len(_read(out)[0]) == FRAMES
    assert not hidden(tmp_path)


def test_the_input_itself_is_never_overwritten(checkpoint, clip, tmp_path):
    copy = tmp_path / "clip.mp4"
    copy.write_bytes(clip.read_bytes())
    with pytest.raises(FcnError, match="input video"):
        _predict([copy], copy, checkpoint, overwrite=True)
    assert copy.read_bytes() == clip.read_bytes()


def test_a_failure_midway_leaves_no_file(checkpoint, clip, tmp_path, monkeypatch):
    from fcn_cli import predict as predict_module

    calls = []

    def failing(photo, colour, alpha=0.5):
        calls.append(1)
        if len(calls) == 7:
            raise FcnError("boom")
        return colour

    monkeypatch.setattr(predict_module, "overlay_image", failing)
    out = tmp_path / "out"
    with pytest.raises(FcnError, match="boom"):
        _predict([clip], out / "m.mp4", checkpoint, overlay=True)
    assert not list(out.iterdir())  # neither video, nor a temporary file


# --------------------------------------------------------------------------- refusals


def test_corrupt_video_is_one_line_naming_it(checkpoint, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "out.mp4"
    line = one_line_error(fcn("predict", bad, "-o", out, "--model", checkpoint), "broken.mp4", "cannot read video")
    assert "re-encode" in line
    assert not out.exists() and not hidden(tmp_path)


def test_raw_is_refused_for_video(checkpoint, clip, tmp_path):
    with pytest.raises(FcnError, match="--raw") as info:
        _predict([clip], tmp_path / "o.mp4", checkpoint, raw=True)
    assert "\n" not in str(info.value) and not (tmp_path / "o.mp4").exists()


def test_video_output_needs_a_video_suffix(checkpoint, clip, tmp_path):
    with pytest.raises(FcnError, match=r"mask\.png.*\.mp4"):
        _predict([clip], tmp_path / "mask.png", checkpoint)


def test_videos_go_one_at_a_time_without_photos(checkpoint, clip, tmp_path):
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    other = tmp_path / "other.mkv"
    other.write_bytes(b"x")
    for inputs in ([clip, photo], [clip, other], [str(tmp_path / "*")]):
        with pytest.raises(FcnError, match="one at a time"):
            _predict(inputs, tmp_path / "o", checkpoint)


def test_missing_imageio_is_one_install_line(monkeypatch, clip):
    import sys

    from fcn_cli.video import open_video

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # import fails as if not installed
    with pytest.raises(FcnError, match=r'pip install "fcn-cli\[video\]"'), open_video(clip):
        pass


# --------------------------------------------------------------------------- the writer


@pytest.mark.parametrize("suffix, exact", [(".m4v", False), (".webm", True)])
def test_odd_sizes_keep_their_size(tmp_path, suffix, exact):
    from fcn_cli.video import open_video, write_video

    frames = _pan(45, 61, 4)
    path = tmp_path / f"odd{suffix}"
    assert write_video(path, frames, fps=7.5, exact=exact) == 4
    with open_video(path) as (info, decoded):
        back = list(decoded)
    assert info.fps == 7.5 and info.frames == 4 and not info.audio
    assert [f.shape for f in back] == [(45, 61, 3)] * 4
    assert np.abs(back[2].astype(int) - frames[2].astype(int)).mean() < 8
    assert not hidden(tmp_path)
