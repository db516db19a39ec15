"""Batched tensor augmentations (no torchvision): each maps a ``(B, C, H, W)`` batch to a
batch of the same shape, on the batch's device, drawing from PyTorch's global generator
(so a seeded run is repeatable and a resumed run continues the same draws).

The trainer applies them once per batch; a Distiller's teacher and student see the same
augmented view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


class Compose:
    """Apply augmentations in order."""

    def __init__(self, augmentations):
        self.augmentations = list(augmentations)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for aug in self.augmentations:
            x = aug(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.augmentations})"
