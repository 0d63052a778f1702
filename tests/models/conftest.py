import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    # These tensors are tiny: one thread is as fast as many, and it stays fast when the
    # CPU is shared (OpenMP workers spin-wait for busy cores; 3x slower under load here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
