"""The top-k token cache: stored values, rebuilt distributions, refusals, resume, training."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdistill.data.text import TokenDataset  # noqa: E402
from kdistill.teacher import CacheError, CacheMismatchError, TokenCache  # noqa: E402
from kdistill.teacher.token_cache import rebuild_logits  # noqa: E402

V = 300


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper than at init, so the top k holds real mass
        m.lm_head.weight.mul_(30.0)
    return m.eval()


def dataset(n=12, seed=0, prompt=True):
    g = torch.Generator().manual_seed(seed)
    seqs, masks = [], []
    for _ in range(n):
        length = int(torch.randint(4, 24, (1,), generator=g))
        seqs.append(torch.randint(1, V, (length,), generator=g).tolist())
        masks.append([i >= 2 or not prompt for i in range(length)])  # a 2-token prompt, not trained on
    return TokenDataset.from_sequences(seqs, masks, pad_id=0)


def live_logprobs(model, batch):
    with torch.no_grad():
        z = model(**batch.inputs).logits
    return torch.log_softmax(z.double(), -1)


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama()


@pytest.fixture(scope="module")
def ds():
    return dataset()


def test_values_are_the_teachers_topk(tmp_path, teacher, ds):
    cache = TokenCache.build(teacher, ds, tmp_path / "c", k=16, batch_size=5, value_dtype="float32")
    assert cache.manifest["id_bits"] == 9  # V = 300 -> 9 bits, packed
    assert cache.bytes_per_position == 16 * 9 // 8 + 16 * 4 + 4
    rows = torch.tensor([0, 5, 11, 3])
    batch = ds.collate(rows)
    lp = live_logprobs(teacher, batch)[batch.token_mask]
    ids, vals, tail, counts = cache.lookup(rows)
    want_vals, want_ids = lp.topk(16, dim=-1)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(vals.double(), want_vals, atol=1e-5)
    want_tail = torch.log1p(-want_vals.exp().sum(-1).clamp(max=1 - 1e-12))
    assert torch.allclose(tail.double(), want_tail, atol=1e-4)
    assert torch.equal(counts, batch.token_mask.sum(1))


def test_16bit_values(tmp_path, teacher, ds):
    for vd in ("float16", "bfloat16"):
        cache = TokenCache.build(teacher, ds, tmp_path / vd, k=8, value_dtype=vd)
        assert cache.bytes_per_position == 9 + 8 * 2 + 2  # 8 ids of 9 bits in 9 bytes
        batch = ds.collate(torch.arange(4))
        lp = live_logprobs(teacher, batch)[batch.token_mask]
        _, vals, _, _ = cache.lookup(torch.arange(4))
        tol = 1e-2 if vd == "float16" else 6e-2
        assert torch.allclose(vals.double(), lp.topk(8, -1).values, atol=tol, rtol=tol)


def kl_full_vs_rebuilt(cache, teacher, ds):
    batch = ds.collate(torch.arange(len(ds)))
    p = live_logprobs(teacher, batch)[batch.token_mask]
    q = torch.log_softmax(cache(batch).logits.double()[batch.token_mask], -1)
    if cache.tail == "renormalize":  # no mass outside the top k: KL(q || p) = -log(top-k mass) is the finite one
        return float((q.exp() * (q - p)).sum(-1).mean())
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.parametrize("tail", ["renormalize", "bucket", "uniform"])
def test_kl_small_and_decreasing_in_k(tmp_path, teacher, ds, tail):
    kls = []
    for k in (4, 32, 128):
        cache = TokenCache.build(teacher, ds, tmp_path / f"k{k}", k=k, tail=tail, value_dtype="float32")
        kls.append(kl_full_vs_rebuilt(cache, teacher, ds))
    assert kls[0] > kls[1] > kls[2] >= -1e-6, kls
    assert kls[2] < 0.05, kls
    full = TokenCache.build(teacher, ds, tmp_path / "kV", k=V, tail=tail, value_dtype="float32")
    assert abs(kl_full_vs_rebuilt(full, teacher, ds)) < 1e-5


def test_tail_modes_are_distributions(tmp_path, teacher, ds):
    cache = TokenCache.build(teacher, ds, tmp_path / "c", k=8)
    ids, lp, tail, _ = cache.lookup(torch.arange(3))
    for mode in ("renormalize", "bucket", "uniform"):
        q = torch.softmax(rebuild_logits(ids, lp, tail, V, mode), -1)
        assert torch.allclose(q.sum(-1), torch.ones(q.shape[0]), atol=1e-5)
    qb = torch.softmax(rebuild_logits(ids, lp, tail, V, "bucket"), -1)
    assert torch.allclose(1 - qb.gather(-1, ids).sum(-1), tail.exp(), atol=1e-3)  # tail mass kept
    qr = torch.softmax(rebuild_logits(ids, lp, tail, V, "renormalize"), -1)
    assert torch.allclose(qr.gather(-1, ids).sum(-1), torch.ones(ids.shape[0]), atol=1e-5)


def test_refusals(tmp_path, teacher, ds):
    path = tmp_path / "c"
    TokenCache.build(teacher, ds, path, k=8)
    with pytest.raises(CacheMismatchError, match="teacher fingerprint"):
        TokenCache.open(path, teacher=tiny_llama(seed=1))
    with pytest.raises(CacheMismatchError, match="data fingerprint"):
        TokenCache.open(path, dataset=dataset(seed=3))
    TokenCache.open(path, teacher=teacher, dataset=ds)  # the right ones pass
    with pytest.raises(CacheMismatchError, match="other teacher"):
        TokenCache.build(tiny_llama(seed=1), ds, path, k=8)
    cache = TokenCache.open(path)
    with pytest.raises(CacheMismatchError, match="index range"):
        cache(ds.collate(torch.tensor([0, 1])).__class__(ds.collate(torch.tensor([0, 1])).inputs,
                                                         ds.collate(torch.tensor([0, 1])).targets,
                                                         torch.tensor([0, len(ds)])))
    other = dataset(seed=5)  # same count, other lengths
    b = other.collate(torch.arange(3))
    with pytest.raises(CacheMismatchError, match="length check"):
        cache(b)
    # a corrupt file: one byte flipped, same size
    f = path / "logprobs.npy"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="checksum check failed.*logprobs.npy"):
        TokenCache.open(path)
    (path / "ids.npy").write_bytes(b"short")
    with pytest.raises(CacheError, match="truncated"):
        TokenCache.open(path, verify=False)
    with pytest.raises(CacheError, match="manifest.json is missing"):
        TokenCache.open(tmp_path / "nothing")


def data_bytes(path, fname):
    """Bytes of a .npy file's array (its size less the header)."""
    with open(path / fname, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0)(f)
        return (path / fname).stat().st_size - f.tell()


