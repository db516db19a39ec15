"""Batched tensor augmentations, checked against explicit per-image loops."""

from __future__ import annotations

import pytest
import torch

from kdistill.data.augment import Compose, GaussianNoise, RandomCrop, RandomHorizontalFlip


def images(b=6, c=2, h=5, w=7, dtype=torch.float32) -> torch.Tensor:
    """Distinct, strictly positive pixels, so a crop window (zero padding included) is
    identified by its content."""
    return (torch.arange(b * c * h * w, dtype=torch.float64) + 1).reshape(b, c, h, w).to(dtype)


def padded_by_loops(img: torch.Tensor, p: int) -> torch.Tensor:
    """Zero-pad one (C, H, W) image by p on every side, pixel by pixel."""
    c, h, w = img.shape
    out = torch.zeros(c, h + 2 * p, w + 2 * p, dtype=img.dtype)
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                out[ch, y + p, x + p] = img[ch, y, x]
    return out


def crop_offsets(img: torch.Tensor, crop: torch.Tensor, p: int) -> list[tuple[int, int]]:
    """Every (dy, dx) such that ``crop`` is the window at (dy, dx) of the padded image."""
    c, h, w = img.shape
    padded = padded_by_loops(img, p)
    found = []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            window = torch.empty(c, h, w, dtype=img.dtype)
            for ch in range(c):
                for y in range(h):
                    for x in range(w):
                        window[ch, y, x] = padded[ch, dy + y, dx + x]
            if torch.equal(window, crop):
                found.append((dy, dx))
    return found


AUGMENTATIONS = [RandomCrop(2), RandomHorizontalFlip(0.5), GaussianNoise(0.1),
                 Compose([RandomCrop(1), RandomHorizontalFlip(0.5), GaussianNoise(0.1)])]


# --------------------------------------------------------------------------- all


@pytest.mark.parametrize("aug", AUGMENTATIONS, ids=repr)
def test_shape_dtype_device_preserved(aug):
    for shape in [(1, 1, 4, 4), (5, 3, 8, 6), (2, 1, 28, 28)]:
        x = torch.randn(shape)
        y = aug(x)
        assert y.shape == x.shape
        assert y.dtype == x.dtype
        assert y.device == x.device
    x64 = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    assert aug(x64).dtype == torch.float64


@pytest.mark.parametrize("aug", AUGMENTATIONS[:3], ids=repr)
def test_input_not_modified(aug):
    x = images()
    before = x.clone()
    aug(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("aug", AUGMENTATIONS, ids=repr)
def test_seeded_repeatability(aug):
    x = images(b=32)
    torch.manual_seed(123)
    first = aug(x)
    torch.manual_seed(123)
    second = aug(x)
    assert torch.equal(first, second)
    # without reseeding the next draw differs
    third = aug(x)
    assert not torch.equal(first, third)


# --------------------------------------------------------------------------- RandomCrop


def test_random_crop_outputs_are_windows_of_the_zero_padded_image():
    p = 2
    x = images(b=6, c=2, h=4, w=5)
    torch.manual_seed(0)
    y = RandomCrop(p)(x)
    for i in range(x.shape[0]):
        offsets = crop_offsets(x[i], y[i], p)
        # exactly one window matches: all channels cropped at the same place
        assert len(offsets) == 1, f"image {i} is no single window of the padded image"


def test_random_crop_draws_every_offset_and_pads_with_zeros():
    p = 1
    x = images(b=64, c=1, h=3, w=3)
    torch.manual_seed(1)
    y = RandomCrop(p)(x)
    seen = set()
    for i in range(x.shape[0]):
        [offset] = crop_offsets(x[i], y[i], p)
        seen.add(offset)
        dy, dx = offset
        # the uncovered border is zeros, the rest is the shifted image
        shifted = torch.zeros(3, 3)
        for yy in range(3):
            for xx in range(3):
                sy, sx = yy + dy - p, xx + dx - p
                if 0 <= sy < 3 and 0 <= sx < 3:
                    shifted[yy, xx] = x[i, 0, sy, sx]
        assert torch.equal(y[i, 0], shifted)
    # 64 draws of 9 equally likely offsets: every one of them shows up
    assert seen == {(dy, dx) for dy in range(3) for dx in range(3)}


def test_random_crop_offsets_differ_between_images():
    x = images(b=16, c=1, h=4, w=4)
    torch.manual_seed(2)
    y = RandomCrop(2)(x)
    offsets = {crop_offsets(x[i], y[i], 2)[0] for i in range(16)}
    assert len(offsets) > 1


@pytest.mark.parametrize("padding", [0, -1, 1.5, "4", None])
def test_random_crop_rejects_bad_padding(padding):
    with pytest.raises(ValueError, match=r"padding must be a positive integer, got"):
        RandomCrop(padding)


# --------------------------------------------------------------------------- flip


def test_flip_p1_mirrors_every_image():
    x = images(b=5)
    y = RandomHorizontalFlip(1.0)(x)
    for i in range(5):
        for col in range(x.shape[-1]):
            assert torch.equal(y[i, :, :, col], x[i, :, :, x.shape[-1] - 1 - col])


def test_flip_p0_is_identity():
    x = images(b=50)
    assert torch.equal(RandomHorizontalFlip(0.0)(x), x)


def test_flip_half_at_p_half():
    n = 4000
    x = images(b=n, c=1, h=2, w=3)
    torch.manual_seed(3)
    y = RandomHorizontalFlip(0.5)(x)
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(n)])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(n)])
    assert bool((flipped ^ kept).all())  # each image is either mirrored or untouched
    # binomial(4000, 0.5): std 0.8%, this is a 6-sigma band
    assert 0.45 < flipped.float().mean().item() < 0.55


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_flip_rejects_bad_p(p):
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        RandomHorizontalFlip(p)


