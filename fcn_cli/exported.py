"""Exported models (``fcn export``) as fcn's inference sees a Keras model: ``predict_on_batch`` and ``output_shape``.

ONNX runs through ONNX Runtime and needs no TensorFlow (``pip install fcn-cli[onnx]``); TFLite through
LiteRT's interpreter (``ai_edge_litert``) where it is installed, else TensorFlow's; a SavedModel through
``tf.saved_model.load``. Every exported model carries fcn's metadata beside it (``<file>.json``; ``fcn.json``
inside a SavedModel folder): the class table, the input size (None where the height and width are
dynamic), the input dtype, and whether it outputs logits or class indices.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from fcn_cli.errors import FcnError

SUFFIXES = {".onnx": "onnx", ".tflite": "tflite"}
SAVED_MODEL_META = "fcn.json"


def format_of(path: str | Path) -> str | None:
    """"onnx", "tflite" or "savedmodel" for an exported model's path; None for anything else (a checkpoint)."""
    path = Path(path)
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return "savedmodel"
    return SUFFIXES.get(path.suffix.lower())


def meta_path(path: str | Path, fmt: str) -> Path:
    path = Path(path)
    return path / SAVED_MODEL_META if fmt == "savedmodel" else path.with_name(path.name + ".json")


def read_meta(path: str | Path, fmt: str) -> dict:
    where = meta_path(path, fmt)
    try:
        meta = json.loads(where.read_text())
    except FileNotFoundError:
        raise FcnError(f"{where}: not found; an exported model needs the metadata fcn export writes beside it "
                       "(export it again with `fcn export`)") from None
    except (OSError, ValueError) as exc:
        raise FcnError(f"{where}: unreadable metadata ({exc}); export the model again with `fcn export`") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt or not isinstance(meta.get("classes"), dict):
        raise FcnError(f"{where}: not fcn export metadata for a {fmt} model; export the model again with `fcn export`")
    return meta


class ExportedModel:
    """An exported model with the face fcn's inference uses: ``predict_on_batch(images)`` on (B, H, W, 3)
    float32 RGB in 0..255, returning (B, H, W, C) float32 logits (or (B, H, W) class indices for a
    ``--labels`` export), and ``output_shape``."""

    def __init__(self, path: Path, fmt: str, meta: dict, run):
        self.path, self.format, self.meta, self._run = path, fmt, meta, run
        size = meta.get("image_size")
        self.fixed_size = (int(size[0]), int(size[1])) if size else None  # None: any multiple of 32
        self.outputs_labels = meta.get("output") == "labels"
        self.num_classes = len(meta["classes"].get("classes", []))
        h, w = self.fixed_size or (None, None)
        self.output_shape = (None, h, w) if self.outputs_labels else (None, h, w, self.num_classes)
        self.input_dtype = np.dtype(meta.get("input_dtype", "float32"))
        self.jit_compile = False  # what inference sets on Keras models; nothing to compile here

    def predict_on_batch(self, images) -> np.ndarray:
        images = np.asarray(images)
        if self.fixed_size is not None and tuple(images.shape[1:3]) != self.fixed_size:
            raise FcnError(f"{self.path}: exported for {self.fixed_size[0]}x{self.fixed_size[1]} images, given "
                           f"{images.shape[1]}x{images.shape[2]}; use --mode resize, or export with --dynamic")
        if self.input_dtype == np.uint8:
            images = np.clip(np.rint(images), 0, 255)
        out = np.asarray(self._run(np.ascontiguousarray(images, dtype=self.input_dtype)))
        return out if self.outputs_labels else out.astype(np.float32, copy=False)


def open_exported(path: str | Path) -> ExportedModel:
    """The exported model at ``path`` (format from its name: .onnx, .tflite, or a SavedModel folder)."""
    path = Path(path)
    fmt = format_of(path)
    if fmt is None:
        raise FcnError(f"{path}: not an exported model (.onnx, .tflite or a SavedModel folder)")
    if not path.exists():
        raise FcnError(f"{path}: not found; give the path fcn export wrote")
    meta = read_meta(path, fmt)
    try:
        run = {"onnx": _onnx_runner, "tflite": _tflite_runner, "savedmodel": _saved_model_runner}[fmt](path)
    except FcnError:
        raise
    except Exception as exc:  # the runtimes' own errors for a corrupt or foreign file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise FcnError(f"{path}: cannot load the {fmt} model ({first}); export it again with `fcn export`") from None
    return ExportedModel(path, fmt, meta, run)


def _onnx_runner(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise FcnError(f"{path}: ONNX models need onnxruntime; pip install 'fcn-cli[onnx]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ONNX Runtime's warnings are not the user's business
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(None, {name: images})[0]


def _tflite_runner(path: Path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's copy of the same interpreter
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    # TensorFlow's copy warns that LiteRT's replaces it (either runs the file), and the runtime announces
    # its XNNPACK delegate on stderr: neither is the user's business.
    with warnings.catch_warnings(), quiet_stderr():
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
        interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]

    def run(images):
        if tuple(interpreter.get_input_details()[0]["shape"]) != images.shape:
            interpreter.resize_tensor_input(source["index"], images.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(target["index"]).copy()

    return run


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 to /dev/null for a while: what C++ runtimes (TensorFlow's start, TFLite's delegate)
    print there directly, past Python's sys.stderr."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _saved_model_runner(path: Path):
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]

    def run(images):
        (out,) = serve(**{name: tf.constant(images)}).values()
        return out.numpy()

    return run
