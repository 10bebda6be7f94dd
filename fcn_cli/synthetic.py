"""Procedural street scenes with CamVid labels: a data set that needs no download.

Each scene has the CamVid layout of a dash-cam frame: sky above a horizon, buildings with windows,
a road in perspective with lane marks, sidewalks, trees, poles with signs, fences, cars, pedestrians,
cyclists and a few void regions. Every object gets its own tint, texture and noise, the whole frame an
illumination gradient and a light blur, so a tiny FCN has to learn colour *and* texture, yet can.

Output is the SegNet layout (``train/ trainannot/ val/ valannot/ test/ testannot/``): RGB PNG photos
and single-channel index PNG masks. Each image draws from its own generator seeded by (seed, split,
index), so a seed always gives the same bytes, and sets of different sizes share their first images.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fcn_cli.errors import FcnError, write_error
from fcn_cli.images import atomic_write_bytes, write_png

SKY, BUILDING, POLE, ROAD, SIDEWALK, VEGETATION, SIGN, FENCE, VEHICLE, PEDESTRIAN, BICYCLIST, VOID = range(12)
SPLITS = ("train", "val", "test")
MARKER = "fcn-synthetic.json"
MIN_SIDE, MAX_SIDE = 32, 4096
_OUR_FILE = re.compile(r"(train|val|test)(annot)?/\.?scene_\d+\.png(\..*\.tmp)?")


def generate_synthetic(
    dest: str | Path,
    count: int = 64,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
    val_count: int | None = None,
    test_count: int | None = None,
) -> dict[str, int]:
    """Write ``count`` training scenes of ``size`` (height, width) plus val and test ones; returns pairs per split.

    val and test default to max(2, count // 4) scenes each; 0 leaves the split out. ``dest`` must be new,
    empty, or an earlier synthetic set (recognised by its fcn-synthetic.json), which is replaced.
    """
    dest = Path(dest)
    counts = _split_counts(count, val_count, test_count)
    height, width = _checked_size(size)
    if seed < 0:
        raise FcnError(f"seed must be 0 or more, got {seed}")
    previous = _previous_files(dest)
    params = {"count": count, "size": [height, width], "seed": seed, "counts": counts}
    try:
        _write_marker(dest, params, complete=False)  # first, so an interrupted run is recognised and redone
        written = set()
        for split_code, (split, n) in enumerate(counts.items()):
            written |= _write_split(dest, split, n, (seed, split_code), height, width)
        _remove_stale(dest, previous, written)
        _write_marker(dest, params, complete=True)
    except OSError as exc:
        raise write_error(dest, exc, "check it is writable and has space") from None
    return counts


def _write_split(dest: Path, split: str, n: int, seed: tuple[int, int], height: int, width: int) -> set[Path]:
    """Scenes 0..n-1 of one split as photo + mask PNGs; returns the paths written."""
    if n == 0:
        return set()
    images, masks = dest / split, dest / f"{split}annot"
    images.mkdir(exist_ok=True)
    masks.mkdir(exist_ok=True)
    digits = max(5, len(str(n - 1)))
    written = set()
    for index in range(n):
        photo, label = render_scene(np.random.default_rng([*seed, index]), height, width)
        name = f"scene_{index:0{digits}d}.png"
        # Same PIL settings every time and no metadata, so equal arrays give equal bytes.
        write_png(images / name, photo)
        write_png(masks / name, label)
        written |= {images / name, masks / name}
    return written


def _split_counts(count: int, val_count: int | None, test_count: int | None) -> dict[str, int]:
    if count < 1:
        raise FcnError(f"count must be at least 1, got {count}")
    default = max(2, count // 4)
    counts = {"train": count, "val": default if val_count is None else val_count,
              "test": default if test_count is None else test_count}
    if min(counts.values()) < 0:
        raise FcnError(f"scene counts cannot be negative, got {counts}")
    return counts


def _checked_size(size: tuple[int, int]) -> tuple[int, int]:
    height, width = (int(v) for v in size)
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        raise FcnError(f"size {height}x{width} (HxW): each side must be {MIN_SIDE}..{MAX_SIDE} pixels")
    return height, width


def _previous_files(dest: Path) -> list[Path]:
    """Files of an earlier synthetic set in ``dest`` ([] for a new or empty folder); FcnError for any other files."""
    if not dest.exists():
        return []
    if not dest.is_dir():
        raise FcnError(f"{dest}: is a file; give a new or empty folder for the synthetic set")
    files = sorted(p for p in dest.rglob("*") if not p.is_dir())
    if not files:
        return []
    foreign = [p for p in files if p.name != MARKER and not _OUR_FILE.fullmatch(p.relative_to(dest).as_posix())]
    if foreign or not (dest / MARKER).is_file():
        example = (foreign or files)[0].relative_to(dest)
        raise FcnError(
            f"{dest}: folder holds files that are not a synthetic set (e.g. {example}); give a new or empty folder"
        )
    return files


def _remove_stale(dest: Path, previous: list[Path], written: set[Path]) -> None:
    """Delete what an earlier, larger set left behind, and split folders this set does not use."""
    for path in previous:
        if path.name != MARKER and path not in written:
            path.unlink(missing_ok=True)
    for folder in sorted({p.parent for p in previous if p.parent != dest}):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _write_marker(dest: Path, params: dict, complete: bool) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    data = {"generator": "fcn-cli synthetic", "version": 1, **params, "complete": complete}
    atomic_write_bytes(dest / MARKER, (json.dumps(data, indent=2) + "\n").encode())


# --------------------------------------------------------------------------- drawing


class _Canvas:
    """A photo (float RGB, 0..255) and its label map, painted back to front."""

    def __init__(self, rng: np.random.Generator, height: int, width: int):
        self.rng = rng
        self.h, self.w = height, width
        self.base = height / 2  # first row of ground, set by render_scene
        self.left = self.right = np.zeros(height, np.float32)  # road edges per row, set by _ground
        self.photo = np.zeros((height, width, 3), np.float32)
        self.label = np.full((height, width), VOID, np.uint8)
        self.y, self.x = np.ogrid[0:height, 0:width]
        self.y = self.y.astype(np.float32)
        self.x = self.x.astype(np.float32)
        # Shared texture fields in [-1, 1]: fine grain and larger blotches.
        self.grain = _smooth_noise(rng, height, width, cell=2)
        self.blotch = _smooth_noise(rng, height, width, cell=max(4, height // 12))

    def paint(self, region: np.ndarray, cls: int, colour, texture: float = 0.0, field: np.ndarray | None = None):
        """Label ``region`` ``cls``; colour it ``colour`` (RGB or (H, W, 3) image) times (1 + texture * field)."""
        if not region.any():
            return
        self.label[region] = cls
        colour = np.asarray(colour, np.float32)
        pixels = colour[region] if colour.ndim == 3 else np.broadcast_to(colour, (int(region.sum()), 3))
        if texture:
            pixels = pixels * (1.0 + texture * (self.grain if field is None else field)[region][:, None])
        self.photo[region] = pixels

    def polygon(self, points) -> np.ndarray:
        img = Image.new("1", (self.w, self.h), 0)
        ImageDraw.Draw(img).polygon([(float(x), float(y)) for x, y in points], fill=1)
        return np.asarray(img, dtype=bool)

    def rect(self, x0, y0, x1, y1) -> np.ndarray:
        return (self.x >= x0) & (self.x < x1) & (self.y >= y0) & (self.y < y1)

    def ellipse(self, cx, cy, rx, ry) -> np.ndarray:
        return ((self.x - cx) / max(rx, 0.5)) ** 2 + ((self.y - cy) / max(ry, 0.5)) ** 2 <= 1.0

    def tint(self, colour, spread) -> np.ndarray:
        """``colour`` shifted by a random per-object offset of up to ``spread`` per channel."""
        return np.clip(np.asarray(colour, np.float32) + self.rng.uniform(-spread, spread, 3), 0, 255)

    def nearness(self, y: float) -> float:
        """0 at the ground's far edge, 1 at the bottom row: how much bigger things look at row ``y``."""
        return float(np.clip((y - self.base) / max(self.h - self.base, 1), 0, 1))


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Value noise in [-1, 1]: random values every ``cell`` pixels, bilinearly interpolated."""
    small = rng.random((height // cell + 2, width // cell + 2), dtype=np.float32)
    big = Image.fromarray(small * 2 - 1).resize((width + cell, height + cell), Image.BILINEAR)
    return np.asarray(big)[:height, :width]


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: (H, W, 3) uint8 photo and (H, W) uint8 CamVid label indices."""
    c = _Canvas(rng, height, width)
    horizon = rng.uniform(0.36, 0.5) * height
    vanish_x = rng.uniform(0.35, 0.65) * width
    c.base = horizon + rng.uniform(0.0, 0.05) * height  # where buildings meet the ground
    _sky(c, horizon)
    _buildings(c, vanish_x)
    _ground(c, vanish_x)
    _fence(c)
    _trees(c)
    _poles(c)
    _people(c)
    _cars(c)
    _void(c)
    return _finish(c), c.label


def _sky(c: _Canvas, horizon: float) -> None:
    top = c.tint((120, 160, 215), 25)
    low = c.tint((205, 215, 228), 15)
    t = np.clip(c.y / max(horizon, 1), 0, 1)[..., None]
    gradient = np.broadcast_to(top * (1 - t) + low * t, (c.h, c.w, 3))
    clouds = np.clip(c.blotch, 0, 1)[..., None] * 40  # whitish blotches
    c.paint(np.ones((c.h, c.w), bool), SKY, np.minimum(gradient + clouds, 255), texture=0.02)


def _buildings(c: _Canvas, vanish_x: float) -> None:
    x = -c.rng.uniform(0, 0.1) * c.w
    while x < c.w:
        bw = c.rng.uniform(0.12, 0.32) * c.w
        if c.rng.random() < 0.12:  # a gap shows the sky
            x += bw * 0.5
            continue
        centre = x + bw / 2
        # Nearer the image sides (farther from the vanishing point) buildings look taller.
        rise = (0.25 + 0.9 * abs(centre - vanish_x) / c.w + c.rng.uniform(-0.1, 0.25)) * c.base
        top = max(c.base - rise, -1.0)
        region = c.rect(x, top, x + bw, c.base + 1)
        wall = c.tint(_pick(c.rng, [(150, 80, 60), (170, 150, 120), (120, 110, 105), (190, 170, 150)]), 20)
        c.paint(region, BUILDING, wall, texture=0.10, field=c.blotch)
        _windows(c, region, x, top)
        x += bw


def _windows(c: _Canvas, region: np.ndarray, x0: float, y0: float) -> None:
    pitch_x = c.rng.uniform(0.035, 0.07) * c.w
    pitch_y = c.rng.uniform(0.06, 0.1) * c.h
    fx = ((c.x - x0) % pitch_x) / pitch_x
    fy = ((c.y - y0) % pitch_y) / pitch_y
    panes = region & (fx > 0.3) & (fx < 0.8) & (fy > 0.3) & (fy < 0.75)
    glass = c.tint(_pick(c.rng, [(50, 60, 80), (90, 110, 130), (40, 40, 45)]), 15)
    c.paint(panes, BUILDING, glass, texture=0.15)


def _ground(c: _Canvas, vanish_x: float) -> None:
    """Sidewalk, then the road trapezoid with lane marks; sets the road's edges per row."""
    c.paint(c.rect(0, c.base, c.w, c.h + 1), SIDEWALK, c.tint((175, 160, 150), 15), texture=0.08)
    tiles = (c.y >= c.base) & (((c.y - c.base) % max(3.0, 0.05 * c.h)) < 1) & (c.label == SIDEWALK)
    c.paint(tiles, SIDEWALK, c.tint((140, 125, 115), 10))
    half_far = c.rng.uniform(0.01, 0.04) * c.w
    left_bottom = c.rng.uniform(-0.35, 0.15) * c.w
    right_bottom = c.rng.uniform(0.85, 1.35) * c.w
    t = np.clip((np.arange(c.h, dtype=np.float32) - c.base) / max(c.h - c.base, 1), 0, 1)
    left = vanish_x - half_far + t * (left_bottom - vanish_x + half_far)
    right = vanish_x + half_far + t * (right_bottom - vanish_x - half_far)
    road = (c.y >= c.base) & (c.x >= left[:, None]) & (c.x <= right[:, None])
    c.paint(road, ROAD, c.tint((88, 84, 90), 12), texture=0.12)
    centre = (left + right) / 2
    half_mark = np.maximum(0.6, 0.012 * (right - left))[:, None]
    dashes = (np.sqrt(t) * 9 % 1.0 < 0.5)[:, None]  # dash length shrinks towards the horizon
    marks = road & (np.abs(c.x - centre[:, None]) < half_mark) & dashes & (t[:, None] > 0.05)
    c.paint(marks, ROAD, c.tint((225, 220, 200), 15), texture=0.05)
    c.left, c.right = left, right


def _fence(c: _Canvas) -> None:
    if c.rng.random() > 0.6:
        return
    left_side = c.rng.random() < 0.5
    far_x = c.rng.uniform(0.2, 0.4) * c.w
    near_y = c.base + c.rng.uniform(0.15, 0.35) * (c.h - c.base)
    near_x = 0.0 if left_side else c.w
    if not left_side:
        far_x = c.w - far_x
    far_h, near_h = 0.04 * c.h, c.rng.uniform(0.1, 0.18) * c.h
    region = c.polygon([(far_x, c.base - far_h), (near_x, near_y - near_h), (near_x, near_y), (far_x, c.base)])
    colour = c.tint(_pick(c.rng, [(120, 95, 70), (110, 110, 115)]), 15)
    pitch = max(3.0, 0.02 * c.w)
    bars = ((c.x % pitch) < pitch * 0.35) | (((c.x + c.y) % (2 * pitch)) < pitch * 0.3)
    c.paint(region, FENCE, colour * 0.55, texture=0.05)  # shadowed gaps between the bars
    c.paint(region & bars, FENCE, colour, texture=0.08)


def _trees(c: _Canvas) -> None:
    for _ in range(c.rng.integers(0, 4)):
        foot_y, x = _sidewalk_spot(c)
        scale = 0.3 + 0.7 * c.nearness(foot_y)
        height = (0.35 + 0.3 * c.rng.random()) * c.h * scale + 0.1 * c.h
        trunk_w = max(1.5, 0.015 * c.w * scale)
        c.paint(c.rect(x - trunk_w / 2, foot_y - height * 0.6, x + trunk_w / 2, foot_y), VEGETATION,
                c.tint((90, 70, 45), 10), texture=0.1)
        leaves = np.zeros((c.h, c.w), bool)
        radius = height * 0.28
        for _ in range(5):
            cx = x + c.rng.normal(0, radius * 0.6)
            cy = foot_y - height * 0.7 + c.rng.normal(0, radius * 0.4)
            leaves |= c.ellipse(cx, cy, radius * c.rng.uniform(0.5, 0.9), radius * c.rng.uniform(0.4, 0.8))
        c.paint(leaves, VEGETATION, c.tint((70, 110, 45), 20), texture=0.45)
    if c.rng.random() < 0.5:  # a hedge along the far sidewalk
        x0 = c.rng.uniform(0, 0.6) * c.w
        hedge = c.ellipse(x0 + 0.2 * c.w, c.base, 0.2 * c.w, c.rng.uniform(0.03, 0.07) * c.h)
        c.paint(hedge & (c.label != ROAD), VEGETATION, c.tint((60, 100, 40), 15), texture=0.45)


def _poles(c: _Canvas) -> None:
    for _ in range(c.rng.integers(1, 4)):
        foot_y, x = _sidewalk_spot(c)
        scale = 0.3 + 0.7 * c.nearness(foot_y)
        top = foot_y - (0.35 + 0.4 * c.rng.random()) * c.h * scale - 0.05 * c.h
        half = max(0.75, 0.006 * c.w * scale)
        c.paint(c.rect(x - half, top, x + half, foot_y), POLE, c.tint((105, 105, 100), 20), texture=0.05)
        if c.rng.random() < 0.75:
            _sign(c, x, top, scale)


def _sign(c: _Canvas, x: float, top: float, scale: float) -> None:
    r = max(2.0, 0.035 * c.w * scale)
    cy = top + r
    kind = c.rng.integers(0, 3)
    if kind == 0:  # round sign
        region = c.ellipse(x, cy, r, r)
    elif kind == 1:  # triangle
        region = c.polygon([(x - r, cy + r), (x + r, cy + r), (x, cy - r)])
    else:  # traffic light box
        region = c.rect(x - r * 0.5, top, x + r * 0.5, top + 2.6 * r)
    colour = _pick(c.rng, [(200, 30, 30), (30, 70, 190), (230, 190, 20)]) if kind < 2 else (30, 30, 30)
    c.paint(region, SIGN, c.tint(colour, 20), texture=0.05)
    if kind == 2:
        lamp = c.ellipse(x, top + r * (0.5 + 0.8 * c.rng.integers(0, 3)), r * 0.3, r * 0.3)
        c.paint(lamp & region, SIGN, _pick(c.rng, [(240, 40, 30), (250, 200, 40), (40, 230, 90)]))


def _cars(c: _Canvas) -> None:
    left, right = c.left, c.right
    n = c.rng.choice([0, 1, 2, 3, 4], p=[0.08, 0.3, 0.3, 0.2, 0.12])
    rows = np.sort(c.base + c.rng.uniform(0.08, 1.0, n) * (c.h - c.base))
    for bottom in rows:  # far cars first, so nearer ones cover them
        row = min(int(bottom), c.h - 1)
        scale = c.nearness(bottom)
        car_w = (0.08 + 0.45 * scale) * c.w
        car_h = car_w * c.rng.uniform(0.5, 0.7)
        x = c.rng.uniform(left[row], right[row]) - car_w / 2
        body = c.tint(_pick(c.rng, [(180, 20, 25), (30, 50, 150), (225, 225, 225), (25, 25, 30), (160, 165, 170)]), 20)
        c.paint(c.rect(x, bottom - car_h * 0.55, x + car_w, bottom - car_h * 0.1), VEHICLE, body, texture=0.06)
        cabin = c.rect(x + car_w * 0.15, bottom - car_h, x + car_w * 0.85, bottom - car_h * 0.5)
        c.paint(cabin, VEHICLE, body * 0.9, texture=0.06)
        glass = c.rect(x + car_w * 0.2, bottom - car_h * 0.92, x + car_w * 0.8, bottom - car_h * 0.58)
        c.paint(glass, VEHICLE, c.tint((45, 55, 70), 10), texture=0.1)
        for wx in (x + car_w * 0.2, x + car_w * 0.8):
            c.paint(c.ellipse(wx, bottom - car_h * 0.1, car_w * 0.09, car_h * 0.12), VEHICLE, (20, 20, 22))


def _people(c: _Canvas) -> None:
    for _ in range(c.rng.choice([0, 1, 2, 3], p=[0.25, 0.35, 0.25, 0.15])):
        foot_y, x = _sidewalk_spot(c)
        _figure(c, x, foot_y, PEDESTRIAN)
    left, right = c.left, c.right
    for _ in range(c.rng.choice([0, 1, 2], p=[0.4, 0.45, 0.15])):
        foot_y = c.base + c.rng.uniform(0.2, 0.95) * (c.h - c.base)
        row = min(int(foot_y), c.h - 1)
        inset = 0.1 * (right[row] - left[row])  # riding near the kerb
        x = left[row] + inset if c.rng.random() < 0.5 else right[row] - inset
        _cyclist(c, x, foot_y)


def _figure(c: _Canvas, x: float, foot_y: float, cls: int) -> None:
    """A standing person (legs, clothes, head), labelled ``cls``."""
    scale = 0.25 + 0.75 * c.nearness(foot_y)
    h = (0.12 + 0.22 * scale) * c.h
    half = h * 0.12
    c.paint(c.rect(x - half * 0.8, foot_y - h * 0.45, x - half * 0.1, foot_y), cls, c.tint((40, 40, 60), 15))
    c.paint(c.rect(x + half * 0.1, foot_y - h * 0.45, x + half * 0.8, foot_y), cls, c.tint((40, 40, 60), 15))
    clothes = c.tint(_pick(c.rng, [(180, 40, 40), (40, 90, 160), (220, 200, 60), (60, 60, 60), (230, 230, 230)]), 25)
    c.paint(c.rect(x - half, foot_y - h * 0.82, x + half, foot_y - h * 0.42), cls, clothes, texture=0.08)
    c.paint(c.ellipse(x, foot_y - h * 0.9, half * 0.7, h * 0.09), cls, c.tint((200, 160, 130), 25))


def _cyclist(c: _Canvas, x: float, foot_y: float) -> None:
    scale = 0.25 + 0.75 * c.nearness(foot_y)
    r = (0.03 + 0.06 * scale) * c.h
    for wx in (x - 1.3 * r, x + 1.3 * r):
        ring = c.ellipse(wx, foot_y - r, r, r) & ~c.ellipse(wx, foot_y - r, r * 0.7, r * 0.7)
        c.paint(ring, BICYCLIST, (25, 25, 25))
    frame = c.rect(x - 1.3 * r, foot_y - r * 1.3, x + 1.3 * r, foot_y - r * 1.0)
    c.paint(frame, BICYCLIST, c.tint((150, 150, 160), 30))
    _figure(c, x, foot_y - r * 0.9, BICYCLIST)


def _void(c: _Canvas) -> None:
    """Unlabelled bits as in CamVid: a border, odd patches, sometimes the ego car's bonnet."""
    if c.rng.random() < 0.5:
        border = max(1, round(0.015 * c.h))
        frame = np.ones((c.h, c.w), bool)
        frame[border:-border, border:-border] = False
        c.paint(frame, VOID, (0, 0, 0))
    for _ in range(c.rng.integers(0, 3)):
        pw, ph = c.rng.uniform(0.03, 0.1) * c.w, c.rng.uniform(0.03, 0.1) * c.h
        x, y = c.rng.uniform(0, c.w - pw), c.rng.uniform(0, c.h - ph)
        colour = _pick(c.rng, [(10, 10, 10), (200, 0, 200), (0, 200, 200)])
        c.paint(c.rect(x, y, x + pw, y + ph), VOID, c.tint(colour, 20), texture=0.3)
    if c.rng.random() < 0.3:
        bonnet = c.ellipse(c.w / 2, c.h * 1.08, c.w * 0.6, c.h * c.rng.uniform(0.1, 0.16))
        c.paint(bonnet, VOID, c.tint((50, 50, 55), 15), texture=0.05)


def _sidewalk_spot(c: _Canvas) -> tuple[float, float]:
    """A (foot row, x) on a sidewalk beside the road, left or right."""
    left, right = c.left, c.right
    foot_y = c.base + c.rng.uniform(0.05, 0.9) * (c.h - c.base)
    row = min(int(foot_y), c.h - 1)
    if c.rng.random() < 0.5 and left[row] > 2:
        return foot_y, c.rng.uniform(0, left[row])
    if right[row] < c.w - 2:
        return foot_y, c.rng.uniform(right[row], c.w)
    return foot_y, c.rng.uniform(0, max(left[row], 1.0))


def _finish(c: _Canvas) -> np.ndarray:
    """Illumination gradient, light blur and sensor noise, then 8-bit."""
    gx, gy = c.rng.uniform(-0.25, 0.25, 2)
    light = 1.0 + gx * (c.x / c.w - 0.5) + gy * (c.y / c.h - 0.5)
    photo = c.photo * light[..., None] * c.rng.uniform(0.85, 1.1)
    photo = _blur(photo)
    photo += c.rng.normal(0, c.rng.uniform(3, 8), photo.shape).astype(np.float32)
    return np.clip(np.rint(photo), 0, 255).astype(np.uint8)


def _blur(image: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur, edges repeated: softens the painted edges like a real lens."""
    padded = np.pad(image, ((1, 1), (0, 0), (0, 0)), mode="edge")
    image = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    padded = np.pad(image, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4


def _pick(rng: np.random.Generator, options: list):
    return options[rng.integers(0, len(options))]
