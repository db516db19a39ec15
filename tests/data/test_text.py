"""Text data for language models: packing, JSONL masking, tokenizers, the token loader,
Hugging Face style dict batches and the Python-source corpus."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from kdistill.data.loader import ArrayLoader, DataLoaderAdapter, _to_batch, make_loader
from kdistill.data.text import (
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
from kdistill.errors import MissingExtraError
from kdistill.outputs import IGNORE_INDEX, next_token_targets

# a few KB of ASCII text, varied enough for a 400-token byte-level BPE
TEXTS = [
    f"def function_{i}(x, y={i}):\n    \"\"\"Return x plus {i} times y.\"\"\"\n"
    f"    total = x + {i} * y\n    for k in range({i % 7 + 1}):\n        total += k\n    return total\n"
    for i in range(40)
] + [f"The quick brown fox number {i} jumps over the lazy dog.\n" for i in range(30)]


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    return train_tokenizer(TEXTS, vocab_size=400)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# ------------------------------------------------------------------ optional extra


def test_importing_kdistill_does_not_import_transformers():
    code = ("import kdistill, kdistill.data, kdistill.data.text, sys; "
            "assert 'transformers' not in sys.modules, 'transformers'; "
            "assert 'tokenizers' not in sys.modules, 'tokenizers'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_missing_extra_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingExtraError, match=r'pip install "kdistill\[text\]"') as info:
        train_tokenizer(TEXTS, vocab_size=400)
    assert isinstance(info.value, ImportError)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ImportError, match=r'pip install "kdistill\[text\]"'):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------ tokenizers


def test_train_tokenizer_is_deterministic_and_round_trips(tokenizer, tmp_path):
    again = train_tokenizer(TEXTS, vocab_size=400)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert len(tokenizer) == 400
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    text = "def unseen_name(é):\n\treturn '∑' * 3  # any text, bytes included\n"
    assert tokenizer.decode(_ids(tokenizer, text)) == text  # byte level: exact round trip

    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert _ids(loaded, text) == _ids(tokenizer, text)
    assert _ids(loaded, TEXTS[3]) == _ids(tokenizer, TEXTS[3])
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.bos_token_id) == (
        tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id)
    assert loaded.decode(_ids(loaded, text)) == text


def test_train_tokenizer_extra_special_tokens_and_bad_arguments(tokenizer):
    tok = train_tokenizer(TEXTS, vocab_size=400, special_tokens=("<|eos|>", "<|pad|>", "<|sep|>"))
    assert tok.eos_token == "<|eos|>"
    assert _ids(tok, "a<|sep|>b")[1] == tok.convert_tokens_to_ids("<|sep|>")
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_tokenizer(TEXTS, vocab_size=200)
    with pytest.raises(ValueError, match="special_tokens"):
        train_tokenizer(TEXTS, vocab_size=400, special_tokens=("<|eos|>",))


def test_load_tokenizer_missing_folder_names_it_and_never_downloads(tmp_path):
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(missing)
    assert str(missing) in str(info.value)
    assert "kdistill never downloads" in str(info.value)
    assert "train_tokenizer" in str(info.value)
    with pytest.raises(FileNotFoundError, match="holds no tokenizer files"):
        load_tokenizer(tmp_path)  # a folder, but empty
    with pytest.raises(FileNotFoundError, match="gpt2"):
        load_tokenizer("gpt2")  # a hub name is never fetched


# ------------------------------------------------------------------ packing


def test_pack_texts_blocks_round_trip_with_eos_joins(tokenizer):
    block = 16
    data = pack_texts(TEXTS, tokenizer, block)
    eos = tokenizer.eos_token_id
    stream = [t for text in TEXTS for t in [*_ids(tokenizer, text), eos]]
    assert len(data) == len(stream) // block
    assert data.num_tokens == len(data) * block
    assert all(int(n) == block for n in data.lengths)
    flat = torch.cat([data[i]["input_ids"] for i in range(len(data))]).tolist()
    assert flat == stream[: len(data) * block]  # consecutive blocks, remainder dropped
    joined = "".join(text + tokenizer.eos_token for text in TEXTS)
    decoded = tokenizer.decode(flat)
    assert len(decoded) > 0.9 * len(joined)
    assert joined.startswith(decoded)
    for i in (0, len(data) - 1):  # every token trained on
        assert torch.equal(data[i]["labels"], data[i]["input_ids"])

    batch = next(iter(data.loader(4)))
    assert batch.inputs["input_ids"].shape == (4, block)
    assert bool((batch.inputs["attention_mask"] == 1).all())
    assert torch.equal(batch.targets[:, :-1], batch.inputs["input_ids"][:, 1:])
    assert bool((batch.targets[:, -1] == IGNORE_INDEX).all())


def test_pack_texts_without_eos_and_too_little_text(tokenizer):
    data = pack_texts(TEXTS[:5], tokenizer, 8, add_eos=False)
    stream = [t for text in TEXTS[:5] for t in _ids(tokenizer, text)]
    assert torch.cat([data[i]["input_ids"] for i in range(len(data))]).tolist() == stream[: len(data) * 8]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_texts(["hi"], tokenizer, 64)
    with pytest.raises(ValueError, match="block_size"):
        pack_texts(TEXTS, tokenizer, 1)


def test_read_text_files_and_their_errors(tokenizer, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXTS[0], encoding="utf-8")
    b.write_text(TEXTS[1], encoding="utf-8")
    data = read_text([a, b], tokenizer, 8)
    assert torch.equal(data.tokens, pack_texts(TEXTS[:2], tokenizer, 8).tokens)
    assert len(read_text(a, tokenizer, 8)) == len(pack_texts(TEXTS[:1], tokenizer, 8))

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text([a, tmp_path / "missing.txt"], tokenizer, 8)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8: byte 3"):
        read_text([a, bad], tokenizer, 8)


# ------------------------------------------------------------------ JSONL


def test_prompt_completion_masks_exactly_the_prompt(tokenizer, tmp_path):
    records = [{"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
               {"prompt": "The quick brown fox", "completion": " jumps."}]
    path = tmp_path / "pc.jsonl"
    _write_jsonl(path, records)
    data = read_jsonl(path, tokenizer)
    assert len(data) == 2 and data.truncated == 0
    eos = tokenizer.eos_token_id
    for i, r in enumerate(records):
        prompt, completion = _ids(tokenizer, r["prompt"]), _ids(tokenizer, r["completion"])
        item = data[i]
        assert item["input_ids"].tolist() == prompt + completion + [eos]
        assert item["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + completion + [eos]

    batch = next(iter(data.loader(2)))
    lengths = [len(data[0]["input_ids"]), len(data[1]["input_ids"])]
    width = max(lengths)
    assert batch.inputs["input_ids"].shape == (2, width)
    labels = torch.full((2, width), IGNORE_INDEX)
    for i in range(2):
        labels[i, : lengths[i]] = data[i]["labels"]
        assert batch.inputs["attention_mask"][i].tolist() == [1] * lengths[i] + [0] * (width - lengths[i])
        assert bool((batch.inputs["input_ids"][i, lengths[i]:] == tokenizer.pad_token_id).all())
    assert torch.equal(batch.targets, next_token_targets(labels))
    # position t predicts token t + 1: the last prompt position predicts the first completion token
    n_prompt = len(_ids(tokenizer, records[0]["prompt"]))
    assert batch.targets[0, n_prompt - 1] == _ids(tokenizer, records[0]["completion"])[0]
    assert bool((batch.targets[0, : n_prompt - 1] == IGNORE_INDEX).all())
    assert batch.index.tolist() == [0, 1]


def _trained_text(tokenizer, item) -> str:
    keep = item["labels"] != IGNORE_INDEX
    return tokenizer.decode(item["input_ids"][keep].tolist())


def test_messages_fallback_template_trains_on_assistant_turns_only(tokenizer, tmp_path):
    assert tokenizer.chat_template is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 1 and 2."},
                {"role": "assistant", "content": "3"}, {"role": "user", "content": "And 2 and 2?"},
                {"role": "assistant", "content": "4, said the fox."}]
    path = tmp_path / "chat.jsonl"
    _write_jsonl(path, [{"messages": messages}])
    item = read_jsonl(path, tokenizer)[0]
    eos = tokenizer.eos_token
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" + (eos if m["role"] == "assistant" else "") for m in messages)
    assert tokenizer.decode(item["input_ids"].tolist()) == text
    assert _trained_text(tokenizer, item) == f"3\n{eos}4, said the fox.\n{eos}"
    # the trained tokens are two contiguous runs (on, off, on: three changes), each ending with EOS
    trained = (item["labels"] != IGNORE_INDEX).int()
    changes = torch.nonzero(torch.diff(trained)).flatten().tolist()
    assert len(changes) == 3 and trained[0] == 0 and trained[-1] == 1
    assert item["labels"][changes[1]] == item["labels"][-1] == tokenizer.eos_token_id


def test_messages_with_a_chat_template(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome."}]
    path = tmp_path / "chat.jsonl"
    _write_jsonl(path, [{"messages": messages}, {"prompt": "a", "completion": "b"}])
    data = read_jsonl(path, tok)
    item = data[0]
    assert tok.decode(item["input_ids"].tolist()) == tok.apply_chat_template(messages, tokenize=False)
    assert _trained_text(tok, item) == "It is 4.<|endoftext|>You are welcome.<|endoftext|>"
    assert data[1]["labels"].tolist()[0] == IGNORE_INDEX  # formats may be mixed


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "a", "completion": ', r"bad\.jsonl, line 2: not valid JSON"),
    ('{"prompt": "a", "answer": "b"}', r"bad\.jsonl, line 2: found keys \['answer', 'prompt'\], expected 'prompt' "
                                       r"and 'completion'.*'messages'"),
    ('["a", "b"]', r"bad\.jsonl, line 2: a record must be a JSON object"),
    ('{"messages": [{"role": "user"}]}', r"bad\.jsonl, line 2: message 0 must have string keys 'role' and "
                                         r"'content'; found \['role'\]"),
    ('{"prompt": 1, "completion": "b"}', r"bad\.jsonl, line 2: 'prompt' must be a string"),
])
def test_jsonl_errors_name_file_line_and_keys(tokenizer, tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "completion": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=expected):
        read_jsonl(path, tokenizer)


def test_jsonl_missing_and_empty_files(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_jsonl(tmp_path / "nothing.jsonl", tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no records"):
        read_jsonl(empty, tokenizer)


def test_jsonl_truncates_on_the_right_and_counts(tokenizer, tmp_path):
    records = [{"prompt": "def f(x):\n", "completion": "    return x + 1\n" * 5},
               {"prompt": "a", "completion": "b"}]
    path = tmp_path / "long.jsonl"
    _write_jsonl(path, records)
    full = read_jsonl(path, tokenizer)
    with pytest.warns(UserWarning, match=r"1 of 2 records were longer than max_length=10 .* cut on the right"):
        cut = read_jsonl(path, tokenizer, max_length=10)
    assert cut.truncated == 1
    assert torch.equal(cut[0]["input_ids"], full[0]["input_ids"][:10])  # the first 10 tokens kept
    assert torch.equal(cut[0]["labels"], full[0]["labels"][:10])
    assert torch.equal(cut[1]["input_ids"], full[1]["input_ids"])


# ------------------------------------------------------------------ the dataset and loader


def _ragged(n: int = 23) -> TokenDataset:
    # sequence i holds i + 1 copies of token 10 + i: its length and content name it
    return TokenDataset.from_sequences([[10 + i] * (i % 6 + 1) for i in range(n)], pad_id=0)


def test_batches_pad_to_the_longest_sequence_in_the_batch():
    data = _ragged()
    for batch in data.loader(4, shuffle=True, generator=torch.Generator().manual_seed(0)):
        lengths = (data.lengths[batch.index]).tolist()
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
        assert ids.shape == (len(lengths), max(lengths)) and ids.dtype == torch.long
        for row, (i, n) in enumerate(zip(batch.index.tolist(), lengths)):
            assert ids[row, :n].tolist() == [10 + i] * n
            assert ids[row, n:].tolist() == [0] * (ids.shape[1] - n)
            assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)
            assert batch.targets[row].tolist() == [10 + i] * (n - 1) + [IGNORE_INDEX] * (ids.shape[1] - n + 1)


def test_loader_order_mirrors_array_loader_and_is_reproducible():
    data = _ragged()
    rows = torch.arange(len(data), dtype=torch.float32).unsqueeze(1)

    def orders(loader):
        return [[int(i) for b in loader for i in b.index] for _ in range(2)]  # two passes

    ours = orders(data.loader(5, shuffle=True, generator=torch.Generator().manual_seed(7)))
    again = orders(data.loader(5, shuffle=True, generator=torch.Generator().manual_seed(7)))
    arrays = orders(ArrayLoader(rows, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(7)))
    assert ours == again == arrays
    assert ours[0] != ours[1] and sorted(ours[0]) == list(range(len(data)))
    other = orders(data.loader(5, shuffle=True, generator=torch.Generator().manual_seed(8)))
    assert other != ours

    loader = data.loader(5, drop_last=True)
    assert len(loader) == 4 and [len(b) for b in loader] == [5] * 4
    assert loader.num_samples == len(data)
    assert len(data.loader(5)) == 5 and [len(b) for b in data.loader(5)][-1] == 3


@pytest.mark.parametrize("pad", [False, True])
def test_shards_are_disjoint_and_cover_the_data(pad):
    data, world, size = _ragged(23), 2, 4

    def one_pass(shard=None):  # each loader with its own generator of the same seed
        loader = data.loader(size, shuffle=True, generator=torch.Generator().manual_seed(1), shard=shard, pad=pad)
        return [b.index.tolist() for b in loader], len(loader)

    whole, _ = one_pass()
    shards = [one_pass((r, world)) for r in range(world)]
    for batches, length in shards:
        assert length == len(batches)
    seen = [[i for b in batches for i in b] for batches, _ in shards]
    assert set(seen[0]) | set(seen[1]) == set(range(len(data)))
    if pad:  # 23 -> 24: every process gets as many sequences as the other; the first one repeats
        assert [len(s) for s in seen] == [12, 12]
        assert set(seen[0]) & set(seen[1]) == {whole[0][0]}
    else:
        assert sorted(seen[0] + seen[1]) == list(range(len(data)))
        # each global batch is split across the processes: rank r takes positions r, r + 2, ...
        for r in range(world):
            assert shards[r][0] == [b[r::world] for b in whole]


def test_make_loader_takes_a_token_dataset_and_rejects_y():
    data = _ragged(10)
    loader = make_loader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert isinstance(loader, TokenLoader) and len(loader) == 3 and loader.num_samples == 10
    assert sorted(int(i) for b in loader for i in b.index) == list(range(10))
    shard = make_loader(data, batch_size=4, shard=(1, 2), pad=False)
    assert [int(i) for b in shard for i in b.index] == [1, 3, 5, 7, 9]
    with pytest.raises(ValueError, match="TokenDataset carries its own labels"):
        make_loader(data, torch.zeros(10))
    with pytest.raises(ValueError, match="TokenDataset carries its own labels"):
        make_loader(data, unlabelled=torch.zeros(3, 4))


def test_token_dataset_split_select_and_errors():
    data = _ragged(20)
    train, held = data.split(0.25, seed=3)
    assert (len(train), len(held)) == (15, 5)
    first = lambda d: {int(d[i]["input_ids"][0]) for i in range(len(d))}  # noqa: E731
    assert first(train).isdisjoint(first(held)) and first(train) | first(held) == first(data)
    again_train, again_held = data.split(0.25, seed=3)
    assert torch.equal(again_held.tokens, held.tokens) and torch.equal(again_train.offsets, train.offsets)
    assert not torch.equal(data.split(0.25, seed=4)[1].tokens, held.tokens)

    picked = data.select([4, 0, -1])
    assert [picked[i]["input_ids"].tolist() for i in range(3)] == [[14] * 5, [10], [29] * 2]

    masked = TokenDataset.from_sequences([[1, 2, 3]], [[False, True, True]], pad_id=0)
    assert masked[0]["labels"].tolist() == [IGNORE_INDEX, 2, 3] and masked.num_trained_tokens == 2
    assert masked.select([0])[0]["labels"].tolist() == [IGNORE_INDEX, 2, 3]
    with pytest.raises(ValueError, match="sequence 1 is empty"):
        TokenDataset.from_sequences([[1], []], pad_id=0)
    with pytest.raises(ValueError, match="offsets must run from 0"):
        TokenDataset(torch.tensor([1, 2, 3]), torch.tensor([0, 2]), pad_id=0)
    with pytest.raises(IndexError, match="out of range"):
        data[20]
    with pytest.raises(ValueError, match="fraction"):
        data.split(1.0)


# ------------------------------------------------------------------ Hugging Face style dict batches


def test_hugging_face_dict_batch_with_labels():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 6, 7, -100], [8, 9, -100, -100]])
    batch = _to_batch({"input_ids": ids, "attention_mask": mask, "labels": labels, "index": torch.tensor([3, 4])})
    assert set(batch.inputs) == {"input_ids", "attention_mask"}
    assert torch.equal(batch.inputs["input_ids"], ids)
    assert batch.targets.tolist() == [[6, 7, -100, -100], [9, -100, -100, -100]]
    assert batch.index.tolist() == [3, 4]


def test_hugging_face_dict_batch_without_labels_shifts_the_inputs():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = _to_batch({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)},
                      torch.tensor([0, 1]))
    assert set(batch.inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch.targets.tolist() == [[6, 7, -100, -100], [9, -100, -100, -100]]
    assert batch.index.tolist() == [0, 1]
    no_mask = _to_batch({"input_ids": ids})
    assert no_mask.targets.tolist() == [[6, 7, 0, -100], [9, 0, 0, -100]]
    # (B,) labels: a sequence classifier's classes, kept as they are
    classes = _to_batch({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([1, 0])})
    assert classes.targets.tolist() == [1, 0]


def test_hugging_face_dicts_through_a_dataloader_and_the_old_dict_keys():
    data = [{"input_ids": torch.tensor([i, i + 1, i + 2]), "attention_mask": torch.ones(3, dtype=torch.long)}
            for i in range(6)]
    batches = list(DataLoaderAdapter(DataLoader(data, batch_size=4)))
    assert [len(b) for b in batches] == [4, 2]
    assert batches[0].targets[0].tolist() == [1, 2, -100]
    # the existing dict keys keep their meaning
    old = _to_batch({"inputs": torch.zeros(2, 3), "labels": torch.tensor([1, 2])})
    assert old.targets.tolist() == [1, 2] and isinstance(old.inputs, torch.Tensor)
    with pytest.raises(ValueError, match="'input_ids'"):
        _to_batch({"pixels": torch.zeros(2)})
    with pytest.raises(ValueError, match="return_tensors='pt'"):
        _to_batch({"input_ids": [[1, 2], [3, 4]]})


# ------------------------------------------------------------------ the Python-source corpus


def test_python_source_corpus_is_sorted_filtered_and_bounded():
    corpus = python_source_corpus(max_files=40)
    names = [name for name, _ in corpus]
    assert len(corpus) == 40 and names == sorted(names)
    assert all(name.endswith(".py") and "\\" not in name for name in names)
    assert python_source_corpus(max_files=40) == corpus  # deterministic
    skipped = {"test", "tests", "idlelib", "site-packages", "lib2to3"}
    assert not any(skipped & set(name.split("/")[:-1]) for name, _ in corpus)
    assert any("/" in name for name in names) or len(names) == 40
    sizes = [len(text.encode("utf-8")) for _, text in corpus]
    bounded = python_source_corpus(max_bytes=sum(sizes[:10]))
    assert bounded == corpus[:10]


def test_split_corpus_is_disjoint_deterministic_and_by_name():
    corpus = python_source_corpus(max_files=200)
    train, held = split_corpus(corpus, held_out=0.1)
    names = lambda c: [n for n, _ in c]  # noqa: E731
    assert set(names(train)).isdisjoint(names(held))
    assert sorted(names(train) + names(held)) == sorted(names(corpus))
    assert 0 < len(held) < 0.3 * len(corpus)
    assert split_corpus(corpus, held_out=0.1) == (train, held)
    # a file's side depends on its name only: a sub-corpus splits the same way
    sub_train, sub_held = split_corpus(corpus[::3], held_out=0.1)
    assert set(names(sub_held)) == set(names(held)) & set(names(corpus[::3]))
    with pytest.raises(ValueError, match="held_out"):
        split_corpus(corpus, held_out=0)
