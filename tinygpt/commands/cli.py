"""The `tinygpt` command line: generate, pretrain, prepare, download, bench, gradcheck, and from
`tinygpt/commands/` the fine-tunes, classify, chat, serve, evaluate and the pictures.

Each subcommand here is a pair `_add_NAME(subparsers)` / `_run_NAME(args)`; a module in
`commands/` adds its own through `add_parsers`. Options for configs are built from the dataclass
fields, so a misspelled flag is an error. Library errors (ValueError, OSError, ...)
become one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


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
    from tinygpt.text.data import prepare
    meta = prepare(args.input, args.out_dir, tokenizer=args.tokenizer,
                   val_fraction=args.val_fraction, progress=not args.quiet)
    print(f"{args.out_dir}: train.bin {meta['train_tokens']:,} tokens, val.bin "
          f"{meta['val_tokens']:,} tokens ({meta['tokenizer']}, vocab {meta['vocab_size']:,}, "
          f"{meta['dtype']})")
    return 0


# --- download ----------------------------------------------------------------------------------

def _add_download(sub) -> None:
    from tinygpt.hub.download import HF_URL, MODEL_NAMES
    p = sub.add_parser("download", help="fetch GPT-2 model.safetensors + config.json (resumable)")
    p.add_argument("name", choices=MODEL_NAMES, help="which model (gpt2 is GPT-2 124M; "
                   "smollm2-135m-instruct the Llama-family chat model)")
    p.add_argument("--dir", default="weights", help="files go to DIR/NAME/ (default weights)")
    p.add_argument("--base-url", default=HF_URL, help=f"hub to fetch from (default {HF_URL})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_download(args) -> int:
    from tinygpt.hub.download import HUB_MODELS, download_gpt2
    dest = download_gpt2(args.name, args.dir, base_url=args.base_url, progress=not args.quiet)
    print(f"{args.name}: {' and '.join(HUB_MODELS[args.name][1])} in {dest}")
    return 0


# --- generate ----------------------------------------------------------------------------------

def _add_generate(sub) -> None:
    from tinygpt.text.tokenizer import EOT_ID
    p = sub.add_parser("generate", help="continue a prompt with a GPT, streaming text to stdout",
                       description="Continue --prompt (KV-cached), printing text as it is "
                       "generated. --model is a GPT-2 name (looked up in --dir/NAME, then the "
                       "Hugging Face cache; fetch it with `tinygpt download gpt2`), the --out "
                       "folder of a finished `tinygpt pretrain`, or any directory holding "
                       "model.safetensors + config.json; the model's own tokenizer is used. With "
                       "--random-init, --model is a tinygpt preset (gpt2, gpt-mini, ...) with "
                       "random weights: a smoke test.")
    p.add_argument("--model", default="gpt2", help="GPT-2 name, training run or model directory "
                   "(default gpt2)")
    p.add_argument("--dir", default="weights", help="where GPT-2 names live (default weights)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (default 50)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--eos", type=int, nargs="?", const=EOT_ID, default=None, metavar="ID",
                   help=f"stop at this token id (default with no ID: {EOT_ID}, <|endoftext|>)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context per token")
    p.add_argument("--quantize", choices=("none", "int8", "gguf"), default="none",
                   help="weights for decoding: float32 rows (none, default), int8 with a scale per "
                   "row, or a .gguf file's own Q8_0/Q4_1/Q4_0 blocks kept quantized (gguf)")
    p.add_argument("--random-init", action="store_true",
                   help="--model names a preset; use random weights (no files needed)")
    p.add_argument("--verbose", action="store_true", help="load time and tokens/s on stderr")


def _run_generate(args) -> int:
    import time

    import numpy as np

    from tinygpt.inference.generate import TextStream, stream
    from tinygpt.core.validate import check_number, check_text
    check_number("--temperature", args.temperature, 0.0)
    if args.top_p is not None:
        check_number("--top-p", args.top_p, 0.0, 1.0, lo_open=True)
    if args.top_k is not None and args.top_k <= 0:
        raise CLIError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.seed is not None and args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    if not args.prompt:
        raise CLIError("--prompt is empty")
    check_text("--prompt", args.prompt)
    start = time.perf_counter()
    model, tok = _generate_model(args)
    loaded = time.perf_counter()
    vocab = model.config.vocab_size
    if args.eos is not None and not 0 <= args.eos < vocab:
        raise CLIError(f"--eos {args.eos} is not a token id of this model (0..{vocab - 1})")
    try:
        ids = tok.encode(args.prompt)
    except ValueError as e:                      # a character the model's vocabulary lacks
        raise CLIError(f"--prompt: {e}") from None
    tokens = stream(model, np.array([ids]), args.max_new_tokens, args.temperature, args.top_k,
                    args.top_p, args.eos, args.seed, use_cache=not args.no_cache)
    print(args.prompt, end="", flush=True)
    text = TextStream(tok)
    n = 0
    for token in tokens:
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


def _generate_model(args):
    """(model, tokenizer) `tinygpt generate` runs: saved weights with their tokenizer, or a random
    preset with GPT-2's (--random-init)."""
    if args.random_init:
        from tinygpt.models.gpt import GPT, GPTConfig
        from tinygpt.text.tokenizer import GPT2Tokenizer
        tok = GPT2Tokenizer()
        cfg = GPTConfig.preset(args.model, vocab_size=tok.n_vocab, qkv_bias=True, tie_weights=True)
        model = GPT(cfg, seed=0 if args.seed is None else args.seed)
        if args.quantize == "gguf":
            raise CLIError("--quantize gguf needs a .gguf --model")
        from tinygpt.inference.pack import pack_for_inference
        return pack_for_inference(model, None if args.quantize == "none" else "int8"), tok
    from tinygpt.hub.pretrained import load_pretrained
    pack = {"none": "float32"}.get(args.quantize, args.quantize)
    return load_pretrained(args.model, args.dir, download=False, pack=pack)


