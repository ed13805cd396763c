"""Data-parallel benchmark: tokens/s of one global batch at 1 rank x 1 thread and at 2 ranks x 1.

    python -m tinygpt.bench distributed [--steps 3] [--ranks 1,2] [--tiny]

Each world size runs as its own `mpiexec -n N` job (OPENBLAS_NUM_THREADS = NUMBA_NUM_THREADS = 1),
one after the other in the same invocation. Model: preset gpt-mini (6 layers, 384 wide, GPT-2
vocabulary, dropout 0) at context 256, global batch 8, so 2 ranks take 4 rows each; --tiny runs a
2-layer, 64-wide model instead, to check the benchmark itself in seconds. Every rank runs
`train()`'s own step with the distributed hooks; rank 0 reports the mean over `--steps` timed
steps after a warm-up: tokens/s of the global batch, and the seconds per step spent in the
gradient all-reduce. The speed-up is tokens/s at N ranks over tokens/s at 1 rank.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

T, BATCH = 256, 8


def _model_config(tiny: bool):
    from tinygpt.models.gpt import GPTConfig
    if tiny:
        return GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64,
                         dropout=0.0)
    return GPTConfig.preset("gpt-mini", block_size=T, dropout=0.0)


def worker(steps: int, tiny: bool) -> None:
    """One rank's part: train_step on a fixed global batch; rank 0 prints a JSON line."""
    from itertools import repeat

    import numpy as np

    from tinygpt.models.gpt import GPT
    from tinygpt.training import distributed
    from tinygpt.core import runtime
    from tinygpt.training.train import TrainConfig, make_optimizer, train_step
    ctx = distributed.setup()
    with ctx:
        runtime.keep_freed_memory()                    # as train() does
        cfg = _model_config(tiny)
        model = GPT(cfg, seed=0)
        ctx.broadcast_parameters(model)
        opt = make_optimizer(model, TrainConfig(context_length=cfg.block_size, batch_size=BATCH))
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH, cfg.block_size + 1))
        (shard,) = ctx.shard([(ids[:, :-1], ids[:, 1:])])          # this rank's rows
        batches, kw = repeat(shard), ctx.train_kwargs()

        def step() -> None:
            train_step(model, opt, batches, loss_fn=kw["loss_fn"], grad_hook=kw["grad_hook"],
                       count_tokens=kw["count_tokens"])
        step()                                         # warm-up: numba cache, allocations
        ctx.allreduce_seconds, ctx.grad_steps = 0.0, 0
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - start
        if ctx.is_main:
            print(json.dumps({"ranks": ctx.world, "threads": ctx.threads,
                              "tokens_per_s": BATCH * cfg.block_size * steps / seconds,
                              "step_s": seconds / steps,
                              "allreduce_s": ctx.allreduce_seconds / max(1, ctx.grad_steps),
                              "params": model.num_parameters()}), flush=True)


def _run(ranks: int, steps: int, tiny: bool) -> dict:
    import subprocess

    from tinygpt.training import mpirun
    command = [sys.executable, "-m", "tinygpt.bench.distributed", "--worker", "--steps",
               str(steps), *(["--tiny"] if tiny else [])]
    cmd, env = mpirun.mpiexec_command(ranks, command, threads=1)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks} ranks failed:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tinygpt bench distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed steps per world size (default 3)")
    p.add_argument("--ranks", default="1,2", help="world sizes to run (default 1,2)")
    p.add_argument("--tiny", action="store_true", help="a tiny model: checks the benchmark runs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.steps, args.tiny)
        return 0
    cfg = _model_config(args.tiny)
    rows = [_run(int(n), args.steps, args.tiny) for n in args.ranks.split(",")]
    P = rows[0]["params"]
    print(f"model: {'tiny' if args.tiny else 'gpt-mini'}, {P:,} parameters; global batch "
          f"{BATCH} x {cfg.block_size}; {args.steps} timed steps after a warm-up")
    print(f"{'ranks x threads':>15} {'tokens/s':>10} {'step s':>8} {'all-reduce s/step':>18} "
          f"{'bytes/rank/step':>16} {'speed-up':>9}")
    for r in rows:
        n = r["ranks"]
        sent = 2 * 4 * P * (n - 1) / n                 # ring all-reduce of P float32
        layout = f"{n} x {r['threads']}"
        print(f"{layout:>15} {r['tokens_per_s']:>10,.0f} {r['step_s']:>8.3f} "
              f"{r['allreduce_s']:>18.4f} {sent / 1e6:>13,.0f} MB "
              f"{r['tokens_per_s'] / rows[0]['tokens_per_s']:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
