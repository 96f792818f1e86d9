"""einpar's prices against public measurements: every row of bench/published, fit and held-out halves.

    .venv/bin/python bench/fidelity_published.py            # the report
    .venv/bin/python bench/fidelity_published.py --fit      # refit the fitted tier constants

Collectives: each row of bench/published/collectives/*.csv is priced with
`collective_time` on its row's preset (`h100x8`, `a100x8:2`, ...): a 1-D
mesh of the row's GPUs, the collective over it, each device holding what
nccl-tests' size implies (the gathered buffer over n for all-gather, the
buffer otherwise). A row whose run forced an algorithm (`NCCL_ALGO=RING`
in its system) is priced with that algorithm only. Rows with no preset are
counted, not priced. Printed per source file and system: each row's
predicted and measured time and the error, then the median and max
absolute error per size band (<=64 KiB, 64 KiB-16 MiB, >16 MiB), for the
fit half (the rows the presets' fitted constants were fitted to) and the
held-out half apart. `--fit` refits the tiers hardware.py holds as fitted,
on the fit half only, and prints their constants.

Kernels: bench/published_kernels.py, where present, prices the kernel rows;
its `report()` rows are printed after the collectives.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from einpar.cost_model import nccl  # noqa: E402
from einpar.cost_model.cluster import preset  # noqa: E402
from einpar.cost_model.collectives import collective_time  # noqa: E402
from einpar.layout import Mesh  # noqa: E402

BANDS = (("<=64KiB", 0, 64 * 2**10), ("64KiB-16MiB", 64 * 2**10 + 1, 16 * 2**20),
         (">16MiB", 16 * 2**20 + 1, float("inf")))
# The tiers hardware.py holds as fitted: (chip preset, tier, the rows' presets).
FITTED = (("a100x8", "up", ("a100x8",)), ("a100x8:2", "out", ("a100x8:2",)),
          ("h100x8", "up", ("h100x8",)), ("h100x8:2", "out", ("h100x8:2",)),
          ("h200x8", "up", ("h200x8",)))


def load_published(folder: Path):
    spec = importlib.util.spec_from_file_location("published_load", folder / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def forced_algorithms(row: dict) -> tuple[str, ...] | None:
    return ("ring",) if "NCCL_ALGO=RING" in row["system"] else None


def local_bytes(row: dict) -> float:
    return row["bytes"] / row["gpus"] if row["collective"] == "all_gather" else float(row["bytes"])


def predicted_s(row: dict, cluster=None) -> tuple[float, str]:
    """einpar's time for a row and how it runs it."""
    cluster = cluster or preset(row["preset"])
    forced = forced_algorithms(row)
    if forced:
        n, nodes = row["gpus"], row["nodes"]
        option = nccl.fastest(row["collective"], n, n // nodes, nodes, local_bytes(row),
                              cluster.chip, forced)
        return option.time_s, f"{option.algorithm}/{option.protocol} (forced)"
    mesh = Mesh((("d", row["gpus"]),))
    cost = collective_time(row["collective"], ("d",), local_bytes(row), mesh, cluster)
    return cost.time_s, cost.how


def band_of(size: int) -> str:
    return next(name for name, low, high in BANDS if low <= size <= high)


def summarize(errors: list[tuple[int, float]]) -> str:
    parts = []
    for name, _, _ in BANDS:
        band = [abs(e) for size, e in errors if band_of(size) == name]
        parts.append(f"{name} median {statistics.median(band):5.1%} max {max(band):5.1%} (n={len(band)})"
                     if band else f"{name} -")
    return "; ".join(parts)


def collectives_report(rows: list[dict], verbose: bool) -> list[dict]:
    """Per (file, system, half): the band summaries; prints the rows if `verbose`."""
    summary = []
    curves: dict = {}
    skipped = 0
    for row in rows:
        if not row["preset"] or row["time_us_implied"] is None:
            skipped += 1
            continue
        curves.setdefault((row["file"], row["system"]), []).append(row)
    for (file, system), curve in sorted(curves.items()):
        print(f"\n{file} | {system} | preset {curve[0]['preset']}")
        errors = {"fit": [], "held_out": []}
        for row in sorted(curve, key=lambda r: (r["collective"], r["bytes"])):
            seconds, how = predicted_s(row)
            measured = row["time_us_implied"] * 1e-6
            error = seconds / measured - 1
            errors[row["half"]].append((row["bytes"], error))
            if verbose:
                print(f"  {row['collective']:<14} {row['bytes']:>12,} B  predicted {seconds * 1e6:10.1f} us"
                      f"  measured {measured * 1e6:10.1f} us  {error:+7.1%}  {row['half']:<8} {how}")
        for half in ("fit", "held_out"):
            if errors[half]:
                print(f"  {half:<8}: {summarize(errors[half])}")
                summary.append({"file": file, "system": system, "half": half,
                                "errors": errors[half]})
    if skipped:
        print(f"\n{skipped} rows with no preset (or no time) were not priced")
    return summary


def refit(rows: list[dict]) -> None:
    """Fit each fitted tier on the fit half of its rows and print its constants."""
    from types import SimpleNamespace

    from einpar.cost_model import nccl_fit

    fitted_up: dict = {}
    for name, which, presets in FITTED:
        chip = preset(name).chip
        if which == "out":  # on the node's tier as just fitted
            chip = replace(chip, scale_up_tier=fitted_up[chip.name])
        chosen = [r for r in rows if r["preset"] in presets and r["half"] == "fit"]
        measurements = [SimpleNamespace(kind=r["collective"], gpus=r["gpus"], nodes=r["nodes"],
                                        bytes=r["bytes"], local_bytes=local_bytes(r),
                                        time_s=r["time_us_implied"] * 1e-6) for r in chosen]
        tier = nccl_fit.fit_tier(chip, measurements, which, "fit half",
                                 [forced_algorithms(r) for r in chosen])
        if which == "up":
            fitted_up[chip.name] = tier
        print(f"{chip.name} scale-{which} ({len(chosen)} fit rows):")
        for constant, value, _ in nccl_fit._constants(tier):
            shown = (f"{value * 1e6:.2f} us" if "latency" in constant or "tree" in constant
                     else f"{max(0.0, value - 1):.0f} B" if "saturation" in constant
                     else f"{value:.3f}")
            print(f"  {constant:<18} {shown}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, default=ROOT / "bench" / "published",
                        help="the folder of published measurements (default bench/published)")
    parser.add_argument("--fit", action="store_true", help="refit the fitted tiers and print them")
    parser.add_argument("--quiet", action="store_true", help="summaries only, not every row")
    args = parser.parse_args(argv)
    published = load_published(args.published)
    rows = published.collective_rows(args.published / "collectives")
    if args.fit:
        refit(rows)
        return 0
    print("collectives: predicted vs measured (out-of-place time, or nccl-tests' busbw turned back "
          "into time)")
    collectives_report(rows, not args.quiet)
    kernels = ROOT / "bench" / "published_kernels.py"
    if kernels.exists():  # the kernel half: shape-aware matmul and flash-attention pricing
        spec = importlib.util.spec_from_file_location("published_kernels", kernels)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print("\nkernels:")
        for row in module.report():
            print("  " + (row if isinstance(row, str) else ", ".join(f"{k} {v}" for k, v in row.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
