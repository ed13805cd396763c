"""Text to token arrays, train/val split, and seeded `(x, y)` batches (NumPy only).

Owns the book's sliding-window dataset (`GPTDataset`, chapter 2) with a `DataLoader`-like batch
iterator, and, for corpora larger than memory, `prepare` (text file -> uint16 `train.bin`/`val.bin`
+ `meta.json`) with `MemmapDataset`, which samples random windows straight from disk, and
`pretrain_data`, the batches of `tinygpt pretrain` from either. Tokenizers are `tokenizer.py`;
the training loop that consumes batches is `train.py`.

    tinygpt prepare ../shared/data/tinyshakespeare.txt data/shakespeare --tokenizer gpt2

Every batch is `(x, y)`: int64 arrays of shape (B, T) with T = max_length, and y[b, t] is the
token after x[b, t] (so y[:, :-1] == x[:, 1:]).
Randomness always comes from an explicit seed or np.random.Generator.
"""
from __future__ import annotations

import shutil
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from tinygpt.core.fileio import atomic_write, write_json_atomic
from tinygpt.text.tokenizer import CharTokenizer, get_tokenizer
from tinygpt.core.validate import check_number, json_checksum, read_json_object, require_keys

TOKEN_DTYPE = np.uint16   # on disk: GPT-2's 50,257 ids fit in 16 bits, half the size of int32
CHUNK_BYTES = 1 << 20     # prepare reads and tokenizes about 1 MB of text at a time
META_FILE = "meta.json"
META_DTYPES = ("uint16", "uint32")  # what a .bin of token ids may hold (prepare writes uint16)


class TokenizerLike(Protocol):
    name: str
    n_vocab: int

    def encode(self, text: str) -> list[int]: ...


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")


def _check_val_fraction(val_fraction: float) -> None:
    check_number("val_fraction", val_fraction, 0.0, 1.0, hi_open=True)


# --- reading text ------------------------------------------------------------------------------

def _decode_utf8(data: bytes, path: Path, offset: int) -> str:
    """Decode UTF-8, or raise ValueError naming the file and the offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte offset {offset + e.start} "
                         f"(byte 0x{data[e.start]:02x})") from None


def read_text(path: Path | str) -> str:
    """A whole UTF-8 text file; clear errors for a missing, empty or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    text = _decode_utf8(path.read_bytes(), path, 0)
    if not text:
        raise ValueError(f"{path}: the file is empty")
    return text


def _safe_cut(buf: bytes) -> int:
    """The last position p at which tokenizing buf[:p] and buf[p:] apart equals tokenizing buf.

    We cut just after a newline whose neighbours are printable ASCII ("x\\nH"): GPT-2's regex always
    ends a word there and a special token never spans it. (After "  \\n" it would not: at the end
    of a chunk the whole whitespace run is one word, mid-text it splits as "  " + "\\n".)
    Returns 0 if there is no such newline.
    """
    end = len(buf) - 1
    while (j := buf.rfind(b"\n", 1, end)) > 0:
        if 0x21 <= buf[j - 1] <= 0x7E and 0x21 <= buf[j + 1] <= 0x7E:
            return j + 1
        end = j
    return 0


def iter_text_chunks(path: Path | str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[str, int]]:
    """Yield (text, n_bytes) pieces of a UTF-8 file, cut where tokenization is unaffected."""
    path = Path(path)
    _check_positive(chunk_bytes=chunk_bytes)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    offset, buf = 0, b""
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            buf += block
            cut = _safe_cut(buf)
            if cut:  # else keep reading: a chunk must end at a safe place
                yield _decode_utf8(buf[:cut], path, offset), cut
                offset, buf = offset + cut, buf[cut:]
    if buf:
        yield _decode_utf8(buf, path, offset), len(buf)


def train_val_split(seq: Sequence, val_fraction: float = 0.1) -> tuple[Sequence, Sequence]:
    """Split a text (by characters, as the book does) or a token array (by tokens) into two parts.

    The first int((1 - val_fraction) * len(seq)) items are training data, the rest validation.
    """
    _check_val_fraction(val_fraction)
    split = int((1.0 - val_fraction) * len(seq))
    return seq[:split], seq[split:]


# --- the book's sliding-window dataset -------------------------------------------------------

