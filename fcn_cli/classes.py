"""The class table: names, colours and the ignored (void) class; colourize / decolourize masks.

Default is CamVid's 12 labels (index 11 = void). A user class file (JSON or TOML) looks like:

    {"classes": [{"name": "sky", "color": [128, 128, 128]}, ...], "ignore": "void"}

``ignore`` is a class name, an index, or null (no class ignored).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcn_cli.errors import FcnError

CAMVID_CLASSES = (  # (name, RGB colour); the index is the position
    ("sky", (128, 128, 128)), ("building", (128, 0, 0)), ("column/pole", (192, 192, 128)),  # 0-2
    ("road", (128, 64, 128)), ("side walk", (60, 40, 222)), ("vegetation", (128, 128, 0)),  # 3-5
    ("traffic light (sign/symbol)", (192, 128, 128)), ("fence", (64, 64, 128)), ("vehicle", (64, 0, 128)),  # 6-8
    ("pedestrian", (64, 64, 0)), ("bicyclist", (0, 128, 192)), ("void", (0, 0, 0)),  # 9-11
)


@dataclass(frozen=True)
class ClassTable:
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def palette(self) -> np.ndarray:
        """(num_classes, 3) uint8 colours."""
        return np.asarray(self.colors, dtype=np.uint8).reshape(-1, 3)

    @property
    def evaluated(self) -> list[int]:
        """Indices of the classes that count in metrics (all but the ignored one)."""
        return [i for i in range(self.num_classes) if i != self.ignore_index]

    def colorize(self, index_mask: np.ndarray) -> np.ndarray:
        """(H, W) class indices -> (H, W, 3) uint8 colours; out-of-range indices become black."""
        lut = np.zeros((256, 3), np.uint8)
        lut[: self.num_classes] = self.palette
        return lut[np.asarray(index_mask, dtype=np.uint8)]

    def decolorize(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) colours -> (index mask uint8, bool mask of pixels whose colour is not a class)."""
        rgb = np.asarray(rgb, dtype=np.uint32)
        keys = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        pal = self.palette.astype(np.uint32)
        pal_keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        order = np.argsort(pal_keys)
        pos = np.clip(np.searchsorted(pal_keys[order], keys), 0, len(order) - 1)
        found = pal_keys[order][pos] == keys
        index = np.where(found, order[pos], 0).astype(np.uint8)
        return index, ~found

    def to_dict(self) -> dict:
        return {
            "classes": [{"name": n, "color": list(c)} for n, c in zip(self.names, self.colors)],
            "ignore": None if self.ignore_index is None else self.names[self.ignore_index],
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "class table") -> "ClassTable":
        try:
            entries = data["classes"]
            names = tuple(str(e["name"]) for e in entries)
            colors = tuple(tuple(int(v) for v in e["color"]) for e in entries)
        except (KeyError, TypeError, ValueError) as exc:
            raise FcnError(
                f"{source}: expected {{'classes': [{{'name': ..., 'color': [r, g, b]}}, ...]}} ({exc!r})"
            ) from None
        if not 1 <= len(names) <= 255:
            raise FcnError(f"{source}: needs between 1 and 255 classes, found {len(names)}")
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
            raise FcnError(f"{source}: every colour must be three integers in 0..255")
        if len(set(colors)) != len(colors):
            raise FcnError(f"{source}: two classes share a colour; colours must be unique")
        if len(set(names)) != len(names):
            raise FcnError(f"{source}: class names must be unique")
        ignore = data.get("ignore")
        if ignore is None:
            ignore_index = None
        elif isinstance(ignore, int) and not isinstance(ignore, bool):
            ignore_index = ignore
        elif isinstance(ignore, str) and ignore in names:
            ignore_index = names.index(ignore)
        else:
            raise FcnError(f"{source}: 'ignore' must be a class name, an index or null, got {ignore!r}")
        if ignore_index is not None and not 0 <= ignore_index < len(names):
            raise FcnError(f"{source}: ignore index {ignore_index} is not a class index (0..{len(names) - 1})")
        return cls(names, colors, ignore_index)


CAMVID = ClassTable(
    names=tuple(n for n, _ in CAMVID_CLASSES),
    colors=tuple(c for _, c in CAMVID_CLASSES),
    ignore_index=11,
)


def load_classes(path: str | Path | None) -> ClassTable:
    """The class table from a JSON or TOML file, or CamVid's when ``path`` is None."""
    if path is None:
        return CAMVID
    path = Path(path)
    if not path.is_file():
        raise FcnError(f"{path}: class file not found; give a JSON or TOML class file or leave --classes out for CamVid")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # a parse error of either format
        raise FcnError(f"{path}: not a valid {path.suffix.lstrip('.') or 'JSON'} class file ({exc})") from None
    if not isinstance(data, dict):
        raise FcnError(f"{path}: expected a table with a 'classes' list")
    return ClassTable.from_dict(data, source=str(path))
