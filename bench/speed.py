#!/usr/bin/env python
"""Speed benchmark of fcn on this machine: ceilings, training, inference, input pipeline, CLI.

    .venv/bin/python bench/speed.py                 # full run (about 10 minutes on 2 cores)
    .venv/bin/python bench/speed.py --quick         # smoke run: 1/8-width models, 64x64, 2 steps (< 2 min)
    .venv/bin/python bench/speed.py --out DIR       # where the JSON goes (default bench/results/)

The main process never imports TensorFlow. Every measurement that needs it runs in a fresh child
process (`python bench/speed.py --part NAME ...`), because the Keras dtype policy is global state and
so that each part's peak resident memory is its own. A child prints its result as one JSON line
prefixed with ``@@BENCH@@`` on stdout; a part that fails is recorded under ``errors`` and the run goes on.

Parts (each can be run by hand, e.g. to measure one lever):
    --part ceilings                      matmul and 3x3-conv GFLOP/s, float32 and bfloat16
    --part train --flavor product        `fcn train`'s code path (choose_precision, make_strategy,
                                         make_optimizer, compile_model), model.fit steps timed by a
                                         callback; then the predict-path forward; optional checkpoint
    --part train --flavor baseline       plain Keras as in the design notes: float32, Adam(1e-3),
                                         softmax + categorical crossentropy on one-hot labels, ['acc']
    --part pipeline                      fcn_cli.pipeline.pipeline_throughput on real CamVid pairs
    --part load                          import / checkpoint load / first and second forward of one image
Lever flags for hand runs: --precision, --jit, --intra, --inter (see bench/NOTES.md).

Output: one JSON file speed-<timestamp>.json (and a copy speed-latest.json); a quick run writes
speed-quick-<timestamp>.json / speed-quick-latest.json instead, so a smoke run never replaces the
latest real figures. Schema: see bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make fcn_cli importable without installing
    sys.path.insert(0, str(ROOT))

SCHEMA = "fcn-bench-speed/1"
MARK = "@@BENCH@@"
ISA_ENV = "ONEDNN_MAX_CPU_ISA"  # fcn_cli.precision.ISA_ENV (this process never imports fcn_cli's TF parts)
DEFAULT_DATA = ROOT.parent / "shared" / "camvid"
CAMVID_TRAIN_PAIRS = 367  # steps_per_epoch that `fcn train` would use on CamVid = 367 // batch

# `fcn predict` runs photos through fcn_cli.inference (predict_batch / iter_predictions, mode "resize" by
# default, class indices out). The product inference figure goes through it; if it cannot be imported,
# a tf.function forward stands in and the JSON says so.
PREDICT_MODE = "resize"

# Sizes and repeats. Full mode: the real thing; quick mode: a smoke run of every code path.
FULL = dict(
    width=1.0, head_width=4096, image=224, batch=8, warmup=3, steps=8, infer_warmup=3, infer_repeats=8,
    mm_n=4096, mm_warmup=2, mm_repeats=7, conv=(8, 56, 56, 256, 256), conv_warmup=3, conv_repeats=10,
    pipeline_pairs=None, pipeline_image=224, help_repeats=5, predict_repeats=3, part_timeout=1200,
    epochs=3, epoch_steps=None,
)
QUICK = dict(
    width=0.125, head_width=512, image=64, batch=8, warmup=1, steps=2, infer_warmup=1, infer_repeats=2,
    mm_n=512, mm_warmup=1, mm_repeats=3, conv=(2, 28, 28, 64, 64), conv_warmup=1, conv_repeats=3,
    pipeline_pairs=24, pipeline_image=64, help_repeats=2, predict_repeats=1, part_timeout=300,
    epochs=2, epoch_steps=3,
)


# ============================================================================ helpers (no TensorFlow)


def median(values):
    return float(statistics.median(values)) if values else None


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: KiB


def emit(result: dict) -> None:
    sys.stdout.flush()
    print(MARK + json.dumps(result), flush=True)


def cpu_info() -> dict:
    info = {"model": platform.processor() or None, "flags": {}}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    first = text.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info["model"] = fields.get("model name", info["model"])
    info["family_model_stepping"] = [fields.get("cpu family"), fields.get("model"), fields.get("stepping")]
    info["mhz"] = fields.get("cpu MHz")
    for flag in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"):
        info["flags"][flag] = flag in flags
    info["bf16_native"] = "avx512_bf16" in flags or "amx_bf16" in flags
    return info


def machine_info() -> dict:
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = None
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_info(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "ram_gib": round(ram, 1) if ram else None,
        "load_average_at_start": [round(v, 2) for v in load] if load else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: version(d) for d in ("tensorflow-cpu", "tensorflow", "keras", "numpy", "fcn-cli")},
        "env": {k: os.environ.get(k) for k in (
            "TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS",
            "KMP_AFFINITY", "KMP_BLOCKTIME", "ONEDNN_DEFAULT_FPMATH_MODE", "TF_XLA_FLAGS", "KERAS_BACKEND")},
        "git": git_info(),
    }


def git_info() -> dict:
    def run(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--porcelain")
    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def fcn_executable() -> Path | None:
    local = Path(sys.executable).parent / "fcn"
    if local.exists():
        return local
    venv = ROOT / ".venv" / "bin" / "fcn"
    if venv.exists():
        return venv
    found = shutil.which("fcn")
    return Path(found) if found else None


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    return env


def run_part(name: str, args: list[str], timeout: float, isa_cap: str | None | bool = False) -> dict:
    """Run `speed.py --part name args` in a fresh process; its JSON, or {"error": ...}.

    ``isa_cap``: False keeps this process's ONEDNN_MAX_CPU_ISA (the verdict's), None removes it, a
    string sets it (the precision lever row).
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, *args]
    env = child_env()
    if isa_cap is not False:
        env.pop(ISA_ENV, None)
        if isa_cap:
            env[ISA_ENV] = isa_cap
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"part {name} timed out after {timeout:.0f} s"}
    wall = round(time.perf_counter() - started, 2)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            result = json.loads(line[len(MARK):])
            result["process_wall_s"] = wall
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"error": f"part {name} exited {proc.returncode}: " + " | ".join(tail)[-1500:], "process_wall_s": wall}


