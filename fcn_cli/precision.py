"""Which numeric path trains correctly on this machine: a probe that proves it, cached per machine.

bf16 halves the cost of every convolution on CPUs that compute it natively, but "natively" is not
"correctly": on an Intel Xeon with AMX inside a KVM/Firecracker guest, oneDNN's AMX bf16 kernels
made whole training runs silently diverge (and sometimes corrupt the heap), while every single op
agreed with float32 in isolation (bench/NOTES.md, bench/amx_repro.py). So ``--precision auto`` no
longer trusts CPU flags: in each candidate path, in order, it compares a tiny FCN-8s's gradients with
float32's layer by layer, takes two training steps of the full-width FCN-8s (some faults corrupt the
heap only there), and trains the tiny one on an easy generated set for a few seconds; the first path
that learns what float32 learns is taken:

    bf16 with AMX  ->  bf16 without AMX (oneDNN capped at AVX512_CORE_BF16)  ->  float32

oneDNN reads its ISA cap once, when TensorFlow starts, so every trial runs in a child process with
its own environment, and the chosen cap must be in the environment before this process imports
TensorFlow (``choose`` sets it). The verdict is cached per machine fingerprint (CPU model and flags, kernel,
TensorFlow and Keras versions) in the user's cache folder; `fcn doctor` shows it and re-runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ISA_ENV = "ONEDNN_MAX_CPU_ISA"
NO_AMX_ISA = "AVX512_CORE_BF16"  # the best oneDNN ISA below AMX that still has native bf16
SCHEMA = "fcn-precision-verdict/1"
# Fault injection for tests and for machines without AMX: "PATH[,PATH]" names trials that must fail
# (their weights are scrambled mid-run, so the probe's own criteria have to catch it).
FAULT_ENV = "FCN_PRECISION_FAULT"


@dataclasses.dataclass(frozen=True)
class NumericPath:
    name: str  # short id, used in caches, bench JSON and FCN_PRECISION_FAULT
    precision: str  # the Keras dtype policy
    isa_cap: str | None  # ONEDNN_MAX_CPU_ISA to set before TensorFlow starts, or None
    label: str  # what a user reads


BF16_AMX = NumericPath("bf16-amx", "mixed_bfloat16", None, "bf16 with AMX")
BF16_NO_AMX = NumericPath("bf16-no-amx", "mixed_bfloat16", NO_AMX_ISA, "bf16 without AMX (oneDNN capped at AVX512_CORE_BF16)")
BF16 = NumericPath("bf16", "mixed_bfloat16", None, "bf16 (AVX-512)")
FLOAT32 = NumericPath("float32", "float32", None, "float32")
PATHS = {p.name: p for p in (BF16_AMX, BF16_NO_AMX, BF16, FLOAT32)}

# The probe's task and pass marks (sized and justified in bench/NOTES.md, "precision probe").
PROBE_IMAGES, PROBE_SIZE, PROBE_BATCH, PROBE_EPOCHS = 16, 64, 8, 20
PASS_ACCURACY = 0.95  # float32 reaches >= 0.99 on this set; the broken AMX path 0.5-0.8
PASS_AGREEMENT = 0.95  # share of pixels whose class matches the float32 run's
# Every variable's first gradient, candidate vs float32 at the same weights: correct bf16 paths give
# cosines >= 0.945 (the worst, block1_conv1's bias, sums 32k bf16 terms); the AMX fault gave -0.43.
PASS_GRADIENT_COSINE = 0.9


# --- the machine ------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def candidates(flags: set[str] | None = None) -> list[NumericPath]:
    """The CPU paths worth trying, fastest first; float32 (the reference) always last."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags and "avx512_bf16" in flags:
        return [BF16_AMX, BF16_NO_AMX, FLOAT32]
    if "amx_bf16" in flags:
        return [BF16_AMX, FLOAT32]
    if "avx512_bf16" in flags:
        return [BF16, FLOAT32]
    return [FLOAT32]  # emulated bf16 is slower than float32: nothing to probe


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def fingerprint() -> dict:
    """What the verdict depends on, read without importing TensorFlow."""
    flags = cpu_flags()
    tf_dist = next((d for d in ("tensorflow", "tensorflow-cpu", "tf-nightly") if _version(d)), None)
    return {
        "cpu": cpu_model(),
        "flags": sorted(f for f in flags if f.startswith(("amx", "avx512")) or f in ("avx2", "fma")),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "tensorflow": f"{tf_dist} {_version(tf_dist)}" if tf_dist else None,
        "keras": _version("keras"),
        "fcn_code": _code_hash(),
        **({"injected_fault": os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}),
        "probe": [PROBE_IMAGES, PROBE_SIZE, PROBE_BATCH, PROBE_EPOCHS, PASS_ACCURACY, PASS_AGREEMENT,
                  PASS_GRADIENT_COSINE],
    }


