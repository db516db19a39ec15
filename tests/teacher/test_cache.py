"""The offline teacher cache: round trips, top-k, refusals, atomic and resumable builds,
and distillation from a cache landing on the weights distillation from the live teacher
reaches."""

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill
from kdistill.errors import CheckpointError
from kdistill.losses import HintLoss, kd_loss
from kdistill.outputs import Batch
from kdistill.teacher import CacheError, CacheMismatchError, LiveTeacher, Teacher, TeacherCache

N, D, C = 96, 8, 10


def make_teacher(seed: int = 0, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, classes))


def make_data(seed: int = 1, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def trained_teacher(x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> nn.Module:
    """A teacher fitted to (x, y), so its distributions are peaked like a real one's."""
    teacher = make_teacher()
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher.eval()


def live(teacher: nn.Module, index: torch.Tensor, x: torch.Tensor, taps=()) -> kdistill.Outputs:
    lt = LiveTeacher(copy.deepcopy(teacher))
    lt.set_taps(taps)
    return lt(Batch(x[index], None, index))


def shuffled(n: int = N, seed: int = 3) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def entries(folder: Path) -> list[str]:
    """What a build left in ``folder``, without the lock files builds take turns on."""
    return [name for name in os.listdir(folder) if not (name.startswith(".") and name.endswith(".lock"))]


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# --------------------------------------------------------------------------- round trips
def test_full_float32_round_trip_is_the_live_teachers_outputs_with_features(tmp_path):
    teacher, (x, _) = make_teacher(), make_data()
    cached = TeacherCache.build(teacher, x, tmp_path / "c", dtype="float32", batch_size=40,
                                features=["1", "0:input"], device="cpu", dataset_name="toy")
    assert isinstance(cached, TeacherCache) and isinstance(cached, Teacher)
    assert sorted(entries(tmp_path)) == ["c"]  # the temporary directory is gone
    assert sorted(os.listdir(tmp_path / "c")) == ["feature.0_input.npy", "feature.1.npy", "logits.npy", "manifest.json"]
    index = shuffled()[:17]
    expected = live(teacher, index, x, taps=["1", "0:input"])
    for opened in (cached, TeacherCache.open(tmp_path / "c", teacher=teacher, x=x)):
        out = opened(Batch(x[index], None, index))
        assert out.logits.dtype == torch.float32 and out.logits.shape == (17, C)
        assert torch.equal(out.logits, expected.logits)
        assert sorted(out.features) == ["0:input", "1"] == opened.taps
        assert torch.equal(out.features["1"], expected.features["1"])  # (B, 32) hidden layer
        assert torch.equal(out.features["0:input"], x[index])
    assert list(cached.parameters()) == []
    info = cached.describe()
    assert info["features"] == {"0:input": [D], "1": [32]}
    assert (info["num_samples"], info["num_classes"], info["mode"], info["dataset"]["name"]) == (N, C, "full", "toy")
    assert cached.bytes_per_sample == 4 * (C + 32 + D)


def test_float16_round_trip_within_1e3_relative(tmp_path):
    teacher, (x, _) = make_teacher(), make_data()
    cached = TeacherCache.build(teacher, x, tmp_path / "c", batch_size=32, device="cpu")  # float16 by default
    index = torch.arange(N)
    got, want = cached(Batch(x, None, index)).logits, live(teacher, index, x).logits
    assert got.dtype == torch.float32
    rel = ((got - want).abs() / want.abs().clamp_min(1e-2)).max()
    assert rel <= 1e-3, f"float16 round trip off by {rel:.2e} relative"
    assert not torch.equal(got, want)  # it really was stored at half precision
    assert cached.bytes_per_sample == 2 * C
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["files"]["logits.npy"]["dtype"] == "<f2" and m["files"]["logits.npy"]["bytes_per_sample"] == 2 * C


# --------------------------------------------------------------------------- top-k
def test_topk_softmax_at_t1_gives_the_exact_topk_probabilities_and_tail_mass(tmp_path):
    x, y = make_data()
    teacher = trained_teacher(x, y)
    k = 3
    cached = TeacherCache.build(teacher, x, tmp_path / "c", mode="topk", k=k, dtype="float32", device="cpu")
    assert sorted(os.listdir(tmp_path / "c")) == ["manifest.json", "tail.npy", "topk_indices.npy", "topk_values.npy"]
    index = shuffled()
    true_p = F.softmax(live(teacher, index, x).logits, dim=-1)
    rebuilt = cached(Batch(x[index], None, index)).logits
    assert rebuilt.shape == (N, C)
    p = F.softmax(rebuilt, dim=-1)
    top_p, top_i = true_p.topk(k, dim=-1)
    torch.testing.assert_close(p.gather(-1, top_i), top_p, rtol=1e-5, atol=1e-7)
    tail_true = 1 - top_p.sum(-1)
    tail_rebuilt = p.sum(-1) - p.gather(-1, top_i).sum(-1)
    torch.testing.assert_close(tail_rebuilt, tail_true, rtol=1e-4, atol=1e-6)
    # the tail is spread uniformly, below every top-k class
    others = p.scatter(-1, top_i, float("nan"))
    spread = others.nan_to_num(0).amax(-1) - others.nan_to_num(1).amin(-1)
    assert spread.abs().max() < 1e-6
    assert (rebuilt.topk(k, dim=-1).indices.sort(-1).values == top_i.sort(-1).values).all()
    # the stored tail is the log-sum-exp of the other logits
    logits = live(teacher, torch.arange(N), x).logits
    rest = logits.scatter(-1, logits.topk(k, -1).indices, float("-inf"))
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "c" / "tail.npy")), torch.logsumexp(rest, -1))
    assert cached.bytes_per_sample == k * 4 + k * 2 + 4  # float32 values, int16 classes, float32 tail


