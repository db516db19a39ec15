"""Exceptions kdistill raises, each a subclass of the built-in one callers would expect.

Every message names the value that was wrong, what was expected and how to fix it.
"""

from __future__ import annotations


class KDistillError(Exception):
    """Base class of kdistill's own errors."""


class NonFiniteLossError(KDistillError, FloatingPointError):
    """A loss term became NaN or infinite; raised before the optimizer step, so the
    weights are still the last finite ones."""


class InvalidDivergenceError(KDistillError, ValueError):
    """A divergence came out negative: it was most likely given raw logits, or its
    arguments in the wrong order, instead of probability distributions."""


class CheckpointError(KDistillError, RuntimeError):
    """A checkpoint file is truncated, corrupt, or was written for another model."""


class DatasetNotFoundError(KDistillError, FileNotFoundError):
    """A dataset's files are in none of the places kdistill looked."""


class ModelNotFoundError(KDistillError, FileNotFoundError):
    """A model (or tokenizer) directory that is not on this machine; kdistill never downloads."""


class ModelInputError(KDistillError, ValueError):
    """A model rejected the inputs it was given (wrong shape, channels or dtype)."""


class IdxFormatError(KDistillError, ValueError):
    """A file is not a valid IDX file: empty, truncated, or with a bad header."""


class MissingExtraError(KDistillError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class ExportParityError(KDistillError, ValueError):
    """An exported model's outputs differ from the PyTorch model's beyond the tolerance."""


class ConfigError(KDistillError, ValueError):
    """An experiment config is invalid: the message names the file, the key path and what
    was expected."""


class RunDirectoryError(KDistillError, FileExistsError):
    """A run directory already holds a finished (or different) run, or is not a run."""
