"""kd_loss without a mask sums the KL of every position with kl_div's fused sum: the same
gradient, bit for bit, as the mean of per-position KLs (so training is unchanged), and the
same value up to float rounding."""

import pytest
import torch

from kdistill.losses import kd_loss


def _per_position_mean(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s loss as the formula reads: the mean over positions of sum_c p_t (log p_t - log p_s)."""
    log_p_s = (s.float() / temperature).log_softmax(-1)
    log_p_t = (t.float() / temperature).log_softmax(-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() * temperature**2


@pytest.mark.parametrize("shape", [(64, 10), (5, 100), (3, 4, 50)])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 10.0])
def test_fused_sum_has_the_per_position_means_gradient_and_value(shape, temperature):
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        s = (torch.randn(*shape, generator=g) * 4).requires_grad_(True)
        t = torch.randn(*shape, generator=g) * 6
        fused = kd_loss(s, t, temperature)
        (g_fused,) = torch.autograd.grad(fused, s)
        reference = _per_position_mean(s, t, temperature)
        (g_reference,) = torch.autograd.grad(reference, s)
        assert torch.equal(g_fused, g_reference)
        torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-9)
