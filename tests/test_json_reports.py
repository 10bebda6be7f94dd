"""`--json -` as scripts use it: stdout is exactly one JSON document with the keys docs/json.md lists, the
human output goes to stderr (or nowhere with --quiet); evaluate's report lands beside the checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import documented_keys, fcn
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture
def own_checkpoint(checkpoint, tmp_path):
    """The session checkpoint copied into a folder of this test's own (evaluate writes beside it)."""
    folder = tmp_path / "run"
    folder.mkdir()
    return shutil.copy(checkpoint, folder / "best.keras")


def test_evaluate_json_to_stdout_with_the_report_beside_the_checkpoint(own_checkpoint, small_set):
    proc = fcn("evaluate", "--model", own_checkpoint, "--data", small_set, "--json", "-", check=0)
    report = json.loads(proc.stdout)
    assert set(report) == documented_keys("fcn.evaluate/1") and report["schema"] == "fcn.evaluate/1"
    assert report["tta"] == {"scales": [1.0], "flip": False}
    beside = own_checkpoint.parent / "eval-val.json"
    assert json.loads(beside.read_text())["mean_iou"] == report["mean_iou"]
    assert (own_checkpoint.parent / "eval-val_confusion.csv").is_file()
    # The human table and the line naming the report went to stderr.
    assert "mean IoU" in proc.stderr and f"report {beside}" in proc.stderr


def test_evaluate_out_and_quiet(own_checkpoint, small_set, tmp_path):
    out = tmp_path / "elsewhere" / "scores.json"
    proc = fcn("evaluate", "--model", own_checkpoint, "--data", small_set, "--out", out, "--json", "-", "--quiet",
               "--tta", "flip", check=0)
    assert json.loads(proc.stdout)["tta"]["flip"] is True and proc.stderr == ""
    assert out.is_file() and (out.parent / "scores_confusion.png").is_file()
    assert not (own_checkpoint.parent / "eval-val.json").exists()


def test_data_check_json(small_set, tmp_path):
    proc = fcn("data", "check", small_set, "--json", "-", check=0)
    report = json.loads(proc.stdout)
    assert set(report) == documented_keys("fcn.data-check/1") and report["ok"] is True
    assert report["splits"]["train"]["pairs"] == 4 and len(report["classes"]) == 12
    assert "no problems found" in proc.stderr
    # A broken pair: exit 1, the problem in the JSON too.
    broken = tmp_path / "broken"
    shutil.copytree(small_set, broken)
    victim = sorted((broken / "train").iterdir())[0]
    victim.write_bytes(b"not an image")
    proc = fcn("data", "check", broken, "--json", "-", "--quiet", check=1)
    report = json.loads(proc.stdout)
    assert report["ok"] is False and any(p["path"].endswith(victim.name) for p in report["problems"])


def test_predict_summary_json(checkpoint, tmp_path):
    photo = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(photo)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    proc = fcn("predict", photo, bad, "-o", tmp_path / "masks", "--model", checkpoint, "--json", "-", check=1)
    report = json.loads(proc.stdout)
    assert set(report) == documented_keys("fcn.predict/1") and report["schema"] == "fcn.predict/1"
    assert [p.endswith("street.png") for p in report["written"]] == [True]
    assert [f["input"].endswith("bad.png") for f in report["failed"]] == [True]
    assert report["frames"] is None and "wrote 1" in proc.stderr
    # --quiet: the JSON, and on stderr the one failure (an error is never silenced), nothing else.
    quiet = fcn("predict", photo, bad, "-o", tmp_path / "masks", "--model", checkpoint, "--json", "-", "-q", check=1)
    assert json.loads(quiet.stdout)["failed"] and [line for line in quiet.stderr.splitlines() if line.strip()] == [
        next(line for line in proc.stderr.splitlines() if "skipped" in line)]