def time_command(cmd: list[str], repeats: int, timeout: float, check=None) -> dict:
    """Wall time of a whole process (start to exit), median of ``repeats``; stops at the first failure."""
    times, last = [], None
    for i in range(repeats):
        if check is not None:
            check.prepare(i)
        started = time.perf_counter()
        try:
            last = subprocess.run(cmd(i) if callable(cmd) else cmd, capture_output=True, text=True,
                                  timeout=timeout, env=child_env(), cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"{' '.join(map(str, cmd if not callable(cmd) else cmd(i)))[:200]}: timed out after {timeout:.0f} s"}
        elapsed = time.perf_counter() - started
        if last.returncode != 0 or (check is not None and not check.ok(i)):
            tail = (last.stderr or last.stdout).strip().splitlines()[-4:]
            return {"error": f"exit {last.returncode}: " + " | ".join(tail)[-800:], "times_s": [round(t, 3) for t in times]}
        times.append(elapsed)
    return {"median_s": round(median(times), 3), "times_s": [round(t, 3) for t in times], "repeats": len(times)}


# ============================================================================ parts (children)


def setup_tensorflow(args):
    """Threads must be set before TensorFlow starts its runtime; returns (tf, keras, thread info)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    if args.intra is not None:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter is not None:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    import keras

    threads = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
               "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
               "note": "0 = TensorFlow default (all usable cores)"}
    try:
        from tensorflow.python.util import _pywrap_util_port

        threads["onednn_enabled"] = bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # private API; informative only
        threads["onednn_enabled"] = None
    return tf, keras, threads


def timed_calls(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def part_ceilings(args, sizes) -> dict:
    tf, _, threads = setup_tensorflow(args)
    out = {"threads": threads, "matmul": {}, "conv3x3": {}}
    n = sizes["mm_n"]
    for dtype in ("float32", "bfloat16"):
        try:
            a = tf.cast(tf.random.stateless_uniform((n, n), (1, 2), -1, 1), dtype)
            b = tf.cast(tf.random.stateless_uniform((n, n), (3, 4), -1, 1), dtype)
            f = tf.function(lambda x, y: tf.matmul(x, y))
            times = timed_calls(lambda: f(a, b).shape, sizes["mm_warmup"], sizes["mm_repeats"])
            flops = 2 * n**3
            out["matmul"][dtype] = {
                "shape": f"{n}x{n} @ {n}x{n}", "flops": flops, "median_s": round(median(times), 5),
                "gflops": round(flops / median(times) / 1e9, 2), "best_gflops": round(flops / min(times) / 1e9, 2),
                "warmup": sizes["mm_warmup"], "repeats": len(times)}
        except Exception as exc:  # e.g. no bf16 kernel for this op on this build
            out["matmul"][dtype] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    batch, h, w, cin, cout = sizes["conv"]
    layouts = ["NHWC"] + (["NCHW"] if args.nchw else [])
    for layout in layouts:
        for dtype in ("float32", "bfloat16"):
            key = dtype if layout == "NHWC" else f"{dtype}_NCHW"
            try:
                shape = (batch, h, w, cin) if layout == "NHWC" else (batch, cin, h, w)
                x = tf.cast(tf.random.stateless_uniform(shape, (5, 6), 0, 1), dtype)
                k = tf.cast(tf.random.stateless_uniform((3, 3, cin, cout), (7, 8), -0.1, 0.1), dtype)
                f = tf.function(lambda x, k: tf.nn.conv2d(x, k, 1, "SAME", data_format=layout))
                times = timed_calls(lambda: f(x, k).shape, sizes["conv_warmup"], sizes["conv_repeats"])
                flops = 2 * batch * h * w * 9 * cin * cout
                out["conv3x3"][key] = {
                    "shape": f"batch {batch}, {h}x{w}x{cin} -> {cout}, 3x3 SAME, {layout}", "flops": flops,
                    "median_s": round(median(times), 5), "gflops": round(flops / median(times) / 1e9, 2),
                    "best_gflops": round(flops / min(times) / 1e9, 2),
                    "warmup": sizes["conv_warmup"], "repeats": len(times)}
            except Exception as exc:
                out["conv3x3"][key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


class _StepTimer:
    """Keras callback factory: wall time at the start and end of every training step."""

    @staticmethod
    def make(keras):
        class StepTimer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.begin, self.end = [], []

            def on_train_batch_begin(self, batch, logs=None):
                self.begin.append(time.perf_counter())

            def on_train_batch_end(self, batch, logs=None):
                self.end.append(time.perf_counter())

            def step_times(self):
                # end-to-end of each step, loop overhead and iterator included (what an epoch costs)
                return [self.end[0] - self.begin[0]] + [b - a for a, b in zip(self.end, self.end[1:])]

        return StepTimer()


def _batches(np, n_batches, batch, size, num_classes, ignore_index):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (n_batches, batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, (n_batches, batch, size, size)).astype(np.int32)
    weights = (labels != ignore_index).astype(np.float32) if ignore_index is not None else np.ones_like(labels, np.float32)
    return images, labels, weights


def _compiled_forward(tf, model):
    """A tf.function forward + argmax: the lever "compiled forward" (what Keras's predict_on_batch also traces)."""

    @tf.function(reduce_retracing=True)
    def forward(images):
        return tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32)

    return lambda batch: np.asarray(forward(tf.constant(batch, tf.float32)))


def _predict_path(tf, model, image_size):
    """(call(list of uint8 (H, W, 3) photos) -> labels, description): the path `fcn predict` uses."""
    try:
        from fcn_cli.inference import predict_batch
    except ImportError as exc:
        forward = _compiled_forward(tf, model)
        return (lambda photos: forward(np.stack(photos).astype(np.float32)),
                f"fallback: tf.function(argmax(model(x, training=False))) (fcn_cli.inference: {exc})")

    def call(photos):
        return predict_batch(model, photos, mode=PREDICT_MODE, image_size=image_size, batch_size=len(photos), output="labels")

    return call, f"fcn_cli.inference.predict_batch(mode={PREDICT_MODE!r}, output='labels', batch_size=batch)"


