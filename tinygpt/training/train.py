"""The training loop: `TrainConfig`, `train_step` and `train(model, train_data, val_data, cfg)`.

One loop serves pretraining (the CLI's `tinygpt pretrain`, the demos) and fine-tuning alike: it
takes any re-iterable of batches (one pass = one epoch) and an optional `loss_fn` (default: the
GPT's mean next-token cross-entropy). A batch may have any structure: a tuple such as `(x, y)` is
unpacked, `loss_fn(model, x, y)`; anything else (a dict, say) is passed whole, `loss_fn(model,
batch)`. Metrics and `count_tokens` follow the same rule. One step (`train_step`):

    for each of `accum` micro-batches:  loss = loss_fn(model, *batch); loss.backward()
    grad_hook(params)                       e.g. an all-reduce across processes
    g_norm = ||all grads|| / accum;  scale = 1/accum * clip_coef(g_norm, grad_clip)
    optimizer.step(grad_scale=scale)  with lr = lr_at(step) (warmup, then cosine)

Only trainable parameters (`model.named_trainable_parameters()`) reach the optimizer; frozen ones
still go into checkpoints. Every `eval_freq` steps (and at step 0 and the end): mean train and val
loss over `eval_iter` batches with dropout off, perplexity exp(loss), each of `metrics`, and a
greedy sample from `start_context`. Figures go to the `log` callback and a tqdm bar (stderr); with
`out_dir`, also to `log.csv`, `loss.png` (if matplotlib is installed) and checkpoints (see
`checkpoint.py`). With several processes only the one with `is_main` writes or logs anything.
The run ends after `max_steps` steps or `max_seconds` of wall time, whichever comes first.

Resume is bit-identical: a checkpoint holds the parameters, AdamW's moments, the step, the
data loader's RNG state at the start of the current epoch plus how many batches of that epoch were
used, and the model's dropout RNG. Evaluation saves and restores the loader's RNG, so evaluating
never changes which batches training sees.

    python -m tinygpt pretrain --max-steps 20       # the book's the-verdict.txt
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from tinygpt.core import runtime
from tinygpt.autograd.tensor import Tensor, no_grad
from tinygpt.training.checkpoint import (RECORD, load_checkpoint, prepare_run_dir, read_record,
                                save_checkpoint, write_log)
from tinygpt.training.optim import SGD, AdamW, clip_coef, global_grad_norm, lr_at
from tinygpt.core.validate import check_fields, check_number, require_keys

Batch = Any                                  # (x, y) arrays, or any structure the loss_fn takes
LossFn = Callable[..., Tensor]               # loss_fn(model, *batch) -> scalar Tensor
MetricFn = Callable[..., float]              # metric(model, *batch) -> float, e.g. accuracy
GradHook = Callable[[list[Tensor]], None]    # grad_hook(trainable parameters), grads filled


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Units in the comments; a "step" is one optimizer update."""
    context_length: int = 256        # tokens per window T (the CLI sets the model's block_size)
    batch_size: int = 4              # windows per micro-batch B
    epochs: int = 1                  # passes over the training data (when max_steps is 0)
    max_steps: int = 0               # optimizer steps in total; 0: epochs * batches // accum
    max_seconds: float = 0.0         # wall-clock budget of one train() call; 0: none
    accum: int = 1                   # micro-batches per step; tokens/step = accum * B * T
    optimizer: str = "adamw"         # "adamw" or "sgd"
    lr: float = 4e-4                 # peak learning rate (the book's chapter 5: 4e-4)
    min_lr: float | None = None      # end of the cosine decay; None: lr (no decay)
    warmup: int = 0                  # steps of linear warmup from lr/warmup to lr
    weight_decay: float = 0.1        # decoupled, matrices only (not biases or LayerNorm)
    decay_embeddings: bool = False   # also decay wte and wpe
    beta1: float = 0.9               # AdamW first-moment decay (SGD: momentum)
    beta2: float = 0.999             # AdamW second-moment decay
    grad_clip: float = 1.0           # max global gradient norm; 0: no clipping
    eval_freq: int = 100             # steps between evaluations (also at step 0 and the end)
    eval_iter: int = 20              # batches per loss estimate, train and val each
    ckpt_freq: int = 0               # steps between checkpoints; 0: at the end only
    seed: int = 123                  # model init and data order (used by the CLI and demos)
    start_context: str = "Every effort moves you"   # prompt of the samples at each eval
    sample_tokens: int = 50          # tokens per greedy sample; 0: no samples
    out_dir: str | None = None       # log.csv, loss.png, checkpoints; None: write nothing

    def __post_init__(self):
        check_fields(self)                           # "4" from a JSON record, named
        for name in ("context_length", "batch_size", "epochs", "accum", "eval_freq",
                     "eval_iter"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "warmup", "ckpt_freq", "sample_tokens", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_seconds", "lr", "weight_decay", "grad_clip"):
            check_number(f"TrainConfig.{name}", getattr(self, name), 0.0)
        for name in ("beta1", "beta2"):
            check_number(f"TrainConfig.{name}", getattr(self, name), 0.0, 1.0, hi_open=True)
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"TrainConfig.optimizer must be 'adamw' or 'sgd', got "
                             f"{self.optimizer!r}")
        if self.min_lr is not None:
            check_number("TrainConfig.min_lr", self.min_lr, 0.0, self.lr)

    def lr_at(self, step: int, max_steps: int) -> float:
        min_lr = self.lr if self.min_lr is None else self.min_lr
        return lr_at(step, self.lr, min_lr, self.warmup, max_steps)


