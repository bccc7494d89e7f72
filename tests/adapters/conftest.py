"""The adapters' tests run tiny models: on one thread, which is faster than two for them and, on
a shared 2-core machine, avoids oversubscription (small convolutions ran 35-60x slower)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
