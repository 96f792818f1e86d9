"""The cost model's predicted step time against the JAX backend's measured one, on this host.

    .venv/bin/python bench/fidelity.py [--cluster FILE] [--quick] [--repeat 20] [--passes 3]
                                       [--save FILE] [--json]

This host is measured as a cluster (`einpar.cost_model.calibrate`: 8 JAX
CPU devices, all working at once, as a program's step runs on them), or a
cluster file given with `--cluster` is read. Then every example is compiled,
its step time predicted by `cost_model.estimate` on that cluster (no
overlap: XLA's CPU collectives block), and measured by running einpar's
per-device program under `jax.shard_map` on the same CPU devices: `--passes`
passes over all the examples, each running every example for `--repeat`
steps after a warm-up, and the median of all its steps. (How fast the host's
cores run drifts over seconds; passes spread every example's steps over the
whole run, so the drift does not land on one example.)

The error is (predicted - measured) / measured, signed: positive when the
model is pessimistic; `passes ms` is the range of the passes' medians. The
last column says what the prediction is made of: compute, communication and
the fixed step overhead, as shares of the predicted step. On a CPU the
devices share the host's cores, so times are noisy from run to run: compare
errors within one run. A mesh smaller than 8 devices leaves the others
idle, so its devices get more of the cores than the calibration (8 devices
at once) gave them; the calibrated cluster says how many cores its devices
share (`shared_cores`), and the estimate scales their compute for that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEVICES = 8  # the largest mesh of the examples


def describe_cluster(cluster) -> list[str]:
    chip, eff = cluster.chip, cluster.efficiency

    def table(steps, unit: str) -> str:
        return "  ".join(f">={size:.0e}{unit}: {fraction:.3g}" if size else f"less: {fraction:.3g}"
                         for size, fraction in steps)

    return [
        f"# cluster {cluster.describe()} ({chip.peak_flops['f32'].source})",
        f"#   peak f32 {chip.peak_flops['f32'].value / 1e9:.2f} GFLOP/s per device; "
        f"memory {chip.hbm_bandwidth.value / 1e9:.2f} GB/s per device; "
        f"collectives {chip.scale_up_bandwidth.value / 1e9:.2f} GB/s, "
        f"{chip.scale_up_latency.value * 1e6:.1f} us per ring step; "
        f"step overhead {cluster.step_overhead_s * 1e6:.0f} us",
        f"#   matrix efficiency  {table(eff.matrix, ' FLOP')}",
        f"#   vector efficiency  {table(eff.vector, ' FLOP')}",
        f"#   memory efficiency  {table(eff.memory, ' B')}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cluster", metavar="FILE",
                        help="a cluster file (or preset) to use instead of calibrating")
    parser.add_argument("--quick", action="store_true", help="a quicker, rougher calibration")
    parser.add_argument("--repeat", type=int, default=20,
                        help="timed steps of each example per pass")
    parser.add_argument("--passes", type=int, default=3, help="passes over all the examples")
    parser.add_argument("--save", metavar="FILE", help="write the calibrated cluster file here")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    # With --json, stdout holds only the JSON document.
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print

    from einpar.api import compile_spmd, load, run_jax
    from einpar.cost_model.calibrate import calibrate, write_cluster_file
    from einpar.cost_model.cluster import load_cluster, parse_cluster
    from einpar.cost_model.estimate import estimate

    if args.cluster:
        cluster = load_cluster(args.cluster)
    else:
        say(f"# calibrating {DEVICES} JAX CPU devices{' (quick)' if args.quick else ''} ...")
        progress = lambda step: print(f"#   {step}", file=sys.stderr, flush=True)  # noqa: E731
        document = calibrate(DEVICES, quick=args.quick, progress=progress)
        if args.save:
            write_cluster_file(document, args.save)
        cluster = parse_cluster(json.dumps(document), "calibrated.json")
    for line in describe_cluster(cluster):
        say(line)

    import jax

    say(f"# host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"jax {jax.__version__}; {args.passes} pass{'es' * (args.passes != 1)} of {args.repeat} "
        f"timed steps per example")
    examples = []
    for path in sorted((ROOT / "examples").glob("*/*.ein")):
        program = load(path)
        spmd = compile_spmd(program)
        examples.append((str(path.relative_to(ROOT)), program, spmd,
                         estimate(program, spmd, cluster, overlap=False)))
    steps: dict[str, list[float]] = {name: [] for name, *_ in examples}
    medians: dict[str, list[float]] = {name: [] for name, *_ in examples}
    for number in range(args.passes):
        print(f"#   pass {number + 1} of {args.passes}", file=sys.stderr, flush=True)
        for name, program, _, _ in examples:
            run = run_jax(program, seed=0, cpu_devices=DEVICES, platform="cpu", repeat=args.repeat,
                          warmup=2)
            steps[name] += run.step_times_s
            medians[name].append(run.step_s)

    say(f"{'example':<50} {'devices':>7} {'predicted ms':>12} {'measured ms':>11} "
        f"{'passes ms':>13} {'error':>8}  {'prediction: compute / comm / overhead'}")
    rows = []
    for name, _, spmd, est in examples:
        predicted, measured = est.step_time_s, statistics.median(steps[name])
        error = (predicted - measured) / measured
        overhead = est.cluster.step_overhead_s
        shares = [part / predicted if predicted else 0.0
                  for part in (est.compute_s, est.comm_s, overhead)]
        rows.append({"example": name, "devices": spmd.mesh.num_devices,
                     "predicted_s": predicted, "measured_s": measured, "error": error,
                     "measured_pass_medians_s": medians[name],
                     "compute_s": est.compute_s, "comm_s": est.comm_s, "step_overhead_s": overhead,
                     "flops_per_device": est.flops_per_device,
                     "bytes_per_device": est.bytes_per_device})
        share = " / ".join(f"{100 * s:3.0f}%" for s in shares)
        spread = f"{min(medians[name]) * 1e3:.2f}-{max(medians[name]) * 1e3:.2f}"
        say(f"{name:<50} {spmd.mesh.num_devices:>7} {predicted * 1e3:>12.3f} "
            f"{measured * 1e3:>11.3f} {spread:>13} {100 * error:>+7.1f}%  {share}")
    median_abs = statistics.median(abs(row["error"]) for row in rows)
    median_signed = statistics.median(row["error"] for row in rows)
    say(f"median absolute error: {100 * median_abs:.1f}%")
    say(f"median signed error: {100 * median_signed:+.1f}% "
        f"({'pessimistic' if median_signed > 0 else 'optimistic'} at the median)")
    if args.json:
        print(json.dumps({"cluster": cluster.name, "source": cluster.chip.peak_flops["f32"].source,
                          "rows": rows, "median_abs_error": median_abs,
                          "median_error": median_signed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