@pytest.mark.parametrize("aug, name", [(RandomCrop(2), "RandomCrop"), (RandomHorizontalFlip(0.5), "RandomHorizontalFlip")])
@pytest.mark.parametrize("shape", [(3, 8, 8), (4, 64), (2, 1, 1, 4, 4)])
def test_non_4d_input_is_rejected(aug, name, shape):
    with pytest.raises(ValueError) as info:
        aug(torch.zeros(shape))
    msg = str(info.value)
    assert name in msg
    assert "(B, C, H, W)" in msg
    assert str(tuple(shape)) in msg


# --------------------------------------------------------------------------- noise


def test_noise_std_zero_is_identity():
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(GaussianNoise(0.0)(x), x)


def test_noise_std_matches_empirically():
    torch.manual_seed(4)
    x = torch.full((100, 1, 32, 32), 3.0)
    y = GaussianNoise(0.3)(x)
    noise = y - x
    # 102400 samples: the standard error of the mean is ~0.001, of the std ~0.0007
    assert abs(noise.mean().item()) < 0.01
    assert noise.std().item() == pytest.approx(0.3, rel=0.02)
    # independent per element, not one draw per image
    assert noise[0].std().item() > 0.2


def test_noise_works_on_any_shape():
    torch.manual_seed(5)
    x = torch.zeros(2000, 10)
    y = GaussianNoise(0.5)(x)
    assert y.shape == x.shape
    assert y.std().item() == pytest.approx(0.5, rel=0.05)


def test_noise_rejects_negative_std():
    with pytest.raises(ValueError, match=r"std must be >= 0, got -0.1"):
        GaussianNoise(-0.1)


# --------------------------------------------------------------------------- compose


def test_compose_applies_in_order():
    calls = []

    def double(x):
        calls.append("double")
        return x * 2

    def add_one(x):
        calls.append("add_one")
        return x + 1

    x = torch.ones(2, 1, 2, 2)
    assert torch.equal(Compose([double, add_one])(x), torch.full_like(x, 3.0))
    assert torch.equal(Compose([add_one, double])(x), torch.full_like(x, 4.0))
    assert calls == ["double", "add_one", "add_one", "double"]


def test_compose_of_flip_then_crop_matches_step_by_step():
    x = images(b=8)
    flip, crop = RandomHorizontalFlip(0.5), RandomCrop(1)
    torch.manual_seed(6)
    composed = Compose([flip, crop])(x)
    torch.manual_seed(6)
    manual = crop(flip(x))
    assert torch.equal(composed, manual)


def test_compose_empty_is_identity_and_accepts_a_generator():
    x = images()
    assert torch.equal(Compose([])(x), x)
    aug = Compose(a for a in [RandomHorizontalFlip(1.0), RandomHorizontalFlip(1.0)])
    assert torch.equal(aug(x), x)  # two mirrors undo each other
    assert torch.equal(aug(x), x)  # the generator was materialised: still two steps
