"""The book's chapter 6 data: labelled texts read as the book reads them, balanced and split with
its seeds, tokenized and padded into a dataset that `tinygpt.text.data.DataLoader` batches.

Owns reading (the UCI SMS Spam Collection exactly as the book's pandas call, or any CSV/TSV/JSONL
with a text and a label column), `balance` and `split` (the book's pandas `sample` calls
reproduced with NumPy's RandomState), fetching the UCI zip when no file is given, and
`ClassificationDataset`, whose batches are (ids, lengths, labels). The model, loss and training
are `classify.py`'s.

    python -c "from tinygpt.finetune.classify_data import *; \
print(len(read_labelled('../shared/data/SMSSpamCollection').texts))"            # 5572
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tinygpt.text.data import DataLoader
from tinygpt.hub.download import DownloadError, cache_dir, download_file, shared_data_dir
from tinygpt.core.fileio import atomic_write

BOOK_SEED = 123                   # every random draw of the book's chapter 6
SMS_FILE = "SMSSpamCollection"
SMS_SHA256 = "edc1f2ca36319ca36c6f80fede2f6ae5f81335289352485f3924df077ec20266"
SMS_URLS = ("https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip")


# --- data: read, balance, split ------------------------------------------------------------------

@dataclass
class LabelledTexts:
    """Texts with their labels as strings, in file order; `source` names the file."""
    texts: list[str]
    labels: list[str]
    source: str

    def label_names(self) -> list[str]:
        """Sorted label names; class k is label_names[k] (the book: ham 0, spam 1)."""
        return sorted(set(self.labels))


def read_labelled(path: str | os.PathLike, text_col: str | None = None,
                  label_col: str | None = None) -> LabelledTexts:
    """Read `path`: `.csv`/`.tsv` with a header row, `.jsonl` of objects, or else the SMS Spam
    Collection's headerless `label<TAB>text` lines.

    Fields are read like pandas' `read_csv(sep="\\t", header=None)`, the book's call: a field
    that starts with `"` runs to its closing quote, across tabs and newlines (`""` is a quote).
    That is why the UCI file's 5,574 lines are 5,572 messages (4,825 ham, 747 spam).
    Columns default to `text` and `label`, matched without case if not found exactly.
    """
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"data file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _jsonl_rows(raw, path)
    elif suffix in (".csv", ".tsv"):
        rows = _csv_rows(raw, "," if suffix == ".csv" else "\t", path, header=True)
    else:
        if text_col is not None or label_col is not None:
            raise ValueError(f"{path}: a file of label<TAB>text lines has no header, so no "
                             "column names (name the file .csv, .tsv or .jsonl)")
        rows = _csv_rows(raw, "\t", path, header=False)
    texts, labels = _columns(rows, path, text_col or "text", label_col or "label")
    if len(set(labels)) < 2:
        raise ValueError(f"{path}: every row has label {labels[0]!r} if any: a classifier needs "
                         "at least two classes")
    return LabelledTexts(texts, labels, str(path))


def _csv_rows(raw: str, delimiter: str, path: Path, header: bool):
    """(row number, {column: value}) per record; headerless files get columns label, text."""
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter)
    names = ["label", "text"]
    if header:
        names = next(reader, None)
        if not names:
            raise ValueError(f"{path}: empty file (expected a header row)")
    start = reader.line_num + 1
    for fields in reader:
        if fields:                                       # pandas skips blank lines too
            if len(fields) != len(names):
                what = ("has no tab: expected label<TAB>text" if not header and len(fields) == 1
                        else f"has {len(fields)} fields, the header {len(names)}" if header
                        else f"has {len(fields)} tab-separated fields, expected 2")
                raise ValueError(f"{path}: row {start} {what}")
            yield start, dict(zip(names, fields))
        start = reader.line_num + 1


def _jsonl_rows(raw: str, path: Path):
    for n, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: row {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {n} is not a JSON object")
            yield n, row


def _columns(rows, path: Path, text_col: str, label_col: str) -> tuple[list[str], list[str]]:
    texts, labels, keys = [], [], None
    for n, row in rows:
        if keys is None:
            keys = {want: _find_column(row, want, path, what)
                    for want, what in ((text_col, "text"), (label_col, "label"))}
        text, label = row.get(keys[text_col]), row.get(keys[label_col])
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: row {n} has an empty or missing text")
        if label is None or isinstance(label, (dict, list)) or str(label) == "":
            raise ValueError(f"{path}: row {n} has an empty or missing label")
        texts.append(text)
        labels.append(str(label))
    if keys is None:
        raise ValueError(f"{path}: no rows")
    return texts, labels


def _find_column(row: dict, want: str, path: Path, what: str) -> str:
    if want in row:
        return want
    folded = [k for k in row if k.lower() == want.lower()]
    if len(folded) == 1:
        return folded[0]
    raise ValueError(f"{path}: no {what} column {want!r}; columns are {', '.join(map(str, row))}")


def balance(labels: np.ndarray, seed: int = BOOK_SEED) -> np.ndarray:
    """Row indices with every class cut down to the smallest one's size, class after class.

    The book's `create_balanced_dataset`: `ham.sample(n_spam, random_state=123)`, which is
    `RandomState(123).choice(n_ham, n_spam, replace=False)` on the ham rows, then all spam rows.
    """
    counts = np.bincount(labels)
    n = counts[counts > 0].min()
    picked = []
    for k in np.flatnonzero(counts):
        rows = np.flatnonzero(labels == k)
        if len(rows) > n:
            rows = rows[np.random.RandomState(seed).choice(len(rows), n, replace=False)]
        picked.append(rows)
    return np.concatenate(picked)


def split(rows: np.ndarray, train_frac: float = 0.7, val_frac: float = 0.1,
          seed: int = BOOK_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle, then cut into train/val/test: the book's `random_split` (`df.sample(frac=1,
    random_state=123)`, i.e. `RandomState(123).choice(n, n, replace=False)`): 1,494 texts ->
    1,045/149/300."""
    n = len(rows)
    rows = rows[np.random.RandomState(seed).choice(n, n, replace=False)]
    train_end = int(n * train_frac)
    val_end = train_end + int(n * val_frac)
    return rows[:train_end], rows[train_end:val_end], rows[val_end:]


