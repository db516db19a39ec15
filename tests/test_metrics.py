"""Metrics by name and as callables."""

from __future__ import annotations

import pytest
import torch

from kdistill.metrics import accuracy, resolve_metrics, top_k_accuracy


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 0, 2])
    assert accuracy(logits, targets).item() == pytest.approx(0.5)


def test_accuracy_on_sequence_logits():
    logits = torch.zeros(2, 3, 4)
    logits[..., 1] = 1.0  # predicts class 1 everywhere
    targets = torch.tensor([[1, 1, 0], [1, 2, 3]])
    assert accuracy(logits, targets).item() == pytest.approx(3 / 6)


def test_top5():
    # 7 classes; scores rank class 0 highest ... class 6 lowest
    logits = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(3, 1)
    targets = torch.tensor([4, 5, 6])  # 4 is in the top 5, 5 and 6 are not
    top5 = resolve_metrics(["top5"])["top5"]
    assert top5(logits, targets).item() == pytest.approx(1 / 3)


def test_top5_with_fewer_than_five_classes_is_always_a_hit():
    logits = torch.randn(8, 3)
    targets = torch.randint(0, 3, (8,))
    assert top_k_accuracy(5)(logits, targets).item() == 1.0
    # top-2 of 3 classes still discriminates
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    assert top_k_accuracy(2)(logits, torch.tensor([2])).item() == 0.0
    assert top_k_accuracy(2)(logits, torch.tensor([1])).item() == 1.0


def test_top_k_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        top_k_accuracy(0)


def test_aliases_resolve_to_canonical_names():
    out = resolve_metrics(["acc", "TOP_5_ACCURACY"])
    assert set(out) == {"accuracy", "top5"}
    assert out["accuracy"] is accuracy
    assert resolve_metrics(None) == {}


def test_unknown_name_lists_known_and_suggests():
    with pytest.raises(ValueError, match=r"unknown metric 'acuracy'.*Did you mean 'accuracy'\?") as e:
        resolve_metrics(["acuracy"])
    assert "top5" in str(e.value)


def test_callables_keep_their_name():
    def my_metric(logits, targets):
        return (logits.argmax(-1) != targets).float().mean()

    out = resolve_metrics(["accuracy", my_metric, top_k_accuracy(3)])
    assert list(out) == ["accuracy", "my_metric", "top3"]
    assert out["my_metric"] is my_metric


def test_non_callable_rejected():
    with pytest.raises(TypeError, match="got int"):
        resolve_metrics([3])
