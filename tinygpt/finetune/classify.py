"""The book's chapter 6: fine-tune a pretrained language model into a text classifier (spam or not).

This module owns the classifier's pieces, each handed to the one training loop (`tinygpt.training.train`):
the `Classifier` (a linear head on any `CausalLM`'s hidden states), which parameters train, the
loss and the accuracy metric, scoring whole splits, a whole run (`finetune_classifier`), and
saving/loading the classifier. The data (the SMS Spam Collection read as the book's pandas call
reads it, the book's seeds, the padded dataset) is `classify_data.py`'s, re-exported here; the
command line is `tinygpt/commands/classify.py`.

    x = backbone.hidden(ids)                 (B, T, C)   GPT-2 or Llama, after the final norm
    h = x[b, pos_b]                          (B, C)      pos: last real token (default), ...
    logits = h @ W + b                       (B, K)      K classes; loss = cross-entropy

Why the last *real* token: attention is causal, so the last token is the only one that has seen
the whole message. The book reads position T-1, which for a short message is a pad token: its
prediction then depends on how much padding follows (users reported this). Here each batch keeps
the real lengths, and positions after the batch's longest message are never computed at all,
since under causal attention they cannot change any earlier position.

    python demos/spam_classifier.py --smollm2     # the book's run on SmolLM2-135M
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tinygpt.autograd import functional as F
from tinygpt.autograd.fused import Ragged
from tinygpt.autograd.tensor import Tensor, is_grad_enabled, no_grad
from tinygpt.text.data import DataLoader
from tinygpt.core.fileio import write_json_atomic
from tinygpt.finetune.classify_data import (  # noqa: F401 (re-exported: the data side)
    BOOK_SEED, SMS_FILE, ClassificationDataset, DownloadError, LabelledTexts, Splits, balance,
    pad_id_of, read_labelled, sms_spam_file, spam_splits, split)
from tinygpt.models.gpt import check_token_ids
from tinygpt.models.nn import Embedding, Linear, Module

TOKEN_POSITIONS = ("last-real", "last", "first", "mean")
TRAINABLE = ("last-block", "last-two-blocks", "all", "head", "lora")
CLASSIFIER_FILE, HEAD_FILE = "classifier.json", "classifier.safetensors"


# --- the model -----------------------------------------------------------------------------------

class Classifier(Module):
    """A `Linear(n_embd, num_classes)` head on a language model's hidden state at one position.

    `backbone` is any `CausalLM` (GPT, Llama): only its `hidden(idx)` is used, so its own
    vocabulary head is idle. `token_pos` picks the state: `last-real` (each text's last token),
    `last` (position T-1, a pad token for short texts: the book's), `first`, or `mean` (average
    over the real tokens). `model(ids, lengths)` -> logits (B, num_classes).
    """

    def __init__(self, backbone, num_classes: int, token_pos: str = "last-real",
                 seed: int = BOOK_SEED, cache_frozen: bool = False):
        if token_pos not in TOKEN_POSITIONS:
            raise ValueError(f"unknown token position {token_pos!r}; choose from "
                             f"{', '.join(TOKEN_POSITIONS)}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.backbone, self.token_pos = backbone, token_pos
        self.head = Linear(backbone.config.n_embd, num_classes, np.random.default_rng(seed))
        self.rng = getattr(backbone, "rng", None)        # dropout masks, kept in checkpoints
        self.cache_frozen = cache_frozen
        self.frozen_states: dict[bytes, np.ndarray] = {}   # text's ids -> (T, C) after the prefix
        self._memo = None                                 # see _logits

    @property
    def config(self):
        return self.backbone.config

    @property
    def num_classes(self) -> int:
        return self.head.weight.shape[1]

    def forward(self, ids: np.ndarray, lengths: np.ndarray) -> Tensor:
        ids, lengths = np.asarray(ids), np.asarray(lengths)
        B = ids.shape[0]
        if self.token_pos == "first":
            ids, lengths = ids[:, :1], np.minimum(lengths, 1)   # causal: token 0 sees itself
        elif self.token_pos != "last":
            ids = ids[:, :int(lengths.max())]       # later positions cannot change earlier ones
        if (self.token_pos == "last-real" and lengths.min() < ids.shape[1]
                and self._frozen_blocks() == 0):
            # each text's own positions only, not the pads after it (see fused.Ragged)
            x = self.backbone.hidden(ids, lengths=lengths)               # (sum lengths, C)
            return self.head(x[Ragged(lengths, ids.shape[1]).rows(np.arange(B), lengths - 1)])
        x = self._hidden(ids, lengths)                                   # (B, T, C)
        if self.token_pos == "last-real":
            h = x[np.arange(B), lengths - 1]                             # (B, C)
        elif self.token_pos == "mean":
            real = (np.arange(ids.shape[1]) < lengths[:, None]).astype(x.dtype)   # (B, T)
            h = F.sum(x * real[:, :, None], axis=1) / lengths[:, None].astype(x.dtype)
        else:
            h = x[:, -1 if self.token_pos == "last" else 0, :]
        return self.head(h)                                              # (B, K)

    # A frozen prefix is a fixed feature extractor. With `cache_frozen`, the states after the
    # leading blocks that train nothing are computed once per text and kept (by the text's ids):
    # training the book's last block then runs 1 block per step instead of all of them. Exact
    # for the positions read here (real tokens; pads get zeros, which no real token attends to).

    def _hidden(self, ids: np.ndarray, lengths: np.ndarray) -> Tensor:
        n_frozen = self._frozen_blocks()
        if n_frozen == 0:
            return self.backbone.hidden(ids)
        keys = self._fill_cache(ids, lengths, n_frozen)
        states = np.zeros((*ids.shape, self.config.n_embd), dtype=self.head.weight.dtype)
        for b, key in enumerate(keys):
            states[b, :lengths[b]] = self.frozen_states[key]
        x = Tensor(states)
        for i, block in enumerate(self.backbone.blocks()[n_frozen:], n_frozen):
            x = block(x, None, i)
        return self.backbone.norm_f(x)

    def _fill_cache(self, ids: np.ndarray, lengths: np.ndarray, n_frozen: int) -> list[bytes]:
        """Run the frozen blocks on the texts not cached yet; return every text's key."""
        keys = [ids[b, :n].tobytes() for b, n in enumerate(lengths)]
        missing = [b for b, key in enumerate(keys) if key not in self.frozen_states]
        if missing:
            with no_grad():
                rows = ids[missing, :int(lengths[missing].max())]
                x = self.backbone.embed(check_token_ids(rows, self.config.vocab_size), 0)
                for i, block in enumerate(self.backbone.blocks()[:n_frozen]):
                    x = block(x, None, i)                                # (B, T, C)
            for j, b in enumerate(missing):
                self.frozen_states[keys[b]] = x.data[j, :lengths[b]].copy()
        return keys

    def warm_cache(self, datasets: Sequence[ClassificationDataset], batch_size: int = 16,
                   progress: bool = False) -> int:
        """Fill the cache for every text of `datasets`, shortest first: batches of similar
        lengths compute about half the pad positions that random batches do (SMS: 56k tokens
        against 102k). Returns how many texts are cached (0 when nothing may be)."""
        from tqdm import tqdm
        n_frozen = self._frozen_blocks()
        if n_frozen == 0:
            return 0
        texts = [ds.ids[i, :ds.lengths[i]] for ds in datasets for i in range(len(ds))]
        order = np.argsort([len(t) for t in texts], kind="stable")
        with tqdm(total=len(texts), desc="frozen blocks", unit="text", disable=not progress,
                  leave=False) as bar:
            for start in range(0, len(order), batch_size):
                rows = [texts[i] for i in order[start:start + batch_size]]
                lengths = np.array([len(t) for t in rows])
                ids = np.zeros((len(rows), lengths.max()), dtype=np.int64)
                for b, t in enumerate(rows):
                    ids[b, :len(t)] = t
                self._fill_cache(ids, lengths, n_frozen)
                bar.update(len(rows))
        return len(self.frozen_states)

    def _frozen_blocks(self) -> int:
        """How many leading blocks the cache may stand for: 0 unless `cache_frozen`, the
        position is not `last` (which reads a pad), there is no dropout and the embeddings are
        frozen; then every leading block without a trainable parameter."""
        if (not self.cache_frozen or self.token_pos == "last"
                or getattr(self.config, "dropout", 0.0) > 0):
            return 0
        if any(p.requires_grad for m in self.backbone.modules() if isinstance(m, Embedding)
               for p in m.parameters()):
            return 0
        n = 0
        for block in self.backbone.blocks():
            if any(p.requires_grad for p in block.parameters()):
                break
            n += 1
        return n


def set_trainable(model: Classifier, mode: str, *, lora_rank: int = 16,
                  lora_alpha: float = 16.0) -> None:
    """Freeze the model, then unfreeze what `mode` trains, the head always included.

    `last-block` (the book): the last transformer block, the final norm and the head;
    `last-two-blocks`; `all` (but an idle untied vocabulary head); `head`; `lora`: LoRA adapters
    on every linear layer, the head's included (`tinygpt.finetune.lora`). The final norm is found
    as the backbone's parameters outside its blocks, embeddings and vocabulary head.
    """
    if mode not in TRAINABLE:
        raise ValueError(f"unknown trainable mode {mode!r}; choose from {', '.join(TRAINABLE)}")
    backbone = model.backbone
    model.requires_grad_(False)
    model.frozen_states.clear()                           # states of an earlier freezing
    if mode == "all":
        backbone.requires_grad_(True)
        head = _vocab_head(backbone)
        if head is not None:                              # idle: logits come from our head
            head.requires_grad = False
    elif mode in ("last-block", "last-two-blocks"):
        for block in backbone.blocks()[-(1 if mode == "last-block" else 2):]:
            block.requires_grad_(True)
        for p in _final_norm_params(backbone):
            p.requires_grad = True
    elif mode == "lora":
        # the book's appendix E: every Linear of the classifier, its new head too, gets an
        # adapter beside its frozen weight (GPT-2 124M, rank 16: 2,666,528 trainable)
        from tinygpt.finetune.lora import apply_lora      # stage 3b; imported only when asked
        apply_lora(model, lora_rank, lora_alpha, targets=None)
        return
    model.head.requires_grad_(True)


def _vocab_head(backbone):
    """The backbone's own untied vocabulary head (a Parameter), or None when it is tied."""
    with no_grad():
        w = backbone.head_weight()
    return w if any(w is p for p in backbone.parameters()) else None


def _final_norm_params(backbone) -> list:
    inside = {id(p) for block in backbone.blocks() for p in block.parameters()}
    inside |= {id(p) for m in backbone.modules() if isinstance(m, Embedding)
               for p in m.parameters()}
    head = _vocab_head(backbone)
    if head is not None:
        inside.add(id(head))
    params = [p for p in backbone.parameters() if id(p) not in inside]
    if not params:
        raise ValueError(f"{type(backbone).__name__} has no final-norm parameters outside its "
                         "blocks")
    return params


# --- loss, metric, evaluation --------------------------------------------------------------------

def classification_loss(model: Classifier, ids: np.ndarray, lengths: np.ndarray,
                        labels: np.ndarray) -> Tensor:
    """Mean cross-entropy of the logits against the labels: the loss_fn for `train()`."""
    return F.cross_entropy(_logits(model, ids, lengths), labels)


def accuracy(model: Classifier, ids: np.ndarray, lengths: np.ndarray,
             labels: np.ndarray) -> float:
    """Fraction of texts whose likeliest class is the label: the metric for `train()`."""
    with no_grad():
        logits = _logits(model, ids, lengths)
    return float(np.mean(logits.data.argmax(axis=-1) == labels))


def _logits(model: Classifier, ids: np.ndarray, lengths: np.ndarray) -> Tensor:
    """model(ids, lengths), remembered for one call when no graph is recorded: `train()`'s
    evaluation calls the loss and then each metric on the same batch, and one forward serves."""
    memo, model._memo = model._memo, None
    if memo is not None and memo[0] is ids and memo[1] is lengths:
        return memo[2]
    logits = model(ids, lengths)
    model._memo = (ids, lengths, logits) if not is_grad_enabled() else None
    return logits


def evaluate_split(model: Classifier, loader: DataLoader, keep: bool = False) -> dict:
    """{"loss", "accuracy", "n"} over every text of `loader` (the book's calc_accuracy_loader
    with num_batches=None), dropout off; each text counts once, whatever its batch's size.
    `keep` adds every text's "labels" and "predictions" (for a confusion matrix)."""
    was_training = model.training
    model.eval()
    loss = correct = n = 0.0
    labels_seen: list[int] = []
    predicted: list[int] = []
    try:
        with no_grad():
            for ids, lengths, labels in loader:
                logits = model(ids, lengths)
                loss += float(F.cross_entropy(logits, labels, reduction="sum").data)
                correct += float(np.sum(logits.data.argmax(axis=-1) == labels))
                n += len(labels)
                if keep:
                    labels_seen += np.asarray(labels).tolist()
                    predicted += logits.data.argmax(axis=-1).tolist()
    finally:
        model.train(was_training)
        model._memo = None
    scores = {"loss": loss / n, "accuracy": correct / n, "n": int(n)}
    if keep:
        scores |= {"labels": labels_seen, "predictions": predicted}
    return scores


def predict(model: Classifier, ids: Sequence[Sequence[int]], pad_id: int,
            batch_size: int = 8, max_length: int | None = None) -> np.ndarray:
    """Class probabilities (N, K) of tokenized texts, in batches. `max_length` pads (and cuts)
    every text to that length, which `last` needs to read the position it was trained on."""
    data = ClassificationDataset(ids, np.zeros(len(ids)), pad_id, max_length)
    model.eval()
    out = []
    with no_grad():
        for ids_b, lengths, _ in DataLoader(data, batch_size):
            out.append(F.softmax(model(ids_b, lengths)).data)
    return np.concatenate(out)


# --- a whole run ---------------------------------------------------------------------------------

def finetune_classifier(model: Classifier, splits: Splits, cfg, out_dir: str | os.PathLike,
                        log: Callable[[str], None] | None = None,
                        progress: bool = True) -> dict:
    """Train through `tinygpt.training.train.train` (the classification loss, accuracy as its metric)
    and return the results, also written to `out_dir/results.json`.

    Every split is scored in full before training and at the end, and the test split at the
    end of each epoch; `log.csv` gets the test split's loss and accuracy beside train's and
    val's at every evaluation (over `cfg.eval_iter` batches, as the book's evaluate_model).
    """
    from tinygpt.training.checkpoint import prepare_run_dir, write_log
    from tinygpt.training.train import evaluate, train
    out = prepare_run_dir(str(out_dir), resume=False)
    say = log or (lambda msg: None)
    metrics = {"accuracy": accuracy}
    start = time.perf_counter()

    def add_test(row: dict, result) -> None:        # train() scores train and val; test here
        scores = evaluate(model, splits.test, cfg.eval_iter, classification_loss, metrics)
        row["test_loss"], row["test_accuracy"] = scores["loss"], scores["accuracy"]
        write_log(result.evals, out)

    epochs = []

    def end_of_epoch(epoch: int) -> None:
        test = evaluate_split(model, splits.test)["accuracy"]
        epochs.append({"epoch": epoch, "test_accuracy": test,
                       "seconds": time.perf_counter() - start})
        say(f"epoch {epoch}: test accuracy {test:.2%} ({epochs[-1]['seconds']:.0f} s)")

    cached = model.warm_cache([s.dataset for s in (splits.train, splits.val, splits.test)],
                              progress=progress)
    if cached:
        say(f"frozen blocks run once per text: {cached:,} texts cached "
            f"({time.perf_counter() - start:.0f} s)")
    before = {name: evaluate_split(model, loader) for name, loader in
              (("val", splits.val), ("test", splits.test))}
    say(f"before training: accuracy val {before['val']['accuracy']:.2%}, test "
        f"{before['test']['accuracy']:.2%}")
    result = train(model, _EpochEnds(splits.train, end_of_epoch), splits.val, cfg,
                   loss_fn=classification_loss, metrics=metrics, log=log, progress=progress,
                   on_eval=add_test, count_tokens=lambda batch: int(batch[1].sum()))
    final = {name: evaluate_split(model, loader, keep=name == "test") for name, loader in
             (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    done = result.step / len(splits.train)          # epochs done; a fraction after max_steps
    if not epochs or epochs[-1]["epoch"] < done:    # the last pass ends without asking for more
        epochs.append({"epoch": int(done) if done == int(done) else round(done, 3),
                       "test_accuracy": final["test"]["accuracy"],
                       "seconds": time.perf_counter() - start})
    results = {"steps": result.step, "train_seconds": result.seconds,
               "seconds": time.perf_counter() - start, "epochs": epochs,
               **{f"before_{k}_accuracy": v["accuracy"] for k, v in before.items()},
               **{f"{k}_{m}": final[k][m] for k in final for m in ("loss", "accuracy", "n")},
               "test_labels": final["test"]["labels"],
               "test_predictions": final["test"]["predictions"]}
    write_json_atomic(out / "results.json", results)
    return results


class _EpochEnds:
    """A training loader that calls `at_end(epoch)` each time a pass over it is used up (once
    train() has stepped on its last batch), for scores at epoch boundaries."""

    def __init__(self, loader: DataLoader, at_end: Callable[[int], None]):
        self.loader, self.at_end, self.epoch = loader, at_end, 0
        self.rng = loader.rng                      # train() saves and restores the shuffle

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        yield from self.loader
        self.epoch += 1
        self.at_end(self.epoch)


# --- save and load -------------------------------------------------------------------------------

def save_classifier(model: Classifier, out_dir: str | os.PathLike, tokenizer,
                    label_names: Sequence[str], pad_id: int, max_length: int,
                    extra: dict | None = None) -> Path:
    """Write the backbone in its hub layout (config.json + model.safetensors, with its tokenizer,
    so every command can load it as a language model), the head in classifier.safetensors and
    classifier.json (label names, token position, pad id, length) last, so a folder with a
    classifier.json is complete. LoRA adapters are merged into their weights first, in place."""
    from tinygpt.models.gpt import GPT
    from tinygpt.formats.safetensors import save_safetensors
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CLASSIFIER_FILE).unlink(missing_ok=True)     # incomplete until rewritten below
    if any(name.endswith(".lora_A") for name, _ in model.named_parameters()):
        from tinygpt.finetune.lora import unload
        unload(model)                # adapters merged into plain Linears: the hub layout's names
    backbone = model.backbone
    from tinygpt.hub.pretrained import save_pretrained          # GPT-2 or Llama hub layout
    save_pretrained(backbone, out, tokenizer)
    save_safetensors({"head.weight": model.head.weight.data, "head.bias": model.head.bias.data},
                     out / HEAD_FILE)
    write_json_atomic(out / CLASSIFIER_FILE, {
        "format": "tinygpt-classifier", "label_names": list(label_names),
        "token_pos": model.token_pos, "pad_id": int(pad_id), "max_length": int(max_length),
        "backbone": "gpt2" if isinstance(backbone, GPT) else "llama", **(extra or {})})
    return out


def load_classifier(model_dir: str | os.PathLike) -> tuple[Classifier, object, dict]:
    """(classifier in eval mode, its tokenizer, classifier.json) from `save_classifier`'s folder."""
    from tinygpt.formats.safetensors import load_safetensors
    directory = Path(model_dir)
    info_path = directory / CLASSIFIER_FILE
    if not info_path.is_file():
        raise ValueError(f"{directory}: no {CLASSIFIER_FILE}: not a classifier (train one with "
                         "`tinygpt finetune-classifier --out DIR`)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        names, token_pos, pad_id = info["label_names"], info["token_pos"], int(info["pad_id"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{info_path}: not a classifier description ({e})") from None
    backbone, tokenizer = load_backbone(directory)
    head = load_safetensors(directory / HEAD_FILE)
    model = Classifier(backbone, len(names), token_pos)
    try:
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items()})
    except ValueError as e:
        raise ValueError(f"{directory / HEAD_FILE}: {e}") from None
    return model.eval(), tokenizer, info


def load_backbone(path_or_name: str | os.PathLike, dir: str | os.PathLike = "weights"):
    """(language model, tokenizer) from a GPT-2 name or folder, a Llama hub folder or a `.gguf`
    file: `weights.load_pretrained`, the loader every command shares."""
    from tinygpt.hub.pretrained import load_pretrained
    return load_pretrained(path_or_name, dir)


__all__ = ["BOOK_SEED", "Classifier", "ClassificationDataset", "LabelledTexts", "Splits",
           "TOKEN_POSITIONS", "TRAINABLE", "accuracy", "balance", "classification_loss",
           "evaluate_split", "finetune_classifier", "load_backbone", "load_classifier",
           "pad_id_of", "predict", "read_labelled", "save_classifier", "set_trainable",
           "sms_spam_file", "spam_splits", "split"]
