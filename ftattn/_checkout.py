"""Running from a source checkout: its top-level ``kernels/`` (the Triton kernels, shipped
as ``ftattn.kernels``) shadows the ``kernels`` package that transformers (>= 5, which
depends on it) imports, whenever the checkout's root is on ``sys.path`` (``python -m`` and
``python -c`` put the working directory there; Ray puts the driver's there on its workers).
transformers then fails on import with "cannot import name 'CUDAProperties' from 'kernels'"
(``python -m ftattn model-campaign`` typed at the root did; make exports PYTHONSAFEPATH=1).
Callers: ``python -m ftattn`` and the campaign runner's workers, which have imported ftattn
already (its package path is fixed, so the root can leave the path), and the tests' and
benchmarks' conftest, which load this file by its path before anything imports ftattn, so
that ftattn then comes from its installed copy.
"""
import os
import sys

_MARKS = (("kernels", "__init__.py"), ("ftattn", "__init__.py"), ("setup.py",))


def _is_checkout(root: str) -> bool:
    return all(os.path.isfile(os.path.join(root, *mark)) for mark in _MARKS)


def unshadow_kernels() -> None:
    """Take every ftattn source checkout's root off sys.path (and a ``kernels`` module
    already imported from one out of sys.modules)."""
    sys.path[:] = [p for p in sys.path if not _is_checkout(os.path.abspath(p or os.curdir))]
    module = sys.modules.get("kernels")
    path = getattr(module, "__file__", None)
    if path and _is_checkout(os.path.dirname(os.path.dirname(os.path.abspath(path)))):
        del sys.modules["kernels"]
