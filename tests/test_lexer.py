"""The `.ein` Pygments lexer: registered under its alias, no error tokens on any example, and
used by compile, explain and the diagnostics."""

import re
from pathlib import Path

import pytest
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import Error, Keyword, Name

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*/*.ein"))


def test_pygments_finds_the_lexer_by_alias_and_file_name():
    assert get_lexer_by_name("ein").name == "ein"
    assert get_lexer_for_filename("model.ein").name == "ein"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_example_tokenizes_without_errors(path):
    text = path.read_text()
    tokens = list(get_lexer_by_name("ein").get_tokens(text))
    assert [t for t in tokens if t[0] is Error] == []
    assert "".join(value for _, value in tokens) == text  # every character, in order


def test_tokens_name_what_the_reader_sees():
    tokens = [(kind, value) for kind, value in get_lexer_by_name("ein").get_tokens(
        "mesh dp=2\ninput x[B@dp, S@(tp,sp)]: bf16\np[B,S] = softmax[S](x[B,S])  # rows\n")
        if value.strip()]
    assert (Keyword.Declaration, "mesh") in tokens and (Keyword.Type, "bf16") in tokens
    assert (Name.Variable, "x") in tokens and (Name.Label, "B") in tokens
    assert (Name.Attribute, "dp") in tokens and (Name.Attribute, "sp") in tokens
    assert (Name.Builtin, "softmax") in tokens
    assert tokens[-1][1] == "# rows"


def test_a_pipeline_and_its_schedule_tokenize():
    text = "repeat L@pp remat {\n  param w[D]\n}\nschedule 1f1b\n"
    tokens = list(get_lexer_by_name("ein").get_tokens(text))
    assert [t for t in tokens if t[0] is Error] == []
    assert (Name.Attribute, "pp") in tokens and (Keyword.Declaration, "repeat") in tokens
    assert "".join(value for _, value in tokens) == text


def test_a_tensor_named_like_a_reduction_is_a_tensor():
    tokens = list(get_lexer_by_name("ein").get_tokens("y[B] = sum[B] + 1\n"))
    assert (Name.Variable, "sum") in tokens


@pytest.mark.parametrize("argv, quoted", [
    (["check", "bad.ein"], "4 | "),  # a diagnostic's quoted source line
    (["compile", "good.ein"], " = sum["),  # a local op of the per-device program
    (["explain", "good.ein"], "1. line 4  "),  # a statement's header
])
def test_compile_explain_and_diagnostics_highlight_with_the_lexer(argv, quoted, tmp_path,
                                                                   monkeypatch):
    import io

    from rich.console import Console

    from einpar import cli

    good = "mesh tp=4\ndim I=8 J=8\ninput x[I@tp, J]\ny[I@tp] = sum[J](x[I, J])\noutput y\n"
    (tmp_path / "good.ein").write_text(good)
    (tmp_path / "bad.ein").write_text(good.replace("x[I, J]", "x[I, Q]"))
    monkeypatch.chdir(tmp_path)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, color_system="standard", width=120)
    monkeypatch.setattr(cli, "_consoles", lambda: (console, console))
    cli.main(argv)
    plain = re.compile(r"\x1b\[[0-9;]*m")
    line = next(line for line in screen.getvalue().splitlines() if quoted in plain.sub("", line))
    assert re.search(r"\x1b\[[0-9;]*34msum\x1b", line)  # the lexer's style for a function (blue)
    assert re.search(r"\x1b\[[0-9;]*32mJ\x1b", line)  # and for an index (green)