# --- the default data file -----------------------------------------------------------------------

def sms_spam_file(urls: Sequence[str] | None = None, *, progress: bool = True,
                  timeout: float = 30.0) -> Path:
    """The UCI SMS Spam Collection on disk: ../shared/data/SMSSpamCollection, else the cache's
    copy, else the UCI zip (or the book's backup URL) downloaded into the cache (resumable) and
    the file extracted from it, checked against its sha256. Offline, one DownloadError line."""
    shared, cached = shared_data_dir() / SMS_FILE, cache_dir() / SMS_FILE
    if shared.is_file():
        return shared
    if cached.is_file() and _sha256(cached.read_bytes()) == SMS_SHA256:
        return cached
    errors, urls = [], SMS_URLS if urls is None else urls
    try:
        cache_dir().mkdir(parents=True, exist_ok=True)
        for k, url in enumerate(urls):
            zipped = cache_dir() / f"sms-spam-collection-{k}.zip"   # a .part resumes per URL
            try:
                download_file(url, zipped, progress=progress, timeout=timeout, retries=1)
                return _extract_sms(zipped, cached, url)
            except DownloadError as e:
                errors.append(str(e))
    except OSError as e:                                 # an unwritable cache
        errors.append(str(e))
    raise DownloadError(f"{SMS_FILE} is not in {shared.parent} or {cached.parent}, and fetching "
                        f"it failed: {'; '.join(errors)}")


def _extract_sms(zipped: Path, dest: Path, url: str) -> Path:
    try:
        with zipfile.ZipFile(zipped) as z:
            data = z.read(SMS_FILE)
    except (zipfile.BadZipFile, KeyError) as e:
        zipped.unlink(missing_ok=True)
        zipped.with_name(zipped.name + ".sha256").unlink(missing_ok=True)
        raise DownloadError(f"{url}: not a zip holding {SMS_FILE} ({e}); removed, run again")
    if _sha256(data) != SMS_SHA256:
        raise DownloadError(f"{url}: {SMS_FILE} in the zip has sha256 {_sha256(data)}, "
                            f"expected {SMS_SHA256}")
    with atomic_write(dest) as f:
        f.write(data)
    return dest


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- dataset -------------------------------------------------------------------------------------

