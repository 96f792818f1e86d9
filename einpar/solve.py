"""Choosing one strategy per op for a whole program: an integer program.

The problem (`Problem`) is a list of nodes (ops), each with its choices
(strategies). A choice has a price of its own (its local work, the move into
a layout the program pins), reads values in some layouts (`needs`) and makes
values in some layouts (`makes`). A value is made once (or held from the
start, `fixed`); every layout some chosen consumer needs it in is paid once,
from the layout it was made in, however many consumers read it there:

    minimize   sum_n sum_c price(c) x[n,c]  +  sum_(v,F,L) move(v, F -> L) m[v,F,L]
    subject to sum_c x[n,c] = 1                           (one strategy per op)
    and, for each value v made in F (made(F): the maker's choices that make it in F)
    and each reader n, whose choices c need v in the layouts S(c):
               sum_F e[n,S,F] = sum_(c: S(c)=S) x[n,c]    (the pair's marginals:
               sum_S e[n,S,F] = made(F)                    e is "n needs S, v is made in F")
               m[v,F,L] >= sum_(S holding L) e[n,S,F]     (a move paid once, for all readers)

with x binary and e, m >= 0. On integral x, e is the product of the two
choices and m[v,F,L] = 1 exactly where some reader needs v in L while it is
made in F. A value made in one layout whatever its maker's choice (or held
from the start) needs no e: y[v,L] >= sum_(c needing L) x[n,c] per reader.

This is the formulation of Alpa's intra-operator pass (Zheng et al., OSDI
2022, section 4.2) with two changes: Alpa prices each edge (producer,
consumer), so a value read by three consumers in one layout pays three moves;
here the move is a variable of the (value, layout) pair, shared by its
consumers. And the pair variables e are those of the local polytope of a
pairwise model (Wainwright and Jordan, "Graphical models, exponential
families, and variational inference", 2008, section 4.1): their LP
relaxation is far tighter than serving y[v,L] from any layout made
(m[v,F,L] <= made(F), sum_F m[v,F,L] = y[v,L]), which lets a fractional
maker serve each reader from the layout it wants at no cost. On a
transformer block's training step its optimum is integral on every axis
(the looser one took HiGHS seconds of branching per axis).

It is solved exactly, first by dynamic programming over the program's graph
(eliminate.py: fast where each value has few readers, as in a transformer
layer), else by HiGHS (scipy's binding of it, or scipy.optimize.milp) to a
zero gap, its LP relaxation first; either way the plan is optimal for the
prices given. `exhaustive` enumerates every combination instead, for tests on
small programs.
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
    # Where several problems share their moves' prices (one partitioner's solves): a memo
    # of eliminate.py's value tables, and the type of a value (a move's price depends on
    # it: a stacked view's name is one trip's slice in a loop body and the stack outside).
    tables: dict | None = None
    value_type: Callable[[str], object] | None = None


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
        made = dict(new.makes)  # what differs from self.made (a copy of it would cost more)
        after = sum(self._moves(v, made[v] if v in made else self.made[v])
                    for v in values if v in made or v in self.made)
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
    program = _IntegerProgram(problem)
    problem.stats.update(variables=len(program.costs), constraints=len(program.row_lo))
    picks = program.relaxed()
    if picks is not None:  # the LP's optimum is integral: it is the integer program's
        problem.stats.update(solved_by="LP")
        return picks
    picks, status = program.integral()
    problem.stats.update(status=status, solved_by="MILP")
    return picks


class _IntegerProgram:
    """The integer program of the module docstring, as scipy's HiGHS interface takes it."""

    def __init__(self, problem: Problem):
        self.costs: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []
        self.integer: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.row_lo: list[float] = []
        self.row_hi: list[float] = []
        self.x = [[self.var(choice.price, binary=True) for choice in node] for node in problem.nodes]
        for node in self.x:
            self.constraint(node, (), 1.0, 1.0)
        # Which node makes each value, and under which choices in which layout; who reads it.
        self.made_by: dict[str, dict[Layout, list[int]]] = {}
        readers: dict[str, dict[int, None]] = {}
        # Per node, per choice: value -> the layouts it reads the value in.
        self.needs: list[list[dict[str, tuple[Layout, ...]]]] = []
        for index, (node, cols) in enumerate(zip(problem.nodes, self.x)):
            self.needs.append([])
            for choice, col in zip(node, cols):
                for value, layout in choice.makes:
                    self.made_by.setdefault(value, {}).setdefault(layout, []).append(col)
                wanted: dict[str, dict[Layout, None]] = {}
                for value, layout in choice.needs:
                    wanted.setdefault(value, {})[layout] = None
                    readers.setdefault(value, {})[index] = None
                self.needs[-1].append({value: tuple(layouts) for value, layouts in wanted.items()})
        required: dict[str, dict[Layout, None]] = {}
        for value, layout in problem.required:
            required.setdefault(value, {})[layout] = None
        self.memory: list[tuple[int, float]] = []  # (column, bytes) of every copy
        for value in dict.fromkeys(list(readers) + list(required)):
            args = (problem, value, list(readers.get(value, ())), list(required.get(value, ())))
            if value in problem.fixed:
                self._held(problem.fixed[value], *args)
            elif len(self.made_by.get(value, ())) == 1:  # made in one layout whatever the choice
                self._held(next(iter(self.made_by[value])), *args)
            else:
                self._made(*args)
        if problem.memory_limit is not None:
            terms = [(col, float(choice.memory)) for node, cols in zip(problem.nodes, self.x)
                     for choice, col in zip(node, cols) if choice.memory]
            self.weighted_constraint(terms + self.memory, -math.inf, problem.memory_limit)

    def var(self, cost: float, lo: float = 0.0, hi: float = 1.0, binary: bool = False) -> int:
        self.costs.append(cost)
        self.lower.append(lo)
        self.upper.append(hi)
        self.integer.append(1 if binary else 0)
        return len(self.costs) - 1

    def constraint(self, plus, minus, lo: float, hi: float) -> None:
        """lo <= the columns `plus` less the columns `minus` <= hi (every other row is such a
        sum: built from lists of columns, not of (column, coefficient) pairs)."""
        count = len(plus) + len(minus)
        self.rows.extend([len(self.row_lo)] * count)
        self.cols.extend(plus)
        self.cols.extend(minus)
        self.vals.extend([1.0] * len(plus))
        self.vals.extend([-1.0] * len(minus))
        self.row_lo.append(lo)
        self.row_hi.append(hi)

    def weighted_constraint(self, terms: list[tuple[int, float]], lo: float, hi: float) -> None:
        row = len(self.row_lo)
        for col, val in terms:
            self.rows.append(row)
            self.cols.append(col)
            self.vals.append(val)
        self.row_lo.append(lo)
        self.row_hi.append(hi)


    def _held(self, held: Layout, problem: Problem, value: str, readers: list[int],
              required: list[Layout]) -> None:
        """A value held from the start, or made in one layout `held` whatever its maker's
        choice: y[v, L] >= the choices of each reader that need it in L, each y paid once
        from that layout."""
        if self._alone(problem, readers, required):  # its moves are its one reader's own
            for col, choice in zip(self.x[readers[0]], self.needs[readers[0]]):
                self._charge(col, [problem.move(value, held, layout)
                                   for layout in choice.get(value, ())])
            return
        y: dict[Layout, int] = {}
        for node in readers:
            wants: dict[Layout, list[int]] = {}
            for col, choice in zip(self.x[node], self.needs[node]):
                for layout in choice.get(value, ()):
                    wants.setdefault(layout, []).append(col)
            for layout, cols in wants.items():
                if layout not in y:
                    y[layout] = self._copy(problem, value, held, layout)
                self.constraint(cols, (y[layout],), -math.inf, 0.0)
        for layout in required:
            if layout not in y:
                y[layout] = self._copy(problem, value, held, layout)
            self.lower[y[layout]] = 1.0

    @staticmethod
    def _alone(problem: Problem, readers: list[int], required: list[Layout]) -> bool:
        """Whether a value's moves serve one reader alone (nothing asked of it at the end, no
        memory bound counting its copies): each is then paid by that reader's choice, a
        price of the choice (or of the pair e) rather than a variable shared by readers,
        the same LP with fewer variables and rows."""
        return len(readers) == 1 and not required and problem.memory_limit is None

    def _charge(self, col: int, moves: list[float | None]) -> None:
        """Add the moves to column `col`'s price; a move no reshard makes rules it out."""
        if None in moves:
            self.upper[col] = 0.0
        else:
            self.costs[col] += sum(moves)

    def _copy(self, problem: Problem, value: str, made: Layout, layout: Layout,
              hi: float = 1.0) -> int:
        cost = problem.move(value, made, layout)
        col = self.var(0.0 if cost is None else cost, hi=0.0 if cost is None else hi)
        if problem.memory_limit is not None:
            self.memory.append((col, float(problem.layout_bytes(value, layout))))
        return col

    def _made(self, problem: Problem, value: str, readers: list[int], required: list[Layout]) -> None:
        """A value some node makes: for each reader, e[S, F] (the reader takes a choice that
        needs the value in the layouts S while it is made in F) with the two marginals (the
        reader's choices needing S, and made(F)): the local polytope of the pair. Then
        m[F, L] >= the e of each reader's sets holding L, each m paid once (the move F -> L).
        On integral choices e is their product and m the union of the needs; the relaxation
        is far tighter than serving y[v, L] by any layout made, and its optimum is integral
        on most programs (no branching)."""
        made = self.made_by.get(value, {})
        m: dict[tuple[Layout, Layout], int | None] = {}

        def move(source: Layout, layout: Layout) -> int | None:
            if (source, layout) not in m:
                if problem.move(value, source, layout) is None:
                    m[source, layout] = None
                else:
                    m[source, layout] = self._copy(problem, value, source, layout, hi=math.inf)
            return m[source, layout]

        alone = self._alone(problem, readers, required)
        for node in readers:
            # The reader's choices by the set of layouts they need the value in.
            by_set: dict[tuple[Layout, ...], list[int]] = {}
            for col, choice in zip(self.x[node], self.needs[node]):
                by_set.setdefault(choice.get(value, ()), []).append(col)
            if alone:
                self._one_reader(problem, value, made, by_set)
                continue
            serves: dict[int, list[int]] = {}  # m[F, L] -> the e[S, F], S holding L
            if len(by_set) == 1:  # every choice needs the same layouts: e[S, F] is made(F)
                layouts = next(iter(by_set))
                for source, cols in made.items():
                    moves = [move(source, layout) for layout in layouts]
                    if None in moves:
                        for choice in cols:
                            self.upper[choice] = 0.0
                        continue
                    for col in moves:
                        serves.setdefault(col, []).extend(cols)
                for col, terms in serves.items():
                    self.constraint(terms, (col,), -math.inf, 0.0)
                continue
            e: dict[Layout, list[int]] = {source: [] for source in made}
            for layouts, cols in by_set.items():
                terms = []
                for source in made:
                    moves = [move(source, layout) for layout in layouts]
                    if None in moves:  # no reshard serves the pair: e[S, F] = 0, left out
                        continue
                    pair = self.var(0.0)
                    e[source].append(pair)
                    terms.append(pair)
                    for col in moves:
                        serves.setdefault(col, []).append(pair)
                self.constraint(terms, cols, 0.0, 0.0)
            for source, pairs in e.items():  # sum_S e[S, F] = made(F)
                self.constraint(pairs, made[source], 0.0, 0.0)
            for col, terms in serves.items():  # m[F, L] >= sum of e[S, F] over S holding L
                self.constraint(terms, (col,), -math.inf, 0.0)
        for layout in required:
            for source, cols in made.items():
                col = move(source, layout)
                if col is None:  # no reshard reaches the layout asked for from this one
                    for choice in cols:
                        self.upper[choice] = 0.0
                else:
                    self.constraint((col,), cols, 0.0, math.inf)

    def _one_reader(self, problem: Problem, value: str, made: dict[Layout, list[int]],
                    by_set: dict[tuple[Layout, ...], list[int]]) -> None:
        """`_made` for a value read by one node alone: the moves F -> S are the price of
        e[S, F] (of the maker's choices making F where every choice of the reader needs S)."""
        def moves(source: Layout, layouts: tuple[Layout, ...]) -> list[float | None]:
            return [problem.move(value, source, layout) for layout in layouts]

        if len(by_set) == 1:
            layouts = next(iter(by_set))
            for source, cols in made.items():
                price = moves(source, layouts)
                for col in cols:
                    self._charge(col, price)
            return
        e: dict[Layout, list[int]] = {source: [] for source in made}
        for layouts, cols in by_set.items():
            terms = []
            for source in made:
                price = moves(source, layouts)
                if None in price:  # no reshard serves the pair: e[S, F] = 0, left out
                    continue
                pair = self.var(sum(price))
                e[source].append(pair)
                terms.append(pair)
            self.constraint(terms, cols, 0.0, 0.0)
        for source, pairs in e.items():  # sum_S e[S, F] = made(F)
            self.constraint(pairs, made[source], 0.0, 0.0)

    def _arrays(self):
        from scipy.optimize import Bounds, LinearConstraint
        from scipy.sparse import coo_matrix

        matrix = coo_matrix((self.vals, (self.rows, self.cols)),
                            shape=(len(self.row_lo), len(self.costs))).tocsr()
        return (np.array(self.costs), Bounds(np.array(self.lower), np.array(self.upper)),
                LinearConstraint(matrix, np.array(self.row_lo), np.array(self.row_hi)))

    def _picks(self, solution) -> list[int]:
        return [int(np.argmax(solution[node])) for node in self.x]

    def relaxed(self) -> list[int] | None:
        """The picks of the LP relaxation if it is integral, else None."""
        solution = self._lp_solution()
        if solution is None:
            return None
        for node in self.x:
            if abs(solution[node].max() - 1.0) > 1e-7:
                return None
        return self._picks(solution)

    def _lp_solution(self) -> np.ndarray | None:
        """The LP relaxation's optimum (None if HiGHS finds none), solved without presolve:
        on these LPs (a few thousand columns, rows of a few terms) the simplex alone takes
        two thirds of the time presolve and simplex take together. Through the HiGHS
        binding scipy ships where it has one (scipy.optimize.milp's checks and conversions
        take a third as long as the simplex); it is scipy's own module, not a promise, so
        a scipy without it, or with another interface to it, is asked through milp."""
        try:
            return self._lp_by_binding()
        except (ImportError, AttributeError, TypeError):
            from scipy.optimize import milp

            costs, bounds, constraints = self._arrays()
            result = milp(costs, integrality=np.zeros(len(costs)), bounds=bounds,
                          constraints=constraints,
                          options={"time_limit": TIME_LIMIT_S, "presolve": False})
            return result.x

    def _lp_by_binding(self) -> np.ndarray | None:
        from scipy.optimize._highspy import _core as highs
        from scipy.sparse import csc_matrix

        model, solver = highs.HighsLp(), highs._Highs()
        columns, rows = len(self.costs), len(self.row_lo)
        matrix = csc_matrix((self.vals, (self.rows, self.cols)), shape=(rows, columns))
        model.num_col_, model.num_row_ = columns, rows
        model.col_cost_ = np.array(self.costs)
        model.col_lower_, model.col_upper_ = np.array(self.lower), np.array(self.upper)
        model.row_lower_, model.row_upper_ = np.array(self.row_lo), np.array(self.row_hi)
        model.a_matrix_.format_ = highs.MatrixFormat.kColwise
        model.a_matrix_.num_col_, model.a_matrix_.num_row_ = columns, rows
        model.a_matrix_.start_ = matrix.indptr
        model.a_matrix_.index_ = matrix.indices
        model.a_matrix_.value_ = matrix.data
        solver.setOptionValue("output_flag", False)
        solver.setOptionValue("presolve", "off")
        solver.setOptionValue("time_limit", TIME_LIMIT_S)
        solver.passModel(model)
        solver.run()
        if solver.getModelStatus() != highs.HighsModelStatus.kOptimal:
            return None
        return np.array(solver.getSolution().col_value)

    def integral(self) -> tuple[list[int], int]:
        from scipy.optimize import milp

        costs, bounds, constraints = self._arrays()
        result = milp(costs, integrality=np.array(self.integer), bounds=bounds, constraints=constraints,
                      options={"mip_rel_gap": 0.0, "time_limit": TIME_LIMIT_S})
        if result.x is None:
            raise Infeasible()
        return self._picks(result.x), result.status
