"""Reverse-mode differentiation of a Program (Program -> Program).

`grad(program, loss)` returns the program with its backward pass appended as
ordinary ops (Einsum, Map, Reduce, Library cumsum, Route, Take/ScatterAdd,
Repeat), and the gradient of `loss` with respect to every param as the
output `w.grad`. Because the result is an ordinary Program, the partitioner,
every backend and the cost model handle the backward pass like any program.
The rules (the transposes of each op, as JAX's autodiff defines them):

- Einsum: the gradient of an operand is the einsum of the result's gradient
  with the other operands; an index only that operand has (summed in the
  forward op) is broadcast back by a Map.
- Map: the symbolic derivative of its scalar expression, per operand, times
  the result's gradient, as one Map that reads only what the derivative
  needs; then a sum over the result indices the operand lacks (broadcast).
  Where a function has no derivative, JAX's convention: relu'(0) = 0,
  abs'(0) = 0, max2/min2 split the gradient 0.5/0.5 at a tie (lax.max's
  balanced rule), comparisons, `where`'s condition, pos() and integer or
  boolean values carry none; pow as lax.pow (d/da = b·a^(b−1), 0 where
  b = 0; d/db = log a · a^b, with log 1 where a = 0). An operand whose
  gradient is the result's gradient itself (`x + y`) gets no op at all.
- Reduce sum: a broadcast. max/min: the gradient split equally among the tied
  extrema, `(x == y) / count` (JAX's reduce_max rule).
- cumsum: the reverse cumulative sum, written `total − cumsum(g) + g`
  (there is no reversed cumsum op).
- route: the combine weights are `c = kept · g / n` with `kept` the slot each
  kept (token, expert) got and `n` the sum of the token's top-k gates, so
  `dg = (Σ_C dc·kept − sel · Σ_{E,C} dc·c) / n` with `sel` the top-k set.
  The choice of slots and of the top-k set carries no gradient (as in JAX's
  route_top_k, where they come from argsort and one_hot). `sel` is rebuilt
  rank by rank with max reductions (ties to the lower expert: the first of
  the tied ones, by a cumsum of the tie indicator); `kept` by routing a proxy
  gate that holds each chosen expert's rank (k for the first choice, down to
  1) and 0 elsewhere, which makes exactly the same choices in the same order,
  hence the same slots.
- take: a ScatterAdd of the result's gradient into the table; ScatterAdd: a
  Take of the result's gradient.
- Repeat: a Repeat with `reverse=True`. The forward loop saves (`saved`,
  named `v.saved`) each trip's values the backward body reads, or under
  `repeat L remat` only its carried inputs, the backward body recomputing the
  rest (`v.remat`). The backward loop carries the gradients of the carried
  values and the running sums of the gradients of outer values the body reads,
  and stacks the gradients of its stacked views as its own `saved` (a stacked
  param `w[L,...]` gets `w.grad[L,...]`). Nested repeats nest.
- A value read several times gets the sum of its contributions (one Map add).
  Every gradient has the dtype of its value; half-precision ones are computed
  in float32 and rounded on storing, as the forward pass does.
- Only values that depend on a param and reach the loss get a gradient; a
  param that does not reach the loss gets a zero gradient.
- `remat`: statements whose values the backward pass recomputes (`p.remat`)
  just before their first use instead of reading the kept value.

Names: the gradient of `v` is `v.grad` (`v.grad.1`, `v.grad.2`... for its
partial contributions; further dotted suffixes for temporaries). Inside a
repeat body the gradient of a name the body shares with the outside (a
carried value, a stacked view, an outer value it reads) is `v.grad.L`, L
the repeat's dim. Backward ops keep the forward op's span and name its
statement as `stmt.grad` (`stmt.remat` for recomputation).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

from .expand import expand_library
from .ir import (FLOAT_DTYPES, Apply, Arg, Carried, Cast, Const, Einsum, Library, Map, Op, Operand,
                 Output, Pos, Program, Reduce, Repeat, Route, Saved, Scalar, ScatterAdd, Take,
                 TensorType, Value, work_dtype)

__all__ = ["grad", "format_grad"]


def grad(program: Program, loss: str, remat: frozenset[str] = frozenset()) -> Program:
    """`program` (library ops expanded) with the backward pass of `loss` appended and the
    outputs: the forward outputs, the loss, and `w.grad` for every param `w`."""
    program = expand_library(program)
    # A dry run counts each value's contributions, so that a value with one is named
    # `v.grad` at once and only values with several get `v.grad.1`... and a sum.
    counts = _Grad(program, loss, remat, None).run()[2]
    ops, outputs, _ = _Grad(program, loss, remat, counts).run()
    return replace(program, ops=ops, outputs=outputs)


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
    if isinstance(expr, Arg):
        return {expr.index}
    if isinstance(expr, Cast):
        return _args_used(expr.arg)
    if isinstance(expr, Apply):
        return set().union(*(_args_used(a) for a in expr.args))
    return set()


def _renumber(expr: Scalar, numbers: dict[int, int]) -> Scalar:
    if isinstance(expr, Arg):
        return Arg(numbers[expr.index])
    if isinstance(expr, Cast):
        return Cast(expr.dtype, _renumber(expr.arg, numbers))
    if isinstance(expr, Apply):
        return Apply(expr.fn, tuple(_renumber(a, numbers) for a in expr.args))
    return expr


def _add_all(count: int) -> Scalar:
    expr: Scalar = Arg(0)
    for index in range(1, count):
        expr = _call("add", expr, Arg(index))
    return expr


# ---- which values get a gradient


def _reads(op: Op) -> tuple[Operand, ...]:
    """The operands a gradient can flow to (not a take's or scatter's ids)."""
    if isinstance(op, Take):
        return (op.table,)
    if isinstance(op, ScatterAdd):
        return (op.update,)
    return op.operands


def _defined(ops) -> dict[str, Op]:
    """The values a level of ops defines, each with its op (a repeat's results with the repeat)."""
    table: dict[str, Op] = {}
    for op in ops:
        if isinstance(op, Repeat):
            table.update((c.result.name, op) for c in op.carried)
            table.update((s.result.name, op) for s in op.saved)
        else:
            table[op.result.name] = op
    return table


class _Activity:
    """Which values depend on a param (forward) and reach the loss (backward), per level,
    with a repeat's carried values solved to a fixed point over its trips."""

    def __init__(self, program: Program, loss: str):
        self.floats = {name for name, value in program.values.items()
                       if value.type.dtype in FLOAT_DTYPES}
        self.depends: dict[int, set[str]] = {}  # id(repeat) -> its body's set
        self.reaches: dict[int, set[str]] = {}
        self.top_depends = {value.name for value in program.params}
        self._depend(program.ops, self.top_depends)
        self.top_reaches = {loss}
        self._reach(program.ops, self.top_reaches)

    def _depend(self, ops, depends: set[str]) -> None:
        for op in ops:
            if isinstance(op, Repeat):
                inner = set(depends)
                while True:
                    self._depend(op.body, inner)
                    more = {c.value for c in op.carried if c.body_result in inner} - inner
                    if not more:
                        break
                    inner |= more
                self.depends[id(op)] = inner
                depends.update(c.result.name for c in op.carried if c.body_result in inner)
                depends.update(s.result.name for s in op.saved if s.body_value in inner)
            elif op.result.name in self.floats and any(o.value in depends for o in _reads(op)):
                depends.add(op.result.name)

    def _reach(self, ops, reaches: set[str]) -> None:
        for op in reversed(ops):
            if isinstance(op, Repeat):
                seeds = {c.body_result for c in op.carried if c.result.name in reaches}
                while True:
                    inner = set(seeds)
                    self._reach(op.body, inner)
                    more = {c.body_result for c in op.carried if c.value in inner} - seeds
                    if not more:
                        break
                    seeds |= more
                self.reaches[id(op)] = inner
                defined = _defined(op.body)
                reaches.update(name for name in inner if name not in defined)
            elif op.result.name in reaches:
                reaches.update(o.value for o in _reads(op))


@dataclass(frozen=True)
class _Part:
    """One contribution to a value's gradient: a value, read with `indices`."""

    name: str
    indices: tuple[str, ...]


# ---- the backward pass


class _Grad:
    def __init__(self, program: Program, loss: str, remat: frozenset[str], counts: Counter | None):
        self.program = program
        self.sizes = program.dim_sizes
        self.remat = frozenset(remat)
        self.counts = counts
        self.tally: Counter = Counter()
        self.values: dict[str, Value] = dict(program.values)
        self.saves: dict[int, dict[str, Saved]] = defaultdict(dict)  # id(repeat) -> body value -> Saved
        self.loss_name = loss
        self.loss = loss
        for output in program.outputs:
            if output.name == loss:
                self.loss = output.value
        if self.loss not in self.values:
            raise ValueError(f"no value named {loss!r} to take the gradient of")
        if self.values[self.loss].type.indices:
            raise ValueError(f"the loss {loss!r} is not a scalar")
        self.activity = _Activity(program, self.loss)

    def run(self):
        program = self.program
        top = _Level(self, program.ops, self.activity.top_depends, self.activity.top_reaches)
        loss_value = self.values[self.loss]
        seed = top.emit(Map(top.new_value(f"{self.loss}.grad", loss_value.type), (), ONE,
                            f"{top.stmt_of(self.loss)}.grad", top.span_of(self.loss)))
        top.add_part(self.loss, seed, ())
        top.backward()
        outputs = list(program.outputs)
        if not any(output.name == self.loss_name for output in outputs):
            outputs.append(Output(self.loss_name, self.loss))
        for param in program.params:
            name = top.grad(param.name)
            if name is None:  # the loss does not depend on it
                name = top.zeros(f"{param.name}.grad", param.type, f"{param.name}.grad", param.span)
            asked = [o for o in outputs if o.name == f"{param.name}.grad"]
            layout = asked[0].layout if asked and asked[0].layout is not None else param.layout
            outputs = [o for o in outputs if o.name != f"{param.name}.grad"]
            # The span of an `output w.grad` the user wrote marks it asked for: an optimizer
            # keeps those and drops the others (einpar/optimizer.py).
            outputs.append(Output(f"{param.name}.grad", name, layout,
                                  asked[0].span if asked else None))
        forward = self._with_saves(program.ops)
        return forward + tuple(top.out), tuple(outputs), self.tally

    def _with_saves(self, ops) -> tuple[Op, ...]:
        out = []
        for op in ops:
            if isinstance(op, Repeat):
                saved = op.saved + tuple(self.saves.get(id(op), {}).values())
                op = replace(op, body=self._with_saves(op.body), saved=saved)
            out.append(op)
        return tuple(out)


class _Level:
    """The backward pass of one level of ops: the program's, or a repeat body's (then the
    ops it emits are the body of the backward loop)."""

    def __init__(self, grad: _Grad, ops, depends: set[str], reaches: set[str],
                 parent: "_Level | None" = None, repeat: Repeat | None = None):
        self.g = grad
        self.ops = ops
        self.depends = depends
        self.reaches = reaches
        self.parent = parent
        self.repeat = repeat
        self.defined = _defined(ops)
        self.out: list[Op] = []
        self.parts: dict[str, list[_Part]] = defaultdict(list)
        self.grads: dict[str, str | None] = {}
        self.recomputed: dict[str, str] = {}
        self.views: dict[str, Value] = {v.name: v for v in repeat.stacked} if repeat else {}
        self.carried_in = {c.value for c in repeat.carried} if repeat else set()
        self.backward_views: dict[str, Value] = {}  # the backward loop's stacked views

    # -- names and types

    def key(self, name: str) -> tuple[int, str]:
        return (id(self.repeat) if self.repeat else 0, name)

    def shared(self, name: str) -> bool:
        """A name the body shares with the level outside (carried, a view, an outer value)."""
        return self.repeat is not None and (name in self.views or name not in self.defined)

    def grad_name(self, name: str) -> str:
        return f"{name}.grad.{self.repeat.dim}" if self.shared(name) else f"{name}.grad"

    def type_of(self, name: str) -> TensorType:
        if name in self.views:
            return self.views[name].type
        if self.parent is not None and name not in self.defined and name not in self.carried_in:
            return self.parent.type_of(name)
        return self.g.values[name].type

    def stmt_of(self, name: str) -> str:
        op = self.defined.get(name)
        return op.stmt if op is not None and not isinstance(op, Repeat) else name

    def span_of(self, name: str):
        op = self.defined.get(name)
        if op is not None:
            return op.span
        value = self.g.values.get(name)
        return value.span if value is not None else None

    def active(self, name: str) -> bool:
        return name in self.depends and name in self.reaches and name in self.g.activity.floats

    def new_value(self, name: str, like: TensorType, indices: tuple[str, ...] | None = None,
                  dtype: str | None = None) -> Value:
        if indices is None:
            indices = like.indices
            shape = like.shape
        else:
            shape = tuple(self.g.sizes[i] for i in indices)
        return Value(name, TensorType(dtype or like.dtype, indices, shape))

    def emit(self, op: Op) -> str:
        self.out.append(op)
        self.g.values[op.result.name] = op.result
        return op.result.name

    def zeros(self, name: str, like: TensorType, stmt: str, span) -> str:
        return self.emit(Map(Value(name, like), (), ZERO, stmt, span))

    # -- contributions

    def add_part(self, name: str, part: str, indices: tuple[str, ...]) -> None:
        self.g.tally[self.key(name)] += 1
        self.parts[name].append(_Part(part, indices))

    def new_part(self, name: str, indices: tuple[str, ...]) -> str:
        """A name for a new contribution to `name`'s gradient (read with `indices`)."""
        count = self.g.counts[self.key(name)] if self.g.counts is not None else 0
        base = self.grad_name(name)
        if count == 1 and indices == self.type_of(name).indices:
            part = base
        else:
            part = f"{base}.{len(self.parts[name]) + 1}"
        self.add_part(name, part, indices)
        return part

    def grad(self, name: str) -> str | None:
        """The gradient of `name` at this level, its contributions summed (None: no gradient)."""
        if name in self.grads:
            return self.grads[name]
        parts = self.parts.pop(name, [])
        vtype = self.type_of(name)
        if not parts:
            result = None
        elif len(parts) == 1 and parts[0].indices == vtype.indices \
                and self.g.values[parts[0].name].type.dtype == vtype.dtype:
            result = parts[0].name
        else:
            result = self.emit(Map(Value(self.grad_name(name), vtype),
                                   tuple(Operand(p.name, vtype.indices) for p in parts),
                                   _add_all(len(parts)), f"{self.stmt_of(name)}.grad",
                                   self.span_of(name)))
        self.grads[name] = result
        return result

    # -- reading forward values from the backward pass

    def resolve(self, name: str) -> str:
        """The name the backward code at this level reads forward value `name` by: itself,
        its recomputation, or (in a repeat body) this trip's slice of its saved stack."""
        if name in self.recomputed:
            return self.recomputed[name]
        op = self.defined.get(name)
        if op is not None and not isinstance(op, Repeat) and (
                (self.repeat is not None and self.repeat.remat) or op.stmt in self.g.remat):
            return self.recompute(op)
        if self.repeat is None:
            return name
        if op is not None or name in self.carried_in:
            return self.save(name)
        source = self.parent.resolve(name)  # a stacked view, or an outer value read as is
        if name in self.views:
            self.backward_views.setdefault(source, Value(source, self.views[name].type))
        return source

    def save(self, name: str) -> str:
        repeat = self.repeat
        saves = self.g.saves[id(repeat)]
        if name not in saves:
            vtype = self.type_of(name)
            stack_name = f"{name}.saved"
            while stack_name in self.g.values:  # a name carried by nested repeats alike
                stack_name += f".{repeat.dim}"
            stack = Value(stack_name, TensorType(vtype.dtype, (repeat.dim,) + vtype.indices,
                                                      (repeat.count,) + vtype.shape))
            saves[name] = Saved(name, stack)
            self.g.values[stack.name] = stack
            self.parent.defined[stack.name] = repeat
        source = self.parent.resolve(saves[name].result.name)
        self.backward_views.setdefault(source, Value(source, self.type_of(name)))
        return source

    def recompute(self, op: Op) -> str:
        name = f"{op.result.name}.remat"
        read = lambda o: Operand(self.resolve(o.value), o.indices)
        if isinstance(op, (Einsum, Map)):
            copy = replace(op, operands=tuple(read(o) for o in op.operands))
        elif isinstance(op, Take):
            copy = replace(op, table=read(op.table), ids=read(op.ids))
        elif isinstance(op, ScatterAdd):
            copy = replace(op, update=read(op.update), ids=read(op.ids))
        else:
            copy = replace(op, operand=read(op.operand))
        self.emit(replace(copy, result=replace(op.result, name=name), stmt=f"{op.stmt}.remat"))
        self.recomputed[op.result.name] = name
        return name

    # -- the rules

    def backward(self) -> None:
        for op in reversed(self.ops):
            if isinstance(op, Repeat):
                self.repeat_backward(op)
                continue
            if not self.active(op.result.name):
                continue
            cotangent = self.grad(op.result.name)
            if cotangent is None:
                continue
            cot = Operand(cotangent, op.result.type.indices)
            if isinstance(op, Einsum):
                self.einsum(op, cot)
            elif isinstance(op, Map):
                self.map(op, cot)
            elif isinstance(op, Reduce):
                self.reduce(op, cot)
            elif isinstance(op, Library):
                self.cumsum(op, cot)
            elif isinstance(op, Route):
                self.route(op, cot)
            elif isinstance(op, Take):
                self.take(op, cot)
            elif isinstance(op, ScatterAdd):
                self.scatter_add(op, cot)

    def contribution(self, operand: Operand, make) -> None:
        """Emit `operand`'s contribution: `make(name, vtype)` returns the op that defines it."""
        vtype = self.type_of(operand.value)
        name = self.new_part(operand.value, operand.indices)
        self.emit(make(name, vtype))

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
            if taken:
                taken = self.emit(Map(value(f"taken{rank + 1}", g.indices),
                                      reads + (Operand(taken, g.indices),),
                                      _call("add", Arg(2), chosen), stmt, span))
                proxy = self.emit(Map(value(f"proxy{rank + 1}", g.indices),
                                      reads + (Operand(proxy, g.indices),),
                                      _call("add", Arg(2), _mul(Const(float(op.k - rank)), chosen)),
                                      stmt, span))
            else:
                taken = self.emit(Map(value("taken1", g.indices), reads, chosen, stmt, span))
                proxy = self.emit(Map(value("proxy1", g.indices), reads,
                                      _mul(Const(float(op.k)), chosen), stmt, span))
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

    def take(self, op: Take, cot: Operand) -> None:
        table = op.table
        if not self.active(table.value):
            return
        ids = Operand(self.resolve(op.ids.value), op.ids.indices)
        self.contribution(table, lambda name, vtype: ScatterAdd(
            self.new_value(name, vtype, table.indices), cot, ids, op.index, f"{op.stmt}.grad",
            op.span))

    def scatter_add(self, op: ScatterAdd, cot: Operand) -> None:
        update = op.update
        if not self.active(update.value):
            return
        ids = Operand(self.resolve(op.ids.value), op.ids.indices)
        self.contribution(update, lambda name, vtype: Take(
            self.new_value(name, vtype, update.indices), cot, ids, op.index, f"{op.stmt}.grad",
            op.span))

    # -- repeat

    def repeat_backward(self, op: Repeat) -> None:
        activity = self.g.activity
        depends, reaches = activity.depends[id(op)], activity.reaches[id(op)]
        body = _Level(self.g, op.body, depends, reaches, self, op)
        carried = [c for c in op.carried if body.active(c.value) or body.active(c.body_result)]
        if not carried:
            return
        span = op.span
        where = f"repeat {op.dim}"
        incoming: list[str] = []
        for c in carried:
            start = self.grad(c.result.name)
            if start is None:  # only earlier trips' values reach the loss
                start = self.zeros(f"{c.result.name}.grad", c.result.type, f"{where}.grad", span)
            elif start in incoming:  # two results with one gradient: each carry its own copy
                start = self.emit(Map(Value(f"{c.result.name}.grad.start", c.result.type),
                                      (Operand(start, c.result.type.indices),), Arg(0),
                                      f"{where}.grad", span))
            body.add_part(c.body_result, start, c.result.type.indices)
            incoming.append(start)
        body.backward()
        loop_carried = []
        for c, start in zip(carried, incoming):
            ctype = self.type_of(c.value)
            out = body.grad(c.value)
            if out is None:
                out = body.zeros(body.grad_name(c.value), ctype, f"{where}.grad", span)
            result = self.new_part(c.value, ctype.indices)
            loop_carried.append(Carried(start, out, Value(result, ctype)))
        saved = []
        for view in op.stacked:
            if not body.active(view.name):
                continue
            out = body.grad(view.name)
            if out is None:
                continue
            stype = self.type_of(view.name)
            saved.append(Saved(out, Value(self.new_part(view.name, stype.indices), stype)))
        # Outer values the body reads: their gradients summed over the trips, carried along.
        for name in sorted(n for n in body.parts if body.shared(n) and n not in body.views
                           and n not in body.carried_in):
            otype = self.type_of(name)
            start = self.zeros(f"{name}.grad.{op.dim}.start", otype, f"{where}.grad", span)
            body.add_part(name, start, otype.indices)
            out = body.grad(name)
            loop_carried.append(Carried(start, out, Value(self.new_part(name, otype.indices), otype)))
        self.emit_repeat(Repeat(op.dim, op.count, tuple(loop_carried),
                                tuple(body.backward_views.values()), tuple(body.out), span,
                                tuple(saved), reverse=True))

    def emit_repeat(self, op: Repeat) -> None:
        self.out.append(op)
        for c in op.carried:
            self.g.values[c.result.name] = c.result
        for s in op.saved:
            self.g.values[s.result.name] = s.result


# ---- printing (`einpar compile --emit grad`)

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "gt": ">", "ge": ">=", "lt": "<",
          "le": "<=", "eq": "==", "ne": "!="}


