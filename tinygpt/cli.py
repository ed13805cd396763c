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
