"""FCN-32s / FCN-16s / FCN-8s on a VGG-16 encoder (Long, Shelhamer & Darrell, 2015).

One builder for every variant, so training, evaluation, prediction and export share it.
Backend-neutral Keras 3: only ``keras.layers`` / ``keras.ops``, so it builds under TensorFlow and JAX.

Shapes for an input of H x W (multiples of 32): pool3 is H/8, pool4 H/16, pool5/conv7 H/32.
Upsampling is a transposed convolution with kernel 2f and stride f, initialized to bilinear
interpolation, with 'same' padding: exactly its 'valid' output (f*n + f) cropped by f/2 on each side
(the paper's crop layers), computed without the cropped border. That puts output pixel o at input
coordinate (o + 0.5)/f - 0.5: the half-pixel-centre convention of image resizing, so every skip adds
pixel to pixel. The model outputs float32 logits; softmax belongs to the loss
and to prediction.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

import keras
from keras import layers

from fcn_cli.errors import FcnError

VARIANTS = ("fcn32", "fcn16", "fcn8")
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

    ``accel``: fcn's CPU kernels (SmallMapConv2D for the VGG convolutions, MatmulConv2D for fc6/fc7;
    same weights and outputs as Conv2D); default :func:`accel_default`. Off, every layer is stock Keras.
    """
    if accel is None:
        accel = accel_default()
    conv, head = (SmallMapConv2D, MatmulConv2D) if accel else (layers.Conv2D, layers.Conv2D)
    if variant not in VARIANTS:
        raise FcnError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if width <= 0 or head_width < 1 or num_classes < 1:
        raise FcnError("--width must be > 0, --head-width >= 1 and the class count >= 1")
    weights = _normalize_weights_arg(backbone_weights)
    if weights is not None and (width != 1.0 or head_width != 4096):
        raise FcnError(
            f"backbone weights {weights!s} need the full VGG-16 (--width 1.0 --head-width 4096); "
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

    # fc6/fc7 "convolutionalized": 7x7 and 1x1 convolutions ('same' keeps conv7 at H/32), computed
    # as what they are, fully connected layers applied at every window (MatmulConv2D: same weights).
    x = head(head_width, 7, padding="same", activation="relu", name="conv6")(pools[5])
    x = layers.Dropout(dropout, name="drop6")(x)
    x = head(head_width, 1, activation="relu", name="conv7")(x)
    x = layers.Dropout(dropout, name="drop7")(x)
    score = _score(num_classes, "score_fr")(x)

    if variant == "fcn32":
        logits = upsample(score, num_classes, 32, "upscore32", trainable=False)
    else:
        score = upsample(score, num_classes, 2, "upscore2")
        score = layers.Add(name="fuse_pool4", dtype=CLASS_LAYER_DTYPE)([score, _score(num_classes, "score_pool4")(pools[4])])
        if variant == "fcn16":
            logits = upsample(score, num_classes, 16, "upscore16", trainable=False)
        else:
            score = upsample(score, num_classes, 2, "upscore_pool4")
            score = layers.Add(name="fuse_pool3", dtype=CLASS_LAYER_DTYPE)([score, _score(num_classes, "score_pool3")(pools[3])])
            logits = upsample(score, num_classes, 8, "upscore8", trainable=False)

    # Under a mixed policy the network computes in bf16/fp16; the loss must see float32 logits.
    logits = layers.Activation("linear", dtype="float32", name="logits")(logits)
    model = keras.Model(inputs, logits, name=variant)
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


@keras.saving.register_keras_serializable(package="fcn")
class MatmulConv2D(layers.Conv2D):
    """A Conv2D whose stride-1 convolution runs as one matrix product over unfolded windows (im2col).

    Same weights (kh, kw, in, out), same config, same outputs as ``Conv2D``; only the arithmetic path
    differs. For the head's big kernels on small maps (conv6: 7x7x512 -> 4096 on a 7x7 map at 224x224)
    oneDNN's direct convolution spends most of a training step reordering the 100M-weight kernel
    and in a slow backward-weights kernel; one GEMM of (windows x kh*kw*in) by (kh*kw*in x out) runs
    3x faster forward + backward in bf16 here (bench/NOTES.md). Kept to the head: for 3x3 layers
    on large maps the unfolded windows cost more than they save (measured too).

    ``kernel_layout="oi"`` (for serving, see :func:`serving_config`) holds the kernel in memory as
    (out, kh*kw*in): oneDNN's product reads it 25% faster that way (conv6 forward, bf16, batch 8:
    92 vs 117 ms; forward + backward measured equal, so training keeps Conv2D's layout, whose
    initializer fans are right). Saved files always hold Conv2D's layout.
    """

    LAYOUTS = ("hwio", "oi")

    def __init__(self, *args, kernel_layout: str = "hwio", **kwargs):
        super().__init__(*args, **kwargs)
        if kernel_layout not in self.LAYOUTS:
            raise ValueError(f"kernel_layout must be one of {self.LAYOUTS}, not {kernel_layout!r}")
        self.kernel_layout = kernel_layout

    def get_config(self):
        # Conv2D's config exactly unless serving: checkpoints stay readable as plain Conv2D configs.
        config = super().get_config()
        return config if self.kernel_layout == "hwio" else {**config, "kernel_layout": self.kernel_layout}

    def add_weight(self, *args, shape=None, name=None, **kwargs):
        if name == "kernel" and self.kernel_layout == "oi":  # Conv2D.build asks for (kh, kw, in, out)
            shape = (shape[-1], int(np.prod(shape[:-1])))
        return super().add_weight(*args, shape=shape, name=name, **kwargs)

    def save_own_variables(self, store):
        if not (self.built and self.kernel_layout == "oi"):
            return super().save_own_variables(store)
        store["0"] = keras.ops.convert_to_numpy(self._hwio(self._kernel))
        if self.use_bias:
            store["1"] = self.bias

    def load_own_variables(self, store):
        if self.kernel_layout == "oi" and self.built:
            values = {key: store[key] for key in store.keys()}
            # Cast first, then transpose in the backend (threaded): 100M weights for conv6.
            kernel = keras.ops.cast(keras.ops.convert_to_tensor(values["0"]), self._kernel.dtype)
            values["0"] = keras.ops.transpose(keras.ops.reshape(kernel, (-1, self.filters)))
            return super().load_own_variables(values)
        return super().load_own_variables(store)

    def _hwio(self, oi_kernel):
        """An (out, kh*kw*in) kernel in Conv2D's (kh, kw, in, out) layout."""
        kh, kw = self.kernel_size
        return keras.ops.reshape(keras.ops.transpose(oi_kernel), (kh, kw, -1, self.filters))

    def _windows(self, x):
        """(B, oh, ow, kh*kw*C): every kh x kw window of x, flattened in kernel.reshape(-1, out)'s order.

        One gather of precomputed pixel indices rather than kh*kw slices and a concat: the same values,
        but its gradient is one segment sum instead of kh*kw zero-padded slice gradients added up
        (conv6 at 224x224, batch 8: 7 ms forward + backward instead of 47).
        """
        kh, kw = self.kernel_size
        if self.padding == "same":  # TensorFlow's SAME: the odd pixel of an even kernel goes after
            x = keras.ops.pad(x, [[0, 0], [(kh - 1) // 2, kh // 2], [(kw - 1) // 2, kw // 2], [0, 0]])
        batch, height, width = keras.ops.shape(x)[:3]
        channels = x.shape[-1]
        oh, ow = height - kh + 1, width - kw + 1
        rows = keras.ops.reshape(keras.ops.arange(oh), (-1, 1, 1, 1)) + keras.ops.reshape(keras.ops.arange(kh), (1, 1, -1, 1))
        cols = keras.ops.reshape(keras.ops.arange(ow), (1, -1, 1, 1)) + keras.ops.reshape(keras.ops.arange(kw), (1, 1, 1, -1))
        pixels = keras.ops.reshape(rows * width + cols, (-1,))  # (oh, ow, kh, kw) in row-major order
        windows = keras.ops.take(keras.ops.reshape(x, (batch, height * width, channels)), pixels, axis=1)
        return keras.ops.reshape(windows, (batch, oh, ow, kh * kw * channels))

    def convolution_op(self, inputs, kernel):
        if (tuple(self.strides) != (1, 1) or tuple(self.dilation_rate) != (1, 1) or self.groups != 1
                or self.data_format != "channels_last"):
            return super().convolution_op(inputs, self._hwio(kernel) if self.kernel_layout == "oi" else kernel)
        kh, kw = self.kernel_size
        if (kh, kw) != (1, 1):  # a 1x1 kernel's windows are the pixels themselves (and SAME pads nothing)
            # Unfold in float32: the input gradient sums up to kh*kw window entries per pixel, which
            # in bf16 would round after every add (Conv2D accumulates once); the cast back is cheap.
            inputs = keras.ops.cast(self._windows(keras.ops.cast(inputs, "float32")), inputs.dtype)
        if self.kernel_layout == "oi":
            # A transpose the graph optimizer folds into the product (TensorFlow's MatMul transpose_b).
            flat_kernel = keras.ops.transpose(kernel)
        else:
            flat_kernel = keras.ops.reshape(kernel, (kh * kw * kernel.shape[2], kernel.shape[3]))
        return keras.ops.tensordot(inputs, flat_kernel, axes=1)


@keras.saving.register_keras_serializable(package="fcn")
class SmallMapConv2D(layers.Conv2D):
    """A Conv2D whose weight gradient on small maps is computed as kh*kw matrix products.

    Same weights, config, outputs and input gradient as ``Conv2D``. The weight gradient of a stride-1
    'same' convolution is, for each tap (i, j), the shifted input transposed times the output
    gradient: a (C x B*H*W) by (B*H*W x O) product. In bfloat16 on small maps that runs faster
    than oneDNN's backward-weights kernel (TF 2.21, avx512_bf16, batch 8, ms: 28x28x512 48 -> 38,
    14x14x512 19 -> 11) and slower on large ones (56x56x256 50 -> 55, 224x224x64 60 -> 136), so it
    is used only in training, on the CPU, for bfloat16 maps of at most ``SMALL_MAP_PIXELS`` pixels
    with shapes known when traced (bench/NOTES.md); every other call is Conv2D's own.
    """

    SMALL_MAP_PIXELS = 32 * 32

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._training = False

    def call(self, inputs, training=None):
        # Only training takes a weight gradient: predict and evaluate run Conv2D's own path.
        self._training = bool(training)
        if not self._gemm_weight_gradient(inputs):
            return super().call(inputs)
        outputs = self._convolve_with_gemm_gradient(inputs)
        return self.activation(outputs) if self.activation is not None else outputs

    def _gemm_weight_gradient(self, inputs) -> bool:
        height, width = inputs.shape[1:3]
        kh, kw = self.kernel_size
        return (self._training and self.compute_dtype == "bfloat16" and _computes_on_cpu()
                and height is not None and width is not None
                and height * width <= self.SMALL_MAP_PIXELS and self.padding == "same" and kh % 2 == 1 and kw % 2 == 1
                and tuple(self.strides) == (1, 1) and tuple(self.dilation_rate) == (1, 1) and self.groups == 1
                and self.data_format == "channels_last")

    def _convolve_with_gemm_gradient(self, inputs):
        """Convolution plus bias, whose gradient is computed here: input gradient as Conv2D's, weight
        gradient as per-tap products, bias gradient summed in float32 (oneDNN's fused backward-weights
        kernel did that; a bfloat16 sum of B*H*W terms was off by 9% in a probe)."""
        convolve = super().convolution_op
        kh, kw = self.kernel_size
        height, width, channels = inputs.shape[1:]
        # Tensors, not the variables: the custom gradient is for the values the convolution reads.
        kernel = keras.ops.cast(self.kernel, inputs.dtype)
        bias = keras.ops.cast(self.bias if self.use_bias else keras.ops.zeros((self.filters,)), inputs.dtype)

        @keras.ops.custom_gradient
        def conv(x, w, b):
            def grad(*args, upstream=None):
                dy = args[0] if upstream is None else upstream
                dx = keras.ops.conv_transpose(dy, w, strides=1, padding="same", data_format="channels_last")
                padded = keras.ops.pad(x, [[0, 0], [kh // 2, kh // 2], [kw // 2, kw // 2], [0, 0]])
                dy_rows = keras.ops.reshape(dy, (-1, self.filters))
                taps = [keras.ops.matmul(keras.ops.transpose(keras.ops.reshape(padded[:, i:i + height, j:j + width, :], (-1, channels))), dy_rows)
                        for i in range(kh) for j in range(kw)]
                dw = keras.ops.reshape(keras.ops.stack(taps), (kh, kw, channels, self.filters))
                db = keras.ops.cast(keras.ops.sum(keras.ops.cast(dy_rows, "float32"), axis=0), b.dtype)
                return dx, dw, db

            return keras.ops.add(convolve(x, w), keras.ops.reshape(b, (1, 1, 1, -1))), grad

        return conv(inputs, kernel, bias)


def accel_default() -> bool:
    """fcn's CPU kernels where they were measured to pay: the backend computes on the CPU (fcn_cli.devices)."""
    from fcn_cli.devices import accel_allowed

    return accel_allowed() and _computes_on_cpu()


# Checkpoints hold stock layers; fcn swaps its kernels in by layer name when it loads them.
_FAST_LAYERS = {"fcn>MatmulConv2D": "MatmulConv2D", "fcn>SmallMapConv2D": "SmallMapConv2D"}


def _fast_layer_for(name: str) -> str | None:
    if name in ("conv6", "conv7"):
        return "fcn>MatmulConv2D"
    if name.startswith("block") and "_conv" in name:
        return "fcn>SmallMapConv2D"
    return None


def portable_config(config):
    """A model config with fcn's kernels written as the stock ``Conv2D`` they compute (same weights, same
    outputs): a checkpoint that ``keras.saving.load_model`` reads without fcn_cli installed."""
    if isinstance(config, list):
        return [portable_config(v) for v in config]
    if not isinstance(config, dict):
        return config
    config = {k: portable_config(v) for k, v in config.items()}
    if config.get("registered_name") in _FAST_LAYERS:
        inner = {k: v for k, v in config["config"].items() if k != "kernel_layout"}
        config.update(module="keras.layers", class_name="Conv2D", registered_name=None, config=inner)
    return config


def stock_model(model: keras.Model) -> keras.Model:
    """``model`` itself if it has only stock layers, else a copy built from :func:`portable_config`
    holding the same weights (a saved file keys weights by layer class)."""
    if not any(isinstance(layer, (MatmulConv2D, SmallMapConv2D)) for layer in model.layers):
        return model
    return with_layers_of(model, keras.Model.from_config(portable_config(model.get_config())))


def with_layers_of(source: keras.Model, target: keras.Model) -> keras.Model:
    """``target`` (the same network, other layer classes or weight layouts) holding ``source``'s weights.

    Each layer hands its weights over in the saved-file layout (``save_own_variables`` /
    ``load_own_variables``), which every variant of a layer shares."""
    for src, dst in zip(source.layers, target.layers):
        if src.weights:
            store = {}
            src.save_own_variables(store)
            dst.load_own_variables(store)
    return target


def accelerated_config(config, accel: bool | None = None):
    """The inverse of :func:`portable_config` where fcn's CPU kernels are on (``accel``, default
    :func:`accel_default`); where they are off, fcn's kernels (older checkpoints) become stock layers."""
    if accel is None:
        accel = accel_default()
    if not accel:
        return portable_config(config)
    if isinstance(config, list):
        return [accelerated_config(v, accel) for v in config]
    if not isinstance(config, dict):
        return config
    config = {k: accelerated_config(v, accel) for k, v in config.items()}
    inner = config.get("config")
    if config.get("class_name") == "Conv2D" and config.get("module") == "keras.layers" and isinstance(inner, dict):
        fast = _fast_layer_for(str(inner.get("name", "")))
        if fast:
            config.update(module=__name__, class_name=_FAST_LAYERS[fast], registered_name=fast)
    return config


@functools.lru_cache(maxsize=None)
def _computes_on_cpu() -> bool:
    """Whether the backend computes on the CPU: SmallMapConv2D's products were measured against oneDNN there."""
    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    return False


def serving_config(config, bf16: bool = True):
    """A saved model's config arranged for inference, with identical outputs.

    Mixed dtype policies become their compute dtype (``mixed_bfloat16`` -> ``bfloat16``; the float32
    logits layer stays float32): a mixed layer casts its float32 weights to bf16 on every call, 134M
    of them per FCN-8s forward, and holding them in bf16 skips that (5% faster, half the memory).
    MatmulConv2D layers take ``kernel_layout="oi"``. Weights load from the same file, unchanged.
    ``bf16=False`` (a machine whose precision probe failed every bf16 path) serves bf16 models in float32.
    """
    if isinstance(config, list):
        return [serving_config(v, bf16) for v in config]
    if not isinstance(config, dict):
        return config
    # No optimizer for serving: a compiled checkpoint (last.keras) loads as the bare network.
    config = {k: serving_config(v, bf16) for k, v in config.items() if k != "compile_config"}
    inner = config.get("config")
    if config.get("class_name") == "DTypePolicy" and isinstance(inner, dict):
        name = str(inner.get("name", ""))
        if name.startswith("mixed_"):
            name = name.removeprefix("mixed_")
        if not bf16 and name == "bfloat16":
            name = "float32"
        config["config"] = {**inner, "name": name}
    if config.get("registered_name") == "fcn>MatmulConv2D" and isinstance(inner, dict):
        config["config"] = {**config["config"], "kernel_layout": "oi"}
    return config


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
    Keras VGG16 .h5 file, with or without top. Returns the names of the layers that received weights.
    """
    vgg = _reference_vgg16(weights)
    loaded = []
    for block, convs, _ in VGG16_BLOCKS:
        for i in range(1, convs + 1):
            name = f"block{block}_conv{i}"
            model.get_layer(name).set_weights(vgg.get_layer(name).get_weights())
            loaded.append(name)
    names = {layer.name for layer in vgg.layers}
    if {"fc1", "fc2"} <= names:
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


def _reference_vgg16(weights) -> keras.Model:
    from keras.applications import VGG16

    if weights == "imagenet":
        try:
            # With top: fc6/fc7 start from ImageNet as in the paper (553 MB download, cached once).
            return VGG16(include_top=True, weights="imagenet")
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


# --- any image size -------------------------------------------------------------------------


def pad_to_multiple(images: np.ndarray, multiple: int = 32) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad a (B, H, W, C) batch at the bottom/right to the next multiple; returns it and the original (H, W).

    Symmetric padding (mirror with the edge row repeated) keeps image statistics at the border.
    """
    h, w = images.shape[1:3]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        images = np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="symmetric")
    return images, (h, w)


def crop_to(outputs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop (B, H', W', ...) model outputs back to the original (H, W) of :func:`pad_to_multiple`."""
    h, w = size
    return outputs[:, :h, :w]


def count_flops(model: keras.Model, height: int, width: int) -> int:
    """Forward FLOPs (2 x multiply-adds) for one height x width image, counted analytically from the layers.

    Convolutions and transposed convolutions only: pooling, ReLU and adds are under 0.1%.
    """
    convs = [layer for layer in model.layers if isinstance(layer, (layers.Conv2D, layers.Conv2DTranspose))]
    probe = keras.Model(model.inputs, [(layer.input, layer.output) for layer in convs])
    shapes = probe.compute_output_spec(keras.KerasTensor((1, height, width, 3)))
    flops = 0
    for layer, (inp, out) in zip(convs, shapes):
        kh, kw = layer.kernel_size
        in_c, out_c = inp.shape[-1], out.shape[-1]
        # A transposed conv does its multiply-adds per input pixel; a conv per output pixel.
        pixels = inp.shape[1] * inp.shape[2] if isinstance(layer, layers.Conv2DTranspose) else out.shape[1] * out.shape[2]
        flops += 2 * pixels * kh * kw * in_c * out_c
    return int(flops)
