import importlib.util
import os
import sys

# The repository's top-level kernels/ (the Triton kernels, shipped as ftattn.kernels)
# shadows the `kernels` package that transformers (>= 5.x, which depends on it)
# imports, whenever the repository root is on sys.path: `python -m pytest` from the
# root puts it there, and transformers then fails with "cannot import name
# 'CUDAProperties' from 'kernels'". ftattn itself comes from its installed (editable)
# copy, so the root is taken off the path, for this process and (PYTHONSAFEPATH,
# Python >= 3.11) for the `python -m ...` subprocesses the tests start from it.
# The function is ftattn/_checkout.py's (which `python -m ftattn` runs too), loaded from its
# file: importing the package here would take it from this checkout, not the installed copy.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("_ftattn_checkout", os.path.join(_ROOT, "ftattn", "_checkout.py"))
_checkout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checkout)
_checkout.unshadow_kernels()
os.environ["PYTHONSAFEPATH"] = "1"
# OpenMP threads that wait by sleeping, not spinning: the suite's processes share the cores
# (the xdist workers, and the processes tests start: the ISA grids, Ray workers, the CLI),
# and libgomp's spinning waits took the cores from the process beside them (the x86-64-v4
# grid of tests/test_isa_builds.py beside one busy single-thread process: 71 s, passive 34 s,
# measured on the 2-core CI-sized machine). libgomp reads it when it loads: before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

import attention_reference

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch is
# read when a @triton.jit function is defined, so it must be on before any test
# module imports a kernel (ftattn.kernels.attention, ftattn.kernels.mx).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (make test runs `-n auto`) the workers share the cores: each gets its
# share of torch's threads, so that N workers do not run N x cores OpenMP threads that
# spin against each other. The tests that exercise threads start their own.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


@pytest.fixture
def make_qkv():
    return attention_reference.make_qkv


@pytest.fixture
def child_env():
    """The environment for a pytest run that a test starts itself: without this run's
    pytest-xdist variables (pytest-benchmark takes them for an xdist worker and turns itself
    off; conftest would split the threads of a run that has the cores to itself)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
