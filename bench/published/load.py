"""Load the published measurements in this folder as typed rows.

Each CSV opens with `#` comment lines (source, system, notes), then a header
and rows; see README.md. `collective_rows()`, `kernel_rows()` and
`training_rows()` return one dict per row with numbers typed (int sizes and
degrees, float times, bandwidths and rates, None where the source publishes
nothing), `file` (the CSV name) and `half` ("fit" or "held_out").

The split never depends on a model: within each curve (same file, system,
collective, gpus, nodes for collectives; same file, system, kernel, dtype for
kernels) the rows are sorted by size and alternate fit, held_out, fit, ...;
training rows alternate within each file by configuration, (gpus, model)
sorted, each configuration wholly in one half. Constants may be fitted on "fit" rows only and are judged on
"held_out" rows.

`python bench/published/load.py` prints the row counts per file and half.
"""
from __future__ import annotations

import csv
import io
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent

COLLECTIVE_COLUMNS = ("system", "preset", "collective", "gpus", "nodes", "bytes",
                      "time_us", "busbw_gbps", "nccl_version", "source")
KERNEL_COLUMNS = ("system", "kernel", "dtype", "m", "n", "k", "batch", "heads", "seq_q",
                  "seq_k", "head_dim", "causal", "direction", "tflops", "time_us", "source")
TRAINING_COLUMNS = ("system", "preset", "gpus", "model", "layers", "hidden", "heads", "ffn_hidden",
                    "vocab", "seq_len", "tp", "pp", "dp", "cp", "ep", "virtual_stages", "micro_batch",
                    "global_batch", "recompute", "sequence_parallel", "dtype", "iteration_s",
                    "tflops_per_gpu", "mfu", "source")
RECOMPUTE = ("none", "selective", "full")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
KERNELS = ("matmul", "flash_attention")

_INT = {"gpus", "nodes", "bytes", "m", "n", "k", "batch", "heads", "seq_q", "seq_k", "head_dim",
        "layers", "hidden", "ffn_hidden", "vocab", "seq_len", "tp", "pp", "dp", "cp", "ep",
        "virtual_stages", "micro_batch", "global_batch"}
_FLOAT = {"time_us", "busbw_gbps", "tflops", "iteration_s", "tflops_per_gpu", "mfu"}
_BOOL = {"causal", "sequence_parallel"}
# A training file's `# notes:` line names the rows whose published parallel degrees do not
# multiply to their GPU count as `degrees-mismatch(MODEL@GPUS, ...)`; such rows are kept as
# published and carry `degrees_mismatch = True`.
_MISMATCH = re.compile(r"degrees-mismatch\(([^)]*)\)")

# nccl-tests' bus-bandwidth factor (doc/PERFORMANCE.md): busbw = algbw * factor,
# algbw = bytes / time.
_BUSBW_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}


def _read(path: Path, columns: tuple[str, ...]) -> list[dict]:
    text = "".join(line for line in path.read_text().splitlines(keepends=True)
                   if not line.startswith("#"))
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != columns:
        raise ValueError(f"{path.name}: header {reader.fieldnames} is not {list(columns)}")
    rows = []
    for lineno, raw in enumerate(reader, start=2):
        row: dict = {"file": path.name}
        for key in columns:
            value = raw[key].strip()
            if key in _INT:
                row[key] = int(value) if value else None
            elif key in _FLOAT:
                row[key] = float(value) if value else None
            elif key in _BOOL:
                row[key] = {"true": True, "false": False, "": None}[value.lower()]
            else:
                row[key] = value
        if not row["source"]:
            raise ValueError(f"{path.name}: data row {lineno} has no source")
        rows.append(row)
    return rows


def _split(rows: list[dict], curve_key, size_key) -> list[dict]:
    curves: dict[tuple, list[dict]] = {}
    for row in rows:
        curves.setdefault(curve_key(row), []).append(row)
    for curve in curves.values():
        curve.sort(key=size_key)
        for position, row in enumerate(curve):
            row["half"] = "fit" if position % 2 == 0 else "held_out"
    return rows


def _kernel_size(row: dict) -> tuple:
    if row["kernel"] == "matmul":
        flops = 2 * row["m"] * row["n"] * row["k"]
    else:
        flops = ((row["batch"] or 0) * (row["heads"] or 0) * (row["seq_q"] or 0)
                 * (row["seq_k"] or 0) * (row["head_dim"] or 0))
    return (flops, row["m"] or 0, row["n"] or 0, row["k"] or 0, row["seq_q"] or 0,
            row["head_dim"] or 0, str(row["direction"]), str(row["causal"]))


