"""Device rules in one place: from the devices present, the precision, the strategy, and fcn's own kernels.

A pure function of what it is given (:func:`plan`), so the whole table is unit-tested with made-up
device lists; :func:`local_devices` reads the real ones from TensorFlow.

| devices                     | precision (auto)                          | strategy (auto)       | fcn kernels |
|-----------------------------|-------------------------------------------|-----------------------|-------------|
| CPU only                    | the CPU probe's verdict (fcn_cli.precision) | one device          | on          |
| GPUs, all Ampere or newer   | mixed_bfloat16                            | mirrored if > 1 GPU   | off         |
| GPUs, all Volta/Turing+     | mixed_float16 (Keras scales the loss)     | mirrored if > 1 GPU   | off         |
| older GPUs                  | float32                                   | mirrored if > 1 GPU   | off         |
| TF_CONFIG with > 1 worker   | as above                                  | multi-worker          | as above    |

"fcn kernels" are the speed levers of ``fcn_cli.accel`` (the fc6/fc7 product, the small-map weight
gradient, the fused Adam update, the serving form, the one-pass checkpoint files): measured to pay on
2-core CPUs (each module's docstring), never measured on a GPU, so a GPU trains plain Keras layers.
``FCN_ACCEL=0`` turns them off anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fcn_cli import accel as levers

@dataclass(frozen=True)
class Device:
    kind: str  # "CPU" or "GPU"
    name: str = ""
    compute_capability: tuple[int, int] | None = None  # GPUs


@dataclass(frozen=True)
class Plan:
    precision: str  # Keras dtype policy
    strategy: str  # "one", "mirrored" or "multi-worker"
    accel: bool  # fcn's CPU kernels
    why: str  # one line: what decided it


def gpu_precision(gpus: list[Device]) -> str:
    caps = [g.compute_capability or (0, 0) for g in gpus]
    if all(c >= (8, 0) for c in caps):
        return "mixed_bfloat16"  # Ampere and newer compute bf16 natively
    if all(c >= (7, 0) for c in caps):
        return "mixed_float16"  # tensor cores for fp16; Keras wraps the optimizer in loss scaling
    return "float32"


def plan(devices: list[Device], precision: str = "auto", strategy: str = "auto", workers: int = 0,
         cpu_precision: Callable[[], str] = lambda: "float32") -> Plan:
    """What to train with on ``devices``. ``cpu_precision`` is asked only when a CPU decides (it may probe)."""
    gpus = [d for d in devices if d.kind == "GPU"]
    if precision != "auto":
        chosen, why = precision, "as asked"
    elif gpus:
        chosen = gpu_precision(gpus)
        caps = sorted({f"{c[0]}.{c[1]}" for c in (g.compute_capability or (0, 0) for g in gpus)})
        why = f"{len(gpus)} GPU(s), compute capability {', '.join(caps)}"
    else:
        chosen, why = cpu_precision(), "CPU: the precision probe's verdict"
    if strategy != "auto":
        how = strategy
    elif workers > 1:
        how = "multi-worker"
    elif len(gpus) > 1:
        how = "mirrored"
    else:
        how = "one"
    accel = not gpus and levers.allowed()
    kernels = "fcn's CPU kernels" if accel else ("plain Keras layers (GPU)" if gpus else f"plain Keras layers ({levers.ACCEL_ENV}=0)")
    return Plan(chosen, how, accel, f"{chosen} ({why}); {how} device strategy; {kernels}")


def local_devices() -> list[Device]:
    """This process's devices, as TensorFlow sees them (imports TensorFlow)."""
    import tensorflow as tf

    found = [Device("CPU", "CPU")]
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        found.append(Device("GPU", details.get("device_name", gpu.name), details.get("compute_capability")))
    return found
