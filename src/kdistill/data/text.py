"""Token data for language-model distillation: readers, a compact dataset, its loader.

Every reader returns a :class:`TokenDataset`, whose :meth:`~TokenDataset.loader` yields
batches (:class:`~kdistill.outputs.Batch`) in kdistill's language-model convention:

- ``inputs = {"input_ids": (B, T) long, "attention_mask": (B, T) long}``, padded on the
  right (with the tokenizer's pad id, or EOS when it has none) to the longest sequence
  of the batch, ``attention_mask`` 0 on the padding;
- ``targets = next_token_targets(labels)``: ``targets[:, t]`` is the token position ``t``
  must predict, :data:`~kdistill.outputs.IGNORE_INDEX` (-100) where nothing is trained
  (padding, masked prompt tokens, the last position);
- ``index``: ``(B,)`` positions of the sequences in the dataset.

Readers: :func:`pack_texts` and :func:`read_text` (plain text cut into fixed-length
blocks), :func:`read_jsonl` (prompt/completion or chat records, the prompt masked from
the loss). Tokenizers: :func:`train_tokenizer` (byte-level BPE, trained offline) and
:func:`load_tokenizer` (from a local folder, never from the network). A corpus every
machine with Python has: :func:`python_source_corpus` and :func:`split_corpus`.

``transformers`` and ``tokenizers`` are optional (``pip install "kdistill[text]"``) and
imported only by the functions that need them.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import operator
import os
import sysconfig
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetNotFoundError, MissingExtraError, ModelNotFoundError
from ..outputs import IGNORE_INDEX, Batch, next_token_targets
from .loader import batch_rows, count_batches

__all__ = [
    "TokenDataset",
    "TokenLoader",
    "load_tokenizer",
    "pack_texts",
    "python_source_corpus",
    "read_jsonl",
    "read_text",
    "split_corpus",
    "train_tokenizer",
]


def _require(module: str) -> ModuleType:
    """Import ``transformers`` or ``tokenizers``, or say how to install them."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{module!r} is needed for text data but could not be imported ({e}). "
            'Install it with: pip install "kdistill[text]"'
        ) from e


# --------------------------------------------------------------------------------------
# the dataset and its loader
# --------------------------------------------------------------------------------------