def test_topk_at_higher_temperature_underestimates_the_topk_as_documented(tmp_path):
    """Jensen: for T > 1 the uniform tail holds at least the true tail mass, so every
    top-k probability comes out no larger; their ratios stay exact."""
    x, y = make_data()
    teacher = trained_teacher(x, y)
    cached = TeacherCache.build(teacher, x, tmp_path / "c", mode="topk", k=4, dtype="float32", device="cpu")
    index = torch.arange(N)
    z, z_hat = live(teacher, index, x).logits, cached(Batch(x, None, index)).logits
    top_i = z.topk(4, -1).indices
    for t in (2.0, 4.0):
        p, p_hat = F.softmax(z / t, -1).gather(-1, top_i), F.softmax(z_hat / t, -1).gather(-1, top_i)
        assert (p_hat <= p * (1 + 1e-6)).all()
        torch.testing.assert_close(p_hat / p_hat.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True))


def clustered_problem(n: int = 512):
    """Ten Gaussian clusters: a teacher fitted to them (about 99% accuracy) and a student
    part-way there (about 80%), like a distillation mid-way through."""
    g = torch.Generator().manual_seed(1)
    means = torch.randn(C, D, generator=g) * 1.5
    y = torch.randint(0, C, (n,), generator=g)
    x = means[y] + torch.randn(n, D, generator=g)
    teacher = trained_teacher(x, y, steps=300)
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(student(x), y).backward()
        opt.step()
    return x, y, teacher, student


def test_topk_kd_loss_is_close_to_full_logit_kd_at_t4(tmp_path):
    x, y, teacher, student = clustered_problem()
    n = x.shape[0]
    cached = TeacherCache.build(teacher, x, tmp_path / "c", mode="topk", k=5, tail_temperatures=[4.0],
                                device="cpu")  # float16 values
    index = torch.arange(n)
    with torch.no_grad():
        s = student(x)
    full = float(kd_loss(s, live(teacher, index, x).logits, temperature=4.0))
    at_t1 = float(kd_loss(s, cached(Batch(x, None, index)).logits, temperature=4.0))
    cached.set_temperatures([4.0])
    at_t4 = float(kd_loss(s, cached(Batch(x, None, index)).logits, temperature=4.0))
    print(f"\nKD at T=4, top-5 of 10 classes (float16) vs full logits {full:.4f}: tail filled for T=1 "
          f"{at_t1:.4f} ({at_t1 / full - 1:+.2%}), for T=4 {at_t4:.4f} ({at_t4 / full - 1:+.2%})")
    assert at_t1 < full  # as documented: at T > 1 the uniform tail takes mass from the top k
    assert abs(at_t1 / full - 1) < 0.08
    assert abs(at_t4 / full - 1) < 0.015
    assert cached.bytes_per_sample == 5 * 2 + 5 * 2 + 4 + 4  # values, classes, tail at T=1 and T=4