# --- pretrain ----------------------------------------------------------------------------------

RENAMED_FLAGS = {"out_dir": ("--out", "--out-dir")}     # the spelling, and the field's


def _field_parser(type_name: str):
    """An argparse `type` for a dataclass field annotation such as 'int' or 'float | None'."""
    base = type_name.replace(" | None", "")
    convert = {"int": int, "float": float, "str": str,
               "bool": lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()]}
    if base not in convert:
        raise TypeError(f"no command-line parser for a field of type {type_name}")

    def parse(text: str):
        if type_name.endswith("| None") and text.lower() == "none":
            return None
        try:
            return convert[base](text)
        except (ValueError, KeyError):
            raise argparse.ArgumentTypeError(f"expected {type_name}, got {text!r}") from None
    parse.__name__ = type_name                   # argparse names it in "invalid ... value"
    return parse


def _add_pretrain(sub) -> None:
    from dataclasses import MISSING, fields

    from tinygpt.training.train import TrainConfig
    p = sub.add_parser("pretrain", allow_abbrev=False,
                       help="train a GPT from scratch on a text file (default: the book's "
                            "the-verdict.txt)",
                       description="Pretrain a GPT with next-token prediction. Flags below "
                       "--resume are TrainConfig fields (tinygpt/training/train.py documents their units).")
    p.add_argument("--data", default=None, help="UTF-8 text file, or a directory from `tinygpt "
                   "prepare`; default: the book's the-verdict.txt (from ../shared/data, the cache, "
                   "or downloaded into the cache)")
    p.add_argument("--model", default=None, help="preset (gpt2, gpt-mini, ...), or a JSON file: "
                   "GPTConfig fields or a Hugging Face GPT-2 config.json; vocab and block size "
                   "come from the data (default gpt2)")
    p.add_argument("--dropout", type=float, default=None, help="model dropout (default 0.1)")
    p.add_argument("--tokenizer", choices=("gpt2", "char"), default=None,
                   help="for a text file (default gpt2; on --resume, the run's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "checkpoint; flags not given are taken from it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ranks", type=int, default=None, help="train on N processes of this machine "
                   "(starts mpiexec -n N; needs the mpi extra); not needed under mpiexec")
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else None
        flags = RENAMED_FLAGS.get(f.name, ("--" + f.name.replace("_", "-"),))
        # SUPPRESS: only flags actually given reach the config (so --resume can tell them apart)
        p.add_argument(*flags, dest=f.name, type=_field_parser(str(f.type)),
                       default=argparse.SUPPRESS, metavar=str(f.type).split()[0].upper(),
                       help=f"default {default}")


