"""Accelerator presets: what one chip computes, holds and moves, each figure with its public source.

Units are SI throughout: FLOP/s, bytes, bytes/s (one direction), seconds.
Peak FLOP/s are dense (no 2:4 sparsity). Scale-up is NVLink for GPUs (the
whole GPU's NVLink bandwidth) and ICI for TPUs (per link, with the links
per chip); scale-out is InfiniBand or data-center network bandwidth per
chip. Latencies are the model constants the sources use: no measured
per-hop NVLink or InfiniBand latency is published with them.

Where sources disagree the figure used is the first listed in the
reference notes (hardware_presets.csv), and the note says what else was
found.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

SB_GPUS = "jax-ml/scaling-book gpus.md @1a55377 (ch.12 'How to Think About GPUs', 2025-08)"
SB_TPUS = "jax-ml/scaling-book tpus.md @0819a7d (ch.2)"
SB_SHARDING = "jax-ml/scaling-book sharding.md @0819a7d (ch.3)"
GLK_A100 = "glennklockwood.com/garden/processors/A100 (cites the NVIDIA A100 datasheet)"
GLK_H100 = "glennklockwood.com/garden/processors/h100 (cites the NVIDIA H100 whitepaper)"
GLK_B200 = "glennklockwood.com/garden/processors/B200"
NV_TABLE3 = ("NVIDIA Hopper architecture in-depth blog, Table 3 (A100 column), as quoted at "
             "forums.developer.nvidia.com/t/218102")
CALCULON_A100 = "calculon-ai/calculon@caa4b11 systems/a100_80g.json"
NCCL_149 = "github.com/NVIDIA/nccl-tests/issues/149 (maintainer, 2023-07-05)"
NCCL_212 = "github.com/NVIDIA/nccl-tests/issues/212 (maintainer, 2024-05-06)"
NCCL_812 = "github.com/NVIDIA/nccl/issues/812 (maintainer, 2023-03-31)"
NCCL_290 = "github.com/NVIDIA/nccl-tests/issues/290 (NVIDIA, 2025-03-03)"
CALCULON_H100 = "calculon-ai/calculon@caa4b11 systems/h100_80g_nvl8.json"
GCP_V4 = "cloud.google.com/tpu/docs/v4 (system architecture table)"
GCP_V5E = "cloud.google.com/tpu/docs/v5e (key chip and pod specifications)"
GCP_V5P = "cloud.google.com/tpu/docs/v5p-training (key specifications)"
NCCL_TUNING = "NVIDIA/nccl@5067397 src/graph/tuning.cc"
NCCL_ENQUEUE = "NVIDIA/nccl@5067397 src/enqueue.cc (channel count by size) and src/include/comm.h"
DGX_H200 = ("NVIDIA DGX H200 datasheet (8x H200 141 GB, NVLink 900 GB/s bidirectional, 8x ConnectX-7 "
            "400 Gb/s); Azure ND H200 v5 the same (Azure/AI-benchmarking-guide)")
NV_GB200 = ("NVIDIA GB200 NVL72 specifications (72 GPUs, 13.4 TB HBM3e, 130 TB/s NVLink, 360 PF fp8 "
            "and 180 PF bf16 dense, the page's sparse figures halved), as quoted at "
            "aiwiki.ai/wiki/nvidia_gb200_nvl72")

TERA = 1e12
GIGA = 1e9
MICRO = 1e-6


@dataclass(frozen=True)
class Figure:
    """A number and where it comes from."""

    value: float
    source: str
    note: str = ""


PROTOCOLS = ("LL", "LL128", "Simple")


@dataclass(frozen=True)
class Protocol:
    """One NCCL protocol (or NVLS) on one link tier: what a collective pays per step and
    what it gets of the tier's bandwidth (cost_model/nccl.py says how they combine)."""

    latency: Figure  # seconds per ring step (NCCL's hwLat), or once for NVLS
    efficiency: Figure  # fraction of the tier's bus bandwidth the protocol carries
    # NCCL's nBytes from which every channel is busy: NCCL runs fewer channels on a smaller
    # buffer (enqueue.cc), so one below this size takes as long as one of this size.
    saturation: Figure