def test_a_tail_temperature_makes_the_softened_topk_exact(tmp_path):
    x, y, teacher, _ = clustered_problem(n=128)
    cached = TeacherCache.open(
        TeacherCache.build(teacher, x, tmp_path / "c", mode="topk", k=2, dtype="float32",
                           tail_temperatures=(4, 2.0, 1), device="cpu").path)
    assert cached.tail_temperatures == [2.0, 4.0]  # T=1 is always stored (tail.npy)
    index = torch.arange(128)
    z = live(teacher, index, x).logits
    top_i = z.topk(2, -1).indices
    for t in (2.0, 4.0, 1.0):
        cached.set_temperatures([t])
        assert cached.temperature == t
        p, p_hat = F.softmax(z / t, -1), F.softmax(cached(Batch(x, None, index)).logits / t, -1)
        torch.testing.assert_close(p_hat.gather(-1, top_i), p.gather(-1, top_i), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"not at the losses' T=3.*tail_temperatures=\[2.0, 3.0, 4.0\]"):
        cached.set_temperatures([3])
    with pytest.raises(ValueError, match=r"exactly at one temperature, but the losses use \[2.0, 4.0\]"):
        cached.set_temperatures([2.0, 4.0])
    with pytest.raises(ValueError, match="only apply to mode='topk'"):
        TeacherCache.build(teacher, x, tmp_path / "f", tail_temperatures=[4.0], device="cpu")


# --------------------------------------------------------------------------- refusals
@pytest.fixture()
def built(tmp_path):
    teacher, (x, _) = make_teacher(), make_data()
    TeacherCache.build(teacher, x, tmp_path / "c", dtype="float32", device="cpu")
    return teacher, x, tmp_path / "c"


def test_refuses_another_teacher(built):
    teacher, x, path = built
    other = make_teacher(seed=5)
    with pytest.raises(CacheMismatchError, match=r"built from another teacher.*rebuild it for this teacher") as e:
        TeacherCache.open(path, teacher=other)
    assert isinstance(e.value, ValueError)
    TeacherCache.open(path, teacher=LiveTeacher(copy.deepcopy(teacher)))  # a LiveTeacher of the same weights is fine


def test_refuses_other_data(built):
    teacher, x, path = built
    with pytest.raises(CacheMismatchError, match=r"built on other data.*same samples in the same order"):
        TeacherCache.open(path, x=x.flip(0))
    with pytest.raises(CacheMismatchError, match=r"holds 96 samples .* the data given has 95"):
        TeacherCache.open(path, x=x[:95])
    TeacherCache.open(path, x=x.double().numpy())  # float64 arrays are the float32 data fit sees


def test_refuses_a_truncated_file(built):
    _, _, path = built
    f = path / "logits.npy"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(CacheError, match=r"truncated or damaged: logits.npy has \d+ bytes, the manifest expects") as e:
        TeacherCache.open(path, verify=False)
    assert isinstance(e.value, CheckpointError)


def test_refuses_a_bad_checksum_only_when_verifying(built):
    _, _, path = built
    f = path / "logits.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"corrupt: the checksum of logits.npy is sha256:.*Rebuild the cache"):
        TeacherCache.open(path)
    TeacherCache.open(path, verify=False)  # the size is right: only the checksum tells


def test_refuses_a_missing_or_unknown_manifest(built, tmp_path):
    _, _, path = built
    with pytest.raises(CacheError, match=r"no teacher cache at .*nowhere: the directory does not exist.*TeacherCache.build"):
        TeacherCache.open(tmp_path / "nowhere")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CacheError, match=r"format version 99, this kdistill reads version 1"):
        TeacherCache.open(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CacheError, match=r"not a finished teacher cache: it has no manifest.json"):
        TeacherCache.open(path)


def test_refuses_batches_without_or_beyond_the_cached_rows(built):
    _, x, path = built
    cached = TeacherCache.open(path)
    with pytest.raises(ValueError, match="looks samples up by batch.index, but this batch has none"):
        cached(Batch(x[:4]))
    with pytest.raises(CacheMismatchError, match=r"batch.index holds 96 .*rows 0..95.*torch.cat\(\[x, u\]\)"):
        cached(Batch(x[:2], None, torch.tensor([3, 96])))
    with pytest.raises(ValueError, match=r"one row per sample"):
        cached(Batch(x[:2], None, torch.tensor([3])))
    with pytest.raises(ValueError, match=r"holds no output of layer\(s\) \['layer3'\]"):
        cached.set_taps(["layer3"])


