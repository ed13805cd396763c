"""Sliding windows, batches, train/val split, prepare -> .bin, memmap batches, `tinygpt prepare`."""
import json

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tinygpt.commands import cli
from tinygpt.text.data import (DataLoader, GPTDataset, MemmapDataset, create_dataloader,
                          iter_text_chunks, prepare, read_meta, read_text, train_val_split)
from tinygpt.text.tokenizer import CharTokenizer, GPT2Tokenizer


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer()


@pytest.fixture
def verdict(shared) -> str:
    return read_text(shared / "data" / "the-verdict.txt")


def book_windows(ids, max_length, stride):
    """The book's GPTDatasetV1 loop, written out as the reference."""
    inputs, targets = [], []
    for i in range(0, len(ids) - max_length, stride):
        inputs.append(ids[i:i + max_length])
        targets.append(ids[i + 1:i + max_length + 1])
    return inputs, targets


# --- GPTDataset and DataLoader ------------------------------------------------------------------

def test_windows_are_exact_and_shifted_by_one():
    ds = GPTDataset(np.arange(10), max_length=4, stride=2)
    assert len(ds) == 3  # starts 0, 2, 4: a start at 6 would need ids[6:11]
    x, y = ds[1]
    assert x.tolist() == [2, 3, 4, 5] and y.tolist() == [3, 4, 5, 6]
    assert x.dtype == y.dtype == np.int64
    with pytest.raises(IndexError):
        ds[3]


@given(n=st.integers(2, 40), max_length=st.integers(1, 12), stride=st.integers(1, 6))
def test_windows_match_the_books_loop(n, max_length, stride):
    ids = (np.arange(n) * 7) % 11
    if n < max_length + 1:
        with pytest.raises(ValueError, match=f"has {n} tokens"):
            GPTDataset(ids, max_length, stride)
        return
    ds = GPTDataset(ids, max_length, stride)
    inputs, targets = book_windows(ids.tolist(), max_length, stride)
    assert len(ds) == len(inputs)
    for i in range(len(ds)):
        assert ds[i][0].tolist() == inputs[i] and ds[i][1].tolist() == targets[i]
    x, y = ds.batch(np.arange(len(ds)))
    assert x.tolist() == inputs and y.tolist() == targets


def test_dataset_errors_are_clear():
    with pytest.raises(ValueError, match="empty"):
        GPTDataset([], max_length=4, stride=1)
    with pytest.raises(ValueError, match=r"has 3 tokens, but max_length=4 needs at least 5"):
        GPTDataset([1, 2, 3], max_length=4, stride=1)
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        GPTDataset(np.arange(10), max_length=4, stride=0)
    with pytest.raises(ValueError, match="max_length must be a positive integer, got -1"):
        GPTDataset(np.arange(10), max_length=-1, stride=1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        DataLoader(GPTDataset(np.arange(10), 4, 1), batch_size=0)
    with pytest.raises(ValueError, match="the text is empty"):
        GPTDataset.from_text("", CharTokenizer("ab"), max_length=4, stride=1)


@pytest.mark.parametrize("drop_last, n_batches, last_size", [(False, 4, 1), (True, 3, 3)])
def test_drop_last_counts(drop_last, n_batches, last_size):
    ds = GPTDataset(np.arange(14), max_length=4, stride=1)  # 10 windows
    loader = DataLoader(ds, batch_size=3, drop_last=drop_last)
    batches = list(loader)
    assert len(loader) == len(batches) == n_batches
    assert batches[-1][0].shape == (last_size, 4)
    if not drop_last:  # in order, every window once
        assert np.concatenate([x[:, 0] for x, _ in batches]).tolist() == list(range(10))


def test_shuffle_is_reproducible_and_seed_dependent():
    ds = GPTDataset(np.arange(100), max_length=4, stride=1)

    def first_epochs(seed, n=2):
        loader = DataLoader(ds, batch_size=8, shuffle=True, seed=seed)
        return [np.concatenate([x[:, 0] for x, _ in loader]) for _ in range(n)]

    a, b, c = first_epochs(0), first_epochs(0), first_epochs(1)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], a[1])           # each epoch gets a new permutation
    assert sorted(a[0].tolist()) == list(range(96))  # ... of every window
    from_rng = DataLoader(ds, batch_size=8, shuffle=True, seed=np.random.default_rng(0))
    assert np.array_equal(np.concatenate([x[:, 0] for x, _ in from_rng]), a[0])


