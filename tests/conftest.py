"""Fixtures every test folder may use."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (and stalls badly on a busy machine). Modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
