"""Augmentation-consistent views of the offline teacher cache: V seeded views per sample,
the student in epoch e trains on view e mod V and sees exactly the input the teacher saw;
augmenting with a cache that has no views (or other views) is refused."""

import copy
import json
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

import kdistill
from kdistill.data.augment import Compose, GaussianNoise, Mixup, RandomCrop, RandomHorizontalFlip
from kdistill.losses import FTLoss, HintLoss
from kdistill.outputs import Batch
from kdistill.teacher import CacheMismatchError, TeacherCache
from kdistill.teacher.cache import make_view_seeds
from test_cache import Interrupt, count_forwards, entries, files_of, interrupt_after  # the cache tests' helpers

N, C, V, SEED = 48, 10, 3, 7


def make_teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, C)).eval()


def make_student(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 64, C))


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 1, 8, 8, generator=g), torch.randint(0, C, (N,), generator=g)


def make_aug() -> Compose:
    return Compose([RandomCrop(2), RandomHorizontalFlip()])


def build(teacher, x, path, **kw) -> TeacherCache:
    kw = {"views": V, "augment": make_aug(), "seed": SEED, "dtype": "float32", "batch_size": 20, "device": "cpu", **kw}
    return TeacherCache.build(teacher, x, path, **kw)


def seeds_of(path) -> torch.Tensor:
    return torch.from_numpy(np.load(path / "view_seeds.npy"))


