"""The partitioner's plan as the steps the lowering reads.

A solved level (search.py) is a choice of strategy per op; `Materializer`
turns it into Decisions in program order: the operands each op reads and
the moves that bring them there (a move into a layout is made for the first
op that needs it and reused after), the move of its result into a pinned
layout, and, for the explanation, what the op's strategy costs and the best
strategy one axis away that the plan rejected. A `repeat` becomes a
RepeatDecision: the moves before the loop, its body's Decisions, and the
moves that bring each trip's results back to the layouts the loop carries
(and a partial sum it saves to whole).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from .ir import Op, Repeat
from .layout import Layout
from .reshard import ReshardPlan, plan_reshard
from .solve import Evaluation
from .strategies import describe, short

if TYPE_CHECKING:
    from .search import _Level, _Plan


# Why a partial sum a loop saves is made whole in its body (explain words it so).
SAVE_REASON = "the loop saves it"


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
    # carried values, stacked values and outer values the body reads, moved before the loop
    entry: tuple[Move, ...]
    carried_layouts: tuple[Layout, ...]
    stacked_layouts: tuple[Layout, ...]  # one trip's slice of each stacked value, in the body
    body: tuple["Step", ...]
    exit: tuple[Move, ...]  # each trip's results moved back to the carried layouts
    price: float = 0.0  # all trips
    alternative: Alternative | None = None
    stacked_sources: tuple[Layout, ...] = ()  # the layout each stacked value is sliced from
    saved_layouts: tuple[Layout, ...] = ()  # each saved value's layout in the body (per trip)
    saves: tuple[Move, ...] = ()  # at the end of each trip, a partial sum it saves made whole


Step = Union[Decision, RepeatDecision]


class Materializer:
    """The plan as Decisions: a part of `partition._Partitioner` (it reads the partitioner's
    mesh, types, prices and the body plans of search.Search)."""

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

    def materialize_repeat(self, op: Repeat, label, choice, tensors, held, alternative,
                           parent: _Level) -> RepeatDecision:
        layouts, views, targets = label
        plan, outer, level, _ = self.body_plan(op, layouts, views, targets, parent)
        entry = []
        sliced = {view.name for view in op.stacked}
        for value, layout in [(c.value, lay) for c, lay in zip(op.carried, layouts)] + list(outer.items()):
            if held[value] != layout:
                reason = "a loop carries it in this layout" if value not in outer else \
                    "the loop reads it a trip's slice at a time" if value in sliced else \
                    "the loop reads it whole"
                entry.append(Move(value, tensors[value], self.plan(value, held[value], layout), reason))
        sources = tuple(outer.get(view.name, held[view.name]) for view in op.stacked)
        inside = dict(held)
        inside.update(level.fixed)
        inside_tensors = dict(tensors)
        for view in op.stacked:
            inside_tensors[view.name] = view.name
        for carried in op.carried:
            inside_tensors[carried.value] = tensors[carried.value]
        body = self.materialize(level, plan, inside_tensors, inside)
        exit_moves = []
        outer_types, self.types = self.types, level.types  # a stacked view is its slice here
        try:
            for carried, layout in zip(op.carried, layouts):
                now = inside[carried.body_result]
                if now != layout:
                    exit_moves.append(Move(carried.body_result, inside_tensors[carried.body_result],
                                           self.plan(carried.body_result, now, layout),
                                           "the next trip reads it"))
            ends = dict(inside)
            ends.update((c.body_result, layout) for c, layout in zip(op.carried, layouts))
            saved_layouts, saves = [], []
            for saved, target in zip(op.saved, targets):
                now = ends[saved.body_value]
                # each trip's slice is saved whole, or as asked (a partial sum accumulated)
                want = target or Layout(now.dims)
                if self.key(now) != self.key(want):
                    saves.append(Move(saved.body_value, inside_tensors[saved.body_value],
                                      self.plan(saved.body_value, now, want), SAVE_REASON))
                    ends[saved.body_value] = now = want
                saved_layouts.append(now)
        finally:
            self.types = outer_types
        for carried, layout in zip(op.carried, layouts):
            held[carried.result.name] = layout
            tensors[carried.result.name] = tensors[carried.value]
        for saved, layout in zip(op.saved, saved_layouts):
            held[saved.result.name] = Layout(((),) + layout.dims, layout.partial)
            tensors[saved.result.name] = saved.result.name
        stacked = tuple(level.fixed[view.name] for view in op.stacked)
        return RepeatDecision(op, tuple(entry), tuple(layouts), stacked, tuple(body),
                              tuple(exit_moves), choice.price, alternative, sources,
                              tuple(saved_layouts), tuple(saves))

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
        rule = short(op, label, self.mesh) if not isinstance(op, Repeat) else _loop_rule(label)
        extra = best[0] - evaluation.price
        # Rounding aside, no alternative is cheaper than the plan (a negative one would show).
        return Alternative(rule, 0.0 if abs(extra) <= 1e-9 * max(1.0, abs(evaluation.price))
                           else extra)


def _loop_rule(label) -> str:
    """A loop's choice in short: its carried layouts, and its stacked views' where chosen."""
    layouts, views, targets = label
    text = "carried " + ", ".join(str(layout) for layout in layouts)
    chosen = [str(view) for view in views if view is not None]
    kept = [str(target) for target in targets if target is not None]
    return text + ("; sliced " + ", ".join(chosen) if chosen else "") + \
        ("; saved " + ", ".join(kept) if kept else "")
