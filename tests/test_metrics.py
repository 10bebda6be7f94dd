"""Tests of fcn_cli.metrics: hand-computed cases, properties, Keras agreement, writers."""

from __future__ import annotations

import json
from fractions import Fraction as F

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fcn_cli.metrics import (
    ConfusionMatrix,
    MeanIoU,
    PixelAccuracy,
    confusion_matrix,
    metrics_table,
    plot_confusion,
    scores,
    write_confusion_csv,
)

SUMMARY = ("pixel_accuracy", "mean_accuracy", "mean_iou", "mean_dice", "fw_iou")
PER_CLASS = ("iou", "accuracy", "dice")


def pairs_from_matrix(cm):
    """Label / prediction vectors realising a given confusion matrix."""
    t, p = [], []
    for i, row in enumerate(cm):
        for j, n in enumerate(row):
            t += [i] * n
            p += [j] * n
    return np.array(t, np.int64), np.array(p, np.int64)


def close(value, fraction):
    return value == pytest.approx(float(fraction), abs=1e-12)


# --------------------------------------------------------------------------- hand-computed


def test_three_classes_by_hand():
    cm = [[3, 1, 0],
          [0, 2, 2],
          [1, 0, 1]]
    t, p = pairs_from_matrix(cm)
    rng = np.random.default_rng(0)
    order = rng.permutation(t.size)
    t, p = t[order].reshape(2, 5), p[order].reshape(2, 5)  # any matching shape works
    got = confusion_matrix(t, p, 3)
    assert got.dtype == np.int64 and got.tolist() == cm

    r = scores(got)
    # support (row sums) = 4, 4, 2 ; predicted (column sums) = 4, 3, 3 ; diagonal = 3, 2, 1
    iou = [F(3, 4 + 4 - 3), F(2, 4 + 3 - 2), F(1, 2 + 3 - 1)]  # 3/5, 2/5, 1/4
    acc = [F(3, 4), F(2, 4), F(1, 2)]
    dice = [F(6, 8), F(4, 7), F(2, 5)]
    for c in range(3):
        assert close(r["per_class"][c]["iou"], iou[c])
        assert close(r["per_class"][c]["accuracy"], acc[c])
        assert close(r["per_class"][c]["dice"], dice[c])
    assert [e["support"] for e in r["per_class"]] == [4, 4, 2]
    assert close(r["pixel_accuracy"], F(6, 10))
    assert close(r["mean_iou"], F(5, 12))  # (3/5 + 2/5 + 1/4) / 3
    assert close(r["mean_accuracy"], F(7, 12))  # (3/4 + 1/2 + 1/2) / 3
    assert close(r["mean_dice"], F(241, 420))
    assert close(r["fw_iou"], F(9, 20))  # (4*3/5 + 4*2/5 + 2*1/4) / 10
    assert r["pixels"] == 10 and r["ignore_index"] is None
    json.dumps(r)  # JSON-ready
    assert all(type(r[k]) is float for k in SUMMARY)


def ignored_case():
    # (truth, prediction, count); class 2 is void, 255 is outside the class range
    spec = [(0, 0, 2), (0, 2, 1), (0, 1, 1), (1, 1, 3), (1, 0, 1), (2, 0, 5), (2, 2, 4), (255, 1, 2)]
    t = np.array([a for a, _, n in spec for _ in range(n)], np.uint8)
    p = np.array([b for _, b, n in spec for _ in range(n)], np.uint8)
    return t, p


def test_ignored_class_by_hand():
    t, p = ignored_case()
    cm = confusion_matrix(t, p, 3, ignore_index=2)
    # void row skipped at counting; predicting void on a class-0 pixel stays an error of class 0
    assert cm.tolist() == [[2, 1, 1], [1, 3, 0], [0, 0, 0]]
    r = scores(cm, ignore_index=2)
    assert close(r["per_class"][0]["iou"], F(2, 4 + 3 - 2))  # 2/5
    assert close(r["per_class"][1]["iou"], F(3, 4 + 4 - 3))  # 3/5
    assert r["per_class"][2] == {"iou": None, "accuracy": None, "dice": None, "support": None}
    assert close(r["mean_iou"], F(1, 2))  # void (IoU 0 if it were counted) is not in the mean
    assert close(r["pixel_accuracy"], F(5, 8))
    assert close(r["mean_accuracy"], F(5, 8))  # (2/4 + 3/4) / 2
    assert close(r["fw_iou"], F(1, 2))  # (4*2/5 + 4*3/5) / 8
    assert r["pixels"] == 8

    # a matrix that did count void pixels gives the same scores once told what is ignored
    assert scores(confusion_matrix(t, p, 3), ignore_index=2) == r


