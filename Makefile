# hetrain: `make train` (set up, then the main job) and `make test` (set up, then the whole suite).
# The set-up is a .venv beside this file: torch only if none is importable there (TORCH=... to choose),
# then hetrain with its compiled extension. A second run reuses it and only rebuilds what changed.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# `===` matches 2.13.0 exactly, never a local CPU build such as 2.13.0+cpu.
TORCH_CUDA ?= torch===2.13.0
CUDA_VENV ?= .venv-cuda
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hetrain-installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h)
ARGS ?=

.PHONY: setup train test lint env bench-cpu bench-ops bench-train bench-loader bench-memory bench-overhead bench-embedding profile-step gpu-compile gpu-check cuda-build cuda-emu tsan tolerances clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): $(VENV)/bin/python pyproject.toml setup.py $(EXT_SOURCES)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH)"; $(PY) -m pip install -q "$(TORCH)"; }
	$(PY) -m pip install -q setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

train: setup
	$(PY) train.py recipe=bert_split $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

env: setup
	$(PY) -m hetrain.env

gpu-compile: setup
	env -u TRITON_INTERPRET $(PY) -m hetrain.checks.gpu_compile $(ARGS)

# Without a GPU: the CUDA kernels and their torch bindings built against a CUDA build of torch (installed into
# $(CUDA_VENV), several GB, on first use), out of tree in build/cuda, then loaded and checked for each op's CUDA kernel.
cuda-build:
	@test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	@$(CUDA_VENV)/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null || \
		{ echo "installing $(TORCH_CUDA), a CUDA build, into $(CUDA_VENV)"; \
		  $(CUDA_VENV)/bin/python -m pip install -q "$(TORCH_CUDA)" numpy setuptools ninja; }
	$(CUDA_VENV)/bin/python hetrain/checks/cuda_build.py $(ARGS)

# Without a GPU: the CUDA kernels run on the CPU in the emulator (csrc/emu) against the CPU kernels (also in `make test`).
cuda-emu: setup
	$(PY) -m pytest -q tests/test_cuda_emulator.py tests/test_cuda_emulated.py tests/test_cuda_emulated_bindings.py $(ARGS)

# On a GPU machine with a CUDA torch (needs no package registry): build, verify, benchmark, record. Its python3
# where that has torch (a GPU machine's own), else the .venv's, where the steps that need no GPU run.
gpu-check:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then exec $(PYTHON) -m hetrain.checks.gpu_check $(ARGS); \
	elif test -x $(PY); then exec $(PY) -m hetrain.checks.gpu_check $(ARGS); \
	else echo "gpu-check: neither $(PYTHON) nor $(PY) has torch; run make setup first"; exit 2; fi

bench-cpu: setup
	$(PY) -m benchmarks.bench_cpu $(ARGS)

# Each op's largest error against float64, per backend and dtype: docs/tolerances.md.
tolerances: setup
	$(PY) -m hetrain.checks.tolerances

# On a GPU: every fused op beside eager, torch.compile and Liger-Kernel; regenerates RESULTS.md's GPU section.
bench-ops: setup
	$(PY) -m benchmarks.bench_ops $(ARGS)

# A BERT-base-like training step in fp32, tf32, bf16-mixed, 16-mixed and bf16 + torch.compile, fused and not.
bench-train: setup
	$(PY) -m benchmarks.bench_train $(ARGS)

bench-loader: setup
	$(PY) -m benchmarks.bench_loader $(ARGS)

# MemoryProfiler's cost on the steps it only watches (target < 3% of step time).
bench-memory: setup
	$(PY) -m benchmarks.bench_memory_overhead $(ARGS)

# What each fused op's call costs beyond its kernels: forward+backward at tiny shapes beside torch's eager ops.
bench-overhead: setup
	$(PY) -m benchmarks.bench_overhead $(ARGS)

# The token table's step on a CPU stage: dense AdamW vs torch's SparseAdam vs hetrain's lazy AdamW.
bench-embedding: setup
	$(PY) -m benchmarks.bench_embedding $(ARGS)

# Where a BERT training step spends its time by kind of op, and the largest ops left unfused.
profile-step: setup
	$(PY) -m benchmarks.profile_step $(ARGS)

# The ring buffer's torch-free core under ThreadSanitizer: a C++ stress test of producers and consumers.
tsan:
	mkdir -p build
	g++ -std=c++17 -O1 -g -fsanitize=thread -pthread -Wall -Wextra -Icsrc csrc/ring_buffer.cpp \
		tests/cpp/ring_buffer_test.cpp -o build/ring_buffer_test_tsan
	TSAN_OPTIONS=halt_on_error=1 build/ring_buffer_test_tsan
	g++ -std=c++17 -O1 -g -fsanitize=thread -pthread -Wall -Wextra -Icsrc csrc/host_block_cache.cpp \
		tests/cpp/host_block_cache_test.cpp -o build/host_block_cache_test_tsan
	TSAN_OPTIONS=halt_on_error=1 build/host_block_cache_test_tsan

clean:
	rm -rf build hetrain/*.so *.egg-info $(STAMP)
