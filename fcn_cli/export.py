"""``fcn export``: a checkpoint as a SavedModel, a TFLite file or an ONNX file, checked against Keras.

The exported graph is the plain reference network (stock Keras layers, float32: fcn's CPU kernels and
bf16 are for training here, not for another runtime) behind one input, ``image``: (B, H, W, 3) RGB in
0..255, float32 or with ``uint8`` uint8 (cast inside). It outputs float32 logits, or with ``labels``
int32 class indices (the argmax inside the graph). H and W are fixed (the checkpoint's inference size
unless ``image_size`` says otherwise) or, with ``dynamic``, any multiple of 32.

Writers: Keras 3's own ``model.export`` for all three (``tf_saved_model``; ``litert``, TensorFlow's
converter; ``onnx``, which drives tf2onnx). TFLite can be quantized: ``fp16`` stores the weights in
float16, ``int8`` quantizes weights and activations with a representative set drawn from the training
photos of ``data``.

Parity, always: the exported file is run in its own runtime (``fcn_cli.exported``) against the Keras
model on generated street scenes and up to 16 photos of ``data``; the report gives the largest logit
difference and the share of pixels whose class agrees. Below ``PARITY[quantize]`` nothing is written
to the destination and the command exits 1.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from fcn_cli.errors import FcnError
from fcn_cli.exported import SUFFIXES, meta_path, open_exported

FORMATS = ("savedmodel", "tflite", "onnx")
QUANTIZE = ("none", "fp16", "int8")
# The share of pixels whose class must agree with Keras. Measured (bench/NOTES.md, "Export"): float graphs
# 99.997-100% (logits within 1e-5); fp16 weights 99.97% on the CamVid checkpoint and 99.88-99.95% on tiny
# test nets, whose near-tie logits flip; int8 98.5% on the CamVid checkpoint (the 98% floor holds
# with little to spare; an untrained tiny net falls to 91-95%).
PARITY = {"none": 0.999, "fp16": 0.995, "int8": 0.98}
PARITY_SCENES = 4  # generated street scenes, besides up to PARITY_PHOTOS of --data
PARITY_PHOTOS = 16
REPRESENTATIVE_PHOTOS = 64  # int8 calibration


def default_output(checkpoint: Path, fmt: str) -> Path:
    """Beside the checkpoint: fcn8.keras -> fcn8.onnx, fcn8.tflite, fcn8_savedmodel/."""
    stem = checkpoint.name.removesuffix(".keras")
    return checkpoint.with_name(f"{stem}_savedmodel" if fmt == "savedmodel" else f"{stem}.{fmt}")


def check_request(fmt: str, out: Path, quantize: str, dynamic: bool, data: Path | None, overwrite: bool) -> None:
    """Every refusal that needs no model, before TensorFlow starts: one line each."""
    if fmt not in FORMATS:
        raise FcnError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise FcnError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZE)}")
    if quantize != "none" and fmt != "tflite":
        raise FcnError(f"--quantize {quantize}: only TFLite files are quantized here; use --format tflite or --quantize none")
    if quantize == "int8" and data is None:
        raise FcnError("--quantize int8 needs --data DIR: its training photos calibrate the activations' ranges")
    if data is not None and not Path(data).is_dir():
        raise FcnError(f"{data}: data folder not found; give the data set the model was trained on (--data)")
    if dynamic and fmt == "tflite":
        raise FcnError("--dynamic: TFLite files here have a fixed height and width; give --image-size HxW instead")
    wanted = SUFFIXES.get(out.suffix.lower())
    if fmt != "savedmodel" and wanted != fmt:
        raise FcnError(f"{out}: a {fmt} file should end in .{fmt}; name it so (fcn predict goes by the suffix)")
    if fmt == "savedmodel" and out.suffix.lower() in SUFFIXES:
        raise FcnError(f"{out}: a SavedModel is a folder; give a folder name without .onnx/.tflite")
    if out.exists() and not overwrite:
        raise FcnError(f"{out}: already exists; give another -o or --overwrite to replace it")
    if not out.parent.is_dir():
        raise FcnError(f"{out.parent}: folder not found; create it or give another -o")


def export(checkpoint: Path, fmt: str, out: Path, *, image_size: tuple[int, int] | None = None, dynamic: bool = False,
           quantize: str = "none", labels: bool = False, uint8: bool = False, data: Path | None = None,
           overwrite: bool = False) -> dict:
    """Write ``checkpoint`` as ``fmt`` to ``out`` after a parity check; returns the report (also on failure,
    with ``parity.passed`` false and nothing written)."""
    from fcn_cli.inference import meta_image_size
    from fcn_cli.runs import load_checkpoint

    started = time.perf_counter()
    check_request(fmt, out, quantize, dynamic, data, overwrite)
    model, meta = load_checkpoint(checkpoint)
    size = None if dynamic else (image_size or meta_image_size(meta) or (224, 224))
    if size is not None and (size[0] % 32 or size[1] % 32):
        raise FcnError(f"--image-size {size[0]}x{size[1]}: height and width must be multiples of 32 (e.g. 224x224)")
    reference = reference_model(model)
    served = serving_model(reference, size, labels=labels, uint8=uint8)
    classes = _classes_of(meta, reference)
    photos = parity_images(size, data, classes)
    exported_meta = {
        "format": fmt, "classes": classes.to_dict(), "image_size": list(size) if size else None,
        "input_dtype": "uint8" if uint8 else "float32", "input": "image: (batch, height, width, 3) RGB in 0..255",
        "output": "labels" if labels else "logits", "quantize": quantize, "variant": meta.get("variant"),
        "source_checkpoint": str(checkpoint), "inference_size": meta.get("inference_size"),
    }
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        target = work / out.name
        _write(served, fmt, target, quantize, size, data, classes)
        _add_metadata(target, fmt, exported_meta)
        parity = check_parity(reference, target, photos, labels, quantize)
        report = {"schema": "fcn.export/1", **exported_meta, "path": str(out), "parity": parity,
                  "bytes": _size_of(target), "seconds": round(time.perf_counter() - started, 1)}
        if parity["passed"]:
            _put_in_place(target, out, fmt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def reference_model(model):
    """The checkpoint's network in stock Keras layers and float32 throughout: what is exported."""
    import keras

    from fcn_cli.accel.swap import portable_config, with_layers_of

    config = _float32_policies(portable_config(model.get_config()))
    config.pop("compile_config", None)
    return with_layers_of(model, keras.Model.from_config(config))


