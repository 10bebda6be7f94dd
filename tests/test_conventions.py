"""The conventions users of Typer, Keras and the peers expect from a command line: --version, completion,
help on every flag, a reference that matches the code, exit codes that mean one thing each, and no error
message that names a flag the command does not have."""

from __future__ import annotations

import ast
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fcn, one_line_error

from fcn_cli import errors, reference

ROOT = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# Flags of other programs that fcn's strings name, each with its owner.
FOREIGN_FLAGS = {
    "--logdir": "tensorboard --logdir models/",
    "--trial": "the precision probe's own subprocess protocol (python -m fcn_cli.precision)",
    "--reference": "the precision probe's own subprocess protocol (python -m fcn_cli.precision)",
    "--write": "python -m fcn_cli.reference --write README.md (make docs)",
}


def _all_flags() -> set[str]:
    flags = {"--help"}
    for _, command in reference.commands():
        for param in command.params:
            flags.update(param.opts)
            flags.update(getattr(param, "secondary_opts", None) or [])
    return flags


def _strings_outside_docstrings(path: Path):
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_every_flag_named_in_a_message_exists():
    """An error that says `--timeout` must be about a command that takes --timeout (fcn data download once
    named two flags it did not have)."""
    known = _all_flags() | set(FOREIGN_FLAGS)
    unknown = [f"{path.relative_to(ROOT)}:{line}: {flag}"
               for path in sorted((ROOT / "fcn_cli").rglob("*.py"))
               for line, text in _strings_outside_docstrings(path)
               for flag in FLAG.findall(text) if flag not in known]
    assert not unknown, "messages name flags no command has:\n" + "\n".join(unknown)


