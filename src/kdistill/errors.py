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


class ModelInputError(KDistillError, ValueError):
    """A model rejected the inputs it was given (wrong shape, channels or dtype)."""


class IdxFormatError(KDistillError, ValueError):
    """A file is not a valid IDX file: empty, truncated, or with a bad header."""
