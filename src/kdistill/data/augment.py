"""Batched tensor augmentations (no torchvision): each maps a ``(B, C, H, W)`` batch to a
batch of the same shape, on the batch's device, drawing from PyTorch's global generator
(so a seeded run is repeatable and a resumed run continues the same draws).

The trainer applies them once per batch; a Distiller's teacher and student see the same
augmented view. :class:`Mixup` and :class:`CutMix` also mix the labels: they take and return
a whole :class:`~kdistill.outputs.Batch` (``on_batch = True``), recording the other
samples' labels and the weight in ``Batch.mix``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..outputs import Batch, Mix


def _check_images(x: torch.Tensor, who: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{who} expects image batches (B, C, H, W), got shape {tuple(x.shape)}")


class RandomCrop:
    """Pad each image by ``padding`` pixels (zeros) and crop a random window of the
    original size: the CIFAR recipe (``padding=4`` on 32x32).

    Args:
        padding: pixels added on every side, ``>= 1``.
    """

    def __init__(self, padding: int = 4):
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 1:
            raise ValueError(f"padding must be a positive integer, got {padding!r}")
        self.padding = padding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, "RandomCrop")
        b, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * p + 1, (b,)).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (b,)).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (B, H)
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (B, W)
        # gather rows then columns: (B, C, H+2p, W+2p) -> (B, C, H, W+2p) -> (B, C, H, W)
        out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * p))
        return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, "RandomHorizontalFlip")
        flip = (torch.rand(x.shape[0]) < self.p).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class GaussianNoise:
    """Add ``N(0, std^2)`` noise to every input (any shape)."""

    def __init__(self, std: float = 0.05):
        if std < 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.std = std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn(x.shape).to(x.device, x.dtype)

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std})"


def _beta(alpha: float) -> float:
    # Beta(alpha, alpha) from two Gammas, drawn from PyTorch's global generator
    a = torch._standard_gamma(torch.tensor([alpha, alpha], dtype=torch.float64))
    return float(a[0] / a.sum())


def _check_alpha(alpha: float) -> float:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (the Beta(alpha, alpha) parameter; 1.0 is uniform), got {alpha}")
    return float(alpha)


class Mixup:
    """mixup (Zhang et al., ICLR 2018): ``x = lam * x_i + (1 - lam) * x_perm(i)`` with
    ``lam ~ Beta(alpha, alpha)`` per batch; the hard-label loss becomes
    ``lam * CE(y_i) + (1 - lam) * CE(y_perm(i))``. The teacher sees the mixed images too.

    Args:
        alpha: the Beta distribution's parameter (1.0: lam uniform in [0, 1]).
    """

    on_batch = True

    def __init__(self, alpha: float = 1.0):
        self.alpha = _check_alpha(alpha)

    def __call__(self, batch: Batch) -> Batch:
        lam = _beta(self.alpha)
        perm = torch.randperm(len(batch)).to(batch.inputs.device)
        mixed = lam * batch.inputs + (1 - lam) * batch.inputs[perm]
        targets = None if batch.targets is None else batch.targets[perm]
        return Batch(mixed, batch.targets, batch.index, None if targets is None else Mix(targets, lam))

    def __repr__(self) -> str:
        return f"Mixup(alpha={self.alpha})"


class CutMix:
    """CutMix (Yun et al., ICCV 2019): paste a random box of another sample; the box's area
    is ``1 - lam`` with ``lam ~ Beta(alpha, alpha)``, and ``lam`` is corrected to the area
    actually pasted after clipping at the border. Labels mix as in :class:`Mixup`.

    Args:
        alpha: the Beta distribution's parameter.
    """

    on_batch = True

    def __init__(self, alpha: float = 1.0):
        self.alpha = _check_alpha(alpha)

    def __call__(self, batch: Batch) -> Batch:
        x = batch.inputs
        _check_images(x, "CutMix")
        h, w = x.shape[-2:]
        lam = _beta(self.alpha)
        # 1. a box of area (1 - lam) * H * W centred at a uniform point, clipped to the image
        cut = (1 - lam) ** 0.5
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(0, h, (1,))), int(torch.randint(0, w, (1,)))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        # 2. paste the permuted batch's box; lam = the share of each image left as it was
        perm = torch.randperm(len(batch)).to(x.device)
        mixed = x.clone()
        mixed[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        targets = None if batch.targets is None else batch.targets[perm]
        return Batch(mixed, batch.targets, batch.index, None if targets is None else Mix(targets, lam))

    def __repr__(self) -> str:
        return f"CutMix(alpha={self.alpha})"


class Compose:
    """Apply augmentations in order (tensor ones to the inputs, batch ones such as
    :class:`Mixup` to the whole batch)."""

    on_batch = True

    def __init__(self, augmentations):
        self.augmentations = list(augmentations)

    def __call__(self, x):
        if not isinstance(x, Batch):  # used on a plain tensor: only tensor augmentations apply
            for aug in self.augmentations:
                if getattr(aug, "on_batch", False):
                    raise TypeError(f"{aug!r} mixes labels: apply the Compose to a Batch, not to a tensor")
                x = aug(x)
            return x
        batch = x
        for aug in self.augmentations:
            if getattr(aug, "on_batch", False):
                batch = aug(batch)
            else:
                batch = Batch(aug(batch.inputs), batch.targets, batch.index, batch.mix)
        return batch

    def __repr__(self) -> str:
        return f"Compose({self.augmentations})"
