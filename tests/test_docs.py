"""The documentation is run: what the docs show is what einpar prints.

Every fenced block of every page in docs/ (and the README) is one of:

- a command block, whose first line is `$ einpar ...`: the command runs in a
  scratch folder where `examples/` is the repository's, and everything after
  the command line must be what einpar printed (trailing spaces aside; a line
  `...` stands for any number of lines, for timings). When the command names
  a `.ein` file that is not in the repository, the program is the block just
  before it;
- a program (```ein, or a plain block that declares an `output`): it must
  pass `einpar check`, unless the command block after it checks it and shows
  the diagnostic;
- a fragment of a program (other plain blocks of .ein text): it must parse;
- ```python: it runs, in the same scratch folder (in a process of its own); ```toml and ```json: they
  must load (a cluster file, JSON).

A block right after `<!-- docs-test: skip REASON -->` is not run; REASON
names the test that covers it instead (runs of several processes, say).
"""

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from einpar.cli import main
from einpar.errors import EinparError
from einpar.syntax import parse

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```\n", re.S | re.M)
SKIP = re.compile(r"<!-- docs-test: skip ([^>]*) -->\s*$")


class Block:
    def __init__(self, page: Path, text: str, match: re.Match):
        self.page = page
        self.lang = match.group(1)
        self.body = match.group(2)
        self.line = text[:match.start()].count("\n") + 1
        self.skip = SKIP.search(text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1] + "\n")

    @property
    def id(self) -> str:
        return f"{self.page.name}:{self.line}"

    @property
    def is_command(self) -> bool:
        return self.body.startswith("$ einpar ")

    @property
    def is_program(self) -> bool:
        return self.lang == "ein" or (self.lang == "" and not self.is_command
                                      and re.search(r"^output\b", self.body, re.M) is not None
                                      and re.search(r"^(dim|mesh|input) ", self.body, re.M) is not None)

    @property
    def is_fragment(self) -> bool:
        return self.lang == "" and not self.is_command and not self.is_program \
            and re.match(r"\s*(#|mesh |dim |dtype |input |param |output |repeat |[a-z]\w*\[)",
                         self.body) is not None


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        found.extend(Block(page, text, m) for m in FENCE.finditer(text))
    return found


ALL = blocks()


def matches(printed: list[str], shown: list[str]) -> bool:
    """`shown` equals `printed`, a `...` line in `shown` standing for any lines."""
    if not shown:
        return not printed
    if shown[0] == "...":
        return any(matches(printed[k:], shown[1:]) for k in range(len(printed) + 1))
    return bool(printed) and printed[0] == shown[0] and matches(printed[1:], shown[1:])


ERROR_FIGURE = re.compile(r"\d\.\d\de-\d\d")


def _rounding(lines: list[str]) -> list[str]:
    """Lines with the errors of outputs that pass masked: float rounding differs with the BLAS
    build below the tolerance (the `ok` and the tolerance are still compared)."""
    return [ERROR_FIGURE.sub("<error>", line) if line.endswith(" ok")
            or line.startswith("largest error") else line for line in lines]


def run_command(command: str, capsys) -> str:
    argv = shlex.split(command)[2:]
    if "--backend" in argv and argv[argv.index("--backend") + 1] == "jax":
        # JAX starts once per process with its device count: a process of its own.
        done = subprocess.run([sys.executable, "-m", "einpar", *argv], capture_output=True,
                              text=True, timeout=600)
        return done.stdout + done.stderr
    main(argv)
    captured = capsys.readouterr()
    return captured.out + captured.err


def rewrite_block(page: Path, line: int, body: str) -> None:
    text = page.read_text()
    for match in FENCE.finditer(text):
        if text[:match.start()].count("\n") + 1 == line:
            page.write_text(text[:match.start(2)] + body + text[match.end(2):])
            return
    raise AssertionError(f"no code block at {page.name}:{line}")


def run_block(block: Block, before: Block | None, after: Block | None, capsys) -> str | None:
    """Run one block in the current folder; the new text of a command block whose output
    differs (None if it matches, or the block is not a command)."""
    if block.is_command:
        command, _, shown = block.body.partition("\n")
        for arg in shlex.split(command)[2:]:
            if arg.endswith(".ein") and not (ROOT / arg).exists() and before is not None \
                    and not before.is_command and before.lang in ("", "ein"):
                Path(arg).write_text(before.body)  # the program is the block before
        printed = [line.rstrip() for line in run_command(command, capsys).rstrip("\n").split("\n")]
        expected = [line.rstrip() for line in shown.rstrip("\n").split("\n")]
        if not matches(_rounding(printed), _rounding(expected)):
            return command + "\n" + "\n".join(printed) + "\n"
    elif block.is_program and not (after is not None and after.is_command):  # else run by it
        Path("doc.ein").write_text(block.body)
        assert main(["check", "doc.ein"]) == 0, capsys.readouterr().err
        capsys.readouterr()
    elif block.is_fragment and not (after is not None and after.is_command):
        try:
            parse(block.body, "fragment.ein")
        except EinparError as error:
            raise AssertionError(f"does not parse: {error}") from None
    elif block.lang == "python":  # in a process of its own: it may start JAX its own way
        done = subprocess.run([sys.executable, "-c", block.body], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    elif block.lang == "toml":
        tomllib.loads(block.body)
    elif block.lang == "json":
        json.loads(block.body)
    return None


def page_params() -> list:
    params = []
    for page in PAGES:
        marks = [pytest.mark.slow] if "--backend jax\n" in page.read_text() else []
        params.append(pytest.param(page, id=page.name, marks=marks))
    return params


@pytest.mark.parametrize("page", page_params())
def test_every_block_of_the_page_runs_as_shown(page, tmp_path, monkeypatch, capsys, update_goldens):
    """The page's blocks in order, in one scratch folder where `examples/` is the repository's."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    mine = [b for b in ALL if b.page == page]
    failures, rewrites = [], []
    for index, block in enumerate(mine):
        if block.skip:
            continue
        before = mine[index - 1] if index else None
        after = mine[index + 1] if index + 1 < len(mine) else None
        try:
            new = run_block(block, before, after, capsys)
        except Exception as error:  # noqa: BLE001 - every block's failure is reported
            failures.append(f"{block.id}: {type(error).__name__}: {error}")
            continue
        if new is not None:
            if update_goldens and "\n...\n" not in block.body:
                rewrites.append((block.line, new))
            else:
                failures.append(f"{block.id}: printed\n{new}")
    for line, new in reversed(rewrites):  # from the end, so earlier line numbers hold
        rewrite_block(page, line, new)
    assert not failures, "\n\n".join(failures)


def test_skips_say_what_covers_them():
    skipped = [b for b in ALL if b.skip]
    for block in skipped:
        assert block.skip.group(1).strip(), f"{block.id}: say why and what covers it"
    assert len(skipped) <= 6


def test_the_docs_run_many_commands():
    assert len([b for b in ALL if b.is_command and not b.skip]) >= 90  # the runner finds them


def test_an_ellipsis_stands_for_lines_but_not_for_everything():
    assert matches(["a", "t1", "t2", "b"], ["a", "...", "b"])
    assert matches(["a", "b"], ["a", "...", "b"])
    assert not matches(["a", "x"], ["a", "...", "b"])
    assert not matches(["a", "b", "c"], ["a", "b"])
    for block in ALL:  # a shown output of only `...` would accept anything
        if block.is_command and "\n...\n" in block.body:
            shown = block.body.split("\n")[1:]
            assert any(line not in ("...", "") for line in shown), block.id
