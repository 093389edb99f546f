"""Loading a compiled extension of the package, or (testing only) another build of it named
by an environment variable: tests/test_isa_builds.py runs the kernels under one-ISA builds
(FTATTN_EXTENSION for ``ftattn._C``, FTATTN_SAMPLING_EXTENSION for
``ftattn.onnx._sampling``)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys


def load(name: str, env_var: str):
    """The module ``name`` (e.g. "ftattn._C"), from the file in ``env_var`` when it is set."""
    path = os.environ.get(env_var)
    if not path:
        return importlib.import_module(name)
    if not os.path.isfile(path):
        raise ImportError(f"{env_var}={path!r} is not a file; unset it to load the installed {name}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
