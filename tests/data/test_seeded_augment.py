"""Seeded augmentations (the views of a teacher cache): the SplitMix64 draws checked
against a pure-Python reference and for their statistics, and each seeded transform
checked to depend on a sample's seed alone, against independent crops and flips."""

from __future__ import annotations

import json

import pytest
import torch

from kdistill.data.augment import (
    Compose,
    CutMix,
    GaussianNoise,
    Mixup,
    RandomCrop,
    RandomHorizontalFlip,
    check_seeded,
    derive_seeds,
    from_config,
    seeded_normal,
    seeded_uniform,
    splitmix64,
)

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


# --------------------------------------------------------------------------- pure-Python reference
def ref_splitmix64(z: int) -> int:
    """SplitMix64's finaliser on Python ints (unsigned, mod 2^64), as in Vigna's C code."""
    z &= M64
    z = ((z ^ (z >> 30)) * MIX1) & M64
    z = ((z ^ (z >> 27)) * MIX2) & M64
    return z ^ (z >> 31)


def ref_uniform(seed: int, n: int) -> list[float]:
    """``n`` uniform draws of one seed: the documented counter scheme, in Python ints."""
    base = ref_splitmix64(seed)
    return [((ref_splitmix64(base + j * GOLDEN) >> 11) + 0.5) / 2.0**53 for j in range(1, n + 1)]


