"""The time of a collective on its groups of devices: every formula, with its source, in one place.

The α–β model: time = latency terms (α per step or per hop) + bytes over the
bandwidth that carries them (nccl-tests doc/PERFORMANCE.md: "time ≈ overhead +
size/bw"). Sizes follow einpar's byte convention (einpar.reshard): with n
devices in a group and V the local bytes each holds before the collective,

  ring all-gather       n-1 steps of V           (n-1)·V bytes sent per device
  ring reduce-scatter   n-1 steps of V/n         (n-1)/n·V
  ring all-reduce       2(n-1) steps of V/n      2(n-1)/n·V
  all-to-all            every pair at once       (n-1)/n·V
  permute               one exchange             V

(ASTRA-sim Ring.cc's steps and messages; nccl-tests' busbw factors.) So on a
ring the bandwidth term is always `bytes per device / bandwidth`.

Algorithms, chosen per case as the fastest that applies:

- `ring` over the group's slowest tier;
- `tree` (double binary tree) for all-reduce across nodes: 2⌈log2 n⌉
  latency steps and 2·V/bandwidth (ASTRA-sim DoubleBinaryTreeAllReduce),
  which wins for small, latency-bound buffers (NCCL uses trees between
  nodes; within a node it rings over NVLink);
- `hierarchical` on a switched cluster when a group spans k GPUs in each of
  m > 1 nodes: the intra-node phase over NVLink and the inter-node phase with
  each of the k GPUs driving its own NIC, pipelined, so the time is the
  slower phase (scaling book gpus.md: T = max(T_node, T_scaleout));
- `torus`: dimension-wise on a TPU torus (scaling book sharding.md): a
  bidirectional ring on each axis the group spans, all axes at once, so an
  all-gather of the whole array V_all takes V_all·(n-1)/n / (W·Σ axes'
  directions); without wraparound an axis has one direction's worth
  ("typically doubles"); an all-to-all is a quarter of an all-gather on
  wrapped axes and half on unwrapped ones; latency is α per hop, |X|/2 hops
  on a wrapped axis of |X| chips and |X|-1 on an unwrapped one.

Contention: all groups of a collective run at once. On a switched cluster
they never share a link (each GPU sits in one group, has its own NVLink port
and NIC, and the fat tree has full bisection). On a torus, groups strided by
s along an axis interleave, and each link of that axis carries s of them, so
their bandwidth is divided by s and their hops multiplied by s. On a user's
graph (`Links`), every group's flows are routed over shortest paths and the
busiest link sets the time (`routed_time`), as ASTRA-sim's congestion-aware
network does per link.

Pricing is by symmetry: under the row-major mapping all groups of a
collective are translates of one another, and a translation by the
topology's period (a node's GPUs; the torus's inner axes) maps the topology
onto itself, so one group per residue of its first device modulo the period
has every shape there is (`representative_groups`): the cost does not grow
with the number of devices. A user's own mapping lists every group instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import networkx as nx
import numpy as np

from einpar.layout import Mesh, mesh_groups
from einpar.reshard import collective_bytes

from . import nccl
from .cluster import Cluster, Links, Torus


@dataclass(frozen=True)
class CollectiveTime:
    kind: str
    group_size: int
    algorithm: str  # ring, tree, nvls, nvls_tree, hierarchical, direct, torus, routed, local
    latency_s: float
    bandwidth_s: float
    # The busiest link: its tier, the bytes it carries, and how many groups share it.
    tier: str
    link_bytes: float
    sharing: int
    protocol: str = ""  # NCCL's protocol (LL, LL128, Simple) where the NCCL model priced it

    @property
    def time_s(self) -> float:
        return self.latency_s + self.bandwidth_s

    @property
    def how(self) -> str:
        """`ring/LL128 of 8 on nvlink`, `torus of 4 on ici, 2 groups a link`: the algorithm and
        protocol, the busiest link, contention."""
        algorithm = f"{self.algorithm}/{self.protocol}" if self.protocol else self.algorithm
        return (f"{algorithm} of {self.group_size} on {self.tier}"
                + (f", {self.sharing} groups a link" if self.sharing > 1 else ""))

    @property
    def bound(self) -> str:
        return "latency" if self.latency_s > self.bandwidth_s else "bandwidth"


# ---- the formulas


def ring_steps(kind: str, n: int) -> int:
    """Latency steps of a ring collective over n devices (ASTRA-sim Ring.cc); all-to-all and
    permute send every message at once."""
    return {"all_gather": n - 1, "reduce_scatter": n - 1, "all_reduce": 2 * (n - 1)}.get(kind, 1)


def ring(kind: str, n: int, bytes_per_device: float, bandwidth: float, alpha: float,
         tier: str) -> CollectiveTime:
    """A ring (or, for all-to-all and permute, every pair at once) over links of `bandwidth`."""
    steps = ring_steps(kind, n)
    algorithm = "direct" if kind in ("all_to_all", "permute") else "ring"
    return CollectiveTime(kind, n, algorithm, steps * alpha, bytes_per_device / bandwidth, tier,
                          bytes_per_device, 1)


def tree_all_reduce(n: int, local_bytes: float, bandwidth: float, alpha: float,
                    tier: str) -> CollectiveTime:
    """Double binary tree all-reduce: up and down a tree of depth ⌈log2 n⌉."""
    depth = math.ceil(math.log2(n)) if n > 1 else 0
    return CollectiveTime("all_reduce", n, "tree", 2 * depth * alpha, 2 * local_bytes / bandwidth,
                          tier, 2 * local_bytes, 1)


def hierarchical(kind: str, k: int, m: int, local_bytes: float, nvlink: float, alpha_nvlink: float,
                 nic: float, alpha_nic: float) -> CollectiveTime:
    """k GPUs in each of m nodes: intra-node over NVLink, inter-node with one NIC per GPU."""
    n = k * m
    if kind == "all_gather":  # the gathered array is n·V
        inter = (m - 1) * local_bytes  # each GPU fetches its slice from m-1 nodes
        intra = (k - 1) * m * local_bytes
        steps_intra, steps_inter = k - 1, m - 1
    elif kind in ("reduce_scatter", "all_reduce"):
        twice = 2 if kind == "all_reduce" else 1
        intra = twice * local_bytes * (k - 1) / k
        inter = twice * local_bytes * (m - 1) / (m * k)
        steps_intra, steps_inter = twice * (k - 1), twice * (m - 1)
    elif kind == "all_to_all":
        intra = local_bytes * (k - 1) / n
        inter = local_bytes * (n - k) / n
        steps_intra = steps_inter = 1
    else:
        raise ValueError(kind)
    t_intra, t_inter = intra / nvlink, inter / nic
    tier, carried = ("ib", inter) if t_inter >= t_intra else ("nvlink", intra)
    return CollectiveTime(kind, n, "hierarchical", steps_intra * alpha_nvlink + steps_inter * alpha_nic,
                          max(t_intra, t_inter), tier, carried, 1)


@dataclass(frozen=True)
class TorusAxis:
    extent: int  # chips of the group along this axis
    stride: int  # their spacing: groups strided by s interleave, s to a link
    wrap: bool  # the group closes a ring through the wraparound link


def torus(kind: str, axes: tuple[TorusAxis, ...], local_bytes: float, link: float,
          alpha_hop: float, groups: int | None = None) -> CollectiveTime:
    """Dimension-wise on a torus (scaling book sharding.md); `groups` running at once bound
    how many interleave on a link (default: as many as the stride)."""
    # (axis, groups sharing its links): strided groups interleave, if there are that many.
    spanned = [(axis, min(axis.stride, groups or axis.stride)) for axis in axes if axis.extent > 1]
    n = 1
    for axis, _ in spanned:
        n *= axis.extent
    # Bandwidth into a chip from all its group's axes: two directions on a wrapped axis.
    bandwidth = sum(link * (2 if axis.wrap else 1) / shared for axis, shared in spanned)
    # A hop between neighbours of the group crosses `stride` links.
    hops = sum((axis.extent // 2 if axis.wrap else axis.extent - 1) * axis.stride
               for axis, _ in spanned)
    sharing = max((shared for _, shared in spanned), default=1)
    gathered = n * local_bytes
    if kind == "all_gather":
        moved, steps = gathered * (n - 1) / n, hops
    elif kind == "reduce_scatter":
        moved, steps = local_bytes * (n - 1) / n, hops
    elif kind == "all_reduce":
        moved, steps = 2 * local_bytes * (n - 1) / n, 2 * hops
    elif kind == "all_to_all":
        quarter = 4 if all(axis.wrap for axis, _ in spanned) else 2
        moved, steps = gathered * (n - 1) / n / quarter, hops
    elif kind == "permute":
        moved, steps = local_bytes, hops
    else:
        raise ValueError(kind)
    return CollectiveTime(kind, n, "torus", steps * alpha_hop, moved / bandwidth, "ici",
                          moved / max(1, len(spanned)), sharing)


# ---- groups and their shapes


def switched_shapes(groups: np.ndarray, gpus_per_node: int) -> list[tuple[int, int]]:
    """The distinct (GPUs in the fullest node k, nodes m) of the groups."""
    shapes = set()
    for group in groups:
        _, counts = np.unique(group // gpus_per_node, return_counts=True)
        shapes.add((int(counts.max()), len(counts)))
    return sorted(shapes)


def torus_shapes(groups: np.ndarray, torus_: Torus) -> list[tuple[TorusAxis, ...]]:
    """The distinct per-axis (extent, stride, wrap) of the groups on the torus."""
    coords = np.stack(np.unravel_index(groups, torus_.dims), axis=-1)  # (groups, n, axes)
    columns = []
    for axis, size in enumerate(torus_.dims):
        values = np.sort(coords[:, :, axis], axis=1)
        steps = np.diff(values, axis=1)
        extent = 1 + (steps > 0).sum(axis=1)
        stride = np.where(steps > 0, steps, size).min(axis=1, initial=size)
        stride = np.where(extent > 1, stride, 1)
        wrap = torus_.wrap[axis] & (extent * stride == size)
        columns += [extent, stride, wrap.astype(int)]
    rows = np.unique(np.stack(columns, axis=1), axis=0)
    return [tuple(TorusAxis(int(row[3 * a]), int(row[3 * a + 1]), bool(row[3 * a + 2]))
                  for a in range(len(torus_.dims))) for row in rows]


def representative_groups(mesh: Mesh, axes: tuple[str, ...], period: int) -> tuple[np.ndarray, int]:
    """One group of each kind, without listing every group: (groups, how many groups in all).

    With the row-major mapping every group has the same offsets between members, and a
    group's shape on the topology depends only on its first device modulo `period` (a
    translation the topology maps onto itself). So it is enough to find, for each residue
    the groups' first devices take, one group that has it: a handful of rows for 16,384
    devices as for 8.
    """
    names = list(mesh.names)
    sizes = [size for _, size in mesh.axes]
    strides = [int(np.prod(sizes[i + 1:])) for i in range(len(sizes))]
    offsets = np.zeros(1, dtype=np.int64)
    for axis in axes:  # ring order: row-major over the group's axes
        i = names.index(axis)
        offsets = (offsets[:, None] + np.arange(sizes[i]) * strides[i]).reshape(-1)
    witness = {0: 0}  # residue of a first device -> one first device with it
    count = 1
    for i, name in enumerate(names):
        if name in axes:
            continue
        count *= sizes[i]
        # c·stride mod period repeats after period/gcd(stride, period) values of c.
        cycle = min(sizes[i], period // math.gcd(strides[i], period))
        widened = {}
        for base in witness.values():
            for c in range(cycle):
                widened.setdefault((base + c * strides[i]) % period, base + c * strides[i])
        witness = widened
    bases = np.array(sorted(witness.values()), dtype=np.int64)
    return bases[:, None] + offsets[None, :], count


def distinct_groups(groups: np.ndarray, period: int) -> np.ndarray:
    """One group of each kind: groups with the same offsets between members and the same
    first member modulo `period` (a translation the topology maps onto itself) have the
    same shape, so a symmetric mesh keeps one or a few rows however many devices it has."""
    if len(groups) == 1:
        return groups
    key = np.concatenate([groups - groups[:, :1], groups[:, :1] % period], axis=1)
    _, first = np.unique(key, axis=0, return_index=True)
    return groups[np.sort(first)]


# ---- pricing one collective


def collective_time(kind: str, axes: tuple[str, ...], local_bytes: float, mesh: Mesh,
                    cluster: Cluster) -> CollectiveTime:
    """The time of one collective over `axes` of `mesh`, every group at once; the slowest group
    decides. `local_bytes` is what each device holds before it."""
    topo, chip = cluster.topology, cluster.chip
    n = 1
    for axis in axes:
        n *= mesh.size(axis)
    if n == 1 or local_bytes == 0:
        return CollectiveTime(kind, n, "local", 0.0, 0.0, "none", 0.0, 1)
    if isinstance(topo, Links):  # a user's graph: route every group
        return routed_time(kind, mesh_groups(mesh, axes, cluster.device_order), local_bytes, cluster)
    period = _torus_period(topo) if isinstance(topo, Torus) else topo.gpus_per_node
    if cluster.device_order is None:
        groups, count = representative_groups(mesh, axes, period)
    else:  # a mapping of the user's: list every group, then keep one of each kind
        groups = mesh_groups(mesh, axes, cluster.device_order)
        groups, count = distinct_groups(groups, period), len(groups)
    sent = collective_bytes(kind, local_bytes, n)
    if isinstance(topo, Torus):
        link = chip.scale_up_bandwidth.value * chip.scale_up_efficiency.value
        # Interleaved groups share a link only if there are that many groups.
        candidates = [torus(kind, shape, local_bytes, link, chip.scale_up_latency.value, count)
                      for shape in torus_shapes(groups, topo)]
        return max(candidates, key=lambda c: c.time_s)
    nvlink = chip.scale_up_bandwidth.value * chip.scale_up_efficiency.value
    alpha_nvlink = chip.scale_up_latency.value
    worst = None
    for k, m in switched_shapes(groups, topo.gpus_per_node):
        if chip.scale_up_tier is not None and (m == 1 or chip.scale_out_tier is not None):
            best = _nccl_time(kind, n, k, m, local_bytes, chip)
            if worst is None or best.time_s > worst.time_s:
                worst = best
            continue
        if m == 1:
            options = [ring(kind, n, sent, nvlink, alpha_nvlink, "nvlink")]
        else:
            nic = chip.scale_out_bandwidth.value * chip.scale_out_efficiency.value
            alpha_nic = chip.scale_out_latency.value if chip.scale_out_latency else 0.0
            options = [ring(kind, n, sent, nic, alpha_nic, "ib")]
            if kind == "all_reduce":
                options.append(tree_all_reduce(n, local_bytes, nic, alpha_nic, "ib"))
            if k > 1 and kind != "permute":
                options.append(hierarchical(kind, k, m, local_bytes, nvlink, alpha_nvlink, nic,
                                            alpha_nic))
        best = min(options, key=lambda c: c.time_s)
        if worst is None or best.time_s > worst.time_s:
            worst = best
    return worst


def _nccl_time(kind: str, n: int, k: int, m: int, local_bytes: float, chip) -> CollectiveTime:
    """What NCCL's tuner runs for a group of n GPUs, at most k in each of m nodes (nccl.py)."""
    best = nccl.fastest(kind, n, k, m, local_bytes, chip)
    return CollectiveTime(kind, n, best.algorithm, best.latency_s, best.bandwidth_s, best.tier,
                          best.link_bytes, 1, best.protocol)


