"""Direct Preference Optimization (the book's chapter 7 bonus): preference data, its collate, the
sequence log-probabilities and the DPO loss that `tinygpt.training.train.train` optimises.

Each entry holds an instruction (and optional input) with two responses, `chosen` (preferred)
and `rejected`. DPO (Rafailov et al. 2023, eq. 7) raises the policy's log-probability of the
chosen response relative to the rejected one, measured against a frozen reference model:

    pi_c, pi_r    the policy's sequence log-probs of chosen / rejected (mean over response tokens)
    ref_c, ref_r  the same under the starting model, which never changes
    loss          -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))      averaged over a batch
    rewards       pi_c - ref_c and pi_r - ref_r (as the book: without beta), margin = their gap

Before the first step the policy is the reference, the sigmoid's argument is 0 and the loss is
ln 2 = 0.6931 with every reward 0. beta sets how far the policy may drift from the reference.

The reference log-probs depend only on the entry and the frozen starting model, so they are
computed once per entry under no_grad (`PreferenceDataset.set_reference`) before training starts
and travel with the batches. The book instead keeps a second copy of the model in eval mode and
runs it on every batch; precomputing means a laptop holds one model in memory, and the reference
costs one forward pass per entry in total instead of one per step.

Owns: `read_preference_data`, `PreferenceDataset` (tokens, collate, reference log-probs),
`sequence_logprobs`, `model_logprobs`, `dpo_loss` and `DPOObjective` (train()'s loss_fn and
metrics). The prompt text comes from `templates.py`, the book's 935/110/55 split and the greedy
responses from `instruct.py`, the loop from `train.py`, the command line from `commands/dpo.py`.

    python -m tinygpt finetune-dpo --model gpt2 --out runs/dpo \\
        --data ../shared/data/instruction-data-with-preference.json
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tinygpt.autograd import functional as F
from tinygpt.autograd.fused import Ragged
from tinygpt.autograd.tensor import Tensor, no_grad
from tinygpt.models.gpt import kept_lengths
from tinygpt.text.templates import format_prompt

IGNORE = -100                    # cross_entropy's ignore_index: positions that are not scored
REDUCTIONS = ("mean", "sum")     # mean over response tokens (the book's) or their sum


# --- data --------------------------------------------------------------------------------------

def read_preference_data(path: str | Path) -> list[dict]:
    """The entries of a JSON list (or JSON Lines, `.jsonl`) of objects with `instruction`,
    optional `input`, `chosen` and `rejected` texts; a one-line ValueError for anything else."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"preference data not found: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        if path.suffix == ".jsonl":
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of entries, got a JSON {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: the file has no entries")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: entry {i} is not a JSON object")
        for key in ("instruction", "chosen", "rejected"):
            if not isinstance(entry.get(key), str):
                raise ValueError(f"{path}: entry {i} has no {key!r} text "
                                 f"(keys: {', '.join(map(str, entry)) or 'none'})")
        if not isinstance(entry.get("input", ""), str):
            raise ValueError(f"{path}: entry {i}'s 'input' is not text")
    return data


