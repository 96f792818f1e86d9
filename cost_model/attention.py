"""The time of one flash-attention kernel: scores, softmax and the weighted sum in one pass.

Flash attention (Dao et al., "FlashAttention", NeurIPS 2022) tiles the
scores so the S×T matrix never reaches HBM: its HBM traffic is q, k, v and
the output, and its time is its FLOPs at the fraction of the matrix peak
the kernel sustains. That fraction is measured per chip in the kernels'
published benchmarks (bench/published/kernels/).
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


def attention_efficiency(cluster: Cluster, dtype: str, shape: AttentionShape) -> Figure:
    """The fraction of the matrix peak the kernel reaches on this chip for this shape."""
    return DEFAULT_EFFICIENCY


def flash_attention_time(cluster: Cluster, dtype: str, shape: AttentionShape, flops: int,
                         hbm_bytes: int, precision: str = DEFAULT_PRECISION) -> ComputeTime:
    """Roofline time of the fused kernel: `flops` at the kernel's efficiency, `hbm_bytes`
    (its inputs and outputs only) at the HBM bandwidth."""
    peak_dtype, peak = peak_flops(cluster.chip, dtype, True, precision)
    efficiency = attention_efficiency(cluster, dtype, shape).value
    math_s = flops / (peak * efficiency) if flops else 0.0
    memory_s = hbm_bytes / cluster.chip.hbm_bandwidth.value
    return ComputeTime(flops, hbm_bytes, math_s, memory_s, peak_dtype, peak)
