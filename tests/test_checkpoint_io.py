"""The one-pass .keras writer and reader (fcn_cli.accel.checkpoint_io), its public-API fallback, and the
serving form of a checkpoint.

A file from ``save_keras`` must be a .keras file Keras itself reads: same members, same HDF5 groups,
datasets and attributes as ``model.save`` writes, the same values, a valid zip (CRC checked).
"""

from __future__ import annotations

import struct
import zipfile

import h5py
import keras
import numpy as np
import pytest

from fcn_cli.accel.checkpoint_io import WEIGHTS, save_keras, save_with_keras
from fcn_cli.accel.matmul_conv import MatmulConv2D
from fcn_cli.model import build_fcn

pytestmark = pytest.mark.usefixtures("levers_on")  # the one-pass writer is a lever: tested with it on


def _tiny(policy: str = "float32", compiled: bool = False, seed: int = 0):
    keras.utils.set_random_seed(seed)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = build_fcn("fcn8", 12, backbone_weights=None, width=1 / 16, head_width=16)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.1, w.shape).astype(w.dtype) for w in model.get_weights()])
    if compiled:
        from fcn_cli.accel.fused_adam import FusedAdam
        from fcn_cli.fit import compile_model

        compile_model(model, FusedAdam(1e-3), 12, 11)
        x = rng.uniform(0, 255, (2, 64, 64, 3)).astype("float32")
        y = rng.integers(0, 12, (2, 64, 64)).astype("int32")
        model.fit(x, y, epochs=1, verbose=0)  # Adam moments that are not zero
    return model


def _datasets(path) -> dict:
    """{HDF5 path: (values, attributes)} of the weights inside a .keras file."""
    out = {}
    with zipfile.ZipFile(path) as zf, zf.open(WEIGHTS) as fh, h5py.File(fh, "r") as h5:
        def visit(name, obj):
            attrs = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in obj.attrs.items()}
            out[name] = (np.asarray(obj) if isinstance(obj, h5py.Dataset) else None, attrs)
        h5.visititems(visit)
    return out


@pytest.mark.parametrize("policy,compiled", [("float32", False), ("mixed_bfloat16", True), ("float32", True)])
def test_save_keras_writes_what_model_save_writes(policy, compiled, tmp_path):
    model = _tiny(policy, compiled)
    ours, theirs = tmp_path / "ours.keras", tmp_path / "theirs.keras"
    save_keras(model, ours, {"fcn.json": b'{"epoch": 3}'})
    model.save(theirs)

    with zipfile.ZipFile(ours) as zf:
        assert zf.testzip() is None
        assert sorted(zf.namelist()) == sorted(zipfile.ZipFile(theirs).namelist() + ["fcn.json"])
        assert zf.read("fcn.json") == b'{"epoch": 3}'
    a, b = _datasets(ours), _datasets(theirs)
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        assert a[name][1] == b[name][1], name
        if a[name][0] is not None:
            assert a[name][0].dtype == b[name][0].dtype and np.array_equal(a[name][0], b[name][0]), name

    loaded = keras.saving.load_model(ours, safe_mode=True)
    for x, y in zip(model.weights, loaded.weights):
        assert np.array_equal(np.asarray(x), np.asarray(y)), x.path
    if compiled:
        assert int(loaded.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) > 0
        for x, y in zip(model.optimizer.variables, loaded.optimizer.variables):
            assert np.array_equal(np.asarray(x), np.asarray(y)), x.path