def test_refuses_bad_build_arguments(tmp_path):
    teacher, (x, _) = make_teacher(), make_data()
    with pytest.raises(ValueError, match="k=10 must be smaller than the teacher's 10 classes"):
        TeacherCache.build(teacher, x, tmp_path / "c", mode="topk", k=10, device="cpu")
    with pytest.raises(ValueError, match="mode='topk' needs k"):
        TeacherCache.build(teacher, x, tmp_path / "c", mode="topk", device="cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        TeacherCache.build(teacher, x, tmp_path / "c", dtype="bfloat16", device="cpu")
    broken = make_teacher()
    broken[2].bias.data[3] = float("nan")
    with pytest.raises(ValueError, match="NaN logits \\(first at sample 0 of x\\)"):
        TeacherCache.build(broken, x, tmp_path / "c", device="cpu")
    big = nn.Linear(D, C)
    nn.init.constant_(big.weight, 1e4)
    with pytest.raises(ValueError, match="beyond float16's range.*dtype='float32'"):
        TeacherCache.build(big, x, tmp_path / "c", device="cpu")
    assert entries(tmp_path) == []  # failed before any row: nothing left behind


# --------------------------------------------------------------------------- atomic, resumable
class Interrupt(Exception):
    pass


def interrupt_after(module: nn.Module, calls: int):
    """A forward hook (not part of the weights) that raises on forward number ``calls + 1``."""
    count = {"n": 0}

    def hook(m, args):
        count["n"] += 1
        if count["n"] > calls:
            raise Interrupt(f"simulated kill at forward {count['n']}")

    return module.register_forward_pre_hook(hook), count


def count_forwards(module: nn.Module):
    count = {"n": 0}
    return module.register_forward_pre_hook(lambda m, a: count.__setitem__("n", count["n"] + 1)), count


def test_a_failed_build_leaves_no_cache_directory(tmp_path):
    teacher, (x, _) = make_teacher(), make_data()
    handle, _ = interrupt_after(teacher, 0)
    with pytest.raises(Interrupt):
        TeacherCache.build(teacher, x, tmp_path / "c", batch_size=16, device="cpu")
    assert entries(tmp_path) == []  # nothing done: the temporary directory is removed too
    handle.remove()
    handle, _ = interrupt_after(teacher, 2)
    with pytest.raises(Interrupt) as e:
        TeacherCache.build(teacher, x, tmp_path / "c", batch_size=16, device="cpu")
    assert not (tmp_path / "c").exists()  # never a partial cache at the destination
    assert entries(tmp_path) == [f"c.tmp-{os.getpid()}"]  # only the progress, kept for resuming
    if sys.version_info >= (3, 11):  # exception notes
        assert "stopped after 32 of 96 samples" in " ".join(e.value.__notes__)
    with pytest.raises(CacheError, match=r"unfinished build is at .*c.tmp-\d+: run the same TeacherCache.build call"):
        TeacherCache.open(tmp_path / "c")


@pytest.mark.parametrize("mode,k", [("full", None), ("topk", 4)])
def test_resume_after_an_interruption_matches_an_uninterrupted_build_byte_for_byte(tmp_path, mode, k):
    teacher, (x, _) = make_teacher(), make_data()
    kw = dict(mode=mode, k=k, batch_size=16, features=["1"], device="cpu", dataset_name="toy")
    TeacherCache.build(teacher, x, tmp_path / "clean", **kw)
    handle, _ = interrupt_after(teacher, 3)
    with pytest.raises(Interrupt):
        TeacherCache.build(teacher, x, tmp_path / "c", **kw)
    handle.remove()
    progress = json.loads((tmp_path / f"c.tmp-{os.getpid()}" / "progress.json").read_text())
    assert progress["rows_done"] == 48
    handle, count = count_forwards(teacher)
    TeacherCache.build(teacher, x, tmp_path / "c", **kw)
    handle.remove()
    assert count["n"] == 3  # rows 48..95 only: it continued instead of starting over
    assert files_of(tmp_path / "c") == files_of(tmp_path / "clean")
    assert sorted(entries(tmp_path)) == ["c", "clean"]
    TeacherCache.open(tmp_path / "c", teacher=teacher, x=x)  # checksums verified


def test_resume_after_a_hard_kill_of_another_process(tmp_path):
    """A build killed outright (no exception handler runs) is adopted by the next one."""
    teacher, (x, _) = make_teacher(), make_data()
    torch.save({"teacher": teacher.state_dict(), "x": x}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import os, torch
        from torch import nn
        from kdistill.teacher import TeacherCache
        from kdistill.teacher.cache import build
        build.COMMIT_INTERVAL_S = 0.0  # commit after every batch
        saved = torch.load({str(tmp_path / "inputs.pt")!r})
        teacher = nn.Sequential(nn.Linear({D}, 32), nn.ReLU(), nn.Linear(32, {C}))
        teacher.load_state_dict(saved["teacher"])
        calls = []
        def die(m, a):
            calls.append(1)
            if len(calls) > 4:
                os._exit(9)  # like SIGKILL: no cleanup, no exception
        teacher.register_forward_pre_hook(die)
        TeacherCache.build(teacher, saved["x"], {str(tmp_path / "c")!r}, batch_size=16, device="cpu")
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(kdistill.__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith("c.tmp-")]
    assert json.loads((left / "progress.json").read_text())["rows_done"] == 64
    handle, count = count_forwards(teacher)
    TeacherCache.build(teacher, x, tmp_path / "c", batch_size=16, device="cpu")
    handle.remove()
    assert count["n"] == 2  # rows 64..95
    TeacherCache.build(teacher, x, tmp_path / "clean", batch_size=16, device="cpu")
    assert files_of(tmp_path / "c") == files_of(tmp_path / "clean")
    assert not left.exists()


def test_building_again_opens_the_same_cache_and_refuses_another_without_overwrite(tmp_path):
    teacher, (x, _) = make_teacher(), make_data()
    TeacherCache.build(teacher, x, tmp_path / "c", device="cpu")
    handle, count = count_forwards(teacher)
    again = TeacherCache.build(teacher, x, tmp_path / "c", device="cpu")
    handle.remove()
    assert count["n"] == 0 and again.mode == "full"
    with pytest.raises(CacheMismatchError, match=r"already holds a teacher cache of other mode .*overwrite=True"):
        TeacherCache.build(teacher, x, tmp_path / "c", mode="topk", k=2, device="cpu")
    replaced = TeacherCache.build(teacher, x, tmp_path / "c", mode="topk", k=2, device="cpu", overwrite=True)
    assert replaced.mode == "topk" and sorted(entries(tmp_path)) == ["c"]
    data = bytearray((tmp_path / "c" / "tail.npy").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "c" / "tail.npy").write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum of tail.npy"):
        TeacherCache.build(teacher, x, tmp_path / "c", mode="topk", k=2, device="cpu")
    repaired = TeacherCache.build(teacher, x, tmp_path / "c", mode="topk", k=2, device="cpu", overwrite=True)
    assert repaired.mode == "topk" and sorted(entries(tmp_path)) == ["c"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty and holds no manifest.json"):
        TeacherCache.build(teacher, x, tmp_path / "other", device="cpu", overwrite=True)


# --------------------------------------------------------------------------- distillation
def distil(teacher, student: nn.Module, x, y, *, loss=None) -> dict[str, torch.Tensor]:
    student = copy.deepcopy(student)
    d = kdistill.Distiller(student, teacher=teacher, device="cpu")
    d.compile(optimizer=torch.optim.SGD(student.parameters(), lr=0.1), alpha=0.3, temperature=4.0,
              distillation_loss_fn=loss)
    d.fit(x, y, epochs=2, batch_size=16, seed=0, verbose=0)
    return {**student.state_dict(), **({} if loss is None else loss.state_dict())}


def test_distilling_from_a_float32_cache_reaches_the_live_teachers_weights(tmp_path):
    x, y = make_data()
    teacher = trained_teacher(x, y)
    torch.manual_seed(7)
    student = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    cached = TeacherCache.build(teacher, x, tmp_path / "c", dtype="float32", batch_size=64, device="cpu")
    from_live = distil(copy.deepcopy(teacher), student, x, y)
    from_cache = distil(cached, student, x, y)
    assert not torch.equal(from_live["0.weight"], student.state_dict()["0.weight"])  # it trained
    for name, value in from_live.items():
        assert torch.equal(from_cache[name], value), name
    # with float16 logits it is close, not equal
    half = TeacherCache.build(teacher, x, tmp_path / "h", batch_size=64, device="cpu")
    from_half = distil(half, student, x, y)
    assert not all(torch.equal(from_half[n], v) for n, v in from_live.items())


def test_distilling_a_feature_loss_from_cached_features_matches_the_live_teacher(tmp_path):
    x, y = make_data()
    teacher = trained_teacher(x, y)
    torch.manual_seed(7)
    student = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    cached = TeacherCache.build(teacher, x, tmp_path / "c", dtype="float32", features=["1"], device="cpu")
    torch.manual_seed(11)  # the adapter HintLoss builds draws from the global generator
    from_live = distil(copy.deepcopy(teacher), student, x, y, loss=HintLoss("1", "1", weight=1.0))
    torch.manual_seed(11)
    from_cache = distil(cached, student, x, y, loss=HintLoss("1", "1", weight=1.0))
    for name, value in from_live.items():
        assert torch.equal(from_cache[name], value), name


def test_concurrent_builds_of_one_path_take_turns(tmp_path):
    """Two processes building the same cache at once (every rank of a torchrun script, say):
    one builds, the other waits on the lock and opens the result."""
    teacher, (x, _) = make_teacher(), make_data()
    torch.save({"teacher": teacher.state_dict(), "x": x}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, time, torch
        from torch import nn
        from kdistill.teacher import TeacherCache
        saved = torch.load({str(tmp_path / "inputs.pt")!r})
        teacher = nn.Sequential(nn.Linear({D}, 32), nn.ReLU(), nn.Linear(32, {C}))
        teacher.load_state_dict(saved["teacher"])
        calls = []
        def slow(m, a):  # long enough for the other process to arrive while this one builds
            calls.append(1)
            time.sleep(0.05)
        teacher.register_forward_pre_hook(slow)
        TeacherCache.build(teacher, saved["x"], {str(tmp_path / "c")!r}, batch_size=16, device="cpu")
        print("forwards", len(calls))
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(kdistill.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    forwards = sorted(int(o[0].split()[-1]) for o in outs)
    assert forwards == [0, N // 16]  # one built every row, the other opened its cache
    assert sorted(entries(tmp_path)) == ["c", "inputs.pt"]
    TeacherCache.open(tmp_path / "c", teacher=teacher, x=x)


# --------------------------------------------------------------------------- reindexed
def test_reindexed_serves_a_reordered_subset_from_the_stored_rows(built):
    teacher, x, path = built
    cached = TeacherCache.open(path)
    rows = np.array([5, 0, 77, 13])
    view = cached.reindexed(rows)
    out = view(Batch(x[rows], None, torch.arange(4)))
    torch.testing.assert_close(out.logits, teacher(x[rows]), rtol=1e-6, atol=1e-6)
    # a view of a view composes, and the original cache is untouched
    inner = view.reindexed([3, 1])
    torch.testing.assert_close(inner(Batch(x[[13, 0]], None, torch.arange(2))).logits, teacher(x[[13, 0]]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached(Batch(x[:2], None, torch.arange(2))).logits, teacher(x[:2]), rtol=1e-6, atol=1e-6)
    with pytest.raises(CacheMismatchError, match=r"serves 4 samples \(reindexed"):
        view(Batch(x[:1], None, torch.tensor([4])))


def test_reindexed_refuses_bad_rows(built):
    _, _, path = built
    cached = TeacherCache.open(path)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 96\).*to 96"):
        cached.reindexed([0, 96])
    with pytest.raises(ValueError, match="repeats a stored row"):
        cached.reindexed([1, 1])
    with pytest.raises(ValueError, match="1-D array of integer"):
        cached.reindexed(np.array([0.5]))


def test_distilling_through_a_reindexed_cache_equals_a_cache_of_that_data(tmp_path):
    x, y = make_data()
    teacher = trained_teacher(x, y)
    torch.manual_seed(7)
    student = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    order = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:60]
    whole = TeacherCache.build(teacher, x, tmp_path / "all", dtype="float32", device="cpu")
    own = TeacherCache.build(teacher, x[order], tmp_path / "own", dtype="float32", device="cpu")
    via_view = distil(whole.reindexed(order), student, x[order], y[order])
    direct = distil(own, student, x[order], y[order])
    for name, value in direct.items():
        assert torch.equal(via_view[name], value), name


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(num_samples=m["num_samples"] - 1), r"num_samples is 95 but the dataset shape"),
    (lambda m: (m.update(num_samples=95), m["dataset"].update(shape=[95, D])), r"logits.npy holds shape \[96, 10\]"),
    (lambda m: m.update(num_classes=7), r"num_classes is 7 but logits_shape"),
])
def test_an_edited_manifest_is_refused_by_open_and_verify(built, capsys, edit, message):
    _, _, path = built
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=message + r".*edited or damaged"):
        TeacherCache.open(path, verify=False)
    from kdistill.cli import main

    assert main(["cache", "verify", str(path)]) == 1
    assert "inconsistent" in capsys.readouterr().err
