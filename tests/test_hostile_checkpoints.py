"""Hostile checkpoints: broken, foreign or edited files give one clear line; nothing inside a file is run
(no Lambda, no imports it names); the package never unpickles, evals or loads unsafely."""

from __future__ import annotations

import ast
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import fcn, one_line_error, tiny_model

from fcn_cli.errors import FcnError

REPO = Path(__file__).resolve().parents[1]


# =========================================================================== 4. hostile checkpoints


HOSTILE = {}  # what the file is -> (how to make it from a good checkpoint, what the one-line error must say)


def hostile(what: str, says: str):
    """Register a way to spoil a checkpoint."""
    def register(make):
        HOSTILE[what] = (make, says)
        return make
    return register


@hostile("truncated", "truncated")
def _truncated(src: Path, dest: Path) -> Path:
    data = src.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


@hostile("a folder", "folder")
def _folder(src: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    return dest


@hostile("a zip that is not a model", "not a Keras model")
def _foreign_zip(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr("readme.txt", "a zip, but not a Keras model")
    return dest


@hostile("random bytes", "not a Keras")
def _random_bytes(src: Path, dest: Path) -> Path:
    dest.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    return dest


@hostile("a flipped bit", "")
def _bit_flip(src: Path, dest: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the weights: the zip CRC catches it
    dest.write_bytes(bytes(data))
    return dest


@hostile("garbage inside a model-shaped zip", "cannot load")
def _garbage_inside(src: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr("config.json", "{not json")
        zf.writestr("model.weights.h5", b"not hdf5")
    return dest


def _edit_config(src: Path, dest: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    config = json.loads(entries["config.json"])

    def walk(node):
        if isinstance(node, dict):
            if node.get("class_name") == "Dropout":
                edit(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(dest, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return dest


@hostile("an unregistered custom class", "cannot load")
def _unregistered_class(src: Path, dest: Path) -> Path:
    def edit(node):
        node.update(module=None, class_name="SneakyLayer", registered_name="Custom>SneakyLayer")

    return _edit_config(src, dest, edit)




@pytest.mark.parametrize("case", list(HOSTILE))
def test_broken_checkpoints_are_one_clear_error(case, checkpoint, tmp_path):
    from fcn_cli.runs import load_checkpoint

    make, needle = HOSTILE[case]
    path = make(checkpoint, tmp_path / "model.keras")
    with pytest.raises(FcnError) as info:
        load_checkpoint(path, num_classes=12)
    message = str(info.value)
    assert str(path) in message and needle in message and "\n" not in message, message


def test_five_class_model_with_the_twelve_class_table_is_refused(tmp_path):
    from fcn_cli.inference import load_for_inference
    from fcn_cli.runs import load_checkpoint, save_checkpoint

    path = tmp_path / "five.keras"
    save_checkpoint(tiny_model(num_classes=5), path, {"image_size": [32, 32]})  # no class table inside
    with pytest.raises(FcnError, match="5 classes but the class table has 12"):
        load_checkpoint(path, num_classes=12)
    with pytest.raises(FcnError) as info:  # predict / evaluate without --classes: CamVid's 12 classes
        load_for_inference(path)
    assert str(path) in str(info.value) and "5 classes" in str(info.value) and "12" in str(info.value)


@pytest.fixture(scope="module")
def lambda_checkpoint(tmp_path_factory):
    """A real .keras whose Lambda layer writes a sentinel file whenever it runs; (path, sentinel)."""
    import keras

    folder = tmp_path_factory.mktemp("lambda")
    sentinel = folder / "code-ran"
    payload = lambda x, p=str(sentinel): (__import__("pathlib").Path(p).write_text("pwned"), x)[1]  # noqa: E731
    net = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Lambda(payload), keras.layers.Conv2D(12, 1)])
    path = folder / "lambda.keras"
    net.save(path)
    assert sentinel.exists(), "the payload should run when the model is built (it did, here, on purpose)"
    sentinel.unlink()
    return path, sentinel


def test_lambda_in_a_checkpoint_is_refused_and_never_runs(lambda_checkpoint):
    from fcn_cli.runs import load_checkpoint

    path, sentinel = lambda_checkpoint
    with pytest.raises(FcnError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "Lambda" in message and "\n" not in message, message
    assert not sentinel.exists(), "loading a checkpoint ran code from it"


def test_checkpoint_naming_an_importable_module_does_not_import_it(checkpoint, tmp_path, monkeypatch):
    """A config that names a module on sys.path: safe loading must not import it (import = code)."""
    from fcn_cli.runs import load_checkpoint

    sentinel = tmp_path / "imported"
    (tmp_path / "fcn_probe_module.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('imported')\nclass Probe:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def edit(node):
        node.update(module="fcn_probe_module", class_name="Probe", registered_name="fcn_probe_module>Probe")

    path = _edit_config(checkpoint, tmp_path / "probe.keras", edit)
    with pytest.raises(FcnError, match="cannot load"):
        load_checkpoint(path)
    assert not sentinel.exists() and "fcn_probe_module" not in sys.modules


@pytest.mark.slow
def test_cli_evaluate_refuses_a_truncated_checkpoint_in_one_line(checkpoint, small_set, tmp_path):
    path = _truncated(checkpoint, tmp_path / "half.keras")
    one_line_error(fcn("evaluate", "--model", path, "--data", small_set, "--json", tmp_path / "r.json"),
                   str(path), "truncated")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_cli_evaluate_refuses_a_lambda_checkpoint_in_one_line(lambda_checkpoint, small_set, tmp_path):
    path, sentinel = lambda_checkpoint
    one_line_error(fcn("evaluate", "--model", path, "--data", small_set, "--json", tmp_path / "r.json"),
                   str(path), "Lambda")
    assert not sentinel.exists()


# =========================================================================== 5. no code from data


PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def unsafe_constructs(source: str, filename: str = "<src>") -> list[str]:
    """Every eval/exec call, pickle-family import, allow_pickle=True, load_model(safe_mode=<not True>)
    and enable_unsafe_deserialization() in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLERS:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if isinstance(func, ast.Name) and name in ("eval", "exec"):
                found.append(f"{where} {name}(...)")
            if name == "enable_unsafe_deserialization":
                found.append(f"{where} {name}()")
            for kw in node.keywords:
                literal = kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
                if kw.arg == "allow_pickle" and literal is not False:
                    found.append(f"{where} allow_pickle={literal}")
                if name == "load_model" and kw.arg == "safe_mode" and literal is not True:
                    found.append(f"{where} load_model(safe_mode={literal})")
    return found


def test_the_scanner_catches_each_unsafe_construct():
    planted = (
        "import pickle\nfrom dill import loads\nimport numpy as np\nimport keras\n"
        "eval('1')\nexec('x = 1')\nnp.load('a.npy', allow_pickle=True)\n"
        "keras.saving.load_model('m.keras', safe_mode=False)\nkeras.config.enable_unsafe_deserialization()\n"
    )
    assert len(unsafe_constructs(planted)) == 7
    safe = ("import numpy as np\nnp.load('a.npy', allow_pickle=False)\nmodel.evaluate(x)\n"
            "load_model(p, safe_mode=True)\n")
    assert unsafe_constructs(safe) == []


def test_no_pickle_eval_exec_or_unsafe_loading_in_the_package():
    files = sorted((REPO / "fcn_cli").rglob("*.py"))
    assert len(files) >= 15
    found = []
    for path in files:
        found += unsafe_constructs(path.read_text(), str(path.relative_to(REPO)))
    assert found == []
    # The one model loader is explicit about safe mode (so a change of Keras's default cannot flip it).
    assert "safe_mode=True" in (REPO / "fcn_cli" / "runs.py").read_text()
