"""On-policy distillation (GKD) and sequence-level KD on tiny random Llama models (built
from configs, nothing downloaded): lmbda 0 is ordinary training bit for bit, lmbda 1
trains on the student's own samples (checked against ``student.generate`` called here
with the same seed), seq_kd on the teacher's, the prompt is never trained on, a resumed
fit ends with the uninterrupted fit's weights, and the generation time is logged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from kdistill import Distiller, LiveTeacher, OnPolicy
from kdistill.callbacks import Callback, TrainingCheckpoint
from kdistill.losses import GeneralizedJSDLoss
from kdistill.on_policy import prompt_lengths
from kdistill.outputs import IGNORE_INDEX, Batch, next_token_targets

from crashing import Crash, CrashAt

transformers = pytest.importorskip("transformers")

VOCAB, T, N_NEW, EOS = 64, 12, 6, 2


def llama(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


class PromptCompletion(Dataset):
    """Right-padded prompt/completion rows: ``prompts[i]`` prompt tokens (masked), then a
    completion ending in EOS, then padding."""

    def __init__(self, n: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, T), generator=g)
        self.prompts = torch.randint(2, 6, (n,), generator=g)
        lengths = self.prompts + torch.randint(2, 5, (n,), generator=g)
        self.mask = (torch.arange(T)[None] < lengths[:, None]).long()
        self.ids[torch.arange(n), lengths - 1] = EOS
        self.ids = self.ids.masked_fill(self.mask == 0, 0)
        labels = self.ids.masked_fill(self.mask == 0, IGNORE_INDEX)
        labels[torch.arange(T)[None] < self.prompts[:, None]] = IGNORE_INDEX
        self.targets = next_token_targets(labels)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, "targets": self.targets[i]}

    def prompt_set(self) -> set[tuple[int, ...]]:
        return {tuple(self.ids[i, :p].tolist()) for i, p in enumerate(self.prompts.tolist())}

    def completion_set(self) -> set[tuple[int, ...]]:
        return {tuple(self.ids[i, p:int(self.mask[i].sum())].tolist()) for i, p in enumerate(self.prompts.tolist())}


def sample_by_hand(model: nn.Module, prompts: list[list[int]], seed: int, **settings) -> list[list[int]]:
    """What ``model.generate`` samples from left-padded ``prompts`` with the global RNG
    seeded ``seed``: each completion up to and including its first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=N_NEW,
                             pad_token_id=EOS, eos_token_id=EOS, **settings)[:, width:].tolist()
    model.train(was_training)
    return [row[:row.index(EOS) + 1] if EOS in row else row for row in out]


def split(batch: Batch) -> tuple[list[list[int]], list[list[int]]]:
    """A token batch's rows -> (prompts, completions), by its trained-on targets."""
    lengths = prompt_lengths(batch).tolist()
    real = batch.inputs["attention_mask"].sum(1).tolist()
    ids = batch.inputs["input_ids"].tolist()
    return [r[:p] for r, p in zip(ids, lengths)], [r[p:n] for r, p, n in zip(ids, lengths, real)]


class Recording(LiveTeacher):
    """A live teacher that keeps every batch it is handed, and (with ``twin``, an OnPolicy
    seeded as the Distiller's) the completions ``model.generate`` gives for it by hand,
    from the model as it is at that moment."""

    def __init__(self, module: nn.Module, *, generating: nn.Module | None = None, twin: OnPolicy | None = None):
        super().__init__(module)
        self.batches: list[Batch] = []
        self.expected: list[list[list[int]] | None] = []
        self.generating, self.twin = generating, twin

    def prepare(self, batch: Batch, epoch: int) -> Batch:
        self.batches.append(batch)
        if self.twin is not None:
            source, seed = self.twin.draw()
            model = {"student": self.generating, "teacher": self.module}.get(source)
            self.expected.append(None if model is None else sample_by_hand(model, split(batch)[0], seed))
        return super().prepare(batch, epoch)


class Arm(Callback):
    """Hands the recording teacher its twin when training begins (after the set-up's dry
    run, which draws nothing from the Distiller's OnPolicy)."""

    def __init__(self, teacher: Recording, twin: OnPolicy):
        self.teacher, self.twin = teacher, twin

    def on_train_begin(self, logs=None):
        self.teacher.twin = self.twin


def distiller(teacher, on_policy: OnPolicy | None, student_seed: int = 1) -> Distiller:
    d = Distiller(student=llama(student_seed), teacher=teacher, device="cpu")
    d.compile("adamw", learning_rate=1e-2, alpha=0.0, distillation_loss_fn=GeneralizedJSDLoss(beta=0.5),
              on_policy=on_policy)
    return d


FIT = dict(epochs=2, batch_size=4, verbose=0, seed=0)


def test_lmbda_zero_trains_bit_for_bit_like_off_policy():
    data = PromptCompletion()
    plain = distiller(llama(0), None)
    plain.fit(data, **FIT)
    off = distiller(llama(0), OnPolicy(0.0, N_NEW, seed=3))
    hist = off.fit(data, **FIT)
    for a, b in zip(plain.student.state_dict().values(), off.student.state_dict().values()):
        assert torch.equal(a, b)
    assert hist.history["generate_seconds"] == [0.0, 0.0]
    assert off.on_policy.counts == {"dataset": 6, "student": 0, "teacher": 0}


