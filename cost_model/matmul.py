"""The time of one matrix multiplication on a GPU, from its shape.

A contraction's efficiency depends on its shape, not only its FLOPs: cuBLAS
splits C (M×N) into output tiles, one thread block each, that the SMs run
in waves; a last partial wave, or a tile hanging over the edge of C, leaves
tensor cores idle (NVIDIA's "Matrix Multiplication Background User's
Guide", sections "Tile Quantization" and "Wave Quantization"). So:

    blocks  = ceil(M / Tm) · ceil(N / Tn) · batch · split
    waves   = ceil(blocks / SMs)
    time    = launch + waves · (2·Tm·Tn·ceil(K / split) / (peak · sustained / SMs) + block)

for the tile (Tm, Tn) and split that are fastest (cuBLAS's heuristics choose
among its kernels; we take the best of the large tiles its Ampere and Hopper
kernels use). A C of fewer tiles than SMs splits K (split-K: each tile's K
loop shared by 2, 4, ... thread blocks; the partial sums' own traffic is
left out). Three constants per chip and dtype are fitted to public cuBLASLt
measurements (bench/published/kernels/), on the fit half only:

- `sustained`: the fraction of peak an SM's tensor cores keep up in the main
  loop (clocks under power limits, instruction issue);
- `block`: each wave's fixed cost in seconds, a thread block's prologue
  and epilogue (filling the operand pipeline, writing its C tile), which is
  why a short K is slow even on a large C. Seconds, not steps of K: it is
  memory latency, so it does not scale with the dtype's peak;
- `launch`: the kernel's fixed cost, which dominates a small problem.

The HBM side (operands read once, the result written once) stays the
roofline's, in compute.py. A chip with no fitted data takes DEFAULT_FIT;
TPUs and the CPU devices of `einpar calibrate` keep their step tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from einpar.flops import contraction_path, contraction_steps
from einpar.ir import Einsum

from .hardware import Figure

KERNELS_SOURCE = "bench/published/kernels"


@dataclass(frozen=True)
class GemmShape:
    """One pairwise contraction as a batched GEMM: C[b, m, n] = Σ_k A[b, m, k] · B[b, k, n]."""

    m: int
    n: int
    k: int
    batch: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k * self.batch


def _product(indices, sizes: dict[str, int]) -> int:
    return math.prod(sizes[i] for i in indices)


def pairwise_gemm(first: tuple[str, ...], second: tuple[str, ...], kept: tuple[str, ...],
                  sizes: dict[str, int]) -> GemmShape:
    """The GEMM that contracts `first` with `second` into `kept`: M the first operand's
    kept indices not in the second, N the second's kept not in the first, K every index
    summed (in either operand), batch the kept indices of both."""
    out = set(kept)
    m = _product((i for i in dict.fromkeys(first) if i in out and i not in second), sizes)
    n = _product((i for i in dict.fromkeys(second) if i in out and i not in first), sizes)
    batch = _product((i for i in dict.fromkeys(first) if i in out and i in second), sizes)
    k = _product((i for i in dict.fromkeys(first + second) if i not in out), sizes)
    return GemmShape(m, n, k, batch)


def einsum_gemms(op: Einsum, sizes: dict[str, int]) -> list[GemmShape]:
    """The GEMMs an einsum runs on operands of these index sizes, one per pairwise step of
    its contraction path (einpar.flops) that sums an index. A one-operand einsum (a
    transpose or a sum) and a step that sums nothing (an outer or elementwise product)
    are no GEMM."""
    operands = tuple(o.indices for o in op.operands)
    if len(operands) < 2:
        return []
    out = op.result.type.indices
    path = contraction_path(operands, out, sizes)
    gemms = []
    for taken, kept in contraction_steps(operands, out, path):
        if len(taken) == 2 and set(kept) != set(taken[0]) | set(taken[1]):
            gemms.append(pairwise_gemm(taken[0], taken[1], kept, sizes))
    return gemms


@dataclass(frozen=True)
class GemmFit:
    """A chip's fitted constants for one peak (dtype)."""

    sustained: Figure  # fraction of the peak in the main loop
    block: Figure  # seconds per wave: a block's prologue and epilogue
    launch: Figure  # seconds


