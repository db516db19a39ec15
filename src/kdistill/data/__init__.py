"""Data: readers (IDX), datasets by name, and the fast in-memory loader."""

from .datasets import DATASETS, DatasetSplits, load_dataset, split_labelled
from .idx import IdxFormatError, load_idx_images, load_idx_labels, read_idx
from .loader import ArrayLoader, as_tensor, make_loader

__all__ = [
    "DATASETS",
    "ArrayLoader",
    "DatasetSplits",
    "IdxFormatError",
    "as_tensor",
    "load_dataset",
    "load_idx_images",
    "load_idx_labels",
    "make_loader",
    "read_idx",
    "split_labelled",
]
