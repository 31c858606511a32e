# The two Quick start commands: `make demo` and `make test`. Both build the virtual
# environment on first use and are safe to run again. `make demo` writes to a fresh
# runs/YYYYMMDD-HHMMSS each time; runs/latest points to the newest.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.geotrain-installed
# torch is pinned so that setup takes the CPU build on our machines rather than a
# multi-GB CUDA wheel; any torch >= 2.6 works once installed.
TORCH  ?= torch==2.13.0

.PHONY: demo test bench clean setup gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,hf,tensorboard]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/geotrain run

# About two minutes on one GPU (2 sites x 1 worker, DiLoCo, int4, bf16 then fp32); skipped, exit 0, without CUDA.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

test: $(STAMP)
	$(PY) -m pytest -q --durations=25

clean:
	rm -rf runs .pytest_cache
