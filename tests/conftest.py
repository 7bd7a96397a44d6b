import os
import tempfile

# A fresh Inductor cache per test session: a warm cache would skip the joint-graph pass on
# cache hits, and the tests check what the pass does, not what an earlier run left on disk.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fxclip-test-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def model_costs(monkeypatch):
    """Strategy choices from the cost model alone (no compile-time timing): deterministic."""
    monkeypatch.setenv("FXCLIP_STRATEGY", "model")
