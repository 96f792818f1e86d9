"""Shared pytest options: `--update-goldens` rewrites golden outputs instead of comparing."""

import pytest


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true",
                     help="rewrite golden files and documented outputs from what einpar prints now")


@pytest.fixture
def update_goldens(request) -> bool:
    return request.config.getoption("--update-goldens")
