"""How the partitioner searches one level of a program (the program, or a repeat body).

A level is split into parts whose prices do not depend on each other's
choices (a pinned value is made in its pinned layout whatever its op does,
so it cuts the program there); parts alike (the same layer again, names
aside) are solved once. Each part is an integer program over its ops'
strategies (solve.py), solved exactly:

- axes of size 1 have one role (copies) and cost nothing;
- while the part's ops have at most JOINT_LIMIT strategies in all (each a
  product over the axes), it is solved over all of them at once: the optimum;
- beyond, axis by axis: each axis's roles are chosen for the whole part with
  the other axes' held, an axis solved again only after another changed the
  plan, until none lowers its price (at most MAX_SWEEPS solves per axis); a
  second solve of an axis frees only the ops near those whose roles changed.
  The axes the layouts asked for name most are solved first (axis_order).
  Each step has a few choices per op, so the work grows with the number of
  axes, not exponentially; the plan is optimal along each axis, not proven
  jointly (W104 where an op has more than WARN_STRATEGIES strategies).

A `repeat` is one choice among the layouts its carried values may cross the
loop in (its last statement's pin, the layout it enters in, or whole) and
the layouts its stacked views of values made before it are sliced in (the
layouts their maker may make them in, or whole), each priced by solving the
body once, times the trips. Whole is tried only where the body cannot run in
the pins or the layouts the views are made in: it is cheaper only where one
move of a whole stack before the loop beats a move per trip (tiny,
latency-bound sizes, at the price of the gathered stack's memory), and each
candidate is a solve of the body. A value the loop saves from every trip leaves it
in the layout the body holds it in at the end of a trip (whole where it is a
partial sum) or in the layout asked of its stack (a choice too), the repeat
dim unsplit in front.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Diagnostic, EinparError
from .ir import Library, Map, Op, Reduce, Repeat, Route, ScatterAdd, Take, TensorType, Value
from .layout import Layout, format_dims
from .solve import Choice, Evaluation, Infeasible, Problem, evaluate, solve
from .search_repeat import RepeatSearch, _read, _repeat_results
from .strategies import Partial, op_indices

# A part is searched over all axes at once while its ops have at most this many strategies
# in all (a matmul on 2 axes has up to 6^2 = 36); beyond, axis by axis. Over all axes an op
# has tens of strategies, the dynamic program's tables outgrow it and the integer program
# takes seconds (43 s for the transformer block, which compiles in 0.13 s axis by axis).
JOINT_LIMIT = 100
MAX_SWEEPS = 4
# An axis solved again frees the ops within this many values of an op whose roles on another
# axis changed since (axis_by_axis); the others keep their roles on it. One finds the same
# plans as two on every example and partition program, with re-solves half as large.
RESOLVE_RADIUS = 1
# An op with more strategies than this over all axes (6^5 for a matmul on 5 axes) could never
# be searched jointly: `compile` says the plan is optimal only axis by axis (W104). Below it
# the axis-by-axis search is used for speed; on every example and every program of
# tests/partition_programs it finds the joint optimum (tests/test_partition.py).
WARN_STRATEGIES = 4096
# The suffix of the name under which a param read in the backward pass is priced (`w@fresh`,
# no user name has an `@`): the forward pass's moved copies are freed by then (lower.py), so
# such a read pays its own move from the param's layout (partition.read_name).
FRESH = "@fresh"


@dataclass(frozen=True)
class SearchLimit:
    """The program was searched axis by axis (its ops have too many strategies over all
    axes at once), so the plan is optimal along each axis but a better joint one may
    exist. `compile` says so (W104)."""

    value: Value  # the op with the most strategies, where the warning points
    strategies: int  # how many it has over all axes
    axes: int  # mesh axes of size > 1


# ---- one level of ops (the program, or a repeat body)


@dataclass
class _Plan:
    """A level's solution: one pick per node, the price of the level."""

    picks: list[int]
    price: float
    nodes: list  # per node: the list of (label, Choice) it chose among
    alternatives: list  # per node: its best rejected choice (Alternative) or None


