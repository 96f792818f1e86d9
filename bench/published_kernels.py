"""einpar's kernel times against published matmul and flash-attention measurements.

    .venv/bin/python bench/published_kernels.py [--data DIR] [--rows] [--fit] [--json]

Every row of bench/published/kernels/*.csv is priced on the preset of its
chip (the `system` column names it: A100, H100, H200, B200; a PCIe part,
whose SMs and clocks differ, is skipped):

- `matmul`: cost_model.compute.matmul_time at the row's (M, N, K, batch) and
  dtype (cost_model/matmul.py's shape model), A and B read once at the
  dtype's width and C written once (fp8 GEMMs write bf16, as cuBLASLt's fp8
  benchmarks do);
- `flash_attention`: cost_model.attention.flash_attention_time, with FLOPs
  counted as flash-attention's benchmarks count them (Dao's
  benchmarks/benchmark_flash_attention.py, `flops()`): forward
  4·batch·heads·seq_q·seq_k·head_dim, halved when causal; the backward 2.5
  times the forward, forward+backward 3.5 times.

Measured time is the row's `time_us`, or its FLOPs (counted as above) over
`tflops`. The error is (predicted - measured) / measured. Rows are split
deterministically (bench/published/load.py): within a curve (one file,
system, kernel and dtype) sorted by size, even positions are the `fit`
half and odd ones `held_out`. Constants are fitted on `fit` rows only
(`--fit` prints them, as cost_model/matmul.py and attention.py hold them).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from einpar.cost_model.attention import AttentionShape, flash_attention_time  # noqa: E402
from einpar.cost_model.cluster import preset  # noqa: E402
from einpar.cost_model.compute import matmul_time, peak_flops  # noqa: E402
from einpar.cost_model.hardware import Figure  # noqa: E402
from einpar.cost_model.matmul import GemmFit, GemmShape, gemm_fit, gemm_math_time  # noqa: E402

KERNELS = ROOT / "bench" / "published" / "kernels"
# The preset of each chip a `system` names, most specific first.
CHIPS = (("GB200", "gb200x72"), ("B200", "b200x8"), ("H200", "h200x8"), ("H100", "h100x8"),
         ("A100", "a100x8"))
# Published dtype names -> einpar's element types.
DTYPES = {"fp16": "f16", "float16": "f16", "f16": "f16", "half": "f16", "bf16": "bf16",
          "bfloat16": "bf16", "fp8": "f8e4m3", "fp8e4m3": "f8e4m3", "e4m3": "f8e4m3",
          "f8e4m3": "f8e4m3", "fp8e5m2": "f8e5m2", "e5m2": "f8e5m2", "f8e5m2": "f8e5m2",
          "tf32": "f32", "fp32": "f32", "f32": "f32"}
WIDTH = {"f16": 2, "bf16": 2, "f8e4m3": 1, "f8e5m2": 1, "f32": 4}
# flash-attention's benchmark: the backward pass is 2.5 forward passes of FLOPs.
DIRECTION_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
DIRECTIONS = {"": "fwd", "fwd": "fwd", "forward": "fwd", "bwd": "bwd", "backward": "bwd",
              "fwd_bwd": "fwd_bwd", "fwd+bwd": "fwd_bwd", "forward+backward": "fwd_bwd"}


@dataclass
class Row:
    file: str
    fields: dict
    half: str  # fit or held_out


def read_rows(directory: Path) -> list[Row]:
    """Every kernel row, with its half, as bench/published/load.py splits them."""
    from bench.published import load
    return [Row(row["file"], {key: "" if value is None else str(value)
                              for key, value in row.items()}, row["half"])
            for row in load.kernel_rows(directory)]


def preset_of(system: str) -> str | None:
    if "pcie" in system.lower():
        return None
    for name, cluster in CHIPS:
        if name.lower() in system.lower():
            return cluster
    return None


def _count(fields: dict, name: str, default: int = 0) -> int:
    text = (fields.get(name) or "").strip()
    return int(float(text)) if text else default


def attention_shape(fields: dict) -> AttentionShape:
    seq_q = _count(fields, "seq_q")
    return AttentionShape(batch=_count(fields, "batch", 1) * _count(fields, "heads", 1),
                          seq_q=seq_q, seq_k=_count(fields, "seq_k", seq_q),
                          head_dim=_count(fields, "head_dim"), value_dim=_count(fields, "head_dim"),
                          causal=(fields.get("causal") or "").strip().lower()
                          in ("1", "true", "yes"),
                          direction="bwd" if direction(fields) == "bwd" else "fwd")


# Which implementation a row's `system` names, most specific first.
IMPLEMENTATIONS = (("flashattention-3", "flash3"), ("flash_v3", "flash3"), ("colfax", "cutlass"),
                   ("cutlass", "cutlass"), ("thunderkittens", "thunderkittens"),
                   ("flexattention", "flex"), ("flex_attention", "flex"), ("triton", "triton"),
                   ("flashattention-2", "flash2"), ("flash_v2", "flash2"), ("sdpa", "flash2"))


def implementation(fields: dict) -> str | None:
    system = (fields.get("system") or "").lower()
    for text, kernel in IMPLEMENTATIONS:
        if text in system:
            return kernel
    return None  # the chip's best kernel


def direction(fields: dict) -> str:
    return DIRECTIONS.get((fields.get("direction") or "").strip().lower(), "fwd")


def kernel_flops(fields: dict) -> float | None:
    kernel = (fields.get("kernel") or "").strip()
    if kernel == "matmul":
        return 2.0 * _count(fields, "m") * _count(fields, "n") * _count(fields, "k") * \
            _count(fields, "batch", 1)
    if kernel == "flash_attention":
        shape = attention_shape(fields)
        forward = 4.0 * shape.batch * shape.seq_q * shape.seq_k * shape.head_dim
        return forward / (2 if shape.causal else 1) * DIRECTION_FLOPS[direction(fields)]
    return None


def measured_s(fields: dict) -> float | None:
    time_us = (fields.get("time_us") or "").strip()
    if time_us:
        return float(time_us) * 1e-6
    tflops = (fields.get("tflops") or "").strip()
    flops = kernel_flops(fields)
    return flops / (float(tflops) * 1e12) if tflops and flops else None


def predicted_s(fields: dict, cluster) -> float:
    dtype = DTYPES[(fields.get("dtype") or "").strip().lower()]
    if fields["kernel"].strip() == "matmul":
        shape = GemmShape(_count(fields, "m"), _count(fields, "n"), _count(fields, "k"),
                          _count(fields, "batch", 1))
        out = 2 if WIDTH[dtype] == 1 else WIDTH[dtype]
        return matmul_time(cluster, shape, dtype, WIDTH[dtype], out).time_s
    shape = attention_shape(fields)
    flops = kernel_flops(fields)
    width = WIDTH[dtype]
    hbm = shape.batch * width * (shape.seq_q * (shape.head_dim + shape.value_dim)
                                 + shape.seq_k * (shape.head_dim + shape.value_dim))
    return flash_attention_time(cluster, dtype, shape, int(flops), hbm,
                                kernel=implementation(fields)).time_s


@dataclass
class Priced:
    row: Row
    preset: str
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s


def price_rows(rows: list[Row]) -> tuple[list[Priced], list[str]]:
    priced, skipped = [], []
    clusters: dict = {}
    for row in rows:
        fields = row.fields
        where = f"{row.file}: {fields.get('source', '')}"
        name = preset_of(fields.get("system", ""))
        measured = measured_s(fields)
        dtype = (fields.get("dtype") or "").strip().lower()
        if name is None or measured is None or dtype not in DTYPES \
                or fields.get("kernel", "").strip() not in ("matmul", "flash_attention"):
            skipped.append(f"{where} (no preset, dtype or measurement)")
            continue
        try:
            cluster = clusters.setdefault(name, preset(name))
        except ValueError:
            skipped.append(f"{where} (no preset {name} yet)")
            continue
        try:
            priced.append(Priced(row, name, measured, predicted_s(fields, cluster)))
        except KeyError as error:  # no peak for the dtype on that chip
            skipped.append(f"{where} ({error.args[0]})")
    return priced, skipped


def summarize(priced: list[Priced]) -> list[dict]:
    """Median and max |error| per kernel, chip and half."""
    groups: dict[tuple, list[Priced]] = {}
    for item in priced:
        key = (item.row.fields["kernel"].strip(), item.preset.split("x")[0], item.row.half)
        groups.setdefault(key, []).append(item)
    summary = []
    for (kernel, chip, half), items in sorted(groups.items()):
        errors = [abs(item.error) for item in items]
        summary.append({"kind": "kernel", "kernel": kernel, "chip": chip, "half": half,
                        "rows": len(items), "median_abs_error": statistics.median(errors),
                        "max_abs_error": max(errors)})
    return summary


def report(directory: Path = KERNELS) -> list[dict]:
    """Summaries for bench/fidelity_published.py: one dict per kernel, chip and half."""
    priced, _ = price_rows(read_rows(directory))
    return summarize(priced)


# -- fitting (on the fit half only)

def _preset_or_none(name: str):
    try:
        return preset(name)
    except ValueError:  # a system with no einpar preset
        return None


def _frange(start: float, stop: float, step: float) -> list[float]:
    return [start + step * k for k in range(int(round((stop - start) / step)) + 1)]


def fit_matmul(rows: list[Row]) -> dict[tuple[str, str], tuple[GemmFit, float, int]]:
    """(chip name, peak dtype) -> (the constants minimizing the mean |log(predicted /
    measured)| over the curve's fit rows, that mean, rows), by grid search."""
    groups: dict[tuple[str, str], list] = {}
    for row in rows:
        fields = row.fields
        name = preset_of(fields.get("system", ""))
        dtype = DTYPES.get((fields.get("dtype") or "").strip().lower())
        if row.half != "fit" or fields.get("kernel", "").strip() != "matmul" or name is None \
                or dtype is None or measured_s(fields) is None:
            continue
        cluster = _preset_or_none(name)
        if cluster is None:
            continue
        shape = GemmShape(_count(fields, "m"), _count(fields, "n"), _count(fields, "k"),
                          _count(fields, "batch", 1))
        out = 2 if WIDTH[dtype] == 1 else WIDTH[dtype]
        cost = matmul_time(cluster, shape, dtype, WIDTH[dtype], out)
        sms = int(gemm_fit(cluster.chip.name, cost.peak_dtype)[0].value)
        groups.setdefault((cluster.chip.name, cost.peak_dtype), []).append(
            (shape, cost.peak, sms, cost.memory_s, measured_s(fields)))
    fits = {}
    for key, members in groups.items():
        best = (math.inf, None)
        for block in _frange(0, 8e-6, 0.2e-6):
            for launch in _frange(0, 12e-6, 0.5e-6):
                for sustained in _frange(0.40, 1.0, 0.005):
                    fit = GemmFit(Figure(sustained, ""), Figure(block, ""), Figure(launch, ""))
                    loss = statistics.fmean(
                        abs(math.log(max(gemm_math_time(shape, peak, sms, fit), memory) / measured))
                        for shape, peak, sms, memory, measured in members)
                    if loss < best[0]:
                        best = (loss, fit)
        fits[key] = (best[1], best[0], len(members))
    return fits


def fit_attention(rows: list[Row]) -> dict[tuple[str, str, str], tuple]:
    """(chip name, kernel, direction) -> (L0, {(peak dtype, direction, head_dim): top}, mean
    |log error|, rows, files):
    for each L0 of a grid, each top is the one minimizing the mean |log error| of its rows
    (the median of their implied tops), on the fit half only. The backward pass is its own
    kernel (its blocks loop over queries for each block of keys), so it has its own L0."""
    groups: dict[str, list] = {}
    for row in rows:
        fields = row.fields
        name = preset_of(fields.get("system", ""))
        dtype = DTYPES.get((fields.get("dtype") or "").strip().lower())
        if row.half != "fit" or fields.get("kernel", "").strip() != "flash_attention" \
                or name is None or dtype is None or measured_s(fields) is None:
            continue
        cluster = _preset_or_none(name)
        if cluster is None:
            continue
        shape = attention_shape(fields)
        peak_dtype, peak = peak_flops(cluster.chip, dtype, True)
        reached = kernel_flops(fields) / measured_s(fields) / peak
        keys = shape.seq_k / 2 if shape.causal else shape.seq_k
        kernel = implementation(fields) or "best"
        groups.setdefault((cluster.chip.name, kernel, direction(fields)), []).append(
            ((peak_dtype, direction(fields), shape.head_dim), keys, reached, row.file))
    fits = {}
    for chip, members in groups.items():  # chip: (chip name, kernel, direction)
        best = (math.inf, 0.0, {})
        for overhead in _frange(0, 2048, 8):
            implied: dict[tuple, list[float]] = {}
            for key, keys, reached, _ in members:
                implied.setdefault(key, []).append(math.log(reached * (keys + overhead) / keys))
            tops = {key: math.exp(statistics.median(logs)) for key, logs in implied.items()}
            loss = statistics.fmean(
                abs(math.log(tops[key] * keys / (keys + overhead) / reached))
                for key, keys, reached, _ in members)
            if loss < best[0] - 1e-12:
                best = (loss, overhead, tops)
        files = sorted({member[3] for member in members})
        fits[chip] = (best[1], best[2], best[0], len(members), files)
    return fits


def print_fit(rows: list[Row]) -> None:
    for (chip, kernel, way), (overhead, tops, loss, count, files) in \
            sorted(fit_attention(rows).items()):
        print(f"flash_attention {chip} {kernel} {way}: keys_overhead {overhead:.0f}  " + "  ".join(
            f"{dtype} {way} d{head_dim}: {top:.3f}"
            for (dtype, way, head_dim), top in sorted(tops.items()))
            + f"  (mean |log error| {loss:.3f} on {count} fit rows of {', '.join(files)})")
    for (chip, dtype), (fit, loss, count) in sorted(fit_matmul(rows).items()):
        print(f"matmul {chip} {dtype}: sustained {fit.sustained.value:.3f}  "
              f"block {fit.block.value * 1e6:.1f} us  launch {fit.launch.value * 1e6:.1f} us  "
              f"(mean |log error| {loss:.3f} on {count} fit rows)")


def print_rows(priced: list[Priced]) -> None:
    print(f"{'half':8} {'chip':6} {'kernel':16} {'dtype':7} {'shape':34} "
          f"{'measured':>10} {'predicted':>10} {'error':>7}  source")
    for item in sorted(priced, key=lambda p: (p.row.half, p.preset, p.row.fields["kernel"],
                                              p.row.fields["dtype"], kernel_flops(p.row.fields))):
        fields = item.row.fields
        if fields["kernel"].strip() == "matmul":
            shape = f"{fields['m']}x{fields['n']}x{fields['k']}" + \
                (f" b{fields['batch']}" if _count(fields, "batch", 1) > 1 else "")
        else:
            causal = " causal" if attention_shape(fields).causal else ""
            shape = (f"b{fields.get('batch')} h{fields.get('heads')} s{fields.get('seq_q')} "
                     f"d{fields.get('head_dim')}{causal}"
                     f" {direction(fields)}")
        flops = kernel_flops(fields)
        print(f"{item.row.half:8} {item.preset.split('x')[0]:6} {fields['kernel']:16} "
              f"{fields['dtype']:7} {shape:34} {flops / item.measured_s / 1e12:8.1f}TF "
              f"{flops / item.predicted_s / 1e12:8.1f}TF {item.error:+7.1%}  "
              f"{item.row.file}: {fields.get('source', '')}")


def print_summary(summary: list[dict]) -> None:
    print(f"{'kernel':16} {'chip':6} {'half':9} {'rows':>4} {'median |err|':>13} {'max |err|':>10}")
    for entry in summary:
        print(f"{entry['kernel']:16} {entry['chip']:6} {entry['half']:9} {entry['rows']:4} "
              f"{entry['median_abs_error']:13.1%} {entry['max_abs_error']:10.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=KERNELS, help="the kernels/ folder")
    parser.add_argument("--rows", action="store_true", help="print every row")
    parser.add_argument("--fit", action="store_true",
                        help="fit the model's constants on the fit half and print them")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = read_rows(args.data)
    if not rows:
        print(f"no kernel rows in {args.data}", file=sys.stderr)
        return 1
    if args.fit:
        print_fit(rows)
        return 0
    priced, skipped = price_rows(rows)
    summary = summarize(priced)
    if args.json:
        print(json.dumps({"summary": summary, "skipped": skipped}, indent=1))
        return 0
    if args.rows:
        print_rows(priced)
        print()
    print_summary(summary)
    if skipped:
        print(f"\n{len(skipped)} rows skipped: " + "; ".join(skipped[:5])
              + (" ..." if len(skipped) > 5 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
