import pytest
import torch

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine has 2 cores shared between jobs: two threads per process
    oversubscribe it (a [1, 4, 1, 64] x 128-key attention call measured 31 ms with 2
    threads, 0.2 ms with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


from hf_models import tiny_llama


@pytest.fixture(scope="module")
def llama_pair():
    """(eager, ftattn) twins with the same weights."""
    return tiny_llama("eager"), tiny_llama("ftattn")