def test_lmbda_one_trains_on_the_students_own_samples():
    data = PromptCompletion()
    op = OnPolicy(1.0, N_NEW, seed=5, pad_token_id=EOS, eos_token_id=EOS)
    student = llama(1)
    teacher = Recording(llama(0), generating=student)
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile("adamw", learning_rate=1e-2, alpha=0.0, distillation_loss_fn=GeneralizedJSDLoss(beta=0.5), on_policy=op)
    hist = d.fit(data, callbacks=[Arm(teacher, OnPolicy(1.0, N_NEW, seed=5))], **FIT)
    seen = teacher.batches[1:]  # (the first: the set-up's dry run on the dataset's batch)
    assert len(seen) == 6 and len(teacher.expected) == 6 and op.counts["student"] == 6
    prompts, completions = data.prompt_set(), data.completion_set()
    differ = 0
    for batch, expected in zip(seen, teacher.expected):
        got_prompts, got = split(batch)
        assert got == expected  # the student's samples, as generate gives them with that seed
        assert all(tuple(p) in prompts for p in got_prompts)  # the dataset's prompts
        differ += sum(tuple(c) not in completions for c in got)
        # the prompt is never trained on; every completion token is (EOS included)
        for row, p, c in zip(batch.targets.tolist(), map(len, got_prompts), got):
            assert row[:p - 1] == [IGNORE_INDEX] * (p - 1)
            assert row[p - 1:p - 1 + len(c)] == c
            assert all(t == IGNORE_INDEX for t in row[p - 1 + len(c):])
    assert differ > 20  # of 24 completions: not the dataset's
    assert all(s > 0 for s in hist.history["generate_seconds"]) and op.seconds > 0


def test_seq_kd_trains_on_the_teachers_samples():
    data = PromptCompletion()
    op = OnPolicy(0.0, N_NEW, seq_kd=True, seed=7, temperature=0.7, top_p=0.9)
    teacher = Recording(llama(0))
    d = distiller(teacher, op)
    d.fit(data, epochs=1, batch_size=4, verbose=0, seed=0)
    assert op.counts == {"dataset": 0, "student": 0, "teacher": 3}
    # the teacher is frozen: its samples can be redrawn afterwards, with the twin's seeds
    twin = OnPolicy(0.0, N_NEW, seq_kd=True, seed=7)
    for batch in teacher.batches[-3:]:
        _, seed = twin.draw()
        got_prompts, got = split(batch)
        assert got == sample_by_hand(teacher.module, got_prompts, seed, temperature=0.7, top_p=0.9)


def test_generated_batch_layout():
    data = PromptCompletion(n=4)
    batch = Batch({"input_ids": data.ids, "attention_mask": data.mask}, data.targets)
    assert prompt_lengths(batch).tolist() == data.prompts.tolist()
    model = llama(1)
    model.train()
    out = OnPolicy(1.0, N_NEW, seed=0).transform(batch, model)
    assert model.training  # back in train mode
    ids, mask = out.inputs["input_ids"], out.inputs["attention_mask"]
    real = mask.sum(1)
    assert torch.equal(mask, (torch.arange(ids.shape[1])[None] < real[:, None]).long())  # right-padded
    assert out.targets[torch.arange(4), real - 1].eq(IGNORE_INDEX).all()


@pytest.mark.parametrize("crash_at", [2, 3, 4])  # mid-epoch, an epoch's last step, the next epoch (3 steps each)
def test_resume_matches_uninterrupted(tmp_path, crash_at):
    data = PromptCompletion()
    reference = distiller(llama(0), OnPolicy(0.5, N_NEW, seed=11))
    reference.fit(data, **FIT)
    path = tmp_path / "last.pt"
    crashed = distiller(llama(0), OnPolicy(0.5, N_NEW, seed=11))
    with pytest.raises(Crash):
        crashed.fit(data, callbacks=[TrainingCheckpoint(path, every_steps=1), CrashAt(crash_at)], **FIT)
    resumed = distiller(llama(0), OnPolicy(0.5, N_NEW, seed=11))
    resumed.fit(data, resume_from=path, **FIT)
    assert resumed.on_policy.counts == reference.on_policy.counts
    assert 0 < reference.on_policy.counts["student"] < 6
    for a, b in zip(resumed.student.state_dict().values(), reference.student.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lmbda must be in"):
        OnPolicy(1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        OnPolicy(0.5, 0)
    with pytest.raises(ValueError, match="top_p"):
        OnPolicy(0.5, 4, top_p=0.0)
    with pytest.raises(ValueError, match="token batches"):
        OnPolicy(1.0, 4).transform(Batch(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)), llama(1))


def test_a_teacher_cache_is_refused():
    class TokenCache(LiveTeacher):  # (named as a cache: it would serve the dataset's sequences only)
        pass

    d = Distiller(student=llama(1), teacher=TokenCache(llama(0)), device="cpu")
    with pytest.raises(ValueError, match="TokenCache holds them for the dataset's sequences only"):
        d.compile("adamw", on_policy=OnPolicy(0.5, 4))


def test_accumulated_micro_batches_count_for_their_generated_tokens():
    class Shares(Distiller):
        seen: list = []

        def train_step(self, batch):
            self.seen.append((batch.items(), self._micro.samples))
            return super().train_step(batch)

    data = PromptCompletion()
    d = Shares(student=llama(1), teacher=llama(0), device="cpu")
    d.compile("adamw", alpha=0.0, distillation_loss_fn=GeneralizedJSDLoss(beta=0.5), accumulate_steps=3,
              on_policy=OnPolicy(0.5, N_NEW, seed=2))
    d.fit(data, epochs=1, batch_size=2, verbose=0, seed=0)
    assert len(d.seen) == 6
    for step in (d.seen[:3], d.seen[3:]):
        total = sum(tokens for tokens, _ in step)
        assert [share for _, share in step] == pytest.approx([tokens / total for tokens, _ in step])
    assert 0 < d.on_policy.counts["student"] < 6  # generated and dataset batches: their token counts differ
