"""Scale-out: tf.distribute strategies and TFRecord shards. CPU only, loopback only."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fcn_cli.classes import CAMVID

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "0.0625", "--head-width", "16", "--backbone-weights", "none", "--image-size", "64x64",
        "--batch-size", "4", "--precision", "float32"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from fcn_cli.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("dist") / "synth"
    generate_synthetic(root, count=16, size=(64, 64), seed=5)
    return root


def _run(args, timeout=300, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "fcn_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


MIRRORED_CHECK = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from fcn_cli.model import build_fcn
    from fcn_cli.fit import compile_model

    loss = sys.argv[1]
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (4, 64, 64, 3)).astype("float32")
    y = rng.integers(0, 12, (4, 64, 64)).astype("int32")
    if loss == "ce+lovasz":
        # Each replica gets the same two images. The Lovász term of a batch is that of the batch doubled
        # (equal errors sort together), so each replica's term equals the one device's.
        x, y = np.concatenate([x[:2], x[:2]]), np.concatenate([y[:2], y[:2]])
    w = (y != 11).astype("float32")

    def one_step(strategy):
        keras.utils.set_random_seed(7)
        with strategy.scope():
            model = build_fcn("fcn8", 12, None, width=1 / 16, head_width=16, dropout=0.0)
            # Non-zero score layers so every layer gets a gradient on the first step.
            for name in ("score_fr", "score_pool4", "score_pool3"):
                layer = model.get_layer(name)
                layer.set_weights([np.full(v.shape, 0.01, "float32") for v in layer.get_weights()])
            compile_model(model, keras.optimizers.SGD(0.01), 12, 11, loss)
        data = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(4)
        with strategy.scope():
            model.fit(data, epochs=1, verbose=0, shuffle=False)
        return [v.numpy() for v in model.trainable_weights], strategy.num_replicas_in_sync

    one, n1 = one_step(tf.distribute.get_strategy())
    two, n2 = one_step(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(one, two))
    moved = max(float(np.max(np.abs(a))) for a in one)
    print(json.dumps({"replicas": [n1, n2], "max_abs_diff": diff, "tensors": len(one)}))
""")


@pytest.mark.parametrize("loss", ["ce", "ce+lovasz"])
def test_mirrored_over_two_cpu_devices_matches_one_device(loss):
    """Same global batch and seed: after one step the weights equal a one-device run (atol 1e-5), with each
    term of the loss scaled per replica."""
    proc = subprocess.run([sys.executable, "-c", MIRRORED_CHECK, loss], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == [1, 2]
    # float32 sums in another order across replicas: equal up to rounding.
    assert result["max_abs_diff"] < 1e-5, result


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_two_process_multi_worker_training(synth, tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, outs = [], []
    for index in range(2):
        out = tmp_path / f"host{index}" / "models"
        tmp = tmp_path / f"host{index}" / "tmp"
        tmp.mkdir(parents=True)
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "TMPDIR": str(tmp), "TF_CPP_MIN_LOG_LEVEL": "2"}
        log = open(tmp_path / f"worker{index}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "fcn_cli", "train", "--data", str(synth), "--epochs", "2",
                                       "--out", str(out), *TINY], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        outs.append(out)
    started = time.time()
    try:
        for p in procs:
            p.wait(timeout=420)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    wall = time.time() - started
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "multi-worker (2 workers" in logs[0]
    chief_runs = [p for p in outs[0].iterdir() if p.is_dir()]
    assert len(chief_runs) == 1
    rows = list(csv.DictReader(open(chief_runs[0] / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    config = json.loads((chief_runs[0] / "config.json").read_text())
    assert config["strategy_used"].startswith("multi-worker")
    # The other worker wrote nothing a user sees, and removed its private folder.
    assert not outs[1].exists() or not any(outs[1].iterdir())
    assert not list((tmp_path / "host1" / "tmp").iterdir())
    # The chief's checkpoint loads on one machine.
    proc = _run(["evaluate", "--data", synth, "--model", chief_runs[0] / "best.keras", "--json", tmp_path / "e.json"])
    assert proc.returncode == 0, proc.stderr
    assert 0 <= json.loads((tmp_path / "e.json").read_text())["mean_iou"] <= 1
    print(f"two-process multi-worker run: {wall:.1f} s wall")


def test_pack_then_read_gives_the_same_pairs(synth, tmp_path):
    from fcn_cli import shards
    from fcn_cli.datasets import find_dataset
    from fcn_cli.images import read_image, read_mask

    out = tmp_path / "shards"
    counts = shards.pack(synth, out, CAMVID, shards=3)
    assert counts == {"train": 16, "val": 4, "test": 4}
    shard_set = shards.ShardSet.open(out)
    assert len(shard_set.files("train")) == 3
    originals = {p.name: p for p in find_dataset(synth).pairs("train")}
    seen = set()
    for image, label, name, _, _ in shards.records(shard_set.files("train")).as_numpy_iterator():
        pair = originals[name.decode()]
        np.testing.assert_array_equal(image, read_image(pair.image))
        np.testing.assert_array_equal(label, read_mask(pair.mask, CAMVID))
        seen.add(name.decode())
    assert seen == set(originals)
    # Plain 8-bit RGB PNG photos travel as their own bytes.
    import tensorflow as tf

    raw = next(iter(tf.data.TFRecordDataset(shard_set.files("train")[0])))
    example = tf.train.Example.FromString(raw.numpy())
    stored = example.features.feature["image"].bytes_list.value[0]
    name = example.features.feature["name"].bytes_list.value[0].decode()
    assert stored == originals[name].image.read_bytes()


def test_truncated_shard_is_one_clear_line(synth, tmp_path):
    from fcn_cli import shards

    out = tmp_path / "shards"
    shards.pack(synth, out, CAMVID, shards=2)
    victim = sorted(out.glob("train-*.tfrecord"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    proc = _run(["train", "--data", out, "--epochs", "1", "--out", tmp_path / "m", *TINY])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and victim.name in lines[0] and "truncated" in lines[0], proc.stderr


def test_corrupt_record_names_its_shard_and_number(synth, tmp_path):
    from fcn_cli import shards

    out = tmp_path / "shards"
    shards.pack(synth, out, CAMVID, shards=1)
    victim = out / "val-00000-of-00001.tfrecord"
    data = bytearray(victim.read_bytes())
    # Flip bytes well inside the file (same size): a CRC error in some record after the first.
    middle = len(data) * 3 // 4
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    victim.write_bytes(bytes(data))
    proc = _run(["data", "check", out])
    assert proc.returncode == 1
    # A problem is an error: on stderr, where --quiet does not silence it.
    assert victim.name in proc.stderr and "record" in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.slow
def test_training_from_shards_matches_the_folder_reader_counts(synth, tmp_path):
    from fcn_cli import shards

    out = tmp_path / "shards"
    shards.pack(synth, out, CAMVID, shards=4)
    proc = _run(["train", "--data", out, "--epochs", "1", "--out", tmp_path / "m", *TINY])
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = next(p for p in (tmp_path / "m").iterdir() if p.is_dir())
    config = json.loads((run / "config.json").read_text())
    assert config["train_pairs"] == 16 and config["val_pairs"] == 4
