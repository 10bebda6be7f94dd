"""FittedDecay: the stock poly and cosine curves, ending where ScheduleFitter moves them, saved with the run."""

import numpy as np
import pytest


@pytest.mark.parametrize("kind", ["poly", "cosine"])
def test_a_fitted_schedule_is_the_stock_curve_of_its_current_length(kind):
    import keras

    from fcn_cli.schedules import FittedDecay

    def stock(steps):
        if kind == "poly":
            return keras.optimizers.schedules.PolynomialDecay(0.1, steps, end_learning_rate=0.001, power=0.9)
        return keras.optimizers.schedules.CosineDecay(0.1, steps, alpha=0.01)

    fitted = FittedDecay(stock(100))
    steps = np.arange(0, 130, 7)
    np.testing.assert_allclose([float(fitted(s)) for s in steps], [float(stock(100)(s)) for s in steps], rtol=1e-5)
    fitted.move_end(30)
    assert fitted.end == 30
    np.testing.assert_allclose([float(fitted(s)) for s in steps], [float(stock(30)(s)) for s in steps], rtol=1e-5)


def test_a_fitted_schedule_refuses_curves_it_cannot_scale():
    import keras

    from fcn_cli.schedules import FittedDecay

    with pytest.raises(ValueError, match="cycles or warm-up"):
        FittedDecay(keras.optimizers.schedules.PolynomialDecay(0.1, 10, cycle=True))
    with pytest.raises(ValueError, match="PolynomialDecay or CosineDecay"):
        FittedDecay(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5))


def test_the_moved_end_survives_a_checkpoint(tmp_path):
    """last.keras keeps the optimizer: a resumed run reads the schedule back, end included (the whole
    --resume path, in a fresh process: tests/test_cli.py)."""
    import keras

    from fcn_cli.schedules import FittedDecay

    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    schedule = FittedDecay(keras.optimizers.schedules.PolynomialDecay(0.1, 40, end_learning_rate=0.001))
    net.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
    net.fit(np.ones((4, 1), "float32"), np.zeros((4, 1), "float32"), epochs=1, verbose=0)
    schedule.move_end(12)
    net.save(tmp_path / "last.keras")
    back = keras.saving.load_model(tmp_path / "last.keras")  # safe mode: the class is registered, no code runs
    loaded = back.optimizer._learning_rate
    assert isinstance(loaded, FittedDecay) and loaded.end == 12 and loaded.schedule.decay_steps == 40
    assert float(loaded(6)) == pytest.approx(float(schedule(6)))


@pytest.mark.parametrize("kind", ["fitted", "stock (a checkpoint from before FittedDecay)", "loss-scaled", "constant"])
def test_a_resumed_runs_schedule_ends_with_its_epochs(kind):
    """What --resume does to the optimizer last.keras brings back (fcn_cli.fit.fit_run)."""
    import keras

    from fcn_cli.schedules import FittedDecay, end_schedule_at, lr_schedule

    poly = keras.optimizers.schedules.PolynomialDecay(0.1, 10, end_learning_rate=0.001)
    lr = {"fitted": FittedDecay(poly), "loss-scaled": FittedDecay(poly), "constant": 0.1}.get(kind, poly)
    optimizer = keras.optimizers.SGD(lr)
    if kind == "loss-scaled":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    end_schedule_at(optimizer, 40)
    schedule = lr_schedule(optimizer)
    if kind == "constant":
        assert float(optimizer.learning_rate) == pytest.approx(0.1)
    else:  # a stock schedule comes back fitted, so --time-limit can move it too
        assert isinstance(schedule, FittedDecay) and schedule.end == 40 and schedule.schedule.decay_steps == 10
        assert float(optimizer.learning_rate) == pytest.approx(0.1)  # step 0
