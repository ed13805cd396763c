"""Data-parallel training (`tinygpt/training/distributed.py`) with 2 ranks under mpiexec on 127.0.0.1.

A 2-rank run equals a 1-rank run (losses at every step, log rows, final parameters) up to the
order of float32 additions; a resumed 2-rank run is bit-identical to an uninterrupted one; ranks
that disagree, die or stall end the job quickly. Skipped without mpi4py or mpiexec. Each mpiexec
run takes ~3 s on 2 cores (two interpreters importing NumPy and numba).

This file is also the script the ranks run:  python -m tests.test_distributed OUT_DIR [options]
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tinygpt import GPT, GPTConfig
from tinygpt.training import distributed, mpirun
from tinygpt.text.data import DataLoader, GPTDataset
from tinygpt.text.tokenizer import CharTokenizer
from tinygpt.training.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
TEXT = "".join(f"the cat {w} on the mat. a dog {w} by the door.\n"
               for w in ("sat", "ran", "lay", "hid", "sat", "ran", "ate", "sat") * 6)
TOK = CharTokenizer.from_text(TEXT)
T = 16
MODEL = GPTConfig(vocab_size=TOK.n_vocab, block_size=T, n_layer=1, n_head=2, n_embd=16,
                  dropout=0.0)
# 5 rows per batch: shards of 3 and 2, so the row weighting of the loss is exercised too
BASE = dict(context_length=T, batch_size=5, max_steps=8, lr=3e-3, eval_freq=2, eval_iter=2,
            sample_tokens=0)
# 2-rank vs 1-rank: the same float32 numbers summed in another order (a partial sum per rank, then
# one float32 addition in the all-reduce). Measured: losses 9e-8 relative, parameters 3.2e-7
# absolute after 8 AdamW steps at lr 3e-3; the tolerances leave a factor of ~10.
LOSS_RTOL, PARAM_ATOL = 1e-6, 3e-6
RUN_TIMEOUT = 60     # seconds an mpiexec run may take before the test fails instead of hanging


# --- what every rank runs -----------------------------------------------------------------------

def _loaders(batch_size: int):
    ids = TOK.encode(TEXT)
    n = int(0.9 * len(ids))
    return (DataLoader(GPTDataset(ids[:n], T, T), batch_size, shuffle=True, drop_last=True,
                       seed=0),
            DataLoader(GPTDataset(ids[n:], T, T), batch_size))


def run(out_dir: str, max_steps: int = 8, resume: bool = False, fail: str | None = None,
        fail_at: int = 3, lr: float | None = None, use_mpi: bool | None = None) -> dict:
    """One training run with `distributed`'s pieces, as `tinygpt pretrain` uses them."""
    ctx = distributed.setup(use_mpi=use_mpi)
    with ctx:
        lr = lr if lr is not None and ctx.rank == 1 else BASE["lr"]
        cfg = TrainConfig(**{**BASE, "max_steps": max_steps, "lr": lr, "out_dir": out_dir})
        train_data, val_data = _loaders(cfg.batch_size)
        ctx.check_agree(train_config=vars(cfg), model_config=vars(MODEL),
                        data=distributed.fingerprint(__file__))
        model = GPT(MODEL, seed=ctx.rank)       # differs per rank: the broadcast must fix it
        ctx.broadcast_parameters(model)
        kwargs = ctx.train_kwargs()
        kwargs["grad_hook"] = _failing(ctx, kwargs["grad_hook"], fail, fail_at)
        result = train(model, ctx.shard(train_data), ctx.shard(val_data), cfg, progress=False,
                       resume=resume, **kwargs)
        return {"losses": result.losses, "evals": result.evals, "rank": ctx.rank,
                "world": ctx.world, "threads": ctx.threads}


def _failing(ctx, hook, how: str | None, at: int):
    """The grad_hook, made to kill, fail or stall rank 1 at its step `at`."""
    steps = 0

    def grad_hook(params):
        nonlocal steps
        steps += 1
        if ctx.rank == 1 and steps == at:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "raise":
                raise RuntimeError("rank 1 fails on purpose")
            if how == "stall":
                time.sleep(3600)
        if hook is not None:
            hook(params)
    return grad_hook


def _main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fail", choices=("kill", "raise", "stall"))
    p.add_argument("--lr-on-rank-1", type=float)
    a = p.parse_args()
    out = run(a.out_dir, a.max_steps, a.resume, a.fail, lr=a.lr_on_rank_1)
    if out["rank"] == 0:
        Path(a.out_dir, "result.json").write_text(json.dumps(out))


# --- the tests ------------------------------------------------------------------------------------

def _mpirun(ranks: int, *args: str, timeout_env: float = 30.0) -> subprocess.CompletedProcess:
    pytest.importorskip("mpi4py")
    try:
        cmd, env = mpirun.mpiexec_command(
            ranks, [sys.executable, "-m", "tests.test_distributed", *args], threads=1)
    except distributed.DistributedError as e:
        pytest.skip(str(e))
    env["TINYGPT_MPI_TIMEOUT"] = str(timeout_env)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _arrays(out_dir: Path) -> dict[str, np.ndarray]:
    from tinygpt.training.checkpoint import load_checkpoint
    return load_checkpoint(out_dir)[0]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    _ok(_mpirun(2, str(out)))
    return out


def test_two_ranks_equal_one_rank(two_rank_run, tmp_path):
    one = run(str(tmp_path / "one"), use_mpi=False)
    two = json.loads((two_rank_run / "result.json").read_text())
    assert two["world"] == 2 and two["threads"] == 1
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=LOSS_RTOL)
    assert [r["step"] for r in two["evals"]] == [r["step"] for r in one["evals"]]
    assert [r["tokens_seen"] for r in two["evals"]] == [r["tokens_seen"] for r in one["evals"]]
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([r[key] for r in two["evals"]],
                                   [r[key] for r in one["evals"]], rtol=LOSS_RTOL)
    a, b = _arrays(two_rank_run), _arrays(tmp_path / "one")
    assert a.keys() == b.keys()
    for name in a:
        if name.startswith("model."):
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=PARAM_ATOL, err_msg=name)
    assert not np.array_equal(a["model.wte.weight"], GPT(MODEL, seed=0).wte.weight.data)


@pytest.mark.slow
def test_resumed_two_rank_run_is_bit_identical(two_rank_run, tmp_path):
    out = tmp_path / "resumed"
    _ok(_mpirun(2, str(out), "--max-steps", "4"))
    shutil.copytree(out, tmp_path / "on-one-rank")
    _ok(_mpirun(2, str(out), "--max-steps", "8", "--resume"))
    a, b = _arrays(two_rank_run), _arrays(out)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    full = json.loads((two_rank_run / "result.json").read_text())
    resumed = json.loads((out / "result.json").read_text())
    assert resumed["losses"] == full["losses"][4:] and resumed["evals"] == full["evals"]
    # the same checkpoint resumes on 1 rank: the 2-rank run up to float32 summation order
    one = run(str(tmp_path / "on-one-rank"), resume=True, use_mpi=False)
    np.testing.assert_allclose(one["losses"], full["losses"][4:], rtol=LOSS_RTOL)
    c = _arrays(tmp_path / "on-one-rank")
    for name in a:
        np.testing.assert_allclose(c[name], a[name], rtol=0, atol=PARAM_ATOL, err_msg=name)


def test_ranks_that_disagree_on_the_config_stop_at_the_start(tmp_path):
    proc = _mpirun(2, str(tmp_path / "run"), "--lr-on-rank-1", "0.001")
    assert proc.returncode != 0
    assert "ranks disagree on the train config: rank 1 has lr=0.001, rank 0 has lr=0.003" in \
        proc.stderr


@pytest.mark.parametrize("how", [pytest.param("kill", marks=pytest.mark.slow), "raise",
                                 pytest.param("stall", marks=pytest.mark.slow)])
def test_a_rank_that_dies_ends_the_job_quickly(tmp_path, how):
    start = time.monotonic()
    proc = _mpirun(2, str(tmp_path / "run"), "--fail", how, timeout_env=2.0)
    assert proc.returncode != 0
    assert time.monotonic() - start < 20
    if how == "raise":
        assert "rank 1 fails on purpose" in proc.stderr
    if how == "stall":
        assert "rank 0: rank(s) [1] did not reach" in proc.stderr, proc.stderr


def test_one_process_context_changes_nothing():
    ctx = distributed.setup(use_mpi=False)
    data = [1, 2, 3]
    assert (ctx.rank, ctx.world, ctx.is_main) == (0, 1, True) and ctx.shard(data) is data
    assert ctx.train_kwargs()["grad_hook"] is None


def test_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)      # import mpi4py raises ImportError
    with pytest.raises(distributed.DistributedError, match=r"pip install -e '\.\[mpi\]'"):
        distributed.setup(use_mpi=True)


def test_shards_cover_the_batch_once():
    x = np.arange(10).reshape(5, 2)
    parts = [next(iter(distributed.ShardedBatches([(x, {"y": x})], r, 2))) for r in range(2)]
    assert [len(p[0]) for p in parts] == [2, 3]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
    assert np.array_equal(np.concatenate([p[1]["y"] for p in parts]), x)


if __name__ == "__main__":
    _main()