def _unxorshift(y: int, s: int) -> int:
    x = y
    for _ in range(64 // s + 1):  # a fixed point after ceil(64 / s) rounds
        x = y ^ (x >> s)
    return x


def inverse_splitmix64(z: int) -> int:
    """The preimage of ``z`` under the finaliser (it is a bijection of 64-bit values)."""
    z = _unxorshift(z & M64, 31)
    z = (z * pow(MIX2, -1, 1 << 64)) & M64
    z = _unxorshift(z, 27)
    z = (z * pow(MIX1, -1, 1 << 64)) & M64
    return _unxorshift(z, 30)


def signed(u: int) -> int:
    u &= M64
    return u - (1 << 64) if u >= 1 << 63 else u


def random_seeds(n: int, seed: int = 0) -> torch.Tensor:
    """Seeds over the whole int64 range (negative ones too: bits with the top bit set)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)


def images(b: int = 48, seed: int = 5) -> torch.Tensor:
    return torch.randn(b, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def full_compose() -> Compose:
    return Compose([RandomCrop(2), RandomHorizontalFlip(), GaussianNoise(0.1)])


AUGMENTATIONS = [RandomCrop(2), RandomHorizontalFlip(), GaussianNoise(0.1), full_compose()]


# --------------------------------------------------------------------------- splitmix64
EDGE_VALUES = [0, 1, 2, 3, 2**31, 2**32 - 1, 2**63 - 1, -1, -2, -(2**63), signed(GOLDEN), signed(MIX1),
               -123456789, 0x0123456789ABCDEF]


def test_splitmix64_matches_the_reference_on_edge_values():
    x = torch.tensor(EDGE_VALUES, dtype=torch.int64)
    out = splitmix64(x)
    assert out.dtype == torch.int64 and out.shape == x.shape
    for v, got in zip(EDGE_VALUES, out.tolist()):
        assert got & M64 == ref_splitmix64(v & M64), hex(v & M64)
    # and on random 64-bit values
    for v, got in zip(random_seeds(200).tolist(), splitmix64(random_seeds(200)).tolist()):
        assert got & M64 == ref_splitmix64(v & M64)


def test_splitmix64_gives_the_published_first_output_and_is_injective():
    # SplitMix64 seeded with 0 first outputs finaliser(0 + golden) = 0xE220A8397B1DCDAF
    assert int(splitmix64(torch.tensor([signed(GOLDEN)]))[0]) & M64 == 0xE220A8397B1DCDAF
    assert inverse_splitmix64(ref_splitmix64(0x0123456789ABCDEF)) == 0x0123456789ABCDEF  # the helper below is right
    x = torch.arange(-5000, 5000, dtype=torch.int64)
    assert torch.unique(splitmix64(x)).numel() == x.numel()


# --------------------------------------------------------------------------- seeded_uniform
def test_seeded_uniform_matches_the_reference_scheme():
    seeds = [0, 1, 2, 2**63 - 1, -1, -(2**63), 987654321]
    u = seeded_uniform(torch.tensor(seeds, dtype=torch.int64), 5)
    assert u.dtype == torch.float64 and u.shape == (len(seeds), 5)
    for row, s in zip(u.tolist(), seeds):
        assert row == ref_uniform(s & M64, 5)


def test_seeded_uniform_is_in_the_open_interval_even_at_the_extreme_bits():
    u = seeded_uniform(random_seeds(1000), 100)  # 100k draws
    assert u.dtype == torch.float64
    assert bool((u > 0).all()) and bool((u < 1).all())
    # seeds whose first draw has all 53 bits set / none set (found by inverting the hash):
    # (2^53 - 1 + 0.5) / 2^53 is not a float64 and rounds up to 1.0 unless guarded
    top = signed(inverse_splitmix64((inverse_splitmix64(M64) - GOLDEN) & M64))
    bottom = signed(inverse_splitmix64((inverse_splitmix64(0) - GOLDEN) & M64))
    edge = seeded_uniform(torch.tensor([top, bottom]), 1)[:, 0]
    assert 0.9999 < float(edge[0]) < 1.0
    assert 0.0 < float(edge[1]) < 1e-15
    # and a crop drawn from the top seed stays inside the padded image
    x = images(1)
    (dy, _), = crop_offsets(x, RandomCrop(2).seeded(x, torch.tensor([top])), 2)
    assert dy == 4  # the first draw (the row offset) is the largest: 2p


def test_seeded_uniform_rows_depend_on_their_seed_alone():
    seeds = random_seeds(64)
    u = seeded_uniform(seeds, 7)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(seeded_uniform(seeds[perm], 7), u[perm])
    assert torch.equal(seeded_uniform(seeds[10:13], 7), u[10:13])
    assert torch.equal(seeded_uniform(seeds[[5, 5, 9]], 7), u[[5, 5, 9]])
    for i in (0, 31, 63):
        assert torch.equal(seeded_uniform(seeds[i:i + 1], 7), u[i:i + 1])
    # the global generator neither matters nor moves
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert torch.equal(seeded_uniform(seeds, 7), u)
    assert torch.equal(torch.get_rng_state(), state)


def test_seeded_uniform_mean_variance_and_histogram():
    u = seeded_uniform(torch.arange(2000, dtype=torch.int64), 50).flatten()  # 100k draws from nearby seeds
    n = u.numel()
    # sd of the mean: sqrt(1/12 / n) ~ 0.0009; sd of the variance: ~ 0.00024
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.0015
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert float((counts - n / 20).abs().max()) < 0.05 * n / 20  # each bin within 5% (sd ~1.4%)


def test_consecutive_seeds_and_draws_are_uncorrelated():
    n = 20000
    u = seeded_uniform(torch.arange(n + 1, dtype=torch.int64), 2)
    bound = 5 / n**0.5  # five standard errors of a correlation of independent draws
    assert abs(float(torch.corrcoef(torch.stack([u[:-1, 0], u[1:, 0]]))[0, 1])) < bound  # seed s vs s + 1
    assert abs(float(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1])) < bound  # draw 1 vs draw 2
    # derived sub-streams (one per transform of a Compose) are independent of each other too
    seeds = torch.arange(n, dtype=torch.int64)
    a = seeded_uniform(derive_seeds(seeds, 0), 1)[:, 0]
    b = seeded_uniform(derive_seeds(seeds, 1), 1)[:, 0]
    c = seeded_uniform(seeds, 1)[:, 0]
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < bound
    assert abs(float(torch.corrcoef(torch.stack([a, c]))[0, 1])) < bound


def test_seeded_normal_is_standard_normal_and_per_seed():
    z = seeded_normal(torch.arange(10000, dtype=torch.int64), 11)  # odd n: the Box-Muller pairs are cut
    assert z.dtype == torch.float64 and z.shape == (10000, 11)
    flat = z.flatten()  # 110k draws; sd of the mean ~ 0.003
    assert abs(float(flat.mean())) < 0.015
    assert abs(float(flat.std()) - 1) < 0.015
    assert abs(float((flat.abs() < 1).double().mean()) - 0.6827) < 0.01
    assert abs(float((flat.abs() < 2).double().mean()) - 0.9545) < 0.006
    assert bool(torch.isfinite(flat).all())
    seeds = random_seeds(32)
    assert torch.equal(seeded_normal(seeds[[4, 1]], 6), seeded_normal(seeds, 6)[[4, 1]])


# --------------------------------------------------------------------------- seeded transforms
@pytest.mark.parametrize("aug", AUGMENTATIONS, ids=repr)
def test_a_samples_view_does_not_depend_on_its_batch(aug):
    x, seeds = images(), random_seeds(48)
    out = aug.seeded(x, seeds)
    assert out.shape == x.shape and out.dtype == x.dtype
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(4))
    assert torch.equal(aug.seeded(x[perm], seeds[perm]), out[perm])
    assert torch.equal(aug.seeded(x[7:19], seeds[7:19]), out[7:19])
    for i in (0, 20, 47):
        assert torch.equal(aug.seeded(x[i:i + 1], seeds[i:i + 1]), out[i:i + 1])
    # not the global generator: another global seed changes nothing, and no draw is taken
    torch.manual_seed(99)
    state = torch.get_rng_state()
    assert torch.equal(aug.seeded(x, seeds), out)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(x, images())  # the input is not modified in place


@pytest.mark.parametrize("aug", AUGMENTATIONS, ids=repr)
def test_same_seeds_same_views_other_seeds_other_views(aug):
    x, seeds = images(), random_seeds(48)
    out = aug.seeded(x, seeds)
    assert torch.equal(aug.seeded(x.clone(), seeds.clone()), out)
    changed = (aug.seeded(x, seeds + 1) != out).flatten(1).any(1)
    assert int(changed.sum()) >= 12, f"only {int(changed.sum())} of 48 samples changed with other seeds"
    # the view is augmented: not the sample itself for most samples
    assert int((out != x).flatten(1).any(1).sum()) >= 12


def padded_by_hand(img: torch.Tensor, p: int) -> torch.Tensor:
    """``(C, H, W)`` zero-padded by ``p`` on every side, without F.pad."""
    c, h, w = img.shape
    out = torch.zeros(c, h + 2 * p, w + 2 * p, dtype=img.dtype)
    out[:, p:p + h, p:p + w] = img
    return out


def crop_offsets(x: torch.Tensor, out: torch.Tensor, p: int) -> list[tuple[int, int]]:
    """For each sample, the one offset (dy, dx) of its padded image whose window is its
    output (asserting there is exactly one)."""
    h, w = x.shape[-2:]
    found = []
    for img, crop in zip(x, out):
        padded = padded_by_hand(img, p)
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(padded[:, dy:dy + h, dx:dx + w], crop)]
        assert len(hits) == 1, hits
        found.append(hits[0])
    return found


def test_seeded_crop_is_a_window_of_the_padded_image_and_covers_every_offset():
    p, n = 2, 2500
    img = torch.arange(1, 65, dtype=torch.float32).reshape(1, 1, 8, 8)  # distinct positive pixels
    x = img.expand(n, 1, 8, 8).contiguous()
    offsets = crop_offsets(x, RandomCrop(p).seeded(x, random_seeds(n, seed=3)), p)
    counts = torch.zeros(2 * p + 1, 2 * p + 1)
    for dy, dx in offsets:
        counts[dy, dx] += 1
    expected = n / (2 * p + 1) ** 2  # 100 per offset, sd ~ 10
    assert bool((counts > 0).all()), counts
    assert float((counts - expected).abs().max()) < 0.45 * expected, counts
    # on random images too (where a zero-padded border could hide a wrong offset less easily)
    x = images()
    assert len(crop_offsets(x, RandomCrop(p).seeded(x, random_seeds(48)), p)) == 48


def test_seeded_flip_is_the_sample_or_its_mirror_at_rate_p():
    x = images(2000)
    for prob, tol in ((0.5, 0.05), (0.2, 0.04), (0.0, 0.0), (1.0, 0.0)):
        out = RandomHorizontalFlip(prob).seeded(x, random_seeds(2000, seed=8))
        same = (out == x).flatten(1).all(1)
        mirrored = (out == x.flip(-1)).flatten(1).all(1)
        assert bool((same | mirrored).all())
        assert abs(float(mirrored.double().mean()) - prob) <= tol


def test_seeded_noise_is_per_seed_not_per_content_and_works_on_vectors():
    seeds = random_seeds(48)
    a, b = images(seed=1), images(seed=2)
    noise = GaussianNoise(0.1)
    na, nb = noise.seeded(a, seeds) - a, noise.seeded(b, seeds) - b
    assert float((na - nb).abs().max()) < 1e-6  # the same noise whatever the image (up to float32 rounding)
    assert abs(float(na.std()) - 0.1) < 0.01 and abs(float(na.mean())) < 0.01
    v = torch.randn(48, 5)
    out = noise.seeded(v, seeds)
    assert out.shape == (48, 5) and torch.equal(noise.seeded(v[3:4], seeds[3:4]), out[3:4])
    x64 = images().double()
    assert noise.seeded(x64, seeds).dtype == torch.float64
    assert torch.equal(GaussianNoise(0.0).seeded(a, seeds), a)


def test_compose_applies_each_transform_with_its_derived_seeds():
    x, seeds = images(), random_seeds(48)
    crop, flip, noise = RandomCrop(2), RandomHorizontalFlip(), GaussianNoise(0.1)
    expected = noise.seeded(flip.seeded(crop.seeded(x, derive_seeds(seeds, 0)), derive_seeds(seeds, 1)),
                            derive_seeds(seeds, 2))
    assert torch.equal(Compose([crop, flip, noise]).seeded(x, seeds), expected)
    # the flip of a Compose is not decided by the crop's draw: every combination occurs
    two = Compose([RandomCrop(2), RandomHorizontalFlip()])
    img = torch.arange(1, 65, dtype=torch.float32).reshape(1, 1, 8, 8).expand(400, 1, 8, 8).contiguous()
    out = two.seeded(img, random_seeds(400, seed=6))
    unflipped = crop_offsets_or_none(img, out, 2)
    assert 0.35 < sum(o is None for o in unflipped) / 400 < 0.65  # about half are mirrored windows
    assert len({o for o in unflipped if o is not None}) == 25


def crop_offsets_or_none(x, out, p):
    """The crop offset of each output that is an unmirrored window, ``None`` for a mirrored one."""
    h, w = x.shape[-2:]
    result = []
    for img, crop in zip(x, out):
        padded = padded_by_hand(img, p)
        hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                if torch.equal(padded[:, dy:dy + h, dx:dx + w], crop)]
        mirrored = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                    if torch.equal(padded[:, dy:dy + h, dx:dx + w].flip(-1), crop)]
        assert len(hits) + len(mirrored) == 1
        result.append(hits[0] if hits else None)
    return result


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("aug", AUGMENTATIONS + [RandomCrop(3), RandomHorizontalFlip(0.3), GaussianNoise(0.25),
                                                 Compose([RandomHorizontalFlip(0.7), Compose([RandomCrop(1)])])],
                         ids=repr)
def test_config_round_trip_gives_the_same_views(aug):
    spec = aug.to_config()
    spec_json = json.loads(json.dumps(spec))  # what a manifest stores
    assert spec_json == spec
    rebuilt = from_config(spec_json)
    assert type(rebuilt) is type(aug) and rebuilt is not aug
    assert rebuilt.to_config() == spec
    x, seeds = images(), random_seeds(48)
    assert torch.equal(rebuilt.seeded(x, seeds), aug.seeded(x, seeds))


def test_config_records_the_parameters():
    assert RandomCrop(3).to_config()["padding"] == 3
    assert RandomHorizontalFlip(0.3).to_config()["p"] == 0.3
    assert GaussianNoise(0.25).to_config()["std"] == 0.25
    assert RandomCrop(3).to_config() != RandomCrop(2).to_config()
    assert full_compose().to_config() == full_compose().to_config()  # equal objects, equal configs
    with pytest.raises(ValueError, match="_component_"):
        from_config({"padding": 2})
    with pytest.raises(TypeError, match="no to_config"):
        Compose([RandomCrop(1), lambda t: t]).to_config()


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("mixer", [Mixup(), CutMix()], ids=repr)
def test_mixing_augmentations_have_no_seeded_view(mixer):
    assert not hasattr(mixer, "seeded")
    with pytest.raises(TypeError, match="mixes samples of a batch"):
        check_seeded(mixer)
    with pytest.raises(TypeError, match="mixes samples of a batch"):
        check_seeded(Compose([RandomCrop(1), mixer]))
    with pytest.raises(TypeError, match="mixes samples of a batch"):
        Compose([RandomCrop(1), mixer]).seeded(images(), random_seeds(48))


def test_a_plain_callable_is_refused_naming_seeded():
    plain = lambda t: t  # noqa: E731
    with pytest.raises(TypeError, match=r"seeded\(x, seeds\)"):
        check_seeded(plain)
    with pytest.raises(TypeError, match=r"seeded\(x, seeds\)"):
        Compose([RandomHorizontalFlip(), plain]).seeded(images(), random_seeds(48))

    class SeededOnly:
        def seeded(self, x, seeds):
            return x

    with pytest.raises(TypeError, match="to_config"):
        check_seeded(SeededOnly())
    for ok in AUGMENTATIONS:
        check_seeded(ok)  # no error


@pytest.mark.parametrize("aug", AUGMENTATIONS, ids=repr)
def test_bad_seeds_are_refused(aug):
    x, seeds = images(), random_seeds(48)
    with pytest.raises(ValueError, match=r"\(B,\) int64"):
        aug.seeded(x, seeds[:, None])
    with pytest.raises(ValueError, match=r"\(B,\) int64"):
        aug.seeded(x, seeds.double())
    with pytest.raises(ValueError, match=r"\(B,\) int64"):
        aug.seeded(x, seeds.to(torch.int32))
    with pytest.raises(ValueError, match="47 seeds for a batch of 48"):
        aug.seeded(x, seeds[:47])
    with pytest.raises(ValueError, match=r"\(B,\) int64"):
        seeded_uniform(seeds[:, None], 2)


def test_seeded_crop_and_flip_need_image_batches():
    seeds = random_seeds(4)
    for aug in (RandomCrop(1), RandomHorizontalFlip()):
        with pytest.raises(ValueError, match=r"image batches \(B, C, H, W\)"):
            aug.seeded(torch.randn(4, 10), seeds)
