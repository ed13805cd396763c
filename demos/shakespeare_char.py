"""Train a small character-level GPT on tiny-shakespeare for a few minutes, then let it write.

    python demos/shakespeare_char.py [PATH_TO_tinyshakespeare.txt] [--minutes 3] [--max-steps N]
                                     [--seed 1337] [--lr 1e-3]

Without a path the text (1.1 MB) is read from ../shared/data, else tinygpt's cache, else
downloaded into the cache from Karpathy's char-rnn repository (sha256-checked).

What it shows: the whole pipeline on one laptop CPU. The 1.1 MB text becomes 65 character ids
(`CharTokenizer`), a 90/10 train/val split, random 64-character windows (`GPTDataset`, stride 1,
and a shuffling `DataLoader`), a 4-layer, 128-wide GPT (817K parameters) and AdamW; every
`--eval-every` steps it prints the mean train and val loss over 10 fixed batches each, and at the
end a 400-character sample from "ROMEO:" (exit 1 if the val loss did not go down). The loss
starts at ln(65) = 4.17, uniform guessing.
Measured on a busy 2-core machine (load average 5-8, so ~400-500 ms/step; ~125 ms/step when idle):
352 steps in 3 minutes reach train 2.28 / val 2.29 (2.5 after 100 steps), and the sample has
speaker names with colons, line breaks and English-shaped words ("Who sblilall scusee thiel che
then bofst aven;"); idle, the same 3 minutes give about three times as many steps. (nanoGPT's
larger model reaches ~1.47 after an hour.)

How long: `--minutes` of training (default 3) plus ~10 s of startup and sampling; the first run
after an install also pays numba's one-time compile. `--max-steps N` stops after N steps (or at the
time budget, whichever comes first).

Training is `tinygpt.training.train.train` with a wall-clock budget (`max_seconds`); this script only
prints its evaluations in its own format (`on_eval`) and samples at the end.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np

from tinygpt import GPT, GPTConfig
from tinygpt.text.data import DataLoader, GPTDataset, read_text, train_val_split
from tinygpt.hub.download import DownloadError, data_file
from tinygpt.inference.generate import generate
from tinygpt.text.tokenizer import CharTokenizer
from tinygpt.training.train import TrainConfig, train

DEFAULT_DATA = "tinyshakespeare.txt"    # a name in tinygpt.hub.download.DATA_FILES
BLOCK_SIZE = 64          # characters of context
BATCH_SIZE = 16          # windows per step: 1,024 characters
WARMUP = 50              # steps of linear learning-rate warmup
GRAD_CLIP = 1.0          # max global gradient norm
EVAL_BATCHES = 10        # fixed batches per loss estimate, train and val each
EPOCHS = 100             # more than any time budget reaches: the clock or --max-steps ends the run


class Report:
    """Prints each evaluation of `train` as one line: losses, recent mean, time per step."""

    def __init__(self, n_vocab: int, eval_every: int):
        self.n_vocab, self.eval_every = n_vocab, eval_every
        self.start, self.reported = 0.0, 0          # clock at step 0; steps already summarised

    def __call__(self, row: dict, result) -> None:
        step = row["step"]
        if step == 0:
            print(f"step     0: train {row['train_loss']:.3f}  val {row['val_loss']:.3f}  "
                  f"(uniform guessing: ln {self.n_vocab} = {math.log(self.n_vocab):.3f})",
                  flush=True)
            self.start = time.perf_counter()
        elif step % self.eval_every == 0:            # not the extra one at the end of the budget
            elapsed = time.perf_counter() - self.start
            recent = result.losses[self.reported:]
            print(f"step {step:5d}: train {row['train_loss']:.3f}  val {row['val_loss']:.3f}  "
                  f"(last {len(recent)} steps {np.mean(recent):.3f})  {elapsed:5.0f} s, "
                  f"{1000 * elapsed / step:.0f} ms/step", flush=True)
            self.reported = len(result.losses)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=None,
                        help=f"{DEFAULT_DATA} (default: ../shared/data, the cache, or downloaded)")
    parser.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps")
    parser.add_argument("--seed", type=int, default=1337, help="model init, data order, sampling")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between loss reports")
    parser.add_argument("--sample-chars", type=int, default=400)
    args = parser.parse_args(argv)
    if args.data is None:
        try:
            args.data = data_file(DEFAULT_DATA)
        except DownloadError as e:
            print(f"shakespeare_char.py: {e}; pass the file's path: python "
                  f"demos/shakespeare_char.py PATH/{DEFAULT_DATA}", file=sys.stderr)
            return 2

    text = read_text(args.data)
    tokenizer = CharTokenizer.from_text(text)
    ids = np.array(tokenizer.encode(text), dtype=np.int64)
    train_ids, val_ids = train_val_split(ids, 0.1)
    train_data = DataLoader(GPTDataset(train_ids, BLOCK_SIZE, stride=1), BATCH_SIZE,
                            shuffle=True, drop_last=True, seed=args.seed)
    val_data = DataLoader(GPTDataset(val_ids, BLOCK_SIZE, stride=1), BATCH_SIZE,
                          shuffle=True, drop_last=True, seed=args.seed + 1)
    eval_sets = {"train": list(islice(DataLoader(train_data.dataset, BATCH_SIZE, shuffle=True,
                                                 seed=args.seed + 2), EVAL_BATCHES)),
                 "val": list(islice(val_data, EVAL_BATCHES))}

    cfg = GPTConfig.preset("char-tiny", vocab_size=tokenizer.n_vocab, block_size=BLOCK_SIZE)
    model = GPT(cfg, seed=args.seed)
    train_cfg = TrainConfig(context_length=BLOCK_SIZE, batch_size=BATCH_SIZE, epochs=EPOCHS,
                            max_steps=args.max_steps, max_seconds=60 * args.minutes, lr=args.lr,
                            warmup=WARMUP, weight_decay=0.1, beta2=0.99, grad_clip=GRAD_CLIP,
                            eval_freq=args.eval_every, eval_iter=EVAL_BATCHES, seed=args.seed,
                            sample_tokens=0)
    print(f"{args.data.name}: {len(text):,} characters, vocabulary {tokenizer.n_vocab}; "
          f"{len(train_ids):,} train / {len(val_ids):,} val")
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, block "
          f"{cfg.block_size}: {model.num_parameters():,} parameters; batch {BATCH_SIZE} x "
          f"{BLOCK_SIZE}; budget {args.minutes:g} min" +
          (f" or {args.max_steps} steps" if args.max_steps else ""))

    report = Report(tokenizer.n_vocab, args.eval_every)
    result = train(model, train_data, eval_sets["val"], train_cfg, progress=False,
                   train_eval_data=eval_sets["train"], on_eval=report)
    elapsed = time.perf_counter() - report.start
    first, last = result.evals[0], result.evals[-1]
    print(f"done: {result.step} steps ({result.tokens_seen:,} characters) in {elapsed:.0f} s;"
          f" train {last['train_loss']:.3f}, val {last['val_loss']:.3f}")

    prompt = np.array(tokenizer.encode("ROMEO:\n"))
    out = generate(model, prompt, args.sample_chars, temperature=0.8, seed=args.seed)
    print(f"\nsample ({args.sample_chars} characters, temperature 0.8):\n")
    print(tokenizer.decode(out[0]))
    if not last["val_loss"] < first["val_loss"]:
        print(f"FAILED: val loss did not go down ({first['val_loss']:.3f} -> "
              f"{last['val_loss']:.3f})")
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
