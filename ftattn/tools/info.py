"""``python -m ftattn info``: versions, devices, and which backends run here (and why not)."""
from __future__ import annotations

import os
import platform

import torch


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception as exc:  # report, never fail: this is the diagnostic command
        return f"not available ({type(exc).__name__}: {exc})"
    return getattr(mod, "__version__", "unknown")


def _parallel_backend() -> str:
    for line in torch.__config__.parallel_info().splitlines():
        if "parallel backend" in line:
            return line.strip()
    return "ATen parallel backend unknown"


def add_arguments(parser) -> None:
    pass


def main(args) -> int:
    import ftattn

    print(f"ftattn {ftattn.__version__} ({os.path.dirname(ftattn.__file__)})")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"torch {torch.__version__}, triton {_version('triton')}, numpy {_version('numpy')}")
    print(f"C++ extension: {ftattn._C.__file__}")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, {_parallel_backend()}")
    if ftattn._C.cpu_bf16_gemm():
        print("bf16 products (C++ attention and linear): the CPU's bf16 dot products (oneDNN brgemm, "
              "an AVX512-BF16 GEMV for up to 4 rows of a linear layer; MKL's bf16 GEMM for more than 64 "
              "rows where the CPU has AMX)")
        if ftattn._C.cpu_bf16_round():
            print("bf16 rounding of the attention's probabilities and dS: VCVTNEPS2BF16 (AVX512-BF16)")
    else:
        print("bf16 products (C++ attention and linear): sgemm on fp32 copies / MKL's bf16 GEMM (no "
              "AVX512-BF16 / AMX-BF16 here, torch.backends.mkldnn disabled, or FTATTN_GEMM16=0)")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"cuda:{i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
            devices.append(f"cuda:{i}")
    else:
        print("CUDA: not available (CPU-only torch build or no GPU)")
    import ftattn.mx  # noqa: F401  (registers the MX quantizer's backends)
    from ftattn import backends

    for dev in devices:
        for op in backends.ops():
            print(f"{op} backends on {dev}:")
            for name, reason in backends.status(op, dev).items():
                print(f"  {name:10} {'available' if reason is None else 'unavailable: ' + reason}")
    for module, extra in (("onnxruntime", "onnx"), ("onnxruntime_genai", "onnx"), ("transformers", "eval")):
        print(f"{module}: {_version(module)}" + ("" if _has(module) else f" (pip install 'ftattn[{extra}]')"))
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
