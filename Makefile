# Two set-up commands (README): `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned here for development and CI; the package itself takes ranges.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	# the pins are repeated so that no dependency can upgrade torch
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/mixtune demo --output_dir runs/demo

test: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache
