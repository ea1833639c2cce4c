import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def one_thread():
    """The nets here are tiny: one intra-op thread is fastest, and it does not spin against
    other jobs on a shared machine (two spinning threads made a 8x8 conv 300x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
