"""`tinygpt finetune-dpo`: preference-tune a language model with DPO (the book's chapter 7 bonus).

Reads the preference data, splits it 85 / 10 / 5 % in file order, measures the starting model's
reference log-probs once per entry, prints greedy responses to the first test entries, trains
with `train()` (loss, rewards and reward margin at each evaluation), prints the same responses
again with the time per step, and saves the model (with --lora-rank, only its adapters) in --out.
The maths is in `tinygpt/finetune/dpo.py`.

    python -m tinygpt finetune-dpo --model ../shared/fixtures/smollm2-135m-instruct/model.gguf \\
        --template chatml --data ../shared/data/instruction-data-with-preference.json \\
        --out runs/dpo --max-steps 10
"""
from __future__ import annotations

import argparse
import math
import resource
import time
from pathlib import Path

import numpy as np

RESPONSES_FILE = "dpo-responses.json"    # the test entries' responses before and after


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune-dpo", help="preference-tune a model with DPO (chosen vs rejected responses)",
        description="Direct Preference Optimization as the book's chapter 7 bonus: --model is a "
        "GPT-2 name or folder, a training run, a Llama hub folder or a .gguf file; --data a JSON "
        "list of {instruction, input, chosen, rejected}. Defaults are the book's.")
    p.add_argument("--model", required=True, help="model folder, GPT-2 name or .gguf file")
    p.add_argument("--data", required=True, help="preference data (.json list or .jsonl)")
    p.add_argument("--out", required=True, help="run folder: log.csv, checkpoint, model, responses")
    p.add_argument("--template", default="alpaca", choices=("alpaca", "phi3", "chatml"),
                   help="prompt format (default alpaca, the book's; chatml for SmolLM2)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta, > 0 (default 0.1)")
    p.add_argument("--lr", type=float, default=5e-6, help="AdamW learning rate (default 5e-6)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay (default 0.01)")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="max gradient norm; 0: none, as the book's DPO code (default 0)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training split (1)")
    p.add_argument("--batch-size", type=int, default=8, help="entries per step (default 8)")
    p.add_argument("--eval-freq", type=int, default=5, help="steps between evaluations (5)")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation (5)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps; 0: epochs")
    p.add_argument("--max-seconds", type=float, default=0.0, help="wall-time budget; 0: none")
    p.add_argument("--reduction", default="mean", choices=("mean", "sum"),
                   help="sequence log-prob over response tokens: mean (the book's) or sum")
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="score response tokens only (default on)")
    p.add_argument("--allowed-max-length", type=int, default=1024,
                   help="tokens kept per sequence (default 1024, capped at the model's context)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank "
                   "instead of every weight; 0: full fine-tuning (default)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA's alpha (default 16)")
    p.add_argument("--train-size", type=int, default=0,
                   help="use only the first N training entries (a short run); 0: all")
    p.add_argument("--val-size", type=int, default=0, help="first N validation entries; 0: all")
    p.add_argument("--responses", type=int, default=3,
                   help="test entries answered before and after training (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="per response (default 100)")
    p.add_argument("--seed", type=int, default=123, help="data order and LoRA init (default 123)")
    p.add_argument("--checkpoint-activations", choices=("auto", "on", "off"), default="auto",
                   help="recompute each block in backward instead of keeping its activations "
                   "(less memory, ~1/3 more time); auto: on")
    p.set_defaults(run=run)


def _check_args(args) -> None:
    """One-line ValueErrors naming the flag, for values argparse's types let through."""
    floats = {"beta": (0.0, False), "lr": (0.0, True), "weight_decay": (0.0, True),
              "grad_clip": (0.0, True), "max_seconds": (0.0, True), "lora_alpha": (0.0, False)}
    for name, (lo, closed) in floats.items():
        value = getattr(args, name)
        if not math.isfinite(value) or value < lo or (value == lo and not closed):
            bound = f">= {lo}" if closed else f"> {lo}"
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number {bound}, "
                             f"got {value}")
    positive = ("epochs", "batch_size", "eval_freq", "eval_iter", "allowed_max_length")
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got "
                             f"{getattr(args, name)}")
    for name in ("max_steps", "lora_rank", "train_size", "val_size", "responses",
                 "max_new_tokens"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def _print_responses(title: str, entries: list[dict], texts: list[str]) -> None:
    for i, (entry, text) in enumerate(zip(entries, texts)):
        print(f"--- {title}, test entry {i}: {entry['instruction']}"
              + (f" [{entry['input']}]" if entry.get("input") else ""))
        print(text)


class _EvalClock:
    """The loss function, with the time evaluations spend in it (the model is in eval mode
    then) kept apart, so the time per training step can be reported without them."""

    def __init__(self, loss_fn):
        self.loss_fn, self.seconds = loss_fn, 0.0

    def __call__(self, model, batch):
        if model.training:
            return self.loss_fn(model, batch)
        start = time.perf_counter()
        try:
            return self.loss_fn(model, batch)
        finally:
            self.seconds += time.perf_counter() - start


def _datasets(args, tokenizer, model):
    from tinygpt.finetune.dpo import PreferenceDataset, read_preference_data
    from tinygpt.finetune.instruct import split_instruction_data
    train_entries, test_entries, val_entries = split_instruction_data(
        read_preference_data(args.data))
    train_entries = train_entries[:args.train_size or None]
    val_entries = val_entries[:args.val_size or None]
    if len(train_entries) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_entries)} "
                         "training entries: nothing to train on")
    if not val_entries:
        raise ValueError(f"{args.data}: too few entries for a validation split")
    max_length = min(args.allowed_max_length, model.config.block_size)
    train_ds, val_ds = (PreferenceDataset(entries, tokenizer, args.template, args.mask_prompt,
                                          max_length) for entries in (train_entries, val_entries))
    return train_ds, val_ds, test_entries


