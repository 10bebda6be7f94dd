"""The FCN builder: shapes, parameter count, layer names, bilinear init, net surgery, staged transfer."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from fcn_cli.errors import FcnError
from fcn_cli.flops import count_flops
from fcn_cli.inference import crop_to, pad_to_multiple
from fcn_cli.model import (
    VARIANTS,
    bilinear_kernel,
    build_fcn,
    transfer_weights,
)

TINY = dict(backbone_weights=None, width=1 / 16, head_width=32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", [(224, 224), (352, 480)])
def test_output_shape_equals_input_shape(variant, size):
    model = build_fcn(variant, num_classes=12, **TINY)
    x = np.random.default_rng(0).uniform(0, 255, (2, *size, 3)).astype("float32")
    y = model.predict(x, verbose=0)
    assert y.shape == (2, *size, 12)
    assert y.dtype == np.float32


def _analytic_fcn8_params(num_classes=12, head=4096):
    vgg_conv = 14_714_688  # VGG-16 convolutional part (keras.applications, include_top=False)
    conv6 = 7 * 7 * 512 * head + head
    conv7 = head * head + head
    scores = (head + 1) * num_classes + (512 + 1) * num_classes + (256 + 1) * num_classes
    # Bias-free transposed convs: 2x (4x4), 2x (4x4), 8x (16x16), each C -> C.
    upsampling = (4 * 4 + 4 * 4 + 16 * 16) * num_classes * num_classes
    preprocessing = 3 * 3 + 3  # the frozen RGB -> BGR-minus-mean 1x1 conv
    return vgg_conv + conv6 + conv7 + scores + upsampling + preprocessing


def test_full_fcn8_parameter_count_and_vgg_layer_names(tmp_path):
    model = build_fcn("fcn8", num_classes=12, backbone_weights=None)
    assert model.count_params() == _analytic_fcn8_params() == 134_360_432

    vgg = keras.applications.VGG16(include_top=False, weights=None)
    vgg_convs = [layer.name for layer in vgg.layers if layer.weights or "pool" in layer.name]
    ours = [layer.name for layer in model.layers if layer.name.startswith("block")]
    assert ours == vgg_convs

    # Weights saved from that model land in the layers of the same name.
    rng = np.random.default_rng(1)
    for layer in vgg.layers:
        if layer.weights:
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    path = tmp_path / "vgg16_notop.weights.h5"
    vgg.save_weights(path)
    loaded = build_fcn("fcn8", backbone_weights=path)
    for layer in vgg.layers:
        if layer.weights:
            for a, b in zip(layer.get_weights(), loaded.get_layer(layer.name).get_weights()):
                np.testing.assert_array_equal(a, b)
    # Without fc1/fc2 in the file, conv6 keeps its random init.
    assert not np.allclose(loaded.get_layer("conv6").get_weights()[0], 0)


def test_fcn4_adds_the_pool2_skip_to_fcn8():
    """FCN-4s = FCN-8s with upscore8 replaced by a learned 2x step, a zero score on pool2 and a fixed 4x step."""
    fcn8 = build_fcn("fcn8", num_classes=12, backbone_weights=None)
    fcn4 = build_fcn("fcn4", num_classes=12, backbone_weights=None)
    c = 12
    extra = (128 + 1) * c + (4 * 4 + 8 * 8 - 16 * 16) * c * c  # score_pool2, upscore_pool3 + upscore4 - upscore8
    assert fcn4.count_params() == fcn8.count_params() + extra == 134_336_636
    names = {layer.name for layer in fcn4.layers}
    assert {"score_pool2", "upscore_pool3", "fuse_pool2", "upscore4"} <= names and "upscore8" not in names
    assert fcn4.get_layer("score_pool2").input.shape[-1] == 128  # pool2: block2's 128 channels
    assert not fcn4.get_layer("upscore4").trainable and fcn4.get_layer("upscore_pool3").trainable


def test_net_surgery_from_a_with_top_legacy_h5(tmp_path):
    """The standard Keras VGG16 file (legacy HDF5, with top): fc1/fc2 become conv6/conv7 by reshaping."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    vgg = keras.applications.VGG16(include_top=True, weights=None)
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, vgg)
    model = build_fcn("fcn16", backbone_weights=str(path))
    fc1_w, fc1_b = vgg.get_layer("fc1").get_weights()
    fc2_w, fc2_b = vgg.get_layer("fc2").get_weights()
    conv6_w, conv6_b = model.get_layer("conv6").get_weights()
    conv7_w, conv7_b = model.get_layer("conv7").get_weights()
    np.testing.assert_array_equal(conv6_w, fc1_w.reshape(7, 7, 512, 4096))
    np.testing.assert_array_equal(conv6_b, fc1_b)
    np.testing.assert_array_equal(conv7_w[0, 0], fc2_w)
    np.testing.assert_array_equal(conv7_b, fc2_b)
    np.testing.assert_array_equal(
        model.get_layer("block5_conv3").get_weights()[0], vgg.get_layer("block5_conv3").get_weights()[0]
    )
    # Reshape order check, independent of numpy's reshape: fc1 row index = (h * 7 + w) * 512 + c.
    h, w, c, o = 3, 5, 17, 101
    assert conv6_w[h, w, c, o] == fc1_w[(h * 7 + w) * 512 + c, o]
    # A narrower head (the CamVid recipes' 1024) takes the pretrained encoder; fc6/fc7 start random.
    narrow = build_fcn("fcn8", backbone_weights=str(path), head_width=64)
    np.testing.assert_array_equal(narrow.get_layer("block5_conv3").get_weights()[0], vgg.get_layer("block5_conv3").get_weights()[0])
    assert narrow.get_layer("conv6").get_weights()[0].shape == (7, 7, 512, 64)