def _served_model(model, best: str):
    """(model, description): best.keras as `fcn predict` loads it, or the trained model itself."""
    try:
        from fcn_cli.inference import load_for_inference
    except ImportError as exc:
        return model, f"the trained model in memory (fcn_cli.inference: {exc})"
    return load_for_inference(Path(best))[0], "fcn_cli.inference.load_for_inference(best.keras)"


def part_train(args, sizes) -> dict:
    tf, keras, threads = setup_tensorflow(args)
    import numpy as np

    from fcn_cli.classes import CAMVID
    from fcn_cli.flops import count_flops
    from fcn_cli.model import build_fcn

    size, batch = sizes["image"], sizes["batch"]
    warmup, steps = sizes["warmup"], sizes["steps"]
    num_classes, ignore = CAMVID.num_classes, CAMVID.ignore_index
    out = {"flavor": args.flavor, "threads": threads, "variant": "fcn8", "num_classes": num_classes,
           "image_size": [size, size], "batch_size": batch, "width": sizes["width"], "head_width": sizes["head_width"],
           "backbone_weights": "none (random init: weights do not change speed; imagenet would need a 553 MB download)"}
    keras.utils.set_random_seed(0)
    started = time.perf_counter()
    if args.flavor == "product":
        from fcn_cli.fit import choose_precision, compile_model, make_optimizer, make_strategy
        from fcn_cli.train import TrainConfig

        precision = choose_precision(args.precision)
        keras.mixed_precision.set_global_policy(precision)
        strategy, strategy_desc = make_strategy("auto")
        cfg = TrainConfig(variant="fcn8", batch_size=batch, image_size=(size, size), backbone_weights="none",
                          width=sizes["width"], head_width=sizes["head_width"])
        steps_per_epoch = CAMVID_TRAIN_PAIRS // batch
        with strategy.scope():
            model = build_fcn(cfg.variant, num_classes, None, cfg.width, cfg.head_width)
            out["build_s"] = round(time.perf_counter() - started, 3)
            compile_model(model, make_optimizer(cfg, steps_per_epoch), num_classes, ignore)
        from fcn_cli.fit import precision_line

        out["precision_why"] = precision_line(args.precision, precision)[0]
        out.update(precision=precision, precision_requested=args.precision, strategy=strategy_desc,
                   optimizer=f"{cfg.optimizer} lr {cfg.lr} schedule {cfg.schedule} (make_optimizer)",
                   loss="SparseCategoricalCrossentropy(from_logits=True) + sample weights; metrics MeanIoU, PixelAccuracy (compile_model)")
    else:
        precision = "float32"
        keras.mixed_precision.set_global_policy(precision)
        # Stock Conv2D layers, as the design notes build it (fcn's kernels compute the same functions).
        base = build_fcn("fcn8", num_classes, None, sizes["width"], sizes["head_width"], accel=False)
        probs = keras.layers.Activation("softmax", name="softmax")(base.output)
        model = keras.Model(base.input, probs, name="fcn8_plain_keras")
        out["build_s"] = round(time.perf_counter() - started, 3)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["acc"])
        out.update(precision=precision, strategy="none (plain model.compile)", optimizer="Adam(1e-3)",
                   loss="categorical_crossentropy on softmax outputs, one-hot labels; metrics ['acc']")
    if args.jit:
        model.jit_compile = True
    out["jit_compile"] = bool(model.jit_compile)
    out[ISA_ENV] = os.environ.get(ISA_ENV)  # the oneDNN ISA cap this process ran under (None: all of the CPU)
    out["params"] = int(model.count_params())
    flops = count_flops(model, size, size)
    out["flops_forward_per_image"] = flops
    out["flops_train_per_image"] = 3 * flops

    n_batches = min(4, warmup + steps)
    images, labels, weights = _batches(np, n_batches, batch, size, num_classes, ignore)
    if args.flavor == "product":
        data = (images, labels, weights)
    else:
        data = (images, np.eye(num_classes, dtype=np.float32)[labels])
    ds = tf.data.Dataset.from_tensor_slices(data).repeat().prefetch(2)  # each element is one whole batch

    timer = _StepTimer.make(keras)
    started = time.perf_counter()
    model.fit(ds, epochs=1, steps_per_epoch=warmup + steps, callbacks=[timer], verbose=0, shuffle=False)
    fit_s = time.perf_counter() - started
    step_times = timer.step_times()
    timed = step_times[warmup:]
    step = median(timed)
    out["train"] = {
        "step_s_median": round(step, 4), "step_s": [round(t, 4) for t in step_times], "warmup": warmup,
        "repeats": len(timed), "first_step_s": round(step_times[0], 3), "fit_total_s": round(fit_s, 3),
        "images_per_s": round(batch / step, 3), "gflops": round(3 * flops * batch / step / 1e9, 2),
        "how": "model.fit over an in-memory tf.data of fixed batches; step times from on_train_batch_end "
               "to on_train_batch_end; the first `warmup` steps (tracing) excluded; median",
    }
    out["peak_rss_mib_after_train"] = peak_rss_mib()

    def save_checkpoints() -> dict:
        """What `fcn train` writes: last.keras, the compiled model with its optimizer state (for --resume),
        and best.keras, an uncompiled copy of the weights (what evaluate / predict load)."""
        from fcn_cli.runs import save_checkpoint

        meta = {"variant": "fcn8", "classes": CAMVID.to_dict(), "image_size": [size, size]}
        if args.save_checkpoint:
            best = Path(args.save_checkpoint)
        else:
            best = Path(tempfile.mkdtemp(prefix="fcn-bench-ckpt-")) / "best.keras"
        last = best.with_name("last.keras")
        started = time.perf_counter()
        save_checkpoint(model, last, meta)
        last_s = time.perf_counter() - started
        # The same file through the public path that fcn_cli.accel.checkpoint_io replaces (FCN_ACCEL=0 takes it).
        from fcn_cli.accel.checkpoint_io import save_with_keras

        public = last.with_name("last-public.keras")
        started = time.perf_counter()
        save_with_keras(model, public, {"fcn.json": json.dumps(meta).encode()})
        with open(public, "rb") as fh:
            os.fsync(fh.fileno())
        public_s = time.perf_counter() - started
        public.unlink()
        from fcn_cli.accel.swap import portable_config

        # Uncompiled stock layers, as fcn train's best-weights twin: best.keras is plain Keras.
        twin = keras.Model.from_config(portable_config(model.get_config()))
        twin.set_weights(model.get_weights())
        started = time.perf_counter()
        save_checkpoint(twin, best, meta, portable=True)
        record = {
            "last": {"save_s": round(last_s, 3), "bytes": last.stat().st_size, "with_optimizer_state": True},
            "last_public_api": {"save_s": round(public_s, 3), "how": "model.save + fcn.json appended + fsync, "
                                "right after the one-pass write of the same model"},
            "best": {"path": str(best), "save_s": round(time.perf_counter() - started, 3),
                     "bytes": best.stat().st_size, "with_optimizer_state": False},
        }
        last.unlink()
        return record

    # Inference on the same batches.
    def inference_record(times, path):
        t = median(times)
        return {"path": path, "batch_size": batch, "median_s": round(t, 4), "times_s": [round(v, 4) for v in times],
                "warmup": sizes["infer_warmup"], "repeats": len(times), "images_per_s": round(batch / t, 3),
                "gflops": round(flops * batch / t / 1e9, 2)}

    def timed_inference(call, path):
        return inference_record(timed_calls(call, sizes["infer_warmup"], sizes["infer_repeats"]), path)

    def timed_in_turns(calls: dict) -> dict:
        """Several ways of running the same forward, timed in alternation: each sees the same machine state."""
        for call, _ in calls.values():
            timed_calls(call, sizes["infer_warmup"], 0)
        times = {name: [] for name in calls}
        for _ in range(sizes["infer_repeats"]):
            for name, (call, _) in calls.items():
                times[name] += timed_calls(call, 0, 1)
        return {name: inference_record(times[name], path) for name, (_, path) in calls.items()}

    if args.flavor == "product":
        # `fcn predict` runs the model as fcn_cli.inference.load_for_inference loads it from best.keras.
        out["checkpoint"] = save_checkpoints()
        served, load_path = _served_model(model, out["checkpoint"]["best"]["path"])
        predict, path = _predict_path(tf, served, (size, size))
        photos = list(images[0].astype(np.uint8))
        # Lever: the same network through one compiled (tf.function) forward, no resize / host-side argmax.
        forward = _compiled_forward(tf, served)
        out.update(timed_in_turns({
            "inference": (lambda: predict(photos), f"{load_path}, then {path}"),
            "inference_compiled_forward": (lambda: forward(images[0]), "lever: tf.function(argmax(model(x, training=False)))"),
        }))
        if not args.save_checkpoint:
            shutil.rmtree(Path(out["checkpoint"]["best"]["path"]).parent, ignore_errors=True)
    else:
        out["inference"] = timed_inference(lambda: model.predict_on_batch(images[0]).argmax(-1),
                                           "model.predict_on_batch(x).argmax(-1) (plain Keras)")
    out["peak_rss_mib_end"] = peak_rss_mib()
    return out


