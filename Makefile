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

# Generates the easy synthetic shapes (make_demo --preset easy), trains configs/demo.py on
# them from scratch, evaluates mask AP on the validation split, then draws the loss curve
# and prediction | ground-truth overlays into $(DEMO_DIR)/report. DEMO_SEED picks the
# data, initialisation and shuffling (the numbers in the README are seeds 0, 1, 2).
DEMO_SEED ?= 0
DEMO_FLAGS = --config configs/demo.py --config.data.coco_dir=$(CURDIR)/$(DEMO_DIR)/coco \
	--config.train.seed=$(DEMO_SEED) --config.data.seed=$(DEMO_SEED)
demo: venv
	$(PY) -m solov2_jax.data.make_demo --preset easy --seed $(DEMO_SEED) --num_train 256 \
		--num_val 32 --out $(CURDIR)/$(DEMO_DIR)/coco
	$(PY) -m solov2_jax.train $(DEMO_FLAGS) --workdir $(CURDIR)/$(DEMO_DIR) --eval
	$(PY) -m solov2_jax.demo_report $(DEMO_FLAGS) --workdir $(CURDIR)/$(DEMO_DIR)

lint: venv
	$(VENV)/bin/ruff check solov2_jax configs tests experiments
