"""Instruction fine-tuning (the book's chapter 7): Alpaca data, its split, its collate, responses.

- `read_instruction_data(path)`: a JSON list or JSONL file of `{instruction, input, output}`.
- `split_instruction_data(data)`: the book's split in file order, no shuffle: 85 % train, 10 %
  test, the rest validation (1,100 entries: 935 / 110 / 55).
- `collate(items, end_id, pad_id)`: the book's `custom_collate_fn`. Each item gets one end token,
  the batch is padded to its longest, targets are inputs shifted by one, the end token is kept as a
  target and the padding after it is set to -100 (ignored by the loss), and rows are cut to
  `allowed_max_length`. With prompt lengths (`--mask-prompt`, exercise 7.2) the targets inside
  the prompt are -100 too. The book finds the padding by its id (50256); here it is found by
  position, which gives the same arrays for GPT-2 and stays right when the end token also occurs
  inside the prompt (ChatML's `<|im_end|>` closes every turn).
- `InstructionDataset`: entries tokenized once in a template (`templates.py`); `__len__` and
  `batch(indices)`, so `tinygpt.text.data.DataLoader` batches it for `tinygpt.training.train.train`, whose
  default loss (mean cross-entropy, -100 ignored) is the book's.
- `respond` / `generate_responses` / `save_responses`: greedy answers, stopped at the end token,
  the prompt and header stripped; written as `instruction-data-with-response.json`.

The command is `tinygpt finetune-instruct` (tinygpt/commands/instruct.py); the demo
`python demos/instruct.py`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tinygpt.core.fileio import write_json_atomic
from tinygpt.text.tokenizer import EOT_ID
from tinygpt.text.templates import (extract_response, format_example, format_input,
                                        format_prompt, get_template)

IGNORE_INDEX = -100                     # targets the loss skips (F.cross_entropy's default)
GPT2_END_ID = EOT_ID                    # <|endoftext|>: the book's end and padding token
RESPONSES_FILE = "instruction-data-with-response.json"


# --- data -----------------------------------------------------------------------------------------

def read_instruction_data(path: str | os.PathLike) -> list[dict]:
    """Entries of a JSON list or a JSONL file (one object a line); each needs text `instruction`
    and `output` (and, if present, text `input`). Errors name the file and the entry."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"instruction data not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        where = [f"{path}: entry {i}" for i in range(len(entries))]
    else:
        entries, where = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
                where.append(f"{path}: line {n}")
    if not entries:
        raise ValueError(f"{path}: no entries")
    for entry, at in zip(entries, where):
        _check_entry(entry, at)
    return entries


def _check_entry(entry: object, where: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, not an object with "
                         "'instruction' and 'output'")
    for key in ("instruction", "output"):
        if not isinstance(entry.get(key), str):
            raise ValueError(f"{where} has no {key!r} text (keys: {', '.join(map(str, entry))})")
    if not isinstance(entry.get("input", ""), str):
        raise ValueError(f"{where}: 'input' is not text")


def split_instruction_data(data: Sequence[dict]) -> tuple[list, list, list]:
    """(train, test, val) in file order, as the book: int(85 %), int(10 %), the rest."""
    n_train, n_test = int(len(data) * 0.85), int(len(data) * 0.1)
    return (list(data[:n_train]), list(data[n_train:n_train + n_test]),
            list(data[n_train + n_test:]))


def end_token_id(tokenizer, template: str = "alpaca") -> int:
    """The id of the template's end token (`<|endoftext|>` 50256 for GPT-2's alpaca and phi3,
    `<|im_end|>` for ChatML); an error if the tokenizer does not have it as one token."""
    token = get_template(template).end_token
    ids = tokenizer.encode(token)
    if len(ids) != 1:
        raise ValueError(f"template {template!r} ends responses with {token}, which this "
                         f"tokenizer does not have as one token; use a template of its own")
    return int(ids[0])


# --- batches ----------------------------------------------------------------------------------------

