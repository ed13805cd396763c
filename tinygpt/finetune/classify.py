"""The book's chapter 6: fine-tune a pretrained language model into a text classifier (spam or not).

This module owns the classifier's pieces, each handed to the one training loop (`tinygpt.train`):
reading a labelled table (the SMS Spam Collection exactly as the book's pandas call reads it, or
any CSV/TSV/JSONL), balancing and splitting it with the book's seeds, a padded dataset with
`__len__`/`batch` for `tinygpt.data.DataLoader`, the `Classifier` (a linear head on any
`CausalLM`'s hidden states), which parameters train, the loss and the accuracy metric, scoring
whole splits, and saving/loading the classifier. The command line is `tinygpt/commands/classify.py`.

    x = backbone.hidden(ids)                 (B, T, C)   GPT-2 or Llama, after the final norm
    h = x[b, pos_b]                          (B, C)      pos: last real token (default), ...
    logits = h @ W + b                       (B, K)      K classes; loss = cross-entropy

Why the last *real* token: attention is causal, so the last token is the only one that has seen
the whole message. The book reads position T-1, which for a short message is a pad token: its
prediction then depends on how much padding follows (users reported this). Here each batch keeps
the real lengths, and positions after the batch's longest message are never computed at all,
since under causal attention they cannot change any earlier position.

    python demos/spam_classifier.py --smollm2     # the book's run on SmolLM2-135M
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

from tinygpt import functional as F
from tinygpt.autograd import Tensor, is_grad_enabled, no_grad
from tinygpt.data import DataLoader
from tinygpt.download import DownloadError, cache_dir, download_file, shared_data_dir
from tinygpt.fileio import atomic_write, write_json_atomic
from tinygpt.model import check_token_ids
from tinygpt.nn import Embedding, Linear, Module

BOOK_SEED = 123                   # every random draw of the book's chapter 6
TOKEN_POSITIONS = ("last-real", "last", "first", "mean")
TRAINABLE = ("last-block", "last-two-blocks", "all", "head", "lora")
SMS_FILE = "SMSSpamCollection"
SMS_SHA256 = "edc1f2ca36319ca36c6f80fede2f6ae5f81335289352485f3924df077ec20266"
SMS_URLS = ("https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip")
CLASSIFIER_FILE, HEAD_FILE = "classifier.json", "classifier.safetensors"


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
                             "--text-col/--label-col (name the file .csv, .tsv or .jsonl)")
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
            keys = {want: _find_column(row, want, path, flag)
                    for want, flag in ((text_col, "--text-col"), (label_col, "--label-col"))}
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


def _find_column(row: dict, want: str, path: Path, flag: str) -> str:
    if want in row:
        return want
    folded = [k for k in row if k.lower() == want.lower()]
    if len(folded) == 1:
        return folded[0]
    raise ValueError(f"{path}: no column {want!r} ({flag}); columns are {', '.join(map(str, row))}")


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
    random_state=123)`, i.e. `RandomState(123).choice(n, n, replace=False)`); 1,494 -> 1,045/149/300."""
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
    zipped = cache_dir() / "sms+spam+collection.zip"
    errors, urls = [], SMS_URLS if urls is None else urls
    try:
        zipped.parent.mkdir(parents=True, exist_ok=True)
        for url in urls:
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


# --- the model -----------------------------------------------------------------------------------

