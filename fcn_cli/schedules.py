"""The learning-rate schedule a run trains with, whose end `--time-limit` can move while the run trains.

Keras's PolynomialDecay and CosineDecay read their length (``decay_steps``) as a Python number: inside the
traced training step it is a constant, so moving it means tracing the step again. ``FittedDecay`` wraps
either one and reads where the schedule ends from a variable: ScheduleFitter (callbacks.py) moves the end
with one assignment, and the traced step sees it at its next call. Both stock schedules depend on the step
only through ``min(step, decay_steps) / decay_steps``, so the wrapped schedule run on the step scaled by
``decay_steps / end`` is the same curve, ending at ``end``.

The variable is read live by TensorFlow's traced step (``fcn train`` trains on TensorFlow); under JAX its
value at trace time would be kept.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="fcn")
class FittedDecay(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule`` (PolynomialDecay or CosineDecay without warm-up), ending after ``end_steps`` steps
    (default: its own ``decay_steps``). Make it in the strategy's scope, like the optimizer."""

    def __init__(self, schedule, end_steps: int | None = None):
        if isinstance(schedule, dict):  # from a checkpoint's optimizer config
            schedule = keras.saving.deserialize_keras_object(schedule)
        stock = (keras.optimizers.schedules.PolynomialDecay, keras.optimizers.schedules.CosineDecay)
        if not isinstance(schedule, stock) or getattr(schedule, "cycle", False) or getattr(schedule, "warmup_steps", 0):
            raise ValueError("FittedDecay scales a PolynomialDecay or CosineDecay without cycles or warm-up")
        self.schedule = schedule
        self.end_steps = keras.Variable(float(end_steps or schedule.decay_steps), dtype="float32",
                                        trainable=False, autocast=False, name="schedule_end_steps")

    def __call__(self, step):
        scale = ops.divide(float(self.schedule.decay_steps), self.end_steps)
        return self.schedule(ops.multiply(ops.cast(step, "float32"), scale))

    @property
    def end(self) -> int:
        """The step the schedule reaches its floor at."""
        return int(round(float(ops.convert_to_numpy(self.end_steps))))

    def move_end(self, steps: int) -> None:
        self.end_steps.assign(float(max(1, steps)))

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "end_steps": self.end}


def lr_schedule(optimizer):
    """The learning-rate schedule (or constant) ``optimizer`` applies, through a mixed_float16 run's
    LossScaleOptimizer to the optimizer it wraps."""
    return getattr(getattr(optimizer, "inner_optimizer", optimizer), "_learning_rate", None)


def end_schedule_at(optimizer, steps: int) -> None:
    """Have ``optimizer``'s decaying schedule (if any) reach its floor after ``steps`` steps."""
    schedule = lr_schedule(optimizer)
    if isinstance(schedule, FittedDecay):
        schedule.move_end(steps)
    elif hasattr(schedule, "decay_steps"):  # a checkpoint from before FittedDecay: fitted from here on
        optimizer.learning_rate = FittedDecay(schedule, max(1, steps))
