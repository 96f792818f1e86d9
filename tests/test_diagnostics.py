"""Every diagnostic einpar gives, and how it reads.

Each test writes a small wrong program and states the diagnostic it must get:
the code, the exact message, the 1-based line and column of the span, and the
hint. Programs are written one source line per argument of `program(...)`, so
line N of the file is the N-th argument.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from einpar.api import compile_source, read_source
from einpar.check import parse_overrides
from einpar.errors import (CODES, Diagnostic, EinparError, Label, SourceMap, Span, render_json,
                           render_text)
from einpar.inputs import check_inputs, load_inputs
from einpar.ir import walk_ops

FILE = "bad.ein"


def program(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def diagnostics_of(text: str, overrides: dict[str, int] | None = None) -> tuple[Diagnostic, ...]:
    with pytest.raises(EinparError) as caught:
        compile_source(text, file=FILE, overrides=overrides)
    return caught.value.diagnostics


def the_error(text: str, overrides: dict[str, int] | None = None) -> Diagnostic:
    found = diagnostics_of(text, overrides)
    assert len(found) == 1, [d.to_dict() for d in found]
    return found[0]


def expect(text: str, code: str, message: str, line: int, col: int, hint: str | None = None,
           length: int | None = None, overrides: dict[str, int] | None = None) -> Diagnostic:
    """The program has exactly this one error; `hint=None` means it has no hint."""
    found = the_error(text, overrides)
    assert (found.code, found.message) == (code, message)
    assert found.span is not None
    assert (found.span.file, found.span.line, found.span.col) == (FILE, line, col)
    assert found.hint == hint
    if length is not None:
        assert found.span.end_line == line
        assert found.span.end_col - found.span.col == length
    return found


def rendered(text: str, overrides: dict[str, int] | None = None) -> list[str]:
    sources = SourceMap({FILE: text})
    return [render_text(d, sources) for d in diagnostics_of(text, overrides)]


def labels(found: Diagnostic) -> list[tuple[int, int, str]]:
    return [(label.span.line, label.span.col, label.note) for label in found.labels]


# ---------------------------------------------------------------- E100 syntax errors


def test_E100_unexpected_character():
    expect(program("mesh tp=2",
                   "dim B=8",
                   "input x[B, $]"),
           "E100", "unexpected character '$'", 3, 12, length=1,
           hint="names are letters, digits and '_'; see docs/language.md for the operators")


def test_E100_unexpected_token_names_what_was_expected():
    expect(program("mesh dp=x"),
           "E100", "unexpected 'x'", 1, 9, length=1, hint="expected an integer")


def test_E100_unexpected_token_inside_brackets_does_not_suggest_a_newline():
    # A newline inside [...] does not end anything, so it cannot be what is expected.
    found = expect(program("dim B=8 D=4",
                           "input x[B,, D]"),
                   "E100", "unexpected ','", 2, 11, length=1, hint="expected a name")
    assert "end of line" not in found.hint


def test_E100_missing_operator_between_two_operands():
    found = the_error(program("dim B=8",
                              "input x[B]",
                              "y[B] = x[B] x[B]"))
    assert (found.code, found.message) == ("E100", "unexpected 'x'")
    assert (found.span.line, found.span.col) == (3, 13)
    # After a complete operand only an operator or the end of the statement can follow;
    # '=', ':', ',', ')' and '}' cannot.
    for impossible in ("'='", "':'", "','", "')'", "'}'"):
        assert impossible not in found.hint
    assert "'*' or '/'" in found.hint and "'+' or '-'" in found.hint


def test_E100_missing_operand_at_end_of_line():
    expect(program("mesh tp=2",
                   "dim B=8",
                   "input x[B]",
                   "y[B] = x[B] *",
                   "output y"),
           "E100", "unexpected end of line", 4, 14, length=1,
           hint="expected '(', '-', a name or a number")


def test_E100_missing_value_in_a_declaration():
    expect(program("mesh dp=2 tp"),
           "E100", "unexpected end of line", 1, 13, hint="expected '='")


def test_E100_unexpected_end_of_file_in_open_parenthesis():
    expect(program("mesh tp=2",
                   "dim B=8",
                   "input x[B]",
                   "y[B] = (x[B]"),
           "E100", "unexpected end of file", 4, 13, length=1, hint="expected ')'")


def test_E100_unexpected_end_of_file_without_final_newline():
    text = "dim B=8\ninput x[B]\ny[B] = x[B] * (x[B]"
    expect(text, "E100", "unexpected end of file", 3, 20, hint="expected ')'")


def test_E100_a_syntax_error_on_a_wrapped_line_points_at_that_line():
    expect(program("dim B=8 T=4",
                   "input x[B,T]",
                   "y[B] = sum[T](",
                   "    x[B,T] $ 2)"),
           "E100", "unexpected character '$'", 4, 12,
           hint="names are letters, digits and '_'; see docs/language.md for the operators")


def test_E100_unexpected_end_of_file_points_at_the_last_line_with_text():
    expect("dim B=8\ninput x[B]\ny[B] = (x[B]\n\n\n",
           "E100", "unexpected end of file", 3, 13, hint="expected ')'")


def test_E100_windows_line_ends_give_the_same_positions():
    text = program("dim B=8",
                   "input x[B]",
                   "y[B] = x[B] *",
                   "output y")
    unix = the_error(text)
    windows = the_error(text.replace("\n", "\r\n"))
    assert (windows.code, windows.message) == (unix.code, unix.message)
    assert (windows.span.line, windows.span.col) == (unix.span.line, unix.span.col) == (3, 14)


# Characters that str.splitlines takes for line ends but the language does not: the
# parser, the quoted source line and every other line count agree that only \n,
# \r\n and a lone \r end a line.
NOT_LINE_ENDS = ["\u2028", "\u2029", "\x85", "\f", "\v", "\x1c", "\x1d", "\x1e"]


def quoted_line(text: str, found: Diagnostic) -> str:
    """The source line a diagnostic's rendering quotes, as printed."""
    rendering = render_text(found, SourceMap({FILE: text})).splitlines()
    return next(line for line in rendering if line.startswith(f"{found.span.line} | "))[4:]


@pytest.mark.parametrize("char", NOT_LINE_ENDS)
def test_a_separator_in_a_comment_does_not_end_the_line(char):
    text = program("dim B=8", f"# one{char}two", "input x[B]", "y[B] = z[B]")
    found = expect(text, "E201", "unknown tensor 'z'", 4, 8,
                   hint="declare it with `input` or `param`, or define it with a statement")
    assert quoted_line(text, found) == "y[B] = z[B]"
    assert SourceMap({FILE: text}).line(FILE, 2) == f"# one{char}two"


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\x85", "\v", "\x1c"])
def test_a_separator_in_an_expression_is_an_unexpected_character_on_its_own_line(char):
    text = program("dim B=8", "input x[B]", f"y[B] = x[B] {char} z[B]", "output y")
    found = expect(text, "E100", f"unexpected character {char!r}", 3, 13,
                   hint="names are letters, digits and '_'; see docs/language.md for the operators")
    shown = quoted_line(text, found)
    assert shown == "y[B] = x[B]   z[B]"  # the separator is shown as a space, in its column
    rendering = render_text(found, SourceMap({FILE: text})).splitlines()
    assert rendering[rendering.index(f"3 | {shown}") + 1] == "  |" + " " * 13 + "^"


def test_a_form_feed_in_an_expression_is_a_space():
    text = program("dim B=8", "input x[B]", "y[B] = x[B] \f + z[B]", "output y")
    found = expect(text, "E201", "unknown tensor 'z'", 3, 17,
                   hint="declare it with `input` or `param`, or define it with a statement")
    assert quoted_line(text, found) == "y[B] = x[B]   + z[B]"


@pytest.mark.parametrize("line_end", ["\r", "\r\n"])
def test_a_lone_carriage_return_ends_a_line_as_reading_the_file_would(line_end, tmp_path):
    text = f"dim B=8{line_end}# note{line_end}input x[B]{line_end}y[B] = z[B]{line_end}"
    found = expect(text, "E201", "unknown tensor 'z'", 4, 8,
                   hint="declare it with `input` or `param`, or define it with a statement")
    assert quoted_line(text, found) == "y[B] = z[B]"
    path = tmp_path / "bad.ein"
    path.write_bytes(text.encode())
    assert diagnostics_of(read_source(path))[0].span == found.span


def test_a_lone_carriage_return_in_an_expression_ends_the_statement():
    expect("dim B=8\ninput x[B]\ny[B] = x[B] *\r x[B]\n",
           "E100", "unexpected end of line", 3, 14, hint="expected '(', '-', a name or a number")


def test_explain_quotes_each_statement_from_its_own_line():
    from einpar.api import explain

    text = program("mesh tp=2", "dim B=8 D=4", "input x[B, D@tp]",
                   "# a\u2028comment\fwith\x85separators", "y[B] = x[B, D]", "output y")
    statement = explain(compile_source(text, FILE), text).statements[0]
    assert (statement.line, statement.source) == (5, "y[B] = x[B, D]")


# ---------------------------------------------------------------- E2xx names


def test_E200_unknown_index_in_a_declaration():
    expect(program("mesh tp=2",
                   "dim B=8",
                   "input x[B, Q]"),
           "E200", "unknown index 'Q'", 3, 12, length=1, hint="declare it with `dim`")


def test_E200_unknown_index_in_an_expression_suggests_a_close_name():
    expect(program("dim B=8 D=4",
                   "input x[B, D]",
                   "y[B] = x[B, Dd]"),
           "E200", "unknown index 'Dd'", 3, 13, length=2, hint="did you mean 'D'?")


def test_E200_unknown_index_on_the_left():
    expect(program("dim B=8",
                   "input x[B]",
                   "y[B, Q] = x[B]"),
           "E200", "unknown index 'Q'", 3, 6, hint="declare it with `dim`")


def test_E201_unknown_tensor():
    expect(program("dim B=8",
                   "input x[B]",
                   "y[B] = z[B]",
                   "output y"),
           "E201", "unknown tensor 'z'", 3, 8, length=1,
           hint="declare it with `input` or `param`, or define it with a statement")


def test_E201_unknown_tensor_suggests_a_close_name():
    expect(program("dim B=8",
                   "input xs[B]",
                   "y[B] = x[B]"),
           "E201", "unknown tensor 'x'", 3, 8, hint="did you mean 'xs'?")


def test_E202_mesh_axis_not_in_the_mesh():
    expect(program("mesh dp=2",
                   "dim B=8",
                   "input x[B@tp]"),
           "E202", "unknown mesh axis 'tp'", 3, 11, length=2, hint="the mesh has axes dp")


def test_E202_mesh_axis_without_a_mesh():
    expect(program("dim B=8",
                   "input x[B@tp]"),
           "E202", "unknown mesh axis 'tp'", 2, 11, hint="declare the mesh first, e.g. `mesh tp=4`")


def test_E202_mesh_axis_in_a_statement_layout():
    expect(program("mesh dp=2 tp=2",
                   "dim B=8",
                   "input x[B]",
                   "y[B@tpp] = x[B]"),
           "E202", "unknown mesh axis 'tpp'", 4, 5, hint="did you mean 'tp'?")


