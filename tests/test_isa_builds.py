"""The CPU kernels' correctness grid under every instruction set the build has clones for,
each with the BLAS code path such a processor gets (a difference between
processors must show up on any machine).

Two things differ between x86 processors: the target_clones clone the loader picks (AVX-512,
AVX2 or baseline x86-64) and the code path MKL's sgemm takes (on AMD, MKL takes its AVX2 path
whatever the processor has). The second alone made make test fail on an AMD Zen 5 (AVX-512
clone, MKL's AVX2 path): MKL_CBWR=AVX2,STRICT reproduces that failure on an Intel AVX-512
machine. Each case below is a processor class: the clone, built as a one-target extension
(FTATTN_EXTRA_CXXFLAGS="-DFTATTN_NO_CLONES -march=...", under build/isa/, rebuilt only when
a source changes; the installed build where its clone is the one this CPU runs), with MKL
held to that class's path (MKL_CBWR, STRICT so that the thread count cannot change the
bits). The attention grid (tests/test_attention.py, C++ backend) and the sampler's tests
run in a subprocess that loads the extensions through FTATTN_EXTENSION and
FTATTN_SAMPLING_EXTENSION.
"""
import glob
import os
import subprocess
import sys

import pytest

import ftattn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = ["x86-64-v4", "x86-64-v3", "x86-64"]  # target_clones' order in csrc/vec.h
# (clone, MKL_CBWR): AMD Zen 4/5, AVX2 machines (Intel Haswell..., AMD Zen 1-3), baseline
CASES = [("x86-64-v4", "AVX2,STRICT"), ("x86-64-v3", "AVX2,STRICT"), ("x86-64", "COMPATIBLE")]
# what the CPU kernels' tests cover: the attention grid and its backward on the C++ backend (the reference
# backend has no clones), the sampler and the packed MX linear
GRID = ["tests/test_attention.py", "tests/test_attention_backward.py", "tests/onnx/test_onnx_sampling.py",
        # the checked linear layer (its row kernels on 16 or 8 lanes, the bound after them)
        "tests/test_linear.py",
        # the packed MX linear's decoders (AVX-512 intrinsics on x86-64-v4, the value table elsewhere) and pack
        "tests/mx/test_mx_packed.py::test_fused_pack_is_the_torch_pack_byte_for_byte",
        "tests/mx/test_mx_packed.py::test_packed_linear_matches_fp64_over_the_unpacked_weight",
        "tests/mx/test_mx_packed.py::test_packed_linear_every_decoder_lane_and_leading_dims",
        "tests/mx/test_mx_packed.py::test_fp8_e4m3_decode_path_every_code_any_activation_scale"]
# (not the backward's random campaign, 22 s of the 36 s grid: every backward site's
# detection and correction still runs under each clone; nor the op registration checks,
# torch.compile and opcheck, which no clone changes)
# (nor two tests of no clone's code, 5 s a grid: the onnx package's imports, in a subprocess, and
# the sizes of linear's kept buffers)
GRID_FILTER = ("not reference and not campaign and not compile and not opcheck"
               " and not loads_no_transformers and not kept_buffers_follow")


def _build(isa: str) -> str:
    out = os.path.join(ROOT, "build", "isa", isa)
    # (FTATTN_POISON_SCRATCH: the attention kernels' tile buffers start as NaNs instead of
    # whatever the allocator gives, so a value read before it is written fails the grid)
    # (-g0: no debug info, a third less build time (62 -> 41 s, x86-64-v3); the code is the
    # same: the .text of the two builds differed only in the order of PLT slots called)
    env = dict(os.environ, FTATTN_EXTRA_CXXFLAGS=f"-DFTATTN_NO_CLONES -DFTATTN_POISON_SCRATCH -march={isa} -g0")
    env.pop("FTATTN_EXTENSION", None)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", os.path.join(out, "lib"),
           "--build-temp", os.path.join(out, "tmp")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"one-target build for {isa} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    (path,) = glob.glob(os.path.join(out, "lib", "ftattn", "_C*.so"))
    (sampling,) = glob.glob(os.path.join(out, "lib", "ftattn", "onnx", "_sampling*.so"))
    return path, sampling


def _run(env, *args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("isa,mkl_path", CASES, ids=lambda x: str(x))
def test_grid_under_isa(isa, mkl_path, child_env):
    native = ftattn._C.cpu_isa()
    if native not in ISAS:
        pytest.skip(f"the build runs {native!r}: no x86-64 clones to test")
    if ISAS.index(isa) < ISAS.index(native):
        pytest.skip(f"this CPU cannot run {isa} (its best clone is {native})")
    if isa == native:
        from ftattn.onnx import sampling

        path, sampling_path = ftattn._C.__file__, sampling._sampling.__file__
    else:
        path, sampling_path = _build(isa)
    env = dict(child_env, FTATTN_EXTENSION=path, FTATTN_SAMPLING_EXTENSION=sampling_path, MKL_CBWR=mkl_path)
    # the extensions must run the instruction set they were built for
    got = _run(env, "-c", "import ftattn; from ftattn.onnx import sampling as s; "
                          "print(ftattn._C.__file__, ftattn._C.cpu_isa(), s._sampling.__file__, s._sampling.cpu_isa())")
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stdout.split() == [path, isa, sampling_path, isa], got.stdout
    grid = _run(env, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", GRID_FILTER, *GRID)
    tail = grid.stdout[-6000:]
    assert grid.returncode == 0, f"the grid fails under {isa}:\n{tail}\n{grid.stderr[-2000:]}"
    assert " passed" in tail and " failed" not in tail, tail
