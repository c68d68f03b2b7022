"""pytest configuration shared by all tests.

* hypothesis profiles: "ci" (the default: bounded, derandomized so that every CI run draws the same
  examples) and "long" (thousands of random examples per property), chosen with
  CNNBP_HYPOTHESIS_PROFILE=long.
* the `slow` marker: slow tests (huge tensors) are deselected unless a `-m` expression is given,
  e.g. `pytest -m slow tests/test_memory.py`.
"""
import os

from hypothesis import HealthCheck, settings

_HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=1000, deadline=None, derandomize=True, database=None,
                          print_blob=True, suppress_health_check=_HEALTH)
settings.register_profile("long", max_examples=5000, deadline=None, print_blob=True,
                          suppress_health_check=_HEALTH)
settings.load_profile(os.environ.get("CNNBP_HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running, memory-hungry test; run only with `-m slow`")


def pytest_collection_modifyitems(config, items):
    if config.option.markexpr:  # the user chose with -m: leave the selection to pytest
        return
    kept = [item for item in items if item.get_closest_marker("slow") is None]
    deselected = [item for item in items if item.get_closest_marker("slow") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
