"""The engine on language models (tiny Hugging Face causal LMs built from configs, nothing
downloaded): the next-token loss is the mean over trained-on tokens, accumulation weighs
micro-batches by their tokens, distillation compares token distributions (over the first
``vocab_size`` logits of padded heads), and dict inputs are passed as keyword arguments
(``use_cache=False`` for Hugging Face models only). Every expected value is computed here
by hand: the shift of the labels, the masked cross-entropy, the KL divergence, the SGD step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdistill import Distiller, Trainer
from kdistill.errors import ModelInputError
from kdistill.losses import KDLoss, TokenKLLoss
from kdistill.outputs import IGNORE_INDEX, Batch, next_token_targets

transformers = pytest.importorskip("transformers")

VOCAB, T = 64, 8


# ---------------------------------------------------------------- models and data
def llama(vocab: int = VOCAB, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def gpt2(vocab: int = VOCAB, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def hf_rows(lengths: list[int], prompt: int = 0, seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Right-padded sequences of ``T`` positions, ``lengths[i]`` real tokens in row ``i``;
    Hugging Face ``labels``: the ids, -100 on the padding and the first ``prompt`` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)  # the pad token
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :prompt] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def as_batch(rows: dict[str, torch.Tensor]) -> Batch:
    return Batch({"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]},
                 next_token_targets(rows["labels"]))


def concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class TokenRows(Dataset):
    """One sequence per item, as ``fit``/``evaluate`` read dict items (``inputs``, ``targets``)."""

    def __init__(self, rows: dict[str, torch.Tensor]):
        self.rows, self.targets = rows, next_token_targets(rows["labels"])

    def __len__(self) -> int:
        return self.rows["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"inputs": {"input_ids": self.rows["input_ids"][i], "attention_mask": self.rows["attention_mask"][i]},
                "targets": self.targets[i]}


def batches(items: list[Batch]) -> DataLoader:
    """A DataLoader yielding the given Batches as they are, in order."""
    return DataLoader(items, batch_size=None, collate_fn=lambda b: b)


# ---------------------------------------------------------------- references, by hand
def logits_of(model: nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (prediction, target) pairs of the trained-on tokens: position t predicts label t+1."""
    z, y = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    keep = y != IGNORE_INDEX
    return z[keep], y[keep]  # (N, V), (N,)


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the trained-on tokens of -log softmax(z)[target]."""
    z, y = shifted(logits, labels)
    return -(z.double().log_softmax(-1).gather(1, y[:, None])).mean().to(logits.dtype)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    z, y = shifted(logits, labels)
    return float((z.argmax(-1) == y).double().mean())


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over positions of sum_v p_t (log p_t - log p_s), in float64."""
    log_s = (student_logits.double() / temperature).log_softmax(-1)
    log_t = (teacher_logits.double() / temperature).log_softmax(-1)
    per_position = (log_t.exp() * (log_t - log_s)).sum(-1)
    return per_position.mean() * temperature ** 2


