import os

import pytest
import torch

import attention_reference

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch is
# read when a @triton.jit function is defined, so it must be on before any test
# module imports a kernel (ftattn.kernels.attention, ftattn.kernels.mx).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def make_qkv():
    return attention_reference.make_qkv