def _bilinear_reference(x: np.ndarray, factor: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling of (H, W) written independently of the model code."""
    h, w = x.shape
    out = np.empty((h * factor, w * factor))
    for oy in range(h * factor):
        for ox in range(w * factor):
            sy, sx = (oy + 0.5) / factor - 0.5, (ox + 0.5) / factor - 0.5
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            fy, fx = sy - y0, sx - x0
            val = 0.0
            for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
                for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
                    if 0 <= yy < h and 0 <= xx < w:  # outside the map counts as zero (the border effect)
                        val += wy * wx * x[yy, xx]
            out[oy, ox] = val
    return out


@pytest.mark.parametrize("factor", [2, 4, 8, 32])
def test_upsampling_layer_is_bilinear_at_init(factor):
    from fcn_cli.model import upsample

    channels = 3
    inp = keras.Input((None, None, channels))
    model = keras.Model(inp, upsample(inp, channels, factor, "up"))
    rng = np.random.default_rng(factor)
    score = rng.normal(size=(1, 5, 6, channels)).astype("float32")
    out = model.predict(score, verbose=0)
    assert out.shape == (1, 5 * factor, 6 * factor, channels)
    for c in range(channels):
        ref = _bilinear_reference(score[0, :, :, c], factor)
        # The transposed conv treats outside the map as zero; tf.image.resize would clamp to the edge.
        # Border effect: only the outer factor/2 output pixels differ; the interior matches exactly.
        np.testing.assert_allclose(out[0, :, :, c], ref, atol=1e-4)
        inner = slice(factor // 2, -(factor // 2))
        clamp = _clamped_resize(score[0, :, :, c], factor)
        np.testing.assert_allclose(out[0, inner, inner, c], clamp[inner, inner], atol=1e-4)


@pytest.mark.parametrize("factor", [2, 4, 8, 16, 32])
def test_upsampling_is_the_valid_transposed_conv_cropped_by_half_the_factor(factor):
    # The paper crops the 'valid' output; 'same' padding must give the same pixels for any learned kernel.
    from fcn_cli.model import upsample

    rng = np.random.default_rng(factor)
    score = rng.normal(size=(2, 3, 5, 4)).astype("float32")
    inp = keras.Input((None, None, 4))
    model = keras.Model(inp, upsample(inp, 4, factor, "up"))
    kernel = rng.normal(size=(2 * factor, 2 * factor, 4, 4)).astype("float32")
    model.get_layer("up").set_weights([kernel])
    valid = keras.layers.Conv2DTranspose(4, 2 * factor, strides=factor, padding="valid", use_bias=False)
    valid.build(score.shape)
    valid.set_weights([kernel])
    crop = factor // 2
    expected = keras.ops.convert_to_numpy(valid(score))[:, crop:-crop, crop:-crop]
    np.testing.assert_allclose(model.predict(score, verbose=0), expected, rtol=1e-5, atol=1e-5)


def _clamped_resize(x, factor):
    import tensorflow as tf

    out = tf.image.resize(x[None, :, :, None], (x.shape[0] * factor, x.shape[1] * factor), method="bilinear")
    return out.numpy()[0, :, :, 0]


def test_bilinear_kernel_is_separable_tent():
    k = bilinear_kernel(2, 2)
    np.testing.assert_allclose(k[:, :, 0, 0], np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25]))
    assert np.all(k[:, :, 0, 1] == 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_untrained_logits_are_identical_at_every_pixel(variant):
    model = build_fcn(variant, **TINY)
    x = np.random.default_rng(2).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    y = model.predict(x, verbose=0)
    assert np.all(y == y[0, 0, 0])


def test_transfer_weights_fcn32_to_16_to_8():
    fcn32 = build_fcn("fcn32", **TINY)
    rng = np.random.default_rng(3)
    for layer in fcn32.layers:
        if layer.trainable_weights:
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    fcn16 = build_fcn("fcn16", **TINY)
    copied = transfer_weights(fcn32, fcn16)
    assert "score_fr" in copied and "conv7" in copied and "block1_conv1" in copied
    assert "upscore32" not in copied  # fcn16 has no such layer
    for name in copied:
        for a, b in zip(fcn32.get_layer(name).get_weights(), fcn16.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    fcn8 = build_fcn("fcn8", **TINY)
    copied8 = transfer_weights(fcn16, fcn8)
    assert {"score_pool4", "upscore2", "conv6"} <= set(copied8)
    np.testing.assert_array_equal(
        fcn8.get_layer("score_pool4").get_weights()[0], fcn16.get_layer("score_pool4").get_weights()[0]
    )
    # FCN-4s from FCN-8s: everything but the new pool2 score (zero, as every new skip starts) and the 4x step.
    for layer in fcn8.layers:
        if layer.trainable_weights:
            layer.set_weights([rng.normal(size=w.shape).astype("float32") for w in layer.get_weights()])
    fcn4 = build_fcn("fcn4", **TINY)
    copied4 = transfer_weights(fcn8, fcn4)
    assert {"score_pool3", "upscore_pool4", "conv7"} <= set(copied4)
    assert "score_pool2" not in copied4 and not np.any(fcn4.get_layer("score_pool2").get_weights()[0])


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(FcnError, match="unknown variant"):
        build_fcn("fcn2", backbone_weights=None)
    with pytest.raises(FcnError, match="--backbone-weights none"):
        build_fcn("fcn8", backbone_weights="imagenet", width=0.5)
    with pytest.raises(FcnError, match="not found"):
        build_fcn("fcn8", backbone_weights=tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(FcnError, match="junk.h5"):
        build_fcn("fcn8", backbone_weights=junk)


def test_imagenet_offline_is_one_clear_line(monkeypatch, tmp_path):
    # Point keras' cache at an empty folder and make every download fail as it does offline.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    import keras.src.utils.file_utils as file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", offline)
    import keras.src.applications.vgg16 as vgg16_module

    monkeypatch.setattr(vgg16_module.file_utils, "get_file", offline)
    with pytest.raises(FcnError) as info:
        build_fcn("fcn8", backbone_weights="imagenet")
    message = str(info.value)
    assert "\n" not in message and "--backbone-weights none" in message and "PATH" in message


@pytest.mark.parametrize("size", [(1, 1), (31, 33), (360, 480), (64, 64)])
def test_pad_and_crop_round_trip(size):
    x = np.random.default_rng(4).uniform(0, 255, (2, *size, 3)).astype("float32")
    padded, original = pad_to_multiple(x)
    assert padded.shape[1] % 32 == 0 and padded.shape[2] % 32 == 0
    assert original == size
    np.testing.assert_array_equal(crop_to(padded, original), x)


def test_flops_match_the_paper_scale():
    model = build_fcn("fcn8", backbone_weights=None)
    gflops = count_flops(model, 224, 224) / 1e9
    # VGG-16 convs 30.7 + conv6 10.1 + conv7 1.6 GFLOP at 224x224.
    assert 42.3 < gflops < 42.6


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_builds_and_trains_under_jax_backend_with_and_without_the_levers():
    """Backend-neutral Keras: the stock model predicts under JAX; SmallMapConv2D's gradient is Conv2D's there,
    the ce+lovasz loss differentiates under jit, and the accelerated bf16 model's gradient takes its products
    (one JAX process for all four: its start is slow). bench/gpu_check.py's test trains that model under JAX until its loss falls."""
    code = """
import numpy as np, jax, keras
from fcn_cli.accel.small_map_conv import SmallMapConv2D
from fcn_cli.model import build_fcn
plain = build_fcn('fcn8', backbone_weights=None, width=1/16, head_width=16, accel=False)
assert plain.predict(np.zeros((1, 64, 64, 3), 'float32'), verbose=0).shape == (1, 64, 64, 12)
x = np.random.default_rng(0).normal(size=(2, 6, 5, 8)).astype('float32')
conv = keras.layers.Conv2D(4, 3, padding='same', activation='relu')
fast = SmallMapConv2D.from_config(conv.get_config()); conv(x); fast(x); fast.set_weights(conv.get_weights())
decide = SmallMapConv2D._gemm_weight_gradient
SmallMapConv2D._gemm_weight_gradient = lambda self, inp: True  # float32 would not take the products
def loss(w, layer):
    y, _ = layer.stateless_call(w, [], x, **({'training': True} if isinstance(layer, SmallMapConv2D) else {}))
    return (y * jax.numpy.cos(y)).sum()
for a, b in zip(jax.grad(loss)([v.value for v in conv.trainable_variables], conv),
                jax.grad(loss)([v.value for v in fast.trainable_variables], fast)):
    assert float(abs(a - b).max()) < 1e-4, float(abs(a - b).max())
from fcn_cli.losses import segmentation_loss
ce_lovasz = segmentation_loss('ce+lovasz', 12)
labels = np.random.default_rng(1).integers(0, 12, (2, 32, 32))
logits = np.random.default_rng(2).normal(size=(2, 32, 32, 12)).astype('float32')
g = jax.jit(jax.grad(lambda z: ce_lovasz(labels, z, np.ones((2, 32, 32), 'float32'))))(logits)
assert np.isfinite(np.asarray(g)).all() and float(abs(g).max()) > 0
taken = []
SmallMapConv2D._gemm_weight_gradient = lambda self, inp: taken.append(decide(self, inp)) or taken[-1]
keras.mixed_precision.set_global_policy('mixed_bfloat16')
m = build_fcn('fcn8', backbone_weights=None, width=1/16, head_width=16, accel=True)
def loss(w):
    y, _ = m.stateless_call(w, [v.value for v in m.non_trainable_variables], np.zeros((2, 64, 64, 3), 'float32'), training=True)
    return (y.astype('float32') ** 2).mean()
grads = jax.jit(jax.grad(loss))([v.value for v in m.trainable_variables])
assert all(np.isfinite(np.asarray(g, 'float32')).all() for g in grads) and any(taken), taken
print(keras.backend.backend())
"""
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("jax")


@pytest.mark.parametrize(("kernel", "padding", "hw"), [
    (7, "same", (7, 7)), (7, "same", (3, 5)), (7, "valid", (9, 11)), (1, "valid", (4, 6)), (4, "same", (5, 6)), (3, "same", (1, 1)),
])
def test_matmul_conv_is_conv2d_in_values_and_gradients(kernel, padding, hw):
    import tensorflow as tf

    from fcn_cli.accel.matmul_conv import MatmulConv2D

    rng = np.random.default_rng(kernel)
    x = tf.constant(rng.normal(size=(2, *hw, 5)).astype("float32"))
    conv = keras.layers.Conv2D(6, kernel, padding=padding, activation="relu")
    fast = MatmulConv2D.from_config(conv.get_config())
    conv(x)
    fast(x)
    fast.set_weights([w + 0.1 * rng.normal(size=w.shape).astype("float32") for w in conv.get_weights()])
    conv.set_weights(fast.get_weights())
    grads = []
    for layer in (conv, fast):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.cos(y))
        grads.append((y, *tape.gradient(loss, [x, *layer.trainable_weights])))
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_matmul_conv_head_saves_and_loads_in_safe_mode(tmp_path):
    from fcn_cli.accel.matmul_conv import MatmulConv2D

    model = build_fcn("fcn8", backbone_weights=None, width=1 / 16, head_width=16, accel=True)
    assert isinstance(model.get_layer("conv6"), MatmulConv2D) and isinstance(model.get_layer("conv7"), MatmulConv2D)
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded.get_layer("conv6")) is MatmulConv2D
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_a_fresh_process_loads_the_head_through_load_checkpoint(tmp_path):
    # `fcn predict` never imports the model builder itself: loading must register MatmulConv2D.
    path = tmp_path / "m.keras"
    build_fcn("fcn8", backbone_weights=None, width=1 / 16, head_width=16, accel=True).save(path)
    code = f"from fcn_cli.runs import load_checkpoint; m, _ = load_checkpoint({str(path)!r}); print(type(m.get_layer('conv6')).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("MatmulConv2D")


