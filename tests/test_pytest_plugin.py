"""The pytest plugin: `pytest --ein PATHS` runs `.ein` files as tests; `ein_program`."""

from __future__ import annotations

import pytest

# pytester runs pytest in this process and afterwards drops the modules that run imported;
# NumPy cannot be loaded twice in a process, so what the runs import is imported here first.
import einpar.lower  # noqa: F401
import einpar.testing.equivalence  # noqa: F401
import einpar.testing.strategies  # noqa: F401

pytest_plugins = ["pytester"]

# A Megatron MLP, whose second product ends with an all-reduce over tp.
GOOD = """\
mesh dp=2 tp=2
dim  B=4 S=8 D=16 F=32
input x[B@dp, S, D]
param w1[D, F@tp]
param w2[F@tp, D]
h[B, S, F] = gelu(x[B, S, D] * w1[D, F])
z[B@dp, S, D] = h[B, S, F] * w2[F, D]
output z
"""

# A conftest that makes einpar's lowering wrong while each test runs (every all-reduce
# over no axes): the program is fine, what runs is not, and the test must say so.
WRONG_LOWERING = """\
from dataclasses import replace

import pytest

import einpar.lower as lower
from einpar.reshard import AllReduce
from einpar.spmd import CollectiveStep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    original = lower.compile_program

    def wrong(program, objective=None):
        plan, spmd = original(program, objective)
        return plan, replace(spmd, steps=tuple(
            replace(s, step=AllReduce((), s.step.op)) if isinstance(s, CollectiveStep)
            and s.kind == "all_reduce" else s for s in spmd.steps))

    lower.compile_program = wrong
    try:
        yield
    finally:
        lower.compile_program = original
"""


def test_without_ein_no_program_is_collected(pytester):
    pytester.makefile(".ein", good=GOOD)
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED


def test_each_ein_file_is_a_passing_test(pytester):
    pytester.makefile(".ein", good=GOOD)
    pytester.mkdir("more")
    (pytester.path / "more" / "also.ein").write_text(GOOD.replace("F=32", "F=16"))
    result = pytester.runpytest("--ein", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*good.ein::good.ein PASSED*", "*also.ein::also.ein PASSED*"])


def test_relayouts_and_backends_from_the_command_line(pytester):
    pytester.makefile(".ein", good=GOOD)
    result = pytester.runpytest("--ein", "--ein-relayouts", "3", "--ein-backends", "numpy,reference",
                                "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_syntax_error_shows_the_diagnostic_not_a_traceback(pytester):
    pytester.makefile(".ein", broken=GOOD.replace("h[B, S, F] =", "h[B, S, F] = ="))
    result = pytester.runpytest("--ein", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["error?E100?: unexpected *", " --> broken.ein:6:14", "*^"])
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.no_fnmatch_line("*einpar/check.py*")


def test_a_checker_error_shows_the_diagnostic(pytester):
    pytester.makefile(".ein", unknown=GOOD.replace("w2[F, D]", "v[F, D]"))
    result = pytester.runpytest("--ein", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["error?E201?: *'v'*", " --> unknown.ein:7:*"])


def test_a_program_computed_wrongly_fails_with_the_report(pytester):
    pytester.makeconftest(WRONG_LOWERING)
    pytester.makefile(".ein", good=GOOD)
    result = pytester.runpytest("--ein", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*output 'z' differs from the reference on the numpy (simulated devices) backend",
        "*largest error * tolerance 0.0001",
        "*worst block: device * holds z[*",
        "*layouts: as written",
        "reproduce: save the program below as FILE.ein, then `einpar run FILE.ein --backend numpy --seed 0`",
        "mesh dp=2 tp=2",
    ])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_the_ein_program_fixture_loads_a_file_or_text_with_sizes(pytester):
    pytester.makefile(".ein", model=GOOD)
    pytester.makepyfile(test_model=f'''
from einpar.testing import assert_equivalent

def test_from_a_file(ein_program):
    program = ein_program("model.ein", B=8, tp=1)
    assert program.dim_sizes["B"] == 8 and program.mesh.size("tp") == 1
    assert_equivalent(program, backends=("numpy",))

def test_from_text(ein_program):
    assert ein_program({GOOD!r}).dim_sizes["F"] == 32
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
