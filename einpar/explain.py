"""What `einpar explain` shows: each statement of a program, as the devices run it.

For every statement, in program order: the layouts its operands are read in
and its result is made in, the strategy in words, every collective with its
device groups, bytes per device and (given a cluster) its time, and which
block of each tensor every device holds. This module builds that as data
(`Explanation`); `einpar.explain_view` draws it. Nothing here is computed a
second way: layouts, blocks and bytes come from the SpmdProgram that the
backends run and the cost model prices.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import source_lines
from .ir import Einsum, Reduce, ScatterAdd, Take
from .layout import Layout, Mesh, block_slices, format_type, local_bytes, mesh_groups
from .decisions import SAVE_REASON
from .partition import PARTIAL
from .spmd import CollectiveStep, LocalStep, RepeatStep, SpmdProgram, format_collective
from .units import format_bytes

PARTIAL_WORDS = {"sum": "partial sum", "max": "partial max", "min": "partial min"}


@dataclass(frozen=True)
class Held:
    """One local value as a statement sees it, and the block of it each device holds."""

    name: str  # local name (`q~1`)
    tensor: str  # the program's name
    indices: tuple[str, ...]  # as the statement names its dimensions
    dtype: str
    shape: tuple[int, ...]  # global
    layout: Layout

    def text(self) -> str:
        return format_type(self.dtype, self.shape, self.layout)

    def block(self, mesh: Mesh, device: int) -> tuple[tuple[int, int], ...]:
        """[start, stop) per dimension of the block `device` holds."""
        return tuple((s.start, s.stop) for s in block_slices(self.layout, self.shape, mesh, device))

    def local_shape(self, mesh: Mesh) -> tuple[int, ...]:
        return self.layout.local_shape(self.shape, mesh)


@dataclass(frozen=True)
class Movement:
    """A collective (or a free local slice) and why it is there."""

    call: str  # `all_gather[tp](o, H)`
    kind: str
    axes: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]  # every group of devices that runs it together
    bytes_per_device: int
    sentence: str
    src: Held
    dst: Held
    time_s: float | None = None  # on the cluster given
    how: str = ""  # the algorithm and link the cost model chose


@dataclass
class Statement:
    number: int  # 1-based, in program order
    name: str
    line: int
    source: str  # the statement's text in the file
    trips: int  # how many times it runs (a statement in `repeat` runs once per trip)
    reads: list[Held] = field(default_factory=list)  # operands as held before its moves
    operands: list[Held] = field(default_factory=list)  # operands as its local ops read them
    result: Held | None = None  # as the program keeps it (after any move the program asks for)
    made_as: Held | None = None  # as its last op makes it, if the program then moves it
    rules: list[str] = field(default_factory=list)
    movements: list[Movement] = field(default_factory=list)
    made: set = field(default_factory=set)  # every local value made inside the statement
    steps: list = field(default_factory=list)  # its LocalSteps
    fused: list[str] = field(default_factory=list)  # the kernels its steps fuse into, in words
    choices: list[str] = field(default_factory=list)  # what each op's strategy costs, and the
    # best one rejected, in words (the partitioner's objective)
    stages: tuple[int, ...] | None = None  # a pipeline's stages that run it (None: every one)

    @property
    def bytes_per_device(self) -> int:
        return sum(m.bytes_per_device for m in self.movements)


@dataclass(frozen=True)
class PipelineView:
    """A pipeline as explain shows it: which trips (layers) each stage holds, and the
    schedule laid out with a forward taking 1 and a backward 2 units of time (its shape;
    `einpar cost --trace` has it priced)."""

    axis: str
    mesh: Mesh  # the whole mesh; the explanation's own is one stage's
    stage_trips: tuple[tuple[int, ...], ...]
    timeline: object  # schedule.Timeline


@dataclass
class Explanation:
    file: str
    mesh: Mesh
    inputs: list[Held]
    statements: list[Statement]
    cluster: str | None = None
    objective: str = ""  # what the plan minimizes, in words
    pipeline: PipelineView | None = None


# ---- words


def choice_sentence(step: LocalStep) -> str | None:
    """`h: costs 7.71 us; the best rejected (tp: F) adds 13.2 us`."""
    priced = step.priced
    if priced is None:
        return None
    text = f"{step.op.result.name}: costs {_amount(priced.price, priced.objective)}"
    if priced.alternative is not None:
        text += (f"; the best rejected strategy ({priced.alternative}) would add "
                 f"{_amount(priced.extra, priced.objective)} to the program")
    return text


def _amount(value: float, objective: str) -> str:
    if objective == "bytes":
        return f"{round(value):,} B"
    from .units import format_seconds
    return format_seconds(value)


def _roles_sentences(step: LocalStep, subject: str, spmd: SpmdProgram) -> list[str]:
    """The strategy of one local op, one sentence per mesh axis."""
    op = step.op
    result_indices = op.result.type.indices
    partial_kind = {"max": "partial max", "min": "partial min"}.get(getattr(op, "kind", ""), "partial sum")
    sentences = []
    for axis, role in step.roles:
        if role is None:
            sentences.append(f"every device along {axis} holds the same copies and repeats the work "
                             f"of {subject}")
        elif role == PARTIAL:
            sentences.append(f"an operand is a partial result over {axis}, and {subject} is linear "
                             "in it, so it stays partial: no communication yet")
        elif role in result_indices:
            sentences.append(f"index {role} is split over {axis}, so each device computes its own "
                             f"block of {subject}")
        elif isinstance(op, Take):
            sentences.append(f"the table's rows ({role}) are split over {axis}, so each device looks "
                             "up the ids in its own rows, zeros for the others', and computes a "
                             f"partial sum of {subject}")
        elif isinstance(op, ScatterAdd):
            sentences.append(f"the update's index {role} is split over {axis}, so each device adds "
                             f"its own rows and computes a partial sum of {subject}")
        else:
            verb = "contracted" if isinstance(op, Einsum) else "reduced"
            having = [o.value for o in op.operands if role in o.indices]
            where = "in both operands" if len(having) == 2 == len(op.operands) else \
                "in " + ", ".join(dict.fromkeys(_tensor(spmd, v) for v in having))
            kind = partial_kind if isinstance(op, (Einsum, Reduce)) else "partial result"
            sentences.append(f"index {role} is {verb} and split over {axis} {where}, so each "
                             f"device computes a {kind} of {subject}")
    if not step.roles:
        sentences.append(f"one device computes {subject}")
    return sentences


def _statement_rules(statement: Statement, spmd: SpmdProgram) -> list[str]:
    """The strategy of a statement's local ops: ops that share one are described together."""
    groups: dict[tuple, list[LocalStep]] = {}
    for step in statement.steps:
        groups.setdefault(step.roles, []).append(step)
    rules = []
    for steps in groups.values():
        subject = statement.name if len(groups) == 1 else \
            ", ".join(step.op.result.name for step in steps)
        for sentence in _roles_sentences(steps[-1], subject, spmd):
            if sentence not in rules:
                rules.append(sentence)
    return rules


