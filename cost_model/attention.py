"""The time of one flash-attention kernel: scores, softmax and the weighted sum in one pass.

Flash attention (Dao et al., "FlashAttention", NeurIPS 2022) tiles the
scores so the S×T matrix never reaches HBM: its HBM traffic is q, k, v and
the output, and its time is its FLOPs at the fraction of the matrix peak
the kernel sustains. That fraction is measured per chip in the kernels'
published benchmarks (bench/published/kernels/):

    efficiency = top(chip, dtype, head_dim, direction) · L / (L + L0(chip, direction))

with L the keys each query sees on average (seq_k, half of it when causal).
Every block of queries pays a fixed cost (loading Q, the softmax's final
rescaling, writing O) worth L0 keys of work, so short sequences run below
the top rate (FlashAttention-2, arXiv:2307.08691, Fig. 4-7: throughput
rises with the sequence length at a fixed number of tokens). `top` and L0
are fitted on the fit half of the measurements, per implementation (the
published runs compare FlashAttention-2, -3, Triton's and CUTLASS's kernels
on one chip, and they differ by 1.5x); a chip is priced with its best
published kernel (BEST_KERNEL), the one a program would run. A head
dimension without its own figure takes the nearest one's; a chip without
data DEFAULT_EFFICIENCY.

The backward pass (direction "bwd") is its own kernel with its own `top` and
L0: FlashAttention-2's Algorithm 2 (arXiv:2307.08691) recomputes the scores
and probabilities from q, k and the forward's row statistics and runs five
matmuls (S = QK^T, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q) to the
forward's two, 2.5 times its FLOPs, each block of keys looping over the
queries. Its constants are fitted, like the forward's, on the fit half of
published backward runs (FlashAttention-3's paper, arXiv:2407.08608
section 4.1, H100 SXM5: bench/published/kernels/flashattention3-paper-
backward.csv), the other half held out; a chip or dtype without backward
data takes the forward's efficiency (a forward measurement is the closest
published figure there is).
"""

from __future__ import annotations

from dataclasses import dataclass

from einpar.precision import DEFAULT_PRECISION

from .cluster import Cluster
from .compute import ComputeTime, peak_flops, prices_by_shape
from .matmul import gemm_fit
from .hardware import Figure

# The fraction of the matrix peak a flash-attention forward pass sustains, where no
# measurement for the chip says otherwise. FlashAttention-2 (Dao, 2023, arXiv:2307.08691,
# section 4.1): "reaching 50-73% of the theoretical maximum FLOPs/s on A100".
DEFAULT_EFFICIENCY = Figure(0.60, "Dao 2023, arXiv:2307.08691 sec. 4.1: 50-73% of peak on A100",
                            "the middle of the published range")


@dataclass(frozen=True)
class AttentionShape:
    batch: int  # batch times heads: independent attention problems
    seq_q: int
    seq_k: int
    head_dim: int  # summed in the scores (K) and kept in the output
    value_dim: int
    causal: bool = False
    direction: str = "fwd"  # "fwd", or "bwd" (the backward pass's own kernel)


@dataclass(frozen=True)
class AttentionFit:
    """One kernel's fitted constants on one chip."""

    # (peak dtype, direction) -> {head_dim: the top fraction of the matrix peak}
    top: dict
    keys_overhead: dict  # direction -> L0: each block's fixed cost, in keys


KERNELS_SOURCE = "bench/published/kernels"


def _fitted(csv: str, value: float, note: str = "") -> Figure:
    return Figure(value, f"fitted to the fit half of {KERNELS_SOURCE}/{csv}", note)


# Implementations, as the published benchmarks name them.
KERNEL_NAMES = {"flash2": "FlashAttention-2", "flash3": "FlashAttention-3",
                "triton": "Triton's fused-attention tutorial kernel",
                "cutlass": "Colfax's CUTLASS Hopper FMHA"}

PR2296, PR2370, PR2391 = (f"pytorch-benchmark-pr{n}.csv" for n in (2296, 2370, 2391))
FA3_BACKWARD = "flashattention3-paper-backward.csv"


def _kernel_fit(files: tuple[str, ...], overhead: float, tops: dict,
                backward: tuple | None = None) -> AttentionFit:
    """tops: (peak dtype, direction, head_dim) -> fraction; all fitted on `files`' fit halves.
    `backward`: (files, L0, tops) of the backward kernel, fitted on its own."""
    table: dict = {}
    overheads: dict = {}
    for way_files, way_overhead, way_tops, way in ((files, overhead, tops, "fwd"),
                                                   (*(backward or ((), 0, {})), "bwd")):
        if not way_tops:
            continue
        where = ", ".join(way_files)
        for (dtype, direction, head_dim), value in way_tops.items():
            table.setdefault((dtype, direction), {})[head_dim] = _fitted(where, value)
        overheads[way] = _fitted(where, way_overhead)
    return AttentionFit(table, overheads)


