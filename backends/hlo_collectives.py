"""The collectives in an optimized HLO module, and the bytes each device sends for them.

Reads the text of `jax.jit(...).lower(...).compile().as_text()`: every
all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute
(and their async `-start` forms), with its group size from
`replica_groups` and how many times it runs (a collective inside a while
loop runs once per trip; XLA records the trip count as `known_trip_count`).

Replica groups are read in all of XLA's forms: listed (`{{0,1},{2,3}}`),
iota (`[2,4]<=[8]`, `[4,2]<=[2,4]T(1,0)`), every device (`{}`), and the
named-mesh form GSPMD prints (`mesh['axis_0'=2,'axis_1'=4] {'axis_1'}`);
a permute's are its `source_target_pairs`.

Bytes follow einpar's convention (`einpar.reshard.collective_bytes`), so the
two can be put side by side: for a group of n devices, all-gather sends
(n-1)/n of its result, reduce-scatter (n-1) result-sized chunks, all-reduce
2(n-1) chunks of ceil(size/n) elements, all-to-all (n-1) such chunks, a
permute its block.

`price_collectives` prices them with einpar's cost model on a cluster, for
a program whose devices form `mesh` (device id = row-major position, as
JAX's mesh lays them out): each collective's groups are mapped to the mesh
axes they span (`group_axes`) and priced by
`cost_model.collectives.collective_time`, the function that prices einpar's
own plan, so the two are comparable.

Pure text processing: no JAX here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from einpar.layout import Mesh
from einpar.reshard import collective_bytes

# Bytes per element of HLO's element types.
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([\d,]*)\]")
_OPS = {"all-gather": "all_gather", "reduce-scatter": "reduce_scatter", "all-reduce": "all_reduce",
        "all-to-all": "all_to_all", "collective-permute": "permute"}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*")


@dataclass(frozen=True)
class HloCollective:
    kind: str  # all_gather, reduce_scatter, all_reduce, all_to_all, permute
    # (elements, bytes per element) of each array it makes (a combined collective makes several)
    arrays: tuple[tuple[int, int], ...]
    group: int  # devices in each replica group
    runs: int  # times it runs per step (trip counts of enclosing loops multiplied)
    # The devices of every group (a permute: every (source, target) pair); None if unread.
    groups: tuple[tuple[int, ...], ...] | None = None

    def before_bytes(self, size: int) -> int:
        """What each device holds before, of an array of `size` elements it makes: a
        gather's result is n blocks, a scatter's one chunk."""
        return {"all_gather": size // self.group, "reduce_scatter": size * self.group}.get(
            self.kind, size)

    @property
    def local_bytes(self) -> int:
        """Bytes each device holds before it, all arrays together (one run)."""
        return sum(self.before_bytes(size) * item_bytes for size, item_bytes in self.arrays)

    @property
    def bytes_per_device(self) -> int:
        total = 0
        for size, item_bytes in self.arrays:
            total += collective_bytes(self.kind, self.before_bytes(size), self.group) * item_bytes
        return total * self.runs


def _split_type(rest: str) -> tuple[str, str]:
    """(result type, text after it) of an instruction's right-hand side."""
    if rest.startswith("("):
        depth = 0
        for position, char in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                return rest[:position + 1], rest[position + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _arrays(type_text: str) -> list[tuple[int, int]]:
    """(elements, bytes per element) of each array in a type."""
    found = []
    for dtype, dims in _ARRAY.findall(type_text):
        elements = 1
        for size in filter(None, dims.split(",")):
            elements *= int(size)
        found.append((elements, _ITEM_BYTES[dtype]))
    return found


def _group_size(attributes: str, groups: np.ndarray | None, devices: int) -> int:
    """Devices in each group, given the groups `replica_groups` read (a permute's pairs
    are not groups)."""
    if groups is not None and groups.size and "source_target_pairs" not in attributes:
        return int(groups.shape[1])
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    if listed:
        return len(listed.group(1).split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes)
    if iota:
        return int(iota.group(2))
    return devices  # replica_groups={} (every device in one group), or a permute


def _iota(dims: str, transpose: str | None) -> np.ndarray:
    """XLA's iota tile assignment `<=[dims]T(perm)`: device ids 0.. laid out in `dims`,
    transposed by `perm`."""
    shape = [int(size) for size in dims.split(",") if size]
    ids = np.arange(math.prod(shape)).reshape(shape)
    if transpose:
        ids = ids.transpose([int(axis) for axis in transpose.split(",")])
    return ids


_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[([^\]]*)\]\s*(?:<=\[([\d,]+)\](?:T\(([\d,]+)\))?)?\s*\{([^}]*)\}")
_MESH_AXIS = re.compile(r"'([^']*)'=(\d+)")
_GROUP_AXIS = re.compile(r"'([^']*)'(?::\((\d+)\)(\d+))?")


