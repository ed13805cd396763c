"""Instruction-tune a pretrained model on the book's 1,100 Alpaca-style entries (chapter 7).

    python demos/instruct.py [--minutes 5] [--lora-rank 16] [--out runs/instruct-demo] [...]
    python demos/instruct.py --book            # the book's run: gpt2-medium, 2 epochs, no budget

Default: the real SmolLM2-135M-Instruct (../shared/fixtures/smollm2-135m-instruct/model.gguf,
its own tokenizer and ChatML template) on ../shared/data/instruction-data.json, trained for
`--minutes` of wall time, with LoRA (`--lora-rank 16`, alpha 16, every Linear and the head, lr
5e-4) or without (`--lora-rank 0`, every weight, the book's lr 5e-5). It prints the trainable
parameters, each evaluation (every 20 steps here, the book's 5 batches each) with a greedy answer
to the first validation entry, the held-out loss on all 55 validation entries before and after,
the time per step and per epoch (evaluations excluded), the peak RSS, and the answers to the
first `--test-size` test entries (saved in --out as instruction-data-with-response.json).

`--book` runs the book's settings instead: gpt2-medium (weights/gpt2-medium, or `tinygpt download
gpt2-medium`), the alpaca template, 2 epochs, lr 5e-5, an evaluation every 5 steps, all 110 test
responses. The book reports losses 3.83 / 3.76 at the start and 0.30 train / 0.66 val after 2
epochs, 15.8 minutes on an M3 MacBook Air CPU.

How long: `--minutes` (default 5) of training, plus loading (~2 s), the held-out losses (~15 s
each on 2 cores) and the responses (about 1-3 s each). Other flags go to `finetune-instruct`
(`tinygpt finetune-instruct --help`), e.g. `--mask-prompt`.
All the work is `tinygpt finetune-instruct`; this script only chooses its settings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinygpt.commands.cli import main as tinygpt_cli

SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2 = SHARED / "fixtures" / "smollm2-135m-instruct" / "model.gguf"
DATA = SHARED / "data" / "instruction-data.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--book", action="store_true", help="the book's gpt2-medium run")
    p.add_argument("--model", default=None, help=f"model (default {SMOLLM2}; --book: gpt2-medium)")
    p.add_argument("--data", default=str(DATA), help="instruction data (default the book's)")
    p.add_argument("--out", default="runs/instruct-demo", help="run folder")
    p.add_argument("--minutes", type=float, default=5.0, help="training budget; 0: no budget")
    p.add_argument("--lora-rank", type=int, default=16, help="0: full fine-tuning (default 16)")
    p.add_argument("--lr", type=float, default=None,
                   help="default 5e-4 with LoRA, 5e-5 without (the book's)")
    p.add_argument("--test-size", type=int, default=10, help="test entries answered (10; --book: "
                   "all)")
    args, rest = p.parse_known_args(argv)
    if args.book:
        cmd = ["--model", args.model or "gpt2-medium", "--template", "alpaca"]
        if args.lora_rank:
            cmd += ["--lora-rank", str(args.lora_rank)]
        cmd += ["--lr", str(args.lr or 5e-5)]
    else:
        if args.minutes < 0:
            print("demos/instruct.py: error: --minutes must be >= 0", file=sys.stderr)
            return 2
        model = args.model or str(SMOLLM2)
        lr = args.lr or (5e-4 if args.lora_rank else 5e-5)
        cmd = ["--model", model, "--template", "chatml" if model.endswith(".gguf") else "alpaca",
               "--lr", str(lr), "--eval-freq", "20", "--test-size", str(args.test_size),
               "--max-seconds", str(args.minutes * 60)]
        if args.lora_rank:
            cmd += ["--lora-rank", str(args.lora_rank)]
        what = f"LoRA rank {args.lora_rank}" if args.lora_rank else "all weights"
        print(f"demo: {model}, {what}, lr {lr:g}, {args.minutes:g} min", flush=True)
    return tinygpt_cli(["finetune-instruct", *cmd, "--data", args.data, "--out", args.out,
                              *rest])


if __name__ == "__main__":
    sys.exit(main())
