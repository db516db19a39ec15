"""kdistill: knowledge distillation for PyTorch.

The public API; everything else is reachable from the submodules.
"""

__version__ = "0.1.0"

from .callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    History,
    JSONLogger,
    ModelCheckpoint,
    ProgressBar,
    TrainingCheckpoint,
)
from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .data import load_dataset, make_loader
from .distiller import Distiller, Trainer
from .errors import (
    CheckpointError,
    ConfigError,
    DatasetNotFoundError,
    ExportParityError,
    IdxFormatError,
    InvalidDivergenceError,
    KDistillError,
    MissingExtraError,
    ModelInputError,
    NonFiniteLossError,
    RunDirectoryError,
)
from .losses import DistillationLoss, KDLoss, KLDivergence, WeightedSum, kd_loss
from .models import build_model
from .mutual import MutualLearning, mutual_loss
from .born_again import born_again
from .on_policy import OnPolicy
from .outputs import UNLABELLED, Batch, Outputs
from .runtime import get_device, seed_everything
from .teacher import EnsembleTeacher, LiveTeacher, Teacher, TeacherCache

__all__ = [
    "__version__",
    "Batch",
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "ConfigError",
    "DatasetNotFoundError",
    "DistillationLoss",
    "Distiller",
    "EarlyStopping",
    "EnsembleTeacher",
    "ExportParityError",
    "History",
    "IdxFormatError",
    "InvalidDivergenceError",
    "JSONLogger",
    "KDLoss",
    "KDistillError",
    "KLDivergence",
    "LiveTeacher",
    "MissingExtraError",
    "ModelCheckpoint",
    "ModelInputError",
    "MutualLearning",
    "NonFiniteLossError",
    "OnPolicy",
    "Outputs",
    "ProgressBar",
    "RunDirectoryError",
    "Teacher",
    "TeacherCache",
    "Trainer",
    "TrainingCheckpoint",
    "UNLABELLED",
    "WeightedSum",
    "born_again",
    "build_model",
    "get_device",
    "kd_loss",
    "load_checkpoint",
    "load_weights",
    "load_dataset",
    "make_loader",
    "mutual_loss",
    "save_checkpoint",
    "seed_everything",
]