class GPTDataset:
    """Windows of `max_length` token ids, starting every `stride` tokens; targets shifted by one.

    Window i is x = ids[i*stride : i*stride + max_length] and y = ids[i*stride + 1 : ... + 1].
    Like the book's GPTDatasetV1, the starts are range(0, len(ids) - max_length, stride).
    """

    def __init__(self, ids: Sequence[int] | np.ndarray, max_length: int, stride: int):
        _check_positive(max_length=max_length, stride=stride)
        self.ids = np.asarray(ids, dtype=np.int64)
        if self.ids.ndim != 1:
            raise ValueError(f"token ids must be a 1-D sequence, got shape {self.ids.shape}")
        if len(self.ids) == 0:
            raise ValueError("no tokens: the text is empty")
        if len(self.ids) < max_length + 1:
            raise ValueError(f"the text has {len(self.ids)} tokens, but max_length={max_length} "
                             f"needs at least {max_length + 1} (one extra for the shifted targets)")
        self.max_length, self.stride = max_length, stride
        self.starts = np.arange(0, len(self.ids) - max_length, stride)

    @classmethod
    def from_text(cls, text: str, tokenizer: TokenizerLike, max_length: int,
                  stride: int) -> GPTDataset:
        if not text:
            raise ValueError("the text is empty")
        return cls(tokenizer.encode(text), max_length, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start = self.starts[i]                                   # IndexError past the end
        window = self.ids[start:start + self.max_length + 1]     # (T + 1,)
        return window[:-1], window[1:]                           # (T,), (T,)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows `indices` stacked: x, y of shape (len(indices), max_length)."""
        rows = self.starts[indices][:, None] + np.arange(self.max_length + 1)  # (B, T + 1)
        windows = self.ids[rows]
        return windows[:, :-1], windows[:, 1:]


class DataLoader:
    """Batches of a dataset: `for x, y in DataLoader(ds, batch_size=8, shuffle=True, seed=0)`.

    With shuffle, each pass draws a new permutation from one Generator, so epochs differ from each
    other but the whole sequence is reproducible from the seed. drop_last drops a final short batch.
    """

    def __init__(self, dataset: GPTDataset | MemmapDataset, batch_size: int = 4,
                 shuffle: bool = False, drop_last: bool = False,
                 seed: int | np.random.Generator | None = 0):
        _check_positive(batch_size=batch_size)
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rng = _rng(seed)

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n = len(self.dataset)
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        for b in range(len(self)):
            yield self.dataset.batch(order[b * self.batch_size:(b + 1) * self.batch_size])


def create_dataloader(text: str, tokenizer: TokenizerLike | str = "gpt2", batch_size: int = 4,
                      max_length: int = 256, stride: int = 128, shuffle: bool = True,
                      drop_last: bool = True,
                      seed: int | np.random.Generator | None = 0) -> DataLoader:
    """The book's create_dataloader_v1: tokenize `text`, cut windows, batch them."""
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer, text=text)
    dataset = GPTDataset.from_text(text, tokenizer, max_length, stride)
    return DataLoader(dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)


# --- corpora larger than memory: prepare once, then sample windows from disk --------------------


def _resolve_tokenizer(tokenizer: TokenizerLike | str, path: Path,
                       chunk_bytes: int) -> TokenizerLike:
    if not isinstance(tokenizer, str):
        return tokenizer
    if tokenizer == "char":  # a first pass over the file collects the character set
        chars: set[str] = set()
        for text, _ in iter_text_chunks(path, chunk_bytes):
            chars.update(text)
        if not chars:
            raise ValueError(f"{path}: the file is empty")
        return CharTokenizer(chars)
    return get_tokenizer(tokenizer)