@dataclass(frozen=True)
class Tier:
    """NCCL's constants for one link tier: NVLink of a generation, or InfiniBand."""

    name: str
    protocols: dict = field(hash=False)  # "LL", "LL128", "Simple" -> Protocol (ring)
    tree_latency: dict = field(hash=False)  # protocol -> Figure, s per tree step
    ll_max_bandwidth: Figure = Figure(float("inf"), "no cap")  # LL's busbw cap, bytes/s
    nvls: Protocol | None = None  # NVSwitch in-switch reduction (NVLink 4 and 5)
    nvls_tree_latency: Figure | None = None  # per tree level between nodes (the net tier)
    # The channels NCCL runs a saturated collective on: a buffer below saturation/channels
    # runs on one channel (enqueue.cc), at that channel's share of the rate.
    channels: Figure = Figure(16, "NVIDIA/nccl@5067397 src/enqueue.cc (channels per collective)",
                              "the 16 channels the saturation sizes are derived for")


@dataclass(frozen=True)
class Accelerator:
    name: str
    family: str  # "gpu" or "tpu"
    peak_flops: dict = field(hash=False)  # einpar dtype (and "fp8", "tf32") -> Figure, FLOP/s
    hbm_capacity: Figure  # bytes
    hbm_bandwidth: Figure  # bytes/s
    # Scale-up: for a GPU, its NVLink bandwidth in all (one direction); for a TPU, one ICI
    # link's (one direction), of which it has `ici_links`.
    scale_up_bandwidth: Figure
    scale_up_latency: Figure  # seconds: per collective step (NVLink) or per hop (ICI)
    scale_up_domain: Figure  # chips one scale-up network joins (an NVLink node, a TPU pod)
    scale_out_bandwidth: Figure | None  # bytes/s per chip, one direction; None if unpublished
    scale_out_latency: Figure | None
    ici_links: int = 0  # TPU: ICI links per chip (4 on a 2D torus, 6 on a 3D torus)
    # The fraction of a link's line rate collectives achieve (protocol overhead); 1 where no
    # figure is published.
    scale_up_efficiency: Figure = Figure(1.0, "no published figure: line rate assumed")
    scale_out_efficiency: Figure = Figure(1.0, "no published figure: line rate assumed")
    # NCCL's protocol constants of the scale-up and scale-out tiers (cost_model/nccl.py);
    # None prices collectives with one latency per step (scale_up_latency), as for CPUs.
    scale_up_tier: Tier | None = None
    scale_out_tier: Tier | None = None

    def peak(self, dtype: str) -> Figure:
        """Peak dense FLOP/s for computing in `dtype`."""
        try:
            return self.peak_flops[dtype]
        except KeyError:
            known = ", ".join(sorted(self.peak_flops))
            raise KeyError(f"{self.name} has no published peak for {dtype} (it has: {known})") from None

    @property
    def scale_up_bandwidth_per_chip(self) -> float:
        """All the scale-up bandwidth of one chip, one direction, bytes/s."""
        links = self.ici_links if self.family == "tpu" else 1
        return self.scale_up_bandwidth.value * links


def _figures(rates: dict[str, tuple[float, str, str]]) -> dict[str, Figure]:
    return {dtype: Figure(value * TERA, source, note) for dtype, (value, source, note) in rates.items()}


# ---- NCCL's link tiers
#
# NCCL's own tuning model (tuning.cc): per ring step a hardware latency by link type and
# protocol (hwLat: NVLINK and NET rows), LL carrying half the bus bandwidth up to a cap
# (llMaxBws), LL128 0.92 of it, Simple all of it, NVLS (in-switch reduction) 0.85 (Hopper)
# or 0.74 (Blackwell) of it on all but one of its channels. The saturation sizes are
# channels x threads x NCCL's per-thread threshold (enqueue.cc, comm.h): 16 channels of 512
# threads x 64 B for Simple, 640 x 8 B for LL128, 512 x 8 B x 8 ranks for LL.

KIB = 1024


def _protocol(latency_us: float, efficiency: float, saturation: float, source: str = NCCL_TUNING,
              note: str = "") -> Protocol:
    return Protocol(Figure(latency_us * MICRO, source, note), Figure(efficiency, source, note),
                    Figure(saturation, NCCL_ENQUEUE if source == NCCL_TUNING else source, note))