# fields a resume may change: reporting only, or a longer run (max_steps, epochs; this stretches
# a cosine schedule, so only an unchanged run resumes bit-identically)
RESUME_MAY_DIFFER = ("max_steps", "max_seconds", "epochs", "eval_freq", "eval_iter", "ckpt_freq",
                     "start_context", "sample_tokens", "out_dir")


# what `_resume` reads from checkpoint.json besides what `read_record` checks
RESUME_KEYS = ("tokens_seen", "cursor", "history", "optimizer", "model_config", "train_config")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


@dataclass
class TrainResult:
    """What `train` returns: per-step train losses of this call and every evaluation so far."""
    steps: list[int] = field(default_factory=list)        # step numbers done in this call
    losses: list[float] = field(default_factory=list)     # their train losses (micro-batch mean)
    evals: list[dict] = field(default_factory=list)       # rows of log.csv, whole run
    step: int = 0                                          # steps done in total
    tokens_seen: int = 0
    seconds: float = 0.0                                   # wall time of this call


def default_loss(model, x: np.ndarray, y: np.ndarray) -> Tensor:
    """Mean next-token cross-entropy of a GPT (`CausalLM.loss`: the head only where y counts)."""
    loss = getattr(model, "loss", None)
    return loss(x, y) if loss is not None else model(x, y)[1]


def batch_tokens(batch: Batch) -> int:
    """Tokens in a batch: the size of x in an (x, y, ...) tuple, or of a bare array."""
    if isinstance(batch, tuple):
        return int(np.size(batch[0]))
    if isinstance(batch, np.ndarray):
        return int(batch.size)
    raise TypeError(f"cannot count the tokens of a {type(batch).__name__} batch: give train() "
                    "count_tokens=")


def apply_to_batch(fn: Callable, model, batch: Batch) -> Any:
    """fn(model, *batch) for a tuple batch, fn(model, batch) for any other."""
    return fn(model, *batch) if isinstance(batch, tuple) else fn(model, batch)


def make_optimizer(model, cfg: TrainConfig) -> AdamW | SGD:
    """The optimizer of `cfg`, over the model's trainable parameters only."""
    params = list(model.named_trainable_parameters())
    if not params:
        raise ValueError("the model has no trainable parameters: every one is frozen")
    if cfg.optimizer == "sgd":
        return SGD(params, lr=cfg.lr, momentum=cfg.beta1, weight_decay=cfg.weight_decay,
                   decay_embeddings=cfg.decay_embeddings)
    return AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                 decay_embeddings=cfg.decay_embeddings)