class _Text:
    """`.ein` text for IR values and ops: each value name as an identifier of its own
    (`h.grad` -> `h_grad`, `x#2` -> `x_2`)."""

    def __init__(self, program: Program):
        self.names: dict[str, str] = {}
        self.taken: set[str] = set(program.dim_sizes) | set(program.mesh.names)

    def __call__(self, name: str) -> str:
        if name not in self.names:
            base = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name) or "v"
            if base[0].isdigit():
                base = "v" + base
            ident, number = base, 1
            while ident in self.taken:
                number += 1
                ident = f"{base}_{number}"
            self.taken.add(ident)
            self.names[name] = ident
        return self.names[name]

    def spec(self, name: str, value_type: TensorType, layout=None) -> str:
        indices = []
        for position, index in enumerate(value_type.indices):
            axes = layout.dims[position] if layout is not None else ()
            split = "" if not axes else "@" + (axes[0] if len(axes) == 1 else f"({','.join(axes)})")
            indices.append(index + split)
        return f"{self(name)}[{', '.join(indices)}]"

    def operand(self, operand: Operand) -> str:
        return f"{self(operand.value)}[{','.join(operand.indices)}]"

    def scalar(self, expr: Scalar, operands: tuple[Operand, ...]) -> str:
        if isinstance(expr, Arg):
            return self.operand(operands[expr.index])
        if isinstance(expr, Const):
            if expr.label:
                return expr.label
            value = expr.value
            if isinstance(value, float) and math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return repr(value) if not isinstance(value, bool) else repr(int(value))
        if isinstance(expr, Pos):
            return f"pos({expr.index})"
        if isinstance(expr, Cast):  # the checker inserts casts where dtypes differ
            return self.scalar(expr.arg, operands)
        args = [self.scalar(a, operands) for a in expr.args]
        if expr.fn in _INFIX:
            return f"({args[0]} {_INFIX[expr.fn]} {args[1]})"
        if expr.fn == "neg":
            return f"-{args[0]}"
        return f"{expr.fn}({', '.join(args)})"

    def op(self, op: Op, indent: str) -> list[str]:
        if isinstance(op, Repeat):
            return self.repeat(op, indent)
        result = op.result
        head = f"{indent}{self.spec(result.name, result.type, result.layout)}: {result.type.dtype} = "
        if isinstance(op, Einsum):
            product = " * ".join(self.operand(o) for o in op.operands)
            body = f"sum[{','.join(op.summed)}]({product})" if len(op.operands) == 1 and op.summed \
                else product
        elif isinstance(op, Map):
            body = self.scalar(op.expr, op.operands)
        elif isinstance(op, Reduce):
            body = f"{op.kind}[{','.join(op.over)}]({self.operand(op.operand)})"
        elif isinstance(op, Library):
            body = f"{op.kind}[{op.index}]({self.operand(op.operand)})"
        elif isinstance(op, Route):
            body = f"route[{op.expert},{op.capacity}]({self.operand(op.operand)}, k={op.k})"
        elif isinstance(op, Take):
            body = f"take[{op.index}]({self.operand(op.table)}, {self.operand(op.ids)})"
        else:  # no .ein syntax: the adjoint of take
            body = f"scatter_add[{op.index}]({self.operand(op.update)}, {self.operand(op.ids)})"
        line = f"  # {op.stmt}, line {op.span.line}" if op.span else f"  # {op.stmt}"
        return [head + body + line]

    def repeat(self, op: Repeat, indent: str) -> list[str]:
        # .ein has no syntax for a reversed loop, stacked views of values or saved values:
        # they are shown as comments around the body.
        flags = " reverse" if op.reverse else ""
        lines = [f"{indent}repeat {op.dim}{flags} {{"]
        inner = indent + "  "
        for view in op.stacked:
            lines.append(f"{inner}# stacked: {self(view.name)} is this trip's slice")
        for c in op.carried:
            lines.append(f"{inner}# carried: {self(c.value)} <- {self(c.body_result)}, "
                         f"after the loop {self(c.result.name)}")
        for inner_op in op.body:
            lines.extend(self.op(inner_op, inner))
        for s in op.saved:
            lines.append(f"{inner}# saved: {self(s.body_value)} of every trip as "
                         f"{self.spec(s.result.name, s.result.type)}")
        lines.append(f"{indent}}}")
        return lines


