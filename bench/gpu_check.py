"""FCN-8s on a GPU, built by fcn's own builder under Keras 3 + JAX: speed against the chip's ceiling.

The lent GPU machine has JAX (CUDA) but neither TensorFlow nor Keras, so this runs the model code
(backend-neutral Keras) under ``KERAS_BACKEND=jax``, with the layers and precision that
``fcn_cli.devices.plan`` picks for the devices present (on a GPU: plain Keras layers, bf16 on Ampere
and newer). One run, under 8 minutes on an H200, does everything:

1. the bf16 matrix-product ceiling of the device (n x n x n, random data, median of repeats);
2. training steps of the full FCN-8s (VGG-16, 4096-wide head, 12 classes), Adam, sparse
   cross-entropy, batch 8 and 16, at 224x224 and at a CamVid frame padded to multiples of 32 (384x480):
   images/s, GFLOP/s (3 x forward FLOPs) and the fraction of the measured ceiling;
3. inference (forward only) at the same sizes;
4. that training learns: 40 steps on fcn's easy generated two-class set, the loss must fall.

    # on the GPU machine: carry the Keras wheels it lacks (keras, namex, optree), then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
      PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py --out $OUT/gpu_check.json
    # here, on the CPU, at a tiny width (what CI runs):
    .venv/bin/python bench/gpu_check.py --device cpu --quick

Wheels for the GPU machine (Python 3.12 there): `python3 -m pip download --no-deps --only-binary=:all:
--python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 -d .whl keras==3.15.1 namex optree`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FULL = dict(width=1.0, head_width=4096, train=[(8, 224, 224), (16, 224, 224), (8, 384, 480), (16, 384, 480)],
            warmup=3, steps=10, matmul_n=8192, matmul_repeats=20, learn_steps=40, learn_size=64, learn_lr=3e-4)
QUICK = dict(width=1 / 16, head_width=32, train=[(2, 64, 96)],
             warmup=1, steps=2, matmul_n=512, matmul_repeats=3, learn_steps=30, learn_size=64, learn_lr=3e-3)


def median(values):
    return statistics.median(values) if values else None


def matmul_ceiling(jax, n: int, repeats: int) -> dict:
    """GFLOP/s of a bf16 n x n x n product on random data: the yardstick for the model's GFLOP/s."""
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype=jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype=jnp.bfloat16)
    product = jax.jit(lambda x, y: x @ y)
    product(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        product(a, b).block_until_ready()
        times.append(time.perf_counter() - started)
    seconds = median(times)
    return {"n": n, "dtype": "bfloat16", "seconds_median": seconds, "gflops": round(2 * n ** 3 / seconds / 1e9, 1),
            "repeats": repeats}


def build(plan, sizes: dict, lr: float = 1e-4):
    import keras

    from fcn_cli.model import build_fcn

    keras.mixed_precision.set_global_policy(plan.precision)
    keras.utils.set_random_seed(0)
    model = build_fcn("fcn8", 12, None, sizes["width"], sizes["head_width"], accel=plan.accel)
    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
    return model


def timed_steps(fn, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn()  # returns host values: the step has finished on the device
        times.append(time.perf_counter() - started)
    return times


def speed(model, batch: int, height: int, width: int, sizes: dict, ceiling: float | None) -> dict:
    import numpy as np

    from fcn_cli.flops import count_flops

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, height, width, 3)).astype("float32")
    labels = rng.integers(0, 12, (batch, height, width)).astype("int32")
    flops = count_flops(model, height, width)
    train = timed_steps(lambda: model.train_on_batch(images, labels), sizes["warmup"], sizes["steps"])
    infer = timed_steps(lambda: model.predict_on_batch(images), sizes["warmup"], sizes["steps"])
    out = {"batch": batch, "image_hw": [height, width], "flops_forward_per_image": flops}
    for name, times, factor in (("train", train, 3), ("inference", infer, 1)):
        step = median(times)
        gflops = factor * flops * batch / step / 1e9
        out[name] = {"step_s_median": round(step, 5), "images_per_s": round(batch / step, 2), "gflops": round(gflops, 1),
                     "fraction_of_bf16_matmul_ceiling": round(gflops / ceiling, 4) if ceiling else None,
                     "step_s": [round(t, 5) for t in times]}
    return out


