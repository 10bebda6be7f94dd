"""`fcn predict` on a video: one clip in, a colour mask video (and optionally an overlay video) out.

Frames are decoded lazily by ffmpeg (imageio's ffmpeg plugin; imageio-ffmpeg ships its own binary), run
in batches through the same inference as photos (:func:`fcn_cli.inference.iter_predictions`) and streamed
into an encoder: a clip is never held in memory. The outputs have the source's frame rate and frame size:

* ``-o NAME.mp4`` (any of :data:`VIDEO_SUFFIXES`), else ``<folder>/<stem>_mask.mp4`` with the folder
  ``-o DIR`` or ``predictions/``;
* ``overlay``: ``<stem>_overlay.<suffix>`` beside the mask video, the mask blended 50% over each frame;
* ``legend``: ``legend.png`` beside it, as for photos.

H.264 (VP9 for .webm). The mask video keeps full colour resolution (4:4:4): with the usual 4:2:0,
colours bleed across class edges (2% of pixels decoded to the wrong class on synthetic street scenes), with 4:4:4
every pixel's colour still maps back to its class, and the file is no larger; a few players (QuickTime,
browsers) play only 4:2:0. The overlay video is for watching: 4:2:0, which every player decodes (4:4:4
at odd sizes, which 4:2:0 cannot hold, rather than rescaled). Codecs are lossy all the same, so class
indices (``raw``) are refused. The audio track is dropped (a note says so).

Safety as for photos: outputs are encoded into a temporary file in their folder and renamed into place
once complete, removed on any failure; an existing file is replaced only with ``overwrite``, the input
never.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcn_cli.errors import FcnError, RuntimeFailure, write_error

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
# ffmpeg's muxer per suffix, named rather than guessed: ffmpeg would take .m4v for a raw MPEG-4 stream.
MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".avi": "avi", ".mkv": "matroska", ".webm": "webm"}
DEFAULT_SUFFIX = ".mp4"
INSTALL_HINT = 'pip install "fcn-cli[video]"'
CRF = 18  # x264 quality: in 4:4:4, 0.1% of a noisy mask's pixels decode to another class's colour
FALLBACK_FPS = 25.0  # for the rare stream whose frame rate ffmpeg cannot tell


@dataclass
class VideoInfo:
    """What ffmpeg says about a clip before decoding it: ``frames`` counted from the container (None
    when it cannot tell), ``audio`` whether it has an audio stream."""

    fps: float
    frames: int | None
    audio: bool


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _ffmpeg_file(path: str | Path, mode: str):
    """imageio's ffmpeg plugin opened on ``path`` (``mode`` "r" or "w"), or one line on how to install it."""
    try:
        import imageio.v3 as iio
        import imageio_ffmpeg  # noqa: F401  (the plugin's backend: without it the plugin fails late)
    except ImportError:
        raise FcnError(f"video needs imageio and imageio-ffmpeg, which are not installed; {INSTALL_HINT}") from None
    # imageio picks plugins by suffix and its ffmpeg list lacks .m4v; ffmpeg itself probes the content.
    return iio.imopen(str(path), mode, plugin="FFMPEG", extension=".mp4", legacy_mode=True)