@pytest.mark.parametrize("value_dtype, value_bits, curve, exact_k", [
    ("float16", None, None, None), ("float32", 4, None, 3), ("bfloat16", 2, None, 1), ("float16", 5, None, 6),
    ("float16", None, 4, 2), ("float32", None, 6, 1)])
def test_encoded_lookup_and_bytes(tmp_path, teacher, ds, value_dtype, value_bits, curve, exact_k):
    from kdistill.teacher.cache.bitpack import eval_curve, fit_curve, max_quantization_error

    k = 8
    cache = TokenCache.build(teacher, ds, tmp_path / "c", k=k, value_dtype=value_dtype, value_bits=value_bits,
                             curve=curve, exact_k=exact_k)
    m = cache.manifest
    assert (m["format_version"], m["id_bits"], m["value_bits"], m["curve"], m["exact_k"]) == (
        2, 9, value_bits, curve, exact_k)
    # bytes_per_position is what the per-position files hold, divided by the positions
    per_position = [f for f, info in m["files"].items() if info["role"] not in ("offsets", "lengths")]
    extra = {"codes.npy", "low.npy"} if value_bits is not None else {"curve.npy"} if curve is not None else set()
    assert set(per_position) == {"ids.npy", "logprobs.npy", "tail.npy"} | extra
    stored = sum(data_bytes(cache.path, f) for f in per_position)
    assert stored == cache.bytes_per_position * cache.num_positions
    vb = {"float16": 2, "bfloat16": 2, "float32": 4}[value_dtype]
    exact = k if exact_k is None else exact_k
    rest = (-(-(k - exact) * value_bits // 8) + vb if value_bits is not None
            else curve * vb if curve is not None else 0)
    assert cache.bytes_per_position == 9 + exact * vb + rest + vb  # 8 ids of 9 bits: 9 bytes
    # lookup: the teacher's top-k ids exactly, the exact values to the dtype, the codes within their bound
    rows = torch.tensor([2, 0, 7])
    batch = ds.collate(rows)
    lp = live_logprobs(teacher, batch)[batch.token_mask]
    want, want_ids = lp.topk(k, dim=-1)
    ids, vals, tail, counts = cache.lookup(rows)
    assert ids.dtype == torch.int64 and vals.dtype == torch.float32 and tail.dtype == torch.float32
    assert torch.equal(ids, want_ids) and torch.equal(counts, batch.token_mask.sum(1))
    rel = {"float16": 2**-11, "bfloat16": 2**-8, "float32": 2**-24}[value_dtype]
    assert torch.allclose(vals[:, :exact].double(), want[:, :exact], rtol=2 * rel, atol=1e-5)
    if value_bits is not None:
        tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[value_dtype]
        low = torch.from_numpy(np.load(cache.path / "low.npy").view(np.int16)).view(torch.bfloat16) \
            if value_dtype == "bfloat16" else torch.from_numpy(np.load(cache.path / "low.npy")).to(tdt)
        start = cache._offsets[rows]
        lows = torch.cat([low[int(s):int(s) + int(c)] for s, c in zip(start, counts)])
        bound = max_quantization_error(vals[:, exact - 1].double(), lows.double(), value_bits, tdt)
        err = (vals[:, exact:].double() - want[:, exact:]).abs().amax(-1)
        assert torch.all(err <= bound + 2 * rel * want.abs().amax(-1) + 1e-5)
    if curve is not None:  # the stored coefficients are the rounded fit of the teacher's values
        tdt = {"float16": torch.float16, "float32": torch.float32}[value_dtype]
        want_rest = eval_curve(fit_curve(want[:, exact:], curve, tdt), k - exact)
        assert torch.allclose(vals[:, exact:], want_rest, atol=1e-5)
        assert float((vals[:, exact:].double() - want[:, exact:]).abs().mean()) < 0.1
    want_tail = torch.logsumexp(lp.scatter(-1, want_ids, -float("inf")), -1)
    assert torch.allclose(tail.double(), want_tail, rtol=2 * rel, atol=1e-5)
    # the served distribution stays close to the float one
    full = TokenCache.build(teacher, ds, tmp_path / "f", k=k, value_dtype="float32")
    assert abs(kl_full_vs_rebuilt(cache, teacher, ds) - kl_full_vs_rebuilt(full, teacher, ds)) < 0.05


def test_other_encoding_and_old_format_refused(tmp_path, teacher, ds):
    path = tmp_path / "c"
    TokenCache.build(teacher, ds, path, k=8, value_bits=4)
    TokenCache.build(teacher, ds, path, k=8, value_bits=4, exact_k=4)  # the same settings: opened
    with pytest.raises(CacheMismatchError, match="value_bits"):
        TokenCache.build(teacher, ds, path, k=8)
    with pytest.raises(CacheMismatchError, match="exact_k"):
        TokenCache.build(teacher, ds, path, k=8, value_bits=4, exact_k=2)
    with pytest.raises(CacheMismatchError, match="curve"):
        TokenCache.build(teacher, ds, path, k=8, curve=4)
    with pytest.raises(ValueError, match="exact_k applies to value codes or a curve only"):
        TokenCache.build(teacher, ds, path, k=8, exact_k=2)
    # a cache of format version 1 (ids as uint16, no bit packing): refused, rebuilt with overwrite
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="format version 1.*reads version 2.*rebuild it"):
        TokenCache.open(path)
    with pytest.raises(CacheError, match="rebuild it"):
        TokenCache.build(teacher, ds, path, k=8, value_bits=4)
    cache = TokenCache.build(teacher, ds, path, k=8, value_bits=4, overwrite=True)
    assert cache.manifest["format_version"] == 2


