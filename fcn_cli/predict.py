"""`fcn predict`: masks for photos of any size, written safely.

Inputs are files, folders (searched recursively for image suffixes) and globs (``**`` allowed).
Outputs are PNGs at each photo's own size:

* one photo and ``-o NAME.png``: that file; otherwise ``-o`` is a folder (default ``predictions/``
  in the current folder) and the output tree mirrors the inputs: paths relative to the folder
  given (one folder input), else to the common parent of the inputs; always ``<stem>.png``;
* the mask is colourized with the class palette (RGB), or with ``raw`` an index PNG (palette
  PNG whose pixel values are class indices, readable by ``read_mask``);
* ``overlay``: ``<stem>_overlay.png``, the colour mask blended 50% over the photo;
* ``legend``: one ``legend.png`` per run in the output folder (class colours and names), so the
  masks themselves stay pure palette colours.

Safety: no output ever replaces an input; an existing file is replaced only with ``overwrite``
or when it is our own earlier output (every PNG written here carries the PNG text chunk
``Software=fcn predict``); files are written to a temporary name in their folder and renamed.
A photo that cannot be decoded, or whose outputs are refused, is reported and skipped; the rest
are still written; ``PredictResult.failed`` lists them (the CLI then exits non-zero).

Inputs that are exactly one video file (:data:`fcn_cli.video.VIDEO_SUFFIXES`) go to
:func:`fcn_cli.video.predict_video` instead: a mask video (``predictions/<stem>_mask.mp4``), one
clip per run.
"""

from __future__ import annotations

import glob
import io
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from fcn_cli import images
from fcn_cli.classes import ClassTable
from fcn_cli.errors import FcnError, RuntimeFailure, error_console, write_error

SOFTWARE_TAG = "fcn predict"
DEFAULT_OUTPUT = Path("predictions")
LEGEND_NAME = "legend.png"
GLOB_CHARS = set("*?[")


SUMMARY_SCHEMA = "fcn.predict/1"


