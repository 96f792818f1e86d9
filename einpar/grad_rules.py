"""The backward of each op (used by einpar/grad.py's pass).

`derivative` is the symbolic derivative of a Map's scalar expression, with
JAX's conventions where a function has none; `OpRules` emits, for each kind of
op, the ops that compute its operands' gradient contributions from the
gradient of its result (einpar/grad.py says the rule of each op in words).
"""

from __future__ import annotations

import math

from .ir import (FLOAT_DTYPES, Apply, Arg, Cast, Const, Einsum, Library, Map, Op, Operand, Pos,
                 Reduce, Route, Scalar, ScatterAdd, Take, scalar_nodes, work_dtype)

# ---- scalar derivatives

ONE = Const(1.0)
ZERO = Const(0.0)


def _call(fn: str, *args: Scalar) -> Apply:
    return Apply(fn, tuple(args))


def _mul(a: Scalar | None, b: Scalar | None) -> Scalar | None:
    if a is None or b is None:
        return None
    if a == ONE:
        return b
    if b == ONE:
        return a
    return _call("mul", a, b)


def _add(a: Scalar | None, b: Scalar | None) -> Scalar | None:
    if a is None:
        return b
    if b is None:
        return a
    return _call("add", a, b)


def _neg(a: Scalar | None) -> Scalar | None:
    return None if a is None else _call("neg", a)


def _indicator(condition: Scalar, then: Scalar = ONE, otherwise: Scalar = ZERO) -> Scalar:
    return _call("where", condition, then, otherwise)


_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _local_derivative(fn: str, args: tuple[Scalar, ...], position: int) -> Scalar | None:
    """d fn(args) / d args[position], as a Scalar of the arguments (None: zero)."""
    x = args[0]
    y = args[1] if len(args) > 1 else None
    if fn in ("gt", "ge", "lt", "le", "eq", "ne"):
        return None
    if fn == "add":
        return ONE
    if fn == "sub":
        return ONE if position == 0 else Const(-1.0)
    if fn == "mul":
        return y if position == 0 else x
    if fn == "div":  # d/dy (x / y) = -x / y²
        return _call("div", ONE, y) if position == 0 else \
            _neg(_call("div", x, _call("square", y)))
    if fn == "neg":
        return Const(-1.0)
    if fn == "exp":
        return _call("exp", x)
    if fn == "log":
        return _call("div", ONE, x)
    if fn == "sqrt":
        return _call("div", Const(0.5), _call("sqrt", x))
    if fn == "rsqrt":
        return _call("mul", Const(-0.5), _call("div", _call("rsqrt", x), x))
    if fn == "tanh":
        return _call("sub", ONE, _call("square", _call("tanh", x)))
    if fn == "sigmoid":
        s = _call("sigmoid", x)
        return _call("mul", s, _call("sub", ONE, s))
    if fn == "relu":  # relu'(0) = 0
        return _indicator(_call("gt", x, ZERO))
    if fn == "gelu":  # the tanh approximation: 0.5·x·(1 + tanh(c·(x + 0.044715·x³)))
        t = _call("tanh", _call("mul", Const(_SQRT_2_OVER_PI), _call(
            "add", x, _call("mul", Const(0.044715), _call("mul", x, _call("square", x))))))
        inner = _call("mul", Const(_SQRT_2_OVER_PI),
                      _call("add", ONE, _call("mul", Const(3 * 0.044715), _call("square", x))))
        return _call("add", _call("mul", Const(0.5), _call("add", ONE, t)),
                     _call("mul", _call("mul", Const(0.5), x),
                           _call("mul", _call("sub", ONE, _call("square", t)), inner)))
    if fn == "silu":  # s + x·s·(1 − s)
        s = _call("sigmoid", x)
        return _call("mul", s, _call("add", ONE, _call("mul", x, _call("sub", ONE, s))))
    if fn == "abs":  # sign(x), 0 at 0
        return _indicator(_call("gt", x, ZERO), ONE, _indicator(_call("lt", x, ZERO), Const(-1.0)))
    if fn == "square":
        return _call("mul", Const(2.0), x)
    if fn == "sin":
        return _call("cos", x)
    if fn == "cos":
        return _neg(_call("sin", x))
    if fn == "erf":
        return _call("mul", Const(_TWO_OVER_SQRT_PI), _call("exp", _neg(_call("square", x))))
    if fn == "where":
        if position == 0:
            return None
        return _indicator(args[0]) if position == 1 else _indicator(args[0], ZERO, ONE)
    if fn in ("max2", "min2"):  # lax.max's balanced rule: half to each at a tie
        mine, other = (x, y) if position == 0 else (y, x)
        wins = _call("gt" if fn == "max2" else "lt", mine, other)
        return _indicator(wins, ONE, _indicator(_call("eq", mine, other), Const(0.5)))
    if fn == "pow":  # lax.pow's rules
        if position == 0:
            return _indicator(_call("eq", y, ZERO), ZERO,
                              _call("mul", y, _call("pow", x, _call("sub", y, ONE))))
        return _call("mul", _call("log", _indicator(_call("eq", x, ZERO), ONE, x)), _call("pow", x, y))
    raise ValueError(f"no derivative for elementwise function {fn!r}")