def learns(plan, sizes: dict) -> dict:
    """The loss falls on fcn's easy generated set (sky above, road below at a random horizon)."""
    import numpy as np

    from fcn_cli.precision import easy_set

    model = build(plan, sizes, sizes["learn_lr"])
    images, labels = easy_set(16, sizes["learn_size"])
    losses = []
    for step in range(sizes["learn_steps"]):
        i = (step % 2) * 8
        losses.append(float(np.asarray(model.train_on_batch(images[i:i + 8], labels[i:i + 8]))))
    first, last = float(np.mean(losses[:3])), float(np.mean(losses[-3:]))
    return {"steps": len(losses), "loss_first3": round(first, 4), "loss_last3": round(last, 4),
            "ok": bool(np.isfinite(losses).all() and last < 0.5 * first), "losses": [round(v, 4) for v in losses]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--quick", action="store_true", help="tiny width and small images (CI, CPU)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = "jax"
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import keras

    from fcn_cli.devices import Device, plan

    sizes = QUICK if args.quick else FULL
    found = jax.devices()
    gpus = [d for d in found if d.platform == "gpu"]
    if args.device == "gpu" and not gpus:
        sys.exit("no GPU visible to JAX: run with --device cpu, or on the GPU machine")
    listed = [Device("CPU", "CPU")] + [
        Device("GPU", getattr(d, "device_kind", "GPU"),
               tuple(int(v) for v in str(getattr(d, "compute_capability", "0.0")).split(".")[:2])) for d in gpus]
    chosen = plan(listed, cpu_precision=lambda: "mixed_bfloat16")  # the CPU run here is a smoke test of the code
    started = time.perf_counter()
    result = {
        "schema": "fcn-gpu-check/1", "device": args.device, "mode": "quick" if args.quick else "full",
        "devices": [str(d) for d in (gpus or found)], "plan": {"precision": chosen.precision, "accel": chosen.accel,
                                                             "why": chosen.why},
        "versions": {"python": platform.python_version(), "jax": jax.__version__, "keras": keras.__version__},
        "model": {"variant": "fcn8", "width": sizes["width"], "head_width": sizes["head_width"], "classes": 12},
        "how": "train_on_batch / predict_on_batch on fixed random batches (XLA-compiled), median after warm-up; "
               "GFLOP/s = FLOPs (fcn_cli.flops.count_flops; training 3x forward) x images/s",
    }
    print(f"devices: {result['devices']}; plan: {chosen.why}", flush=True)
    result["ceiling"] = matmul_ceiling(jax, sizes["matmul_n"], sizes["matmul_repeats"])
    ceiling = result["ceiling"]["gflops"]
    print(f"bf16 matmul ceiling: {ceiling:,.0f} GFLOP/s", flush=True)
    model = build(chosen, sizes)
    result["params"] = int(model.count_params())
    result["runs"] = []
    for batch, height, width in sizes["train"]:
        row = speed(model, batch, height, width, sizes, ceiling)
        result["runs"].append(row)
        print(f"batch {batch} {height}x{width}: train {row['train']['images_per_s']:,.1f} img/s "
              f"({row['train']['fraction_of_bf16_matmul_ceiling']:.3f} of ceiling), inference "
              f"{row['inference']['images_per_s']:,.1f} img/s", flush=True)
    result["learns"] = learns(chosen, sizes)
    print(f"learns: loss {result['learns']['loss_first3']} -> {result['learns']['loss_last3']} "
          f"({'ok' if result['learns']['ok'] else 'NOT falling'})", flush=True)
    stats = (gpus[0].memory_stats() or {}) if gpus else {}
    result["peak_memory_mib"] = round((stats.get("peak_bytes_in_use") or 0) / 2 ** 20, 1) if gpus else \
        round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["peak_memory_what"] = "device peak_bytes_in_use" if gpus else "process peak RSS"
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0 if result["learns"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
