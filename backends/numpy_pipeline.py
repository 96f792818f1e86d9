"""A pipelined SpmdProgram on simulated devices: each stage's devices run the stage's
program, slot by slot in the schedule's order (einpar/pipeline.py, einpar/schedule.py).

A stage is the devices at one coordinate of the stage axis; it runs the
SpmdProgram (one stage's) on a mesh without that axis, so its collectives stay
inside the stage, as on real hardware. Per micro-batch each stage keeps its own
values. A forward slot runs one chunk's trips of the pipelined loop, its carried
values received from the stage before (a permute over the stage axis: each
device sends its block to the device at the same place on the next stage, and
the bytes are counted as sent); a backward slot runs the backward loop's trips
in reverse, receiving from the stage after. The steps outside the loops run on
the stages `pipeline.placement` gives: before the loop at the micro-batch's
first slot on that stage, the loss after the last forward, and the rest after
the stage's last backward of the micro-batch. The slots run in the order of the
schedule's timeline (unit times): each after the work it needs.
"""

from __future__ import annotations

import numpy as np

from einpar.backends.numpy_sim import Traffic, _run_steps, assemble, scatter, trip_envs
from einpar.backends.reference import deep_recursion, numpy_dtype
from einpar.layout import Mesh, device_at, device_coords
from einpar.pipeline import Body, made_by, split_step
from einpar.schedule import BACKWARD, FORWARD, timeline
from einpar.spmd import RepeatStep


class _Stages:
    """The whole mesh as stages: each stage's devices (in its own mesh's order) and the
    bytes each sends."""

    def __init__(self, program):
        self.program = program
        self.pipeline = pipeline = program.pipeline
        self.mesh: Mesh = program.mesh  # one stage's (the stage axis of size 1)
        self.devices = [[device_at(pipeline.mesh, dict(device_coords(self.mesh, d), **{pipeline.axis: s}))
                         for d in range(self.mesh.num_devices)] for s in range(pipeline.stages)]
        self.traffic = [Traffic(self.mesh.num_devices) for _ in range(pipeline.stages)]
        self.between = [0] * pipeline.mesh.num_devices  # of which sent to another stage

    def run(self, steps, stage: int, envs: list[dict]) -> None:
        """Steps placed on `stage` (the others skipped), on its devices' `envs`."""
        placement = self.pipeline.placement
        mine = [step for step in steps if stage in placement.get(made_by(step), ())]
        if mine:
            _run_steps(mine, envs, self.mesh, self.traffic[stage], None, None, self.program.values)

    def receive(self, stage: int, carry: list[dict]) -> list[dict]:
        """The carried values `stage` made, received by the next stage: each device sends its
        blocks to the device at its place there (a permute over the stage axis)."""
        for device, values in enumerate(carry):
            self.between[self.devices[stage][device]] += sum(array.nbytes for array in values.values())
        return [{name: self.traffic[stage].send(device, array).copy() for name, array in values.items()}
                for device, values in enumerate(carry)]

    def sent(self) -> list[int]:
        total = [0] * self.pipeline.mesh.num_devices
        for stage, traffic in enumerate(self.traffic):
            for device, count in enumerate(traffic.sent):
                total[self.devices[stage][device]] += count
        return total


def _trips(loop: RepeatStep, envs: list[dict], trips, carried: list[dict], stages: _Stages,
           stage: int, saved: dict[int, list]) -> list[dict]:
    """`loop`'s body over the local `trips` (in order) on one stage; returns the carried
    values leaving the last, and records each trip's saved values in `saved`."""
    for trip in trips:
        inner = trip_envs(loop, envs, carried, trip)
        _run_steps(loop.body, inner, stages.mesh, stages.traffic[stage], None, None,
                   stages.program.values)
        carried = [{inside: env[result] for _, inside, result, _ in loop.carried} for env in inner]
        saved[trip] = [[env[inside] for inside, _ in loop.saved] for env in inner]
    return carried