class _Level:
    """The ops of one level as a Problem; `fixed` holds the values defined outside it, `part`
    is the partitioner that prices them."""

    def __init__(self, part, ops: tuple[Op, ...], fixed: dict[str, Layout],
                 required: dict[str, Layout | None], types: dict[str, TensorType] | None = None):
        self.part, self.ops = part, ops
        self.types = types or {}  # per-trip types of stacked params (a name means a slice here)
        self.fixed = fixed  # value -> its (actual) layout
        self.required = required  # value -> the layout asked for at the end (None: whole)
        self._first_readers: dict[str, Op] | None = None  # value -> first_reader, when asked

    def problem(self, nodes: list) -> Problem:
        part = self.part
        required = []
        finals = dict(self.fixed)
        if part.fresh_readers:  # a param read afresh starts from the param's own layout
            finals.update((value + FRESH, layout) for value, layout in self.fixed.items()
                          if part.values[value].kind == "param")
        for value, want in self.required.items():
            if want is not None:
                required.append((value, part.key(want)))
        limit = part.memory_limit if self is part.top else None
        return Problem([[choice for _, choice in node] for node in nodes],
                       {v: part.key(layout) for v, layout in finals.items()},
                       part.move_price, tuple(required), limit, part.layout_bytes,
                       tables=part._tables, value_type=part.vtype)

    def first_reader(self, value: str) -> Op | None:
        """The first op of the level (not a loop) that reads `value`."""
        if self._first_readers is None:
            self._first_readers = {}
            for op in self.ops:
                if not isinstance(op, Repeat):
                    for operand in op.operands:
                        self._first_readers.setdefault(operand.value, op)
        return self._first_readers.get(value)

    def node_choices(self, op, roles_list) -> list:
        return self.part.op_choices(op, roles_list, self.required.get(op.result.name, "-"),
                                    op.result.name in self.required)


class _AxisByAxis:
    """The search of a level with too many strategies over all axes at once: one mesh axis
    at a time (the one the program's layouts name most first), the others' roles held, until
    no axis can lower the price (SearchLimit tells the user)."""

    def axis_by_axis(self, level: _Level) -> _Plan:
        """Choose one axis's roles at a time for the whole level, the others held; an axis is
        solved again only after another axis changed the plan, until none can lower its price
        (at most MAX_SWEEPS solves per axis). An axis solved again may change only the ops
        near those whose roles on other axes changed since its last solve (within
        RESOLVE_RADIUS values): elsewhere its last choice still stands against the same
        prices, and a re-solve of a few ops is a small integer program."""
        base = {id(op): self.start_roles(op, level) for op in level.ops
                if not isinstance(op, Repeat)}
        repeats = {id(op): self.repeat_choices(op, level) for op in level.ops if isinstance(op, Repeat)}
        axes = [position for position, (_, size) in enumerate(self.mesh.axes) if size > 1]
        axes = self.axis_order(level, axes)
        near = _Neighbourhoods(level.ops)
        changed: dict[int, set[int] | None] = {position: None for position in axes}  # None: all
        dirty = set(axes)
        deferred: set[int] = set()  # axes with no plan against the start (see below)
        plan, solves = None, 0
        while dirty and solves < MAX_SWEEPS * len(axes):
            # In axis_order, deterministic.
            position = next(p for p in axes if p in dirty and p not in deferred)
            axis = self.mesh.names[position]
            free = None if changed[position] is None else near.within(changed[position], RESOLVE_RADIUS)
            nodes = []
            for i, op in enumerate(level.ops):
                if isinstance(op, Repeat):
                    nodes.append(repeats[id(op)])
                    continue
                current = base[id(op)]
                options = [current]
                if free is None or i in free:
                    options += [current[:position] + (role,) + current[position + 1:]
                                for role in self.roles(op, axis, level) if role != current[position]]
                nodes.append(level.node_choices(op, options))
            try:
                found = self.solve_nodes(level, nodes, level.ops)
            except EinparError:
                # Before any plan, an axis may have none against the others' start (a value
                # pinned partial over another axis, read while its maker still holds copies
                # there): another axis is solved first, this one after it.
                if plan is None and any(p in dirty and p not in deferred | {position} for p in axes):
                    deferred.add(position)
                    continue
                raise
            deferred.clear()
            solves += 1
            dirty.discard(position)
            changed[position] = set()
            # A plan no cheaper than the one held is not taken (no change, no cycling on ties).
            if plan is None or found.price < plan.price * (1 - 1e-9):
                moved = set()
                for i, (op, node, pick) in enumerate(zip(level.ops, nodes, found.picks)):
                    if isinstance(op, Repeat):
                        if plan is None or pick != plan.picks[i]:
                            moved.add(i)
                    elif node[pick][0] != base[id(op)]:
                        moved.add(i)
                        base[id(op)] = node[pick][0]
                if plan is not None:
                    for other in axes:
                        if other != position and moved and changed[other] is not None:
                            changed[other] |= moved
                    dirty |= {other for other in axes if other != position and
                              (changed[other] is None or changed[other])}
                plan = found
            elif plan is not None and not dirty:
                break
        for op in level.ops:
            if not isinstance(op, Repeat):
                self._warm[id(op)] = base[id(op)]
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

    def axis_order(self, level: _Level, axes: list[int]) -> list[int]:
        """`axes` (mesh positions), those that more of the layouts asked for (inputs, params,
        pins, outputs) name first; mesh order among equals. Every op starts with copies on
        every axis: an axis few layouts name (data parallelism's, on the batch alone) solved
        first, against copies on the others, barely moves and is solved again once they
        have; the axis most layouts name moves most, and the others are then solved once
        against it."""
        layouts = list(level.fixed.values()) + \
            [layout for layout in level.required.values() if layout] + \
            [self.pin(op) for op in level.ops if not isinstance(op, Repeat) and op.result.layout]
        names = self.mesh.names

        def named(position: int) -> int:
            axis = names[position]
            return sum(1 for layout in layouts
                       if layout.dim_of(axis) is not None or layout.partial_kind(axis) is not None)
        return sorted(axes, key=lambda position: -named(position))

    def start_roles(self, op: Op, level: _Level) -> tuple:
        """Where the axis-by-axis search starts an op: its roles in the last plan found for
        it (a loop body solved again for other carried layouts usually lands close by, so
        each axis is solved once or twice rather than three or four times), each role
        still open to it at this level; else `initial_roles`."""
        initial = self.initial_roles(op, level)
        warm = self._warm.get(id(op))
        if warm is None:
            return initial
        return tuple(role if role == start or role in self.roles(op, axis, level) else start
                     for role, start, axis in zip(warm, initial, self.mesh.names))

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