def test_E203_unknown_dimension_as_an_alias_target():
    expect(program("dim B=8 T=Q"),
           "E203", "unknown dimension 'Q'", 1, 11, length=1, hint="declare it with `dim`")


def test_E203_aliases_in_a_cycle():
    found = diagnostics_of(program("dim B=8 T=U U=T"))
    assert [(d.code, d.message, d.span.line, d.span.col) for d in found] == [
        ("E203", "dimension 'T' is an alias in a cycle through 'U'", 1, 11),
        ("E203", "dimension 'U' is an alias in a cycle through 'T'", 1, 15),
    ]
    assert all(d.hint == "give one dimension of the cycle a number" for d in found)


def test_E203_bare_name_in_an_expression_is_a_size():
    expect(program("dim B=8",
                   "input x[B]",
                   "y[B] = x[B] / sqrt(K)"),
           "E203", "unknown dimension 'K'", 3, 20,
           hint="a bare name in an expression is a dimension's size")


def test_E203_a_tensor_written_without_indices():
    expect(program("dim B=8",
                   "input x[B]",
                   "y[B] = x[B] * x"),
           "E203", "unknown dimension 'x'", 3, 15, hint="'x' is a tensor: index it, e.g. x[...]")


def test_E203_unknown_repeat_count():
    expect(program("dim B=8",
                   "input x[B]",
                   "repeat L {",
                   "  x[B] = x[B] * 2",
                   "}"),
           "E203", "unknown dimension 'L'", 3, 8, hint="declare the trip count with `dim`")


def test_E204_unknown_function():
    expect(program("dim B=8",
                   "input x[B]",
                   "y[B] = gelo(x[B])"),
           "E204", "unknown function 'gelo'", 3, 8, length=4, hint="did you mean 'gelu'?")


def test_E205_unknown_default_dtype():
    expect(program("dtype f8"),
           "E205", "unknown dtype 'f8'", 1, 7, length=2,
           hint="dtypes are f64, f32, bf16, f16, f8e4m3, f8e5m2, i32, bool")


def test_E205_unknown_tensor_dtype():
    expect(program("dim B=8",
                   "input x[B] : int32"),
           "E205", "unknown dtype 'int32'", 2, 14, length=5,
           hint="dtypes are f64, f32, bf16, f16, f8e4m3, f8e5m2, i32, bool")


def test_E205_unknown_cast_on_the_left():
    expect(program("dim B=8",
                   "input x[B]",
                   "y[B] : float = x[B]"),
           "E205", "unknown dtype 'float'", 3, 8, hint="dtypes are f64, f32, bf16, f16, f8e4m3, f8e5m2, i32, bool")


# ---------------------------------------------------------------- E21x indices and arguments


def test_E210_tensor_indexed_with_the_wrong_number_of_indices():
    found = expect(program("dim B=8 S=4 D=2",
                           "input x[B, S, D]",
                           "y[B,S] = x[B,S]"),
                   "E210", "'x' has 3 dimensions [B, S, D] but is indexed with 2", 3, 11, length=5,
                   hint="write x[B, S, D] (indices bind by position)")
    assert labels(found) == [(2, 7, "declared here")]


def test_E210_output_layout_with_the_wrong_number_of_indices():
    expect(program("dim B=8 S=4",
                   "input x[B, S]",
                   "y[B,S] = x[B,S]",
                   "output y[B]"),
           "E210", "output 'y' has 2 dimensions [B, S] but 1 are given", 4, 1,
           hint="write output y[B, S]")


def test_E211_sizes_disagree():
    # x[B,T,D] reads x with its second dimension named T, but T and S differ.
    found = expect(program("dim B=2 S=8 T=4 D=3",
                           "input x[B, S, D]",
                           "y[B,T,D] = x[B,T,D]"),
                   "E211", "index T has size 4 but dimension 2 of 'x' (S) has size 8", 3, 16, length=1,
                   hint="use an index of size 8 here, such as S")
    assert labels(found) == [(2, 7, "declared here")]


def test_E211_an_alias_of_the_same_size_is_not_an_error():
    compile_source(program("dim B=2 S=8 T=S D=3",
                           "input x[B, S, D]",
                           "y[B,T,D] = x[B,T,D]",
                           "output y"), file=FILE)


def test_E211_an_alias_given_its_own_size_by_an_override():
    expect(program("dim B=2 S=8 T=S D=3",
                   "input x[B, S, D]",
                   "y[B,T,D] = x[B,T,D]"),
           "E211", "index T has size 4 but dimension 2 of 'x' (S) has size 8", 3, 16,
           hint="use an index of size 8 here, such as S", overrides={"T": 4})


def test_E211_output_layout_with_a_different_size():
    expect(program("dim B=8 S=4 T=2",
                   "input x[B, S]",
                   "y[B,S] = x[B,S]",
                   "output y[B, T]"),
           "E211", "index T has size 2 but dimension 2 of 'y' (S) has size 4", 4, 13)


def test_E212_index_repeated_in_a_reference():
    found = expect(program("dim B=8",
                           "input x[B, B]",
                           "y[B] = x[B,B]"),
                   "E212", "index 'B' appears twice in 'x'", 3, 12,
                   hint="declare an alias (`dim B2=B`) and use it for the second dimension")
    assert labels(found) == [(3, 10, "first here")]


def test_E212_index_repeated_on_the_left():
    found = expect(program("dim B=8",
                           "input x[B]",
                           "y[B,B] = x[B]"),
                   "E212", "index 'B' appears twice on the left of 'y'", 3, 5)
    assert labels(found) == [(3, 3, "first here")]


def test_E213_reduction_over_an_index_the_operand_lacks():
    expect(program("dim B=8 T=4",
                   "input x[B]",
                   "y[B] = sum[T](x[B])"),
           "E213", "sum over index T, which its operand does not have", 3, 12, length=1,
           hint="the operand's indices are: B")


def test_E213_library_function_over_an_index_the_operand_lacks():
    expect(program("dim B=8 T=4",
                   "input x[B]",
                   "y[B] = softmax[T](x[B])"),
           "E213", "softmax over index T, which its operand does not have", 3, 16,
           hint="the operand's indices are: B")


def test_E214_reduction_without_its_index():
    expect(program("dim B=8 T=4",
                   "input x[B,T]",
                   "y[B] = sum(x[B,T])"),
           "E214", "'sum' needs the index it works over in brackets", 3, 8, length=3,
           hint="write sum[I](...)")


def test_E214_elementwise_function_with_an_index():
    expect(program("dim B=8 T=4",
                   "input x[B,T]",
                   "y[B,T] = exp[T](x[B,T])"),
           "E214", "'exp' is elementwise and takes no indices", 3, 10, hint="write exp(...)")


def test_E214_wrong_number_of_arguments():
    expect(program("dim B=8 T=4",
                   "input x[B,T]",
                   "y[B,T] = max2(x[B,T])"),
           "E214", "'max2' takes 2 arguments, got 1", 3, 10, length=12)


def test_E214_named_argument_to_a_function_without_any():
    expect(program("dim B=8 T=4",
                   "input x[B,T]",
                   "y[B,T] = exp(x[B,T], k=2)"),
           "E214", "'exp' has no argument 'k'", 3, 22, length=3,
           hint="route takes k=...; other functions take no named arguments")


def test_E214_library_function_over_two_indices():
    expect(program("dim B=8 T=4",
                   "input x[B,T]",
                   "y[B,T] = softmax[B,T](x[B,T])"),
           "E214", "'softmax' works over one index, got 2", 3, 10, hint="write softmax[B](...)")


def test_E214_library_function_with_empty_brackets():
    found = the_error(program("dim B=8 T=4",
                              "input x[B,T]",
                              "y[B,T] = softmax[](x[B,T])"))
    assert (found.code, found.message) == ("E214", "'softmax' works over one index, got 0")
    assert (found.span.line, found.span.col) == (3, 10)


def test_E214_reduction_with_empty_brackets():
    # sum[](e) reduces over nothing: almost certainly a forgotten index.
    found = the_error(program("dim B=8 T=4",
                              "input x[B,T]",
                              "y[B,T] = sum[](x[B,T])",
                              "output y"))
    assert found.code == "E214"
    assert (found.span.line, found.span.col) == (3, 10)


GATE = ("dim G=2 S=8 E=4 C=4",
        "input g[G,S,E]")


def test_E215_route_with_one_index():
    expect(program(*GATE, "c[G,S,E,C] = route[E](g[G,S,E])"),
           "E215", "route takes two indices, the experts and their capacity slots (route[E,C]), got 1",
           3, 14)


def test_E215_route_over_experts_the_gate_lacks():
    expect(program(*GATE, "c[G,S,E,C] = route[C,E](g[G,S,E])"),
           "E215", "route over experts C, which the gate does not have", 3, 20,
           hint="the gate's indices are: G, S, E")


def test_E215_route_capacity_index_already_on_the_gate():
    expect(program(*GATE, "c[G,S,E,C] = route[E,S](g[G,S,E])"),
           "E215", "capacity index S is already an index of the gate", 3, 22,
           hint="the capacity index is new: it numbers each expert's slots")


def test_E215_route_needs_a_token_index():
    expect(program("dim E=4 C=4",
                   "input g[E]",
                   "c[E,C] = route[E,C](g[E])"),
           "E215", "route needs a token index besides the experts", 3, 10,
           hint="the gate is g[..., S, E]: tokens along S, one probability per expert")


def test_E215_route_k_out_of_range():
    expect(program(*GATE, "c[G,S,E,C] = route[E,C](g[G,S,E], k=5)"),
           "E215", "route's k=5 must be between 1 and the number of experts (E=4)", 3, 37, length=1)


def test_E215_route_k_not_a_whole_number():
    expect(program(*GATE, "c[G,S,E,C] = route[E,C](g[G,S,E], k=1.5)"),
           "E215", "route's k must be a whole number", 3, 37, length=3)


def test_E216_layout_in_an_expression():
    expect(program("mesh tp=2",
                   "dim B=8",
                   "input x[B]",
                   "y[B] = x[B@tp]"),
           "E216", "layout annotation in an expression: 'B@...'", 4, 10, length=4,
           hint="layouts go on declarations and on the left of statements")


def test_E217_take_of_float_ids():
    expect(program("dim B=8 V=100 D=4",
                   "input ids[B]",
                   "param e[V,D]",
                   "x[B,D] = take[V](e[V,D], ids[B])"),
           "E217", "take's ids must be integers (i32), not f32", 4, 26, length=6,
           hint="declare them as integers, e.g. `input ids[B,S] : i32`")


def test_E217_take_along_an_index_the_table_lacks():
    expect(program("dim B=8 V=100 D=4",
                   "input ids[B] : i32",
                   "param e[V,D]",
                   "x[B,D] = take[B](e[V,D], ids[B])"),
           "E217", "take along B, which the table does not have", 4, 15, length=1,
           hint="the table's indices are: V, D")


def test_E218_pos_of_an_expression():
    expect(program("dim S=8",
                   "x[S] = pos(S + 1)"),
           "E218", "pos takes an index name, not an expression", 2, 12, length=5,
           hint="write pos(S): the 0-based position along S (a dim)")