def derivative(expr: Scalar, arg: int) -> Scalar | None:
    """d expr / d Arg(arg) by the chain rule (None where it is zero)."""
    if isinstance(expr, Arg):
        return ONE if expr.index == arg else None
    if isinstance(expr, (Const, Pos)):
        return None
    if isinstance(expr, Cast):
        return derivative(expr.arg, arg) if expr.dtype in FLOAT_DTYPES else None
    total = None
    for position, inner in enumerate(expr.args):
        inner_d = derivative(inner, arg)
        if inner_d is not None:
            total = _add(total, _mul(_local_derivative(expr.fn, expr.args, position), inner_d))
    return total


def _args_used(expr: Scalar) -> set[int]:
    return {node.index for node in scalar_nodes(expr) if isinstance(node, Arg)}


def _renumber(expr: Scalar, numbers: dict[int, int]) -> Scalar:
    if isinstance(expr, Arg):
        return Arg(numbers[expr.index])
    if isinstance(expr, Cast):
        return Cast(expr.dtype, _renumber(expr.arg, numbers))
    if isinstance(expr, Apply):
        return Apply(expr.fn, tuple(_renumber(a, numbers) for a in expr.args))
    return expr


def add_all(count: int) -> Scalar:
    expr: Scalar = Arg(0)
    for index in range(1, count):
        expr = _call("add", expr, Arg(index))
    return expr


