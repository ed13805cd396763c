"""`tinygpt finetune-instruct`: instruction-tune a language model (the book's chapter 7).

Reads Alpaca-style data, splits it in file order (85 % train, 10 % test, the rest validation),
trains with `train()` (the book's defaults: 2 epochs, AdamW lr 5e-5, weight decay 0.1, batch 8,
an evaluation every 5 steps over 5 batches, each followed by a greedy answer to the first
validation entry), then answers every test entry greedily and saves them with the entries as
`instruction-data-with-response.json` in --out. With --lora-rank only LoRA adapters train
(appendix E) and only they are saved; otherwise the whole model is saved in --out.
The maths is in `tinygpt/finetune/instruct.py` and `lora.py`.

    python -m tinygpt finetune-instruct --model ../shared/fixtures/smollm2-135m-instruct/model.gguf \\
        --template chatml --data ../shared/data/instruction-data.json --out runs/instruct \\
        --lora-rank 16 --max-seconds 300
"""
from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

FLOAT_FLAGS = {"lr": (0.0, True), "weight_decay": (0.0, True), "grad_clip": (0.0, True),
               "max_seconds": (0.0, True), "lora_alpha": (0.0, False)}   # (bound, bound allowed)
POSITIVE_FLAGS = ("epochs", "batch_size", "eval_freq", "eval_iter", "allowed_max_length")
NON_NEGATIVE_FLAGS = ("max_steps", "lora_rank", "train_size", "test_size", "max_new_tokens",
                      "sample_tokens")


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune-instruct", help="instruction-tune a model on Alpaca-style data (chapter 7)",
        description="Instruction fine-tuning as the book's chapter 7: --model is a GPT-2 name or "
        "folder, a training run, a Llama hub folder or a .gguf file; --data a JSON list or JSONL "
        "file of {instruction, input, output}. Defaults are the book's.")
    p.add_argument("--model", default="gpt2-medium",
                   help="GPT-2 name, model folder, training run or .gguf file (default "
                   "gpt2-medium, the book's)")
    p.add_argument("--dir", default="weights", help="where GPT-2 names live (default weights)")
    p.add_argument("--data", default=None, help="instruction data (.json list or .jsonl); "
                   "default: instruction-data.json in ../shared/data")
    p.add_argument("--out", required=True, help="run folder: log.csv, checkpoint, model or "
                   "adapters, responses")
    p.add_argument("--template", default="alpaca", choices=("alpaca", "phi3", "chatml"),
                   help="prompt format (default alpaca, the book's; chatml for SmolLM2)")
    p.add_argument("--mask-prompt", action="store_true",
                   help="train on the response tokens only (the book's exercise 7.2)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the training split (2)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (default 0.1)")
    p.add_argument("--batch-size", type=int, default=8, help="entries per step (default 8)")
    p.add_argument("--eval-freq", type=int, default=5, help="steps between evaluations (5)")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation (5)")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="max gradient norm; 0: none, as the book (default 0)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps; 0: epochs")
    p.add_argument("--max-seconds", type=float, default=0.0, help="training wall-time budget in "
                   "seconds; 0: none")
    p.add_argument("--allowed-max-length", type=int, default=1024,
                   help="tokens kept per entry, longer ones are cut with a warning (default 1024, "
                   "capped at the model's context)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank "
                   "instead of every weight; 0: full fine-tuning (default)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA's alpha (default 16)")
    p.add_argument("--lora-targets", default=None, help="comma-separated module names to adapt "
                   "(e.g. q_proj,v_proj or attn); default: every Linear and the head")
    p.add_argument("--train-size", type=int, default=0,
                   help="use only the first N training entries (a short run); 0: all")
    p.add_argument("--test-size", type=int, default=0,
                   help="answer only the first N test entries; 0: all")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="tokens per test response (default 256, the book's)")
    p.add_argument("--sample-tokens", type=int, default=50,
                   help="tokens of the sample after each evaluation; 0: none (default 50)")
    p.add_argument("--seed", type=int, default=123, help="data order and LoRA init (default 123)")
    p.add_argument("--checkpoint-activations", choices=("auto", "on", "off"), default="auto",
                   help="recompute each block in backward instead of keeping its activations "
                   "(less memory, ~1/3 more time); auto: on with --lora-rank")
    p.set_defaults(run=run)


