import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Small, deterministic hypothesis runs: CI runs every test, so every draw counts.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