def test_the_weights_member_has_consistent_zip64_headers(tmp_path):
    path = tmp_path / "m.keras"
    save_keras(_tiny(), path)
    raw = path.read_bytes()
    info = zipfile.ZipFile(path).getinfo(WEIGHTS)
    assert info.header_offset == 0 and info.compress_type == zipfile.ZIP_STORED
    sig, _, _, method, _, _, crc, csize, usize, name_len, extra_len = struct.unpack("<IHHHHHIIIHH", raw[:30])
    assert sig == 0x04034B50 and method == 0 and crc == info.CRC and (csize, usize) == (0xFFFFFFFF, 0xFFFFFFFF)
    assert raw[30 : 30 + name_len] == WEIGHTS.encode()
    fields, extra = {}, raw[30 + name_len : 30 + name_len + extra_len]
    while extra:
        header_id, size = struct.unpack("<HH", extra[:4])
        fields[header_id], extra = extra[4 : 4 + size], extra[4 + size :]
    assert struct.unpack("<QQ", fields[1]) == (info.file_size, info.compress_size)  # zip64 sizes
    start = 30 + name_len + extra_len
    assert start % 4096 == 0  # padded (zipalign's field) so the weights start on a disk block
    data = raw[start : start + info.file_size]
    assert data[:8] == b"\x89HDF\r\n\x1a\n"  # the HDF5 image starts right after its header


def test_keras_own_save_is_the_fallback_and_reads_the_same(tmp_path):
    model = _tiny()
    path = tmp_path / "k.keras"
    save_with_keras(model, path, {"fcn.json": b"{}"})
    assert zipfile.ZipFile(path).read("fcn.json") == b"{}"
    loaded = keras.saving.load_model(path)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights()))


def test_oi_kernel_layout_computes_the_same_and_saves_conv2d_layout(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 11, 8)).astype("float32")
    for kernel in (7, 1):
        standard = MatmulConv2D(16, kernel, padding="same", activation="relu")
        standard(x)
        standard.set_weights([rng.normal(size=w.shape).astype("float32") for w in standard.get_weights()])
        oi = MatmulConv2D(16, kernel, padding="same", activation="relu", kernel_layout="oi")
        oi(x)
        assert tuple(oi.kernel.shape) == (16, kernel * kernel * 8)
        oi.load_own_variables({"0": standard.get_weights()[0], "1": standard.get_weights()[1]})
        np.testing.assert_allclose(np.asarray(oi(x)), np.asarray(standard(x)), rtol=1e-5, atol=1e-5)
        saved: dict = {}
        oi.save_own_variables(saved)
        assert np.array_equal(saved["0"], standard.get_weights()[0])
    with pytest.raises(ValueError, match="kernel_layout"):
        MatmulConv2D(4, 3, kernel_layout="ohwi")


@pytest.mark.parametrize("compiled", [False, True])
def test_a_checkpoint_loads_for_serving_in_its_compute_dtype_with_the_same_outputs(compiled, tmp_path, monkeypatch):
    from fcn_cli.runs import load_checkpoint, save_checkpoint

    monkeypatch.delenv("FCN_ACCEL", raising=False)  # the serving form is a lever: on for this test
    model = _tiny("mixed_bfloat16", compiled)
    path = tmp_path / "best.keras"
    save_checkpoint(model, path, {"variant": "fcn8"})
    training_form, _ = load_checkpoint(path)
    served, meta = load_checkpoint(path, for_inference=True)
    assert meta == {"variant": "fcn8"} and getattr(served, "optimizer", None) is None
    assert training_form.get_layer("block1_conv1").kernel.dtype == "float32"
    assert served.get_layer("block1_conv1").kernel.dtype == "bfloat16"
    assert served.get_layer("logits").dtype_policy.name == "float32"
    conv6 = served.get_layer("conv6")
    assert conv6.kernel_layout == "oi" and tuple(conv6.kernel.shape) == (16, 7 * 7 * 32)
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    want, got = training_form.predict_on_batch(x), served.predict_on_batch(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.99
    monkeypatch.setenv("FCN_ACCEL", "0")  # levers off: the stock layers, weights as saved, the same outputs
    plain, _ = load_checkpoint(path, for_inference=True)
    assert plain.get_layer("block1_conv1").kernel.dtype == "float32" and type(plain.get_layer("conv6")).__name__ == "Conv2D"
    np.testing.assert_allclose(plain.predict_on_batch(x), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_a_model_with_assets_or_moved_keras_internals_falls_back_to_keras(tmp_path, monkeypatch):
    from fcn_cli.accel import checkpoint_io as keras_file

    model = _tiny()
    calls = []
    real = keras_file.save_with_keras
    monkeypatch.setattr(keras_file, "save_with_keras", lambda *a: calls.append(a) or real(*a))

    def moved(*args, **kwargs):
        raise TypeError("H5IOStore.__init__() got an unexpected keyword argument")

    monkeypatch.setattr(keras_file, "_direct_store", moved)
    path = tmp_path / "m.keras"
    save_keras(model, path, {"fcn.json": b"{}"})
    assert len(calls) == 1
    loaded = keras.saving.load_model(path)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights()))

    monkeypatch.undo()
    vocab = keras.layers.StringLookup(vocabulary=["road", "sky"])
    inputs = keras.Input((1,), dtype="string")
    text_model = keras.Model(inputs, vocab(inputs))
    save_keras(text_model, tmp_path / "t.keras")
    assert keras.saving.load_model(tmp_path / "t.keras").layers[-1].get_vocabulary() == vocab.get_vocabulary()


