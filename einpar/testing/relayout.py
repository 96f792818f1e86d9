"""Re-annotating a program's layouts, and the `.ein` text that reproduces a program.

A relayout maps tensor names to new layouts for every place the program
writes that tensor's layout: its `input`/`param` declaration, the left side of
each statement that defines it, its `output` line. A layout is a `Layout`, a
text such as `"[B@dp, S, D@(tp,sp)]"` (index names as the program writes
them, or `_`), a tuple with one entry per dimension (`("dp", None, None)`),
or None for no annotation (the partitioner then chooses). Names a relayout
leaves out keep the layout written.

The program is rewritten as text, at the spans the parser recorded, so the
rewritten text is the whole program as written (comments included) with only
those annotations changed, and the mesh and dim sizes set to the ones the
`Program` was compiled with (`--set` overrides included): pasted into a file,
`einpar run FILE` runs exactly the program a test ran.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

from ..api import compile_source, load, read_source
from ..errors import EinparError, SourceMap, normalize_newlines, render_text
from ..ir import Program
from ..layout import Layout
from ..syntax import (DimDecl, IndexSpec, MeshDecl, Module, OutputDecl, Repeat, Span, Statement,
                      TensorDecl, parse)

LayoutLike = Union[Layout, str, Sequence[Union[str, Sequence[str], None]], None]
ProgramLike = Union[Program, str, "os.PathLike[str]"]
Relayout = Mapping[str, LayoutLike]

__all__ = ["LayoutLike", "ProgramLike", "Relayout", "Target", "as_program", "program_text",
           "targets", "parse_layout", "layout_text", "relayout_text", "apply_relayout",
           "format_relayout", "render_error"]


def as_program(program: ProgramLike, **sizes: int) -> Program:
    """A Program from a Program, a path to a `.ein` file, or `.ein` text; `sizes` override
    mesh axis and dim sizes as `--set` does. A string is text when it has a line break or
    names no file, else a path. Raises EinparError for a program einpar rejects."""
    if isinstance(program, Program):
        if sizes:
            return compile_source(program_text(program), program.file, sizes)
        return program
    if isinstance(program, os.PathLike):
        return load(program, sizes or None)
    if not isinstance(program, str):
        raise TypeError(f"expected a Program, a path or .ein text, got {type(program).__name__}")
    if "\n" not in program and (program.endswith(".ein") or Path(program).is_file()):
        return load(program, sizes or None)
    return compile_source(program, "<string>", sizes or None)


def _written(program: Program) -> Program:
    """The program as written: a training step's forward program holds the sizes and the
    declarations the text has (the derived step splits a micro-batched index)."""
    return program.forward or program


def _source(program: Program) -> str:
    text = program.source or read_source(program.file)
    return normalize_newlines(text.removeprefix("\ufeff"))


class _Offsets:
    """Span (1-based line and column) -> offset into the text."""

    def __init__(self, text: str):
        self.starts = [0]
        for line in text.split("\n"):
            self.starts.append(self.starts[-1] + len(line) + 1)

    def __call__(self, line: int, col: int) -> int:
        return self.starts[line - 1] + col - 1

    def span(self, span: Span) -> tuple[int, int]:
        return self(span.line, span.col), self(span.end_line, span.end_col)


def _items(items) -> list:
    """Every item, those inside repeat blocks included, in text order."""
    out = []
    for item in items:
        if isinstance(item, Repeat):
            out.extend(_items(item.body))
        else:
            out.append(item)
    return out


@dataclass(frozen=True)
class Target:
    """A tensor whose layout a relayout may set: its kind (input, param, def, output), its
    indices as first written, the sizes an axis product must divide (a micro-batch's rows
    for a micro-batched index), and whether a statement pins it with braces."""

    name: str
    kind: str
    indices: tuple[str, ...]
    sizes: tuple[int, ...]
    pinned: bool = False


def _module(program: Program) -> tuple[str, Module]:
    text = _source(program)
    return text, parse(text, program.file)


def targets(program: Program) -> dict[str, Target]:
    """Every tensor whose layout the program writes or could write, by name, in text order:
    inputs, params, statements' results, outputs (not a training step's `output w.grad`)."""
    written = _written(program)
    _, module = _module(program)
    sizes = dict(written.dim_sizes)
    if written.training is not None and written.training.microbatches is not None:
        index, count = written.training.microbatches
        sizes[index] //= count
    found: dict[str, Target] = {}
    for item in _items(module.items):
        if isinstance(item, (TensorDecl, Statement)):
            spec = item.spec if isinstance(item, TensorDecl) else item.lhs
            kind = item.kind if isinstance(item, TensorDecl) else "def"
            indices = tuple(index.name.text for index in spec.indices)
            previous = found.get(spec.name.text)
            pinned = spec.pin is not None or (previous is not None and previous.pinned)
            if previous is None:
                found[spec.name.text] = Target(spec.name.text, kind, indices,
                                               tuple(sizes[index] for index in indices), pinned)
            elif pinned:
                found[spec.name.text] = Target(previous.name, previous.kind, previous.indices,
                                               previous.sizes, True)
    for output in written.outputs:
        if "." not in output.name and output.name not in found and output.value in written.values:
            value = written.values[output.value]
            indices = value.type.indices
            found[output.name] = Target(output.name, "output", indices,
                                        tuple(sizes[index] for index in indices))
    return found


def parse_layout(layout: LayoutLike, rank: int | None = None,
                 indices: Sequence[str] | None = None) -> Layout | None:
    """A Layout from any LayoutLike (None stays None). Text is read by einpar's parser:
    `[B@dp, S, D@(tp,sp)]`, optionally followed by `{sum: tp}` (a partial value). With
    `rank`, the number of dimensions must be that; with `indices`, names in the text must be
    those (or `_`). Raises ValueError saying what is wrong."""
    if layout is None or isinstance(layout, Layout):
        result = layout
        written = None
    elif isinstance(layout, str):
        result, written = _read_layout_text(layout)
    elif isinstance(layout, Sequence):
        dims = []
        for entry in layout:
            if entry is None:
                dims.append(())
            elif isinstance(entry, str):
                dims.append((entry,) if entry else ())
            else:
                dims.append(tuple(entry))
        result, written = Layout(tuple(dims)), None
    else:
        raise TypeError(f"a layout is a Layout, text such as '[B@dp, D]', a tuple of axes per "
                        f"dimension, or None; got {type(layout).__name__}")
    if result is not None and rank is not None and len(result.dims) != rank:
        shown = f" ({', '.join(indices)})" if indices else ""
        raise ValueError(f"layout {layout!r} has {len(result.dims)} dimensions; the tensor has "
                         f"{rank}{shown}")
    if written and indices is not None:
        for got, expected in zip(written, indices):
            if got not in ("_", expected):
                raise ValueError(f"layout {layout!r} names index {got} where the tensor has "
                                 f"{expected} (its indices: {', '.join(indices)}; or write _)")
    return result


def _read_layout_text(text: str) -> tuple[Layout, tuple[str, ...]]:
    body = text.strip()
    if "\n" in body or "\r" in body:  # one layout is one line: nothing else rides along
        raise ValueError(f"cannot read layout {text!r}: a layout is one line, such as '[B@dp, D]'")
    if not body.startswith("["):
        body = f"[{body}]"
    try:
        module = parse(f"input t{body}\n", "<layout>")
    except EinparError as error:
        raise ValueError(f"cannot read layout {text!r}: {error.diagnostics[0].message}") from None
    if len(module.items) != 1 or not isinstance(module.items[0], TensorDecl):
        raise ValueError(f"cannot read layout {text!r}: expected one layout, such as '[B@dp, D]'")
    decl = module.items[0]
    dims = tuple(tuple(axis.text for axis in index.axes) for index in decl.spec.indices)
    partial = ()
    if decl.spec.pin is not None:
        partial = tuple((axis.text, entry.kind.text) for entry in decl.spec.pin.entries
                        for axis in entry.axes)
        unknown = {kind for _, kind in partial} - {"sum", "max", "min"}
        if unknown:
            raise ValueError(f"layout {text!r}: a value is partial as a sum, max or min, "
                             f"not {', '.join(sorted(unknown))}")
    return Layout(dims, partial), tuple(index.name.text for index in decl.spec.indices)


def _axes_text(axes: tuple[str, ...]) -> str:
    return axes[0] if len(axes) == 1 else "(" + ",".join(axes) + ")"


def layout_text(layout: Layout | None, indices: Sequence[str], separator: str = ", ") -> str:
    """`[B@dp, S, D]`: the layout written on `indices` (None: no annotation)."""
    dims = layout.dims if layout is not None else ((),) * len(indices)
    return "[" + separator.join(index + (f"@{_axes_text(axes)}" if axes else "")
                                for index, axes in zip(indices, dims)) + "]"


def format_relayout(relayout: Relayout | None) -> str:
    """A relayout as text: `{x: [B@dp, S, D], h: none}`; `as written` when it is empty."""
    if not relayout:
        return "as written"
    shown = []
    for name, layout in relayout.items():
        if layout is None:
            shown.append(f"{name}: none")
        elif isinstance(layout, str):
            shown.append(f"{name}: {layout}")
        else:
            parsed = parse_layout(layout)
            shown.append(f"{name}: {layout_text(parsed, ('_',) * len(parsed.dims))}")
    return "{" + ", ".join(shown) + "}"


def relayout_text(program: Program, relayout: Relayout | None = None) -> str:
    """The program as `.ein` text with `relayout` applied and the sizes it was compiled with.
    Raises ValueError for a name the program has no such tensor for, or a layout of the
    wrong rank or index names."""
    relayout = dict(relayout or {})
    written = _written(program)
    text, module = _module(program)
    known = targets(program)
    unknown = sorted(set(relayout) - set(known))
    if unknown:
        raise ValueError(f"the program has no tensor {', '.join(map(repr, unknown))} to lay out "
                         f"(it has {', '.join(known)})")
    layouts = {name: parse_layout(layout, len(known[name].indices), known[name].indices)
               for name, layout in relayout.items()}
    if any(layout is not None and layout.partial for layout in layouts.values()):
        raise ValueError("a relayout sets where values are held, not partial results: write "
                         "layouts without braces")
    offsets = _Offsets(text)
    edits: list[tuple[int, int, str]] = []
    for item in _items(module.items):
        edits.extend(_size_edits(item, written, offsets))
        edits.extend(_layout_edits(item, layouts, known, text, offsets))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _size_edits(item, written: Program, offsets: _Offsets) -> list[tuple[int, int, str]]:
    """Mesh and dim sizes written differently from the program's (a `--set` override)."""
    edits = []
    if isinstance(item, MeshDecl):
        for axis in item.axes:
            size = written.mesh.size(axis.name.text)
            if size != axis.size:
                edits.append((*offsets.span(axis.span), f"{axis.name.text}={size}"))
    elif isinstance(item, DimDecl):
        sizes = written.dim_sizes
        for binding in item.bindings:
            name = binding.name.text
            if binding.size is not None:
                differs = sizes[name] != binding.size
            else:
                differs = sizes[name] != sizes.get(binding.alias.text)
            if differs:
                edits.append((*offsets.span(binding.span), f"{name}={sizes[name]}"))
    return edits