def _pad_id(tokenizer) -> int:
    """The id padding is filled with: the tokenizer's pad or end-of-text id (GPT-2: 50256), else 0.
    Padding is masked out and comes after every real token, so its value never matters."""
    for name in ("pad_id", "eot_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


class PreferenceDataset:
    """Tokenised preference entries; `batch(indices)` gives a collated dict for `train()`.

    Per entry, as the book: the prompt's tokens and the tokens of prompt + response header +
    chosen (and + rejected), each cut to `allowed_max_length`. `batch` pads chosen and rejected
    to one common length (the batch's longest) with `pad_id`, so both run through the model as
    one (2B, T) array, and returns

        chosen, rejected             int64 (B, T)
        chosen_mask, rejected_mask   bool (B, T): False on padding, and with mask_prompt on the
                                     prompt and header too, so only response tokens are scored
        ref_chosen, ref_rejected     float64 (B,): the reference log-probs (`set_reference`)

    NOTE: the book pads to the longest + 1 and masks the prompt's tokens + 2 (its header's
    "\\n\\n###"), so it scores " Response:\\n" too; here the whole header is prompt, for every
    template. The extra pad column changes nothing: it is masked out and comes last.
    """

    def __init__(self, entries: Sequence[dict], tokenizer, template: str = "alpaca",
                 mask_prompt: bool = True, allowed_max_length: int = 1024,
                 pad_id: int | None = None):
        if allowed_max_length < 2:
            raise ValueError(f"allowed_max_length must be at least 2, got {allowed_max_length}")
        self.template, self.mask_prompt = template, mask_prompt
        self.allowed_max_length = allowed_max_length
        self.pad_id = _pad_id(tokenizer) if pad_id is None else pad_id
        self.items = [self._encode(e, tokenizer) for e in entries]
        self.ref_chosen: np.ndarray | None = None
        self.ref_rejected: np.ndarray | None = None
        self.ref_reduction: str | None = None

    def _encode(self, entry: dict, tokenizer) -> dict:
        prompt_text = format_prompt(entry, self.template)     # instruction part + header
        prompt = tokenizer.encode(prompt_text)
        item = {"prompt": prompt}
        for side in ("chosen", "rejected"):
            ids = tokenizer.encode(prompt_text + entry[side])[:self.allowed_max_length]
            # the response starts where the tokens stop matching the prompt's: BPE may merge
            # the header's last character with the response's first
            start = _common_prefix(prompt, ids) if self.mask_prompt else 0
            if max(start, 1) >= len(ids):            # position 0 is never predicted, so scored
                raise ValueError(f"entry {entry['instruction'][:40]!r}: its {side} response has "
                                 f"no tokens within allowed_max_length={self.allowed_max_length}")
            item[side], item[f"{side}_start"] = ids, start
        return item

    def __len__(self) -> int:
        return len(self.items)

    def collate(self, indices: Sequence[int]) -> dict:
        """Padded ids and masks of the entries at `indices` (no reference log-probs)."""
        items = [self.items[int(i)] for i in indices]
        T = max(len(it[side]) for it in items for side in ("chosen", "rejected"))
        out = {}
        for side in ("chosen", "rejected"):
            ids = np.full((len(items), T), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(items), T), dtype=bool)
            for row, it in enumerate(items):
                ids[row, :len(it[side])] = it[side]
                mask[row, it[f"{side}_start"]:len(it[side])] = True
            out[side], out[f"{side}_mask"] = ids, mask
        return out

    def batch(self, indices: Sequence[int]) -> dict:
        if self.ref_chosen is None:
            raise ValueError("the preference data has no reference log-probs yet: call "
                             "set_reference(model) with the starting model before training")
        out = self.collate(indices)
        idx = np.asarray(indices, dtype=np.int64)
        out["ref_chosen"], out["ref_rejected"] = self.ref_chosen[idx], self.ref_rejected[idx]
        out["ref_reduction"] = self.ref_reduction
        return out

    def set_reference(self, model, reduction: str = "mean", batch_size: int = 8,
                      progress: bool = False) -> None:
        """Compute every entry's reference log-probs once, with `model` in eval mode and no graph.
        Call it with the frozen starting model, before any training step."""
        _check_reduction(reduction)
        from tqdm import tqdm
        ref = np.zeros((2, len(self)))
        was_training = model.training
        model.eval()
        try:
            with no_grad():
                for start in tqdm(range(0, len(self), batch_size), desc="reference log-probs",
                                  unit="batch", disable=not progress, leave=False):
                    rows = np.arange(start, min(start + batch_size, len(self)))
                    lp = _pair_logprobs(model, self.collate(rows), reduction)    # (2, B)
                    ref[:, rows] = lp.data
        finally:
            model.train(was_training)
        self.ref_chosen, self.ref_rejected, self.ref_reduction = ref[0], ref[1], reduction


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def count_tokens(batch: dict) -> int:
    """Tokens a DPO batch runs through the model: chosen and rejected, padding included."""
    return int(batch["chosen"].size + batch["rejected"].size)


# --- log-probabilities and the loss -------------------------------------------------------------

def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")


def sequence_logprobs(logits: Tensor, ids: np.ndarray, mask: np.ndarray,
                      reduction: str = "mean") -> Tensor:
    """Each row's log-probability of its tokens where `mask` is True (the book's compute_logprobs).

    logits (N, T, V) at positions 0..T-1 predict ids[:, 1:]; mask (N, T) marks the tokens that
    count (position 0 is never predicted, so it never counts). Token t contributes
        logp_t = log_softmax(logits[:, t - 1])[ids[:, t]]   (the fused cross-entropy, negated)
    and the result (N,) is sum_t mask_t logp_t, divided by sum_t mask_t for "mean".
    """
    _check_reduction(reduction)
    counts = mask[:, 1:].sum(axis=-1)                                    # (N,)
    if np.any(counts == 0):
        raise ValueError("sequence_logprobs: a row has no masked tokens to score")
    targets = np.where(mask[:, 1:], ids[:, 1:], IGNORE)                  # (N, T-1)
    logp = -F.cross_entropy(logits[:, :-1], targets, reduction="none")   # (N, T-1), 0 if ignored
    total = F.sum(logp, axis=-1)                                         # (N,)
    return total if reduction == "sum" else total / counts


