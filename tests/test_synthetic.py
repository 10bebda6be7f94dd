"""The synthetic street-scene generator: layout, determinism, labels, refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcn_cli.classes import CAMVID
from fcn_cli.datasets import check_dataset, find_dataset
from fcn_cli.errors import FcnError
from fcn_cli.synthetic import MARKER, generate_synthetic, render_scene


def digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


def test_layout_counts_and_sizes(synthetic_dir):
    dataset = find_dataset(synthetic_dir)
    assert dataset.layout == "segnet" and dataset.problems == []
    assert {s: len(p) for s, p in dataset.splits.items()} == {"train": 8, "val": 2, "test": 2}
    for pair in dataset.pairs("train"):
        photo, mask = Image.open(pair.image), Image.open(pair.mask)
        assert (photo.mode, photo.size) == ("RGB", (96, 64))
        assert (mask.mode, mask.size) == ("L", (96, 64))
    marker = json.loads((synthetic_dir / MARKER).read_text())
    assert marker["complete"] and marker["seed"] == 0 and marker["counts"] == {"train": 8, "val": 2, "test": 2}


def test_the_set_passes_the_full_check(synthetic_dir):
    report = check_dataset(find_dataset(synthetic_dir), CAMVID, workers=2)
    assert report.ok, report.problems
    assert report.splits["train"].sizes == {(64, 96): 8}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate_synthetic(tmp_path / name, count=3, size=(48, 64), seed=seed, val_count=1, test_count=1)
    first, again, other = (digests(tmp_path / n) for n in "abc")
    assert len(first) == 10 and first == again
    assert first.keys() == other.keys()
    assert all(first[k] != other[k] for k in first)


def test_sets_of_different_sizes_share_their_first_scenes(tmp_path):
    generate_synthetic(tmp_path / "small", count=2, size=(48, 64), val_count=0, test_count=0)
    generate_synthetic(tmp_path / "large", count=4, size=(48, 64), val_count=0, test_count=0)
    small, large = digests(tmp_path / "small"), digests(tmp_path / "large")
    assert small.items() <= large.items()


def test_labels_are_camvid_indices_and_most_classes_appear():
    present = np.zeros(12, int)
    for index in range(16):
        photo, label = render_scene(np.random.default_rng([0, 0, index]), 96, 128)
        assert photo.shape == (96, 128, 3) and photo.dtype == np.uint8
        assert label.shape == (96, 128) and label.dtype == np.uint8 and label.max() <= 11
        present += np.bincount(label.ravel(), minlength=12) > 0
    assert (present > 0).sum() >= 11, present
    assert (present[:5] == 16).all()  # sky, building, pole, road and sidewalk are in every scene


def test_colour_alone_does_not_solve_it():
    """Classes differ in mean colour, yet a nearest-mean pixel classifier is far from perfect."""
    photos, labels = zip(*(render_scene(np.random.default_rng([3, 0, i]), 64, 96) for i in range(8)))
    pixels = np.concatenate([p.reshape(-1, 3) for p in photos]).astype(np.float64)
    truth = np.concatenate([l.ravel() for l in labels])
    seen = np.unique(truth)
    means = np.stack([pixels[truth == c].mean(axis=0) for c in seen])
    guess = seen[((pixels[:, None] - means[None]) ** 2).sum(-1).argmin(axis=1)]
    accuracy = (guess == truth).mean()
    chance = np.bincount(truth).max() / truth.size
    assert chance < accuracy < 0.8


def test_full_camvid_size(tmp_path):
    counts = generate_synthetic(tmp_path, count=1, size=(360, 480), val_count=0, test_count=0)
    assert counts == {"train": 1, "val": 0, "test": 0}
    assert Image.open(tmp_path / "train" / "scene_00000.png").size == (480, 360)
    assert not (tmp_path / "val").exists()


def test_regenerating_replaces_an_earlier_set(tmp_path):
    generate_synthetic(tmp_path, count=5, size=(32, 32), val_count=2, test_count=2)
    counts = generate_synthetic(tmp_path, count=2, size=(32, 32), val_count=1, test_count=0)
    assert counts == {"train": 2, "val": 1, "test": 0}
    assert sorted(digests(tmp_path)) == [
        "train/scene_00000.png", "train/scene_00001.png", "trainannot/scene_00000.png", "trainannot/scene_00001.png",
        "val/scene_00000.png", "valannot/scene_00000.png",
    ]
    assert not (tmp_path / "test").exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, "count must be at least 1"),
        ({"size": (31, 64)}, "each side must be 32..4096"),
        ({"size": (64, 5000)}, "each side must be 32..4096"),
        ({"val_count": -1}, "cannot be negative"),
        ({"seed": -1}, "seed must be 0 or more"),
    ],
)
def test_refuses_bad_parameters(tmp_path, kwargs, message):
    with pytest.raises(FcnError, match=message):
        generate_synthetic(tmp_path / "set", **{"count": 2, **kwargs})
    assert not (tmp_path / "set").exists()


def test_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "holiday.png").write_bytes(b"precious")
    with pytest.raises(FcnError, match=r"not a synthetic set \(e.g. train/holiday.png\); give a new or empty folder"):
        generate_synthetic(tmp_path, count=2)
    assert (tmp_path / "train" / "holiday.png").read_bytes() == b"precious"


def test_refuses_our_file_names_without_the_marker(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "scene_00000.png").write_bytes(b"someone else's")
    with pytest.raises(FcnError, match="give a new or empty folder"):
        generate_synthetic(tmp_path, count=2)


def test_refuses_a_file_as_destination(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FcnError, match="is a file"):
        generate_synthetic(tmp_path / "file", count=2)
