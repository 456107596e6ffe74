# One-command set-up and the entry points a newcomer needs. `make setup` is idempotent: it reruns
# only when pyproject.toml or requirements.lock changed since the last successful install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-done
PYTEST_ARGS ?=

.PHONY: setup test test-fast gpu-check demo bench clean-venv slurm-up slurm-down test-slurm venv-tf457

setup: $(STAMP)

# torch goes in FIRST: anything asking for torch>=... before it is present would pull the newest
# CUDA build. On a machine with the CPU wheel on disk this installs 2.13.0+cpu; on a GPU cluster
# the same command installs the CUDA build of 2.13.0 from the registry.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements.lock
	DS_BUILD_OPS=0 $(PIP) install --quiet --no-build-isolation deepspeed==0.19.8
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PY) -c "import torch, megatron.core, deepspeed, megatron.energon; print('setup ok: torch', torch.__version__)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# Everything but the tests marked slow (multi-process launches, end-to-end runs).
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The GPU check: every test marked gpu. tests/gpu/ launches the real trainer with torchrun at neo_2b
# widths, seq 16384, bf16, on multimodal data with large images: the loss falls (stages 2 and 1), a
# bf16 step matches fp32 on the same weights and batch, a SIGUSR1 stop + restart is bit-exact, and
# tokens/s, TFLOP/s, MFU, peak memory; at TP1, and at TP2 with 2+ GPUs. Budget: 8 minutes on one
# H200. Prints one table at the end and writes it to runs/gpu-check/ (NEO_GPU_CHECK_OUT) with every
# run's log and metrics.jsonl. Without CUDA every gpu test is reported as skipped, with the reason,
# and make exits 0. `make test` reports them as skipped too (they run only under -m gpu).
# The same code at tiny sizes on CPU (2.5 minutes on 2 cores):  NEO_GPU_CHECK_CPU=1 make gpu-check
# A small /tmp: make gpu-check PYTEST_ARGS=--basetemp=/scratch/gpu-check (checkpoints are GBs).
gpu-check: setup
	$(PY) -m pytest -m gpu -rs $(PYTEST_ARGS)

# The whole pipeline end to end on the embedded synthetic data set (DEMO_DIR, default runs/demo).
demo: setup
	$(PY) -m pretrain.demo

# Throughput side by side with baselines: data path, model step vs transformers Qwen3, GPU (skipped
# without CUDA), checkpoint. Writes runs/bench/results.json + results.md and prints the table.
# BENCH_ARGS="--quick" for a smoke run, BENCH_ARGS="--only model" for one section.
BENCH_ARGS ?=
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

# A single-node SLURM cluster on this machine (run as root; installs Debian's slurm + munge when
# missing). Then: export SLURM_CONF=$${TMPDIR:-/tmp}/neo-slurm/slurm.conf (start.sh prints the line).
slurm-up:
	slurm/local_cluster/start.sh
slurm-down:
	slurm/local_cluster/stop.sh
# The SLURM tests alone (they start and stop the cluster themselves; a running one is reused).
test-slurm: setup
	$(PY) -m pytest tests/slurm $(PYTEST_ARGS)

# A second venv with transformers 4.57.1 (the version the reference NEO code pins), in which
# tests/data_prep/test_tokenizer_compat.py loads the tokenizer files we write. The test makes it on
# first use (needs the package index; skipped with pip's reason without it) and reuses it; this
# target makes it ahead, e.g. before a session without network. Under build/ (git-ignored), or
# NEO_TF457_VENV.
venv-tf457: setup
	$(PY) -c "from tests.data_prep.test_tokenizer_compat import ensure_tf457_venv; print(ensure_tf457_venv())"

clean-venv:
	rm -rf $(VENV) build/venv-tf457
