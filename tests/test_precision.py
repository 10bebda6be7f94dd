"""Precision: auto-choice rules, and bf16 training reaching the same predictions as float32."""

import numpy as np
import pytest

import keras

from fcn_cli import train


def _easy_set(n=16, size=64, seed=0):
    """Photos of two colour blocks (sky above, road below) at a random horizon: an easy task."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.float32)
    labels = np.empty((n, size, size), np.int32)
    for i in range(n):
        horizon = rng.integers(size // 4, 3 * size // 4)
        labels[i] = np.where(np.arange(size)[:, None] < horizon, 0, 3)
        images[i] = np.where(labels[i][..., None] == 0, [128, 160, 220], [90, 80, 90])
        images[i] += rng.normal(0, 12, (size, size, 3))
    return images.clip(0, 255), labels


def _train_and_predict(policy, images, labels):
    from fcn_cli.model import build_fcn

    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(1)
        model = build_fcn("fcn8", 12, None, width=1 / 16, head_width=16, dropout=0.0)
        train.compile_model(model, keras.optimizers.Adam(3e-3), 12, 11)
        weights = np.ones(labels.shape, np.float32)
        model.fit(images, labels, sample_weight=weights, batch_size=8, epochs=25, verbose=0, shuffle=False)
        logits = model.predict(images, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert logits.dtype == np.float32  # the loss and the outputs stay float32 under bf16
    return logits.argmax(-1)


@pytest.mark.slow
def test_bf16_and_float32_reach_the_same_predictions():
    images, labels = _easy_set()
    fp32 = _train_and_predict("float32", images, labels)
    bf16 = _train_and_predict("mixed_bfloat16", images, labels)
    assert (fp32 == labels).mean() > 0.97
    assert (bf16 == labels).mean() > 0.97
    assert (fp32 == bf16).mean() > 0.97


def test_precision_choice_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: True)
    assert train.choose_precision("auto") in ("mixed_bfloat16", "mixed_float16", "float32")
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        assert train.choose_precision("auto") == "mixed_bfloat16"
        monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
        assert train.choose_precision("auto") == "float32"  # emulated bf16 would be slower
    assert train.choose_precision("float32") == "float32"
    from fcn_cli.errors import FcnError

    with pytest.raises(FcnError):
        train.choose_precision("fp8")
