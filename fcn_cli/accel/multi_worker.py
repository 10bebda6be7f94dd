"""Keras 3's ``fit`` under ``MultiWorkerMirroredStrategy``: the one fix fcn makes inside Keras.

Not a speed lever, so ``FCN_ACCEL=0`` leaves it on; it lives here because it is the other place fcn
touches a private Keras name. Keras (3.15 included) reduces a per-replica data batch eagerly before the
first step, which the collective strategy cannot do, and means scalar logs over axis 0, which fails on
a scalar (keras-team/keras#20585). :func:`patch_fit` avoids both: the model runs ``fit`` inside the
strategy's scope without a pinned strategy (so the build is deferred into the distributed step), and
scalar logs are averaged across replicas with ``axis=None``. Applied only to a Keras that
:func:`fcn_cli.accel.keras_internals_tested` names; elsewhere Keras's own ``fit`` runs as it is.
"""

from __future__ import annotations

from fcn_cli.accel import keras_internals_tested


def patch_fit(model) -> bool:
    """Make ``model.fit`` work under the multi-worker strategy; False where this Keras is untested."""
    if not keras_internals_tested():
        return False
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = getattr(tf_trainer, "_fcn_original_reduce_per_replica", tf_trainer.reduce_per_replica)

    def reduce_per_replica(values, strategy, reduction):
        if tf_trainer._collective_all_reduce_multi_worker(strategy) and reduction in ("auto", "mean"):
            import keras

            return keras.tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original(values, strategy, reduction)

    tf_trainer._fcn_original_reduce_per_replica = original
    tf_trainer.reduce_per_replica = reduce_per_replica
    model._distribute_strategy = None
    return True
