"""FusedAdam: Keras's Adam arithmetic through TensorFlow's fused kernel."""

import keras
import numpy as np
import pytest

from fcn_cli.accel.fused_adam import FusedAdam


def _trained(optimizer, steps=6, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(5, 1),
    ])
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 5, (4, 8, 8)).astype("int32")
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model


@pytest.mark.parametrize("schedule", ["constant", "poly"])
def test_fused_adam_takes_the_same_steps_as_keras_adam(schedule):
    def lr():
        if schedule == "constant":
            return 3e-3
        return keras.optimizers.schedules.PolynomialDecay(3e-3, 10, end_learning_rate=3e-5, power=0.9)

    reference = _trained(keras.optimizers.Adam(lr()))
    fused = _trained(FusedAdam(lr()))
    start = _trained(keras.optimizers.Adam(lr()), steps=0)
    for a, b, s in zip(reference.get_weights(), fused.get_weights(), start.get_weights()):
        assert not np.allclose(a, s)  # the weights did move
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(reference.optimizer.variables, fused.optimizer.variables):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_fused_adam_round_trips_through_a_checkpoint(tmp_path):
    from fcn_cli.runs import save_checkpoint

    model = _trained(FusedAdam(1e-3), steps=2)
    path = tmp_path / "m.keras"
    save_checkpoint(model, path, {})
    loaded = keras.saving.load_model(path, compile=True, safe_mode=True)
    assert type(loaded.optimizer) is FusedAdam
    saved = [np.asarray(v) for v in model.optimizer.variables]
    restored = [np.asarray(v) for v in loaded.optimizer.variables]
    assert len(saved) == len(restored) > 2  # iterations, learning rate and both moments per weight
    for a, b in zip(saved, restored):
        np.testing.assert_array_equal(a, b)
