"""Diagnostics: how einpar tells a user what is wrong with their program.

Every mistake in a `.ein` file, an inputs file or a `--set` becomes a
`Diagnostic` with a stable code, a message, the span it is about (1-based
line and column), and a hint where one helps. Diagnostics render as text in
the style of rustc and ruff (the source line with carets under the span) or
as JSON. Internal invariants use `assert`; users never see a traceback.

The codes are listed, with an example each, in docs/language.md.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field

# Stable diagnostic codes. Tests and docs refer to them; never renumber.
CODES = {
    "E100": "syntax error",
    "E101": "nested too deeply",
    "E200": "unknown index",
    "E201": "unknown tensor",
    "E202": "unknown mesh axis",
    "E203": "unknown dimension",
    "E204": "unknown function",
    "E205": "unknown dtype",
    "E210": "wrong number of indices",
    "E211": "sizes disagree",
    "E212": "index repeated",
    "E213": "reduction over an index the operand lacks",
    "E214": "bad arguments",
    "E215": "bad route",
    "E216": "layout in an expression",
    "E217": "bad take",
    "E218": "bad pos",
    "E220": "mesh axis used twice in a layout",
    "E221": "padded blocks that do not nest",
    "E222": "size must be positive",
    "E223": "number too large",
    "E224": "unknown kind of partial result",
    "E225": "braces not on a statement's left side",
    "E230": "duplicate definition",
    "E231": "use before definition",
    "E232": "output never defined",
    "E233": "duplicate declaration",
    "E234": "value used outside its repeat block",
    "E235": "redefinition changes the type",
    "E236": "declaration not allowed here",
    "E240": "no plan makes a pinned layout",
    "E250": "unknown declaration or modifier",
    "E251": "bad loss",
    "E252": "bad optimizer",
    "E253": "training declaration without a loss",
    "E254": "bad micro-batches",
    "E255": "gradient of a value that is not a float param",
    "E256": "bad pipelined repeat",
    "E257": "bad pipeline schedule",
    "E300": "bad inputs file",
    "E301": "bad --set",
    "E302": "cannot read the program file",
    "E303": "bad command-line usage",
    "E310": "id out of range",
    "E400": "not enough devices",
    "E401": "cannot join a run of several processes",
    "E402": "a run of several processes failed",
    "E410": "bad cluster",
    "E411": "mesh does not fit the cluster",
    "E412": "bad nccl-tests output",
    "E420": "not enough memory",
    "E421": "would take too long",
}

# Warnings: the program is valid but probably not what was meant. They never change
# the exit code; `--ignore CODE` or a `# einpar: ignore CODE` comment silences them.
WARNING_CODES = {
    "W100": "input or param never read",
    "W101": "value never used",
    "W102": "index summed in one operand of a product",
    "W103": "--set given twice",
    "W104": "layouts searched axis by axis",
}

# A line ends at `\n`, `\r\n` or a lone `\r` (as Python's universal newlines, which
# reading a file applies anyway), and nowhere else: not at a form feed, a vertical tab,
# U+0085, U+2028 or U+2029, which `str.splitlines` would also split on. The parser
# counts lines by this rule, so every line number and column means the same lines.
LINE_END = re.compile(r"\r\n|\r|\n")


def normalize_newlines(text: str) -> str:
    """`text` with every line end written `\n`; columns within lines are unchanged."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def source_lines(text: str) -> list[str]:
    """The lines of `text` by LINE_END; line N of a diagnostic is `source_lines(text)[N - 1]`."""
    lines = LINE_END.split(text.removeprefix("\ufeff"))  # a byte-order mark is not text
    if lines and lines[-1] == "":
        lines.pop()  # the final line end ends the last line; it does not start another
    return lines


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns are 1-based, end exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Label:
    """A secondary span with a short note ("first defined here")."""

    span: Span
    note: str


@dataclass(frozen=True)
class Diagnostic:
    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    labels: tuple[Label, ...] = ()
    severity: str = "error"

    def __post_init__(self) -> None:
        codes = WARNING_CODES if self.severity == "warning" else CODES
        assert self.code in codes, f"unregistered {self.severity} code {self.code}"

    def to_dict(self) -> dict:
        out: dict = {"code": self.code, "severity": self.severity, "message": self.message}
        if self.span is not None:
            out.update(file=self.span.file, line=self.span.line, col=self.span.col,
                       end_line=self.span.end_line, end_col=self.span.end_col)
        if self.hint:
            out["hint"] = self.hint
        if self.labels:
            out["labels"] = [{"file": l.span.file, "line": l.span.line, "col": l.span.col,
                              "note": l.note} for l in self.labels]
        return out


class EinparError(Exception):
    """Raised by any stage with one or more diagnostics for the user."""

    def __init__(self, diagnostics: list[Diagnostic] | Diagnostic, usage: bool = False):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics = tuple(diagnostics)
        # A usage error (exit code 2) is about the command line, not the program.
        self.usage = usage
        super().__init__("\n".join(f"{d.code}: {d.message}" for d in self.diagnostics))


