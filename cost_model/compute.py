"""The time of a local op: a roofline of its FLOPs against the bytes it moves to and from HBM.

    time = max(FLOPs / (peak · efficiency(FLOPs)), bytes / (HBM bandwidth · efficiency(bytes)))

The max is the roofline's perfect-overlap bound (scaling book roofline.md:
T_lower = max(T_math, T_comms); ASTRA-sim Roofline.cc). Bytes are every
operand read once and the result written once: no fusion is assumed, the
conservative choice for a program of separate statements. A take (an
embedding lookup) reads only the rows it looks up, and it and its adjoint,
a scatter-add, compute (nearly) nothing: their time is their bytes
(op_hbm_bytes).

Efficiency is Calculon's size-dependent step model (calculon/processor.py and
memory.py: the fraction of peak grows with the FLOPs of one op, and the
fraction of HBM bandwidth with the bytes moved), because a constant cannot be
right for both a 16 GFLOP matmul (about 0.9 of peak) and a 1 MFLOP one (far
below). Contractions (einsums) run on the matrix unit's table, everything
elementwise or reducing on the vector unit's. A cluster file may give its
own steps, or one constant; `einpar calibrate` measures them on this host.

On a GPU preset (a cluster whose matrix table is still Calculon's), a
contraction is priced by its shape instead (cost_model/matmul.py: tile and
wave quantization on the chip's SMs, a sustained fraction of peak, a
per-tile K overhead and a launch cost, fitted to public cuBLASLt
measurements). A measured table (a cluster file's, `einpar calibrate`'s)
always wins: it is this machine's own answer.

Which peak a dtype gets: bf16 and f16 their own; f32 matmuls what the
matmul precision (einpar.precision) computes them in: at `highest` the FP32
peak on a GPU and a sixth of the bf16 MXU peak on a TPU (6 bf16 passes), at
`default` the TF32 tensor-core peak on a GPU (FP32 where it has none) and the
bf16 peak on a TPU; elementwise f32 the f32 peak where there is one;
f8e4m3 and f8e5m2 contractions the fp8 tensor-core peak (a chip without one
upcasts, as XLA does, and gets its bf16 or f16 peak), their elementwise work
the f16/bf16 rules. A chip with no figure for a dtype gets a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

from einpar.ir import HALF_DTYPES, Einsum, ScatterAdd, Take, work_dtype
from einpar.precision import DEFAULT_PRECISION, TPU_HIGHEST_PASSES, check_precision

from .cluster import CALCULON_EFFICIENCY, Cluster
from .hardware import Accelerator
from .matmul import GemmShape, einsum_gemms, gemm_fit, gemm_math_time

FP8_DTYPES = ("f8e4m3", "f8e5m2")


class NoPeak(KeyError):
    pass


def _candidates(chip: Accelerator, dtype: str, matrix: bool, precision: str) -> tuple[str, ...]:
    if chip.family == "cpu":  # einpar's backends compute half precision in f32 on the host
        return (dtype, "f32")
    if dtype == "f32" and matrix:
        if precision == "highest":  # a TPU's own f32 figure (a cluster file's) first, else 6 passes
            return ("f32", f"bf16/{TPU_HIGHEST_PASSES}") if chip.family == "tpu" else ("f32",)
        return {"gpu": ("tf32", "f32"), "tpu": ("bf16",)}.get(chip.family, ("f32",))
    if dtype in FP8_DTYPES:  # the fp8 tensor cores; without them the half-precision ones
        return ("fp8", "bf16", "f16") if matrix else ("bf16", "f16", "f32")
    if dtype in ("f16", "bf16"):
        return (dtype, "bf16", "f16")
    if dtype in ("i32", "bool"):  # integer and boolean work is elementwise
        return ("f32", "bf16")
    if dtype == "f32":
        return ("f32", "bf16") if chip.family == "tpu" else ("f32",)
    return (dtype,)


def peak_flops(chip: Accelerator, dtype: str, matrix: bool,
               precision: str = DEFAULT_PRECISION) -> tuple[str, float]:
    """(the peak's dtype, FLOP/s) an op in `dtype` runs at, its matmuls at `precision`."""
    check_precision(precision)
    for name in _candidates(chip, dtype, matrix, precision):
        base, _, passes = name.partition("/")
        if base in chip.peak_flops:
            return name, chip.peak_flops[base].value / int(passes or 1)
    known = ", ".join(sorted(chip.peak_flops)) or "none"
    other = ""
    if dtype == "f32" and matrix:  # the other matmul precision, where the chip has its peak
        second = "default" if precision == "highest" else "highest"
        if any(name.partition("/")[0] in chip.peak_flops
               for name in _candidates(chip, dtype, matrix, second)):
            other = f", or price the other matmul precision (--precision {second})"
    raise NoPeak(f"{chip.name} has no published peak for {dtype} arithmetic (it has: {known})",
                 f"write `dtype bf16` in the program, or give accelerator.peak_flops.{dtype} in a "
                 f"cluster file (docs/cost.md){other}")


@dataclass(frozen=True)
class ComputeTime:
    flops: int
    hbm_bytes: int
    math_s: float
    memory_s: float
    peak_dtype: str
    peak: float  # FLOP/s at that dtype, before efficiency

    @property
    def time_s(self) -> float:
        return max(self.math_s, self.memory_s)

    @property
    def bound(self) -> str:
        return "compute" if self.math_s >= self.memory_s else "memory"


def prices_by_shape(cluster: Cluster) -> bool:
    """Whether contractions on this cluster get matmul.py's shape model: a GPU whose matrix
    efficiency is still the preset's (not measured or written by the user)."""
    return cluster.chip.family == "gpu" and cluster.efficiency.matrix == CALCULON_EFFICIENCY.matrix


def _shape_math_s(gemms: list[GemmShape], flops: int, cluster: Cluster, peak_dtype: str,
                  peak: float) -> float:
    """The GEMMs by the shape model; what else the op computes (its steps that sum
    nothing) at the matrix table, as before."""
    sms, fit = gemm_fit(cluster.chip.name, peak_dtype.partition("/")[0])
    math_s = sum(gemm_math_time(gemm, peak, int(sms.value), fit) for gemm in gemms)
    rest = flops - sum(gemm.flops for gemm in gemms)
    if rest > 0:
        efficiency = cluster.efficiency
        math_s += rest / (peak * efficiency.step(efficiency.matrix, rest))
    return math_s


def computed_dtype(op, operand_dtypes=None) -> str:
    """The dtype an op's arithmetic runs in: its result's, except a contraction of narrow
    operands of one dtype into a float32 result, which the backends run on the operands'
    units accumulating in float32 (preferred_element_type, backends/jax_codegen.py)."""
    result = op.result.type.dtype
    if isinstance(op, Einsum) and operand_dtypes and len(set(operand_dtypes)) == 1 \
            and work_dtype(result) == "f32":
        [operands] = set(operand_dtypes)
        if operands in HALF_DTYPES:
            return operands
    return result


def op_hbm_bytes(op, result_bytes: int, operand_bytes: list[int]) -> int:
    """The bytes a local op moves to and from HBM: its operands read once and its result
    written once, except a take, which reads only the rows it looks up (as many bytes as it
    writes) and its ids, and a scatter-add, which writes its result (zeros first), reads
    its update and ids, and reads and writes one result element for each element it adds."""
    if isinstance(op, Take):
        return 2 * result_bytes + operand_bytes[1]
    if isinstance(op, ScatterAdd):
        return result_bytes + sum(operand_bytes) + 2 * operand_bytes[0]
    return result_bytes + sum(operand_bytes)


def op_time(op, flops: int, hbm_bytes: int, cluster: Cluster,
            precision: str = DEFAULT_PRECISION, sizes: dict[str, int] | None = None,
            operand_dtypes=None) -> ComputeTime:
    """Roofline time of one local op of `flops` FLOPs moving `hbm_bytes`, its f32 matmuls
    at `precision` (einpar.precision). Given the op's local index `sizes`, a contraction
    on a GPU preset is priced by its shape (module docstring); given its operands' dtypes,
    a contraction of narrow operands at their peak (computed_dtype)."""
    matrix = isinstance(op, Einsum) and (bool(op.summed) or len(op.operands) > 1)
    dtype, peak = peak_flops(cluster.chip, computed_dtype(op, operand_dtypes), matrix, precision)
    efficiency = cluster.efficiency
    gemms = einsum_gemms(op, sizes) if matrix and sizes is not None and prices_by_shape(cluster) \
        else []
    if gemms:
        math_s = _shape_math_s(gemms, flops, cluster, dtype, peak)
    else:
        table = efficiency.matrix if matrix else efficiency.vector
        math_s = flops / (peak * efficiency.step(table, flops)) if flops else 0.0
    bandwidth = cluster.chip.hbm_bandwidth.value * efficiency.step(efficiency.memory, hbm_bytes)
    return ComputeTime(flops, hbm_bytes, math_s, hbm_bytes / bandwidth, dtype, peak)


def matmul_time(cluster: Cluster, shape: GemmShape, dtype: str, bytes_per_element: float,
                out_bytes_per_element: float | None = None,
                precision: str = DEFAULT_PRECISION) -> ComputeTime:
    """Roofline time of one GEMM of `shape` in `dtype` (A and B read once, C written once),
    priced as op_time prices a contraction: the shape model on a GPU preset, else the
    matrix table."""
    dtype_name, peak = peak_flops(cluster.chip, dtype, True, precision)
    out = bytes_per_element if out_bytes_per_element is None else out_bytes_per_element
    hbm = int(shape.batch * ((shape.m * shape.k + shape.k * shape.n) * bytes_per_element
                             + shape.m * shape.n * out))
    efficiency = cluster.efficiency
    if prices_by_shape(cluster):
        math_s = _shape_math_s([shape], shape.flops, cluster, dtype_name, peak)
    else:
        math_s = shape.flops / (peak * efficiency.step(efficiency.matrix, shape.flops))
    bandwidth = cluster.chip.hbm_bandwidth.value * efficiency.step(efficiency.memory, hbm)
    return ComputeTime(shape.flops, hbm, math_s, hbm / bandwidth, dtype_name, peak)
