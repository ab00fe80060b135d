# Two entry points a newcomer needs: `make demo` and `make test` (see README).
# Both create ./.venv on first use and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

DEMO_DIR ?= workdir/demo

.PHONY: test demo lint venv

venv: $(VENV)/.installed

# torch is pinned to the CPU wheel: a plain `torch` requirement would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[test,parity]"
	touch $@

test: venv
	$(PY) -m pytest -n 2 --dist loadfile -q -p no:cacheprovider tests

# Trains configs/tiny.py on the generated demo COCO data, then evaluates mask AP.
demo: venv
	$(PY) -m solov2_jax.train --config configs/tiny.py --workdir $(CURDIR)/$(DEMO_DIR) --eval

lint: venv
	$(VENV)/bin/ruff check solov2_jax configs tests experiments