def evaluate(model, data: Iterable[Batch], n_batches: int, loss_fn: LossFn = default_loss,
             metrics: dict[str, MetricFn] | None = None) -> dict[str, float]:
    """{"loss": mean loss, name: mean metric, ...} over the first `n_batches` of `data`, dropout
    off, no graph; the loader's RNG (if it has one) is left as it was, so evaluating does not
    change training's data order. Each metric is averaged per batch, like the loss."""
    metrics = metrics or {}
    rng = getattr(data, "rng", None)
    saved = rng.bit_generator.state if rng is not None else None
    was_training = model.training
    model.eval()
    totals, n = dict.fromkeys(["loss", *metrics], 0.0), 0
    try:
        with no_grad():
            for batch in data:
                if n == n_batches:
                    break
                totals["loss"] += float(apply_to_batch(loss_fn, model, batch).data)
                for name, metric in metrics.items():
                    totals[name] += float(apply_to_batch(metric, model, batch))
                n += 1
    finally:
        model.train(was_training)
        if rng is not None:
            rng.bit_generator.state = saved
    if n == 0:
        raise ValueError("cannot estimate a loss: the data has no batches")
    return {name: total / n for name, total in totals.items()}


def estimate_loss(model, data: Iterable[Batch], n_batches: int,
                  loss_fn: LossFn = default_loss) -> float:
    """Mean loss over the first `n_batches` of `data` (see `evaluate`)."""
    return evaluate(model, data, n_batches, loss_fn)["loss"]


def train_step(model, optimizer: AdamW | SGD, batches: Iterator[Batch], *, accum: int = 1,
               grad_clip: float = 1.0, loss_fn: LossFn = default_loss,
               grad_hook: GradHook | None = None,
               count_tokens: Callable[[Batch], int] = batch_tokens) -> tuple[float, int]:
    """One optimizer update from `accum` micro-batches of `batches`: (mean loss, tokens used).

    Raises TrainingDiverged (before updating anything) on a NaN/inf loss or gradient norm.
    """
    params = [p for _, p in optimizer.named]
    total, n_tokens = 0.0, 0
    for _ in range(accum):
        batch = next(batches)
        loss = apply_to_batch(loss_fn, model, batch)
        value = float(loss.data)
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss is {value}")
        loss.backward()                              # grads add up in the leaves
        total += value
        n_tokens += count_tokens(batch)
    if grad_hook is not None:
        grad_hook(params)
    norm = global_grad_norm(params) / accum          # the norm of the mean gradient
    if not math.isfinite(norm):
        raise TrainingDiverged(f"gradient norm is {norm}")
    optimizer.step(grad_scale=clip_coef(norm, grad_clip) / accum)
    optimizer.zero_grad()
    return total / accum, n_tokens


class _Cursor:
    """Where training is in the data: epoch, micro-batches used in it, loader RNG at its start."""

    def __init__(self, epoch: int = 0, batch: int = 0, epoch_rng: dict | None = None):
        self.epoch, self.batch, self.epoch_rng = epoch, batch, epoch_rng

    def batches(self, data: Iterable[Batch]) -> Iterator[Batch]:
        """Micro-batches forever, epoch after epoch, starting from this position."""
        rng = getattr(data, "rng", None)
        while True:
            if rng is not None:
                if self.epoch_rng is not None:          # resuming: replay this epoch's shuffle
                    rng.bit_generator.state = self.epoch_rng
                self.epoch_rng = rng.bit_generator.state
            it = iter(data)
            for _ in range(self.batch):                 # skip what was used before the resume
                next(it)
            n_before = self.batch
            for batch in it:
                self.batch += 1
                yield batch
            if self.batch == 0 and n_before == 0:
                raise ValueError("the training data yielded no batches (is the dataset smaller "
                                 "than one batch?)")
            self.epoch, self.batch, self.epoch_rng = self.epoch + 1, 0, None

    def state(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "epoch_rng": self.epoch_rng}


