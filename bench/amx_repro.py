"""The AMX bf16 fault in the fewest lines that show it, and whether fcn's fix and fallback hold.

    python bench/amx_repro.py            # ~1 minute on 2 cores; one line of verdict at the end
    python bench/amx_repro.py --json out.json
    python bench/amx_repro.py --full     # plus one step of the full FCN-8s each way (about 2 more minutes)

Each case runs in its own Python, because oneDNN reads its ISA cap (ONEDNN_MAX_CPU_ISA) only when
TensorFlow starts:

1. One op. ``tf.nn.conv2d`` in bfloat16, kernel 16, stride 8, 12 channels in and out: the gradient of
   FCN-8s' final 8x upsampling (a transposed convolution) is exactly this convolution. Compared with
   float32 on the same inputs; 16 channels as the control.
2. Training. fcn's easy two-class set and a tiny FCN-8s for a few seconds each: float32; bf16 with
   the class layers (score, upsampling, skip sums) in bf16 (fcn before the fix) with AMX and without;
   bf16 as fcn builds it now (class layers in float32) with AMX.
3. The full FCN-8s (``--full``, about 2 minutes more): one bf16 training step at 224x224, batch 8, with
   the class layers in bf16 and with AMX: before the fix the process died of heap corruption.

On a CPU without AMX every case should agree with float32; then the script says "no fault here".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NO_AMX = "AVX512_CORE_BF16"
CASES = (  # (name, what, ISA cap)
    ("op-amx", "conv k16 s8, bf16, AMX", None),
    ("op-no-amx", "conv k16 s8, bf16, AMX off", NO_AMX),
    ("train-float32", "tiny FCN-8s, float32", None),
    ("train-bf16-amx-before", "tiny FCN-8s, bf16, AMX, class layers in bf16 (fcn before the fix)", None),
    ("train-bf16-no-amx-before", "tiny FCN-8s, bf16, AMX off, class layers in bf16", NO_AMX),
    ("train-bf16-amx-fcn", "tiny FCN-8s, bf16, AMX, as fcn builds it now", None),
)
FULL_CASES = (  # --full
    ("full-bf16-amx-before", "full FCN-8s, 2 steps, bf16, AMX, class layers in bf16", None),
    ("full-bf16-amx-fcn", "full FCN-8s, 2 steps, bf16, AMX, as fcn builds it now", None),
)


def op_case() -> dict:
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    errors = {}
    for channels in (12, 16):
        x = rng.normal(size=(4, 64, 64, channels)).astype(np.float32)
        w = rng.normal(size=(16, 16, channels, channels)).astype(np.float32)
        ref = tf.nn.conv2d(x, w, 8, "SAME").numpy()
        out = tf.nn.conv2d(tf.cast(x, tf.bfloat16), tf.cast(w, tf.bfloat16), 8, "SAME")
        errors[f"c{channels}"] = float(np.abs(out.numpy().astype(np.float32) - ref).max() / np.abs(ref).max())
    return {"relative_error": errors, "ok": all(v < 0.02 for v in errors.values())}


def fcn_model(policy: str, before_fix: bool, width: float = 1 / 16, head_width: int = 16):
    """fcn's FCN-8s; ``before_fix``: with the class layers under the global policy, as fcn built it before."""
    import keras

    from fcn_cli.model import build_fcn

    keras.mixed_precision.set_global_policy(policy)
    keras.utils.set_random_seed(1)
    model = build_fcn("fcn8", 12, None, width=width, head_width=head_width, dropout=0.0)
    if before_fix:  # the model as fcn built it before: every layer but the logits under the global policy
        config = model.get_config()
        for layer in config["layers"]:
            if layer["config"]["name"].startswith(("score", "upscore", "fuse")):
                layer["config"]["dtype"] = keras.mixed_precision.global_policy().name
        keras.utils.set_random_seed(1)  # the same initial weights as the model above
        model = keras.Model.from_config(config)
    return model


def full_case(before_fix: bool) -> dict:
    import numpy as np

    from fcn_cli import accel
    from fcn_cli.fit import compile_model

    model = fcn_model("mixed_bfloat16", before_fix, width=1.0, head_width=4096)
    compile_model(model, accel.adam(1e-4), 12, 11)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 224, 224, 3)).astype("float32")
    labels = rng.integers(0, 12, (8, 224, 224)).astype("int32")
    losses = [float(np.asarray(model.train_on_batch(images, labels))[0]) for _ in range(2)]
    return {"losses": losses, "ok": bool(np.isfinite(losses).all())}


