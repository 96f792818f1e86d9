"""Per-device blocks of whole arrays, and back: what each device of a mesh holds.

    >>> blocks = shard(x, "[B@dp, D]", "dp=2 tp=4")   # one block per device, row-major
    >>> assemble(blocks, "[B@dp, D]", "dp=2 tp=4")    # x again

Devices are numbered row-major over the mesh axes (the last axis varies
fastest), as everywhere in einpar; an axis splitting a dimension takes
contiguous blocks of it, the first axis written the major one. These wrap the
simulator's own `scatter` and `assemble` (backends/numpy_sim.py), so a block
here is the block einpar's devices hold.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence, Union

import numpy as np

from ..backends import numpy_sim
from ..ir import Program
from ..layout import Layout, Mesh
from ..tolerance import program_tolerance
from .relayout import LayoutLike, ProgramLike, as_program, parse_layout

MeshLike = Union[Mesh, Mapping[str, int], str, Program]

__all__ = ["MeshLike", "as_mesh", "shard", "assemble", "tolerance"]

_AXIS = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\d+)")


def as_mesh(mesh: MeshLike) -> Mesh:
    """A Mesh from a Mesh, a Program (its mesh), `{"dp": 2, "tp": 4}` or `"dp=2 tp=4"`
    (a leading `mesh` allowed)."""
    if isinstance(mesh, Mesh):
        return mesh
    if isinstance(mesh, Program):
        return mesh.mesh
    if isinstance(mesh, str):
        text = mesh.strip().removeprefix("mesh").strip()
        pairs = _AXIS.findall(text)
        if _AXIS.sub("", text).strip() or (text and not pairs):
            raise ValueError(f"cannot read mesh {mesh!r}: write its axes as 'dp=2 tp=4'")
        mesh = {name: int(size) for name, size in pairs}
    if isinstance(mesh, Mapping):
        for name, size in mesh.items():
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes are whole numbers "
                                 "of 1 or more")
        return Mesh(tuple(mesh.items()))
    raise TypeError(f"a mesh is a Mesh, a Program, a mapping such as {{'dp': 2}} or text such "
                    f"as 'dp=2 tp=4'; got {type(mesh).__name__}")


def _checked(layout: LayoutLike, rank: int, mesh: Mesh) -> Layout:
    parsed = parse_layout(layout, rank)
    if parsed is None:
        return Layout.replicated(rank)
    used = set()
    for axes in parsed.dims:
        for axis in axes:
            if axis not in mesh.names:
                raise ValueError(f"layout {layout!r} names axis '{axis}', which the mesh "
                                 f"({mesh}) does not have")
            if axis in used:
                raise ValueError(f"layout {layout!r} uses axis '{axis}' twice; an axis can "
                                 "split only one dimension")
            used.add(axis)
    return parsed


def shard(array, layout: LayoutLike, mesh: MeshLike) -> list[np.ndarray]:
    """Each device's block of the whole `array` under `layout`, in device order (row-major
    over the mesh axes). `layout` is a Layout or text such as `"[B@dp, D]"` (None:
    every device holds all of it)."""
    mesh = as_mesh(mesh)
    array = np.asarray(array)
    parsed = _checked(layout, array.ndim, mesh)
    if parsed.partial:
        raise ValueError(f"layout {layout!r} is partial: a whole array is split or copied, "
                         "not made partial (assemble combines partial blocks)")
    for dim, (size, axes) in enumerate(zip(array.shape, parsed.dims)):
        factor = parsed.split_factor(dim, mesh)
        if size % factor:
            named = "×".join(f"{axis}={mesh.size(axis)}" for axis in axes)
            raise ValueError(f"axes {named} do not evenly divide dimension {dim} of size {size} "
                             f"(layout {layout!r})")
    return numpy_sim.scatter(array, parsed, mesh)


def assemble(blocks: Sequence, layout: LayoutLike, mesh: MeshLike) -> np.ndarray:
    """The whole array the devices' `blocks` (in device order) make under `layout`: blocks
    put in place, a partial layout (`"[B, D] {sum: tp}"`) combined. Raises AssertionError
    when two devices holding copies of one block disagree."""
    mesh = as_mesh(mesh)
    blocks = [np.asarray(block) for block in blocks]
    if len(blocks) != mesh.num_devices:
        raise ValueError(f"the mesh ({mesh}) has {mesh.num_devices} devices; got "
                         f"{len(blocks)} blocks")
    shapes = {block.shape for block in blocks}
    if len(shapes) != 1:
        raise ValueError(f"every device holds a block of the same shape; got {sorted(shapes)}")
    (local,) = shapes
    parsed = _checked(layout, len(local), mesh)
    shape = tuple(size * math.prod(mesh.size(axis) for axis in axes)
                  for size, axes in zip(local, parsed.dims))
    return numpy_sim.assemble(blocks, parsed, shape, mesh)


def tolerance(program: ProgramLike, precision: str = "highest") -> float:
    """How far a backend's output may be from the reference's: the largest absolute
    difference, divided by the reference's largest magnitude (at least 1), may be at most
    this. It is the bound of the least precise dtype the program computes in: f64 1e-9,
    f32 1e-4, f16 6e-3, bf16 5e-2, f8e4m3 0.25, f8e5m2 0.5, integers and booleans exactly;
    with `precision="default"` (the accelerators' fast float32 matmul) f32 is judged at
    bf16's bound. See einpar/tolerance.py."""
    return program_tolerance(as_program(program), precision)