def _mesh_groups(match: re.Match) -> np.ndarray:
    """The groups of the named-mesh form: devices differing only along the listed axes
    (`'x':(pre)size` is the sub-axis of size `size` after the first `pre` of axis x)."""
    axes = [(name, int(size)) for name, size in _MESH_AXIS.findall(match.group(1))]
    total = math.prod(size for _, size in axes)
    ids = (_iota(match.group(2), match.group(3)).reshape(-1) if match.group(2)
           else np.arange(total))
    # Split every axis that a sub-axis names into (before, the sub-axis, after).
    shape, names = [], []
    cuts = {name: (int(pre), int(size)) for name, pre, size in _GROUP_AXIS.findall(match.group(4))
            if pre}
    for name, size in axes:
        if name in cuts:
            pre, sub = cuts[name]
            shape += [pre, sub, size // (pre * sub)]
            names += [None, name, None]
        else:
            shape.append(size)
            names.append(name)
    wanted = [name for name, _, _ in _GROUP_AXIS.findall(match.group(4))]
    inside = [names.index(name) for name in wanted]
    outside = [i for i in range(len(shape)) if i not in inside]
    grid = ids.reshape(shape).transpose(outside + inside)
    return grid.reshape(-1, math.prod(shape[i] for i in inside))


def replica_groups(attributes: str, devices: int) -> np.ndarray | None:
    """The devices of every group, shape (groups, group size), read from an instruction's
    attributes; a permute's (source, target) pairs, shape (pairs, 2); None if none is
    written in a form read here."""
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attributes)
    if pairs:
        found = [tuple(map(int, pair)) for pair in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1))]
        return np.array(found, dtype=np.int64).reshape(-1, 2)
    named = _MESH_GROUPS.search(attributes)
    if named:
        return _mesh_groups(named)
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?",
                     attributes)
    if iota:
        return _iota(iota.group(3), iota.group(4)).reshape(int(iota.group(1)), int(iota.group(2)))
    listed = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attributes)
    if listed:
        groups = [tuple(map(int, filter(None, g.split(","))))
                  for g in re.findall(r"\{([\d,]*)\}", listed.group(1))]
        if not groups:
            return np.arange(devices).reshape(1, -1)  # {}: every device in one group
        if len({len(group) for group in groups}) == 1:
            return np.array(groups, dtype=np.int64)
    return None


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    bodies: dict[str, list[str]] = {}
    entry = ""
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            bodies[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    return bodies, entry


def hlo_collectives(text: str, devices: int) -> list[HloCollective]:
    """Every collective of an optimized HLO module, with the times it runs per step."""
    bodies, entry = _computations(text)
    found: list[HloCollective] = []

    def visit(name: str, runs: int, seen: tuple[str, ...]) -> None:
        for line in bodies.get(name, ()):
            head = _INSTRUCTION.match(line)
            if not head:
                continue
            type_text, rest = _split_type(line[head.end():])
            op = rest.split("(", 1)[0]
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                if body and body.group(1) not in seen:
                    visit(body.group(1), runs * (int(trips.group(1)) if trips else 1),
                          seen + (body.group(1),))
                continue
            if op in ("call", "conditional", "async-start"):
                # A conditional's branches each count once: an upper bound on what runs.
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                callees = re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", rest)
                callees += re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else []
                for callee in callees:
                    if callee not in seen:
                        visit(callee, runs, seen + (callee,))
                continue
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in _OPS:
                continue
            arrays = _arrays(type_text)
            if not arrays:
                continue
            if op.endswith("-start") and base == "all-gather":
                arrays = arrays[-1:]  # (operand, result): the result
            elif op.endswith("-start") and base == "collective-permute":
                arrays = arrays[:1]  # (operand, result, contexts...): one block
            groups = replica_groups(rest, devices)
            found.append(HloCollective(
                _OPS[base], tuple(arrays), _group_size(rest, groups, devices), runs,
                None if groups is None else tuple(map(tuple, groups.tolist()))))

    visit(entry, 1, (entry,))
    return found


def bytes_per_device(collectives: list[HloCollective]) -> int:
    return sum(c.bytes_per_device for c in collectives)


# ---- pricing them with einpar's cost model


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


def refined_mesh(mesh: Mesh) -> Mesh:
    """`mesh` with every axis split into its prime factors, major first (`tp=4` becomes
    `tp.0=2 tp.1=2`): the same devices in the same row-major order, so a group over part
    of an axis (2 of tp's 4 devices) still spans whole axes. A prime axis keeps its name."""
    axes = []
    for name, size in mesh.axes:
        factors = _prime_factors(size)
        if len(factors) == 1:
            axes.append((name, size))
        else:
            axes += [(f"{name}.{i}", factor) for i, factor in enumerate(factors)]
    return Mesh(tuple(axes))


def group_axes(groups: np.ndarray, mesh: Mesh, pairs: bool = False) -> tuple[tuple[str, ...], bool]:
    """The axes of `refined_mesh(mesh)` along which the members of `groups` (device ids,
    one group a row) differ, in mesh order, and whether the groups are exactly the sets of
    devices that differ only along them (else the axes cover the groups: an approximation).
    With `pairs`, the rows are a permute's (source, target) pairs: the axes they move along."""
    fine = refined_mesh(mesh)
    sizes = [size for _, size in fine.axes]
    if groups.size == 0 or groups.min() < 0 or groups.max() >= fine.num_devices:
        return fine.names, False  # not this mesh's devices: price over the whole mesh
    coords = np.stack(np.unravel_index(groups, sizes or [1]), axis=-1)  # (groups, members, axes)
    varies = (coords != coords[:, :1]).any(axis=1)  # (groups, axes)
    spanned = varies.any(axis=0)
    axes = tuple(name for name, used in zip(fine.names, spanned) if used)
    if pairs:
        return axes, True
    exact = bool((varies == spanned).all()) and groups.shape[1] == math.prod(
        size for size, used in zip(sizes, spanned) if used)
    return axes, exact


def mesh_axes_text(axes: tuple[str, ...], mesh: Mesh) -> str:
    """Refined axes written with the mesh's names: `tp` when all of tp's factors are there,
    else the factors (`tp.1`); `-` for none."""
    fine = refined_mesh(mesh)
    parts = []
    for name, _ in mesh.axes:
        own = [axis for axis in fine.names if axis == name or axis.startswith(name + ".")]
        used = [axis for axis in own if axis in axes]
        parts += [name] if used and used == own else used
    return ",".join(parts) or "-"


@dataclass(frozen=True)
class PricedCollective:
    collective: HloCollective
    axes: tuple[str, ...]  # axes of refined_mesh(mesh) its groups span
    exact: bool  # its groups are exactly those axes' groups
    time_s: float  # all its runs
    how: str  # the algorithm and link, as the cost model writes it


def price_collectives(collectives: list[HloCollective], mesh: Mesh, cluster) -> list[PricedCollective]:
    """Each collective priced by einpar's cost model (`collective_time`) on `cluster`, over
    the mesh axes its groups span, once per run; a collective whose groups were not read is
    priced over the whole mesh (not exact)."""
    from einpar.cost_model.collectives import collective_time

    fine = refined_mesh(mesh)
    priced = []
    for collective in collectives:
        if collective.groups is None:
            axes, exact = fine.names, False
        else:
            axes, exact = group_axes(np.array(collective.groups, dtype=np.int64), mesh,
                                     pairs=collective.kind == "permute")
        cost = collective_time(collective.kind, axes, collective.local_bytes, fine, cluster)
        priced.append(PricedCollective(collective, axes, exact, cost.time_s * collective.runs,
                                       cost.how))
    return priced


# ---- the matmul FLOPs each device runs


_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")


def _dims(type_text: str) -> list[int]:
    found = _ARRAY.search(type_text)
    return [int(size) for size in filter(None, found.group(2).split(","))] if found else []


def hlo_dot_flops(text: str) -> int:
    """The FLOPs of every `dot` of an optimized HLO module, per device and step: 2 per
    multiply-add (result elements times the contracted extent), a dot inside a loop counted
    once per trip, inside a fusion or call where it is called. Other ops are not counted:
    this is what shows repeated matmul work, not the whole compute."""
    bodies, entry = _computations(text)

    def visit(name: str, seen: tuple[str, ...]) -> int:
        types: dict[str, str] = {}
        total = 0
        for line in bodies.get(name, ()):
            head = _NAME.match(line)
            if not head:
                continue
            type_text, rest = _split_type(line[head.end():])
            types[head.group(1)] = type_text
            op = rest.split("(", 1)[0]
            if op == "dot":
                operands = rest[len("dot("):].split(")", 1)[0]
                lhs = operands.split(",")[0].strip()
                lhs_type = _ARRAY.match(lhs) and lhs or types.get(lhs.lstrip("%"), "")
                lhs_dims = _dims(lhs_type)
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                extent = math.prod(lhs_dims[int(d)] for d in contracting.group(1).split(",") if d) \
                    if contracting and lhs_dims else 1
                total += 2 * math.prod(_dims(type_text)) * extent
                continue
            trips = 1
            callees: list[str] = []
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest)
                count = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                trips = int(count.group(1)) if count else 1
                callees = [body.group(1)] if body else []
            else:
                callees = re.findall(r"\bcalls=%?([\w.\-]+)", rest)
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                callees += re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else []
            for callee in callees:
                if callee not in seen:
                    total += trips * visit(callee, seen + (callee,))
        return total

    return visit(entry, (entry,))