def part_epochs(args, sizes) -> dict:
    """Whole epochs through `fcn train` (fcn_cli.train.train: CamVid folder, tf.data pipeline, metrics,
    validation, commits of checkpoints / log / state), against the bare step rate of the train part."""
    _, _, threads = setup_tensorflow(args)
    import io

    from rich.console import Console

    from fcn_cli.train import TrainConfig, train

    size, batch = sizes["image"], sizes["batch"]
    out_dir = Path(tempfile.mkdtemp(prefix="fcn-bench-epochs-"))
    cfg = TrainConfig(data=str(args.data), variant="fcn8", batch_size=batch, epochs=sizes["epochs"], image_size=(size, size),
                      backbone_weights="none", width=sizes["width"], head_width=sizes["head_width"], out=str(out_dir),
                      max_steps=sizes.get("epoch_steps"), precision=args.precision)
    try:
        result = train(cfg, Console(file=io.StringIO()))
        rows = result.rows
        steps = json.loads(next(out_dir.glob("fcn8-*/config.json")).read_text())["steps_per_epoch"]
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    epochs = []
    for r in rows:
        if not r.get("images_per_s"):
            continue
        train_s = steps * batch / r["images_per_s"]
        epochs.append({"epoch": r["epoch"], "seconds_train_and_val": r["seconds"], "train_part_s": round(train_s, 2),
                       "validation_s": round(r["seconds"] - train_s, 2), "train_part_images_per_s": r["images_per_s"]})
    val_s = sum(e["validation_s"] for e in epochs)
    commits_s = result.seconds - sum(r["seconds"] for r in rows)
    images = steps * batch * len(rows)
    later = [e["train_part_images_per_s"] for e in epochs[1:]] or [epochs[0]["train_part_images_per_s"]]
    out = {
        "threads": threads, "config": {k: v for k, v in cfg.to_json().items() if k not in ("extra",)},
        "steps_per_epoch": steps, "epochs": epochs,
        "fit_wall_s": round(result.seconds, 2),
        "commit_and_callback_s": round(commits_s, 2),
        "commits": getattr(result, "commits", None),
        "train_part_images_per_s_median_after_first": round(median(later), 3),
        "whole_run_images_per_s_excluding_validation": round(images / (result.seconds - val_s), 3),
        "whole_run_images_per_s": round(images / result.seconds, 3),
        "how": "fcn_cli.train.train (what `fcn train` runs) on the CamVid folder; per-epoch rows from log.csv; "
               "commit_and_callback_s = fit wall - sum of epoch (train + validation) seconds: commits, callbacks "
               "and fit's own set-up; the whole-run figure counts every second of fit() except the validation "
               "passes (first epoch's tracing included). No --jit here: fcn train has no XLA switch",
    }
    ends = getattr(result, "epoch_ends_s", None) or []
    if len(ends) == len(epochs) >= 2:
        # Whole epochs after the first (its tracing and set-up are once per run): every second from the end of
        # epoch 1 (its commit included) to the end of the last (its commit included), validation passes excepted.
        wall = ends[-1] - ends[0] - sum(e["validation_s"] for e in epochs[1:])
        out["whole_epochs_after_first"] = {
            "epochs": len(epochs) - 1, "seconds_excluding_validation": round(wall, 2),
            "images_per_s": round(steps * batch * (len(epochs) - 1) / wall, 3),
            "how": "TrainResult.epoch_ends_s: wall time between the ends of epoch 1 and the last epoch (data pipeline, "
                   "metrics, callbacks and commits at --checkpoint-overhead's default spacing, the last epoch's forced "
                   "commit incl.), minus those epochs' validation passes",
        }
    return out


