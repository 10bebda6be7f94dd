"""Precision: the probe's verdict, its fallback order and cache, and training that learns on every CPU.

The AMX fault itself shows only on AMX machines; everything else here runs anywhere by injecting
faults (FCN_PRECISION_FAULT scrambles a trial's weights, so the probe's real criteria must catch it)
or by faking trial outcomes.
"""

import json
import os
import subprocess
import sys

import pytest
from helpers import documented_keys

from fcn_cli import precision
from fcn_cli.precision import BF16, BF16_AMX, BF16_NO_AMX, FLOAT32


# The suite's own cache (conftest.py): tests of the real probe share it, so the probe runs once per session.
SESSION_CACHE = os.environ["FCN_CACHE_DIR"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Every test gets an empty verdict cache (the real-probe tests take SESSION_CACHE back) and forgets
    the process's earlier choices."""
    monkeypatch.setenv("FCN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(precision.FAULT_ENV, raising=False)
    precision.forget_choices()
    yield
    precision.forget_choices()


def fake_trials(monkeypatch, outcomes: dict) -> list:
    """run_trial answers from ``outcomes`` (path name -> ok); returns the list of paths it was asked for."""
    asked = []

    def run_trial(path, reference=None, timeout=300, work=None):
        asked.append(path.name)
        ok = outcomes[path.name]
        return {"path": path.name, "ok": ok, "gradient_cosine": 0.99 if ok else -0.4, "gradient_worst": "x",
                "accuracy": 0.98 if ok else 0.5, "agreement": 0.99 if ok else 0.5, "first_loss": 2.4,
                "final_loss": 0.05 if ok else 4e5, "reference": "ref.npz", "seconds": 1.0}

    monkeypatch.setattr(precision, "run_trial", run_trial)
    return asked


def test_candidates_follow_the_cpu_flags():
    assert precision.candidates({"amx_bf16", "avx512_bf16", "amx_tile"}) == [BF16_AMX, BF16_NO_AMX, FLOAT32]
    assert precision.candidates({"avx512_bf16", "avx512f"}) == [BF16, FLOAT32]
    assert precision.candidates({"avx2", "fma"}) == [FLOAT32]
    assert BF16_NO_AMX.isa_cap == "AVX512_CORE_BF16" and BF16_AMX.isa_cap is None


@pytest.mark.parametrize("outcomes, chosen, asked", [
    ({"bf16-amx": True}, BF16_AMX, ["bf16-amx"]),
    ({"bf16-amx": False, "bf16-no-amx": True}, BF16_NO_AMX, ["bf16-amx", "bf16-no-amx"]),
    ({"bf16-amx": False, "bf16-no-amx": False}, FLOAT32, ["bf16-amx", "bf16-no-amx"]),
])
def test_fallback_order_on_an_amx_cpu(monkeypatch, outcomes, chosen, asked):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16", "avx512_bf16"})
    tried = fake_trials(monkeypatch, outcomes)
    found = precision.verdict()
    assert found.path is chosen and tried == asked  # float32, the reference, is never "probed"
    assert [t["path"] for t in found.trials] == asked
    for name, ok in outcomes.items():
        assert found.failed(name) is (not ok)
        if not ok:
            assert f"{precision.PATHS[name].label} failed the probe" in found.reason


def test_verdict_is_cached_per_machine_fingerprint(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16", "avx512_bf16"})
    tried = fake_trials(monkeypatch, {"bf16-amx": False, "bf16-no-amx": True})
    first = precision.verdict()
    assert not first.cached and len(tried) == 2
    again = precision.verdict()
    assert again.cached and again.path is BF16_NO_AMX and len(tried) == 2  # read, not probed
    stored = json.loads(precision.cache_path().read_text())
    assert stored["path"] == "bf16-no-amx" and stored["isa_cap"] == "AVX512_CORE_BF16"
    precision.verdict(recheck=True)
    assert len(tried) == 4
    monkeypatch.setattr(precision, "cpu_model", lambda: "another CPU")  # another machine: probe again
    assert not precision.verdict().cached and len(tried) == 6


def test_a_corrupt_cache_is_probed_again(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    tried = fake_trials(monkeypatch, {"bf16": True})
    precision.verdict()
    precision.cache_path().write_text("{not json")
    assert precision.verdict().path is BF16 and len(tried) == 2


def test_explicit_bf16_obeys_but_warns_when_the_probe_failed(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    fake_trials(monkeypatch, {"bf16": False})
    auto = precision.choose("auto")
    assert auto.precision == "float32" and auto.warning is None and "failed the probe" in auto.line
    asked = precision.choose("mixed_bfloat16")
    assert asked.precision == "mixed_bfloat16"
    assert "failed this machine's precision probe" in asked.warning and "fcn doctor" in asked.warning


def test_float32_needs_no_probe(monkeypatch):
    tried = fake_trials(monkeypatch, {})
    assert precision.choose("float32").precision == "float32" and tried == []
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2"})
    assert precision.choose("auto").precision == "float32" and tried == []
    emulated = precision.choose("mixed_bfloat16")  # correct, only slow: no probe, no warning
    assert emulated.precision == "mixed_bfloat16" and emulated.warning is None and tried == []


def test_a_capped_path_is_not_taken_once_tensorflow_runs_without_the_cap(monkeypatch):
    import tensorflow  # noqa: F401  the situation: TF already started in this process

    monkeypatch.delenv(precision.ISA_ENV, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16", "avx512_bf16"})
    monkeypatch.setattr(precision, "_CAP_SET_BEFORE_TF", [])
    fake_trials(monkeypatch, {"bf16-amx": False, "bf16-no-amx": True})
    choice = precision.choose("auto")
    assert choice.precision == "float32" and "before TensorFlow starts" in choice.line
    assert precision.ISA_ENV not in os.environ  # too late to set: it would only mislead
    asked = precision.choose("mixed_bfloat16")
    assert "needs ONEDNN_MAX_CPU_ISA" in asked.warning and "failed" not in asked.warning
    precision.forget_choices()
    monkeypatch.setenv(precision.ISA_ENV, precision.NO_AMX_ISA)  # set after TF started: means nothing
    if precision.cap_in_effect() is None:  # (unless this test process inherited the cap at its start)
        assert precision.choose("auto").precision == "float32"
    precision.forget_choices()
    monkeypatch.setattr(precision, "_CAP_SET_BEFORE_TF", [precision.NO_AMX_ISA])  # as `fcn train` sets it
    assert precision.choose("auto").path is BF16_NO_AMX


def test_injected_fault_makes_the_real_probe_fall_back(monkeypatch):
    """The real probe, in child processes, with the fastest path's weights scrambled mid-trial."""
    paths = precision.candidates()
    if paths == [FLOAT32]:
        pytest.skip("this CPU has no native bf16: there is nothing to fall back from")
    monkeypatch.setenv(precision.FAULT_ENV, paths[0].name)
    found = precision.verdict()
    first = found.trials[0]
    assert first["path"] == paths[0].name and not first["ok"] and first["injected_fault"]
    assert first["gradient_cosine"] < precision.PASS_GRADIENT_COSINE
    assert found.path is paths[1]  # the next path in order (float32 on a CPU without AMX)
    if paths[1] is not FLOAT32:
        assert found.trials[1]["ok"] and found.trials[1]["amx_kernels"] is False
    assert precision.verdict().cached


def test_auto_precision_learns_what_float32_learns(monkeypatch):
    """On every CPU kind: whatever auto picks trains the easy set (the AMX fault did not), here in this
    process, and its probe trial (in a child, under its own ISA cap) passed every stage against float32."""
    from fcn_cli import fit

    monkeypatch.setenv("FCN_CACHE_DIR", SESSION_CACHE)
    policy = fit.choose_precision("auto")
    pred, losses, labels = precision.train_probe_model(policy)
    assert (pred == labels).mean() > 0.95, (policy, losses)
    choice = precision.current("auto")
    trials = choice.verdict.trials if choice.verdict is not None else []  # none: no native bf16, nothing probed
    for trial in (t for t in trials if t["path"] == choice.path.name):
        assert trial["ok"] and trial["accuracy"] >= precision.PASS_ACCURACY
        assert trial["agreement"] >= precision.PASS_AGREEMENT
        assert trial["gradient_cosine"] >= precision.PASS_GRADIENT_COSINE


def test_class_layers_compute_in_float32_under_bf16():
    import keras

    from fcn_cli.model import build_fcn

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build_fcn("fcn8", 12, None, width=1 / 16, head_width=16)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    dtypes = {layer.name: layer.dtype_policy.name for layer in model.layers}
    for name in ("score_fr", "upscore2", "score_pool4", "fuse_pool4", "upscore_pool4", "score_pool3", "fuse_pool3",
                 "upscore8", "logits"):
        assert dtypes[name] == "float32", name  # the layers whose channels are the classes
    assert dtypes["block1_conv1"] == dtypes["conv6"] == "mixed_bfloat16"


def test_choose_precision_rejects_unknown_names():
    from fcn_cli import fit
    from fcn_cli.errors import FcnError

    with pytest.raises(FcnError):
        fit.choose_precision("fp8")
    assert fit.choose_precision("float32") == "float32"


def test_doctor_prints_the_verdict_and_writes_json(tmp_path):
    env = {**os.environ, "COLUMNS": "200", precision.FAULT_ENV: "", "FCN_CACHE_DIR": SESSION_CACHE}
    out = tmp_path / "doctor.json"
    proc = subprocess.run([sys.executable, "-m", "fcn_cli", "doctor", "--json", str(out)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    chosen = data["precision"]
    assert chosen["path"] in precision.PATHS and "tensorflow" in json.dumps(data["versions"])
    assert chosen["label"] in proc.stdout
    again = subprocess.run([sys.executable, "-m", "fcn_cli", "doctor", "--json", "-"], capture_output=True,
                           text=True, env=env, timeout=60)
    assert json.loads(again.stdout)["precision"]["cached"] is True
    assert set(data) == documented_keys("fcn.doctor/1") and data["schema"] == "fcn.doctor/1"


def test_runaway_rule():
    from fcn_cli.callbacks import RUNAWAY_FACTOR, runaway_loss

    assert runaway_loss(2.0, []) is None  # the first epoch has nothing to compare with
    assert runaway_loss(1.0, [2.0, 1.5]) is None
    assert runaway_loss(RUNAWAY_FACTOR * 1.5 * 0.99, [2.0, 1.5]) is None
    assert "x the lowest epoch loss 1.5" in runaway_loss(RUNAWAY_FACTOR * 1.5 * 1.01, [2.0, 1.5])
    assert runaway_loss(float("nan"), [1.0]) is None  # NaN has its own, earlier check
    assert runaway_loss(0.05, [2.0, 0.01]) is None  # tiny losses going up 5x but still below the start
    assert runaway_loss(9.0, [2.0, 1.0, None]) is not None  # an empty log cell is skipped


def test_inference_serves_bf16_checkpoints_in_float32_where_bf16_failed(monkeypatch):
    import keras

    from fcn_cli.accel.serving import serving_config
    from fcn_cli.model import build_fcn

    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    assert precision.bf16_verified()  # no verdict yet: inference never probes, keeps the trained precision
    fake_trials(monkeypatch, {"bf16": False})
    precision.verdict()
    assert not precision.bf16_verified()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        config = build_fcn("fcn8", 12, None, width=1 / 16, head_width=16).get_config()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    served = keras.Model.from_config(serving_config(config, bf16=False))
    assert {layer.dtype_policy.name for layer in served.layers} == {"float32"}
    served = keras.Model.from_config(serving_config(config))
    assert any("bfloat16" in layer.dtype_policy.name for layer in served.layers)


def test_a_trial_killed_from_outside_is_not_cached(monkeypatch):
    """Out of memory (SIGKILL) or a timeout says nothing lasting about the path: probe again next time."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "trial_command", lambda path, out_dir, reference: [
        sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    found = precision.verdict()
    assert found.path is FLOAT32 and "died" in found.reason
    assert not precision.cache_path().exists()  # the next run probes again


def test_demo_judges_its_score_only_for_the_recipe_as_measured():
    from fcn_cli.demo import DEMO_EPOCHS, DEMO_PASS_MIOU, demo_verdict

    assert demo_verdict(0.583, DEMO_EPOCHS) == (True, "as expected")
    passed, text = demo_verdict(0.196, DEMO_EPOCHS)  # issue 15's AMX run
    assert not passed and f"BELOW the {DEMO_PASS_MIOU:.2f}" in text
    assert demo_verdict(0.196, 2) == (True, "2 epochs: not judged")


def test_a_trial_that_crashes_the_process_is_a_cached_failure(monkeypatch):
    """The AMX fault on the full model aborted the process (heap corruption): that is the path failing."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(precision, "trial_command", lambda path, out_dir, reference: [
        sys.executable, "-c", "import os, sys; print('malloc(): unaligned tcache chunk detected', file=sys.stderr); os.abort()"])
    found = precision.verdict()
    (trial,) = found.trials
    assert trial["crashed"] and not trial["ok"] and "tcache" in trial["error"] and "signal 6" in trial["error"]
    assert found.path is FLOAT32 and precision.cached_verdict() is not None
