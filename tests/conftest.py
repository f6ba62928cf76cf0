import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread, as spawned workers use: the same reduction order in every process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
