"""Pipeline parallelism (`repeat L@pp`): one stage's program, and where each step runs.

A program whose `repeat` is pipelined over the mesh axis pp is lowered as the
real systems run it (Megatron-LM, GPipe): every stage runs the same SPMD
program with L/p of the layers, on its coordinate of pp, and the stages hand
the repeat's carried values to each other. So the lowering is:

- `stage_program`: the program with `L` of L/p (the repeat's trips and every
  stack over it) and pp of size 1 (its collectives are then over the other
  axes only, inside one stage's devices). It is partitioned and lowered like
  any program: the SpmdProgram is one stage's.
- `pipeline_of`: the SpmdProgram's `pipeline` field, data the backends and the
  cost model read: the schedule (einpar/schedule.py: each stage's slots in
  order), which global trips each stage holds, and on which stages each step
  outside the pipelined loops runs (`placement`).

Placement follows the data. Inputs and params outside the loop are on every
stage (their layouts do not name pp); the forward loop's carried result is on
the last stage, the backward loop's on the first; stacks over L (params,
saved activations, their gradients) are on every stage, each its own trips. A
step runs on the stages that hold all it reads and that need what it makes:
the embedding on the first stage, the loss on the last, a rotary table read
inside the layers on all, a layer's gradient accumulated on each stage for its
own trips, the update of a param where its gradient is.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace

from .errors import Diagnostic, EinparError
from .ir import Program, Repeat, walk_ops
from .layout import Layout, Mesh
from .microbatch import _resized
from .schedule import Schedule, make_schedule
from .spmd import LocalStep, RepeatStep


@dataclass(frozen=True)
class Staged:
    """The pipelined repeat of a program: its index, trips, and the mesh axis of stages."""

    axis: str
    dim: str
    trips: int  # L
    stages: int  # p
    span: object = None


def staged_repeat(program: Program) -> Staged | None:
    """The program's repeat pipelined over an axis of more than one device, or None (a
    `repeat L@pp` with pp of size 1 is a plain loop)."""
    for op in walk_ops(program.ops):
        if isinstance(op, Repeat) and op.stage_axis and program.mesh.size(op.stage_axis) > 1:
            return Staged(op.stage_axis, op.dim, op.count, program.mesh.size(op.stage_axis), op.span)
    return None


def stage_program(program: Program, staged: Staged) -> Program:
    """One stage's program: `L` of L/p trips everywhere (the loops, the stacks and their
    gradients), and the stage axis of size 1."""
    per_stage = staged.trips // staged.stages
    mesh = Mesh(tuple((name, 1 if name == staged.axis else size) for name, size in program.mesh.axes))

    def trips(ops):
        out = []
        for op in ops:
            if isinstance(op, Repeat):
                op = replace(op, body=trips(op.body),
                             count=per_stage if op.dim == staged.dim else op.count)
            out.append(op)
        return tuple(out)

    dims = tuple((name, per_stage if name == staged.dim else size) for name, size in program.dims)
    inputs = _without_axis(_resized(program.inputs, staged.dim, per_stage), staged.axis)
    ops = _without_axis(trips(_resized(program.ops, staged.dim, per_stage)), staged.axis)
    return replace(program, mesh=mesh, dims=dims, inputs=inputs, ops=ops,
                   outputs=_without_axis(program.outputs, staged.axis))


def _without_axis(node, axis: str):
    """`node` (values, ops and everything in them) with `axis` out of every layout: a stage's
    stacks hold its own trips whole."""
    if isinstance(node, Layout):
        if node.dim_of(axis) is None and node.partial_kind(axis) is None:
            return node
        return Layout(tuple(tuple(a for a in dim if a != axis) for dim in node.dims),
                      tuple((a, kind) for a, kind in node.partial if a != axis))
    if isinstance(node, tuple):
        return tuple(_without_axis(item, axis) for item in node)
    if is_dataclass(node) and not isinstance(node, type):
        changes = {}
        for item in fields(node):
            old = getattr(node, item.name)
            new = _without_axis(old, axis)
            if new is not old:
                changes[item.name] = new
        return replace(node, **changes) if changes else node
    return node


# The most slots (2·m·v per stage) a schedule may have to be lowered, run and priced: each is
# laid out (a timeline of 2^18 slots takes a few seconds). A 1T-parameter run on 3,072 GPUs
# (pp 64, 512 micro-batches) has 65,536.
MAX_SLOTS = 2 ** 18


def schedule_of(program: Program, staged: Staged) -> Schedule:
    """The schedule the program declares (or its default) for its stages; E257 if it has
    more slots than MAX_SLOTS, before any is built."""
    training = (program.forward or program).training
    microbatches = training.microbatches[1] if training and training.microbatches else 1
    name, chunks = (training.schedule if training and training.schedule else
                    ("1f1b" if microbatches > 1 else "gpipe", 1))
    slots = 2 * staged.stages * microbatches * chunks
    if slots > MAX_SLOTS:
        raise EinparError(Diagnostic(
            "E257", f"the {name} schedule of {staged.stages} stages and {microbatches:,} "
                    f"micro-batches has {slots:,} slots, more than einpar lays out "
                    f"({MAX_SLOTS:,})", staged.span,
            hint="use fewer micro-batches (a larger micro-batch), or fewer stages"))
    return make_schedule(name, staged.stages, microbatches, chunks)


@dataclass(frozen=True)
class Pipeline:
    """How the stages run one stage's SpmdProgram (module docstring)."""

    axis: str
    mesh: Mesh  # the whole mesh (the SpmdProgram's is one stage's: the axis of size 1)
    dim: str  # the pipelined repeat's index
    trips: int  # L, over all stages
    schedule: Schedule
    # Per stage, the global trip of each of its local trips, in local order: stage k's chunk
    # c (of v) holds the trips of virtual stage c·p + k.
    stage_trips: tuple[tuple[int, ...], ...]
    # The value a step outside the pipelined loops makes -> the stages that run it.
    placement: dict
    micro: str | None  # the micro-batch loop's index (None: one micro-batch, no loop)
    span: object = None  # the pipelined repeat's, for diagnostics

    @property
    def stages(self) -> int:
        return self.schedule.stages

    def chunk_trips(self, chunk: int) -> range:
        """The local trips of a stage's chunk `chunk`."""
        per_chunk = self.trips // (self.stages * self.schedule.chunks)
        return range(chunk * per_chunk, (chunk + 1) * per_chunk)


