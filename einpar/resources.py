"""What a run will hold and how long it will take, estimated before it starts.

`einpar run` and `einpar explain --values` refuse work that cannot fit this
machine's memory (E420) or that would obviously not finish (E421) before they
allocate anything; `--max-memory` and `--max-time` move the limits.

Memory is what the evaluators keep at their peak: the reference keeps every
value of the program as a whole array (a repeat body's values once, for the
trip running); the NumPy simulator keeps every device's block of every value;
the JAX backend on CPU keeps the devices' blocks of inputs and outputs in host
memory. Each adds the largest temporary of one step, and `run` first evaluates
the reference (the oracle the other backends are compared with).

Time is a lower bound: the FLOPs at this host's measured matrix-multiply rate
(the fastest thing NumPy does), plus a floor per NumPy call the evaluators'
Python loops make. A run refused by it cannot finish within the limit.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .errors import Diagnostic, EinparError
from .flops import program_flops
from .ir import Program, Repeat, walk_ops, work_dtype
from .layout import DTYPE_BYTES
from .units import format_bytes, format_count, format_seconds

MAX_TIME_S = 3600.0  # the default --max-time: past an hour a run is a mistake more often than not
# The least one NumPy call in the evaluators' loops costs (with its dict copies and casts):
# a trip of a one-op repeat body takes about 50 µs on a laptop; 5 µs keeps the estimate a floor.
CALL_FLOOR_S = 5e-6
STEP_FLOOR_S = 1e-5  # dispatching one compiled JAX step and waiting for it
# The least one trip of a repeat loop costs with an empty body (its dicts of values and
# names): about 3 µs a simulated device on a busy 2-core host; 1 µs keeps it a floor.
TRIP_FLOOR_S = 1e-6
# Comparing an output with the reference works in float64: both widened, their difference,
# its absolute value and the masks (einpar.tolerance); its statistics, the output widened
# and its deviations.
COMPARE_BYTES_PER_ELEMENT = 40
STATISTICS_BYTES_PER_ELEMENT = 16


# ---------------------------------------------------------------- sizes and durations


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*([kKmMgGtTpP]?)(i?)([bB]?)")
_SCALE = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_size(text: str) -> int:
    """`2GiB` -> 2147483648. Units B, kB/MB/GB/TB/PB (powers of 1000) and KiB/MiB/GiB/TiB/PiB
    or K/M/G/T/P alone (powers of 1024, as `free` and `sort -S` read them)."""
    match = _SIZE.fullmatch(text.strip())
    if not match or not text.isascii():
        raise ValueError(f"expected a size such as 512MiB or 2GiB, got {text!r}")
    number, prefix, binary, byte = match.groups()
    if binary and not prefix or not byte and binary:
        raise ValueError(f"expected a size such as 512MiB or 2GiB, got {text!r}")
    base = 1000 if prefix and byte and not binary else 1024
    value = float(number) * base ** _SCALE[prefix.lower()]
    if not 1 <= value < 2**80:
        raise ValueError(f"expected a size of at least one byte, got {text!r}")
    return int(value)


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?)\s*(s|min|m|h|d)?")
_SECONDS = {None: 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30min`, `2h`, `1d` -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match or not text.isascii():
        raise ValueError(f"expected a duration such as 90s, 30min or 2h, got {text!r}")
    seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    if not 0 < seconds < math.inf:
        raise ValueError(f"expected a positive duration, got {text!r}")
    return seconds


# ---------------------------------------------------------------- this machine


def available_memory(proc: str = "/proc", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Bytes this process can still allocate without swapping: the kernel's MemAvailable,
    or less where a cgroup (a container) limits memory; None where neither is known."""
    found = []
    try:
        for line in Path(proc, "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)  # the kernel writes kB for KiB
    except (OSError, ValueError, IndexError):
        pass
    # cgroup v2, then v1: a limit and what the group uses now.
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = Path(cgroup, limit_file).read_text().strip()
            usage = Path(cgroup, usage_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:  # v1 writes a huge number for no limit
                found.append(max(0, int(limit) - int(usage)))
            break
        except (OSError, ValueError):
            continue
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, OSError, ValueError):
            return None
    return min(found)


@lru_cache(maxsize=1)
def host_flop_rate() -> float:
    """FLOP/s of a float32 matrix product on this host (best of a few, about 50 ms)."""
    import numpy as np

    n = 256
    a = np.ones((n, n), dtype=np.float32)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / max(best, 1e-9)


# ---------------------------------------------------------------- the estimates


def _nbytes(shape, dtype: str) -> int:
    return math.prod(shape) * DTYPE_BYTES[dtype]


def _work_bytes(shape, dtype: str) -> int:
    return math.prod(shape) * DTYPE_BYTES[work_dtype(dtype)]


def reference_calls(ops) -> int:
    """NumPy ops the reference runs: every op, a repeat body's once per trip."""
    return sum(op.count * reference_calls(op.body) if isinstance(op, Repeat) else 1 for op in ops)


def simulator_steps(steps) -> int:
    """Steps the NumPy simulator runs (each on every device): a repeat body's once per trip."""
    from .spmd import RepeatStep

    return sum(step.count * simulator_steps(step.body) if isinstance(step, RepeatStep) else 1
               for step in steps)


def repeat_trips(items) -> int:
    """Trips of every repeat block among `items` (Program ops or SpmdProgram steps), a nested
    block's once per trip of the one around it: each trip is a pass of the evaluator's loop,
    which costs about a NumPy call even when the body is empty."""
    from .spmd import RepeatStep

    return sum(item.count * (1 + repeat_trips(item.body)) for item in items
               if isinstance(item, (Repeat, RepeatStep)))


def reference_bytes(program: Program) -> int:
    """Bytes the reference evaluator keeps at its peak."""
    held = sum(value.type.nbytes for value in program.values.values())
    temporary = 0
    for op in walk_ops(program.ops):
        if isinstance(op, Repeat):
            continue
        result = op.result.type
        # Half-precision operands widened to float32, the result computed, then stored (a copy).
        operands = sum(_work_bytes(v.type.shape, v.type.dtype)
                       for v in (program.values.get(o.value) for o in op.operands)
                       if v is not None and work_dtype(v.type.dtype) != v.type.dtype)
        temporary = max(temporary, operands + 2 * _work_bytes(result.shape, result.dtype))
    # Random half-precision inputs are drawn in float32 before rounding.
    for value in program.inputs:
        temporary = max(temporary, _work_bytes(value.type.shape, value.type.dtype))
    return held + temporary


def _comparing_bytes(program: Program, copies: int, per_element: int) -> int:
    """Bytes held while outputs are compared or summarized: the inputs, `copies` of the
    outputs, and `per_element` bytes of temporaries for each element of the largest."""
    outputs = [program.values[o.value].type for o in program.outputs]
    inputs = sum(value.type.nbytes for value in program.inputs)
    largest = max((t.num_elements for t in outputs), default=0)
    return inputs + copies * sum(t.nbytes for t in outputs) + per_element * largest


def held_copies(spmd, backend: str) -> int:
    """How many copies of one stage's values a pipelined program's run holds at once on
    each device of a stage's (1 without a pipeline): the simulator keeps a micro-batch's
    values until its last backward on the stage (the schedule's activations in flight, in
    micro-batches), the JAX module every micro-batch's (backends/jax_pipeline.py)."""
    pipeline = spmd.pipeline
    if pipeline is None:
        return 1
    from .schedule import in_flight_formula

    schedule = pipeline.schedule
    if backend == "jax":
        return schedule.microbatches
    chunks = max(in_flight_formula(schedule.name, schedule.stages, schedule.microbatches,
                                   schedule.chunks))
    return min(schedule.microbatches, -(-chunks // schedule.chunks) + 1)


def simulator_bytes(spmd) -> int:
    """Bytes the NumPy simulator keeps: every device's block of every value (for a pipeline,
    every stage's devices, each with the micro-batches it holds at once), the largest
    step's temporaries, and the outputs assembled as whole arrays."""
    from .spmd import CollectiveStep, walk_steps

    mesh = spmd.mesh
    devices = mesh.num_devices if spmd.pipeline is None else spmd.pipeline.mesh.num_devices
    local = {name: _nbytes(value.local_shape(mesh), value.type.dtype)
             for name, value in spmd.values.items()}
    inputs = set(spmd.inputs)  # shared by a stage's micro-batches; what they make is not
    held = devices * (sum(size for name, size in local.items() if name in inputs) +
                      held_copies(spmd, "numpy") *
                      sum(size for name, size in local.items() if name not in inputs))
    temporary = 3 * max((_work_bytes(v.local_shape(mesh), v.type.dtype) for v in spmd.values.values()),
                        default=0)
    for step in walk_steps(spmd.steps):
        if isinstance(step, CollectiveStep):  # chunks of every device in flight at once
            temporary = max(temporary, devices * (local[step.src] + local[step.dst]))
    # The whole outputs, and which of their elements a device filled (one byte each).
    assembled = sum(spmd.values[o.value].type.nbytes + spmd.values[o.value].type.num_elements
                    for o in spmd.outputs)
    inputs = sum(spmd.values[name].type.nbytes for name in spmd.inputs)
    return inputs + held + temporary + assembled


def jax_host_bytes(spmd, on_host: bool, processes: int = 1) -> int:
    """Host bytes of a JAX run besides the reference: the whole inputs, and where the
    devices are this host's CPU, their blocks of the inputs and outputs and a temporary."""
    mesh = spmd.mesh
    inputs = sum(spmd.values[name].type.nbytes for name in spmd.inputs)
    outputs = sum(spmd.values[o.value].type.nbytes for o in spmd.outputs)
    total = inputs + 2 * outputs  # the outputs come back whole and as blocks
    if on_host:
        whole = mesh if spmd.pipeline is None else spmd.pipeline.mesh
        devices = -(-whole.num_devices // processes)
        blocks = [name for name in spmd.inputs] + [o.value for o in spmd.outputs]
        total += devices * sum(_nbytes(spmd.values[n].local_shape(mesh), spmd.values[n].type.dtype)
                               for n in blocks)
        total += devices * held_copies(spmd, "jax") * max(
            (_work_bytes(v.local_shape(mesh), v.type.dtype) for v in spmd.values.values()), default=0)
    return total


@dataclass(frozen=True)
class Work:
    """What a run will do, in the terms its limits are set in."""

    what: str  # "running on backend numpy", for messages
    bytes: int
    flops: int  # computed on this host by NumPy
    calls: int  # NumPy calls the evaluators' Python loops make
    steps: int = 0  # compiled JAX steps
    trips: int = 0  # passes of the evaluators' repeat loops (on every device, simulated)


def estimate_run(program: Program, backend: str, spmd=None, *, platform: str | None = None,
                 processes: int = 1, warmup: int = 0, repeat: int = 0) -> Work:
    """The memory and work of `einpar run --backend BACKEND`: the reference first, then
    the backend (keeping the reference's outputs), then the comparison of the two."""
    flops = program_flops(program)
    calls = reference_calls(program.ops)
    trips = repeat_trips(program.ops)
    outputs = sum(program.values[o.value].type.nbytes for o in program.outputs)
    if backend == "reference":
        peak = max(reference_bytes(program),
                   _comparing_bytes(program, 1, STATISTICS_BYTES_PER_ELEMENT))
        return Work("running on backend reference", peak, flops, calls, trips=trips)
    from .spmd import local_flops

    if backend == "numpy":
        peak = max(reference_bytes(program), outputs + simulator_bytes(spmd),
                   _comparing_bytes(program, 2, COMPARE_BYTES_PER_ELEMENT))
        flops += program.mesh.num_devices * local_flops(spmd)
        calls += program.mesh.num_devices * simulator_steps(spmd.steps)
        trips += program.mesh.num_devices * repeat_trips(spmd.steps)
        return Work("running on backend numpy", peak, flops, calls, trips=trips)
    assert backend == "jax"
    on_host = platform in (None, "cpu")
    # The outputs come back whole and as blocks, besides the reference's.
    peak = max(reference_bytes(program), outputs + jax_host_bytes(spmd, on_host, processes),
               _comparing_bytes(program, 3, COMPARE_BYTES_PER_ELEMENT))
    steps = warmup + repeat + 1
    if on_host:
        flops += steps * -(-program.mesh.num_devices // processes) * local_flops(spmd)
    return Work("running on backend jax", peak, flops, calls, steps, trips)


def estimate_values(program: Program, spmd) -> Work:
    """The memory and work of `einpar explain --values` (the simulator, recording every value)."""
    from .spmd import local_flops

    devices = program.mesh.num_devices
    return Work("simulating every device for --values", simulator_bytes(spmd),
                devices * local_flops(spmd), devices * simulator_steps(spmd.steps),
                trips=devices * repeat_trips(spmd.steps))


# ---------------------------------------------------------------- the limits


def seconds_at_least(work: Work, rate: float) -> float:
    return (work.flops / rate + work.calls * CALL_FLOOR_S + work.steps * STEP_FLOOR_S
            + work.trips * TRIP_FLOOR_S)


def require_fits(work: Work, max_memory: int | None = None, max_time: float | None = None) -> None:
    """Raise E420 if `work` needs more memory than `max_memory` (default: what this machine
    has available), E421 if it cannot finish within `max_time` seconds (default an hour)."""
    problems = []
    limit = available_memory() if max_memory is None else max_memory
    if limit is not None and work.bytes > limit:
        have = (f"this machine has {format_bytes(limit)} available" if max_memory is None
                else f"--max-memory is {format_bytes(limit)}")
        problems.append(Diagnostic(
            "E420", f"{work.what} needs about {format_bytes(work.bytes)} of memory; {have}",
            hint=f"make dims smaller with --set, or pass --max-memory {_round_up_bytes(work.bytes)} "
                 "to try anyway"))
    max_time = MAX_TIME_S if max_time is None else max_time
    # The host's rate is measured only where it decides the answer.
    fastest = seconds_at_least(work, 1e13)
    if fastest <= max_time and seconds_at_least(work, 1e8) > max_time:
        fastest = seconds_at_least(work, host_flop_rate())
    if fastest > max_time:
        parts = []
        if work.flops:
            parts.append(f"{format_count(work.flops)} FLOPs")
        if work.calls:
            parts.append(f"{work.calls:,} NumPy call{'s' * (work.calls != 1)}")
        if work.steps:
            parts.append(f"{work.steps:,} JAX step{'s' * (work.steps != 1)}")
        if work.trips:
            parts.append(f"{work.trips:,} repeat trip{'s' * (work.trips != 1)}")
        problems.append(Diagnostic(
            "E421", f"{work.what} would take at least {format_seconds(fastest)} "
                    f"({', '.join(parts)}); the limit is {format_seconds(max_time)}",
            hint=f"make it smaller with --set{' or --repeat' if work.steps else ''}, or pass "
                 f"--max-time {_round_up_time(fastest)} to run it anyway"))
    if problems:
        raise EinparError(problems)


def _round_up_bytes(n: int) -> str:
    """A size a little above `n`, as a person would type it."""
    for unit, scale in (("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40)):
        if n < 1024 * scale:
            return f"{math.ceil(n / scale)}{unit}"
    return f"{math.ceil(n / 2**50)}PiB"


def _round_up_time(seconds: float) -> str:
    """A duration a little above `seconds`, as a person would type it."""
    if seconds < 3600:
        return f"{math.ceil(seconds / 60)}min"
    return f"{math.ceil(seconds / 3600)}h"
