"""Shared fixtures: the real CamVid copy (when this machine has one), generated sets, and one tiny model
and checkpoint per session. Plain helpers are in helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from helpers import META, tiny_model

from fcn_cli.synthetic import generate_synthetic

# The suite probes precision afresh on every machine it runs on (once per run: pytest-xdist's workers share
# the folder through the run's id, and the probe's lock makes the second one wait), and never touches the
# user's own verdict cache.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ["FCN_CACHE_DIR"] = (os.path.join(tempfile.gettempdir(), f"fcn-test-cache-{_RUN}") if _RUN
                               else tempfile.mkdtemp(prefix="fcn-test-cache-"))

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
def small_set(tmp_path_factory) -> Path:
    """4 train, 2 val, 2 test synthetic scenes of 32x32 (SegNet layout), made once per session."""
    root = tmp_path_factory.mktemp("small") / "synth"
    generate_synthetic(root, count=4, size=(32, 32), seed=0)
    return root


@pytest.fixture(scope="session")
def source_dir(synthetic_dir) -> Path:
    """A SegNet-layout folder to copy sample pairs from: real CamVid when present, else the synthetic set."""
    return CAMVID_DIR if (CAMVID_DIR / "train").is_dir() else synthetic_dir


@pytest.fixture(scope="session")
def model():
    """The tiny FCN-8s of helpers.tiny_model (random score layers), built once per session: do not change
    its weights in a test (perturb a copy)."""
    return tiny_model()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, model) -> Path:
    """``model`` saved as an fcn checkpoint with helpers.META, once per session."""
    from fcn_cli.runs import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "fcn8.keras"
    save_checkpoint(model, path, META)
    return path


@pytest.fixture
def levers_on(monkeypatch):
    """fcn's speed levers on for this test whatever FCN_ACCEL says: for tests of a lever itself, which the
    suite runs under FCN_ACCEL=0 too."""
    monkeypatch.delenv("FCN_ACCEL", raising=False)