class OpRules:
    """The gradient rule of each kind of op, a mixin of grad._Level: each reads the
    gradient `cot` of the op's result and emits contributions to its operands' gradients
    (through the level's `new_part` and `emit`); `rule` picks the one of an op's kind."""

    def rule(self, op: Op, cot: Operand) -> None:
        """Emit the contributions of `op`'s operands, `cot` its result's gradient."""
        getattr(self, _RULES[type(op)])(op, cot)

    def einsum(self, op: Einsum, cot: Operand) -> None:
        stmt, span = f"{op.stmt}.grad", op.span
        for k, operand in enumerate(op.operands):
            if not self.active(operand.value):
                continue
            others = tuple(Operand(self.resolve(o.value), o.indices)
                           for j, o in enumerate(op.operands) if j != k)
            available = set(cot.indices).union(*(o.indices for o in others))
            kept = tuple(i for i in operand.indices if i in available)
            vtype = self.type_of(operand.value)
            name = self.new_part(operand.value, operand.indices)
            if kept == operand.indices:
                self.emit(Einsum(self.new_value(name, vtype, operand.indices), (cot,) + others,
                                 stmt, span))
                continue
            # Indices only this operand has were summed: its gradient is broadcast along them.
            part = self.emit(Einsum(self.new_value(f"{name}.part", vtype, kept), (cot,) + others,
                                    stmt, span))
            self.emit(Map(self.new_value(name, vtype, operand.indices), (Operand(part, kept),),
                          Arg(0), stmt, span))

    def map(self, op: Map, cot: Operand) -> None:
        stmt, span = f"{op.stmt}.grad", op.span
        groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for position, operand in enumerate(op.operands):
            groups.setdefault((operand.value, operand.indices), []).append(position)
        rtype = op.result.type
        for (value, indices), positions in groups.items():
            if not self.active(value):
                continue
            local = None
            for position in positions:
                local = _add(local, derivative(op.expr, position))
            if local is None:
                continue
            vtype = self.type_of(value)
            extra = tuple(i for i in rtype.indices if i not in indices)
            if local == ONE and not extra and indices == rtype.indices \
                    and self.g.values[cot.value].type.dtype == vtype.dtype:
                self.add_part(value, cot.value, indices)  # the result's gradient itself
                continue
            used = sorted(_args_used(local))
            numbers = {old: new for new, old in enumerate(used)}
            operands = tuple(Operand(self.resolve(op.operands[i].value), op.operands[i].indices)
                             for i in used) + (cot,)
            expr = _mul(_renumber(local, numbers), Arg(len(used)))
            name = self.new_part(value, indices)
            if not extra:
                self.emit(Map(self.new_value(name, vtype, indices), operands, expr, stmt, span))
                continue
            full = self.emit(Map(self.new_value(f"{name}.full", vtype, rtype.indices,
                                                work_dtype(vtype.dtype)), operands, expr, stmt, span))
            self.emit(Reduce(self.new_value(name, vtype, indices), "sum",
                             Operand(full, rtype.indices), extra, stmt, span))

    def reduce(self, op: Reduce, cot: Operand) -> None:
        x = op.operand
        if not self.active(x.value):
            return
        stmt, span = f"{op.stmt}.grad", op.span
        vtype = self.type_of(x.value)
        if op.kind == "sum":
            name = self.new_part(x.value, x.indices)
            self.emit(Map(self.new_value(name, vtype, x.indices), (cot,), Arg(0), stmt, span))
            return
        if op.kind not in ("max", "min"):
            raise ValueError(f"grad: {op.kind} reductions are expanded first")
        # JAX's rule: the gradient is split equally among the tied extrema.
        name = self.new_part(x.value, x.indices)
        source = Operand(self.resolve(x.value), x.indices)
        result = Operand(self.resolve(op.result.name), op.result.type.indices)
        work = work_dtype(vtype.dtype)
        hits = self.emit(Map(self.new_value(f"{name}.hits", vtype, x.indices, work), (source, result),
                             _indicator(_call("eq", Arg(0), Arg(1))), stmt, span))
        count = self.emit(Reduce(self.new_value(f"{name}.count", vtype, result.indices, work), "sum",
                                 Operand(hits, x.indices), op.over, stmt, span))
        self.emit(Map(self.new_value(name, vtype, x.indices),
                      (Operand(hits, x.indices), Operand(count, result.indices), cot),
                      _call("div", _call("mul", Arg(0), Arg(2)), Arg(1)), stmt, span))

    def cumsum(self, op: Library, cot: Operand) -> None:
        x = op.operand
        if op.kind != "cumsum":
            raise ValueError(f"grad: {op.kind} is expanded first")
        if not self.active(x.value):
            return
        stmt, span = f"{op.stmt}.grad", op.span
        vtype = self.type_of(x.value)
        work = work_dtype(vtype.dtype)
        name = self.new_part(x.value, x.indices)
        kept = tuple(i for i in cot.indices if i != op.index)
        # The reverse cumulative sum: everything from i on = total − (sum up to i) + g[i].
        running = self.emit(Library(self.new_value(f"{name}.cumsum", vtype, cot.indices, work),
                                    "cumsum", cot, op.index, stmt, span))
        total = self.emit(Reduce(self.new_value(f"{name}.total", vtype, kept, work), "sum", cot,
                                 (op.index,), stmt, span))
        self.emit(Map(self.new_value(name, vtype, x.indices),
                      (Operand(total, kept), Operand(running, cot.indices), cot),
                      _call("add", _call("sub", Arg(0), Arg(1)), Arg(2)), stmt, span))

    def route(self, op: Route, cot: Operand) -> None:
        g = op.operand
        if not self.active(g.value):
            return
        stmt, span = f"{op.stmt}.grad", op.span
        vtype = self.type_of(g.value)
        work = work_dtype(vtype.dtype)
        name = self.new_part(g.value, g.indices)
        gates = Operand(self.resolve(g.value), g.indices)
        kept_indices = tuple(i for i in g.indices if i != op.expert)
        value = lambda suffix, indices, dtype=work: self.new_value(f"{name}.{suffix}", vtype,
                                                                    indices, dtype)
        # The top-k set, rank by rank: the largest gate not yet taken, the lowest expert of ties.
        taken = None
        proxy = None
        for rank in range(op.k):
            avail = [Operand(taken, g.indices)] if taken else []
            masked_expr = _indicator(_call("gt", Arg(1), ZERO), Const(float("-inf")), Arg(0)) \
                if taken else Arg(0)
            masked = self.emit(Map(value(f"masked{rank + 1}", g.indices), (gates, *avail),
                                   masked_expr, stmt, span))
            peak = self.emit(Reduce(value(f"peak{rank + 1}", kept_indices), "max",
                                    Operand(masked, g.indices), (op.expert,), stmt, span))
            tied_expr = _indicator(_call("eq", Arg(0), Arg(1)))
            if taken:
                tied_expr = _indicator(_call("gt", Arg(2), ZERO), ZERO, tied_expr)
            tied = self.emit(Map(value(f"tied{rank + 1}", g.indices),
                                 (gates, Operand(peak, kept_indices), *avail), tied_expr, stmt, span))
            order = self.emit(Library(value(f"order{rank + 1}", g.indices), "cumsum",
                                      Operand(tied, g.indices), op.expert, stmt, span))
            # this rank's choice: the first tied expert; taken so far; the proxy gate (k − rank).
            reads = (Operand(tied, g.indices), Operand(order, g.indices))
            chosen = _mul(Arg(0), _indicator(_call("eq", Arg(1), ONE)))

            def running(kind: str, previous: str | None, term: Scalar) -> str:
                """`term` of this rank, added to the sum of the ranks' before it."""
                operands, expr = reads, term
                if previous is not None:
                    operands, expr = reads + (Operand(previous, g.indices),), _call("add", Arg(2), term)
                return self.emit(Map(value(f"{kind}{rank + 1}", g.indices), operands, expr, stmt, span))

            taken, proxy = (running("taken", taken, chosen),
                            running("proxy", proxy, _mul(Const(float(op.k - rank)), chosen)))
        # Routing the proxy makes the same choices in the same order: the same slots.
        slots = self.emit(Route(value("slots", op.result.type.indices), Operand(proxy, g.indices),
                                op.expert, op.capacity, op.k, stmt, span))
        kept = self.emit(Map(value("kept", op.result.type.indices, "bool"),
                             (Operand(slots, op.result.type.indices),),
                             _call("gt", Arg(0), ZERO), stmt, span))
        through = self.emit(Einsum(value("through", g.indices), (cot, Operand(kept, cot.indices)),
                                   stmt, span))
        combine = Operand(self.resolve(op.result.name), op.result.type.indices)
        norm_share = self.emit(Einsum(value("share", kept_indices), (cot, combine), stmt, span))
        norm = self.emit(Einsum(value("norm", kept_indices), (Operand(taken, g.indices), gates),
                                stmt, span))
        self.emit(Map(self.new_value(name, vtype, g.indices),
                      (Operand(through, g.indices), Operand(taken, g.indices),
                       Operand(norm_share, kept_indices), Operand(norm, kept_indices)),
                      _call("div", _call("sub", Arg(0), _call("mul", Arg(1), Arg(2))), Arg(3)),
                      stmt, span))

    def indexed(self, op: Take | ScatterAdd, cot: Operand) -> None:
        """Take and ScatterAdd are each other's adjoint: a take's table gets the scatter-add
        of the result's gradient by the same ids, a scatter-add's update the take of it."""
        source, adjoint = (op.table, ScatterAdd) if isinstance(op, Take) else (op.update, Take)
        if not self.active(source.value):
            return
        ids = Operand(self.resolve(op.ids.value), op.ids.indices)
        name = self.new_part(source.value, source.indices)
        self.emit(adjoint(self.new_value(name, self.type_of(source.value), source.indices), cot,
                          ids, op.index, f"{op.stmt}.grad", op.span))


# Each kind of op's rule (a Repeat's is the pass's own: grad._Level.repeat_backward).
_RULES = {Einsum: "einsum", Map: "map", Reduce: "reduce", Library: "cumsum", Route: "route",
          Take: "indexed", ScatterAdd: "indexed"}
