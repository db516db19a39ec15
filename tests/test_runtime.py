"""Device, seeds and threads."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kdistill.runtime import get_device, machine_description, seed_everything, set_threads


def test_get_device_explicit_env_and_default(monkeypatch):
    assert get_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("KDISTILL_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    monkeypatch.delenv("KDISTILL_DEVICE")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert get_device().type == "cuda"
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert get_device() == torch.device("cpu")


def test_seed_everything_seeds_all_three_generators():
    seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    seed_everything(8)
    assert torch.rand(1).item() != first[2]


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_seed_everything_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        seed_everything(bad)


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(None) == 1
        with pytest.raises(ValueError, match="num_threads must be >= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_machine_description_names_torch_and_threads():
    info = machine_description()
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()
