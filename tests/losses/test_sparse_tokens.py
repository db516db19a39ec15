"""Token losses against a sparse (top-k) teacher: the same values and gradients as against
its dense logits, checked against the formula, and the Distiller's shared log-probabilities."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill import Distiller
from kdistill.data.text import TokenDataset
from kdistill.losses.tokens import (GeneralizedJSDLoss, SkewKLLoss, SkewReverseKLLoss, TokenKLLoss,
                                    TotalVariationLoss, token_kl_loss)
from kdistill.outputs import IGNORE_INDEX, Batch, Outputs, TopKLogits
from kdistill.teacher import Teacher

B, T, V, K = 3, 7, 50, 6


def sparse_teacher(mask: torch.Tensor, k: int = K, vocab: int = V, seed: int = 0, floor: bool = False) -> TopKLogits:
    """Random top-k rows at the trained-on positions: distinct ids, values above the fill."""
    g = torch.Generator().manual_seed(seed)
    p = int(mask.sum())
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(p)])
    values = torch.randn(p, k, generator=g, dtype=torch.float64) * 2 + 3
    fill = values.amin(-1) - (1e4 if floor else 2.0 + torch.rand(p, generator=g, dtype=torch.float64))
    return TopKLogits(ids=ids, values=values, fill=fill, positions=mask, vocab_size=vocab)


def token_batch(seed: int = 0) -> tuple[torch.Tensor, Batch]:
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :2] = IGNORE_INDEX  # a prompt
    targets[:, -1] = IGNORE_INDEX  # the last position predicts nothing
    targets[2, 4:] = IGNORE_INDEX  # padding
    student = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).requires_grad_()
    return student, Batch(inputs=torch.zeros(B, T, dtype=torch.long), targets=targets)


LOSSES = [
    lambda t: TokenKLLoss(temperature=t),
    lambda t: TokenKLLoss("reverse", temperature=t),
    lambda t: GeneralizedJSDLoss(0.5, temperature=t),
    lambda t: SkewKLLoss(0.1, temperature=t),
    lambda t: SkewReverseKLLoss(0.1, temperature=t),
    lambda t: TotalVariationLoss(temperature=t),
]


def value_and_grad(loss, student: torch.Tensor, teacher: Outputs, batch: Batch) -> tuple[float, torch.Tensor]:
    student.grad = None
    value = loss(Outputs(student), teacher, batch)
    value.backward()
    return float(value.detach()), student.grad.clone()


@pytest.mark.parametrize("make", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [None, 4, 0])
def test_sparse_teacher_gives_the_dense_teachers_value_and_gradient(make, temperature, chunk_size):
    student, batch = token_batch()
    topk = sparse_teacher(batch.token_mask)
    loss = make(temperature)
    loss.chunk_size = chunk_size
    dense = value_and_grad(loss, student, Outputs(topk.dense()), batch)
    sparse = value_and_grad(loss, student, Outputs(topk=topk), batch)
    assert sparse[0] == pytest.approx(dense[0], rel=1e-10, abs=1e-12)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-9, atol=1e-12)
    assert dense[0] > 0 and float(dense[1].abs().sum()) > 0


def test_sparse_forward_kl_is_the_formula():
    """KL(p_t || p_s) written out in float64: p_t the softmax of the k values and V - k
    copies of the fill, at T = 2, times T^2, averaged over the trained-on positions."""
    student, batch = token_batch(seed=3)
    mask = batch.token_mask
    topk = sparse_teacher(mask, seed=3)
    t = 2.0
    expected = []
    z_s = student.detach()[mask]
    for p in range(int(mask.sum())):
        full = torch.full((V,), float(topk.fill[p]), dtype=torch.float64)
        full[topk.ids[p]] = topk.values[p]
        log_pt = torch.log_softmax(full / t, -1)
        log_ps = torch.log_softmax(z_s[p] / t, -1)
        expected.append(float((log_pt.exp() * (log_pt - log_ps)).sum()))
    got = TokenKLLoss(temperature=t)(Outputs(student), Outputs(topk=topk), batch)
    assert float(got.detach()) == pytest.approx(t * t * sum(expected) / len(expected), rel=1e-10)


@pytest.mark.parametrize("make", LOSSES[:2])
def test_no_tail_and_a_floored_tail(make):
    """k = V (nothing outside the top k) and a fill 1e4 below (a renormalised top k): finite,
    and as the dense teacher gives."""
    student, batch = token_batch(seed=1)
    for topk in (sparse_teacher(batch.token_mask, k=V), sparse_teacher(batch.token_mask, floor=True)):
        loss = make(1.0)
        dense = value_and_grad(loss, student, Outputs(topk.dense()), batch)
        sparse = value_and_grad(loss, student, Outputs(topk=topk), batch)
        assert math.isfinite(sparse[0])
        assert sparse[0] == pytest.approx(dense[0], rel=1e-9)
        torch.testing.assert_close(sparse[1], dense[1], rtol=1e-8, atol=1e-12)


def test_the_kept_student_log_probs_give_the_same_loss_and_gradient():
    """With the student's log-probabilities kept on its Outputs (as the Distiller keeps them
    for the label loss), the forward KL reads them: the same value and gradient through
    label loss + KL as the dense computation."""
    student, batch = token_batch(seed=2)
    topk = sparse_teacher(batch.token_mask, seed=2)
    loss = TokenKLLoss()
    flat = batch.targets.reshape(-1)

    def total(out: Outputs, teacher: Outputs) -> torch.Tensor:
        label = F.nll_loss(out.log_probs(1.0).reshape(-1, V), flat, ignore_index=IGNORE_INDEX)
        return 0.3 * label + 0.7 * loss(out, teacher, batch)

    out = Outputs(student)
    value = total(out, Outputs(topk=topk))
    assert out.kept_log_probs(1.0) is not None  # the path under test was taken
    value.backward()
    grad_sparse = student.grad.clone()
    student.grad = None
    ref = 0.3 * F.cross_entropy(student.reshape(-1, V), flat, ignore_index=IGNORE_INDEX) + 0.7 * token_kl_loss(
        student, topk.dense(), mask=batch.token_mask, chunk_size=0)
    ref.backward()
    assert float(value.detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
    torch.testing.assert_close(grad_sparse, student.grad, rtol=1e-9, atol=1e-12)


def test_kept_log_probs_without_a_graph_are_not_reused_for_training():
    student, _ = token_batch()
    out = Outputs(student)
    with torch.no_grad():
        out.log_probs(1.0)
    assert out.kept_log_probs(1.0) is None  # gradients are enabled here: a graph is needed
    assert out.log_probs(1.0).requires_grad
    assert out.kept_log_probs(2.0) is None


def test_a_loss_counting_positions_without_sparse_rows_is_refused():
    student, batch = token_batch()
    topk = sparse_teacher(batch.token_mask)
    wider = batch.token_mask.clone()
    wider[0, 0] = True  # a prompt position: no teacher row there
    with pytest.raises(ValueError, match="hold no row"):
        token_kl_loss(student, topk, mask=wider)
    with pytest.raises(ValueError, match="give the loss the batch"):
        token_kl_loss(student, topk)


def test_dense_logits_are_built_only_when_asked():
    _, batch = token_batch()
    topk = sparse_teacher(batch.token_mask)
    out = Outputs(topk=topk)
    assert out.shape == (B, T, V) and out._logits is None
    dense = out.logits
    assert dense.shape == (B, T, V)
    mask = batch.token_mask
    assert bool((dense[~mask] == 0).all())
    first = dense[mask][0]
    assert torch.equal(first[topk.ids[0]], topk.values[0])
    others = torch.ones(V, dtype=torch.bool)
    others[topk.ids[0]] = False
    assert bool((first[others] == topk.fill[0]).all())


# ------------------------------------------------------------------ through the Distiller


class TinyLM(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(V, 16)
        self.head = torch.nn.Linear(16, V)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.emb(input_ids)))


class TopKTeacher(Teacher):
    """A teacher model's top-k rows with a bucket tail, served sparse or dense."""

    def __init__(self, model, sparse: bool):
        self.model, self.sparse = model, sparse

    def __call__(self, batch: Batch) -> Outputs:
        with torch.no_grad():
            lp = torch.log_softmax(self.model(**batch.inputs), -1)[batch.token_mask]
        values, ids = lp.topk(K, -1)
        tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-6))
        topk = TopKLogits(ids=ids, values=values, fill=tail - math.log(V - K), positions=batch.token_mask,
                          vocab_size=V)
        return Outputs(topk=topk) if self.sparse else Outputs(topk.dense())