def collective_rows(folder: Path = HERE / "collectives") -> list[dict]:
    """Every collective measurement, typed, with `half` and `time_us_implied`.

    `time_us_implied` is `time_us` where the source publishes a time, and
    otherwise the time nccl-tests' own busbw formula gives back from the
    published busbw (bytes / (busbw / factor)); its precision is that of the
    published busbw's last digit.
    """
    rows = []
    for path in sorted(folder.glob("*.csv")):
        rows += _read(path, COLLECTIVE_COLUMNS)
    for row in rows:
        if row["collective"] not in COLLECTIVES:
            raise ValueError(f"{row['file']}: unknown collective {row['collective']!r}")
        implied = row["time_us"]
        if implied is None and row["busbw_gbps"]:
            algbw = row["busbw_gbps"] / _BUSBW_FACTOR[row["collective"]](row["gpus"])
            implied = row["bytes"] / (algbw * 1e9) * 1e6
        row["time_us_implied"] = implied
    return _split(rows, lambda r: (r["file"], r["system"], r["collective"], r["gpus"], r["nodes"]),
                  lambda r: r["bytes"])


def kernel_rows(folder: Path = HERE / "kernels") -> list[dict]:
    """Every kernel measurement, typed, with `half`."""
    rows = []
    for path in sorted(folder.glob("*.csv")):
        rows += _read(path, KERNEL_COLUMNS)
    for row in rows:
        if row["kernel"] not in KERNELS:
            raise ValueError(f"{row['file']}: unknown kernel {row['kernel']!r}")
    return _split(rows, lambda r: (r["file"], r["system"], r["kernel"], r["dtype"]), _kernel_size)


def _notes(path: Path) -> str:
    return " ".join(line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                    if line.startswith("# notes:"))


def training_rows(folder: Path = HERE / "training") -> list[dict]:
    """Every published training run, typed, with `half` and `degrees_mismatch`.

    Within each file the configurations (gpus, model), sorted, alternate fit,
    held_out, each with all its rows (full and selective recomputation of one run
    stay together); `degrees_mismatch` is True for the rows the file's notes list
    as `degrees-mismatch(MODEL@GPUS, ...)`.
    """
    rows = []
    for path in sorted(folder.glob("*.csv")):
        flagged = {item.strip() for match in _MISMATCH.finditer(_notes(path))
                   for item in match.group(1).split(",") if item.strip()}
        file_rows = _read(path, TRAINING_COLUMNS)
        for row in file_rows:
            if row["recompute"] not in RECOMPUTE + ("",):
                raise ValueError(f"{path.name}: unknown recompute {row['recompute']!r}")
            row["degrees_mismatch"] = f"{row['model']}@{row['gpus']}" in flagged
        # A configuration (gpus, model) lies wholly in one half: the same run measured with
        # full and with selective recomputation must not be fitted in one half and judged in
        # the other.
        configs = sorted({(row["gpus"], row["model"]) for row in file_rows})
        half = {config: "fit" if k % 2 == 0 else "held_out" for k, config in enumerate(configs)}
        for row in file_rows:
            row["half"] = half[(row["gpus"], row["model"])]
        rows += file_rows
    return rows


def _band(nbytes: int) -> str:
    if nbytes <= 64 * 1024:
        return "<=64KiB"
    return "64KiB-16MiB" if nbytes <= 16 * 1024 * 1024 else ">16MiB"


def main() -> int:
    collectives, kernels, training = collective_rows(), kernel_rows(), training_rows()
    print("collectives: file, system, collective, gpus x nodes: rows (fit/held_out) per band")
    counts = Counter((r["file"], r["system"], r["collective"], r["gpus"], r["nodes"], _band(r["bytes"]), r["half"])
                     for r in collectives)
    curves = sorted({key[:5] for key in counts})
    for curve in curves:
        bands = []
        for band in ("<=64KiB", "64KiB-16MiB", ">16MiB"):
            fit, held = counts[curve + (band, "fit")], counts[curve + (band, "held_out")]
            bands.append(f"{band} {fit}/{held}")
        print(f"  {curve[0]} | {curve[1]} | {curve[2]} {curve[3]}x{curve[4]}: " + ", ".join(bands))
    print("kernels: file, system, kernel, dtype: rows (fit/held_out)")
    kcounts = Counter((r["file"], r["system"], r["kernel"], r["dtype"], r["half"]) for r in kernels)
    for key in sorted({k[:4] for k in kcounts}):
        print(f"  {key[0]} | {key[1]} | {key[2]} {key[3] or '-'}: "
              f"{kcounts[key + ('fit',)]}/{kcounts[key + ('held_out',)]}")
    print("training: file, system: rows (fit/held_out)")
    tcounts = Counter((r["file"], r["system"], r["half"]) for r in training)
    for key in sorted({k[:2] for k in tcounts}):
        print(f"  {key[0]} | {key[1]}: {tcounts[key + ('fit',)]}/{tcounts[key + ('held_out',)]}")
    per_file = Counter((r["file"], r["half"]) for r in collectives + kernels + training)
    print("per file (fit/held_out):")
    for name in sorted({f for f, _ in per_file}):
        print(f"  {name}: {per_file[(name, 'fit')]}/{per_file[(name, 'held_out')]}")
    print(f"total: {len(collectives)} collective rows, {len(kernels)} kernel rows, "
          f"{len(training)} training rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