def _pretrain_text() -> str:
    """The book's text, from ../shared/data, the cache, or downloaded; offline, an error naming it
    and --data."""
    from tinygpt.hub.download import DownloadError, data_file
    try:
        return str(data_file("the-verdict.txt", progress=False, timeout=10.0, retries=0))
    except DownloadError as e:
        raise CLIError(f"no --data given: {e}; pass --data FILE, a UTF-8 text file") from None


def _run_pretrain(args) -> int:
    from tinygpt.training import distributed, mpirun
    if args.ranks and not distributed.under_mpi():
        return mpirun.launch(args.argv, args.ranks)
    try:
        with distributed.setup() as ctx:     # one process unless started by mpiexec
            return _pretrain(args, ctx)
    except distributed.DistributedError as e:
        raise CLIError(str(e)) from None


def _resumed_run(args, given: dict):
    """(train config, model config, data, tokenizer) of the run in --out, with the flags given;
    --data and --tokenizer must be what the run was trained on (its recorded fingerprint)."""
    from dataclasses import replace

    from tinygpt.models.gpt import GPTConfig
    from tinygpt.training import distributed
    from tinygpt.training.checkpoint import RECORD, read_record
    from tinygpt.training.train import TrainConfig
    from tinygpt.core.validate import require_keys
    path = f"{given['out_dir']}/{RECORD}"
    record = read_record(given["out_dir"])
    require_keys(record, ("train_config", "model_config"), path)
    try:
        cfg = replace(TrainConfig(**record["train_config"]), **given)
        model_cfg = GPTConfig(**record["model_config"])
    except (TypeError, ValueError) as e:
        raise CLIError(f"{path}: {e}") from None
    extra = record.get("extra") if isinstance(record.get("extra"), dict) else {}
    tokenizer = extra.get("tokenizer", args.tokenizer or "gpt2")
    if args.tokenizer is not None and args.tokenizer != tokenizer:
        raise CLIError(f"--tokenizer {args.tokenizer}: the run in {given['out_dir']} was trained "
                       f"with the {tokenizer} tokenizer")
    data = args.data or extra.get("data")
    recorded = extra.get("data_fingerprint")
    if data is not None and isinstance(recorded, dict) and Path(data).exists() \
            and _digests(distributed.fingerprint(data)) != _digests(recorded):
        what = "--data" if args.data else f"--data (the run's {data})"
        raise CLIError(f"{what} is not the data the run in {given['out_dir']} was trained on: "
                       "its contents differ (SHA-256)")
    return cfg, model_cfg, data, tokenizer


def _digests(fingerprint: dict) -> list:
    """The SHA-256s of a data fingerprint, not its file names: a moved copy is the same data."""
    files = fingerprint.get("files")
    return sorted(map(str, files.values())) if isinstance(files, dict) else []