def _tier(name: str, ring_us: tuple, tree_us: tuple, ll_max_gbps: float,
          nvls: Protocol | None = None, nvls_tree_us: float | None = None) -> Tier:
    saturation = (512 * KIB, 80 * KIB, 512 * KIB)  # LL, LL128, Simple: 16 channels each
    efficiency = (0.5, 0.92, 1.0)
    return Tier(
        name=name,
        protocols={p: _protocol(lat, eff, sat) for p, lat, eff, sat
                   in zip(PROTOCOLS, ring_us, efficiency, saturation)},
        tree_latency={p: Figure(lat * MICRO, NCCL_TUNING) for p, lat in zip(PROTOCOLS, tree_us)},
        ll_max_bandwidth=Figure(ll_max_gbps * GIGA, NCCL_TUNING, "llMaxBws"),
        nvls=nvls,
        nvls_tree_latency=None if nvls_tree_us is None else Figure(nvls_tree_us * MICRO, NCCL_TUNING))


NVLINK_RING_US, NVLINK_TREE_US = (0.6, 1.9, 3.4), (0.6, 1.25, 4.0)
NET_RING_US, NET_TREE_US = (2.7, 4.0, 14.0), (5.0, 8.5, 14.0)
# NVLS: hwLat 25 us once per collective; 16 channels on Hopper, 24 on a Blackwell NVLink domain.
NVLS_HOPPER = _protocol(25.0, 0.85 * 15 / 16, 0.0, note="nvlsEfficiency 0.85 on 15 of 16 channels")
NVLS_BLACKWELL = _protocol(25.0, 0.74 * 23 / 24, 0.0,
                           note="nvlsEfficiency 0.74 on 23 of 24 channels")

NVLINK3 = _tier("NVLink3", NVLINK_RING_US, NVLINK_TREE_US, 87.7)
NVLINK4 = _tier("NVLink4", NVLINK_RING_US, NVLINK_TREE_US, 141.0, NVLS_HOPPER)
NVLINK5 = _tier("NVLink5", NVLINK_RING_US, NVLINK_TREE_US, 282.0, NVLS_BLACKWELL)
# Between nodes LL's cap is by CPU (llMaxBws row 0, Intel, 2 nodes); NVLS trees 20.9 us a level.
INFINIBAND_HDR = _tier("InfiniBand HDR", NET_RING_US, NET_TREE_US, 39.0, nvls_tree_us=20.9)
# NCCL has one NET row, whatever the generation: HDR and NDR differ only in the bandwidth the
# accelerator gives them (scale_out_bandwidth).
INFINIBAND_NDR = _tier("InfiniBand NDR", NET_RING_US, NET_TREE_US, 39.0, nvls_tree_us=20.9)


# What NCCL derives each tier's constants from, for a fit to scale from (cost_model/nccl_fit.py).
NCCL_SATURATION = {"LL": 512 * KIB, "LL128": 80 * KIB, "Simple": 512 * KIB}
NCCL_RING_US = {"up": dict(zip(PROTOCOLS, NVLINK_RING_US)), "out": dict(zip(PROTOCOLS, NET_RING_US))}
NCCL_TREE_US = {"up": dict(zip(PROTOCOLS, NVLINK_TREE_US)), "out": dict(zip(PROTOCOLS, NET_TREE_US))}
NCCL_NVLS_TREE_US = 20.9