def _tensor(spmd: SpmdProgram, local: str) -> str:
    return spmd.values[local].tensor


def _movement_sentence(step: CollectiveStep, src: Held, dst: Held) -> str:
    move = step.step
    tensor = step.tensor
    if step.reason.endswith(" is asked for in this layout"):
        need = f"the program asks for {dst.text()}"
    elif step.reason == SAVE_REASON:
        need = f"the loop saves every trip's {dst.text()}"
    else:
        reader = step.reason.split(" reads ")[0]
        need = f"{reader} reads it as {dst.text()}"
    kind = move.kind
    size = format_bytes(step.bytes_per_device)
    if kind == "slice":
        return (f"{tensor} is whole along {dst.indices[move.dim]} and {need}: each device keeps "
                f"its own block over {move.axis}, a local slice with no communication")
    if kind == "all_gather":
        index = src.indices[move.dim]
        return (f"{tensor} is split over {move.axis} along {index}, and {need}: an all-gather over "
                f"{move.axis} brings every device the blocks of its group, {size} per device")
    if kind == "reduce_scatter":
        words = PARTIAL_WORDS[move.op]
        return (f"{tensor} is a {words} over {move.axis}, and {need}: a reduce-scatter over "
                f"{move.axis} combines the partials and leaves each device its block of "
                f"{dst.indices[move.dim]}, {size} per device")
    if kind == "all_reduce":
        words = PARTIAL_WORDS[move.op]
        axes = ",".join(move.axes)
        return (f"{tensor} is a {words} over {axes}, and {need}: an all-reduce over {axes} "
                f"combines the partials on every device, {size} per device")
    if kind == "all_to_all":
        return (f"{tensor} is split over {move.axis} along {src.indices[move.src_dim]}, and {need}: "
                f"an all-to-all over {move.axis} re-splits it along {src.indices[move.dst_dim]}, "
                f"{size} per device")
    return (f"{tensor}'s blocks over {move.src_axis} must sit where {move.dst_axis} splits it, and "
            f"{need}: a permute sends each device's block to its partner, {size} per device")


