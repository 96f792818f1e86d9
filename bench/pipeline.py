"""Pipeline schedules side by side, and how long pricing a pipeline takes at scale.

    .venv/bin/python bench/pipeline.py [--runs 3]

First, one configuration: the GPT example of examples/pipeline/ set to GPT-3
175B's shape (96 layers, d_model 12288, 96 heads, 2048 tokens, vocabulary
51200) on 1,024 A100s (`a100x8:128`) as Narayanan et al. 2021 (SC21) ran it in
Table 1: tensor parallel 8, pipeline parallel 8, data parallel 16, a batch of
1536 sequences in micro-batches of one sequence per data-parallel rank (96
micro-batches). For each schedule (gpipe, 1f1b, interleaved with 2 chunks per
stage), the priced step time, the bubble (the stages' idle share of the
timeline), the bubble's closed form for equal stages, and the peak memory of
the fullest stage. The example is float32 as written; the figures compare the
schedules with each other (docs/pipeline.md).

Then the pricing time (check, partition, lower, price: CPU seconds of this
process, median of `--runs`) on 1,024 devices (the configuration above) and
on 16,384 (`a100x8:2048`: tp 8, pp 16, dp 128, 4096 sequences in 32
micro-batches). Goal: under a second each, whatever the device count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from einpar.api import compile_spmd, load  # noqa: E402
from einpar.cost_model.cluster import preset  # noqa: E402
from einpar.cost_model.estimate import estimate  # noqa: E402
from einpar.schedule import bubble_formula  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "interleaved")
SHAPE = {"L": 96, "D": 12288, "H": 96, "P": 64, "R": 2, "F": 49152, "S": 2048, "V": 51200}
CONFIGS = {  # devices -> (cluster, mesh and batch)
    1024: ("a100x8:128", {"dp": 16, "pp": 8, "tp": 8, "B": 1536, "M": 96}),
    16384: ("a100x8:2048", {"dp": 128, "pp": 16, "tp": 8, "B": 4096, "M": 32}),
}
PRICE_GOAL_S = 1.0


def example(schedule: str) -> Path:
    return ROOT / "examples" / "pipeline" / f"gpt_{schedule}.ein"


def priced(schedule: str, devices: int):
    cluster_name, sets = CONFIGS[devices]
    cluster = preset(cluster_name)
    program = load(example(schedule), SHAPE | sets)
    return program, estimate(program, compile_spmd(program, cluster), cluster)


def side_by_side() -> None:
    cluster_name, sets = CONFIGS[1024]
    print(f"GPT-3 175B shape on {cluster_name}: tp {sets['tp']}, pp {sets['pp']}, dp {sets['dp']}, "
          f"{sets['B']} sequences in {sets['M']} micro-batches (float32)")
    print(f"{'schedule':<14} {'step s':>9} {'bubble':>8} {'closed form':>12} {'peak memory':>12}"
          f" {'vs 1f1b step':>13}")
    rows = {}
    for schedule in SCHEDULES:
        _, result = priced(schedule, 1024)
        figures = result.pipeline.to_json()
        rows[schedule] = (result, figures)
    base = rows["1f1b"][0].step_time_s
    for schedule, (result, figures) in rows.items():
        closed = bubble_formula(schedule, figures["stages"], figures["microbatches"], figures["chunks"])
        print(f"{schedule + (' v=2' if figures['chunks'] > 1 else ''):<14} {result.step_time_s:9.2f} "
              f"{figures['bubble']:8.1%} {closed:12.1%} {result.peak_memory_bytes / 2**30:9.1f} GiB"
              f" {result.step_time_s / base:12.3f}x")


def pricing_times(runs: int) -> None:
    import scipy.optimize  # noqa: F401 - the solver's import, once per process, not timed

    from einpar.reshard import plan_reshard
    from einpar.syntax import _parse

    print(f"\npricing time, CPU s (median of {runs}; goal < {PRICE_GOAL_S:g} s)")
    for devices in CONFIGS:
        for schedule in ("1f1b", "interleaved"):
            times = []
            for _ in range(runs):
                _parse.cache_clear()  # cold, as a fresh `einpar cost` is
                plan_reshard.cache_clear()
                start = time.process_time()
                _, result = priced(schedule, devices)
                times.append(time.process_time() - start)
            took = statistics.median(times)
            print(f"{devices:>6} devices, {schedule:<12} {took:6.2f} s "
                  f"({'meets' if took < PRICE_GOAL_S else 'misses'} the goal); step "
                  f"{result.step_time_s:.1f} s, bubble {result.pipeline.timeline.bubble:.1%}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    side_by_side()
    pricing_times(args.runs)


if __name__ == "__main__":
    main()
