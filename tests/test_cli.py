"""The tool end to end, as a user runs it: real `fcn` processes on a generated data set, tiny models."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, fcn, one_line_error
from PIL import Image

from fcn_cli.classes import CAMVID

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from fcn_cli.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("cli") / "synth"
    generate_synthetic(root, count=16, size=(64, 64), seed=3)
    return root


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    proc = fcn("train", "--data", data_dir, "--variant", "fcn8", "--epochs", "2", "--out", out, *TINY, check=0)
    runs = [p for p in out.iterdir() if p.is_dir()]
    assert len(runs) == 1
    return out, runs[0], proc


def test_train_writes_a_complete_run_folder(trained):
    out, run, proc = trained
    for name in ("config.json", "log.csv", "state.json", "last.keras", "best.keras", "curves.png"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in ("loss", "val_loss", "val_pixel_accuracy", "val_miou"):
        assert 0 <= float(rows[-1][key]) < 100, key
    config = json.loads((run / "config.json").read_text())
    assert config["variant"] == "fcn8" and config["image_size"] == [64, 64]
    stable = out / "fcn8.keras"
    assert stable.is_symlink() and stable.resolve() == (run / "best.keras").resolve()
    assert "best val mIoU" in proc.stdout
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_checkpoints_reload_with_metadata(trained):
    from fcn_cli.runs import load_checkpoint

    _, run, _ = trained
    model, meta = load_checkpoint(run / "best.keras", num_classes=12)
    assert model.output_shape[-1] == 12
    assert meta["variant"] == "fcn8" and meta["image_size"] == [64, 64]
    assert meta["inference_size"] == [64, 64]  # no --scale: inference at the training size
    assert meta["classes"]["classes"][3]["name"] == "road"


def test_evaluate_json_has_every_metric_in_unit_range(trained, data_dir, tmp_path):
    out, _, _ = trained
    report = tmp_path / "val.json"
    proc = fcn("evaluate", "--split", "val", "--data", data_dir, "--models-dir", out, "--out", report, check=0)
    result = json.loads(report.read_text())
    for key in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"):
        assert 0.0 <= result[key] <= 1.0, key
    for entry in result["per_class"]:
        for key in ("iou", "accuracy", "dice"):
            assert entry[key] is None or 0.0 <= entry[key] <= 1.0
    assert (tmp_path / "val_confusion.csv").is_file() and (tmp_path / "val_confusion.png").is_file()
    assert "mean" in proc.stdout.lower()
    assert result["image_size"] == [64, 64]
    fcn("evaluate", "--data", data_dir, "--models-dir", out, "--out", report, "--image-size", "96x128", check=0)
    assert json.loads(report.read_text())["image_size"] == [96, 128]
    bad = fcn("evaluate", "--data", data_dir, "--models-dir", out, "--image-size", "96by128", check=2)
    assert "--image-size" in bad.stderr and "Traceback" not in bad.stderr
    native = fcn("evaluate", "--data", data_dir, "--models-dir", out, "--image-size", "96x128", "--mode", "native", check=2)
    assert "resize mode" in native.stderr and "Traceback" not in native.stderr


def test_predict_any_size_gives_palette_mask_of_input_size(trained, tmp_path):
    out, _, _ = trained
    photo = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(photo)
    mask_path = tmp_path / "mask.png"
    fcn("predict", photo, "-o", mask_path, "--models-dir", out, check=0)
    mask = np.asarray(Image.open(mask_path).convert("RGB"))
    assert mask.shape == (70, 90, 3)
    colours = {tuple(c) for c in mask.reshape(-1, 3)}
    assert colours <= set(CAMVID.colors)


def test_fcn4_trains_from_an_fcn8_checkpoint_and_predict_finds_it(trained, data_dir, tmp_path):
    """The documented recipe's variant end to end: --init-from an FCN-8s, then predict with no --model."""
    _, run, _ = trained
    out = tmp_path / "models"
    proc = fcn("train", "--data", data_dir, "--variant", "fcn4", "--epochs", "1", "--init-from", run / "best.keras",
               "--out", out, *TINY, check=0)
    assert "initialized" in proc.stdout
    assert (out / "fcn4.keras").is_symlink()
    photo = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(photo)
    mask_path = tmp_path / "mask.png"
    fcn("predict", photo, "-o", mask_path, "--models-dir", out, check=0)  # only fcn4.keras there
    assert np.asarray(Image.open(mask_path).convert("RGB")).shape == (70, 90, 3)