@dataclass
class SourceMap:
    """The text of every file a diagnostic may point into, for rendering."""

    texts: dict[str, str] = field(default_factory=dict)
    # file -> (its text, that text's lines): split once, not once per diagnostic
    _lines: dict[str, tuple[str, list[str]]] = field(default_factory=dict, repr=False)

    def line(self, file: str, line: int) -> str | None:
        text = self.texts.get(file)
        if text is None:
            return None
        cached = self._lines.get(file)
        if cached is None or cached[0] is not text:
            cached = self._lines[file] = (text, source_lines(text))
        lines = cached[1]
        return lines[line - 1] if 0 < line <= len(lines) else ""


def _cell_width(char: str) -> int:
    """Terminal columns `char` takes: 0 for a combining mark, 2 for a wide (East Asian) one."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _displayed(line: str) -> tuple[str, list[int]]:
    """A source line as quoted, and the terminal column where each character starts (one
    more entry: where the line ends). A tab is shown as one space, as the parser counts it
    one column; control, format and separator characters (a form feed, U+2028, a
    right-to-left override) as one space, so they cannot break or reorder the quoted line."""
    shown: list[str] = []
    starts: list[int] = []
    cell = 0
    for char in line:
        if char == "\t" or unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            char = " "
        starts.append(cell)
        shown.append(char)
        cell += _cell_width(char)
    starts.append(cell)
    return "".join(shown), starts


def _marker_rows(marks, starts: list[int], line_length: int) -> list[str]:
    """The rows under a quoted line: every span's markers, then the notes.

    The rightmost note follows its markers on the first row; any other note hangs
    under its own span on rows of its own, joined to it by `|`, as rustc does, so a
    note is never read as being about a span to its left.
    """
    def cell(col: int) -> int:  # a column past the end of the line keeps counting cells
        return starts[col - 1] if col - 1 <= line_length else starts[-1] + col - 1 - line_length

    row: list[str] = []
    placed = []  # (start cell, note)
    for span, marker, note in sorted(marks, key=lambda mark: mark[0].col):
        # A span that runs past its line is underlined to the end of it.
        end_col = span.end_col if span.end_line == span.line else line_length + 1
        start, end = cell(span.col), cell(max(span.col, end_col))
        zero_width = span.col <= line_length and starts[span.col] == starts[span.col - 1]
        if end == start and start > 0 and zero_width:
            start -= 1  # a combining mark alone: under the letter it is drawn on
        length = max(1, end - start)
        row.extend(" " * max(0, start + length - len(row)))
        row[start:start + length] = marker * length
        placed.append((start, note))
    first = "".join(row).rstrip()
    hanging = [(start, note) for start, note in placed if note]
    if hanging and hanging[-1][0] == placed[-1][0]:
        first += " " + hanging.pop()[1]
    rows = [first]
    if hanging:
        def bars(upto: int) -> list[str]:
            line = [" "] * (upto + 1)
            for start, _ in hanging:
                if start <= upto:
                    line[start] = "|"
            return line

        rows.append("".join(bars(hanging[-1][0])).rstrip())
        for position in range(len(hanging) - 1, -1, -1):
            start, note = hanging[position]
            line = bars(start)
            line[start:] = note
            rows.append("".join(line))
    return rows


def render_text(diagnostic: Diagnostic, sources: SourceMap) -> str:
    """rustc-style rendering: header, location, source lines with markers, hint.

    The primary span is underlined with `^`, labels with `-` and their note;
    spans on one line share that line's marker row. Markers sit under the
    characters they mean in a terminal: after tabs, wide and combining characters.
    """
    out = [f"{diagnostic.severity}[{diagnostic.code}]: {diagnostic.message}"]
    marks = []  # (span, marker, note), primary first
    if diagnostic.span is not None:
        marks.append((diagnostic.span, "^", ""))
    marks.extend((label.span, "-", label.note) for label in diagnostic.labels)
    if not marks:
        if diagnostic.hint:
            out.append(f"  = hint: {diagnostic.hint}")
        return "\n".join(out)
    width = max(len(str(span.line)) for span, _, _ in marks)
    pad = " " * width
    first = marks[0][0]
    out.append(f"{pad}--> {first}")
    groups: dict[tuple[str, int], list] = {}
    for mark in marks:
        groups.setdefault((mark[0].file, mark[0].line), []).append(mark)
    for (file, line), group in groups.items():
        source_line = sources.line(file, line)
        if source_line is None:
            out.extend(f"{pad} = note: {note} ({span})" for span, _, note in group if note)
            continue
        if file != first.file:
            out.append(f"{pad}::: {group[0][0]}")
        shown, starts = _displayed(source_line)
        out.append(f"{pad} |")
        out.append(f"{line:>{width}} | {shown}")
        out.extend(f"{pad} | {row}" for row in _marker_rows(group, starts, len(source_line)))
    if diagnostic.hint:
        out.append(f"{pad} |")
        out.append(f"{pad} = hint: {diagnostic.hint}")
    return "\n".join(out)


def render_json(diagnostics: tuple[Diagnostic, ...] | list[Diagnostic]) -> str:
    return json.dumps({"diagnostics": [d.to_dict() for d in diagnostics]}, indent=2)
