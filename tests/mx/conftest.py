import numpy as np
import pytest

from mx_helpers import GOLDEN


@pytest.fixture(scope="session")
def golden():
    d = np.load(GOLDEN)
    return {k: d[k] for k in d.files}