def train_case(policy: str, upsample_bf16: bool) -> dict:
    import numpy as np

    from fcn_cli import precision
    from fcn_cli import accel
    from fcn_cli.fit import compile_model

    images, labels = precision.easy_set()
    model = fcn_model(policy, upsample_bf16)
    compile_model(model, accel.adam(3e-3), 12, 11)
    started = time.perf_counter()
    history = model.fit(images, labels, batch_size=8, epochs=precision.PROBE_EPOCHS, verbose=0, shuffle=False)
    pred = np.asarray(model.predict(images, verbose=0)).argmax(-1)
    losses = [float(v) for v in history.history["loss"]]
    accuracy = float((pred == labels).mean())
    return {"accuracy": round(accuracy, 4), "first_loss": losses[0], "final_loss": losses[-1],
            "seconds": round(time.perf_counter() - started, 2),
            "ok": bool(np.isfinite(losses).all() and accuracy >= precision.PASS_ACCURACY)}


def child(name: str) -> dict:
    if name.startswith("op"):
        return op_case()
    if name.startswith("full"):
        return full_case(before_fix=name.endswith("-before"))
    policy = "float32" if name == "train-float32" else "mixed_bfloat16"
    return train_case(policy, upsample_bf16=name.endswith("-before"))


def run_case(name: str, cap: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", ONEDNN_VERBOSE="1", CUDA_VISIBLE_DEVICES="-1")
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", name], env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    result = next((json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")), None)
    if result is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"ok": False, "error": f"exit {proc.returncode}: {tail[:200]}"}
    # oneDNN's verbose log names the kernels that ran: proof of which ISA path each case took.
    result["amx_kernels"] = any(",exec," in line and "amx" in line for line in lines)
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    return result


def verdict(results: dict) -> str:
    amx_ran = results["op-amx"].get("amx_kernels") or results["train-bf16-amx-before"].get("amx_kernels")
    if not amx_ran:
        return "no AMX kernels ran on this machine: the fault cannot show here (every case " + \
            ("agrees with float32)" if all(r["ok"] for r in results.values()) else "should agree; see the table)")
    fault = not results["op-amx"]["ok"] or not results["train-bf16-amx-before"]["ok"]
    if not fault:
        return "AMX kernels ran and agreed with float32: no fault on this machine"
    op = results["op-amx"].get("relative_error", {})
    before = results["train-bf16-amx-before"]
    fixed, capped = results["train-bf16-amx-fcn"], results["train-bf16-no-amx-before"]
    return (f"AMX FAULT REPRODUCED: bf16 conv k16 s8 with 12 channels is off by {op.get('c12', float('nan')):.2f} "
            f"(relative; 16 channels {op.get('c16', float('nan')):.3f}, AMX off "
            f"{results['op-no-amx'].get('relative_error', {}).get('c12', float('nan')):.3f}); tiny FCN-8s in bf16 "
            f"reaches {before.get('accuracy', 0):.3f} with AMX (loss {before.get('first_loss', 0):.3g} -> "
            f"{before.get('final_loss', 0):.3g}) vs {results['train-float32'].get('accuracy', 0):.3f} in float32 and "
            f"{capped.get('accuracy', 0):.3f} with AMX off; fcn's float32 class layers: {fixed.get('accuracy', 0):.3f} "
            f"with AMX ({'fixed' if fixed['ok'] else 'NOT fixed'})" + _full_verdict(results))


def _full_verdict(results: dict) -> str:
    if "full-bf16-amx-before" not in results:
        return ""
    before, now = results["full-bf16-amx-before"], results["full-bf16-amx-fcn"]
    return (f"; full FCN-8s step with AMX: before the fix {before.get('error') or 'ran'}, now "
            f"{'ran' if now['ok'] else now.get('error', 'failed')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--full", action="store_true", help="also one step of the full FCN-8s (about 2 minutes)")
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return 0
    from fcn_cli.precision import cpu_flags, cpu_model

    flags = cpu_flags()
    print(f"CPU: {cpu_model()}; " + " ".join(sorted(f for f in flags if f.startswith("amx") or f == "avx512_bf16")))
    results = {}
    for name, what, cap in CASES + (FULL_CASES if args.full else ()):
        results[name] = run_case(name, cap)
        r = results[name]
        figures = r.get("error") or (
            ", ".join(f"{k} rel. error {v:.3f}" for k, v in r["relative_error"].items()) if "relative_error" in r
            else f"losses {', '.join(f'{v:.3g}' for v in r['losses'])}" if "losses" in r
            else f"pixel accuracy {r['accuracy']:.3f}, loss {r['first_loss']:.3g} -> {r['final_loss']:.3g}")
        print(f"{'ok  ' if r['ok'] else 'BAD '} {what:<66} AMX kernels: {'yes' if r['amx_kernels'] else 'no '}  "
              f"{figures}  ({r['wall_seconds']} s)", flush=True)
    line = verdict(results)
    print(line)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "flags": sorted(flags), "cases": results,
                                         "verdict": line}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
