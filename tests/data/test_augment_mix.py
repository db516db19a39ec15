"""mixup and cutmix: the images, the second labels, the loss, and the same view for both models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill import Distiller, Trainer
from kdistill.data.augment import Compose, CutMix, Mixup, RandomHorizontalFlip
from kdistill.outputs import Batch, Mix


def _identifiable(n=8, size=6):
    # image i is filled with the value i, and its label is i % 3
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, size, size).clone()
    return Batch(x, torch.arange(n) % 3, torch.arange(n))


def test_mixup_mixes_images_and_records_the_other_labels():
    torch.manual_seed(0)
    batch = _identifiable()
    out = Mixup(alpha=0.4)(batch)
    lam = out.mix.lam
    assert 0.0 <= lam <= 1.0
    # every mixed image is lam * i + (1 - lam) * j, and j's label is the recorded second label
    values = out.inputs[:, 0, 0, 0]
    j = (values - lam * torch.arange(8)) / (1 - lam)
    assert torch.allclose(j, j.round(), atol=1e-4)
    assert torch.equal(out.mix.targets, j.round().long() % 3)
    assert torch.equal(out.targets, batch.targets) and torch.equal(out.index, batch.index)
    assert sorted(j.round().long().tolist()) == list(range(8))  # a permutation


def test_mixup_lambda_follows_beta():
    torch.manual_seed(0)
    lams = torch.tensor([Mixup(alpha=0.2)(_identifiable()).mix.lam for _ in range(400)])
    # Beta(0.2, 0.2): mean 0.5, mass near 0 and 1 (variance 1/(4*(2*0.2+1)) = 0.179)
    assert abs(float(lams.mean()) - 0.5) < 0.06
    assert abs(float(lams.var()) - 0.25 / 1.4) < 0.03


def test_cutmix_pastes_a_box_whose_area_is_one_minus_lambda():
    torch.manual_seed(3)
    batch = _identifiable(size=16)
    for _ in range(20):
        out = CutMix(alpha=1.0)(batch)
        for i in range(8):
            img = out.inputs[i, 0]
            pasted = float((img != i).float().mean())
            other = out.mix.targets[i]
            if pasted > 0:  # the pasted pixels all come from one sample, with the recorded label
                vals = img[img != i].unique()
                assert len(vals) == 1 and int(vals) % 3 == int(other)
            # lam is the share of the image left as it was (when the partner is another image)
            if pasted > 0:
                assert pasted == pytest.approx(1 - out.mix.lam, abs=1e-6)


def test_mixed_supervised_loss_is_the_lambda_weighted_sum():
    trainer = Trainer(nn.Linear(4, 3), device="cpu").compile("adam")
    logits = torch.randn(5, 3)
    y, y2 = torch.tensor([0, 1, 2, 0, 1]), torch.tensor([2, 2, 0, 1, 1])
    loss, n = trainer.supervised_loss(logits, Batch(torch.zeros(5, 4), y, mix=Mix(y2, 0.3)))
    expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(logits, y2)
    assert n == 5 and torch.allclose(loss, expected)
    # unlabelled on either side: left out of the hard-label loss
    y3 = torch.tensor([0, -1, 2, 0, 1])
    loss, n = trainer.supervised_loss(logits, Batch(torch.zeros(5, 4), y3, mix=Mix(y2, 0.3)))
    keep = torch.tensor([True, False, True, True, True])
    expected = 0.3 * F.cross_entropy(logits[keep], y3[keep]) + 0.7 * F.cross_entropy(logits[keep], y2[keep])
    assert n == 4 and torch.allclose(loss, expected)


class Spy(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def test_teacher_and_student_see_the_same_mixed_view():
    torch.manual_seed(0)
    student = Spy(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)))
    teacher = Spy(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)))
    x = torch.randn(32, 1, 6, 6)
    y = torch.randint(0, 3, (32,))
    d = Distiller(student=student, teacher=teacher, device="cpu")
    d.compile("adam", metrics=["accuracy"], alpha=0.5, temperature=2)
    d.fit(x, y, epochs=1, batch_size=8, verbose=0, seed=0, augment=Compose([RandomHorizontalFlip(), CutMix(), Mixup()]))
    # the first call of each is the set-up dry run on an unaugmented batch; then one call per step
    s_seen, t_seen = student.seen[1:5], teacher.seen[1:5]
    assert len(t_seen) == 4
    for a, b in zip(s_seen, t_seen):
        assert torch.equal(a, b)
    assert not any(torch.equal(a, x[:8]) for a in s_seen)  # they were augmented


def test_bad_alpha_and_tensor_use_are_refused():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        Mixup(alpha=0)
    with pytest.raises(TypeError, match="apply the Compose to a Batch"):
        Compose([Mixup()])(torch.zeros(2, 1, 4, 4))


def test_the_beta_draw_is_public_seeded_and_beta_distributed():
    import inspect

    from kdistill.data import augment

    assert "torch._" not in inspect.getsource(augment)  # no private torch function
    torch.manual_seed(5)
    a = [augment._beta(0.4) for _ in range(3)]
    torch.manual_seed(5)
    assert [augment._beta(0.4) for _ in range(3)] == a  # the same seed, the same draws
    torch.manual_seed(5)
    assert a[0] == float(torch.distributions.Beta(torch.tensor(0.4, dtype=torch.float64),
                                                  torch.tensor(0.4, dtype=torch.float64)).sample())
    torch.manual_seed(0)
    lams = torch.tensor([augment._beta(2.0) for _ in range(2000)], dtype=torch.float64)
    # Beta(2, 2): mean 1/2, variance 1/20
    assert abs(float(lams.mean()) - 0.5) < 0.02 and abs(float(lams.var()) - 0.05) < 0.006
    assert 0.0 < float(lams.min()) and float(lams.max()) < 1.0


def test_mixup_and_cutmix_repeat_under_the_same_seed():
    images = torch.rand(6, 1, 8, 8)
    batch = Batch(images, torch.arange(6))
    for aug in (Mixup(alpha=0.5), CutMix(alpha=0.5)):
        torch.manual_seed(11)
        first = aug(batch)
        torch.manual_seed(11)
        second = aug(batch)
        assert torch.equal(first.inputs, second.inputs) and first.mix.lam == second.mix.lam
        assert torch.equal(first.mix.targets, second.mix.targets)
