import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)  # tiny tensors: one thread avoids spinning against other work


from model_state import assert_unchanged, snapshot  # noqa: E402


@pytest.fixture
def unchanged():
    return snapshot, assert_unchanged
