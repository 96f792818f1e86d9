"""Choosing one strategy per op for a whole program: an integer program.

The problem (`Problem`) is a list of nodes (ops), each with its choices
(strategies). A choice has a price of its own (its local work, the move into
a layout the program pins), reads values in some layouts (`needs`) and makes
values in some layouts (`makes`). A value is made once (or held from the
start, `fixed`); every layout some chosen consumer needs it in is paid once,
from the layout it was made in, however many consumers read it there:

    minimize   sum_n sum_c price(c) x[n,c]  +  sum_(v,F,L) move(v, F -> L) m[v,F,L]
    subject to sum_c x[n,c] = 1                       (one strategy per op)
               y[v,L] >= sum_(c of n needing v in L) x[n,c]   for each consumer n
               m[v,F,L] <= made(v in F),  sum_F m[v,F,L] = y[v,L]
                                              (a need is served by the layout made;
                                               no m where no reshard reaches L from F)

with x binary and y, m in [0, 1] (they take 0 or 1 at an optimum). The
second line is the tight linearization of m = made * y (its LP relaxation
is much stronger than m >= made + y - 1, so HiGHS branches far less). This is
the formulation of Alpa's intra-operator pass (Zheng et al., OSDI 2022,
section 4.2) with one change: Alpa prices each edge (producer, consumer), so
a value read by three consumers in one layout pays three moves; here the
move is a variable of the (value, layout) pair, shared by its consumers.

It is solved exactly, first by dynamic programming over the program's graph
(eliminate.py: fast where each value has few readers, as in a transformer
layer), else by HiGHS (scipy.optimize.milp) to a zero gap, its LP relaxation
first; either way the plan is optimal for the prices given. `exhaustive`
enumerates every combination instead, for tests on small programs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .eliminate import eliminate
from .layout import Layout

# HiGHS stops here and keeps the best plan found (it says so): no input hangs the compiler.
TIME_LIMIT_S = 60.0


@dataclass(frozen=True)
class Choice:
    price: float
    needs: tuple[tuple[str, Layout], ...]  # (value, layout) read
    makes: tuple[tuple[str, Layout], ...]  # (value, layout) made
    memory: int = 0  # bytes per device of what it makes


@dataclass
class Problem:
    nodes: list[list[Choice]]
    fixed: dict[str, Layout]  # values held from the start, and their layouts
    move: Callable[[str, Layout, Layout], float | None]  # None: no reshard reaches it
    required: tuple[tuple[str, Layout], ...] = ()  # needs no choice avoids (outputs)
    # Bytes per device the values made and the copies moved may take together, and the
    # bytes of a value in a layout (for the copies); None: no limit.
    memory_limit: float | None = None
    layout_bytes: Callable[[str, Layout], int] | None = None
    stats: dict = field(default_factory=dict)


class Infeasible(Exception):
    """No choice of strategies meets every need (a pinned layout no op can make)."""


def evaluate(problem: Problem, picks: list[int]) -> float:
    """The price of one choice per node: their own prices plus every (value, layout) move
    paid once; math.inf if a need cannot be reached."""
    made = dict(problem.fixed)
    total = 0.0
    needs = dict.fromkeys(problem.required)
    for node, pick in zip(problem.nodes, picks):
        choice = node[pick]
        total += choice.price
        made.update(choice.makes)
        needs.update(dict.fromkeys(choice.needs))
    for value, layout in needs:
        cost = problem.move(value, made[value], layout)
        if cost is None:
            return math.inf
        total += cost
    return total


class Evaluation:
    """A plan's price, kept so that the price with one node's choice swapped is found from
    that node's reads and what it makes alone (for the best rejected alternative per op)."""

    def __init__(self, problem: Problem, picks: list[int]):
        self.problem, self.picks = problem, list(picks)
        self.made = dict(problem.fixed)
        self.readers: dict[str, dict[Layout, int]] = {}  # value -> layout -> how many read it
        for need in problem.required:
            self._count(need, 1)
        for node, pick in zip(problem.nodes, picks):
            self.made.update(node[pick].makes)
            for need in dict.fromkeys(node[pick].needs):
                self._count(need, 1)
        self.price = evaluate(problem, picks)

    def _count(self, need, step: int) -> int:
        value, layout = need
        layouts = self.readers.setdefault(value, {})
        layouts[layout] = layouts.get(layout, 0) + step
        return layouts[layout]

    def _moves(self, value: str, made: Layout) -> float:
        total = 0.0
        for layout, count in self.readers.get(value, {}).items():
            if count:
                cost = self.problem.move(value, made, layout)
                if cost is None:
                    return math.inf
                total += cost
        return total

    def swapped(self, index: int, other: int) -> float:
        """The plan's price with node `index` taking choice `other`."""
        old = self.problem.nodes[index][self.picks[index]]
        new = self.problem.nodes[index][other]
        values = {value for value, _ in old.needs + new.needs + old.makes + new.makes}
        before = sum(self._moves(v, self.made[v]) for v in values if v in self.made)
        for need in dict.fromkeys(old.needs):
            self._count(need, -1)
        for need in dict.fromkeys(new.needs):
            self._count(need, 1)
        made = dict(self.made)
        made.update(new.makes)
        after = sum(self._moves(v, made[v]) for v in values if v in made)
        for need in dict.fromkeys(new.needs):
            self._count(need, -1)
        for need in dict.fromkeys(old.needs):
            self._count(need, 1)
        return self.price - old.price + new.price - before + after