class Search(RepeatSearch, _AxisByAxis):
    """The search: a part of `partition._Partitioner` (it reads the partitioner's prices,
    choices and roles, and its materializer's `alternative`)."""

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
                # Only the choices taken are renamed (the alternatives come with the plan).
                part_nodes = [[(node[pick][0], _renamed(node[pick][1], names))]
                              for node, pick in zip(plan.nodes, plan.picks)]
                plan = _Plan([0] * len(ops), plan.price, part_nodes, plan.alternatives)
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
                for made in _repeat_results(op):
                    maker[made] = i
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
            {name for op in ops if isinstance(op, Repeat) for name in _repeat_results(op)}
        fixed = dict(level.fixed)
        for op in level.ops:
            if not isinstance(op, Repeat) and op.result.name not in made and op.result.layout:
                fixed[op.result.name] = self.pin(op)
        read = {o.value for op in ops if not isinstance(op, Repeat) for o in op.operands} | \
            {value for op in ops if isinstance(op, Repeat)
             for value in [c.value for c in op.carried] + _read(op.body)}
        # What is asked of a value made here, or of an input read here (a move into its
        # output layout serves this part's reads too).
        required = {value: layout for value, layout in level.required.items()
                    if value in made or value in read}
        return self.level(ops, fixed, required, level.types)

    def level(self, ops: tuple, fixed: dict, required: dict, types=None) -> _Level:
        return _Level(self, ops, fixed, required, types)

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
                                     level.fixed.get(o.value),
                                     level.required.get(o.value, "not asked for")))
            names[op.result.name] = len(names)
            output = ("output", level.required[op.result.name]) \
                if op.result.name in level.required else None
            parts.append((type(op), _detail(op), tuple(operands), op.result.type,
                          self.pin(op), output, id(op) in self.fresh_readers))
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


class _Neighbourhoods:
    """The ops of a level by the values they share (read or make)."""

    def __init__(self, ops):
        touching: dict[str, list[int]] = {}
        self.values: list[list[str]] = []
        for i, op in enumerate(ops):
            if isinstance(op, Repeat):
                values = _repeat_results(op) + [c.value for c in op.carried] + _read(op.body)
            else:
                values = [op.result.name] + [o.value for o in op.operands]
            self.values.append(list(dict.fromkeys(values)))
            for value in self.values[-1]:
                touching.setdefault(value, []).append(i)
        self.touching = touching

    def within(self, start: set[int], radius: int) -> set[int]:
        """The ops at most `radius` shared values away from one of `start`."""
        reached, frontier = set(start), set(start)
        for _ in range(radius):
            frontier = {j for i in frontier for value in self.values[i]
                        for j in self.touching[value]} - reached
            reached |= frontier
        return reached


def _renaming(first: tuple, alike: tuple) -> dict[str, str]:
    """Value names of a part to those of a part alike (the same ops in the same order)."""
    names: dict[str, str] = {}
    for a, b in zip(first, alike):
        names[a.result.name] = b.result.name
        for x, y in zip(a.operands, b.operands):
            names[x.value] = y.value
    return names


def _renamed(choice: Choice, names: dict[str, str]) -> Choice:
    def name(value: str) -> str:  # a fresh read keeps its suffix
        return names[value] if value in names else names[value.removesuffix(FRESH)] + FRESH
    return Choice(choice.price, tuple((name(v), layout) for v, layout in choice.needs),
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
    if isinstance(op, (Take, ScatterAdd)):
        return op.index
    return None
