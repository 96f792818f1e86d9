"""Hypothesis strategies drawn from a given program: its relayouts and its inputs.

    @given(relayouts(program), inputs(program))
    def test_any_layout_computes_the_same(relayout, arrays):
        assert_equivalent(program, layouts=relayout, inputs=arrays, backends=("numpy",))

`relayouts(program)` draws a layout for every tensor whose layout the program
writes or could write (inputs, params, statements' results, outputs), each one
the checker accepts: no mesh axis twice in a tensor, each dimension divisible
by its axes (a micro-batch's rows for a micro-batched index), never the axis
of a pipeline's stages, statements pinned with braces left as written.
`inputs(program)` draws arrays of the shapes and dtypes the program takes,
with edge values. `training_programs()` draws whole training steps.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ..backends.reference import numpy_dtype
from ..inputs import id_readers, random_inputs, with_default_state
from ..ir import FLOAT_DTYPES, Repeat, walk_ops
from ..layout import Layout, Mesh
from .generate import GeneratedProgram, programs
from .relayout import ProgramLike, as_program, layout_text, targets

__all__ = ["INPUT_KINDS", "LARGE_MAGNITUDE", "relayouts", "inputs", "training_programs"]

# What `inputs` draws each array as:
#   random  unit-scale values as `einpar run` draws them (params scaled by 1/sqrt(fan-in))
#   zeros   all zero (ids: row 0; booleans: all false)
#   ties    values on a coarse grid (multiples of 1/2), so maxima, top-k and sorts meet
#           equal values (ids: one row for all; booleans: all true)
#   large   the random values scaled up to LARGE_MAGNITUDE of the dtype (ids: the last row)
INPUT_KINDS = ("random", "zeros", "ties", "large")

# The largest magnitude `large` inputs reach, per dtype: as large as keeps exp() of an
# input finite (exp(88) overflows f32, exp(11) f16), and a contraction of a few hundred
# such products within f16's and the fp8 types' range.
LARGE_MAGNITUDE = {"f64": 500.0, "f32": 64.0, "bf16": 64.0, "f16": 8.0, "f8e4m3": 4.0,
                   "f8e5m2": 8.0}


def _stage_axes(program) -> set[str]:
    written = program.forward or program
    return {op.stage_axis for op in walk_ops(written.ops)
            if isinstance(op, Repeat) and op.stage_axis is not None}


def _batch_axes(program) -> tuple[str | None, set[str]]:
    """A micro-batched step's batch index and the axes that split it as written: drawn
    splits of that index keep to them (another axis there makes the partitioner refuse
    the loss accumulator's layout in a pipelined step, E240)."""
    written = program.forward or program
    if written.training is None or written.training.microbatches is None:
        return None, set()
    index = written.training.microbatches[0]
    axes = {axis for value in written.inputs if value.layout is not None
            and index in value.type.indices
            for axis in value.layout.dims[len(value.stacked_by):][value.type.indices.index(index)]}
    return index, axes


def _draw_split(draw, mesh: Mesh, target, batch: str | None, batch_axes: set[str],
                uneven: bool) -> Layout:
    """Each mesh axis splits at most one dimension: one whose size the axes on it divide, or
    with `uneven` any dimension's first axis (padded: LANGUAGE.md "Uneven dimensions") and
    each later one dividing the blocks the ones before leave (padding that nests)."""
    split: list[list[str]] = [[] for _ in target.sizes]
    blocks = list(target.sizes)  # each dimension's block under the axes drawn so far
    order = list(range(len(mesh.axes)))
    if len(order) > 1:
        order = draw(st.permutations(order))
    for position in order:
        axis, size = mesh.axes[position]
        fits = [d for d, block in enumerate(blocks)
                if (block % size == 0 or (uneven and not split[d] and target.indices[d] != batch))
                and (target.indices[d] != batch or axis in batch_axes)]
        choice = draw(st.sampled_from([None] + fits))
        if choice is not None:
            split[choice].append(axis)
            blocks[choice] = -(-blocks[choice] // size)
    return Layout(tuple(tuple(axes) for axes in split))


def relayouts(program: ProgramLike, *, names: Iterable[str] | None = None,
              uneven: bool = True) -> SearchStrategy[dict[str, str | None]]:
    """Re-annotations of `program` (a Program, path or text) that einpar accepts, as
    {tensor name: layout text or None}, for `assert_equivalent(layouts=...)`.

    Every tensor of `names` (default: all the program's inputs, params, statements' results
    and outputs of rank 1 or more, except statements pinned with braces) gets a layout
    drawn over the mesh's axes, or None: no annotation, the partitioner chooses (what
    hypothesis shrinks towards). With `uneven` (the default) a dimension may be split by
    axes that do not divide it (padded); the micro-batched index is never padded.
    """
    program = as_program(program)
    known = targets(program)
    chosen = list(known) if names is None else list(names)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ValueError(f"the program has no tensor {', '.join(map(repr, unknown))} to lay out "
                         f"(it has {', '.join(known)})")
    stage = _stage_axes(program)
    mesh = Mesh(tuple((axis, size) for axis, size in program.mesh.axes if axis not in stage))
    drawn = [known[name] for name in chosen if known[name].indices and not known[name].pinned]
    batch, batch_axes = _batch_axes(program)

    @st.composite
    def draw_relayout(draw) -> dict[str, str | None]:
        relayout: dict[str, str | None] = {}
        for target in drawn:
            if not mesh.axes or not draw(st.booleans()):
                relayout[target.name] = None
                continue
            layout = _draw_split(draw, mesh, target, batch, batch_axes, uneven)
            relayout[target.name] = layout_text(layout, target.indices)
        return relayout

    return draw_relayout()


def inputs(program: ProgramLike, *, kinds: Iterable[str] = INPUT_KINDS,
           nan: bool = False) -> SearchStrategy[dict[str, np.ndarray]]:
    """Arrays for every input and param of `program`, by name, in the shapes and dtypes
    `einpar run` takes (a stacked param with its repeat dims in front); optimizer state
    left at its default. Each array is drawn as one of `kinds` (INPUT_KINDS: random,
    zeros, ties, large); ids a `take` reads stay among its table's rows. With `nan`, a
    float array may hold a NaN (NaN-free by default)."""
    program = as_program(program)
    kinds = tuple(kinds)
    if not kinds or set(kinds) - set(INPUT_KINDS):
        raise ValueError(f"kinds must be a nonempty subset of {INPUT_KINDS}, got {kinds}")
    rows = {name: min(size for size, _ in readers) for name, readers in id_readers(program).items()}
    taken = [value for value in program.inputs if value.kind != "state"]

    @st.composite
    def draw_inputs(draw) -> dict[str, np.ndarray]:
        base = random_inputs(program, draw(st.integers(0, 2**32 - 1)))
        arrays = {}
        for value in taken:
            kind = draw(st.sampled_from(kinds))
            array = _edge(base[value.name], kind, value.type.dtype, rows.get(value.name, 10))
            if nan and value.type.dtype in FLOAT_DTYPES and array.size and draw(st.booleans()):
                where = draw(st.integers(0, array.size - 1))
                array = array.copy()
                array.reshape(-1)[where] = np.nan
            arrays[value.name] = array
        return with_default_state(program, arrays)

    return draw_inputs()


def _edge(array: np.ndarray, kind: str, dtype: str, rows: int) -> np.ndarray:
    """`array` (drawn as `einpar run` draws it) made into an array of `kind`."""
    if kind == "random":
        return array
    if dtype == "bool":
        return np.full(array.shape, kind == "ties", dtype=array.dtype) if kind != "large" else array
    if dtype == "i32":
        fill = {"zeros": 0, "ties": int(array.flat[0]) if array.size else 0, "large": rows - 1}[kind]
        return np.full(array.shape, fill, dtype=array.dtype)
    wide = array.astype(np.float64)
    if kind == "zeros":
        wide = np.zeros_like(wide)
    elif kind == "ties":
        wide = np.round(wide * 2) / 2
    else:
        peak = float(np.max(np.abs(wide))) if wide.size else 0.0
        wide = wide * (LARGE_MAGNITUDE[dtype] / peak) if peak else wide
    return wide.astype(numpy_dtype(dtype))


def training_programs(**kwargs) -> SearchStrategy[GeneratedProgram]:
    """Random training steps (`programs(training=True, ...)`): at least one param, a float32
    scalar loss declared with `loss`, and now and then an optimizer; einpar derives the
    gradients and the update. Takes `programs()`'s other arguments."""
    return programs(training=True, **kwargs)
