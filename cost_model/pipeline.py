"""A pipelined program priced: each stage's slots timed from its own steps, laid out by the
schedule's timeline (einpar/schedule.py), so the bubble, the stage-to-stage transfers and
the update after the last micro-batch come out of one timeline.

Per stage k (its steps are those `pipeline.placement` puts on it; the layers' on all):

- a forward slot of chunk c is the forward loop's trips of one chunk, plus, on chunk 0,
  the steps before the layers (the embedding, on the first stage) and, on the last
  virtual stage, the steps between the loops (the head and the loss);
- a backward slot is the backward loop's trips of the chunk, plus, on chunk 0, the steps
  after it (the gradients' accumulation; the embedding's gradient on the first stage);
- a transfer between stages is a permute over the stage axis of the carried value's
  local bytes, on the links the stage axis spans (collectives.collective_time);
- the step is the steps before the micro-batch loop, the timeline, then each stage's
  steps after it (gradient reduction, update) from when that stage's last slot ends.

Each piece is priced on the whole mesh (its groups and links are the real ones) by the
step pricer of an unpipelined program (estimate._Pricer). The figures of the stage that
ends last are the step's: its ops, FLOPs and bytes.

Memory per stage: what the stage holds (the inputs its steps read, the values it makes),
the stage program's peak for one micro-batch, plus the saved activations of the chunks
the schedule keeps in flight beyond those (the timeline's `in_flight`: GPipe all m·v,
1F1B up to p − k on stage k). The peak is the largest stage's.
"""

from __future__ import annotations

from dataclasses import replace

from einpar.flops import program_flops
from einpar.layout import local_bytes
from einpar.pipeline import Body, split_step
from einpar.schedule import FORWARD, timeline
from einpar.spmd import CollectiveStep, LocalStep, RepeatStep, walk_steps
from einpar.units import format_seconds

from .collectives import collective_time
from .fusion import FusedStep, fuse
from .grad_reduce import overlapped_tail, tail_parts
from .training import MemoryWatch, training_figures


def _made(step) -> tuple[str, ...]:
    if isinstance(step, LocalStep):
        return (step.op.result.name,)
    if isinstance(step, FusedStep):
        return tuple(member.op.result.name for member in step.members)
    if isinstance(step, CollectiveStep):
        return (step.dst,)
    return ()


def overlapped_epilogue(priced, tail_s: float, backward_s: float, forward_s: float,
                        layers: int) -> float:
    """The steps after the micro-batch loop (`priced`, `tail_s` long) once their gradient
    reductions overlap the stage's last backward slot and ZeRO's gathers of the updated
    params its first forward slot of the next step (grad_reduce.py)."""
    reduce_s, update_s, gather_s = tail_parts(priced)
    return overlapped_tail(tail_s, reduce_s, update_s, backward_s, layers, gather_s, forward_s,
                           layers)


class _Stage:
    """One stage: its steps (by placement), their pieces priced on the whole mesh."""

    def __init__(self, pricer, placement: dict, stage: int):
        self.pricer, self.placement, self.stage = pricer, placement, stage
        self.parts: dict[str, float] = {}

    def runs(self, step) -> bool:
        made = _made(step)
        return not made or any(self.stage in self.placement.get(name, (self.stage,)) for name in made)

    def time(self, steps, trips: int) -> float:
        """The time of the stage's steps among `steps` run once (priced `trips` times)."""
        return self.timed(steps, trips)[0]

    def timed(self, steps, trips: int) -> tuple[float, list]:
        """(time, priced steps) of the stage's steps among `steps`."""
        mine = [step for step in steps if isinstance(step, RepeatStep) or self.runs(step)]
        if not mine:
            return 0.0, []
        priced = self.pricer.price(mine, trips)
        return self.pricer.timeline(priced)[0], priced