def run_pipeline(program, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Traffic]:
    """`backends.numpy_sim.run_spmd` for a pipelined program."""
    pipeline = program.pipeline
    stages = _Stages(program)
    p = pipeline.stages
    envs = [[{} for _ in range(stages.mesh.num_devices)] for _ in range(p)]
    for name in program.inputs:
        value = program.values[name]
        array = np.asarray(inputs[name]).astype(numpy_dtype(value.type.dtype), copy=False)
        for stage in range(p):
            part = _stage_part(array, value, pipeline, stage)
            for env, block in zip(envs[stage], scatter(part, value.layout, stages.mesh)):
                env[name] = block
    before_loop, body, after_loop = split_step(program.steps, pipeline)
    micro = next((step for step in program.steps if isinstance(step, RepeatStep)
                  and step.dim == pipeline.micro), None)
    with np.errstate(all="ignore"), deep_recursion():
        for stage in range(p):
            stages.run(before_loop, stage, envs[stage])
        _schedule(body, envs, stages, micro)
        for stage in range(p):
            stages.run(after_loop, stage, envs[stage])
    outputs = {}
    for output in program.outputs:
        value = program.values[output.value]
        parts = []
        held = pipeline.placement.get(output.value, range(p))
        for stage in range(p):
            if stage in held and output.value in envs[stage][0]:
                parts.append(assemble([env[output.value] for env in envs[stage]], output.layout,
                                      value.type.shape, stages.mesh))
            else:
                parts.append(None)
        outputs[output.name] = _whole(parts, value, pipeline)
    traffic = Traffic(pipeline.mesh.num_devices)
    traffic.sent = stages.sent()
    traffic.between_stages = stages.between
    return outputs, traffic


def _stage_part(array: np.ndarray, value, pipeline, stage: int) -> np.ndarray:
    """The part of a whole input a stage holds: its own trips of a stack over the pipelined
    index, else all of it."""
    indices = value.type.indices
    if pipeline.dim not in indices:
        return array
    return np.take(array, pipeline.stage_trips[stage], axis=indices.index(pipeline.dim))


def _whole(parts: list, value, pipeline) -> np.ndarray:
    """An output from the stages that hold it: a stack over the pipelined index put
    together from every stage's trips, else the copy of the first stage that has it."""
    indices = value.type.indices
    if pipeline.dim not in indices:
        return next(part for part in parts if part is not None)
    axis = indices.index(pipeline.dim)
    order = [trip for trips in pipeline.stage_trips for trip in trips]
    stacked = np.concatenate(parts, axis=axis)
    return np.take(stacked, np.argsort(order), axis=axis)


