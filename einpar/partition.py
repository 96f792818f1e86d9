"""The partitioner: a layout for every value and a strategy for every op, chosen together.

Each op's strategies (strategies.py: one role per mesh axis) are priced by
an objective (objective.py: time on a cluster by default, or bytes), and the
strategies of all ops are chosen at once by an integer program (solve.py):
a value moved into a layout is paid once for every consumer that reads it
there, a partial sum is carried through linear ops when that is cheaper, and
an early choice is priced by what it forces later. Layouts the user wrote
are constraints: a statement's layout (with `{sum: tp}` pins and `{}`) and
an output's.

How the search scales with the mesh (docs/compile.md):

- axes of size 1 have one role (copies) and cost nothing;
- while the level's ops have at most JOINT_LIMIT strategies in all (each a
  product over the axes), it is solved over all of them at once: the optimum;
- beyond, the search goes axis by axis: each axis's roles are chosen for the
  whole program with the other axes' held, sweeping the axes until the price
  stops falling (at most MAX_SWEEPS). Each sweep is an integer program with a
  few choices per op, so the work grows linearly with the number of axes;
  the plan is optimal along each axis, not necessarily jointly (W104).

A `repeat` body is solved once per layout its carried values may cross the
loop in (its last statement's pin, the layout it enters in, or whole), its
price counted once per trip.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Union

from .errors import Diagnostic, EinparError
from .expand import expand_library
from .ir import Library, Map, Op, Output, Program, Reduce, Repeat, Route, TensorType, Value
from .layout import Layout, Mesh, format_dims, local_bytes
from .objective import Objective, make_objective
from .reshard import ReshardPlan, plan_reshard
from .solve import Choice, Evaluation, Infeasible, Problem, evaluate, solve
from .strategies import PARTIAL, Partial, Strategy, axis_roles, build, describe, op_indices, short, strip

__all__ = ["PARTIAL", "Move", "Decision", "RepeatDecision", "PartitionedProgram", "partition"]

# The exact search takes every op's strategies over all axes while the program has at most
# this many in all (a matmul on 2 axes has 5^2 = 25); beyond, it goes axis by axis. HiGHS
# solves 300 choices in tens of milliseconds; the 553 of the attention example take 1.2 s.
JOINT_LIMIT = 100
MAX_SWEEPS = 4
# An op with more strategies than this over all axes (6^5 for a matmul on 5 axes) could never
# be searched jointly: `compile` says the plan is optimal only axis by axis (W104). Below it
# the axis-by-axis search is used for speed; on every example and every program of
# tests/partition_programs it finds the joint optimum (tests/test_partition.py).
WARN_STRATEGIES = 4096


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
class Alternative:
    """The best strategy not taken for an op, and what the program would cost with it."""

    rule: str
    extra: float  # price of the program with it, minus the plan's (>= 0)


@dataclass(frozen=True)
class Decision:
    op: Op
    assignment: tuple[tuple[str, str | None], ...]  # mesh axis -> index, PARTIAL or None
    moves: tuple[Move, ...]  # operands moved into the layouts the strategy needs
    operand_layouts: tuple[Layout, ...]
    result_layout: Layout  # as the op computes it
    constraint: Move | None  # the result moved into the layout the program asks for
    rule: str  # the strategy in words
    price: float = 0.0  # its local work, its pin's move and the moves it is first to need
    alternative: Alternative | None = None

    @property
    def final_layout(self) -> Layout:
        return self.constraint.dst if self.constraint else self.result_layout


@dataclass(frozen=True)
class RepeatDecision:
    op: Repeat
    entry: tuple[Move, ...]  # carried values (and outer values the body reads) moved before the loop
    carried_layouts: tuple[Layout, ...]
    stacked_layouts: tuple[Layout, ...]
    body: tuple["Step", ...]
    exit: tuple[Move, ...]  # each trip's results moved back to the carried layouts
    price: float = 0.0  # all trips
    alternative: Alternative | None = None


Step = Union[Decision, RepeatDecision]


@dataclass(frozen=True)
class SearchLimit:
    """The program was searched axis by axis (its ops have too many strategies over all
    axes at once), so the plan is optimal along each axis but a better joint one may
    exist. `compile` says so (W104)."""

    value: Value  # the op with the most strategies, where the warning points
    strategies: int  # how many it has over all axes
    axes: int  # mesh axes of size > 1


@dataclass(frozen=True)
class PartitionedProgram:
    program: Program  # with library ops expanded
    inputs: tuple[Layout, ...]  # the layout of each input, as declared
    steps: tuple[Step, ...]
    outputs: tuple[tuple[Output, Layout, Move | None], ...]  # output, final layout, last move
    limits: tuple[SearchLimit, ...] = ()
    objective: str = "time"  # what was minimized (objective.OBJECTIVES)
    objective_text: str = ""  # in words, e.g. "time on h100x8"
    price: float = 0.0  # the plan's price under it (ns or bytes)


# ---- one level of ops (the program, or a repeat body)


@dataclass
class _Plan:
    """A level's solution: one pick per node, the price of the level."""

    picks: list[int]
    price: float
    nodes: list  # per node: the list of (label, Choice) it chose among
    alternatives: list  # per node: its best rejected choice (Alternative) or None


