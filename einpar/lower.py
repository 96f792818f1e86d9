"""Lower a partitioned program to the SpmdProgram every device runs.

Each op becomes a local op on local shapes, preceded by the collectives that
move its operands into the layouts its strategy needs (a value already held
in that layout is reused), and followed by the ones that deliver its result
where the program asks for it. Values moved get new local names (`x~1`).
"""

from __future__ import annotations

from dataclasses import replace

from .ir import Operand, Program, TensorType, Value, is_backward, with_operands
from .errors import EinparError
from .layout import Layout, local_bytes
from .partition import Decision, Move, PartitionedProgram, RepeatDecision, partition
from .reshard import plan_reshard
from .spmd import CollectiveStep, LocalStep, Priced, RepeatStep, SpmdOutput, SpmdProgram, SpmdValue


class _Lowering:
    def __init__(self, partitioned: PartitionedProgram):
        self.partitioned = partitioned
        self.program = partitioned.program
        self.mesh = self.program.mesh
        self.values: dict[str, SpmdValue] = {}
        self.held: dict[tuple[str, Layout], str] = {}  # (value, layout) -> local name
        self.counter: dict[str, int] = {}
        self.types: dict[str, TensorType] = {}  # per-trip types of stacked params
        self.backward = False  # past the first op of a training step's backward pass
        self.freed: dict[str, Layout] = {}  # params whose moved copies the backward pass remakes

    def type_of(self, value: str) -> TensorType:
        return self.types.get(value) or self.program.values[value].type

    def define(self, name: str, value: str, tensor: str, layout: Layout) -> None:
        self.values[name] = SpmdValue(name, tensor, self.type_of(value), layout)
        self.held[(value, layout)] = name

    def unique(self, name: str) -> str:
        """`name`, or `name2`, `name3`... when an enclosing repeat already uses it
        (nested blocks each have their own trip values)."""
        candidate, number = name, 1
        while candidate in self.values:
            number += 1
            candidate = f"{name}{number}"
        return candidate

    def fresh(self, value: str) -> str:
        self.counter[value] = self.counter.get(value, 0) + 1
        return f"{value}~{self.counter[value]}"

    def move(self, move: Move | None, steps: list, serves: str = "") -> None:
        if move is None:
            return
        layout = move.src
        self.refetch(move.value, layout, steps, serves)
        name = self.held[(move.value, layout)]
        shape, dtype = self.type_of(move.value).shape, self.type_of(move.value).dtype
        for step in move.plan.steps:
            after = step.apply(layout)
            existing = self.held.get((move.value, after))
            if existing is not None:
                name, layout = existing, after
                continue
            new = self.fresh(move.value)
            self.define(new, move.value, move.tensor, after)
            steps.append(CollectiveStep(step, name, new, move.tensor, layout, after,
                                        step.bytes_per_device(layout, shape, dtype, self.mesh),
                                        move.reason, serves))
            name, layout = new, after

    def local_value(self, value: Value, layout: Layout) -> Value:
        shape = layout.local_shape(value.type.shape, self.mesh)
        return replace(value, type=replace(value.type, shape=shape), layout=None)

    def decision(self, decision: Decision, steps: list) -> None:
        for move in decision.moves:
            self.move(move, steps, decision.op.result.name)
        op = decision.op
        for operand, layout in zip(op.operands, decision.operand_layouts):
            self.refetch(operand.value, layout, steps, op.result.name)
        operands = tuple(Operand(self.held[(o.value, layout)], o.indices)
                         for o, layout in zip(op.operands, decision.operand_layouts))
        result = self.local_value(op.result, decision.result_layout)
        local = replace(with_operands(op, operands), result=result)
        self.define(op.result.name, op.result.name, op.stmt, decision.result_layout)
        steps.append(LocalStep(local, decision.rule, decision.assignment, self.priced(decision)))
        self.move(decision.constraint, steps, op.result.name)

    def priced(self, decision) -> Priced:
        """The decision's price in the plan's units (seconds for time, kept in ns while solving)."""
        scale = 1e-9 if self.partitioned.objective == "time" else 1.0
        other = decision.alternative
        return Priced(self.partitioned.objective, decision.price * scale,
                      other.rule if other else None, other.extra * scale if other else None)

    def forget(self, value: str) -> None:
        for key in [key for key in self.held if key[0] == value]:
            del self.held[key]

    def repeat(self, decision: RepeatDecision, steps: list) -> None:
        op = decision.op
        for move in decision.entry:
            self.move(move, steps)
        layouts = decision.carried_layouts
        starts = [self.held[(c.value, layout)] for c, layout in zip(op.carried, layouts)]
        tensors = [self.values[start].tensor for start in starts]
        # A stacked value's slice is cut from the copy the loop reads: the program's input
        # (in a nested block, the enclosing trip's slice), or a value made before the loop
        # in the layout the plan slices it from.
        sources = [self.held[(view.name, layout)]
                   for view, layout in zip(op.stacked, decision.stacked_sources)]
        saved, saved_types = dict(self.held), dict(self.types)
        # Inside the body a carried name means this trip's value, a stacked value's
        # name this trip's slice: other copies of them are not valid there.
        inside = []
        for carried, layout, tensor in zip(op.carried, layouts, tensors):
            self.forget(carried.value)
            inside.append(self.unique(f"{carried.value}~in"))
            self.define(inside[-1], carried.value, tensor, layout)
        trips = []
        for view, layout in zip(op.stacked, decision.stacked_layouts):
            self.types[view.name] = view.type
            self.forget(view.name)
            trips.append(self.unique(f"{view.name}~trip"))
            self.define(trips[-1], view.name, view.name, layout)
        body: list = []
        self.steps(decision.body, body)
        for move in decision.exit:
            self.move(move, body)
        for move in decision.saves:  # the op's result, moved for the loop to save
            self.move(move, body, move.value)
        results = [self.held[(c.body_result, layout)] for c, layout in zip(op.carried, layouts)]
        kept = [self.held[(s.body_value, layout)] for s, layout in zip(op.saved, decision.saved_layouts)]
        # Values made inside the body do not outlive it; the enclosing level's
        # types of stacked values (its own slices) come back.
        self.held, self.types = saved, saved_types
        for carried, layout, tensor in zip(op.carried, layouts, tensors):
            self.define(carried.result.name, carried.result.name, tensor, layout)
        for s, layout in zip(op.saved, decision.saved_layouts):
            self.define(s.result.name, s.result.name, s.result.name, Layout(((),) + layout.dims, layout.partial))
        steps.append(RepeatStep(
            op.dim, op.count,
            tuple((start, name, result, c.result.name)
                  for c, start, name, result in zip(op.carried, starts, inside, results)),
            tuple(zip(sources, trips)), tuple(body), self.priced(decision),
            tuple(zip(kept, (s.result.name for s in op.saved))), op.reverse))

    def steps(self, decisions, steps: list, top: bool = False) -> None:
        for decision in decisions:
            if isinstance(decision, RepeatDecision):
                self.repeat(decision, steps)
                continue
            if top and not self.backward and is_backward(decision.op):
                self.backward = True
                self.free_gathered_params()
            self.decision(decision, steps)

    def refetch(self, value: str, layout: Layout, steps: list, serves: str) -> None:
        """Gather again, from its own layout, a param copy freed for the backward pass."""
        if (value, layout) in self.held or value not in self.freed:
            return
        own = self.freed[value]
        vtype = self.type_of(value)
        plan = plan_reshard(own, layout, vtype.shape, vtype.dtype, self.mesh)
        self.move(Move(value, value, plan, "gathered again for the backward pass (FSDP frees "
                                           "it after the forward pass)"), steps, serves)

    def free_gathered_params(self) -> None:
        """At the start of a training step's backward pass, forget the copies of params
        that the forward pass moved out of their own layout: the backward pass gathers such a
        weight again. FSDP frees a gathered weight after use (PyTorch FSDP's
        `reshard_after_forward`, ZeRO stage 3), so that one gathered weight at a time is live."""
        params = {value.name: layout for value, layout in
                  zip(self.program.inputs, self.partitioned.inputs) if value.kind == "param"}
        for key in [key for key in self.held if key[0] in params and key[1] != params[key[0]]]:
            del self.held[key]
        self.freed = params

    def run(self) -> SpmdProgram:
        for value, layout in zip(self.program.inputs, self.partitioned.inputs):
            self.define(value.name, value.name, value.name, layout)
        inputs = tuple(value.name for value in self.program.inputs)
        steps: list = []
        self.steps(self.partitioned.steps, steps, top=True)
        outputs = []
        for output, layout, move in self.partitioned.outputs:
            self.move(move, steps)
            outputs.append(SpmdOutput(output.name, self.held[(output.value, layout)], layout))
        plan = self.partitioned
        scale = 1e-9 if plan.objective == "time" else 1.0
        return SpmdProgram(self.program.file, self.mesh, self.values, inputs, tuple(steps),
                           tuple(outputs), plan.limits, plan.objective_text,
                           Priced(plan.objective, plan.price * scale))


