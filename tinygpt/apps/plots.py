"""Pictures a learner would rather look at than read: attention maps, tokens, schedules, confusion.

Each picture is a function that returns a matplotlib Figure (`*_figure`) and one that writes it
as a PNG atomically (`plot_*`). The attention weights are the very probabilities the model's
attention kernel computed in its forward pass (`record_attention`), not a second implementation.
The curves every training run writes beside its log (loss, accuracy, reward margin, the
learning-rate schedule) live in `checkpoint.py`; `plot_lr` here draws a `TrainConfig`'s schedule.
Everything needs matplotlib, the optional `plot` extra; without it these raise ImportError.

    tinygpt attention --model ../shared/fixtures/gpt2-tiny-hf --prompt "Every effort moves you"
    tinygpt tokenize "Hello, I am a token" --png tokens.png
    tinygpt plot-lr --lr 6e-4 --warmup 20 --max-steps 200 --min-lr 6e-5 --out lr.png
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from tinygpt.autograd.tensor import no_grad
from tinygpt.training.checkpoint import lr_figure, pyplot, save_figure
from tinygpt.models.llama import LlamaAttention
from tinygpt.models.nn import CausalSelfAttention


def _plt():
    plt = pyplot()
    if plt is None:
        raise ImportError("pictures need matplotlib: pip install 'tinygpt[plot]'")
    return plt


# --- attention ---------------------------------------------------------------------------------

def _attention_modules(model) -> list:
    """Each block's attention module, in layer order (GPT-2's `attn`, Llama's `self_attn`)."""
    kinds = (CausalSelfAttention, LlamaAttention)
    found = []
    for i, block in enumerate(model.blocks()):
        attn = [m for _, m in block.named_children() if isinstance(m, kinds)]
        if len(attn) != 1:
            raise ValueError(f"block {i} ({type(block).__name__}) has no attention module that "
                             "can record its weights")
        found.append(attn[0])
    return found


@contextlib.contextmanager
def record_attention(model) -> Iterator[list[np.ndarray]]:
    """Within the block, each attention call of `model` appends its softmax probabilities
    P: (B, NH, T, Tk) to the yielded list, so after one forward `maps[i]` is layer i's.

        with record_attention(model) as maps:
            model(idx)
    """
    maps: list[np.ndarray] = []
    modules = _attention_modules(model)
    for m in modules:
        m.record = maps                       # an instance attribute over the class's None
    try:
        yield maps
    finally:
        for m in modules:
            del m.record


def attention_maps(model, ids: Sequence[int]) -> np.ndarray:
    """Every layer's attention probabilities for one sequence: (n_layer, NH, T, T), row i the
    weights query token i gives keys 0..i (each row sums to 1, zeros above the diagonal)."""
    idx = np.asarray([list(ids)], dtype=np.int64)                      # (1, T)
    with no_grad(), record_attention(model) as maps:
        model.hidden(idx)
    return np.stack([p[0] for p in maps])


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable axis labels: each token's text, spaces as '·', newlines and stray bytes escaped."""
    return [_visible(token_bytes(tokenizer, i)) for i in ids]


