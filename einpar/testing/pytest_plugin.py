"""The pytest plugin (entry point `pytest11`): `.ein` files as tests, and `ein_program`.

    pytest --ein examples/                           # each .ein file: check, compile, run
    pytest --ein examples/ --ein-backends numpy,jax  # and on JAX devices
    pytest --ein examples/ --ein-relayouts 5         # and under 5 drawn relayouts each

With `--ein`, every `.ein` file under the paths pytest collects is one test:
it must pass the checker, compile, and compute on each backend (default
numpy, the simulator) what the reference does (`assert_equivalent`), as
written and under `--ein-relayouts N` relayouts drawn by hypothesis (the
same ones every run). A failure shows the `assert_equivalent` report, or the
diagnostic as `einpar check` prints it. Without `--ein` the plugin collects
nothing and imports nothing of einpar.

The `ein_program` fixture is a factory: `ein_program("model.ein", tp=2)` or
`ein_program(text)` -> Program, sizes set as `--set` does; a relative path is
looked up from the current folder, then from the test file's.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser) -> None:
    group = parser.getgroup("einpar", "einpar programs as tests")
    group.addoption("--ein", action="store_true",
                    help="collect every .ein file under the given paths as a test: check, "
                         "compile, and compare each backend with the reference")
    group.addoption("--ein-backends", default="numpy", metavar="NAMES",
                    help="backends to compare with the reference, comma-separated, of numpy, jax "
                         "and reference (default: numpy)")
    group.addoption("--ein-relayouts", type=int, default=0, metavar="N",
                    help="also run each program under N relayouts drawn by hypothesis (default 0)")


def pytest_collect_file(file_path: Path, parent):
    if file_path.suffix == ".ein" and parent.config.getoption("ein"):
        return EinFile.from_parent(parent, path=file_path)
    return None


class EinFile(pytest.File):
    """A `.ein` file: one test item."""

    def collect(self):
        yield EinItem.from_parent(self, name=self.path.name)


class EinItem(pytest.Item):
    """Check, compile and run one program on the chosen backends, as written and relaid out."""

    def runtest(self) -> None:
        from ..api import compile_source, read_source, shown_path

        config = self.config
        backends = tuple(name.strip() for name in config.getoption("ein_backends").split(",")
                         if name.strip())
        self.source_text = read_source(self.path)
        try:  # named as pytest names it, from where it was started
            shown = self.path.relative_to(config.invocation_params.dir)
        except ValueError:
            shown = self.path
        self.shown = shown_path(shown)
        program = compile_source(self.source_text, self.shown)
        from .equivalence import assert_equivalent

        assert_equivalent(program, backends=backends)
        count = config.getoption("ein_relayouts")
        if count > 0:
            _relaid_out(program, backends, count)

    def repr_failure(self, excinfo, style=None):
        from ..errors import EinparError

        error = excinfo.value
        if isinstance(error, EinparError):
            from .relayout import render_error

            return render_error(error, getattr(self, "source_text", ""), getattr(self, "shown", ""))
        if isinstance(error, (AssertionError, ValueError)):
            return str(error)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"ein: {self.name}"


def _relaid_out(program, backends: tuple[str, ...], count: int) -> None:
    """`count` relayouts drawn (derandomized: the same each run), each checked; hypothesis
    shrinks a failing one towards fewer annotations before the report."""
    from hypothesis import HealthCheck, given, settings

    from .equivalence import assert_equivalent
    from .strategies import relayouts

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(relayouts(program))
    def each(relayout) -> None:
        assert_equivalent(program, layouts=relayout, backends=backends)

    each()


@pytest.fixture
def ein_program(request):
    """A factory: `ein_program("path/or/text", **sizes)` -> einpar Program."""
    from .relayout import as_program

    def make(program, **sizes):
        if isinstance(program, str) and "\n" not in program and not Path(program).exists():
            beside = Path(request.path).parent / program
            if beside.exists():
                program = beside
        return as_program(program, **sizes)

    return make