class _Level:
    """The ops of one level as a Problem; `fixed` holds the values defined outside it."""

    def __init__(self, part: "_Partitioner", ops: tuple[Op, ...], fixed: dict[str, Layout],
                 required: dict[str, Layout | None], types: dict[str, TensorType] | None = None):
        self.part, self.ops = part, ops
        self.types = types or {}  # per-trip types of stacked params (a name means a slice here)
        self.fixed = fixed  # value -> its (actual) layout
        self.required = required  # value -> the layout asked for at the end (None: whole)

    def problem(self, nodes: list) -> Problem:
        part = self.part
        required = []
        finals = {value: layout for value, layout in self.fixed.items()}
        for value, want in self.required.items():
            if want is not None:
                required.append((value, part.key(want)))
        limit = part.memory_limit if self is part.top else None
        return Problem([[choice for _, choice in node] for node in nodes],
                       {v: part.key(layout) for v, layout in finals.items()},
                       part.move_price, tuple(required), limit, part.layout_bytes)

    def node_choices(self, op, roles_list) -> list:
        return self.part.op_choices(op, roles_list, self.required.get(op.result.name, "-"),
                                    op.result.name in self.required)


class _Partitioner:
    def __init__(self, program: Program, objective: Objective, memory_limit: float | None = None):
        self.program = program
        self.objective = objective
        # Bytes per device the program's values may take besides its inputs (None: no limit):
        # a bound on the sum of every value made and copy moved at the top level.
        self.memory_limit = memory_limit
        self.mesh: Mesh = program.mesh
        self.sizes = program.dim_sizes
        self.values = program.values
        self.types: dict[str, TensorType] = {}  # per-trip types of stacked params
        self.limits: dict[str, SearchLimit] = {}
        self.axes = [axis for axis, size in self.mesh.axes if size > 1]
        self._strategies: dict = {}
        self._choices: dict = {}
        self._bodies: dict = {}
        self._solved: dict = {}  # a part's signature -> its first ops and their plan
        self.top: _Level | None = None

    # ---- prices

    def vtype(self, value: str) -> TensorType:
        return self.types.get(value) or self.values[value].type

    def key(self, layout: Layout) -> Layout:
        return strip(layout, self.mesh)

    def layout_bytes(self, value: str, layout: Layout) -> int:
        vtype = self.vtype(value)
        return local_bytes(layout, vtype.shape, vtype.dtype, self.mesh)

    def move_price(self, value: str, src: Layout, dst: Layout) -> float | None:
        if src == dst:
            return 0.0
        vtype = self.vtype(value)
        return self.objective.move(src, dst, vtype.shape, vtype.dtype)

    def strategy(self, op: Op, roles: tuple) -> Strategy | None:
        key = (id(op), roles)
        if key not in self._strategies:
            self._strategies[key] = build(op, self.mesh, self.sizes, roles)
        return self._strategies[key]

    def op_choices(self, op: Op, roles_list, output, is_output: bool) -> list:
        """(roles, Choice) for each valid strategy of `op` among `roles_list`: its price is its
        local work, plus the move into its pinned layout, plus, for an output asked for in
        no layout, the move that makes it whole."""
        choices = []
        constraint = self.pin(op)
        vtype = self.vtype(op.result.name)
        operand_types = [self.vtype(o.value) for o in op.operands]
        for roles in roles_list:
            strategy = self.strategy(op, roles)
            if strategy is None:
                continue
            cached = self._choices.get((id(op), roles))
            if cached is None:
                price = self.objective.compute(op, dict(strategy.local_sizes), strategy.flops,
                                               strategy.operand_layouts, strategy.result_layout,
                                               operand_types)
                final = self.key(strategy.result_layout)
                if constraint is not None and self.key(constraint) != final:
                    extra = self.move_price(op.result.name, final, self.key(constraint))
                    if extra is None:
                        self._choices[(id(op), roles)] = False
                        continue
                    price += extra
                    final = self.key(constraint)
                if is_output and output is None and final.partial:
                    price += self.move_price(op.result.name, final, Layout(final.dims))
                needs = tuple((o.value, self.key(layout))
                              for o, layout in zip(op.operands, strategy.operand_layouts))
                memory = local_bytes(final, vtype.shape, vtype.dtype, self.mesh)
                cached = Choice(price, needs, ((op.result.name, final),), memory)
                self._choices[(id(op), roles)] = cached
            if cached is not False:
                choices.append((roles, cached))
        return choices

    # ---- the search

    def pin(self, op: Op) -> Layout | None:
        """The layout the program asks of `op`'s result, a partial over an axis of size 1
        dropped (a sum over one device is the value itself)."""
        layout = op.result.layout
        if layout is None or not layout.partial:
            return layout
        return Layout(layout.dims, tuple((axis, kind) for axis, kind in layout.partial
                                         if self.mesh.size(axis) > 1))

    def roles(self, op: Op, axis: str, level: _Level) -> list:
        """The roles of `axis` in `op`, less those keeping partial a value held from outside
        the level that is not partial there (an input, a carried or stacked value never is;
        a value pinned partial by another part of the level is)."""
        def can_stay(role: Partial) -> bool:
            return all(op.operands[k].value not in level.fixed or
                       level.fixed[op.operands[k].value].partial_kind(axis) == role.kind
                       for k in role.positions)
        return [role for role in axis_roles(op, self.mesh, axis)
                if not isinstance(role, Partial) or can_stay(role)]

    def joint_roles(self, op: Op, level: _Level) -> list[tuple]:
        return list(itertools.product(*(self.roles(op, axis, level) for axis in self.mesh.names)))

    def joint_count(self, op: Op, level: _Level) -> int:
        return math.prod(len(self.roles(op, axis, level)) for axis in self.mesh.names)

    def solve_level(self, level: _Level) -> _Plan:
        """The level's plan: exact over all axes while its ops allow, else axis by axis."""
        saved, self.types = self.types, level.types
        try:
            return self._solve_level(level)
        finally:
            self.types = saved

    def _solve_level(self, level: _Level) -> _Plan:
        """Each independent part of the level alone (`parts`), a part alike one solved
        before (the same layer again) reusing its plan: its choices renamed, not priced
        again."""
        size = len(level.ops)
        picks: list = [None] * size
        nodes: list = [None] * size
        alternatives: list = [None] * size
        # A memory limit binds the whole level: it is solved as one part.
        groups = [list(range(size))] if level is self.top and self.memory_limit is not None \
            else self.parts(level)
        for members in groups:
            ops = tuple(level.ops[i] for i in members)
            part = level if len(members) == size else self.sub_level(level, ops)
            key = self.signature(part)
            if key in self._solved:
                first_ops, plan = self._solved[key]
                names = _renaming(first_ops, ops)
                part_nodes = [[(label, _renamed(choice, names)) for label, choice in node]
                              for node in plan.nodes]
                plan = _Plan(plan.picks, plan.price, part_nodes, plan.alternatives)
            else:
                plan = self.solve_part(part)
                evaluation = Evaluation(part.problem(plan.nodes), plan.picks)
                plan.alternatives = [self.alternative(evaluation, plan, i, op)
                                     for i, op in enumerate(ops)]
                if key is not None:
                    self._solved[key] = (ops, plan)
            for i, node, pick, other in zip(members, plan.nodes, plan.picks, plan.alternatives):
                nodes[i], picks[i], alternatives[i] = node, pick, other
        return _Plan(picks, evaluate(level.problem(nodes), picks), nodes, alternatives)

    def parts(self, level: _Level) -> list[list[int]]:
        """The level's ops in groups whose prices do not depend on each other's choices:
        an op is grouped with the readers of what it makes unless that is pinned (made in
        its pinned layout whatever the strategy), and the readers of one value with each
        other (a move into a layout they share is paid once)."""
        parent = list(range(len(level.ops)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def union(i: int, j: int) -> None:
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)

        maker: dict[str, int] = {}
        readers: dict[str, list[int]] = {}
        for i, op in enumerate(level.ops):
            if isinstance(op, Repeat):
                for carried in op.carried:
                    maker[carried.result.name] = i
                read = [c.value for c in op.carried] + _read(op.body)
            else:
                if op.result.layout is None:
                    maker[op.result.name] = i
                read = [o.value for o in op.operands]
            for value in dict.fromkeys(read):
                readers.setdefault(value, []).append(i)
        for value, ops in readers.items():
            for i in ops[1:]:
                union(ops[0], i)
            if value in maker:
                union(maker[value], ops[0])
        groups: dict[int, list[int]] = {}
        for i in range(len(level.ops)):
            groups.setdefault(find(i), []).append(i)
        return list(groups.values())

    def sub_level(self, level: _Level, ops: tuple) -> _Level:
        """A part of `level` as a level of its own: what other parts make reaches it pinned."""
        made = {op.result.name for op in ops if not isinstance(op, Repeat)} | \
            {c.result.name for op in ops if isinstance(op, Repeat) for c in op.carried}
        fixed = dict(level.fixed)
        for op in level.ops:
            if not isinstance(op, Repeat) and op.result.name not in made and op.result.layout:
                fixed[op.result.name] = self.pin(op)
        required = {value: layout for value, layout in level.required.items() if value in made}
        return _Level(self, ops, fixed, required, level.types)

    def signature(self, level: _Level):
        """What a part's plan depends on, with its values renamed by first appearance, so two
        layers alike (names aside) share one; None for a part with a `repeat`."""
        names: dict[str, int] = {}
        outside: dict[str, int] = {}  # values from outside the part, by first reading
        parts = []
        for op in level.ops:
            if isinstance(op, Repeat):
                return None
            operands = []
            for o in op.operands:
                vtype = self.vtype(o.value)
                if o.value in names:
                    operands.append((names[o.value], o.indices))
                else:
                    which = outside.setdefault(o.value, len(outside))
                    operands.append(("outside", which, vtype.shape, vtype.dtype, o.indices,
                                     level.fixed.get(o.value)))
            names[op.result.name] = len(names)
            output = ("output", level.required[op.result.name]) \
                if op.result.name in level.required else None
            parts.append((type(op), _detail(op), tuple(operands), op.result.type,
                          self.pin(op), output))
        return tuple(parts)

    def solve_part(self, level: _Level) -> _Plan:
        ops = [op for op in level.ops if not isinstance(op, Repeat)]
        counts = [(self.joint_count(op, level), op) for op in ops]
        most = max(counts, key=lambda pair: pair[0], default=(1, None))
        if sum(count for count, _ in counts) <= JOINT_LIMIT:
            nodes = [self.repeat_choices(op, level) if isinstance(op, Repeat)
                     else level.node_choices(op, self.joint_roles(op, level)) for op in level.ops]
            return self.solve_nodes(level, nodes, level.ops)
        if most[0] > WARN_STRATEGIES:
            self.limits.setdefault("program", SearchLimit(most[1].result, most[0], len(self.axes)))
        return self.axis_by_axis(level)

    def solve_nodes(self, level: _Level, nodes: list, ops) -> _Plan:
        for op, node in zip(ops, nodes):
            if not node:
                self.no_strategy(op)
        problem = level.problem(nodes)
        try:
            picks = solve(problem)
        except Infeasible:
            self.infeasible(ops, nodes)
        return _Plan(picks, evaluate(problem, picks), nodes, [None] * len(nodes))

    def axis_by_axis(self, level: _Level) -> _Plan:
        """Choose one axis's roles at a time for the whole level, the others held; an axis is
        solved again only after another axis changed the plan, until none can lower its price
        (at most MAX_SWEEPS solves per axis)."""
        base = {id(op): self.initial_roles(op, level) for op in level.ops
                if not isinstance(op, Repeat)}
        repeats = {id(op): self.repeat_choices(op, level) for op in level.ops if isinstance(op, Repeat)}
        axes = [position for position, (_, size) in enumerate(self.mesh.axes) if size > 1]
        dirty = set(axes)
        plan, solves = None, 0
        while dirty and solves < MAX_SWEEPS * len(axes):
            position = next(p for p in axes if p in dirty)  # mesh order, deterministic
            axis = self.mesh.names[position]
            nodes = []
            for op in level.ops:
                if isinstance(op, Repeat):
                    nodes.append(repeats[id(op)])
                    continue
                current = base[id(op)]
                options = [current] + [current[:position] + (role,) + current[position + 1:]
                                       for role in self.roles(op, axis, level)
                                       if role != current[position]]
                nodes.append(level.node_choices(op, options))
            found = self.solve_nodes(level, nodes, level.ops)
            solves += 1
            dirty.discard(position)
            # A plan no cheaper than the one held is not taken (no change, no cycling on ties).
            if plan is None or found.price < plan.price * (1 - 1e-9):
                if plan is not None:
                    dirty |= set(axes) - {position}
                plan = found
                for op, node, pick in zip(level.ops, nodes, found.picks):
                    if not isinstance(op, Repeat):
                        base[id(op)] = node[pick][0]
            elif plan is not None and not dirty:
                break
        # The plan over every strategy one axis away from each op's (the best rejected
        # alternative of an op is among them, whichever axis was solved last).
        nodes, picks = [], []
        for op, pick in zip(level.ops, plan.picks if plan else [0] * len(level.ops)):
            if isinstance(op, Repeat):
                nodes.append(repeats[id(op)])
                picks.append(pick)
                continue
            current = base[id(op)]
            options = [current] + [current[:position] + (role,) + current[position + 1:]
                                   for position in axes
                                   for role in self.roles(op, self.mesh.names[position], level)
                                   if role != current[position]]
            nodes.append(level.node_choices(op, list(dict.fromkeys(options))))
            picks.append(0)
        return _Plan(picks, evaluate(level.problem(nodes), picks), nodes, [None] * len(nodes))

    def initial_roles(self, op: Op, level: _Level) -> tuple:
        """Copies on every axis, except what the op's pinned layout implies (so each
        axis's step starts from a plan that meets the pin)."""
        constraint = self.pin(op)
        roles: list = [None] * len(self.mesh.names)
        if constraint is None:
            return tuple(roles)
        _, reduced, _ = op_indices(op)
        for position, axis in enumerate(self.mesh.names):
            if self.mesh.size(axis) == 1:
                continue
            dim = constraint.dim_of(axis)
            kind = constraint.partial_kind(axis)
            allowed = self.roles(op, axis, level)
            if dim is not None:
                index = op.result.type.indices[dim]
                roles[position] = index if index in allowed else None
            elif kind is not None:
                options = [role for role in allowed
                           if (role in reduced) or (isinstance(role, Partial) and role.kind == kind)]
                roles[position] = options[0] if options else None
        if self.strategy(op, tuple(roles)) is None:
            return (None,) * len(self.mesh.names)
        return tuple(roles)

    # ---- repeat

    def repeat_choices(self, op: Repeat, level: _Level) -> list:
        """One choice per layout the carried values may cross the loop in, each priced by
        solving the body once (all trips)."""
        choices = []
        for layouts in self.carried_candidates(op, level):
            body = self.body_plan(op, layouts, level)
            if body is None:
                continue
            plan, outer, _ = body
            needs = tuple((c.value, self.key(layout)) for c, layout in zip(op.carried, layouts)) + \
                tuple((value, self.key(layout)) for value, layout in outer.items())
            makes = tuple((c.result.name, self.key(layout)) for c, layout in zip(op.carried, layouts))
            choices.append((layouts, Choice(plan.price * op.count, needs, makes)))
        if not choices:
            self.no_strategy(op)
        return choices

    def carried_candidates(self, op: Repeat, level: _Level) -> list[tuple[Layout, ...]]:
        """The layouts a loop's carried values may have: the pin of the body's last
        statement for it, else the layout it enters in if that is fixed (an input), made
        whole; and all whole."""
        body_pins = {inner.result.name: inner.result.layout for inner in op.body
                     if not isinstance(inner, Repeat)}
        preferred = []
        for carried in op.carried:
            rank = self.vtype(carried.value).rank
            pin = body_pins.get(carried.body_result)
            if pin is not None:
                preferred.append(Layout(pin.dims))
            elif carried.value in level.fixed:
                preferred.append(Layout(level.fixed[carried.value].dims))
            else:
                preferred.append(Layout.replicated(rank))
        whole = tuple(Layout.replicated(self.vtype(c.value).rank) for c in op.carried)
        return list(dict.fromkeys([tuple(preferred), whole]))

    def body_plan(self, op: Repeat, layouts: tuple[Layout, ...], parent: _Level):
        """(the body's plan, outer values it reads and the layout it reads them in), or None
        where the body cannot run with these carried layouts."""
        key = (id(op), layouts)
        if key in self._bodies:
            return self._bodies[key]
        fixed: dict[str, Layout] = {}
        types = dict(self.types)
        for carried, layout in zip(op.carried, layouts):
            fixed[carried.value] = layout
        for view in op.stacked:
            full = self.values[view.name].layout
            depth = len(self.values[view.name].stacked_by) - len(view.stacked_by)
            fixed[view.name] = Layout(full.dims[depth:]) if full else Layout.replicated(view.type.rank)
            types[view.name] = view.type
        outer: dict[str, Layout] = {}
        defined = _defined(op.body)
        for value in _read(op.body):
            if value in fixed or value in defined:
                continue
            source = self.values[value]
            # An input is read where it lives; a value made outside the loop is read whole.
            # (An outer block's param is its trip's slice, as the enclosing level holds it.)
            if source.kind == "def":
                layout = Layout.replicated(source.type.rank)
            elif value in parent.fixed:
                layout = parent.fixed[value]
            else:
                layout = source.layout or Layout.replicated(source.type.rank)
            fixed[value] = layout
            if source.kind == "def":
                outer[value] = layout
        required = {c.body_result: layout for c, layout in zip(op.carried, layouts)}
        level = _Level(self, op.body, fixed, required, types)
        try:
            plan = self.solve_level(level)
        except EinparError:
            if all(layout.is_replicated for layout in layouts):
                raise
            self._bodies[key] = None
            return None
        self._bodies[key] = (plan, outer, level)
        return self._bodies[key]

    # ---- diagnostics

    def no_strategy(self, op) -> None:
        where = op.result if not isinstance(op, Repeat) else None
        pin = getattr(op, "stmt", "") + format_dims(where.type.indices, where.layout) \
            if where is not None else "the loop"
        raise EinparError(Diagnostic(
            "E240", f"no strategy of '{getattr(op, 'stmt', 'repeat')}' makes it in the layout it is "
                    f"asked for ({pin})",
            where.span if where is not None else op.span,
            hint="a partial pin needs an op that can leave its result partial over that axis "
                 "(a contraction over a split index, or a sum of partial values)"))

    def infeasible(self, ops, nodes) -> None:
        for op in ops:
            if not isinstance(op, Repeat) and op.result.layout is not None and self.pin(op).partial:
                self.no_strategy(op)
        op = next(op for op in ops if not isinstance(op, Repeat))
        raise EinparError(Diagnostic(
            "E240", "no plan meets every layout the program asks for", op.span,
            hint="a partial pin must be made by its statement and read by ops linear in it"))

    # ---- the plan as steps

    def materialize(self, level: _Level, plan: _Plan, tensors: dict[str, str],
                    held: dict[str, Layout]) -> list[Step]:
        """The level's Decisions in program order; `held` maps values to their actual
        layouts (updated), `tensors` to the program's names for them."""
        saved, self.types = self.types, level.types
        try:
            return self._materialize(level, plan, tensors, held)
        finally:
            self.types = saved

    def _materialize(self, level: _Level, plan: _Plan, tensors: dict[str, str],
                     held: dict[str, Layout]) -> list[Step]:
        steps: list[Step] = []
        first_need: set = set()
        for index, (op, node, pick) in enumerate(zip(level.ops, plan.nodes, plan.picks)):
            label, choice = node[pick]
            alternative = plan.alternatives[index]
            if isinstance(op, Repeat):
                steps.append(self.materialize_repeat(op, label, choice, tensors, held, alternative,
                                                     level))
                continue
            strategy = self.strategy(op, label)
            operand_layouts, moves, price = [], [], choice.price
            for operand, layout in zip(op.operands, strategy.operand_layouts):
                now = held[operand.value]
                if self.key(now) == self.key(layout):
                    operand_layouts.append(now)
                    continue
                want = self.key(layout)
                operand_layouts.append(want)
                if (operand.value, want) in first_need:
                    continue  # moved for an earlier op, and reused
                first_need.add((operand.value, want))
                price += self.move_price(operand.value, self.key(now), want)
                moves.append(Move(operand.value, tensors[operand.value],
                                  self.plan(operand.value, now, want),
                                  f"{op.stmt} reads {tensors[operand.value]}"))
            result = strategy.result_layout
            constraint = self.pin(op)
            after = None
            if constraint is not None:
                if self.key(constraint) == self.key(result):
                    result = constraint
                else:
                    after = Move(op.result.name, op.stmt, self.plan(op.result.name, result, constraint),
                                 f"{op.stmt} is asked for in this layout")
            tensors[op.result.name] = op.stmt
            decision = Decision(op, strategy.assignment(self.mesh), tuple(moves),
                                tuple(operand_layouts), result, after,
                                describe(op, label, self.mesh), price, alternative)
            held[op.result.name] = decision.final_layout
            steps.append(decision)
        return steps

    def plan(self, value: str, src: Layout, dst: Layout) -> ReshardPlan:
        vtype = self.vtype(value)
        return plan_reshard(src, dst, vtype.shape, vtype.dtype, self.mesh)

    def materialize_repeat(self, op: Repeat, layouts, choice, tensors, held, alternative,
                           parent: _Level) -> RepeatDecision:
        plan, outer, level = self.body_plan(op, layouts, parent)
        entry = []
        for value, layout in [(c.value, lay) for c, lay in zip(op.carried, layouts)] + list(outer.items()):
            if held[value] != layout:
                entry.append(Move(value, tensors[value], self.plan(value, held[value], layout),
                                  "a loop carries it in this layout" if value not in outer else
                                  "the loop reads it whole"))
        inside = dict(held)
        inside.update(level.fixed)
        inside_tensors = dict(tensors)
        for view in op.stacked:
            inside_tensors[view.name] = view.name
        for carried in op.carried:
            inside_tensors[carried.value] = tensors[carried.value]
        body = self.materialize(level, plan, inside_tensors, inside)
        exit_moves = []
        for carried, layout in zip(op.carried, layouts):
            now = inside[carried.body_result]
            if now != layout:
                exit_moves.append(Move(carried.body_result, inside_tensors[carried.body_result],
                                       self.plan(carried.body_result, now, layout),
                                       "the next trip reads it"))
        for carried, layout in zip(op.carried, layouts):
            held[carried.result.name] = layout
            tensors[carried.result.name] = tensors[carried.value]
        stacked = tuple(level.fixed[view.name] for view in op.stacked)
        return RepeatDecision(op, tuple(entry), tuple(layouts), stacked, tuple(body),
                              tuple(exit_moves), choice.price, alternative)

    def alternative(self, evaluation: Evaluation, plan: _Plan, index: int, op) -> Alternative | None:
        """The cheapest other choice of node `index`, the rest of the plan held."""
        node = plan.nodes[index]
        best = None
        for other in range(len(node)):
            if other != plan.picks[index]:
                price = evaluation.swapped(index, other)
                if best is None or price < best[0]:
                    best = (price, other)
        if best is None or math.isinf(best[0]):
            return None
        label = node[best[1]][0]
        rule = short(op, label, self.mesh) if not isinstance(op, Repeat) else \
            "carried " + ", ".join(str(layout) for layout in label)
        extra = best[0] - evaluation.price
        # Rounding aside, no alternative is cheaper than the plan (a negative one would show).
        return Alternative(rule, 0.0 if abs(extra) <= 1e-9 * max(1.0, abs(evaluation.price))
                           else extra)

    # ---- the program

    def run(self) -> PartitionedProgram:
        program = self.program
        fixed = {value.name: value.layout or Layout.replicated(value.type.rank)
                 for value in program.inputs}
        required = {output.value: output.layout for output in program.outputs}
        level = _Level(self, program.ops, fixed, required)
        self.top = level
        plan = self.solve_level(level)
        held = dict(fixed)
        tensors = {value.name: value.name for value in program.inputs}
        steps = self.materialize(level, plan, tensors, held)
        outputs = []
        for output in program.outputs:
            now = held[output.value]
            want = output.layout or Layout(now.dims)
            move = None if now == want else Move(output.value, tensors[output.value],
                                                 self.plan(output.value, now, want),
                                                 f"output {output.name}")
            outputs.append((output, want, move))
        return PartitionedProgram(program, tuple(fixed[v.name] for v in program.inputs), tuple(steps),
                                  tuple(outputs), tuple(self.limits.values()), self.objective.name,
                                  self.objective.describe(), plan.price)


def _renaming(first: tuple, alike: tuple) -> dict[str, str]:
    """Value names of a part to those of a part alike (the same ops in the same order)."""
    names: dict[str, str] = {}
    for a, b in zip(first, alike):
        names[a.result.name] = b.result.name
        for x, y in zip(a.operands, b.operands):
            names[x.value] = y.value
    return names


def _renamed(choice: Choice, names: dict[str, str]) -> Choice:
    return Choice(choice.price, tuple((names[v], layout) for v, layout in choice.needs),
                  tuple((names[v], layout) for v, layout in choice.makes), choice.memory)


def _detail(op: Op):
    """An op's parameters besides its operands and result."""
    if isinstance(op, Map):
        return op.expr
    if isinstance(op, Reduce):
        return (op.kind, op.over)
    if isinstance(op, Library):
        return (op.kind, op.index)
    if isinstance(op, Route):
        return (op.expert, op.capacity, op.k)
    return None


def _defined(ops) -> set[str]:
    names: set[str] = set()
    for op in ops:
        if isinstance(op, Repeat):
            names |= _defined(op.body)
            names |= {c.result.name for c in op.carried}
            names |= {view.name for view in op.stacked}
        else:
            names.add(op.result.name)
    return names


def _read(ops) -> list[str]:
    """Values the ops read (nested bodies included), in order of first reading."""
    seen: dict[str, None] = {}
    for op in ops:
        if isinstance(op, Repeat):
            for carried in op.carried:
                seen.setdefault(carried.value)
            seen.update(dict.fromkeys(_read(op.body)))
        else:
            for operand in op.operands:
                seen.setdefault(operand.value)
    return list(seen)


def joint_problem(program: Program, objective: Objective) -> Problem:
    """The integer program over every strategy of every op of `program` (library ops expanded,
    no `repeat`), as the exact search poses it: for checking a plan against an exhaustive
    search of the same prices."""
    expanded = expand_library(program)
    part = _Partitioner(expanded, objective)
    assert not any(isinstance(op, Repeat) for op in expanded.ops)
    level = _Level(part, expanded.ops,
                   {v.name: v.layout or Layout.replicated(v.type.rank) for v in expanded.inputs},
                   {output.value: output.layout for output in expanded.outputs})
    nodes = [level.node_choices(op, part.joint_roles(op, level)) for op in expanded.ops]
    return level.problem(nodes)


def partition(program: Program, objective: Objective | None = None,
              memory_limit: float | None = None) -> PartitionedProgram:
    """Expand library ops, then choose every op's strategy for the whole program, minimizing
    `objective` (default: time on objective.default_cluster of the program's mesh); with
    `memory_limit`, among plans whose values and moved copies take at most that many bytes
    per device (EinparError if none does)."""
    expanded = expand_library(program)
    return _Partitioner(expanded, objective or make_objective(expanded), memory_limit).run()
