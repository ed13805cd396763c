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


# --- command table ------------------------------------------------------------------------------

COMMANDS = {
    "bench": (_add_bench, _run_bench),
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
