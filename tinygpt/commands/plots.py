"""`tinygpt attention`, `tinygpt tokenize` and `tinygpt plot-lr`: the command-line side of
plots.py (flags, loading, printing). User errors are raised as ValueError.

    tinygpt attention --model ../shared/fixtures/gpt2-tiny-hf \
        --prompt "Every effort moves you" --out attn.png
    tinygpt tokenize "Hello, I am" --tokenizer gpt2
    tinygpt plot-lr --lr 6e-4 --warmup 20 --max-steps 200 --out lr.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_parsers(sub) -> None:
    _add_attention(sub)
    _add_tokenize(sub)
    _add_plot_lr(sub)


def _plots():
    """tinygpt.apps.plots, with a missing matplotlib as a one-line user error."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("pictures need matplotlib: pip install 'tinygpt[plot]'") from None
    from tinygpt.apps import plots
    return plots


# --- attention ---------------------------------------------------------------------------------

def _add_attention(sub) -> None:
    p = sub.add_parser("attention", help="draw the attention weights of a model on a prompt",
                       description="Run the model on the prompt and draw every head's causal "
                       "attention weights (the probabilities its attention kernel computed) "
                       "as a PNG: one layer's heads, or a grid of layers x heads.")
    p.add_argument("--model", required=True, help="a .gguf file, a GPT-2 or Llama hub folder, "
                   "a training run's folder or a GPT-2 name with weights in weights/")
    p.add_argument("--prompt", required=True, help="the text to attend over (keep it short: "
                   "each token is a row and a column)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layer", type=int, default=0,
                       help="the layer to draw, 0-based; negative counts from the end "
                       "(default 0)")
    which.add_argument("--all-layers", action="store_true", help="every layer, one row each")
    p.add_argument("--out", default="attn.png", help="the PNG to write (default attn.png)")
    p.set_defaults(run=run_attention)


def run_attention(args) -> int:
    plots = _plots()
    from tinygpt.hub.pretrained import load_pretrained
    model, tok = load_pretrained(args.model, download=False)
    layers = None if args.all_layers else [args.layer]
    maps = plots.plot_attention(model, tok, args.prompt, args.out, layers)
    L, NH, T, _ = maps.shape
    print(f"{args.out}: {L} layer{'s' * (L > 1)} x {NH} heads over {T} tokens")
    return 0


# --- tokenize ----------------------------------------------------------------------------------

def _add_tokenize(sub) -> None:
    p = sub.add_parser("tokenize", help="show how a tokenizer splits a text: ids and byte spans",
                       description="Print each token of TEXT with its id and the bytes of the "
                       "text's UTF-8 it covers, coloured alternately on a terminal (not when "
                       "stdout is a pipe or NO_COLOR is set), and optionally draw them.")
    p.add_argument("text", help="the text to tokenize")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2 (default), char (the text's own "
                   "characters), a tokenizer file (tinygpt-tokenizer.json or a hub "
                   "tokenizer.json), or a model (.gguf file or folder) whose tokenizer to use")
    p.add_argument("--png", default=None, help="also draw the tokens into this PNG")
    p.set_defaults(run=run_tokenize)


def load_tokenizer_spec(spec: str, text: str):
    """A tokenizer from what --tokenizer names (see its help)."""
    from tinygpt.text.tokenizer import CharTokenizer, get_tokenizer, load_tokenizer
    if spec == "gpt2":
        return get_tokenizer("gpt2")
    if spec == "char":
        if not text:
            raise ValueError("the char tokenizer builds its vocabulary from the text: give one")
        return CharTokenizer.from_text(text)
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--tokenizer {spec!r}: not gpt2, char, or an existing file or folder")
    from tinygpt.text.hf_tokenizer import HFTokenizer
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_tokenizer_json(path / "tokenizer.json")
        return load_tokenizer(path)                  # tinygpt's own file, or GPT-2's BPE
    if path.suffix == ".gguf":
        from tinygpt.formats.gguf import read_gguf
        metadata, _ = read_gguf(path)                # memory-mapped: the weights stay unread
        return HFTokenizer.from_gguf_metadata(metadata, source=str(path))
    if path.name == "tokenizer.json":
        return HFTokenizer.from_tokenizer_json(path)
    from tinygpt.text.tokenizer import TOKENIZER_FILE
    if path.name != TOKENIZER_FILE:
        raise ValueError(f"--tokenizer {spec}: expected a tokenizer.json, a {TOKENIZER_FILE}, "
                         "a .gguf file or a folder")
    return load_tokenizer(path.parent)