def _layout_edits(item, layouts: dict[str, Layout | None], known: dict[str, Target], text: str,
                  offsets: _Offsets) -> list[tuple[int, int, str]]:
    if isinstance(item, (TensorDecl, Statement)):
        spec = item.spec if isinstance(item, TensorDecl) else item.lhs
        if spec.name.text not in layouts:
            return []
        start, end = offsets.span(spec.indices_span)
        return [(start, end, _bracket(layouts[spec.name.text], spec.indices, text[start:end]))]
    if isinstance(item, OutputDecl) and item.suffix is None and item.name.text in layouts:
        layout = layouts[item.name.text]
        after_name = offsets(item.name.span.end_line, item.name.span.end_col)
        if item.indices is None:  # `output y`: written with the value's own indices
            if layout is None:
                return []
            return [(after_name, after_name, layout_text(layout, known[item.name.text].indices))]
        start = text.index("[", after_name)
        end = text.index("]", start) + 1
        return [(start, end, _bracket(layout, item.indices, text[start:end]))]
    return []


def _bracket(layout: Layout | None, specs: tuple[IndexSpec, ...], old: str) -> str:
    separator = ", " if ", " in old or len(specs) < 2 else ","
    return layout_text(layout, [spec.name.text for spec in specs], separator)


def program_text(program: Program) -> str:
    """The program as `.ein` text, with the mesh and dim sizes it was compiled with."""
    return relayout_text(program)


def apply_relayout(program: Program, relayout: Relayout | None = None) -> tuple[str, Program]:
    """The program's text with `relayout` applied, and that text compiled. Raises ValueError
    with the diagnostic einpar prints when the checker rejects a layout."""
    text = relayout_text(program, relayout)
    try:
        return text, compile_source(text, program.file)
    except EinparError as error:
        raise ValueError(f"einpar rejects the layouts {format_relayout(relayout)}:\n"
                         + render_error(error, text, program.file)) from None


def render_error(error: EinparError, text: str, file: str) -> str:
    """Diagnostics as `einpar check` prints them (source line, carets, hint)."""
    sources = SourceMap({file: text})
    return "\n".join(render_text(diagnostic, sources) for diagnostic in error.diagnostics)

