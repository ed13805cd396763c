"""`tinygpt finetune-classifier` and `tinygpt classify`: the book's chapter 6 from the command line.

    tinygpt finetune-classifier --model gpt2 --out runs/spam          # the book's run, 5 epochs
    tinygpt finetune-classifier --model ../shared/fixtures/smollm2-135m-instruct/model.gguf \\
        --epochs 2 --out runs/spam-smollm2
    tinygpt classify --model runs/spam "You won a FREE cruise! Call now" "See you at 6?"

The pieces (data, model, loss, metric, saving) are `tinygpt.finetune.classify`'s; training is
`tinygpt.training.train.train`. Errors are raised as one-line ValueErrors naming the flag, file or row;
the CLI prints them without a traceback and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def add_parsers(subparsers) -> None:
    """Add `finetune-classifier` and `classify` to the CLI's subparsers."""
    from tinygpt.finetune.classify import TOKEN_POSITIONS, TRAINABLE
    p = subparsers.add_parser(
        "finetune-classifier", allow_abbrev=False,
        help="fine-tune a language model into a text classifier (the book's spam classifier)",
        description="Put a linear head on a pretrained model's last hidden state and train it "
        "(the book's chapter 6; its settings are the defaults). --data is the SMS Spam "
        "Collection (label<TAB>text lines) or any .csv/.tsv/.jsonl with a text and a label "
        "column; without --data the SMS file comes from ../shared/data, the cache, or UCI.")
    p.add_argument("--model", default="gpt2", help="GPT-2 name, hub folder (GPT-2 or Llama), or "
                   "a .gguf file (default gpt2)")
    p.add_argument("--dir", default="weights", help="where GPT-2 names live (default weights)")
    p.add_argument("--random-init", action="store_true", help="--model names a GPT preset "
                   "(gpt2, gpt-mini, ...) with random weights and GPT-2's tokenizer")
    p.add_argument("--data", default=None, help="labelled texts (default: the SMS Spam Collection)")
    p.add_argument("--text-col", default=None, help="text column of a .csv/.tsv/.jsonl "
                   "(default text)")
    p.add_argument("--label-col", default=None, help="label column (default label)")
    p.add_argument("--no-balance", action="store_true", help="keep every row (the book cuts each "
                   "class down to the smallest one)")
    p.add_argument("--out", default="runs/classifier", help="where the model, log.csv and "
                   "results.json go (default runs/classifier)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the training split "
                   "(default 5)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps "
                   "(default 0: epochs decide)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="wall-time budget of training "
                   "(default 0: none)")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (default 5e-5)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (default 0.1)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per step (default 8)")
    p.add_argument("--eval-freq", type=int, default=50, help="steps between evaluations "
                   "(default 50)")
    p.add_argument("--eval-iter", type=int, default=5, help="batches per evaluation and split "
                   "(default 5)")
    p.add_argument("--token-pos", choices=TOKEN_POSITIONS, default="last-real",
                   help="which hidden state feeds the head (default last-real; the book: last)")
    p.add_argument("--trainable", choices=TRAINABLE, default="last-block",
                   help="what trains besides the head (default last-block, with the final norm)")
    p.add_argument("--lora-rank", type=int, default=16, help="with --trainable lora (default 16)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="with --trainable lora "
                   "(default 16)")
    p.add_argument("--no-feature-cache", action="store_true", help="run the frozen blocks on "
                   "every step instead of once per text (same results, slower)")
    p.add_argument("--seed", type=int, default=123, help="balance, split, head init and data "
                   "order (default 123, the book's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--checkpoint-activations", choices=("auto", "on", "off"), default="auto",
                   help="recompute each block in backward instead of keeping its activations "
                   "(less memory, ~1/3 more time); auto: on only with --trainable all")
    p.set_defaults(run=run_finetune)

    p = subparsers.add_parser("classify", help="label texts with a classifier from "
                              "`tinygpt finetune-classifier`",
                              description="Print the likeliest label and its probability for "
                              "each text (the arguments, or one text per line on stdin).")
    p.add_argument("--model", required=True, help="the --out folder of finetune-classifier")
    p.add_argument("texts", nargs="*", help="texts to classify (default: lines of stdin)")
    p.add_argument("--batch-size", type=int, default=8, help="texts per forward pass (default 8)")
    p.set_defaults(run=run_classify)


