"""runtime.module_device: the one answer to "where does this model live?" (bench, export)."""

from __future__ import annotations

import torch
from torch import nn

from kdistill.bench import latency
from kdistill.runtime import module_device


def test_a_module_is_where_its_first_parameter_is():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")


def test_a_module_without_parameters_is_where_its_first_buffer_is():
    norm = nn.BatchNorm1d(3, affine=False, device="meta")
    assert list(norm.parameters()) == []
    assert module_device(norm) == torch.device("meta")


def test_a_module_without_parameters_or_buffers_runs_on_the_cpu():
    assert module_device(nn.ReLU()) == torch.device("cpu")


def test_the_benchmark_feeds_inputs_on_the_device_of_a_buffer_only_model():
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1, device="meta"))

        def forward(self, x):
            seen.append(x.device)
            return x

    latency(Probe(), (3,), warmup=0, repeats=1)
    assert seen == [torch.device("meta")]