def run(args) -> int:
    from tinygpt.commands import check_out
    from tinygpt.text.data import DataLoader
    from tinygpt.finetune.dpo import DPOObjective, count_tokens
    from tinygpt.finetune.instruct import generate_responses
    from tinygpt.training.train import TrainConfig, train
    from tinygpt.hub.pretrained import load_pretrained
    _check_args(args)
    check_out(args.out, RESPONSES_FILE)
    objective = DPOObjective(args.beta, args.reduction)
    start = time.perf_counter()
    model, tokenizer = load_pretrained(args.model, download=False)
    print(f"model {args.model}: {model.num_parameters():,} parameters, loaded in "
          f"{time.perf_counter() - start:.1f} s")
    train_ds, val_ds, test_entries = _datasets(args, tokenizer, model)
    if args.lora_rank:
        from tinygpt.finetune.lora import apply_lora
        n = apply_lora(model, args.lora_rank, args.lora_alpha, rng=args.seed)
        print(f"LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g}: {n:,} trainable")
    model.checkpoint_activations = args.checkpoint_activations != "off"
    shown = test_entries[:args.responses]
    before = generate_responses(model, tokenizer, shown, args.template, args.max_new_tokens)
    start = time.perf_counter()
    for ds in (train_ds, val_ds):          # the frozen starting model, once per entry
        ds.set_reference(model, args.reduction, args.batch_size, progress=True)
    print(f"reference log-probs of {len(train_ds)} train and {len(val_ds)} val entries in "
          f"{time.perf_counter() - start:.1f} s")
    cfg = TrainConfig(batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
                      max_seconds=args.max_seconds, lr=args.lr, weight_decay=args.weight_decay,
                      grad_clip=args.grad_clip, eval_freq=args.eval_freq,
                      eval_iter=args.eval_iter, seed=args.seed, sample_tokens=0,
                      out_dir=args.out)
    train_loader = DataLoader(train_ds, args.batch_size, shuffle=True, drop_last=True,
                              seed=args.seed)
    val_loader = DataLoader(val_ds, args.batch_size)
    loss_fn = _EvalClock(objective)
    result = train(model, train_loader, val_loader, cfg, loss_fn=loss_fn,
                   metrics=objective.metrics(), log=print, count_tokens=count_tokens,
                   extra={"data": str(args.data), "model": str(args.model)})
    after = generate_responses(model, tokenizer, shown, args.template, args.max_new_tokens)
    steps = max(len(result.steps), 1)
    print(f"{len(result.steps)} steps in {result.seconds:.1f} s, of which evaluations "
          f"{loss_fn.seconds:.1f} s: {(result.seconds - loss_fn.seconds) / steps:.2f} s per step "
          f"(batch {args.batch_size}; the final checkpoint's write included); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    _print_responses("before", shown, before)
    _print_responses("after", shown, after)
    _save(args, model, tokenizer, shown, before, after)
    return 0


def _save(args, model, tokenizer, shown: list[dict], before: list[str], after: list[str]) -> None:
    from tinygpt.core.fileio import write_json_atomic
    out = Path(args.out)
    write_json_atomic(out / RESPONSES_FILE,
                      [{**e, "response_before": b, "response_after": a}
                       for e, b, a in zip(shown, before, after)])
    from tinygpt.commands import save_finetuned
    print(save_finetuned(model, out, tokenizer, args.lora_rank, str(args.model)))