def test_E216_layout_on_a_reduction_index():
    expect(program("mesh tp=2",
                   "dim B=8 T=4",
                   "input x[B,T]",
                   "y[B] = sum[T@tp](x[B,T])"),
           "E216", "layout annotation in an expression: 'T@...'", 4, 12,
           hint="layouts go on declarations and on the left of statements")


# ---------------------------------------------------------------- E22x layouts and sizes


def test_E220_axis_used_twice_in_one_layout():
    found = expect(program("mesh tp=2",
                           "dim B=8 D=4",
                           "input x[B@tp, D@tp]"),
                   "E220", "mesh axis 'tp' is used twice in the layout of 'x'", 3, 17, length=2,
                   hint="an axis can split only one dimension of a tensor")
    assert labels(found) == [(3, 11, "first used here")]


def test_E220_axis_used_twice_on_the_left_of_a_statement():
    expect(program("mesh dp=2 tp=2",
                   "dim B=8 D=4",
                   "input x[B, D]",
                   "y[B@(dp,tp), D@tp] = x[B,D]"),
           "E220", "mesh axis 'tp' is used twice in the layout of 'y'", 4, 16,
           hint="an axis can split only one dimension of a tensor")


# A dimension one axis does not divide is padded (tests/test_uneven.py); E221 is the padding
# of several axes that does not nest.


def test_E221_padded_blocks_of_two_axes_that_do_not_nest():
    expect(program("mesh dp=2 tp=4",
                   "dim B=12 D=4",
                   "input x[B@(dp,tp), D]"),
           "E221", "dimension B of size 12 split by dp=2 leaves blocks of 6, which tp=4 does not divide",
           3, 9, length=9,
           hint="padding may only end a dimension: split it by one axis, or pick sizes the inner axes divide (use --set to change them)")


def test_E221_made_by_an_override():
    expect(program("mesh dp=2 tp=4",
                   "dim B=8 F=1024",
                   "param w[B, F@(dp,tp)]"),
           "E221", "dimension F of size 1024 split by dp=3 leaves blocks of 342, which tp=4 does not "
                   "divide", 3, 12,
           hint="padding may only end a dimension: split it by one axis, or pick sizes the inner axes divide (use --set to change them)",
           overrides={"dp": 3})


def test_E221_in_an_output_layout():
    expect(program("mesh dp=2 tp=4",
                   "dim B=6",
                   "input x[B]",
                   "y[B] = x[B] * 2",
                   "output y[B@(dp,tp)]"),
           "E221", "dimension B of size 6 split by dp=2 leaves blocks of 3, which tp=4 does not divide",
           5, 10, hint="padding may only end a dimension: split it by one axis, or pick sizes the inner axes divide (use --set to change them)")


def test_E222_mesh_axis_of_size_zero():
    expect(program("mesh tp=0"),
           "E222", "mesh axis 'tp' has size 0", 1, 6, length=4, hint="mesh axes need at least one device")


def test_E222_dimension_of_size_zero():
    expect(program("dim B=0"),
           "E222", "dimension 'B' has size 0", 1, 5, length=3, hint="dimensions need a positive size")


# ---------------------------------------------------------------- layout pins: braces on a left side

PIN = ("mesh dp=2 tp=2",
       "dim B=8",
       "input x[B]")


def test_E224_unknown_kind_of_partial_suggests_a_close_one():
    expect(program(*PIN, "y[B]{summ: tp} = x[B]"),
           "E224", "'summ' is not a kind of partial result", 4, 6, length=4,
           hint="did you mean 'sum'?")


def test_E224_unknown_kind_of_partial_lists_the_kinds():
    expect(program(*PIN, "y[B]{prod: tp} = x[B]"),
           "E224", "'prod' is not a kind of partial result", 4, 6, length=4,
           hint="a result can be partial as a sum, max or min")


def test_E224_mean_is_pinned_as_a_sum():
    expect(program(*PIN, "y[B] {mean: (tp,dp)} = x[B]"),
           "E224", "'mean' is not a kind of partial result", 4, 7, length=4,
           hint="a mean is a sum scaled by a constant: write {sum: (tp,dp)}")


def test_E202_unknown_mesh_axis_in_braces():
    expect(program(*PIN, "y[B]{sum: dp; max: tq} = x[B]"),
           "E202", "unknown mesh axis 'tq'", 4, 20, length=2, hint="the mesh has axes dp, tp")


def test_E220_axis_both_splitting_and_partial():
    found = expect(program(*PIN, "y[B@tp]{sum: tp} = x[B]"),
                   "E220", "mesh axis 'tp' is used twice in the layout of 'y'", 4, 14, length=2,
                   hint="an axis either splits a dimension or leaves the value partial, not both")
    assert labels(found) == [(4, 5, "first used here")]


def test_E220_axis_listed_twice_in_braces():
    found = expect(program(*PIN, "y[B]{sum: tp; max: (dp,tp)} = x[B]"),
                   "E220", "mesh axis 'tp' is used twice in the layout of 'y'", 4, 24, length=2,
                   hint="list each axis once in the braces")
    assert labels(found) == [(4, 11, "first used here")]


def test_E225_braces_on_an_input():
    expect(program(*PIN[:2], "input x[B]{}", "output x"),
           "E225", "braces on an input", 3, 11, length=2,
           hint="an input's layout is its `@` annotations; braces pin the result of a statement, "
                "as in y[B,D]{sum: tp} = ...")


def test_E225_braces_on_a_param():
    expect(program(*PIN[:2], "param w[B] {sum: tp} : bf16", "output w"),
           "E225", "braces on a param", 3, 12, length=9,
           hint="a param's layout is its `@` annotations; braces pin the result of a statement, "
                "as in y[B,D]{sum: tp} = ...")


def test_E225_braces_on_an_output():
    expect(program(*PIN, "y[B] = x[B] * 2", "output y[B]{sum: tp}"),
           "E225", "braces on an output", 5, 12, length=9,
           hint="an output is delivered whole or split as its `@` say, never partial; "
                "a partial is pinned on the statement that defines 'y'")


def test_E216_braces_in_an_expression():
    expect(program(*PIN, "y[B] = x[B] {sum: tp} * 2"),
           "E216", "layout braces in an expression: 'x[...]{...}'", 4, 13, length=9,
           hint="braces go on the left of a statement, as in y[B,D]{sum: tp} = ...")


def test_E100_kinds_in_braces_apart_by_a_comma():
    expect(program(*PIN, "y[B]{sum: tp, max: dp} = x[B]"),
           "E100", "unexpected ':'", 4, 18, length=1,
           hint="expected ',', ';' or '}'; kinds in braces are apart by ';', as in {sum: tp; max: sp}")


def test_E100_braces_after_the_dtype():
    expect(program(*PIN, "y[B] : f32 {sum: tp} = x[B]"),
           "E100", "unexpected '{'", 4, 12, length=1,
           hint="expected '='; braces come right after the indices, as in y[B]{sum: tp} : bf16 = ...")


@pytest.mark.parametrize("body, col, hint", [
    ("y[B]{sum: } = x[B]", 11, "expected '(' or a name"),
    ("y[B]{sum tp} = x[B]", 10, "expected ':'"),
    ("y[B]{sum: tp;} = x[B]", 14, "expected a name"),
    ("y[B]{{sum: tp}} = x[B]", 6, "expected '}' or a name"),
])
def test_E100_malformed_braces(body, col, hint):
    found = the_error(program(*PIN, body))
    assert (found.code, found.span.line, found.span.col, found.hint) == ("E100", 4, col, hint)


def test_errors_in_braces_do_not_cascade():
    found = diagnostics_of(program(*PIN,
                                   "y[B]{sum: tq} = x[B]",
                                   "z[B] = y[B] * 2",
                                   "input v[B]{}",
                                   "w[B]{prod: tp} = v[B]",
                                   "output z"))
    assert [(d.code, d.span.line, d.span.col) for d in found] == [
        ("E202", 4, 11), ("E225", 6, 11), ("E224", 7, 6)]


# ---------------------------------------------------------------- E23x definitions


def test_E230_duplicate_definition():
    found = expect(program("dim B=8",
                           "input x[B]",
                           "y[B] = x[B]",
                           "y[B] = 2 * x[B]",
                           "output y"),
                   "E230", "'y' is already defined", 4, 1, length=1,
                   hint="each tensor is defined once; give this one a new name")
    assert labels(found) == [(3, 1, "first defined here")]


def test_E230_declaration_reusing_a_name():
    expect(program("dim B=8",
                   "input x[B]",
                   "param x[B]"),
           "E230", "'x' is already defined", 3, 7,
           hint="each tensor is defined once; give this one a new name")


def test_E230_repeat_param_redefined_in_its_block():
    found = expect(program("dim B=8 L=2",
                           "input x[B]",
                           "repeat L {",
                           "  param w[B]",
                           "  w[B] = x[B]",
                           "}"),
                   "E230", "'w' is a param of this block and cannot be redefined", 5, 3)
    assert labels(found) == [(4, 9, "declared here")]


@pytest.mark.parametrize("nested", [False, True])
def test_E230_a_blocks_param_declared_again_after_the_block(nested):
    """A block's param is out of scope after the block, but the program still takes it by
    its name (stacked by the block's dim): a second input or param of that name is E230."""
    inner = ["  repeat M {", "    param w[D]", "    x[B,D] = x[B,D] * w[D]", "  }"] if nested \
        else ["  param w[D]", "  x[B,D] = x[B,D] * w[D]"]
    lines = ["dim B=4 D=2 L=3 M=2", "input x[B,D]", "repeat L {", *inner, "}", "input w[D]",
             "output x"]
    found = expect(program(*lines), "E230", "'w' is already declared as a param",
                   len(lines) - 1, 7,
                   hint="inputs and params are named once per program (arrays are passed by "
                        "name); give this one a new name")
    assert labels(found) == [(5 if nested else 4, 11 if nested else 9, "first declared here")]


def test_E231_use_before_definition():
    found = expect(program("dim B=8",
                           "input x[B]",
                           "y[B] = h[B] * 2",
                           "h[B] = x[B]",
                           "output y"),
                   "E231", "'h' is used before its definition", 3, 8, length=1,
                   hint="move the definition above this use")
    assert labels(found) == [(4, 1, "defined here")]


def test_E231_a_tensor_used_in_its_own_definition_inside_repeat():
    # The author wants a loop-carried value but did not define it before the block;
    # moving "the definition above this use" is impossible, so the hint must say so.
    found = the_error(program("dim B=8 L=2",
                              "repeat L {",
                              "  y[B] = y[B] + 1",
                              "}"))
    assert found.code == "E231"
    assert (found.span.line, found.span.col) == (3, 10)
    assert found.hint != "move the definition above this use"
    assert "repeat" in found.hint


def test_E232_output_never_defined():
    expect(program("dim B=8",
                   "input x[B]",
                   "h[B] = x[B]",
                   "output y"),
           "E232", "output 'y' is never defined", 4, 8, length=1,
           hint="define it with a statement, e.g. y[...] = ...")


