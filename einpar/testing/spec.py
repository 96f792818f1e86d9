"""A `.ein` program as a specification: where its inputs and outputs live.

The layouts a user's per-device code is given and must return are the ones
the program writes: an input's or param's declared layout; an output's layout
on its `output` line, else on the statement that defines it, else replicated
(every device returns the whole output). A program is given as a path, as
`.ein` text, or as a loaded `einpar.ir.Program`.
"""

from __future__ import annotations

from einpar.ir import Program
from einpar.layout import Layout

from .relayout import as_program  # noqa: F401 (a path, text or Program, as every helper takes it)


def _fill(layout: Layout | None, rank: int) -> Layout:
    return Layout.replicated(rank) if layout is None else layout


def input_layouts(program: Program) -> dict[str, Layout]:
    """Each input's and param's layout as declared (replicated where none is written)."""
    return {value.name: _fill(value.layout, value.type.rank) for value in program.inputs}


def output_layouts(program: Program) -> dict[str, Layout]:
    """Each output's layout: its `output` line's, else its statement's, else replicated."""
    layouts = {}
    for output in program.outputs:
        value = program.values[output.value]
        layout = output.layout if output.layout is not None else value.layout
        layouts[output.name] = _fill(layout, value.type.rank)
    return layouts
