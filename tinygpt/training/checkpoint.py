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

The folder also holds `log.csv` (one row per evaluation), and `loss.png` and `lr.png` (the loss
curves and the learning-rate schedule, when matplotlib is installed), rewritten atomically after
each evaluation.

    python -m pytest tests/test_train.py -q -k checkpoint
"""
from __future__ import annotations

import csv
import io
import json
import math
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from tinygpt.core.fileio import atomic_write, write_json_atomic
from tinygpt.formats.safetensors import load_safetensors, save_safetensors
from tinygpt.core.validate import json_checksum, read_json_object, short_list

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
        full = {"format": FORMAT, **record, "tensors": name, "crc32": crcs}
        full["record_crc32"] = record_checksum(full)
        write_json_atomic(out_dir / RECORD, full)
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


def record_checksum(record: dict) -> int:
    """CRC32 of the record's canonical JSON (sorted keys, no spaces), its own checksum left out:
    a bit flip in checkpoint.json, a step or an RNG state, is caught as the tensors' are."""
    return json_checksum(record, "record_crc32")


def read_record(out_dir: Path | str) -> dict:
    """The JSON record of the checkpoint in `out_dir`, with a clear error if it is unreadable,
    incomplete or fails its checksum."""
    path = Path(out_dir) / RECORD
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    try:
        record = read_json_object(path)
    except ValueError as e:
        raise ValueError(f"corrupted checkpoint {e}") from None
    missing = [k for k in ("format", "step", "tensors", "crc32", "record_crc32")
               if k not in record]
    if missing or record.get("format") != FORMAT:
        raise ValueError(f"corrupted checkpoint {path}: not a {FORMAT} record "
                         f"(missing {short_list(missing) or 'format tag'})")
    if record["record_crc32"] != record_checksum(record):
        raise ValueError(f"corrupted checkpoint {path}: the record fails its checksum (edited or "
                         "damaged)")
    if not isinstance(record["tensors"], str) or not isinstance(record["crc32"], dict):
        raise ValueError(f"corrupted checkpoint {path}: tensors must name a file and crc32 map "
                         "names to checksums")
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
    if resume:
        _remove_leftovers(out)
    return out


def _remove_leftovers(out: Path) -> None:
    """What a killed run can leave: `atomic_write`'s hidden temp files (.log.csv.*.tmp, ...) and a
    tensor file written before its record was committed."""
    current = read_record(out)["tensors"] if (out / RECORD).is_file() else None
    for path in out.glob(".*.tmp"):
        path.unlink(missing_ok=True)
    for path in out.glob("ckpt-*.safetensors"):
        if current is not None and path.name != current:
            path.unlink(missing_ok=True)


def _os_error(e: OSError, msg: str) -> OSError:
    """An OSError with e's errno but our message (str() would prefix "[Errno N]")."""
    new = OSError(msg)
    new.errno = e.errno
    return new


LOG_COLUMNS = ("step", "epoch", "tokens_seen", "lr", "train_loss", "val_loss", "train_ppl",
               "val_ppl")


def write_log(evals: list[dict], out: Path, lr_at: Callable[[int], float] | None = None,
              max_steps: int = 0) -> None:
    """`log.csv` (always) and `loss.png` (when matplotlib is installed) from the eval rows; the
    metrics' columns follow the fixed ones. Given the schedule `lr_at(step)` of a run of
    `max_steps` steps, also `lr.png` beside them."""
    columns = [*LOG_COLUMNS, *(k for k in evals[0] if k not in LOG_COLUMNS)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in columns} for row in evals)
    try:
        with atomic_write(out / "log.csv", "w") as f:
            f.write(buf.getvalue())
        plot_losses(evals, out / "loss.png")
        if lr_at is not None and max_steps > 0:
            plot_lr_schedule(lr_at, max_steps, out / "lr.png", done=evals[-1]["step"])
    except OSError as e:                        # e.g. a full disk: say which file, keep the errno
        raise OSError(e.errno, f"cannot write the training log in {out}: {e.strerror}") from e


