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
    assert cache.manifest["id_dtype"] == np.dtype(np.uint16).str
    assert cache.bytes_per_position == 16 * (2 + 4) + 4
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
        assert cache.bytes_per_position == 8 * 4 + 2
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


def test_killed_build_resumes(tmp_path, teacher, ds):
    ref = TokenCache.build(teacher, ds, tmp_path / "ref", k=8, batch_size=3)
    wrapped = Crashing(teacher, after=2)
    with pytest.raises(KeyboardInterrupt):
        TokenCache.build(wrapped, ds, tmp_path / "c", k=8, batch_size=3)
    assert not (tmp_path / "c").exists()
    progress = json.loads(next(tmp_path.glob("c.tmp-*")).joinpath("progress.json").read_text())
    assert progress["rows_done"] == 6
    wrapped.after, wrapped.calls = None, 0
    cache = TokenCache.build(wrapped, ds, tmp_path / "c", k=8, batch_size=3)
    assert wrapped.calls == 2  # only the 6 sequences left: two batches
    for f in ("ids.npy", "logprobs.npy", "tail.npy", "offsets.npy"):
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
