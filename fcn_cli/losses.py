"""The training loss: per-pixel cross-entropy, optionally plus the Lovász-softmax term.

Cross-entropy scores every pixel alike, so a class that covers 1% of the pixels (poles, signs,
pedestrians in road scenes) moves it little; class weights (pipeline) only rescale that. The
Lovász-softmax loss (Berman, Rannen Triki & Blaschko, "The Lovász-Softmax loss", CVPR 2018) is the
Lovász extension of each class's Jaccard loss 1 - IoU, evaluated on the softmax errors: a convex
surrogate of the very score CamVid is judged by, averaged over the classes present, so a thin class
counts as much as the road. On hard (one-hot) predictions it equals the mean of 1 - IoU exactly.

Backend-neutral (keras.ops only) and registered, so a compiled checkpoint that names it loads again.
"""

from __future__ import annotations

import keras
from keras import ops

from fcn_cli.errors import FcnError

LOSSES = ("ce", "ce+lovasz")


def _lovasz_grad(fg_sorted):
    """Gradient of the Lovász extension of the Jaccard loss at errors sorted in decreasing order:
    the increase of 1 - IoU as each next pixel joins the set of errors (Berman et al., Alg. 1)."""
    gts = ops.sum(fg_sorted)
    intersection = gts - ops.cumsum(fg_sorted)
    union = gts + ops.cumsum(1.0 - fg_sorted)
    jaccard = 1.0 - intersection / union
    return ops.concatenate([jaccard[:1], jaccard[1:] - jaccard[:-1]])


def lovasz_softmax(labels, logits, valid, num_classes: int):
    """Lovász-softmax over all pixels of a batch: mean over the classes present among the valid pixels.

    labels (..., ) int, logits (..., C), valid (..., ) truthy where a pixel counts. A pixel that does not
    count has error 0, so it sorts last and adds nothing to any class's term.
    """
    probs = ops.reshape(ops.softmax(ops.cast(logits, "float32"), axis=-1), (-1, num_classes))
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    valid = ops.reshape(ops.cast(valid, "float32"), (-1,))
    pixels = ops.shape(labels)[0]
    terms, present = [], []
    for c in range(num_classes):
        fg = ops.cast(ops.equal(labels, c), "float32") * valid
        errors = ops.abs(fg - probs[:, c]) * valid
        errors_sorted, order = ops.top_k(errors, k=pixels)
        # The sort order is a constant of the step; the gradient flows through the sorted errors.
        grad = ops.stop_gradient(_lovasz_grad(ops.take(fg, order)))
        terms.append(ops.sum(errors_sorted * grad))
        present.append(ops.cast(ops.sum(fg) > 0, "float32"))
    terms, present = ops.stack(terms), ops.stack(present)
    return ops.sum(terms * present) / ops.maximum(ops.sum(present), 1.0)


def _per_replica(value):
    """``value`` divided by tf.distribute's replica count, as Keras divides each replica's mean loss: the
    replicas' gradients are summed, so every term of the loss needs the same scaling (TensorFlow only)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1:
            value = value / replicas
    return value


@keras.saving.register_keras_serializable(package="fcn")
class CrossEntropyLovasz(keras.losses.Loss):
    """Cross-entropy from logits (weighted by ``sample_weight``: class weights, void and padding at 0)
    plus ``lovasz_weight`` times the Lovász-softmax over the pixels whose weight is above 0.

    The Lovász term runs on every ``stride``-th row and column: it sorts each class's errors, and a full
    sort of a 8x192x256 batch costs about 40 ms per class on 2 CPU cores (0.5 s for 12 classes, most of a
    0.7 s step of the full FCN-8s); a 2x2 grid keeps a 3-pixel pole in every row it crosses at a quarter of
    the sorting (measured on the full FCN-8s: 14% fewer images per second, bench/NOTES.md).
    """

    def __init__(self, num_classes: int, lovasz_weight: float = 1.0, stride: int = 2, name: str = "ce_lovasz",
                 reduction: str = "sum_over_batch_size"):
        # The sum of a per-pixel mean and a per-batch term: only the mean reduction keeps the two in scale.
        if reduction != "sum_over_batch_size":
            raise ValueError(f"CrossEntropyLovasz reduces by the mean over pixels only, not {reduction!r}")
        super().__init__(name=name, reduction=reduction)
        self.num_classes = int(num_classes)
        self.lovasz_weight = float(lovasz_weight)
        self.stride = int(stride)
        self._ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    # Keras hands sample_weight to __call__ only, and the Lovász term needs it as a mask, so this loss
    # composes at __call__; call() alone is the plain cross-entropy.
    def __call__(self, y_true, y_pred, sample_weight=None):
        ce = self._ce(y_true, y_pred, sample_weight)
        s = self.stride
        valid = ops.ones(ops.shape(y_true)) if sample_weight is None else ops.greater(sample_weight, 0)
        lovasz = lovasz_softmax(y_true[:, ::s, ::s], y_pred[:, ::s, ::s], valid[:, ::s, ::s], self.num_classes)
        return ce + ops.cast(self.lovasz_weight * _per_replica(lovasz), ce.dtype)

    def call(self, y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "lovasz_weight": self.lovasz_weight,
                "stride": self.stride}


def segmentation_loss(kind: str, num_classes: int):
    """The loss `--loss` names: ``ce`` (Keras's sparse cross-entropy from logits) or ``ce+lovasz``."""
    if kind == "ce":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if kind == "ce+lovasz":
        return CrossEntropyLovasz(num_classes)
    raise FcnError(f"unknown --loss {kind!r}; choose {' or '.join(LOSSES)}")
