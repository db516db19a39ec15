"""Batched tensor augmentations (no torchvision): each maps a ``(B, C, H, W)`` batch to a
batch of the same shape, on the batch's device, drawing from PyTorch's global generator
(so a seeded run is repeatable and a resumed run continues the same draws).

The trainer applies them once per batch; a Distiller's teacher and student see the same
augmented view. :class:`Mixup` and :class:`CutMix` also mix the labels: they take and return
a whole :class:`~kdistill.outputs.Batch` (``on_batch = True``), recording the other
samples' labels and the weight in ``Batch.mix``.

**Seeded views.** The per-sample augmentations (:class:`RandomCrop`,
:class:`RandomHorizontalFlip`, :class:`GaussianNoise` and a :class:`Compose` of them) also
have ``seeded(x, seeds)``: sample ``i``'s augmentation is drawn from ``seeds[i]`` alone,
through a counter-based hash (SplitMix64), so it does not depend on the batch the sample
is in, its position, the device or the global generator. That is what lets a teacher cache
store V augmented *views* per sample (one seed per sample and view) and the student,
epochs later and in another batch order, see exactly the input the teacher saw.
``to_config()`` gives the ``{"_component_": ..., **kwargs}`` form a cache's manifest
records; :func:`from_config` rebuilds it. Mixup and CutMix mix samples of a batch, so they
have no per-sample view and no ``seeded``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..outputs import Batch, Mix

# --------------------------------------------------------------------------- seeded draws
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_M64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 value with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic on signed ints)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (bits as unsigned, arithmetic mod 2^64).

    A bijection of 64-bit values that mixes every input bit into every output bit; used
    as a counter-based generator: ``splitmix64(seed + j * golden)`` is the ``j``-th draw.
    """
    x = (x ^ _shr(x, 30)) * _signed(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed(_MIX2)
    return x ^ _shr(x, 31)


def derive_seeds(seeds: torch.Tensor, stream: int) -> torch.Tensor:
    """Independent per-sample seeds for sub-stream ``stream`` (e.g. one per transform of
    a :class:`Compose`): ``splitmix64(seeds + (stream + 1) * golden)``."""
    seeds = _as_seeds(seeds)
    return splitmix64(seeds + _signed(((stream + 1) * _GOLDEN) & _M64))


def seeded_uniform(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n)`` float64 uniform draws in the open interval ``(0, 1)``, row ``i`` a
    function of ``seeds[i]`` alone (CPU; move the result where it is needed).

    Args:
        seeds: ``(B,)`` int64 seeds.
        n: draws per sample.
    """
    seeds = _as_seeds(seeds)
    j = torch.arange(1, n + 1, dtype=torch.int64)
    # (B, 1) + (1, n) counters -> (B, n) hashed bits; the top 53 bits make the float
    # the seed is mixed first, so nearby seeds (0, 1, 2, ...) give unrelated streams
    counters = splitmix64(seeds)[:, None] + j[None, :] * _signed(_GOLDEN)
    bits = _shr(splitmix64(counters), 11)
    return ((bits.double() + 0.5) / float(1 << 53)).clamp(max=1.0 - 2.0**-53)  # 2**53 - 0.5 rounds up to 2**53


def seeded_normal(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n)`` float64 standard normal draws (Box-Muller), row ``i`` from ``seeds[i]``."""
    half = (n + 1) // 2
    u = seeded_uniform(seeds, 2 * half)  # (B, 2 * half)
    r = torch.sqrt(-2.0 * torch.log(u[:, :half]))
    theta = 2 * torch.pi * u[:, half:]
    return torch.cat([r * torch.cos(theta), r * torch.sin(theta)], dim=1)[:, :n]


def _as_seeds(seeds) -> torch.Tensor:
    seeds = torch.as_tensor(seeds)
    if seeds.dim() != 1 or seeds.dtype != torch.int64:
        raise ValueError(f"seeds must be a (B,) int64 tensor (one per sample), got {tuple(seeds.shape)} {seeds.dtype}")
    return seeds.cpu()


def _check_seeds(x: torch.Tensor, seeds: torch.Tensor, who: str) -> torch.Tensor:
    seeds = _as_seeds(seeds)
    if seeds.shape[0] != x.shape[0]:
        raise ValueError(f"{who}.seeded got {seeds.shape[0]} seeds for a batch of {x.shape[0]}: give one per sample")
    return seeds


def from_config(spec: dict) -> object:
    """Rebuild an augmentation from its ``to_config()`` form.

    Raises:
        ValueError: the spec is malformed or names something that cannot be imported.
    """
    from ..config import resolve_callable

    if not isinstance(spec, dict) or "_component_" not in spec:
        raise ValueError(f"an augmentation spec is a mapping with '_component_', got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k != "_component_"}
    if "augmentations" in kwargs:
        kwargs["augmentations"] = [from_config(a) for a in kwargs["augmentations"]]
    return resolve_callable(spec["_component_"])(**kwargs)


def _path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


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
        b, p = x.shape[0], self.padding
        dy = torch.randint(0, 2 * p + 1, (b,))
        dx = torch.randint(0, 2 * p + 1, (b,))
        return self._crop(x, dy, dx)

    def seeded(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """The crop of each sample drawn from its own seed (module docstring)."""
        _check_images(x, "RandomCrop")
        u = seeded_uniform(_check_seeds(x, seeds, "RandomCrop"), 2)  # (B, 2)
        offsets = (u * (2 * self.padding + 1)).long()  # uniform on 0 .. 2p
        return self._crop(x, offsets[:, 0], offsets[:, 1])

    def to_config(self) -> dict:
        return {"_component_": _path(self), "padding": self.padding}

    def _crop(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """Pad, then crop sample ``i`` at offset ``(dy[i], dx[i])`` of the padded image."""
        b, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))  # (B, C, H+2p, W+2p)
        dy, dx = dy.to(x.device), dx.to(x.device)
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

    def seeded(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Each sample flipped or not by its own seed (module docstring)."""
        _check_images(x, "RandomHorizontalFlip")
        flip = (seeded_uniform(_check_seeds(x, seeds, "RandomHorizontalFlip"), 1)[:, 0] < self.p).to(x.device)
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def to_config(self) -> dict:
        return {"_component_": _path(self), "p": self.p}

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

    def seeded(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Each sample's noise drawn from its own seed (module docstring)."""
        seeds = _check_seeds(x, seeds, "GaussianNoise")
        noise = seeded_normal(seeds, x[0].numel()).reshape(x.shape)  # (B, D) -> x's shape
        return x + self.std * noise.to(x.device, x.dtype)

    def to_config(self) -> dict:
        return {"_component_": _path(self), "std": self.std}

    def __repr__(self) -> str:
        return f"GaussianNoise(std={self.std})"


def _beta(alpha: float) -> float:
    """One draw of ``lam ~ Beta(alpha, alpha)``: ``torch.distributions.Beta(alpha,
    alpha).sample()`` in float64, from PyTorch's global generator (so ``fit(seed=...)``
    repeats it and a resumed fit, which restores the generator's state, continues it)."""
    a = torch.tensor(alpha, dtype=torch.float64)
    return float(torch.distributions.Beta(a, a, validate_args=False).sample())


def _check_alpha(alpha: float) -> float:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (the Beta(alpha, alpha) parameter; 1.0 is uniform), got {alpha}")
    return float(alpha)


class Mixup:
    """mixup (Zhang et al., ICLR 2018): ``x = lam * x_i + (1 - lam) * x_perm(i)`` with
    ``lam ~ Beta(alpha, alpha)`` per batch; the hard-label loss becomes
    ``lam * CE(y_i) + (1 - lam) * CE(y_perm(i))``. The teacher sees the mixed images too.

    ``lam`` is drawn with ``torch.distributions.Beta(alpha, alpha).sample()`` and the
    permutation with ``torch.randperm``, both from PyTorch's global generator: the same
    seed gives the same draws, and a resumed fit continues them.

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
    actually pasted after clipping at the border. Labels mix as in :class:`Mixup`; ``lam``,
    the box's centre and the permutation are drawn as there, from PyTorch's global
    generator (``torch.distributions.Beta``, ``torch.randint``, ``torch.randperm``).

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

    def seeded(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Each transform applied with its own per-sample seeds (derived from ``seeds`` and
        the transform's position), so the view depends on ``seeds[i]`` alone.

        Raises:
            TypeError: a transform has no ``seeded`` form (mixup and cutmix mix samples of
                a batch: a per-sample view of them does not exist).
        """
        for j, aug in enumerate(self.augmentations):
            if not callable(getattr(aug, "seeded", None)):
                raise TypeError(_no_seeded_message(aug))
            x = aug.seeded(x, derive_seeds(seeds, j))
        return x

    def to_config(self) -> dict:
        missing = [a for a in self.augmentations if not callable(getattr(a, "to_config", None))]
        if missing:
            raise TypeError(f"{missing[0]!r} has no to_config(): a teacher cache cannot record it")
        return {"_component_": _path(self), "augmentations": [a.to_config() for a in self.augmentations]}

    def __repr__(self) -> str:
        return f"Compose({self.augmentations})"


def _no_seeded_message(aug: object) -> str:
    if getattr(aug, "on_batch", False):
        return (f"{aug!r} mixes samples of a batch, so a sample has no view of its own that a teacher cache "
                "could store; distil with the live teacher for mixup/cutmix, or cache views of the "
                "per-sample augmentations only")
    return (f"{aug!r} has no seeded(x, seeds) method: a teacher cache's views must be reproducible from a "
            "per-sample seed. Use RandomCrop, RandomHorizontalFlip, GaussianNoise (or a Compose of them), "
            "or give your augmentation seeded(x, seeds) and to_config()")


def check_seeded(augment: object) -> None:
    """Raise ``TypeError`` (saying why and what to use) unless ``augment`` can make
    seeded views and describe itself for a cache's manifest."""
    if not callable(getattr(augment, "seeded", None)):
        raise TypeError(_no_seeded_message(augment))
    if not callable(getattr(augment, "to_config", None)):
        raise TypeError(f"{augment!r} has no to_config(): a teacher cache records its augmentation to replay it")
    if isinstance(augment, Compose):
        for aug in augment.augmentations:
            check_seeded(aug)