def collate(items: Sequence[Sequence[int]], end_id: int = GPT2_END_ID, pad_id: int | None = None,
            allowed_max_length: int | None = None, prompt_lengths: Sequence[int] | None = None,
            ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """The book's collate: (inputs, targets), int64 (B, T) with T = the longest item's length,
    cut to `allowed_max_length`.

        row = item + [end] + [pad] * (longest - len(item))      length longest + 1
        inputs, targets = row[:-1], row[1:]
        targets[len(item):] = ignore_index                      (the end token stays a target)
        targets[:prompt_length - 1] = ignore_index              (with prompt_lengths)

    `pad_id` defaults to `end_id` (the book pads GPT-2 batches with 50256, SmolLM2's with 2).
    """
    pad_id = end_id if pad_id is None else pad_id
    longest = max(len(item) for item in items)
    rows = np.full((len(items), longest + 1), pad_id, dtype=np.int64)
    for b, item in enumerate(items):
        rows[b, :len(item)] = item
        rows[b, len(item)] = end_id
    inputs, targets = rows[:, :-1], rows[:, 1:].copy()                  # (B, longest) each
    for b, item in enumerate(items):
        targets[b, len(item):] = ignore_index
        if prompt_lengths is not None:
            targets[b, :max(prompt_lengths[b] - 1, 0)] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)


class InstructionDataset:
    """Entries as token ids in a template, batched by `collate`.

    `n_truncated` counts entries longer than `allowed_max_length` tokens: the collate cuts them,
    so the end of their response (and its end token) is never learned.
    """

    def __init__(self, entries: Sequence[dict], tokenizer, template: str = "alpaca",
                 mask_prompt: bool = False, allowed_max_length: int | None = 1024,
                 end_id: int | None = None, pad_id: int | None = None):
        if allowed_max_length is not None and allowed_max_length < 2:
            raise ValueError(f"allowed_max_length must be at least 2, got {allowed_max_length}")
        self.entries, self.template = list(entries), template
        self.allowed_max_length = allowed_max_length
        self.end_id = end_token_id(tokenizer, template) if end_id is None else end_id
        self.pad_id = self.end_id if pad_id is None else pad_id
        self.encoded = [tokenizer.encode(format_example(e, template)) for e in self.entries]
        self.prompt_lengths = ([len(tokenizer.encode(format_input(e, template)))
                                for e in self.entries] if mask_prompt else None)
        limit = allowed_max_length or float("inf")
        self.n_truncated = sum(len(ids) > limit for ids in self.encoded)

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        items = [self.encoded[i] for i in indices]
        prompts = (None if self.prompt_lengths is None
                   else [self.prompt_lengths[i] for i in indices])
        return collate(items, self.end_id, self.pad_id, self.allowed_max_length, prompts)


# --- responses ----------------------------------------------------------------------------------

def respond(model, tokenizer, entry: dict, template: str = "alpaca", max_new_tokens: int = 256,
            end_id: int | None = None) -> str:
    """The model's greedy response to one entry: generated after `format_prompt`, stopped at the
    end token, the prompt, header and end token stripped (as the book)."""
    from tinygpt.inference.generate import generate
    end_id = end_token_id(tokenizer, template) if end_id is None else end_id
    prompt = format_prompt(entry, template)
    ids = np.asarray(tokenizer.encode(prompt), dtype=np.int64)[None, :]          # (1, T)
    out = generate(model, ids, max_new_tokens, eos_id=end_id)[0, ids.shape[1]:].tolist()
    if end_id in out:
        out = out[:out.index(end_id)]
    return extract_response(prompt + tokenizer.decode(out), entry, template)


def generate_responses(model, tokenizer, entries: Sequence[dict], template: str = "alpaca",
                       max_new_tokens: int = 256, progress: bool = False,
                       on_response: Callable[[int, str], None] | None = None) -> list[str]:
    """`respond` for every entry, with a tqdm bar on stderr when `progress`."""
    from tqdm import tqdm
    end_id = end_token_id(tokenizer, template)
    responses = []
    for i, entry in enumerate(tqdm(entries, desc="responses", unit="entry", disable=not progress,
                                   dynamic_ncols=True, leave=False)):
        responses.append(respond(model, tokenizer, entry, template, max_new_tokens, end_id))
        if on_response is not None:
            on_response(i, responses[-1])
    return responses


def save_responses(entries: Sequence[dict], responses: Sequence[str],
                   path: str | os.PathLike) -> Path:
    """Each entry with its `model_response` beside its instruction, input and output, as the
    book's `instruction-data-with-response.json`; written atomically."""
    if len(entries) != len(responses):
        raise ValueError(f"{len(entries)} entries but {len(responses)} responses")
    path = Path(path)
    write_json_atomic(path, [{**e, "model_response": r} for e, r in zip(entries, responses)],
                      indent=4)
    return path
