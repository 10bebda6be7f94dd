"""Shared fixtures: the real CamVid copy (when this machine has one) and a tiny synthetic set."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from fcn_cli.synthetic import generate_synthetic

# The suite probes precision afresh on every machine it runs on (once per session), and never touches
# the user's own verdict cache.
os.environ["FCN_CACHE_DIR"] = tempfile.mkdtemp(prefix="fcn-test-cache-")

# ../shared/camvid beside the repository (see /work/shared/camvid/README.md); never copied into the repo.
CAMVID_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "camvid"


@pytest.fixture(scope="session")
def camvid_dir() -> Path:
    """The real CamVid folder (SegNet layout, train + val), or skip."""
    if not (CAMVID_DIR / "train").is_dir():
        pytest.skip(f"real CamVid not found at {CAMVID_DIR}: only on machines that have ../shared/camvid")
    return CAMVID_DIR


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A tiny synthetic set made once per session: 8 train, 2 val, 2 test scenes of 64x96 (HxW)."""
    dest = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(dest, count=8, size=(64, 96), seed=0)
    return dest


@pytest.fixture(scope="session")
def source_dir(synthetic_dir) -> Path:
    """A SegNet-layout folder to copy sample pairs from: real CamVid when present, else the synthetic set."""
    return CAMVID_DIR if (CAMVID_DIR / "train").is_dir() else synthetic_dir