# background colours for alternate tokens, black text (ANSI SGR: 30 black on 43/46/45/42)
ANSI_COLOURS = ("\x1b[30;43m", "\x1b[30;46m", "\x1b[30;45m", "\x1b[30;42m")
ANSI_RESET = "\x1b[0m"


def use_colour(stream) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


def format_tokens(spans, colour: bool) -> list[str]:
    """Lines to print: the text with its tokens marked (colours, or '|' between tokens without),
    then one line per token: index, id, byte span [start, end), the token's text."""
    def paint(n: int, s: str) -> str:
        return f"{ANSI_COLOURS[n % len(ANSI_COLOURS)]}{s}{ANSI_RESET}" if colour else s

    marked = "".join(paint(n, s.label) for n, s in enumerate(spans)) if colour \
        else "|".join(s.label for s in spans)
    lines = [marked, ""]
    width = max((len(str(s.id)) for s in spans), default=1)
    span_width = max((len(f"[{s.start}, {s.end})") for s in spans), default=1)
    for n, s in enumerate(spans):
        span = f"[{s.start}, {s.end})"
        lines.append(f"{n:>4}  {s.id:>{width}}  {span:<{span_width}}  {paint(n, s.label)}")
    return lines


def run_tokenize(args) -> int:
    from tinygpt.apps.plots import token_spans           # needs no matplotlib
    tok = load_tokenizer_spec(args.tokenizer, args.text)
    spans = token_spans(tok, args.text)
    n_bytes = len(args.text.encode("utf-8"))
    for line in format_tokens(spans, use_colour(sys.stdout)):
        print(line)
    print(f"{len(spans)} tokens, {n_bytes} bytes, {len(args.text)} characters "
          f"({getattr(tok, 'name', type(tok).__name__)})")
    if args.png:
        if not spans:
            raise ValueError("the text has no tokens to draw")
        _plots().plot_tokens(spans, args.png, title=f"{len(spans)} tokens "
                             f"({getattr(tok, 'name', type(tok).__name__)})")
        print(f"wrote {args.png}")
    return 0


# --- plot-lr -----------------------------------------------------------------------------------

def _add_plot_lr(sub) -> None:
    p = sub.add_parser("plot-lr", help="draw a training config's learning-rate schedule",
                       description="Draw the learning rate at every step of a run: linear "
                       "warmup, then cosine decay to min-lr (the book's appendix D), from a "
                       "TrainConfig JSON file (or a run's checkpoint.json) or from flags; flags "
                       "given with --config override its values.")
    p.add_argument("--config", default=None, help="a JSON file of TrainConfig fields, or a "
                   "run's checkpoint.json")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="end of the cosine (default: lr, "
                   "no decay)")
    p.add_argument("--warmup", type=int, default=None, help="steps of linear warmup")
    p.add_argument("--max-steps", type=int, default=None, help="steps in the run")
    p.add_argument("--out", default="lr.png", help="the PNG to write (default lr.png)")
    p.set_defaults(run=run_plot_lr)


def lr_config(args):
    """The TrainConfig that --config and the flags describe."""
    from dataclasses import fields

    from tinygpt.training.train import TrainConfig
    values: dict = {}
    if args.config is not None:
        try:
            with open(args.config, encoding="utf-8") as f:
                values = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.config}: not valid JSON ({e})") from None
        if isinstance(values, dict) and isinstance(values.get("train_config"), dict):
            values = values["train_config"]              # a run's checkpoint.json
        if not isinstance(values, dict):
            raise ValueError(f"{args.config}: expected a JSON object of TrainConfig fields")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{args.config}: not TrainConfig fields: {', '.join(unknown)}")
    elif args.lr is None or args.max_steps is None:
        raise ValueError("give --config FILE.json, or at least --lr and --max-steps")
    for name in ("lr", "min_lr", "warmup", "max_steps"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ValueError(f"bad config: {e}") from None


def run_plot_lr(args) -> int:
    plots = _plots()
    cfg = lr_config(args)
    if cfg.max_steps <= 0:
        raise ValueError("the schedule needs max_steps > 0 (a config's 0 means 'set by the "
                         "data'): give --max-steps")
    plots.plot_lr(cfg, args.out)
    min_lr = cfg.lr if cfg.min_lr is None else cfg.min_lr
    print(f"{args.out}: lr {cfg.lr:g}, warmup {cfg.warmup} steps, cosine to {min_lr:g} "
          f"at step {cfg.max_steps}")
    return 0