@dataclass
class PredictResult:
    """``written``: the mask files; ``failed``: (input photo, or the refused output, one-line reason).

    A video run also sets ``frames`` (written), ``fps`` (the clip's frame rate, also the output's) and
    ``audio_dropped`` (the clip had an audio track the outputs lack); they stay None for photos."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    legend: Path | None = None
    skipped: list[Path] = field(default_factory=list)  # earlier fcn outputs found among the inputs
    output: Path | None = None
    seconds: float = 0.0
    frames: int | None = None
    fps: float | None = None
    audio_dropped: bool | None = None

    def summary(self) -> dict:
        """The machine-readable report (``fcn predict --json``): plain JSON types, paths as given."""
        return {
            "schema": SUMMARY_SCHEMA,
            "output": None if self.output is None else str(self.output),
            "written": [str(p) for p in self.written],
            "overlays": [str(p) for p in self.overlays],
            "legend": None if self.legend is None else str(self.legend),
            "failed": [{"input": str(path), "reason": reason} for path, reason in self.failed],
            "skipped": [str(p) for p in self.skipped],
            "seconds": round(self.seconds, 3),
            "frames": self.frames,
            "fps": self.fps,
            "audio_dropped": self.audio_dropped,
        }


@dataclass
class _Job:
    source: Path
    mask: Path
    overlay: Path | None = None


# --------------------------------------------------------------------------- PNG writing


def write_tagged_png(path: str | Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Atomically write an (H, W, 3) RGB or (H, W) index array (with ``palette``: a palette PNG whose
    pixel values are the indices) as PNG, tagged ``Software=fcn predict``."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if palette is not None:
        img = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        img.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
    else:
        img = Image.fromarray(array)
    info = PngInfo()
    info.add_text("Software", SOFTWARE_TAG)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        images.atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise write_error(path, exc, "check the folder is writable and has space") from None


def is_own_output(path: str | Path) -> bool:
    """Whether ``path`` is a PNG this tool wrote (it carries ``Software=fcn predict``)."""
    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == SOFTWARE_TAG
    except Exception:
        return False


def overlay_image(photo: np.ndarray, colour_mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The colour mask blended at ``alpha`` over the photo."""
    mixed = photo.astype(np.float32) * (1.0 - alpha) + colour_mask.astype(np.float32) * alpha
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def legend_image(classes: ClassTable) -> np.ndarray:
    """(H, W, 3) legend: one row per class, a colour swatch then the name (Pillow's default font)."""
    font = ImageFont.load_default()
    labels = [
        f"{i:2d}  {name}" + ("  (ignored)" if i == classes.ignore_index else "")
        for i, name in enumerate(classes.names)
    ]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), text, font=font) for text in labels]
    text_w = max(b[2] - b[0] for b in boxes)
    text_h = max(b[3] - b[1] for b in boxes)
    pad, swatch_w = 8, 36
    row = max(20, text_h + 8)
    width = pad + swatch_w + pad + text_w + pad
    height = pad + row * len(labels) + pad
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, (text, colour) in enumerate(zip(labels, classes.colors)):
        y = pad + i * row
        draw.rectangle([pad, y + 2, pad + swatch_w, y + row - 3], fill=tuple(colour), outline=(0, 0, 0))
        draw.text((pad + swatch_w + pad, y + (row - text_h) // 2 - boxes[i][1]), text, fill=(0, 0, 0), font=font)
    return np.asarray(img)


# --------------------------------------------------------------------------- inputs and outputs


def expand_inputs(inputs: Sequence[str], exclude: Path | None = None):
    """(files, base folder, missing, skipped): the photos named by files, folders and globs.

    ``base`` is the folder output paths are relative to: the folder itself for one folder
    input, else the common parent of every input's folder. Folder and glob matches skip PNGs we
    wrote (``skipped``); folder searches also skip hidden files and an output folder ``exclude``
    nested inside the searched folder.
    """
    found: dict[Path, Path] = {}  # resolved -> as given
    anchors: list[Path] = []
    folders: list[Path] = []
    missing: list[tuple[Path, str]] = []
    skipped: list[Path] = []
    exclude = exclude.resolve() if exclude is not None else None

    def add(path: Path, searched: bool, skip_under: Path | None = None) -> None:
        key = path.resolve()
        if key in found:
            return
        if searched:
            if skip_under is not None and key.is_relative_to(skip_under):
                return
            if path.suffix.lower() == ".png" and is_own_output(path):
                skipped.append(path)
                return
        found[key] = path

    def add_folder(folder: Path) -> None:
        folders.append(folder)
        anchors.append(folder)
        # An output folder inside the searched one holds our masks, not photos.
        here = folder.resolve()
        skip_under = exclude if exclude is not None and exclude != here and exclude.is_relative_to(here) else None
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if path.is_file() and path.suffix.lower() in images.IMAGE_SUFFIXES:
                add(path, searched=True, skip_under=skip_under)

    for text in inputs:
        text = str(text)
        path = Path(text)
        if path.is_dir():
            add_folder(path)
        elif path.is_file():
            anchors.append(path.parent)
            add(path, searched=False)
        elif GLOB_CHARS & set(text):
            for match in sorted(glob.glob(text, recursive=True)):
                m = Path(match)
                if m.is_dir():
                    continue  # "photos/**" also lists folders; their files match as well
                if m.is_file() and m.suffix.lower() in images.IMAGE_SUFFIXES:
                    anchors.append(m.parent)
                    add(m, searched=True)
        else:
            missing.append((path, f"{path}: file not found"))
    files = list(found.values())
    if len(folders) == 1 and len(anchors) == 1:
        base = folders[0]
    elif anchors:
        base = Path(os.path.commonpath([os.path.abspath(a) for a in anchors]))
    else:
        base = Path(".")
    return files, base, missing, skipped


def _relative(path: Path, base: Path) -> Path:
    # Absolute, not resolved: a folder of symlinked photos keeps its own structure.
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(base))
    except ValueError:
        return Path(path.name)


class _Names:
    """Hands out output paths, adding -2, -3, ... when two outputs would share a name."""

    def __init__(self):
        self.taken: set[str] = set()

    def claim(self, path: Path) -> Path:
        candidate, n = path, 1
        while os.path.normcase(str(candidate.absolute())) in self.taken:
            n += 1
            candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        self.taken.add(os.path.normcase(str(candidate.absolute())))
        return candidate


def _plan(files: list[Path], base: Path, output: str | None, overlay: bool, legend: bool):
    """(jobs, output folder, legend path or None, whether -o names the one mask file)."""
    out = Path(output) if output is not None else None
    names = _Names()
    as_file = out is not None and not out.is_dir() and out.suffix.lower() in images.IMAGE_SUFFIXES
    if as_file and len(files) == 1:
        if out.suffix.lower() != ".png":
            raise FcnError(f"{out}: masks are written as PNG; give an output name ending in .png, or a folder")
        jobs = [_Job(files[0], names.claim(out))]
        folder = out.parent
    else:
        folder = out if out is not None else DEFAULT_OUTPUT
        if folder.exists() and not folder.is_dir():
            raise FcnError(
                f"{folder}: exists and is not a folder; {len(files)} inputs need an output folder (-o DIR)"
            )
        if as_file:
            raise FcnError(
                f"{folder}: {len(files)} input photos need an output folder, not an image file name; pass -o DIR"
            )
        jobs = [_Job(f, names.claim(folder / _relative(f, base).with_suffix(".png"))) for f in files]
    if overlay:
        for job in jobs:
            job.overlay = names.claim(job.mask.with_name(f"{job.mask.stem}_overlay.png"))
    legend_path = names.claim(folder / LEGEND_NAME) if legend else None
    return jobs, folder, legend_path, as_file and len(files) == 1


def _refusal(target: Path, inputs: set[Path], overwrite: bool) -> str | None:
    """Why ``target`` may not be written, or None."""
    resolved = target.resolve()
    if resolved in inputs:
        return f"{target}: is one of the input photos; refusing to overwrite it; choose another --output"
    if target.is_dir():
        return f"{target}: is a folder; choose another --output"
    if target.exists() and not overwrite and not is_own_output(target):
        return f"{target}: exists and was not written by fcn predict; pass --overwrite to replace it or choose another --output"
    return None


# --------------------------------------------------------------------------- the command


def predict(
    inputs: Sequence[str] | str,
    output: str | None,
    model_path,
    classes_file=None,
    mode: str = "resize",
    overlay: bool = False,
    legend: bool = False,
    raw: bool = False,
    overwrite: bool = False,
    batch_size: int = 4,
    console=None,
    workers: int | None = None,
    image_size=None,
    **inference_options,
) -> PredictResult:
    """Write a mask (and optionally an overlay / a legend) for every photo found in ``inputs``, or the
    mask video of the one video they name (:func:`fcn_cli.video.predict_video`).

    ``image_size`` (H, W) overrides the checkpoint's inference size in resize mode.
    ``inference_options`` (tile, overlap, tile_budget, flip, ...) go to
    :func:`fcn_cli.inference.iter_predictions`.
    """
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    failures = error_console()
    started = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [str(inputs)]
    clip = _one_video(inputs)
    if clip is not None:
        from fcn_cli.video import predict_video

        return predict_video(clip, output, model_path, classes_file=classes_file, mode=mode, overlay=overlay,
                             legend=legend, raw=raw, overwrite=overwrite, batch_size=batch_size, console=console,
                             image_size=image_size, **inference_options)
    # Files already under the output folder are not inputs (earlier masks would be re-predicted).
    exclude = DEFAULT_OUTPUT if output is None else Path(output)
    if output is not None and not exclude.is_dir() and exclude.suffix.lower() in images.IMAGE_SUFFIXES:
        exclude = None
    files, base, missing, skipped = expand_inputs(inputs, exclude=exclude)
    if not files:
        if missing:
            more = f" (and {len(missing) - 1} more inputs not found)" if len(missing) > 1 else ""
            raise FcnError(f"{missing[0][1]}{more}; give existing image files, folders or globs")
        shown = ", ".join(str(i) for i in inputs) or "(none)"
        raise FcnError(
            f"{shown}: no images found; give image files ({', '.join(images.IMAGE_SUFFIXES)}), folders or globs"
        )
    result = PredictResult(failed=list(missing), skipped=skipped)
    for _, message in missing:
        failures.print(f"[red]skipped[/] {escape(message)}", highlight=False)
    if skipped:
        console.print(f"left out {len(skipped)} PNG(s) written by an earlier fcn predict run", highlight=False)

    jobs, folder, legend_path, single = _plan(files, base, output, overlay, legend)
    result.output = jobs[0].mask if single else folder
    input_set = {f.resolve() for f in files}
    runnable: list[_Job] = []
    for job in jobs:
        reason = next(
            (r for r in (_refusal(t, input_set, overwrite) for t in (job.mask, job.overlay) if t is not None) if r),
            None,
        )
        if reason:
            result.failed.append((job.source, reason))
            failures.print(f"[red]skipped[/] {escape(reason)}", highlight=False)
        else:
            runnable.append(job)
    if legend_path is not None:
        reason = _refusal(legend_path, input_set, overwrite)
        if reason:
            result.failed.append((legend_path, reason))
            failures.print(f"[red]skipped[/] {escape(reason)}", highlight=False)
            legend_path = None

    if runnable:
        classes = _run(runnable, model_path, classes_file, mode, raw, batch_size, console, workers, result,
                       image_size, inference_options)
        if legend_path is not None and result.written:
            try:
                write_tagged_png(legend_path, legend_image(classes))
                result.legend = legend_path
            except FcnError as exc:
                result.failed.append((legend_path, str(exc)))
                failures.print(f"[red]skipped[/] {escape(str(exc))}", highlight=False)

    result.seconds = time.perf_counter() - started
    extras = []
    if result.overlays:
        extras.append(f"{len(result.overlays)} overlays")
    if result.legend:
        extras.append("legend")
    if result.written:
        line = (
            f"wrote {len(result.written)} {'index' if raw else 'colour'} mask(s)"
            + (f" (+ {', '.join(extras)})" if extras else "")
            + f" to {result.output} in {result.seconds:.1f} s"
        )
    else:
        line = "no masks written"
    if result.failed:
        line += f"; {len(result.failed)} failed (listed above)"
    console.print(escape(line), highlight=False, style="red" if result.failed else None)
    return result


def check_video_request(inputs: Sequence[str], output, overlay: bool, legend: bool, raw: bool, overwrite: bool) -> None:
    """When ``inputs`` name a video: every refusal that needs neither the model nor decoding, now (the CLI
    calls this before TensorFlow starts)."""
    clip = _one_video(inputs)
    if clip is not None:
        from fcn_cli.video import video_targets

        video_targets(clip, output, overlay, legend, raw, overwrite)


def _one_video(inputs: Sequence[str]) -> Path | None:
    """The video file when ``inputs`` name exactly one (a file or a glob's one match) and nothing else;
    None when they name no video. Folders are searched for photos only."""
    from fcn_cli.video import is_video

    videos: list[Path] = []
    others = 0
    for text in map(str, inputs):
        path = Path(text)
        if path.is_file() or path.is_dir() or not (GLOB_CHARS & set(text)):
            matches = [path]
        else:
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
        for match in matches:
            if match.is_file() and is_video(match):
                videos.append(match)
            elif match.is_dir() or match.suffix.lower() in images.IMAGE_SUFFIXES or not match.exists():
                others += 1
    if not videos:
        return None
    if len(videos) > 1 or others:
        shown = ", ".join(str(v) for v in videos[:3]) + (", ..." if len(videos) > 3 else "")
        raise FcnError(f"{shown}: predict videos one at a time, without photos (one video per fcn predict)")
    return videos[0]


def _run(jobs, model_path, classes_file, mode, raw, batch_size, console, workers, result, size, options) -> ClassTable:
    """Load the model, predict every job, write its files; record outcomes in ``result``; the classes."""
    failures = error_console()
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fcn_cli.inference import effective_mode, iter_predictions, load_for_inference

    model, classes, recorded_size, _ = load_for_inference(model_path, classes_file)
    image_size = size or recorded_size
    used, _ = effective_mode(mode, image_size)
    if used != mode:
        console.print(
            f"{model_path}: the checkpoint records no training size; running in native mode", highlight=False
        )
    batch_size = max(1, int(batch_size))
    workers = workers or max(1, min(8, (os.cpu_count() or 1)))
    palette = classes.palette
    outcomes: dict[int, tuple[list[Path], Path | None, str | None]] = {}

    def write(index: int, job: _Job, photo: np.ndarray, labels: np.ndarray):
        try:
            colour = classes.colorize(labels) if (job.overlay is not None or not raw) else None
            if raw:
                write_tagged_png(job.mask, labels, palette=palette)
            else:
                write_tagged_png(job.mask, colour)
            if job.overlay is not None:
                write_tagged_png(job.overlay, overlay_image(photo, colour))
            outcomes[index] = ([job.mask], job.overlay, None)
        except RuntimeFailure:
            raise  # a full disk fails every photo after it: stop the run (exit 3), do not list them all
        except FcnError as exc:
            outcomes[index] = ([], None, str(exc))

    progress = Progress(
        TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    )
    with progress, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fcn-read") as readers, \
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="fcn-write") as writers:
        task = progress.add_task("predict", total=len(jobs))

        def decoded() -> Iterator[tuple[tuple[int, _Job, np.ndarray], np.ndarray]]:
            for index, job, image, error in _read_ahead(readers, jobs, lookahead=batch_size * 2 + workers):
                if error is not None:
                    outcomes[index] = ([], None, error)
                    failures.print(f"[red]skipped[/] {escape(error)}", highlight=False)
                    progress.advance(task)
                    continue
                yield (index, job, image), image  # the key carries the photo on, for the overlay

        pending: deque[Future] = deque()
        for (index, job, photo), labels in iter_predictions(
            model, decoded(), used, image_size, batch_size, output="labels", **options
        ):
            future = writers.submit(write, index, job, photo, labels)
            future.add_done_callback(lambda _f: progress.advance(task))
            pending.append(future)
            while len(pending) > 2 * batch_size:
                pending.popleft().result()
        for future in pending:
            future.result()

    for index, job in enumerate(jobs):
        written, overlay_path, error = outcomes.get(index, ([], None, f"{job.source}: not processed"))
        if error is not None:
            result.failed.append((job.source, error))
            continue
        result.written.extend(written)
        if overlay_path is not None:
            result.overlays.append(overlay_path)
    return classes


def _read_ahead(pool: ThreadPoolExecutor, jobs: list[_Job], lookahead: int):
    """(index, job, image or None, error or None) in order, decoding ``lookahead`` photos ahead."""

    def read(path: Path):
        try:
            return images.read_image(path), None
        except FcnError as exc:
            return None, str(exc)
        except Exception as exc:  # a decoder crash on a broken file must not stop the run
            return None, f"{path}: cannot decode image ({type(exc).__name__}: {exc}); replace or remove the file"

    it = iter(enumerate(jobs))
    pending = deque((i, job, pool.submit(read, job.source)) for i, job in islice(it, max(1, lookahead)))
    while pending:
        index, job, future = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt[0], nxt[1], pool.submit(read, nxt[1].source)))
        image, error = future.result()
        yield index, job, image, error