def _pretrain(args, ctx) -> int:
    import json
    import time
    from dataclasses import asdict, fields, replace

    from tinygpt.models.gpt import GPT, GPTConfig
    from tinygpt.training import distributed
    from tinygpt.text.data import pretrain_data
    from tinygpt.training.train import TrainConfig, TrainingDiverged, train
    from tinygpt.hub.gpt2 import config_from_json
    from tinygpt.hub.pretrained import save_pretrained
    from tinygpt.core.validate import check_number
    from tinygpt.training.checkpoint import RECORD
    from tinygpt.commands import check_out
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.dropout is not None:
        check_number("--dropout", args.dropout, 0.0, 1.0, hi_open=True)
    if args.resume:
        if "out_dir" not in given:
            raise CLIError("--resume needs --out DIR, the run to continue")
        cfg, model_cfg, data, tokenizer = _resumed_run(args, given)
    else:
        cfg = TrainConfig(**{"out_dir": "runs/pretrain", **given})
        if not (Path(cfg.out_dir) / RECORD).exists():    # a run's folder: "resume it" comes later
            check_out(cfg.out_dir)                       # a user's model there is never replaced
        model_cfg, data, tokenizer = None, args.data, args.tokenizer or "gpt2"
    if data is None:
        data = _pretrain_text()
    train_data, val_data, tok = pretrain_data(data, cfg.context_length, cfg.batch_size, cfg.seed,
                                              tokenizer)
    if model_cfg is None or args.model is not None:
        name = args.model or "gpt2"           # on --resume, a different model is an error later
        base = config_from_json(name) if name.endswith(".json") else GPTConfig.preset(name)
        dropout = args.dropout if args.dropout is not None else 0.1
        model_cfg = replace(base, vocab_size=tok.n_vocab, block_size=cfg.context_length,
                            dropout=dropout)
    elif args.dropout is not None:            # on --resume: compared with the run's, and named
        model_cfg = replace(model_cfg, dropout=args.dropout)
    ctx.check_agree(train_config=asdict(cfg), model_config=asdict(model_cfg),
                    data=distributed.fingerprint(data))
    model = GPT(model_cfg, seed=cfg.seed)
    ctx.broadcast_parameters(model)
    if ctx.is_main:
        print(f"pretrain: {data}; model {model.num_parameters():,} parameters "
              f"({json.dumps(asdict(model_cfg))}); {len(train_data)} batches per epoch"
              + (f"; {ctx.world} ranks x {ctx.threads} threads" if ctx.world > 1 else ""))
    start = time.perf_counter()
    try:
        result = train(model, ctx.shard(train_data), ctx.shard(val_data), cfg, tokenizer=tok,
                       log=print, progress=not args.quiet, resume=args.resume,
                       extra={"data": str(data), "tokenizer": tokenizer,
                              "data_fingerprint": distributed.fingerprint(data)},
                       **ctx.train_kwargs())
    except TrainingDiverged as e:
        raise CLIError(str(e)) from None
    if not ctx.is_main:
        return 0
    save_pretrained(model, cfg.out_dir, tokenizer=tok)    # what generate and fine-tunes read
    last = result.evals[-1]
    print(f"done: {result.step} steps, train {last['train_loss']:.3f}, val "
          f"{last['val_loss']:.3f}, {time.perf_counter() - start:.0f} s; logs, checkpoint and "
          f"model in {cfg.out_dir} (tinygpt generate --model {cfg.out_dir} --prompt ...)")
    return 0


# --- gradcheck ---------------------------------------------------------------------------------

def _add_gradcheck(sub) -> None:
    p = sub.add_parser("gradcheck", help="check every op's backward against central differences")
    p.add_argument("--seed", type=int, default=0, help="seed of the random float64 inputs")