def part_pipeline(args, sizes) -> dict:
    _, _, threads = setup_tensorflow(args)
    from fcn_cli.classes import CAMVID
    from fcn_cli.datasets import find_dataset
    from fcn_cli.pipeline import pipeline_throughput

    pairs = find_dataset(Path(args.data)).pairs("train")
    if sizes["pipeline_pairs"]:
        pairs = pairs[: sizes["pipeline_pairs"]]
    size = sizes["pipeline_image"]
    rates = pipeline_throughput(pairs, CAMVID, image_size=(size, size), batch_size=sizes["batch"], passes=2)
    packed = packed_vs_folder(pairs, size, sizes["batch"])
    return {"threads": threads, "data": str(args.data), "pairs": len(pairs), "image_size": [size, size],
            "batch_size": sizes["batch"], "augment": "pipeline_throughput default (flip, scale 0.75-1.25, jitter 0.2)",
            "first_pass_images_per_s": round(rates[0], 2), "cached_images_per_s": round(rates[1], 2),
            "passes": len(rates), "note": "first pass includes decoding every pair into the in-memory cache",
            "packed_vs_folder": packed, "peak_rss_mib": peak_rss_mib()}


def packed_vs_folder(pairs, size, batch) -> dict:
    """Images/s of the same pairs streamed from TFRecord shards and from the folder (no cache), same augmentation."""
    import shutil
    import tempfile

    from fcn_cli import pipeline, shards
    from fcn_cli.classes import CAMVID

    augment = pipeline.Augment(flip=True, scale=(0.75, 1.25), jitter=0.2)
    tmp = Path(tempfile.mkdtemp(prefix="fcn-bench-shards-"))
    try:
        src = tmp / "src"
        for sub in ("train", "trainannot"):
            (src / sub).mkdir(parents=True)
        for p in pairs:  # links, so the packer reads exactly these pairs
            os.symlink(p.image.resolve(), src / "train" / p.image.name)
            os.symlink(p.mask.resolve(), src / "trainannot" / p.mask.name)
        t = time.perf_counter()
        shards.pack(src, tmp / "shards", CAMVID, shards=8)
        pack_s = time.perf_counter() - t
        files = shards.ShardSet.open(tmp / "shards").files("train")

        def rate(dataset):
            t0, n = time.perf_counter(), 0
            for images, _, _ in dataset:
                n += int(images.shape[0])
            return n / (time.perf_counter() - t0)

        packed = pipeline.training_dataset(pipeline.Records(files), CAMVID, image_size=(size, size), batch_size=batch, augment=augment)
        folder = pipeline.training_dataset(pairs, CAMVID, image_size=(size, size), batch_size=batch, augment=augment,
                                           cache_budget=0)
        return {"pack_seconds": round(pack_s, 2), "shards": len(files),
                "shards_images_per_s": round(rate(packed), 2), "folder_streaming_images_per_s": round(rate(folder), 2),
                "note": "one pass each, no in-memory cache on either side (what a data set too big for RAM gets)"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def part_load(args, sizes) -> dict:
    """What one `fcn predict` pays before its PNG: imports, checkpoint load, first (tracing) forward."""
    t0 = time.perf_counter()
    tf, keras, threads = setup_tensorflow(args)

    from fcn_cli.images import read_image

    try:
        import fcn_cli.predict  # noqa: F401  (the module `fcn predict` imports)

        predict_module = True
    except ImportError:
        predict_module = False
    try:
        from fcn_cli import inference
    except ImportError:
        inference = None
    import_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    if inference is not None:
        model, _, image_size, _ = inference.load_for_inference(Path(args.checkpoint))
        load_path = "fcn_cli.inference.load_for_inference"
    else:
        from fcn_cli.runs import load_checkpoint

        model, meta = load_checkpoint(Path(args.checkpoint))
        image_size = tuple(meta.get("image_size") or ()) or None
        load_path = "fcn_cli.runs.load_checkpoint"
    load_s = time.perf_counter() - t1
    image = read_image(Path(args.image))
    if inference is not None:
        call = lambda: inference.labels_for(model, image, mode=PREDICT_MODE, image_size=image_size)  # noqa: E731
        path = f"fcn_cli.inference.labels_for(mode={PREDICT_MODE!r})"
    else:
        from fcn_cli.inference import pad_to_multiple

        forward = _compiled_forward(tf, model)
        call = lambda: forward(pad_to_multiple(image[None].astype(np.float32))[0])  # noqa: E731
        path = "fallback: tf.function forward at native size"
    t2 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t2
    times = timed_calls(call, 0, max(1, sizes["predict_repeats"]))
    return {"threads": threads, "import_s": round(import_s, 3), "fcn_cli_predict_importable": predict_module,
            "load_checkpoint_s": round(load_s, 3), "load_path": load_path, "first_forward_s": round(first_s, 3),
            "forward_s": round(median(times), 3), "forward_repeats": len(times), "forward_path": path,
            "image": {"path": str(args.image), "hw": list(image.shape[:2]), "model_input_hw": list(image_size) if image_size else None},
            "conv_dtype_policy": model.get_layer("block1_conv1").dtype_policy.name, "peak_rss_mib": peak_rss_mib()}


PARTS = {"ceilings": part_ceilings, "train": part_train, "pipeline": part_pipeline, "load": part_load,
         "epochs": part_epochs}


# ============================================================================ orchestration


def lever_args(args) -> list[str]:
    extra = []
    if args.intra is not None:
        extra += ["--intra", str(args.intra)]
    if args.inter is not None:
        extra += ["--inter", str(args.inter)]
    return extra + (["--quick"] if args.quick else [])


class _PngCheck:
    def __init__(self, folder: Path, hw):
        self.folder, self.hw = folder, hw

    def path(self, i) -> Path:
        return self.folder / f"out-{i}.png"

    def prepare(self, i):
        self.path(i).unlink(missing_ok=True)

    def ok(self, i) -> bool:
        from PIL import Image

        try:
            with Image.open(self.path(i)) as im:
                return (im.height, im.width) == tuple(self.hw)
        except OSError:
            return False


def predict_input(tmp: Path, data: Path) -> tuple[Path, tuple[int, int]]:
    """A 480x360 photo: the first CamVid train image when there is one, else a synthetic one."""
    from PIL import Image

    target = tmp / "img.png"
    candidates = sorted((data / "train").glob("*.png")) if (data / "train").is_dir() else []
    if candidates:
        shutil.copyfile(candidates[0], target)
    else:
        import numpy as np

        Image.fromarray(np.random.default_rng(0).integers(0, 255, (360, 480, 3), dtype=np.uint8)).save(target)
    with Image.open(target) as im:
        return target, (im.height, im.width)


def orchestrate(args) -> dict:
    sizes = QUICK if args.quick else FULL
    started_at = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    timeout = sizes["part_timeout"]
    common = lever_args(args)
    result = {
        "schema": SCHEMA, "mode": "quick" if args.quick else "full", "started_at": started_at.isoformat(timespec="seconds"),
        "machine": machine_info(), "sizes": {k: v for k, v in sizes.items() if k != "part_timeout"},
        "conventions": {
            "flops": "forward FLOPs = 2 x multiply-adds of every Conv2D / Conv2DTranspose layer "
                     "(fcn_cli.flops.count_flops); training FLOPs = 3 x forward (forward + 2 x backward)",
            "gflops": "FLOPs per image x images per second / 1e9",
            "time": "median of `repeats` timed runs after `warmup` untimed ones; wall clock (time.perf_counter)",
            "fraction_of_ceiling": "achieved GFLOP/s / 3x3-conv ceiling GFLOP/s of the matching dtype "
                                   "(bfloat16 when the policy is mixed_bfloat16, else float32)",
            "ratios": "vs_baseline = product / plain-Keras baseline: > 1 is faster for rates and GFLOP/s, slower for *_s times, more memory for *_mib",
            "memory": "peak resident set (ru_maxrss) of the child process that ran the part, MiB",
        },
        "errors": {},
    }
    say = (lambda *a: None) if args.silent else (lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True))
    tmp = Path(tempfile.mkdtemp(prefix="fcn-bench-"))
    try:
        # CLI start-up first: cheap, and nothing else running.
        fcn = fcn_executable()
        say("fcn --help / python start-up")
        cli = {"python_startup": time_command([sys.executable, "-c", "pass"], 3, 60)}
        cli["help"] = time_command([str(fcn), "--help"], sizes["help_repeats"], 120) if fcn else {"error": "no fcn executable"}
        result["cli"] = cli

        say("precision verdict (fcn_cli.precision: probe or cache)")
        result["precision"] = precision_verdict(args)

        say("ceilings (matmul, conv3x3)")
        result["ceilings"] = run_part("ceilings", common + (["--nchw"] if args.nchw else []), timeout)

        say("input pipeline (CamVid)")
        result["pipeline"] = run_part("pipeline", common + ["--data", str(args.data)], timeout)

        ckpt = tmp / "fcn8.keras"
        models = {}
        say("train + infer: product path")
        models["product"] = run_part("train", common + ["--flavor", "product", "--precision", args.precision,
                                                        "--save-checkpoint", str(ckpt)] + (["--jit"] if args.jit else []), timeout)
        say("train + infer: plain-Keras baseline")
        models["baseline"] = run_part("train", common + ["--flavor", "baseline"], timeout)
        result["models"] = models

        if not args.no_precision_levers:
            result["precision_paths"] = precision_paths(args, common, timeout, say)

        if (Path(args.data) / "train").is_dir():
            say("whole epochs through fcn train (CamVid)")
            result["epochs"] = run_part("epochs", common + ["--data", str(args.data), "--precision", args.precision], timeout)
        else:
            result["epochs"] = {"error": f"{args.data}: no CamVid train folder"}

        image, hw = predict_input(tmp, Path(args.data))
        if ckpt.exists():
            say("predict breakdown (import / load / forward)")
            cli["predict_breakdown"] = run_part("load", common + ["--checkpoint", str(ckpt), "--image", str(image)], timeout)
            if fcn:
                say("fcn predict end to end")
                check = _PngCheck(tmp, hw)
                e2e = time_command(lambda i: [str(fcn), "predict", str(image), "-o", str(check.path(i)), "--model", str(ckpt)],
                                   sizes["predict_repeats"], timeout, check)
                e2e.update(image_hw=list(hw), checkpoint_bytes=ckpt.stat().st_size,
                           command="fcn predict img.png -o out.png --model CKPT", what="process start to PNG written")
                cli["predict_end_to_end"] = e2e
        else:
            cli["predict_breakdown"] = cli["predict_end_to_end"] = {"error": "no checkpoint (the product train part failed)"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    derive(result)
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if hasattr(os, "getloadavg"):  # other work on the machine during the run shows here
        result["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def precision_verdict(args) -> dict:
    """The verdict `fcn train --precision auto` follows here; its ISA cap goes to every child from now on."""
    from fcn_cli import precision

    found = precision.verdict()
    if args.precision == "auto" and found.path.isa_cap:
        os.environ[ISA_ENV] = found.path.isa_cap
    record = found.to_json()
    record["cached"] = found.cached
    record["children_run_with"] = {ISA_ENV: os.environ.get(ISA_ENV)}
    for trial in record["trials"]:
        trial.pop("kernels", None)
    return record


def precision_paths(args, common: list[str], timeout: float, say) -> dict:
    """The lever row: every numeric path this CPU offers, each with its speed and whether it learns.

    "learns" is the precision probe's trial for that path (fcn_cli.precision.run_trial), run here for
    every path, not only up to the first that passes; speed is the product's train part (training and
    inference of the full model) in a child with that path's oneDNN ISA cap.
    """
    from fcn_cli import precision

    rows = {}
    for path in precision.candidates():
        say(f"precision lever: {path.label}")
        trial = precision.run_trial(path)
        trial.pop("kernels", None)
        trial.pop("reference", None)
        speed = run_part("train", common + ["--flavor", "product", "--precision", path.precision], timeout,
                         isa_cap=path.isa_cap)
        rows[path.name] = {
            "label": path.label, "precision": path.precision, "isa_cap": path.isa_cap, "learns": trial["ok"],
            "probe": trial, "train_images_per_s": (speed.get("train") or {}).get("images_per_s"),
            "inference_images_per_s": (speed.get("inference") or {}).get("images_per_s"),
            **({"error": speed["error"]} if "error" in speed else {}),
        }
    learned = [n for n, r in rows.items() if r["learns"] and r.get("train_images_per_s")]
    fastest = max(learned, key=lambda n: rows[n]["train_images_per_s"]) if learned else None
    return {"paths": rows, "fastest_correct": fastest,
            "how": "each path: the probe trial (learns?) and the product train part (full model) in a child "
                   "with that path's ONEDNN_MAX_CPU_ISA; compare within this run only"}


def derive(result: dict) -> None:
    """Fractions of the ceilings, product/baseline ratios, and the errors list."""
    ceilings = result.get("ceilings", {})
    conv = ceilings.get("conv3x3", {})
    for name, model in result.get("models", {}).items():
        if "error" in model:
            continue
        dtype = "bfloat16" if model.get("precision") == "mixed_bfloat16" else "float32"
        ceiling = conv.get(dtype, {}).get("gflops")
        model["ceiling"] = {"which": f"conv3x3 {dtype}", "gflops": ceiling}
        for phase in ("train", "inference", "inference_compiled_forward"):
            if phase not in model:
                continue
            g = model[phase].get("gflops")
            model[phase]["fraction_of_ceiling"] = round(g / ceiling, 4) if g and ceiling else None
    product, baseline = result.get("models", {}).get("product", {}), result.get("models", {}).get("baseline", {})
    if "train" in product and "train" in baseline:
        vs = {}
        for phase in ("train", "inference"):
            for key in ("images_per_s", "gflops", "fraction_of_ceiling"):
                vs[f"{phase}_{key}"] = ratio(product[phase].get(key), baseline[phase].get(key))
        vs["train_step_s"] = ratio(product["train"]["step_s_median"], baseline["train"]["step_s_median"])
        vs["peak_rss_mib_after_train"] = ratio(product.get("peak_rss_mib_after_train"), baseline.get("peak_rss_mib_after_train"))
        result["vs_baseline"] = vs
    epochs = result.get("epochs", {})
    if "train" in product and "whole_run_images_per_s_excluding_validation" in epochs:
        bare = product["train"]["images_per_s"]
        epochs["vs_bare_step"] = {
            "train_part": ratio(epochs["train_part_images_per_s_median_after_first"], bare),
            "whole_run_excluding_validation": ratio(epochs["whole_run_images_per_s_excluding_validation"], bare),
            "whole_epochs_after_first": ratio(epochs.get("whole_epochs_after_first", {}).get("images_per_s"), bare),
            "bare_step_images_per_s": bare,
            "note": "1.0 = whole epochs as fast as the bare steps of the train part (same run, same model)",
        }

    def collect(prefix, node):
        if isinstance(node, dict):
            if "error" in node and isinstance(node["error"], str):
                result["errors"][prefix] = node["error"]
            for k, v in node.items():
                if k != "error":
                    collect(f"{prefix}.{k}" if prefix else k, v)

    collect("", {k: v for k, v in result.items() if k != "errors"})


def write_result(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "speed-quick" if result["mode"] == "quick" else "speed"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"{stem}-{stamp}.json"
    from fcn_cli.images import atomic_write_bytes  # no TensorFlow: numpy and PIL only

    data = (json.dumps(result, indent=2) + "\n").encode()
    for target in (path, out_dir / f"{stem}-latest.json"):
        atomic_write_bytes(target, data)
    return path


def print_table(result: dict, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def g(node, *keys):
        for k in keys:
            if not isinstance(node, dict):
                return None
            node = node.get(k)
        return node

    def fmt(v, digits=1, suffix=""):
        if v is None:
            return "-"
        return (f"{v:,.{digits}f}" if isinstance(v, float) else str(v)) + suffix

    console = Console(width=max(Console().width, 100))
    cpu = g(result, "machine", "cpu") or {}
    tf_version = g(result, "machine", "versions", "tensorflow-cpu") or g(result, "machine", "versions", "tensorflow")
    title = (f"fcn speed ({result['mode']}): {cpu.get('model')} x{g(result, 'machine', 'usable_cores')} cores, "
             f"native bf16 {'yes' if cpu.get('bf16_native') else 'no'}, TF {tf_version}, Keras {g(result, 'machine', 'versions', 'keras')}")

    product, baseline = g(result, "models", "product") or {}, g(result, "models", "baseline") or {}
    vs = result.get("vs_baseline", {})
    models = Table(title=title + f"\nFCN-8s {g(product, 'image_size') or '?'} batch {g(product, 'batch_size') or '?'}, width {g(product, 'width')}")
    for col, just in (("figure", "left"), (f"fcn ({product.get('precision', '?')})", "right"),
                      (f"plain Keras ({baseline.get('precision', '?')})", "right"), ("fcn / plain", "right"), ("repeats", "right")):
        models.add_column(col, justify=just)
    for label, keys, ratio_key, digits in (
        ("train images/s", ("train", "images_per_s"), "train_images_per_s", 2),
        ("train step s (median)", ("train", "step_s_median"), "train_step_s", 3),
        ("train GFLOP/s (3 x forward)", ("train", "gflops"), "train_gflops", 1),
        ("train fraction of conv ceiling", ("train", "fraction_of_ceiling"), "train_fraction_of_ceiling", 3),
        ("inference images/s", ("inference", "images_per_s"), "inference_images_per_s", 2),
        ("inference GFLOP/s", ("inference", "gflops"), "inference_gflops", 1),
        ("inference fraction of conv ceiling", ("inference", "fraction_of_ceiling"), "inference_fraction_of_ceiling", 3),
        ("inference images/s, compiled forward (lever)", ("inference_compiled_forward", "images_per_s"), None, 2),
        ("peak RSS after training, MiB", ("peak_rss_mib_after_train",), "peak_rss_mib_after_train", 0),
    ):
        reps = g(product, keys[0], "repeats") if len(keys) > 1 else None
        models.add_row(label, fmt(g(product, *keys), digits), fmt(g(baseline, *keys), digits), fmt(vs.get(ratio_key), 2, "x"), fmt(reps))
    console.print(models)

    other = Table(title="machine ceilings, input pipeline, command line")
    for col, just in (("figure", "left"), ("value", "right"), ("unit", "left"), ("repeats", "right")):
        other.add_column(col, justify=just)
    for dt in ("float32", "bfloat16"):
        c = g(result, "ceilings", "matmul", dt) or {}
        other.add_row(f"matmul {dt} ({c.get('shape', '?')})", fmt(c.get("gflops")), "GFLOP/s", fmt(c.get("repeats")))
    for key, c in (g(result, "ceilings", "conv3x3") or {}).items():
        other.add_row(f"conv3x3 {key}", fmt(c.get("gflops")), "GFLOP/s", fmt(c.get("repeats")))
    p = result.get("pipeline", {})
    other.add_row(f"pipeline first pass, decode incl. ({p.get('pairs', '?')} pairs)", fmt(p.get("first_pass_images_per_s")), "img/s", "1")
    other.add_row("pipeline cached pass", fmt(p.get("cached_images_per_s")), "img/s", "1")
    cli = result.get("cli", {})
    b = cli.get("predict_breakdown", {})
    for label, value, n in (
        ("fcn --help", g(cli, "help", "median_s"), g(cli, "help", "repeats")),
        ("fcn predict, one 480x360 image, end to end", g(cli, "predict_end_to_end", "median_s"), g(cli, "predict_end_to_end", "repeats")),
        ("  imports (tensorflow, keras, fcn_cli)", b.get("import_s"), 1),
        ("  checkpoint load", b.get("load_checkpoint_s"), 1),
        ("  first forward (tracing incl.)", b.get("first_forward_s"), 1),
        ("  later forward", b.get("forward_s"), b.get("forward_repeats")),
        ("last.keras save (with optimizer state, for --resume)", g(product, "checkpoint", "last", "save_s"), 1),
        ("best.keras save (weights only, what predict loads)", g(product, "checkpoint", "best", "save_s"), 1),
        ("fcn train: commits + callbacks over the whole run", g(result, "epochs", "commit_and_callback_s"), 1),
    ):
        other.add_row(label, fmt(value, 3), "s", fmt(n))
    for label, keys, unit in (
        ("fcn train epochs: training part", ("epochs", "train_part_images_per_s_median_after_first"), "img/s"),
        ("fcn train: whole run except validation", ("epochs", "whole_run_images_per_s_excluding_validation"), "img/s"),
        ("  ... / bare step rate", ("epochs", "vs_bare_step", "whole_run_excluding_validation"), "x"),
        ("fcn train: whole epochs after the first, except validation", ("epochs", "whole_epochs_after_first", "images_per_s"), "img/s"),
        ("  ... / bare step rate", ("epochs", "vs_bare_step", "whole_epochs_after_first"), "x"),
    ):
        other.add_row(label, fmt(g(result, *keys), 3), unit, fmt(len(g(result, "epochs", "epochs") or []) or None))
    console.print(other)
    levers = g(result, "precision_paths", "paths") or {}
    if levers:
        table = Table(title=f"precision paths (auto chose: {g(result, 'precision', 'label')}; "
                            f"fastest correct here: {g(result, 'precision_paths', 'fastest_correct')})")
        for col in ("path", "learns (probe)", "train img/s", "inference img/s"):
            table.add_column(col)
        for row in levers.values():
            table.add_row(row["label"], "yes" if row["learns"] else "NO", fmt(row.get("train_images_per_s"), 2),
                          fmt(row.get("inference_images_per_s"), 2))
        console.print(table)
    for where, err in result.get("errors", {}).items():
        console.print(f"[yellow]not measured[/] {where}: {err[:300]}")
    console.print(f"wrote {path}  ({result['wall_s']} s)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1/8-width models, 64x64, 2 steps (< 2 min)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for the JSON (default bench/results/)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CamVid (SegNet layout) for the pipeline part")
    p.add_argument("--precision", default="auto", help="product precision: auto (choose_precision) or a Keras policy")
    p.add_argument("--jit", action="store_true", help="lever: model.jit_compile = True (XLA) for the product")
    p.add_argument("--intra", type=int, default=None, help="lever: intra-op threads (default TF's)")
    p.add_argument("--inter", type=int, default=None, help="lever: inter-op threads (default TF's)")
    p.add_argument("--nchw", action="store_true", help="lever: also measure the conv ceilings in NCHW")
    p.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    p.add_argument("--no-precision-levers", action="store_true",
                   help="skip the row that times every numeric path (bf16 with/without AMX, float32)")
    # child-only
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--flavor", choices=("product", "baseline"), default="product", help=argparse.SUPPRESS)
    p.add_argument("--save-checkpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--image", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.part:
        sizes = QUICK if args.quick else FULL
        emit(PARTS[args.part](args, sizes))
        return 0
    result = orchestrate(args)
    path = write_result(result, args.out)
    print_table(result, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