def test_sigkill_mid_epoch_leaves_a_loadable_checkpoint_and_a_resumable_run(data_dir, tmp_path):
    from fcn_cli.runs import RunFolder, load_checkpoint
    from fcn_cli.train import resumed_run

    out = tmp_path / "models"
    # Slow enough per epoch (bigger images) that the kill lands inside an epoch.
    args = [sys.executable, "-m", "fcn_cli", "train", "--data", str(data_dir), "--epochs", "4", "--out", str(out),
            *TINY[:-6], "--image-size", "128x128", "--batch-size", "2", "--precision", "float32"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    log = None
    while time.time() < deadline:
        runs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
        if runs and (runs[0] / "log.csv").exists():
            log = runs[0] / "log.csv"
            break
        time.sleep(0.2)
    assert log is not None, "first epoch never finished"
    time.sleep(0.5)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run = log.parent
    # Whatever instant the kill hit: a complete, loadable last.keras, and a complete log that
    # reaches at least its epoch (the log is written just before the checkpoint).
    model, meta = load_checkpoint(run / "last.keras", num_classes=12)
    done = meta["epoch"]
    rows = list(csv.DictReader(open(log)))
    assert done >= 1 and [int(r["epoch"]) for r in rows][:done] == list(range(1, done + 1))
    assert len(rows) in (done, done + 1)
    # What --resume reads (the whole resumed run is test_ctrl_c_saves_a_consistent_run_and_resume_...):
    # the epoch of last.keras, the log cut to it, and no temporary file the kill left mid-write.
    resumed = resumed_run(run)
    assert resumed.state["epochs_done"] == done and [r["epoch"] for r in resumed.rows] == list(range(1, done + 1))
    RunFolder.open(run)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def _signalled_run(data_dir, out: Path, signum) -> tuple[subprocess.CompletedProcess, Path, dict]:
    """`fcn train` for 3 epochs of 128x128 (each committed), sent ``signum`` once its first epoch is in the log:
    (the finished process, its run folder, the metadata of its last.keras). The commit must be consistent:
    mid-epoch weights labelled with the last finished epoch, which the log and the state agree on."""
    from fcn_cli.runs import load_checkpoint

    args = [sys.executable, "-m", "fcn_cli", "train", "--data", str(data_dir), "--epochs", "3", "--out", str(out),
            *TINY[:-6], "--image-size", "128x128", "--batch-size", "2", "--precision", "float32", "--checkpoint-overhead", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and list(out.glob("*/log.csv"))):
        time.sleep(0.2)
    time.sleep(0.2)  # into the second epoch
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert "--resume" in stdout and "Traceback" not in stderr, stderr[-2000:]
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    _, meta = load_checkpoint(run / "last.keras", num_classes=12)
    rows = list(csv.DictReader(open(run / "log.csv")))
    state = json.loads((run / "state.json").read_text())
    assert meta["epoch"] == state["epochs_done"] == len(rows) >= 1
    assert meta["epoch"] < 3, "the run ended before the signal: make it longer"
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr), run, meta


