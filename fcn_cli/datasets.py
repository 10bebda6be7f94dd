"""Data sets on disk: layout detection, image/mask pairing, `fcn data check`, class statistics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    """One photo and its annotation. ``name`` is the photo's path relative to its split folder."""

    image: Path
    mask: Path
    name: str