def _torus_period(topo: Torus) -> int:
    """Adding this to a device moves it one step along the outermost axis: a translation."""
    return int(np.prod(topo.dims[1:])) if len(topo.dims) > 1 else 1


# ---- routing over the graph (user-written clusters, and the check of the formulas above)


def link_loads(kind: str, groups: np.ndarray, local_bytes: float, cluster: Cluster,
               users: dict | None = None) -> dict:
    """Bytes each directed link carries when every group runs `kind` at once; `users`, if
    given, gets the numbers of the groups that use each link.

    A bidirectional ring in each group's order: half the data goes each way round,
    every ring neighbour's traffic on a shortest path (fewest hops). All-to-all and
    permute send each flow straight to its destination.
    """
    graph = cluster.graph
    names = [cluster.device_name(int(d)) for d in range(cluster.num_devices)]
    loads: dict = {}

    def send(src: int, dst: int, amount: float, other_way: bool = False) -> None:
        path = _path(graph, names[src], names[dst])
        if other_way:  # a ring of two: the second half goes round the other way where it can
            path = _other_way(graph, path)
        for a, b in zip(path, path[1:]):
            loads[(a, b)] = loads.get((a, b), 0.0) + amount
            if users is not None:
                users.setdefault((a, b), set()).add(number)

    n = groups.shape[1]
    for number, group in enumerate(groups.tolist()):
        if kind == "all_to_all":
            for src in group:
                for dst in group:
                    if src != dst:
                        send(src, dst, local_bytes / n)
        elif kind == "permute":
            for src, dst in zip(group, group[1:] + group[:1]):
                send(src, dst, local_bytes)
        else:
            per_direction = collective_bytes(kind, local_bytes, n) / 2
            for i, src in enumerate(group):
                send(src, group[(i + 1) % n], per_direction)
                send(src, group[(i - 1) % n], per_direction, other_way=n == 2)
    return loads