class Crashing(torch.nn.Module):
    """Wraps a model; raises on the ``after``-th forward."""

    def __init__(self, model, after):
        super().__init__()
        self.model, self.after, self.calls = model, after, 0

    def forward(self, **kw):
        self.calls += 1
        if self.after is not None and self.calls > self.after:
            raise KeyboardInterrupt("killed")
        return self.model(**kw)


@pytest.mark.parametrize("value_bits", [None, 3])
def test_killed_build_resumes(tmp_path, teacher, ds, value_bits):
    ref = TokenCache.build(teacher, ds, tmp_path / "ref", k=8, batch_size=3, value_bits=value_bits)
    wrapped = Crashing(teacher, after=2)
    with pytest.raises(KeyboardInterrupt):
        TokenCache.build(wrapped, ds, tmp_path / "c", k=8, batch_size=3, value_bits=value_bits)
    assert not (tmp_path / "c").exists()
    progress = json.loads(next(tmp_path.glob("c.tmp-*")).joinpath("progress.json").read_text())
    assert progress["rows_done"] == 6
    wrapped.after, wrapped.calls = None, 0
    cache = TokenCache.build(wrapped, ds, tmp_path / "c", k=8, batch_size=3, value_bits=value_bits)
    assert wrapped.calls == 2  # only the 6 sequences left: two batches
    files = set(cache.manifest["files"])
    assert ("codes.npy" in files) == (value_bits is not None)
    for f in files:
        assert np.array_equal(np.load(tmp_path / "c" / f), np.load(tmp_path / "ref" / f))
    assert cache.manifest["dataset"]["fingerprint"] == ref.manifest["dataset"]["fingerprint"]
    assert not list(tmp_path.glob("c.tmp-*"))


