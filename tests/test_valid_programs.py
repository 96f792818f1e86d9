"""Valid programs go through every stage without an internal error: repeat
blocks inside repeat blocks (with params of their own), expressions up to the
E101 nesting limits, and programs compiled from text through the API.

Every stage after parsing walks expressions and blocks recursively under
Python's default recursion limit; E101 keeps programs within what they can
follow, and everything within it must check, compile, explain, price and run.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

from einpar.api import (compile_source, compile_spmd, emit_jax, explain, random_inputs,
                        run_reference, run_simulated)
from einpar.cli import main
from einpar.errors import EinparError
from einpar.spmd import RepeatStep
from einpar.syntax import MAX_EXPRESSION_DEPTH, MAX_REPEAT_DEPTH

from helpers import assert_matches_reference

# The example of nested blocks in docs/language.md.
DOCS_NESTED = """\
dim B=4 D=2 L=3 M=2
input x[B,D]
repeat L {
 repeat M {
  param w[D]
  x[B,D] = x[B,D] * w[D]
 }
}
output x
"""

# A param only the inner block declares, which is the whole of what it computes.
INNER_PARAM_ONLY = """\
dim B=4 L=3 M=2
input x[B]
repeat L {
  repeat M {
    param w[B]
    x[B] = w[B]
  }
}
output x
"""

# Sharded, with a param in each block, collectives inside both, and the outer
# block's param read after the inner block.
SHARDED_NESTED = """\
mesh dp=2 tp=2
dim B=4 D=4 F=8 L=3 M=2
input x[B@dp,D]
repeat L {
  param u[D@tp]
  x[B,D] = x[B,D] * u[D]
  repeat M {
    param w[D,F@tp]
    param v[F@tp,D]
    h[B,F] = x[B,D] * w[D,F]
    x[B,D] = h[B,F] * v[F,D]
  }
  x[B,D] = x[B,D] + u[D]
}
output x
"""

NESTED = {"docs": DOCS_NESTED, "inner param only": INNER_PARAM_ONLY, "sharded": SHARDED_NESTED}


# ---------------------------------------------------------------- nested repeat blocks


def test_an_inner_params_slice_is_cut_from_the_outer_trips_slice():
    program = compile_source(SHARDED_NESTED, file="nested.ein")
    spmd = compile_spmd(program)
    outer = next(step for step in spmd.steps if isinstance(step, RepeatStep))
    inner = next(step for step in outer.body if isinstance(step, RepeatStep))
    assert outer.stacked == (("u", "u~trip"), ("w", "w~trip"), ("v", "v~trip"))
    assert inner.stacked == (("w~trip", "w~trip2"), ("v~trip", "v~trip2"))
    # [L, M, D, F@tp] as the program takes it, [M, D, F@tp] per outer trip, [D, F@tp] per inner trip.
    mesh = spmd.mesh
    assert spmd.values["w"].local_shape(mesh) == (3, 2, 4, 4)
    assert spmd.values["w~trip"].local_shape(mesh) == (2, 4, 4)
    assert spmd.values["w~trip2"].local_shape(mesh) == (4, 4)
    assert spmd.values["u~trip"].local_shape(mesh) == (2,)
    # Each block's carried value has its own name inside it.
    assert [c[1] for c in outer.carried] == ["x~in"] and [c[1] for c in inner.carried] == ["x#2~in"]


@pytest.mark.parametrize("name", sorted(NESTED))
def test_nested_blocks_on_simulated_devices_equal_the_reference(name):
    program = compile_source(NESTED[name], file="nested.ein")
    inputs = random_inputs(program, 3)
    outputs, _ = run_simulated(program, inputs)
    assert_matches_reference(program, outputs, inputs)


def test_the_inner_blocks_last_slice_is_what_the_program_returns():
    program = compile_source(INNER_PARAM_ONLY, file="nested.ein")
    w = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    inputs = {"x": np.zeros(4, np.float32), "w": w}
    np.testing.assert_array_equal(run_reference(program, inputs)["x"], w[2, 1])
    np.testing.assert_array_equal(run_simulated(program, inputs)[0]["x"], w[2, 1])


@pytest.mark.parametrize("name", sorted(NESTED))
@pytest.mark.parametrize("twin", [False, True], ids=["per-device", "twin"])
def test_nested_blocks_on_jax_equal_the_reference(name, twin):
    from einpar.api import run_jax

    program = compile_source(NESTED[name], file="nested.ein")
    inputs = random_inputs(program, 3)
    result = run_jax(program, inputs, twin=twin, warmup=0, repeat=1)
    assert_matches_reference(program, result.outputs, inputs)


@pytest.mark.parametrize("command", [
    ["check"], ["compile"], ["compile", "--emit", "ir"], ["compile", "--emit", "spmd"],
    ["compile", "--emit", "layouts"], ["compile", "--emit", "jax"], ["compile", "--json"],
    ["explain"], ["explain", "--values"], ["cost", "--cluster", "h100x8"],
    ["run", "--backend", "reference"], ["run", "--backend", "numpy"]])
@pytest.mark.parametrize("name", sorted(NESTED))
def test_every_command_takes_nested_blocks(name, command, tmp_path, capsys):
    path = tmp_path / "nested.ein"
    path.write_text(NESTED[name])
    code = main([command[0], str(path), *command[1:]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    if command[-1] == "jax":
        ast.parse(captured.out)


def test_explain_shows_the_inner_params_per_trip_slice():
    program = compile_source(SHARDED_NESTED, file="nested.ein")
    explanation = explain(program, SHARDED_NESTED)
    h = next(s for s in explanation.statements if s.name == "h")
    w = next(held for held in h.reads if held.tensor == "w")
    assert (w.name, w.text(), h.trips) == ("w~trip2", "f32[4,8@tp]", 6)


# ---------------------------------------------------------------- nesting limits (E101)

HEADER = "mesh dp=2\ndim B=4 L=1\ninput x[B@dp]\n"


def deep_calls(depth: int) -> str:
    return HEADER + "y[B] = " + "tanh(" * depth + "x[B]" + ")" * depth + "\noutput y\n"


def long_sum(terms: int) -> str:
    return HEADER + "y[B] = " + " + ".join(["x[B]"] * terms) + "\noutput y\n"


def deep_blocks(depth: int) -> str:
    return HEADER + "repeat L {\n" * depth + "x[B] = x[B] * 2\n" + "}\n" * depth + "output x\n"


AT_THE_LIMIT = {
    "nested calls": deep_calls(MAX_EXPRESSION_DEPTH),
    "long sum": long_sum(MAX_EXPRESSION_DEPTH + 1),
    "nested negations": HEADER + "y[B] = " + "-" * MAX_EXPRESSION_DEPTH + "x[B]\noutput y\n",
    "nested blocks": deep_blocks(MAX_REPEAT_DEPTH),
}


def test_the_limits_are_what_the_docs_say():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "language.md").read_text()
    assert (MAX_EXPRESSION_DEPTH, MAX_REPEAT_DEPTH) == (200, 32)
    assert "more than 200 operators and calls" in docs and "more than 32 `repeat` blocks" in docs


@pytest.mark.parametrize("command", [
    ["check"], ["compile"], ["compile", "--emit", "ast"], ["compile", "--emit", "ir"],
    ["compile", "--emit", "spmd"], ["compile", "--emit", "layouts"], ["compile", "--emit", "jax"],
    ["compile", "--json"], ["explain"], ["explain", "--values"], ["cost", "--cluster", "h100x8"],
    ["run", "--backend", "reference"], ["run", "--backend", "numpy"]])
@pytest.mark.parametrize("name", sorted(AT_THE_LIMIT))
def test_every_command_works_at_the_nesting_limits(name, command, tmp_path, capsys):
    assert sys.getrecursionlimit() <= 1000  # Python's default; no stage may need more
    path = tmp_path / "deep.ein"
    path.write_text(AT_THE_LIMIT[name])
    code = main([command[0], str(path), *command[1:]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    if command[-1] == "jax":
        compile(captured.out, "emitted.py", "exec")  # within Python's nesting limits
    assert sys.getrecursionlimit() <= 1000


@pytest.mark.parametrize("name", sorted(AT_THE_LIMIT))
def test_programs_at_the_nesting_limits_on_jax_equal_the_reference(name):
    from einpar.api import run_jax

    program = compile_source(AT_THE_LIMIT[name], file="deep.ein")
    inputs = random_inputs(program, 0)
    outputs, _ = run_simulated(program, inputs)
    assert_matches_reference(program, outputs, inputs)
    for twin in (False, True):
        result = run_jax(program, inputs, twin=twin, warmup=0, repeat=1)
        assert_matches_reference(program, result.outputs, inputs)


def test_a_deep_expression_is_written_to_python_in_pieces():
    source = emit_jax(compile_source(deep_calls(MAX_EXPRESSION_DEPTH), file="deep.ein"))
    compile(source, "emitted.py", "exec")
    assert max(line.count("(") for line in source.splitlines()) < 100


def one_error(text: str):
    with pytest.raises(EinparError) as raised:
        compile_source(text, file="deep.ein")
    assert len(raised.value.diagnostics) == 1
    return raised.value.diagnostics[0]


def test_E101_one_call_past_the_limit_points_at_that_call():
    found = one_error(deep_calls(MAX_EXPRESSION_DEPTH + 1))
    # Line 4 is `y[B] = tanh(tanh(...`: the 201st `tanh` starts 200 calls in.
    column = len("y[B] = ") + 5 * MAX_EXPRESSION_DEPTH + 1
    assert (found.code, found.span.line, found.span.col, found.span.end_col) == \
        ("E101", 4, column, column + 4)
    assert found.message == ("this expression nests 201 operators and calls inside one another; "
                             "at most 200 may nest")
    assert found.hint == "split it into several statements"


def test_E101_one_term_past_the_limit_points_at_the_first_operator():
    found = one_error(long_sum(MAX_EXPRESSION_DEPTH + 2))
    assert (found.code, found.span.line, found.span.col) == ("E101", 4, len("y[B] = x[B] ") + 1)
    assert found.message.startswith("this expression nests 201 operators")


def test_E101_a_block_past_the_limit_points_at_its_dim():
    found = one_error(deep_blocks(MAX_REPEAT_DEPTH + 1))
    assert (found.code, found.span.line, found.span.col) == ("E101", 4 + MAX_REPEAT_DEPTH, 8)
    assert found.message == "this repeat block is nested 33 blocks deep; at most 32 may nest"


def test_E101_in_two_statements_is_reported_twice():
    text = deep_calls(MAX_EXPRESSION_DEPTH + 1).replace(
        "output y\n", "z[B] = " + "-" * 300 + "x[B]\noutput y\n")
    with pytest.raises(EinparError) as raised:
        compile_source(text, file="deep.ein")
    assert [(d.code, d.span.line) for d in raised.value.diagnostics] == [("E101", 4), ("E101", 5)]
    assert "nests 300 operators" in raised.value.diagnostics[1].message


def test_parentheses_alone_do_not_nest():
    text = HEADER + "y[B] = " + "(" * 1000 + "x[B]" + ")" * 1000 + "\noutput y\n"
    program = compile_source(text, file="deep.ein")
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(run_reference(program, {"x": x})["y"], x)


def test_E101_on_the_command_line_is_exit_1(tmp_path, capsys):
    path = tmp_path / "deep.ein"
    path.write_text(deep_calls(500))
    assert main(["run", str(path), "--backend", "numpy"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error[E101]: this expression nests 500 operators") and "Traceback" not in err


# ---------------------------------------------------------------- the API on programs from text


def test_explain_takes_a_program_compiled_from_text():
    from einpar.api import explain as explain_program

    program = compile_source(SHARDED_NESTED)  # file "<string>": there is no file to read
    explanation = explain_program(program)
    h = next(s for s in explanation.statements if s.name == "h")
    assert (h.line, h.source) == (10, "h[B,F] = x[B,D] * w[D,F]")
    assert explanation.file == "<string>"