class Classifier(Module):
    """A `Linear(n_embd, num_classes)` head on a language model's hidden state at one position.

    `backbone` is any `CausalLM` (GPT, Llama): only its `hidden(idx)` is used, so its own
    vocabulary head is idle. `token_pos` picks the state: `last-real` (each text's last token),
    `last` (position T-1, a pad token for short texts: the book's), `first`, or `mean` (average
    over the real tokens). `model(ids, lengths)` -> logits (B, num_classes).
    """

    def __init__(self, backbone, num_classes: int, token_pos: str = "last-real",
                 seed: int = BOOK_SEED, cache_frozen: bool = False):
        if token_pos not in TOKEN_POSITIONS:
            raise ValueError(f"unknown token position {token_pos!r}; choose from "
                             f"{', '.join(TOKEN_POSITIONS)}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.backbone, self.token_pos = backbone, token_pos
        self.head = Linear(backbone.config.n_embd, num_classes, np.random.default_rng(seed))
        self.rng = getattr(backbone, "rng", None)        # dropout masks, kept in checkpoints
        self.cache_frozen = cache_frozen
        self.frozen_states: dict[bytes, np.ndarray] = {}   # text's ids -> (T, C) after the prefix

    @property
    def config(self):
        return self.backbone.config

    @property
    def num_classes(self) -> int:
        return self.head.weight.shape[1]

    def forward(self, ids: np.ndarray, lengths: np.ndarray) -> Tensor:
        ids, lengths = np.asarray(ids), np.asarray(lengths)
        B = ids.shape[0]
        if self.token_pos == "first":
            ids, lengths = ids[:, :1], np.minimum(lengths, 1)   # causal: token 0 sees itself
        elif self.token_pos != "last":
            ids = ids[:, :int(lengths.max())]       # later positions cannot change earlier ones
        x = self._hidden(ids, lengths)                                   # (B, T, C)
        if self.token_pos == "last-real":
            h = x[np.arange(B), lengths - 1]                             # (B, C)
        elif self.token_pos == "mean":
            real = (np.arange(ids.shape[1]) < lengths[:, None]).astype(x.dtype)   # (B, T)
            h = F.sum(x * real[:, :, None], axis=1) / lengths[:, None].astype(x.dtype)
        else:
            h = x[:, -1 if self.token_pos == "last" else 0, :]
        return self.head(h)                                              # (B, K)

    # A frozen prefix is a fixed feature extractor. With `cache_frozen`, the states after the
    # leading blocks that train nothing are computed once per text and kept (by the text's ids):
    # training the book's last block then runs 1 block per step instead of all of them. Exact
    # for the positions read here (real tokens; pads get zeros, which no real token attends to).

    def _hidden(self, ids: np.ndarray, lengths: np.ndarray) -> Tensor:
        n_frozen = self._frozen_blocks()
        if n_frozen == 0:
            return self.backbone.hidden(ids)
        states = np.zeros((*ids.shape, self.config.n_embd), dtype=self.head.weight.dtype)
        keys = [ids[b, :n].tobytes() for b, n in enumerate(lengths)]
        missing = [b for b, key in enumerate(keys) if key not in self.frozen_states]
        if missing:
            with no_grad():
                rows = ids[missing, :int(lengths[missing].max())]
                x = self.backbone.embed(check_token_ids(rows, self.config.vocab_size), 0)
                for i, block in enumerate(self.backbone.blocks()[:n_frozen]):
                    x = block(x, None, i)
            for j, b in enumerate(missing):
                self.frozen_states[keys[b]] = x.data[j, :lengths[b]].copy()
        for b, key in enumerate(keys):
            states[b, :lengths[b]] = self.frozen_states[key]
        x = Tensor(states)
        for i, block in enumerate(self.backbone.blocks()[n_frozen:], n_frozen):
            x = block(x, None, i)
        return self.backbone.norm_f(x)

    def _frozen_blocks(self) -> int:
        """How many leading blocks the cache may stand for: 0 unless `cache_frozen`, the
        position is not `last` (which reads a pad), there is no dropout and the embeddings are
        frozen; then every leading block without a trainable parameter."""
        if (not self.cache_frozen or self.token_pos == "last"
                or getattr(self.config, "dropout", 0.0) > 0):
            return 0
        if any(p.requires_grad for m in self.backbone.modules() if isinstance(m, Embedding)
               for p in m.parameters()):
            return 0
        n = 0
        for block in self.backbone.blocks():
            if any(p.requires_grad for p in block.parameters()):
                break
            n += 1
        return n


def set_trainable(model: Classifier, mode: str, *, lora_rank: int = 16,
                  lora_alpha: float = 16.0) -> None:
    """Freeze the model, then unfreeze what `mode` trains, the head always included.

    `last-block` (the book): the last transformer block, the final norm and the head;
    `last-two-blocks`; `all` (but an idle untied vocabulary head); `head`; `lora`: LoRA adapters
    on every linear layer, the head's included (`tinygpt.finetune.lora`). The final norm is found
    as the backbone's parameters outside its blocks, embeddings and vocabulary head.
    """
    if mode not in TRAINABLE:
        raise ValueError(f"unknown --trainable {mode!r}; choose from {', '.join(TRAINABLE)}")
    backbone = model.backbone
    model.requires_grad_(False)
    model.frozen_states.clear()                           # states of an earlier freezing
    if mode == "all":
        backbone.requires_grad_(True)
        head = _vocab_head(backbone)
        if head is not None:                              # idle: logits come from our head
            head.requires_grad = False
    elif mode in ("last-block", "last-two-blocks"):
        for block in backbone.blocks()[-(1 if mode == "last-block" else 2):]:
            block.requires_grad_(True)
        for p in _final_norm_params(backbone):
            p.requires_grad = True
    elif mode == "lora":
        # the book's appendix E: every Linear of the classifier, its new head too, gets an
        # adapter beside its frozen weight (GPT-2 124M, rank 16: 2,666,528 trainable)
        from tinygpt.finetune.lora import apply_lora      # stage 3b; imported only when asked
        apply_lora(model, lora_rank, lora_alpha, targets=None)
        return
    model.head.requires_grad_(True)


def _vocab_head(backbone):
    """The backbone's own untied vocabulary head (a Parameter), or None when it is tied."""
    with no_grad():
        w = backbone.head_weight()
    return w if any(w is p for p in backbone.parameters()) else None


def _final_norm_params(backbone) -> list:
    inside = {id(p) for block in backbone.blocks() for p in block.parameters()}
    inside |= {id(p) for m in backbone.modules() if isinstance(m, Embedding)
               for p in m.parameters()}
    head = _vocab_head(backbone)
    if head is not None:
        inside.add(id(head))
    params = [p for p in backbone.parameters() if id(p) not in inside]
    if not params:
        raise ValueError(f"{type(backbone).__name__} has no final-norm parameters outside its "
                         "blocks")
    return params


# --- loss, metric, evaluation --------------------------------------------------------------------

def classification_loss(model: Classifier, ids: np.ndarray, lengths: np.ndarray,
                        labels: np.ndarray) -> Tensor:
    """Mean cross-entropy of the logits against the labels: the loss_fn for `train()`."""
    return F.cross_entropy(_logits(model, ids, lengths), labels)


def accuracy(model: Classifier, ids: np.ndarray, lengths: np.ndarray,
             labels: np.ndarray) -> float:
    """Fraction of texts whose likeliest class is the label: the metric for `train()`."""
    with no_grad():
        logits = _logits(model, ids, lengths)
    return float(np.mean(logits.data.argmax(axis=-1) == labels))


def _logits(model: Classifier, ids: np.ndarray, lengths: np.ndarray) -> Tensor:
    """model(ids, lengths), remembered for one call when no graph is recorded: `train()`'s
    evaluation calls the loss and then each metric on the same batch, and one forward serves."""
    memo = getattr(model, "_memo", None)
    if memo is not None and memo[0] is ids and memo[1] is lengths:
        return memo[2]
    logits = model(ids, lengths)
    model._memo = (ids, lengths, logits) if not is_grad_enabled() else None
    return logits


def evaluate_split(model: Classifier, loader: DataLoader) -> dict[str, float]:
    """{"loss", "accuracy", "n"} over every text of `loader` (the book's calc_accuracy_loader
    with num_batches=None), dropout off; each text counts once, whatever its batch's size."""
    was_training = model.training
    model.eval()
    loss = correct = n = 0.0
    try:
        with no_grad():
            for ids, lengths, labels in loader:
                logits = model(ids, lengths)
                loss += float(F.cross_entropy(logits, labels, reduction="sum").data)
                correct += float(np.sum(logits.data.argmax(axis=-1) == labels))
                n += len(labels)
    finally:
        model.train(was_training)
        model._memo = None
    return {"loss": loss / n, "accuracy": correct / n, "n": int(n)}


def predict(model: Classifier, ids: Sequence[Sequence[int]], pad_id: int,
            batch_size: int = 8) -> np.ndarray:
    """Class probabilities (N, K) of tokenized texts, in batches."""
    data = ClassificationDataset(ids, np.zeros(len(ids)), pad_id)
    model.eval()
    out = []
    with no_grad():
        for ids_b, lengths, _ in DataLoader(data, batch_size):
            out.append(F.softmax(model(ids_b, lengths)).data)
    return np.concatenate(out)


# --- save and load -------------------------------------------------------------------------------

def save_classifier(model: Classifier, out_dir: str | os.PathLike, tokenizer,
                    label_names: Sequence[str], pad_id: int, max_length: int,
                    extra: dict | None = None) -> Path:
    """Write the backbone in its hub layout (config.json + model.safetensors, with its tokenizer,
    so every command can load it as a language model), the head in classifier.safetensors and
    classifier.json (label names, token position, pad id, length) last, so a folder with a
    classifier.json is complete. LoRA adapters are merged into their weights first, in place."""
    from tinygpt.model import GPT
    from tinygpt.safetensors import save_safetensors
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CLASSIFIER_FILE).unlink(missing_ok=True)     # incomplete until rewritten below
    if any(name.endswith(".lora_A") for name, _ in model.named_parameters()):
        from tinygpt.finetune.lora import unload
        unload(model)                # adapters merged into plain Linears: the hub layout's names
    backbone = model.backbone
    if isinstance(backbone, GPT):
        from tinygpt.weights import save_pretrained
        save_pretrained(backbone, out, tokenizer)
    else:
        from tinygpt.llama_weights import save_llama_hf
        save_llama_hf(backbone, out)
        _save_hf_tokenizer(tokenizer, out)
    save_safetensors({"head.weight": model.head.weight.data, "head.bias": model.head.bias.data},
                     out / HEAD_FILE)
    write_json_atomic(out / CLASSIFIER_FILE, {
        "format": "tinygpt-classifier", "label_names": list(label_names),
        "token_pos": model.token_pos, "pad_id": int(pad_id), "max_length": int(max_length),
        "backbone": "gpt2" if isinstance(backbone, GPT) else "llama", **(extra or {})})
    return out