def test_book_dataloader_first_batch(verdict):
    # fixed values from the book, ch02: batch_size=1, max_length=4, stride=1, shuffle=False
    x, y = next(iter(create_dataloader(verdict, "gpt2", batch_size=1, max_length=4, stride=1,
                                       shuffle=False)))
    assert x.tolist() == [[40, 367, 2885, 1464]] and y.tolist() == [[367, 2885, 1464, 1807]]
    loader = create_dataloader(verdict, batch_size=8, max_length=4, stride=4, shuffle=True)
    for x, y in loader:
        assert x.shape == y.shape == (8, 4) and x.dtype == y.dtype == np.int64
        assert np.array_equal(x[:, 1:], y[:, :-1])
    assert len(loader) == (5145 - 4 + 3) // 4 // 8  # ceil((n - T) / stride) windows, full batches


def test_train_val_split_by_characters_like_the_book(verdict, gpt2):
    train, val = train_val_split(verdict, val_fraction=0.1)
    assert len(train) == int(0.9 * 20479) and train + val == verdict  # the book's split_idx
    ids = np.array(gpt2.encode(verdict))
    train_ids, val_ids = train_val_split(ids, 0.1)
    assert len(train_ids) == int(0.9 * 5145) and len(val_ids) == 5145 - int(0.9 * 5145)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=f"val_fraction must be in \\[0, 1\\), got {bad}"):
            train_val_split(verdict, bad)


# --- reading files in chunks ----------------------------------------------------------------

def test_non_utf8_names_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"x\ny\n" * 100 + "café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte offset 403"):
        read_text(path)
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte offset 403"):
        list(iter_text_chunks(path, chunk_bytes=16))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt: the file is empty"):
        read_text(tmp_path / "empty.txt")


LINES = st.lists(st.sampled_from(["x\ny", " \n", "\n\n", "  ", "'s", "<|endoftext|>", "é", "😀",
                                  "Hello", " world", ".", "\t", "12"]), max_size=60).map("".join)


@given(text=LINES, chunk_bytes=st.integers(1, 24))
@example(text="Hi\n\nHello\n", chunk_bytes=3)  # a cut after "\n\n" would give 628, not 198 198
def test_chunks_tokenize_like_the_whole_text(tmp_path_factory, gpt2, text, chunk_bytes):
    path = tmp_path_factory.getbasetemp() / "chunks.txt"
    path.write_text(text, encoding="utf-8")
    chunks = [chunk for chunk, _ in iter_text_chunks(path, chunk_bytes)]
    assert "".join(chunks) == text
    assert [i for chunk in chunks for i in gpt2.encode(chunk)] == gpt2.encode(text)


# --- prepare and MemmapDataset --------------------------------------------------------------

def test_prepare_round_trip_gpt2(tmp_path, shared, verdict, gpt2):
    meta = prepare(shared / "data" / "the-verdict.txt", tmp_path, "gpt2", val_fraction=0.1,
                   progress=False, chunk_bytes=512)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert np.concatenate([train, val]).tolist() == gpt2.encode(verdict)
    assert len(train) == int(0.9 * 5145)
    assert meta == read_meta(tmp_path)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_round_trip_char(tmp_path, shared, verdict):
    meta = prepare(shared / "data" / "the-verdict.txt", tmp_path, "char", val_fraction=0.0,
                   progress=False)
    tok = CharTokenizer(meta["chars"])
    assert tok.decode(np.fromfile(tmp_path / "train.bin", dtype=np.uint16)) == verdict
    assert meta["val_tokens"] == 0 and meta["train_tokens"] == 20479