def prepare(input_path: Path | str, out_dir: Path | str, tokenizer: TokenizerLike | str = "gpt2",
            val_fraction: float = 0.1, progress: bool = True,
            chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Tokenize a UTF-8 text file in chunks into `out_dir/{train,val}.bin` (uint16) + `meta.json`.

    The split is by tokens: the first int((1 - val_fraction) * n_tokens) go to train.bin. Each file
    is written to a temporary name and renamed, so an interrupted run leaves no partial output.
    With the GPT-2 tokenizer, `<|endoftext|>` in the text becomes the end-of-text id 50256.
    Returns the metadata written to meta.json.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    _check_val_fraction(val_fraction)
    if not input_path.is_file():
        raise FileNotFoundError(f"input text file not found: {input_path}")
    tok = _resolve_tokenizer(tokenizer, input_path, chunk_bytes)
    if tok.n_vocab - 1 > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError(f"tokenizer {tok.name!r} has {tok.n_vocab} ids, more than uint16 holds "
                         f"({np.iinfo(TOKEN_DTYPE).max + 1})")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _write_prepared(tok, input_path, out_dir, val_fraction, progress, chunk_bytes)
    except BaseException:
        if created:                             # a failed prepare leaves no folder behind
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _write_prepared(tok: TokenizerLike, input_path: Path, out_dir: Path, val_fraction: float,
                    progress: bool, chunk_bytes: int) -> dict:
    """The three files of `prepare`, as a set: the old meta.json goes first and the new one is
    written last, holding the size and CRC32 of each .bin, so a prepare that stops half-way
    leaves no meta.json, and a .bin from another run never passes for this one."""
    from tqdm import tqdm  # the only progress output of the library, on stderr

    (out_dir / META_FILE).unlink(missing_ok=True)
    all_path = out_dir / "all.bin.tmp"
    # delay: runs shorter than a second (and early errors) show no bar at all
    bar = tqdm(total=input_path.stat().st_size, unit="B", unit_scale=True, delay=1.0,
               desc=f"tokenizing {input_path.name}", disable=not progress, file=sys.stderr)
    files = {}
    try:
        with open(all_path, "wb") as f, bar:
            for text, n_bytes in iter_text_chunks(input_path, chunk_bytes):
                np.asarray(tok.encode(text), dtype=TOKEN_DTYPE).tofile(f)
                bar.update(n_bytes)
        if all_path.stat().st_size == 0:
            raise ValueError(f"{input_path}: the file is empty")
        ids = np.memmap(all_path, dtype=TOKEN_DTYPE, mode="r")
        train, val = train_val_split(ids, val_fraction)
        for name, part in (("train.bin", train), ("val.bin", val)):
            with atomic_write(out_dir / name) as f:
                crc = _copy_tokens(part, f)
            files[name] = {"bytes": int(part.nbytes), "crc32": crc}
        n_train, n_val = len(train), len(val)
        del ids, train, val  # close the memmap before deleting its file
    finally:
        all_path.unlink(missing_ok=True)

    meta = {"tokenizer": tok.name, "vocab_size": tok.n_vocab, "dtype": np.dtype(TOKEN_DTYPE).name,
            "train_tokens": n_train, "val_tokens": n_val, "val_fraction": val_fraction,
            "eot_id": getattr(tok, "eot_id", None), "source": input_path.name, "files": files}
    if isinstance(tok, CharTokenizer):
        meta["chars"] = tok.chars  # without them the ids could not be decoded
    meta["meta_crc32"] = json_checksum(meta, "meta_crc32")
    write_json_atomic(out_dir / META_FILE, meta)
    return meta


def _copy_tokens(ids: np.ndarray, f, block: int = 1 << 22) -> int:
    """Write `ids` to `f` a block at a time; returns the CRC32 of the bytes written."""
    crc = 0
    for start in range(0, len(ids), block):
        part = np.ascontiguousarray(ids[start:start + block])
        part.tofile(f)
        crc = zlib.crc32(part.view(np.uint8), crc)
    return crc


def _file_crc32(path: Path, block: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return crc


def read_meta(out_dir: Path | str) -> dict:
    """The meta.json that `prepare` wrote into `out_dir`, checked: the keys readers use, a known
    dtype and tokenizer, and chars for a character vocabulary; errors name the file."""
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `tinygpt prepare INPUT.txt {out_dir}` "
                                "first")
    meta = read_json_object(path)
    require_keys(meta, ("tokenizer", "dtype", "train_tokens", "val_tokens", "meta_crc32"), path)
    if meta["meta_crc32"] != json_checksum(meta, "meta_crc32"):
        raise ValueError(f"{path}: fails its checksum (edited or damaged); prepare the folder "
                         "again")
    if meta["dtype"] not in META_DTYPES:
        raise ValueError(f"{path}: unknown dtype {_short(meta['dtype'])} (expected "
                         f"{' or '.join(META_DTYPES)})")
    if meta["tokenizer"] not in ("gpt2", "char"):
        raise ValueError(f"{path}: unknown tokenizer {_short(meta['tokenizer'])} (expected gpt2 "
                         "or char)")
    if meta["tokenizer"] == "char":
        require_keys(meta, ("chars",), path)
    for key in ("train_tokens", "val_tokens"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise ValueError(f"{path}: {key} must be a non-negative integer, got "
                             f"{_short(meta[key])}")
    if "files" in meta and not isinstance(meta["files"], dict):
        raise ValueError(f"{path}: files must be an object of sizes and CRC32s")
    return meta


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_prepared_file(out_dir: Path | str, split: str, meta: dict) -> Path:
    """`out_dir/<split>.bin`, checked against meta.json: its size is the token count times the
    dtype's, and (for folders prepared since meta.json records them) its CRC32 matches."""
    path = Path(out_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    want, size = meta[f"{split}_tokens"] * itemsize, path.stat().st_size
    if size != want:
        raise ValueError(f"{path}: {size} bytes, but {Path(out_dir) / META_FILE} says "
                         f"{meta[f'{split}_tokens']} {meta['dtype']} tokens ({want} bytes); "
                         "prepare the folder again")
    recorded = meta.get("files", {}).get(path.name)
    if isinstance(recorded, dict) and recorded.get("crc32") != _file_crc32(path):
        raise ValueError(f"{path}: contents do not match the CRC32 in "
                         f"{Path(out_dir) / META_FILE} (from another prepare?); prepare the "
                         "folder again")
    return path


class MemmapDataset:
    """Every window of `max_length` tokens in a uint16 .bin file, read from disk through np.memmap.

    Window i is x = ids[i : i + max_length], y = ids[i + 1 : i + max_length + 1], for
    i in 0 .. n_tokens - max_length - 1 (stride 1). `sample_batch` picks random windows.
    """

    def __init__(self, path: Path | str, max_length: int, dtype: np.dtype | type = TOKEN_DTYPE):
        _check_positive(max_length=max_length)
        self.path, self.max_length = Path(path), max_length
        if not self.path.is_file():
            raise FileNotFoundError(f"token file not found: {self.path}")
        n_tokens = self.path.stat().st_size // np.dtype(dtype).itemsize
        if n_tokens < max_length + 1:
            raise ValueError(f"{self.path} has {n_tokens} tokens, but max_length={max_length} "
                             f"needs at least {max_length + 1}")
        self.ids = np.memmap(self.path, dtype=dtype, mode="r")   # (n_tokens,), nothing read yet

    @classmethod
    def from_prepared(cls, out_dir: Path | str, split: str, max_length: int) -> MemmapDataset:
        """The `split` ("train" or "val") of a directory written by `prepare`."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        meta = read_meta(out_dir)
        return cls(check_prepared_file(out_dir, split, meta), max_length, np.dtype(meta["dtype"]))

    def __len__(self) -> int:
        return len(self.ids) - self.max_length

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        window = self.ids[i:i + self.max_length + 1].astype(np.int64)   # (T + 1,)
        return window[:-1], window[1:]

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows starting at `indices`: x, y of shape (len(indices), max_length), int64."""
        windows = np.stack([self.ids[i:i + self.max_length + 1] for i in indices])
        windows = windows.astype(np.int64)                               # (B, T + 1)
        return windows[:, :-1], windows[:, 1:]

    def sample_batch(self, batch_size: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`batch_size` windows at uniformly random starts drawn from `rng`: (B, T) each."""
        _check_positive(batch_size=batch_size)
        return self.batch(rng.integers(0, len(self), size=batch_size))


# --- data for `tinygpt pretrain`: a text file, or a directory written by `prepare` --------------

class SampledBatches:
    """Batches of random windows from a `MemmapDataset`; an "epoch" is as many batches as it takes
    to see about every token once. The windows come from `self.rng`, which checkpoints save."""

    def __init__(self, dataset: MemmapDataset, batch_size: int, seed: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.rng = np.random.default_rng(seed)
        self.n_batches = max(1, len(dataset) // (batch_size * dataset.max_length))

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _ in range(self.n_batches):
            yield self.dataset.sample_batch(self.batch_size, self.rng)


def pretrain_data(path: str | Path, context_length: int, batch_size: int, seed: int,
                  tokenizer: str = "gpt2", val_fraction: float = 0.1):
    """(train batches, val batches, tokenizer) for a UTF-8 text file or a `prepare`d directory.

    A text file is split by characters (the book's 90/10) into windows of `context_length`
    tokens with stride `context_length`, the training batches shuffled with `seed`.
    """
    path, T, B = Path(path), context_length, batch_size
    if path.is_dir():
        meta = read_meta(path)
        tok = (CharTokenizer.from_list(meta["chars"], path / META_FILE)
               if meta["tokenizer"] == "char" else get_tokenizer(meta["tokenizer"]))
        train_ds, val_ds = (MemmapDataset.from_prepared(path, s, T) for s in ("train", "val"))
        return SampledBatches(train_ds, B, seed), SampledBatches(val_ds, B, seed + 1), tok
    text = read_text(path)
    tok = get_tokenizer(tokenizer, text=text)
    parts = dict(zip(("training", "validation"), train_val_split(text, val_fraction)))
    loaders = []
    for name, part in parts.items():
        try:
            dataset = GPTDataset.from_text(part, tok, T, T)
        except ValueError as e:
            raise ValueError(f"{path}: the {name} split ({len(part):,} characters) is too short "
                             f"for one window of context_length={T}: {e}") from None
        shuffle = name == "training"
        loaders.append(DataLoader(dataset, B, shuffle=shuffle, drop_last=shuffle, seed=seed))
    if len(loaders[0]) == 0:
        raise ValueError(f"{path}: the training split has {len(loaders[0].dataset)} windows of "
                         f"{T} tokens, fewer than one batch of {B}")
    return loaders[0], loaders[1], tok
