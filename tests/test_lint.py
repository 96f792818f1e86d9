"""Warnings (einpar/lint.py): each one's code, position, message and hint; how they
are silenced; how `check` and `compile` show them; and that the examples have none.

Programs are written one source line per argument of `program(...)`, so line N of
the file is the N-th argument.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from einpar.api import compile_source
from einpar.cli import main
from einpar.errors import WARNING_CODES, Diagnostic, SourceMap, render_text
from einpar.lint import lint, repeated_overrides
from einpar.syntax import parse

FILE = "w.ein"
REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(path.relative_to(REPO).as_posix() for path in (REPO / "examples").rglob("*.ein"))


def program(*lines: str) -> str:
    return "\n".join(lines) + "\n"


def warnings_of(text: str, ignore: tuple[str, ...] = ()) -> list[Diagnostic]:
    compile_source(text, FILE)  # warnings are for programs that check
    return lint(parse(text, FILE), text, ignore)


def summary(found: list[Diagnostic]) -> list[tuple[str, int, int, str]]:
    return [(w.code, w.span.line, w.span.col, w.message) for w in found]


def einpar(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- W100 input or param never read


def test_W100_an_input_never_read():
    (found,) = warnings_of(program("dim B=8", "input x[B]", "input extra[B]", "y[B] = x[B] * 2",
                                   "output y"))
    assert (found.code, found.severity, found.message) == ("W100", "warning",
                                                           "input 'extra' is never read")
    assert (found.span.line, found.span.col, found.span.end_col) == (3, 7, 12)
    assert found.hint == "use it in a statement, or remove the declaration"


def test_W100_a_param_inside_repeat_never_read():
    text = program("dim B=8 L=2", "input x[B]", "repeat L {", "  param w[B]", "  param b[B]",
                   "  x[B] = x[B] * w[B]", "}", "output x")
    assert summary(warnings_of(text)) == [("W100", 5, 9, "param 'b' is never read")]


def test_W100_an_input_that_is_an_output_is_read():
    assert warnings_of(program("dim B=8", "input x[B]", "output x")) == []


# ---------------------------------------------------------------- W101 value never used


def test_W101_a_value_never_used():
    (found,) = warnings_of(program("dim B=8", "input x[B]", "y[B] = x[B] * 2",
                                   "scratch[B] = exp(x[B])", "output y"))
    assert summary([found]) == [("W101", 4, 1, "'scratch' is computed but never used")]
    assert found.span.end_col == 8
    assert found.hint == ("declare it an output (`output scratch`), read it in a later statement, "
                          "or remove the statement")


def test_W101_a_value_read_by_a_later_statement_or_an_output_is_used():
    text = program("dim B=8", "output y", "input x[B]", "h[B] = x[B] * 2", "y[B] = h[B] + 1")
    assert warnings_of(text) == []


def test_W101_a_loop_carried_value_is_read_by_the_next_trip():
    text = program("dim B=8 L=3", "input x[B]", "param w[B]", "h[B] = x[B] * w[B]",
                   "repeat L {", "  h[B] = h[B] * 2", "}", "output h")
    assert warnings_of(text) == []


def test_W101_a_value_made_in_a_repeat_block_and_never_read():
    text = program("dim B=8 L=3", "input x[B]", "repeat L {", "  t[B] = x[B] * 2",
                   "  x[B] = x[B] + 1", "}", "output x")
    assert summary(warnings_of(text)) == [("W101", 4, 3, "'t' is computed but never used")]


# ---------------------------------------------------------------- W102 index summed in one operand


def test_W102_an_index_only_one_operand_of_a_product_has():
    # The example: K is in v only, and o has no K, so K is summed over v alone.
    text = program("dim B=2 S=4 H=2 T=4 K=8", "input p[B,H,S,T]", "input v[B,T,H,K]",
                   "o[B,S,H] = p[B,H,S,T] * v[B,T,H,K]", "output o")
    (found,) = warnings_of(text)
    assert summary([found]) == [
        ("W102", 4, 33, "index 'K' is summed, but only one operand of the product has it")]
    assert found.span.end_col == 34
    assert found.hint == ("'o' does not have K: add it to the left-hand side to keep it, or write "
                          "sum[K](...) around that operand to sum it on purpose")


@pytest.mark.parametrize("statement", [
    "y[B] = a[B,K] * b[K]",  # a contraction: K is in both operands
    "y[B] = a[B,K]",  # one operand: summing it is plainly meant
    "y[B] = 2 * a[B,K] * B",  # numbers and sizes only scale the one operand
    "y[B] = b[K] * sum[K](c[B,K]) * a[B,K]",
    "y[B] = a[B,K] / d[B]",  # a quotient is not a product
    "y[B,K] = a[B,K] * d[B]",  # nothing summed
    "y[B] = d[B] * sum[K](a[B,K])",  # summed explicitly
    "y[B] = (a[B,K] * d[B]) * b[K]",  # one product of three operands, K in two
    "y[B] = a[B,K] * (d[B] * b[K])",
])
def test_W102_is_quiet_when_the_sum_is_meant(statement):
    text = program("dim B=4 K=3", "input a[B,K]", "input b[K]", "input c[B,K]", "input d[B]",
                   statement, "output y")
    assert [w for w in warnings_of(text) if w.code == "W102"] == []


@pytest.mark.parametrize("statement, line, col", [
    ("y[B] = d[B] * a[B,K]", 7, 19),
    ("y[B] = exp(d[B] * a[B,K])", 7, 23),  # inside a function: still summed over a alone
    ("y[B] = d[B] * -a[B,K]", 7, 20),
    ("y[B] = d[B] * a[B,K] + c[B,K]", 7, 19),  # the sum covers the addition; a's K is still alone
    ("y[B] = (d[B] * d[B]) * (2 * a[B,K])", 7, 33),
    ("y[B] = d[B] * sum[B2](e[B,B2,K])", 7, 30),  # K survives the sum over B2
    ("y[B] = a[B,K] * sum[K](c[B,K])", 7, 12),  # c's K is summed on purpose, a's is not
])
def test_W102_points_at_the_index_in_its_one_operand(statement, line, col):
    text = program("dim B=4 K=3 B2=B", "input a[B,K]", "input b[K]", "input c[B,K]", "input d[B]",
                   "input e[B,B2,K]", statement, "output y")
    found = [w for w in warnings_of(text) if w.code == "W102"]
    assert summary(found) == [
        ("W102", line, col, "index 'K' is summed, but only one operand of the product has it")]


def test_W102_each_index_once_in_source_order():
    text = program("dim B=4 K=3 J=2", "input a[B,K]", "input f[B,J]", "input d[B]",
                   "y[B] = f[B,J] * d[B] * a[B,K]", "output y")
    assert [(w.span.col, w.message.split("'")[1]) for w in warnings_of(text)] == [(12, "J"), (28, "K")]


def test_W102_in_a_wrapped_statement_points_at_the_right_line():
    text = program("dim B=4 K=3", "input a[B,K]", "input d[B]", "y[B] = d[B] * (",
                   "    a[B,K])", "output y")
    assert summary(warnings_of(text)) == [
        ("W102", 5, 9, "index 'K' is summed, but only one operand of the product has it")]


# ---------------------------------------------------------------- W103 --set given twice


def test_W103_set_given_twice():
    (found,) = repeated_overrides(["B=4", "D=8 B=16"])
    assert (found.code, found.severity, found.span) == ("W103", "warning", None)
    assert found.message == "--set B is given twice; the last, B=16, is used"
    assert found.hint == "drop B=4"
    assert [w.message for w in repeated_overrides(["B=1", "B=2", "B=3"])] == [
        "--set B is given 3 times; the last, B=3, is used"]
    assert repeated_overrides(["B=4", "D=8"]) == []


def test_W103_the_last_value_is_the_one_used(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("p.ein").write_text(program("dim B=8", "input x[B]", "output x"))
    code, out, err = einpar(capsys, "check", "p.ein", "--set", "B=4", "--set", "B=16", "--json")
    document = json.loads(out)
    assert (code, err, document["dims"]) == (0, "", {"B": 16})
    assert document["warnings"] == [{"code": "W103", "severity": "warning",
                                     "message": "--set B is given twice; the last, B=16, is used",
                                     "hint": "drop B=4"}]


# ---------------------------------------------------------------- silencing


NOISY = program("dim B=8", "input x[B]", "param w[B]", "y[B] = x[B] * 2", "z[B] = x[B] + 1",
                "output y")


def test_ignore_by_code_and_by_prefix():
    assert [w.code for w in warnings_of(NOISY)] == ["W100", "W101"]
    assert [w.code for w in warnings_of(NOISY, ("W101",))] == ["W100"]
    assert [w.code for w in warnings_of(NOISY, ("w100",))] == ["W101"]  # any case
    assert warnings_of(NOISY, ("W1",)) == warnings_of(NOISY, ("W",)) == []


def test_a_comment_silences_the_codes_it_names_on_its_line():
    text = NOISY.replace("param w[B]", "param w[B]  # einpar: ignore W100")
    assert [w.code for w in warnings_of(text)] == ["W101"]
    text = NOISY.replace("param w[B]", "param w[B]  # einpar: ignore W101, W102")
    assert [w.code for w in warnings_of(text)] == ["W100", "W101"]  # not its code
    text = NOISY.replace("z[B] = x[B] + 1", "z[B] = x[B] + 1  # scratch; einpar: ignore")
    assert [w.code for w in warnings_of(text)] == ["W100"]  # no code: every warning of the line
    text = NOISY.replace("dim B=8", "dim B=8  # einpar: ignore W100 W101")
    assert [w.code for w in warnings_of(text)] == ["W100", "W101"]  # only its own line


def test_ignore_on_the_command_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("n.ein").write_text(NOISY)
    code, _, err = einpar(capsys, "check", "n.ein", "--ignore", "W101")
    assert code == 0
    assert re.findall(r"warning\[(W\d+)\]", err) == ["W100"]
    code, _, err = einpar(capsys, "compile", "n.ein", "--ignore", "W100,W101")
    assert (code, err) == (0, "")
    code, _, err = einpar(capsys, "check", "n.ein", "--ignore", "W100", "--ignore", "W101")
    assert (code, err) == (0, "")


def test_ignore_of_an_unknown_code_is_bad_usage(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("n.ein").write_text(NOISY)
    code, out, err = einpar(capsys, "check", "n.ein", "--ignore", "W101,E999")
    assert (code, out) == (2, "")
    assert err.strip() == ("einpar check: error: --ignore E999: no warning has that code; the "
                           "codes are W100, W101, W102, W103, W104")


# ---------------------------------------------------------------- how check and compile show them


def test_check_prints_warnings_on_stderr_and_exits_0(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("n.ein").write_text(NOISY)
    code, out, err = einpar(capsys, "check", "n.ein")
    assert code == 0
    assert out.splitlines()[0] == "n.ein: ok"
    assert err.splitlines() == [
        "warning[W100]: param 'w' is never read",
        " --> n.ein:3:7",
        "  |",
        "3 | param w[B]",
        "  |       ^",
        "  |",
        "  = hint: use it in a statement, or remove the declaration",
        "warning[W101]: 'z' is computed but never used",
        " --> n.ein:5:1",
        "  |",
        "5 | z[B] = x[B] + 1",
        "  | ^",
        "  |",
        "  = hint: declare it an output (`output z`), read it in a later statement, or remove the "
        "statement",
        "2 warnings",
    ]


def test_warnings_are_yellow_on_a_terminal():
    from rich.console import Console

    from einpar.cli import _print_diagnostics

    console = Console(force_terminal=True, color_system="standard", record=True)
    (found,) = warnings_of(program("dim B=8", "input x[B]", "input u[B]", "output x"))
    _print_diagnostics([found], SourceMap({FILE: ""}), False, console, console)
    header = console.export_text(styles=True).splitlines()[0]
    assert header == "\x1b[1;33mwarning[W100]: input 'u' is never read\x1b[0m"


def test_check_json_lists_the_warnings(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("n.ein").write_text(NOISY)
    code, out, err = einpar(capsys, "check", "n.ein", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["warnings"] == [
        {"code": "W100", "severity": "warning", "message": "param 'w' is never read",
         "file": "n.ein", "line": 3, "col": 7, "end_line": 3, "end_col": 8,
         "hint": "use it in a statement, or remove the declaration"},
        {"code": "W101", "severity": "warning", "message": "'z' is computed but never used",
         "file": "n.ein", "line": 5, "col": 1, "end_line": 5, "end_col": 2,
         "hint": "declare it an output (`output z`), read it in a later statement, or remove "
                 "the statement"},
    ]


@pytest.mark.parametrize("emit", ["spmd", "layouts", "ir", "jax"])
def test_compile_json_lists_the_warnings(capsys, tmp_path, monkeypatch, emit):
    monkeypatch.chdir(tmp_path)
    Path("n.ein").write_text(NOISY)
    code, out, err = einpar(capsys, "compile", "n.ein", "--emit", emit, "--json")
    assert (code, err) == (0, "")
    assert [(w["code"], w["line"]) for w in json.loads(out)["warnings"]] == [("W100", 3), ("W101", 5)]


def test_compile_text_keeps_stdout_for_the_program(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("n.ein").write_text(NOISY)
    code, out, err = einpar(capsys, "compile", "n.ein", "--emit", "jax")
    assert code == 0
    compile(out, "module.py", "exec")  # the module alone, still valid Python
    assert re.findall(r"warning\[(W\d+)\]", err) == ["W100", "W101"]


def test_warnings_follow_the_source_in_the_rendering():
    text = program("dim B=8", "input x[B]", "input u[B]", "output x")
    (found,) = warnings_of(text)
    assert render_text(found, SourceMap({FILE: text})).splitlines()[:5] == [
        "warning[W100]: input 'u' is never read", " --> w.ein:3:7", "  |", "3 | input u[B]",
        "  |       ^"]


# ---------------------------------------------------------------- the examples, and every code


@pytest.mark.parametrize("example", EXAMPLES)
def test_the_examples_have_no_warnings(capsys, example, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = einpar(capsys, "check", example, "--json")
    assert (code, err, json.loads(out)["warnings"]) == (0, "", [])


EIGHT_AXES = program("mesh a=2 b=2 c=2 d=2 e=2 f=2 g=2 h=2", "dim M=256 N=256 K=256",
                     "input x[M, K]", "param w[K, N]", "y[M, N] = x[M, K] * w[K, N]", "output y")


def test_W104_an_op_searched_in_part_is_reported_by_compile(capsys, tmp_path, monkeypatch):
    """A matmul on 8 axes has 4^8 strategies (each axis splits M, N or K, or none): too many to
    search together, so the partitioner goes axis by axis, and compile says so, at the statement."""
    monkeypatch.chdir(tmp_path)
    Path("p.ein").write_text(EIGHT_AXES)
    code, out, err = einpar(capsys, "compile", "p.ein", "--json")
    assert code == 0 and err == ""
    (found,) = json.loads(out)["warnings"]
    assert (found["code"], found["line"], found["col"]) == ("W104", 5, 1)
    assert found["message"] == ("'y' has 65,536 ways to lay out its work over the mesh's 8 axes, "
                                "too many to search together; the partitioner chose the plan axis "
                                "by axis (optimal along each axis, not proven jointly)")
    code, out, err = einpar(capsys, "compile", "p.ein", "--ignore", "W104")
    assert code == 0 and "W104" not in err
    code, out, err = einpar(capsys, "check", "p.ein")  # check plans nothing, so cannot know
    assert code == 0 and "W104" not in err


def test_W104_not_on_a_mesh_whose_strategies_fit_the_budget(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("p.ein").write_text(EIGHT_AXES.replace("e=2 f=2 g=2 h=2", "e=1 f=1 g=1 h=1"))
    code, out, err = einpar(capsys, "compile", "p.ein", "--json")
    assert (code, json.loads(out)["warnings"]) == (0, [])


def test_W102_not_for_a_product_inside_a_sum_that_binds_the_index():
    """D is free in the statement (from `+ x[B,D]`, summed by the rule), but inside sum[D](...)
    the product's D is summed by the sum written there, on purpose."""
    text = program("dim B=4 D=8", "input x[B,D]", "input v[B]",
                   "q[B] = sum[D](x[B,D] * v[B]) + x[B,D]", "output q")
    assert [w.code for w in lint(parse(text, FILE), text)] == []


def test_a_deep_expression_is_linted_without_recursion():
    depth = 199  # calls inside one another, up to the parser's limit (E101 past 200)
    text = program("dim B=4 K=2", "input x[B]", "input a[B,K]",
                   "y[B] = " + "exp(" * depth + "x[B] * a[B,K]" + ")" * depth, "output y")
    (found,) = lint(parse(text, FILE), text)
    assert (found.code, found.span.line) == ("W102", 4)


def test_every_warning_code_has_a_test_here():
    tested = {match.group(0) for name in globals() if name.startswith("test_")
              for match in [re.search(r"W\d{3}", name)] if match}
    assert tested == set(WARNING_CODES)