def sgd_step(model: nn.Module, loss: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
    """The weights after ``p - lr * dloss/dp`` (the model itself is left as it is)."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {name: (p - lr * g if g is not None else p).detach().clone()
            for (name, p), g in zip(params.items(), grads)}


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# lengths with very different numbers of trained-on tokens, and a prompt of 2 tokens
ROWS = dict(lengths=[8, 5, 3], prompt=2)


# ---------------------------------------------------------------- 1. the next-token loss
@pytest.mark.parametrize("build", [llama, gpt2])
def test_train_step_loss_is_the_mean_cross_entropy_over_trained_on_tokens(build):
    model = build()
    rows = hf_rows(**ROWS)
    assert int((rows["labels"][:, 1:] != IGNORE_INDEX).sum()) == 6 + 3 + 1  # the tokens trained on
    with torch.no_grad():
        expected = token_ce(logits_of(model, rows), rows["labels"])
    trainer = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.1), metrics=["accuracy"])
    logs = trainer.train_step(as_batch(rows))
    assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-5)
    # the unmasked mean (every position, padding and prompt included) would be another number
    with torch.no_grad():
        z = logits_of(build(), rows)
        everything = F.cross_entropy(z[:, :-1].reshape(-1, VOCAB), rows["input_ids"][:, 1:].reshape(-1))
    assert abs(float(everything) - float(expected)) > 1e-3


def test_evaluate_and_test_step_are_token_means_and_accuracy_is_top1_over_trained_on_tokens():
    model = llama()
    rows = hf_rows(**ROWS)
    trainer = Trainer(model, device="cpu").compile(torch.optim.Adam(model.parameters(), lr=3e-2),
                                                   metrics=["accuracy"])
    batch = as_batch(rows)
    for _ in range(15):  # part-way through memorising the batch: an accuracy strictly inside (0, 1)
        trainer.train_step(batch)
    model.eval()
    with torch.no_grad():
        logits = logits_of(model, rows)
    expected_loss, expected_acc = float(token_ce(logits, rows["labels"])), token_accuracy(logits, rows["labels"])
    assert 0.0 < expected_acc < 1.0
    with torch.no_grad():
        logs = trainer.test_step(batch)
    assert float(logs["loss"]) == pytest.approx(expected_loss, rel=1e-5)
    assert float(logs["accuracy"]) == pytest.approx(expected_acc, abs=1e-6)
    # evaluate in batches of 2 sequences (10 tokens, then 1): the mean over the 11 tokens, not of the batches
    result = trainer.evaluate(TokenRows(rows), batch_size=2)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(expected_acc, abs=1e-6)
    per_batch = [token_ce(logits[i:i + 2], rows["labels"][i:i + 2]) for i in (0, 2)]
    assert abs(float(sum(per_batch)) / 2 - expected_loss) > 1e-3  # the mean of the two batches' means differs


def test_an_epochs_training_log_is_the_mean_over_its_tokens():
    # lr 0: every step sees the initial weights, so the epoch's loss is the loss of the whole data
    model = llama()
    rows = hf_rows(lengths=[8, 2, 6, 3], prompt=1)
    with torch.no_grad():
        expected = float(token_ce(logits_of(model, rows), rows["labels"]))
    trainer = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.0))
    history = trainer.fit(TokenRows(rows), epochs=1, batch_size=2, shuffle=False, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-5)


def test_the_progress_line_counts_trained_on_tokens_per_second(capsys):
    model = llama()
    rows = hf_rows(lengths=[8, 2, 6, 3], prompt=1)
    trainer = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.0))
    trainer.fit(TokenRows(rows), epochs=1, batch_size=2, shuffle=False, verbose=2)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.endswith("tokens/s") and "samples/s" not in line
    assert trainer._last_batch_tokens == int((next_token_targets(rows["labels"][2:]) >= 0).sum())


def test_a_target_beyond_the_vocabulary_is_refused_naming_both():
    model = llama()
    rows = hf_rows(**ROWS)
    batch = as_batch(rows)
    batch.targets[0, 3] = VOCAB + 5
    trainer = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=rf"token target is {VOCAB + 5} but the model scores {VOCAB} tokens"):
        trainer.train_step(batch)


# ---------------------------------------------------------------- 2. accumulation counts tokens
# three micro-batches of two sequences holding 14, 1 and 6 trained-on tokens
MICRO = [dict(lengths=[8, 8], seed=1), dict(lengths=[2, 1], seed=2), dict(lengths=[5, 3], seed=3)]
LR = 0.5


def micro_rows() -> list[dict[str, torch.Tensor]]:
    parts = [hf_rows(**m) for m in MICRO]
    assert [int((p["labels"][:, 1:] != IGNORE_INDEX).sum()) for p in parts] == [14, 1, 6]
    return parts


def token_mean_step() -> dict[str, torch.Tensor]:
    """One SGD step on the mean over all 21 tokens of the three micro-batches."""
    model = llama()
    everything = concat(micro_rows())
    return sgd_step(model, token_ce(logits_of(model, everything), everything["labels"]), LR)


def micro_batches(source: str) -> DataLoader:
    """The three micro-batches, as kdistill Batches or as Hugging Face style dicts."""
    parts = micro_rows()
    return batches([as_batch(p) for p in parts] if source == "batches" else parts)


@pytest.mark.parametrize("source", ["batches", "hf_dicts"])
def test_accumulated_micro_batches_step_as_the_whole_batch_does(source):
    model = llama()
    trainer = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=LR), accumulate_steps=3)
    trainer.fit(micro_batches(source), epochs=1, verbose=0)
    assert trainer.global_step == 1
    expected = token_mean_step()
    assert max_difference(weights(model), expected) < 1e-6
    # and one step of the engine on the three micro-batches concatenated: the same weights
    whole = llama()
    Trainer(whole, device="cpu").compile(torch.optim.SGD(whole.parameters(), lr=LR)).train_step(
        as_batch(concat(micro_rows())))
    assert max_difference(weights(whole), expected) < 1e-6


def test_the_mean_of_micro_batch_means_is_another_step():
    """What the test above rules out: weighing each micro-batch's token mean equally (its
    one token as much as the other's fourteen) moves the weights measurably elsewhere."""
    model = llama()
    parts = micro_rows()
    naive = sum(token_ce(logits_of(model, p), p["labels"]) for p in parts) / len(parts)
    naive_step = sgd_step(model, naive, LR)
    assert max_difference(naive_step, token_mean_step()) > 1e-3
    engine = llama()
    trainer = Trainer(engine, device="cpu").compile(torch.optim.SGD(engine.parameters(), lr=LR), accumulate_steps=3)
    trainer.fit(micro_batches("batches"), epochs=1, verbose=0)
    assert max_difference(weights(engine), naive_step) > 1e-3


def test_accumulation_logs_the_mean_over_tokens():
    model = llama()
    parts = micro_rows()
    everything = concat(parts)
    with torch.no_grad():
        expected = float(token_ce(logits_of(model, everything), everything["labels"]))
    trainer = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.0), accumulate_steps=3)
    history = trainer.fit(micro_batches("hf_dicts"), epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 4])  # one chunk, or chunks of 4 positions
