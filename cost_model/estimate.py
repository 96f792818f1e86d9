"""The estimate: a per-device program priced on a cluster, as a timeline, a memory peak and totals.

Every device runs the same SpmdProgram, and pricing uses that symmetry: the
timeline is one device's (its compute stream and its communication stream),
and a collective's time already accounts for all its groups running at once
(collectives.py). So pricing costs the same for 8 devices as for 16,384.

The timeline: without overlap, one stream runs the steps in program order,
each after the one before, as a program that blocks on every collective
runs. With overlap, each device has a compute stream and a communication
stream, and the steps are list-scheduled: whichever step's operands are
ready first goes next on its stream, so a collective runs beside any
compute that does not need its result (an all-gather of a weight starts at
once), as XLA's asynchronous collectives do. A `repeat`
body is priced once and laid out once per trip, each trip after the one it
carries values from (LANGUAGE.md: "the cost model prices one copy and
multiplies").

Memory: inputs and params stay resident the whole step; every other value
is live from the step that makes it to the last step that reads it
(outputs to the end; an output that updates an input, a training step's
param or optimizer state, in place takes the input's buffer). The peak is
the largest sum of live local bytes; training.py says of what kinds. A
loop's saved values (every trip's activations kept for a backward loop) are
live from the loop's start to the last read of them (the backward loop's
end), so the peak shows them; a reverse loop is laid out from its last trip,
each trip's slice of a saved value ready when the trip that saved it ends.

Fusion (fusion.py, on by default): fused regions are priced as one kernel,
a roofline of their FLOPs against the bytes they read from and write to HBM,
and their intermediates take no memory; a flash-attention region is priced
by attention.py's kernel model.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from einpar.errors import Diagnostic, EinparError
from einpar.flops import op_flops, program_flops
from einpar.precision import DEFAULT_PRECISION, check_precision
from einpar.ir import Program, format_op, trip_order
from einpar.optimizer import updated_name
from einpar.layout import local_bytes
from einpar.spmd import CollectiveStep, LocalStep, RepeatStep, SpmdProgram, bytes_per_device
from einpar.spmd import format_collective
from einpar.units import format_seconds

from .cluster import Cluster, check_fits
from .collectives import CollectiveTime, collective_time
from .attention import flash_attention_time
from .collective_matmul import made_chunks, read_chunks
from .collective_matmul import role as matmul_role
from .compute import ComputeTime, NoPeak, op_hbm_bytes, op_time
from .fusion import DEFAULT_FUSION, FusedStep, fuse
from .grad_reduce import backward_loop, compute_time, forward_loop, overlapped_tail, tail_parts
from .training import Memory, MemoryWatch, TrainingFigures, training_figures


@dataclass
class OpCost:
    """One step of the program text (a repeat body's step once, with its trips)."""

    index: int
    name: str  # the local value it makes
    what: str  # the op or collective, as `einpar compile` writes it
    stream: str  # "compute" or "comm"
    trips: int  # how many times it runs per step (repeat trips)
    flops: int  # per run
    hbm_bytes: int
    comm_bytes: int  # sent per device, per run
    compute_s: float  # per run
    comm_s: float
    bound: str
    detail: str = ""  # the collective's algorithm, group and busiest link
    line: int | None = None
    starts: list = field(default_factory=list)  # one per trip, seconds
    # "fused", "flash_attention" or "flash_attention_backward" for a fused region, else ""
    region: str = ""
    members: tuple = ()  # a region's steps, as `einpar compile` writes them
    recomputed: tuple = ()  # a backward region's forward steps it runs again, written so


@dataclass
class Estimate:
    file: str
    cluster: Cluster
    devices: int
    overlap: bool
    precision: str  # the matmul precision f32 contractions are priced at (einpar.precision)
    ops: list  # OpCost in program order (a fused region is one)
    step_time_s: float
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    flops_per_device: int
    model_flops: int  # the unsharded program's FLOPs
    bytes_per_device: int  # network bytes each device sends
    hbm_bytes_per_device: int
    peak_memory_bytes: int
    input_bytes: int  # inputs and params resident on each device
    peak_flops_per_s: float  # the peak of the program's heaviest op's dtype
    notes: list
    fusion: str = DEFAULT_FUSION  # "auto" (fused regions) or "none" (every step alone)
    memory: Memory | None = None  # by kind, at the peak (training.py)
    training: TrainingFigures | None = None  # a training step's parts, model FLOPs, MFU
    pipeline: object | None = None  # a pipeline's stages and timeline (pipeline.PipelineFigures)
    collective_matmul: bool = False  # gathers and reduce-scatters overlap their matmuls
    overlap_grad_reduce: bool = False  # gradient reductions overlap the last backward pass

    @property
    def memory_bound_s(self) -> float:
        """Time of the local ops (and regions) bound by HBM bandwidth, all trips."""
        return sum(op.compute_s * op.trips for op in self.ops
                   if op.stream == "compute" and op.bound == "memory")

    @property
    def achieved_flops_per_s(self) -> float:
        return self.flops_per_device / self.step_time_s if self.step_time_s else 0.0

    @property
    def fraction_of_peak(self) -> float:
        return self.achieved_flops_per_s / self.peak_flops_per_s if self.peak_flops_per_s else 0.0

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.cluster.chip.hbm_capacity.value

    def to_json(self) -> dict:
        chip = self.cluster.chip
        return {
            "file": self.file, "cluster": self.cluster.name, "accelerator": chip.name,
            "devices": self.devices, "overlap": self.overlap,
            "collective_matmul": self.collective_matmul,
            "overlap_grad_reduce": self.overlap_grad_reduce, "precision": self.precision,
            "fusion": self.fusion,
            "step_time_s": self.step_time_s, "compute_s": self.compute_s, "comm_s": self.comm_s,
            "exposed_comm_s": self.exposed_comm_s, "step_overhead_s": self.cluster.step_overhead_s,
            "flops_per_device": self.flops_per_device,
            "hardware_flops": self.flops_per_device * self.devices, "model_flops": self.model_flops,
            "achieved_flops_per_s": self.achieved_flops_per_s,
            "fraction_of_peak": self.fraction_of_peak,
            "bytes_per_device": self.bytes_per_device,
            "hbm_bytes_per_device": self.hbm_bytes_per_device,
            "peak_memory_bytes": self.peak_memory_bytes, "input_bytes": self.input_bytes,
            "hbm_capacity_bytes": chip.hbm_capacity.value, "fits": self.fits,
            "per_op": [{
                "index": op.index, "name": op.name, "op": op.what, "stream": op.stream,
                "line": op.line, "trips": op.trips, "flops": op.flops, "hbm_bytes": op.hbm_bytes,
                "comm_bytes": op.comm_bytes, "compute_s": op.compute_s, "comm_s": op.comm_s,
                "bound": op.bound, "detail": op.detail,
                "start_s": op.starts[0] if op.starts else None,
                "region": {"kind": op.region, "members": list(op.members),
                           "recomputed": list(op.recomputed)} if op.region else None}
                for op in self.ops],
            "memory": self.memory.to_json() if self.memory else None,
            "training": self.training.to_json() if self.training else None,
            "pipeline": self.pipeline.to_json() if self.pipeline else None,
            "notes": self.notes,
        }


class _Pricer:
    def __init__(self, spmd: SpmdProgram, cluster: Cluster, overlap: bool, precision: str,
                 collective_matmul: bool = False):
        self.spmd, self.cluster, self.overlap = spmd, cluster, overlap
        self.precision = precision
        # Collective matmuls (collective_matmul.py): each priced step's role, by id(OpCost).
        self.collective_matmul = collective_matmul and overlap
        self.roles: dict[int, tuple[str, int] | None] = {}
        self.mesh = spmd.mesh
        self.ops: list[OpCost] = []
        self.peak_dtype_flops = (0, 0.0)  # (FLOPs of the heaviest op, the peak it runs at)
        self._collective_cache: dict = {}
        # On a host's shared cores, a mesh on M of N devices runs each device's compute
        # max(M, cores)/N as long as the rates measured with all N busy.
        cores = cluster.shared_cores
        self.compute_scale = 1.0 if cores is None else min(
            1.0, max(spmd.mesh.num_devices, cores) / cluster.num_devices)

    def local_bytes(self, name: str) -> int:
        value = self.spmd.values[name]
        return local_bytes(value.layout, value.type.shape, value.type.dtype, self.mesh)

    # -- pricing each step once

    def local_time(self, step: LocalStep) -> ComputeTime:
        """One local step priced alone: its operands read and its result written once."""
        op = step.op
        sizes = dict(zip(op.result.type.indices, op.result.type.shape))  # a local op's own shape
        for operand in op.operands:
            sizes.update(zip(operand.indices, self.spmd.values[operand.value].local_shape(self.mesh)))
        hbm = op_hbm_bytes(op, op.result.type.nbytes, [self.local_bytes(o.value) for o in op.operands])
        flops = op_flops(op, sizes)
        cost: ComputeTime = op_time(op, flops, hbm, self.cluster, self.precision, sizes,
                                    [self.spmd.values[o.value].type.dtype for o in op.operands])
        if flops > self.peak_dtype_flops[0]:
            self.peak_dtype_flops = (flops, cost.peak)
        return cost

    def price_local(self, step: LocalStep, trips: int) -> OpCost:
        op = step.op
        cost = self.local_time(step)
        return OpCost(len(self.ops), op.result.name, _op_text(op), "compute", trips, cost.flops,
                      cost.hbm_bytes, 0, cost.time_s * self.compute_scale, 0.0, cost.bound,
                      f"at {cost.peak_dtype} peak", _line(op))

    def price_fused(self, step: FusedStep, trips: int) -> OpCost:
        """A fused region as one kernel: HBM traffic is what it reads from outside and what it
        writes that is read outside; FLOPs are its members'."""
        parts = [self.local_time(member) for member in (*step.recomputed, *step.members)]
        flops = sum(part.flops for part in parts)
        hbm = sum(self.local_bytes(name) for name in step.reads) + \
            sum(self.local_bytes(name) for name in step.writes)
        if step.kind in ("flash_attention", "flash_attention_backward"):
            last = step.members[-1].op
            cost = flash_attention_time(self.cluster, last.result.type.dtype, step.shape, flops,
                                        hbm, self.precision)
        else:
            cost = fused_time(parts, hbm, self.cluster)
        members = tuple(f"{member.op.result.name} = {_op_text(member.op)}" for member in step.members)
        detail = f"at {cost.peak_dtype} peak"
        if step.recomputed:
            detail += f"; recomputes {', '.join(step.recomputes)} on chip"
        return OpCost(len(self.ops), ", ".join(step.writes), step.describe(), "compute", trips,
                      flops, hbm, 0, cost.time_s * self.compute_scale, 0.0, cost.bound,
                      detail, _line(step.members[0].op), region=step.kind,
                      members=members, recomputed=tuple(
                          f"{again.op.result.name} = {_op_text(again.op)}"
                          for again in step.recomputed))

    def price_collective(self, step: CollectiveStep, trips: int) -> OpCost:
        move = step.step
        before = self.local_bytes(step.src)
        key = (move.kind, move.axes, before)
        if key not in self._collective_cache:
            self._collective_cache[key] = collective_time(move.kind, move.axes, before, self.mesh,
                                                          self.cluster)
        cost: CollectiveTime = self._collective_cache[key]
        what = format_collective(step, self.spmd.values[step.dst].type.indices)
        return OpCost(len(self.ops), step.dst, what, "comm", trips, 0, 0, step.bytes_per_device,
                      0.0, cost.time_s, cost.bound, cost.how)

    def price(self, steps, trips: int) -> list:
        """OpCost per step (repeat bodies nested as lists), each priced once."""
        priced = []
        for step in steps:
            if isinstance(step, RepeatStep):
                priced.append((step, self.price(step.body, trips * step.count)))
                continue
            if isinstance(step, LocalStep):
                cost = self.price_local(step, trips)
            elif isinstance(step, FusedStep):
                cost = self.price_fused(step, trips)
            elif step.kind == "slice":
                continue  # a local view: no time, no traffic
            else:
                cost = self.price_collective(step, trips)
            if self.collective_matmul:
                self.roles[id(cost)] = matmul_role(step, self.mesh)
            self.ops.append(cost)
            priced.append((step, cost))
        return priced

    def hidden_reduction(self, priced) -> float:
        """Seconds the gradient reductions after the last backward loop hide once they run
        beside it, layer by layer (grad_reduce.py); 0 for a step without them."""
        found = backward_loop(priced)
        if found is None:
            return 0.0
        position, (loop, body) = found
        after = priced[position + 1:]
        reduce_s, update_s, gather_s = tail_parts(after)
        if not reduce_s and not gather_s:
            return 0.0
        tail_s = self.run(after, record=False)
        backward_s = loop.count * compute_time(body)
        forward = forward_loop(priced)
        forward_s, layers = (forward[0].count * compute_time(forward[1]), forward[0].count) \
            if forward else (0.0, 1)
        return tail_s - overlapped_tail(tail_s, reduce_s, update_s, backward_s, loop.count,
                                        gather_s, forward_s, layers)

    # -- laying them out in time

    def unroll(self, priced, rename: dict, trip_tag: str, nodes: list, caps: dict,
               shifts: dict | None = None) -> None:
        """Every run of every step, in program order, as (cost, values read, value made,
        shift) with names made unique per trip; a repeat runs `caps.get(id(step), count)`
        trips. `shifts`, given at the top level, is the time each capped repeat adds beyond
        the trips laid out; steps after it are shifted by it (its `shift`)."""
        shift = 0.0
        for step, cost in priced:
            if isinstance(step, RepeatStep):
                carried = {inside: rename.get(before, before)
                           for before, inside, _, _ in step.carried}
                kept: dict[str, dict[int, str]] = {after: {} for _, after in step.saved}
                order = trip_order(step.count, step.reverse)
                laid = order[:caps.get(id(step), step.count)]
                for trip in laid:
                    tag = f"{trip_tag}@{trip}"
                    inner = dict(rename, **carried)
                    for source, inside in step.stacked:
                        # A trip's slice of a value an earlier loop saved is ready when the
                        # trip that saved it ends (the trip laid out nearest, when capped).
                        whole = rename.get(source, source)
                        made = self.trip_values.get(whole)
                        inner[inside] = made[min(made, key=lambda k: abs(k - trip))] if made else whole
                    self.unroll(cost, inner, tag, nodes, caps)
                    carried = {inside: f"{result}{tag}" for _, inside, result, _ in step.carried}
                    for inside, after in step.saved:
                        kept[after][trip] = inner.get(inside, inside + tag)
                for before, inside, result, after in step.carried:
                    rename[after] = carried[inside]
                for _, after in step.saved:  # read whole, it is ready with its last trip's slice
                    rename[after] = kept[after][laid[-1]]
                    self.trip_values[rename[after]] = kept[after]
                if shifts is not None:
                    shift += shifts.get(id(step), 0.0)
                continue
            if isinstance(step, LocalStep):
                reads, made = [operand.value for operand in step.op.operands], [step.op.result.name]
            elif isinstance(step, FusedStep):
                reads, made = list(step.reads), list(step.writes)
            else:
                reads, made = [step.src], [step.dst]
            nodes.append((cost, [rename.get(name, name + trip_tag) for name in reads],
                          [name + trip_tag for name in made], shift))
            for name in made:
                rename[name] = name + trip_tag

    def run(self, priced, caps: dict | None = None, shifts: dict | None = None,
            record: bool = True) -> float:
        """Lay every run of every step out in time (a capped repeat's first trips only);
        the end of the last. `record` keeps each run's start in its OpCost."""
        nodes: list = []
        self.trip_values: dict[str, dict[int, str]] = {}  # a saved value's slices, by trip
        self.unroll(priced, {}, "", nodes, caps or {}, shifts or {})
        ready: dict[str, float] = {}  # values not made by a step (inputs) are ready at 0
        if not self.overlap:
            free = 0.0
            for cost, reads, made, shift in nodes:
                start = max([free] + [ready.get(name, 0.0) for name in reads])
                free = start + (cost.compute_s or cost.comm_s)
                ready.update(dict.fromkeys(made, free))
                if record:
                    cost.starts.append(start + shift)
            return free
        # List scheduling: whichever step's operands are ready first goes next on its stream.
        producer = {name: index for index, (_, _, made, _) in enumerate(nodes) for name in made}
        waiting = [sum(1 for name in reads if name in producer) for _, reads, _, _ in nodes]
        readers: dict[int, list[int]] = {}
        for index, (_, reads, _, _) in enumerate(nodes):
            for name in reads:
                if name in producer:
                    readers.setdefault(producer[name], []).append(index)
        heap = [(0.0, index) for index, count in enumerate(waiting) if count == 0]
        heapq.heapify(heap)
        free = {"compute": 0.0, "comm": 0.0}
        end = 0.0
        # Collective matmuls: a value's producer's role, how long its run took, and the
        # chunks it arrives in; a reader that takes it in k chunks starts on the first
        # (ready - took·(k-1)/k) and ends no earlier than ready + its own time / k.
        roles = self.roles if self.collective_matmul else {}
        made_by: dict[str, tuple[str, int] | None] = {}
        took: dict[str, float] = {}
        arrives: dict[str, int] = {}

        def chunks(name: str, reader) -> int:
            return read_chunks(made_by.get(name), arrives.get(name, 1), reader) if roles else 1

        def first_ready(name: str, reader) -> float:
            """When `reader` may start on `name`: its first chunk, or all of it."""
            k = chunks(name, reader)
            return ready.get(name, 0.0) - (took.get(name, 0.0) * (k - 1) / k if k > 1 else 0.0)

        while heap:
            at, index = heapq.heappop(heap)
            cost, reads, made, shift = nodes[index]
            start = max(at, free[cost.stream])
            duration = cost.compute_s or cost.comm_s
            done = start + duration
            mine = roles.get(id(cost))
            split = [(name, chunks(name, mine)) for name in reads] if roles else []
            for name, k in split:
                if k > 1:
                    done = max(done, ready[name] + duration / k)
            free[cost.stream] = done
            ready.update(dict.fromkeys(made, done))
            if roles:
                for name in made:
                    made_by[name], took[name] = mine, done - start
                    arrives[name] = made_chunks(mine, [k for _, k in split if k > 1])
            end = max(end, done)
            if record:
                cost.starts.append(start + shift)
            for reader in readers.get(index, ()):
                waiting[reader] -= 1
                if not waiting[reader]:
                    theirs = roles.get(id(nodes[reader][0]))
                    when = max(first_ready(name, theirs) for name in nodes[reader][1])
                    heapq.heappush(heap, (when, reader))
        if record:
            for cost in self.ops:  # trips were laid out in readiness order
                cost.starts.sort()
        return end

    def timeline(self, priced) -> tuple[float, list]:
        """The end of the step's last run, and notes on trips not laid out.

        Laid out in full when the program runs at most MAX_RUNS steps. Otherwise every
        repeat of more than LAID_OUT_TRIPS trips lays out that many, and each trip beyond
        costs what the last one laid out added (the steady state: a trip's collectives
        overlap the trip before it the same way every time), measured by laying it out
        once with one trip fewer. For a repeat r nested in repeats o, that marginal time
        covers one trip in each laid-out trip of the o, so it is scaled by the o's counts
        over their laid-out trips: exact for any time that is linear in each count.
        """
        if _runs(priced, {}) <= MAX_RUNS:
            return self.run(priced), []
        caps: dict = {}
        capped: list = []  # (repeat, the counts over laid-out trips of the repeats around it)
        for trips in (LAID_OUT_TRIPS, 2):
            caps.clear(), capped.clear()
            _cap(priced, trips, caps, capped, 1.0)
            if _runs(priced, caps) <= MAX_RUNS:
                break
        else:  # too deeply nested to lay out two trips of each: one trip, steps in sequence
            caps.clear(), capped.clear()
            _cap(priced, 1, caps, capped, 1.0)
            self.overlap = False
            self.run(priced, caps)
            return sum((op.compute_s or op.comm_s) * op.trips for op in self.ops), [
                "the repeats are nested too deeply to lay out their trips: the steps are priced "
                "one after another (no overlap), and one trip of each repeat is laid out"]
        end = self.run(priced, caps, record=False)
        extra: dict = {}  # the time a capped repeat adds beyond its laid-out trips
        for step, scale in capped:
            caps[id(step)] -= 1
            marginal = end - self.run(priced, caps, record=False)
            caps[id(step)] += 1
            extra[id(step)] = (step.count - caps[id(step)]) * marginal * scale
        # Steps after a top-level repeat start later by what it and the repeats inside it add.
        shifts, top = {}, {id(step): step for step, _ in priced if isinstance(step, RepeatStep)}
        for step, scale in capped:
            owner = next(key for key, repeat in top.items() if _contains(repeat, step))
            shifts[owner] = shifts.get(owner, 0.0) + extra[id(step)]
        self.run(priced, caps, shifts)
        notes = [f"repeat {step.dim}={step.count:,} is laid out for {caps[id(step)]} trips; the "
                 f"other trips each take what the last one laid out added"
                 for step, _ in capped]
        return end + sum(extra.values()), notes


# Past this many runs of steps in one step of the program, repeats lay out a few trips
# and the rest are priced from the last one (pricing takes time independent of the counts).
MAX_RUNS = 4096
LAID_OUT_TRIPS = 4


def _runs(priced, caps: dict) -> int:
    """How many runs of steps the timeline lays out under `caps`."""
    total = 0
    for step, cost in priced:
        if isinstance(step, RepeatStep):
            total += caps.get(id(step), step.count) * _runs(cost, caps)
        else:
            total += 1
    return total


def _cap(priced, trips: int, caps: dict, capped: list, scale: float) -> None:
    """Cap every repeat of more than `trips` trips; `scale` is the product of the enclosing
    repeats' counts over their laid-out trips."""
    for step, cost in priced:
        if isinstance(step, RepeatStep):
            laid = min(step.count, trips)
            if laid < step.count:
                caps[id(step)] = laid
                capped.append((step, scale))
            _cap(cost, trips, caps, capped, scale * step.count / laid)


def _contains(repeat: RepeatStep, step: RepeatStep) -> bool:
    return repeat is step or any(isinstance(inner, RepeatStep) and _contains(inner, step)
                                 for inner in repeat.body)


def peak_memory(spmd: SpmdProgram, bytes_of, observe=None) -> tuple[int, int]:
    """(peak live bytes, resident input bytes) of one device; a repeat body counted once,
    since every trip holds the same. A fused region's intermediates never live in HBM: only
    the values it writes count. `observe(made, live)`, if given, sees the values live (by
    name, bytes; inputs aside) after each step makes its values (training.MemoryWatch)."""
    order: list[tuple[tuple[str, ...], list[str]]] = []  # (values made, values read), in order

    def flatten(steps) -> None:
        for step in steps:
            if isinstance(step, RepeatStep):
                order.append(((), [before for before, _, _, _ in step.carried]))
                for before, inside, result, after in step.carried:
                    order.append(((inside,), []))
                # The stacks of saved values are allocated whole as the loop starts (as
                # lax.scan's ys are), and live until their last reader after it.
                order.append((tuple(after for _, after in step.saved), []))
                flatten(step.body)
                for before, inside, result, after in step.carried:
                    order.append(((after,), [result]))
                # What the loop slices lives until its last trip.
                order.append(((), [source for source, _ in step.stacked]))
            elif isinstance(step, LocalStep):
                order.append(((step.op.result.name,), [o.value for o in step.op.operands]))
            elif isinstance(step, FusedStep):
                order.append((step.writes, list(step.reads)))
            else:  # a collective, or a slice: a new local value either way
                order.append(((step.dst,), [step.src]))
    flatten(spmd.steps)
    inputs = set(spmd.inputs) | in_place_updates(spmd, bytes_of)
    resident = sum(bytes_of(name) for name in spmd.inputs)
    last_use: dict[str, int] = {}
    for position, (_, reads) in enumerate(order):
        for name in reads:
            last_use[name] = position
    for output in spmd.outputs:
        last_use[output.value] = len(order)
    made_at = {name: position for position, (made, _) in enumerate(order) for name in made}
    peak = 0
    live: dict[str, int] = {}
    for position, (made, _) in enumerate(order):
        for name in made:
            if name not in inputs:
                live[name] = bytes_of(name)
        peak = max(peak, sum(live.values()))
        if observe is not None:
            observe(made, live)
        for name in [name for name in live if last_use.get(name, made_at[name]) <= position]:
            del live[name]
    return resident + peak, resident


def in_place_updates(spmd: SpmdProgram, bytes_of) -> set[str]:
    """The local values of outputs that update an input in place: a training step's updated
    param or optimizer state (`output w` of the value `w.new`, einpar.optimizer) whose block
    has the input's size is written into the input's buffer (as a jitted step with donated
    arguments, or PyTorch's in-place update, does), so it takes no memory of its own."""
    inputs = set(spmd.inputs)
    return {output.value for output in spmd.outputs
            if output.name in inputs and output.value not in inputs
            and output.value.split("~")[0] == updated_name(output.name)
            and bytes_of(output.value) == bytes_of(output.name)}


def fused_time(parts: list, hbm_bytes: int, cluster: Cluster) -> ComputeTime:
    """Roofline of a fused region of `parts` (each member's ComputeTime priced alone) moving
    `hbm_bytes`. Its math is its members' math; its bytes stream at the HBM efficiency of
    its own size or of its largest member's, whichever is higher (the kernel walks at least
    that member's iteration space), so a region never costs more than its parts."""
    memory = cluster.efficiency.memory
    fraction = max([cluster.efficiency.step(memory, hbm_bytes)] +
                   [cluster.efficiency.step(memory, part.hbm_bytes) for part in parts])
    heaviest = max(parts, key=lambda part: part.flops)
    return ComputeTime(sum(part.flops for part in parts), hbm_bytes,
                       sum(part.math_s for part in parts),
                       hbm_bytes / (cluster.chip.hbm_bandwidth.value * fraction),
                       heaviest.peak_dtype, heaviest.peak)


def _op_text(op) -> str:
    return format_op(op)[0].split("  # line")[0].partition(" = ")[2]


def _line(op) -> int | None:
    return op.span.line if getattr(op, "span", None) else None


def estimate(program: Program, spmd: SpmdProgram, cluster: Cluster, overlap: bool = False,
             precision: str = DEFAULT_PRECISION, fusion: str = DEFAULT_FUSION,
             collective_matmul: bool = False, overlap_grad_reduce: bool = False) -> Estimate:
    """Price `spmd` (the lowering of `program`) on `cluster`, its f32 matmuls at `precision`
    (einpar.precision: what the JAX backend runs them at), its fusible steps fused
    (`fusion` "auto", fusion.py) or each priced alone ("none"). `overlap`: collectives run
    beside the compute that does not need them; `collective_matmul` (with `overlap`): also
    beside the matmul that reads an all-gather or feeds a reduce-scatter, chunk by chunk
    (collective_matmul.py); `overlap_grad_reduce` (with `overlap`): a training step's gradient
    reductions beside its last backward pass, layer by layer (grad_reduce.py)."""
    check_precision(precision)
    if spmd.pipeline is not None:  # stage by stage, on the schedule's timeline
        from .pipeline import estimate_pipeline

        check_fits(cluster, spmd.pipeline.mesh.num_devices, str(spmd.pipeline.mesh))
        try:
            return estimate_pipeline(program, spmd, cluster, overlap, precision, fusion,
                                     collective_matmul, overlap_grad_reduce)
        except NoPeak as error:
            raise EinparError(Diagnostic("E410", error.args[0], hint=error.args[1])) from None
    check_fits(cluster, spmd.mesh.num_devices, str(spmd.mesh))
    spmd = fuse(spmd, fusion)
    pricer = _Pricer(spmd, cluster, overlap, precision, collective_matmul)
    try:
        priced = pricer.price(spmd.steps, 1)
    except NoPeak as error:
        raise EinparError(Diagnostic("E410", error.args[0], hint=error.args[1])) from None
    end, trip_notes = pricer.timeline(priced)
    if overlap and overlap_grad_reduce:
        hidden = pricer.hidden_reduction(priced)
        end -= hidden
        if hidden:
            trip_notes.append(f"the gradient reductions run beside the last backward pass, "
                              f"layer by layer: {format_seconds(hidden)} of them hidden")
    step_time = end + cluster.step_overhead_s
    compute_s = sum(op.compute_s * op.trips for op in pricer.ops)
    comm_s = sum(op.comm_s * op.trips for op in pricer.ops)
    flops = sum(op.flops * op.trips for op in pricer.ops)
    hbm = sum(op.hbm_bytes * op.trips for op in pricer.ops)
    watch = MemoryWatch(program, spmd, pricer.local_bytes)
    peak, resident = peak_memory(spmd, pricer.local_bytes, watch.observe)
    training = training_figures(program, priced, watch.parts, end, step_time,
                                pricer.peak_dtype_flops[1], spmd.mesh.num_devices)
    notes = list(trip_notes)
    if spmd.mesh.num_devices < cluster.num_devices:
        notes.append(f"the mesh uses {spmd.mesh.num_devices} of the cluster's {cluster.num_devices} "
                     f"devices")
    if peak > cluster.chip.hbm_capacity.value:
        notes.append(f"does not fit: {peak:,} bytes per device against "
                     f"{int(cluster.chip.hbm_capacity.value):,} of HBM")
    return Estimate(
        file=spmd.file, cluster=cluster, devices=spmd.mesh.num_devices, overlap=pricer.overlap,
        precision=precision,
        ops=pricer.ops, step_time_s=step_time, compute_s=compute_s, comm_s=comm_s,
        exposed_comm_s=max(0.0, end - compute_s), flops_per_device=flops,
        model_flops=program_flops(program), bytes_per_device=bytes_per_device(spmd.steps),
        hbm_bytes_per_device=hbm, peak_memory_bytes=peak, input_bytes=resident,
        peak_flops_per_s=pricer.peak_dtype_flops[1], notes=notes, fusion=fusion,
        memory=watch.result(peak), training=training,
        collective_matmul=pricer.collective_matmul,
        overlap_grad_reduce=overlap and overlap_grad_reduce)