def test_E232_output_never_defined_suggests_a_close_name():
    expect(program("dim B=8",
                   "input x[B]",
                   "hidden[B] = x[B]",
                   "output hiden"),
           "E232", "output 'hiden' is never defined", 4, 8, length=5, hint="did you mean 'hidden'?")


def test_E233_second_mesh():
    found = expect(program("mesh dp=2",
                           "mesh tp=2"),
                   "E233", "a second mesh declaration", 2, 1,
                   hint="a program has one mesh; list all its axes on one line")
    assert labels(found) == [(1, 1, "first mesh here")]


def test_E233_mesh_axis_declared_twice():
    found = expect(program("mesh dp=2 dp=4"), "E233", "mesh axis 'dp' is declared twice", 1, 11)
    assert labels(found) == [(1, 6, "first declared here")]


def test_E233_dimension_declared_twice():
    found = expect(program("dim B=8", "dim B=4"), "E233", "dimension 'B' is declared twice", 2, 5)
    assert labels(found) == [(1, 5, "first declared here")]


def test_E233_second_dtype():
    expect(program("dtype f32", "dtype bf16"), "E233", "a second dtype declaration", 2, 1)


def test_E233_output_declared_twice():
    expect(program("dim B=8",
                   "input x[B]",
                   "output x",
                   "output x"),
           "E233", "'x' is declared as an output twice", 4, 8)


def test_E234_value_used_after_its_repeat_block():
    found = expect(program("dim B=8 L=2",
                           "input x[B]",
                           "repeat L {",
                           "  h[B] = x[B] * 2",
                           "  x[B] = h[B]",
                           "}",
                           "y[B] = h[B]",
                           "output y"),
                   "E234", "'h' is defined inside a repeat block and cannot be used after it", 7, 8,
                   hint="only names defined before the block and redefined in it leave it "
                        "(loop-carried values)")
    assert labels(found) == [(4, 3, "defined here")]


def test_E234_output_defined_inside_a_repeat_block():
    expect(program("dim B=8 L=2",
                   "input x[B]",
                   "repeat L {",
                   "  h[B] = x[B] * 2",
                   "  x[B] = h[B]",
                   "}",
                   "output h"),
           "E234", "output 'h' is defined inside a repeat block", 7, 8,
           hint="only names defined before the block and redefined in it leave it")


def test_E235_loop_carried_value_changes_shape():
    found = expect(program("dim B=8 D=4 L=2",
                           "input x[B]",
                           "repeat L {",
                           "  x[D] = sum[B](x[B]) + D",
                           "}"),
                   "E235", "'x' is redefined as f32[D=4] but was f32[B=8]", 4, 3, length=4,
                   hint="a value redefined in a repeat block keeps its shape and dtype")
    assert labels(found) == [(2, 7, "first defined here")]


def test_E235_loop_carried_value_changes_dtype():
    expect(program("dim B=8 L=2",
                   "input x[B]",
                   "repeat L {",
                   "  x[B] : bf16 = x[B] * 2",
                   "}"),
           "E235", "'x' is redefined as bf16[B=8] but was f32[B=8]", 4, 3,
           hint="a value redefined in a repeat block keeps its shape and dtype")


def test_E236_input_inside_repeat():
    expect(program("dim B=8 L=2",
                   "repeat L {",
                   "  input x[B]",
                   "}"),
           "E236", "inputs are declared outside repeat blocks", 3, 3, length=10,
           hint="a `param` inside repeat gets one copy per trip; an input does not")


def test_E236_output_inside_repeat():
    expect(program("dim B=8 L=2",
                   "input x[B]",
                   "repeat L {",
                   "  x[B] = x[B] * 2",
                   "  output x",
                   "}"),
           "E236", "an output cannot be declared inside repeat", 5, 3,
           hint="declare outputs after the block")


def test_E236_dim_inside_repeat():
    expect(program("dim B=8 L=2",
                   "input x[B]",
                   "repeat L {",
                   "  dim D=4",
                   "  x[B] = x[B] * 2",
                   "}",
                   "output x"),
           "E236", "mesh, dim and dtype are declared outside repeat blocks", 4, 3)


def test_E240_a_partial_pin_no_strategy_makes(tmp_path, capsys):
    from einpar.api import compile_spmd
    from einpar.cli import main

    text = program("mesh tp=2", "dim B=4 D=8", "input x[B, D]",
                   "y[B, D]{sum: tp} = gelu(x[B, D])", "output y")
    with pytest.raises(EinparError) as caught:
        compile_spmd(compile_source(text, FILE))
    (found,) = caught.value.diagnostics
    assert (found.code, found.span.line, found.span.col) == ("E240", 4, 1)
    assert found.message == ("no strategy of 'y' makes it in the layout it is asked for "
                             "(y[B,D] {sum: tp})")
    path = tmp_path / "pin.ein"
    path.write_text(text)
    for command in ("compile", "run --backend numpy", "explain", "cost --cluster h100x8"):
        assert main([*command.split()[:1], str(path), *command.split()[1:]]) == 1
        assert "error[E240]" in capsys.readouterr().err


# ---------------------------------------------------------------- E3xx inputs, --set, files

PROGRAM = program("dim B=8 D=4",
                  "input x[B, D]",
                  "param w[D]",
                  "y[B] = x[B,D] * w[D]",
                  "output y")


def the_input_error(run) -> Diagnostic:
    with pytest.raises(EinparError) as caught:
        run()
    assert not caught.value.usage
    assert len(caught.value.diagnostics) == 1
    found = caught.value.diagnostics[0]
    assert found.code == "E300" and found.span is None
    return found


def test_E310_an_id_outside_the_table_in_an_inputs_file(tmp_path):
    path = tmp_path / "in.npz"
    text = program("dim B=3 V=5 D=2", "input ids[B] : i32", "param e[V,D]",
                   "x[B,D] = take[V](e[V,D], ids[B])", "output x")
    np.savez(path, ids=np.array([0, 4, -1], np.int32), e=np.zeros((5, 2), np.float32))
    with pytest.raises(EinparError) as caught:
        load_inputs(compile_source(text, FILE), str(path))
    (found,) = caught.value.diagnostics
    assert not caught.value.usage
    assert (found.code, found.message) == (
        "E310", f"'ids' in {path} holds -1 at [2], outside [0, 5): take[V] in 'x' reads it as ids")
    assert (found.span.line, found.span.col) == (4, 10)


def test_E300_inputs_file_missing_an_array(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.zeros((8, 4)))
    found = the_input_error(lambda: load_inputs(compile_source(PROGRAM, FILE), str(path)))
    assert found.message == f"{path} has no array 'w'"
    assert found.hint == "'w' is f32[4]"


def test_E300_inputs_file_with_a_wrong_shape(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.zeros((8, 5)), w=np.zeros(4))
    found = the_input_error(lambda: load_inputs(compile_source(PROGRAM, FILE), str(path)))
    assert found.message == f"'x' in {path} has shape [8, 5], but {FILE} declares [8, 4]"
    assert found.hint == "'x' is f32[8, 4]"


def test_E300_inputs_file_with_a_negative_second_moment(tmp_path):
    """AdamW's `w.v` is a mean of squares: a negative or NaN entry is refused, not run into
    a NaN update."""
    step = compile_source(program("dim B=4 D=4", "input x[B, D]", "param w[D]",
                                  "l[] = sum[B,D](x[B,D] * w[D])", "loss l",
                                  "optimizer adamw lr=1e-3"), FILE)
    path = tmp_path / "in.npz"
    for bad, shown in ((-2.0, "-2.0"), (np.nan, "nan")):
        np.savez(path, x=np.ones((4, 4)), w=np.ones(4), **{"w.v": np.array([0, 1, bad, 3])})
        found = the_input_error(lambda: load_inputs(step, str(path)))
        assert found.message == (f"'w.v' in {path} holds {shown} at [2]: AdamW's second moment "
                                 "is a mean of squares")
    np.savez(path, x=np.ones((4, 4)), w=np.ones(4), **{"w.v": np.array([0, 1, 2, 3])})
    assert load_inputs(step, str(path))["w.v"].tolist() == [0, 1, 2, 3]


def test_E300_inputs_file_with_an_extra_array(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.zeros((8, 4)), w=np.zeros(4), z=np.zeros(3))
    found = the_input_error(lambda: load_inputs(compile_source(PROGRAM, FILE), str(path)))
    assert found.message == f"{path} has an array 'z' that {FILE} does not declare"
    assert found.hint == "inputs and params are: x, w"


def test_E300_inputs_file_that_does_not_exist(tmp_path):
    path = tmp_path / "missing.npz"
    found = the_input_error(lambda: load_inputs(compile_source(PROGRAM, FILE), str(path)))
    assert found.message == f"inputs file {path} does not exist"


def test_E300_inputs_file_that_is_not_an_npz(tmp_path):
    path = tmp_path / "in.npz"
    path.write_text("x = [1, 2, 3]\n")
    found = the_input_error(lambda: load_inputs(compile_source(PROGRAM, FILE), str(path)))
    assert found.message.startswith(f"cannot read inputs file {path}")
    assert found.hint == "write it with numpy.savez(path, name=array, ...)"
    # The file is simply not an .npz; nothing should invite loading it with pickle.
    assert "pickle" not in found.message


def test_E300_array_of_a_type_that_does_not_convert():
    program_ = compile_source(PROGRAM, FILE)
    found = the_input_error(lambda: check_inputs(
        program_, {"x": np.zeros((8, 4)), "w": np.array(["a", "b", "c", "d"])}, "inputs"))
    assert found.message == "'w' in inputs has dtype <U1, which does not convert to f32"


def test_E300_every_problem_of_an_inputs_file_is_reported():
    with pytest.raises(EinparError) as caught:
        check_inputs(compile_source(PROGRAM, FILE), {"x": np.zeros((2, 2)), "v": np.zeros(1)}, "in.npz")
    assert [d.message for d in caught.value.diagnostics] == [
        f"'x' in in.npz has shape [2, 2], but {FILE} declares [8, 4]",
        "in.npz has no array 'w'",
        f"in.npz has an array 'v' that {FILE} does not declare",
    ]


@pytest.mark.parametrize("written", ["D=abc", "D", "tp=", "=4", "D=-3", "D=4.5"])
def test_E301_malformed_set(written):
    with pytest.raises(EinparError) as caught:
        parse_overrides([written])
    assert caught.value.usage
    (found,) = caught.value.diagnostics
    assert (found.code, found.message, found.span) == ("E301", f"cannot read --set '{written}'", None)
    assert found.hint == ("write NAME=VALUE with a dim or mesh axis and a positive integer, "
                          "e.g. --set D=4096 tp=8")


def test_E301_set_reads_several_names_from_one_argument():
    assert parse_overrides(["D=4096 tp=8", "B=2"]) == {"D": 4096, "tp": 8, "B": 2}


def test_E301_set_to_zero_is_not_a_positive_integer():
    with pytest.raises(EinparError) as caught:
        parse_overrides(["B=0"])
    assert caught.value.usage
    (found,) = caught.value.diagnostics
    assert (found.code, found.message) == ("E301", "cannot read --set 'B=0'")


