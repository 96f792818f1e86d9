"""Golden files: the per-device program of every example, reviewed like code.

A change to partitioning or lowering shows up here as a diff of
tests/goldens/*.spmd; after checking it is intended, refresh them with
`pytest tests/test_goldens.py --update-goldens`.
"""


import pytest

from einpar.api import compile_spmd, load
from einpar.spmd import format_spmd

from helpers import EXAMPLES, GOLDENS, ROOT, golden_path


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_per_device_program_matches_its_golden_file(example, golden, monkeypatch):
    monkeypatch.chdir(ROOT)  # the printed program names its file relative to the repository
    golden(golden_path(example, ".spmd"), format_spmd(compile_spmd(load(example.relative_to(ROOT)))) + "\n")


def test_every_golden_file_has_its_example():
    expected = {golden_path(example, ".spmd").name for example in EXAMPLES}
    assert {path.name for path in GOLDENS.glob("*.spmd")} <= expected