def _code_hash() -> str:
    """The model, its speed levers and the probe as this fcn has them: a change to any makes old verdicts
    stale, and so does switching the levers (``FCN_ACCEL``): the probe trains what training will run."""
    from fcn_cli import accel

    digest = hashlib.sha256(b"levers on" if accel.allowed() else b"levers off")
    for name in ("model.py", "precision.py", "accel/small_map_conv.py", "accel/matmul_conv.py", "accel/fused_adam.py"):
        try:
            digest.update((Path(__file__).parent / name).read_bytes())
        except OSError:
            digest.update(name.encode())
    return digest.hexdigest()[:12]


def fingerprint_key(fp: dict | None = None) -> str:
    return hashlib.sha256(json.dumps(fp or fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    if os.environ.get("FCN_CACHE_DIR"):
        return Path(os.environ["FCN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fcn"


def cache_path(fp: dict | None = None) -> Path:
    return cache_dir() / f"precision-{fingerprint_key(fp)}.json"


# --- the verdict ------------------------------------------------------------------------------


@dataclasses.dataclass
class Verdict:
    path: NumericPath  # the fastest path that learned
    trials: list[dict]  # one per path tried, in order: figures and "ok"
    fingerprint: dict
    created: str
    cached: bool = False

    @property
    def reason(self) -> str:
        failed = [t for t in self.trials if not t["ok"]]
        passed = next((t for t in self.trials if t["ok"]), None)
        parts = [f"{PATHS[t['path']].label} failed the probe ({_trial_summary(t)})" for t in failed]
        if passed:
            parts.append(f"{self.path.label} passed ({_trial_summary(passed)})")
        elif not self.trials:
            parts.append("this CPU has no native bf16")
        return "; ".join(parts)

    @property
    def passed(self) -> list[NumericPath]:
        """The paths whose trial passed, in the order tried."""
        return [PATHS[t["path"]] for t in self.trials if t["ok"]]

    def failed(self, name: str) -> bool:
        return any(t["path"] == name and not t["ok"] for t in self.trials)

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "path": self.path.name, "precision": self.path.precision,
                "isa_cap": self.path.isa_cap, "label": self.path.label, "reason": self.reason,
                "trials": self.trials, "fingerprint": self.fingerprint, "created": self.created}

    @classmethod
    def from_json(cls, data: dict) -> "Verdict":
        return cls(PATHS[data["path"]], list(data["trials"]), dict(data["fingerprint"]), data["created"], cached=True)


def _trial_summary(t: dict) -> str:
    if t.get("error"):
        return t["error"]
    if t.get("failed_stage") == "gradients":
        return f"gradients vs float32: worst cosine {t['gradient_cosine']:.3f} ({t['gradient_worst']}); not trained further"
    return (f"gradients vs float32: worst cosine {t['gradient_cosine']:.3f} ({t['gradient_worst']}); after "
            f"training: pixel accuracy {t['accuracy']:.3f}, agreement with float32 {t['agreement']:.3f}, "
            f"final loss {t['final_loss']:.3g}")


def cached_verdict() -> Verdict | None:
    fp = fingerprint()
    try:
        data = json.loads(cache_path(fp).read_text())
        if data.get("schema") != SCHEMA or data.get("fingerprint") != fp:
            return None
        return Verdict.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verdict(recheck: bool = False, console=None) -> Verdict:
    """The cached verdict for this machine, or a fresh probe (cached when the cache folder is writable).

    One probe per machine at a time: an fcn started while another probes waits and reads its verdict."""
    if not recheck:
        found = cached_verdict()
        if found is not None:
            return found
    fp = fingerprint()
    with _probe_lock(fp):
        found = None if recheck else cached_verdict()
        return found if found is not None else _probe(fp, console)


@contextlib.contextmanager
def _probe_lock(fp: dict):
    """An exclusive lock beside the cache file (none where the folder is unwritable or there is no flock)."""
    try:
        import fcntl

        path = cache_path(fp).with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _probe(fp: dict, console) -> Verdict:
    """Trial the candidate paths in order (fastest first) until one passes; float32 when none does."""
    paths = candidates()
    trials = []
    chosen = FLOAT32
    if paths != [FLOAT32]:
        if console is not None:
            console.print(f"[dim]checking which precision trains correctly on this CPU "
                          f"({', '.join(p.label.split(' (')[0] for p in paths)}; once per machine)[/]")
        reference = None
        work = Path(tempfile.mkdtemp(prefix="fcn-probe-"))
        try:
            for path in paths:
                if path is FLOAT32:
                    break  # the reference itself: nothing to compare it with
                trial = run_trial(path, reference, work=work)
                trials.append(trial)
                if reference is None and trial.get("reference"):
                    reference = trial["reference"]
                if trial["ok"]:
                    chosen = path
                    break
        finally:
            shutil.rmtree(work, ignore_errors=True)
    found = Verdict(chosen, [{k: v for k, v in t.items() if k != "reference"} for t in trials], fp,
                    time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if not any(t.get("error") and not t.get("crashed") for t in trials):  # a timeout says nothing lasting
        _write_cache(found)
    return found


def _write_cache(found: Verdict) -> None:
    target = cache_path(found.fingerprint)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".precision-", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(found.to_json(), fh, indent=1)
        os.replace(tmp, target)
    except OSError:
        pass  # an unwritable cache costs a probe next time, nothing else


# --- this process's choice -------------------------------------------------------------------


@dataclasses.dataclass
class Choice:
    precision: str  # the Keras dtype policy this process trains with
    path: NumericPath | None  # the CPU numeric path (None: a GPU decides, or nothing to verify)
    line: str  # what was chosen and why, in one line
    warning: str | None = None  # set when the user's explicit choice failed the probe
    verdict: Verdict | None = None


_CHOICES: dict[str, Choice] = {}


def gpu_present() -> bool:
    """An NVIDIA GPU this process may use, seen without importing TensorFlow (the GPU rules decide there)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    try:
        return any(Path("/proc/driver/nvidia/gpus").iterdir())
    except OSError:
        return False


_CAP_SET_BEFORE_TF: list[str] = []  # the cap choose() put in the environment before TensorFlow started


def cap_in_effect() -> str | None:
    """The oneDNN ISA cap this process's TensorFlow runs (or will run) under.

    oneDNN reads the variable once, at start: a value set after TensorFlow started means nothing. So
    once TensorFlow runs, only a cap from the process's own start (inherited, /proc/self/environ) or
    one that :func:`choose` set before the import counts.
    """
    if "tensorflow" not in sys.modules:
        return os.environ.get(ISA_ENV)
    if _CAP_SET_BEFORE_TF:
        return _CAP_SET_BEFORE_TF[-1]
    try:
        initial = Path("/proc/self/environ").read_bytes().split(b"\0")
    except OSError:
        return os.environ.get(ISA_ENV)  # no way to tell here: trust the variable
    prefix = ISA_ENV.encode() + b"="
    return next((v[len(prefix):].decode() for v in initial if v.startswith(prefix)), None)


def _runnable(path: NumericPath) -> bool:
    """Whether this process can still compute on ``path``: an ISA cap works only if set before TF starts."""
    return path.isa_cap is None or "tensorflow" not in sys.modules or cap_in_effect() == path.isa_cap


def choose(requested: str = "auto", console=None) -> Choice:
    """This process's CPU precision for ``requested`` (auto, float32, mixed_bfloat16, mixed_float16).

    Probes (or reads the cached verdict) only where bf16 is in question; sets the oneDNN ISA cap of the
    chosen path in the environment while TensorFlow has not started yet (see :func:`cap_in_effect`).
    """
    if requested in _CHOICES:
        return _CHOICES[requested]
    native = candidates() != [FLOAT32]
    if requested in ("float32", "mixed_float16") or not native:
        if requested == "auto":
            choice = Choice("float32", FLOAT32, "float32: this CPU has no native bf16 (emulated bf16 is slower)")
        elif requested == "mixed_bfloat16":  # emulated: correct, only slow; nothing to verify
            choice = Choice(requested, None, f"{requested}: as asked (this CPU has no native bf16: emulated, slower than float32)")
        else:
            choice = Choice(requested, FLOAT32 if requested == "float32" else None, f"{requested}: as asked")
        _CHOICES[requested] = choice
        return choice
    found = verdict(console=console)
    bf16_passed = [p for p in found.passed if p.precision == "mixed_bfloat16"]
    warning = None
    if requested == "auto":
        path = next((p for p in bf16_passed if _runnable(p)), FLOAT32)
        line = f"{path.label}: " + (found.reason or "verified")
        if bf16_passed and path is FLOAT32:
            line = (f"float32: {bf16_passed[0].label} passed the probe but needs {ISA_ENV}={bf16_passed[0].isa_cap} "
                    "before TensorFlow starts, and this process started it without")
    else:  # explicit bf16: obey, on a verified bf16 path when there is one
        path = next((p for p in bf16_passed if _runnable(p)), None)
        if path is None:
            path = BF16_AMX if "amx_bf16" in cpu_flags() else BF16
            if bf16_passed:
                warning = (f"--precision mixed_bfloat16: only {bf16_passed[0].label} passed this machine's precision "
                           f"probe, and it needs {ISA_ENV}={bf16_passed[0].isa_cap} before TensorFlow starts (this "
                           "process started it without); training on the unverified path as asked; see `fcn doctor`")
            else:
                warning = (f"--precision mixed_bfloat16 failed this machine's precision probe ({found.reason}); "
                           "training in bf16 as asked, but expect wrong results: use --precision auto or float32, "
                           "and see `fcn doctor`")
        line = f"{path.label}: as asked" + (" (verified by the probe)" if warning is None else " (NOT verified)")
    if path.isa_cap and "tensorflow" not in sys.modules:
        os.environ[ISA_ENV] = path.isa_cap
        _CAP_SET_BEFORE_TF.append(path.isa_cap)
    choice = Choice(path.precision, path, line + (" [cached]" if found.cached else ""), warning, found)
    _CHOICES[requested] = choice
    return choice


def current(requested: str) -> Choice | None:
    """The choice this process made for ``requested``, if it made one."""
    return _CHOICES.get(requested)


def forget_choices() -> None:
    """Drop this process's remembered choices (tests)."""
    _CHOICES.clear()


def bf16_verified() -> bool:
    """Whether bf16 may be used for inference here: no verdict says every bf16 path fails."""
    if candidates() == [FLOAT32]:
        return True  # nothing to fear from the AMX path; bf16 is merely emulated (and still correct)
    found = cached_verdict()
    if found is None:
        return True  # unprobed machines keep the trained precision; `fcn train` and `fcn doctor` probe
    return any(p.precision == "mixed_bfloat16" and _runnable(p) for p in found.passed)


# --- a trial, in a child process --------------------------------------------------------------


def run_trial(path: NumericPath, reference: str | None = None, timeout: float = 300, work: Path | None = None) -> dict:
    """Train the probe model in ``path`` in a fresh Python (its own oneDNN ISA cap); returns the figures.

    ``reference``: an .npz of float32 predictions from an earlier trial; without it the child trains
    float32 first and leaves its predictions (``trial["reference"]``) in ``work`` for the next trial.
    Without ``work`` the trial's files go to a temporary folder, removed when the trial ends.
    """
    env = dict(os.environ)
    env.pop(ISA_ENV, None)
    if path.isa_cap:
        env[ISA_ENV] = path.isa_cap
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN's verbose log names the ISA and kernels it really ran: the proof that a cap took effect.
    env["ONEDNN_VERBOSE"] = "1"
    env["KERAS_BACKEND"] = "tensorflow"
    env["CUDA_VISIBLE_DEVICES"] = "-1"  # the verdict is about this CPU, even on a machine with GPUs
    out_dir = Path(tempfile.mkdtemp(prefix=f"{path.name}-", dir=work))
    result_file = out_dir / "result.json"
    cmd = trial_command(path, out_dir, reference)
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout, errors="replace")
        log, code = proc.stdout, proc.returncode
        err_tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr.strip() else []
    except subprocess.TimeoutExpired:
        log, code, err_tail = "", None, [f"no answer in {timeout:.0f} s"]
    seconds = round(time.perf_counter() - started, 2)
    isa = _onednn_isa(log)
    try:
        trial = json.loads(result_file.read_text())
    except (OSError, ValueError):
        # Killed by its own fault (abort, segfault, bus error, illegal instruction): the path is broken.
        # A timeout or an outside kill (out of memory) says nothing lasting about the path.
        crashed = code is not None and -code in (signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGILL)
        why = (f"crashed, signal {-code}" if crashed else f"exit {code}") if code is not None else "timed out"
        trial = {"path": path.name, "ok": False, "crashed": crashed,
                 "error": f"the trial process died ({why}{': ' + err_tail[0][:160] if err_tail else ''})"}
    trial.update(seconds=seconds, **isa)
    if work is None:  # nobody will ask for this trial's reference predictions
        shutil.rmtree(out_dir, ignore_errors=True)
        trial.pop("reference", None)
    return trial


def trial_command(path: NumericPath, out_dir: Path, reference: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "fcn_cli.precision", "--trial", path.name, "--out", str(out_dir)]
    return cmd + (["--reference", reference] if reference else [])


def _onednn_isa(log: str) -> dict:
    """oneDNN's own account of the run: its version, the ISA it detected, and whether AMX kernels ran."""
    version = isa = None
    kernels = set()
    for line in log.splitlines():
        if not line.startswith("onednn_verbose"):
            continue
        if ",info,oneDNN v" in line and version is None:
            version = line.split("oneDNN ", 1)[1].split(" ")[0]
        elif ",info,cpu,isa:" in line and isa is None:
            isa = line.split("isa:", 1)[1].strip()
        elif ",exec," in line:
            fields = line.split(",")
            impl = next((f for f in fields if ":" in f and ("jit" in f or "brg" in f or "gemm" in f)), None)
            if impl:
                kernels.add(impl)
    return {"onednn": version, "onednn_isa": isa, "amx_kernels": any("amx" in k for k in kernels),
            "kernels": sorted(kernels)[:40]}


def easy_set(n: int = PROBE_IMAGES, size: int = PROBE_SIZE, seed: int = 0):
    """Photos of two colour blocks (sky above, road below) at a random horizon: float32 learns it
    to >= 0.99 pixel accuracy in a few epochs, so a path that cannot is broken, not unlucky."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), np.float32)
    labels = np.empty((n, size, size), np.int32)
    for i in range(n):
        horizon = rng.integers(size // 4, 3 * size // 4)
        labels[i] = np.where(np.arange(size)[:, None] < horizon, 0, 3)
        images[i] = np.where(labels[i][..., None] == 0, [128, 160, 220], [90, 80, 90])
        images[i] += rng.normal(0, 12, (size, size, 3))
    return images.clip(0, 255), labels


def probe_model(policy: str, seed: int = 1):
    """The probe's network: fcn's own FCN-8s stack at 1/16 width, the same weights under every policy."""
    import keras

    from fcn_cli.model import build_fcn

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(seed)
    return build_fcn("fcn8", 12, None, width=1 / 16, head_width=16, dropout=0.0)


def gradient_cosines(policy: str, fault: bool = False) -> dict:
    """Per variable, the cosine between its gradient in ``policy`` and in float32 (same weights, same batch).

    The score layers start at zero in fcn (as in the paper), which would stop every gradient below
    them; here they get small random weights so the check reaches all layers, forward and backward.
    """
    import keras
    import numpy as np

    images, labels = easy_set()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    grads = {}
    try:
        for name in ("float32", policy):
            model = probe_model(name)
            rng = np.random.default_rng(0)
            for layer in model.layers:
                if layer.name.startswith("score"):
                    layer.kernel.assign(rng.normal(0, 0.05, layer.kernel.shape).astype("float32"))
            if fault and name == policy:  # injected: a kernel that computes something else
                for w in model.trainable_weights:
                    w.assign(w.value + rng.normal(0, 0.5, w.shape).astype("float32"))
            grads[name] = _gradients(model, loss_fn, images[:PROBE_BATCH], labels[:PROBE_BATCH])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    ref, got = grads["float32"], grads[policy]
    return {k: float(ref[k] @ got[k] / (np.linalg.norm(ref[k]) * np.linalg.norm(got[k]) + 1e-30)) for k in ref}


def _gradients(model, loss_fn, images, labels) -> dict:
    import keras
    import numpy as np

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("the precision probe runs on the TensorFlow backend (oneDNN is what it checks)")
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = loss_fn(labels, model(images, training=True))
    values = tape.gradient(loss, model.trainable_weights)
    return {w.path: np.asarray(g, np.float32).ravel() for w, g in zip(model.trainable_weights, values)}


def full_width_steps(policy: str, steps: int = 2) -> list[float]:
    """Losses of a few training steps of the full-width FCN-8s (VGG-16, 4096-wide head) on 64x64 images.

    Some kernel faults show only at full width: with AMX, fcn's class layers in bf16 corrupted the
    heap there (glibc aborts the process) and not at 1/4 width (bench/NOTES.md). A crash here kills
    the trial's process, which the parent records as this path failing.
    """
    import keras
    import numpy as np

    from fcn_cli import accel
    from fcn_cli.fit import compile_model
    from fcn_cli.model import build_fcn

    images, labels = easy_set(4)
    try:
        keras.mixed_precision.set_global_policy(policy)
        keras.utils.set_random_seed(1)
        model = build_fcn("fcn8", 12, None, width=1.0, head_width=4096, dropout=0.0)
        compile_model(model, accel.adam(1e-4), 12, 11)
        return [float(np.asarray(model.train_on_batch(images, labels))[0]) for _ in range(steps)]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def train_probe_model(policy: str, epochs: int = PROBE_EPOCHS, fault: bool = False):
    """(predicted classes, per-epoch losses): fcn's own FCN-8s stack, optimizer and loss, tiny width."""
    import keras
    import numpy as np

    from fcn_cli import accel
    from fcn_cli.fit import compile_model

    images, labels = easy_set()
    try:
        model = probe_model(policy)
        compile_model(model, accel.adam(3e-3), 12, 11)
        callbacks = [_scrambler(epochs // 2)] if fault else []
        history = model.fit(images, labels, batch_size=PROBE_BATCH, epochs=epochs, verbose=0, shuffle=False,
                            callbacks=callbacks)
        logits = model.predict(images, verbose=0, batch_size=PROBE_BATCH)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return np.asarray(logits).argmax(-1), [float(v) for v in history.history["loss"]], labels


def _scrambler(at_epoch: int):
    """Injected fault: from ``at_epoch`` on, every batch adds noise as large as the weights themselves,
    which is what a corrupted kernel does to a run (loss up, predictions off) without any NaN."""
    import keras
    import numpy as np

    class Scramble(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if self._epoch >= at_epoch:
                rng = np.random.default_rng(batch)
                for w in self.model.trainable_weights:
                    value = keras.ops.convert_to_numpy(w.value)
                    w.assign(value + rng.normal(0, 1.0, value.shape).astype(value.dtype) * (np.abs(value).mean() + 1e-3))

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

    return Scramble()


def _trial_main(name: str, out_dir: Path, reference: str | None) -> int:
    import numpy as np

    path = PATHS[name]
    faults = {f.strip() for f in os.environ.get(FAULT_ENV, "").split(",") if f.strip()}
    started = time.perf_counter()
    if reference:
        ref = np.load(reference)["predictions"]
    else:
        ref, _, _ = train_probe_model("float32")
        np.savez(out_dir / "reference.npz", predictions=ref)
        reference = str(out_dir / "reference.npz")
    ref_seconds = time.perf_counter() - started
    started = time.perf_counter()
    cosines = gradient_cosines(path.precision, fault=name in faults)
    worst = min(cosines, key=lambda k: cosines[k] if np.isfinite(cosines[k]) else -np.inf)
    result = {
        "path": name, "precision": path.precision, "isa_cap": path.isa_cap,
        "gradient_cosine": round(cosines[worst], 4), "gradient_worst": worst,
        "reference": reference, "injected_fault": name in faults, "reference_seconds": round(ref_seconds, 2),
    }
    if not cosines[worst] >= PASS_GRADIENT_COSINE:
        # Wrong gradients fail the path: training on them (stages 2 and 3) would only take longer to say so.
        result.update(ok=False, failed_stage="gradients", train_seconds=round(time.perf_counter() - started, 2))
    else:
        full_width = full_width_steps(path.precision)
        pred, losses, labels = train_probe_model(path.precision, fault=name in faults)
        accuracy = float((pred == labels).mean())
        agreement = float((pred == ref).mean())
        finite = all(np.isfinite(losses)) and all(np.isfinite(full_width))
        result.update({
            "ok": bool(finite and accuracy >= PASS_ACCURACY and agreement >= PASS_AGREEMENT),
            "full_width_losses": full_width, "accuracy": round(accuracy, 4), "agreement": round(agreement, 4),
            "first_loss": losses[0], "final_loss": losses[-1] if finite else float("nan"),
            "max_loss": max(losses) if finite else float("nan"),
            "reference_accuracy": round(float((ref == labels).mean()), 4),
            "train_seconds": round(time.perf_counter() - started, 2),
        })
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out_dir / "result.json")
    return 0


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="fcn precision probe: one trial (internal; see `fcn doctor`)")
    parser.add_argument("--trial", choices=sorted(PATHS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference")
    args = parser.parse_args(argv)
    return _trial_main(args.trial, args.out, args.reference)


if __name__ == "__main__":
    sys.exit(main())