def test_E301_set_naming_neither_a_dim_nor_a_mesh_axis():
    with pytest.raises(EinparError) as caught:
        compile_source(program("mesh tp=2", "dim B=8 D=4"), file=FILE, overrides={"Q": 3})
    assert caught.value.usage
    (found,) = caught.value.diagnostics
    assert (found.code, found.span) == ("E301", None)
    assert found.message == f"--set names Q, which is neither a dim nor a mesh axis of {FILE}"
    assert found.hint == "this program's dims and mesh axes are: B, D, tp"


def test_E302_program_file_that_does_not_exist(tmp_path):
    path = tmp_path / "missing.ein"
    with pytest.raises(EinparError) as caught:
        read_source(path)
    assert caught.value.usage
    (found,) = caught.value.diagnostics
    assert (found.code, found.message, found.span) == ("E302", f"{path} does not exist", None)


def test_E302_program_file_that_is_a_directory(tmp_path):
    with pytest.raises(EinparError) as caught:
        read_source(tmp_path)
    (found,) = caught.value.diagnostics
    assert (found.code, found.message) == ("E302", f"{tmp_path} is a directory, not a .ein file")


def test_E302_program_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.ein"
    path.write_bytes("dim B=8  # café\n".encode("latin-1"))
    with pytest.raises(EinparError) as caught:
        read_source(path)
    (found,) = caught.value.diagnostics
    assert found.code == "E302"
    assert found.message == f"{path} is not UTF-8 text (invalid continuation byte at byte 14)"


def test_E303_explain_of_a_statement_the_program_lacks_with_json(capsys):
    from einpar.cli import main

    code = main(["explain", "examples/mlp/megatron.ein", "--statement", "z", "--json"])
    captured = capsys.readouterr()
    assert (code, captured.err) == (2, "")
    assert json.loads(captured.out) == {"diagnostics": [{
        "code": "E303", "severity": "error",
        "message": "no statement 'z'; the program's statements are: 1 h, 2 y"}]}


def test_E303_a_command_line_argparse_refuses_with_json(capsys):
    from einpar.cli import main

    code = main(["check", "--json"])
    captured = capsys.readouterr()
    assert (code, captured.err) == (2, "")
    (found,) = json.loads(captured.out)["diagnostics"]
    assert (found["code"], found["message"]) == ("E303", "the following arguments are required: file")
    assert found["hint"].startswith("usage: einpar check [-h]")


def json_error_cases(tmp_path) -> list[list[str]]:
    """Commands that fail, one for every kind of error path, all with --json."""
    (tmp_path / "bad.ein").write_text(program("dim B=8", "input x[B]", "y[B] = z[B]", "output y"))
    (tmp_path / "ok.ein").write_text(program("mesh tp=2", "dim B=8", "input x[B@tp]",
                                             "y[B] = x[B] * 2", "output y"))
    (tmp_path / "syntax.ein").write_text("dim B=8\ny[B] = (\n")
    (tmp_path / "taken.npz").write_bytes(b"")
    (tmp_path / "in.npz").write_bytes(b"not an npz")
    (tmp_path / "c.toml").write_text("accelerator = 5\n")
    return [
        ["check", "missing.ein", "--json"],  # E302, exit 2
        ["check", "bad.ein", "--json"],  # E201
        ["check", "ok.ein", "--set", "B=x", "--json"],  # E301
        ["check", "ok.ein", "--bogus", "--json"],  # argparse
        ["check", "ok.ein", "--ignore", "X1", "--json"],
        ["compile", "syntax.ein", "--emit", "ast", "--json"],
        ["compile", "ok.ein", "--json", "--svg", "out.svg"],
        ["compile", "ok.ein", "--emit", "nothing", "--json"],
        ["explain", "ok.ein", "--statement", "9", "--json"],
        ["explain", "ok.ein", "--device", "7", "--json"],
        ["explain", "ok.ein", "--values", "--json"],
        ["explain", "ok.ein", "--cluster", "nowhere", "--json"],
        ["cost", "ok.ein", "--cluster", "c.toml", "--json"],
        ["cost", "ok.ein", "--cluster", "h100x8", "--trace", "taken.npz", "--json"],
        ["run", "ok.ein", "--inputs", "in.npz", "--json"],
        ["run", "ok.ein", "--save", "taken.npz", "--json"],
        ["run", "ok.ein", "--backend", "jax", "--coordinator", "h:1", "--json"],
        ["calibrate", "--json"],
    ]


def test_every_error_of_every_command_prints_json_under_json(capsys, tmp_path, monkeypatch):
    from einpar.cli import main

    monkeypatch.chdir(tmp_path)
    for argv in json_error_cases(tmp_path):
        code = main(argv)
        captured = capsys.readouterr()
        assert code in (1, 2) and captured.err == "", (argv, code, captured.err)
        document = json.loads(captured.out)
        assert list(document) == ["diagnostics"], argv
        assert all(d["code"] in CODES and d["severity"] == "error"
                   for d in document["diagnostics"]), argv


def test_E400_more_devices_asked_of_than_given():
    from einpar.backends.jax_backend import start_devices

    with pytest.raises(EinparError) as caught:
        start_devices(8, cpu_devices=4)
    (found,) = caught.value.diagnostics
    assert (found.code, found.message, found.hint) == (
        "E400", "the mesh needs 8 devices; --devices 4 gives 4", "pass --devices 8 or more")


def test_E400_a_mesh_larger_than_the_devices_jax_started_with(tmp_path):
    (tmp_path / "big.ein").write_text("mesh dp=4 tp=4\ndim B=16\ninput x[B@(dp,tp)]\noutput x\n")
    code = ("import jax\njax.devices()\nfrom einpar.cli import main\n"
            "raise SystemExit(main(['run', 'big.ein', '--backend', 'jax']))\n")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "error[E400]: the mesh needs 16 devices, but JAX sees 8 cpu devices",
        "  = hint: JAX had started before einpar could ask for 16 CPU devices; start it with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=16"]


def test_E401_a_process_id_outside_the_run(capsys):
    from einpar.cli import main

    argv = ["run", "examples/mlp/megatron.ein", "--backend", "jax", "--coordinator", "127.0.0.1:1",
            "--num-processes", "2", "--process-id", "2"]
    assert main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error[E401]: process id 2 is not one of the 2 processes (0 to 1)"]


def test_E401_an_unreachable_coordinator():
    from test_jax_processes import free_port, start

    port = free_port()  # nobody serves it: process 0 never starts
    began = time.monotonic()
    out, err = start(1, port, "--timeout", "4").communicate(timeout=120)
    assert err.splitlines() == [
        f"error[E401]: process 1 of 2 could not join the mesh through the coordinator at "
        f"127.0.0.1:{port} within 4 s",
        "  = hint: is every process running with the same --coordinator and --num-processes, and "
        "is process 0's port reachable?"]
    assert time.monotonic() - began < 60


def test_E402_a_peer_that_dies_during_the_run():
    from test_jax_processes import first_line, free_port, start

    port = free_port()
    # Many steps, so that both are still running when one is killed (past the hour a run
    # may take by default).
    survivor = start(0, port, "--repeat", "1000000", "--timeout", "40", "--max-time", "30d")
    doomed = start(1, port, "--repeat", "1000000", "--timeout", "40", "--max-time", "30d")
    # Each prints its first line once it has joined the mesh.
    assert "on process 0 of 2" in first_line(survivor) and "on process 1 of 2" in first_line(doomed)
    time.sleep(1)
    os.killpg(doomed.pid, signal.SIGKILL)  # the process and its JAX worker, at once
    killed_at = time.monotonic()
    out, err = survivor.communicate(timeout=120)
    doomed.communicate()
    assert survivor.returncode == 1
    assert err.splitlines() == [
        "error[E402]: process 0 of 2 stopped: another process of the run died",
        "  = hint: see that process's output for why; EINPAR_DEBUG=1 shows JAX's log"]
    assert time.monotonic() - killed_at < 60


def test_E101_an_expression_nested_beyond_what_the_checker_can_follow():
    depth = 30_000
    found = the_error(program("dim B=4", "input x[B]",
                              "y[B] = " + "tanh(" * depth + "x[B]" + ")" * depth))
    assert (found.code, found.span) == ("E101", None)
    assert found.message == "bad.ein: an expression is nested too deeply to follow"
    assert found.hint == "split it into several statements"


def test_long_expressions_are_not_too_deep():
    # A sum of 201 terms is a tree 200 operators deep, the limit; it must check and run
    # (tests/test_nesting.py runs every command at the limits).
    program_text = program("dim B=4", "input x[B]", "y[B] = " + " + ".join(["x[B]"] * 201),
                           "output y")
    compiled = compile_source(program_text, file=FILE)
    from einpar.api import run_reference
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(run_reference(compiled, {"x": x})["y"], 201 * x)


def test_E223_a_size_with_too_many_digits():
    expect(program("dim B=" + "9" * 40), "E223", "size 999999999999... has 40 digits", 1, 7,
           length=40, hint="sizes have at most 18 digits")


def test_E223_a_number_too_large_for_a_float():
    expect(program("dim B=4", "input x[B]", "y[B] = x[B] * 1e999"),
           "E223", "number 1e999 is too large for a float", 3, 15)


def test_E301_set_of_a_name_that_is_both_a_dim_and_a_mesh_axis():
    with pytest.raises(EinparError) as caught:
        compile_source(program("mesh B=2", "dim B=4", "input x[B@B]"), file=FILE, overrides={"B": 8})
    assert caught.value.usage
    (found,) = caught.value.diagnostics
    assert found.message == "--set B is ambiguous: bad.ein has a dim and a mesh axis of that name"


def test_E100_a_keyword_cannot_name_a_tensor():
    expect(program("dim B=4", "input output[B]"), "E100",
           "'output' is a keyword and cannot name a tensor", 2, 7,
           hint="keywords are mesh, dim, dtype, input, param, output, repeat")


def test_E215_default_top_k_needs_two_experts():
    found = the_error(program("dim S=3 E=1 C=2", "input g[S,E]", "c[S,E,C] = route[E,C](g[S,E])"))
    assert (found.code, found.message) == (
        "E215", "route's k=2 (the default, top-2) must be between 1 and the number of experts (E=1)")


def test_a_failed_outer_definition_redefined_in_repeat_is_not_reported_again():
    found = diagnostics_of(program("dim B=2 L=2", "input x[B]", "h[B] = nothing[B]",
                                   "repeat L {", "  h[B] = x[B]", "}", "output x"))
    assert [d.code for d in found] == ["E201"]


def test_E410_a_cluster_that_is_neither_a_preset_nor_a_file():
    from einpar.cost_model.cluster import load_cluster

    with pytest.raises(EinparError) as caught:
        load_cluster("h100x16")
    (found,) = caught.value.diagnostics
    assert (found.code, found.message) == (
        "E410", "h100x16: a H100-SXM node has 1 to 8 GPUs, and a cluster at least one node")
    with pytest.raises(EinparError) as caught:
        load_cluster("dgx")
    assert caught.value.diagnostics[0].message.startswith("no cluster preset 'dgx'; presets look like h100x8")


