import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: with several intra-op threads on a shared 2-core machine, each op waits for
    busy threads (30x slower). One thread keeps these tests fast; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
