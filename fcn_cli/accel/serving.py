"""A saved model's config arranged for inference, with identical outputs.

Measured (bench/NOTES.md, "Speed notes", item 5; 2-core AMD EPYC, avx512_bf16, bf16, batch 8):
weights held in the compute dtype took product inference from 19.34 to 19.97 images/s, and conv6/conv7
kernels held as (out, in) to 20.72 (the conv6 product 117.9 -> 91.7 ms with ``transpose_b``); outputs
identical (max abs difference 0.0 on the CamVid checkpoint).
"""

from __future__ import annotations

from fcn_cli.accel import enabled


def serving_config(config, bf16: bool = True, fast: bool | None = None):
    """``config`` of a saved model, for inference: no optimizer, and where the levers are on (``fast``,
    default :func:`fcn_cli.accel.enabled`) weights in the compute dtype and MatmulConv2D kernels as (out, in).

    A mixed layer casts its float32 weights to bf16 on every call (134M per FCN-8s forward); holding them
    in bf16 gives the same bf16 values without the casts, in half the memory. ``bf16=False`` (a machine
    whose precision probe failed every bf16 path) serves bf16 models in float32, levers on or off: that
    is correctness, not speed. Weights load from the same file, unchanged.
    """
    if fast is None:
        fast = enabled()
    if isinstance(config, list):
        return [serving_config(v, bf16, fast) for v in config]
    if not isinstance(config, dict):
        return config
    # No optimizer for serving: a compiled checkpoint (last.keras) loads as the bare network.
    config = {k: serving_config(v, bf16, fast) for k, v in config.items() if k != "compile_config"}
    inner = config.get("config")
    if config.get("class_name") == "DTypePolicy" and isinstance(inner, dict):
        name = str(inner.get("name", ""))
        if not bf16 and name.endswith("bfloat16"):
            name = "float32"
        elif fast and name.startswith("mixed_"):
            name = name.removeprefix("mixed_")
        config["config"] = {**inner, "name": name}
    if fast and config.get("registered_name") == "fcn>MatmulConv2D" and isinstance(inner, dict):
        config["config"] = {**config["config"], "kernel_layout": "oi"}
    return config