def lower(partitioned: PartitionedProgram) -> SpmdProgram:
    return _Lowering(partitioned).run()


def compile_program(program: Program, objective=None) -> tuple[PartitionedProgram, SpmdProgram]:
    """Partition `program` for the whole program at once, minimizing `objective`
    (einpar.objective; default: time on the default cluster of its mesh), and lower it.
    Memory is a constraint: when the plan's peak memory per device is more than the
    objective's device holds, the program is planned again with its values and moved
    copies bounded by what the inputs leave free, and that plan is kept if it fits."""
    from .pipeline import pipeline_of, schedule_of, stage_program, staged_repeat

    staged = staged_repeat(program)
    if staged is not None:  # one stage's program, and how the stages run it (pipeline.py)
        schedule = schedule_of(program, staged)  # refused before any work if too long
        plan = partition(stage_program(program, staged), objective)
        spmd = lower(plan)
        return plan, replace(spmd, pipeline=pipeline_of(program, staged, spmd.steps, spmd.outputs,
                                                         schedule))
    plan = partition(program, objective)
    spmd = lower(plan)
    capacity = getattr(objective, "capacity", None)
    if capacity is None:
        return plan, spmd
    peak, resident = _peak_memory(spmd)
    if peak <= capacity or resident >= capacity:
        return plan, spmd
    try:
        limited = partition(program, objective, memory_limit=capacity - resident)
    except EinparError:  # no plan's values fit: keep the fastest (`einpar cost` says it does not fit)
        return plan, spmd
    limited_spmd = lower(limited)
    return (limited, limited_spmd) if _peak_memory(limited_spmd)[0] <= capacity else (plan, spmd)


def _peak_memory(spmd: SpmdProgram) -> tuple[int, int]:
    """(peak bytes, resident input bytes) of one device, as `einpar cost` counts them."""
    from .cost_model.estimate import peak_memory

    def bytes_of(name: str) -> int:
        value = spmd.values[name]
        return local_bytes(value.layout, value.type.shape, value.type.dtype, spmd.mesh)

    return peak_memory(spmd, bytes_of)
