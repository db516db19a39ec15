"""Distillation does what it is for: with few labels, a student taught by a teacher beats
the same student trained from scratch on the same labels.

scikit-learn's 8x8 digits: a teacher MLP (256, 256) trained on all 1437 training images;
a small student MLP (32,) gets 50 labelled images. From scratch it reaches about
0.80-0.87 test accuracy; distilled (the same 50 labels, the other 1387 images unlabelled,
labelled by the teacher only through its soft targets) about 0.94-0.96. Over seeds 0-7
the margin was 0.086-0.139; the test asks for 0.05.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kdistill import Distiller, Trainer, build_model
from kdistill.data import load_dataset, split_labelled

pytest.importorskip("sklearn")

N_LABELLED = 50


def _mlp(hidden):
    return build_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=hidden)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def one_thread():
    """Matrices this small gain nothing from intra-op threads, and on a busy machine the
    threads contend (measured 10x slower with 2 threads on 2 loaded cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("seed", [0, 1])
def test_distillation_beats_training_from_scratch_with_few_labels(digits, seed, one_thread):
    ds = digits

    # 1. the teacher, on every labelled training image
    torch.manual_seed(seed)
    teacher = _mlp((256, 256))
    trainer = Trainer(teacher, device="cpu").compile("adam", metrics=["accuracy"])
    trainer.fit(ds.x_train, ds.y_train, epochs=15, batch_size=64, verbose=0, seed=seed)
    teacher_acc = trainer.evaluate(ds.x_test, ds.y_test)["accuracy"]
    assert teacher_acc > 0.95

    # 2. few labels; the rest of the training set loses its labels
    x_lab, y_lab, x_unlab, _ = split_labelled(ds.x_train, ds.y_train, N_LABELLED, seed=seed)
    torch.manual_seed(seed + 100)
    init = _mlp((32,))

    # 3. the student from scratch on the labelled images (trained until it plateaus)
    scratch = Trainer(copy.deepcopy(init), device="cpu").compile("adam", learning_rate=3e-3, metrics=["accuracy"])
    scratch.fit(x_lab, y_lab, epochs=150, batch_size=32, verbose=0, seed=seed)
    scratch_acc = scratch.evaluate(ds.x_test, ds.y_test)["accuracy"]

    # 4. the same student, same labels, distilled with the unlabelled images too
    distiller = Distiller(copy.deepcopy(init), teacher, device="cpu").compile(
        "adam", learning_rate=3e-3, metrics=["accuracy"], alpha=0.1, temperature=4.0
    )
    distiller.fit(x_lab, y_lab, unlabelled=x_unlab, epochs=15, batch_size=64, verbose=0, seed=seed)
    distilled_acc = distiller.evaluate(ds.x_test, ds.y_test)["accuracy"]

    assert distilled_acc > scratch_acc + 0.05, (
        f"teacher {teacher_acc:.3f}, scratch {scratch_acc:.3f}, distilled {distilled_acc:.3f}"
    )