def test_E410_a_cluster_file_field_with_its_position(tmp_path):
    from einpar.cost_model.cluster import load_cluster

    path = tmp_path / "c.toml"
    path.write_text('accelerator = "h100"\n[topology]\nkind = "torus"\ndims = [4, 0]\n')
    with pytest.raises(EinparError) as caught:
        load_cluster(str(path))
    (found,) = caught.value.diagnostics
    assert (found.code, found.message, found.span.line, found.span.col) == (
        "E410", "bad cluster file: topology.dims must be a list of 1 to 3 positive sizes", 4, 1)


def test_E410_a_cluster_file_field_after_a_line_separator_in_a_string(tmp_path):
    from einpar.cost_model.cluster import load_cluster

    path = tmp_path / "c.toml"
    path.write_text('accelerator = "h100"\nname = "a\u2028b"\n[topology]\nkind = "torus"\n'
                    'dims = [4, 0]\n', encoding="utf-8")
    sources = SourceMap()
    with pytest.raises(EinparError) as caught:
        load_cluster(str(path), sources)
    (found,) = caught.value.diagnostics
    assert (found.span.line, found.span.col) == (5, 1)
    assert sources.line(str(path), 5) == "dims = [4, 0]"


def test_E410_a_chip_with_no_peak_for_the_programs_dtype():
    from einpar.api import compile_spmd, load
    from einpar.cost_model.cluster import preset
    from einpar.cost_model.estimate import estimate

    import dataclasses

    program = load("examples/mlp/megatron.ein")
    b200 = preset("b200x8")  # a chip with no f32 or tf32 figure, as a cluster file may give
    low_only = {dtype: b200.chip.peak_flops[dtype] for dtype in ("bf16", "fp8")}
    cluster = dataclasses.replace(b200, chip=dataclasses.replace(b200.chip, peak_flops=low_only))
    with pytest.raises(EinparError) as caught:
        estimate(program, compile_spmd(program), cluster)
    (found,) = caught.value.diagnostics
    assert (found.code, found.message, found.hint) == (
        "E410", "B200 has no published peak for f32 arithmetic (it has: bf16, fp8)",
        "write `dtype bf16` in the program, or give accelerator.peak_flops.f32 in a cluster file "
        "(docs/cost.md)")


def test_E411_a_mesh_larger_than_the_cluster():
    from einpar.api import compile_spmd, load
    from einpar.cost_model.cluster import preset
    from einpar.cost_model.estimate import estimate

    program = load("examples/transformer/block.ein", {"tp": 8})
    with pytest.raises(EinparError) as caught:
        estimate(program, compile_spmd(program), preset("tpu-v5e:2x4"))
    (found,) = caught.value.diagnostics
    assert (found.code, found.message) == (
        "E411", "the mesh dp=2 tp=8 needs 16 devices; cluster tpu-v5e:2x4 has 8")


def test_E412_nccl_tests_output_without_a_table(tmp_path):
    from einpar.cost_model.calibrate import calibrate_nccl_tests

    log = tmp_path / "ar.txt"
    log.write_text("# Collective test starting: all_reduce_perf\n#  Rank  0 Group  0 Pid 1 on a "
                   "device  0 [0000:18:00] NVIDIA H100\n")
    with pytest.raises(EinparError) as caught:
        calibrate_nccl_tests([log])
    (found,) = caught.value.diagnostics
    assert (found.code, found.span.line) == ("E412", 1)
    assert found.message == ("bad nccl-tests output: no table of sizes and times (nccl-tests' "
                             "`size count type ...` rows) was found")


def test_E420_a_run_larger_than_the_memory_limit():
    from einpar.resources import estimate_run, require_fits

    program = compile_source(PROGRAM, FILE, {"B": 2**20})  # x: f32[B=1048576, D=4], 16 MiB
    work = estimate_run(program, "reference")
    with pytest.raises(EinparError) as caught:
        require_fits(work, max_memory=2**20)
    (found,) = caught.value.diagnostics
    assert found.code == "E420"
    assert found.message.startswith("running on backend reference needs about ")
    assert found.message.endswith("; --max-memory is 1.00 MiB")
    require_fits(work, max_memory=work.bytes)


def test_E421_a_run_longer_than_the_time_limit():
    from einpar.resources import estimate_run, require_fits

    program = compile_source("dim B=4 L=1000000\ninput x[B]\nh[B] = x[B]\nrepeat L {\n"
                             "  h[B] = h[B] * 0.5\n}\noutput h\n", FILE)
    with pytest.raises(EinparError) as caught:
        require_fits(estimate_run(program, "reference"), max_time=1.0)
    (found,) = caught.value.diagnostics
    assert (found.code, found.message) == (
        "E421", "running on backend reference would take at least 6.00 s (4.00M FLOPs, "
                "1,000,001 NumPy calls, 1,000,000 repeat trips); the limit is 1.00 s")


def test_E421_counts_the_trips_of_empty_nested_repeat_blocks():
    """Ten nested blocks of 4 trips run 4^10 trips of the innermost (and the rest) with no op
    in them: no NumPy call, but still the evaluators' loop, about 3 µs a trip and device."""
    from einpar.api import compile_spmd
    from einpar.resources import estimate_run, require_fits

    lines = ["mesh tp=4", "dim B=4 F=4", "param w[B, F@tp]"] + ["repeat B {"] * 10 + ["}"] * 10
    nested = compile_source(program(*lines), "nest.ein")
    trips = sum(4 ** depth for depth in range(1, 11))
    work = estimate_run(nested, "numpy", compile_spmd(nested))
    assert (work.calls, work.trips) == (0, trips + 4 * trips)
    with pytest.raises(EinparError) as caught:
        require_fits(work, max_time=3.0)
    assert caught.value.diagnostics[0].message == (
        "running on backend numpy would take at least 6.99 s (6,990,500 repeat trips); "
        "the limit is 3.00 s")


def test_every_code_has_a_test_here():
    tested = {match.group(0) for name in globals() if name.startswith("test_")
              for match in [re.search(r"E\d{3}", name)] if match}
    assert tested == set(CODES)


# ---------------------------------------------------------------- several errors in one file


def test_independent_errors_are_all_reported_in_source_order():
    found = diagnostics_of(program("mesh tp=2",
                                   "dim B=8 D=4",
                                   "input x[B, D]",
                                   "output zz",
                                   "y[B] = x[B, Q] * 2",
                                   "w[B] = q[B]",
                                   "v[B@tp, D@tp] = x[B,D]"))
    assert [(d.code, d.span.line, d.span.col) for d in found] == [
        ("E232", 4, 8), ("E200", 5, 13), ("E201", 6, 8), ("E220", 7, 11)]


def test_an_error_in_a_statement_does_not_cascade_into_later_uses():
    found = diagnostics_of(program("dim B=8 D=4",
                                   "input x[B, D]",
                                   "h[B] = x[B, Q] * 2",
                                   "y[B] = h[B] + 1",
                                   "z[B] = sum[D](h[B] * x[B,D])",
                                   "output y",
                                   "output h"))
    assert [(d.code, d.span.line) for d in found] == [("E200", 3)]


def test_an_error_in_a_declaration_does_not_cascade_into_later_uses():
    found = diagnostics_of(program("mesh tp=2",
                                   "dim B=8 D=4",
                                   "input x[B@dp, D]",
                                   "y[B] = sum[D](x[B,D])",
                                   "output y"))
    assert [(d.code, d.span.line) for d in found] == [("E202", 3)]


def test_a_bad_dimension_does_not_cascade_into_its_uses():
    found = diagnostics_of(program("dim B=8 T=Q",
                                   "input x[B, T]",
                                   "y[B] = sum[T](x[B,T])",
                                   "output y"))
    assert [(d.code, d.span.line) for d in found] == [("E203", 1)]


def test_a_bad_mesh_axis_does_not_cascade_into_its_uses():
    found = diagnostics_of(program("mesh tp=0",
                                   "dim B=8",
                                   "input x[B@tp]",
                                   "y[B@tp] = x[B] * 2",
                                   "output y"))
    assert [(d.code, d.span.line) for d in found] == [("E222", 1)]


def test_a_duplicate_definition_is_reported_once():
    found = diagnostics_of(program("dim B=8",
                                   "input x[B]",
                                   "y[B] = x[B]",
                                   "y[B] = 2 * x[B]",
                                   "z[B] = y[B] * 3",
                                   "output z"))
    assert [(d.code, d.span.line) for d in found] == [("E230", 4)]


def test_every_layout_whose_padding_does_not_nest_is_reported():
    found = diagnostics_of(program("mesh dp=2 tp=4",
                                   "dim B=8 S=128 D=256 F=1024",
                                   "input x[B@dp, S, D]",
                                   "param w1[D, F@(dp,tp)]",
                                   "param w2[F@(dp,tp), D]"), overrides={"dp": 3})
    assert [(d.code, d.span.line, d.span.col) for d in found] == [("E221", 4, 13), ("E221", 5, 10)]


# ---------------------------------------------------------------- rendering


def test_rendered_text_has_header_location_source_line_caret_and_hint():
    text = program("mesh tp=2",
                   "dim B=8",
                   "input x[B, Q]")
    assert rendered(text) == ["\n".join([
        "error[E200]: unknown index 'Q'",
        " --> bad.ein:3:12",
        "  |",
        "3 | input x[B, Q]",
        "  |            ^",
        "  |",
        "  = hint: declare it with `dim`",
    ])]


def test_rendered_text_shows_labels_under_their_own_lines():
    text = program("dim B=8",
                   "input x[B]",
                   "y[B] = x[B]",
                   "y[B] = 2 * x[B]")
    assert rendered(text) == ["\n".join([
        "error[E230]: 'y' is already defined",
        " --> bad.ein:4:1",
        "  |",
        "4 | y[B] = 2 * x[B]",
        "  | ^",
        "  |",
        "3 | y[B] = x[B]",
        "  | - first defined here",
        "  |",
        "  = hint: each tensor is defined once; give this one a new name",
    ])]


def test_rendered_text_widens_the_gutter_for_long_line_numbers():
    text = program(*(["# a comment"] * 9), "dim B=8", "input x[B]", "y[B] = x[B] / sqrt(K)")
    assert rendered(text) == ["\n".join([
        "error[E203]: unknown dimension 'K'",
        "  --> bad.ein:12:20",
        "   |",
        "12 | y[B] = x[B] / sqrt(K)",
        "   |                    ^",
        "   |",
        "   = hint: a bare name in an expression is a dimension's size",
    ])]


def test_rendered_text_without_a_hint_ends_at_the_carets():
    text = program("dim B=8 T=4", "input x[B,T]", "y[B,T] = max2(x[B,T])")
    assert rendered(text) == ["\n".join([
        "error[E214]: 'max2' takes 2 arguments, got 1",
        " --> bad.ein:3:10",
        "  |",
        "3 | y[B,T] = max2(x[B,T])",
        "  |          ^^^^^^^^^^^^",
    ])]


