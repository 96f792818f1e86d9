"""Pricing time against cluster size: the attention example on 8, 512 and 16,384 devices.

    .venv/bin/python bench/cost_scale.py

The tensor-parallel attention example, data parallel over more and more
devices (weak scaling: 4 sequences per data-parallel rank, tp=4), priced on
H100 clusters of 1, 64 and 2,048 nodes and on TPU v4 tori. Pricing
(`cost_model.estimate`) uses the mesh's symmetry, so its time should not
grow with the number of devices: the goal is 16,384 devices within 1.5x of
8. Compiling (partition and lower) and building the cluster's networkx graph
are timed apart: the graph is the model a user can inspect, and pricing
never walks it for a preset. Times are medians of several runs in one
process, so the ratios are comparable on a noisy machine.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from einpar.api import compile_spmd, load  # noqa: E402
from einpar.cost_model.cluster import preset  # noqa: E402
from einpar.cost_model.estimate import estimate  # noqa: E402

EXAMPLE = ROOT / "examples" / "attention" / "tensor_parallel.ein"
CASES = [  # (devices, data-parallel size, cluster)
    (8, 2, "h100x8"), (512, 128, "h100x8:64"), (16384, 4096, "h100x8:2048"),
    (8, 2, "tpu-v4:2x2x2"), (512, 128, "tpu-v4:8x8x8"), (4096, 1024, "tpu-v4:16x16x16"),
]
RUNS = 15


def median_time(work, runs: int = RUNS) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    rows = []
    for devices, dp, name in CASES:
        program = load(EXAMPLE, {"dp": dp, "tp": 4, "B": 4 * dp})
        compile_s, spmd = median_time(lambda: compile_spmd(program), 5)
        price_s, result = median_time(lambda: estimate(program, spmd, preset(name)))
        graph_s, graph = median_time(lambda: preset(name).graph, 3)
        rows.append((devices, name, compile_s, price_s, graph_s, graph.number_of_nodes(), result))
    print(f"{'devices':>8} {'cluster':<16} {'compile':>9} {'price':>9} {'price/8':>8} "
          f"{'graph':>9} {'nodes':>7} {'step':>10} {'comm':>10}")
    base = {}
    for devices, name, compile_s, price_s, graph_s, nodes, result in rows:
        family = name.split("x")[0].split(":")[0]
        base.setdefault(family, price_s)
        print(f"{devices:>8,} {name:<16} {compile_s * 1e3:>7.1f}ms {price_s * 1e3:>7.2f}ms "
              f"{price_s / base[family]:>7.2f}x {graph_s * 1e3:>7.0f}ms {nodes:>7,} "
              f"{result.step_time_s * 1e6:>8.1f}µs {result.comm_s * 1e6:>8.1f}µs")
    gpu = [row for row in rows if row[1].startswith("h100")]
    ratio = gpu[-1][3] / gpu[0][3]
    verdict = "meets" if ratio <= 1.5 else "misses"
    print(f"\npricing 16,384 devices takes {ratio:.2f}x the time of 8 ({verdict} the 1.5x goal)")


if __name__ == "__main__":
    main()