def estimate_pipeline(program, spmd, cluster, overlap: bool, precision: str, fusion: str,
                      collective_matmul: bool = False, overlap_grad_reduce: bool = False):
    """estimate.estimate for a pipelined program (module docstring)."""
    from .estimate import Estimate, _Pricer, peak_memory

    pipeline = spmd.pipeline
    schedule = pipeline.schedule
    p, m, v = schedule.stages, schedule.microbatches, schedule.chunks
    per_chunk = pipeline.trips // (p * v)
    # One stage's program on the whole mesh: its collectives' groups are the real ones.
    whole = fuse(replace(spmd, mesh=pipeline.mesh, pipeline=None), fusion)
    before_loop, body_steps, after_loop = split_step(whole.steps, pipeline)
    body = Body(body_steps, pipeline.dim)
    stages = []
    for stage in range(p):
        priced = _Stage(_Pricer(whole, cluster, overlap, precision, collective_matmul),
                        pipeline.placement, stage)
        priced.parts = {
            "prologue": priced.time(before_loop, 1),
            "before": priced.time(body.before, m),
            "forward": priced.time([replace(body.forward, count=per_chunk)], m * v),
            "between": priced.time(body.between, m),
            "backward": priced.time([replace(body.backward, count=per_chunk)], m * v)
            if body.backward is not None else 0.0,
            "after": priced.time(body.after, m)}
        priced.parts["epilogue"], priced.epilogue = priced.timed(after_loop, 1)
        stages.append(priced)

    def slot_times(stage: int, chunk: int) -> tuple[float, float]:
        parts = stages[stage].parts
        forward, backward = parts["forward"], parts["backward"]
        if chunk == 0:
            forward += parts["before"]
            backward += parts["after"]
        if chunk == v - 1:  # the loss after the last virtual stage's forward; elsewhere none
            if stage == p - 1:
                forward += parts["between"]
            else:
                backward += parts["between"]
        return forward, backward

    forward_bytes, backward_bytes = _carried_bytes(whole, body.forward), _carried_bytes(whole, body.backward)
    transfer = collective_time("permute", (pipeline.axis,), max(forward_bytes, backward_bytes),
                               pipeline.mesh, cluster).time_s
    laid = timeline(schedule, 0.0, 0.0, transfer, slot_times)
    hidden = [0.0] * p  # per stage, the seconds of its epilogue's collectives hidden
    if overlap and overlap_grad_reduce:  # each stage's reductions beside its last backward slot
        for k, stage in enumerate(stages):
            backward = [placed for placed in laid.stages[k] if placed.slot.kind != FORWARD]
            forward = [placed for placed in laid.stages[k] if placed.slot.kind == FORWARD]
            if backward:
                overlapped = overlapped_epilogue(
                    stage.epilogue, stage.parts["epilogue"], backward[-1].end - backward[-1].start,
                    forward[0].end - forward[0].start, per_chunk)
                hidden[k] = stage.parts["epilogue"] - overlapped
                stage.parts["epilogue"] = overlapped
    start = max(stage.parts["prologue"] for stage in stages)
    ends = [start + (placed[-1].end if placed else 0.0) + stages[k].parts["epilogue"]
            for k, placed in enumerate(laid.stages)]
    end = max(ends)
    critical = max(range(p), key=lambda k: (ends[k], -k))
    ops = stages[critical].pricer.ops
    between = [(m * v - (m if k == p - 1 else 0)) * forward_bytes +
               (m * v - (m if k == 0 else 0)) * backward_bytes * (body.backward is not None)
               for k in range(p)]
    sent = [sum(op.comm_bytes * op.trips for op in stages[k].pricer.ops) + between[k]
            for k in range(p)]

    memory = [_stage_memory(program, whole, pipeline, body, laid, k, stages[k].pricer, peak_memory)
              for k in range(p)]
    fullest = max(range(p), key=lambda k: (memory[k][0], -k))
    peak, resident, watch, extra = memory[fullest]
    step_time = end + cluster.step_overhead_s
    compute_s = sum(op.compute_s * op.trips for op in ops)
    pricer = stages[critical].pricer
    busy = laid.busy[critical] + stages[critical].parts["prologue"] + stages[critical].parts["epilogue"]
    slots = {"forward": 0.0, "backward": 0.0}
    for placed in laid.stages[critical]:
        slots["forward" if placed.slot.kind == FORWARD else "backward"] += placed.end - placed.start
    training = training_figures(program, [], watch.parts, end, step_time, pricer.peak_dtype_flops[1],
                                pipeline.mesh.num_devices)
    if training is not None:  # the parts of the critical stage's time, and its idle time
        training.time_s = {"forward": slots["forward"] + stages[critical].parts["prologue"],
                           "backward": slots["backward"],
                           "update": stages[critical].parts["epilogue"],
                           "bubble": max(0.0, end - busy)}
    by_kind = watch.result(peak)
    by_kind.by_kind["activations"] += extra
    notes = [f"pipeline over {pipeline.axis}: {p} stages, schedule {schedule.name}, {m} micro-batches"
             + (f", {v} chunks per stage" if v > 1 else "")
             + f"; bubble {laid.bubble:.1%} of the stages' time; the figures are stage "
             f"{critical}'s (it ends last); peak memory is stage {fullest}'s, with "
             f"{laid.in_flight()[fullest]} chunks' activations in flight",
             f"between stages: {max(forward_bytes, backward_bytes):,} bytes per micro-batch and "
             f"boundary, {transfer * 1e6:,.1f} µs each"]
    if hidden[critical]:
        notes.append(f"stage {critical}'s gradient reductions run beside its last backward slot, "
                     f"layer by layer: {format_seconds(hidden[critical])} of them hidden")
    if peak > cluster.chip.hbm_capacity.value:
        notes.append(f"does not fit: {peak:,} bytes per device against "
                     f"{int(cluster.chip.hbm_capacity.value):,} of HBM")
    return Estimate(
        file=spmd.file, cluster=cluster, devices=pipeline.mesh.num_devices, overlap=pricer.overlap,
        precision=precision, ops=ops, step_time_s=step_time, compute_s=compute_s,
        comm_s=sum(op.comm_s * op.trips for op in ops),
        exposed_comm_s=max(0.0, busy - compute_s),
        flops_per_device=sum(op.flops * op.trips for op in ops),
        model_flops=program_flops(program), bytes_per_device=max(sent),
        hbm_bytes_per_device=sum(op.hbm_bytes * op.trips for op in ops),
        peak_memory_bytes=peak, input_bytes=resident,
        peak_flops_per_s=pricer.peak_dtype_flops[1], notes=notes, fusion=fusion,
        memory=by_kind, training=training, collective_matmul=pricer.collective_matmul,
        overlap_grad_reduce=overlap and overlap_grad_reduce,
        pipeline=PipelineFigures(laid, start, critical, fullest, ends, sent, between, transfer,
                                 [memory[k][0] for k in range(p)]))