def tier_with(tier: Tier, which: str, values: dict, source: str, name: str | None = None) -> Tier:
    """`tier` (scale-`which`: "up" NVLink, "out" the network) with the fitted constants in
    `values` (cost_model/nccl_fit.KNOBS; latencies in seconds), the others kept:
    `latency.P` a protocol's per-step latency (on the network its tree step scales with it,
    and NVLS trees' level with Simple's), `efficiency.P` its fraction of the bus bandwidth,
    `saturation` NCCL's channel-threshold sizes scaled (the channels NCCL runs), `channels`
    the channels of a saturated collective, and `nvls.latency`, `nvls.efficiency`."""
    def figure(key, old):
        return Figure(values[key], source) if key in values else old

    protocols, trees = {}, dict(tier.tree_latency)
    for p in PROTOCOLS:
        old = tier.protocols[p]
        saturation = old.saturation
        if "saturation" in values:
            saturation = Figure(NCCL_SATURATION[p] * values["saturation"], source)
        protocols[p] = Protocol(figure(f"latency.{p}", old.latency),
                                figure(f"efficiency.{p}", old.efficiency), saturation)
        if which == "out" and f"latency.{p}" in values:
            ratio = values[f"latency.{p}"] / (NCCL_RING_US["out"][p] * MICRO)
            trees[p] = Figure(NCCL_TREE_US["out"][p] * MICRO * ratio, source)
    nvls = tier.nvls
    if nvls is not None:
        nvls = Protocol(figure("nvls.latency", nvls.latency),
                        figure("nvls.efficiency", nvls.efficiency), nvls.saturation)
    nvls_tree = tier.nvls_tree_latency
    if which == "out" and nvls_tree is not None and "latency.Simple" in values:
        ratio = values["latency.Simple"] / (NCCL_RING_US["out"]["Simple"] * MICRO)
        nvls_tree = Figure(NCCL_NVLS_TREE_US * MICRO * ratio, source)
    channels = Figure(values["channels"], source) if "channels" in values else tier.channels
    return Tier(name or tier.name, protocols, trees, tier.ll_max_bandwidth, nvls, nvls_tree,
                channels)


def knob_values_of(tier: Tier) -> dict:
    """The values `tier_with` takes that reproduce `tier`'s latencies, saturation and channels
    (latencies in seconds)."""
    values = {f"latency.{p}": tier.protocols[p].latency.value for p in PROTOCOLS}
    values["saturation"] = tier.protocols["Simple"].saturation.value / NCCL_SATURATION["Simple"]
    values["channels"] = tier.channels.value
    if tier.nvls is not None:
        values["nvls.latency"] = tier.nvls.latency.value
    return values


def _fitted(tier: Tier, name: str, values: dict, files: str) -> Tier:
    """`tier` with the constants `values` (latencies in µs) that cost_model.nccl_fit.fit
    fitted within its bounds (bench/fidelity_published.py --fit prints them); the rest
    are NCCL's."""
    seconds = {key: value * MICRO if "latency" in key else value for key, value in values.items()}
    return tier_with(tier, "up", seconds, f"fitted to the fit half of {files}", name)


# Each NVLink preset tier fitted, within nccl_fit's bounds around NCCL's constants, to its own
# system's single-node curves (NCCL's own constants are 1.3-3x optimistic below 16 MiB).
# The network tiers are not fitted: a preset describes a healthy DGX/HGX system, and the
# only multi-node curves published are of clusters that are not (nccl-tests#290's runs at a
# quarter of its NICs' rate; OCI's is RoCE on A100-40GB): they validate calibration instead
# (bench/fidelity_published.py, "calibrated").
AZURE = "bench/published/collectives/azure-ai-benchmarking-guide.csv"
ISSUE_290 = "bench/published/collectives/nccl-tests-issue-290.csv"
NVLINK3_A100 = _fitted(NVLINK3, "NVLink3 (A100, fitted)", {
    "latency.LL": 2.57, "latency.LL128": 2, "latency.Simple": 13.6, "efficiency.LL128": 0.6,
    "efficiency.Simple": 1, "saturation": 1.07, "channels": 16}, AZURE)
NVLINK4_H100 = _fitted(NVLINK4, "NVLink4 (H100, fitted)", {
    "latency.LL": 1.44, "latency.LL128": 2.11, "latency.Simple": 1.93, "efficiency.LL128": 0.777,
    "efficiency.Simple": 0.908, "saturation": 2, "channels": 18, "nvls.latency": 68.9,
    "nvls.efficiency": 0.621}, f"{AZURE} and {ISSUE_290} (single node)")
NVLINK4_H200 = _fitted(NVLINK4, "NVLink4 (H200, fitted)", {
    "latency.LL": 1.79, "latency.LL128": 1.13, "latency.Simple": 3.85, "efficiency.LL128": 0.862,
    "efficiency.Simple": 1, "saturation": 1.51, "channels": 18, "nvls.latency": 73.2,
    "nvls.efficiency": 0.641}, AZURE)
