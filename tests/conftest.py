import pytest

import attention_reference


@pytest.fixture
def make_qkv():
    return attention_reference.make_qkv
