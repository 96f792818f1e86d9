"""The partitioner: a layout for every value and a strategy for every op.

For each op (after library ops are expanded), a strategy assigns every mesh
axis one role, in the op's index space (the shardy way of writing sharding
rules as einsums over factors):

- split an index: every operand and the result that have that index are
  split along the axis (an operand without it holds copies);
- split a reduced index (a contraction's summed index, a reduction's index):
  each device reduces its block, and the result is partial over the axis;
- keep a partial value partial (`PARTIAL`), where the op is linear in it: a
  sum of partial sums, a partial sum times a whole value, a contraction or a
  sum of one partial operand, a max of partial maxima;
- nothing: the axis holds copies and repeats the work.

Every candidate is priced: the bytes of the reshards its operands need (a
layout a value was already moved into is free to reuse), plus the bytes to
deliver the result in the layout the program asks for there, then the FLOPs
per device, then fewer collectives, then a fixed order of candidates, so the
choice is deterministic. Layouts the user wrote are constraints; partial
results stay partial until a consumer needs them whole, so the consumer's
reshard picks a reduce-scatter when it wants the result split.

Choosing op by op is greedy, and one tie-break does not suit every program:
splitting a value that every device holds whole is free and saves FLOPs now,
but can force gathers later (slicing a transformer's residual stream over
`tp` turns Megatron's two all-reduces per layer into gathers of weights and
all-to-alls). So the walk runs twice, once preferring fewer FLOPs and once
preferring to keep copies whole when bytes tie, and `lower.compile_program`
keeps the program with fewer bytes per device (then FLOPs per device).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Union

from .expand import expand_library
from .flops import op_flops
from .ir import (Apply, Arg, Cast, Einsum, Library, Map, Op, Output, Program, Reduce, Repeat,
                 Route, Scalar, Value)
from .layout import Layout, Mesh
from .reshard import ReshardPlan, plan_reshard

PARTIAL = "(partial)"


@dataclass(frozen=True)
class Move:
    """A value moved from one layout to another, before an op reads it or after it is made."""

    value: str
    tensor: str  # the program's name for it
    plan: ReshardPlan
    reason: str

    @property
    def src(self) -> Layout:
        return self.plan.src

    @property
    def dst(self) -> Layout:
        return self.plan.dst


@dataclass(frozen=True)
class Decision:
    op: Op
    assignment: tuple[tuple[str, str | None], ...]  # mesh axis -> index, PARTIAL or None
    moves: tuple[Move, ...]  # operands moved into the layouts the strategy needs
    operand_layouts: tuple[Layout, ...]
    result_layout: Layout  # as the op computes it
    constraint: Move | None  # the result moved into the layout the program asks for
    rule: str  # the strategy in words

    @property
    def final_layout(self) -> Layout:
        return self.constraint.dst if self.constraint else self.result_layout


@dataclass(frozen=True)
class RepeatDecision:
    op: Repeat
    entry: tuple[Move, ...]  # carried values made whole before the loop
    carried_layouts: tuple[Layout, ...]
    stacked_layouts: tuple[Layout, ...]
    body: tuple["Step", ...]
    exit: tuple[Move, ...]  # each trip's results moved back to the carried layouts


Step = Union[Decision, RepeatDecision]


@dataclass(frozen=True)
class SearchLimit:
    """An op whose strategies were too many to price (more than MAX_CANDIDATES): only those
    giving a role to at most `axes` mesh axes, and those its pinned layouts imply, were
    searched, so a better plan may exist. `compile` says so (W104)."""

    value: Value  # the op's result, where the warning points
    strategies: int  # how many there were
    axes: int  # the most mesh axes one searched strategy uses


@dataclass(frozen=True)
class PartitionedProgram:
    program: Program  # with library ops expanded
    inputs: tuple[Layout, ...]  # the layout of each input, as declared
    steps: tuple[Step, ...]
    outputs: tuple[tuple[Output, Layout, Move | None], ...]  # output, final layout, last move
    limits: tuple[SearchLimit, ...] = ()  # ops searched only in part


def _linear_in(expr: Scalar, partial: set[int]) -> str:
    """'partial' if the expression of partial sums `partial` is itself a partial sum,
    'whole' if it reads none of them, 'no' otherwise."""
    if isinstance(expr, Arg):
        return "partial" if expr.index in partial else "whole"
    if isinstance(expr, Cast):
        return _linear_in(expr.arg, partial)
    if not isinstance(expr, Apply):
        return "whole"
    kinds = [_linear_in(arg, partial) for arg in expr.args]
    if "no" in kinds:
        return "no"
    if all(kind == "whole" for kind in kinds):
        return "whole"
    if expr.fn in ("add", "sub"):
        return "partial" if all(kind == "partial" for kind in kinds) else "no"
    if expr.fn == "mul":
        return "partial" if kinds.count("partial") == 1 else "no"
    if expr.fn == "div":
        return "partial" if kinds == ["partial", "whole"] else "no"
    if expr.fn == "neg":
        return "partial"
    return "no"


def _axis_order(mesh: Mesh, axes: list[str]) -> tuple[str, ...]:
    return tuple(a for a in mesh.names if a in axes)


# Tie-breaks between candidates that move equal bytes (see the module's docstring).
POLICIES = ("fewest_flops", "keep_copies")


class _Partitioner:
    def __init__(self, program: Program, policy: str = "fewest_flops"):
        self.program = program
        self.policy = policy
        self.mesh = program.mesh
        self.sizes = program.dim_sizes
        self.values = program.values
        self.available: dict[str, list[Layout]] = {}  # value -> layouts it is held in
        self.tensor_names = {value.name: value.name for value in program.inputs}
        # Inside a repeat body a stacked param's name means one trip's slice of it.
        self.types = {}
        # Outputs' values and the layouts they leave in (None: whichever, but whole).
        self.output_layouts = {output.value: output.layout for output in program.outputs}
        self.choices: dict = {}  # decision_key -> the strategy chosen for ops alike
        self.limits: dict[str, SearchLimit] = {}  # result value -> its search's limit

    # ---- bookkeeping

    def hold(self, value: str, layout: Layout) -> None:
        held = self.available.setdefault(value, [])
        if layout not in held:
            held.append(layout)

    def current(self, value: str) -> Layout:
        return self.available[value][0]

    def tensor(self, value: str) -> str:
        return self.tensor_names[value]

    def cheapest_plan(self, value: str, want: Layout) -> ReshardPlan | None:
        """The cheapest reshard from a layout `value` is held in to `want`; None if held."""
        held = self.available[value]
        if want in held:
            return None
        vtype = self.types.get(value) or self.values[value].type
        best = None
        for src in held:
            try:
                plan = plan_reshard(src, want, vtype.shape, vtype.dtype, self.mesh)
            except ValueError:
                continue
            if best is None or (plan.bytes_per_device, len(plan.steps)) < \
                    (best.bytes_per_device, len(best.steps)):
                best = plan
        assert best is not None, (value, held, want)
        return best

    def cheapest_move(self, value: str, want: Layout, reason: str) -> Move | None:
        plan = self.cheapest_plan(value, want)
        return None if plan is None else Move(value, self.tensor(value), plan, reason)

    # ---- candidates

    def op_indices(self, op: Op) -> tuple[tuple[str, ...], tuple[str, ...], set[str]]:
        """(index space, reduced indices, indices that must stay whole)."""
        result = op.result.type.indices
        space: list[str] = []
        for operand in op.operands:
            space.extend(i for i in operand.indices if i not in space)
        space.extend(i for i in result if i not in space)
        reduced = tuple(i for i in space if i not in result)
        whole: set[str] = set()
        if isinstance(op, Library):  # cumsum
            whole.add(op.index)
        if isinstance(op, Route):
            whole |= {op.expert, op.capacity, op.token}
        return tuple(space), reduced, whole

    def partial_choice(self, op: Op, axis: str) -> tuple[str, tuple[int, ...]] | None:
        """(kind, operands that stay partial) if `op` can keep values partial over `axis`."""
        kinds = [self.current(o.value).partial_kind(axis) for o in op.operands]
        partial = tuple(k for k, kind in enumerate(kinds) if kind is not None)
        if not partial:
            return None
        kind = kinds[partial[0]]
        if any(kinds[k] != kind for k in partial):
            return None
        if isinstance(op, Einsum) and kind == "sum" and len(partial) == 1:
            return kind, partial
        if isinstance(op, Reduce) and op.kind == kind:
            return kind, partial
        if isinstance(op, Map) and kind == "sum" and _linear_in(op.expr, set(partial)) == "partial":
            return kind, partial
        return None

    def axis_options(self, op: Op, space, whole, partial_choices) -> list[list]:
        """The roles each mesh axis may take in `op`. An axis of size 1 splits nothing, so it
        only keeps what the op's operands or its constraint already do with it."""
        per_axis = []
        for axis in self.mesh.names:
            options: list = [None]
            if self.mesh.size(axis) > 1:
                options += [i for i in space if i not in whole]
            else:
                layouts = [layout for o in op.operands for layout in self.available[o.value]]
                layouts += [op.result.layout] if op.result.layout is not None else []
                options += [i for i in space if i not in whole and any(
                    axis in axes for layout in layouts
                    for axes, index in zip(layout.dims, self._indices_of(op, layout)) if index == i)]
            if partial_choices[axis] is not None:
                options.append(PARTIAL)
            per_axis.append(options)
        return per_axis

    def _indices_of(self, op: Op, layout: Layout) -> tuple:
        """The op's indices that `layout` (of an operand or the result) splits, dim by dim."""
        for operand in op.operands:
            if layout in self.available[operand.value]:
                return operand.indices
        return op.result.type.indices

    def candidates(self, op: Op, space, whole, partial_choices):
        per_axis = self.axis_options(op, space, whole, partial_choices)
        for choice in self.assignments(op, per_axis):
            assignment = dict(zip(self.mesh.names, choice))
            split: dict[str, list[str]] = {}
            for axis, index in assignment.items():
                if index not in (None, PARTIAL):
                    split.setdefault(index, []).append(axis)
            if any(self.sizes[i] % _product(self.mesh.size(a) for a in axes)
                   for i, axes in split.items()):
                continue
            yield assignment, {i: _axis_order(self.mesh, axes) for i, axes in split.items()}

    def assignments(self, op: Op, per_axis: list[list]):
        """Every choice of one option per axis, if there are at most MAX_CANDIDATES;
        otherwise the choices that give a role to at most k axes (the largest k that fits
        the budget), in the same order, then the assignments the op's operands and its
        constraint already imply, so a program whose layouts the user pinned keeps them."""
        if _product(len(options) for options in per_axis) <= MAX_CANDIDATES:
            yield from itertools.product(*per_axis)
            return
        most = _most_roles(per_axis, MAX_CANDIDATES)
        self.limits.setdefault(op.result.name, SearchLimit(
            op.result, _product(len(options) for options in per_axis), most))
        seen = set()
        for choice in itertools.product(*per_axis) if most == len(per_axis) else \
                _with_at_most(per_axis, most):
            seen.add(choice)
            yield choice
        for choice in self.implied_assignments(op, per_axis):
            if choice not in seen:
                seen.add(choice)
                yield choice

    def implied_assignments(self, op: Op, per_axis: list[list]):
        """For the result's constraint and each operand's layouts: every axis on the index
        that layout splits over it, the others None."""
        layouts = [(op.result.layout, op.result.type.indices)] if op.result.layout else []
        layouts += [(layout, o.indices) for o in op.operands for layout in self.available[o.value]]
        for layout, indices in layouts:
            roles = {axis: index for axes, index in zip(layout.dims, indices) for axis in axes}
            choice = tuple(roles.get(axis) for axis in self.mesh.names)
            if all(role in options for role, options in zip(choice, per_axis)):
                yield choice

    def strategy_layouts(self, op: Op, assignment, split, reduced, partial_choices):
        reduce_kind = "sum" if isinstance(op, Einsum) else getattr(op, "kind", "sum")
        operand_layouts = []
        for position, operand in enumerate(op.operands):
            partial = [(axis, partial_choices[axis][0]) for axis, role in assignment.items()
                       if role == PARTIAL and position in partial_choices[axis][1]]
            operand_layouts.append(Layout(tuple(split.get(i, ()) for i in operand.indices),
                                          tuple(partial)))
        partial = []
        for axis, role in assignment.items():
            if role in reduced:
                partial.append((axis, reduce_kind))
            elif role == PARTIAL:
                partial.append((axis, partial_choices[axis][0]))
        result = op.result.type.indices
        # A layout that differs from a held one only in axes of size 1 holds the same blocks:
        # read the held one rather than move the value (a move of 0 bytes, but a step).
        for position, operand in enumerate(op.operands):
            for held in self.available[operand.value]:
                if self.without_unit_axes(held) == self.without_unit_axes(operand_layouts[position]):
                    operand_layouts[position] = held
                    break
        result_layout = Layout(tuple(split.get(i, ()) for i in result), tuple(partial))
        constraint = op.result.layout
        if constraint is not None and \
                self.without_unit_axes(constraint) == self.without_unit_axes(result_layout):
            result_layout = constraint
        return operand_layouts, result_layout

    def without_unit_axes(self, layout: Layout) -> Layout:
        ones = {axis for axis in self.mesh.names if self.mesh.size(axis) == 1}
        if not ones:
            return layout
        return Layout(tuple(tuple(a for a in axes if a not in ones) for axes in layout.dims),
                      tuple((a, kind) for a, kind in layout.partial if a not in ones))

    def decision_key(self, op: Op):
        """Everything `choose` depends on, so that ops alike (the same layer, repeated)
        are priced once: the op's kind and parameters, its operands' indices, dtypes and
        held layouts, its result's indices and dtype, and what is asked of the result."""
        if isinstance(op, Map):
            detail = op.expr
        elif isinstance(op, Reduce):
            detail = (op.kind, op.over)
        elif isinstance(op, Library):
            detail = (op.kind, op.index)
        elif isinstance(op, Route):
            detail = (op.expert, op.capacity, op.k)
        else:
            detail = None
        operands = tuple((o.indices, (self.types.get(o.value) or self.values[o.value].type).dtype,
                          tuple(self.available[o.value])) for o in op.operands)
        output = self.output_layouts.get(op.result.name, "-") \
            if op.result.name in self.output_layouts else "not an output"
        return (type(op), detail, operands, op.result.type.indices, op.result.type.dtype,
                op.result.layout, output)

    def decide(self, op: Op) -> Decision:
        key = self.decision_key(op)
        if key not in self.choices:
            self.choices[key] = self.choose(op)
        assignment, operand_layouts, result_layout, after, reduced = self.choices[key]
        moves = []
        for value, want in dict.fromkeys((o.value, want) for o, want in zip(op.operands, operand_layouts)):
            plan = self.cheapest_plan(value, want)
            if plan is not None:
                moves.append(Move(value, self.tensor(value), plan, f"{op.stmt} reads {self.tensor(value)}"))
        constraint_move = None if after is None else \
            Move(op.result.name, op.stmt, after, f"{op.stmt} is asked for in this layout")
        return Decision(op, tuple(assignment.items()), tuple(moves), tuple(operand_layouts),
                        result_layout, constraint_move, self.describe(op, assignment, reduced))

    def choose(self, op: Op):
        """The cheapest strategy: (assignment, operand layouts, result layout, plan to the
        constraint or None, reduced indices)."""
        space, reduced, whole = self.op_indices(op)
        partial_choices = {axis: self.partial_choice(op, axis) for axis in self.mesh.names}
        constraint = op.result.layout
        vtype = op.result.type
        plans: dict = {}  # (value, layout) -> plan, within this op
        # Axes some operand is already split or partial over: splitting over any other
        # axis slices values every device holds whole.
        sharded = {axis for o in op.operands for layout in self.available[o.value]
                   for axes in layout.dims for axis in axes} | \
                  {axis for o in op.operands for layout in self.available[o.value]
                   for axis, _ in layout.partial}
        best = None
        for order, (assignment, split) in enumerate(self.candidates(op, space, whole, partial_choices)):
            operand_layouts, result_layout = self.strategy_layouts(op, assignment, split, reduced,
                                                                   partial_choices)
            cost = steps = 0
            # A value read twice in one layout (x[S,D] * x[S,D]) is moved once.
            for key in dict.fromkeys((o.value, want) for o, want in zip(op.operands, operand_layouts)):
                if key not in plans:
                    plans[key] = self.cheapest_plan(*key)
                if plans[key] is not None:
                    cost += plans[key].bytes_per_device
                    steps += len(plans[key].steps)
            after = None
            if constraint is not None and constraint != result_layout:
                after = plan_reshard(result_layout, constraint, vtype.shape, vtype.dtype, self.mesh)
                cost += after.bytes_per_device
                steps += len(after.steps)
            elif constraint is None:
                cost += self.finishing_cost(op.result.name, result_layout)
            local_sizes = {i: self.sizes[i] // _product(self.mesh.size(a) for a in split.get(i, ()))
                           for i in space}
            flops = op_flops(op, local_sizes)
            if self.policy == "keep_copies":
                fresh = sum(1 for a, role in assignment.items()
                            if role not in (None, PARTIAL) and a not in sharded)
                key = (cost, fresh, flops, steps, order)
            else:
                key = (cost, flops, steps, order)
            if best is None or key < best[0]:
                best = (key, assignment, operand_layouts, result_layout, after)
        _, assignment, operand_layouts, result_layout, after = best
        return assignment, operand_layouts, result_layout, after, reduced

    def finishing_cost(self, value: str, layout: Layout) -> int:
        """What the result will still cost to deliver, priced now so that deferring it
        is not mistaken for free: exactly, for an output (into its layout, or whole);
        for a partial value, the cheapest way to make it whole (a reduce-scatter into
        some dimension, or an all-reduce); otherwise nothing."""
        vtype = self.values[value].type
        whole = Layout(layout.dims)
        if value in self.output_layouts:
            targets = [self.output_layouts[value] or whole]
        elif layout.partial:
            targets = [whole]
            axes = _axis_order(self.mesh, [axis for axis, _ in layout.partial])
            for dim, size in enumerate(vtype.shape):
                split = whole.dims[dim] + axes
                if size % _product(self.mesh.size(a) for a in split) == 0:
                    targets.append(Layout(whole.dims[:dim] + (split,) + whole.dims[dim + 1:]))
        else:
            return 0
        return min(plan_reshard(layout, target, vtype.shape, vtype.dtype, self.mesh).bytes_per_device
                   for target in targets)

    def describe(self, op: Op, assignment, reduced) -> str:
        words = []
        for axis, role in assignment.items():
            if role is None:
                words.append(f"{axis}: copies")
            elif role == PARTIAL:
                words.append(f"{axis}: stays partial (the op is linear in it)")
            elif role in reduced:
                words.append(f"{axis}: splits {role}, which is reduced, so each device computes a "
                             "partial result")
            else:
                words.append(f"{axis}: splits {role}")
        return "; ".join(words) or "one device"

    # ---- the walk

    def run_ops(self, ops) -> list[Step]:
        steps: list[Step] = []
        for op in ops:
            if isinstance(op, Repeat):
                steps.append(self.repeat(op))
                continue
            decision = self.decide(op)
            for move in decision.moves:
                self.hold(move.value, move.dst)
            self.tensor_names[op.result.name] = op.stmt
            self.available[op.result.name] = [decision.final_layout]
            if decision.constraint is not None:
                self.hold(op.result.name, decision.result_layout)
            steps.append(decision)
        return steps

    def repeat(self, op: Repeat) -> RepeatDecision:
        entry, carried_layouts = [], []
        for carried in op.carried:
            now = self.current(carried.value)
            whole = Layout(now.dims)
            if now.partial:
                move = self.cheapest_move(carried.value, whole, "a loop carries whole values")
                entry.append(move)
            self.available[carried.value] = [whole]
            carried_layouts.append(whole)
        # What the body moves or makes lives only inside it (the lowering drops it after).
        saved = {value: list(layouts) for value, layouts in self.available.items()}
        stacked_layouts = []
        for view in op.stacked:
            full = self.values[view.name].layout
            depth = len(self.values[view.name].stacked_by) - len(view.stacked_by)
            layout = Layout(full.dims[depth:]) if full else Layout.replicated(view.type.rank)
            self.available[view.name] = [layout]
            self.types[view.name] = view.type
            stacked_layouts.append(layout)
        body = self.run_ops(op.body)
        exit_moves = []
        for carried, layout in zip(op.carried, carried_layouts):
            move = self.cheapest_move(carried.body_result, layout, "the next trip reads it")
            if move is not None:
                exit_moves.append(move)
        self.available = saved
        for carried, layout in zip(op.carried, carried_layouts):
            self.available[carried.result.name] = [layout]
            self.tensor_names[carried.result.name] = self.tensor(carried.value)
        return RepeatDecision(op, tuple(entry), tuple(carried_layouts), tuple(stacked_layouts),
                              tuple(body), tuple(exit_moves))

    def run(self) -> PartitionedProgram:
        inputs = []
        for value in self.program.inputs:
            layout = value.layout or Layout.replicated(value.type.rank)
            self.available[value.name] = [layout]
            inputs.append(layout)
        steps = self.run_ops(self.program.ops)
        outputs = []
        for output in self.program.outputs:
            now = self.current(output.value)
            want = output.layout or Layout(now.dims)
            move = self.cheapest_move(output.value, want, f"output {output.name}")
            outputs.append((output, want, move))
        return PartitionedProgram(self.program, tuple(inputs), tuple(steps), tuple(outputs),
                                  tuple(self.limits.values()))


