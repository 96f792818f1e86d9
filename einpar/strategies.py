"""The strategies of one op: what each mesh axis does in it, and the layouts that follow.

A strategy assigns every mesh axis one role, in the op's index space (the
shardy way of writing sharding rules as einsums over factors):

- split an index: every operand and the result that have that index are
  split along the axis (an operand without it holds copies);
- split a reduced index (a contraction's summed index, a reduction's index):
  each device reduces its block, and the result is partial over the axis; a
  take's table index (V) is such an index: each device looks up the ids in
  its block of rows, zeros for the others' (Megatron's vocabulary-parallel
  embedding), and a scatter-add's ids indices are too (each device adds its
  share of the update rows), except batch indices (of a batched take's table
  and ids, of a scatter-add's ids and result): those are kept, and split
  like any kept index, on every operand that has them alike;
- keep some operands partial (`Partial`), where the op is linear in them: a
  sum of partial sums, a partial sum times a whole value, a contraction or a
  sum of one partial operand, a max of partial maxima;
- nothing (None): the axis holds copies and repeats the work.

The roles of one axis are listed by `axis_roles`; a strategy is one role per
axis (`build`), valid when the blocks of every split index nest (an index its
axes do not divide is padded, layout.uneven_conflict: each axis after its
first divides the block the ones before leave). The
partitioner (partition.py) chooses among them for the whole program at once.
An axis of size 1 splits nothing, so its only role is None, and layouts are
compared without such axes (`strip`): they hold the same blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .flops import op_flops
from .ir import Apply, Arg, Cast, Const, Einsum, Library, Map, Op, Reduce, Route, Scalar, ScatterAdd, Take
from .layout import Layout, Mesh

PARTIAL = "(partial)"  # how a partial role prints in an assignment (spmd.LocalStep)


@dataclass(frozen=True)
class Partial:
    """The axis keeps operands `positions` partial (`kind`), and so the result."""

    positions: tuple[int, ...]
    kind: str


Role = Union[None, str, Partial]


@dataclass(frozen=True)
class Strategy:
    roles: tuple[Role, ...]  # one per mesh axis, in mesh order
    operand_layouts: tuple[Layout, ...]
    result_layout: Layout
    local_sizes: tuple[tuple[str, int], ...]  # the op's indices, as each device computes them
    flops: int

    def assignment(self, mesh: Mesh) -> tuple[tuple[str, str | None], ...]:
        """Mesh axis -> the index it splits, PARTIAL or None (as spmd.LocalStep records it)."""
        return tuple((axis, PARTIAL if isinstance(role, Partial) else role)
                     for axis, role in zip(mesh.names, self.roles))


def linear_in(expr: Scalar, partial: set[int]) -> str:
    """'partial' if the expression of partial sums `partial` is itself a partial sum,
    'whole' if it reads none of them, 'no' otherwise."""
    if isinstance(expr, Arg):
        return "partial" if expr.index in partial else "whole"
    if isinstance(expr, Cast):
        return linear_in(expr.arg, partial)
    if not isinstance(expr, Apply):
        return "whole"
    kinds = [linear_in(arg, partial) for arg in expr.args]
    if "no" in kinds:
        return "no"
    if all(kind == "whole" for kind in kinds):
        return "whole"
    if expr.fn in ("add", "sub"):
        return "partial" if all(kind == "partial" for kind in kinds) else "no"
    if expr.fn == "mul":
        return "partial" if kinds.count("partial") == 1 else "no"
    if expr.fn == "div":
        return "partial" if kinds == ["partial", "whole"] else "no"
    if expr.fn == "neg":
        return "partial"
    return "no"


def op_indices(op: Op) -> tuple[tuple[str, ...], tuple[str, ...], frozenset[str]]:
    """(index space, reduced indices, indices that must stay whole)."""
    result = op.result.type.indices
    space: list[str] = []
    for operand in op.operands:
        space.extend(i for i in operand.indices if i not in space)
    space.extend(i for i in result if i not in space)
    reduced = tuple(i for i in space if i not in result)
    whole: set[str] = set()
    if isinstance(op, Library):  # cumsum
        whole.add(op.index)
    if isinstance(op, Route):
        whole |= {op.expert, op.capacity, op.token}
    return tuple(space), reduced, frozenset(whole)


def partial_roles(op: Op) -> list[Partial]:
    """The ways an axis can keep operands partial through `op` (the op is linear in them)."""
    if isinstance(op, Einsum):
        return [Partial((k,), "sum") for k in range(len(op.operands))]
    if isinstance(op, Reduce) and op.kind in ("sum", "max", "min"):
        return [Partial((0,), op.kind)]
    if isinstance(op, (Take, ScatterAdd)):  # linear in the table (the update), never in the ids
        return [Partial((0,), "sum")]
    if isinstance(op, Map):
        n = len(op.operands)
        if n == 0 and isinstance(op.expr, Const) and op.expr.value == 0:
            return [Partial((), "sum")]  # zeros are a partial sum of zeros on every device
        roles = []
        for mask in range(1, 2 ** n):
            positions = tuple(k for k in range(n) if mask >> k & 1)
            if linear_in(op.expr, set(positions)) == "partial":
                roles.append(Partial(positions, "sum"))
        return roles
    return []


def axis_roles(op: Op, mesh: Mesh, axis: str) -> list[Role]:
    """Every role `axis` may take in `op`: None first, then the indices, then partials."""
    if mesh.size(axis) == 1:
        return [None]
    space, _, whole = op_indices(op)
    return [None, *(i for i in space if i not in whole), *partial_roles(op)]


def reduce_kind(op: Op) -> str:
    return "sum" if isinstance(op, Einsum) else getattr(op, "kind", "sum")


def build(op: Op, mesh: Mesh, sizes: dict[str, int], roles: tuple[Role, ...]) -> Strategy | None:
    """The strategy with these roles, or None where a split index's padded blocks do not nest.
    Each device computes on its padded blocks, so the FLOPs count the padding."""
    split: dict[str, list[str]] = {}
    for axis, role in zip(mesh.names, roles):
        if isinstance(role, str):
            split.setdefault(role, []).append(axis)
    blocks = {}  # index -> its local (padded) size
    for index, axes in split.items():
        block = sizes[index]
        for k, axis in enumerate(axes):
            if k and block % mesh.size(axis):
                return None
            block = -(-block // mesh.size(axis))
        blocks[index] = block
    space, reduced, _ = op_indices(op)
    operand_layouts = []
    for position, operand in enumerate(op.operands):
        partial = [(axis, role.kind) for axis, role in zip(mesh.names, roles)
                   if isinstance(role, Partial) and position in role.positions]
        operand_layouts.append(Layout(tuple(tuple(split.get(i, ())) for i in operand.indices),
                                      tuple(partial)))
    partial = []
    for axis, role in zip(mesh.names, roles):
        if isinstance(role, Partial):
            partial.append((axis, role.kind))
        elif role in reduced:
            partial.append((axis, reduce_kind(op)))
    result = Layout(tuple(tuple(split.get(i, ())) for i in op.result.type.indices), tuple(partial))
    local = {i: blocks.get(i, sizes[i]) for i in space}
    return Strategy(tuple(roles), tuple(operand_layouts), result, tuple(local.items()),
                    op_flops(op, local))


def strip(layout: Layout, mesh: Mesh) -> Layout:
    """`layout` without the axes of size 1 (it holds the same blocks)."""
    ones = {axis for axis, size in mesh.axes if size == 1}
    if not ones or not layout.dims and not layout.partial:
        return layout
    return Layout(tuple(tuple(a for a in axes if a not in ones) for axes in layout.dims),
                  tuple((a, kind) for a, kind in layout.partial if a not in ones))


def describe(op: Op, roles: tuple[Role, ...], mesh: Mesh) -> str:
    """The strategy in words, axis by axis."""
    _, reduced, _ = op_indices(op)
    words = []
    for axis, role in zip(mesh.names, roles):
        if role is None:
            words.append(f"{axis}: copies")
        elif isinstance(role, Partial):
            words.append(f"{axis}: stays partial (the op is linear in it)")
        elif role in reduced:
            words.append(f"{axis}: splits {role}, which is reduced, so each device computes a "
                         "partial result")
        else:
            words.append(f"{axis}: splits {role}")
    return "; ".join(words) or "one device"


def short(op: Op, roles: tuple[Role, ...], mesh: Mesh) -> str:
    """The strategy in a few words, axis by axis (axes of size 1 left out):
    `dp: B, tp: F (reduced)`, `dp: copies, tp: partial`."""
    _, reduced, _ = op_indices(op)
    words = []
    for (axis, size), role in zip(mesh.axes, roles):
        if isinstance(role, Partial):
            words.append(f"{axis}: partial")
        elif role is not None:
            words.append(f"{axis}: {role}" + (" (reduced)" if role in reduced else ""))
        elif size > 1:
            words.append(f"{axis}: copies")
    return ", ".join(words) or "one device"
