"""Data: readers (IDX, CIFAR pickle), datasets by name, and the fast in-memory loader."""

from .base import DatasetSplits
from .cifar import CIFAR_MEAN, CIFAR_STD, cifar_normalize, load_cifar
from .datasets import DATASETS, load_dataset, split_labelled
from .idx import IdxFormatError, load_idx_images, load_idx_labels, read_idx
from .loader import ArrayLoader, as_tensor, make_loader

__all__ = [
    "DATASETS",
    "ArrayLoader",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DatasetSplits",
    "IdxFormatError",
    "as_tensor",
    "cifar_normalize",
    "load_cifar",
    "load_dataset",
    "load_idx_images",
    "load_idx_labels",
    "make_loader",
    "read_idx",
    "split_labelled",
]