# Candidates priced per op at most: each costs the planning of its reshards, and their
# number is a product over the mesh axes (4^8 for a matmul on 8 axes of size 2).
MAX_CANDIDATES = 1024


def _most_roles(per_axis: list[list], budget: int) -> int:
    """The largest k such that the choices giving a role to at most k axes number at most
    `budget`: elementary symmetric sums of each axis's roles besides None."""
    counts = [1]  # counts[k]: choices with exactly k axes given a role
    for options in per_axis:
        roles = len(options) - 1
        counts = [a + roles * b for a, b in zip(counts + [0], [0] + counts)]
    total = 0
    for k, count in enumerate(counts):
        total += count
        if total > budget:
            return max(k - 1, 0)
    return len(per_axis)


def _with_at_most(per_axis: list[list], most: int):
    """Choices (one option per axis, None first in each) with at most `most` axes not None,
    in the order itertools.product would give them."""
    free = [position for position, options in enumerate(per_axis) if len(options) > 1]

    def extend(depth: int, left: int, choice: list):
        if depth == len(free) or not left:
            yield tuple(choice)
            return
        position = free[depth]
        for option in per_axis[position]:
            if option is None:
                yield from extend(depth + 1, left, choice)
            else:
                choice[position] = option
                yield from extend(depth + 1, left - 1, choice)
                choice[position] = None

    yield from extend(0, most, [None] * len(per_axis))


def _product(values) -> int:
    total = 1
    for value in values:
        total *= value
    return total


def partition(program: Program, policy: str = POLICIES[0]) -> PartitionedProgram:
    """Expand library ops, then choose a strategy for every op of `program`, breaking
    ties by `policy`. `lower.compile_program` walks under every policy and keeps the
    cheapest program."""
    return _Partitioner(expand_library(program), policy).run()


def partitions(program: Program) -> list[PartitionedProgram]:
    """One walk per tie-break policy (library ops expanded once)."""
    expanded = expand_library(program)
    return [_Partitioner(expanded, policy).run() for policy in POLICIES]
