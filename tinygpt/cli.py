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


# --- generate ----------------------------------------------------------------------------------

def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with GPT-2, streaming text to stdout",
                       description="Continue --prompt with GPT-2 (KV-cached), printing text as it "
                       "is generated. --model is a GPT-2 name (looked up in --dir/NAME, then the "
                       "Hugging Face cache; fetch it with `tinygpt download gpt2`) or a directory "
                       "holding model.safetensors + config.json. With --random-init, --model is a "
                       "tinygpt preset (gpt2, gpt-mini, ...) with random weights: a smoke test.")
    p.add_argument("--model", default="gpt2", help="GPT-2 name or checkpoint dir (default gpt2)")
    p.add_argument("--dir", default="weights", help="where GPT-2 names live (default weights)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--eos", type=int, nargs="?", const=50256, default=None, metavar="ID",
                   help="stop at this token id (default with no ID: 50256, <|endoftext|>)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context per token")
    p.add_argument("--random-init", action="store_true",
                   help="--model names a preset; use random weights (no files needed)")
    p.add_argument("--verbose", action="store_true", help="load time and tokens/s on stderr")


def _run_generate(args) -> int:
    import time

    import numpy as np

    from tinygpt.generate import stream
    from tinygpt.tokenizer import GPT2Tokenizer
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k <= 0:
        raise CLIError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    tok = GPT2Tokenizer()
    ids = tok.encode(args.prompt)
    if not ids:
        raise CLIError("--prompt is empty")
    start = time.perf_counter()
    model = _generate_model(args, tok.n_vocab)
    loaded = time.perf_counter()
    print(args.prompt, end="", flush=True)
    text = _TextStream(tok)
    n = 0
    for token in stream(model, np.array([ids]), args.max_new_tokens, args.temperature, args.top_k,
                        args.top_p, args.eos, args.seed, use_cache=not args.no_cache):
        n += 1
        if int(token[0]) == args.eos:                  # stop without printing <|endoftext|>
            break
        print(text.push(int(token[0])), end="", flush=True)
    print(text.flush(), flush=True)
    if args.verbose:
        took = time.perf_counter() - loaded
        print(f"model loaded in {loaded - start:.2f} s; {n} tokens in {took:.2f} s "
              f"({n / max(took, 1e-9):.1f} tokens/s, {len(ids)}-token prompt, "
              f"{'no ' if args.no_cache else ''}KV cache)", file=sys.stderr)
    return 0


def _generate_model(args, vocab_size: int):
    """The model `tinygpt generate` runs: GPT-2 weights, or a random preset (--random-init)."""
    if args.random_init:
        from tinygpt.model import GPT, GPTConfig
        cfg = GPTConfig.preset(args.model, vocab_size=vocab_size, qkv_bias=True, tie_weights=True)
        return GPT(cfg, seed=0 if args.seed is None else args.seed).eval()
    from tinygpt.weights import load_gpt2
    return load_gpt2(args.model, args.dir, download=False)


class _TextStream:
    """Token ids in, text out, holding back bytes of a character split across tokens.

    GPT-2's tokens are byte sequences, so a character such as "é" or an emoji may span two tokens;
    decoding the first alone gives U+FFFD. Pending ids are decoded together and released once
    they end on a whole character (the point before them is always a character boundary).
    """

    def __init__(self, tok):
        self.tok, self.pending = tok, []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tok.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text, self.pending = self.tok.decode(self.pending), []
        return text


# --- command table ------------------------------------------------------------------------------

COMMANDS = {
    "bench": (_add_bench, _run_bench),
    "prepare": (_add_prepare, _run_prepare),
    "download": (_add_download, _run_download),
    "generate": (_add_generate, _run_generate),
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
