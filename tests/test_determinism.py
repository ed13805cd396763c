"""The same seed gives the same weights whether numba's cache is empty or warm.

A process that compiles a kernel runs the code it just compiled; a later process runs the copy
numba stored in its cache, which for a `prange` kernel is a second, separately optimised copy of
the loop body (kernels.py, the note at FASTMATH). Both must round alike, or the first run after an
install or a kernel change cannot be resumed bit-identically. This file trains a tiny GPT for a
few steps in two fresh processes: one with an empty NUMBA_CACHE_DIR (it compiles, and fills the
folder), then one with that folder warm (it compiles nothing), and compares the weights' bytes.

The sizes are chosen so LayerNorm, GELU, attention's softmax and AdamW reach their parallel
compiles (PARALLEL_MIN_SIZE elements or more), as a real run does. The cold process compiles every
kernel a training step needs; the file takes ~12 s on 2 busy cores.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinygpt import kernels

ROOT = Path(__file__).resolve().parents[1]

# Trains 3 steps, writes every parameter's bytes to argv[1], prints numba's cache hits and misses.
CHILD = r"""
import json, sys
import numpy as np
from numba.core.dispatcher import Dispatcher
from tinygpt import GPT, GPTConfig, kernels
from tinygpt.text.data import DataLoader, GPTDataset
from tinygpt.training.train import TrainConfig, train

T, B = 64, 8
assert B * 4 * T * T >= kernels.PARALLEL_MIN_SIZE        # attention rows: (B * heads, T, T)
assert B * T * 256 >= kernels.PARALLEL_MIN_SIZE          # LayerNorm's rows, GELU's 4x more
ids = np.random.default_rng(0).integers(0, 40, 4000)
loader = DataLoader(GPTDataset(ids, T, T), B, shuffle=True, drop_last=True, seed=123)
model = GPT(GPTConfig(vocab_size=40, block_size=T, n_layer=1, n_head=4, n_embd=256, dropout=0.1),
            seed=123)
train(model, loader, None, TrainConfig(context_length=T, batch_size=B, max_steps=3, lr=1e-3,
      eval_freq=1000, eval_iter=1, sample_tokens=0), progress=False)
with open(sys.argv[1], "wb") as f:
    for name, p in sorted(model.state_dict().items()):
        f.write(name.encode() + np.ascontiguousarray(p).tobytes())
jits = [v for v in vars(kernels).values() if isinstance(v, Dispatcher)]
jits += [d for v in vars(kernels).values() for d in (getattr(v, "parallel", None),
         getattr(v, "serial", None)) if isinstance(d, Dispatcher)]
print(json.dumps({"hits": sum(sum(d.stats.cache_hits.values()) for d in jits),
                  "misses": sum(sum(d.stats.cache_misses.values()) for d in jits)}))
"""


def _train_in_child(out: Path, cache_dir: Path) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CHILD, str(out)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not kernels.USE_NUMBA, reason="TINYGPT_NUMBA=0: the NumPy twins, no cache")
def test_cold_and_warm_numba_cache_train_the_same_bytes(tmp_path):
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    cold = _train_in_child(tmp_path / "cold.bin", cache)
    warm = _train_in_child(tmp_path / "warm.bin", cache)
    # the first process compiled the kernels and filled the folder; the second compiled nothing
    assert cold["misses"] > 0 and warm["misses"] == 0 and warm["hits"] > 0, (cold, warm)
    assert (tmp_path / "cold.bin").read_bytes() == (tmp_path / "warm.bin").read_bytes()
