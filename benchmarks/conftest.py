"""Shared pieces of the benchmarks: the environment recorded with every figure,
CPU peak memory, and the load average of the machine that took the numbers.

Every pytest-benchmark JSON written from this folder carries, in ``machine_info``,
the torch / triton versions, the CPU and GPU names, the thread count and the load
average at the start and the end of the run (a shared 2-core CI machine can halve a
CPU figure; the load says whether it did).
"""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
from functools import lru_cache
from types import SimpleNamespace

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

import pytest
import torch


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # recorded, never fatal: a benchmark without triton still runs
        return f"not available ({type(exc).__name__})"
    return getattr(mod, "__version__", "unknown")


@lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        return []


def environment(device: str) -> dict:
    """What every figure is recorded with (house style rule 8)."""
    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
    }
    if device == "cpu":
        import ftattn

        info["cpu_bf16_gemm"] = ftattn._C.cpu_bf16_gemm()  # bf16 products on oneDNN's brgemm (csrc/gemm16.h)
    if device.startswith("cuda"):
        info["cuda"] = torch.version.cuda
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
    return info


def peak_bytes(fn, device: str) -> tuple:
    """(peak bytes of one call of ``fn``, how they were counted)."""
    from ftattn.tools.memory import peak_memory

    if device.startswith("cuda"):
        return peak_memory(fn, device), "torch.cuda.max_memory_allocated above the allocation before the call"
    return peak_memory(fn, device), "torch CPU allocator, profiler allocation records replayed (C++ kernel scratch not counted)"


_LOAD_AT_START = load_average()  # this conftest is imported when the run starts


def pytest_addoption(parser):
    group = parser.getgroup("ftattn benchmarks")
    group.addoption("--bench-device", default="all", choices=["all", "cpu", "cuda"],
                    help="which grid of benchmarks/test_bench_attention.py runs: the CPU grid, the CUDA "
                         "grid (skipped without a CUDA device), or both (default)")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ftattn_environment"] = environment("cpu")
    if torch.cuda.is_available():
        machine_info["ftattn_gpu"] = environment("cuda:0")
    # pytest-benchmark builds machine_info when it saves, at the end of the run
    machine_info["load_average_start"] = _LOAD_AT_START
    machine_info["load_average_end"] = load_average()


@pytest.fixture(scope="session")
def bench_device(request) -> str:
    return request.config.getoption("--bench-device")


@pytest.fixture(scope="session")
def measure():
    """The helpers above, for the benchmark modules (a fixture, not an import: two
    folders' ``conftest`` modules share one name in sys.modules)."""
    return SimpleNamespace(environment=environment, load_average=load_average, peak_bytes=peak_bytes)
