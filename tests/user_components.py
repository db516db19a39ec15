"""A user's own components, named in test configs by dotted path (``_component_:
user_components.CosineLogits``), as a user's package would be."""

from __future__ import annotations

import time

import numpy as np

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


def synthetic_splits(n_train: int = 240, n_test: int = 120, seed: int = 0):
    """A user's own data reader: 3 classes of 4x4 one-channel images (class = bright row)."""
    import numpy as np

    from kdistill.data import DatasetSplits

    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 3, n)
        x = rng.normal(0, 0.3, (n, 1, 4, 4)).astype(np.float32)
        x[np.arange(n), 0, y, :] += 1.0
        return x, y.astype(np.int64)

    (xa, ya), (xb, yb) = make(n_train), make(n_test)
    return DatasetSplits("synthetic", xa, ya, xb, yb, ("top", "middle", "bottom"))


def synthetic_rgb(n_train: int = 16, n_test: int = 8, classes: int = 100, size: int = 32, seed: int = 0):
    """CIFAR-shaped random data (3x32x32, 100 classes) for pipeline tests."""
    import numpy as np

    from kdistill.data import DatasetSplits

    rng = np.random.default_rng(seed)
    x = rng.random((n_train + n_test, 3, size, size), dtype=np.float32)
    y = rng.integers(0, classes, n_train + n_test).astype(np.int64)
    return DatasetSplits("synthetic_rgb", x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                         tuple(f"c{i}" for i in range(classes)))


def seven_class_mlp(in_channels: int = 1, input_size: int = 8) -> nn.Module:
    """A user's model with its class count built in (7), whatever the data has."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, 8), nn.ReLU(), nn.Linear(8, 7))


def uneven_splits():
    """A reader whose images and labels differ in length (a user's bug)."""
    from kdistill.data import DatasetSplits

    x = np.zeros((10, 1, 4, 4), dtype=np.float32)
    return DatasetSplits("uneven", x, np.zeros(9, dtype=np.int64), x[:4], np.zeros(4, dtype=np.int64), ("a", "b"))
