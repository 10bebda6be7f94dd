"""bench/camvid.py's recipe tables, checked without training: a flag `fcn train` refuses, or a recipe that
trains the wrong model, would otherwise show only after the recipes before it had their half hours."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fcn_cli.cli import parse_range, parse_size
from fcn_cli.reference import click_command, subcommands

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_camvid", ROOT / "bench" / "camvid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


camvid = _load_bench()
TRAIN = dict(subcommands(click_command()))["train"]


@pytest.mark.parametrize("name", list(camvid.RECIPES))
def test_every_stage_of_every_recipe_parses_as_fcn_train(name, tmp_path):
    args = argparse.Namespace(data=tmp_path / "camvid", budget_min=30.0, eval_min=2.5, epochs=82, seed=0)
    init, minutes = [], 0.0
    for variant, share in camvid.stages(name):
        argv = camvid.train_args(name, variant, share, args, tmp_path / variant, init)
        assert argv[0] == "train"
        params = TRAIN.make_context("fcn train", argv[1:]).params
        assert params["variant"].value == variant
        parse_size(params["image_size"])
        parse_range(params["scale"], "--scale")
        # Pretrained recipes load the HED file at full width; the scratch ones are the width-0.5 model.
        model = camvid.RECIPE_MODEL.get(name, camvid.MODEL)
        assert params["backbone_weights"] == camvid._flag(model, "--backbone-weights")
        assert params["width"] == (1.0 if name in camvid.RECIPE_MODEL else 0.5)
        assert params["init_from"] == (Path(init[1]) if init else None)
        minutes += params["time_limit"]
        init = ["--init-from", str(tmp_path / variant / "best.keras")]
    # Stages split the training minutes; the evaluations keep theirs.
    assert minutes == pytest.approx(args.budget_min - args.eval_min, abs=0.02)


def test_variants_register_model_flags_and_epochs_together():
    for name in ("native-lovasz", "native-median", "native-uniform", "native-lovasz-uniform", "pretrained-staged"):
        assert camvid.RECIPE_MODEL[name] is camvid.PRETRAINED_MODEL
        assert camvid.RECIPE_EPOCHS[name] == camvid.RECIPE_EPOCHS["pretrained-native"]
    assert camvid._flag(camvid.RECIPES["native-lovasz"], "--loss") == "ce+lovasz"
    assert camvid._flag(camvid.RECIPES["native-median"], "--class-weights") == "median"
    assert camvid._flag(camvid.RECIPES["pretrained-native"], "--class-weights") == "median-sqrt"
    assert [v for v, _ in camvid.stages("pretrained-staged")] == ["fcn32", "fcn16", "fcn8"]
    # The FCN-4s recipes: the pretrained model with one flag changed, one stage of fcn4.
    for name in ("native-lovasz-fcn4", "native-lovasz-fcn4-unweighted"):
        assert camvid.recipe_model(name) == camvid._with(camvid.PRETRAINED_MODEL, variant="fcn4")
        assert camvid.stages(name) == [("fcn4", 1.0)]
    assert camvid._flag(camvid.RECIPES["native-lovasz-fcn4-unweighted"], "--class-weights") == "none"
    assert camvid._flag(camvid.RECIPES["native-lovasz-up"], "--scale") == "1.75,2.5"


def test_table_and_partial_report(tmp_path):
    per_class = [{"name": "sky", "iou": 0.9}, {"name": "column/pole", "iou": 0.07}, {"name": "void", "iou": None}]
    recipe = {"epochs_done": 33, "train_seconds": 1590.0, "val_native": {"mean_iou": 0.658, "pixel_accuracy": 0.9,
              "per_class": per_class}, "val_native_flip_tta": {"mean_iou": 0.663}}
    report = {"recipes": {"native-lovasz": recipe}}
    path = tmp_path / "camvid-x.json"
    camvid.write_json(path, report)
    assert json.loads(path.read_text()) == report and not list(tmp_path.glob("*.tmp"))
    recipe["curve"] = [{"epoch": 1.0, "val_miou": 0.4}, {"epoch": 2.0, "val_miou": 0.5}]
    camvid.plot(report["recipes"], tmp_path / "camvid-x.png")
    assert (tmp_path / "camvid-x.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["camvid-x.json", "camvid-x.png"]
    table = camvid.markdown_table(report).splitlines()
    assert table[0] == "| recipe | epochs (train min) | val mIoU | flip TTA | pixel acc | sky | column/pole |"
    assert table[2] == "| native-lovasz | 33 (26.5) | 0.658 | 0.663 | 0.900 | 0.900 | 0.070 |"


@pytest.mark.parametrize("content", [None, "{not json", '{"recipes": {}}'])
def test_table_of_a_bad_report_is_one_line_naming_it(content, tmp_path):
    path = tmp_path / "camvid-bad.json"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "camvid.py"), "--table", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(str(path)) and len(proc.stderr.strip().splitlines()) == 1
