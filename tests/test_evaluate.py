"""fcn evaluate: metrics at each annotation's own resolution, one confusion matrix, files beside the JSON."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import META, tiny_model
from PIL import Image
from rich.console import Console

from fcn_cli.classes import CAMVID
from fcn_cli.errors import FcnError

H, W = 70, 90  # not multiples of 32: the model's output must come back to exactly this size
VOID = CAMVID.ignore_index


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def _write_pair(folder: Path, annot: Path, name: str, rng) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    photo = np.stack([(yy * 3) % 256, (xx * 2) % 256, rng.integers(0, 256, (H, W))], -1).astype(np.uint8)
    label = np.zeros((H, W), np.uint8)
    label[: H // 3] = 0  # sky
    label[H // 3 : 2 * H // 3] = 1  # building
    label[2 * H // 3 :] = 3  # road
    label[:, W - 15 :] = rng.integers(4, 11)  # one more class per image
    label[rng.integers(0, H, 40), rng.integers(0, W, 40)] = VOID  # scattered void
    label[:5, :7] = VOID
    Image.fromarray(photo).save(folder / f"{name}.png")
    Image.fromarray(label).save(annot / f"{name}.png")
    return label


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """SegNet layout, 3 val pairs of 70x90 with index masks; returns (root, val labels)."""
    root = tmp_path_factory.mktemp("evalset")
    rng = np.random.default_rng(0)
    labels = {}
    for split, n in (("train", 1), ("val", 3)):
        (root / split).mkdir()
        (root / f"{split}annot").mkdir()
        for i in range(n):
            labels[(split, i)] = _write_pair(root / split, root / f"{split}annot", f"{split}{i:02d}", rng)
    return root, [labels[("val", i)] for i in range(3)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from fcn_cli.runs import save_checkpoint

    run = tmp_path_factory.mktemp("models") / "fcn8-20260101-000000"
    run.mkdir()
    path = run / "best.keras"
    save_checkpoint(tiny_model(), path, META)
    return path


EVERY_KEY = ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "mean_dice", "per_class", "split",
             "checkpoint", "images", "mode", "confusion_matrix", "pixels", "files")


@pytest.mark.parametrize("mode", ["resize", "native"])
def test_metrics_at_native_resolution(dataset, checkpoint, tmp_path, mode):
    from fcn_cli.evaluate import evaluate

    root, labels = dataset
    report = tmp_path / "val.json"
    result = evaluate(checkpoint, root, split="val", json_path=report, mode=mode, batch_size=2, console=_quiet())

    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert 0.0 <= result[key] <= 1.0, key
    saved = json.loads(report.read_text())
    for key in EVERY_KEY:
        assert key in saved, key
    assert saved["split"] == "val" and saved["images"] == 3 and saved["mode"] == mode
    assert saved["checkpoint"] == str(checkpoint)
    assert [e["name"] for e in saved["per_class"]] == list(CAMVID.names)
    for entry in saved["per_class"]:
        for key in ("iou", "accuracy", "dice"):
            assert entry[key] is None or 0.0 <= entry[key] <= 1.0
    assert saved["per_class"][VOID]["iou"] is None  # void takes part in nothing

    csv_path, png_path = tmp_path / "val_confusion.csv", tmp_path / "val_confusion.png"
    assert csv_path.is_file() and png_path.is_file()
    assert Image.open(png_path).format == "PNG"
    rows = list(csv.reader(open(csv_path)))
    assert rows[0][1:] == list(CAMVID.names) and len(rows) == 13

    # One matrix over the split, counted at 70x90: every non-void pixel, exactly once.
    cm = np.asarray(saved["confusion_matrix"])
    non_void = sum(int((lab != VOID).sum()) for lab in labels)
    assert cm.sum() == non_void == saved["pixels"]
    assert non_void < 3 * H * W
    assert cm[VOID].sum() == 0
    assert sorted(result["files"]) == ["confusion_csv", "confusion_png", "json"]


def test_known_prediction_gives_hand_computed_scores(dataset, tmp_path):
    """A model whose only non-zero weight is a class-3 bias predicts road everywhere."""
    from fcn_cli.evaluate import evaluate
    from fcn_cli.runs import save_checkpoint

    root, labels = dataset
    model = tiny_model(random_scores=False)  # every score layer is zero ...
    layer = model.get_layer("score_pool3")
    kernel, bias = layer.get_weights()
    bias[3] = 5.0  # ... except this bias: logits are 0 for every class but 3, positive for 3
    layer.set_weights([kernel, bias])
    path = tmp_path / "road.keras"
    save_checkpoint(model, path, META)

    result = evaluate(path, root, split="val", json_path=tmp_path / "road.json", console=_quiet())

    stacked = np.concatenate([lab.reshape(-1) for lab in labels])
    counted = stacked[stacked != VOID]
    road = int((counted == 3).sum())
    assert result["pixel_accuracy"] == pytest.approx(road / counted.size)
    cm = np.asarray(result["confusion_matrix"])
    assert cm[:, 3].sum() == cm.sum()  # every counted pixel predicted road
    present = sorted(set(counted.tolist()))
    # Road IoU = road pixels / all counted pixels; every other present class has IoU 0; absent ones none.
    assert result["per_class"][3]["iou"] == pytest.approx(road / counted.size)
    assert result["mean_iou"] == pytest.approx(road / counted.size / len(present))
    assert result["mean_accuracy"] == pytest.approx(1.0 / len(present))
    for c in range(12):
        if c not in present and c != VOID and c != 3:
            assert result["per_class"][c]["iou"] is None


def test_default_report_goes_to_the_run_folder_through_the_stable_link(dataset, checkpoint, tmp_path):
    from fcn_cli.evaluate import evaluate

    root, _ = dataset
    stable = tmp_path / "fcn8.keras"
    os.symlink(checkpoint, stable)
    result = evaluate(stable, root, split="val", console=_quiet())
    run = checkpoint.parent
    assert Path(result["files"]["json"]) == run / "eval-val.json"
    for name in ("eval-val.json", "eval-val_confusion.csv", "eval-val_confusion.png"):
        assert (run / name).is_file(), name
    assert not any(p.name.startswith("eval") for p in tmp_path.iterdir())


def test_plain_keras_file_without_metadata_uses_camvid_and_native_mode(dataset, tmp_path):
    from fcn_cli.evaluate import evaluate

    root, labels = dataset
    path = tmp_path / "plain.keras"
    tiny_model(seed=1).save(path)  # no fcn.json inside
    console = _quiet()
    result = evaluate(path, root, split="val", json_path=tmp_path / "plain.json", console=console)
    assert result["mode"] == "native" and "native mode" in console.file.getvalue()
    assert result["pixels"] == sum(int((lab != VOID).sum()) for lab in labels)


def test_class_file_must_match_the_model(dataset, checkpoint, tmp_path):
    from fcn_cli.evaluate import evaluate

    root, _ = dataset
    classes = tmp_path / "three.json"
    classes.write_text(json.dumps({"classes": [{"name": n, "color": [i, i, i]} for i, n in enumerate("abc")]}))
    with pytest.raises(FcnError, match="3"):
        evaluate(checkpoint, root, split="val", classes_file=classes, json_path=tmp_path / "x.json", console=_quiet())


def test_missing_split_is_a_clear_error(dataset, checkpoint, tmp_path):
    from fcn_cli.evaluate import evaluate

    root, _ = dataset
    with pytest.raises(FcnError, match="test"):
        evaluate(checkpoint, root, split="test", json_path=tmp_path / "x.json", console=_quiet())


@pytest.mark.parametrize(("size", "scale", "eval_size", "expected"), [
    ((192, 256), (0.75, 1.5), None, (224, 288)),  # mean zoom 1.125: 216x288, rounded to multiples of 32
    ((224, 224), (1.0, 1.0), None, (224, 224)),  # no scale augmentation: the training size
    ((64, 96), (0.5, 1.5), None, (64, 96)),
    ((64, 64), (1.0, 2.0), None, (96, 96)),
    ((192, 256), (0.75, 1.5), (360, 480), (360, 480)),  # --eval-size wins
])
def test_inference_size_is_the_training_size_times_the_mean_zoom(size, scale, eval_size, expected):
    from fcn_cli.train import TrainConfig, inference_size

    cfg = TrainConfig(image_size=size, scale=scale, eval_size=eval_size)
    assert inference_size(cfg) == expected
    assert inference_size(TrainConfig.from_json(cfg.to_json())) == expected  # survives config.json (resume)


def test_resize_mode_uses_the_recorded_inference_size_unless_overridden(dataset, tmp_path):
    from fcn_cli.evaluate import evaluate
    from fcn_cli.inference import meta_image_size
    from fcn_cli.runs import save_checkpoint

    assert meta_image_size({"image_size": [64, 64]}) == (64, 64)  # older checkpoints: the training size
    assert meta_image_size({"image_size": [64, 64], "inference_size": [96, 128]}) == (96, 128)
    assert meta_image_size({"image_size": [64, 64], "inference_size": "junk"}) == (64, 64)
    assert meta_image_size({}) is None

    root, _ = dataset
    path = tmp_path / "zoomed.keras"
    save_checkpoint(tiny_model(), path, {**META, "inference_size": [96, 128]})
    recorded = evaluate(path, root, json_path=tmp_path / "a.json", batch_size=2, console=_quiet())
    assert recorded["image_size"] == [96, 128]
    override = evaluate(path, root, json_path=tmp_path / "b.json", batch_size=2, console=_quiet(), image_size=(32, 64))
    assert override["image_size"] == [32, 64]
    # Scores are still counted at each annotation's own resolution, whatever size the network saw.
    assert recorded["pixels"] == override["pixels"]
    assert recorded["confusion_matrix"] != override["confusion_matrix"]


def test_a_failed_confusion_write_names_the_file_that_failed(dataset, checkpoint, tmp_path, monkeypatch):
    import errno

    from fcn_cli import metrics
    from fcn_cli.errors import RuntimeFailure
    from fcn_cli.evaluate import evaluate

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics, "plot_confusion", full)
    root, _ = dataset
    with pytest.raises(RuntimeFailure, match=r"confusion\.png.*No space left on device"):
        evaluate(checkpoint, root, split="val", json_path=tmp_path / "r.json", console=_quiet())
    assert not (tmp_path / "r.json").exists()  # the report is written last, only when everything before it was