def _gradcheck_cases(rng):
    """(name, f, inputs): each op on small random float64 inputs, away from its kinks."""
    import numpy as np

    from tinygpt.autograd import functional as F

    def r(*shape):
        return rng.standard_normal(shape)

    targets = np.array([0, 3, -100, 2])
    return [
        ("add (broadcast)", F.add, [r(3, 4), r(4)]), ("sub", F.sub, [r(3, 4), r(3, 1)]),
        ("mul", F.mul, [r(3, 4), r(4)]), ("div", F.div, [r(3, 4), 2 + r(4) ** 2]),
        ("pow", lambda x: F.pow(x, 3), [r(3, 4)]), ("exp", F.exp, [r(3, 4)]),
        ("log", F.log, [1 + r(3, 4) ** 2]), ("sqrt", F.sqrt, [1 + r(3, 4) ** 2]),
        ("tanh", F.tanh, [r(3, 4)]), ("gelu", F.gelu, [r(3, 4)]),
        ("relu", F.relu, [np.sign(r(3, 4)) * (0.1 + np.abs(r(3, 4)))]),
        ("matmul", F.matmul, [r(2, 3, 4), r(4, 5)]), ("linear", F.linear, [r(2, 3, 4), r(4, 5), r(5)]),
        ("sum", lambda x: F.sum(x, axis=1), [r(3, 4)]), ("mean", F.mean, [r(3, 4)]),
        # distinct values one apart: max has a kink where two inputs tie
        ("max", lambda x: F.max(x, axis=-1), [rng.permutation(12).reshape(3, 4) + 0.0]),
        ("reshape", lambda x: F.reshape(x, (4, 3)), [r(3, 4)]),
        ("permute", lambda x: F.permute(x, (2, 0, 1)), [r(2, 3, 4)]),
        ("getitem", lambda x: x[np.array([0, 0, 2]), 1:], [r(3, 4)]),
        ("concatenate", lambda a, b: F.concatenate([a, b], axis=0), [r(2, 4), r(3, 4)]),
        ("stack", lambda a, b: F.stack([a, b], axis=1), [r(3, 4), r(3, 4)]),
        ("softmax", F.softmax, [r(3, 5)]), ("log_softmax", F.log_softmax, [r(3, 5)]),
        ("layer_norm", F.layer_norm, [r(3, 6), r(6), r(6)]),
        ("embedding", lambda w: F.embedding(w, np.array([[1, 1, 4]])), [r(5, 3)]),
        ("dropout", lambda x: F.dropout(x, 0.5, np.random.default_rng(1)), [r(3, 4)]),
        ("where", lambda a, b: F.where(np.eye(3, 4, dtype=bool), a, b), [r(3, 4), r(4)]),
        ("cross_entropy", lambda x: F.cross_entropy(x, targets), [r(4, 6)]),
        ("causal_attention", F.causal_attention, [r(2, 5, 4), r(2, 5, 4), r(2, 5, 4)]),
        ("multihead_attention", lambda qkv: F.multihead_attention(qkv, 2), [r(2, 5, 12)]),
    ]


def _run_gradcheck(args) -> int:
    import numpy as np

    from tinygpt.autograd.gradcheck import GradcheckError, gradcheck

    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    cases, failures = _gradcheck_cases(np.random.default_rng(args.seed)), 0
    for name, f, inputs in cases:
        try:
            gradcheck(f, *inputs)
            print(f"ok    {name}")
        except GradcheckError as e:
            failures += 1
            print(f"FAIL  {name}: {e}")
    print(f"{len(cases) - failures} passed, {failures} failed")
    return 1 if failures else 0


# --- command table ------------------------------------------------------------------------------

COMMANDS = {
    "bench": (_add_bench, _run_bench),
    "prepare": (_add_prepare, _run_prepare),
    "download": (_add_download, _run_download),
    "pretrain": (_add_pretrain, _run_pretrain),
    "generate": (_add_generate, _run_generate),
    "gradcheck": (_add_gradcheck, _run_gradcheck),
}


# stage 3 and serving live beside this file, in tinygpt/commands/: each adds its own subcommands
COMMAND_MODULES = ("classify", "instruct", "dpo", "serve", "plots")


def build_parser() -> argparse.ArgumentParser:
    import importlib
    parser = argparse.ArgumentParser(prog="tinygpt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, run) in COMMANDS.items():
        add(sub)
        sub.choices[name].set_defaults(run=run)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tinygpt.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"tinygpt.commands.{name}":
                raise
            continue
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv                              # pretrain --ranks N runs them again under mpiexec
    try:
        # overflow in a diverging run is reported by the trainer as one line; NumPy's own
        # RuntimeWarnings would only print source lines above it
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return args.run(args) or 0
    except KeyboardInterrupt:
        print("tinygpt: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"tinygpt {args.command}: error: out of memory (is a size in the config or the "
              "flags far too large?)", file=sys.stderr)
        return 2
    except (CLIError, ValueError, TypeError, OSError, KeyError) as e:
        msg = f"missing {e.args[0]!r}" if isinstance(e, KeyError) and e.args else e
        print(f"tinygpt {args.command}: error: {msg}", file=sys.stderr)
        return 2