def _float32_policies(config):
    if isinstance(config, list):
        return [_float32_policies(v) for v in config]
    if not isinstance(config, dict):
        return config
    config = {k: _float32_policies(v) for k, v in config.items()}
    if config.get("class_name") == "DTypePolicy" and isinstance(config.get("config"), dict):
        config["config"] = {**config["config"], "name": "float32"}
    return config


def serving_model(reference, size: tuple[int, int] | None, labels: bool = False, uint8: bool = False):
    """``reference`` behind the exported input (fixed or dynamic H, W) and output (logits or class indices)."""
    import keras

    h, w = size or (None, None)
    dtype = "uint8" if uint8 else "float32"
    image = keras.Input((h, w, 3), dtype=dtype, name="image")
    logits = reference(keras.ops.cast(image, "float32") if uint8 else image)
    # The class index as top-1 of top_k: Keras's argmax on TensorFlow bit-casts floats (for -0.0), which tf2onnx
    # cannot convert; TopK exports everywhere.
    output = keras.ops.cast(keras.ops.top_k(logits, k=1)[1][..., 0], "int32") if labels else logits
    served = keras.Model(image, output, name="fcn_serving")
    served(np.zeros((1, h or 64, w or 64, 3), dtype))  # Keras's ONNX export wants a model that has run
    return served


def _classes_of(meta: dict, reference):
    from fcn_cli.classes import CAMVID, ClassTable

    embedded = meta.get("classes")
    classes = ClassTable.from_dict(embedded, source="the checkpoint's class table") if isinstance(embedded, dict) else CAMVID
    if classes.num_classes != reference.output_shape[-1]:
        raise FcnError(f"the checkpoint predicts {reference.output_shape[-1]} classes but its class table has "
                       f"{classes.num_classes}; export a checkpoint written by fcn train")
    return classes