def test_matmul_conv_in_bf16_is_as_accurate_as_conv2d():
    import tensorflow as tf

    from fcn_cli.accel.matmul_conv import MatmulConv2D

    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=(2, 7, 7, 64)).astype("float32"))
    exact = keras.layers.Conv2D(32, 7, padding="same")
    exact(x)
    weights = exact.get_weights()

    def value_and_input_grad(layer):
        layer(x)
        layer.set_weights(weights)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(layer(x), tf.float32)
            loss = tf.reduce_sum(y * tf.sin(y))
        return y.numpy(), tape.gradient(loss, x).numpy()

    ref_y, ref_g = value_and_input_grad(exact)
    errors = {}
    for cls in (keras.layers.Conv2D, MatmulConv2D):
        y, g = value_and_input_grad(cls(32, 7, padding="same", dtype="mixed_bfloat16"))
        errors[cls.__name__] = (np.abs(y - ref_y).max() / np.abs(ref_y).max(), np.abs(g - ref_g).max() / np.abs(ref_g).max())
    conv, fast = errors["Conv2D"], errors["MatmulConv2D"]
    assert fast[0] < 2 * conv[0] + 1e-3 and fast[1] < 2 * conv[1] + 1e-3, errors


def _conv_and_small_map_twin(dtype, kernel=3, filters=6):
    from fcn_cli.accel.small_map_conv import SmallMapConv2D

    conv = keras.layers.Conv2D(filters, kernel, padding="same", activation="relu", dtype=dtype)
    fast = SmallMapConv2D.from_config(conv.get_config())
    assert type(fast) is SmallMapConv2D and fast.get_config() == conv.get_config()
    return conv, fast