@pytest.mark.parametrize("alpha", [0.5, 0.0])
@pytest.mark.parametrize("loss", ["forward", "reverse"])
def test_distiller_trains_the_same_from_a_sparse_teacher(alpha, loss, monkeypatch):
    """Sparse and dense teachers train the student to the same weights; with the forward
    KL the Distiller's kept log-probabilities are read (at alpha 0 too: they keep their
    graph though the label loss is computed without)."""
    from kdistill.losses import tokens

    shared = []
    apply = tokens._SparseKLOnLogProbs.apply
    monkeypatch.setattr(tokens._SparseKLOnLogProbs, "apply", lambda *a: shared.append(1) or apply(*a))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, V, (int(n),), generator=g).tolist() for n in torch.randint(4, 12, (16,), generator=g)]
    data = TokenDataset.from_sequences(seqs, [[i >= 2 for i in range(len(q))] for q in seqs], pad_id=0)
    teacher = TinyLM(seed=1)
    ends = {}
    for sparse in (True, False):
        student = TinyLM(seed=2)
        start = {k: v.clone() for k, v in student.state_dict().items()}
        d = Distiller(student, teacher=TopKTeacher(teacher, sparse))
        d.compile(optimizer="sgd", learning_rate=0.5, alpha=alpha, distillation_loss_fn=TokenKLLoss(loss))
        d.fit(data, epochs=2, batch_size=4, shuffle=False, verbose=0)
        ends[sparse] = student.state_dict()
    assert len(shared) == (8 if loss == "forward" else 0)  # 2 epochs of 4 batches
    for name, value in ends[True].items():
        torch.testing.assert_close(value, ends[False][name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(value, start[name])  # it trained (at alpha 0 from the KL alone)
