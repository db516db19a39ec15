"""A user's own components, named in test configs by dotted path (``_component_:
user_components.CosineLogits``), as a user's package would be."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.callbacks import Callback
from kdistill.losses import DistillationLoss


class CosineLogits(DistillationLoss):
    """1 - cosine similarity of student and teacher logits, scaled."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, student, teacher, batch):
        return self.scale * (1 - F.cosine_similarity(student.logits, teacher.logits, dim=-1)).mean()


def tiny_mlp(num_classes: int = 10, in_channels: int = 1, input_size: int = 8, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, width), nn.ReLU(),
                         nn.Linear(width, num_classes))


class SlowDown(Callback):
    """Sleeps after every step, so a test can kill the process mid-epoch."""

    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_train_batch_end(self, step, logs=None):
        time.sleep(self.seconds)


def not_a_loss():
    return torch.zeros(())
