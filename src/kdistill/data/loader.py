"""Turn whatever the user has (arrays, tensors, a Dataset, a DataLoader) into Batches.

In-memory data is batched by slicing whole tensors with one index per batch: no
per-sample ``__getitem__`` and no collate. For small models on a CPU that is several
times faster than ``DataLoader`` (``benchmarks/loader_overhead.py`` measures it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..outputs import IGNORE_INDEX, UNLABELLED, Batch, next_token_targets

if TYPE_CHECKING:
    from .text import TokenLoader


def as_tensor(x: Any, *, name: str, labels: bool = False) -> torch.Tensor:
    """Convert arrays to tensors: float64 -> float32, labels -> int64.

    Raises:
        TypeError: if ``x`` is neither a numpy array nor a tensor (nor a list of numbers).
    """
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, (np.ndarray, list, tuple)):
        arr = np.asarray(x)
        if any(s < 0 for s in arr.strides):
            # torch cannot view negative strides (a flipped view such as x[:, ::-1]): copy
            arr = np.ascontiguousarray(arr)
        t = torch.as_tensor(arr)
    else:
        raise TypeError(
            f"{name} must be a numpy array, a torch.Tensor, a Dataset or a DataLoader, "
            f"got {type(x).__name__}"
        )
    if labels:
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError(f"{name} must hold integer class labels, got non-integer floats")
        if t.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-D array of class indices, got shape {tuple(t.shape)}; "
                "for one-hot labels pass labels.argmax(1)"
            )
        return t.long()
    if t.dtype == torch.float64:
        t = t.float()
    return t


def batch_rows(n: int, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
               drop_last: bool = False, shard: tuple[int, int] | None = None, pad: bool = True) -> Iterator[torch.Tensor]:
    """The rows of each batch of one pass over ``n`` samples.

    With ``shard=(r, N)`` (process ``r`` of ``N``) each batch is the single-process
    batch's positions ``r, r + N, ...``: the ``N`` processes together take the batch one
    process would take. With ``pad`` (training) the pass's order is first padded to a
    multiple of ``N`` by repeating its first samples, as ``DistributedSampler`` does, so
    every process gets as many samples as the others in every batch (the gradient average
    then equals the single-process one); without it (evaluation) a process may get fewer,
    and a batch where it gets none is skipped.
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if shard is not None and pad and n % shard[1]:
        order = torch.cat([order, order[: shard[1] - n % shard[1]]])
    total = order.shape[0]
    stop = (total // batch_size) * batch_size if drop_last else total
    for start in range(0, stop, batch_size):
        rows = order[start : start + batch_size]
        if shard is not None:
            rows = rows[shard[0]::shard[1]]
            if rows.numel() == 0:
                continue
        yield rows


def count_batches(n: int, batch_size: int, *, drop_last: bool = False, shard: tuple[int, int] | None = None,
                  pad: bool = True) -> int:
    """How many batches :func:`batch_rows` gives for ``n`` samples (this process's, with ``shard``)."""
    if shard is not None:
        if pad:
            n += -n % shard[1]
        elif not drop_last:  # batches where this process gets no sample are skipped
            return sum(1 for _ in batch_rows(n, batch_size, shard=shard, pad=False))
    return n // batch_size if drop_last else -(-n // batch_size)


class ArrayLoader:
    """Batches of in-memory tensors by index slicing.

    Args:
        inputs: ``(N, ...)`` tensor.
        targets: ``(N,)`` int64 labels (``-1`` for unlabelled samples) or ``None``.
        batch_size: samples per batch.
        shuffle: draw a new permutation each epoch from ``generator``.
        generator: a seeded ``torch.Generator`` (required for repeatable shuffles).
        drop_last: drop the last incomplete batch.
        index: ``(N,)`` dataset index of each row (defaults to ``arange(N)``).
        shard: ``(rank, world_size)``: this process's share of every batch (see
            :func:`batch_rows`); ``batch_size`` stays the global batch.
        pad: with ``shard``, pad the order to a multiple of the process count (training);
            without, shares may be unequal (evaluation).
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        batch_size: int = 32,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        index: torch.Tensor | None = None,
        shard: tuple[int, int] | None = None,
        pad: bool = True,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = inputs.shape[0]
        if targets is not None and targets.shape[0] != n:
            raise ValueError(
                f"inputs and targets differ in length: {n} inputs but {targets.shape[0]} targets"
            )
        if n == 0:
            raise ValueError("the data is empty: got 0 samples")
        self.inputs = inputs
        self.targets = targets
        self.index = torch.arange(n) if index is None else index
        # per batch, what can be known once: the rows are the dataset index (the default
        # index), and every sample is labelled (no -1 target): then no batch needs an index
        # lookup, nor a look at its targets for unlabelled samples (Batch.labelled)
        self._rows_are_index = index is None
        self._all_labelled = targets is None or not bool((targets == UNLABELLED).any())
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        self.shard = shard
        self.pad = pad

    @property
    def num_samples(self) -> int:
        return int(self.inputs.shape[0])

    def __len__(self) -> int:
        return count_batches(self.num_samples, self.batch_size, drop_last=self.drop_last, shard=self.shard,
                             pad=self.pad)

    def __iter__(self) -> Iterator[Batch]:
        n, b = self.num_samples, self.batch_size
        stop = (n // b) * b if self.drop_last else n
        inputs, targets, index = self.inputs, self.targets, self.index
        if self.shuffle or self.shard is not None:
            for rows in batch_rows(n, b, shuffle=self.shuffle, generator=self.generator, drop_last=self.drop_last,
                                   shard=self.shard, pad=self.pad):
                batch = Batch(
                    inputs.index_select(0, rows),
                    None if targets is None else targets.index_select(0, rows),
                    rows if self._rows_are_index else index.index_select(0, rows),
                )
                if self._all_labelled:
                    batch.labelled = None
                yield batch
        else:
            for start in range(0, stop, b):
                sl = slice(start, start + b)
                batch = Batch(inputs[sl], None if targets is None else targets[sl], index[sl])
                if self._all_labelled:
                    batch.labelled = None
                yield batch


class _Indexed(Dataset):
    """Adds each sample's index to what a map-style dataset returns."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return self.dataset[i], i


def _to_batch(item: Any, index: torch.Tensor | None = None) -> Batch:
    """Interpret one collated item of a DataLoader as a Batch."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, dict):
        if "input_ids" in item and not any(k in item for k in ("inputs", "x", "input")):
            return _token_batch(item, index)
        x = item.get("inputs", item.get("x", item.get("input")))
        if x is None:
            raise ValueError(
                "a dict batch must hold the inputs under 'inputs' (or 'x'), or be a Hugging Face style "
                f"batch with 'input_ids' (and 'attention_mask', 'labels'); got keys {sorted(item)}"
            )
        y = item.get("targets", item.get("y", item.get("labels", item.get("label"))))
        idx = item.get("index", index)
        return Batch(x, None if y is None else torch.as_tensor(y).long(), idx)
    if isinstance(item, torch.Tensor):
        return Batch(item, None, index)
    if isinstance(item, (tuple, list)):
        if len(item) == 1:
            return Batch(item[0], None, index)
        if len(item) == 2:
            return Batch(item[0], torch.as_tensor(item[1]).long(), index)
        if len(item) == 3:
            return Batch(item[0], torch.as_tensor(item[1]).long(), torch.as_tensor(item[2]).long())
    raise TypeError(
        f"cannot read a batch from {type(item).__name__}: expected a Batch, a tensor, "
        "(inputs,), (inputs, targets), (inputs, targets, index) or a dict with 'inputs' or 'input_ids'"
    )


def _token_batch(item: dict, index: torch.Tensor | None) -> Batch:
    """A Hugging Face style batch (``input_ids``, ``attention_mask``, ``labels``, ...) as a Batch.

    The inputs are the tensor entries other than ``labels`` and ``index``. The targets
    are ``next_token_targets(labels)`` for ``(B, T)`` labels, ``labels`` themselves for
    ``(B,)`` class labels (a sequence classifier), and without labels the input ids
    shifted, -100 where ``attention_mask`` is 0.
    """
    ids = item["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        shape = f" of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else ""
        raise ValueError(f"'input_ids' must be a (batch, sequence) tensor, got {type(ids).__name__}{shape}; "
                         "collate the batch with return_tensors='pt'")
    inputs = {k: v for k, v in item.items() if k not in ("labels", "index") and isinstance(v, torch.Tensor)}
    labels = item.get("labels")
    if labels is None:
        mask = inputs.get("attention_mask")
        labels = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels = torch.as_tensor(labels).long()
    targets = labels if labels.dim() == 1 else next_token_targets(labels)
    idx = item.get("index", index)
    return Batch(inputs, targets, None if idx is None else torch.as_tensor(idx).long())


class DataLoaderAdapter:
    """Iterates a ``DataLoader`` and yields Batches."""

    def __init__(self, loader: DataLoader, *, indexed: bool = False):
        self.loader = loader
        self.indexed = indexed

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int | None:
        try:
            return len(self.loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None

    def __iter__(self) -> Iterator[Batch]:
        for item in self.loader:
            if self.indexed:
                item, index = item
                yield _to_batch(item, torch.as_tensor(index).long())
            else:
                yield _to_batch(item)


def make_loader(
    x: Any,
    y: Any = None,
    *,
    batch_size: int = 32,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    unlabelled: Any = None,
    shard: tuple[int, int] | None = None,
    pad: bool = True,
) -> ArrayLoader | DataLoaderAdapter | TokenLoader:
    """Build the batch iterator ``fit``/``evaluate``/``predict`` use.

    Args:
        x: numpy array, tensor, ``Dataset``, ``DataLoader``, or a
            :class:`~kdistill.data.text.TokenDataset` (batches padded to their longest
            sequence, see :meth:`~kdistill.data.text.TokenDataset.loader`).
        y: labels when ``x`` is an array or tensor; must be ``None`` otherwise.
        batch_size, shuffle, generator, drop_last: as for :class:`ArrayLoader`. Ignored for
            a ``DataLoader``, which keeps its own.
        unlabelled: extra inputs without labels (arrays only): appended with target ``-1``.
        shard, pad: this process's share of each batch in a multi-process run (see
            :func:`batch_rows`). A ``DataLoader`` must shard itself (``DistributedSampler``).

    Returns:
        An iterable of :class:`~kdistill.outputs.Batch` with ``len()``.
    """
    from .text import TokenDataset  # (text.py imports this module)

    if isinstance(x, TokenDataset):
        if y is not None or unlabelled is not None:
            raise ValueError(
                "a TokenDataset carries its own labels (its tokens, -100 where not trained on): "
                f"pass y=None and unlabelled=None, got y={type(y).__name__}, unlabelled={type(unlabelled).__name__}")
        return x.loader(batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last, shard=shard, pad=pad)
    if isinstance(x, DataLoader):
        if y is not None or unlabelled is not None:
            raise ValueError("pass labels and unlabelled data inside the DataLoader, not as y/unlabelled")
        if shard is not None and not _is_sharded(x):
            raise ValueError(
                f"a DataLoader in a {shard[1]}-process run must give each process its own share: build it with "
                "sampler=torch.utils.data.DistributedSampler(dataset) (and call its set_epoch), or pass the "
                "arrays or the Dataset to fit, which kdistill shards itself")
        return DataLoaderAdapter(x)
    if isinstance(x, TensorDataset) and y is None and len(x.tensors) in (1, 2):
        # Fast path: a TensorDataset is in-memory arrays; slice them instead of collating.
        x, y = x.tensors[0], (x.tensors[1] if len(x.tensors) == 2 else None)
    if isinstance(x, Dataset):
        if y is not None or unlabelled is not None:
            raise ValueError("pass labels inside the Dataset (items (inputs, target)), not as y")
        if shard is not None:
            sampler = _BatchRows(len(x), batch_size, shuffle, generator, drop_last, shard, pad)
            return DataLoaderAdapter(DataLoader(_Indexed(x), batch_sampler=sampler), indexed=True)
        loader = DataLoader(
            _Indexed(x), batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last
        )
        return DataLoaderAdapter(loader, indexed=True)
    inputs = as_tensor(x, name="x")
    targets = None if y is None else as_tensor(y, name="y", labels=True)
    if targets is not None and targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"x and y differ in length: {inputs.shape[0]} samples but {targets.shape[0]} labels"
        )
    if unlabelled is not None:
        extra = as_tensor(unlabelled, name="unlabelled")
        if extra.shape[1:] != inputs.shape[1:]:
            raise ValueError(
                f"unlabelled samples have shape {tuple(extra.shape[1:])} but labelled ones "
                f"{tuple(inputs.shape[1:])}; both must be the same kind of input"
            )
        if targets is None:
            targets = torch.full((inputs.shape[0],), UNLABELLED, dtype=torch.long)
        inputs = torch.cat([inputs, extra.to(inputs.dtype)])
        targets = torch.cat([targets, torch.full((extra.shape[0],), UNLABELLED, dtype=torch.long)])
    return ArrayLoader(
        inputs, targets, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
        shard=shard, pad=pad,
    )


def _is_sharded(loader: DataLoader) -> bool:
    from torch.utils.data.distributed import DistributedSampler

    samplers = (loader.sampler, getattr(loader.batch_sampler, "sampler", None), loader.batch_sampler)
    return any(isinstance(s, (DistributedSampler, _BatchRows)) for s in samplers)


class _BatchRows:
    """A batch sampler for a map-style Dataset with :func:`batch_rows`' sharding."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None, drop_last: bool,
                 shard: tuple[int, int], pad: bool):
        self.args = dict(batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                         shard=shard, pad=pad)
        self.n = n

    def __iter__(self) -> Iterator[list[int]]:
        for rows in batch_rows(self.n, **self.args):
            yield rows.tolist()

    def __len__(self) -> int:
        return sum(1 for _ in batch_rows(self.n, **{**self.args, "shuffle": False}))