def _schedule(steps, envs: list[list[dict]], stages: _Stages, micro: RepeatStep | None) -> None:
    """One micro-batch loop's body (or the program's steps, for one micro-batch) run slot
    by slot on every stage."""
    pipeline = stages.pipeline
    p, v = pipeline.stages, pipeline.schedule.chunks
    body = Body(steps, pipeline.dim)
    m = pipeline.schedule.microbatches
    order = sorted(((placed.start, stage, placed.slot)
                    for stage, placed_slots in enumerate(timeline(pipeline.schedule, 1.0, 1.0).stages)
                    for placed in placed_slots), key=lambda item: (item[0], item[1]))
    # Per (stage, micro-batch): its devices' values; per stage, the carried accumulators.
    local: dict[tuple[int, int], list[dict]] = {}
    carried_out: dict[tuple[str, int, int], list[dict]] = {}  # (kind, mb, virtual) -> carry
    saved_fwd: dict[tuple[int, int], dict] = {}
    saved_bwd: dict[tuple[int, int], dict] = {}
    started_backward: set[tuple[int, int]] = set()
    accumulators = [[{before: env[before] for before, _, _, _ in micro.carried if before in env}
                     for env in envs[s]]
                    if micro is not None else None for s in range(p)]

    def values_of(stage: int, mb: int) -> list[dict]:
        if (stage, mb) not in local:
            mine = []
            for device, env in enumerate(envs[stage]):
                env = dict(env)
                if micro is not None:
                    env.update((inside, env[stacked][mb]) for stacked, inside in micro.stacked)
                mine.append(env)
            local[stage, mb] = mine
            stages.run(body.before, stage, mine)
        return local[stage, mb]

    for _, stage, slot in order:
        mb, chunk = slot.microbatch, slot.chunk
        virtual = chunk * p + stage
        mine = values_of(stage, mb)
        trips = pipeline.chunk_trips(chunk)
        if slot.kind == FORWARD:
            loop = body.forward
            if virtual == 0:
                carry = [{inside: env[before] for before, inside, _, _ in loop.carried} for env in mine]
            else:
                carry = stages.receive((virtual - 1) % p, carried_out.pop((FORWARD, mb, virtual - 1)))
            carry = _trips(loop, mine, trips, carry, stages, stage,
                           saved_fwd.setdefault((stage, mb), {}))
            if virtual == p * v - 1:
                for env, out in zip(mine, carry):
                    env.update((after, out[inside]) for _, inside, _, after in loop.carried)
                stages.run(body.between, stage, mine)
            else:
                carried_out[FORWARD, mb, virtual] = carry
            continue
        if (stage, mb) not in started_backward:  # the forward's stacks, complete by now
            started_backward.add((stage, mb))
            _stack(body.forward, mine, saved_fwd.pop((stage, mb), {}))
            if stage != p - 1:
                stages.run(body.between, stage, mine)
        loop = body.backward
        if loop is not None:
            if virtual == p * v - 1:
                carry = [{inside: env[before] for before, inside, _, _ in loop.carried} for env in mine]
            else:
                carry = stages.receive((virtual + 1) % p, carried_out.pop((BACKWARD, mb, virtual + 1)))
            carry = _trips(loop, mine, reversed(trips), carry, stages, stage,
                           saved_bwd.setdefault((stage, mb), {}))
            if virtual == 0:
                for env, out in zip(mine, carry):
                    env.update((after, out[inside]) for _, inside, _, after in loop.carried)
            else:
                carried_out[BACKWARD, mb, virtual] = carry
        if chunk != 0:  # the micro-batch's last backward on this stage is through chunk 0
            continue
        if loop is not None:
            _stack(loop, mine, saved_bwd.pop((stage, mb)))
        if micro is not None:  # the accumulators as the micro-batch before left them
            for device, env in enumerate(mine):
                env.update((inside, accumulators[stage][device][before])
                           for before, inside, _, _ in micro.carried
                           if before in accumulators[stage][device])
        stages.run(body.after, stage, mine)
        if micro is not None:  # the accumulators this micro-batch leaves
            for device, env in enumerate(mine):
                for before, inside, result, _ in micro.carried:
                    if result in env and stage in pipeline.placement.get(result, ()):
                        accumulators[stage][device][before] = env[result]
        del local[stage, mb]
        if mb == m - 1:
            _finish(envs[stage], mine, micro, accumulators[stage])


def _stack(loop: RepeatStep, envs: list[dict], saved: dict[int, list]) -> None:
    """A loop's saved values stacked over the stage's trips (local trip i at index i)."""
    if not loop.saved:
        return
    trips = sorted(saved)
    for device, env in enumerate(envs):
        for k, (_, after) in enumerate(loop.saved):
            env[after] = np.stack([saved[trip][device][k] for trip in trips])


def _finish(envs: list[dict], last: list[dict], micro, accumulators) -> None:
    """After a stage's last micro-batch: what the micro-batch loop leaves (its carried
    accumulators), or, without one, every value the body made."""
    if micro is None:
        for env, values in zip(envs, last):
            env.update(values)
        return
    for device, env in enumerate(envs):
        for before, _, _, after in micro.carried:
            if before in accumulators[device]:
                env[after] = accumulators[device][before]
