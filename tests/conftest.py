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


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory):
    """Generated data sets (MNIST-1D) are cached in a folder of the test session, not the user's cache."""
    previous = os.environ.get("MANUAL_BACKPROP_CACHE")
    os.environ["MANUAL_BACKPROP_CACHE"] = str(tmp_path_factory.mktemp("dataset_cache"))
    yield
    if previous is None:
        os.environ.pop("MANUAL_BACKPROP_CACHE", None)
    else:
        os.environ["MANUAL_BACKPROP_CACHE"] = previous