def test_distiller_trains_from_cache_and_matches_live(tmp_path, teacher, ds):
    from kdistill import Distiller
    from kdistill.losses.tokens import TokenKLLoss

    cache = TokenCache.build(teacher, ds, tmp_path / "c", k=V, value_dtype="float16")
    student = tiny_llama(seed=7)
    batch = ds.collate(torch.arange(len(ds)))
    with torch.no_grad():
        s = type(cache)  # noqa: F841
        from kdistill.outputs import Outputs
        so = Outputs(student(**batch.inputs).logits)
        live = TokenKLLoss()(so, Outputs(teacher(**batch.inputs).logits), batch)
        cached = TokenKLLoss()(so, cache(batch), batch)
    assert abs(float(live) - float(cached)) < 1e-3 * max(1.0, float(live))

    topk = TokenCache.open(tmp_path / "c", tail="bucket")
    d = Distiller(student, teacher=topk)
    d.compile(optimizer=torch.optim.Adam(student.parameters(), lr=1e-3), distillation_loss_fn=TokenKLLoss(),
              alpha=0.0)
    before = float(TokenKLLoss()(Outputs(student(**batch.inputs).logits.detach()), topk(batch), batch))
    d.fit(ds, epochs=3, batch_size=4, verbose=0)
    with torch.no_grad():
        after = float(TokenKLLoss()(Outputs(student(**batch.inputs).logits), topk(batch), batch))
    assert after < before