def _visible(b: bytes) -> str:
    text = b.decode("utf-8", errors="backslashreplace")
    return text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def attention_figure(maps: np.ndarray, labels: Sequence[str], layers: Sequence[int],
                     title: str = ""):
    """Small multiples of attention weights: maps (L, NH, T, T) of the layers named in `layers`
    (one row per layer, one column per head; one layer's heads wrap into a near-square grid).
    Query tokens down the side, key tokens along the bottom, darker = more weight."""
    plt = _plt()
    L, NH, T, _ = maps.shape
    if len(labels) != T or len(layers) != L:
        raise ValueError(f"attention_figure: {len(labels)} labels and {len(layers)} layer names "
                         f"for maps of shape {maps.shape}")
    if L == 1:
        cols = math.ceil(math.sqrt(NH))
        cells = [(0, h) for h in range(NH)]
        rows = math.ceil(NH / cols)
    else:
        rows, cols = L, NH
        cells = [(layer, h) for layer in range(L) for h in range(NH)]
    side = max(1.4, min(3.2, 0.16 * T + 0.8))                 # inches per panel
    fig, axes = plt.subplots(rows, cols, figsize=(cols * side + 0.8, rows * side + 0.8),
                             squeeze=False)
    every = max(1, math.ceil(T / 24))                          # at most ~24 labels per axis
    ticks = np.arange(0, T, every)
    font = 7 if T <= 12 else 6
    for n, ax in enumerate(axes.flat):
        if n >= len(cells):
            ax.axis("off")
            continue
        layer, h = cells[n]
        ax.imshow(maps[layer, h], cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {layers[layer]} head {h}", fontsize=7)
        r, c = divmod(n, cols)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        # labels on the outer panels only, so the inner ones stay pictures
        bottom = r == rows - 1 or n + cols >= len(cells)
        ax.set_xticklabels([labels[i] for i in ticks] if bottom else [], rotation=90,
                           fontsize=font)
        ax.set_yticklabels([labels[i] for i in ticks] if c == 0 else [], fontsize=font)
        ax.tick_params(length=0)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(h_pad=1.2)
    return fig


def plot_attention(model, tokenizer, prompt: str, path: str | os.PathLike,
                   layers: Sequence[int] | None = None) -> tuple:
    """Write the attention maps of `model` on `prompt` to `path` (a PNG); `layers` None: all.
    Returns the (L, NH, T, T) weights plotted, for a caller to check or print."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt has no tokens")
    maps = attention_maps(model, ids)
    n_layer = maps.shape[0]
    layers = list(range(n_layer)) if layers is None else list(layers)
    bad = [layer for layer in layers if not -n_layer <= layer < n_layer]
    if bad:
        raise ValueError(f"layer {bad[0]} is not in this model's 0..{n_layer - 1}")
    layers = [layer % n_layer for layer in layers]
    chosen = maps[layers]
    title = f"{type(model).__name__}: attention of {len(ids)} tokens"
    save_figure(attention_figure(chosen, token_labels(tokenizer, ids), layers, title), path)
    return chosen


# --- tokens ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenSpan:
    """One token of a text: its id and the bytes [start, end) of the text's UTF-8 it covers."""
    id: int
    start: int
    end: int
    bytes: bytes

    @property
    def label(self) -> str:
        return _visible(self.bytes)


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for (a BPE token can be part of a UTF-8 character)."""
    if hasattr(tokenizer, "decode_bytes"):                  # HFTokenizer, BPETokenizer
        return tokenizer.decode_bytes([token_id])
    if getattr(tokenizer, "name", None) == "gpt2":
        from tinygpt.text.tokenizer import gpt2_encoding
        return gpt2_encoding().decode_single_token_bytes(token_id)
    return tokenizer.decode([token_id]).encode("utf-8")     # characters: whole by construction


def token_spans(tokenizer, text: str) -> list[TokenSpan]:
    """`text` tokenized, each token with its id and byte span: "Hello, I am" with GPT-2 ->
    15496 [0, 5), 11 [5, 6), 314 [6, 8), 716 [8, 11)."""
    spans, start = [], 0
    for token_id in tokenizer.encode(text):
        b = token_bytes(tokenizer, int(token_id))
        spans.append(TokenSpan(int(token_id), start, start + len(b), b))
        start += len(b)
    return spans


TOKEN_COLOURS = ("#fde68a", "#a7f3d0", "#bfdbfe", "#fbcfe8", "#ddd6fe")   # pastel, dark text


def tokens_figure(spans: Sequence[TokenSpan], width: int = 64, title: str = ""):
    """Tokens as alternately coloured boxes, each with its id beneath (the book's figure 2.x
    style), wrapped at about `width` characters per line."""
    plt = _plt()
    if not spans:
        raise ValueError("no tokens to draw")
    lines, line, used = [], [], 0
    for s in spans:                                   # lay the boxes out in character cells
        cells = max(len(s.label), len(str(s.id))) + 1
        if line and used + cells > width:
            lines.append(line)
            line, used = [], 0
        line.append((used, cells, s))
        used += cells
    lines.append(line)
    cell_w, row_h = 0.105, 0.62                       # inches: monospace 9 pt, box plus id
    longest = max(x + cells for x, cells, _ in (line[-1] for line in lines))
    fig_w = max(3.0, longest * cell_w + 0.4)
    fig_h = len(lines) * row_h + (0.55 if title else 0.25)
    top = 0.4 if title else 0.1
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0, 0, 1, 1))
    # x counts character cells, y counts inches, so boxes keep their shape at any width
    ax.set_xlim(-0.5, -0.5 + fig_w / cell_w)
    ax.set_ylim(top - fig_h, top)
    ax.axis("off")
    n = 0
    for row, line in enumerate(lines):
        y = -row * row_h - 0.22
        for x, cells, s in line:
            colour = TOKEN_COLOURS[n % len(TOKEN_COLOURS)]
            ax.add_patch(plt.Rectangle((x, y - 0.13), cells - 0.3, 0.26, facecolor=colour,
                                       edgecolor="none"))
            ax.text(x + (cells - 0.3) / 2, y, s.label, ha="center", va="center",
                    family="monospace", fontsize=9)
            ax.text(x + (cells - 0.3) / 2, y - 0.25, str(s.id), ha="center", va="center",
                    family="monospace", fontsize=6, color="#444444")
            n += 1
    if title:
        ax.text(0, 0.2, title, ha="left", va="center", fontsize=9)
    return fig


def plot_tokens(spans: Sequence[TokenSpan], path: str | os.PathLike, title: str = ""):
    """Write `tokens_figure(spans)` to `path` (a PNG)."""
    return save_figure(tokens_figure(spans, title=title), path)


# --- training pictures -------------------------------------------------------------------------

def lr_schedule_figure(cfg, max_steps: int | None = None):
    """A `TrainConfig`'s learning rate at every step (warmup, then cosine to min_lr), as the
    book's appendix D figure; `max_steps` defaults to the config's."""
    _plt()
    n = max_steps or cfg.max_steps
    if n <= 0:
        raise ValueError("the schedule needs a number of steps: the config's max_steps is 0 "
                         "(set by the data); give max_steps")
    return lr_figure(lambda step: cfg.lr_at(step, n), n)


def plot_lr(cfg, path: str | os.PathLike, max_steps: int | None = None):
    """Write `lr_schedule_figure(cfg, max_steps)` to `path` (a PNG)."""
    return save_figure(lr_schedule_figure(cfg, max_steps), path)


def confusion_matrix(labels: Sequence[int], predictions: Sequence[int], n_classes: int
                     ) -> np.ndarray:
    """counts[i, j]: how many examples of true class i were predicted as class j."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, np.int64)
    if labels.shape != predictions.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} must be "
                         "1-D and the same length")
    for name, a in (("label", labels), ("prediction", predictions)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"a {name} is outside the {n_classes} classes 0..{n_classes - 1}")
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def confusion_figure(labels: Sequence[int], predictions: Sequence[int], names: Sequence[str],
                     title: str = "test split"):
    """The confusion matrix of a classifier (true class down, predicted across), each cell's
    count written in it, the accuracy in the title."""
    plt = _plt()
    counts = confusion_matrix(labels, predictions, len(names))
    k = len(names)
    side = 1.2 + 0.7 * k
    fig, ax = plt.subplots(figsize=(side + 0.6, side))
    ax.imshow(counts, cmap="Blues", vmin=0)
    for i in range(k):
        for j in range(k):
            dark = counts[i, j] > counts.max() / 2
            ax.text(j, i, f"{counts[i, j]:,}", ha="center", va="center",
                    color="white" if dark else "black", fontsize=10)
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    total = int(counts.sum())
    accuracy = np.trace(counts) / total if total else math.nan
    ax.set_title(f"{title}: accuracy {accuracy:.1%} of {total:,}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_confusion(labels: Sequence[int], predictions: Sequence[int], names: Sequence[str],
                   path: str | os.PathLike, title: str = "test split"):
    """Write `confusion_figure(...)` to `path` (a PNG)."""
    return save_figure(confusion_figure(labels, predictions, names, title), path)