@dataclass(frozen=True)
class GemmChip:
    sms: Figure
    fits: dict  # the peak's dtype name ("bf16", "f16", "fp8", "tf32", "f32") -> GemmFit


# The large tiles (Tm, Tn) of cuBLAS's and CUTLASS's Ampere and Hopper tensor-core GEMMs
# (e.g. sm80_xmma_gemm_..._256x128 and CUTLASS's Hopper default 128x256x64).
TILES = ((128, 128), (128, 256), (256, 128))

A100_WHITEPAPER = "NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020): 108 SMs"
H100_WHITEPAPER = "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022): 132 SMs on H100 SXM5"
B200_SMS = "pytorch/ao#4002 (deviceQuery on a B200: 'Number of SMs: 148')"


def _fitted(csv: str, value: float, note: str = "") -> Figure:
    return Figure(value, f"fitted to the fit half of {KERNELS_SOURCE}/{csv}", note)


def _fit(sustained: float, block: float, launch: float, note: str = "",
         csv: str = "azure-ai-benchmarking-guide.csv") -> GemmFit:
    return GemmFit(_fitted(csv, sustained), _fitted(csv, block), _fitted(csv, launch, note))


# Filled by bench/published_kernels.py --fit (see docs/cost.md, Compute): the constants below
# are its output on the fit half of each curve.
GEMM_CHIPS: dict[str, GemmChip] = {
    "A100-SXM-80GB": GemmChip(Figure(108, A100_WHITEPAPER), {
        "f16": _fit(0.830, 4.0e-6, 0.0, "the fit puts the whole fixed cost per wave"),
    }),
    "H100-SXM": GemmChip(Figure(132, H100_WHITEPAPER), {
        "fp8": _fit(0.735, 2.8e-6, 3.5e-6),
    }),
    "H200": GemmChip(Figure(132, H100_WHITEPAPER, "the same GH100 die as H100 SXM5"), {
        "fp8": _fit(0.700, 2.0e-6, 3.5e-6),
    }),
    "GB200": GemmChip(Figure(148, B200_SMS, "GB200's GPUs are B200 dies"), {
        "fp8": _fit(0.620, 1.4e-6, 2.0e-6),
    }),
}
# A GPU without measurements takes H100's fit (the most measured chip of the set): its
# SM count where published, else H100's.
GEMM_CHIPS["B200"] = GemmChip(Figure(148, B200_SMS), GEMM_CHIPS["H100-SXM"].fits)
DEFAULT_SMS = Figure(132, H100_WHITEPAPER, "assumed for a GPU without a published SM count")
DEFAULT_FIT = GEMM_CHIPS["H100-SXM"].fits["fp8"]


def gemm_fit(chip_name: str, peak_dtype: str) -> tuple[Figure, GemmFit]:
    """(SM count, constants) for a chip and the peak its GEMM runs at: DEFAULT_FIT for a chip
    with no data; a dtype with none takes the chip's bf16 fit, or its first (H100's bf16,
    f16 and tf32 run on its fp8 fit)."""
    chip = GEMM_CHIPS.get(chip_name)
    if chip is None:
        return DEFAULT_SMS, DEFAULT_FIT
    fit = chip.fits.get(peak_dtype) or chip.fits.get("bf16") or next(iter(chip.fits.values()))
    return chip.sms, fit


def gemm_math_time(shape: GemmShape, peak: float, sms: int, fit: GemmFit) -> float:
    """Seconds of tensor-core work of one GEMM (the formula at the top), for the best tile
    and split of K."""
    if shape.flops == 0:
        return 0.0
    per_sm = peak * fit.sustained.value / sms
    best = math.inf
    for tm, tn in TILES:
        tiles = math.ceil(shape.m / tm) * math.ceil(shape.n / tn) * shape.batch
        split = 1
        while True:  # split-K: `split` blocks per tile, each summing K/split, while it pays
            waves = math.ceil(tiles * split / sms)
            best = min(best, waves * (2 * tm * tn * math.ceil(shape.k / split) / per_sm
                                      + fit.block.value))
            if tiles * split >= sms or split >= shape.k:
                break
            split *= 2  # each wave's `block` stops a split that does not pay
    return fit.launch.value + best