def model_logprobs(model, ids: np.ndarray, mask: np.ndarray, reduction: str = "mean") -> Tensor:
    """sequence_logprobs(model(ids), ids, mask) (N,), with the vocabulary head run only on the
    positions whose next token is scored: the prompt and the padding are not, and the head
    (C x V, 49,152 or 50,257 wide) is the largest matmul and the largest activation of the step.

    The M scored positions (row n, position t predicting ids[n, t + 1]) are gathered into one
    (M, C) matrix; each row's total is an (N, M) 0/1 membership matrix times the M log-probs.
    """
    _check_reduction(reduction)
    scored = mask[:, 1:]                                                 # (N, T-1)
    counts = scored.sum(axis=-1)
    if np.any(counts == 0):
        raise ValueError("sequence_logprobs: a row has no masked tokens to score")
    n, t = np.nonzero(scored)                            # row by row, positions in order
    # each row's positions after its last scored one (the padding) are not computed
    lengths = kept_lengths(scored)
    T = int(lengths.max())
    h = model.hidden(ids[:, :T], lengths=lengths)                        # (sum lengths, C)
    h = h[Ragged(lengths, T).rows(n, t)]                                 # (M, C)
    # NOTE: the head as the model's own forward applies it (a LoRA head included)
    head = getattr(model, "logits", None)
    logits = head(h) if head is not None else F.linear(h, model.head_weight())   # (M, V)
    logp = -F.cross_entropy(logits, ids[n, t + 1], reduction="none")     # (M,)
    member = (n[None, :] == np.arange(ids.shape[0])[:, None]).astype(logp.dtype)   # (N, M)
    total = F.matmul(Tensor(member), logp)                               # (N,)
    return total if reduction == "sum" else total / counts


def _pair_logprobs(model, batch: dict, reduction: str) -> Tensor:
    """(2, B): the sequence log-probs of chosen (row 0) and rejected (row 1), one forward pass."""
    ids = np.concatenate([batch["chosen"], batch["rejected"]])                # (2B, T)
    mask = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])     # (2B, T)
    return F.reshape(model_logprobs(model, ids, mask, reduction), 2, -1)


def dpo_loss(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: np.ndarray,
             ref_rejected: np.ndarray, beta: float = 0.1) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """(mean loss, chosen rewards (B,), rejected rewards (B,)) from sequence log-probs (B,).

    loss = mean(-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))); log_sigmoid is computed
    stably, so a large margin gives a loss near 0 rather than log(0). Rewards are pi - ref per
    side, plain arrays (reported, not trained on).
    """
    logits = (pi_chosen - pi_rejected) - (np.asarray(ref_chosen) - np.asarray(ref_rejected))
    loss = -F.mean(F.log_sigmoid(logits * beta))
    return (loss, pi_chosen.data - np.asarray(ref_chosen),
            pi_rejected.data - np.asarray(ref_rejected))


class DPOObjective:
    """DPO for `train()`: the loss_fn, and metrics for the rewards and their margin.

        objective = DPOObjective(beta=0.1)
        train(model, train_loader, val_loader, cfg, loss_fn=objective,
              metrics=objective.metrics(), count_tokens=count_tokens)

    Batches come from `PreferenceDataset.batch`, whose reference log-probs must have been
    measured with the same reduction.
    """

    def __init__(self, beta: float = 0.1, reduction: str = "mean"):
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a positive number, got {beta}")
        _check_reduction(reduction)
        self.beta, self.reduction = beta, reduction
        self._last: tuple[dict, float, float] | None = None    # (batch, rewards chosen, rejected)

    def __call__(self, model, batch: dict) -> Tensor:
        if batch["ref_reduction"] != self.reduction:
            raise ValueError(f"the reference log-probs are {batch['ref_reduction']}s over "
                             f"tokens but the loss uses {self.reduction}s; measure them alike")
        lp = _pair_logprobs(model, batch, self.reduction)                    # (2, B)
        loss, chosen, rejected = dpo_loss(lp[0], lp[1], batch["ref_chosen"],
                                          batch["ref_rejected"], self.beta)
        self._last = (batch, float(chosen.mean()), float(rejected.mean()))
        return loss

    def _rewards(self, model, batch: dict) -> tuple[float, float]:
        # NOTE: train()'s evaluation calls the loss_fn and then each metric on the same batch;
        # the rewards come from that loss call instead of two more forward passes
        if self._last is None or self._last[0] is not batch:
            with no_grad():
                self(model, batch)
        return self._last[1], self._last[2]

    def metrics(self) -> dict[str, Callable[[object, dict], float]]:
        """{name: fn(model, batch)}: mean reward of chosen, of rejected, and their margin."""
        return {"chosen_reward": lambda model, b: self._rewards(model, b)[0],
                "rejected_reward": lambda model, b: self._rewards(model, b)[1],
                "reward_margin": lambda model, b: float(np.subtract(*self._rewards(model, b)))}