def pad_id_of(tokenizer) -> int | None:
    """The id a tokenizer pads with: its eos if it names one (SmolLM2: 2, <|im_end|>), else its
    end-of-text (GPT-2: 50256, the book's choice); None if it has neither."""
    eos = getattr(tokenizer, "eos_id", None)
    return eos if eos is not None else getattr(tokenizer, "eot_id", None)


class ClassificationDataset:
    """Token ids right-padded to one length (B, L), their real lengths (B,) and labels (B,).

    The book's `SpamDataset`: `max_length=None` pads to the longest text (the SMS training split:
    120 GPT-2 tokens); validation and test pass the training length and are cut to it.
    `batch(indices)` -> (ids, lengths, labels), the tuple the loss and metrics take.
    """

    def __init__(self, ids: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int,
                 max_length: int | None = None):
        if not len(ids):
            raise ValueError("a classification dataset needs at least one text")
        longest = max(len(t) for t in ids)
        self.max_length = longest if max_length is None else max_length
        self.n_truncated = sum(len(t) > self.max_length for t in ids)
        self.ids = np.full((len(ids), self.max_length), pad_id, dtype=np.int64)
        self.lengths = np.zeros(len(ids), dtype=np.int64)
        for i, t in enumerate(ids):
            t = t[:self.max_length]
            self.ids[i, :len(t)] = t
            self.lengths[i] = len(t)
        if self.lengths.min() == 0:
            raise ValueError(f"text {int(self.lengths.argmin())} has no tokens")
        self.labels = np.asarray(labels, dtype=np.int64)

    @classmethod
    def from_texts(cls, texts: Sequence[str], labels: Sequence[int], tokenizer, pad_id: int,
                   max_length: int | None = None) -> ClassificationDataset:
        return cls([tokenizer.encode(t) for t in texts], labels, pad_id, max_length)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.ids[indices], self.lengths[indices], self.labels[indices]


@dataclass
class Splits:
    """The three loaders of a classification run, and what they were built from."""
    train: DataLoader
    val: DataLoader
    test: DataLoader
    label_names: list[str]
    max_length: int


def spam_splits(data: LabelledTexts, tokenizer, pad_id: int, *, batch_size: int = 8,
                balanced: bool = True, max_length: int | None = None,
                seed: int = BOOK_SEED) -> Splits:
    """The book's pipeline: balance, split 70/10/20, tokenize, pad to the longest training text
    (capped at `max_length`, e.g. the model's block_size), batch. Training batches are shuffled
    and drop the last short one (1,045 -> 130 batches of 8); validation and test are not."""
    names = data.label_names()
    labels = np.array([names.index(s) for s in data.labels], dtype=np.int64)
    rows = balance(labels, seed) if balanced else np.arange(len(labels))
    parts = split(rows, seed=seed)
    ids = [tokenizer.encode(data.texts[i]) for i in parts[0]]
    train = ClassificationDataset(ids, labels[parts[0]], pad_id)
    if max_length is not None and train.max_length > max_length:
        train = ClassificationDataset(ids, labels[parts[0]], pad_id, max_length)
    L = train.max_length
    val, test = (ClassificationDataset.from_texts([data.texts[i] for i in p], labels[p],
                                                  tokenizer, pad_id, L) for p in parts[1:])
    return Splits(DataLoader(train, batch_size, shuffle=True, drop_last=True, seed=seed),
                  DataLoader(val, batch_size), DataLoader(test, batch_size), names, L)


__all__ = ["BOOK_SEED", "ClassificationDataset", "DownloadError", "LabelledTexts", "SMS_FILE",
           "SMS_URLS", "Splits", "balance", "pad_id_of", "read_labelled", "sms_spam_file",
           "spam_splits", "split"]
