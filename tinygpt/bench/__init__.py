"""Benchmarks behind `tinygpt bench NAME` / `python -m tinygpt.bench NAME`: figures printed, never asserted.

One module per benchmark (`kernels.py`, `tokenizer.py`, `train.py`, `finetune.py`, `generate.py`,
`constrain.py`, `distributed.py`), each with a `main(argv)` that parses its own flags and prints
its figures.
"""
import importlib
import sys

NAMES = ("kernels", "tokenizer", "train", "generate", "distributed", "finetune", "constrain")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in NAMES:
        print(f"usage: tinygpt bench {{{','.join(NAMES)}}} [options]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"tinygpt.bench.{argv[0]}")
    return module.main(argv[1:]) or 0
