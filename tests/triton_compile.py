"""Compiling the Triton kernels for an sm_90 GPU on a machine without one.

The interpreter runs Python semantics; only the compiler checks the typing of constexpr
branches, scf.if results, layouts and shared memory. The scripts run in subprocesses
without TRITON_INTERPRET, up to PTX: the last stage, ptxas (PTX to cubin), is replaced by
an empty binary. It was ~45 % of each compile (the backward's dq and dkdv kernels at D59:
14 s and 17 s of 31 s and 34 s) and checks nothing these tests assert: PTX (local memory)
and the kernel's metadata (shared memory) come before it. ptxas runs on the GPU machine
(`make test` there), where the kernels launch.
"""

import os
import subprocess
import sys

import pytest

# prepended to every script: the CUDA backend's stages end at PTX
PTX_ONLY = r"""
from triton.backends.nvidia.compiler import CUDABackend as _Backend
_add_stages = _Backend.add_stages
def _ptx_only(self, stages, options, *args, **kwargs):
    _add_stages(self, stages, options, *args, **kwargs)
    stages["cubin"] = lambda src, metadata: b""
_Backend.add_stages = _ptx_only
"""


def compile_without_gpu(*runs: tuple[str, ...]) -> list[str]:
    """Each run (script, argv...) in its own process, side by side (each compile is
    single-threaded); their stdouts, after asserting that each exited with 0."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", PTX_ONLY + script, *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for script, *args in runs]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outs.append(out)
    return outs
