"""tests/moe runs tiny models on a shared 2-core box: one torch thread per test.

With torch's default (one thread per core) every small matmul pays for thread
hand-offs, which under load from other processes turns milliseconds into seconds
(a 12 ms forward took 0.8 s). Restored afterwards so other test folders keep theirs.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
