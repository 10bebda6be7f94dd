"""FCN-32s / FCN-16s / FCN-8s on a VGG-16 encoder (Long, Shelhamer & Darrell, 2015), and FCN-4s.

FCN-4s takes the paper's skip architecture one step further, to pool2 (H/4): the paper stopped at pool3
on PASCAL ("diminishing returns"), where objects are large; a road scene's poles and signs are 2-6 pixels
wide at 360x480, under one cell of pool3's grid.

One builder for every variant, so training, evaluation, prediction and export share it.
Backend-neutral Keras 3: only ``keras.layers`` / ``keras.ops``, so it builds under TensorFlow and JAX.

Shapes for an input of H x W (multiples of 32): pool2 is H/4, pool3 H/8, pool4 H/16, pool5/conv7 H/32.
Upsampling is a transposed convolution with kernel 2f and stride f, initialized to bilinear
interpolation, with 'same' padding: exactly its 'valid' output (f*n + f) cropped by f/2 on each side
(the paper's crop layers), computed without the cropped border. That puts output pixel o at input
coordinate (o + 0.5)/f - 0.5: the half-pixel-centre convention of image resizing, so every skip adds
pixel to pixel. The model outputs float32 logits; softmax belongs to the loss
and to prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import keras
from keras import layers

from fcn_cli import accel as levers
from fcn_cli.errors import FcnError

# The pools each variant fuses, coarse to fine; its output stride is the finest one's.
SKIPS = {"fcn32": (), "fcn16": (4,), "fcn8": (4, 3), "fcn4": (4, 3, 2)}
VARIANTS = tuple(SKIPS)
# (block, convs, filters): VGG-16 configuration D, with keras.applications' layer names.
VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
# Caffe VGG expects BGR minus the ImageNet mean; we take RGB in 0..255 and do both in one frozen layer.
IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)


def build_fcn(
    variant: str = "fcn8",
    num_classes: int = 12,
    backbone_weights: str | Path | None = "imagenet",
    width: float = 1.0,
    head_width: int = 4096,
    dropout: float = 0.5,
    accel: bool | None = None,
) -> keras.Model:
    """An FCN for RGB images of any size that is a multiple of 32; returns (B, H, W, num_classes) logits.

    Every layer is stock Keras. ``accel`` (default :func:`fcn_cli.accel.enabled`): the VGG convolutions
    and fc6/fc7 are fcn's faster kernels instead (``fcn_cli.accel``: same weights, same outputs).
    """
    if accel is None:
        accel = levers.enabled()
    conv, head = levers.fast_conv_layers() if accel else (layers.Conv2D, layers.Conv2D)
    if variant not in VARIANTS:
        raise FcnError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if width <= 0 or head_width < 1 or num_classes < 1:
        raise FcnError("--width must be > 0, --head-width >= 1 and the class count >= 1")
    weights = _normalize_weights_arg(backbone_weights)
    if weights is not None and width != 1.0:
        raise FcnError(
            f"backbone weights {weights!s} need the full-width VGG-16 encoder (--width 1.0); "
            "use --backbone-weights none for a scaled-down model"
        )

    inputs = keras.Input((None, None, 3), name="image")
    x = rgb_to_vgg_input()(inputs)
    pools = {}
    for block, convs, filters in VGG16_BLOCKS:
        for i in range(1, convs + 1):
            x = conv(_scaled(filters, width), 3, padding="same", activation="relu", name=f"block{block}_conv{i}")(x)
        x = layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
        pools[block] = x

    # fc6/fc7 "convolutionalized": 7x7 and 1x1 convolutions ('same' keeps conv7 at H/32).
    x = head(head_width, 7, padding="same", activation="relu", name="conv6")(pools[5])
    x = layers.Dropout(dropout, name="drop6")(x)
    x = head(head_width, 1, activation="relu", name="conv7")(x)
    x = layers.Dropout(dropout, name="drop7")(x)
    score = _score(num_classes, "score_fr")(x)

    # Each skip: score the pool, add it to the 2x-upsampled fused score so far (the paper's names kept: the
    # first 2x step is "upscore2", the next ones "upscore_pool<p+1>"), then one fixed bilinear step to H.
    for p in SKIPS[variant]:
        score = upsample(score, num_classes, 2, "upscore2" if p == 4 else f"upscore_pool{p + 1}")
        score = layers.Add(name=f"fuse_pool{p}", dtype=CLASS_LAYER_DTYPE)(
            [score, _score(num_classes, f"score_pool{p}")(pools[p])])
    stride = 2 ** min([5, *SKIPS[variant]])
    logits = upsample(score, num_classes, stride, f"upscore{stride}", trainable=False)

    # Under a mixed policy the network computes in bf16/fp16; the loss must see float32 logits.
    logits = layers.Activation("linear", dtype="float32", name="logits")(logits)
    model = keras.Model(inputs, logits, name=variant)
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


def rgb_to_vgg_input() -> layers.Layer:
    """A frozen 1x1 convolution: RGB in 0..255 -> BGR minus the ImageNet mean (Caffe VGG's input)."""
    perm = np.zeros((1, 1, 3, 3), np.float32)
    for rgb, bgr in ((0, 2), (1, 1), (2, 0)):
        perm[0, 0, rgb, bgr] = 1.0
    bias = -np.asarray(IMAGENET_BGR_MEAN, np.float32)
    return layers.Conv2D(
        3,
        1,
        name="rgb_to_bgr_mean",
        trainable=False,
        kernel_initializer=keras.initializers.Constant(perm),
        bias_initializer=keras.initializers.Constant(bias),
    )


def _scaled(filters: int, width: float) -> int:
    return max(1, int(round(filters * width)))


# Every layer whose channels are the classes (score layers, upsampling, skip sums) computes in float32 under any
# policy: oneDNN's AMX bf16 kernels get convolutions with 12 channels wrong (the 8x upsampling's gradient:
# relative error 1.3) and write out of bounds (the 2x steps' gradient: "malloc(): unaligned tcache chunk
# detected" on the full FCN-8s), bench/amx_repro.py and bench/NOTES.md. These layers are under 0.1% of
# FCN-8s' FLOPs, and they feed the float32 logits anyway.
CLASS_LAYER_DTYPE = "float32"


def _score(num_classes: int, name: str) -> layers.Layer:
    """1x1 class scores, zero-initialized and linear, as in the paper."""
    return layers.Conv2D(num_classes, 1, kernel_initializer="zeros", bias_initializer="zeros", name=name,
                         dtype=CLASS_LAYER_DTYPE)


def bilinear_kernel(factor: int, channels: int) -> np.ndarray:
    """(2f, 2f, channels, channels) transposed-convolution kernel doing per-channel bilinear upsampling."""
    size = 2 * factor
    center = factor - 0.5
    og = np.arange(size, dtype=np.float64)
    filt1d = 1.0 - np.abs(og - center) / factor
    filt = np.outer(filt1d, filt1d).astype(np.float32)
    kernel = np.zeros((size, size, channels, channels), np.float32)
    for c in range(channels):
        kernel[:, :, c, c] = filt
    return kernel


def upsample(x, channels: int, factor: int, name: str, trainable: bool = True):
    """x upsampled by ``factor``: a bilinear-initialized transposed convolution (kernel 2f, stride f).

    'same' padding gives f*n outputs: the 'valid' f*n + f with f/2 cropped per side, without
    computing the border (and without the crop's gradient, a zero-padded copy of the 224x224 logits).
    The 2x steps are learned (the paper's "initialize to bilinear, allow learning"); the final
    step stays fixed bilinear, as in the reference Caffe nets (lr_mult 0).
    In float32 under any policy (see ``CLASS_LAYER_DTYPE``).
    """
    return layers.Conv2DTranspose(
        channels,
        2 * factor,
        strides=factor,
        padding="same",
        use_bias=False,
        kernel_initializer=keras.initializers.Constant(bilinear_kernel(factor, channels)),
        trainable=trainable,
        name=name,
        dtype=CLASS_LAYER_DTYPE,
    )(x)


# --- backbone weights ------------------------------------------------------------------------


def _normalize_weights_arg(weights):
    if weights is None:
        return None
    text = str(weights)
    if text.lower() in ("none", ""):
        return None
    if text.lower() == "imagenet":
        return "imagenet"
    return Path(weights)


def load_backbone_weights(model: keras.Model, weights) -> list[str]:
    """Load ImageNet VGG-16 weights into the encoder by layer name; with fc1/fc2, net surgery into conv6/conv7.

    ``weights`` is "imagenet" (keras.applications, cached in ~/.keras/models) or a path to a standard
    Keras VGG16 .h5 file, with or without top. fc6/fc7 come from fc1/fc2 only for the paper's 4096-wide
    head; a narrower head (--head-width) starts random on the pretrained encoder. Returns the names of
    the layers that received weights.
    """
    paper_head = model.get_layer("conv7").filters == 4096
    vgg = _reference_vgg16(weights, top=paper_head)
    loaded = []
    for block, convs, _ in VGG16_BLOCKS:
        for i in range(1, convs + 1):
            name = f"block{block}_conv{i}"
            model.get_layer(name).set_weights(vgg.get_layer(name).get_weights())
            loaded.append(name)
    names = {layer.name for layer in vgg.layers}
    if paper_head and {"fc1", "fc2"} <= names:
        loaded += net_surgery(vgg, model)
    return loaded


def net_surgery(vgg: keras.Model, model: keras.Model) -> list[str]:
    """Reshape VGG's fc1 (25088x4096) and fc2 (4096x4096) into the 7x7 conv6 and 1x1 conv7."""
    fc1_w, fc1_b = vgg.get_layer("fc1").get_weights()
    fc2_w, fc2_b = vgg.get_layer("fc2").get_weights()
    # keras.applications flattens pool5 (7, 7, 512) in row-major (h, w, c) order: same order as a conv kernel.
    model.get_layer("conv6").set_weights([fc1_w.reshape(7, 7, 512, fc1_w.shape[-1]), fc1_b])
    model.get_layer("conv7").set_weights([fc2_w.reshape(1, 1, *fc2_w.shape), fc2_b])
    return ["conv6", "conv7"]


def _reference_vgg16(weights, top: bool = True) -> keras.Model:
    from keras.applications import VGG16

    if weights == "imagenet":
        try:
            # With top: fc6/fc7 start from ImageNet as in the paper (553 MB download, cached once);
            # a narrower head takes the encoder only (58 MB).
            return VGG16(include_top=top, weights="imagenet")
        except Exception as exc:  # no network, proxy, interrupted download...
            raise FcnError(
                f"cannot get the ImageNet VGG-16 weights ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "use --backbone-weights PATH to a local Keras VGG16 .h5 file, or --backbone-weights none"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise FcnError(
            f"{path}: backbone weights file not found; give a Keras VGG16 .h5 file, 'imagenet' or 'none'"
        )
    with_top = _h5_has_top(path)
    vgg = VGG16(include_top=with_top, weights=None)
    try:
        vgg.load_weights(str(path))
    except Exception as exc:
        raise FcnError(
            f"{path}: not a Keras VGG16 weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            "use the files of keras.applications.VGG16, 'imagenet' or 'none'"
        ) from None
    return vgg


def _h5_has_top(path: Path) -> bool:
    """Whether a VGG16 weights file holds fc1/fc2: legacy .h5 lists layer names, Keras 3 files dense groups."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "layer_names" in f.attrs:
                return "fc1" in [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
            return any(name.startswith("dense") for name in f.get("layers", {}))
    except OSError as exc:
        raise FcnError(f"{path}: not an HDF5 weights file ({exc}); give a Keras VGG16 .h5 file") from None


# --- staged training ------------------------------------------------------------------------


def transfer_weights(source: keras.Model, target: keras.Model) -> list[str]:
    """Copy every layer present in both models by name (with matching shapes): FCN-32s -> 16s -> 8s.

    Returns the names of the layers copied.
    """
    copied = []
    source_layers = {layer.name: layer for layer in source.layers}
    for layer in target.layers:
        other = source_layers.get(layer.name)
        if other is None or not layer.weights:
            continue
        src = other.get_weights()
        if [w.shape for w in src] != [tuple(w.shape) for w in layer.weights]:
            continue
        layer.set_weights(src)
        copied.append(layer.name)
    return copied
