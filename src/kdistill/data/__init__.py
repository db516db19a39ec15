"""Data: readers (IDX, CIFAR pickle, text), datasets by name, and the fast in-memory loader."""

from .base import DatasetSplits
from .cifar import CIFAR_MEAN, CIFAR_STD, cifar_normalize, load_cifar
from .datasets import DATASETS, load_dataset, split_labelled
from .idx import IdxFormatError, load_idx_images, load_idx_labels, read_idx
from .loader import ArrayLoader, as_tensor, make_loader
from .text import (
    TokenDataset,
    TokenLoader,
    load_tokenizer,
    pack_texts,
    python_source_corpus,
    read_jsonl,
    read_text,
    split_corpus,
    train_tokenizer,
)

__all__ = [
    "DATASETS",
    "ArrayLoader",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "DatasetSplits",
    "IdxFormatError",
    "TokenDataset",
    "TokenLoader",
    "as_tensor",
    "cifar_normalize",
    "load_cifar",
    "load_dataset",
    "load_idx_images",
    "load_idx_labels",
    "load_tokenizer",
    "make_loader",
    "pack_texts",
    "python_source_corpus",
    "read_idx",
    "read_jsonl",
    "read_text",
    "split_corpus",
    "split_labelled",
    "train_tokenizer",
]