def test_absent_and_predicted_only_classes():
    t = np.array([0, 0, 1, 2, 2])
    p = np.array([0, 1, 1, 2, 4])
    r = scores(confusion_matrix(t, p, 5))
    iou = [e["iou"] for e in r["per_class"]]
    assert close(iou[0], F(1, 2)) and close(iou[1], F(1, 2)) and close(iou[2], F(1, 2))
    assert iou[3] is None  # absent from truth and prediction: undefined, out of the means
    assert iou[4] == 0.0  # predicted only: a real 0
    assert r["per_class"][3] == {"iou": None, "accuracy": None, "dice": None, "support": 0}
    assert r["per_class"][4]["accuracy"] is None and r["per_class"][4]["dice"] == 0.0
    assert close(r["mean_iou"], F(3, 8))  # (1/2 + 1/2 + 1/2 + 0) / 4
    assert close(r["mean_accuracy"], F(2, 3))  # (1/2 + 1 + 1/2) / 3
    assert close(r["pixel_accuracy"], F(3, 5))


def test_empty_matrix_is_undefined_not_zero():
    r = scores(np.zeros((3, 3), np.int64), ignore_index=1)
    assert all(r[k] is None for k in SUMMARY) and r["pixels"] == 0
    json.dumps(r)


def test_bad_inputs():
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
    with pytest.raises(ValueError):
        confusion_matrix(np.zeros(3, int), np.array([0, 1, 3]), 3)  # prediction 3 is not a class
    with pytest.raises(ValueError):
        scores(np.zeros((2, 3)))
    a, b = ConfusionMatrix(3, 2), ConfusionMatrix(4, 2)
    with pytest.raises(ValueError):
        a.merge(b)


# --------------------------------------------------------------------------- properties


@st.composite
def labelled(draw, with_ignore=True):
    c = draw(st.integers(1, 6))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7))
    t = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, c - 1)))
    p = draw(hnp.arrays(np.int64, shape, elements=st.integers(0, c - 1)))
    ignore = draw(st.one_of(st.none(), st.integers(0, c - 1))) if with_ignore else None
    return c, t, p, ignore


def numbers(r):
    yield from (r[k] for k in SUMMARY)
    for e in r["per_class"]:
        yield from (e[k] for k in PER_CLASS)


PROPS = settings(max_examples=60, deadline=None)


