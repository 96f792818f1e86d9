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
                yield pytest.param(doc, program, first, expected, id=f"{doc.name}:{line}")


@pytest.mark.parametrize("doc, program, command, expected", list(command_examples()))
def test_documented_output_is_what_einpar_prints(doc, program, command, expected, tmp_path,
                                                 monkeypatch, capsys, update_goldens):
    argv = shlex.split(command)[2:]
    file = next(arg for arg in argv if arg.endswith(".ein"))
    (tmp_path / file).write_text(program)
    monkeypatch.chdir(tmp_path)
    main(argv)
    captured = capsys.readouterr()
    printed = (captured.out + captured.err).rstrip("\n") + "\n"
    if update_goldens and printed != expected:
        doc.write_text(doc.read_text().replace(f"{command}\n{expected}", f"{command}\n{printed}", 1))
        return
    assert printed.rstrip("\n") == expected.rstrip("\n")


def test_the_docs_have_command_examples():
    assert len(list(command_examples())) >= 29