def format_grad(program: Program) -> str:
    """`program` (as `grad` returns it) as `.ein`-like text: valid `.ein` for programs without
    repeats; a repeat's stacked views, carried and saved values are comments, and the
    adjoint of take is written `scatter_add[V](...)`."""
    text = _Text(program)
    lines = [f"# {program.file} with its backward pass (einpar grad)"]
    if program.mesh.axes:
        lines.append("mesh " + " ".join(f"{a}={n}" for a, n in program.mesh.axes))
    lines.append("dim  " + " ".join(f"{name}={size}" for name, size in program.dims))
    lines.append(f"dtype {program.dtype}")
    lines.append("")
    for value in program.inputs:
        kind = "param" if value.kind == "param" else "input"
        stacked = f"  # stacked by {','.join(value.stacked_by)}" if value.stacked_by else ""
        lines.append(f"{kind} {text.spec(value.name, value.type, value.layout)}: {value.type.dtype}"
                     f"{stacked}")
    lines.append("")
    first_backward = next((i for i, op in enumerate(program.ops)
                           if not isinstance(op, Repeat) and op.stmt.endswith(".grad")), None)
    for position, op in enumerate(program.ops):
        if position == first_backward:
            lines.extend(["", "# the backward pass"])
        lines.extend(text.op(op, ""))
    lines.append("")
    values = program.values
    inputs = {value.name for value in program.inputs}
    for output in program.outputs:
        name = text(output.name)
        if output.name in inputs:  # an updated param or state: its own name is the input's
            shown = output.value
            lines.append(f"# the step's updated {output.name}")
            if output.layout is not None:
                lines.append(f"output {text.spec(shown, values[shown].type, output.layout)}")
            else:
                lines.append(f"output {text(shown)}")
            continue
        if text(output.value) != name:
            vtype = values[output.value].type
            lines.append(f"{text.spec(output.name, vtype, output.layout)}: {vtype.dtype} = "
                         f"{text.spec(output.value, vtype)}")
        if output.layout is not None:
            lines.append(f"output {text.spec(output.name, values[output.value].type, output.layout)}")
        else:
            lines.append(f"output {name}")
    return "\n".join(lines) + "\n"