class TokenDataset(Dataset):
    """Ragged token sequences held compactly: one flat tensor of every sequence's tokens,
    the offsets where each starts, and a flat mask of the tokens trained on.

    Sequence ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``; its labels are its tokens
    where ``trained`` is true and :data:`~kdistill.outputs.IGNORE_INDEX` (-100) elsewhere
    (a prompt's tokens, a chat's user turns).

    Example::

        ds = TokenDataset.from_sequences([[5, 6, 7], [8, 9]], pad_id=0)
        ds[1]["input_ids"]  # tensor([8, 9])

    Args:
        tokens: ``(num_tokens,)`` integer token ids of all sequences, one after the other
            (stored as ``int32``).
        offsets: ``(N + 1,)`` start of each sequence in ``tokens``, then ``num_tokens``.
        trained: ``(num_tokens,)`` boolean, true where the token is trained on (its label
            is the token); ``None``: every token.
        pad_id: the token id batches are padded with.
        truncated: how many sequences were cut to a maximum length when read (reported,
            not used).

    Raises:
        ValueError: offsets that do not start at 0, decrease, or do not end at
            ``num_tokens``; an empty sequence; a ``trained`` mask of another length.
    """

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor, trained: torch.Tensor | None = None, *,
                 pad_id: int, truncated: int = 0):
        tokens = torch.as_tensor(tokens)
        offsets = torch.as_tensor(offsets, dtype=torch.long)
        if tokens.dim() != 1 or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be a 1-D tensor of integer token ids, got {tokens.dtype} "
                             f"of shape {tuple(tokens.shape)}")
        if offsets.dim() != 1 or offsets.numel() < 2:
            raise ValueError(f"offsets must be a 1-D tensor of N + 1 >= 2 positions, got shape {tuple(offsets.shape)}")
        if int(offsets[0]) != 0 or int(offsets[-1]) != tokens.numel():
            raise ValueError(f"offsets must run from 0 to the number of tokens ({tokens.numel()}), "
                             f"got {int(offsets[0])} .. {int(offsets[-1])}")
        lengths = offsets[1:] - offsets[:-1]
        if bool((lengths <= 0).any()):
            bad = int(torch.nonzero(lengths <= 0)[0])
            raise ValueError(f"sequence {bad} is empty (offsets {int(offsets[bad])} .. {int(offsets[bad + 1])}); "
                             "every sequence needs at least one token")
        if trained is None:
            trained = torch.ones(tokens.numel(), dtype=torch.bool)
        trained = torch.as_tensor(trained, dtype=torch.bool)
        if trained.shape != tokens.shape:
            raise ValueError(f"trained must have one entry per token ({tokens.numel()}), "
                             f"got shape {tuple(trained.shape)}")
        if not isinstance(pad_id, int) or pad_id < 0:
            raise ValueError(f"pad_id must be a token id (an int >= 0), got {pad_id!r}")
        self.tokens = tokens.to(torch.int32)
        self.offsets = offsets
        self.trained = trained
        self.pad_id = pad_id
        self.truncated = int(truncated)

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], trained: Sequence[Sequence[bool]] | None = None, *,
                       pad_id: int, truncated: int = 0) -> "TokenDataset":
        """Build from lists of token ids (and, optionally, one trained-on flag per token).

        Raises:
            ValueError: no sequences, an empty one, or flags that do not match the tokens.
        """
        if len(sequences) == 0:
            raise ValueError("no sequences: a TokenDataset needs at least one")
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        tokens = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=total)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**31):
            raise ValueError(f"token ids must be in [0, 2**31), got {tokens.min()} .. {tokens.max()}")
        mask = None
        if trained is not None:
            if len(trained) != len(sequences) or any(len(m) != n for m, n in zip(trained, lengths)):
                raise ValueError("trained must hold one flag per token of every sequence")
            mask = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(trained), dtype=np.bool_, count=total))
        return cls(torch.from_numpy(tokens.astype(np.int32)), torch.from_numpy(offsets), mask, pad_id=pad_id,
                   truncated=truncated)

    def __len__(self) -> int:
        return int(self.offsets.numel() - 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Sequence ``i`` as ``{"input_ids": (L,) long, "labels": (L,) long}`` (labels -100
        where not trained on)."""
        i, n = operator.index(i), len(self)
        if not -n <= i < n:
            raise IndexError(f"sequence index {i} out of range for a TokenDataset of {n} sequences")
        i %= n
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.tokens[start:stop].long()
        return {"input_ids": ids, "labels": ids.masked_fill(~self.trained[start:stop], IGNORE_INDEX)}

    @property
    def num_tokens(self) -> int:
        """Tokens of all sequences together."""
        return int(self.tokens.numel())

    @property
    def num_trained_tokens(self) -> int:
        """Tokens trained on (whose label is not -100)."""
        return int(self.trained.sum())

    @property
    def lengths(self) -> torch.Tensor:
        """``(N,)`` length of each sequence."""
        return self.offsets[1:] - self.offsets[:-1]

    def __repr__(self) -> str:
        return (f"TokenDataset({len(self)} sequences, {self.num_tokens} tokens, "
                f"{self.num_trained_tokens} trained on, pad_id={self.pad_id})")

    def select(self, indices: Sequence[int] | torch.Tensor) -> "TokenDataset":
        """A new dataset of the sequences at ``indices``, in that order (a compact copy)."""
        rows = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if rows.numel() == 0:
            raise ValueError("select() needs at least one index")
        n = len(self)
        if bool(((rows < -n) | (rows >= n)).any()):
            raise IndexError(f"indices out of range for a TokenDataset of {n} sequences")
        rows = rows % n
        lengths = self.lengths[rows]
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.long)
        torch.cumsum(lengths, 0, out=offsets[1:])
        # every token of the chosen sequences: (num chosen tokens,) positions in the flat tensor
        within = torch.arange(int(offsets[-1])) - torch.repeat_interleave(offsets[:-1], lengths)
        flat = torch.repeat_interleave(self.offsets[rows], lengths) + within
        return TokenDataset(self.tokens[flat], offsets, self.trained[flat], pad_id=self.pad_id)

    def split(self, fraction: float, seed: int = 0) -> tuple["TokenDataset", "TokenDataset"]:
        """A random ``(train, held_out)`` split of the sequences, each part in dataset order.

        Args:
            fraction: share of the sequences held out, in (0, 1); at least one sequence
                goes to each part.
            seed: seed of the permutation that chooses them (the same seed, the same split).

        Raises:
            ValueError: ``fraction`` outside (0, 1), or fewer than two sequences.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        n = len(self)
        if n < 2:
            raise ValueError(f"cannot split a TokenDataset of {n} sequence: it needs at least 2")
        held = min(max(int(round(fraction * n)), 1), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return self.select(order[held:].sort().values), self.select(order[:held].sort().values)

    def collate(self, rows: torch.Tensor) -> Batch:
        """The batch of the sequences at ``rows``, padded to the longest of them.

        Args:
            rows: ``(B,)`` sequence indices.

        Returns:
            A :class:`~kdistill.outputs.Batch` with ``inputs = {"input_ids", "attention_mask"}``
            (``(B, T)`` long), ``targets = next_token_targets(labels)`` and ``index = rows``.
        """
        rows = torch.as_tensor(rows, dtype=torch.long)
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        width = int(lengths.max())
        positions = torch.arange(width)
        mask = positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T): real tokens
        # (B, T) positions in the flat tensors; past a sequence's end, clamped (then masked)
        flat = (starts.unsqueeze(1) + positions.unsqueeze(0)).clamp_(max=self.num_tokens - 1)
        ids = self.tokens[flat].long().masked_fill_(~mask, self.pad_id)
        labels = ids.masked_fill(~(mask & self.trained[flat]), IGNORE_INDEX)
        inputs = {"input_ids": ids, "attention_mask": mask.long()}
        return Batch(inputs, next_token_targets(labels), rows)

    def loader(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
               drop_last: bool = False, shard: tuple[int, int] | None = None, pad: bool = True) -> "TokenLoader":
        """An iterable of padded batches; arguments as for
        :class:`~kdistill.data.loader.ArrayLoader` (``pad`` is about sharding, not about
        sequence padding: see :func:`~kdistill.data.loader.batch_rows`)."""
        return TokenLoader(self, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                           shard=shard, pad=pad)


class TokenLoader:
    """Batches of a :class:`TokenDataset`, each padded to its longest sequence.

    The order of the sequences is :func:`~kdistill.data.loader.batch_rows`', exactly as
    for :class:`~kdistill.data.loader.ArrayLoader`: a new permutation drawn from
    ``generator`` at the start of each pass when ``shuffle``; with ``shard=(r, N)`` this
    process's share of every global batch of ``batch_size`` sequences.

    Args:
        dataset: the sequences.
        batch_size: sequences per (global) batch.
        shuffle: draw a new order each pass from ``generator``.
        generator: a seeded ``torch.Generator`` (required for repeatable shuffles).
        drop_last: drop the last incomplete batch.
        shard: ``(rank, world_size)``: this process's share of every batch.
        pad: with ``shard``, pad the order to a multiple of the process count (training).
    """

    def __init__(self, dataset: TokenDataset, *, batch_size: int = 32, shuffle: bool = False,
                 generator: torch.Generator | None = None, drop_last: bool = False,
                 shard: tuple[int, int] | None = None, pad: bool = True):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        self.shard = shard
        self.pad = pad

    @property
    def num_samples(self) -> int:
        """Sequences in the dataset."""
        return len(self.dataset)

    def __len__(self) -> int:
        return count_batches(self.num_samples, self.batch_size, drop_last=self.drop_last, shard=self.shard,
                             pad=self.pad)

    def __iter__(self) -> Iterator[Batch]:
        for rows in batch_rows(self.num_samples, self.batch_size, shuffle=self.shuffle, generator=self.generator,
                               drop_last=self.drop_last, shard=self.shard, pad=self.pad):
            yield self.dataset.collate(rows)


# --------------------------------------------------------------------------------------
# tokenizer helpers
# --------------------------------------------------------------------------------------


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token: set one first, e.g. "
                         "tokenizer.add_special_tokens({'pad_token': '<|pad|>'})")
    return int(pad)


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, which separates documents and ends answers: set one, "
                         "e.g. tokenizer.add_special_tokens({'eos_token': '<|endoftext|>'})")
    return int(eos)


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (one batched call)."""
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer starts every encoding with BOS itself (a Llama
    tokenizer), ``[]`` otherwise (GPT-2 style)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    empty = list(tokenizer("", add_special_tokens=True)["input_ids"])
    return [int(bos)] if empty[:1] == [bos] else []


# --------------------------------------------------------------------------------------
# plain text -> fixed-length blocks
# --------------------------------------------------------------------------------------


def pack_texts(texts: Iterable[str], tokenizer: Any, block_size: int, *, add_eos: bool = True) -> TokenDataset:
    """Documents -> one stream of tokens -> blocks of ``block_size`` tokens.

    Each document is tokenized (without special tokens) and followed by EOS, the
    documents are concatenated in order, and the stream is cut into consecutive blocks of
    exactly ``block_size`` tokens; the remainder shorter than a block is dropped. Every
    token is trained on; a block's last position has no next token in the block
    (``targets`` -100 there). A block may span the end of one document and the start of
    the next, as in GPT-2 style pre-training.

    Example::

        data = pack_texts(["def f():\\n    return 1\\n", "x = 2\\n"], tokenizer, block_size=128)

    Args:
        texts: the documents.
        tokenizer: a Hugging Face tokenizer.
        block_size: tokens per block (sequence length).
        add_eos: put EOS after each document; without, documents are simply joined.

    Returns:
        A :class:`TokenDataset` of ``num_tokens // block_size`` blocks.

    Raises:
        ValueError: ``block_size`` < 2, or fewer tokens than one block.
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    texts = list(texts)
    eos = [_eos_id(tokenizer)] if add_eos else []
    ids = _encode(tokenizer, texts)
    total = sum(len(s) + len(eos) for s in ids)
    if total < block_size:
        raise ValueError(f"the {len(texts)} texts make {total} tokens, fewer than one block of "
                         f"block_size={block_size}: give more text or a smaller block_size")
    stream = np.fromiter(itertools.chain.from_iterable(itertools.chain(s, eos) for s in ids), dtype=np.int32,
                         count=total)
    blocks = total // block_size
    tokens = torch.from_numpy(stream[: blocks * block_size].copy())
    offsets = torch.arange(0, blocks * block_size + 1, block_size, dtype=torch.long)
    return TokenDataset(tokens, offsets, None, pad_id=_pad_id(tokenizer))


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        where = "is a directory" if path.is_dir() else "does not exist"
        raise DatasetNotFoundError(f"text file {path} {where}: give the paths of UTF-8 text files")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8: byte {e.start} ({data[e.start:e.start + 1]!r}) {e.reason}; "
                         "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from e


