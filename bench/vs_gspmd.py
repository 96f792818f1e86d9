"""einpar's per-device programs against XLA's own partitioner (GSPMD), on every example.

    .venv/bin/python bench/vs_gspmd.py [--rounds 30] [--platform cpu]

For each example, in one process on the same devices:

- bytes per device: einpar's plan (what `einpar compile --json` reports),
  the collectives XLA compiled for einpar's shard_map program, and those it
  compiled for the GSPMD twin (the whole-array program under jax.jit with
  the same input and output layouts), all read from the optimized HLO with
  einpar's byte convention (backends/hlo_collectives.py);
- step time: einpar's program and the twin are run in alternation, one step
  each per round after a warm-up, and the ratio of their medians reported.

Goals: einpar's bytes <= GSPMD's on every example; time ratio <= 1.05 at
the median. With no accelerator, JAX gets 8 CPU devices (the largest mesh of
the examples); on a CPU they share the host's cores, so times are noisy:
compare the ratios of one run, not times across runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed steps of each, alternating")
    parser.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="JAX platform (default: JAX's)")
    args = parser.parse_args()

    from einpar.api import compile_spmd, load, random_inputs
    from einpar.backends import jax_backend
    from einpar.backends.hlo_collectives import bytes_per_device as hlo_bytes, hlo_collectives
    from einpar.spmd import bytes_per_device

    examples = sorted((ROOT / "examples").glob("**/*.ein"))
    programs = [(str(path.relative_to(ROOT)), load(path)) for path in examples]
    largest = max(program.mesh.num_devices for _, program in programs)
    devices = jax_backend.start_devices(largest, platform=args.platform)
    import jax

    print(f"# {len(devices.devices)} {devices.platform} devices "
          f"({jax.devices()[0].device_kind}); host: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; jax {jax.__version__}; {args.rounds} rounds")
    header = (f"{'example':<44} {'plan B/dev':>11} {'einpar HLO':>11} {'GSPMD HLO':>11} "
              f"{'GSPMD collectives':<24} {'einpar ms':>9} {'GSPMD ms':>9} {'ratio':>6}")
    print(header)
    bytes_ok, ratios = True, []
    for name, program in programs:
        spmd = compile_spmd(program)
        inputs = random_inputs(program, 0)
        mesh_devices = jax_backend.Devices(devices.platform, devices.devices[:program.mesh.num_devices])
        ours = jax_backend.compile_program(program, spmd, inputs, mesh_devices)
        twin = jax_backend.compile_program(program, spmd, inputs, mesh_devices, twin=True)
        n = program.mesh.num_devices
        ours_hlo = hlo_collectives(ours.hlo(), n)
        twin_hlo = hlo_collectives(twin.hlo(), n)
        kinds: dict[str, int] = {}
        for collective in twin_hlo:
            kinds[collective.kind] = kinds.get(collective.kind, 0) + collective.runs
        described = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items())) or "none"
        for _ in range(3):  # warm-up
            ours.step()
            twin.step()
        ours_times, twin_times = [], []
        for _ in range(args.rounds):
            start = time.perf_counter()
            ours.step()
            ours_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            twin.step()
            twin_times.append(time.perf_counter() - start)
        ours_ms, twin_ms = statistics.median(ours_times) * 1e3, statistics.median(twin_times) * 1e3
        ratio = ours_ms / twin_ms
        ratios.append(ratio)
        plan = bytes_per_device(spmd.steps)
        bytes_ok &= plan <= hlo_bytes(twin_hlo)
        print(f"{name:<44} {plan:>11,} {hlo_bytes(ours_hlo):>11,} {hlo_bytes(twin_hlo):>11,} "
              f"{described:<24} {ours_ms:>9.3f} {twin_ms:>9.3f} {ratio:>6.2f}")
    median = statistics.median(ratios)
    print(f"einpar bytes <= GSPMD bytes on every example: {'yes' if bytes_ok else 'NO'}")
    print(f"median time ratio einpar/GSPMD: {median:.3f} (goal <= 1.05: "
          f"{'met' if median <= 1.05 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