def _check_args(args) -> None:
    """One-line ValueErrors naming the flag, for values argparse's types let through."""
    for name, (lo, closed) in FLOAT_FLAGS.items():
        value = getattr(args, name)
        if not math.isfinite(value) or value < lo or (value == lo and not closed):
            bound = f">= {lo:g}" if closed else f"> {lo:g}"
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number {bound}, "
                             f"got {value}")
    for names, ok, what in ((POSITIVE_FLAGS, lambda v: v > 0, "positive"),
                            (NON_NEGATIVE_FLAGS, lambda v: v >= 0, ">= 0")):
        for name in names:
            if not ok(getattr(args, name)):
                raise ValueError(f"--{name.replace('_', '-')} must be {what}, got "
                                 f"{getattr(args, name)}")
    if args.allowed_max_length < 2:
        raise ValueError(f"--allowed-max-length must be at least 2, got {args.allowed_max_length}")


def _data_path(args) -> Path:
    if args.data is not None:
        return Path(args.data)
    from tinygpt.hub.download import shared_data_dir
    path = shared_data_dir() / "instruction-data.json"
    if not path.is_file():
        raise FileNotFoundError(f"no --data given and {path} does not exist: pass the book's "
                                "instruction-data.json with --data")
    return path


class _Clock:
    """Seconds spent outside training steps (loss evaluations and samples), so the time per
    step and per epoch can be reported without them."""

    def __init__(self):
        self.seconds = 0.0

    def loss_fn(self, model, x, y):
        from tinygpt.training.train import default_loss
        if model.training:
            return default_loss(model, x, y)
        start = time.perf_counter()
        try:
            return default_loss(model, x, y)
        finally:
            self.seconds += time.perf_counter() - start


def _datasets(args, tokenizer, model, data_path: Path):
    from tinygpt.finetune.instruct import (InstructionDataset, read_instruction_data,
                                           split_instruction_data)
    train_entries, test_entries, val_entries = split_instruction_data(
        read_instruction_data(data_path))
    train_entries = train_entries[:args.train_size or None]
    test_entries = test_entries[:args.test_size or None]
    if len(train_entries) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(train_entries)} "
                         "training entries: nothing to train on")
    if not val_entries:
        raise ValueError(f"{data_path}: too few entries for a validation split")
    max_length = min(args.allowed_max_length, model.config.block_size)
    made = {}
    for split, entries in (("train", train_entries), ("val", val_entries)):
        ds = made[split] = InstructionDataset(entries, tokenizer, args.template, args.mask_prompt,
                                              max_length)
        if ds.n_truncated:
            print(f"warning: {ds.n_truncated} of {len(ds)} {split} entries are longer than "
                  f"{max_length} tokens and are truncated", file=sys.stderr)
    return made["train"], made["val"], val_entries, test_entries