def _reason(exc: BaseException) -> str:
    """The last line ffmpeg said (imageio appends its whole stderr), else the exception's first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    for prefix in ("Error opening input files: ", "Error opening input file "):
        last = last.removeprefix(prefix)
    return last[:200]


def _unreadable(path: Path, exc: BaseException) -> str:
    return (f"{path}: cannot read video ({_reason(exc)}); check that it plays, or re-encode it "
            "(e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)")


# --------------------------------------------------------------------------- reading


@contextmanager
def open_video(path: str | Path) -> Iterator[tuple[VideoInfo, Iterator[np.ndarray]]]:
    """(info, frames): the clip's (H, W, 3) uint8 RGB frames, decoded one at a time as they are taken.

    Every decoding problem is an FcnError naming the file; ffmpeg stops when the block ends."""
    path = Path(path)
    if not path.is_file():
        raise FcnError(f"{path}: file not found" if not path.exists() else f"{path}: not a video file")
    try:
        reader = _ffmpeg_file(path, "r").legacy_get_reader()
    except FcnError:
        raise
    except Exception as exc:  # imageio raises OSError / RuntimeError / ValueError by the failure
        raise FcnError(_unreadable(path, exc)) from None
    try:
        meta = reader.get_meta_data()
        fps = float(meta.get("fps") or 0) or FALLBACK_FPS
        yield VideoInfo(fps=fps, frames=_count(path), audio=bool(meta.get("audio_codec"))), _frames(reader, path)
    finally:
        reader.close()


def _frames(reader, path: Path) -> Iterator[np.ndarray]:
    it = reader.iter_data()
    while True:
        try:
            frame = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise FcnError(_unreadable(path, exc)) from None
        yield np.asarray(frame)


def _count(path: Path) -> int | None:
    """Frames in the clip's video stream, from the container (ffmpeg copies packets, decodes nothing)."""
    import imageio_ffmpeg

    try:
        return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
    except Exception:
        return None


# --------------------------------------------------------------------------- writing


def _codec(suffix: str, height: int, width: int, exact: bool) -> dict:
    """imageio writer settings: frames keep their exact size (no macro-block rescale); ``exact`` keeps
    full colour resolution (4:4:4)."""
    # 4:2:0 is what every player decodes but needs even sizes; odd ones go 4:4:4 instead of being rescaled.
    even = height % 2 == 0 and width % 2 == 0
    pixels = "yuv420p" if even and not exact else "yuv444p"
    if suffix.lower() == ".webm":  # WebM holds VP8/VP9/AV1, not H.264
        params = ["-crf", "32", "-b:v", "0", "-row-mt", "1", "-deadline", "good", "-cpu-used", "4"]
        return {"codec": "libvpx-vp9", "pixelformat": pixels, "output_params": params}
    return {"codec": "libx264", "pixelformat": pixels, "output_params": ["-crf", str(CRF), "-preset", "fast"]}


