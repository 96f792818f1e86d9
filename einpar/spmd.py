"""The SpmdProgram: the one program every device runs.

Local ops are the IR's own op classes on local shapes (their operands name
local values); collectives are reshard steps over named mesh axes, each with
the value it reads and the value it makes. It is what `einpar compile`
prints, what the backends execute and what the cost model prices, so the
three always agree about what runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .flops import op_flops
from .ir import Op, TensorType, format_op
from .layout import Layout, Mesh, format_local, format_type
from .reshard import Step as ReshardStep

COLLECTIVE_KINDS = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all", "permute")


@dataclass(frozen=True)
class SpmdValue:
    """A local value: a block (or partial block) of a global tensor."""

    name: str  # the local name
    tensor: str  # the program's name for it
    type: TensorType  # global
    layout: Layout

    def local_shape(self, mesh: Mesh) -> tuple[int, ...]:
        return self.layout.local_shape(self.type.shape, mesh)

    def format(self) -> str:
        return format_type(self.type.dtype, self.type.shape, self.layout)


@dataclass(frozen=True)
class Priced:
    """What the partitioner's objective charged for one decision (its local work, the move
    into its pinned layout, the moves it is first to need), and the best strategy it
    rejected: the whole program's price with that one instead, minus the plan's."""

    objective: str  # "time" (seconds) or "bytes" (bytes per device)
    price: float
    alternative: str | None = None  # the rejected strategy, in short (`dp: B, tp: H`)
    extra: float | None = None  # what it would have added

    def to_json(self) -> dict:
        unit = "s" if self.objective == "time" else "bytes"
        return {"objective": self.objective, "unit": unit, "price": self.price,
                "alternative": None if self.alternative is None else
                {"strategy": self.alternative, "extra": self.extra}}


@dataclass(frozen=True)
class LocalStep:
    op: Op  # on local shapes
    rule: str  # why this strategy, in words
    # What each mesh axis does in this op: an index it splits, PARTIAL (the operand's
    # pending reduction stays pending) or None (copies); see einpar.partition.
    roles: tuple[tuple[str, str | None], ...] = ()
    priced: Priced | None = None


@dataclass(frozen=True)
class CollectiveStep:
    step: ReshardStep
    src: str  # local value read
    dst: str  # local value made
    tensor: str
    src_layout: Layout
    dst_layout: Layout
    bytes_per_device: int
    reason: str
    serves: str = ""  # the result of the op this move is for; "" for outputs and loop edges

    @property
    def kind(self) -> str:
        return self.step.kind


@dataclass(frozen=True)
class RepeatStep:
    dim: str
    count: int
    # (value before the loop, name inside the body, body's result, value after the loop)
    carried: tuple[tuple[str, str, str, str], ...]
    stacked: tuple[tuple[str, str], ...]  # (stacked value, the name of one trip's slice in the body)
    body: tuple["Step", ...]
    priced: Priced | None = None  # the loop's carried layouts, as a decision
    # (body value, the value after the loop that stacks it from every trip, trip i at index i)
    saved: tuple[tuple[str, str], ...] = ()
    reverse: bool = False  # trips run count-1 down to 0


Step = Union[LocalStep, CollectiveStep, RepeatStep]


@dataclass(frozen=True)
class SpmdOutput:
    name: str
    value: str  # local value
    layout: Layout


@dataclass(frozen=True)
class SpmdProgram:
    file: str
    mesh: Mesh
    values: dict  # local name -> SpmdValue
    inputs: tuple[str, ...]  # local names of inputs and params (global names)
    steps: tuple[Step, ...]
    outputs: tuple[SpmdOutput, ...]
    # Ops whose strategies were searched only in part (partition.SearchLimit): a better
    # program may exist; `einpar compile` warns (W104).
    search_limits: tuple = ()
    objective: str = ""  # what the plan minimizes, in words ("time on h100x8")
    price: Priced | None = None  # the whole plan's price under it
    # A pipelined program (`repeat L@pp`): this is one stage's program (the stage axis of
    # size 1, L/p trips), and `pipeline` says how the stages run it (einpar/pipeline.py).
    pipeline: object | None = None


def walk_steps(steps) -> list[Step]:
    out = []
    for step in steps:
        out.append(step)
        if isinstance(step, RepeatStep):
            out.extend(walk_steps(step.body))
    return out


def collectives(program: SpmdProgram) -> list[CollectiveStep]:
    """Every collective (slices excluded), once per appearance in the program text."""
    return [s for s in walk_steps(program.steps)
            if isinstance(s, CollectiveStep) and s.kind in COLLECTIVE_KINDS]


def format_collective(step: CollectiveStep, indices: tuple[str, ...]) -> str:
    """`all_to_all[sp](q, S -> B)`: the collective, its axes, the value and the dims it touches."""
    move = step.step
    axes = ",".join(move.axes) if move.kind != "permute" else f"{move.src_axis}->{move.dst_axis}"
    if move.kind == "all_reduce":
        detail = move.op
    elif move.kind == "reduce_scatter":
        detail = f"{move.op} -> {indices[move.dim]}"
    elif move.kind == "all_to_all":
        detail = f"{indices[move.src_dim]} -> {indices[move.dst_dim]}"
    else:
        detail = indices[move.dim]
    return f"{move.kind}[{axes}]({step.src}, {detail})"


def bytes_per_device(steps) -> int:
    """Bytes each device sends running `steps`, repeat bodies counted once per trip."""
    total = 0
    for step in steps:
        if isinstance(step, RepeatStep):
            total += step.count * bytes_per_device(step.body)
        elif isinstance(step, CollectiveStep):
            total += step.bytes_per_device
    return total


def format_spmd(program: SpmdProgram) -> str:
    """The per-device program as text: values with global and local shapes, steps, bytes."""
    mesh = program.mesh
    lines = [f"# {program.file}: {mesh} ({mesh.num_devices} devices), per device"]
    pipeline = program.pipeline
    if pipeline is not None:
        lines[0] = f"# {program.file}: one stage of {pipeline.mesh}, per device"
        lines.extend(_pipeline_header(pipeline))

    def stages_of(made: str) -> str:
        if pipeline is None or made not in pipeline.placement:
            return ""
        where = sorted(pipeline.placement[made])
        return "" if len(where) == pipeline.stages else \
            f"  @ stage {', '.join(map(str, where))}"

    def value_text(name: str) -> str:
        value = program.values[name]
        return f"{name}: {value.format()} local {format_local(value.layout, value.type.shape, mesh)}"

    for name in program.inputs:
        lines.append(f"in   {value_text(name)}")

    def emit(steps, indent: str) -> None:
        for step in steps:
            if isinstance(step, RepeatStep):
                order = " reverse" if step.reverse else ""
                lines.append(f"{indent}repeat {step.dim}={step.count}{order} {{")
                for before, inside, result, after in step.carried:
                    lines.append(f"{indent}  carry {inside} = {before}, then {result}")
                for source, inside in step.stacked:
                    # A param's slices go without saying; a value made before the loop's do not.
                    if program.values[source].tensor not in program.inputs:
                        lines.append(f"{indent}  slice {inside} = {source}[trip]")
                emit(step.body, indent + "  ")
                for inside, after in step.saved:
                    lines.append(f"{indent}  save {inside} -> {value_text(after)}")
                lines.append(f"{indent}}}")
            elif isinstance(step, CollectiveStep):
                call = format_collective(step, program.values[step.dst].type.indices)
                lines.append(f"{indent}{value_text(step.dst)} = {call}{stages_of(step.dst)}  "
                             f"# {step.bytes_per_device:,} B/device: {step.reason}")
            else:
                text = format_op(step.op)[0]
                head, _, body = text.partition(" = ")
                body = body.split("  # line")[0]
                lines.append(f"{indent}{value_text(step.op.result.name)} = {body}"
                             f"{stages_of(step.op.result.name)}")
    emit(program.steps, "")
    for output in program.outputs:
        lines.append(f"out  {output.name} = {output.value}: "
                     f"{program.values[output.value].format()}")
    lines.append(f"# {len(collectives(program))} collectives, "
                 f"{bytes_per_device(program.steps):,} bytes sent per device")
    return "\n".join(lines)


def _pipeline_header(pipeline) -> list[str]:
    schedule = pipeline.schedule
    chunks = f", {schedule.chunks} chunks per stage" if schedule.chunks > 1 else ""
    lines = [f"# pipelined over {pipeline.axis}: {pipeline.stages} stages run this program, each "
             f"on its {pipeline.mesh.num_devices // pipeline.stages} devices with "
             f"{pipeline.trips // pipeline.stages} of the {pipeline.trips} trips of "
             f"{pipeline.dim}; schedule {schedule.name}, {schedule.microbatches} micro-batches{chunks}"]
    for stage, trips in enumerate(pipeline.stage_trips):
        lines.append(f"#   stage {stage}: trips {_ranges(trips)}")
    lines.append("# the loops over the trips send their carried values to the next stage (forward) "
                 "and the stage before (backward); `@ stage k`: a step only stage k runs")
    return lines


def _ranges(trips) -> str:
    """`0-3, 8-11`: consecutive trips as ranges."""
    parts, start = [], None
    for i, trip in enumerate(trips):
        if start is None:
            start = trip
        if i + 1 == len(trips) or trips[i + 1] != trip + 1:
            parts.append(str(start) if start == trip else f"{start}-{trip}")
            start = None
    return ", ".join(parts)


def local_flops(program: SpmdProgram, steps=None) -> int:
    """FLOPs each device computes, from the local shapes (repeat bodies once per trip)."""
    total = 0
    for step in program.steps if steps is None else steps:
        if isinstance(step, RepeatStep):
            total += step.count * local_flops(program, step.body)
        elif isinstance(step, LocalStep):
            sizes = dict(zip(step.op.result.type.indices, step.op.result.type.shape))
            for operand in step.op.operands:
                value = program.values[operand.value]
                sizes.update(zip(operand.indices, value.local_shape(program.mesh)))
            total += op_flops(step.op, sizes)
    return total


def to_json(program: SpmdProgram) -> dict:
    """The documented JSON form of `einpar compile --json` (docs/cli.md)."""
    mesh = program.mesh

    def layout_text(value: SpmdValue, layout: Layout) -> str:
        return format_type(value.type.dtype, value.type.shape, layout)

    def step_json(step) -> dict:
        if isinstance(step, RepeatStep):
            return {"repeat": step.dim, "count": step.count, "reverse": step.reverse,
                    "carried": [{"before": b, "inside": i, "result": r, "after": a}
                                for b, i, r, a in step.carried],
                    "stacked": [{"source": source, "inside": inside}
                                for source, inside in step.stacked],
                    "saved": [{"inside": inside, "after": after} for inside, after in step.saved],
                    "body": [step_json(inner) for inner in step.body],
                    "price": step.priced.to_json() if step.priced else None}
        if isinstance(step, CollectiveStep):
            value = program.values[step.dst]
            return {"collective": step.kind, "axes": list(step.step.axes), "tensor": step.tensor,
                    "src": step.src, "dst": step.dst, "src_layout": layout_text(value, step.src_layout),
                    "dst_layout": layout_text(value, step.dst_layout),
                    "bytes_per_device": step.bytes_per_device, "reason": step.reason}
        op = step.op
        return {"op": type(op).__name__.lower(), "result": op.result.name, "tensor": op.stmt,
                "operands": [str(o) for o in op.operands], "text": format_op(op)[0].split("  # line")[0],
                "rule": step.rule, "price": step.priced.to_json() if step.priced else None}

    return {
        "mesh": dict(mesh.axes),
        "devices": mesh.num_devices,
        "values": [{"name": v.name, "tensor": v.tensor, "global_shape": list(v.type.shape),
                    "dtype": v.type.dtype, "layout": v.format(),
                    "local_shape": list(v.local_shape(mesh))} for v in program.values.values()],
        "steps": [step_json(step) for step in program.steps],
        "collectives": [{"kind": c.kind, "axes": list(c.step.axes), "tensor": c.tensor,
                         "src": layout_text(program.values[c.dst], c.src_layout),
                         "dst": layout_text(program.values[c.dst], c.dst_layout),
                         "bytes_per_device": c.bytes_per_device} for c in collectives(program)],
        "outputs": [{"name": o.name, "value": o.value, "layout": program.values[o.value].format()}
                    for o in program.outputs],
        "totals": {"bytes_per_device": bytes_per_device(program.steps),
                   "flops_per_device": local_flops(program)},
        "plan": None if program.price is None else {
            "objective": program.objective, "unit": program.price.to_json()["unit"],
            "price": program.price.price},
    }