# No NVLink5 curve is in bench/published: Blackwell's tier takes the H100 fit's step latencies,
# channels and saturation (what NCCL's software adds to NCCL's constants on every system
# measured, 1.3-3x, is no property of the link generation) and keeps NCCL's NVLink5 rates
# and Blackwell NVLS efficiency.
NVLINK5_FROM_H100 = tier_with(NVLINK5, "up", {
    key: value for key, value in knob_values_of(NVLINK4_H100).items()
    if key.startswith("latency.") or key in ("channels", "saturation", "nvls.latency")},
    "the H100 fit's latencies (no NVLink5 curve published in bench/published)",
    "NVLink5 (H100's fitted latencies)")
A100 = Accelerator(
    name="A100-SXM-80GB", family="gpu",
    peak_flops=_figures({
        "bf16": (312, GLK_A100, "624 with 2:4 sparsity; the scaling book's table rounds to 310"),
        "f16": (312, NV_TABLE3, "tensor cores, FP32 accumulate"),
        "tf32": (156, NV_TABLE3, "tensor cores"),
        "f32": (19.5, NV_TABLE3, "FP32 without tensor cores, as at Precision.HIGHEST"),
        "f64": (19.5, NV_TABLE3, "FP64 tensor cores"),
    }),
    hbm_capacity=Figure(80 * GIGA, GLK_A100),
    hbm_bandwidth=Figure(2.039 * TERA, GLK_A100, "Calculon models 2.048 TB/s; STREAM measures 1.61-1.75"),
    scale_up_bandwidth=Figure(300 * GIGA, SB_GPUS, "NVLink3: 12 links x 25 GB/s per direction"),
    scale_up_latency=Figure(10 * MICRO, CALCULON_A100, "model constant of the NVLink tier"),
    scale_up_domain=Figure(8, SB_GPUS),
    scale_out_bandwidth=Figure(25 * GIGA, CALCULON_A100,
                               "HDR 200 Gb/s InfiniBand per GPU (Selene: 8 per node, Narayanan SC21)"),
    scale_out_latency=Figure(20 * MICRO, CALCULON_A100, "model constant of the InfiniBand tier"),
    scale_up_efficiency=Figure(230 / 300, NCCL_149, "about 230 GB/s achieved of 300"),
    scale_out_efficiency=Figure(192 / 200, NCCL_812, "DGX-A100, 8 x 200 Gb/s HDR: 192 GB/s all-reduce "
                                                     "busbw, 24 GB/s per NIC"),
    scale_up_tier=NVLINK3_A100,
    scale_out_tier=INFINIBAND_HDR,
)

H100 = Accelerator(
    name="H100-SXM", family="gpu",
    peak_flops=_figures({
        "bf16": (989, SB_GPUS, "1979 with sparsity; 989.4 in the whitepaper"),
        "f16": (989.4, GLK_H100, "tensor cores"),
        "fp8": (1979, SB_GPUS, "the table rounds to 2.0e15"),
        "tf32": (494.7, GLK_H100, "tensor cores"),
        "f32": (66.9, GLK_H100, "FP32 vector FMA, as at Precision.HIGHEST"),
        "f64": (66.9, GLK_H100, "FP64 tensor cores"),
    }),
    hbm_capacity=Figure(80 * GIGA, SB_GPUS),
    hbm_bandwidth=Figure(3.35 * TERA, SB_GPUS, "Calculon models 3.072 TB/s"),
    scale_up_bandwidth=Figure(450 * GIGA, SB_GPUS,
                              "NVLink4: 18 links x 25 GB/s; NCCL reaches about 370 GB/s busbw "
                              "(nccl-tests#212)"),
    scale_up_latency=Figure(10 * MICRO, CALCULON_A100, "Calculon's NVLink-tier constant; the H100 "
                                                         "preset gives none"),
    scale_up_domain=Figure(8, SB_GPUS),
    scale_out_bandwidth=Figure(50 * GIGA, SB_GPUS, "8 x 400 Gb/s NDR per node: 400 GB/s node egress; "
                                                   "46-48 GB/s achieved per NIC (nccl-tests#290)"),
    scale_out_latency=Figure(20 * MICRO, CALCULON_A100, "Calculon's InfiniBand-tier constant"),
    scale_up_efficiency=Figure(370 / 450, NCCL_212, "about 370 GB/s busbw of 450 (ring, non-allreduce)"),
    scale_out_efficiency=Figure(47 / 50, NCCL_290, "46-48 GB/s busbw per 400 Gb/s NDR NIC"),
    scale_up_tier=NVLINK4_H100,
    scale_out_tier=INFINIBAND_NDR,
)

