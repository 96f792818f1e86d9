"""A `.ein` program as a specification: where its inputs and outputs live.

The layouts a user's per-device code is given and must return are the ones
the program writes: an input's or param's declared layout; an output's layout
on its `output` line, else on the statement that defines it, else replicated
(every device returns the whole output). A program is given as a path, as
`.ein` text, or as a loaded `einpar.ir.Program`.
"""

from __future__ import annotations

from pathlib import Path

from einpar.ir import Program
from einpar.layout import Layout


def as_program(program: Program | str | Path) -> Program:
    """A loaded Program from a Program, a path to a `.ein` file, or `.ein` text."""
    import einpar.api as ein

    if isinstance(program, Program):
        return program
    if isinstance(program, Path):
        return ein.load(program)
    if isinstance(program, str):
        # Program text always has a newline (a mesh or dim line, then statements); a path never.
        if "\n" not in program:
            return ein.load(program)
        return ein.compile_source(program)
    raise TypeError(f"expected a Program, a path to a .ein file or .ein text, not "
                    f"{type(program).__name__}")


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