@PROPS
@given(labelled())
def test_every_metric_in_unit_interval(case):
    c, t, p, ignore = case
    r = scores(confusion_matrix(t, p, c, ignore), ignore)
    for v in numbers(r):
        assert v is None or (type(v) is float and 0.0 <= v <= 1.0)
    if r["pixels"]:
        assert all(r[k] is not None for k in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"))


@PROPS
@given(labelled(with_ignore=False))
def test_iou_symmetric(case):
    c, t, p, _ = case
    a = scores(confusion_matrix(t, p, c))
    b = scores(confusion_matrix(p, t, c))
    assert [e["iou"] for e in a["per_class"]] == [e["iou"] for e in b["per_class"]]
    assert [e["dice"] for e in a["per_class"]] == [e["dice"] for e in b["per_class"]]
    assert a["mean_iou"] == b["mean_iou"]
    assert a["pixel_accuracy"] == b["pixel_accuracy"]


@PROPS
@given(labelled())
def test_perfect_prediction(case):
    c, t, _, ignore = case
    r = scores(confusion_matrix(t, t, c, ignore), ignore)
    if r["pixels"] == 0:  # everything was void
        assert all(r[k] is None for k in SUMMARY)
        return
    for k in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou", "mean_dice"):
        assert r[k] == 1.0


@PROPS
@given(labelled(), st.data())
def test_ignored_pixels_change_nothing(case, data):
    c, t, p, _ = case
    ignore = data.draw(st.integers(0, c - 1))
    other = data.draw(hnp.arrays(np.int64, t.shape, elements=st.integers(0, c - 1)))
    p2 = np.where(t == ignore, other, p)
    # labels outside the class range are skipped as well
    t3 = np.where(t == ignore, 255, t)
    base = scores(confusion_matrix(t, p, c, ignore), ignore)
    assert scores(confusion_matrix(t, p2, c, ignore), ignore) == base
    assert scores(confusion_matrix(t3, p2, c, ignore), ignore) == base


@PROPS
@given(labelled(), labelled())
def test_merge_equals_concatenation(first, second):
    c, t1, p1, ignore = first
    _, t2, p2, _ = second
    t2, p2 = np.minimum(t2, c - 1), np.minimum(p2, c - 1)
    a = ConfusionMatrix(c, ignore).update(t1, p1)
    b = ConfusionMatrix(c, ignore).update(t2, p2)
    whole = ConfusionMatrix(c, ignore).update(
        np.concatenate([t1.ravel(), t2.ravel()]), np.concatenate([p1.ravel(), p2.ravel()])
    )
    merged = a.merge(b)
    np.testing.assert_array_equal(merged.matrix, whole.matrix)
    assert merged.scores() == whole.scores()
    assert int(whole.matrix.sum()) == int(np.sum((np.concatenate([t1.ravel(), t2.ravel()]) != ignore)))


# --------------------------------------------------------------------------- Keras metrics


def logits_for(pred, num_classes, rng):
    """Random logits whose argmax is ``pred``."""
    logits = rng.normal(size=pred.shape + (num_classes,)).astype(np.float32)
    np.put_along_axis(logits, pred[..., None], 10.0, axis=-1)
    return logits


def keras_value(metric, y_true, y_pred, sample_weight=None):
    metric.reset_state()
    metric.update_state(y_true, y_pred, sample_weight=sample_weight)
    return float(keras.ops.convert_to_numpy(metric.result()))


def test_keras_ignored_case_matches_hand_values():
    t, p = ignored_case()
    t = t.copy()
    t[t == 255] = 2  # Keras would also drop 255; keep the same pixels out here
    logits = logits_for(p.astype(np.int64), 3, np.random.default_rng(1))
    miou = MeanIoU(3, ignore_class=2)
    acc = PixelAccuracy(3, ignore_class=2)
    assert keras_value(miou, t[None], logits[None]) == pytest.approx(0.5, rel=1e-6)
    assert keras_value(acc, t[None], logits[None]) == pytest.approx(5 / 8, rel=1e-6)


@pytest.mark.parametrize("ignore", [None, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_keras_metrics_agree_with_numpy(ignore, dtype):
    rng = np.random.default_rng(7)
    c = 5
    for trial in range(4):
        labels = rng.integers(0, c, size=(3, 6, 7)).astype(np.uint8)
        if trial == 1:
            labels[labels == 4] = 0  # a class absent from the truth
        logits = rng.normal(size=(3, 6, 7, c)).astype(np.float32)
        if trial == 2:
            logits[..., 2] -= 100.0  # a class never predicted
        y_pred = keras.ops.cast(logits, dtype)
        pred = np.argmax(keras.ops.convert_to_numpy(keras.ops.cast(y_pred, "float32")), axis=-1)
        expected = scores(confusion_matrix(labels, pred, c, ignore), ignore)

        weights = rng.uniform(0.0, 5.0, size=labels.shape).astype(np.float32)
        if ignore is not None:
            weights[labels == ignore] = 0.0
        for metric, key in ((MeanIoU(c, ignore_class=ignore), "mean_iou"),
                            (PixelAccuracy(c, ignore_class=ignore), "pixel_accuracy")):
            plain = keras_value(metric, labels, y_pred)
            weighted = keras_value(metric, labels, y_pred, sample_weight=weights)
            assert plain == pytest.approx(expected[key], rel=1e-5, abs=1e-6)
            assert weighted == plain
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(metric.total_cm),
                                      confusion_matrix(labels, pred, c, ignore))


def test_keras_accumulates_over_batches():
    rng = np.random.default_rng(3)
    c, ignore = 4, 0
    acc = ConfusionMatrix(c, ignore)
    metric = MeanIoU(c, ignore_class=ignore)
    for _ in range(3):
        labels = rng.integers(0, c, size=(2, 5, 5))
        logits = rng.normal(size=(2, 5, 5, c)).astype(np.float32)
        metric.update_state(labels, logits)
        acc.update(labels, logits.argmax(-1))
    assert float(metric.result()) == pytest.approx(acc.scores()["mean_iou"], rel=1e-5)


@pytest.mark.parametrize("cls", [MeanIoU, PixelAccuracy])
def test_keras_config_round_trip(cls):
    m = cls(12, ignore_class=11, name="val_thing")
    config = m.get_config()
    assert config["num_classes"] == 12 and config["ignore_class"] == 11 and config["name"] == "val_thing"
    clone = cls.from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(m)
    assert serialized["registered_name"] == f"fcn>{cls.__name__}"
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is cls and again.get_config() == config


def tiny_model():
    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Conv2D(4, 1)(inputs)
    return keras.Model(inputs, outputs)


def test_compiled_model_saves_loads_and_ignores_sample_weight(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = tiny_model()
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[MeanIoU(4, ignore_class=3), PixelAccuracy(4, ignore_class=3)],
        # Keras 3 forwards sample weights only to weighted_metrics; they must not reach the matrix either
        weighted_metrics=[MeanIoU(4, ignore_class=3, name="w_iou"), PixelAccuracy(4, ignore_class=3, name="w_acc")],
    )
    x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=(6, 8, 8)).astype(np.int32)
    w = np.where(y == 3, 0.0, rng.uniform(0.5, 4.0, size=y.shape)).astype(np.float32)

    plain = model.evaluate(x, y, batch_size=3, verbose=0, return_dict=True)
    weighted = model.evaluate(x, y, sample_weight=w, batch_size=3, verbose=0, return_dict=True)
    expected = scores(confusion_matrix(y, model.predict(x, verbose=0).argmax(-1), 4, 3), 3)
    assert plain["mean_iou"] == pytest.approx(expected["mean_iou"], rel=1e-5)
    assert plain["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], rel=1e-5)
    for result in (plain, weighted):
        assert result["w_iou"] == result["mean_iou"] == plain["mean_iou"]
        assert result["w_acc"] == result["pixel_accuracy"] == plain["pixel_accuracy"]

    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    again = loaded.evaluate(x, y, batch_size=3, verbose=0, return_dict=True)
    assert again["mean_iou"] == pytest.approx(plain["mean_iou"], rel=1e-6)
    assert again["pixel_accuracy"] == pytest.approx(plain["pixel_accuracy"], rel=1e-6)
    for name in ("w_iou", "w_acc"):
        assert again[name] == pytest.approx(plain[name], rel=1e-6)


def test_mixed_bfloat16_training_step():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = tiny_model()
        model.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[MeanIoU(4, ignore_class=3), PixelAccuracy(4, ignore_class=3)],
        )
        rng = np.random.default_rng(1)
        x = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
        y = rng.integers(0, 4, size=(4, 8, 8)).astype(np.int32)
        assert keras.backend.standardize_dtype(model(x[:1]).dtype) == "bfloat16"
        history = model.fit(x, y, batch_size=2, epochs=1, verbose=0)
        for key in ("mean_iou", "pixel_accuracy"):
            assert 0.0 <= history.history[key][-1] <= 1.0
    finally:
        keras.config.set_dtype_policy(previous)


# --------------------------------------------------------------------------- writers and table


def test_csv_and_png_writers(tmp_path):
    from PIL import Image

    names = ["sky", "traffic light (sign/symbol)", "void"]
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]], np.int64)
    csv_path = tmp_path / "cm.csv"
    write_confusion_csv(cm, names, csv_path)
    import csv

    rows = list(csv.reader(csv_path.open(encoding="utf-8")))
    assert rows[0] == ["true \\ predicted", *names]
    assert [r[0] for r in rows[1:]] == names
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == cm.tolist()

    for normalize in (True, False):
        png = tmp_path / f"cm_{normalize}.png"
        plot_confusion(cm, names, png, normalize=normalize)
        with Image.open(png) as img:
            img.load()
            assert img.format == "PNG" and img.width > 100 and img.height > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.csv", "cm_False.png", "cm_True.png"]  # no temp files left

    with pytest.raises(ValueError):
        write_confusion_csv(cm, names[:2], tmp_path / "bad.csv")


def test_metrics_table_renders():
    from rich.console import Console

    t, p = ignored_case()
    r = scores(confusion_matrix(t, p, 3, 2), 2)
    console = Console(record=True, width=140)
    console.print(metrics_table(r, ["sky", "road", "void"], 2))
    text = console.export_text()
    assert "0.4000" in text and "0.6000" in text  # per-class IoUs
    assert "0.5000" in text and "0.6250" in text  # mIoU, pixel accuracy
    assert "void (ignored)" in text and "—" in text