def _values_and_gradients(layer, x):
    import tensorflow as tf

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.cast(layer(x, training=True), tf.float32)
            loss = tf.reduce_sum(y * tf.cos(y))
        return (y, *tape.gradient(loss, [x, *layer.trainable_weights]))

    return [t.numpy() for t in step(x)]


@pytest.mark.parametrize(("kernel", "hw"), [(3, (6, 5)), (3, (1, 1)), (5, (4, 7))])
def test_small_map_conv_weight_gradient_as_matmuls_is_conv2d_in_float32(kernel, hw, monkeypatch):
    from fcn_cli.accel.small_map_conv import SmallMapConv2D

    taken = []
    decide = SmallMapConv2D._gemm_weight_gradient
    monkeypatch.setattr(SmallMapConv2D, "_gemm_weight_gradient",
                        lambda self, x: taken.append(decide(self, x)) or True)  # float32 would not take it
    rng = np.random.default_rng(kernel)
    x = rng.normal(size=(2, *hw, 5)).astype("float32")
    conv, fast = _conv_and_small_map_twin("float32", kernel)
    conv(x)
    fast(x)
    fast.set_weights([w + 0.1 * rng.normal(size=w.shape).astype("float32") for w in conv.get_weights()])
    conv.set_weights(fast.get_weights())
    for a, b in zip(_values_and_gradients(conv, x), _values_and_gradients(fast, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert taken and not any(taken)


def test_small_map_conv_takes_the_matmul_gradient_only_for_small_bf16_maps_in_training(monkeypatch):
    import tensorflow as tf

    from fcn_cli.accel.small_map_conv import SmallMapConv2D

    rng = np.random.default_rng(0)
    conv, fast = _conv_and_small_map_twin("mixed_bfloat16", filters=16)
    fast._training = True
    assert fast._gemm_weight_gradient(keras.KerasTensor((8, 28, 28, 8), dtype="bfloat16"))
    assert not fast._gemm_weight_gradient(keras.KerasTensor((8, 56, 56, 8), dtype="bfloat16"))
    assert not fast._gemm_weight_gradient(keras.KerasTensor((8, None, None, 8), dtype="bfloat16"))
    fast._training = False  # predict / evaluate
    assert not fast._gemm_weight_gradient(keras.KerasTensor((8, 28, 28, 8), dtype="bfloat16"))
    f32 = _conv_and_small_map_twin("float32")[1]
    f32._training = True
    assert not f32._gemm_weight_gradient(keras.KerasTensor((8, 28, 28, 8)))

    taken = []
    decide = SmallMapConv2D._gemm_weight_gradient
    monkeypatch.setattr(SmallMapConv2D, "_gemm_weight_gradient", lambda self, x: taken.append(decide(self, x)) or taken[-1])

    # In bf16 its gradients are as close to the float32 ones as Conv2D's own bf16 gradients are.
    x = tf.constant(rng.normal(size=(2, 14, 14, 8)).astype("float32"))
    exact = keras.layers.Conv2D(16, 3, padding="same", activation="relu")
    exact(x)
    conv(x)
    fast(x)
    for layer in (conv, fast):
        layer.set_weights(exact.get_weights())
    ref = _values_and_gradients(exact, x)

    def errors(layer):
        return [np.abs(a - r).max() / np.abs(r).max() for a, r in zip(_values_and_gradients(layer, x), ref)]

    taken.clear()  # the build call above was not training
    conv_err, fast_err = errors(conv), errors(fast)
    assert taken and all(taken)  # the traced training step took the products
    assert all(f <= 2 * c + 1e-3 for f, c in zip(fast_err, conv_err)), (fast_err, conv_err)


def test_matmul_conv_windows_with_unknown_height_and_width():
    # Inference relaxes shapes after a retrace (reduce_retracing): the gathered windows must not need them.
    import tensorflow as tf

    from fcn_cli.accel.matmul_conv import MatmulConv2D

    rng = np.random.default_rng(5)
    conv = keras.layers.Conv2D(6, 7, padding="same")
    fast = MatmulConv2D.from_config(conv.get_config())
    x = rng.normal(size=(2, 9, 5, 4)).astype("float32")
    conv(x)
    fast(x)
    fast.set_weights(conv.get_weights())
    relaxed = tf.function(lambda x: fast(x), input_signature=[tf.TensorSpec((None, None, None, 4))])
    for hw in [(9, 5), (3, 11), (1, 1)]:
        x = rng.normal(size=(3, *hw, 4)).astype("float32")
        np.testing.assert_allclose(relaxed(x).numpy(), conv(x).numpy(), rtol=1e-5, atol=1e-5)
