"""Shared test settings: hypothesis profiles, tolerances, and where ../shared lives."""
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# dev: quick local runs; ci: more examples, no deadline because the first numba call compiles.
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# analytic vs central difference, float64 (STYLE.md section 9)
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6
# numba kernel vs NumPy twin
TWIN64_RTOL, TWIN64_ATOL = 1e-10, 1e-12
TWIN32_RTOL, TWIN32_ATOL = 1e-5, 1e-6
# whole model, float32 run vs float64 run
MODEL32_RTOL, MODEL32_ATOL = 1e-3, 1e-4

SHARED = Path(os.environ.get("TINYGPT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture
def shared() -> Path:
    """Path to ../shared (data and fixtures used by path, never copied into the repo)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED}")
    return SHARED