H200 = Accelerator(
    name="H200", family="gpu",
    peak_flops=H100.peak_flops,  # the same Hopper die (scaling book, gpus.md)
    hbm_capacity=Figure(141 * GIGA, DGX_H200, "glennklockwood.com lists 144 GB, physical"),
    hbm_bandwidth=Figure(4.8 * TERA, DGX_H200, "STREAM measures 4.01-4.48 (Azure AI-benchmarking-guide)"),
    scale_up_bandwidth=Figure(450 * GIGA, DGX_H200, "NVLink4: 900 GB/s bidirectional"),
    scale_up_latency=H100.scale_up_latency,
    scale_up_domain=Figure(8, DGX_H200),
    scale_out_bandwidth=Figure(50 * GIGA, DGX_H200, "one 400 Gb/s ConnectX-7 NIC per GPU"),
    scale_out_latency=H100.scale_out_latency,
    scale_up_efficiency=H100.scale_up_efficiency,  # the same NVLink4 and NVSwitch as H100
    scale_out_efficiency=H100.scale_out_efficiency,
    scale_up_tier=NVLINK4_H200,
    scale_out_tier=INFINIBAND_NDR,
)

B200 = Accelerator(
    name="B200", family="gpu",
    peak_flops=_figures({
        "bf16": (2250, SB_GPUS, "HGX B200 at 1000 W; 4500 with sparsity (glennklockwood.com)"),
        "f16": (2250, GLK_B200, "HGX B200 at 1000 W, tensor cores"),
        "fp8": (4500, SB_GPUS, ""),
        "tf32": (1100, GLK_B200, "HGX B200 at 1000 W, tensor cores"),
        "f32": (80, GLK_B200, "HGX B200 at 1000 W: FP32 vector FMA, as at Precision.HIGHEST"),
        "f64": (40, GLK_B200, "HGX B200 at 1000 W"),
    }),
    hbm_capacity=Figure(192 * GIGA, SB_GPUS, "uncertain: shipping parts may expose less"),
    hbm_bandwidth=Figure(8.0 * TERA, SB_GPUS, "uncertain: the same chapter's prose says 9 TB/s"),
    scale_up_bandwidth=Figure(900 * GIGA, SB_GPUS, "NVLink5: 18 links x 50 GB/s"),
    scale_up_latency=H100.scale_up_latency,
    scale_up_domain=Figure(8, SB_GPUS, "DGX B200"),
    scale_out_bandwidth=Figure(50 * GIGA, SB_GPUS, "DGX B200 SuperPod: 400 GB/s node egress"),
    scale_out_latency=H100.scale_out_latency,
    scale_up_efficiency=H100.scale_up_efficiency,  # assumed as H100: no figure of its own
    scale_out_efficiency=H100.scale_out_efficiency,
    scale_up_tier=NVLINK5_FROM_H100,
    scale_out_tier=INFINIBAND_NDR,
)

# A GB200 NVL72 rack's GPUs are B200 dies at 1200 W in one NVLink domain of 72.
GB200 = replace(
    B200, name="GB200",
    peak_flops=_figures({
        "bf16": (2500, NV_GB200, "180 PF dense per 72 GPUs"),
        "f16": (2500, NV_GB200, "as bf16"),
        "fp8": (5000, NV_GB200, "360 PF dense per 72 GPUs"),
        "tf32": (1250, NV_GB200, "90 PF dense per 72 GPUs"),
        "f32": (90, GLK_B200, "the GB200 variant at 1200 W: FP32 vector FMA, as at "
                              "Precision.HIGHEST"),
        "f64": (45, GLK_B200, "the GB200 variant at 1200 W"),
    }),
    hbm_capacity=Figure(13.4e12 / 72, NV_GB200, "13.4 TB per 72 GPUs; 186 GB each"),
    hbm_bandwidth=Figure(8.0 * TERA, NV_GB200, "576 TB/s per 72 GPUs"),
    scale_up_bandwidth=Figure(900 * GIGA, SB_GPUS, "NVLink5: 1.8 TB/s bidirectional per GPU "
                                                   "(130 TB/s per 72, NV_GB200)"),
    scale_up_domain=Figure(72, SB_GPUS, "GB200 NVL72: one NVLink domain of 72 GPUs (appendix A)"),
    scale_out_bandwidth=Figure(50 * GIGA, SB_GPUS, "appendix A: 4 x 18 x 400 Gb/s per 72 GPUs, "
                                                   "one 400 Gb/s NIC per GPU"),
)

