"""The reshard algebra: the steps that turn one layout of a value into another.

This module is the one place that knows how layouts change:

- partial -> whole is an all-reduce; partial -> split is a reduce-scatter;
- split -> whole is an all-gather (of the minor-most axis of a dimension);
- split on one dimension -> split on another is an all-to-all;
- whole -> split is a local slice (free);
- split over one axis -> split over another of the same size is a permute.

`plan_reshard(src, dst, ...)` returns the cheapest sequence it knows (bytes
sent per device first, then fewer steps), trying partials-first and
gathers-first orders. Byte counts follow the bandwidth-optimal algorithms
over a group of n devices (ring all-gather and reduce-scatter; all-reduce as
the two in turn): all-gather (n-1)/n of the gathered size, reduce-scatter
(n-1)/n of the size before scattering, all-reduce 2(n-1)/n of the size,
all-to-all (n-1)/n of the local size, permute the local size. Sizes are
split into n equal chunks of ceil(elements / n) elements; a dimension its
axes do not divide is padded first (layout.py), so a reduce-scatter or an
all-to-all onto it sends chunks of the padded blocks, as GSPMD does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Union

from .layout import DTYPE_BYTES, Layout, Mesh


def group_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    size = 1
    for axis in axes:
        size *= mesh.size(axis)
    return size


def _elements(layout: Layout, shape: tuple[int, ...], mesh: Mesh) -> int:
    total = 1
    for size in layout.local_shape(shape, mesh):
        total *= size
    return total


def collective_bytes(kind: str, elements: int, n: int) -> int:
    """Elements each device sends for one collective over a group of `n` devices, from the
    elements it holds before it: the convention of this module's docstring, which
    `backends/hlo_collectives` applies to XLA's collectives too."""
    chunk = -(-elements // n)
    return {"all_gather": (n - 1) * elements, "reduce_scatter": (n - 1) * chunk,
            "all_reduce": 2 * (n - 1) * chunk, "all_to_all": (n - 1) * chunk,
            "permute": elements, "slice": 0}[kind]


@dataclass(frozen=True)
class AllGather:
    """Every device along `axis` gets the blocks of `dim` the others hold."""

    axis: str
    dim: int
    kind = "all_gather"

    @property
    def axes(self) -> tuple[str, ...]:
        return (self.axis,)

    def apply(self, layout: Layout) -> Layout:
        assert layout.dims[self.dim][-1:] == (self.axis,), (layout, self)
        return layout.unsplit(self.dim)

    def bytes_per_device(self, before: Layout, shape, dtype: str, mesh: Mesh) -> int:
        return collective_bytes(self.kind, _elements(before, shape, mesh),
                                mesh.size(self.axis)) * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ReduceScatter:
    """Combine the partial values along `axis`; each device keeps one block of `dim`."""

    axis: str
    dim: int
    op: str  # sum, max, min
    kind = "reduce_scatter"

    @property
    def axes(self) -> tuple[str, ...]:
        return (self.axis,)

    def apply(self, layout: Layout) -> Layout:
        assert layout.partial_kind(self.axis) == self.op, (layout, self)
        return layout.without_partial((self.axis,)).split(self.dim, self.axis)

    def bytes_per_device(self, before: Layout, shape, dtype: str, mesh: Mesh) -> int:
        # The chunks are the blocks after it, padded where the axis does not divide `dim`.
        n = mesh.size(self.axis)
        return collective_bytes(self.kind, n * _elements(self.apply(before), shape, mesh),
                                n) * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class AllReduce:
    """Combine the partial values over `axes`; every device gets the whole result."""

    axes: tuple[str, ...]
    op: str
    kind = "all_reduce"

    def apply(self, layout: Layout) -> Layout:
        assert all(layout.partial_kind(axis) == self.op for axis in self.axes), (layout, self)
        return layout.without_partial(self.axes)

    def bytes_per_device(self, before: Layout, shape, dtype: str, mesh: Mesh) -> int:
        return collective_bytes(self.kind, _elements(before, shape, mesh),
                                group_size(mesh, self.axes)) * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class AllToAll:
    """Move the split over `axis` from dimension `src_dim` to `dst_dim`."""

    axis: str
    src_dim: int
    dst_dim: int
    kind = "all_to_all"

    @property
    def axes(self) -> tuple[str, ...]:
        return (self.axis,)

    def apply(self, layout: Layout) -> Layout:
        assert layout.dims[self.src_dim][-1:] == (self.axis,), (layout, self)
        return layout.unsplit(self.src_dim).split(self.dst_dim, self.axis)

    def bytes_per_device(self, before: Layout, shape, dtype: str, mesh: Mesh) -> int:
        # Chunks of the block with `dst_dim` padded to n of its blocks after the step.
        n = mesh.size(self.axis)
        local = before.local_shape(shape, mesh)
        after = self.apply(before).local_shape(shape, mesh)
        padded = _elements(before, shape, mesh) // local[self.dst_dim] * n * after[self.dst_dim] \
            if local[self.dst_dim] else 0
        return collective_bytes(self.kind, padded, n) * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class Slice:
    """Keep one block of `dim` per device along `axis`: local, nothing sent."""

    axis: str
    dim: int
    kind = "slice"

    @property
    def axes(self) -> tuple[str, ...]:
        return (self.axis,)

    def apply(self, layout: Layout) -> Layout:
        assert layout.dim_of(self.axis) is None and layout.partial_kind(self.axis) is None
        return layout.split(self.dim, self.axis)

    def bytes_per_device(self, before: Layout, shape, dtype: str, mesh: Mesh) -> int:
        return 0


@dataclass(frozen=True)
class Permute:
    """Dimension `dim`, split over `src_axis`, becomes split over `dst_axis` (same size).

    The device at (src_axis=i, dst_axis=j) needs block j, which the devices at
    src_axis=j hold; the one at dst_axis=i sends it. One local block each.
    """

    src_axis: str
    dst_axis: str
    dim: int
    kind = "permute"

    @property
    def axes(self) -> tuple[str, ...]:
        return (self.src_axis, self.dst_axis)

    def apply(self, layout: Layout) -> Layout:
        assert layout.dims[self.dim] == (self.src_axis,) and layout.dim_of(self.dst_axis) is None
        dims = list(layout.dims)
        dims[self.dim] = (self.dst_axis,)
        return Layout(tuple(dims), layout.partial)

    def bytes_per_device(self, before: Layout, shape, dtype: str, mesh: Mesh) -> int:
        return collective_bytes(self.kind, _elements(before, shape, mesh), 1) * DTYPE_BYTES[dtype]


Step = Union[AllGather, ReduceScatter, AllReduce, AllToAll, Slice, Permute]


@dataclass(frozen=True)
class ReshardPlan:
    src: Layout
    dst: Layout
    steps: tuple[Step, ...]
    bytes_per_device: int


class ReshardError(ValueError):
    """No sequence of steps reaches `dst` (it asks for a partial value `src` is not)."""


def _is_prefix(short: tuple, long: tuple) -> bool:
    return long[:len(short)] == short


def _resolve_partials(cur: Layout, dst: Layout, steps: list) -> Layout:
    reduce_all: dict[str, list[str]] = {}
    for axis, op in cur.partial:
        if dst.partial_kind(axis) == op:
            continue
        target = next((d for d, want in enumerate(dst.dims)
                       if _is_prefix(cur.dims[d] + (axis,), want)), None)
        if target is not None and cur.dim_of(axis) is None:
            step = ReduceScatter(axis, target, op)
            steps.append(step)
            cur = step.apply(cur)
        else:
            reduce_all.setdefault(op, []).append(axis)
    for op, axes in sorted(reduce_all.items()):
        step = AllReduce(tuple(axes), op)
        steps.append(step)
        cur = step.apply(cur)
    return cur


def _remove_splits(cur: Layout, dst: Layout, steps: list, mesh: Mesh) -> Layout:
    changed = True
    while changed:
        changed = False
        for d, axes in enumerate(cur.dims):
            if _is_prefix(axes, dst.dims[d]):
                continue
            axis = axes[-1]
            # A dimension split by one axis where the destination splits it by another
            # of the same size, that axis free: a permute moves each block where it goes.
            if len(axes) == 1 and len(dst.dims[d]) >= 1 and dst.dims[d][0] != axis:
                other = dst.dims[d][0]
                if mesh.size(other) == mesh.size(axis) and cur.dim_of(other) is None \
                        and cur.partial_kind(other) is None and dst.dim_of(axis) is None:
                    step: Step = Permute(axis, other, d)
                    steps.append(step)
                    cur = step.apply(cur)
                    changed = True
                    continue
            target = next((e for e, want in enumerate(dst.dims)
                           if e != d and _is_prefix(cur.dims[e] + (axis,), want)), None)
            step = AllToAll(axis, d, target) if target is not None else AllGather(axis, d)
            steps.append(step)
            cur = step.apply(cur)
            changed = True
    return cur


def _add_splits(cur: Layout, dst: Layout, steps: list) -> Layout:
    for d, want in enumerate(dst.dims):
        while len(cur.dims[d]) < len(want):
            step = Slice(want[len(cur.dims[d])], d)
            steps.append(step)
            cur = step.apply(cur)
    return cur


@lru_cache(maxsize=65536)
def plan_reshard(src: Layout, dst: Layout, shape: tuple[int, ...], dtype: str, mesh: Mesh) -> ReshardPlan:
    """The cheapest known steps from `src` to `dst` for a value of `shape` and `dtype`.

    A pure function of hashable arguments, cached: the partitioner asks the same
    question for many candidate strategies.
    """
    if src == dst:
        return ReshardPlan(src, dst, (), 0)
    for axis, op in dst.partial:
        if src.partial_kind(axis) != op:
            raise ReshardError(f"cannot make a value partial ({op} over {axis}) by resharding")
    plans = []
    for partials_first in (True, False):
        steps: list[Step] = []
        cur = src
        if partials_first:
            cur = _resolve_partials(cur, dst, steps)
            cur = _remove_splits(cur, dst, steps, mesh)
        else:
            cur = _remove_splits(cur, dst, steps, mesh)
            cur = _resolve_partials(cur, dst, steps)
        cur = _add_splits(cur, dst, steps)
        assert cur == dst, (src, dst, cur, steps)
        layouts = [src]
        total = 0
        for step in steps:
            total += step.bytes_per_device(layouts[-1], shape, dtype, mesh)
            layouts.append(step.apply(layouts[-1]))
        plans.append(ReshardPlan(src, dst, tuple(steps), total))
    return min(plans, key=lambda plan: (plan.bytes_per_device, len(plan.steps)))
