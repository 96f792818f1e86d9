"""Layouts: how a value is spread over the mesh.

A Layout says, for each dimension of a value, which mesh axes split it (major
first), and over which axes the value is partial (each device holds a summand
or a candidate maximum, to be combined by the pending reduction). Local
shapes, the block a device holds and bytes per device all derive from a
Layout and a Mesh; nothing else stores them.

A dimension its axes do not divide is padded to the next multiple (as GSPMD
does): every device holds a block of ceil(size / parts) elements, block k
starting at k times that, and the last blocks hold padding past the real
size. Blocks nest only where each axis after a dimension's first divides the
block the axes before it leave (`uneven_conflict`), so that every reshard
step keeps the padding at the end.

Printed in the project's notation: `f32[8@dp,128,256@tp] {sum: tp}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Bytes per element of each dtype of the language.
DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "f8e4m3": 1, "f8e5m2": 1, "i32": 4,
               "bool": 1}


@dataclass(frozen=True)
class Mesh:
    """Named axes and their sizes, major to minor; devices in row-major order."""

    axes: tuple[tuple[str, int], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.axes)

    def size(self, axis: str) -> int:
        return self._sizes[axis]  # KeyError for an axis not in the mesh

    @cached_property
    def _sizes(self) -> dict[str, int]:
        # Asked for on every layout's local shape, so a lookup, not a scan of the axes.
        return dict(self.axes)

    @property
    def num_devices(self) -> int:
        total = 1
        for _, size in self.axes:
            total *= size
        return total

    def __str__(self) -> str:
        if not self.axes:
            return "mesh (one device)"
        return "mesh " + " ".join(f"{name}={size}" for name, size in self.axes)


@dataclass(frozen=True, eq=False)
class Layout:
    """Per dimension, the mesh axes that split it; plus pending partial reductions."""

    dims: tuple[tuple[str, ...], ...]
    # (axis, reduction) pairs: the value is a partial sum ("sum"), max ("max") or min
    # ("min") over axis. Kept sorted, so equal layouts compare equal.
    partial: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "partial", tuple(sorted(self.partial)))

    # Layouts are dictionary keys everywhere in the partitioner (a move's price, a value's
    # layouts): the hash of the nested tuples is computed once, and equality of one object
    # with itself is decided without comparing them. The cached hash is not pickled (string
    # hashes differ between processes).
    def __hash__(self) -> int:
        try:
            return self.__dict__["_hash"]
        except KeyError:
            self.__dict__["_hash"] = value = hash((self.dims, self.partial))
            return value

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if other.__class__ is not Layout:
            return NotImplemented
        return self.dims == other.dims and self.partial == other.partial

    def __getstate__(self) -> dict:
        return {"dims": self.dims, "partial": self.partial}

    def split(self, dim: int, axis: str) -> "Layout":
        """This layout with `axis` splitting `dim` further (as its minor-most axis)."""
        dims = list(self.dims)
        dims[dim] = dims[dim] + (axis,)
        return Layout(tuple(dims), self.partial)

    def unsplit(self, dim: int) -> "Layout":
        """This layout without the minor-most axis of `dim`."""
        dims = list(self.dims)
        dims[dim] = dims[dim][:-1]
        return Layout(tuple(dims), self.partial)

    def dim_of(self, axis: str) -> int | None:
        for dim, axes in enumerate(self.dims):
            if axis in axes:
                return dim
        return None

    def partial_kind(self, axis: str) -> str | None:
        return dict(self.partial).get(axis)

    def without_partial(self, axes) -> "Layout":
        return Layout(self.dims, tuple(p for p in self.partial if p[0] not in axes))

    @staticmethod
    def replicated(rank: int) -> "Layout":
        return Layout(((),) * rank)

    @property
    def is_replicated(self) -> bool:
        return not self.partial and all(not axes for axes in self.dims)

    def split_factor(self, dim: int, mesh: Mesh) -> int:
        factor = 1
        for axis in self.dims[dim]:
            factor *= mesh.size(axis)
        return factor

    def local_shape(self, shape: tuple[int, ...], mesh: Mesh) -> tuple[int, ...]:
        """Each device's block, padding included: ceil(size / parts) per dimension."""
        return tuple(-(-size // self.split_factor(d, mesh)) for d, size in enumerate(shape))

    def is_padded(self, shape: tuple[int, ...], mesh: Mesh) -> bool:
        """Whether some dimension's axes do not divide it (its last blocks hold padding)."""
        return any(size % self.split_factor(d, mesh) for d, size in enumerate(shape))

    def __str__(self) -> str:
        return format_dims(tuple("_" for _ in self.dims), self)


def _format_axes(axes: tuple[str, ...]) -> str:
    return axes[0] if len(axes) == 1 else "(" + ",".join(axes) + ")"


def format_dims(labels: tuple[str, ...], layout: Layout | None) -> str:
    """`[8@dp,128,256@tp] {sum: tp}` from per-dimension labels (sizes or index names)."""
    if layout is None:
        return "[" + ",".join(labels) + "]"
    parts = [f"{label}@{_format_axes(axes)}" if axes else label
             for label, axes in zip(labels, layout.dims)]
    text = "[" + ",".join(parts) + "]"
    if layout.partial:
        by_kind: dict[str, list[str]] = {}
        for axis, kind in layout.partial:
            by_kind.setdefault(kind, []).append(axis)
        # Several axes in parentheses, as in `D@(tp,sp)`, so the printed form pastes back
        # onto a statement's left side as a constraint.
        text += " {" + "; ".join(f"{kind}: {_format_axes(tuple(axes))}"
                                 for kind, axes in by_kind.items()) + "}"
    return text


def format_type(dtype: str, shape: tuple[int, ...], layout: Layout | None = None) -> str:
    """`f32[8@dp,128,256@tp] {sum: tp}`."""
    return dtype + format_dims(tuple(str(size) for size in shape), layout)


# ---- devices and blocks


def device_coords(mesh: Mesh, device: int) -> dict[str, int]:
    """Row-major position of `device`: the last mesh axis varies fastest."""
    coords: dict[str, int] = {}
    for name, size in reversed(mesh.axes):
        coords[name] = device % size
        device //= size
    return {name: coords[name] for name in mesh.names}


def device_at(mesh: Mesh, coords: dict[str, int]) -> int:
    device = 0
    for name, size in mesh.axes:
        device = device * size + coords[name]
    return device


def group_of(mesh: Mesh, device: int, axes: tuple[str, ...]) -> list[int]:
    """The devices that differ from `device` only along `axes`, in row-major order of `axes`."""
    coords = device_coords(mesh, device)
    members = [dict(coords)]
    for axis in axes:
        members = [dict(m, **{axis: k}) for m in members for k in range(mesh.size(axis))]
    return [device_at(mesh, m) for m in members]


def mesh_groups(mesh: Mesh, axes: tuple[str, ...], device_order=None) -> np.ndarray:
    """The devices of every group over `axes`: shape (groups, group size), members in
    ring order (the mesh's row-major order over `axes`); `device_order` maps them to
    a cluster's devices."""
    names = list(mesh.names)
    sizes = [size for _, size in mesh.axes]
    grid = np.arange(mesh.num_devices).reshape(sizes or [1])
    inside = [names.index(axis) for axis in axes]
    outside = [i for i in range(len(names)) if i not in inside]
    groups = np.transpose(grid, outside + inside).reshape(-1, int(np.prod([sizes[i] for i in inside])))
    if device_order is not None:
        groups = np.asarray(device_order)[groups]
    return groups


def block_index(layout: Layout, dim: int, mesh: Mesh, coords: dict[str, int]) -> int:
    """Which block of dimension `dim` a device holds: axes are major first."""
    index = 0
    for axis in layout.dims[dim]:
        index = index * mesh.size(axis) + coords[axis]
    return index


def block_slices(layout: Layout, shape: tuple[int, ...], mesh: Mesh, device: int) -> tuple[slice, ...]:
    """The part of the global array that `device` holds under `layout`: its block, clipped to
    the real size (a block of padding only is an empty slice)."""
    coords = device_coords(mesh, device)
    local = layout.local_shape(shape, mesh)
    slices = []
    for d, (n, size) in enumerate(zip(local, shape)):
        start = min(block_index(layout, d, mesh, coords) * n, size)
        slices.append(slice(start, min(start + n, size)))
    return tuple(slices)


def uneven_conflict(layout: Layout, shape: tuple[int, ...], mesh: Mesh) -> int | None:
    """A dimension whose padded blocks do not nest, or None: split by axes (a, b, ...), each
    axis after a must divide the block the axes before it leave (12 over dp=2 then tp=4
    leaves blocks of 6 that tp cannot split evenly), so that gathering or splitting one
    axis keeps the padding at the end of the dimension."""
    for d, (axes, size) in enumerate(zip(layout.dims, shape)):
        block = size
        for k, axis in enumerate(axes):
            if k and block % mesh.size(axis):
                return d
            block = -(-block // mesh.size(axis))
    return None


def format_local(layout: Layout, shape: tuple[int, ...], mesh: Mesh) -> str:
    """Each device's block: `[4,3 of 4,256]` where a dimension is padded, `3 of 4` meaning
    blocks of 4 elements of which the last holds 3 real ones (`0 of 2`: the last block is
    all padding)."""
    parts = []
    for d, (n, size) in enumerate(zip(layout.local_shape(shape, mesh), shape)):
        blocks = layout.split_factor(d, mesh)
        parts.append(str(n) if size % blocks == 0 else f"{max(0, size - (blocks - 1) * n)} of {n}")
    return "[" + ",".join(parts) + "]"


def local_bytes(layout: Layout, shape: tuple[int, ...], dtype: str, mesh: Mesh) -> int:
    total = DTYPE_BYTES[dtype]
    for size in layout.local_shape(shape, mesh):
        total *= size
    return total