def _other_way(graph: nx.Graph, path: list) -> list:
    """An equally short path that avoids `path`'s links, else `path`."""
    pruned = graph.copy()
    pruned.remove_edges_from(zip(path, path[1:]))
    try:
        other = nx.shortest_path(pruned, path[0], path[-1])
    except nx.NetworkXNoPath:
        return path
    return other if len(other) == len(path) else path


def _path(graph: nx.Graph, a: str, b: str) -> list:
    return _paths_from(graph, a)[b]


# Routed from the devices that send only (a group's members), not from every node of the
# graph: the same paths all_pairs_shortest_path gives, at a fraction of its memory.
@lru_cache(maxsize=1024)
def _paths_from(graph: nx.Graph, source: str) -> dict:
    return nx.single_source_shortest_path(graph, source)


def routed_time(kind: str, groups: np.ndarray, local_bytes: float,
                cluster: Cluster) -> CollectiveTime:
    """Time on the graph: the busiest link's bytes over its bandwidth, plus the latency of the
    longest path once per step."""
    n = groups.shape[1]
    users: dict = {}
    loads = link_loads(kind, groups, local_bytes, cluster, users)
    graph = cluster.graph
    chip = cluster.chip
    # Links carry what collectives achieve of their line rate, as the formulas assume.
    efficiency = {"nvlink": chip.scale_up_efficiency.value, "ici": chip.scale_up_efficiency.value,
                  "ib": chip.scale_out_efficiency.value}
    busiest, time = None, 0.0
    for (a, b), carried in loads.items():
        edge = graph.edges[a, b]
        t = carried / (edge["bandwidth"] * efficiency.get(edge["tier"], 1.0))
        if t > time:
            busiest, time = (a, b), t
    names = [cluster.device_name(d) for d in range(cluster.num_devices)]
    longest = 0.0
    for group in groups.tolist():
        for src, dst in zip(group, group[1:] + group[:1]):
            path = _path(graph, names[src], names[dst])
            longest = max(longest, sum(graph.edges[a, b]["latency"] for a, b in zip(path, path[1:])))
    steps = ring_steps(kind, n)
    tier = graph.edges[busiest]["tier"] if busiest else "none"
    carried = loads[busiest] if busiest else 0.0
    sharing = len(users[busiest]) if busiest else 1
    return CollectiveTime(kind, n, "routed", steps * longest, time, tier, carried, sharing)