def trips_of_stages(trips: int, stages: int, chunks: int) -> tuple[tuple[int, ...], ...]:
    per_chunk = trips // (stages * chunks)
    return tuple(tuple(trip for chunk in range(chunks)
                       for trip in range((chunk * stages + stage) * per_chunk,
                                         (chunk * stages + stage + 1) * per_chunk))
                 for stage in range(stages))


def pipeline_of(program: Program, staged: Staged, steps: tuple, outputs,
                schedule: Schedule | None = None) -> Pipeline:
    """The `pipeline` of the SpmdProgram lowered from `stage_program(program, staged)`."""
    schedule = schedule or schedule_of(program, staged)
    micro = next((step for step in steps if isinstance(step, RepeatStep)
                  and step.dim != staged.dim and _has_staged(step.body, staged.dim)), None)
    placement = _Placement(staged, program)
    placement.place(steps, [output.value for output in outputs])
    return Pipeline(staged.axis, program.mesh, staged.dim, staged.trips, schedule,
                    trips_of_stages(staged.trips, staged.stages, schedule.chunks),
                    placement.where, micro.dim if micro is not None else None, staged.span)


def _has_staged(steps, dim: str) -> bool:
    return any(isinstance(step, RepeatStep) and step.dim == dim for step in steps)


class Body:
    """One micro-batch's steps split at the pipelined loops: the steps before the forward
    loop, the forward loop, the steps between, the backward loop (None for a forward
    program) and the steps after."""

    def __init__(self, steps, dim: str):
        loops = [i for i, step in enumerate(steps) if isinstance(step, RepeatStep) and step.dim == dim]
        first = loops[0]
        self.before = tuple(steps[:first])
        self.forward = steps[first]
        if len(loops) > 1:
            self.between = tuple(steps[first + 1:loops[1]])
            self.backward = steps[loops[1]]
            self.after = tuple(steps[loops[1] + 1:])
        else:
            self.between, self.backward, self.after = tuple(steps[first + 1:]), None, ()


def split_step(steps, pipeline) -> tuple[tuple, tuple, tuple]:
    """(the steps before the micro-batch loop, one micro-batch's steps, the steps after)."""
    if pipeline.micro is None:
        return (), tuple(steps), ()
    at = next(i for i, step in enumerate(steps)
              if isinstance(step, RepeatStep) and step.dim == pipeline.micro)
    return tuple(steps[:at]), tuple(steps[at].body), tuple(steps[at + 1:])


def made_by(step) -> str:
    return step.op.result.name if isinstance(step, LocalStep) else step.dst


def read_by(step) -> list[str]:
    if isinstance(step, LocalStep):
        return [operand.value for operand in step.op.operands]
    return [step.src]