TPU_V4 = Accelerator(
    name="TPU-v4", family="tpu",
    peak_flops=_figures({"bf16": (275, GCP_V4, "int8 also 275")}),
    hbm_capacity=Figure(32 * 2**30, GCP_V4, "32 GiB"),
    hbm_bandwidth=Figure(1.2 * TERA, GCP_V4),
    scale_up_bandwidth=Figure(45 * GIGA, SB_TPUS, "per ICI link, one way; 6 links on the 3D torus"),
    scale_up_latency=Figure(1 * MICRO, SB_SHARDING, "about 1 us per hop, a book estimate"),
    scale_up_domain=Figure(4096, GCP_V4, "chips per pod"),
    scale_out_bandwidth=None,  # data-center network bandwidth: not found
    scale_out_latency=None,
    ici_links=6,
)

TPU_V5E = Accelerator(
    name="TPU-v5e", family="tpu",
    peak_flops=_figures({"bf16": (197, GCP_V5E, "int8 394")}),
    hbm_capacity=Figure(16 * GIGA, GCP_V5E),
    hbm_bandwidth=Figure(0.819 * TERA, GCP_V5E, "one version of the page says 800 GiB/s; the book 8.1e11"),
    scale_up_bandwidth=Figure(45 * GIGA, SB_TPUS, "per ICI link, one way; 4 links on the 2D torus"),
    scale_up_latency=Figure(1 * MICRO, SB_SHARDING, "about 1 us per hop; below ~45 kB latency-bound"),
    scale_up_domain=Figure(256, GCP_V5E, "chips per pod (16x16)"),
    scale_out_bandwidth=Figure(25 * GIGA / 8, GCP_V5E, "25 GB/s per host of 8 chips (2 x 100 Gb/s)"),
    scale_out_latency=None,
    ici_links=4,
)

TPU_V5P = Accelerator(
    name="TPU-v5p", family="tpu",
    peak_flops=_figures({"bf16": (459, GCP_V5P, "int8 918 (scaling book)")}),
    hbm_capacity=Figure(95 * GIGA, GCP_V5P, "the scaling book says 96 GB"),
    hbm_bandwidth=Figure(2.765 * TERA, GCP_V5P, "the book's table 2.8e12, its prose 2.5e12"),
    scale_up_bandwidth=Figure(90 * GIGA, SB_TPUS, "per ICI link, one way; 6 links on the 3D torus"),
    scale_up_latency=Figure(1 * MICRO, SB_SHARDING, "about 1 us per hop, a book estimate"),
    scale_up_domain=Figure(8960, GCP_V5P, "chips per pod (16x20x28)"),
    scale_out_bandwidth=Figure(25 * GIGA / 4, SB_TPUS, "about 25 GB/s per host of 4 chips, a book estimate"),
    scale_out_latency=None,
    ici_links=6,
)

ACCELERATORS = {a.name: a for a in (A100, H100, H200, B200, GB200, TPU_V4, TPU_V5E, TPU_V5P)}
# Short names, as cluster presets spell them (`h100x8:64`, `tpu-v5e:16x16`).
ALIASES = {"a100": A100, "h100": H100, "h200": H200, "b200": B200, "gb200": GB200, "tpu-v4": TPU_V4,
           "tpu-v5e": TPU_V5E, "tpu-v5p": TPU_V5P}


def accelerator(name: str) -> Accelerator:
    """A preset by its name or alias (case-insensitive)."""
    key = name.lower()
    for table in (ALIASES, {n.lower(): a for n, a in ACCELERATORS.items()}):
        if key in table:
            return table[key]
    known = ", ".join(sorted(ALIASES))
    raise KeyError(f"no accelerator preset {name!r} (known: {known})")
