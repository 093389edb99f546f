"""Build of ftattn: the Python package, the Triton kernels (as ``ftattn.kernels``)
the C++ extension ``ftattn._C`` (op schemas + CPU kernels) and the ONNX generator's
sampler ``ftattn.onnx._sampling`` (no torch).

Install with ``pip install --no-build-isolation -e .`` so the extension builds
against the torch already installed (see README).
"""
import glob
import os
import sys

from setuptools import Extension, find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    headers = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))  # a change rebuilds
    # -Wno-psabi: the 64-byte vectors of the CPU kernel live only inside always-inlined
    # helpers, so the calling-convention note GCC gives for them does not apply
    cxx = ["-O3", "-fopenmp", "-Wno-psabi", "-DPy_LIMITED_API=0x03090000"]
    link = ["-fopenmp"]
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; ATen then runs its own pool.
        cxx.remove("-fopenmp")
        link.remove("-fopenmp")
    # testing only, e.g. "-DFTATTN_NO_CLONES -march=x86-64-v3" to run the AVX2 path on an
    # AVX-512 machine (the kernels otherwise pick their clone by the CPU at load time)
    cxx += os.environ.get("FTATTN_EXTRA_CXXFLAGS", "").split()
    if os.environ.get("FTATTN_DEBUG_BUILD"):  # debugging only: asserts on, no optimisation
        cxx = [c for c in cxx if c != "-O3"] + ["-O0", "-g", "-UNDEBUG"]
    return [
        CppExtension(
            name="ftattn._C",
            sources=sources,
            depends=headers,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            py_limited_api=True,
        ),
        # the ONNX generator's sampler: its own small extension, no torch (csrc/onnx/)
        Extension(
            name="ftattn.onnx._sampling",
            sources=sorted(glob.glob(os.path.join("csrc", "onnx", "*.cpp"))),
            depends=headers,
            include_dirs=[os.path.join(ROOT, "csrc")],
            # C++20 as torch builds _C: in C++17 mode libstdc++'s heap (top-k) ran 3x slower
            extra_compile_args=[c for c in cxx if c not in ("-fopenmp",)] + ["-std=c++20"],
            language="c++",
            py_limited_api=True,
        ),
    ]


EVAL = ["scikit-learn", "matplotlib", "tqdm", "transformers>=4.48", "pillow"]
ONNX = ["onnx", "onnxruntime>=1.20", "onnxscript", "tokenizers>=0.22", "transformers>=4.56", "onnxruntime-genai>=0.18; platform_machine == 'x86_64' or platform_machine == 'AMD64'"]
# the campaigns on Ray (python -m ftattn campaign --workers N / --ray-address ADDR); pinned: a
# newer Ray can change its wheels' torch requirements
RAY = ["ray==2.60.0"]
DEV = ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis"] + EVAL + ONNX + RAY

setup(
    name="ftattn",
    version="0.1.0",
    description="Fault-tolerant fused attention and MX quantization kernels for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ftattn", "ftattn.*"]) + ["ftattn.kernels"],
    # kernels/ lives at the top of the repository (design card) but ships as
    # ftattn.kernels: a top-level `kernels` module would shadow Hugging Face's.
    package_dir={"ftattn.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    install_requires=[
        "torch>=2.6",
        "numpy",
        "tqdm",
        "ml_dtypes",  # fp6 / fp4 storage codes of ftattn.mx.pack
        "triton>=3.2; sys_platform == 'linux' and platform_machine == 'x86_64'",
    ],
    extras_require={"eval": EVAL, "onnx": ONNX, "ray": RAY, "dev": DEV},
    entry_points={"console_scripts": ["ftattn=ftattn.__main__:main"]},
    include_package_data=True,
)