# --- finetune-classifier -------------------------------------------------------------------------

def run_finetune(args) -> int:
    from tinygpt.commands import check_out
    from tinygpt.training.checkpoint import prepare_run_dir
    from tinygpt.finetune import classify as C
    from tinygpt.training.train import TrainConfig, TrainingDiverged
    _check_flags(args)
    if not _is_classifier(args.out):                     # a classifier's folder is rewritten
        check_out(args.out, C.CLASSIFIER_FILE, C.HEAD_FILE, "results.json", "confusion.png")
    data = C.read_labelled(_data_path(args), args.text_col, args.label_col)
    prepare_run_dir(args.out, resume=False)              # writable, before any time is spent
    start = time.perf_counter()
    backbone, tok = _backbone(args)
    pad_id = C.pad_id_of(tok)
    if pad_id is None:
        if args.token_pos == "last":
            raise ValueError(f"--model {args.model}: its tokenizer has no padding token (no eos "
                             "or end-of-text id), and --token-pos last reads the pad position; "
                             "use --token-pos last-real")
        pad_id = 0                                       # never read by the other positions
    splits = C.spam_splits(data, tok, pad_id, batch_size=args.batch_size,
                           balanced=not args.no_balance, max_length=backbone.config.block_size,
                           seed=args.seed)
    if len(splits.train.dataset) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the "
                         f"{len(splits.train.dataset)} training texts of {data.source}: nothing "
                         "to train on")
    model = C.Classifier(backbone, len(splits.label_names), args.token_pos, seed=args.seed,
                         cache_frozen=not args.no_feature_cache)
    backbone.checkpoint_activations = args.checkpoint_activations == "on" or (
        args.checkpoint_activations == "auto" and args.trainable == "all")
    try:
        C.set_trainable(model, args.trainable, lora_rank=args.lora_rank,
                        lora_alpha=args.lora_alpha)
    except ModuleNotFoundError as e:
        raise ValueError(f"--trainable lora needs tinygpt.finetune.lora ({e})") from None
    sizes = "/".join(str(len(s.dataset)) for s in (splits.train, splits.val, splits.test))
    print(f"finetune-classifier: {data.source}: {len(data.texts):,} texts, classes "
          f"{', '.join(splits.label_names)}; split {sizes}, padded to {splits.max_length} "
          f"tokens (pad id {pad_id})")
    print(f"model {args.model}: {model.num_parameters():,} parameters, "
          f"{model.num_parameters(trainable_only=True):,} trainable ({args.trainable}); "
          f"token position {args.token_pos}; loaded in {time.perf_counter() - start:.1f} s")
    cfg = TrainConfig(batch_size=args.batch_size, epochs=args.epochs, max_steps=args.max_steps,
                      max_seconds=args.max_seconds, lr=args.lr, weight_decay=args.weight_decay,
                      grad_clip=0.0, eval_freq=args.eval_freq, eval_iter=args.eval_iter,
                      seed=args.seed, sample_tokens=0)      # the book: no clipping or schedule
    try:
        result = C.finetune_classifier(model, splits, cfg, args.out, log=print,
                                       progress=not args.quiet)
    except TrainingDiverged as e:
        raise ValueError(str(e)) from None
    C.save_classifier(model, args.out, tok, splits.label_names, pad_id, splits.max_length,
                      extra={"model": str(args.model), "trainable": args.trainable})
    draw_confusion(result, splits.label_names, args.out)
    print(f"done in {result['train_seconds']:.0f} s of training: accuracy train "
          f"{result['train_accuracy']:.2%}, val {result['val_accuracy']:.2%}, test "
          f"{result['test_accuracy']:.2%}; classifier in {args.out} (tinygpt classify --model "
          f"{args.out} TEXT)")
    return 0


