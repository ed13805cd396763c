"""The `tinygpt` command line: `tinygpt {generate,pretrain,prepare,download,bench,gradcheck} ...`.

Each subcommand is a pair `_add_NAME(subparsers)` / `_run_NAME(args)`; options for configs are built
from the dataclass fields, so a misspelled flag is an error. Library errors (ValueError, OSError, ...)
become one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# --- bench -------------------------------------------------------------------------------------

def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark and print its figures (kernels, tokenizer, ...)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="NAME [options]")


def _run_bench(args) -> int:
    from tinygpt.bench import main as bench_main
    return bench_main(args.rest)


# --- prepare -----------------------------------------------------------------------------------

def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a UTF-8 text file into uint16 train.bin/val.bin")
    p.add_argument("input", help="UTF-8 text file (INPUT.txt)")
    p.add_argument("out_dir", help="directory for train.bin, val.bin and meta.json")
    p.add_argument("--tokenizer", choices=("gpt2", "char"), default="gpt2")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="last fraction of the tokens that goes to val.bin, in [0, 1) (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_prepare(args) -> int:
    from tinygpt.data import prepare
    meta = prepare(args.input, args.out_dir, tokenizer=args.tokenizer,
                   val_fraction=args.val_fraction, progress=not args.quiet)
    print(f"{args.out_dir}: train.bin {meta['train_tokens']:,} tokens, val.bin "
          f"{meta['val_tokens']:,} tokens ({meta['tokenizer']}, vocab {meta['vocab_size']:,}, "
          f"{meta['dtype']})")
    return 0


# --- download ----------------------------------------------------------------------------------

def _add_download(sub) -> None:
    from tinygpt.download import GPT2_NAMES, HF_URL
    p = sub.add_parser("download", help="fetch GPT-2 model.safetensors + config.json (resumable)")
    p.add_argument("name", choices=GPT2_NAMES, help="which GPT-2 (gpt2 is the 124M model)")
    p.add_argument("--dir", default="weights", help="files go to DIR/NAME/ (default weights)")
    p.add_argument("--base-url", default=HF_URL, help=f"hub to fetch from (default {HF_URL})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_download(args) -> int:
    from tinygpt.download import download_gpt2
    dest = download_gpt2(args.name, args.dir, base_url=args.base_url, progress=not args.quiet)
    print(f"{args.name}: model.safetensors and config.json in {dest}")
    return 0


# --- command table ------------------------------------------------------------------------------

COMMANDS = {
    "bench": (_add_bench, _run_bench),
    "prepare": (_add_prepare, _run_prepare),
    "download": (_add_download, _run_download),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinygpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args) or 0
    except KeyboardInterrupt:
        print("tinygpt: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tinygpt {args.command}: error: {msg}", file=sys.stderr)
        return 2
