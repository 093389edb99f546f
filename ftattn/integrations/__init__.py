"""Integrations of ftattn with other libraries, each imported only when used.

``transformers``: the ``"ftattn"`` attention implementation for Hugging Face
models (``ftattn.integrations.transformers``) and the ``generate-hf`` command.

Importing transformers costs seconds (about 10 s for ``transformers.modeling_utils``
on the 2-core CI machine), so ``import ftattn`` must not do it. `register_on_import`
instead registers the backend the moment transformers' model code is imported
(or at once when it already is), at the cost of one meta-path finder that removes
itself after it fires.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["register_on_import"]

# the module that defines transformers' AttentionInterface; every model file imports it
_TRIGGER = "transformers.modeling_utils"


def _register_now() -> None:
    from .transformers import register

    register()


class _RegisterAfterLoad(importlib.abc.Loader):
    """Wraps the real loader of `_TRIGGER`: runs it, then registers ftattn."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_now()


class _TransformersFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # fire once; also keeps find_spec below from recursing here
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def register_on_import() -> None:
    """Register the ``"ftattn"`` attention implementation with transformers now if
    its model code is loaded, else as soon as it is; do nothing without transformers."""
    if _TRIGGER in sys.modules:
        _register_now()
        return
    if any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
        return
    if importlib.util.find_spec("transformers") is None:  # looks for the package, imports nothing
        return
    sys.meta_path.insert(0, _TransformersFinder())
