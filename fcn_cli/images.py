"""Reading photos and masks the way users expect, and writing PNGs without ever leaving half a file.

Photos: PNG or JPEG (anything Pillow opens), EXIF orientation applied, grayscale / RGBA / palette /
16-bit converted to 8-bit RGB. Masks: single-channel index PNGs (class index per pixel) or colour
PNGs mapped through the class palette.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fcn_cli.classes import ClassTable
from fcn_cli.errors import FcnError, write_error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Decoding more pixels than this would need gigabytes; refuse with a clear limit instead.
MAX_PIXELS = 120_000_000
Image.MAX_IMAGE_PIXELS = None  # we apply our own limit (above) with a clear message


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:
            raise FcnError(
                f"{path}: {img.width}x{img.height} is over the {MAX_PIXELS:,}-pixel limit; downscale it first"
            )
        img.load()
        return img
    except FileNotFoundError:
        raise FcnError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise FcnError(f"{path}: is a folder, expected an image file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise FcnError(f"{path}: cannot decode image ({exc}); replace or remove the file") from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        # 16-bit (or 32-bit "I") images: scale the full range down to 8 bits.
        top = 65535 if arr.max(initial=0) > 255 else 255
        return (arr.astype(np.float64) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
    return (arr.astype(np.float64).clip(0, 1) * 255).round().astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, upright as the camera meant it."""
    path = Path(path)
    img = ImageOps.exif_transpose(_open(path))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = _to_uint8(np.asarray(img))
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels over white, as viewers show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    arr = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(arr)


def read_mask(path: str | Path, classes: ClassTable) -> np.ndarray:
    """(H, W) uint8 class indices. Raises FcnError naming the file for unknown values or colours."""
    path = Path(path)
    img = _open(path)
    if img.mode in ("RGB", "RGBA") or (img.mode == "P" and _palette_is_colour_mask(img, classes)):
        rgb = np.asarray(img.convert("RGB"))
        index, unknown = classes.decolorize(rgb)
        if unknown.any():
            ys, xs = np.nonzero(unknown)
            colour = tuple(int(v) for v in rgb[ys[0], xs[0]])
            raise FcnError(
                f"{path}: {int(unknown.sum())} pixels have colour {colour} (first at x={xs[0]}, y={ys[0]}) "
                f"that is not in the class palette; fix the mask or give a --classes file with that colour"
            )
        return index
    if img.mode == "P":
        index = np.asarray(img)  # palette index = class index
    elif img.mode in ("L", "I;16", "I;16B", "I;16L", "I"):
        index = np.asarray(img)
    elif img.mode == "LA":
        index = np.asarray(img.getchannel("L"))
    else:
        raise FcnError(f"{path}: mask mode {img.mode} is neither an index nor an RGB colour mask")
    top = int(index.max(initial=0))
    if top >= classes.num_classes:
        bad = int((index >= classes.num_classes).sum())
        raise FcnError(
            f"{path}: mask value {top} is not a class index (0..{classes.num_classes - 1}, {bad} pixels); "
            "fix the mask or give a --classes file with more classes"
        )
    return index.astype(np.uint8)


def _palette_is_colour_mask(img: Image.Image, classes: ClassTable) -> bool:
    """A palette PNG whose palette holds the class colours at other indices is a colour mask."""
    pal = img.getpalette() or []
    used = np.unique(np.asarray(img))
    colours = {tuple(pal[3 * i : 3 * i + 3]) for i in used if 3 * i + 3 <= len(pal)}
    class_colours = set(classes.colors)
    by_index = all(
        i < classes.num_classes and tuple(pal[3 * i : 3 * i + 3]) == classes.colors[i] for i in used
    )
    return not by_index and colours <= class_colours and len(colours) > 0


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            return h, w
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError) as exc:
        raise FcnError(f"{path}: cannot read image ({exc})") from None


def _umask_mode() -> int:
    """The mode a plain open() would give a new file (mkstemp's own is 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_png(path: str | Path, array: np.ndarray, palette: np.ndarray | None = None) -> None:
    """Atomically write an (H, W) or (H, W, 3) uint8 array as PNG (a palette PNG when ``palette`` is given)."""
    import io

    img = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if palette is not None:
        img = img.convert("P") if img.mode != "L" else Image.fromarray(np.asarray(array, np.uint8), mode="P")
        img.putpalette(np.asarray(palette, np.uint8).reshape(-1).tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise write_error(path, exc, "check the folder exists, is writable and has space") from None
