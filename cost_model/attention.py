"""The time of one flash-attention kernel: scores, softmax and the weighted sum in one pass.

Flash attention (Dao et al., "FlashAttention", NeurIPS 2022) tiles the
scores so the S×T matrix never reaches HBM: its HBM traffic is q, k, v and
the output, and its time is its FLOPs at the fraction of the matrix peak
the kernel sustains. That fraction is measured per chip in the kernels'
published benchmarks (bench/published/kernels/):

    efficiency = top(chip, dtype, head_dim, direction) · L / (L + L0(chip))

with L the keys each query sees on average (seq_k, half of it when causal).
Every block of queries pays a fixed cost (loading Q, the softmax's final
rescaling, writing O) worth L0 keys of work, so short sequences run below
the top rate (FlashAttention-2, arXiv:2307.08691, Fig. 4-7: throughput
rises with the sequence length at a fixed number of tokens). `top` and L0
are fitted on the fit half of the measurements; a head dimension without
its own figure takes the nearest one's, a chip without data DEFAULT_EFFICIENCY.
"""

from __future__ import annotations

from dataclasses import dataclass

from einpar.precision import DEFAULT_PRECISION

from .cluster import Cluster
from .compute import ComputeTime, peak_flops
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
    """A chip's fitted flash-attention constants."""

    # (peak dtype, direction) -> {head_dim: the top fraction of the matrix peak}
    top: dict
    keys_overhead: Figure  # L0: each query block's fixed cost, in keys


KERNELS_SOURCE = "bench/published/kernels"


def _fitted(csv: str, value: float, note: str = "") -> Figure:
    return Figure(value, f"fitted to the fit half of {KERNELS_SOURCE}/{csv}", note)


ATTENTION_FITS: dict[str, AttentionFit] = {}


def attention_efficiency(cluster: Cluster, dtype: str, shape: AttentionShape,
                         precision: str = DEFAULT_PRECISION) -> Figure:
    """The fraction of the matrix peak the kernel reaches on this chip for this shape."""
    fit = ATTENTION_FITS.get(cluster.chip.name)
    if fit is None:
        return DEFAULT_EFFICIENCY
    peak_dtype = peak_flops(cluster.chip, dtype, True, precision)[0].partition("/")[0]
    tops = fit.top.get((peak_dtype, shape.direction)) or fit.top.get(("bf16", shape.direction)) \
        or fit.top.get(("f16", shape.direction))
    if not tops:
        return DEFAULT_EFFICIENCY
    nearest = min(tops, key=lambda d: (abs(d - shape.head_dim), d))
    top = tops[nearest]
    keys = shape.seq_k / 2 if shape.causal else shape.seq_k
    value = top.value * keys / (keys + fit.keys_overhead.value)
    return Figure(value, top.source, f"top {top.value:.3f} at head_dim {nearest}, "
                                     f"L0 {fit.keys_overhead.value:.0f} keys")


def flash_attention_time(cluster: Cluster, dtype: str, shape: AttentionShape, flops: int,
                         hbm_bytes: int, precision: str = DEFAULT_PRECISION) -> ComputeTime:
    """Roofline time of the fused kernel: `flops` at the kernel's efficiency, `hbm_bytes`
    (its inputs and outputs only) at the HBM bandwidth."""
    peak_dtype, peak = peak_flops(cluster.chip, dtype, True, precision)
    efficiency = attention_efficiency(cluster, dtype, shape, precision).value
    math_s = flops / (peak * efficiency) if flops else 0.0
    memory_s = hbm_bytes / cluster.chip.hbm_bandwidth.value
    return ComputeTime(flops, hbm_bytes, math_s, memory_s, peak_dtype, peak)