def test_the_scan_would_catch_a_made_up_flag(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('raise FcnError("try --no-such-flag")\n')
    assert [flag for _, text in _strings_outside_docstrings(bad) for flag in FLAG.findall(text)] == ["--no-such-flag"]


def test_every_option_and_argument_has_help():
    missing = [f"{path} {param.name}" for path, command in reference.commands() if not reference.is_group(command)
               for param in reference.visible_params(command) if not (getattr(param, "help", None) or "").strip()]
    assert not missing, missing


def test_every_command_takes_quiet_and_verbose():
    lacking = [path for path, command in reference.commands()
               if path != "fcn" and not reference.is_group(command)
               and not set(reference.COMMON) <= {p.name for p in command.params}]
    assert not lacking, lacking


def _essence(markdown: str) -> list[str]:
    """Headings, flag names and help texts of a reference: what it says, not how this Typer version spells
    metavars (`<int range>`, `INTEGER RANGE`) or defaults."""
    lines = []
    for line in markdown.splitlines():
        if line.startswith("| `"):
            flag, help_text = line[3:].split("` | ", 1)
            names = [w for w in re.split(r"[ ,/]+", flag) if w.startswith("-") or w.isupper()]
            lines.append(" ".join(names) + " :: " + help_text.split(" [")[0].rstrip(" |"))
        elif line.startswith("#"):
            lines.append(line)
    return lines


def test_readme_command_reference_is_the_generated_one():
    """README's reference is generated from the Typer app (make docs); any drift in a command, a flag or a
    help text fails here."""
    readme = (ROOT / "README.md").read_text()
    assert reference.START in readme and reference.END in readme
    block = readme.split(reference.START, 1)[1].split(reference.END, 1)[0]
    assert _essence(block) == _essence(reference.markdown()), "README's command reference is stale: run `make docs`"


def test_the_reference_check_sees_a_changed_help_text():
    text = reference.markdown()
    row = next(line for line in text.splitlines() if line.startswith("| `--epochs"))
    assert _essence(text) != _essence(text.replace(row, row.replace("Epochs", "Rounds")))


def test_reference_lists_every_command_and_flag_once():
    text = reference.markdown()
    for path, command in reference.commands():
        assert text.count(f"### `{path}`\n") == 1, path
        section = text.split(f"### `{path}`\n", 1)[1].split("\n### ", 1)[0]
        for param in reference.visible_params(command):
            if param.name in reference.COMMON or param.param_type_name == "argument":
                continue
            assert section.count(f"`{param.opts[0]}") + section.count(f", {param.opts[0]}") >= 1, (path, param.opts)


def test_version_names_the_libraries_and_the_verdict_without_tensorflow(tmp_path):
    code = ("import sys; from fcn_cli import cli; sys.argv = ['fcn', '--version']\n"
            "try:\n    cli.main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    env = {**os.environ, "FCN_CACHE_DIR": str(tmp_path)}  # an empty cache: nothing probed yet
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    line = proc.stdout.strip()
    assert re.match(r"fcn-cli \S+; tensorflow 2\.\d+\S*, keras 3\.\d+\S*, python 3\.", line), line
    assert "not probed on this machine yet" in line and "fcn doctor" in line, line


def test_shell_completion_completes_commands_and_choices():
    env = {**os.environ, "_FCN_COMPLETE": "complete_bash", "COMP_WORDS": "fcn tr", "COMP_CWORD": "1"}
    done = subprocess.run([sys.executable, "-m", "fcn_cli"], env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["train"], done
    env.update(COMP_WORDS="fcn train --variant ", COMP_CWORD="3")
    done = subprocess.run([sys.executable, "-m", "fcn_cli"], env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["fcn32", "fcn16", "fcn8", "fcn4"], done
    shown = fcn("--show-completion", "bash", check=0)
    assert "_FCN_COMPLETE" in shown.stdout


def test_exit_codes_are_the_documented_ones():
    """README's table and fcn_cli.errors say the same thing."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| `(\d+)` \|", table, re.M)}
    assert documented == {errors.OK, errors.PARTIAL, errors.USAGE, errors.RUNTIME, errors.SIGINT, errors.SIGTERM}
    assert len({errors.OK, errors.PARTIAL, errors.USAGE, errors.RUNTIME}) == 4
    assert errors.FcnError.exit_code == errors.USAGE
    assert errors.RuntimeFailure.exit_code == errors.TrainingFailed.exit_code == errors.RUNTIME


@pytest.mark.parametrize("code, kind", [(errno.ENOSPC, errors.RuntimeFailure), (errno.EDQUOT, errors.RuntimeFailure),
                                        (errno.EACCES, errors.FcnError), (errno.ENOENT, errors.FcnError)])
def test_a_full_disk_is_a_runtime_failure_and_a_wrong_folder_a_usage_error(code, kind):
    error = errors.write_error("out/x.json", OSError(code, os.strerror(code)), "free space")
    assert type(error) is kind and error.exit_code == (3 if kind is errors.RuntimeFailure else 2)
    assert str(error).startswith("out/x.json: cannot write (") and str(error).endswith("; free space")


def test_a_full_disk_during_a_write_exits_3_in_one_line(tmp_path):
    code = ("import errno, sys\nfrom fcn_cli import cli, runs\n"
            "def full(path, data):\n    raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "runs.atomic_write_bytes = full\n"
            f"sys.argv = ['fcn', 'doctor', '--json', {str(tmp_path / 'd.json')!r}]\ncli.main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    one_line_error(proc, "d.json", "No space left on device", code=3)


def test_usage_error_exits_2_and_internal_error_exits_3_with_the_traceback_on_verbose(tmp_path):
    one_line_error(fcn("train", "--variant", "fcn7"), "fcn7", code=2)
    one_line_error(fcn("data", "check", tmp_path, "--quiet", "--verbose"), "--quiet and --verbose", code=2)
    code = ("import sys\nfrom fcn_cli import cli, synthetic\n"
            "def broken(*a, **k):\n    raise ZeroDivisionError('a bug')\n"
            "synthetic.generate_synthetic = broken\n"
            "sys.argv = ['fcn', 'data', 'synthetic', 'x'] + sys.argv[1:]\ncli.main()")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    one_line_error(plain, "internal error ZeroDivisionError: a bug", "--verbose", code=3)
    verbose = subprocess.run([sys.executable, "-c", code, "--verbose"], capture_output=True, text=True, cwd=tmp_path)
    assert verbose.returncode == 3 and "Traceback" in verbose.stderr and "broken" in verbose.stderr


def test_download_takes_the_timeout_and_retries_its_messages_name(tmp_path):
    one_line_error(fcn("data", "download", "camvid", "--dir", tmp_path / "c", "--timeout", "0"), "--timeout", code=2)
    one_line_error(fcn("data", "download", "camvid", "--dir", tmp_path / "c", "--retries", "-1"), "--retries", code=2)


def _run_folder(tmp_path: Path, **config) -> Path:
    folder = tmp_path / "fcn8-run"
    folder.mkdir()
    saved = {"data": "data/camvid", "lr": 0.001, "epochs": 2, "variant": "fcn8", "image_size": [64, 64],
             "scale": [1.0, 1.0], "train_pairs": 16, "val_pairs": 4, **config}
    (folder / "config.json").write_text(json.dumps(saved))
    return folder


def test_resume_takes_a_runs_own_values_again_and_refuses_others(tmp_path):
    """A requeued job re-issues its whole command line with --resume: the run's own values are no change."""
    from fcn_cli.cli import _config_value
    from fcn_cli.train import resume_config

    folder = _run_folder(tmp_path)
    same = {"lr": 0.001, "variant": "fcn8", "image_size": _config_value("image_size", "64x64", "--image-size"),
            "scale": _config_value("scale", "1,1", "--scale"), "epochs": 5}
    assert resume_config(folder, same).epochs == 5
    with pytest.raises(errors.FcnError, match=r"--image-size: a resumed run keeps its own settings \(image_size = \[64, 64\]"):
        resume_config(folder, {"image_size": [96, 96]}, flag=lambda name: "--" + name.replace("_", "-"))


def test_a_resumed_worker_reads_the_run_folder_and_only_the_chief_writes_it(tmp_path):
    from types import SimpleNamespace

    from fcn_cli.runs import RunFolder
    from fcn_cli.train import _record_resume, resume_config

    folder = _run_folder(tmp_path)
    cfg = resume_config(folder, {"epochs": 6})
    data = SimpleNamespace(n_train=16, n_val=4)
    worker = RunFolder.open(folder, is_chief=False)  # its own temporary folder, as in a multi-worker run
    try:
        _record_resume(folder, worker, cfg, data)
    finally:
        worker.close()
    assert json.loads((folder / "config.json").read_text())["epochs"] == 2
    _record_resume(folder, RunFolder.open(folder), cfg, data)
    assert json.loads((folder / "config.json").read_text())["epochs"] == 6


def test_json_target_is_checked_before_the_work(tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"precious")
    one_line_error(fcn("doctor", "--json", photo), "--json", "not a .json report")
    assert photo.read_bytes() == b"precious"
    one_line_error(fcn("doctor", "--json", tmp_path), "is a folder")


def test_off_a_terminal_each_epoch_is_one_unwrapped_line():
    """CI logs and pipes: no bar redraws, and a line never wrapped at the 80 columns rich assumes there."""
    import io

    from rich.console import Console

    from fcn_cli.callbacks import RichProgress

    out = io.StringIO()
    progress = RichProgress(Console(file=out, width=40, force_terminal=False), steps=2, batch_size=4, epochs=3)
    progress.on_epoch_begin(0)
    progress.on_train_batch_end(0, {"loss": 1.5})
    progress.on_train_batch_end(1, {"loss": 1.25})
    progress.on_epoch_end(0, {"loss": 1.25, "val_loss": 1.5, "val_pixel_accuracy": 0.5, "val_miou": 0.25})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 1/3  loss 1.2500") and lines[0].endswith("val mIoU 0.250")
