"""einpar's per-device programs against XLA's own partitioner (GSPMD), in bytes, priced time and step time.

    .venv/bin/python bench/vs_gspmd.py [FILE ...] [--programs examples|set|all]
                                       [--cluster h100x8] [--rounds 30] [--platform cpu]

The programs: every example (examples/**/*.ein, `--programs examples`), the
partitioner's program set (tests/partition_programs/*.ein, `--programs set`:
each file's header derives its byte minimum by hand), or both (the
default); FILEs, if given, replace them. For each, in one process on the
same devices:

- bytes per device: einpar's plan (what `einpar compile --json` reports),
  the collectives XLA compiled for einpar's shard_map program, and those it
  compiled for the GSPMD twin (the whole-array program under jax.jit with
  the same input and output layouts), all read from the optimized HLO with
  einpar's byte convention (backends/hlo_collectives.py);
- priced collective time on `--cluster` (default h100x8), both plans by the
  same cost model: einpar's is its estimate's communication time
  (`cost_model.estimate.estimate(...).comm_s`, every collective priced by
  `cost_model.collectives.collective_time`); GSPMD's is each collective of
  its HLO priced by that same function over the mesh axes its replica
  groups span (`hlo_collectives.price_collectives`). Only collectives are
  priced: GSPMD may split the compute differently from einpar (repeat a
  matmul on every device, or not), so adding einpar's compute time to
  GSPMD's collectives would price a plan GSPMD did not make. Instead the
  matmul FLOPs each device runs is read from both HLO modules (every `dot`,
  `hlo_collectives.hlo_dot_flops`), which shows repeated work. A `~` marks a
  GSPMD collective whose groups are not exactly the groups of some mesh
  axes (priced over the axes that cover them);
- step time: einpar's program and the twin are run in alternation, one step
  each per round after a warm-up, and the ratio of their medians reported.
  The program run is einpar's plan for the machine it runs on: planned for
  `--host-cluster` (default: `einpar calibrate --quick` of this host's
  devices, about 10 s, written to a temporary file), as a user planning for
  their own devices would; `--host-cluster same` runs the `--cluster` plan.
- the byte-minimal plan's bytes (`--objective bytes`), beside the time plan's:
  the time plan may send more bytes where the cluster's model says fewer,
  larger collectives are faster.

Goals: einpar's bytes <= GSPMD's on every program; time ratio <= 1.0 at the
median and none above 1.1. With no accelerator, JAX gets 8 CPU devices (the
largest mesh of the programs); on a CPU they share the host's cores, so
times are noisy: compare the ratios of one run, not times across runs.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROGRAM_SETS = {"examples": ["examples/**/*.ein"], "set": ["tests/partition_programs/*.ein"],
                "all": ["examples/**/*.ein", "tests/partition_programs/*.ein"]}


def program_paths(files: list[str], which: str) -> list[Path]:
    if files:
        return [Path(file) for file in files]
    return [path for pattern in PROGRAM_SETS[which] for path in sorted(ROOT.glob(pattern))]


def shown(path: Path) -> str:
    """`attention/fsdp`, `partition_programs/p1_cp_qkv`: a program of the default sets
    without its common prefix and suffix; another file as given."""
    try:
        name = path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)
    for prefix in ("examples/", "tests/"):
        if name.startswith(prefix) and name.endswith(".ein"):
            return name[len(prefix):-len(".ein")]
    return name


def compile_for(compile_spmd, program, cluster):
    """einpar's plan for `cluster` where compile_spmd takes one, else its only plan."""
    if "cluster" in inspect.signature(compile_spmd).parameters:
        return compile_spmd(program, cluster=cluster)
    return compile_spmd(program)


def described(priced, mesh) -> str:
    """`2 all_reduce[sp], 1 all_gather[sp]`: GSPMD's collectives by kind and axes."""
    from einpar.backends.hlo_collectives import mesh_axes_text

    counts: dict[str, int] = {}
    for cost in priced:
        key = f"{cost.collective.kind}[{mesh_axes_text(cost.axes, mesh)}]" + ("" if cost.exact else "~")
        counts[key] = counts.get(key, 0) + cost.collective.runs
    return ", ".join(f"{count} {key}" for key, count in sorted(counts.items())) or "none"


