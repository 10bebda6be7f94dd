"""The training loss: the Lovász-softmax term against its definition; the thin-class levers end to end."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from tests.helpers import TINY, fcn


def _jaccard_losses(labels, pred, valid, num_classes):
    """1 - IoU of a hard prediction for each class present among the valid pixels."""
    out = []
    for c in range(num_classes):
        truth, guess = (labels == c) & valid, (pred == c) & valid
        if truth.any():
            out.append(1.0 - (truth & guess).sum() / (truth | guess).sum())
    return out


def _lovasz_reference(labels, probs, valid, num_classes):
    """Berman et al.'s lovasz_softmax (classes="present", per_image=False) in numpy, void pixels dropped."""
    labels, probs = labels[valid], probs[valid]
    terms = []
    for c in range(num_classes):
        fg = (labels == c).astype(np.float64)
        if fg.sum() == 0:
            continue
        errors = np.abs(fg - probs[:, c])
        order = np.argsort(-errors, kind="stable")
        fg_sorted = fg[order]
        inter = fg_sorted.sum() - np.cumsum(fg_sorted)
        union = fg_sorted.sum() + np.cumsum(1 - fg_sorted)
        jaccard = 1 - inter / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
        terms.append(float(errors[order] @ jaccard))
    return float(np.mean(terms))


def test_lovasz_of_a_hard_prediction_is_the_mean_jaccard_loss_over_present_classes():
    from fcn_cli.losses import lovasz_softmax

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (2, 12, 16))
    labels[0, :2] = 5  # a class only under the mask: not present, so not in the mean
    valid = labels != 5
    pred = np.where(rng.random(labels.shape) < 0.7, labels, rng.integers(0, 6, labels.shape))
    logits = 60.0 * np.eye(6)[pred]  # softmax of these is one-hot to float32 precision
    got = float(lovasz_softmax(labels, logits.astype("float32"), valid, 6))
    want = _jaccard_losses(labels, pred, valid, 6)
    assert len(want) == 5 and 0.2 < np.mean(want) < 0.9
    assert got == pytest.approx(np.mean(want), abs=1e-5)


def test_lovasz_on_soft_probabilities_matches_the_papers_algorithm():
    from fcn_cli.losses import lovasz_softmax

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (3, 10, 10))
    valid = rng.random(labels.shape) > 0.2
    logits = rng.normal(size=(3, 10, 10, 4)).astype("float32")
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    got = float(lovasz_softmax(labels, logits, valid, 4))
    assert got == pytest.approx(_lovasz_reference(labels, probs, valid, 4), rel=1e-4)


def test_lovasz_gradient_descent_raises_a_rare_class_iou():
    """Adam on the Lovász term alone turns a missed thin class into a found one."""
    import keras
    import tensorflow as tf

    from fcn_cli.losses import lovasz_softmax

    labels = np.zeros((1, 16, 16), np.int64)
    labels[0, :, 7:9] = 1  # a 2-pixel pole: 1/8 of the pixels
    logits = tf.Variable(np.stack([np.full((1, 16, 16), 2.0), np.zeros((1, 16, 16))], -1).astype("float32"))
    valid = np.ones_like(labels, bool)
    assert not np.argmax(logits.numpy(), -1).any()  # the pole is missed
    before = float(lovasz_softmax(labels, logits, valid, 2))
    adam = keras.optimizers.Adam(0.1)
    for _ in range(40):
        with tf.GradientTape() as tape:
            loss = lovasz_softmax(labels, logits, valid, 2)
        adam.apply([tape.gradient(loss, logits)], [logits])
    pred = np.argmax(logits.numpy(), -1)
    assert float(lovasz_softmax(labels, logits, valid, 2)) < before
    assert np.mean(_jaccard_losses(labels, pred, valid, 2)) == 0.0


def test_cross_entropy_lovasz_is_weighted_cross_entropy_plus_the_masked_term_and_serializes():
    import keras

    from fcn_cli.losses import CrossEntropyLovasz, lovasz_softmax, segmentation_loss

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, (2, 8, 8))
    weights = (rng.random((2, 8, 8)) * 2 * (rng.random((2, 8, 8)) > 0.3)).astype("float32")
    logits = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    loss = segmentation_loss("ce+lovasz", 3)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits, weights)
    lovasz = lovasz_softmax(labels[:, ::2, ::2], logits[:, ::2, ::2], weights[:, ::2, ::2] > 0, 3)
    assert float(loss(labels, logits, weights)) == pytest.approx(float(ce) + float(lovasz), rel=1e-5)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(again, CrossEntropyLovasz) and again.get_config() == loss.get_config()
    assert isinstance(segmentation_loss("ce", 3), keras.losses.SparseCategoricalCrossentropy)


def test_train_with_the_thin_class_levers_records_them_resumes_and_evaluates(synthetic_dir, tmp_path):
    """--loss ce+lovasz and --class-uniform train, config.json names both, and the compiled checkpoint
    (which names the registered loss) loads to resume and to evaluate."""
    out = tmp_path / "models"
    fcn("train", "--data", synthetic_dir, *TINY, "--epochs", "1", "--loss", "ce+lovasz", "--scale", "1.5,2",
        "--class-uniform", "0.5", "--out", out, check=0)
    run = next(p for p in out.iterdir() if p.is_dir())
    config = json.loads((run / "config.json").read_text())
    assert config["loss"] == "ce+lovasz" and config["class_uniform"] == 0.5
    # The loss the model was compiled with, as the checkpoint names it (config.json records the flag only).
    with zipfile.ZipFile(run / "last.keras") as archive:
        compiled = json.loads(archive.read("config.json"))["compile_config"]["loss"]
    assert compiled["class_name"] == "CrossEntropyLovasz" and compiled["config"]["num_classes"] == 12
    resumed = fcn("train", "--resume", run, "--epochs", "2", check=0)
    assert "epoch 2/2" in resumed.stdout
    fcn("evaluate", "--split", "val", "--data", synthetic_dir, "--model", run / "best.keras", check=0)


def test_the_loss_compiles_under_xla_with_an_unknown_batch_size():
    """On a GPU `fit` compiles the step with XLA (jit_compile auto), and the last validation batch is short:
    the sort's length comes from a batch size unknown when the function is traced."""
    tf = pytest.importorskip("tensorflow")
    from fcn_cli.losses import CrossEntropyLovasz

    loss = CrossEntropyLovasz(4)
    spec = [tf.TensorSpec([None, 8, 8], tf.int32), tf.TensorSpec([None, 8, 8, 4], tf.float32),
            tf.TensorSpec([None, 8, 8], tf.float32)]
    compiled = tf.function(lambda y, p, w: loss(y, p, w), jit_compile=True, input_signature=spec)
    rng = np.random.default_rng(0)
    for batch in (2, 3):
        labels = rng.integers(0, 4, (batch, 8, 8)).astype("int32")
        logits = rng.normal(size=(batch, 8, 8, 4)).astype("float32")
        weights = (rng.random((batch, 8, 8)) > 0.2).astype("float32")
        assert float(compiled(labels, logits, weights)) == pytest.approx(float(loss(labels, logits, weights)), rel=1e-5)