def under_the_source_line(rendering: str, span: Span) -> tuple[str, str]:
    """The source line of the span as shown, and the marks printed under it."""
    lines = rendering.splitlines()
    at = next(i for i, line in enumerate(lines) if re.match(rf"\s*{span.line} \| ", line))
    start = lines[at].index(" | ") + 3
    return lines[at][start:], lines[at + 1][start:]


@pytest.mark.parametrize("text", [
    program("dim B=8 D=4", "input x[B, D]", "y[B] = x[B, Dd]"),
    program("mesh dp=2 tp=4", "dim B=12 D=4", "input x[B@(dp,tp), D]"),
    program("dim B=8", "input x[B]", "y[B] = gelo(x[B])"),
    program("dim B=8 S=4 D=2", "input x[B, S, D]", "y[B,S] = x[B,S]"),
    program("dim B=8", "input x[B]", "y[B] = x[B] *"),
    program("dim B=8", "input x[B]", "y[B] = (x[B]"),
    program("dim B=8", "\tinput x[B, $]"),
    program("dim B=8", "input x[B]", "\ty[B] =\tgelo(x[B])"),
])
def test_carets_sit_exactly_under_the_span(text):
    (found,) = diagnostics_of(text)
    span = found.span
    shown, marks = under_the_source_line(render_text(found, SourceMap({FILE: text})), span)
    assert len(shown) == len(text.splitlines()[span.line - 1])
    assert marks == " " * (span.col - 1) + "^" * max(1, span.end_col - span.col)
    if span.end_col <= len(shown) + 1:
        assert shown[span.col - 1:span.end_col - 1] == text.splitlines()[span.line - 1][
            span.col - 1:span.end_col - 1].replace("\t", " ")


def test_carets_sit_under_the_span_after_wide_and_combining_characters():
    # Only an unexpected character can stand before an error on its own line.
    for text, shown, marks in [
        ("dim B=8\n日本 = 2\n", "日本 = 2", "^^"),  # a wide character takes two columns
        # a combining accent takes none: the caret is under the letter it sits on
        ("dim B=8\n\te\u0301 = 2\n", " e\u0301 = 2", " ^"),
    ]:
        found = the_error(text)
        assert under_the_source_line(render_text(found, SourceMap({FILE: text})), found.span) == (
            shown, marks)


def test_a_caret_after_wide_characters_in_a_label_line():
    text = "dim B=8\ny[B] = 1 # 日本 x\n"
    found = Diagnostic("E201", "m", Span(FILE, 2, 1, 2, 2),
                       labels=(Label(Span(FILE, 2, 15, 2, 16), "after the wide ones"),))
    assert render_text(found, SourceMap({FILE: text})).splitlines()[3:] == [
        "2 | y[B] = 1 # 日本 x",
        "  | ^" + " " * 15 + "- after the wide ones",
    ]


def test_a_right_to_left_override_cannot_reorder_the_quoted_line():
    text = "dim B=8\ninput x[B]\ny[B] = x[B] \u202e $\n"
    found = the_error(text)
    assert (found.span.line, found.span.col) == (3, 13)
    assert quoted_line(text, found) == "y[B] = x[B]   $"


def test_E212_first_here_hangs_under_the_first_occurrence():
    """The note of a label left of the primary span is under that label, not after the caret."""
    for text, caret_row in [
        (program("dim B=8 S=4", "input x[B]", "y[B,S,B] = x[B]"), "  |   -   ^"),
        (program("dim B=8", "input x[B, B]", "y[B] = x[B,B]"), "  |          - ^"),
        (program("dim B=8", "input x[B]", "y[B] = sum[B,B](x[B])"), "  |            - ^"),
    ]:
        (found,) = diagnostics_of(text)
        assert found.code == "E212"
        (label,) = found.labels
        assert label.note == "first here" and label.span.col < found.span.col
        lines = render_text(found, SourceMap({FILE: text})).splitlines()
        at = lines.index(caret_row)
        first = caret_row.index("-")
        assert lines[at + 1] == "  |" + " " * (first - 3) + "|"
        assert lines[at + 2] == "  |" + " " * (first - 3) + "first here"


def test_E212_repeated_in_a_reduction_names_the_first():
    found = expect(program("dim B=8", "input x[B]", "y[B] = sum[B,B](x[B])"),
                   "E212", "index 'B' appears twice in sum[...]", 3, 14)
    assert labels(found) == [(3, 12, "first here")]


def test_notes_of_three_labels_on_one_line_hang_right_to_left():
    text = "dim B=8\nabc(d, e, fgh)\n"
    found = Diagnostic("E214", "m", Span(FILE, 2, 8, 2, 9),
                       labels=(Label(Span(FILE, 2, 1, 2, 4), "call"),
                               Label(Span(FILE, 2, 5, 2, 6), "first"),
                               Label(Span(FILE, 2, 11, 2, 14), "last")))
    assert render_text(found, SourceMap({FILE: text})).splitlines()[3:] == [
        "2 | abc(d, e, fgh)",
        "  | --- -  ^  --- last",
        "  | |   |",
        "  | |   first",
        "  | call",
    ]


def test_a_diagnostic_without_a_span_renders_its_hint():
    found = Diagnostic("E300", "in.npz has no array 'w'", hint="'w' is f32[4]")
    assert render_text(found, SourceMap()) == "\n".join([
        "error[E300]: in.npz has no array 'w'",
        "  = hint: 'w' is f32[4]",
    ])


def test_json_rendering_lists_every_diagnostic_with_its_span_hint_and_labels():
    text = program("dim B=8 S=4 D=2",
                   "input x[B, S, D]",
                   "y[B,S] = x[B,S]",
                   "output zz")
    document = json.loads(render_json(diagnostics_of(text)))
    assert document == {"diagnostics": [
        {"code": "E210", "severity": "error",
         "message": "'x' has 3 dimensions [B, S, D] but is indexed with 2",
         "file": FILE, "line": 3, "col": 11, "end_line": 3, "end_col": 16,
         "hint": "write x[B, S, D] (indices bind by position)",
         "labels": [{"file": FILE, "line": 2, "col": 7, "note": "declared here"}]},
        {"code": "E232", "severity": "error", "message": "output 'zz' is never defined",
         "file": FILE, "line": 4, "col": 8, "end_line": 4, "end_col": 10,
         "hint": "define it with a statement, e.g. zz[...] = ..."},
    ]}


def test_json_rendering_of_a_diagnostic_without_a_span():
    document = json.loads(render_json([Diagnostic("E302", "missing.ein does not exist")]))
    assert document == {"diagnostics": [
        {"code": "E302", "severity": "error", "message": "missing.ein does not exist"}]}


def test_error_text_names_every_code():
    with pytest.raises(EinparError) as caught:
        compile_source(program("dim B=8", "input x[B]", "y[B] = z[B]", "output q"), file=FILE)
    assert str(caught.value) == "E201: unknown tensor 'z'\nE232: output 'q' is never defined"


# ---------------------------------------------------------------- training declarations

TRAIN = ("mesh dp=2", "dim B=8 D=4 E=4", "input x[B@dp, D]", "param w[D, E]",
         "y[B,E] = x[B,D] * w[D,E]", "l[] = mean[B,E](square(y[B,E]))")


def test_E250_unknown_declaration_word():
    expect(program(*TRAIN, "los l"), "E250", "unknown declaration 'los'", 7, 1, length=3,
           hint="did you mean 'loss'?")


def test_E250_unknown_statement_modifier_and_derived_output():
    found = diagnostics_of(program(*TRAIN[:4], "keep y[B,E] = x[B,D] * w[D,E]",
                                   "l[] = mean[B,E](square(y[B,E]))", "loss l", "output w.m"))
    assert [(d.code, d.message, d.span.line, d.span.col) for d in found] == [
        ("E250", "unknown statement modifier 'keep'", 5, 1),
        ("E250", "'w.m' is not a value einpar derives", 8, 10)]
    assert found[1].hint == "write `output w.grad` for a gradient"


def test_E251_loss_not_scalar():
    expect(program(*TRAIN, "loss y"), "E251",
           "the loss 'y' has dimensions [B, E]; a loss is a scalar", 7, 6, length=1,
           hint="reduce it, e.g. `y_total[] = sum[B,E](y[B,E])`")


def test_E251_loss_unknown_or_a_param():
    expect(program(*TRAIN, "loss m"), "E251", "the loss 'm' is not a value of the program", 7, 6,
           hint="define it at the top level, e.g. `l[] = mean[B](square(y[B]))`")
    expect(program("dim D=4", "param w[]", "loss w"), "E251",
           "the loss 'w' is a param, not computed from the params", 3, 6)


def test_E252_bad_optimizer_settings():
    expect(program(*TRAIN, "loss l", "optimizer adam lr=1"), "E252", "unknown optimizer 'adam'",
           8, 11, hint="did you mean 'adamw'?")
    expect(program(*TRAIN, "loss l", "optimizer adamw lr=-1e-3"), "E252",
           "lr=-1e-3 is not a learning rate above 0", 8, 17)
    expect(program(*TRAIN, "loss l", "optimizer sgd lr=1e-400"), "E252",
           "lr=1e-400 is not a learning rate above 0 (it rounds to 0 as a float)", 8, 15)
    expect(program(*TRAIN, "loss l", "optimizer sgd lr=0.1 b1=0.9"), "E252",
           "sgd has no setting 'b1'", 8, 22, hint="sgd takes lr, wd, shard")
    expect(program(*TRAIN, "loss l", "optimizer adamw b2=0.95"), "E252",
           "adamw needs a learning rate", 8, 1,
           hint="add lr=..., e.g. `optimizer adamw lr=1e-3`")
    expect(program(*TRAIN, "loss l", "optimizer adamw lr=1e-3 shard=tp"), "E202",
           "unknown mesh axis 'tp'", 8, 31, hint="the mesh's axes are dp")


def test_E253_optimizer_without_a_loss():
    expect(program(*TRAIN, "optimizer sgd lr=0.1"), "E253", "an optimizer needs a loss", 7, 1,
           hint="name the scalar to minimize with `loss l` (l[] = ...)")


def test_E254_microbatches_that_do_not_divide():
    expect(program(*TRAIN, "loss l", "microbatches B=3"), "E254",
           "B=8 does not split into 3 micro-batches", 8, 14, hint="use a count that divides 8")
    expect(program(*TRAIN, "loss l", "microbatches D=2"), "E254",
           "D is not a batch index: param 'w' has it", 8, 14,
           hint="micro-batches split the inputs' batch index; params are whole")


def test_E255_gradient_of_an_input():
    expect(program(*TRAIN, "loss l", "output x.grad"), "E255",
           "'x' is not a param, so 'x.grad' is not taken", 8, 8,
           hint="gradients are taken of params; declare it with `param`")


