import os

import pytest
import torch

# Triton decides at kernel definition whether a kernel runs in its interpreter: choose before attnswap is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest and avoids oversubscription on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