def time_each(compiled: list, rounds: int) -> list[float]:
    """Median seconds of a step of each of `compiled`, run in alternation (one step each per
    round) after a warm-up."""
    for _ in range(3):
        for program in compiled:
            program.step()
    times = [[] for _ in compiled]
    for _ in range(rounds):
        for program, seconds in zip(compiled, times):
            start = time.perf_counter()
            program.step()
            seconds.append(time.perf_counter() - start)
    return [statistics.median(seconds) for seconds in times]


def host_cluster(choice: str, cluster, load_cluster):
    """The cluster the measured plans are made for: `same` (the priced one), a file, or a
    quick calibration of this host's devices (`einpar calibrate --quick`)."""
    if choice == "same":
        return cluster
    if choice != "calibrate":
        return load_cluster(choice)
    import subprocess
    import tempfile

    out = Path(tempfile.mkdtemp()) / "host.json"
    subprocess.run([sys.executable, "-m", "einpar", "calibrate", "--quick", "--out", str(out)],
                   check=True, capture_output=True)
    return load_cluster(str(out))


def rounds_count(text: str) -> int:
    """--rounds: a whole number of at least 1."""
    rounds = int(text)
    if rounds < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return rounds


def add_run_arguments(parser, rounds: int) -> None:
    """The options of a bench that runs einpar's plans against GSPMD on this host's devices:
    --cluster, --rounds, --platform and --host-cluster (read by load_clusters)."""
    parser.add_argument("--cluster", default="h100x8",
                        help="cluster preset or file to price on, and to plan on with --host-cluster same")
    parser.add_argument("--rounds", type=rounds_count, default=rounds,
                        help="timed steps of each, alternating")
    parser.add_argument("--platform", choices=["cpu", "gpu", "tpu"], help="JAX platform (default: JAX's)")
    parser.add_argument("--host-cluster", default="calibrate", metavar="FILE|calibrate|same",
                        help="the cluster the measured plan is planned for (default: calibrate "
                             "this host; same: the --cluster plan)")


