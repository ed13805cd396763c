"""The process-wide settings of tinygpt/core/runtime.py, each checked in a fresh interpreter."""
import os
import subprocess
import sys

import pytest

# Allocate and free a 64 MB array six times; print the page faults of the last five.
_FAULTS = """
import resource, sys
import numpy as np
from tinygpt import runtime
print(runtime.keep_freed_memory())
a = np.ones(16 << 20, np.float32); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    a = np.ones(16 << 20, np.float32); del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _python(code: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT", "TINYGPT_KEEP_MEMORY",
                            "NUMBA_THREADING_LAYER")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**environ, **env}, check=True)
    return run.stdout.split()


def test_importing_tinygpt_shortens_the_blas_spin_before_numpy_loads():
    code = "import tinygpt, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    assert _python(code) == ["20"]


def test_a_blas_spin_the_user_chose_is_kept():
    code = "import tinygpt, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    assert _python(code, OPENBLAS_THREAD_TIMEOUT="28") == ["28"]


def test_numba_loops_run_on_openmp_with_a_short_spin():
    code = ("import tinygpt, os, numba, numpy as np; from tinygpt import kernels; "
            "kernels.softmax_forward_numba.parallel(np.ones((2, 3), np.float32)); "
            "print(os.environ['GOMP_SPINCOUNT'], numba.threading_layer())")
    spin, layer = _python(code)
    assert spin == "10000"
    assert layer in ("omp", "workqueue")    # workqueue only where numba finds no OpenMP
    assert _python(code, GOMP_SPINCOUNT="300000", NUMBA_THREADING_LAYER="workqueue") == \
        ["300000", "workqueue"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_freed_memory_stops_the_page_faults_of_a_reused_allocation():
    kept, faults = _python(_FAULTS)
    assert kept == "True"
    assert int(faults) < 50                 # the freed 64 MB is reused: no new pages

    kept, faults = _python(_FAULTS, TINYGPT_KEEP_MEMORY="0")
    assert kept == "False"
    assert int(faults) > 200                # each 64 MB is a fresh mmap, faulted in again