def test_training_declarations_make_a_training_step():
    from einpar.ir import Optimizer, Training
    source = program(*TRAIN[:4], "remat y[B,E] = x[B,D] * w[D,E]", TRAIN[5], "loss l",
                     "optimizer adamw lr=1e-3 b2=0.95 shard=dp", "microbatches B=2",
                     "output w.grad[D@dp, E]")
    checked = compile_source(source, file=FILE)
    training = checked.forward.training if checked.forward is not None else checked.training
    assert training == Training("l", Optimizer("adamw", lr=1e-3, b2=0.95, wd=0.01, shard=("dp",),
                                               span=training.optimizer.span),
                                ("B", 2), frozenset({"y"}), training.span)
    loss = compile_source(program(*TRAIN[:4], "loss[] = sum[B,E](x[B,D] * w[D,E])", "loss loss"),
                          file=FILE)
    assert (loss.forward or loss).training.loss == "loss"  # the words are not reserved


def test_E254_microbatches_of_an_aliased_index_or_one_pos_reads():
    expect(program("dim S=8 T=S D=4", "input x[S, D]", "param w[D]",
                   "a[S,T] = x[S,D]*x[T,D]*w[D]", "l[] = mean[S,T](square(a[S,T]))", "loss l",
                   "microbatches S=2"),
           "E254", "S shares its size with T (an alias): micro-batches split one index alone", 7, 14,
           hint="give the other index its own size (`dim T=8`), or split another")
    expect(program("dim B=8 D=4", "input x[B, D]", "param w[D]",
                   "y[B,D] = x[B,D] * w[D] * pos(B)", "l[] = mean[B,D](square(y[B,D]))", "loss l",
                   "microbatches B=2"),
           "E254", "pos(B) would count the rows of one micro-batch, not the batch's", 7, 14,
           hint="micro-batch the step by another index, or compute without pos(B)")


def test_E255_a_training_step_refuses_a_param_that_is_not_a_float():
    """An i32 or bool param has no gradient; an optimizer would decay and truncate it."""
    expect(program("dim B=8 D=4", "input x[B, D]", "param w[D] : i32",
                   "l[] = sum[B,D](x[B,D] * w[D])", "loss l", "optimizer adamw lr=1e-3"),
           "E255", "param 'w' is i32: a training step trains every param, and only a float "
                   "one has a gradient", 3, 7, length=1,
           hint="declare it with `input`: a step reads its inputs and trains its params")


# ---------------------------------------------------------------- pipelines (E256, E257)

PIPE = ("mesh dp=2 pp=2", "dim B=8 D=4 L=4", "input x[B@dp, D]", "repeat L@pp {",
        "  param w[D, E]", "  y[B,E] = x[B,D] * w[D,E]", "  x[B,D] = y[B,E]", "}")
PIPE_STEP = PIPE + ("l[] = mean[B,D](square(x[B,D]))", "loss l")


def _pipe(*lines: str) -> str:
    return program(*PIPE[:2], *lines) if lines else program(*PIPE)


def test_a_pipelined_repeat_stacks_its_params_over_the_stage_axis():
    from einpar.ir import Repeat
    text = program(*PIPE_STEP, "microbatches B=4").replace("dim B=8 D=4", "dim B=8 D=4 E=4")
    checked = compile_source(text, file=FILE)
    (w,) = [value for value in checked.inputs if value.name == "w"]
    assert (w.type.indices, str(w.layout)) == (("L", "D", "E"), "[_@pp,_,_]")
    assert checked.forward.training.schedule == ("1f1b", 1)
    staged = [op for op in walk_ops(checked.ops) if isinstance(op, Repeat) and op.stage_axis]
    assert [op.reverse for op in staged] == [False, True]  # the backward loop is staged too
    one_batch = compile_source(program(*PIPE_STEP).replace("dim B=8 D=4", "dim B=8 D=4 E=4"), FILE)
    assert one_batch.forward.training.schedule == ("gpipe", 1)


def test_E256_pipelined_repeat_whose_trips_the_stages_do_not_divide():
    text = program(*PIPE).replace("dim B=8 D=4 L=4", "dim B=8 D=4 E=4 L=3")
    expect(text, "E256", "the 3 trips of 'L' do not split evenly over pp=2 stages", 4, 8, length=1,
           hint="pick a trip count the stages divide (use --set to change it)")


def test_E256_pipelined_repeat_nested_or_twice():
    nested = program("mesh pp=2", "dim B=8 D=4 L=4", "input x[B, D]", "repeat L {",
                     "  repeat L@pp {", "    param w[D, D2]", "  }", "}", "output x")
    expect(nested.replace("D2", "D"), "E256", "a pipelined repeat must be at the top level",
           5, 12, length=2, hint="split the outer loop's trips over 'pp' instead, or drop the '@pp'")
    twice = program("mesh pp=2", "dim B=8 D=4 L=4", "input x[B, D]", "repeat L@pp {",
                    "  param w[D, D]", "}", "repeat L@pp {", "  param u[D, D]", "}", "output x")
    found = expect(twice, "E256", "a program has one pipelined repeat", 7, 10, length=2,
                   hint="put the stages' layers in one `repeat L@pp` block")
    assert labels(found)[0][:2] == (4, 1)


def test_E256_param_read_inside_a_pipeline_but_declared_outside():
    text = program("mesh pp=2", "dim B=8 D=4 L=4", "input x[B, D]", "param g[D]",
                   "repeat L@pp {", "  x[B,D] = x[B,D] * g[D]", "}", "output x")
    found = expect(text, "E256", "'g' is a param declared outside the pipelined block and read "
                                 "inside it", 6, 21, length=1,
                   hint="declare it inside the block (each stage then holds its own trips' "
                        "copies, stacked [L@pp, ...]), or compute with it outside")
    assert labels(found) == [(4, 7, "declared here")]


def test_E256_value_split_over_the_stage_axis():
    text = program("mesh pp=2", "dim B=8 D=4 E=4 L=4", "input x[B@pp, D]", "repeat L@pp {",
                   "  param w[E, D]", "  x[B,D] = x[B,E] * w[E,D]", "}", "output x")
    found = expect(text, "E256", "'x' is split over 'pp', the axis of the pipeline's stages",
                   3, 7, length=1, hint="each 'pp' coordinate is a stage holding its own layers: "
                                        "split the value over another axis")
    assert labels(found) == [(4, 1, "the stages")]


def test_a_pipelined_repeat_of_one_stage_is_a_plain_loop():
    """`repeat L@pp` with pp of size 1 compiles as a plain loop; with more, one stage's
    program and its `pipeline` (test_pipeline.py runs, prices and explains it)."""
    from einpar.api import compile_spmd

    text = program(*PIPE).replace("dim B=8 D=4", "dim B=8 D=4 E=4") + "output x\n"
    spmd = compile_spmd(compile_source(text, FILE))
    assert spmd.pipeline is not None and spmd.mesh.size("pp") == 1  # one stage's program
    one_stage = compile_spmd(compile_source(text, FILE, overrides={"pp": 1}))
    assert one_stage.pipeline is None


def test_E256_a_param_read_before_and_after_the_pipeline():
    """Weights tied between the first stage (before the layers) and the last (after them):
    their gradients meet across stages, which the lowering does not send yet."""
    text = program("mesh pp=2", "dim B=8 D=4 E=4 V=8 L=4", "input ids[B]: i32", "param emb[V, D]",
                   "x[B,D] = take[V](emb[V,D], ids[B])", "repeat L@pp {", "  param w[D, E]",
                   "  x[B,E] = tanh(x[B,D] * w[D,E])", "}", "o[B,V] = x[B,D] * emb[V,D]",
                   "l[] = mean[B,V](square(o[B,V]))", "loss l")
    from einpar.api import compile_spmd
    with pytest.raises(EinparError) as caught:
        compile_spmd(compile_source(text, FILE))
    (found,) = caught.value.diagnostics
    assert (found.code, found.span.line, found.span.col) == ("E256", 6, 1)
    assert found.message.startswith("'emb.grad' reads values the pipeline holds on different stages")
    assert "weights tied between the first and the last stage" in found.hint


@pytest.mark.parametrize("lines, message, line, col, hint", [
    (("microbatches B=4", "schedule zerobubble"), "unknown schedule 'zerobubble'", 12, 10,
     "the schedules are gpipe, 1f1b, interleaved"),
    (("microbatches B=4", "schedule gpipe v=2"), "'v' is not a setting of the gpipe schedule",
     12, 16, "only `schedule interleaved v=N` takes a setting: N chunks per stage"),
    (("microbatches B=4", "schedule interleaved"), "the interleaved schedule needs its chunks "
     "per stage", 12, 1, "write `schedule interleaved v=2`"),
    (("microbatches B=4", "schedule interleaved v=3"), "the 4 trips of 'L' do not split into "
     "2×3 chunks", 12, 1, "with v=3 chunks per stage the trips must be a multiple of 6"),
    (("microbatches B=4", "schedule interleaved v=2"), None, 0, 0, None),
    (("microbatches B=4", "schedule interleaved v=2 v=2"), "'v' is given twice", 12, 26,
     "write `schedule interleaved v=2`"),
    (("microbatches B=1", "schedule 1f1b"), "1f1b needs at least as many micro-batches as stages "
     "(1 micro-batch for 2 stages)", 12, 1, "use more micro-batches, or `schedule gpipe`"),
    (("microbatches B=2", "schedule interleaved v=2"), None, 0, 0, None),
    (("microbatches B=1", "schedule interleaved v=2"), "the interleaved schedule needs a multiple "
     "of the 2 stages as micro-batches (1 micro-batch)", 12, 1,
     "use a multiple of the stages as micro-batches"),
    (("schedule gpipe",), "the gpipe schedule needs micro-batches", 11, 1,
     "a schedule orders several micro-batches through the stages: add `microbatches B=8` "
     "(B the batch index)"),
])
def test_E257_bad_pipeline_schedule(lines, message, line, col, hint):
    text = program(*PIPE_STEP, *lines).replace("dim B=8 D=4", "dim B=8 D=4 E=4")
    if message is None:
        compile_source(text, FILE)
        return
    expect(text, "E257", message, line, col, hint=hint)


def test_E257_a_schedule_without_a_pipeline():
    expect(program(*TRAIN, "loss l", "microbatches B=2", "schedule 1f1b"), "E257",
           "a schedule orders pipeline stages, and no repeat is pipelined", 9, 1,
           hint="split a repeat's trips into stages with `repeat L@pp { ... }`")


def test_E233_an_output_of_a_param_beside_the_optimizer_that_updates_it():
    """With an optimizer the step outputs the updated `w` under the param's own name."""
    found = expect(program(*TRAIN, "loss l", "optimizer sgd lr=0.1", "output w"), "E233",
                   "output 'w' is declared twice: the optimizer outputs the updated 'w'", 9, 1,
                   length=8, hint="remove `output w`: the step outputs w after its update")
    assert labels(found) == [(8, 1, "outputs the updated params")]


def test_an_output_of_a_param_beside_micro_batches_is_said_once_and_as_a_param():
    with_optimizer = diagnostics_of(program(*TRAIN, "loss l", "microbatches B=2",
                                            "optimizer sgd lr=0.1", "output w"))
    assert [(d.code, d.span.line) for d in with_optimizer] == [("E233", 10)]
    expect(program(*TRAIN, "loss l", "microbatches B=2", "output w"), "E254",
           "output 'w' is a param: a step of micro-batches outputs its loss, gradients and "
           "updated params", 9, 1, hint="remove this output, or the micro-batches")
