"""What a training run reads: the data set (a SegNet-layout folder or TFRecord shards) checked, the
class weights, and the tf.data pipelines for training and validation. Every problem with the user's
files is raised here, before any model is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fcn_cli.errors import FcnError
from fcn_cli.train import TrainConfig, inference_size


@dataclass
class TrainData:
    classes: object
    train: object
    val: object
    steps_per_epoch: int
    n_train: int
    n_val: int


def prepare_data(cfg: TrainConfig, console, strategy=None) -> TrainData:
    from fcn_cli import pipeline, shards
    from fcn_cli.classes import load_classes
    from fcn_cli.datasets import find_dataset, quick_check, require_data_folder

    classes = load_classes(cfg.classes)
    data_dir = Path(cfg.data)
    require_data_folder(data_dir)
    val_size = inference_size(cfg)
    for flag, (h, w), examples in (("--image-size", cfg.image_size, "224x224, 352x480"), ("--eval-size", val_size, "224x288")):
        if h % 32 or w % 32 or h < 32 or w < 32:
            raise FcnError(f"{flag} {h}x{w}: height and width must be multiples of 32 (e.g. {examples})")
    augment = pipeline.Augment(flip=cfg.flip, scale=tuple(cfg.scale), jitter=cfg.jitter,
                               class_uniform=cfg.class_uniform)
    if shards.is_shard_folder(data_dir):
        train_ds, val_ds, n_train, n_val, weights = _shard_datasets(cfg, classes, data_dir, augment, val_size)
        policy = "FILE"  # each worker reads its own shards
    else:
        dataset = find_dataset(data_dir)
        train_pairs = dataset.pairs("train")
        val_split = "val" if dataset.splits.get("val") else "test"
        val_pairs = dataset.pairs(val_split)
        problems = quick_check(dataset, classes, ["train", val_split])
        if problems:
            listing = "; ".join(str(p) for p in problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise FcnError(f"{data_dir}: {len(problems)} problem(s) in the data set: {listing} (run `fcn data check {data_dir}`)")
        with console.status(f"decoding {len(train_pairs)} train + {len(val_pairs)} {val_split} pairs"):
            train_arrays = pipeline.load_arrays(train_pairs, classes)
            val_arrays = pipeline.load_arrays(val_pairs, classes)
        weights = class_weight_vector(train_arrays[1], classes, cfg.class_weights)
        train_ds = pipeline.training_dataset(
            train_pairs, classes, image_size=cfg.image_size, batch_size=cfg.batch_size, augment=augment,
            seed=cfg.seed, ignore_void=cfg.ignore_void, class_weights=weights, arrays=train_arrays,
        )
        val_ds = pipeline.validation_dataset(
            val_pairs, classes, image_size=val_size, batch_size=cfg.batch_size, arrays=val_arrays,
        )
        n_train, n_val = len(train_pairs), len(val_pairs)
        policy = "DATA"  # in-memory arrays: every worker takes its share of each global batch
    steps = n_train // cfg.batch_size if n_train >= cfg.batch_size else 1
    if cfg.max_steps:
        steps = min(steps, cfg.max_steps)
    # Endless, with steps_per_epoch marking epochs: Keras keeps one iterator when the size is unknown.
    train_ds = train_ds.repeat()
    train_ds, val_ds = (_with_shard_policy(ds, policy) for ds in (train_ds, val_ds))
    return TrainData(classes, train_ds, val_ds, steps, n_train, n_val)


def _shard_datasets(cfg, classes, data_dir: Path, augment, val_size):
    import tensorflow as tf

    from fcn_cli import pipeline, shards

    shard_set = shards.ShardSet.open(data_dir)
    if shard_set.classes().num_classes != classes.num_classes:
        raise FcnError(f"{data_dir}: shards were packed with {shard_set.classes().num_classes} classes, the class "
                       f"table has {classes.num_classes}; give the --classes file used for packing")
    val_split = "val" if "val" in shard_set.splits() else "test"
    weights = None
    if cfg.class_weights != "none":
        weights = weights_from_stats(*shard_set.class_stats("train"), classes, cfg.class_weights)
    train_ds = pipeline.training_dataset(
        pipeline.Records(shard_set.files("train")), classes, image_size=cfg.image_size, batch_size=cfg.batch_size, augment=augment,
        seed=cfg.seed, ignore_void=cfg.ignore_void, class_weights=weights,
    )
    val_ds = pipeline.records_validation_dataset(shard_set.files(val_split), classes, image_size=val_size,
                                                 batch_size=cfg.batch_size)
    # The index knows the count; telling tf.data lets Keras end each validation pass cleanly.
    batches = -(-shard_set.count(val_split) // cfg.batch_size)
    val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(batches))
    return train_ds, val_ds, shard_set.count("train"), shard_set.count(val_split), weights


def _with_shard_policy(dataset, policy: str):
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = getattr(tf.data.experimental.AutoShardPolicy, policy)
    return dataset.with_options(options)


CLASS_WEIGHTS = ("none", "median", "median-sqrt")


def class_weight_vector(masks, classes, how: str):
    """None, or loss weights per class from the decoded training masks (see weights_from_stats)."""
    import numpy as np

    if how == "none":
        return None
    n = classes.num_classes
    pixels = np.zeros(n, np.int64)
    present = np.zeros(n, np.int64)
    for m in masks:
        counts = np.bincount(m.reshape(-1), minlength=n)[:n]
        pixels += counts
        present += np.where(counts > 0, m.size, 0)
    return weights_from_stats(pixels, present, classes, how)


def weights_from_stats(pixels, present, classes, how: str):
    """median: SegNet's median-frequency balancing; median-sqrt: its square root, a milder push for
    rare classes that over-predicts them less (measured on CamVid, bench/NOTES.md)."""
    import numpy as np

    from fcn_cli.datasets import median_frequency_weights

    if how not in CLASS_WEIGHTS:
        raise FcnError(f"unknown --class-weights {how!r}; choose one of {', '.join(CLASS_WEIGHTS)}")
    if how == "none":
        return None
    weights = median_frequency_weights(pixels, present, classes.ignore_index)
    return np.sqrt(weights).astype(np.float32) if how == "median-sqrt" else weights
