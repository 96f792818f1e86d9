"""The documentation's examples are run: what the docs show is what einpar prints.

A code block whose first line is `$ einpar check bad.ein` (or another file
name) is the output of checking the program in the code block just before it;
this test writes that program to the named file, runs the command in-process
and compares everything after the command line with what einpar printed.
"""

import re
import shlex
from pathlib import Path

import pytest

from einpar.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs"
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```\n", re.S | re.M)


def command_examples():
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        blocks = [(m.group(1), text[:m.start()].count("\n") + 1) for m in FENCE.finditer(text)]
        for (program, _), (shown, line) in zip(blocks, blocks[1:]):
            first, _, expected = shown.partition("\n")
            if first.startswith("$ einpar check ") and not first.endswith("missing.ein"):
                yield pytest.param(doc, line, program, first, expected, id=f"{doc.name}:{line}")


def rewrite_block(doc: Path, line: int, body: str) -> None:
    """Replace the body of the code block that starts at `line` of `doc`."""
    text = doc.read_text()
    for match in FENCE.finditer(text):
        if text[:match.start()].count("\n") + 1 == line:
            doc.write_text(text[:match.start(1)] + body + text[match.end(1):])
            return
    raise AssertionError(f"no code block at {doc.name}:{line}")


@pytest.mark.parametrize("doc, line, program, command, expected", list(command_examples()))
def test_documented_output_is_what_einpar_prints(doc, line, program, command, expected, tmp_path,
                                                 monkeypatch, capsys, update_goldens):
    argv = shlex.split(command)[2:]
    file = next(arg for arg in argv if arg.endswith(".ein"))
    (tmp_path / file).write_text(program)
    monkeypatch.chdir(tmp_path)
    main(argv)
    captured = capsys.readouterr()
    printed = (captured.out + captured.err).rstrip("\n") + "\n"
    if update_goldens and printed != expected:
        rewrite_block(doc, line, f"{command}\n{printed}")
        return
    assert printed.rstrip("\n") == expected.rstrip("\n")


def test_the_docs_have_command_examples():
    assert len(list(command_examples())) >= 29


def cost_examples():
    """`$ einpar cost ...` blocks: run on the repository's own examples, output as shown."""
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        for match in FENCE.finditer(text):
            first, _, expected = match.group(1).partition("\n")
            if first.startswith("$ einpar cost "):
                line = text[:match.start()].count("\n") + 1
                yield pytest.param(first, expected, id=f"{doc.name}:{line}")


@pytest.mark.parametrize("command, expected", list(cost_examples()))
def test_documented_cost_output_is_what_einpar_prints(command, expected, monkeypatch, capsys):
    monkeypatch.chdir(DOCS.parent)
    main(shlex.split(command)[2:])
    captured = capsys.readouterr()
    assert (captured.out + captured.err).rstrip("\n") == expected.rstrip("\n")


def test_the_docs_have_cost_examples():
    assert len(list(cost_examples())) >= 2
