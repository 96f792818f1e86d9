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

Training runs (`--parts training`): each row of bench/published/training/*.csv
that bench/training_runs.py can model is written as an `.ein` training step of
its model on its mesh (pipeline, schedule, micro-batches, recomputation,
tensor and sequence parallelism as the row says), checked, compiled and priced
on the row's preset. The predicted measurement is the step time, or, where
the source publishes TFLOP/s per GPU, the source's own FLOP count of the
iteration over the predicted time (`training_runs.published_flops`). Printed
per row: predicted, measured, error, the half, and for rows with dp > 1 the
error of one data-parallel replica priced alone (`replica`: a diagnostic of
how the data-parallel step is planned, not a prediction); then per source file
and half and per half the median and max absolute error, the rows not modelled
with their reasons, and the Korthikanti et al. Table 5 rows against Calculon's
published error on them. No constant is fitted to any training row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from einpar.cost_model import nccl  # noqa: E402
from einpar.cost_model.cluster import preset  # noqa: E402
from einpar.cost_model.collectives import collective_time  # noqa: E402
from einpar.layout import Mesh  # noqa: E402
from bench import published_kernels  # noqa: E402
from bench.published import load  # noqa: E402

BANDS = (("<=64KiB", 0, 64 * 2**10), ("64KiB-16MiB", 64 * 2**10 + 1, 16 * 2**20),
         (">16MiB", 16 * 2**20 + 1, float("inf")))
# The presets whose NVLink tier hardware.py holds as fitted (on their single-node curves).
FITTED = ("a100x8", "h100x8", "h200x8")


def forced_algorithms(row: dict) -> tuple[str, ...] | None:
    return ("ring",) if "NCCL_ALGO=RING" in row["system"] else None


def local_bytes(row: dict) -> float:
    return nccl.rank_bytes(row["collective"], row["bytes"], row["gpus"])


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


def band_stats(errors: list[tuple[int, float]], band: str) -> tuple[float, float, int] | None:
    values = [abs(e) for size, e in errors if band_of(size) == band]
    return (statistics.median(values), max(values), len(values)) if values else None


def summarize(errors: list[tuple[int, float]]) -> str:
    parts = []
    for name, _, _ in BANDS:
        stats = band_stats(errors, name)
        parts.append(f"{name} median {stats[0]:5.1%} max {stats[1]:5.1%} (n={stats[2]})"
                     if stats else f"{name} -")
    return "; ".join(parts)


def measurement(row: dict):
    from types import SimpleNamespace

    return SimpleNamespace(kind=row["collective"], gpus=row["gpus"], nodes=row["nodes"],
                           bytes=row["bytes"], local_bytes=local_bytes(row),
                           time_s=row["time_us_implied"] * 1e-6)


def curves_of(rows: list[dict]) -> dict:
    """The priced rows by (file, system): one system's curve (or curves) from one source."""
    curves: dict = {}
    for row in rows:
        if row["time_us_implied"] is not None:
            curves.setdefault((row["file"], row["system"]), []).append(row)
    return curves


def chip_of(curve: list[dict]):
    """The preset chip a curve runs on: its preset's, or the GPU its system names."""
    from einpar.cost_model.hardware import accelerator

    if curve[0]["preset"]:
        return preset(curve[0]["preset"]).chip
    for marker in ("GB200", "B200", "H200", "H100", "A100"):
        if marker in curve[0]["system"]:
            return accelerator(marker.lower())
    return None


def calibrated_chip(curve: list[dict]):
    """What `einpar calibrate --nccl-tests` makes of the curve's fit half: the tier its runs
    cross (NVLink inside a node, the network across nodes) fitted, bus bandwidth included."""
    from einpar.cost_model import nccl_fit

    chip = chip_of(curve)
    fit_rows = [r for r in curve if r["half"] == "fit"]
    which = "up" if curve[0]["nodes"] == 1 else "out"
    fitted, values = nccl_fit.fit(chip, [measurement(r) for r in fit_rows], which,
                                  "calibrated on the fit half", [forced_algorithms(r) for r in fit_rows],
                                  nccl_fit.CALIBRATION_KNOBS)
    return fitted, which, values


def collectives_report(rows: list[dict], verbose: bool, mode: str = "presets") -> list[dict]:
    """Per (file, system, half): the band summaries, with each curve priced on its preset
    (`mode` "presets") or on a tier calibrated on its own fit half ("calibrated"); prints the
    rows if `verbose`."""
    summary = []
    skipped = 0
    for (file, system), curve in sorted(curves_of(rows).items()):
        if mode == "presets" and not curve[0]["preset"]:
            skipped += len(curve)
            continue
        if mode == "presets":
            print(f"\n{file} | {system} | preset {curve[0]['preset']}")
            chip = None
        else:
            chip, which, values = calibrated_chip(curve)
            shown = ", ".join(f"{k} {v * 1e6:.2f} us" if "latency" in k else f"{k} {v:.3f}"
                              for k, v in values.items())
            print(f"\n{file} | {system} | {chip.name}, scale-{which} fitted: {shown}")
        errors = {"fit": [], "held_out": []}
        for row in sorted(curve, key=lambda r: (r["collective"], r["bytes"])):
            if chip is None:
                seconds, how = predicted_s(row)
            else:
                option = nccl.fastest(row["collective"], row["gpus"], row["gpus"] // row["nodes"],
                                      row["nodes"], local_bytes(row), chip, forced_algorithms(row))
                seconds, how = option.time_s, f"{option.algorithm}/{option.protocol}"
            measured = row["time_us_implied"] * 1e-6
            error = seconds / measured - 1
            errors[row["half"]].append((row["bytes"], error))
            if verbose:
                print(f"  {row['collective']:<14} {row['bytes']:>12,} B  predicted {seconds * 1e6:10.1f} us"
                      f"  measured {measured * 1e6:10.1f} us  {error:+7.1%}  {row['half']:<8} {how}")
        for half in ("fit", "held_out"):
            if errors[half]:
                print(f"  {half:<8}: {summarize(errors[half])}")
                summary.append({"file": file, "system": system, "half": half, "mode": mode,
                                "errors": errors[half]})
    if skipped:
        print(f"\n{skipped} rows of systems with no preset are priced under 'calibrated' only")
    return summary


def summary_table(summary: list[dict]) -> None:
    """System x band: the held-out median absolute error, presets and calibrated."""
    print("\nsummary: held-out median |error| per size band (n rows); presets / calibrated")
    print(f"  {'system':<72} " + " ".join(f"{name:>22}" for name, _, _ in BANDS))
    systems = sorted({(s["file"], s["system"]) for s in summary})
    for file, system in systems:
        cells = []
        for band, _, _ in BANDS:
            parts = []
            for mode in ("presets", "calibrated"):
                entry = next((s for s in summary if (s["file"], s["system"], s["half"], s["mode"])
                              == (file, system, "held_out", mode)), None)
                stats = band_stats(entry["errors"], band) if entry else None
                parts.append(f"{stats[0]:5.1%}" if stats else "  -  ")
            count = next((band_stats(s["errors"], band) for s in summary
                          if (s["file"], s["system"], s["half"]) == (file, system, "held_out")
                          and band_stats(s["errors"], band)), None)
            cells.append(f"{parts[0]} / {parts[1]} (n={count[2] if count else 0})")
        label = f"{system[:60]} [{file.split('.')[0][:10]}]"
        print(f"  {label:<72} " + " ".join(f"{cell:>22}" for cell in cells))


def refit(rows: list[dict]) -> None:
    """Fit each preset's NVLink tier on the fit half of its system's single-node curves and
    print the fitted values (hardware.py's `_fitted(...)` takes them, latencies in µs)."""
    from einpar.cost_model import nccl_fit

    for name in FITTED:
        chip = preset(name).chip
        chosen = [r for r in rows if r["preset"] == name and r["half"] == "fit"
                  and r["time_us_implied"] is not None]
        fitted, values = nccl_fit.fit(chip, [measurement(r) for r in chosen], "up", "fit half",
                                      [forced_algorithms(r) for r in chosen])
        print(f"{chip.name} scale-up ({len(chosen)} fit rows):")
        print("  {" + ", ".join(f'"{k}": {v * 1e6 if "latency" in k else v:.3g}'
                               for k, v in values.items()) + "}")


# Calculon (Isaev et al., SC'23) validates against Korthikanti et al.'s Table 5 end-to-end
# iteration times (calculon-ai/calculon calculon/llm/validation.py, seqsel_tab5: the 8 rows of
# megatron-korthikanti-table5.csv) and reports a mean absolute error of 3.65% and a max of 8.87%.
CALCULON = {"file": "megatron-korthikanti-table5.csv", "mean": 0.0365, "max": 0.0887}


def _stats(errors: list[float]) -> str:
    values = [abs(e) for e in errors]
    if not values:
        return "-"
    return (f"median {statistics.median(values):5.1%} mean {statistics.mean(values):5.1%} "
            f"max {max(values):5.1%} (n={len(values)})")


def training_report(folder: Path, verbose: bool = True, replicas: bool = True) -> list[dict]:
    """Price every modelled training row; print the table and the summaries; return the rows'
    results (label, file, half, quantity, predicted, measured, error, replica_error)."""
    import time

    from bench import training_runs

    start = time.perf_counter()
    rows = load.training_rows(folder)
    results, skipped = [], []
    if verbose:
        print(f"  {'row':<50} {'half':<8} {'measured':>19} {'predicted':>10} {'error':>7} "
              f"{'replica':>8} {'fits':>4} {'s':>5}")
    for row in rows:
        reason = training_runs.unmodelled(row)
        if reason:
            skipped.append((row, reason))
            continue
        tick = time.perf_counter()
        priced = training_runs.price(row)
        shrink = training_runs.replica_shrink(row) if replicas else None
        replica = training_runs.price(row, shrink)["error"] if shrink else None
        result = {"label": training_runs.label(row), "file": row["file"], "half": row["half"],
                  "quantity": priced["quantity"], "predicted": priced["predicted"],
                  "measured": priced["measured"], "error": priced["error"], "replica_error": replica,
                  "fits": priced["estimate"].fits, "step_s": priced["step_s"],
                  "seconds": time.perf_counter() - tick}
        results.append(result)
        if verbose:
            unit = "s" if result["quantity"] == "iteration_s" else "TFLOP/s"
            shown = f"{replica:+7.1%}" if replica is not None else "      -"
            print(f"  {result['label']:<50} {result['half']:<8} {result['measured']:>11.2f} {unit:<7} "
                  f"{result['predicted']:>10.2f} {result['error']:+7.1%} {shown:>8} "
                  f"{'yes' if result['fits'] else 'NO':>4} {result['seconds']:5.1f}")
    print("\n  per source file and half: |error| of the measured quantity (replica: one dp replica)")
    for name in sorted({r["file"] for r in results}):
        for half in ("fit", "held_out"):
            chosen = [r for r in results if r["file"] == name and r["half"] == half]
            if chosen:
                reps = [r["replica_error"] for r in chosen if r["replica_error"] is not None]
                print(f"  {name:<34} {half:<8} {_stats([r['error'] for r in chosen])}"
                      + (f"; replica {_stats(reps)}" if reps else ""))
    print("\n  per half, all modelled rows:")
    for half in ("fit", "held_out"):
        chosen = [r for r in results if r["half"] == half]
        print(f"  {half:<8} {_stats([r['error'] for r in chosen])}")
    dp1 = [r for r in results if r["replica_error"] is None]
    print(f"  rows with dp = 1 (no data-parallel reduction to plan): {_stats([r['error'] for r in dp1])}")
    for half in ("fit", "held_out"):
        print(f"    {half:<8} {_stats([r['error'] for r in dp1 if r['half'] == half])}")
    calc = [r["error"] for r in results if r["file"] == CALCULON["file"]]
    if calc:
        mean, worst = statistics.mean(abs(e) for e in calc), max(abs(e) for e in calc)
        print(f"\n  Korthikanti et al. Table 5 (the rows Calculon validates on): einpar mean |error| "
              f"{mean:.2%}, max {worst:.2%} over {len(calc)} rows; Calculon (SC'23) reports "
              f"{CALCULON['mean']:.2%} mean, {CALCULON['max']:.2%} max")
    print(f"\n  not modelled: {len(skipped)} of {len(rows)} rows")
    for reason in sorted({reason for _, reason in skipped}):
        names = [training_runs.label(row) for row, why in skipped if why == reason]
        print(f"    {len(names)}: {reason} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    print(f"\n  training report: {len(results)} rows priced in {time.perf_counter() - start:.1f} s")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--published", type=Path, default=ROOT / "bench" / "published",
                        help="the folder of published measurements (default bench/published)")
    parser.add_argument("--fit", action="store_true", help="refit the fitted tiers and print them")
    parser.add_argument("--quiet", action="store_true", help="summaries only, not every row")
    parser.add_argument("--parts", nargs="+", choices=("collectives", "kernels", "training"),
                        default=["collectives", "kernels", "training"], help="which sets to report")
    parser.add_argument("--no-replicas", action="store_true",
                        help="training: do not price each dp > 1 row's single replica")
    args = parser.parse_args(argv)
    rows = load.collective_rows(args.published / "collectives")
    if args.fit:
        refit(rows)
        return 0
    if "collectives" in args.parts:
        collectives_part(rows, args)
    if "kernels" in args.parts:
        kernels_part(args)
    if "training" in args.parts:
        print("\n== training runs: each modelled row written as an .ein training step "
              "(bench/training_runs.py) and priced on its preset")
        training_report(args.published / "training", not args.quiet, not args.no_replicas)
    return 0


def collectives_part(rows: list[dict], args) -> None:
    print("collectives: predicted vs measured (out-of-place time, or nccl-tests' busbw turned back "
          "into time)")
    print("\n== presets: each curve priced on its system's preset")
    summary = collectives_report(rows, not args.quiet, "presets")
    print("\n== calibrated: each curve priced on a tier fitted to its own fit half "
          "(as einpar calibrate --nccl-tests fits)")
    summary += collectives_report(rows, not args.quiet, "calibrated")
    summary_table(summary)


def kernels_part(args) -> None:
    print("\n== kernels: each row priced on its chip's preset (bench/published_kernels.py)")
    print(f"  {'kernel':16} {'chip':6} {'half':9} {'rows':>4}  {'median |err|':>12}  {'max |err|':>9}")
    for row in published_kernels.report(args.published / "kernels"):
        print(f"  {row['kernel']:16} {row['chip']:6} {row['half']:9} {row['rows']:4d}  "
              f"{row['median_abs_error']:12.1%}  {row['max_abs_error']:9.1%}")


if __name__ == "__main__":
    sys.exit(main())
