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

from dataclasses import dataclass, field

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
NCCL_290 = "github.com/NVIDIA/nccl-tests/issues/290 (NVIDIA, 2025-03-03)"
CALCULON_H100 = "calculon-ai/calculon@caa4b11 systems/h100_80g_nvl8.json"
GCP_V4 = "cloud.google.com/tpu/docs/v4 (system architecture table)"
GCP_V5E = "cloud.google.com/tpu/docs/v5e (key chip and pod specifications)"
GCP_V5P = "cloud.google.com/tpu/docs/v5p-training (key specifications)"

TERA = 1e12
GIGA = 1e9
MICRO = 1e-6


@dataclass(frozen=True)
class Figure:
    """A number and where it comes from."""

    value: float
    source: str
    note: str = ""


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
    scale_out_efficiency=Figure(47 / 50, NCCL_290, "46-48 GB/s per NDR NIC; taken for HDR too"),
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
)

H200 = Accelerator(
    name="H200", family="gpu",
    peak_flops=H100.peak_flops,  # the same Hopper die (scaling book, gpus.md)
    hbm_capacity=Figure(141 * GIGA, SB_GPUS, "glennklockwood.com lists 144 GB, physical"),
    hbm_bandwidth=Figure(4.8 * TERA, SB_GPUS, "STREAM measures 4.01-4.48 (Azure AI-benchmarking-guide)"),
    scale_up_bandwidth=Figure(450 * GIGA, SB_GPUS, "NVLink4"),
    scale_up_latency=H100.scale_up_latency,
    scale_up_domain=Figure(8, SB_GPUS),
    scale_out_bandwidth=Figure(50 * GIGA, SB_GPUS, "assumed as DGX H100: no H200 figure was found"),
    scale_out_latency=H100.scale_out_latency,
    scale_up_efficiency=H100.scale_up_efficiency,  # assumed as H100: no figure of its own
    scale_out_efficiency=H100.scale_out_efficiency,
)

B200 = Accelerator(
    name="B200", family="gpu",
    peak_flops=_figures({
        "bf16": (2250, SB_GPUS, "HGX B200 at 1000 W; 4500 with sparsity (glennklockwood.com)"),
        "fp8": (4500, SB_GPUS, ""),
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

ACCELERATORS = {a.name: a for a in (A100, H100, H200, B200, TPU_V4, TPU_V5E, TPU_V5P)}
# Short names, as cluster presets spell them (`h100x8:64`, `tpu-v5e:16x16`).
ALIASES = {"a100": A100, "h100": H100, "h200": H200, "b200": B200, "tpu-v4": TPU_V4,
           "tpu-v5e": TPU_V5E, "tpu-v5p": TPU_V5P}


def accelerator(name: str) -> Accelerator:
    """A preset by its name or alias (case-insensitive)."""
    key = name.lower()
    for table in (ALIASES, {n.lower(): a for n, a in ACCELERATORS.items()}):
        if key in table:
            return table[key]
    known = ", ".join(sorted(ALIASES))
    raise KeyError(f"no accelerator preset {name!r} (known: {known})")
