"""Data-parallel training over MPI: one run on N processes ("ranks"), each with a shard of a batch.

Owns what makes `train()` run on several processes; `train.py` knows only its `grad_hook` and
`is_main` hooks, and the loaders in `data.py` are wrapped, not changed. This is the only module that
imports mpi4py, and only when asked: under mpiexec (`under_mpi()`), or `setup(use_mpi=True)`.

With N ranks and a global batch of B rows, rank r keeps rows [r B // N, (r + 1) B // N) of it:

    every rank holds the same loader with the same seed and draws the whole global batch, so the
        union of the shards is the batch one process draws, and every rank's loader RNG (what a
        checkpoint saves) is the one-process RNG: a checkpoint resumes at any world size
    loss  = sum_r n_r loss_r / sum_r n_r        the global mean, on every rank (one all-reduce)
    loss_r's backward is scaled by N n_r / B (1 for equal shards), then the grad_hook sets
    grad  = (sum over ranks of grad_r) / N      in a few large buckets, in place
    = d loss / d params: what one process computes, up to the order of float32 additions.

Rank 0 alone logs, samples and writes files (`is_main`). Every collective waits at most `timeout`
seconds, so a rank that dies or stalls makes the others fail, naming it, instead of hanging; a
failure inside `with setup() as ctx:` ends the whole job through MPI_Abort.

    mpiexec -n 2 tinygpt pretrain --model gpt-mini --dropout 0 ...    (or: --ranks 2)
    python -m tinygpt.bench distributed                               # tokens/s at 1 and 2 ranks
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from tinygpt.autograd.tensor import Function, Tensor
from tinygpt.training.mpirun import MPI_EXTRA, DistributedError, cores, set_threads
from tinygpt.training.train import batch_tokens, default_loss

TIMEOUT_SECONDS = 300.0   # longest wait in one collective: past any step, evaluation, sample or
                          # checkpoint write of GPT-2 124M on 2 cores; TINYGPT_MPI_TIMEOUT overrides
BUCKET_FLOATS = 1 << 22   # 16 MB per float32 all-reduce: a handful of calls for gpt-mini, and only
                          # one bucket of extra memory instead of a second copy of every gradient
HASH_WHOLE_BYTES = 64 << 20   # data files up to this size are hashed whole; larger: head and tail
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")   # MPICH/Intel MPI, Open MPI, PMIx
_ARRIVE_TAG = 7001
ABORT_GRACE_S = 0.5         # seconds for the output forwarding to drain before MPI_Abort


def under_mpi() -> bool:
    """True in a process started by mpiexec (or srun), as its launcher's variables say."""
    return any(v in os.environ for v in _RANK_VARS)


