# Two commands on a fresh machine: `make train` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; installed before the package so nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: setup train test test-slow bench bench-reference torchrec lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,export,cluster]"
	touch $@

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/preprocess.py
	$(PY) bench/train_step.py
	$(PY) bench/admm_step.py

# Ours against facebookresearch/dlrm: REF=<a checkout of it, outside this repo>.
bench-reference: setup
	@test -n "$(REF)" || { echo "set REF=<path to a facebookresearch/dlrm checkout>"; exit 2; }
	$(PY) -m pip install -q -e ".[reference]"
	$(PY) bench/vs_reference.py --reference "$(REF)" $(ARGS)

# Optional: torchrec with fbgemm's CPU kernels (bench/vs_reference.py's torchrec line), pinned to versions
# that import with torch 2.13; --no-deps because torchrec declares the CUDA fbgemm-gpu and pins torchmetrics.
torchrec: setup
	$(PY) -m pip install -q fbgemm-gpu-cpu==1.8.0
	$(PY) -m pip install -q --no-deps torchrec==1.9.2 tensordict==0.15.3 pyre-extensions==0.0.32 pyvers \
		typing-inspect mypy-extensions iopath portalocker

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache outputs multirun
