"""The partitioner: a layout for every value and a strategy for every op, chosen together.

Each op's strategies (strategies.py: one role per mesh axis) are priced by
an objective (objective.py: time on a cluster by default, or bytes), and the
strategies of all ops are chosen at once (search.py, solving the integer
program of solve.py exactly): a value moved into a layout is paid once for
every consumer that reads it there, a partial sum is carried through linear
ops when that is cheaper, and an early choice is priced by what it forces
later. Layouts the user wrote are constraints: a statement's layout (with
`{sum: tp}` pins and `{}`) and an output's. decisions.py turns the solved
plan into the Decisions the lowering reads.

This module holds the prices of one op's strategies, as the search asks for
them, and the entry points.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
from dataclasses import dataclass

from .decisions import Alternative, Decision, Materializer, Move, RepeatDecision, Step
from .expand import expand_library
from .errors import Diagnostic, EinparError
from .ir import Op, Output, Program, Repeat, TensorType, after_backward_start, walk_ops
from .layout import Layout, Mesh, local_bytes
from .objective import Objective, make_objective
from .search import (FRESH, JOINT_LIMIT, MAX_SWEEPS, WARN_STRATEGIES, Search, SearchLimit, _detail,
                     _Level)
from .solve import Choice, Problem
from .strategies import PARTIAL, Partial, Strategy, axis_roles, build, strip

__all__ = ["PARTIAL", "Move", "Alternative", "Decision", "RepeatDecision", "Step", "SearchLimit",
           "PartitionedProgram", "partition", "joint_problem", "JOINT_LIMIT", "MAX_SWEEPS",
           "WARN_STRATEGIES"]


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


class _Partitioner(Search, Materializer):
    """One partitioning: the prices of strategies (here), the search (search.Search) and
    the plan as Decisions (decisions.Materializer)."""

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
        self._axis_roles: dict = {}
        self._choices: dict = {}
        self._forms: dict = {}  # id(op) -> its form (_form)
        self._priced: dict = {}  # (form, roles, whole) -> what _price found
        self._bodies: dict = {}
        self._body_errors: dict = {}  # id(repeat) -> why its body runs with nothing whole
        self._keys: dict = {}  # layout -> the same layout on the mesh's axes of size > 1
        self._tables: dict = {}  # the solver's value tables, kept across solves (eliminate.py)
        self._warm: dict = {}  # id(op) -> its roles in the last axis-by-axis plan
        self._solved: dict = {}  # a part's signature -> its first ops and their plan
        # Ops from the backward pass on read params through their own name (FRESH): a
        # copy the forward pass moved is freed by then and is moved again (lower.py).
        self.fresh_readers = after_backward_start(program.ops)
        self.top: _Level | None = None

    # ---- prices

    def vtype(self, value: str) -> TensorType:
        value = value.removesuffix(FRESH)
        return self.types.get(value) or self.values[value].type

    def read_name(self, op: Op, value: str) -> str:
        """The name `op`'s read of `value` is priced under: a param read after the backward
        pass began is a read of a fresh copy, its move paid apart from the forward's."""
        if id(op) in self.fresh_readers and self.values[value].kind == "param":
            return value + FRESH
        return value

    def key(self, layout: Layout) -> Layout:
        # One object per layout: the prices' dictionaries then find it by identity.
        try:
            return self._keys[layout]
        except KeyError:
            stripped = self._keys.setdefault(strip(layout, self.mesh), strip(layout, self.mesh))
            self._keys[layout] = stripped  # (strip is idempotent: a stripped layout is its key)
            return stripped

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
        # Whether the result must end whole (an output asked for in no layout, or a value a
        # loop saves) changes the price: a loop body is solved with either (saved values).
        whole = is_output and output is None
        form = self._form(op)
        for roles in roles_list:
            cached = self._choices.get((id(op), roles, whole))
            if cached is None:
                priced = self._priced.get((form, roles, whole))
                if priced is None:
                    priced = self._priced[form, roles, whole] = \
                        self._price(op, roles, whole, constraint, vtype, operand_types)
                if priced is False:
                    cached = False
                else:
                    price, layouts, final, memory = priced
                    needs = tuple((self.read_name(op, o.value), layout)
                                  for o, layout in zip(op.operands, layouts))
                    cached = Choice(price, needs, ((op.result.name, final),), memory)
                self._choices[(id(op), roles, whole)] = cached
            if cached is not False:
                choices.append((roles, cached))
        return choices

    def _form(self, op: Op) -> tuple:
        """What the prices of `op`'s strategies depend on besides their roles: ops of one
        form (a recomputed op and its original, a backward pass's alike ops) share them."""
        form = self._forms.get(id(op))
        if form is None:
            form = self._forms[id(op)] = (
                type(op), _detail(op), tuple(o.indices for o in op.operands),
                tuple(self.vtype(o.value) for o in op.operands), op.result.type,
                self.vtype(op.result.name), self.pin(op))
        return form

    def _price(self, op: Op, roles: tuple, whole: bool, constraint, vtype, operand_types):
        """(price, operand layouts, result layout, bytes of the result) of `op` with these
        roles, or False where no such strategy is valid."""
        strategy = self.strategy(op, roles)
        if strategy is None:
            return False
        price = self.objective.compute(op, dict(strategy.local_sizes), strategy.flops,
                                       strategy.operand_layouts, strategy.result_layout,
                                       operand_types)
        final = self.key(strategy.result_layout)
        if constraint is not None and self.key(constraint) != final:
            extra = self.move_price(op.result.name, final, self.key(constraint))
            if extra is None:
                return False
            price += extra
            final = self.key(constraint)
        if whole and final.partial:
            price += self.move_price(op.result.name, final, Layout(final.dims))
        layouts = tuple(self.key(layout) for layout in strategy.operand_layouts)
        return price, layouts, final, local_bytes(final, vtype.shape, vtype.dtype, self.mesh)

    # ---- roles

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
        key = (id(op), axis)
        if key not in self._axis_roles:  # asked for by every axis solve and every level
            self._axis_roles[key] = axis_roles(op, self.mesh, axis)
        return [role for role in self._axis_roles[key]
                if not isinstance(role, Partial) or can_stay(role)]

    def joint_roles(self, op: Op, level: _Level) -> list[tuple]:
        return list(itertools.product(*(self.roles(op, axis, level) for axis in self.mesh.names)))

    def joint_count(self, op: Op, level: _Level) -> int:
        return math.prod(len(self.roles(op, axis, level)) for axis in self.mesh.names)

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
    staged = next((op for op in walk_ops(program.ops) if isinstance(op, Repeat) and op.stage_axis
                   and program.mesh.size(op.stage_axis) > 1), None)  # one stage: a plain loop
    if staged is not None:  # a pipeline is partitioned one stage's program at a time
        raise EinparError(Diagnostic(
            "E256", f"a repeat pipelined over '{staged.stage_axis}' is partitioned one stage at "
                    "a time", staged.span,
            hint="compile it with einpar.lower.compile_program (or einpar.api.compile_spmd), "
                 "which partitions einpar.pipeline.stage_program"))
    expanded = expand_library(program)
    with _collector_paused():
        return _Partitioner(expanded, objective or make_objective(expanded), memory_limit).run()


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector held off while the search runs: the search makes
    hundreds of thousands of objects that live until it ends (prices, choices, the rows of
    its integer programs) and no cycles to speak of, so each pass of the collector walks them
    for nothing (a fifth of a training step's partitioning). What a pass would have found
    is collected at the next one after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
