"""Starting a data-parallel job on this machine: mpiexec with N ranks, and the threads each uses.

`distributed.py` is what runs inside each rank; this module is what starts them (`tinygpt
pretrain --ranks N` calls `launch`) and sets each rank's numba and OpenBLAS threads.

    tinygpt pretrain --ranks 2 --model gpt-mini --dropout 0 ...
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

MPI_EXTRA = "install the mpi extra: pip install -e '.[mpi]'"


class DistributedError(RuntimeError):
    """Ranks that disagree, time out, or cannot start."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads(n: int, force: bool = False) -> int:
    """Use `n` threads in numba's kernels and in OpenBLAS, unless NUMBA_NUM_THREADS or
    OPENBLAS_NUM_THREADS chose already (force: regardless). Returns numba's thread count."""
    import numba
    if force or "NUMBA_NUM_THREADS" not in os.environ:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    if force or "OPENBLAS_NUM_THREADS" not in os.environ:
        _set_blas_threads(n)
    return numba.get_num_threads()


def _set_blas_threads(n: int) -> bool:
    """openblas_set_num_threads in the OpenBLAS NumPy loaded (NumPy's wheels rename it)."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return False
    for lib in libs:
        handle = ctypes.CDLL(lib)
        for name in ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                     "openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            if hasattr(handle, name):
                getattr(handle, name)(ctypes.c_int(n))
                return True
    return False


def find_mpiexec() -> str:
    """The mpiexec beside this Python (the mpich wheel puts it there), else the first on PATH."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.is_file() else shutil.which("mpiexec")
    if found is None:
        raise DistributedError(f"no mpiexec found: {MPI_EXTRA}")
    return found


def mpiexec_command(ranks: int, command: list[str], threads: int | None = None
                    ) -> tuple[list[str], dict]:
    """(argv, environment) that run `command` on `ranks` processes of this machine, with
    `threads` (default cores / ranks) BLAS and numba threads each unless the environment says."""
    mpiexec = find_mpiexec()
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        local = ["--host", f"localhost:{ranks}"]
    elif "HYDRA" in version:                    # MPICH, which runs as root with no extra flag
        local = ["-hosts", "127.0.0.1"]
    else:
        local = []
    env = dict(os.environ)
    n = str(threads or max(1, cores() // ranks))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = n if threads else env.get(var, n)
    return [mpiexec, "-n", str(ranks), *local, *command], env


def launch(argv: list[str], ranks: int, threads: int | None = None) -> int:
    """Run `tinygpt ARGV` (e.g. ["pretrain", "--data", ...]) on `ranks` processes of this
    machine under mpiexec; returns its exit code. A `--ranks` flag in argv is dropped."""
    if ranks < 1:
        raise DistributedError(f"--ranks must be at least 1, got {ranks}")
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--ranks":
            del argv[i:i + 2]
            break
        if arg.startswith("--ranks="):
            del argv[i]
            break
    cmd, env = mpiexec_command(ranks, [sys.executable, "-m", "tinygpt", *argv], threads)
    return subprocess.call(cmd, env=env)
