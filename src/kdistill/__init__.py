"""kdistill: knowledge distillation for PyTorch.

The public API; everything else is reachable from the submodules.
"""

__version__ = "0.1.0"

from .callbacks import Callback, CSVLogger, EarlyStopping, History, JSONLogger, ModelCheckpoint, ProgressBar
from .checkpoint import load_checkpoint, save_checkpoint
from .data import load_dataset, make_loader
from .distiller import Distiller, Trainer
from .errors import (
    CheckpointError,
    DatasetNotFoundError,
    IdxFormatError,
    InvalidDivergenceError,
    KDistillError,
    ModelInputError,
    NonFiniteLossError,
)
from .losses import DistillationLoss, KDLoss, KLDivergence, kd_loss
from .models import build_model
from .outputs import UNLABELLED, Batch, Outputs
from .runtime import get_device, seed_everything
from .teacher import LiveTeacher

__all__ = [
    "__version__",
    "Batch",
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "DatasetNotFoundError",
    "DistillationLoss",
    "Distiller",
    "EarlyStopping",
    "History",
    "IdxFormatError",
    "InvalidDivergenceError",
    "JSONLogger",
    "KDLoss",
    "KDistillError",
    "KLDivergence",
    "LiveTeacher",
    "ModelCheckpoint",
    "ModelInputError",
    "NonFiniteLossError",
    "Outputs",
    "ProgressBar",
    "Trainer",
    "UNLABELLED",
    "build_model",
    "get_device",
    "kd_loss",
    "load_checkpoint",
    "load_dataset",
    "make_loader",
    "save_checkpoint",
    "seed_everything",
]