def test_prepare_errors(tmp_path, shared):
    src = shared / "data" / "the-verdict.txt"
    with pytest.raises(ValueError, match="val_fraction"):
        prepare(src, tmp_path, val_fraction=1.0, progress=False)
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        prepare(tmp_path / "nothing.txt", tmp_path / "out", progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt: the file is empty"):
        prepare(tmp_path / "empty.txt", tmp_path / "out", progress=False)
    big = CharTokenizer("ab")
    big.name, big.chars = "huge", [chr(i) for i in range(70_000) if not 0xD800 <= i < 0xE000]
    with pytest.raises(ValueError, match="huge.*uint16"):
        prepare(src, tmp_path / "out", tokenizer=big, progress=False)
    assert not any(p.suffix == ".tmp" for p in tmp_path.rglob("*"))


def test_memmap_windows_are_valid_slices(tmp_path, shared):
    prepare(shared / "data" / "the-verdict.txt", tmp_path, "gpt2", progress=False)
    ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16).astype(np.int64)
    ds = MemmapDataset.from_prepared(tmp_path, "train", max_length=16)
    assert len(ds) == len(ids) - 16
    x, y = ds.sample_batch(8, np.random.default_rng(3))
    starts = np.random.default_rng(3).integers(0, len(ds), size=8)  # the same draws
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    for b, s in enumerate(starts):
        assert np.array_equal(x[b], ids[s:s + 16]) and np.array_equal(y[b], ids[s + 1:s + 17])
    again, _ = ds.sample_batch(8, np.random.default_rng(3))
    assert np.array_equal(again, x)
    last_x, last_y = ds[len(ds) - 1]
    assert np.array_equal(last_y, ids[-16:]) and np.array_equal(last_x, ids[-17:-1])
    for x, y in DataLoader(ds, batch_size=64, shuffle=True, seed=0):
        assert np.array_equal(x[:, 1:], y[:, :-1])


def test_memmap_errors(tmp_path):
    np.arange(5, dtype=np.uint16).tofile(tmp_path / "tiny.bin")
    with pytest.raises(ValueError, match=r"tiny.bin has 5 tokens, but max_length=8 needs at "):
        MemmapDataset(tmp_path / "tiny.bin", max_length=8)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        MemmapDataset.from_prepared(tmp_path, "train", 4)
    with pytest.raises(ValueError, match="'test'"):
        MemmapDataset.from_prepared(tmp_path, "test", 4)
    with pytest.raises(ValueError, match="batch_size"):
        MemmapDataset(tmp_path / "tiny.bin", max_length=2).sample_batch(0, np.random.default_rng())


# --- the CLI ------------------------------------------------------------------------------------

def test_cli_prepare(tmp_path, shared, capsys):
    out = tmp_path / "verdict"
    assert cli.main(["prepare", str(shared / "data" / "the-verdict.txt"), str(out), "--quiet"]) == 0
    assert "4,630 tokens" in capsys.readouterr().out  # int(0.9 * 5145) in train.bin
    assert json.loads((out / "meta.json").read_text())["val_tokens"] == 515


def test_cli_prepare_non_utf8_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello\n\xff world\n")
    assert cli.main(["prepare", str(bad), str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "bad.txt" in lines[0] and "byte offset 6" in lines[0]
    assert not (tmp_path / "out" / "train.bin").exists()


def test_cli_prepare_bad_val_fraction(tmp_path, shared, capsys):
    src = str(shared / "data" / "the-verdict.txt")
    assert cli.main(["prepare", src, str(tmp_path), "--val-fraction", "1.5"]) == 2
    assert "val_fraction must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_pretrain_data_from_a_text_file_and_a_prepared_directory(tmp_path):
    from tinygpt.text.data import SampledBatches, pretrain_data
    text = "".join(f"line {i}: the quick brown fox.\n" for i in range(200))
    (tmp_path / "t.txt").write_text(text)
    train, val, tok = pretrain_data(tmp_path / "t.txt", 16, 4, seed=0, tokenizer="char")
    x, y = next(iter(train))
    assert x.shape == (4, 16) and tok.decode(x[0]) in text and len(val) >= 1
    prepare(tmp_path / "t.txt", tmp_path / "p", tokenizer="char", progress=False)
    train, val, tok = pretrain_data(tmp_path / "p", 16, 4, seed=0)
    assert isinstance(train, SampledBatches) and tok.chars == sorted(set(text))
    first = [x.copy() for x, _ in train]                  # the windows come from train.rng
    assert len(first) == len(train) and first[0].shape == (4, 16)
    assert not np.array_equal(first[0], next(iter(train))[0])    # the rng moved on