class VideoWriter:
    """Frames into ``path`` through a temporary file beside it: :meth:`finish` completes and checks the
    file, :meth:`commit` renames it into place, :meth:`discard` (any failure) removes it. ``exact``:
    4:4:4 colour (masks), else 4:2:0 (for watching)."""

    def __init__(self, path: str | Path, fps: float, exact: bool = True):
        self.path = Path(path)
        self.fps = float(fps)
        self.exact = exact
        self.frames = 0
        self._writer = None
        self._tmp: Path | None = None

    def append(self, frame: np.ndarray) -> None:
        if self._writer is None:
            self._open(frame.shape[0], frame.shape[1])
        try:
            self._writer.append_data(np.ascontiguousarray(frame, dtype=np.uint8))
        except Exception as exc:
            raise self._write_failed(exc) from None
        self.frames += 1

    def _open(self, height: int, width: int) -> None:
        from fcn_cli.images import _umask_mode

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=f".tmp{self.path.suffix}",
                                       dir=self.path.parent)
            os.fchmod(fd, _umask_mode())  # mkstemp's 0600 would outlive the rename
            os.close(fd)
        except OSError as exc:
            raise self._write_failed(exc) from None
        self._tmp = Path(tmp)
        settings = _codec(self.path.suffix, height, width, self.exact)
        settings["output_params"] += ["-f", MUXERS.get(self.path.suffix.lower(), "mp4")]
        # ffmpeg writes its diagnostics straight to our stderr; failures surface in finish()'s check instead.
        level = "error" if os.environ.get("FCN_DEBUG") else "quiet"
        try:
            self._writer = _ffmpeg_file(tmp, "w").legacy_get_writer(
                fps=self.fps, quality=None, macro_block_size=1, ffmpeg_log_level=level, **settings)
        except FcnError:
            raise
        except Exception as exc:
            raise self._write_failed(exc) from None

    def finish(self) -> None:
        """Close the encoder and check its file holds every frame: ffmpeg's own failures are silent."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        except Exception as exc:
            raise self._write_failed(exc) from None
        got = _count(self._tmp) if self._tmp is not None else None
        if got != self.frames:
            raise RuntimeFailure(f"{self.path}: the encoder wrote {got or 0} of {self.frames} frames; check the "
                                 "folder has space (FCN_DEBUG=1 shows ffmpeg's messages)")

    def commit(self) -> None:
        try:
            os.replace(self._tmp, self.path)
        except OSError as exc:
            raise self._write_failed(exc) from None
        self._tmp = None

    def discard(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass  # the file goes anyway
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _write_failed(self, exc: BaseException) -> FcnError:
        fix = "check the folder is writable and has space"
        if isinstance(exc, OSError) and exc.errno is not None:  # a full disk is a runtime failure (exit 3)
            return write_error(self.path, exc, fix)
        return RuntimeFailure(f"{self.path}: cannot write video ({_reason(exc)}); {fix}")


def write_video(path: str | Path, frames, fps: float, exact: bool = True) -> int:
    """Write (H, W, 3) uint8 frames as a video at ``fps`` (atomically: all of it or nothing); the frame count.
    Replaces ``path`` if it exists: callers check first. ``exact`` as for :class:`VideoWriter`."""
    writer = VideoWriter(path, fps, exact)
    try:
        for frame in frames:
            writer.append(frame)
        if not writer.frames:
            raise FcnError(f"{path}: no frames to write")
        writer.finish()
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    return writer.frames


# --------------------------------------------------------------------------- outputs


def mask_path(source: Path, output: str | Path | None) -> Path:
    """Where the mask video goes: ``-o`` naming a video file, else ``<stem>_mask.mp4`` in the folder
    ``-o`` names (default ``predictions/``)."""
    from fcn_cli.predict import DEFAULT_OUTPUT

    out = Path(output) if output is not None else None
    if out is not None and not out.is_dir() and out.suffix:
        if not is_video(out):
            raise FcnError(f"{out}: the masks of a video are written as a video; give an output name ending in "
                           f"{', '.join(VIDEO_SUFFIXES)}, or a folder")
        return out
    return (out if out is not None else DEFAULT_OUTPUT) / f"{source.stem}_mask{DEFAULT_SUFFIX}"


def overlay_path(mask: Path) -> Path:
    """``clip_mask.mp4`` -> ``clip_overlay.mp4``; ``out.mp4`` -> ``out_overlay.mp4``."""
    stem = mask.stem.removesuffix("_mask") or mask.stem
    return mask.with_name(f"{stem}_overlay{mask.suffix}")


def _check_target(target: Path, source: Path, overwrite: bool) -> None:
    if target.resolve() == source.resolve():
        raise FcnError(f"{target}: is the input video; refusing to overwrite it; choose another --output")
    if target.is_dir():
        raise FcnError(f"{target}: is a folder; choose another --output")
    if target.exists() and not overwrite:
        raise FcnError(f"{target}: exists; pass --overwrite to replace it or choose another --output")


# --------------------------------------------------------------------------- the command


def video_targets(source: Path, output, overlay: bool, legend: bool, raw: bool, overwrite: bool):
    """(mask video, overlay video or None, legend PNG or None) for ``source``, after every refusal that
    needs no decoding: --raw, the output names, imageio missing. Cheap: the CLI calls it before TensorFlow
    starts."""
    from fcn_cli.predict import LEGEND_NAME, _refusal

    if raw:
        raise FcnError(f"{source}: --raw writes class indices, which lossy video codecs would change; drop --raw "
                       "for a colour mask video, or predict the frames as PNG files")
    mask = mask_path(source, output)
    over = overlay_path(mask) if overlay else None
    for target in (mask, over):
        if target is not None:
            _check_target(target, source, overwrite)
    legend_file = mask.parent / LEGEND_NAME if legend else None
    if legend_file is not None and (reason := _refusal(legend_file, {source.resolve()}, overwrite)):
        raise FcnError(reason)
    if not (_installed("imageio") and _installed("imageio_ffmpeg")):
        raise FcnError(f"video needs imageio and imageio-ffmpeg, which are not installed; {INSTALL_HINT}")
    return mask, over, legend_file


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # sys.modules[name] is None: its import is blocked
        return False


def predict_video(
    source: str | Path,
    output: str | Path | None,
    model_path,
    classes_file=None,
    mode: str = "resize",
    overlay: bool = False,
    legend: bool = False,
    raw: bool = False,
    overwrite: bool = False,
    batch_size: int = 4,
    console=None,
    image_size=None,
    **inference_options,
):
    """Write the colour mask video of ``source`` (and its overlay video / a legend); a PredictResult.

    Everything that can be refused (``raw``, the output names, an unreadable clip) is, before the model
    loads. ``inference_options`` (flip, tile, ...) go to :func:`fcn_cli.inference.iter_predictions`."""
    from rich.console import Console
    from rich.markup import escape

    from fcn_cli.predict import PredictResult, legend_image, write_tagged_png

    console = console or Console()
    started = time.perf_counter()
    source = Path(source)
    mask, over, legend_file = video_targets(source, output, overlay, legend, raw, overwrite)

    result = PredictResult(output=mask)
    with open_video(source) as (info, frames):
        if info.audio:
            console.print(f"note: {escape(str(source))} has an audio track; the mask video has none (audio is dropped)",
                          highlight=False)
        classes, rate = _encode(source, frames, info, mask, over, model_path, classes_file, mode, image_size,
                                batch_size, console, inference_options, result)
    result.written, result.overlays = [mask], [over] if over is not None else []
    result.fps, result.audio_dropped = info.fps, info.audio
    if legend_file is not None:
        write_tagged_png(legend_file, legend_image(classes))
        result.legend = legend_file
    result.seconds = time.perf_counter() - started
    extras = ([f"overlay {over}"] if over is not None else []) + (["legend"] if result.legend else [])
    line = (f"wrote {mask}: {result.frames} frames at {rate:.1f} frames/s"
            + (f" (+ {', '.join(extras)})" if extras else "") + f" in {result.seconds:.1f} s")
    console.print(escape(line), highlight=False)
    return result


def _encode(source, frames, info, mask, over, model_path, classes_file, mode, size, batch_size, console,
            options, result):
    """Load the model, predict every frame, encode the outputs; (classes, frames per second predicted)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fcn_cli.inference import effective_mode, iter_predictions, load_for_inference, prefetch
    from fcn_cli.predict import overlay_image

    model, classes, recorded_size, _ = load_for_inference(model_path, classes_file)
    image_size = size or recorded_size
    used, _ = effective_mode(mode, image_size)
    if used != mode:
        console.print(f"{model_path}: the checkpoint records no training size; running in native mode",
                      highlight=False)
    batch_size = max(1, int(batch_size))
    writers = [VideoWriter(mask, info.fps)]
    if over is not None:
        writers.append(VideoWriter(over, info.fps, exact=False))  # for watching: 4:2:0 plays everywhere
    # Decoding (a background thread) overlaps inference; the key carries each frame on, for the overlay.
    decoded = prefetch(((frame, frame) for frame in frames), depth=2 * batch_size)
    predicted = iter_predictions(model, decoded, used, image_size, batch_size, output="labels", **options)
    progress = Progress(
        TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal,
    )
    began = time.perf_counter()
    try:
        with progress:
            task = progress.add_task("predict", total=info.frames, rate="")
            for n, (frame, labels) in enumerate(predicted, 1):
                colour = classes.colorize(labels)
                writers[0].append(colour)
                if over is not None:
                    writers[1].append(overlay_image(frame, colour))
                progress.update(task, advance=1, rate=f"{n / (time.perf_counter() - began):.1f} frames/s")
        rate = writers[0].frames / max(time.perf_counter() - began, 1e-9)
        if not writers[0].frames:
            raise FcnError(f"{source}: no video frames could be decoded; check that it plays, or re-encode it")
        for writer in writers:
            writer.finish()
        for writer in writers:  # renamed only once every output is complete
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    finally:
        predicted.close()
        decoded.close()  # stops the decoding thread before the caller closes ffmpeg
    result.frames = writers[0].frames
    return classes, rate


__all__ = ["VIDEO_SUFFIXES", "VideoInfo", "VideoWriter", "is_video", "mask_path", "open_video", "overlay_path",
           "predict_video", "write_video"]