def test_ctrl_c_saves_a_consistent_run_and_resume_continues_and_extends(data_dir, tmp_path):
    proc, run, meta = _signalled_run(data_dir, tmp_path / "models", signal.SIGINT)
    assert proc.returncode == 130 and "interrupted (SIGINT)" in proc.stdout, proc.stderr[-2000:]
    # A setting the run already trains with is refused on resume, naming the flag and the stored value.
    one_line_error(fcn("train", "--resume", run, "--lr=0.5"), "--lr", "lr = 0.001", "--init-from")
    from fcn_cli.runs import load_checkpoint

    interrupted, _ = load_checkpoint(run / "last.keras", num_classes=12, compile=True)
    steps_done = int(interrupted.optimizer.iterations.numpy())  # mid-epoch: the last epoch's steps and some
    # Resuming continues after the last finished epoch; --epochs (in its --flag=value form too) extends the
    # run, --tensorboard may be switched on, and config.json records both for the next --resume.
    resumed = fcn("train", "--resume", run, "--epochs=4", "--tensorboard", check=0)
    assert f"epoch {meta['epoch'] + 1}/4" in resumed.stdout and "epoch 1/4" not in resumed.stdout
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 5))
    # The poly schedule now ends at epoch 4, not at the 3 that last.keras was planned over: each resumed
    # epoch's logged rate is the 4-epoch schedule's at the step count it ended with.
    import keras

    per_epoch = json.loads((run / "config.json").read_text())["steps_per_epoch"]
    poly = keras.optimizers.schedules.PolynomialDecay(1e-3, 4 * per_epoch, end_learning_rate=1e-5, power=0.9)
    for epoch in range(meta["epoch"] + 1, 5):
        step = steps_done + (epoch - meta["epoch"]) * per_epoch
        assert float(rows[epoch - 1]["lr"]) == pytest.approx(float(poly(step)), rel=1e-4), (epoch, step)
    assert json.loads((run / "state.json").read_text())["epochs_done"] == 4
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 4 and config["tensorboard"] is True
    tags = _tensorboard_tags(run / "tensorboard")
    assert {"epoch_loss", "epoch_learning_rate"} <= tags["train"], tags
    assert {"epoch_loss", "epoch_miou", "iou/road", "iou/sky"} <= tags["validation"], tags
    assert any(tag.startswith("validation: photo") for tag in tags["validation"]), tags
    # stdout is a pipe here: one line per epoch with its training and validation figures, no bar
    epochs = [line for line in resumed.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 4 - meta["epoch"] and all("img/s" in e and "val mIoU" in e and "━" not in e for e in epochs)


def _tensorboard_tags(log_dir: Path) -> dict[str, set[str]]:
    """{"train": tags, "validation": tags} of the event files TensorBoard would read."""
    import tensorflow as tf

    tags = {}
    for sub in ("train", "validation"):
        tags[sub] = set()
        for path in (log_dir / sub).glob("events.out.tfevents.*"):
            for record in tf.data.TFRecordDataset(str(path)):
                event = tf.compat.v1.Event.FromString(record.numpy())
                tags[sub].update(value.tag for value in event.summary.value)
    return tags


def test_resume_refuses_moved_data_that_is_not_the_same_data(trained, tmp_path):
    from fcn_cli.synthetic import generate_synthetic

    _, run, _ = trained
    other = tmp_path / "other"
    generate_synthetic(other, count=4, size=(64, 64), seed=9)
    before = (run / "config.json").read_text()
    one_line_error(fcn("train", "--resume", run, "--data", other, "--epochs", "3"), f"--data {other}",
                   "the run trained on 16")
    assert (run / "config.json").read_text() == before


def test_sigterm_commits_a_consistent_run_and_exits_143(data_dir, tmp_path):
    """What Kubernetes, Slurm and preemptible VMs send before they kill: the run commits, as after Ctrl-C."""
    proc, _, _ = _signalled_run(data_dir, tmp_path / "models", signal.SIGTERM)
    assert proc.returncode == 143 and "interrupted (SIGTERM)" in proc.stdout, proc.stderr[-2000:]


def test_wrong_checkpoint_path_is_one_clear_line(data_dir, tmp_path):
    proc = fcn("evaluate", "--data", data_dir, "--model", tmp_path / "nope.keras")
    one_line_error(proc, "nope.keras", "not found")


def test_non_keras_file_is_one_clear_line(data_dir, tmp_path):
    bogus = tmp_path / "bogus.keras"
    bogus.write_text("hello, I am not a model")
    one_line_error(fcn("evaluate", "--data", data_dir, "--model", bogus), "bogus.keras")
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 40)).save(photo)
    one_line_error(fcn("predict", photo, "--model", bogus), "bogus.keras")


def test_missing_data_folder_says_how_to_get_data(tmp_path):
    proc = fcn("train", "--data", tmp_path / "camvid", "--backbone-weights", "none")
    one_line_error(proc, "fcn data download camvid", "fcn data synthetic")


def test_bad_data_stops_training_in_one_line_before_any_run_folder(data_dir, tmp_path):
    """The CLI face of training's data check (every kind of bad file: tests/test_train_data.py)."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    victim = sorted((bad / "trainannot").iterdir())[0]
    arr = np.asarray(Image.open(victim)).copy()
    arr[0, 0] = 200
    Image.fromarray(arr).save(victim)
    proc = fcn("train", "--data", bad, "--epochs", "1", "--out", tmp_path / "m", *TINY)
    one_line_error(proc, victim.name)
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())
    check = fcn("data", "check", bad)
    assert check.returncode != 0 and victim.name in check.stdout + check.stderr


def test_help_does_not_import_tensorflow():
    code = "import sys; from fcn_cli import cli; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    proc = fcn("--help", check=0)
    assert "train" in proc.stdout and "predict" in proc.stdout


def test_precision_is_settled_before_tensorflow_starts(tmp_path):
    """oneDNN reads its ISA cap once, when TensorFlow starts: every step before the cap is set must stay TF-free."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"epochs": 2, "precision": "auto"}')
    code = ("import sys, pathlib; from fcn_cli import cli, datasets, doctor, precision, train\n"
            "datasets.require_data_folder(pathlib.Path('.'))\n"
            "train.resume_config(pathlib.Path('run'), {'epochs': 3}); precision.candidates(); precision.fingerprint()\n"
            "cli._settle_precision('inference')\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported too early'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
