"""A training run's folder: checkpoints (arrays in safetensors, everything else in JSON) and logs.

A checkpoint in `out_dir` is two files:

    checkpoint.json                  the commit record: step, RNG states, both configs, optimizer
                                     scalars, history, and the name + CRC32s of the tensor file
    ckpt-0000120.safetensors         "model.<param>" and "optim.<buffer>" arrays (float32)

Both are written to a temporary file, fsynced and renamed. The tensor file of step N gets a new
name, and only the JSON rename makes it current, so a crash or a full disk at any moment leaves
the previous checkpoint complete and readable; the old tensor file is deleted after the commit.
Reading checks the JSON, the file's header and size (via `safetensors.py`) and a CRC32 of every
array, so a truncated or corrupted checkpoint is an error that names the file, never bad weights.

The folder also holds `log.csv` (one row per evaluation) and `loss.png` (when matplotlib is
installed), rewritten atomically after each evaluation.

    python -m pytest tests/test_train.py -q -k checkpoint
"""
from __future__ import annotations

import csv
import io
import json
import zlib
from pathlib import Path

import numpy as np

from tinygpt.fileio import atomic_write, write_json_atomic
from tinygpt.safetensors import load_safetensors, save_safetensors

FORMAT = "tinygpt-checkpoint-1"
RECORD = "checkpoint.json"


def _crc(arr: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def save_checkpoint(out_dir: Path | str, arrays: dict[str, np.ndarray], record: dict) -> Path:
    """Write `arrays` and `record` (JSON-ready, must hold "step") as the current checkpoint.

    On any error (OSError such as ENOSPC) the previous checkpoint stays current and intact, and
    the error says so.
    """
    out_dir = Path(out_dir)
    name = f"ckpt-{int(record['step']):07d}.safetensors"
    previous = read_record(out_dir) if (out_dir / RECORD).is_file() else None
    try:
        save_safetensors(arrays, out_dir / name)
        crcs = {key: _crc(a) for key, a in arrays.items()}
        write_json_atomic(out_dir / RECORD, {"format": FORMAT, **record, "tensors": name,
                                             "crc32": crcs})
    except OSError as e:
        if not previous or previous.get("tensors") != name:
            (out_dir / name).unlink(missing_ok=True)          # never leave an orphan behind
        kept = (f"the previous checkpoint (step {previous['step']}) is intact" if previous
                else "no earlier checkpoint exists")
        error = OSError(f"cannot write checkpoint step {record['step']} to {out_dir}: "
                        f"{e.strerror or e}; {kept}")
        error.errno = e.errno
        raise error from None
    if previous and previous.get("tensors") != name:
        (out_dir / previous["tensors"]).unlink(missing_ok=True)
    return out_dir / RECORD


def read_record(out_dir: Path | str) -> dict:
    """The JSON record of the checkpoint in `out_dir`, with a clear error if it is unreadable."""
    path = Path(out_dir) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupted checkpoint {path}: not valid JSON ({e})") from None
    missing = [k for k in ("format", "step", "tensors", "crc32") if k not in record]
    if missing or record.get("format") != FORMAT:
        raise ValueError(f"corrupted checkpoint {path}: not a {FORMAT} record "
                         f"(missing {', '.join(missing) or 'format tag'})")
    return record


def load_checkpoint(out_dir: Path | str) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, record) of the checkpoint in `out_dir`; every array checked against its CRC32."""
    out_dir = Path(out_dir)
    record = read_record(out_dir)
    path = out_dir / record["tensors"]
    if not path.is_file():
        raise FileNotFoundError(f"corrupted checkpoint: {out_dir / RECORD} names {path}, which "
                                "does not exist")
    try:
        arrays = load_safetensors(path, mmap=False)
    except ValueError as e:                      # the reader's header and length checks
        raise ValueError(f"corrupted or truncated checkpoint: {e}") from None
    if set(arrays) != set(record["crc32"]):
        raise ValueError(f"corrupted checkpoint {path}: its tensors do not match {RECORD}")
    for key, arr in arrays.items():
        if _crc(arr) != record["crc32"][key]:
            raise ValueError(f"corrupted checkpoint {path}: tensor {key!r} fails its CRC32 check")
    return arrays, record


def prepare_run_dir(out_dir: str | None, resume: bool, is_main: bool = True) -> Path | None:
    """Create `out_dir` and check it is writable, before any time is spent training (the main
    process only: the others read a checkpoint from it when resuming, and write nothing)."""
    if out_dir is None:
        if resume:
            raise ValueError("resume needs out_dir: the checkpoint to continue lives there")
        return None
    out = Path(out_dir)
    if not is_main:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".write-test", "wb"):
            pass
        (out / ".write-test").unlink()
    except OSError as e:
        raise _os_error(e, f"output directory {out} is not writable: {e.strerror or e}") from None
    if not resume and (out / "checkpoint.json").exists():
        raise ValueError(f"{out} already holds a checkpoint: resume it (--resume), or choose "
                         "another output directory")
    return out


def _os_error(e: OSError, msg: str) -> OSError:
    """An OSError with e's errno but our message (str() would prefix "[Errno N]")."""
    new = OSError(msg)
    new.errno = e.errno
    return new


LOG_COLUMNS = ("step", "epoch", "tokens_seen", "lr", "train_loss", "val_loss", "train_ppl",
               "val_ppl")


def write_log(evals: list[dict], out: Path) -> None:
    """`log.csv` (always) and `loss.png` (when matplotlib is installed) from the eval rows; the
    metrics' columns follow the fixed ones."""
    columns = [*LOG_COLUMNS, *(k for k in evals[0] if k not in LOG_COLUMNS)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in columns} for row in evals)
    try:
        with atomic_write(out / "log.csv", "w") as f:
            f.write(buf.getvalue())
        plot_losses(evals, out / "loss.png")
    except OSError as e:                        # e.g. a full disk: say which file, keep the errno
        raise OSError(e.errno, f"cannot write the training log in {out}: {e.strerror}") from e


def plot_losses(evals: list[dict], path: Path) -> bool:
    """Train and val loss against steps (bottom axis) and tokens seen (top), as in the book's
    figure 5.12. Returns False, silently, without matplotlib (the optional `plot` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r["step"] for r in evals]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["train_loss"] for r in evals], label="train")
    ax.plot(steps, [r["val_loss"] for r in evals], linestyle="-.", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    top = ax.twiny()                              # same curve against tokens seen
    top.plot([r["tokens_seen"] for r in evals], [r["train_loss"] for r in evals], alpha=0)
    top.set_xlabel("tokens seen")
    fig.tight_layout()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return True
