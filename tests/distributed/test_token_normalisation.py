"""Language-model training on 2 CPU processes (torchrun, Gloo) whose shares of the batch
hold very different numbers of trained-on tokens (25 and 3): one SGD step moves the
weights as one step on the mean over all 28 tokens, computed here by hand in one process,
whether the step is one batch, two accumulated micro-batches or a distillation step.

The processes are started once (``token_workers.py``), for every case in turn."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "token_workers.py"
# the case expected to abort the processes (see its test) last
CASES = ("step", "accumulate", "distil", "distil_empty", "empty")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with the Gloo backend is not available"),
]
pytest.importorskip("transformers")

import token_workers as tw  # noqa: E402 - after the skips: it needs transformers
from launch import case_results as both_ran  # noqa: E402
from launch import worker_results  # noqa: E402

IGNORE = -100


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[dict[int, dict], Path]:
    out = tmp_path_factory.mktemp("tokens")
    # (the exit status is not asserted: a case that aborts the processes is reported by its own test)
    found, _ = worker_results(WORKERS, ",".join(CASES), out)
    return found, out


def case_results(two_processes, case: str) -> tuple[dict, dict, Path]:
    found, out = two_processes
    return (*both_ran(found, case), out)


# ---------------------------------------------------------------- references, by hand
def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained-on (prediction, target) pairs: position t predicts label t + 1."""
    z, y = logits[:, :-1], labels[:, 1:]
    keep = y != IGNORE
    return z[keep], y[keep]


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z, y = shifted(logits, labels)
    return -(z.double().log_softmax(-1).gather(1, y[:, None])).mean()


def forward(model, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits


def sgd_step(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss.float(), list(params.values()), allow_unused=True)
    return {k: (p - tw.LR * g if g is not None else p).detach() for (k, p), g in zip(params.items(), grads)}


def select(rows: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in rows.items()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def reference(lengths=tw.LENGTHS) -> tuple[dict[str, torch.Tensor], float]:
    """One SGD step on the mean cross-entropy over every trained-on token of the 8 rows,
    and that mean (the loss the step logs)."""
    model, rows = tw.model(), tw.rows(lengths)
    loss = token_ce(forward(model, rows), rows["labels"])
    return sgd_step(model, loss), float(loss.detach())


# ---------------------------------------------------------------- the tests
def test_the_processes_hold_unequal_tokens():
    rows = tw.rows()
    per_row = (rows["labels"][:, 1:] != IGNORE).sum(1)
    assert int(per_row[0::2].sum()) == 25 and int(per_row[1::2].sum()) == 3
    # weighing each process's token mean equally (DDP's plain average) is another step
    model = tw.model()
    naive = sum(token_ce(forward(model, select(rows, slice(r, None, 2))), rows["labels"][r::2]) for r in (0, 1)) / 2
    assert max_difference(sgd_step(model, naive), reference()[0]) > 1e-3


@pytest.mark.parametrize("case, tokens", [("step", ([25], [3])), ("accumulate", ([14, 11], [0, 3]))])
def test_two_processes_step_as_one_process_on_every_token(two_processes, case, tokens):
    rank0, rank1, out = case_results(two_processes, case)
    assert (rank0["tokens"], rank1["tokens"]) == tokens  # what each process trained on
    assert rank0["steps"] == rank1["steps"] == 1  # one optimizer step
    expected, loss = reference()
    got = torch.load(out / f"{case}.pt", weights_only=True)
    assert max_difference(got, expected) < 1e-5
    # the logged loss: the mean over all 28 tokens, the same on both processes
    assert rank0["history"] == rank1["history"]
    assert rank0["history"]["loss"][0] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("case, lengths, tokens", [("distil", tw.LENGTHS, ([25], [3])),
                                                   ("distil_empty", tw.EMPTY_ON_RANK_1, ([25], [0]))])
def test_a_two_process_distillation_step_weighs_every_token_alike(two_processes, case, lengths, tokens):
    rank0, rank1, out = case_results(two_processes, case)
    assert (rank0["tokens"], rank1["tokens"]) == tokens
    # by hand: alpha * CE + (1 - alpha) * T^2 KL(teacher || student), both over every trained-on token
    student, teacher, rows = tw.model(), tw.model(seed=7), tw.rows(lengths)
    s_logits = forward(student, rows)
    with torch.no_grad():
        t_logits = forward(teacher, rows)
    t = tw.TEMPERATURE
    s_tok, _ = shifted(s_logits, rows["labels"])
    t_tok, _ = shifted(t_logits, rows["labels"])
    log_s, log_t = (s_tok.double() / t).log_softmax(-1), (t_tok.double() / t).log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * t * t
    ce = token_ce(s_logits, rows["labels"])
    expected = sgd_step(student, tw.ALPHA * ce + (1 - tw.ALPHA) * kl)
    assert max_difference(torch.load(out / f"{case}.pt", weights_only=True), expected) < 1e-5
    assert rank0["history"]["distillation_loss"][0] == pytest.approx(float(kl.detach()), rel=1e-5)


def test_a_process_without_trained_on_tokens_still_takes_the_step(two_processes):
    lengths = tw.EMPTY_ON_RANK_1
    rows = tw.rows(lengths)
    assert int((rows["labels"][1::2, 1:] != IGNORE).sum()) == 0  # rank 1 has nothing to train on
    rank0, rank1, out = case_results(two_processes, "empty")
    expected, loss = reference(lengths)
    assert max_difference(torch.load(out / "empty.pt", weights_only=True), expected) < 1e-5
    assert rank0["history"]["loss"][0] == pytest.approx(loss, rel=1e-5)