def parity_images(size: tuple[int, int] | None, data: Path | None, classes) -> list[np.ndarray]:
    """Generated street scenes and up to PARITY_PHOTOS validation photos of ``data``, at the export size
    (dynamic exports: the scenes at two sizes and the photos at their own, padded to 32)."""
    from fcn_cli.synthetic import render_scene

    rng = np.random.default_rng(0)
    sizes = [size] if size else [(224, 224), (160, 288)]
    scenes = [render_scene(rng, *sizes[i % len(sizes)])[0] for i in range(PARITY_SCENES)]
    return scenes + [_fit(photo, size) for photo in _data_photos(data, classes, PARITY_PHOTOS)]


def _data_photos(data: Path | None, classes, count: int, split: str | None = None) -> list[np.ndarray]:
    if data is None:
        return []
    from fcn_cli.datasets import find_dataset
    from fcn_cli.images import read_image

    dataset = find_dataset(Path(data))
    splits = [split] if split else [s for s in ("val", "test", "train") if dataset.splits.get(s)]
    pairs = [p for s in splits[:1] for p in dataset.pairs(s)][:count]
    return [read_image(p.image) for p in pairs]


def _fit(photo: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    from fcn_cli.inference import pad_to_multiple, resize_logits

    if size is None:
        return pad_to_multiple(photo[None], 32)[0][0]
    return np.clip(resize_logits(photo, size), 0, 255)


def check_parity(reference, target: Path, photos: list[np.ndarray], labels: bool, quantize: str) -> dict:
    """Run the exported file and the Keras model on ``photos``: the largest logit difference, the share of
    pixels whose class agrees, and whether it meets PARITY[quantize]."""
    exported = open_exported(target)
    agree = total = 0
    worst = 0.0
    for photo in photos:
        batch = np.asarray(photo, np.float32)[None]
        want = np.asarray(reference.predict_on_batch(batch), np.float32)
        got = exported.predict_on_batch(batch)
        mine = got if labels else got.argmax(-1)
        if not labels:
            worst = max(worst, float(np.abs(got - want).max()))
        agree += int((mine == want.argmax(-1)).sum())
        total += mine.size
    agreement = agree / max(1, total)
    return {"images": len(photos), "pixels": total, "agreement": round(agreement, 6),
            "max_abs_logit_diff": None if labels else round(worst, 6), "threshold": PARITY[quantize],
            "passed": agreement >= PARITY[quantize]}


def _write(served, fmt: str, target: Path, quantize: str, size, data, classes) -> None:
    import warnings

    with warnings.catch_warnings():  # the converters' deprecation chatter (numpy 2, np.object) is not the user's
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        _convert(served, fmt, target, quantize, size, data, classes)


def _convert(served, fmt: str, target: Path, quantize: str, size, data, classes) -> None:
    if fmt == "savedmodel":
        served.export(str(target), format="tf_saved_model", verbose=False)
    elif fmt == "onnx":
        try:
            import tf2onnx  # noqa: F401  (Keras's ONNX export drives it)
        except ImportError:
            raise FcnError("--format onnx needs tf2onnx; pip install 'fcn-cli[export]'") from None
        served.export(str(target), format="onnx", verbose=False)
    else:
        served.export(str(target), format="litert", verbose=False, **_tflite_options(quantize, size, data, classes))


def _tflite_options(quantize: str, size, data, classes) -> dict:
    import tensorflow as tf

    if quantize == "fp16":
        return {"optimizations": [tf.lite.Optimize.DEFAULT], "target_spec": {"supported_types": [tf.float16]}}
    if quantize == "int8":
        photos = [_fit(p, size) for p in _data_photos(data, classes, REPRESENTATIVE_PHOTOS, split="train")]
        if not photos:
            raise FcnError(f"{data}: no training photos to calibrate int8 with")

        def representative():
            for photo in photos:
                yield [np.asarray(photo, np.float32)[None]]

        return {"optimizations": [tf.lite.Optimize.DEFAULT], "representative_dataset": representative}
    return {}


def _add_metadata(target: Path, fmt: str, meta: dict) -> None:
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    meta_path(target, fmt).write_text(text)
    if fmt == "onnx":  # inside the file too, where ONNX keeps metadata: readable by any ONNX tool
        import onnx

        proto = onnx.load(str(target))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "fcn", text
        onnx.save(proto, str(target))


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _put_in_place(target: Path, out: Path, fmt: str) -> None:
    """Rename the checked export (and its metadata file) into place; a replaced export is removed only
    once the new one is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, old)
    os.replace(target, out)
    if fmt != "savedmodel":
        os.replace(meta_path(target, fmt), meta_path(out, fmt))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
