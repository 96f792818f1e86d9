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
    "E220": "mesh axis used twice in a layout",
    "E221": "dimension not divisible by its mesh axes",
    "E222": "size must be positive",
    "E223": "number too large",
    "E230": "duplicate definition",
    "E231": "use before definition",
    "E232": "output never defined",
    "E233": "duplicate declaration",
    "E234": "value used outside its repeat block",
    "E235": "redefinition changes the type",
    "E236": "declaration not allowed here",
    "E300": "bad inputs file",
    "E301": "bad --set",
    "E302": "cannot read the program file",
    "E400": "not enough devices",
    "E401": "cannot join a run of several processes",
    "E402": "a run of several processes failed",
    "E410": "bad cluster",
    "E411": "mesh does not fit the cluster",
    "E420": "not enough memory",
    "E421": "would take too long",
}


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
        assert self.code in CODES, f"unregistered diagnostic code {self.code}"

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

    def line(self, file: str, line: int) -> str | None:
        text = self.texts.get(file)
        if text is None:
            return None
        lines = text.splitlines()
        return lines[line - 1] if 0 < line <= len(lines) else ""


def render_text(diagnostic: Diagnostic, sources: SourceMap) -> str:
    """rustc-style rendering: header, location, source lines with markers, hint.

    The primary span is underlined with `^`, labels with `-` and their note;
    spans on one line share that line's marker row.
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
        source_line = source_line.expandtabs(1)
        row = [" "] * (len(source_line) + 2)
        notes = []
        for span, marker, note in sorted(group, key=lambda mark: mark[0].col):
            # A span that runs past its line is underlined to the end of it.
            end = span.end_col if span.end_line == span.line else len(source_line) + 1
            start = span.col - 1
            length = max(1, end - span.col)
            row.extend(" " * max(0, start + length - len(row)))
            row[start:start + length] = marker * length
            if note:
                notes.append(note)
        out.append(f"{pad} |")
        out.append(f"{line:>{width}} | {source_line}")
        marked = "".join(row).rstrip()
        out.append(f"{pad} | {marked}" + (f" {'; '.join(notes)}" if notes else ""))
    if diagnostic.hint:
        out.append(f"{pad} |")
        out.append(f"{pad} = hint: {diagnostic.hint}")
    return "\n".join(out)


def render_json(diagnostics: tuple[Diagnostic, ...] | list[Diagnostic]) -> str:
    return json.dumps({"diagnostics": [d.to_dict() for d in diagnostics]}, indent=2)
