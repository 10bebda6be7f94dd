"""`fcn doctor`: what this machine is, which numeric path trains correctly on it, and why.

The verdict comes from fcn_cli.precision (cached per machine; ``recheck`` probes again). Nothing here
imports TensorFlow: the probe's trials run in their own processes.
"""

from __future__ import annotations

import platform

from fcn_cli import precision

LIBRARIES = ("tensorflow", "tensorflow-cpu", "keras", "numpy", "typer", "rich", "pillow", "h5py", "jax")


def versions() -> dict:
    from fcn_cli import __version__

    found = {"python": platform.python_version(), "fcn-cli": __version__}
    for dist in LIBRARIES:
        v = precision._version(dist)
        if v:
            found[dist] = v
    return found


def collect(recheck: bool = False, console=None) -> dict:
    """Everything the report shows, as JSON-ready data."""
    verdict = precision.verdict(recheck=recheck, console=console)
    trials = verdict.trials
    onednn = next((t.get("onednn") for t in trials if t.get("onednn")), None)
    return {
        "schema": "fcn.doctor/1",
        "machine": {**verdict.fingerprint, "cores": _cores()},
        "versions": {**versions(), **({"onednn": onednn} if onednn else {})},
        "precision": {**verdict.to_json(), "cached": verdict.cached, "cache_file": str(precision.cache_path(verdict.fingerprint))},
        "gpu_present": precision.gpu_present(),
    }


def _cores() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def render(data: dict, console) -> None:
    """The human report of :func:`collect`'s data: machine, libraries, the verdict and the probe's trials."""
    from rich.table import Table

    machine, result = data["machine"], data["precision"]
    table = Table(title="fcn doctor", show_header=False)
    table.add_row("CPU", f"{machine['cpu']} ({machine['cores']} cores), {machine['machine']}, kernel {machine['kernel']}")
    table.add_row("CPU flags", " ".join(machine["flags"]) or "—")
    table.add_row("libraries", ", ".join(f"{k} {v}" for k, v in data["versions"].items()))
    table.add_row("precision", f"[bold]{result['label']}[/] → `--precision auto` trains in {result['precision']}"
                  + (f" with {precision.ISA_ENV}={result['isa_cap']}" if result["isa_cap"] else ""))
    table.add_row("why", result["reason"] or "—")
    table.add_row("verdict", f"{'cached' if result['cached'] else 'probed now'} ({result['created']}), {result['cache_file']}")
    if "tensorflow" in data["versions"] and "tensorflow-cpu" in data["versions"]:
        table.add_row("[yellow]warning[/]", "tensorflow and tensorflow-cpu are both installed and share one folder: "
                      "`pip uninstall -y tensorflow-cpu tensorflow && pip install tensorflow`")
    if data["gpu_present"]:
        table.add_row("GPU", "an NVIDIA GPU is present: training follows the GPU rules (bf16 on Ampere+), not this CPU verdict")
    console.print(table)
    if result["trials"]:
        trials = Table(title="precision probe (tiny FCN-8s, easy two-class set, vs float32)")
        for col in ("path", "result", "grad cosine", "pixel acc", "agree f32", "loss first→final", "AMX kernels", "seconds"):
            trials.add_column(col)
        for t in result["trials"]:
            if t.get("error"):
                trials.add_row(precision.PATHS[t["path"]].label, "[red]error[/]", t["error"], "", "", "", "", str(t.get("seconds", "")))
                continue
            trained = "accuracy" in t  # a path whose gradients were wrong is not trained
            trials.add_row(
                precision.PATHS[t["path"]].label, "[green]pass[/]" if t["ok"] else "[red]FAIL[/]",
                f"{t['gradient_cosine']:.3f}", f"{t['accuracy']:.3f}" if trained else "-",
                f"{t['agreement']:.3f}" if trained else "-",
                f"{t['first_loss']:.3g} → {t['final_loss']:.3g}" if trained else "-",
                "yes" if t.get("amx_kernels") else "no", f"{t.get('seconds', 0):.1f}",
            )
        console.print(trials)
        console.print(f"pass: every variable's gradient within cosine {precision.PASS_GRADIENT_COSINE} of float32's, "
                      f"two finite steps of the full-width FCN-8s, then after {precision.PROBE_EPOCHS} epochs pixel accuracy ≥ {precision.PASS_ACCURACY} and agreement "
                      f"with float32 ≥ {precision.PASS_AGREEMENT}; re-run with `fcn doctor --recheck`", highlight=False)