def teacher_on(teacher: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher(inputs)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32 outputs of the same inputs, up to the rounding of another batch size."""
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), float((got - want).abs().max())


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory):
    """A float32 cache of 3 views, with the ReLU's output (layer "1") tapped."""
    teacher, (x, y) = make_teacher(), make_data()
    path = tmp_path_factory.mktemp("views") / "c"
    cached = build(teacher, x, path, features=["1"])
    return teacher, x, y, path, cached


# --------------------------------------------------------------------------- what is stored
def test_the_cache_stores_the_teachers_outputs_for_every_seeded_view(views_cache):
    teacher, x, _, path, cached = views_cache
    aug = make_aug()
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["views"] == V and manifest["view_seed"] == SEED
    assert manifest["augment"] == json.loads(json.dumps(aug.to_config()))
    assert cached.views == V and cached.augment_config == manifest["augment"]
    assert sorted(os.listdir(path)) == ["feature.1.npy", "logits.npy", "manifest.json", "view_seeds.npy"]

    seeds = np.load(path / "view_seeds.npy")
    assert seeds.shape == (V, N) and seeds.dtype == np.int64
    assert np.array_equal(seeds, make_view_seeds(SEED, V, N))
    assert len(np.unique(seeds)) == V * N

    logits = torch.from_numpy(np.load(path / "logits.npy"))
    feats = torch.from_numpy(np.load(path / "feature.1.npy"))
    assert logits.shape == (V * N, C) and feats.shape == (V * N, 4, 8, 8)
    hidden = {}
    handle = teacher[1].register_forward_hook(lambda m, a, out: hidden.__setitem__("1", out))
    try:
        for v in range(V):
            for i in range(N):  # one sample at a time: its view depends on its seed alone
                xi = aug.seeded(x[i:i + 1], torch.from_numpy(seeds[v, i:i + 1]))
                want = teacher_on(teacher, xi)
                assert_close(logits[v * N + i:v * N + i + 1], want)
                assert_close(feats[v * N + i:v * N + i + 1], hidden["1"])
    finally:
        handle.remove()
    # the views are different inputs: their logits differ from each other and from the plain samples'
    plain = teacher_on(teacher, x)
    for v in range(V):
        assert not torch.allclose(logits[v * N:(v + 1) * N], plain)
    assert not torch.allclose(logits[:N], logits[N:2 * N])

    # bytes per sample count every view (and the seeds), as the arrays on disk do
    arrays = {f: np.load(path / f) for f in os.listdir(path) if f.endswith(".npy")}
    assert cached.bytes_per_sample * N == sum(a.nbytes for a in arrays.values())
    assert cached.bytes_per_sample == V * (4 * C + 4 * 4 * 8 * 8) + 8 * V
    for fname, info in manifest["files"].items():
        assert info["bytes"] == (path / fname).stat().st_size
    info = cached.describe()
    assert info["views"] == V and info["augment"] == manifest["augment"]
    assert info["total_bytes"] == sum((path / f).stat().st_size for f in manifest["files"])


def test_the_cache_rebuilds_its_augmentation_from_the_manifest(views_cache):
    _, x, _, path, _ = views_cache
    opened = TeacherCache.open(path, teacher=make_teacher(), x=x)
    aug = opened.augmentation
    assert isinstance(aug, Compose) and aug.to_config() == make_aug().to_config()
    seeds = torch.arange(N, dtype=torch.int64)
    assert torch.equal(aug.seeded(x, seeds), make_aug().seeded(x, seeds))
    assert [opened.view_of_epoch(e) for e in range(7)] == [e % V for e in range(7)]


def test_augment_batch_gives_the_view_of_the_epoch_and_the_cache_serves_it(views_cache):
    teacher, x, y, path, cached = views_cache
    seeds, aug = seeds_of(path), make_aug()
    logits = torch.from_numpy(np.load(path / "logits.npy"))
    index = torch.randperm(N, generator=torch.Generator().manual_seed(5))[:17]
    batch = Batch(x[index], y[index], index)
    for epoch in range(7):
        b = cached.augment_batch(batch, epoch)
        view = epoch % V
        assert b.view == view
        assert torch.equal(b.index, index) and torch.equal(b.targets, y[index])
        assert torch.equal(b.inputs, aug.seeded(x[index], seeds[view, index]))
        assert not torch.equal(b.inputs, x[index])
        out = cached(b)
        assert torch.equal(out.logits, logits[view * N + index])
        assert_close(out.logits, teacher_on(teacher, b.inputs))
    # per sample: a sub-batch gets the same rows
    whole = cached.augment_batch(Batch(x, y, torch.arange(N)), 2)
    part = cached.augment_batch(Batch(x[index], y[index], index), 2)
    assert torch.equal(part.inputs, whole.inputs[index])
    assert torch.equal(batch.inputs, x[index])  # the batch given is not modified
    with pytest.raises(ValueError, match="has none"):
        cached.augment_batch(Batch(x[:4]), 0)


# --------------------------------------------------------------------------- distillation
class Recording(kdistill.Distiller):
    """Records what every training step sees."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen = []

    def train_step(self, batch):
        teacher_out = self.teacher(batch)
        self.seen.append({"view": batch.view, "epoch": self.epoch, "inputs": batch.inputs.clone(),
                          "index": batch.index.clone(), "logits": teacher_out.logits.clone(),
                          "features": {k: v.clone() for k, v in teacher_out.features.items()}})
        return super().train_step(batch)


class LiveViews(kdistill.Distiller):
    """The live teacher, trained on the cache's views (without the view tag)."""

    def __init__(self, *args, views_of: TeacherCache, **kw):
        super().__init__(*args, **kw)
        self.views_of = views_of

    def _augment_batch(self, batch):
        b = self.views_of.augment_batch(batch, self.epoch)
        return Batch(b.inputs, b.targets, b.index)


def distil(distiller, x, y, *, loss=None, epochs=4, **fit):
    distiller.compile(optimizer=torch.optim.SGD(distiller.student.parameters(), lr=0.1), alpha=0.3,
                      temperature=4.0, distillation_loss_fn=loss)
    distiller.fit(x, y, epochs=epochs, batch_size=16, seed=0, verbose=0, **fit)
    return {**distiller.student.state_dict(), **({} if loss is None else loss.state_dict())}


def test_the_student_trains_on_view_epoch_mod_v_with_the_teachers_outputs_for_it(views_cache):
    teacher, x, y, path, cached = views_cache
    seeds, aug = seeds_of(path), make_aug()
    d = Recording(make_student(), teacher=cached, device="cpu")
    distil(d, x, y)
    assert len(d.seen) == 4 * 3  # 4 epochs of 3 batches
    assert sorted({s["epoch"] for s in d.seen}) == [0, 1, 2, 3]
    for s in d.seen:
        assert s["view"] == s["epoch"] % V
        idx = s["index"]
        assert not torch.equal(s["inputs"], x[idx])  # augmented
        assert torch.equal(s["inputs"], aug.seeded(x[idx], seeds[s["view"], idx]))
        assert_close(s["logits"], teacher_on(teacher, s["inputs"]))
    for epoch in range(4):  # every sample once per epoch
        idx = torch.cat([s["index"] for s in d.seen if s["epoch"] == epoch])
        assert sorted(idx.tolist()) == list(range(N))
    # epochs 0 and 3 replay the same view: the same input for the same sample
    first = {int(i): inp for s in d.seen if s["epoch"] == 0 for i, inp in zip(s["index"], s["inputs"])}
    again = {int(i): inp for s in d.seen if s["epoch"] == 3 for i, inp in zip(s["index"], s["inputs"])}
    assert all(torch.equal(first[i], again[i]) for i in range(N))


def test_distilling_from_the_views_cache_reaches_the_live_teachers_weights(views_cache):
    teacher, x, y, _, cached = views_cache
    student = make_student()
    from_cache = distil(kdistill.Distiller(copy.deepcopy(student), teacher=cached, device="cpu"), x, y)
    from_live = distil(LiveViews(copy.deepcopy(student), teacher=copy.deepcopy(teacher), views_of=cached,
                                 device="cpu"), x, y)
    assert not torch.equal(from_cache["0.weight"], student.state_dict()["0.weight"])  # it trained
    for name, value in from_live.items():
        assert torch.allclose(from_cache[name], value, rtol=0, atol=1e-6), name
    exact = all(torch.equal(from_cache[n], v) for n, v in from_live.items())
    assert exact  # the cache is built through the live teacher's own forward: bit for bit
    # without the views the live teacher lands elsewhere: the check can tell
    plain = distil(kdistill.Distiller(copy.deepcopy(student), teacher=copy.deepcopy(teacher), device="cpu"), x, y)
    assert not torch.allclose(plain["0.weight"], from_cache["0.weight"], rtol=0, atol=1e-6)


def test_a_feature_loss_from_cached_views_matches_the_live_teacher(views_cache):
    """setup() builds HintLoss's adapter from a view, and the tapped layer is served per view."""
    teacher, x, y, _, cached = views_cache
    student = make_student()
    torch.manual_seed(11)  # the adapter draws its weights from the global generator
    d = Recording(copy.deepcopy(student), teacher=cached, device="cpu")
    from_cache = distil(d, x, y, loss=HintLoss("1", "1", weight=1.0), epochs=3)
    torch.manual_seed(11)
    from_live = distil(LiveViews(copy.deepcopy(student), teacher=copy.deepcopy(teacher), views_of=cached,
                                 device="cpu"), x, y, loss=HintLoss("1", "1", weight=1.0), epochs=3)
    assert any(k.startswith("adapter") for k in from_cache)  # 2 -> 4 channels: a real adapter
    for name, value in from_live.items():
        assert torch.allclose(from_cache[name], value, rtol=0, atol=1e-6), name
    exact = all(torch.equal(from_cache[n], v) for n, v in from_live.items())
    assert exact  # the cache is built through the live teacher's own forward: bit for bit
    feature = {}
    handle = teacher[1].register_forward_hook(lambda m, a, out: feature.__setitem__("1", out))
    for s in d.seen:
        teacher_on(teacher, s["inputs"])
        assert_close(s["features"]["1"], feature["1"])
    handle.remove()


def test_setup_by_hand_augments_a_plain_batch_with_the_epochs_view(views_cache):
    _, x, y, path, cached = views_cache
    d = kdistill.Distiller(make_student(), teacher=cached, device="cpu")
    hint = HintLoss("1", "1", weight=1.0)
    d.compile(optimizer=torch.optim.SGD(d.student.parameters(), lr=0.1), distillation_loss_fn=hint)
    groups = len(d.optimizer.param_groups)
    d.setup(Batch(x[:8], y[:8], torch.arange(8)))  # no view given: the epoch's (0) is applied
    assert len(d.optimizer.param_groups) == groups + 1  # the adapter joined the optimizer
    logs = d.train_step(cached.augment_batch(Batch(x[8:16], y[8:16], torch.arange(8, 16)), 1))
    assert np.isfinite(float(logs["loss"]))
    with pytest.raises(ValueError, match="this batch says none"):
        d.train_step(Batch(x[8:16], y[8:16], torch.arange(8, 16)))


class SpyFT(FTLoss):
    """Factor transfer whose paraphraser pre-training records the batches it gets."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pretrain_seen = []

    def pretrain_loss(self, teacher, batch):
        self.pretrain_seen.append((batch.view, batch.index.clone(), batch.inputs.clone(),
                                   teacher.features["1"].clone()))
        return super().pretrain_loss(teacher, batch)


def test_factor_transfer_pretrains_its_paraphraser_on_the_views(views_cache):
    teacher, x, y, path, cached = views_cache
    seeds, aug = seeds_of(path), make_aug()
    ft = SpyFT("1", "1", weight=1.0, pretrain_epochs=2)
    d = kdistill.Distiller(make_student(), teacher=cached, device="cpu")
    distil(d, x, y, loss=ft, epochs=1)
    assert bool(ft.pretrained)
    assert [view for view, *_ in ft.pretrain_seen] == [0] * 3 + [1] * 3  # pre-training epoch e: view e mod V
    feature = {}
    handle = teacher[1].register_forward_hook(lambda m, a, out: feature.__setitem__("1", out))
    for view, idx, inputs, served in ft.pretrain_seen:
        assert torch.equal(inputs, aug.seeded(x[idx], seeds[view, idx]))
        teacher_on(teacher, inputs)
        assert_close(served, feature["1"])
    handle.remove()


# --------------------------------------------------------------------------- refusals
def test_fit_refuses_augmenting_with_a_cache_without_views(tmp_path):
    teacher, (x, y) = make_teacher(), make_data()
    plain = TeacherCache.build(teacher, x, tmp_path / "plain", dtype="float32", device="cpu")
    student = make_student()
    before = copy.deepcopy(student.state_dict())
    d = kdistill.Distiller(student, teacher=plain, device="cpu")
    with pytest.raises(ValueError, match=r"un-augmented samples only.*Build the cache with views.*live teacher"):
        distil(d, x, y, augment=make_aug())
    assert all(torch.equal(student.state_dict()[k], v) for k, v in before.items())  # refused before training
    with pytest.raises(ValueError, match="Build the cache with views"):
        distil(d, x, y, augment=lambda t: t)
    distil(d, x, y, epochs=1)  # without augment= it distils


def test_fit_refuses_another_augmentation_than_the_caches_and_accepts_an_equal_one(views_cache):
    _, x, y, path, cached = views_cache
    for other in (Compose([RandomCrop(1), RandomHorizontalFlip()]), RandomCrop(2),
                  Compose([RandomHorizontalFlip(), RandomCrop(2)]), GaussianNoise(0.1), lambda t: t):
        d = kdistill.Distiller(make_student(), teacher=cached, device="cpu")
        with pytest.raises(ValueError, match=r"holds views made with Compose.*Leave augment= out"):
            distil(d, x, y, augment=other, epochs=1)
    # a new but equal augmentation: accepted, and it is the cache's views that are used (not applied twice)
    d = Recording(make_student(), teacher=cached, device="cpu")
    with_equal = distil(d, x, y, augment=make_aug(), epochs=2)
    without = distil(kdistill.Distiller(make_student(), teacher=cached, device="cpu"), x, y, epochs=2)
    for name, value in without.items():
        assert torch.equal(with_equal[name], value), name
    seeds = seeds_of(path)
    for s in d.seen:
        assert torch.equal(s["inputs"], make_aug().seeded(x[s["index"]], seeds[s["view"], s["index"]]))


def test_the_cache_refuses_batches_with_a_missing_or_wrong_view(views_cache, tmp_path):
    _, x, _, _, cached = views_cache
    index = torch.arange(4)
    with pytest.raises(ValueError, match=r"holds 3 augmented views per sample, and this batch says none") as e:
        cached(Batch(x[:4], None, index))
    assert not isinstance(e.value, CacheMismatchError)
    for view in (3, -1, 10):
        with pytest.raises(CacheMismatchError, match=rf"batch.view is {view}, .* holds views 0..2"):
            cached(Batch(x[:4], None, index, None, view))
    with pytest.raises(CacheMismatchError, match="rows 0..47"):
        cached(Batch(x[:2], None, torch.tensor([0, 48]), None, 1))
    plain = TeacherCache.build(make_teacher(), x, tmp_path / "plain", dtype="float32", device="cpu")
    with pytest.raises(CacheMismatchError, match=r"view 1 of an augmented cache.*un-augmented samples only"):
        plain(Batch(x[:4], None, index, None, 1))
    assert_close(plain(Batch(x[:4], None, index)).logits, teacher_on(make_teacher(), x[:4]))
    with pytest.raises(ValueError, match="no augmented views"):
        plain.augment_batch(Batch(x[:4], None, index), 0)


def test_build_refuses_bad_view_arguments(tmp_path):
    teacher, (x, _) = make_teacher(), make_data()
    path = tmp_path / "c"
    with pytest.raises(ValueError, match="views=2 needs augment="):
        build(teacher, x, path, views=2, augment=None)
    with pytest.raises(ValueError, match="augment= is only used with views"):
        build(teacher, x, path, views=0)
    with pytest.raises(TypeError, match="mixes samples of a batch"):
        build(teacher, x, path, views=2, augment=Mixup())
    with pytest.raises(TypeError, match="mixes samples of a batch"):
        build(teacher, x, path, views=2, augment=Compose([RandomCrop(1), Mixup()]))
    with pytest.raises(TypeError, match=r"seeded\(x, seeds\)"):
        build(teacher, x, path, views=2, augment=lambda t: t)
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="views must be a non-negative integer"):
            build(teacher, x, path, views=bad)
    with pytest.raises(ValueError, match="seed must be an integer"):
        build(teacher, x, path, seed=1.0)
    assert entries(tmp_path) == []  # nothing left behind


# --------------------------------------------------------------------------- rebuild, resume
def test_building_again_opens_it_and_other_view_settings_are_refused(tmp_path):
    teacher, (x, _) = make_teacher(), make_data()
    path = tmp_path / "c"
    build(teacher, x, path)
    handle, count = count_forwards(teacher)
    again = build(teacher, x, path, augment=make_aug())  # a new, equal augmentation
    handle.remove()
    assert count["n"] == 0 and again.views == V
    for kw, what in (({"seed": SEED + 1}, r"view_seed \(7 there, 8 asked for\)"),
                     ({"views": 2}, r"views \(3 there, 2 asked for\)"),
                     ({"augment": Compose([RandomCrop(1), RandomHorizontalFlip()])}, r"augment \("),
                     ({"views": 0, "augment": None}, r"views \(3 there, 0 asked for\)")):
        with pytest.raises(CacheMismatchError, match=rf"already holds a teacher cache of other {what}.*overwrite=True"):
            build(teacher, x, path, **kw)
    replaced = build(teacher, x, path, seed=SEED + 1, overwrite=True)
    assert np.array_equal(np.load(path / "view_seeds.npy"), make_view_seeds(SEED + 1, V, N))
    assert replaced.manifest["view_seed"] == SEED + 1 and sorted(entries(tmp_path)) == ["c"]


@pytest.mark.parametrize("calls", [3, 4, 8])
def test_an_interrupted_views_build_resumes_and_matches_an_uninterrupted_one(tmp_path, calls):
    teacher, (x, _) = make_teacher(), make_data()
    per_view = -(-N // 20)  # batches never span views: 20, 20, 8
    build(teacher, x, tmp_path / "clean")
    handle, _ = interrupt_after(teacher, calls)
    with pytest.raises(Interrupt) as e:
        build(teacher, x, tmp_path / "c")
    handle.remove()
    full_views, rest = divmod(calls, per_view)
    rows = full_views * N + min(rest * 20, N)
    progress = json.loads((tmp_path / f"c.tmp-{os.getpid()}" / "progress.json").read_text())
    assert progress["rows_done"] == rows
    if sys.version_info >= (3, 11):
        assert f"stopped after {rows} of {V * N} rows ({V} views x {N} samples)" in " ".join(e.value.__notes__)
    handle, count = count_forwards(teacher)
    build(teacher, x, tmp_path / "c")
    handle.remove()
    assert count["n"] == V * per_view - calls  # only the batches not done
    assert files_of(tmp_path / "c") == files_of(tmp_path / "clean")
    assert sorted(entries(tmp_path)) == ["c", "clean"]
    TeacherCache.open(tmp_path / "c", teacher=teacher, x=x)  # checksums verified