class _Placement:
    """Which stages run each step (module docstring): what is held where, forward, then
    cut to where it is needed, backward."""

    def __init__(self, staged: Staged, program: Program):
        self.staged = staged
        self.program = program
        self.all = frozenset(range(staged.stages))
        self.held: dict[str, frozenset] = {}
        self.where: dict[str, frozenset] = {}
        self.need: dict[str, set] = {}

    def held_at(self, value: str) -> frozenset:
        return self.held.get(value, self.all)  # inputs, params, their stacks: every stage

    # ---- forward: where each value can be made

    def forward(self, steps) -> None:
        for step in steps:
            if isinstance(step, RepeatStep):
                self.forward_loop(step)
                continue
            where = self.all
            for value in read_by(step):
                where = where & self.held_at(value)
            if not where:
                self.refuse(made_by(step), read_by(step))
            self.held[made_by(step)] = where

    def forward_loop(self, step: RepeatStep) -> None:
        if step.dim == self.staged.dim:  # a pipelined loop: its carry leaves the end stage
            end = frozenset({0 if step.reverse else self.staged.stages - 1})
            for _, _, _, after in step.carried:
                self.held[after] = end
            for _, after in step.saved:
                self.held[after] = self.all  # each stage its own trips
            return
        for before, inside, _, _ in step.carried:
            self.held[inside] = self.held_at(before)
        for stacked, inside in step.stacked:
            self.held[inside] = self.held_at(stacked)
        self.forward(step.body)
        for _, inside, result, after in step.carried:
            self.held[inside] = self.held_at(result)  # an accumulator is where its sum is
            self.held[after] = self.held_at(result)
        for inside, after in step.saved:
            self.held[after] = self.held_at(inside)

    # ---- backward: where each value is needed

    def needed(self, value: str, stages) -> None:
        self.need.setdefault(value, set()).update(stages)

    def backward(self, steps) -> None:
        for step in reversed(steps):
            if isinstance(step, RepeatStep):
                self.backward_loop(step)
                continue
            made = made_by(step)
            need = frozenset(self.need.get(made, ()))
            held = self.held_at(made)
            if not need <= held:  # read on a stage that cannot make it
                self.refuse(made, read_by(step), sorted(need - held)[0])
            self.where[made] = (held & need) or held
            for value in read_by(step):
                self.needed(value, self.where[made])

    def backward_loop(self, step: RepeatStep) -> None:
        if step.dim == self.staged.dim:
            start = {self.staged.stages - 1 if step.reverse else 0}
            for before, _, _, _ in step.carried:
                self.needed(before, start)
            for stacked, _ in step.stacked:
                self.needed(stacked, self.all)
            for value in _outside_reads(step):
                self.needed(value, self.all)
            return
        for _, inside, result, after in step.carried:
            self.needed(result, self.need.get(after, ()))
            self.needed(result, self.need.get(inside, ()))
        for inside, after in step.saved:
            self.needed(inside, self.need.get(after, ()))
        self.backward(step.body)
        for before, inside, _, _ in step.carried:
            self.needed(before, self.need.get(inside, ()))
        for stacked, inside in step.stacked:
            self.needed(stacked, self.need.get(inside, ()))

    def place(self, steps, outputs) -> None:
        self.forward(steps)
        for value in outputs:
            self.needed(value, self.held_at(value))
        self.backward(steps)

    def refuse(self, made: str, reads: list[str], stage: int | None = None) -> None:
        name = made.split("#")[0].split("~")[0]
        where = ", ".join(f"{value.split('#')[0].split('~')[0]} on stage "
                          f"{', '.join(str(k) for k in sorted(self.held_at(value)))}"
                          for value in reads if self.held_at(value) != self.all)
        problem = (f"'{name}' is read on stage {stage}, but made from values held elsewhere ({where})"
                   if stage is not None else
                   f"'{name}' reads values the pipeline holds on different stages ({where})")
        raise EinparError(Diagnostic(
            "E256", problem + ": values sent between stages outside the layers are not built yet",
            self.staged.span,
            hint="read a param only before or only after the pipelined repeat (weights tied between "
                 "the first and the last stage are not pipelined yet), and let the layers read "
                 "from outside only values made from inputs and params"))


def _outside_reads(step: RepeatStep) -> list[str]:
    """The values a loop's body reads that are made outside it (not its carried or stacked
    names, nor anything its body makes)."""
    inside = {name for _, name, _, _ in step.carried} | {name for _, name in step.stacked}
    made: set[str] = set()
    reads: list[str] = []

    def walk(steps):
        for s in steps:
            if isinstance(s, RepeatStep):
                inside.update(name for _, name, _, _ in s.carried)
                inside.update(name for _, name in s.stacked)
                for before, _, _, _ in s.carried:
                    reads.append(before)
                for stacked, _ in s.stacked:
                    reads.append(stacked)
                walk(s.body)
                made.update(after for _, _, _, after in s.carried)
                made.update(after for _, after in s.saved)
                continue
            reads.extend(read_by(s))
            made.add(made_by(s))

    walk(step.body)
    return [value for value in dict.fromkeys(reads) if value not in inside and value not in made]