# (chip name, kernel) -> constants, as bench/published_kernels.py --fit prints them. The
# Hopper runs of pytorch/benchmark name "H100" (or a Hopper of H100 class) without SXM or PCIe.
ATTENTION_FITS: dict[tuple[str, str], AttentionFit] = {
    ("H100-SXM", "flash3"): _kernel_fit((PR2370, PR2391), 240, {
        ("bf16", "fwd", 64): 0.428, ("bf16", "fwd", 128): 0.639}, backward=((FA3_BACKWARD,), 440, {
            ("bf16", "bwd", 64): 0.511, ("bf16", "bwd", 128): 0.596})),
    ("H100-SXM", "cutlass"): _kernel_fit((PR2296,), 88, {("bf16", "fwd", 128): 0.436}),
    ("H100-SXM", "thunderkittens"): _kernel_fit((PR2370,), 184, {("bf16", "fwd", 64): 0.355}),
    ("H100-SXM", "triton"): _kernel_fit((PR2296, PR2370, PR2391), 144, {
        ("bf16", "fwd", 64): 0.367, ("bf16", "fwd", 128): 0.427}),
    ("H100-SXM", "flash2"): _kernel_fit((PR2296,), 64, {("bf16", "fwd", 128): 0.309},
                                        backward=((FA3_BACKWARD,), 256, {
                                            ("bf16", "bwd", 64): 0.300,
                                            ("bf16", "bwd", 128): 0.331})),
}
# H200 is H100's GH100 die with more HBM: the kernel is compute-bound, so H100's figures.
ATTENTION_FITS.update({("H200", kernel): fit for (chip, kernel), fit in list(ATTENTION_FITS.items())
                       if chip == "H100-SXM"})
# The kernel each chip is priced with: its fastest published one.
BEST_KERNEL: dict[str, str] = {"H100-SXM": "flash3", "H200": "flash3"}


def attention_efficiency(cluster: Cluster, dtype: str, shape: AttentionShape,
                         precision: str = DEFAULT_PRECISION, kernel: str | None = None) -> Figure:
    """The fraction of the matrix peak `kernel` (by default the chip's best) reaches on this
    chip for this shape."""
    chip = cluster.chip.name
    fit = ATTENTION_FITS.get((chip, kernel or BEST_KERNEL.get(chip, "")))
    if fit is None:
        return DEFAULT_EFFICIENCY
    peak_dtype = peak_flops(cluster.chip, dtype, True, precision)[0].partition("/")[0]
    for direction in dict.fromkeys((shape.direction, "fwd")):  # no backward data: the forward's
        tops = fit.top.get((peak_dtype, direction)) or fit.top.get(("bf16", direction)) \
            or fit.top.get(("f16", direction))
        if tops:
            break
    if not tops:
        return DEFAULT_EFFICIENCY
    nearest = min(tops, key=lambda d: (abs(d - shape.head_dim), d))
    top = tops[nearest]
    overhead = fit.keys_overhead[direction]
    keys = shape.seq_k / 2 if shape.causal else shape.seq_k
    value = top.value * keys / (keys + overhead.value)
    return Figure(value, top.source, f"{direction} top {top.value:.3f} at head_dim {nearest}, "
                                     f"L0 {overhead.value:.0f} keys")


def flash_attention_time(cluster: Cluster, dtype: str, shape: AttentionShape, flops: int,
                         hbm_bytes: int, precision: str = DEFAULT_PRECISION,
                         kernel: str | None = None) -> ComputeTime:
    """Roofline time of the fused kernel: `flops` at the kernel's efficiency, plus on a GPU
    preset a kernel's launch (matmul.py's, fitted to cuBLASLt's), so a small attention costs
    what a small GEMM does; `hbm_bytes` (its inputs and outputs only) at the HBM bandwidth
    as large a transfer reaches (the cluster's memory efficiency)."""
    peak_dtype, peak = peak_flops(cluster.chip, dtype, True, precision)
    efficiency = attention_efficiency(cluster, dtype, shape, precision, kernel).value
    math_s = flops / (peak * efficiency) if flops else 0.0
    if flops and prices_by_shape(cluster):
        math_s += gemm_fit(cluster.chip.name, peak_dtype.partition("/")[0])[1].launch.value
    memory = cluster.efficiency
    memory_s = hbm_bytes / (cluster.chip.hbm_bandwidth.value
                            * memory.step(memory.memory, hbm_bytes))
    return ComputeTime(flops, hbm_bytes, math_s, memory_s, peak_dtype, peak)
