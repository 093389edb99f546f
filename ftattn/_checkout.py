"""Running from a source checkout: its top-level ``kernels/`` (the Triton kernels, shipped
as ``ftattn.kernels``) shadows the ``kernels`` package that transformers (>= 5, which
depends on it) imports, whenever the checkout's root is on ``sys.path`` (``python -m`` and
``python -c`` put the working directory there). transformers then fails on import with
"cannot import name 'CUDAProperties' from 'kernels'": ``make demo``'s model campaign did,
from the root. ftattn itself is imported already (its package path is fixed), so the root
can leave the path.
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
