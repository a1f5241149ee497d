"""pytest configuration: the device fixture (cuda params skip without a GPU), a fixture that
saves and restores the torch RNG state around every test, and the
hypothesis profile (small max_examples, no deadline, derandomised so runs are repeatable).

Select another hypothesis profile with HYPOTHESIS_PROFILE=thorough (more examples)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from helpers import DEVICES

_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("convrnn", max_examples=25, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile("thorough", max_examples=300, deadline=None, derandomize=False, database=None,
                          suppress_health_check=_HEALTH, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "convrnn"))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def rng_state():
    """Every test starts from seed 0 and leaves the global RNG state as it found it."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(0)
    yield
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


# Tests that take minutes on 2 cores (the native checks' builds and emulated kernels, the emulation
# extension's build, the examples' training runs) are collected first: under pytest-xdist each
# starts on a worker at once instead of leaving the run's tail to them.
_FIRST = ("test_native.py", "test_rnn_persistent.py", "test_examples.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return _FIRST.index(name) if name in _FIRST else len(_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