def setup(use_mpi: bool | None = None, threads: int | None = None,
          timeout: float | None = None) -> Context:
    """This process's `Context`: rank, world size and the hooks `train()` takes.

    use_mpi None: MPI only under mpiexec; otherwise a one-process Context whose methods change
    nothing. threads: BLAS and numba threads per rank; None: cores / ranks on this node, unless
    OPENBLAS_NUM_THREADS / NUMBA_NUM_THREADS are set (as `launch` sets them).
    """
    if use_mpi is None:
        use_mpi = under_mpi()
    if not use_mpi:
        return Context()
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistributedError(f"mpi4py is not installed: {MPI_EXTRA}") from None
    if timeout is None:
        timeout = float(os.environ.get("TINYGPT_MPI_TIMEOUT", TIMEOUT_SECONDS))
    ctx = Context(MPI, MPI.COMM_WORLD, timeout)
    node = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)     # the ranks on this machine
    local_ranks = node.Get_size()
    node.Free()
    ctx.threads = set_threads(threads or max(1, cores() // local_ranks), force=bool(threads))
    return ctx


class Context:
    """One rank's view of the run; with world == 1 every method returns its input unchanged."""

    def __init__(self, MPI=None, comm=None, timeout: float = TIMEOUT_SECONDS):
        self.MPI, self.comm, self.timeout = MPI, comm, timeout
        self.rank = comm.Get_rank() if comm is not None else 0
        self.world = comm.Get_size() if comm is not None else 1
        self.is_main = self.rank == 0
        self.threads: int | None = None
        self.allreduce_seconds, self.grad_steps = 0.0, 0     # gradient all-reduces only
        self._collectives = 0
        self._synced_once = False
        self._names: dict[int, str] = {}                     # id(parameter) -> its name

    # --- the job as a whole ------------------------------------------------------------------

    def __enter__(self) -> Context:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        failed = kind is not None and not (kind is SystemExit and error.code in (0, None))
        if failed and self.world > 1:
            # let the caller report the error first; at exit, MPI_Abort ends every rank (the
            # others would wait forever in their next collective, and MPI_Finalize would too)
            atexit.register(self._abort)
        return False

    def _abort(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # NOTE: mpiexec forwards each rank's output through its own pipes; aborting at once can
        # end the job before the error just printed has reached the terminal (seen in tests)
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(1)

    def train_kwargs(self, loss_fn: Callable = default_loss, metrics: dict | None = None,
                     count_tokens: Callable = batch_tokens) -> dict:
        """`train()`'s keyword arguments for this rank: global losses, metrics and token counts,
        the gradient all-reduce, and is_main."""
        if self.world == 1:
            return {"loss_fn": loss_fn, "metrics": metrics, "count_tokens": count_tokens,
                    "grad_hook": None, "is_main": True}
        return {"loss_fn": self.global_loss(loss_fn), "count_tokens": self.global_sum(count_tokens),
                "metrics": {k: self.global_mean(m) for k, m in (metrics or {}).items()} or None,
                "grad_hook": self.allreduce_grads, "is_main": self.is_main}

    # --- data --------------------------------------------------------------------------------

    def shard(self, data: Iterable | None) -> Iterable | None:
        """This rank's rows of every batch of `data` (see `ShardedBatches`)."""
        if self.world == 1 or data is None:
            return data
        return ShardedBatches(data, self.rank, self.world)

    # --- losses, metrics, token counts -------------------------------------------------------

    def global_loss(self, loss_fn: Callable) -> Callable:
        """loss_fn over the global batch: the row-weighted mean of every rank's loss."""
        def loss(model, *batch):
            n_local = _rows(batch)
            if n_local == 0:                   # a short final batch left this rank nothing
                local = Tensor(np.float32(0.0), requires_grad=True)
            else:
                local = loss_fn(model, *batch)
            return _GlobalMean.apply(local, reduce=self._sum, n_local=n_local, world=self.world)
        return loss

    def global_mean(self, metric: Callable) -> Callable:
        """A per-batch metric averaged over every rank's rows, like the loss."""
        def mean(model, *batch):
            n = _rows(batch)
            value = float(metric(model, *batch)) if n else 0.0
            total, rows = self._sum(np.array([value * n, n], dtype=np.float64))
            return total / rows
        return mean

    def global_sum(self, count: Callable) -> Callable:
        """count(batch) summed over the ranks, e.g. the tokens of the global batch."""
        def total(batch):
            n = count(batch) if _rows(batch) else 0
            return int(self._sum(np.array([n], dtype=np.int64))[0])
        return total

    def _sum(self, values: np.ndarray) -> np.ndarray:
        out = np.empty_like(values)
        self._collective(lambda: self.comm.Iallreduce(values, out, op=self.MPI.SUM), "a loss sum")
        return out

    # --- parameters and gradients --------------------------------------------------------------

    def allreduce_grads(self, params: list[Tensor]) -> None:
        """The grad_hook: every gradient summed over the ranks, then divided by N, in place."""
        if not self._synced_once:              # also checks a resumed run loaded one checkpoint
            self.check_same_parameters(params, "at the first step")
            self._synced_once = True
        self.grad_steps += 1
        for p in params:
            if p.grad is None:                 # no rows on this rank, or a parameter unused
                p.grad = np.zeros_like(p.data)
        start = time.perf_counter()
        what = f"the gradient all-reduce of this run's step {self.grad_steps}"
        for bucket in _buckets(params):
            self._each_bucket([p.grad for p in bucket], what,
                              lambda buf: self.comm.Iallreduce(self.MPI.IN_PLACE, buf,
                                                               op=self.MPI.SUM),
                              after=lambda buf: np.divide(buf, self.world, out=buf))
        self.allreduce_seconds += time.perf_counter() - start

    def broadcast_parameters(self, model) -> None:
        """Every parameter (frozen ones too) copied from rank 0, then checked by checksum."""
        if self.world == 1:
            return
        params = [p for _, p in model.named_parameters()]
        self._names = {id(p): name for name, p in model.named_parameters()}
        for bucket in _buckets(params):
            self._each_bucket([p.data for p in bucket], "the parameter broadcast",
                              lambda buf: self.comm.Ibcast(buf, root=0))
        self.check_same_parameters(params, "after the broadcast")

    def check_same_parameters(self, params: list[Tensor], when: str) -> None:
        """Raise naming the first parameter whose CRC-32 differs between ranks."""
        if self.world == 1:
            return
        crcs = np.array([zlib.crc32(np.ascontiguousarray(p.data)) for p in params], np.int64)
        every = np.empty((self.world, len(crcs)), np.int64)
        self._collective(lambda: self.comm.Iallgather(crcs, every), "the parameter checksum")
        bad = np.nonzero((every != every[0]).any(axis=0))[0]
        if len(bad):
            which = self._names.get(id(params[bad[0]]), f"parameter {bad[0]}")
            ranks = np.nonzero(every[:, bad[0]] != every[0, bad[0]])[0].tolist()
            raise DistributedError(f"rank {self.rank}: parameters differ between ranks {when}: "
                                   f"{which} (and {len(bad) - 1} more) on rank(s) {ranks} "
                                   "is not rank 0's")

    def _each_bucket(self, arrays: list[np.ndarray], what: str, start: Callable,
                     after: Callable | None = None) -> None:
        """Run one collective on `arrays` as one flat buffer: the array itself if it is alone
        and contiguous, else a packed copy, unpacked after."""
        if len(arrays) == 1 and arrays[0].flags.c_contiguous:
            buf = arrays[0].reshape(-1)                         # a view: in place
            self._collective(lambda: start(buf), what)
            if after is not None:
                after(buf)
            return
        buf = np.concatenate([a.reshape(-1) for a in arrays])   # (sum of sizes,)
        self._collective(lambda: start(buf), what)
        if after is not None:
            after(buf)
        offset = 0
        for a in arrays:
            a[...] = buf[offset:offset + a.size].reshape(a.shape)
            offset += a.size

    # --- agreement at the start --------------------------------------------------------------

    def check_agree(self, **things: Any) -> None:
        """Raise, in one line, if any rank's JSON-ready value differs from rank 0's, e.g.
        check_agree(train_config=asdict(cfg), data=fingerprint(path))."""
        if self.world == 1:
            return
        mine = json.dumps(things, sort_keys=True, default=str).encode()
        every = [json.loads(b) for b in self._allgather_bytes(mine)]
        for rank, theirs in enumerate(every[1:], 1):
            for name, value in every[0].items():
                diff = _first_difference(value, theirs.get(name))
                if diff is not None:
                    key, ours, other = diff
                    label = f"{key}=" if key else ""
                    raise DistributedError(
                        f"ranks disagree on the {name.replace('_', ' ')}: rank {rank} has "
                        f"{label}{other!r}, rank 0 has {label}{ours!r}")

    def _allgather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, through buffers (no pickle)."""
        sizes = np.empty(self.world, np.int64)
        self._collective(lambda: self.comm.Iallgather(np.array([len(data)], np.int64), sizes),
                         "the config check")
        out = np.empty(int(sizes.sum()), np.uint8)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        send = np.frombuffer(data, np.uint8)
        self._collective(lambda: self.comm.Iallgatherv(
            send, [out, sizes.tolist(), offsets.tolist(), self.MPI.BYTE]), "the config check")
        return [out[o:o + n].tobytes() for o, n in zip(offsets, sizes)]

    # --- every collective goes through here ---------------------------------------------------

    def _collective(self, start: Callable, what: str) -> None:
        """Start a non-blocking collective and wait for it at most `timeout` seconds.

        Rank 0 first waits for every other rank to report that it has reached this collective
        (the n-th of the run), so if one died or stalls, rank 0 names it; the others give rank 0 a
        few seconds more to say so before they fail themselves.
        """
        self._collectives += 1
        seq = np.array([self._collectives], np.int64)
        if self.rank == 0:
            self._await_arrivals(seq[0], what)
            limit = self.timeout
        else:
            arrived = self.comm.Isend(seq, dest=0, tag=_ARRIVE_TAG)
            limit = self.timeout + 5.0
        request = start()
        if not _poll([request], limit):
            raise DistributedError(f"rank {self.rank}: {what} did not finish within {limit:.0f} s:"
                                   " a rank died or stalls (rank 0 names it)")
        if self.rank != 0:
            arrived.Wait()

    def _await_arrivals(self, seq: int, what: str) -> None:
        seqs = np.zeros((self.world, 1), np.int64)
        requests = [self.comm.Irecv(seqs[r], source=r, tag=_ARRIVE_TAG)
                    for r in range(1, self.world)]
        if not _poll(requests, self.timeout):
            missing = [r for r, q in enumerate(requests, 1) if not q.Test()]
            for q in requests:
                q.Cancel()
            raise DistributedError(f"rank 0: rank(s) {missing} did not reach {what} within "
                                   f"{self.timeout:.0f} s: died or stalled")
        behind = [r for r in range(1, self.world) if seqs[r, 0] != seq]
        if behind:
            raise DistributedError(f"rank 0: rank {behind[0]} is at collective {seqs[behind[0], 0]}"
                                   f" of the run, rank 0 at {seq} ({what}): the ranks ran "
                                   "different code")


class _GlobalMean(Function):
    """y = sum_r n_r loss_r / n over the ranks (n = sum_r n_r), the same value on every rank.

    Backward keeps this rank's own graph: dloss_r = dy N n_r / n, so that after the gradient
    all-reduce (sum / N) each rank holds sum_r (n_r / n) dloss_r/dw = dy/dw.
    """

    @staticmethod
    def forward(ctx, loss: np.ndarray, *, reduce: Callable, n_local: int,
                world: int) -> np.ndarray:
        total, n = reduce(np.array([float(loss) * n_local, n_local], dtype=np.float64))
        ctx.scale, ctx.dtype = world * n_local / n, loss.dtype
        return np.asarray(total / n, dtype=loss.dtype)

    @staticmethod
    def backward(ctx, dy: np.ndarray) -> tuple[np.ndarray]:
        return (np.asarray(dy * ctx.scale, dtype=ctx.dtype),)


class ShardedBatches:
    """Rank `rank`'s rows [rank B // world, (rank + 1) B // world) of each batch of `data`.

    Every rank iterates the same `data` (same seed), so all of them consume its RNG alike; `rng`
    and `len` are the wrapped loader's. Arrays in a tuple, list or dict are cut along their first
    axis; anything else is passed whole. A loss averaged over a data-dependent count (masked
    tokens) is weighted by rows, not by that count, so it only approximates the one-process loss.
    """

    def __init__(self, data: Iterable, rank: int, world: int):
        self.data, self.rank, self.world = data, rank, world

    @property
    def rng(self) -> np.random.Generator:
        return self.data.rng             # AttributeError, as on the loader, if it has none

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator:
        for batch in self.data:
            n = _rows(batch)
            yield _cut(batch, self.rank * n // self.world, (self.rank + 1) * n // self.world)


def _cut(batch: Any, lo: int, hi: int) -> Any:
    if isinstance(batch, np.ndarray) and batch.ndim > 0:
        return batch[lo:hi]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cut(b, lo, hi) for b in batch)
    if isinstance(batch, dict):
        return {k: _cut(v, lo, hi) for k, v in batch.items()}
    return batch


def _rows(batch: Any) -> int:
    """The length of the first array in a batch (its rows B)."""
    if isinstance(batch, np.ndarray) and batch.ndim > 0:
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    if isinstance(batch, (tuple, list, dict)):
        for item in items:
            try:
                return _rows(item)
            except TypeError:
                continue
    raise TypeError(f"cannot split a {type(batch).__name__} batch between ranks: it holds no "
                    "array with a batch axis")


def _buckets(params: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive parameters of one dtype, about BUCKET_FLOATS elements per group."""
    buckets: list[list[Tensor]] = []
    size = 0
    for p in params:
        same_dtype = bool(buckets) and p.data.dtype == buckets[-1][0].data.dtype
        if same_dtype and size + p.data.size <= BUCKET_FLOATS:
            buckets[-1].append(p)
            size += p.data.size
        else:
            buckets.append([p])
            size = p.data.size
    return buckets


def _poll(requests: list, limit: float) -> bool:
    """Drive MPI's progress until every request is done (True) or `limit` seconds pass."""
    deadline = time.monotonic() + limit
    done = [False] * len(requests)
    while not all(done):
        for i, request in enumerate(requests):
            done[i] = done[i] or request.Test()
        if time.monotonic() > deadline:
            return False
    return True


def _first_difference(ours: Any, theirs: Any, key: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for k in sorted(set(ours) | set(theirs)):
            diff = _first_difference(ours.get(k), theirs.get(k), f"{key}.{k}" if key else k)
            if diff is not None:
                return diff
        return None
    return None if ours == theirs else (key, ours, theirs)


def fingerprint(path: str | Path) -> dict:
    """What identifies a data file (or a `prepare`d folder) on every rank: name, sizes, SHA-256 of
    the bytes (of the first and last 16 MB past HASH_WHOLE_BYTES, to stay quick)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {"name": path.name, "files": {p.name: _file_digest(p) for p in files}}


def _file_digest(path: Path) -> str:
    size, h = path.stat().st_size, hashlib.sha256()
    with open(path, "rb") as f:
        if size <= HASH_WHOLE_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(16 << 20))
            f.seek(size - (16 << 20))
            h.update(f.read())
    return f"{size} bytes, sha256 {h.hexdigest()[:16]}"
