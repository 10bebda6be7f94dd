"""What a training run reads (fcn_cli.train_data): every kind of bad file stops it before a model is built,
with the file named; class weights from the decoded masks."""

from __future__ import annotations

import dataclasses
import io
import shutil

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from fcn_cli.classes import CAMVID
from fcn_cli.errors import FcnError
from fcn_cli.train import TrainConfig


def _spoil(root, problem: str) -> str:
    """Spoil one training pair of the set at ``root`` the way ``problem`` says; returns what the error must name."""
    victim = sorted((root / "trainannot").iterdir())[0]
    if problem == "missing_mask":
        victim.unlink()
    elif problem == "size_mismatch":
        Image.open(victim).resize((16, 16), Image.NEAREST).save(victim)
    elif problem == "bad_value":
        arr = np.asarray(Image.open(victim)).copy()
        arr[0, 0] = 200
        Image.fromarray(arr).save(victim)
    elif problem == "unknown_colour":
        rgb = CAMVID.colorize(np.asarray(Image.open(victim))).copy()
        rgb[0, 0] = (1, 2, 3)
        Image.fromarray(rgb).save(victim)
    elif problem == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif problem == "empty":
        shutil.rmtree(root)
        root.mkdir()
        return str(root)
    return victim.name


@pytest.mark.parametrize("problem", ["missing_mask", "size_mismatch", "bad_value", "unknown_colour", "truncated", "empty"])
def test_bad_data_stops_training_with_the_file_named(problem, small_set, tmp_path):
    from fcn_cli.train_data import prepare_data

    bad = tmp_path / "bad"
    shutil.copytree(small_set, bad)
    needle = _spoil(bad, problem)
    cfg = TrainConfig(data=str(bad), image_size=(32, 32), batch_size=2, backbone_weights="none", precision="float32")
    with pytest.raises(FcnError) as caught:
        prepare_data(cfg, Console(file=io.StringIO()))
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_class_weights_from_decoded_masks():
    from fcn_cli.train_data import class_weight_vector

    masks = [np.full((4, 4), 3, np.uint8), np.concatenate([np.zeros((2, 4), np.uint8), np.full((2, 4), 1, np.uint8)])]
    assert class_weight_vector(masks, CAMVID, "none") is None
    median = class_weight_vector(masks, CAMVID, "median")
    milder = class_weight_vector(masks, CAMVID, "median-sqrt")
    # road fills its one image (16 of 16 pixels), sky and building half of theirs: road weighs least
    assert median[3] < median[0] == median[1]
    np.testing.assert_allclose(milder, np.sqrt(median), rtol=1e-6)
    with pytest.raises(FcnError, match="--class-weights"):
        class_weight_vector(masks, CAMVID, "inverse")


def test_every_augmentation_flag_reaches_the_pipeline(small_set, monkeypatch):
    """TrainConfig's augmentation fields arrive in pipeline.Augment as given (config.json records the config
    itself, so only this shows that a flag is not recorded and then dropped)."""
    from fcn_cli import pipeline
    from fcn_cli.train_data import prepare_data

    made = []

    class Recording(pipeline.Augment):
        def __post_init__(self):
            super().__post_init__()
            made.append(self)

    monkeypatch.setattr(pipeline, "Augment", Recording)
    cfg = TrainConfig(data=str(small_set), image_size=(32, 32), batch_size=2, backbone_weights="none",
                      precision="float32", flip=False, scale=(1.25, 1.5), jitter=0.2, class_uniform=0.4)
    prepare_data(cfg, Console(file=io.StringIO()))
    assert [dataclasses.astuple(a) for a in made] == [(False, (1.25, 1.5), 0.2, 0.4)]