def run(args) -> int:
    from tqdm import tqdm

    from tinygpt.text.data import DataLoader
    from tinygpt.finetune.instruct import RESPONSES_FILE, generate_responses, respond, \
        save_responses
    from tinygpt.training.train import TrainConfig, evaluate, train
    from tinygpt.hub.pretrained import load_pretrained
    from tinygpt.commands import check_out
    _check_args(args)
    check_out(args.out, RESPONSES_FILE)
    data_path = _data_path(args)
    start = time.perf_counter()
    model, tokenizer = load_pretrained(args.model, args.dir, download=False)
    n_base = model.num_parameters()
    print(f"model {args.model}: {n_base:,} parameters, loaded in "
          f"{time.perf_counter() - start:.1f} s")
    train_ds, val_ds, val_entries, test_entries = _datasets(args, tokenizer, model, data_path)
    print(f"data {data_path}: {len(train_ds)} train, {len(test_entries)} test, "
          f"{len(val_ds)} val entries; template {args.template}"
          f"{', prompt masked' if args.mask_prompt else ''}")
    targets = args.lora_targets.split(",") if args.lora_targets else None
    if args.lora_rank:
        from tinygpt.finetune.lora import apply_lora
        apply_lora(model, args.lora_rank, args.lora_alpha, targets, rng=args.seed)
    model.checkpoint_activations = args.checkpoint_activations == "on" or (
        args.checkpoint_activations == "auto" and args.lora_rank > 0)
    n_trainable = model.num_parameters(trainable_only=True)
    print(f"trainable parameters: {n_trainable:,} of {n_base:,}"
          + (f" (LoRA rank {args.lora_rank}, alpha {args.lora_alpha:g})" if args.lora_rank
             else " (full fine-tuning)"))
    train_loader = DataLoader(train_ds, args.batch_size, shuffle=True, drop_last=True,
                              seed=args.seed)
    val_loader = DataLoader(val_ds, args.batch_size)
    clock = _Clock()

    def sample(row: dict, result) -> None:
        if args.sample_tokens:
            begin = time.perf_counter()
            text = respond(model, tokenizer, val_entries[0], args.template, args.sample_tokens)
            clock.seconds += time.perf_counter() - begin
            tqdm.write(f"sample (val entry 0): {text!r}")     # above the progress bar

    held_out_before = evaluate(model, val_loader, len(val_loader), clock.loss_fn)["loss"]
    cfg = TrainConfig(batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
                      max_seconds=args.max_seconds, lr=args.lr, weight_decay=args.weight_decay,
                      grad_clip=args.grad_clip, eval_freq=args.eval_freq,
                      eval_iter=args.eval_iter, seed=args.seed, sample_tokens=0,
                      context_length=min(args.allowed_max_length, model.config.block_size),
                      out_dir=args.out)
    clock.seconds = 0.0
    result = train(model, train_loader, val_loader, cfg, loss_fn=clock.loss_fn, log=print,
                   on_eval=sample, extra={"data": str(data_path), "model": str(args.model)})
    evaluating = clock.seconds
    held_out_after = evaluate(model, val_loader, len(val_loader), clock.loss_fn)["loss"]
    per_step = (result.seconds - evaluating) / max(len(result.steps), 1)
    print(f"{len(result.steps)} steps in {result.seconds:.1f} s ({evaluating:.1f} s of them "
          f"evaluating): {per_step:.2f} s per step, {per_step * len(train_loader) / 60:.1f} min "
          f"per epoch of {len(train_loader)} steps; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")
    print(f"held-out loss (all {len(val_ds)} val entries): {held_out_before:.3f} before, "
          f"{held_out_after:.3f} after")
    _save_model(args, model, tokenizer, targets)
    if args.lora_rank:
        from tinygpt.finetune.lora import unload
        unload(model)                     # adapters folded in: generating costs the base's
    begin = time.perf_counter()
    texts = generate_responses(model, tokenizer, test_entries, args.template,
                               args.max_new_tokens, progress=True)
    path = save_responses(test_entries, texts, Path(args.out) / RESPONSES_FILE)
    print(f"{len(texts)} test responses in {time.perf_counter() - begin:.1f} s -> {path}")
    for entry, text in list(zip(test_entries, texts))[:3]:
        print(f"--- {entry['instruction']}" + (f" [{entry['input']}]" if entry.get("input")
                                                else ""))
        print(f"expected: {entry['output']}\nmodel:    {text}")
    return 0


def _save_model(args, model, tokenizer, targets) -> None:
    from tinygpt.commands import save_finetuned
    print(save_finetuned(model, args.out, tokenizer, args.lora_rank, str(args.model),
                         targets=targets))