def load_clusters(parser, args):
    """The cluster `--cluster` prices on, and the one `--host-cluster` plans the measured
    program for (a usage error when either cannot be read)."""
    from einpar.cost_model.cluster import load_cluster

    try:
        cluster = load_cluster(args.cluster)
    except Exception as error:  # noqa: BLE001 - any unreadable cluster is a usage error here
        parser.error(f"--cluster {args.cluster}: {error}")
    return cluster, host_cluster(args.host_cluster, cluster, load_cluster)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="programs to run (default: --programs)")
    parser.add_argument("--programs", choices=sorted(PROGRAM_SETS), default="all",
                        help="the examples, the partitioner's program set, or both (default)")
    add_run_arguments(parser, rounds=30)
    args = parser.parse_args()

    from einpar.api import compile_spmd, load, random_inputs
    from einpar.backends import jax_backend
    from einpar.backends.hlo_collectives import bytes_per_device as hlo_bytes
    from einpar.backends.hlo_collectives import hlo_collectives, hlo_dot_flops, price_collectives
    from einpar.cost_model.estimate import estimate
    from einpar.errors import EinparError
    from einpar.spmd import bytes_per_device

    cluster, host = load_clusters(parser, args)
    paths = program_paths(args.files, args.programs)
    programs = []
    for path in paths:
        try:
            programs.append((shown(path), load(path)))
        except (EinparError, OSError) as error:
            print(f"{shown(path)}: not loaded: {str(error).splitlines()[0]}")
    if not programs:
        return 1
    largest = max(program.mesh.num_devices for _, program in programs)
    devices = jax_backend.start_devices(largest, platform=args.platform)
    import jax

    print(f"# {len(devices.devices)} {devices.platform} devices "
          f"({jax.devices()[0].device_kind}); host: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; jax {jax.__version__}; {args.rounds} rounds; priced on "
          f"{cluster.name}; measured plans planned for {host.name}")
    print("# bytes per device; collectives priced in µs; matmul MFLOP per device from the HLO; "
          "step ms measured here")
    print(f"{'program':<40} {'plan B':>10} {'bytes plan':>10} {'einpar HLO':>10} {'GSPMD HLO':>10} "
          f"{'einpar µs':>9} {'GSPMD µs':>9} {'einpar MF':>9} {'GSPMD MF':>9} "
          f"{'einpar ms':>9} {'GSPMD ms':>9} {'ratio':>6}  GSPMD's collectives")
    bytes_above, byte_plan_above, slower_priced, ratios, failed = [], [], [], [], []
    for name, program in programs:
        n = program.mesh.num_devices
        try:
            spmd = compile_for(compile_spmd, program, cluster)
            byte_plan = bytes_per_device(compile_spmd(program, objective="bytes").steps)
            run_spmd = spmd if host is cluster else compile_for(compile_spmd, program, host)
            priced_ours = estimate(program, spmd, cluster).comm_s
            inputs = random_inputs(program, 0)
            mesh_devices = jax_backend.Devices(devices.platform, devices.devices[:n])
            ours = jax_backend.compile_program(program, run_spmd, inputs, mesh_devices)
            twin = jax_backend.compile_program(program, run_spmd, inputs, mesh_devices, twin=True)
            ours_text, twin_text = ours.hlo(), twin.hlo()
            ours_hlo, twin_hlo = hlo_collectives(ours_text, n), hlo_collectives(twin_text, n)
            priced_twin = price_collectives(twin_hlo, program.mesh, cluster)
            ours_s, twin_s = time_each([ours, twin], args.rounds)
        except Exception as error:  # noqa: BLE001 - one program's failure is reported, not fatal
            failed.append(name)
            print(f"{name:<40} failed: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        plan, twin_bytes = bytes_per_device(spmd.steps), hlo_bytes(twin_hlo)
        twin_priced = sum(cost.time_s for cost in priced_twin)
        ratio = ours_s / twin_s
        ratios.append((ratio, name))
        if plan > twin_bytes:
            bytes_above.append(name)
        if byte_plan > twin_bytes:
            byte_plan_above.append(name)
        if priced_ours > twin_priced * (1 + 1e-9):
            slower_priced.append(name)
        print(f"{name:<40} {plan:>10,} {byte_plan:>10,} {hlo_bytes(ours_hlo):>10,} {twin_bytes:>10,} "
              f"{priced_ours * 1e6:>9.2f} {twin_priced * 1e6:>9.2f} "
              f"{hlo_dot_flops(ours_text) / 1e6:>9.2f} {hlo_dot_flops(twin_text) / 1e6:>9.2f} "
              f"{ours_s * 1e3:>9.3f} {twin_s * 1e3:>9.3f} {ratio:>6.2f}  "
              f"{described(priced_twin, program.mesh)}")
    ran = len(ratios)
    print()
    print(f"bytes einpar <= GSPMD on {ran - len(bytes_above)} of {ran} (the time plan on "
          f"{cluster.name}; goal: every one)"
          + (f"; above on {', '.join(bytes_above)}" if bytes_above else ""))
    print(f"bytes of the byte-minimal plan <= GSPMD on {ran - len(byte_plan_above)} of {ran}"
          + (f"; above on {', '.join(byte_plan_above)}" if byte_plan_above else ""))
    print(f"priced collectives einpar <= GSPMD on {ran - len(slower_priced)} of {ran} "
          f"on {cluster.name}" + (f"; above on {', '.join(slower_priced)}" if slower_priced else ""))
    if ratios:
        median = statistics.median(ratio for ratio, _ in ratios)
        worst, worst_name = max(ratios)
        above = [name for ratio, name in ratios if ratio > 1.1]
        print(f"measured step time einpar/GSPMD (plans for {host.name}): median {median:.3f} (goal <= 1.0: "
              f"{'met' if median <= 1.0 else 'NOT met'}), max {worst:.3f} on {worst_name} "
              f"(goal <= 1.1: {'met' if not above else f'NOT met on {len(above)}'})")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