def test_writing_over_an_old_file_leaves_none_of_its_bytes(tmp_path):
    # HDF5 leaves gaps where it aligns big datasets to blocks: they must read as zeros, not old bytes.
    path = tmp_path / "spare.keras"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3_000_000, dtype=np.uint8).tobytes())
    model = _tiny(compiled=True)
    save_keras(model, path, {"fcn.json": b"{}"})
    fresh = tmp_path / "fresh.keras"
    save_keras(model, fresh, {"fcn.json": b"{}"})
    assert path.stat().st_size == fresh.stat().st_size
    assert zipfile.ZipFile(path).read(WEIGHTS) == zipfile.ZipFile(fresh).read(WEIGHTS)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    loaded = keras.saving.load_model(path)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), loaded.get_weights()))


@pytest.fixture
def untested_keras(monkeypatch):
    """This Keras as a release the one-pass writer was never run against, with fcn's own uses of the
    private saving names booby-trapped: the public path must do all the work."""
    from fcn_cli import accel
    from fcn_cli.accel import checkpoint_io

    monkeypatch.setattr(keras, "version", lambda: "3.99.0")
    assert not accel.keras_internals_usable()

    def trap(*args, **kwargs):
        raise AssertionError("fcn used a private Keras saving name under an untested Keras")

    for name in ("_direct_store", "_no_assets_store", "_load_in_place"):
        monkeypatch.setattr(checkpoint_io, name, trap)


def test_an_untested_keras_saves_and_loads_through_the_public_api(untested_keras, tmp_path):
    from fcn_cli.accel.checkpoint_io import load_weights

    model = _tiny(compiled=True)
    path = tmp_path / "p.keras"
    save_keras(model, path, {"fcn.json": b'{"epoch": 1}'})
    assert zipfile.ZipFile(path).read("fcn.json") == b'{"epoch": 1}'
    twin = _tiny(seed=5)
    load_weights(twin, path)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), twin.get_weights()))


def test_a_broken_in_place_reader_falls_back_to_load_weights(tmp_path, monkeypatch):
    from fcn_cli.accel import checkpoint_io

    if not __import__("fcn_cli.accel", fromlist=["x"]).keras_internals_tested():
        pytest.skip("the in-place reader is off for this Keras (not one it was tested with)")
    model = _tiny()
    path = tmp_path / "r.keras"
    save_keras(model, path)

    def moved(*args, **kwargs):
        raise TypeError("H5IOStore.__init__() got an unexpected keyword argument")

    monkeypatch.setattr(checkpoint_io, "_direct_store", moved)
    twin = _tiny(seed=5)
    checkpoint_io.load_weights(twin, path)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), twin.get_weights()))
