"""Golden files: the per-device program of every example, reviewed like code.

A change to partitioning or lowering shows up here as a diff of
tests/goldens/*.spmd; after checking it is intended, refresh them with
`pytest tests/test_goldens.py --update-goldens`.
"""

from pathlib import Path

import pytest

from einpar.api import compile_spmd, load
from einpar.spmd import format_spmd

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("**/*.ein"))
GOLDENS = Path(__file__).resolve().parent / "goldens"


def golden_path(example: Path) -> Path:
    relative = example.relative_to(ROOT / "examples").with_suffix(".spmd")
    return GOLDENS / str(relative).replace("/", "__")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_per_device_program_matches_its_golden_file(example, golden, monkeypatch):
    monkeypatch.chdir(ROOT)  # the printed program names its file relative to the repository
    golden(golden_path(example), format_spmd(compile_spmd(load(example.relative_to(ROOT)))) + "\n")


def test_every_golden_file_has_its_example():
    expected = {golden_path(example).name for example in EXAMPLES}
    assert {path.name for path in GOLDENS.glob("*.spmd")} <= expected