def _total_steps(train_data, cfg: TrainConfig) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    try:
        n = len(train_data)
    except TypeError:
        raise ValueError("the training data has no length: set max_steps") from None
    if n < cfg.accum:
        raise ValueError(f"the training data has {n} batches per epoch, fewer than accum="
                         f"{cfg.accum}: nothing to train on")
    return cfg.epochs * n // cfg.accum


def _model_config(model) -> dict:
    """The model's config as a dict (checked on resume, stored in checkpoints); {} if none."""
    config = getattr(model, "config", None)
    return asdict(config) if is_dataclass(config) else {}


def train(model, train_data: Iterable[Batch], val_data: Iterable[Batch] | None,
          cfg: TrainConfig, *, loss_fn: LossFn = default_loss,
          metrics: dict[str, MetricFn] | None = None, tokenizer=None,
          log: Callable[[str], None] | None = None, progress: bool = True,
          resume: bool = False, extra: dict | None = None, grad_hook: GradHook | None = None,
          count_tokens: Callable[[Batch], int] = batch_tokens, is_main: bool = True,
          train_eval_data: Iterable[Batch] | None = None,
          on_eval: Callable[[dict, TrainResult], None] | None = None) -> TrainResult:
    """Train `model` on `train_data` per `cfg`; see the module docstring.

    Args:
        train_data, val_data: re-iterables of batches, e.g. `tinygpt.text.data.DataLoader`'s int64
            (x, y); one pass is one epoch. A `.rng` Generator on train_data is saved in checkpoints.
        loss_fn: `loss_fn(model, *batch) -> scalar Tensor`, for classifiers and fine-tuning.
        metrics: {name: fn(model, *batch) -> float}, evaluated with the losses on train and val:
            log.csv columns `train_<name>`, `val_<name>`, the log line and the progress bar.
        tokenizer: with `.encode`/`.decode`, turns on the samples from `cfg.start_context`.
        log: called with each message (evaluations, samples, checkpoints); None: silent.
        resume: continue from the checkpoint in `cfg.out_dir`, bit-identically.
        extra: JSON-ready values stored in checkpoints (the CLI keeps its data path there).
        grad_hook: called with the trainable parameters once their gradients are summed over the
            micro-batches, before clipping (all-reduce them there to train on several processes).
        count_tokens: tokens in one batch (default: the size of x), for tokens_seen and tok/s.
        is_main: False on all processes but one: no messages, samples, progress bar or files.
        train_eval_data: batches for the train-loss estimate instead of `train_data` (e.g. a fixed
            list, so every evaluation sees the same ones).
        on_eval: called after each evaluation with its row (a dict, as in log.csv) and the result.
    Raises TrainingDiverged on a NaN/inf loss or gradient, before that step's update.
    """
    runtime.keep_freed_memory()          # reuse activation memory between steps: see runtime.py
    if is_main and tokenizer is not None and cfg.sample_tokens:   # before anything is written
        try:
            tokenizer.encode(cfg.start_context)
        except ValueError as e:
            raise ValueError(f"start_context {cfg.start_context[:40]!r} cannot be encoded by the "
                             f"data's tokenizer: {e}") from None
    out = prepare_run_dir(cfg.out_dir, resume, is_main)
    optimizer = make_optimizer(model, cfg)
    max_steps = _total_steps(train_data, cfg)
    model_config = _model_config(model)
    result = TrainResult()
    cursor = _resume(model, optimizer, result, cfg, out, model_config) if resume else _Cursor()
    run = _Run(model, optimizer, cursor, result, cfg, out, max_steps, log, progress and is_main,
               extra or {}, model_config, is_main)
    eval_sets = {"train": train_data if train_eval_data is None else train_eval_data,
                 "val": val_data}

    def evaluate_now() -> None:
        run.evaluate(eval_sets, loss_fn, metrics or {}, tokenizer, on_eval)

    batches = cursor.batches(train_data)
    start = time.perf_counter()
    model.train()
    try:
        if not result.evals:
            evaluate_now()
        done = result.step >= max_steps
        while not done:
            step_start = time.perf_counter()
            optimizer.lr = cfg.lr_at(result.step, max_steps)
            try:
                loss, n_tokens = train_step(model, optimizer, batches, accum=cfg.accum,
                                            grad_clip=cfg.grad_clip, loss_fn=loss_fn,
                                            grad_hook=grad_hook, count_tokens=count_tokens)
            except TrainingDiverged as e:
                run.diverged(str(e))
            now = time.perf_counter()
            run.record_step(loss, n_tokens, now - step_start)
            done = (result.step >= max_steps
                    or bool(cfg.max_seconds) and now - start >= cfg.max_seconds)
            if result.step % cfg.eval_freq == 0 or done:
                evaluate_now()
            if out is not None and (done or cfg.ckpt_freq and result.step % cfg.ckpt_freq == 0):
                run.checkpoint()
    finally:
        run.close()
        result.seconds = time.perf_counter() - start
    return result


