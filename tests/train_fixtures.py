"""Shared by the model / train / integration tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one torch thread is fastest on a shared 2-core machine (restored afterwards)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