def exhaustive(problem: Problem) -> tuple[float, list[int]]:
    """The cheapest combination by enumerating them all (for small problems)."""
    best = (math.inf, [])
    for picks in itertools.product(*(range(len(node)) for node in problem.nodes)):
        price = evaluate(problem, list(picks))
        if price < best[0]:
            best = (price, list(picks))
    return best


def solve(problem: Problem) -> list[int]:
    """The optimal choice per node (module docstring); Infeasible if there is none."""
    if all(len(node) == 1 for node in problem.nodes):
        picks = [0] * len(problem.nodes)
        if math.isinf(evaluate(problem, picks)):
            raise Infeasible()
        return picks
    if problem.memory_limit is None:  # a sum over the whole program is no small factor
        picks = eliminate(problem)
        if picks is not None:
            problem.stats.update(solved_by="elimination")
            if math.isinf(evaluate(problem, picks)):
                raise Infeasible()
            return picks
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    costs: list[float] = []
    lower: list[float] = []
    upper: list[float] = []
    integer: list[int] = []

    def var(cost: float, lo: float = 0.0, hi: float = 1.0, binary: bool = False) -> int:
        costs.append(cost)
        lower.append(lo)
        upper.append(hi)
        integer.append(1 if binary else 0)
        return len(costs) - 1

    rows, cols, vals, row_lo, row_hi = [], [], [], [], []

    def constraint(terms: list[tuple[int, float]], lo: float, hi: float) -> None:
        row = len(row_lo)
        for col, val in terms:
            rows.append(row)
            cols.append(col)
            vals.append(val)
        row_lo.append(lo)
        row_hi.append(hi)

    x = [[var(choice.price, binary=True) for choice in node] for node in problem.nodes]
    for node in x:
        constraint([(col, 1.0) for col in node], 1.0, 1.0)
    # Which node makes each value, and under which choices in which layout.
    made_by: dict[str, dict[Layout, list[int]]] = {}
    for node, cols_ in zip(problem.nodes, x):
        for choice, col in zip(node, cols_):
            for value, layout in choice.makes:
                made_by.setdefault(value, {}).setdefault(layout, []).append(col)
    # y[v, L] for every layout some choice needs a value in.
    y: dict[tuple[str, Layout], int] = {}
    required = set(problem.required)
    for node, cols_ in zip(problem.nodes, x):
        wants: dict[tuple[str, Layout], list[int]] = {}
        for choice, col in zip(node, cols_):
            for need in dict.fromkeys(choice.needs):
                wants.setdefault(need, []).append(col)
        for need, cols_needing in wants.items():
            if need not in y:
                y[need] = var(0.0)
            constraint([(col, 1.0) for col in cols_needing] + [(y[need], -1.0)], -math.inf, 0.0)
    for need in problem.required:
        if need not in y:
            y[need] = var(0.0)
    for (value, layout), col in y.items():
        if need_fixed := value in problem.fixed:
            cost = problem.move(value, problem.fixed[value], layout)
            if cost is None:
                upper[col] = 0.0
            else:
                costs[col] = cost
        if (value, layout) in required:
            lower[col] = 1.0
        if need_fixed:
            continue
        # Exactly one layout the value is made in serves each need (m[v,F,L] <= made(v in F),
        # sum over F of m[v,F,L] = y[v,L]): tighter than m >= made + y - 1, the same optimum.
        sources = []
        for made, made_cols in made_by.get(value, {}).items():
            cost = problem.move(value, made, layout)
            if cost is None:
                continue
            m = var(cost)
            sources.append((m, 1.0))
            constraint([(m, 1.0)] + [(c, -1.0) for c in made_cols], -math.inf, 0.0)
        constraint(sources + [(col, -1.0)], 0.0, 0.0)
    if problem.memory_limit is not None:
        terms = [(col, float(choice.memory)) for node, cols_ in zip(problem.nodes, x)
                 for choice, col in zip(node, cols_) if choice.memory]
        terms += [(col, float(problem.layout_bytes(value, layout))) for (value, layout), col in y.items()]
        constraint(terms, -math.inf, problem.memory_limit)
    matrix = coo_matrix((vals, (rows, cols)), shape=(len(row_lo), len(costs))).tocsr()
    costs_, lower_, upper_ = np.array(costs), np.array(lower), np.array(upper)
    lo_, hi_ = np.array(row_lo), np.array(row_hi)
    problem.stats.update(variables=len(costs), constraints=len(row_lo))
    picks = _relaxed(costs_, lower_, upper_, matrix, lo_, hi_, x)
    if picks is not None:  # the LP's optimum is integral: it is the integer program's
        problem.stats.update(solved_by="LP")
        return picks
    result = milp(costs_, integrality=np.array(integer), bounds=Bounds(lower_, upper_),
                  constraints=LinearConstraint(matrix, lo_, hi_),
                  options={"mip_rel_gap": 0.0, "time_limit": TIME_LIMIT_S})
    problem.stats.update(status=result.status, solved_by="MILP")
    if result.x is None:
        raise Infeasible()
    return [int(np.argmax([result.x[col] for col in node])) for node in x]


def _relaxed(costs, lower, upper, matrix, row_lo, row_hi, x) -> list[int] | None:
    """The picks of the LP relaxation (HiGHS' dual simplex) if it is integral, else None.
    The formulation is tight enough that it often is, and the LP is several times faster
    than the integer program's search."""
    from scipy.optimize import linprog
    from scipy.sparse import vstack

    equal = row_lo == row_hi
    above = ~equal & np.isfinite(row_hi)
    below = ~equal & np.isfinite(row_lo)
    result = linprog(costs, A_ub=vstack([matrix[above], -matrix[below]]),
                     b_ub=np.concatenate([row_hi[above], -row_lo[below]]),
                     A_eq=matrix[equal], b_eq=row_lo[equal], bounds=np.stack([lower, upper], 1),
                     method="highs-ds", options={"time_limit": TIME_LIMIT_S})
    if result.status != 0:
        return None
    picks = []
    for node in x:
        values = result.x[node]
        best = int(np.argmax(values))
        if abs(values[best] - 1.0) > 1e-7:
            return None
        picks.append(best)
    return picks