# --- pictures of a run (matplotlib, the optional `plot` extra) ----------------------------------
# The curves every run writes live here, beside the log they draw; the other pictures (attention,
# tokens, confusion matrices) are in `plots.py`, which uses `pyplot` and `save_figure` from here.

def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: Path | str, dpi: int = 100) -> Path:
    """Write `fig` as a PNG atomically (a reader never sees half a file) and close it."""
    plt = pyplot()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


def _series(evals: list[dict], key: str) -> list[float] | None:
    """A column of the log as floats, or None when it is missing or never has a value."""
    values = [float(r.get(key, math.nan)) for r in evals]
    return values if any(not math.isnan(v) for v in values) else None


def _curves(ax, steps: list[int], evals: list[dict], metric: str) -> None:
    """train / val / test curves of one metric (columns train_<metric>, ...), those present."""
    for split, style in (("train", "-"), ("val", "-."), ("test", ":")):
        values = _series(evals, f"{split}_{metric}")
        if values is not None:
            ax.plot(steps, values, linestyle=style, label=split)


def loss_figure(evals: list[dict]):
    """The loss curves of the eval rows (against steps, bottom, and tokens seen, top, as in the
    book's figure 5.12), with a panel beside it for accuracy (a classifier's log: figure 6.16) or
    for the reward margin (a DPO run's log) when the rows have those columns."""
    plt = pyplot()
    steps = [r["step"] for r in evals]
    panels = ["loss"] + [m for m in ("accuracy", "reward_margin")
                         if any(_series(evals, f"{s}_{m}") for s in ("train", "val", "test"))]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], panels):
        _curves(ax, steps, evals, metric)
        ax.set_xlabel("step")
        ax.set_ylabel(metric.replace("_", " "))
        ax.legend()
        if metric == "reward_margin":            # chosen minus rejected reward: above 0 is good
            ax.axhline(0.0, color="grey", linewidth=0.8)
    top = axes[0][0].twiny()                     # the same loss curve against tokens seen
    top.plot([r["tokens_seen"] for r in evals], [r["train_loss"] for r in evals], alpha=0)
    top.set_xlabel("tokens seen")
    fig.tight_layout()
    return fig


def plot_losses(evals: list[dict], path: Path) -> bool:
    """Write `loss_figure(evals)` to `path`. Returns False, silently, without matplotlib (the
    optional `plot` extra)."""
    if pyplot() is None:
        return False
    save_figure(loss_figure(evals), path)
    return True


def lr_figure(lr_at: Callable[[int], float], max_steps: int, done: int | None = None):
    """Learning rate against step over a run of `max_steps` steps (the book's appendix D figure:
    linear warmup, then cosine decay); with `done`, the steps taken so far drawn solid and the
    rest dashed."""
    plt = pyplot()
    # every step of a short run (the warmup's corner is sharp); 2,000 of a long one
    steps = np.unique(np.linspace(0, max_steps - 1, min(max_steps, 2000)).round().astype(int))
    lrs = np.array([lr_at(int(s)) for s in steps])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if done is None:
        ax.plot(steps, lrs)
    else:
        ax.plot(steps, lrs, linestyle="--", color="C0", alpha=0.5, label="to come")
        ax.plot(steps[steps <= done], lrs[steps <= done], color="C0", label=f"done ({done})")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"peak {lrs.max():.2e}, last {lrs[-1]:.2e}, {max_steps:,} steps")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    return fig


def plot_lr_schedule(lr_at: Callable[[int], float], max_steps: int, path: Path | str,
                     done: int | None = None) -> bool:
    """Write `lr_figure(...)` to `path`; False, silently, without matplotlib."""
    if pyplot() is None:
        return False
    save_figure(lr_figure(lr_at, max_steps, done), path)
    return True