def _save_hf_tokenizer(tok, out: Path) -> None:
    """`tok` (an HFTokenizer) as the tokenizer.json + tokenizer_config.json of a hub folder,
    just the fields `HFTokenizer.from_tokenizer_json` reads back."""
    from tinygpt.bpe import bytes_to_unicode
    char = bytes_to_unicode()                            # byte -> GPT-2's printable character

    def written(b: bytes) -> str:
        return "".join(char[x] for x in b)

    vocab = {written(b): i for b, i in tok.ranks.items()}
    merges = [f"{written(a)} {written(b)}" for (a, b), _ in
              sorted(tok.merge_priority.items(), key=lambda item: item[1])]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    pre = byte_level if tok.pre == "gpt2" else {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in tok.special_tokens.items()]
    write_json_atomic(out / "tokenizer.json", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": pre, "post_processor": None,
        "decoder": {**byte_level}, "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False, "vocab": vocab, "merges": merges}})
    names = {i: t for t, i in tok.special_tokens.items()}
    config = {"eos_token": names[tok.eos_id]} if tok.eos_id in names else {}
    write_json_atomic(out / "tokenizer_config.json", config)


def load_classifier(model_dir: str | os.PathLike) -> tuple[Classifier, object, dict]:
    """(classifier in eval mode, its tokenizer, classifier.json) from `save_classifier`'s folder."""
    from tinygpt.safetensors import load_safetensors
    directory = Path(model_dir)
    info_path = directory / CLASSIFIER_FILE
    if not info_path.is_file():
        raise ValueError(f"{directory}: no {CLASSIFIER_FILE}: not a classifier (train one with "
                         "`tinygpt finetune-classifier --out DIR`)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        names, token_pos, pad_id = info["label_names"], info["token_pos"], int(info["pad_id"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{info_path}: not a classifier description ({e})") from None
    backbone, tokenizer = load_backbone(directory)
    head = load_safetensors(directory / HEAD_FILE)
    model = Classifier(backbone, len(names), token_pos)
    try:
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items()})
    except ValueError as e:
        raise ValueError(f"{directory / HEAD_FILE}: {e}") from None
    return model.eval(), tokenizer, info


def load_backbone(path_or_name: str | os.PathLike, dir: str | os.PathLike = "weights"):
    """(language model, tokenizer) from a GPT-2 name or folder, a Llama hub folder or a `.gguf`
    file: `weights.load_pretrained`, the loader every command shares."""
    from tinygpt.weights import load_pretrained
    return load_pretrained(path_or_name, dir)


__all__ = ["BOOK_SEED", "Classifier", "ClassificationDataset", "LabelledTexts", "Splits",
           "TOKEN_POSITIONS", "TRAINABLE", "accuracy", "balance", "classification_loss",
           "evaluate_split", "load_backbone", "load_classifier", "pad_id_of", "predict",
           "read_labelled", "save_classifier", "set_trainable", "sms_spam_file", "spam_splits",
           "split"]
