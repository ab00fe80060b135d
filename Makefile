# Two entry points a newcomer needs: `make demo` and `make test` (see README).
# Both create ./.venv on first use and install what they need into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

DEMO_DIR ?= workdir/demo

.PHONY: test demo lint venv

venv: $(VENV)/.installed

# mmcv 2.1.0 with its compiled CPU operators (needed by the DCNv2 parity tests), built for
# CPython 3.11 / torch 2.13.0; used instead of mmcv-lite when it sits beside the checkout.
MMCV_WHEEL ?= ../shared/wheels/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl

# torch is pinned to the CPU wheel: a plain `torch` requirement would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	if [ -f "$(MMCV_WHEEL)" ] && $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; \
	then $(PY) -m pip uninstall -y -q mmcv-lite; $(PIP) -e ".[test,parity-ops,export]" "$(MMCV_WHEEL)"; \
	else $(PIP) -e ".[test,parity,export]"; fi
	touch $@

test: venv
	$(PY) -m pytest -n 2 --dist loadfile -q -p no:cacheprovider tests

# Trains configs/tiny.py on the generated demo COCO data, then evaluates mask AP.
demo: venv
	$(PY) -m solov2_jax.train --config configs/tiny.py --workdir $(CURDIR)/$(DEMO_DIR) --eval

lint: venv
	$(VENV)/bin/ruff check solov2_jax configs tests experiments
