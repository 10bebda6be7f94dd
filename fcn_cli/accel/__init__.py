"""fcn's speed levers, all in this package; the rest of fcn is the plain Keras reference.

``fcn_cli.model`` builds FCN-32s/16s/8s from stock Keras layers and would train, evaluate and predict
correctly without anything here. Each lever below computes the same function as the stock path
(tests hold every one to it) and was kept because it measured faster; each module's docstring gives
its figures and the machines they came from.

| module | lever | measured gain (full FCN-8s, 224x224, batch 8) |
|---|---|---|
| ``matmul_conv`` | fc6/fc7 as one GEMM over unfolded windows | conv6 forward + backward 759 -> 246 ms, step 2.25 -> 1.48 s (bf16, AMD EPYC) |
| ``small_map_conv`` | VGG weight gradients on <= 32x32 bf16 maps as per-tap GEMMs | block4/5 weight gradients 199 -> 134 ms (AMD EPYC) |
| ``fused_adam`` | Adam in TensorFlow's one-pass kernel | step 1.649 -> 1.518 s (bf16, AMD EPYC) |
| ``serving`` | inference config: weights held in the compute dtype, conv6/7 kernels as (out, in) | inference 19.3 -> 20.7 img/s (AMD EPYC) |
| ``checkpoint_io`` | ``.keras`` written and read in one pass, O_DIRECT | 1.6 GB last.keras 9.3 s -> 2.2 s; serving load 4.7 -> 0.9 s (AMD EPYC) |
| ``swap`` | fcn's kernels in and out of a model by layer name | (the mechanism: checkpoints hold stock layers) |

Together (``make bench``, one run, Intel Xeon with AMX, bf16 with AMX): training 7.70 against plain Keras
float32's 1.64 img/s, inference 39.25 against 6.24 (bench/results/speed-20261203-100220.json; most of
that ratio is bf16, whose path ``fcn_cli.precision`` verifies per machine).

When they are on: :func:`enabled` -- the backend computes on the CPU (they were measured against oneDNN,
never on a GPU; ``fcn_cli.devices.plan`` states the rule) and ``FCN_ACCEL`` is not ``0``. With
``FCN_ACCEL=0`` every model is stock Keras, checkpoints go through ``model.save`` / ``model.load_weights``,
and the whole test suite passes that way too.

``multi_worker`` is the one other place fcn touches Keras internals: not a speed lever but a fix for
Keras's fit under MultiWorkerMirroredStrategy, behind the same version check as ``checkpoint_io``.
"""

from __future__ import annotations

import functools
import os

ACCEL_ENV = "FCN_ACCEL"
# Keras minor versions whose private saving/trainer internals this package was run against (the
# tests compare its files value for value with model.save's). Outside them: the public API only.
KERAS_INTERNALS_TESTED = ((3, 12), (3, 15))


def allowed() -> bool:
    """``FCN_ACCEL`` is not set to 0 / false / no / off."""
    return os.environ.get(ACCEL_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    """fcn's kernels where they were measured to pay: allowed, and the backend computes on the CPU."""
    return allowed() and computes_on_cpu()


@functools.lru_cache(maxsize=None)
def computes_on_cpu() -> bool:
    """Whether the Keras backend computes on the CPU (imports the backend)."""
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    return False


def keras_internals_tested() -> bool:
    """Whether this Keras is a minor version in ``KERAS_INTERNALS_TESTED`` on the TensorFlow backend:
    the private names ``checkpoint_io`` and ``multi_worker`` use are the ones they were tested with."""
    import keras

    if keras.config.backend() != "tensorflow":
        return False
    try:
        version = tuple(int(part) for part in keras.version().split(".")[:2])
    except ValueError:
        return False
    low, high = KERAS_INTERNALS_TESTED
    return low <= version <= high


def keras_internals_usable() -> bool:
    """The one-pass checkpoint reader and writer may run: levers allowed and :func:`keras_internals_tested`."""
    return allowed() and keras_internals_tested()


def fast_conv_layers():
    """(the VGG convolutions' layer class, the fc6/fc7 layer class): fcn's kernels."""
    from fcn_cli.accel.matmul_conv import MatmulConv2D
    from fcn_cli.accel.small_map_conv import SmallMapConv2D

    return SmallMapConv2D, MatmulConv2D


def adam(learning_rate):
    """Keras's Adam; in one fused kernel per variable where the levers are on."""
    if enabled():
        from fcn_cli.accel.fused_adam import FusedAdam

        return FusedAdam(learning_rate)
    import keras

    return keras.optimizers.Adam(learning_rate)


def register_serializables() -> None:
    """Register every class a checkpoint written with the levers on may name (fcn>MatmulConv2D,
    fcn>SmallMapConv2D, fcn>FusedAdam), so such a checkpoint loads even with the levers off."""
    import fcn_cli.accel.fused_adam  # noqa: F401
    import fcn_cli.accel.matmul_conv  # noqa: F401
    import fcn_cli.accel.small_map_conv  # noqa: F401
