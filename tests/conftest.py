"""Shared pytest options: `--update-goldens` rewrites golden outputs instead of comparing;
under CI, hypothesis runs a fixed (derandomized) set of examples."""

import os

import pytest
from hypothesis import settings


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true",
                     help="rewrite golden files and documented outputs from what einpar prints now")


@pytest.fixture
def update_goldens(request) -> bool:
    return request.config.getoption("--update-goldens")


@pytest.fixture
def golden(update_goldens):
    """`golden(path, printed)`: compare with a golden file, or write it under --update-goldens
    (a missing one is written, and the test fails until it is reviewed and committed)."""
    def check(path, printed: str) -> None:
        if update_goldens or not path.exists():
            path.write_text(printed)
            if not update_goldens:
                pytest.fail(f"wrote the missing golden file {path.name}; review and commit it")
        assert printed == path.read_text()
    return check


# CI explores the same examples on every run, so that a submission's result does not
# depend on luck; local runs keep exploring new ones (and remember failures).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# Tests that run JAX in this process use 8 CPU devices; JAX reads this when it starts.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
