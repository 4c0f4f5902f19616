# Two entry points for a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; any other spec may pull a multi-GB CUDA build.
# A user with their own torch keeps it: this is installed only when torch is missing from the venv.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup model run test bench clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	DISABLE_CUDA=1 $(PY) -m pip install -q -e ".[dev]"  # hqq: no CUDA extension build on this CPU machine
	touch $@

setup: $(VENV)/.installed

model: setup
	$(VENV)/bin/workbench models prepare-default

# The main job: the terminal UI in a terminal; headless (no TTY), the end-to-end merge demo.
run: model
	@if [ -t 0 ] && [ -t 1 ]; then $(VENV)/bin/workbench tui; else $(VENV)/bin/workbench demo; fi

test: model
	$(PY) -m pytest

# llama-cpp-python from source (about 5 minutes here), x86 flags with AMX off (its AMX path crashes on
# this VM); other CPUs: make bench LLAMA_CPP_CMAKE="-DLLAMA_CURL=OFF"
LLAMA_CPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
	-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DLLAMA_CURL=OFF

# the NEON kernels' tests (tests/bench/test_kernels_arm.py): an aarch64 cross compiler and qemu-user
ARM_TEST_TOOLS ?= g++-aarch64-linux-gnu qemu-user

$(VENV)/.bench-installed: $(VENV)/.installed
	DISABLE_CUDA=1 $(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PY) -m pip install -q --no-cache-dir llama-cpp-python==0.3.36
	command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
		$$([ "$$(id -u)" = 0 ] || echo sudo) apt-get install -y -q $(ARM_TEST_TOOLS) || \
		echo "make bench: could not install $(ARM_TEST_TOOLS); tests/bench/test_kernels_arm.py will skip"
	touch $@

bench: model $(VENV)/.bench-installed
	$(PY) -m pytest -q -s tests/bench -p no:cacheprovider --override-ini addopts= --tb=line -o timeout=1800

clean:
	rm -rf $(VENV) build *.egg-info