def _is_classifier(out) -> bool:
    """Whether `out` holds what an earlier finetune-classifier wrote (its classifier.json)."""
    from tinygpt.finetune.classify import CLASSIFIER_FILE
    try:
        info = json.loads((Path(out) / CLASSIFIER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(info, dict) and info.get("format") == "tinygpt-classifier"


def draw_confusion(result: dict, label_names, out) -> Path | None:
    """`out/confusion.png`: the test split's confusion matrix (None without matplotlib)."""
    from tinygpt.apps import plots
    try:
        return plots.plot_confusion(result["test_labels"], result["test_predictions"],
                                    label_names, Path(out) / "confusion.png")
    except ImportError:
        return None


def _backbone(args):
    from tinygpt.finetune.classify import load_backbone
    if args.random_init:
        from tinygpt.models.gpt import GPT, GPTConfig
        from tinygpt.text.tokenizer import GPT2Tokenizer
        tok = GPT2Tokenizer()
        cfg = GPTConfig.preset(args.model, vocab_size=tok.n_vocab, qkv_bias=True,
                               tie_weights=True)
        return GPT(cfg, seed=args.seed), tok
    return load_backbone(args.model, args.dir)


def _data_path(args):
    if args.data is not None:
        return args.data
    from tinygpt.hub.download import DownloadError
    from tinygpt.finetune.classify import sms_spam_file
    try:
        return sms_spam_file(progress=not args.quiet, timeout=10.0)
    except DownloadError as e:
        raise ValueError(f"no --data given: {e}; pass --data FILE (the SMS Spam Collection, or "
                         "a .csv/.tsv/.jsonl with text and label columns)") from None


def _check_flags(args) -> None:
    for name, low in (("epochs", 1), ("batch_size", 1), ("eval_freq", 1), ("eval_iter", 1),
                      ("max_steps", 0), ("lora_rank", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got "
                             f"{getattr(args, name)}")
    for name, low, open_low in (("lr", 0.0, True), ("weight_decay", 0.0, False),
                                ("max_seconds", 0.0, False), ("lora_alpha", 0.0, True)):
        value = getattr(args, name)
        if not math.isfinite(value) or value < low or (open_low and value == low):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number "
                             f"{'>' if open_low else '>='} {low:g}, got {value}")


# --- classify ------------------------------------------------------------------------------------

@dataclass
class Prediction:
    label: str
    probability: float
    truncated: bool


def classify_texts(model_dir: str, texts: list[str], batch_size: int = 8,
                   warn=lambda msg: print(msg, file=sys.stderr)) -> list[Prediction]:
    """Label and probability per text; a text longer than the model's context is cut to it
    (keeping its start), with a warning."""
    from tinygpt.finetune.classify import load_classifier, predict
    model, tok, info = load_classifier(model_dir)
    # `last` reads the position the texts were padded to in training (the book's classify_review)
    book = model.token_pos == "last"
    limit = int(info["max_length"]) if book else model.config.block_size
    what = "the length it was trained with" if book else "the model's context"
    ids, cut = [], []
    for n, text in enumerate(texts, 1):
        t = tok.encode(text)
        if not t:
            raise ValueError(f"text {n} is empty")
        cut.append(len(t) > limit)
        if cut[-1]:
            warn(f"warning: text {n} has {len(t)} tokens, more than {what} ({limit}): "
                 f"classified on its first {limit}")
        ids.append(t[:limit])
    probs = predict(model, ids, info["pad_id"], batch_size, limit if book else None)
    names = info["label_names"]
    return [Prediction(names[k], float(p[k]), c) for p, k, c in zip(probs, probs.argmax(-1), cut)]


def run_classify(args) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no texts: give them as arguments or one per line on stdin")
    for p, text in zip(classify_texts(args.model, texts, args.batch_size), texts):
        print(f"{p.label}\t{p.probability:.4f}\t{text}")
    return 0