def test_distillation_accumulated_over_token_micro_batches_steps_as_the_whole_batch(chunk_size):
    alpha, temperature = 0.4, 2.0
    teacher = llama(seed=7)
    student = gpt2()
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=LR), alpha=alpha, accumulate_steps=3,
              distillation_loss_fn=TokenKLLoss(temperature=temperature, chunk_size=chunk_size))
    d.fit(micro_batches("hf_dicts"), epochs=1, verbose=0)
    # by hand: alpha * CE + (1 - alpha) * T^2 KL, both means over the 21 trained-on tokens
    reference = gpt2()
    everything = concat(micro_rows())
    with torch.no_grad():
        t_logits = logits_of(teacher, everything)
    s_logits = logits_of(reference, everything)
    s_tok, _ = shifted(s_logits, everything["labels"])
    t_tok, _ = shifted(t_logits, everything["labels"])
    loss = alpha * token_ce(s_logits, everything["labels"]) + (1 - alpha) * kl(s_tok, t_tok, temperature).float()
    assert max_difference(weights(student), sgd_step(reference, loss, LR)) < 1e-6


# ---------------------------------------------------------------- 3. distillation between LMs
def all_valid_batch(seed: int = 5, n: int = 3, vocab: int = VOCAB) -> Batch:
    """Dict inputs without padding and a target at every position (no -100 anywhere)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    targets = torch.randint(0, vocab, (n, T), generator=g)
    return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, targets)


def test_a_distillation_step_between_two_language_models():
    teacher, student = llama(seed=1), gpt2(seed=2)
    teacher_before, student_before = weights(teacher), weights(student)
    batch = all_valid_batch()
    with torch.no_grad():
        t_logits = teacher(**batch.inputs).logits
        s_logits = student(**batch.inputs).logits
    expected_kl = float(kl(s_logits, t_logits, 1.0))
    expected_ce = float(F.cross_entropy(s_logits.double().reshape(-1, VOCAB), batch.targets.reshape(-1)))
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), alpha=0.3, distillation_loss_fn=KDLoss(temperature=1))
    logs = d.train_step(batch)
    assert float(logs["distillation_loss"]) == pytest.approx(expected_kl, rel=1e-5)
    assert float(logs["student_loss"]) == pytest.approx(expected_ce, rel=1e-5)
    assert float(logs["loss"]) == pytest.approx(0.3 * expected_ce + 0.7 * expected_kl, rel=1e-5)
    # the teacher is frozen, bit for bit; the student moved
    assert all(torch.equal(p, teacher_before[k]) for k, p in weights(teacher).items())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert max_difference(weights(student), student_before) > 1e-4


def test_a_token_loss_counts_the_trained_on_positions_only():
    teacher, student = llama(seed=1), gpt2(seed=2)
    rows = hf_rows(**ROWS)
    with torch.no_grad():
        t_logits, s_logits = logits_of(teacher, rows), logits_of(student, rows)
    s_tok, _ = shifted(s_logits, rows["labels"])
    t_tok, _ = shifted(t_logits, rows["labels"])
    expected = float(kl(s_tok, t_tok, 1.0))
    assert abs(float(kl(s_logits, t_logits, 1.0)) - expected) > 1e-4  # over every position: another number
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), alpha=0.3,
              distillation_loss_fn=TokenKLLoss(temperature=1.0))
    logs = d.train_step(as_batch(rows))
    assert float(logs["distillation_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(logs["student_loss"]) == pytest.approx(float(token_ce(s_logits, rows["labels"])), rel=1e-5)


def test_the_default_distillation_loss_counts_the_trained_on_positions_only():
    teacher, student = llama(seed=1), gpt2(seed=2)
    rows = hf_rows(**ROWS)
    with torch.no_grad():
        t_logits, s_logits = logits_of(teacher, rows), logits_of(student, rows)
    s_tok, _ = shifted(s_logits, rows["labels"])
    t_tok, _ = shifted(t_logits, rows["labels"])
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), alpha=0.3, temperature=3.0)
    logs = d.train_step(as_batch(rows))
    # (rel 1e-3: a small KL summed from float32 differences of log-probabilities; unmasked it is 15% off)
    assert float(logs["distillation_loss"]) == pytest.approx(float(kl(s_tok, t_tok, 3.0)), rel=1e-3)


def test_unlabelled_token_batches_train_on_the_distillation_term_alone():
    teacher, student = llama(seed=1), gpt2(seed=2)
    labelled = all_valid_batch()
    batch = Batch(labelled.inputs, None)
    with torch.no_grad():
        expected_kl = float(kl(student(**batch.inputs).logits, teacher(**batch.inputs).logits, 1.0))
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), alpha=0.3, distillation_loss_fn=KDLoss(temperature=1))
    logs = d.train_step(batch)
    assert float(logs["student_loss"]) == 0.0
    assert float(logs["distillation_loss"]) == pytest.approx(expected_kl, rel=1e-5)
    assert float(logs["loss"]) == pytest.approx(0.7 * expected_kl, rel=1e-5)


def test_distiller_fit_on_token_data_leaves_the_teacher_as_it_was():
    teacher, student = llama(seed=1), gpt2(seed=2)
    teacher_before, student_before = weights(teacher), weights(student)
    rows = hf_rows(lengths=[8, 6, 2, 5], prompt=1)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.Adam(student.parameters(), lr=1e-2), metrics=["accuracy"], alpha=0.5,
              distillation_loss_fn=KDLoss(temperature=2))
    history = d.fit(TokenRows(rows), epochs=2, batch_size=2, verbose=0, validation_data=TokenRows(rows))
    h = history.history
    assert len(h["loss"]) == 2 and all(v == v for v in h["loss"])  # two finite epochs
    assert {"student_loss", "distillation_loss", "accuracy", "val_loss", "val_accuracy"} <= set(h)
    assert all(torch.equal(p, teacher_before[k]) for k, p in weights(teacher).items())
    assert max_difference(weights(student), student_before) > 1e-4


# ---------------------------------------------------------------- 4. vocabularies
def test_heads_of_different_sizes_are_refused_naming_both_and_vocab_size():
    teacher, student = llama(vocab=64, seed=1), llama(vocab=72, seed=2)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=1))
    with pytest.raises(ValueError) as info:
        d.train_step(all_valid_batch())
    message = str(info.value)
    assert "72" in message and "64" in message and "vocab_size" in message
    with pytest.raises(ValueError, match="vocab_size"):  # fit refuses it the same way, before training
        d.fit(TokenRows(hf_rows(**ROWS)), epochs=1, batch_size=2, verbose=0)


@pytest.mark.parametrize("vocab_size", [64, 60])
def test_vocab_size_compares_the_first_logits_of_each_head(vocab_size):
    teacher, student = llama(vocab=64, seed=1), llama(vocab=72, seed=2)
    batch = all_valid_batch(vocab=min(vocab_size, 64))
    with torch.no_grad():
        t_logits = teacher(**batch.inputs).logits
        s_logits = student(**batch.inputs).logits
    assert s_logits.shape[-1] == 72
    expected_kl = float(kl(s_logits[..., :vocab_size], t_logits[..., :vocab_size], 1.0))
    # the student's own loss keeps its whole head (72 entries)
    expected_ce = float(F.cross_entropy(s_logits.double().reshape(-1, 72), batch.targets.reshape(-1)))
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), alpha=0.3, distillation_loss_fn=KDLoss(temperature=1),
              vocab_size=vocab_size)
    logs = d.train_step(batch)
    assert float(logs["distillation_loss"]) == pytest.approx(expected_kl, rel=1e-5)
    assert float(logs["student_loss"]) == pytest.approx(expected_ce, rel=1e-5)
    # and fit trains with it
    history = d.fit(TokenRows(hf_rows(**ROWS)), epochs=1, batch_size=2, verbose=0)
    assert history.history["distillation_loss"][0] == history.history["distillation_loss"][0]


def test_vocab_size_beyond_a_head_is_refused_naming_the_head():
    teacher, student = llama(vocab=64, seed=1), llama(vocab=72, seed=2)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=1),
              vocab_size=70)
    with pytest.raises(ValueError, match=r"vocab_size=70.*teacher scores only 64 tokens"):
        d.train_step(all_valid_batch())


@pytest.mark.parametrize("bad", [0, 1, -64, 64.0, 2.5, True, "64"])
def test_invalid_vocab_sizes_are_refused_at_compile(bad):
    teacher, student = llama(vocab=64, seed=1), llama(vocab=72, seed=2)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    with pytest.raises(ValueError, match=r"vocab_size must be an integer >= 2.*got"):
        d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=1),
                  vocab_size=bad)


# ---------------------------------------------------------------- 5. inputs and outputs
def out_of_vocabulary_batch() -> Batch:
    batch = as_batch(hf_rows(**ROWS))
    batch.inputs["input_ids"][1, 2] = VOCAB + 3  # one id past the embedding table
    return batch


def test_a_token_id_beyond_the_embeddings_names_the_vocabulary():
    model = llama()
    trainer = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ModelInputError) as info:
        trainer.train_step(out_of_vocabulary_batch())
    message = str(info.value)
    assert f"token id reaches {VOCAB + 3}" in message and f"{VOCAB} embeddings" in message
    assert "tokenizer" in message and "input_ids" in message


def test_a_token_id_beyond_the_teachers_embeddings_names_the_teacher():
    teacher, student = llama(vocab=64, seed=1), llama(vocab=72, seed=2)
    batch = as_batch(hf_rows(**ROWS))
    batch.inputs["input_ids"][0, 1] = 70  # the student's vocabulary, not the teacher's
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=1),
              vocab_size=64)
    with pytest.raises(ModelInputError, match=r"the teacher .*token id reaches 70 but the model has 64 embeddings"):
        d.train_step(batch)


def test_a_token_id_beyond_the_embeddings_is_named_in_a_later_batch_too():
    model = llama()
    trainer = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.train_step(as_batch(hf_rows(**ROWS)))  # accepted: these shapes are known now
    with pytest.raises(ModelInputError, match="embeddings"):
        trainer.train_step(out_of_vocabulary_batch())


def test_predict_returns_the_logits_of_a_model_output():
    model = llama()
    rows = hf_rows(lengths=[8, 4, 6, 2, 7])
    with torch.no_grad():
        expected = logits_of(model.eval(), rows)
    trainer = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.1))
    # dict inputs, in batches of 2 sequences
    items = [Batch({"input_ids": rows["input_ids"][i:i + 2], "attention_mask": rows["attention_mask"][i:i + 2]})
             for i in range(0, 5, 2)]
    out = trainer.predict(batches(items))
    assert isinstance(out, torch.Tensor) and out.shape == (5, T, VOCAB)
    assert torch.allclose(out, expected, atol=1e-5)
    # a tensor of ids, passed positionally
    out = trainer.predict(rows["input_ids"][:2], batch_size=2)
    with torch.no_grad():
        plain = model(rows["input_ids"][:2]).logits
    assert out.shape == (2, T, VOCAB) and torch.allclose(out, plain, atol=1e-5)


# ---------------------------------------------------------------- 6. how models are called
class CallRecorder:
    def __init__(self, module: nn.Module):
        self.calls: list[dict] = []
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append({"args": len(args), **{k: v for k, v in kwargs.items() if k == "use_cache"},
                           "keys": sorted(kwargs)})


def test_hugging_face_models_are_called_with_keywords_and_use_cache_false():
    teacher, student = llama(seed=1), gpt2(seed=2)
    assert teacher.config.use_cache and student.config.use_cache  # on by default: the engine turns it off
    seen_t, seen_s = CallRecorder(teacher), CallRecorder(student)
    rows = hf_rows(**ROWS)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=1))
    d.train_step(as_batch(rows))
    d.train_step(as_batch(rows))  # after the first (checked) call too
    d.evaluate(TokenRows(rows))
    d.predict(batches([Batch(as_batch(rows).inputs)]))
    for seen in (seen_t, seen_s):
        assert seen.calls
        for call in seen.calls:
            assert call == {"args": 0, "use_cache": False, "keys": ["attention_mask", "input_ids", "use_cache"]}
    assert len(seen_s.calls) >= 5  # setup, two steps, evaluate, predict


class PlainLM(nn.Module):
    """A language model that is not a Hugging Face one: forward(input_ids, attention_mask)."""

    def __init__(self, returns: str = "tensor"):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)
        self.returns = returns

    def forward(self, input_ids, attention_mask):
        logits = self.head(self.embed(input_ids) * attention_mask[..., None])
        return {"logits": logits} if self.returns == "dict" else logits


@pytest.mark.parametrize("returns", ["tensor", "dict"])
def test_plain_modules_taking_a_dict_get_no_use_cache(returns):
    model = PlainLM(returns)
    seen = CallRecorder(model)
    rows = hf_rows(**ROWS)
    with torch.no_grad():
        z = model.head(model.embed(rows["input_ids"]) * rows["attention_mask"][..., None])
        expected = float(token_ce(z, rows["labels"]))
    trainer = Trainer(model, device="cpu").compile(torch.optim.SGD(model.parameters(), lr=0.1))
    logs = trainer.train_step(as_batch(rows))
    trainer.train_step(as_batch(rows))
    assert float(logs["loss"]) == pytest.approx(expected, rel=1e-5)
    assert seen.calls and all(c == {"args": 0, "keys": ["attention_mask", "input_ids"]} for c in seen.calls)


def test_a_plain_module_as_teacher_gets_no_use_cache_either():
    teacher, student = PlainLM(), gpt2(seed=2)
    seen = CallRecorder(teacher)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile(torch.optim.SGD(student.parameters(), lr=0.1), distillation_loss_fn=KDLoss(temperature=1))
    batch = all_valid_batch()
    with torch.no_grad():
        expected = float(kl(student(**batch.inputs).logits, teacher(**batch.inputs)))
    seen.calls.clear()
    logs = d.train_step(batch)
    assert float(logs["distillation_loss"]) == pytest.approx(expected, rel=1e-5)
    assert seen.calls and all(c == {"args": 0, "keys": ["attention_mask", "input_ids"]} for c in seen.calls)