def read_text(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Any, block_size: int, *,
              add_eos: bool = True) -> TokenDataset:
    """Plain-text files (UTF-8), one document each, packed into blocks by :func:`pack_texts`.

    Example::

        train = read_text(["corpus/a.txt", "corpus/b.txt"], tokenizer, block_size=256)

    Args:
        paths: a file, or a list of files (read in that order).
        tokenizer: a Hugging Face tokenizer.
        block_size: tokens per block.
        add_eos: EOS after each file.

    Raises:
        FileNotFoundError: a path that does not exist (named in the message).
        ValueError: a file that is not valid UTF-8 (named, with the byte offset).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    texts = [_read_utf8(Path(p)) for p in paths]
    if not texts:
        raise ValueError("read_text() got no paths")
    return pack_texts(texts, tokenizer, block_size, add_eos=add_eos)


# --------------------------------------------------------------------------------------
# JSONL: prompt/completion and chat records
# --------------------------------------------------------------------------------------

_EXPECTED = "'prompt' and 'completion' (strings), or 'messages' (a list of {'role', 'content'})"


def _record_error(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {message}")


def _prompt_completion(record: dict, tokenizer: Any, bos: list[int], eos: int) -> tuple[list[int], list[bool]]:
    prompt, completion = _encode(tokenizer, [record["prompt"], record["completion"]])
    ids = bos + prompt + completion + [eos]
    return ids, [False] * (len(bos) + len(prompt)) + [True] * (len(completion) + 1)


def _fallback_chat(messages: list[dict], tokenizer: Any, bos: list[int], eos: int) -> tuple[list[int], list[bool]]:
    """``<|role|>\\ncontent\\n`` per message, EOS after each assistant turn; the assistant's
    content, its newline and the EOS are trained on."""
    pieces = []
    for m in messages:
        pieces += [f"<|{m['role']}|>\n", f"{m['content']}\n"]
    encoded = _encode(tokenizer, pieces)
    ids, trained = list(bos), [False] * len(bos)
    for k, m in enumerate(messages):
        header, body = encoded[2 * k], encoded[2 * k + 1]
        assistant = m["role"] == "assistant"
        ids += header + body + ([eos] if assistant else [])
        trained += [False] * len(header) + [assistant] * (len(body) + (1 if assistant else 0))
    return ids, trained


def _template_chat(messages: list[dict], tokenizer: Any) -> tuple[list[int], list[bool]]:
    """The tokenizer's chat template, the assistant turns found by rendering the
    conversation up to each of them: the text between ``render(messages[:k],
    add_generation_prompt=True)`` and ``render(messages[:k + 1])`` is turn ``k``'s answer
    (with its end-of-turn marker). Each part is tokenized on its own, so a turn's bounds
    are token bounds."""

    def render(msgs: list[dict], generation: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation)

    full = render(messages)
    cuts: list[tuple[int, int]] = []  # character spans of the assistant turns
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        through = render(messages[: k + 1])
        if k:
            prefix = render(messages[:k], generation=True)
            start = len(prefix) if through.startswith(prefix) else -1
        else:  # nothing before it to render: the answer starts where its content does
            start = max(through.find(m["content"]), 0) if m["content"] else len(through)
        if start < 0 or not full.startswith(through):
            raise ValueError("the tokenizer's chat template does not render a conversation's beginning as a prefix "
                             "of the whole conversation, so the assistant turns cannot be located; set "
                             "tokenizer.chat_template = None to use kdistill's plain template")
        cuts.append((start, len(through)))
    bounds = [0]
    for start, stop in cuts:
        bounds += [start, stop]
    bounds.append(len(full))
    parts = [full[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    encoded = _encode(tokenizer, parts)
    ids: list[int] = []
    trained: list[bool] = []
    for j, part in enumerate(encoded):
        ids += part
        trained += [j % 2 == 1] * len(part)  # parts alternate: before a turn, the turn, ...
    return ids, trained


def _check_record(record: Any, path: Path, line: int) -> str:
    """Which format a record is in, or a clear error naming what it holds."""
    if not isinstance(record, dict):
        raise _record_error(path, line, f"a record must be a JSON object with {_EXPECTED}; "
                                        f"got a {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _record_error(path, line, f"'messages' must be a non-empty list of {{'role', 'content'}}, "
                                            f"got {type(messages).__name__}")
        for j, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                found = sorted(m) if isinstance(m, dict) else type(m).__name__
                raise _record_error(path, line, f"message {j} must have string keys 'role' and 'content'; "
                                                f"found {found}")
        return "messages"
    if "prompt" in record and "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record[key], str):
                raise _record_error(path, line, f"{key!r} must be a string, got {type(record[key]).__name__}")
        return "prompt"
    raise _record_error(path, line, f"found keys {sorted(record)}, expected {_EXPECTED}")


def read_jsonl(path: str | os.PathLike, tokenizer: Any, *, max_length: int | None = None) -> TokenDataset:
    """Supervised fine-tuning records, one JSON object a line, the prompt masked from the loss.

    Two formats are accepted (they may be mixed; blank lines are skipped):

    - ``{"prompt": "...", "completion": "..."}``: the sequence is the prompt's tokens,
      the completion's tokens and EOS (after BOS when the tokenizer starts encodings with
      one); only the completion and the EOS are trained on. Prompt and completion are
      tokenized separately, so the boundary is exact.
    - ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``:
      trained on the assistant turns only. With a chat template
      (``tokenizer.chat_template``) the conversation is rendered by it and an assistant
      turn is its content and end-of-turn marker; without one, each message is written
      ``<|role|>\\ncontent\\n`` and each assistant turn is followed by EOS (the assistant's
      content, newline and EOS are trained on).

    Example::

        sft = read_jsonl("data/train.jsonl", tokenizer, max_length=512)

    Args:
        path: the ``.jsonl`` file.
        tokenizer: a Hugging Face tokenizer.
        max_length: longer sequences are cut on the right, keeping their first
            ``max_length`` tokens (the end of the answer is lost); how many were cut is
            the dataset's ``truncated`` attribute and a warning. ``None``: no limit.

    Returns:
        A :class:`TokenDataset`, one sequence per record, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line that is not JSON, or a record without the expected keys; the
            message names the file, the line number, the keys found and those expected.
    """
    path = Path(path)
    text = _read_utf8(path)
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an integer >= 2 or None, got {max_length!r}")
    eos = _eos_id(tokenizer)
    bos = _bos_prefix(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    sequences: list[list[int]] = []
    masks: list[list[bool]] = []
    truncated = 0
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _record_error(path, line, f"not valid JSON ({e.msg} at column {e.colno}); "
                                            f"each line must be one JSON object with {_EXPECTED}") from e
        kind = _check_record(record, path, line)
        if kind == "prompt":
            ids, trained = _prompt_completion(record, tokenizer, bos, eos)
        elif template:
            ids, trained = _template_chat(record["messages"], tokenizer)
        else:
            ids, trained = _fallback_chat(record["messages"], tokenizer, bos, eos)
        if not ids:
            raise _record_error(path, line, "the record has no tokens")
        if max_length is not None and len(ids) > max_length:
            ids, trained = ids[:max_length], trained[:max_length]
            truncated += 1
        sequences.append(ids)
        masks.append(trained)
    if not sequences:
        raise ValueError(f"{path} holds no records: expected one JSON object a line with {_EXPECTED}")
    if truncated:
        warnings.warn(f"{path}: {truncated} of {len(sequences)} records were longer than max_length={max_length} "
                      "tokens and were cut on the right (their ends dropped)", stacklevel=2)
    return TokenDataset.from_sequences(sequences, masks, pad_id=_pad_id(tokenizer), truncated=truncated)


# --------------------------------------------------------------------------------------
# tokenizers: train offline, load from a folder
# --------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, *, min_frequency: int = 2,
                    special_tokens: Sequence[str] = ("<|endoftext|>", "<|pad|>")) -> Any:
    """Train a byte-level BPE tokenizer on ``texts``, offline, with the ``tokenizers`` library.

    Byte-level: any text can be encoded (no unknown token) and decoding gives the text
    back exactly. The same texts and arguments give the same tokenizer.

    Example::

        tokenizer = train_tokenizer(texts, vocab_size=4096)
        tokenizer.save_pretrained("runs/tokenizer")

    Args:
        texts: the training texts (e.g. ``[text for _, text in python_source_corpus()]``).
        vocab_size: tokens in the vocabulary, the 256 bytes and the special tokens
            included.
        min_frequency: a pair is merged only if it occurs at least this often.
        special_tokens: the first is EOS (and BOS, GPT-2 style), the second the pad
            token; any more are added as further special tokens.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``; save it with ``save_pretrained(path)``
        and load it again with :func:`load_tokenizer`.

    Raises:
        MissingExtraError: ``tokenizers``/``transformers`` are not installed.
        ValueError: fewer than two special tokens, or a ``vocab_size`` that does not
            exceed the 256 bytes and the special tokens.
    """
    tokenizers = _require("tokenizers")
    transformers = _require("transformers")
    special_tokens = list(special_tokens)
    if len(special_tokens) < 2 or len(set(special_tokens)) != len(special_tokens):
        raise ValueError(f"special_tokens must name at least two distinct tokens (EOS, pad), got {special_tokens}")
    if not isinstance(vocab_size, int) or vocab_size <= 256 + len(special_tokens):
        raise ValueError(f"vocab_size must exceed the 256 bytes and {len(special_tokens)} special tokens "
                         f"({256 + len(special_tokens)}), got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be a positive integer, got {min_frequency!r}")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((t for t in texts), trainer=trainer)
    eos, pad, *extra = special_tokens
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=pad,
        model_max_length=int(1e30), clean_up_tokenization_spaces=False,
    )
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    return fast


_NEVER_DOWNLOADS = ("kdistill never downloads: save a tokenizer there with tokenizer.save_pretrained(path) "
                    "or train one with kdistill.data.text.train_tokenizer")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A Hugging Face tokenizer from a local folder (``save_pretrained``'s), never from the hub.

    Example::

        tokenizer = load_tokenizer("runs/tokenizer")

    Args:
        path: the folder (``tokenizer.json``, ``tokenizer_config.json``, ...).

    Returns:
        The tokenizer ``transformers.AutoTokenizer`` builds from the folder, read with
        ``local_files_only=True``.

    Raises:
        FileNotFoundError: ``path`` is not a folder, or holds no tokenizer files.
        MissingExtraError: ``transformers`` is not installed.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"no tokenizer folder at {path}; {_NEVER_DOWNLOADS}")
    known = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
    if not any((path / name).is_file() for name in known):
        raise ModelNotFoundError(f"{path} holds no tokenizer files (looked for {', '.join(known)}); {_NEVER_DOWNLOADS}")
    transformers = _require("transformers")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"could not load a tokenizer from {path}: {e}; {_NEVER_DOWNLOADS}") from e


# --------------------------------------------------------------------------------------
# a corpus every machine with Python has
# --------------------------------------------------------------------------------------

# tests, an IDE and third-party packages are not the library; "encodings" holds ~100 generated
# character tables that are near copies of each other (a held-out one would be recalled, not predicted)
_SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__",
                           "encodings"})


def python_source_corpus(*, max_files: int | None = None, max_bytes: int | None = None) -> list[tuple[str, str]]:
    """The running Python's standard library sources, as ``(relative name, text)`` pairs.

    Every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``, sorted by relative name
    (``/``-separated), skipping the ``test``, ``tests``, ``idlelib``, ``lib2to3``,
    ``site-packages`` and ``dist-packages`` folders (third-party packages are not part
    of it), the ``encodings`` folder (generated character tables, near copies of each
    other: one held out would be recalled from its copies, not predicted) and any file
    that is not valid UTF-8. Nothing is downloaded: every machine
    with Python has it. The Python standard library is distributed under the PSF License
    (Python Software Foundation License Version 2); keep its notice with anything
    redistributed from it.

    Args:
        max_files: keep only the first ``max_files`` files (in name order).
        max_bytes: keep the first files whose UTF-8 sizes add up to at most ``max_bytes``.

    Returns:
        ``[(name, text), ...]``, e.g. ``("json/decoder.py", "...")``. Split it into train
        and held-out files with :func:`split_corpus`.

    Raises:
        FileNotFoundError: the standard library folder does not exist.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DatasetNotFoundError(f"the Python standard library is not at {root} (sysconfig's 'stdlib' path)")
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
        for f in files:
            if f.endswith(".py"):
                names.append((Path(folder) / f).relative_to(root).as_posix())
    corpus: list[tuple[str, str]] = []
    size = 0
    for name in sorted(names):
        if max_files is not None and len(corpus) >= max_files:
            break
        data = (root / name).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if max_bytes is not None and size + len(data) > max_bytes:
            break
        size += len(data)
        corpus.append((name, text))
    return corpus


def _held_out(name: str, fraction: float) -> bool:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_corpus(corpus: Sequence[tuple[str, str]], held_out: float = 0.05) -> tuple[list[tuple[str, str]],
                                                                                   list[tuple[str, str]]]:
    """Split ``(name, text)`` files into ``(train, held_out)`` by a hash of each name.

    A file's side depends on its name only (SHA-256), so the split is the same on every
    machine and every run, and a held-out file stays held out when files are added or
    removed: held-out files are never seen in training.

    Args:
        corpus: ``(name, text)`` pairs, e.g. :func:`python_source_corpus`'s.
        held_out: the expected share of files held out, in (0, 1).

    Returns:
        ``(train, held_out)``, each in the corpus's order.

    Raises:
        ValueError: ``held_out`` outside (0, 1).
    """
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be in (0, 1), got {held_out}")
    train, held = [], []
    for item in corpus:
        (held if _held_out(item[0], held_out) else train).append(item)
    return train, held