# ---- building


class _Builder:
    def __init__(self, spmd: SpmdProgram, source: str, cluster=None, fusion: str = "auto"):
        self.spmd = spmd
        self.fusion = fusion
        self.mesh = spmd.mesh
        self.lines = source_lines(source)  # as the spans count lines
        self.cluster = cluster
        self.statements: list[Statement] = []
        self.by_op: dict[str, Statement] = {}  # local op result -> its statement
        self.pending: list[CollectiveStep] = []  # moves met before the op they serve
        # A loop's start or end was passed since the last statement: the next op starts a
        # statement of its own even where it has the last one's name (a loop's last backward
        # op and the one after the loop can both come from the statement before the loop).
        self.loop_edge_passed = False

    def held(self, local: str, indices: tuple[str, ...] | None = None) -> Held:
        value = self.spmd.values[local]
        return Held(local, value.tensor, indices or value.type.indices, value.type.dtype,
                    value.type.shape, value.layout)

    def statement_for(self, step: LocalStep, trips: int) -> Statement:
        op = step.op
        span = op.span
        line = span.line if span else 0
        last = self.statements[-1] if self.statements and not self.loop_edge_passed else None
        self.loop_edge_passed = False
        if last is not None and last.name == op.stmt and last.line == line:
            return last
        end = span.end_line if span else line
        source = "\n".join(self.lines[line - 1:end]) if line else op.stmt
        statement = Statement(len(self.statements) + 1, op.stmt, line, source.strip(), trips)
        self.statements.append(statement)
        return statement

    def local(self, step: LocalStep, trips: int) -> None:
        statement = self.statement_for(step, trips)
        op = step.op
        for move in self.pending:
            internal = move.src in statement.made  # a value of this statement moved within it
            if internal:
                statement.made.add(move.dst)
            self.attach(move, statement, of_result=False, internal=internal)
        self.pending = []
        for operand in op.operands:
            if operand.value in statement.made or any(h.name == operand.value
                                                      for h in statement.operands):
                continue
            statement.operands.append(self.held(operand.value, operand.indices))
        statement.made.add(op.result.name)
        statement.steps.append(step)
        self.by_op[op.result.name] = statement
        statement.result = self.held(op.result.name)

    def attach(self, step: CollectiveStep, statement: Statement, of_result: bool,
               internal: bool = False) -> None:
        """Add a move to `statement`: one of an operand's (before it) or of its result (after)."""
        src, dst = self.held(step.src), self.held(step.dst)
        if not (of_result or internal) and not any(h.tensor == src.tensor for h in statement.reads):
            statement.reads.append(src)
        groups = tuple(tuple(int(d) for d in group) for group in mesh_groups(self.mesh, step.step.axes))
        call = format_collective(step, self.spmd.values[step.dst].type.indices)
        movement = Movement(call, step.kind, tuple(step.step.axes), groups, step.bytes_per_device,
                            _movement_sentence(step, src, dst), src, dst)
        if self.cluster is not None and step.kind != "slice":
            from .cost_model.collectives import collective_time

            value = self.spmd.values[step.src]
            before = local_bytes(value.layout, value.type.shape, value.type.dtype, self.mesh)
            cost = collective_time(step.kind, step.step.axes, before, self.mesh, self.cluster)
            movement = replace(movement, time_s=cost.time_s, how=cost.how)
        statement.movements.append(movement)
        if of_result:  # the program asks for the result in another layout
            statement.made_as = statement.made_as or statement.result
            statement.result = dst

    def walk(self, steps, trips: int) -> None:
        for step in steps:
            if isinstance(step, RepeatStep):
                self.loop_edge(step, trips, "before the loop")
                self.loop_edge_passed = True
                self.walk(step.body, trips * step.count)
                self.loop_edge(step, trips * step.count, "at the end of each trip")
                self.loop_edge_passed = True
            elif isinstance(step, LocalStep):
                self.local(step, trips)
            elif step.serves in self.by_op:  # the result, moved where the program asks for it
                self.attach(step, self.by_op[step.serves], of_result=True)
            else:
                self.pending.append(step)

    def loop_edge(self, step: RepeatStep, trips: int, when: str) -> None:
        """Moves pending at a loop's edge (into the layouts it carries and slices values in,
        or back to them after a trip) as a statement of their own, run as often as they are."""
        if not self.pending:
            return
        order = " reverse" if step.reverse else ""
        edge = Statement(len(self.statements) + 1, f"repeat {step.dim}", 0,
                         f"repeat {step.dim}={step.count}{order}: {when}", trips)
        for move in self.pending:
            self.attach(move, edge, of_result=False)
        edge.operands = list({m.dst.tensor: m.dst for m in edge.movements}.values())
        self.statements.append(edge)
        self.pending = []

    def build(self) -> Explanation:
        inputs = [self.held(name) for name in self.spmd.inputs]
        self.walk(self.spmd.steps, 1)
        if self.pending:  # moves to the outputs' layouts, after the last statement
            outputs = Statement(len(self.statements) + 1, "output", 0, "output " + ", ".join(
                o.name for o in self.spmd.outputs), 1)
            for move in self.pending:
                self.attach(move, outputs, of_result=False)
            last = {m.dst.tensor: m.dst for m in outputs.movements}  # each output as delivered
            outputs.operands = list(last.values())
            self.statements.append(outputs)
        self.fused()
        for statement in self.statements:
            statement.rules = _statement_rules(statement, self.spmd)
            statement.choices = [sentence for step in statement.steps
                                 if (sentence := choice_sentence(step)) is not None]
            for held in statement.operands:
                if not any(r.tensor == held.tensor for r in statement.reads):
                    statement.reads.append(held)
        name = getattr(self.cluster, "name", None)
        return Explanation(self.spmd.file, self.mesh, inputs, self.statements, name,
                           self.spmd.objective)


    def fused(self) -> None:
        """Say, on each statement with steps in a fused region, which kernel they run in and
        with which statements (the regions the cost model prices, cost_model/fusion.py)."""
        if self.fusion == "none":
            return
        from .cost_model.fusion import fuse, fused_regions

        for region in fused_regions(fuse(self.spmd, self.fusion)):
            statements = []
            for name in region.names:
                statement = self.by_op.get(name)
                if statement is not None and all(s is not statement for s in statements):
                    statements.append(statement)
            written = ", ".join(region.writes) or "nothing"
            if region.kind == "flash_attention":
                what = (f"one flash-attention kernel: only {written} is written to HBM, "
                        f"the scores never are")
            elif region.kind == "flash_attention_backward":
                again = f"recomputes {', '.join(region.recomputes)} on chip from " \
                        f"{', '.join(region.reads)}; " if region.recomputed else ""
                what = (f"one flash-attention backward kernel: it {again}only {written} is "
                        f"written to HBM, the scores' and probabilities' gradients never are")
            else:
                verb = "reach" if len(region.writes) > 1 else "reaches"
                what = f"one kernel: only {written} {verb} HBM, its other values stay on chip"
            for statement in statements:
                others = [str(s.number) for s in statements if s is not statement]
                together = f" with statement{'s' * (len(others) > 1)} {', '.join(others)}" \
                    if others else ""
                statement.fused.append(f"{region.describe()} runs{together} as {what}")


def explain(spmd: SpmdProgram, source: str, cluster=None, fusion: str = "auto") -> Explanation:
    """Each statement of the program `spmd` runs, `source` being its text; each collective's
    time on `cluster` if given; the fused regions its steps run in (`fusion` "auto"), as the
    cost model prices them."""
    explanation = _Builder(spmd, source, cluster, fusion).build()
    pipeline = spmd.pipeline
    if pipeline is not None:
        from .schedule import timeline

        explanation.pipeline = PipelineView(pipeline.axis, pipeline.mesh, pipeline.stage_trips,
                                            timeline(pipeline.schedule, 1.0, 2.0))
        for statement in explanation.statements:
            stages = set().union(*(pipeline.placement.get(name, set()) for name in statement.made))
            if stages and len(stages) < pipeline.stages:
                statement.stages = tuple(sorted(stages))
    return explanation
