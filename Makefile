# Two commands on a fresh machine: `make train` (the main job) and `make test`.
# `make train` runs the flagship end to end, conf/experiment/quickstart.yaml: the dense DLRM, UMEC joint at half its
# FLOPs, the extracted model finetuned and exported, a result table at the end (~2 min on 2 cores after the venv's
# install). ARGS adds Hydra overrides; `make train EXPERIMENT= ARGS="..."` runs the root config (`train.py` alone:
# the dense model on the full data).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; installed before the package so nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# trainer=torchrec: torchrec without its declared deps (the CUDA fbgemm-gpu, torchmetrics==1.0.3); the `torchrec`
# extra of pyproject.toml brings fbgemm-gpu-cpu and the small deps, pinned.
TORCHREC_SPEC ?= torchrec==1.9.2
ARGS ?=
EXPERIMENT ?= quickstart

.PHONY: setup train report test test-slow bench bench-reference torchrec lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,export,cluster,torchrec]"
	$(PY) -m pip install -q --no-deps "$(TORCHREC_SPEC)"
	touch $@

train: setup
	$(PY) train.py $(if $(EXPERIMENT),experiment=$(EXPERIMENT)) $(ARGS)

# report.md and the figures over the runs under DIR (a sweep's multirun/<date>/<time>, or any folder of run dirs).
report: setup
	@test -n "$(DIR)" || { echo "set DIR=<a folder of runs, e.g. multirun/<date>/<time>>"; exit 2; }
	$(VENV)/bin/umec-report "$(DIR)"

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

# torchrec with fbgemm's CPU kernels (trainer=torchrec, bench/vs_reference.py's torchrec line), pinned to versions
# that import with torch 2.13: part of `make setup` now; this target reinstalls it into an existing venv.
torchrec: setup
	$(PY) -m pip install -q -e ".[torchrec]"
	$(PY) -m pip install -q --no-deps "$(TORCHREC_SPEC)"

lint: setup
	$(VENV)/bin/ruff check .

# Every relative link, #anchor and backticked repo path in README.md and docs/*.md must lead somewhere (standard
# library only: no venv needed).
.PHONY: docs
docs:
	$(PYTHON) bench/check_docs.py

clean:
	rm -rf $(VENV) .cache outputs multirun
