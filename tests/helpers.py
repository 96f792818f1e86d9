"""What several test files share: the examples, their golden files, and the check that a
backend's outputs equal the reference's."""

from pathlib import Path

from einpar.api import run_reference
from einpar.tolerance import compare, program_tolerance

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("**/*.ein"))
GOLDENS = Path(__file__).resolve().parent / "goldens"


def golden_path(example: Path, suffix: str) -> Path:
    """tests/goldens/<folder>__<name><suffix> of an example (suffix ".spmd", ".explain", ...)."""
    relative = example.relative_to(ROOT / "examples").with_suffix(suffix)
    return GOLDENS / str(relative).replace("/", "__")


def assert_matches_reference(program, outputs, inputs) -> None:
    """Every output of `program` within its dtype's tolerance of the reference's."""
    reference = run_reference(program, inputs)
    for output in program.outputs:
        found = compare(output.name, reference[output.name], outputs[output.name],
                        program_tolerance(program))
        assert found.ok, (output.name, found.error, found.tolerance)