def _config_diff(saved: dict, current: dict, skip: tuple[str, ...] = ()) -> list[str]:
    keys = [k for k in {**saved, **current} if k not in skip]
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def _trainable_names(optimizer) -> list[str]:
    return [name for name, _ in optimizer.named]


def _resume(model, optimizer, result: TrainResult, cfg: TrainConfig, out: Path,
            model_config: dict) -> _Cursor:
    """Load the checkpoint in `out` into the model, optimizer and result; return its cursor."""
    record = read_record(out)
    require_keys(record, RESUME_KEYS, out / RECORD)
    diff = _config_diff(record.get("model_config", {}), model_config)
    if diff:
        raise ValueError(f"checkpoint in {out} is for another model config ({'; '.join(diff)})")
    diff = _config_diff(record.get("train_config", {}), asdict(cfg), RESUME_MAY_DIFFER)
    if diff:
        raise ValueError(f"checkpoint in {out} was trained with other settings "
                         f"({'; '.join(diff)}); resume with the same ones")
    trained = record.get("trainable")
    if trained is not None and trained != _trainable_names(optimizer):
        changed = sorted(set(trained) ^ set(_trainable_names(optimizer)))
        raise ValueError(f"checkpoint in {out} trained other parameters than are trainable now "
                         f"({len(changed)} differ, e.g. {changed[0] if changed else 'order'}); "
                         "freeze the same ones")
    arrays, record = load_checkpoint(out)
    try:
        model.load_state_dict({k[6:]: a for k, a in arrays.items() if k.startswith("model.")})
        optimizer.load_state(record["optimizer"],
                             {k[6:]: a for k, a in arrays.items() if k.startswith("optim.")})
        if record.get("model_rng") is not None:
            model.rng.bit_generator.state = record["model_rng"]
        result.step, result.tokens_seen = int(record["step"]), int(record["tokens_seen"])
        result.evals = list(record["history"])
        return _Cursor(**record["cursor"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        what = f"missing {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"corrupted checkpoint {out / RECORD}: {what}") from None


class _Run:
    """The loop's bookkeeping: progress bar, messages, evaluations, logs and checkpoints."""

    def __init__(self, model, optimizer, cursor: _Cursor, result: TrainResult, cfg: TrainConfig,
                 out: Path | None, max_steps: int, log, progress: bool, extra: dict,
                 model_config: dict, is_main: bool):
        from tqdm import tqdm
        self.model, self.optimizer, self.cursor, self.result = model, optimizer, cursor, result
        self.cfg, self.out, self.max_steps, self.extra = cfg, out, max_steps, extra
        self.log = log if is_main else None
        self.model_config, self.is_main = model_config, is_main
        self.last_ckpt = result.step if result.evals else None
        self.bar_metrics = ""                       # latest eval's metrics, shown after the loss
        self.bar = tqdm(total=max_steps, initial=result.step, desc="train", unit="step",
                        disable=not progress, dynamic_ncols=True, leave=False)

    def say(self, msg: str) -> None:
        if self.log is not None:
            with self.bar.external_write_mode():
                self.log(msg)

    def record_step(self, loss: float, n_tokens: int, seconds: float) -> None:
        r = self.result
        r.step += 1
        r.tokens_seen += n_tokens
        r.steps.append(r.step)
        r.losses.append(loss)
        self.bar.set_postfix_str(f"loss {loss:.3f} lr {self.optimizer.lr:.2e} "
                                 f"{n_tokens / seconds:,.0f} tok/s{self.bar_metrics}",
                                 refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    def diverged(self, what: str) -> None:
        kept = (f"the last good checkpoint (step {self.last_ckpt}) is in {self.out}"
                if self.last_ckpt is not None else "no checkpoint was written")
        raise TrainingDiverged(f"training diverged at step {self.result.step + 1}: {what} "
                               f"(epoch {self.cursor.epoch + 1}); stopped before updating the "
                               f"weights; {kept}")

    def evaluate(self, eval_sets: dict, loss_fn: LossFn, metrics: dict[str, MetricFn],
                 tokenizer, on_eval) -> None:
        cfg, r = self.cfg, self.result
        nan = dict.fromkeys(["loss", *metrics], math.nan)
        scores = {split: evaluate(self.model, data, cfg.eval_iter, loss_fn, metrics)
                  if data is not None else nan for split, data in eval_sets.items()}
        train, val = scores["train"], scores["val"]
        row = {"step": r.step, "epoch": self.cursor.epoch + 1, "tokens_seen": r.tokens_seen,
               "lr": self.optimizer.lr, "train_loss": train["loss"], "val_loss": val["loss"],
               "train_ppl": _ppl(train["loss"]), "val_ppl": _ppl(val["loss"])}
        for name in metrics:
            row[f"train_{name}"], row[f"val_{name}"] = train[name], val[name]
        r.evals.append(row)
        shown = "".join(f" | {name} train {train[name]:.3f} val {val[name]:.3f}"
                        for name in metrics)
        self.bar_metrics = "".join(f" val_{name} {val[name]:.3f}" for name in metrics)
        self.say(f"step {r.step:>6} | epoch {row['epoch']:>3} | tokens {r.tokens_seen:>10,} | "
                 f"train {train['loss']:.3f} (ppl {row['train_ppl']:.1f}) | val {val['loss']:.3f} "
                 f"(ppl {row['val_ppl']:.1f}){shown} | lr {self.optimizer.lr:.2e}")
        if (self.is_main and tokenizer is not None and cfg.sample_tokens
                and self.model_config):
            self.say(f"sample: {sample_text(self.model, tokenizer, cfg)}")
        if self.out is not None and self.is_main:
            write_log(r.evals, self.out, lambda step: cfg.lr_at(step, self.max_steps),
                      self.max_steps)
        if on_eval is not None:
            on_eval(row, r)

    def checkpoint(self) -> None:
        if not self.is_main:
            return
        # every parameter, frozen ones included; optimizer buffers exist for trained ones only
        arrays = {f"model.{n}": p.data for n, p in self.model.named_parameters()}
        arrays.update({f"optim.{k}": a for k, a in self.optimizer.state_arrays().items()})
        model_rng = getattr(self.model, "rng", None)
        record = {"step": self.result.step, "tokens_seen": self.result.tokens_seen,
                  "cursor": self.cursor.state(),
                  "model_rng": model_rng.bit_generator.state if model_rng is not None else None,
                  "model_config": self.model_config, "train_config": asdict(self.cfg),
                  "optimizer": self.optimizer.state_dict(),
                  "trainable": _trainable_names(self.optimizer),
                  "history": self.result.evals, "extra": self.extra}
        path = save_checkpoint(self.out, arrays, record)
        self.last_ckpt = self.result.step
        self.say(f"checkpoint: step {self.result.step} -> {path}")


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan


def sample_text(model, tokenizer, cfg: TrainConfig) -> str:
    """Greedy continuation of `cfg.start_context`, newlines shown as spaces (as in the book)."""
    from tinygpt.inference.generate import generate
    ids = np.asarray(tokenizer.encode(cfg.start_context), dtype=np.int64)[None, :]
    out = generate(model, ids, cfg.sample_tokens)
    return tokenizer.decode(out[0].tolist()).replace("\n", " ")
