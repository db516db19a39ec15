"""Shared test set-up: one PyTorch thread (tiny models run faster, and stay repeatable
when the machine is shared)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
