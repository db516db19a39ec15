"""Shared test set-up: one PyTorch thread (tiny models run faster, and stay repeatable
when the machine is shared), and a private stage store (nothing written to ~/.cache)."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _private_stage_store(tmp_path_factory):
    previous = os.environ.get("KDISTILL_CACHE")
    os.environ["KDISTILL_CACHE"] = str(tmp_path_factory.mktemp("kdistill-cache"))
    yield
    if previous is None:
        os.environ.pop("KDISTILL_CACHE", None)
    else:
        os.environ["KDISTILL_CACHE"] = previous