class PipelineFigures:
    """What `einpar cost` says of a pipeline beyond an unpipelined step's figures."""

    def __init__(self, laid, start_s: float, critical: int, fullest: int, ends, sent, between,
                 transfer_s: float, peaks):
        self.timeline = laid
        self.start_s = start_s  # when the first slot may start: after the steps before the loop
        self.critical, self.fullest = critical, fullest
        self.stage_end_s = list(ends)
        self.bytes_sent = list(sent)  # per stage, by each of its devices
        self.bytes_between_stages = list(between)  # of which to other stages
        self.transfer_s = transfer_s
        self.stage_peak_bytes = list(peaks)

    def to_json(self) -> dict:
        laid = self.timeline
        schedule = laid.schedule
        return {"stages": schedule.stages, "schedule": schedule.name,
                "microbatches": schedule.microbatches, "chunks": schedule.chunks,
                "bubble": laid.bubble, "in_flight": list(laid.in_flight()),
                "stage_end_s": self.stage_end_s, "stage_peak_bytes": self.stage_peak_bytes,
                "bytes_sent": self.bytes_sent, "bytes_between_stages": self.bytes_between_stages,
                "transfer_s": self.transfer_s, "critical_stage": self.critical,
                "fullest_stage": self.fullest}


def _carried_bytes(whole, loop) -> int:
    """The local bytes of what a pipelined loop carries: sent once per micro-batch and
    boundary."""
    if loop is None:
        return 0
    return sum(local_bytes(whole.values[before].layout, whole.values[before].type.shape,
                           whole.values[before].type.dtype, whole.mesh)
               for before, _, _, _ in loop.carried)


def _stage_memory(program, whole, pipeline, body: Body, laid, stage: int, pricer, peak_memory):
    """(peak bytes, resident bytes, its MemoryWatch, the in-flight activations beyond one
    micro-batch's) of one stage."""
    placement = pipeline.placement
    read_here: set[str] = set()
    for step in walk_steps(whole.steps):
        if isinstance(step, RepeatStep):
            read_here.update(before for before, _, _, _ in step.carried)
            read_here.update(stacked for stacked, _ in step.stacked)
            continue
        made = _made(step)
        inside = not made or all(name not in placement for name in made)
        if inside or any(stage in placement.get(name, ()) for name in made):
            if isinstance(step, LocalStep):
                read_here.update(operand.value for operand in step.op.operands)
            elif isinstance(step, FusedStep):
                read_here.update(step.reads)
            elif isinstance(step, CollectiveStep):
                read_here.add(step.src)
    inputs = set(whole.inputs)

    def bytes_of(name: str) -> int:
        if name in inputs and name not in read_here:
            return 0
        if name in placement and stage not in placement[name]:
            return 0
        return pricer.local_bytes(name)

    watch = MemoryWatch(program, whole, bytes_of)
    peak, resident = peak_memory(whole, bytes_of, watch.observe)
    # The stage program holds one micro-batch's saved stack (its v chunks); the schedule
    # keeps in_flight chunks' activations at its peak.
    saved = sum(bytes_of(after) for _, after in body.forward.saved)
    per_chunk = saved // pipeline.schedule.chunks
    extra = max(0, laid.in_flight()[stage] - pipeline.schedule.chunks) * per_chunk
    return peak + extra, resident, watch, extra
