"""Data packed in TFRecord shards for training at scale: `fcn data pack DIR --out SHARDS --shards N`.

A shard folder holds ``<split>-00000-of-0000N.tfrecord`` files and ``index.json`` (format, counts,
shard files with their byte sizes, the class table, train class statistics). Each record is one pair:
the photo as PNG/JPEG bytes (the original file when it is a plain upright 8-bit RGB PNG or JPEG,
else re-encoded PNG of what `images.read_image` sees), the annotation as an index PNG, the original
height and width, and the file name. Readers decode with TensorFlow's own kernels, interleave shards
in parallel and let tf.distribute give each worker its own shards (auto-shard by file).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcn_cli.classes import ClassTable
from fcn_cli.errors import FcnError

FORMAT = "fcn-shards/1"
INDEX = "index.json"


def is_shard_folder(path: Path) -> bool:
    index = Path(path) / INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _photo_bytes(path: Path, image: np.ndarray) -> bytes:
    """The original bytes when TensorFlow's decoder sees exactly what read_image sees, else a PNG."""
    from PIL import Image

    with Image.open(path) as img:
        plain = img.format in ("PNG", "JPEG") and img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1
    return path.read_bytes() if plain else _png_bytes(image)


def _example(name: str, photo: bytes, mask: bytes, height: int, width: int):
    import tensorflow as tf

    def b(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    return tf.train.Example(features=tf.train.Features(feature={
        "image": b(photo), "mask": b(mask), "height": i(height), "width": i(width), "name": b(name.encode()),
    })).SerializeToString()


def pack(data_dir: Path, out: Path, classes: ClassTable, shards: int = 8, console=None) -> dict:
    """Validate every pair the way `fcn data check` does, then write the shards and index.json."""
    import tensorflow as tf

    from fcn_cli.datasets import check_dataset, find_dataset
    from fcn_cli.images import read_image, read_mask

    if shards < 1:
        raise FcnError(f"--shards {shards}: need at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not is_shard_folder(out):
        raise FcnError(f"{out}: folder is not empty and holds no fcn shards; give an empty or new --out")
    dataset = find_dataset(Path(data_dir))
    report = check_dataset(dataset, classes)
    if not report.ok:
        listing = "; ".join(str(p) for p in report.problems[:5])
        more = f"; and {len(report.problems) - 5} more" if len(report.problems) > 5 else ""
        raise FcnError(f"{data_dir}: {len(report.problems)} problem(s), nothing packed: {listing}{more} "
                       f"(run `fcn data check {data_dir}`)")
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "source": str(data_dir), "classes": classes.to_dict(), "splits": {}}
    for split, pairs in dataset.splits.items():
        n_shards = min(shards, len(pairs))
        files = [f"{split}-{k:05d}-of-{n_shards:05d}.tfrecord" for k in range(n_shards)]
        tmp_paths = [out / f".{f}.tmp" for f in files]
        writers = [tf.io.TFRecordWriter(str(p)) for p in tmp_paths]
        try:
            for k, pair in enumerate(pairs):
                image = read_image(pair.image)
                label = read_mask(pair.mask, classes)
                record = _example(pair.name, _photo_bytes(pair.image, image), _png_bytes(label), *label.shape)
                writers[k % n_shards].write(record)  # round robin: shards stay balanced
        finally:
            for w in writers:
                w.close()
        for tmp, name in zip(tmp_paths, files):
            os.replace(tmp, out / name)
        stats = report.splits.get(split)
        index["splits"][split] = {
            "count": len(pairs),
            "shards": [{"file": f, "bytes": (out / f).stat().st_size} for f in files],
            "class_pixels": stats.class_pixels.tolist() if stats else None,
            "present_pixels": stats.present_pixels.tolist() if stats else None,
        }
    from fcn_cli.runs import write_json

    write_json(out / INDEX, index)
    return {split: info["count"] for split, info in index["splits"].items()}


@dataclass
class ShardSet:
    root: Path
    index: dict

    @classmethod
    def open(cls, root: Path) -> "ShardSet":
        root = Path(root)
        try:
            index = json.loads((root / INDEX).read_text())
        except (OSError, ValueError) as exc:
            raise FcnError(f"{root / INDEX}: unreadable shard index ({exc}); pack again with `fcn data pack`") from None
        shard_set = cls(root, index)
        shard_set.verify()
        return shard_set

    def verify(self) -> None:
        """Every shard present with the size it was written with: a truncated copy shows here."""
        for split, info in self.index.get("splits", {}).items():
            for shard in info["shards"]:
                path = self.root / shard["file"]
                if not path.is_file():
                    raise FcnError(f"{path}: shard missing; copy it again or pack again with `fcn data pack`")
                size = path.stat().st_size
                if size != shard["bytes"]:
                    raise FcnError(f"{path}: shard is {size} bytes, index says {shard['bytes']} (truncated or "
                                   "changed); copy it again or pack again with `fcn data pack`")

    def classes(self) -> ClassTable:
        return ClassTable.from_dict(self.index["classes"], source=str(self.root / INDEX))

    def splits(self) -> list[str]:
        return list(self.index.get("splits", {}))

    def count(self, split: str) -> int:
        return int(self._split(split)["count"])

    def files(self, split: str) -> list[str]:
        return [str(self.root / s["file"]) for s in self._split(split)["shards"]]

    def class_stats(self, split: str = "train"):
        info = self._split(split)
        return np.asarray(info["class_pixels"], np.int64), np.asarray(info["present_pixels"], np.int64)

    def _split(self, split: str) -> dict:
        splits = self.index.get("splits", {})
        if split not in splits:
            raise FcnError(f"{self.root}: no '{split}' split in the shards; found: {', '.join(splits) or 'none'}")
        return splits[split]


def records(files: list[str], deterministic: bool = True):
    """tf.data of (image uint8 (h, w, 3), label uint8 (h, w), name, shard, record number).

    Shards are read in parallel (interleave); a record that does not decode names its shard and number.
    """
    import tensorflow as tf

    spec = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "mask": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
        "name": tf.io.FixedLenFeature([], tf.string),
    }

    def numbered(path):
        return tf.data.TFRecordDataset(path).enumerate().map(lambda k, rec: (path, k, rec))

    def decode(path, k, rec):
        ex = tf.io.parse_single_example(rec, spec)
        image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
        label = tf.io.decode_png(ex["mask"], channels=1)[..., 0]
        tf.debugging.assert_equal(tf.shape(image)[:2], tf.shape(label),
                                  message=tf.strings.format("corrupt record {} of shard {}", (k, path)))
        image.set_shape([None, None, 3])
        label.set_shape([None, None])
        return image, label, ex["name"], path, k

    files_ds = tf.data.Dataset.from_tensor_slices(files)
    return files_ds.interleave(numbered, cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=deterministic).map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                                                                deterministic=deterministic)


def check_records(shard_set: ShardSet) -> list[str]:
    """Read every record of every shard; return one line per shard/record that does not read."""
    import tensorflow as tf

    problems = []
    for split in shard_set.splits():
        for path in shard_set.files(split):
            k = 0
            try:
                for _ in records([path]).as_numpy_iterator():
                    k += 1
            except tf.errors.OpError as exc:
                first = _tf_reason(exc)
                problems.append(f"{path}: record {k} is corrupt ({first}); pack again with `fcn data pack`")
    return problems


def _tf_reason(exc) -> str:
    """The human part of a TensorFlow error ("corrupted record at 27934"), without op/device noise."""
    import re

    text = " ".join((getattr(exc, "message", None) or str(exc)).split())
    text = re.sub(r"\{\{function_node [^}]*\}\}", "", text)
    text = re.sub(r"\[Op:[^\]]*\]", "", text)
    return text.strip()[:160]
