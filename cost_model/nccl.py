"""Collectives on GPUs as NCCL runs them: its algorithms, its protocols, and its tuner's choice.

NCCL's tuner (NVIDIA/nccl@5067397 src/graph/tuning.cc, `ncclTopoTuneModel` and
`ncclTopoGetAlgoTime`) prices every (algorithm, protocol) of a collective as

    time = latency + nBytes / algorithm bandwidth

and runs the fastest. nBytes is the collective's buffer (all-reduce: the
buffer; all-gather and reduce-scatter: the gathered buffer, count·nranks,
enqueue.h `ncclFuncMaxSendRecvCount`), the size column of nccl-tests. Here,
with n ranks in m nodes of k, V the bytes each rank holds before (einpar's
convention), B a tier's bus bandwidth (what Simple achieves) and, per
protocol p of a tier, hop(p) its latency per step, eff(p) its fraction of B
and sat(p) its saturation size, C the channels a saturated collective runs on:

- ring: latency base(p) + (steps − inter steps)·hop_intra(p) + inter steps·
  hop_inter(p), steps 2(n−1) for all-reduce and n−1 for all-gather and
  reduce-scatter, inter steps 2(m−1) or m−1 (tuning.cc); between nodes an
  intra step costs at least NCCL's net overhead (1 µs, 3 for Simple). The
  bandwidth term is the bytes each rank sends (2(n−1)/n·V for all-reduce,
  (n−1)·V for all-gather, (n−1)/n·V for reduce-scatter: nBytes over
  busBw·n/steps) over eff(p)·B, B being NVLink's in a node and min(NVLink,
  k NICs) across nodes; LL's rate is capped (llMaxBws).
- tree (all-reduce across nodes): latency base(p) + 2((k−1)·tree_intra(p) +
  log2(m)·tree_inter(p)); bandwidth 2V over B times NCCL's tree factors
  (Simple 0.92, LL 1/3.8, LL128 120/128).
- NVLS (NVSwitch in-switch reduction, NVLink 4 and 5): one latency, no base;
  all-reduce at 2·eff·B bus bandwidth, all-gather and reduce-scatter (at most
  32 ranks) nBytes over eff·B·(n−1)/n; across nodes all-reduce runs NVLS
  trees (NVLSTree): NVLS latency + 2·log2(m) levels between nodes, bus
  bandwidth min(2·eff·B, k NICs, twice that for 2 nodes).
- channels: NCCL runs fewer channels on a small buffer (enqueue.cc: nc drops
  while nBytes < nc·threads·threshold), so the bandwidth term of a buffer
  below sat(p) is that of a buffer of sat(p): time is flat up to it, as the
  published curves are, down to sat(p)/C, below which one channel carries the
  whole buffer at 1/C of the rate (the 8-GPU curves rise from 8 to 64 KiB).
  With sat = 0 the term is the plain α–β one.

The tuner's per-size correction factors for trees and the 1.4x "plateau"
of multi-node ring all-reduces are left out: both can make a larger buffer
cheaper, and here more bytes never cost less.

All-to-all and permute are NCCL's grouped send/recv, not tuned: one Simple
step of the slowest tier and (n−1)/n·V (a permute V) at its bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from .hardware import MICRO, PROTOCOLS, Accelerator, Protocol, Tier

# baseLat (tuning.cc), seconds: once per collective.
BASE_LATENCY = {
    "ring": {"LL": 6.6 * MICRO, "LL128": 14.0 * MICRO, "Simple": 8.4 * MICRO},
    "tree": {"LL": 6.8 * MICRO, "LL128": 14.0 * MICRO, "Simple": 8.4 * MICRO},
}
# getNetOverhead: 1 µs on Intel CPUs, 3 times that for Simple; an intra-node ring step of a
# multi-node ring costs at least this.
NET_OVERHEAD = {"LL": 1.0 * MICRO, "LL128": 1.0 * MICRO, "Simple": 3.0 * MICRO}
# Tree bus-bandwidth factors (tuning.cc): all-reduce trees 0.92; LL a further 1/3.8, LL128
# 120/128 (7/9 inside a node).
TREE_EFFICIENCY = {"LL": 0.92 / 3.8, "LL128": 0.92 * 120 / 128, "Simple": 0.92}
# The ring factors a tier's protocol efficiencies start from (LL 0.5, LL128 0.92): a tier
# fitted to measurements scales the tree's rate by its own over these.
TIER_DEFAULT_EFFICIENCY = {"LL": 0.5, "LL128": 0.92, "Simple": 1.0}
NVLS_MAX_RANKS = 32  # NCCL_MAX_NVLS_ARITY: NVLS all-gather and reduce-scatter
REDUCING = ("all_reduce", "reduce_scatter")


@dataclass(frozen=True)
class Option:
    """One (algorithm, protocol) and its time, as the tuner prices it."""

    algorithm: str  # ring, tree, nvls, nvls_tree, hierarchical, direct
    protocol: str  # LL, LL128, Simple
    latency_s: float
    bandwidth_s: float
    tier: str  # the tier whose bandwidth sets bandwidth_s: nvlink or ib
    link_bytes: float  # bytes each device moves over that tier

    @property
    def time_s(self) -> float:
        return self.latency_s + self.bandwidth_s


def collective_bytes(kind: str, local_bytes: float, n: int) -> float:
    """Bytes each rank sends (einpar.reshard's convention, without rounding to whole elements:
    nccl-tests' sizes go down to a byte)."""
    return {"all_gather": (n - 1) * local_bytes, "reduce_scatter": (n - 1) / n * local_bytes,
            "all_reduce": 2 * (n - 1) / n * local_bytes, "all_to_all": (n - 1) / n * local_bytes,
            "permute": local_bytes}[kind]


def nccl_bytes(kind: str, local_bytes: float, n: int) -> float:
    """nccl-tests' size (NCCL's nBytes): the gathered buffer for all-gather, else the buffer."""
    return n * local_bytes if kind == "all_gather" else local_bytes


def rank_bytes(kind: str, size: float, n: int) -> float:
    """What each of n ranks holds before a collective of nccl-tests' size (nccl_bytes's
    inverse)."""
    return size / n if kind == "all_gather" else float(size)


def channel_factor(protocol: Protocol, size: float, channels: float) -> float:
    """How much longer than at full rate a buffer of `size` (nBytes) moves. NCCL divides a
    buffer among channels, one more for each `saturation / channels` bytes of it (enqueue.cc:
    nc drops while nBytes < nc·threads·threshold), so below the saturation size each channel
    has that much work, whatever the size, and the time is flat; below one channel's share,
    one channel carries the whole buffer at 1/channels of the rate, and the time grows with
    the size from nothing."""
    saturation = protocol.saturation.value
    if size <= 0:
        return 1.0
    return min(max(1.0, saturation / size), max(1.0, channels))


def _log2i(nodes: int) -> int:
    """Tree levels between nodes: NCCL's log2i, the floor of log2 (tuning.cc)."""
    return max(0, int(nodes).bit_length() - 1)


def _channels(tier: Tier, protocol: str, size: float) -> float:
    return channel_factor(tier.protocols[protocol], size, tier.channels.value)


def _rate(tier: Tier, protocol: str, bus: float) -> float:
    """What `protocol` carries of a bus bandwidth `bus` on `tier` (LL capped, tuning.cc)."""
    rate = bus * tier.protocols[protocol].efficiency.value
    return min(rate, tier.ll_max_bandwidth.value) if protocol == "LL" else rate


def ring_options(kind: str, n: int, nodes: int, per_node: int, local_bytes: float,
                 intra: Tier, intra_bus: float, inter: Tier | None,
                 inter_bus: float) -> list[Option]:
    """A ring over n ranks, `per_node` in each of `nodes` (NCCL's ring: tuning.cc)."""
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    inter_steps = 0 if nodes == 1 else (2 if kind == "all_reduce" else 1) * (nodes - 1)
    sent = collective_bytes(kind, local_bytes, n)
    size = nccl_bytes(kind, local_bytes, n)
    options = []
    for p in PROTOCOLS:
        intra_s = sent / _rate(intra, p, intra_bus) * _channels(intra, p, size)
        if nodes == 1:
            latency = BASE_LATENCY["ring"][p] + steps * intra.protocols[p].latency.value
            options.append(Option("ring", p, latency, intra_s, "nvlink", sent))
            continue
        hop_intra = max(intra.protocols[p].latency.value, NET_OVERHEAD[p])
        latency = (BASE_LATENCY["ring"][p] + (steps - inter_steps) * hop_intra
                   + inter_steps * inter.protocols[p].latency.value)
        # Each of a node's k GPUs drives its own NIC: the ring's rate is the slower tier's.
        inter_s = sent / _rate(inter, p, per_node * inter_bus) * _channels(inter, p, size)
        name = "ib" if inter_s >= intra_s else "nvlink"
        options.append(Option("ring", p, latency, max(intra_s, inter_s), name, sent))
    return options


def tree_options(n: int, nodes: int, per_node: int, local_bytes: float, intra: Tier,
                 intra_bus: float, inter: Tier, inter_bus: float) -> list[Option]:
    """NCCL's double binary tree all-reduce across nodes (chains inside each node)."""
    depth = _log2i(nodes)
    options = []
    for p in PROTOCOLS:
        latency = BASE_LATENCY["tree"][p] + 2 * ((per_node - 1) * intra.tree_latency[p].value
                                                 + depth * inter.tree_latency[p].value)
        efficiency = inter.protocols[p].efficiency.value / TIER_DEFAULT_EFFICIENCY[p]
        rate = min(intra_bus, per_node * inter_bus * efficiency) * TREE_EFFICIENCY[p]
        if p == "LL":
            rate = min(rate, inter.ll_max_bandwidth.value)
        seconds = 2 * local_bytes / rate * _channels(inter, p, local_bytes)
        options.append(Option("tree", p, latency, seconds, "ib", 2 * local_bytes))
    return options


def nvls_options(kind: str, n: int, nodes: int, per_node: int, local_bytes: float,
                 intra: Tier, intra_bus: float, inter: Tier | None,
                 inter_bus: float) -> list[Option]:
    """NVSwitch in-switch reduction (NVLS), and NVLS trees across nodes for all-reduce."""
    nvls = intra.nvls
    if nvls is None or kind not in ("all_reduce", "all_gather", "reduce_scatter") or per_node < 2:
        return []
    size = nccl_bytes(kind, local_bytes, n)
    switch = intra_bus * nvls.efficiency.value
    if nodes == 1:
        if kind == "all_reduce":  # NCCL pipelines the reduce and the broadcast: 2x the bus rate
            seconds = collective_bytes(kind, local_bytes, n) / (2 * switch)
        elif n <= NVLS_MAX_RANKS:
            seconds = size / (switch * (n - 1) / n)
        else:
            return []
        seconds *= channel_factor(nvls, size, intra.channels.value)
        return [Option("nvls", "Simple", nvls.latency.value, seconds, "nvlink",
                       seconds * intra_bus)]
    if kind != "all_reduce" or inter is None or inter.nvls_tree_latency is None:
        return []  # NVLS between nodes needs CollNet (SHARP), which NCCL leaves off by default
    depth = _log2i(nodes)
    nics = per_node * _rate(inter, "Simple", inter_bus) * (2 if nodes <= 2 else 1)
    bus = min(2 * switch, nics)
    seconds = (collective_bytes(kind, local_bytes, n) / bus
               * channel_factor(nvls, size, intra.channels.value))
    latency = nvls.latency.value + 2 * depth * inter.nvls_tree_latency.value
    tier = "ib" if nics < 2 * switch else "nvlink"
    return [Option("nvls_tree", "Simple", latency, seconds, tier, seconds * min(nics, intra_bus))]


def hierarchical_options(kind: str, per_node: int, nodes: int, local_bytes: float, intra: Tier,
                         intra_bus: float, inter: Tier, inter_bus: float) -> list[Option]:
    """k GPUs in each of m nodes: an intra-node phase over NVLink and an inter-node phase with
    each GPU on its own NIC, pipelined, so the slower phase sets the time (scaling book
    gpus.md: T = max(T_node, T_scaleout)); each phase at a protocol's latency and rate."""
    k, m = per_node, nodes
    n = k * m
    if kind == "all_gather":  # the gathered array is n·V
        inter_bytes, intra_bytes = (m - 1) * local_bytes, (k - 1) * m * local_bytes
        steps_intra, steps_inter = k - 1, m - 1
    elif kind in REDUCING:
        twice = 2 if kind == "all_reduce" else 1
        intra_bytes = twice * local_bytes * (k - 1) / k
        inter_bytes = twice * local_bytes * (m - 1) / (m * k)
        steps_intra, steps_inter = twice * (k - 1), twice * (m - 1)
    elif kind == "all_to_all":
        intra_bytes, inter_bytes = local_bytes * (k - 1) / n, local_bytes * (n - k) / n
        steps_intra = steps_inter = 1
    else:
        return []
    size = nccl_bytes(kind, local_bytes, n)
    options = []
    for p in PROTOCOLS:
        t_intra = intra_bytes / _rate(intra, p, intra_bus) * _channels(intra, p, size)
        t_inter = inter_bytes / _rate(inter, p, inter_bus) * _channels(inter, p, size)
        latency = (BASE_LATENCY["ring"][p] + steps_intra * intra.protocols[p].latency.value
                   + steps_inter * inter.protocols[p].latency.value)
        tier, carried = ("ib", inter_bytes) if t_inter >= t_intra else ("nvlink", intra_bytes)
        options.append(Option("hierarchical", p, latency, max(t_intra, t_inter), tier, carried))
    return options


def direct_option(kind: str, n: int, local_bytes: float, tier: Tier, bus: float,
                  name: str) -> Option:
    """All-to-all or permute: NCCL's grouped send/recv, every message at once (Simple)."""
    sent = collective_bytes(kind, local_bytes, n)
    latency = BASE_LATENCY["ring"]["Simple"] + tier.protocols["Simple"].latency.value
    seconds = sent / _rate(tier, "Simple", bus)
    return Option("direct", "Simple", latency, seconds, name, sent)


def options(kind: str, n: int, per_node: int, nodes: int, local_bytes: float,
            chip: Accelerator) -> list[Option]:
    """Every (algorithm, protocol) NCCL could run `kind` with over n GPUs, at most `per_node`
    in each of `nodes` nodes."""
    intra, inter = chip.scale_up_tier, chip.scale_out_tier
    intra_bus = chip.scale_up_bandwidth.value * chip.scale_up_efficiency.value
    inter_bus = 0.0
    if nodes > 1:
        inter_bus = chip.scale_out_bandwidth.value * chip.scale_out_efficiency.value
    if kind in ("all_to_all", "permute"):
        if nodes == 1:
            return [direct_option(kind, n, local_bytes, intra, intra_bus, "nvlink")]
        found = [direct_option(kind, n, local_bytes, inter, inter_bus, "ib")]
        if per_node > 1 and kind == "all_to_all":
            found += hierarchical_options(kind, per_node, nodes, local_bytes, intra, intra_bus,
                                          inter, inter_bus)
        return found
    found = ring_options(kind, n, nodes, per_node, local_bytes, intra, intra_bus, inter, inter_bus)
    found += nvls_options(kind, n, nodes, per_node, local_bytes, intra, intra_bus, inter, inter_bus)
    if nodes > 1:
        if kind == "all_reduce":
            found += tree_options(n, nodes, per_node, local_bytes, intra, intra_bus, inter,
                                  inter_bus)
        if per_node > 1 and kind != "all_reduce":  # NCCL all-reduces across nodes by ring,
            # tree or NVLS tree, never in two phases
            found += hierarchical_options(kind, per_node, nodes, local_bytes, intra, intra_bus,
                                          inter, inter_bus)
    return found


def fastest(kind: str, n: int, per_node: int, nodes: int, local_bytes: float,
            chip: Accelerator, algorithms: tuple[str, ...] | None = None) -> Option:
    """The option NCCL's tuner picks: the least time (ties to the first: ring before tree);
    `algorithms`, if given, are the only ones allowed (as NCCL_ALGO allows)."""
    found = options(kind, n, per_node, nodes, local_bytes, chip)
    if algorithms is not None:
        found = [option for option in found if option.algorithm in algorithms] or found
    return min(found, key=lambda o: o.time_s)
