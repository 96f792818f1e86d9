"""Reverse-mode differentiation of a Program (Program -> Program).

`grad(program, loss)` returns the program with its backward pass appended as
ordinary ops (Einsum, Map, Reduce, Library cumsum, Route, Take/ScatterAdd,
Repeat), and the gradient of `loss` with respect to every param as the
output `w.grad`. Because the result is an ordinary Program, the partitioner,
every backend and the cost model handle the backward pass like any program.
This module is the pass: which values get a gradient, the levels of nested
repeats, contributions and their sums, saving and recomputation. The rules of
each op are in einpar/grad_rules.py, the `.ein` printing in grad_text.py.
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
  extrema, `(x == y) / count` (JAX's reduce_max rule). A Reduce marked
  `stop_gradient` (the max a softmax or logsumexp subtracts, which cancels)
  carries none, as in JAX's softmax.
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

from collections import Counter, defaultdict
from dataclasses import dataclass, replace

from .expand import expand_library
from .grad_rules import ONE, ZERO, OpRules, add_all
from .grad_text import format_grad
from .ir import (FLOAT_DTYPES, Arg, Carried, Map, Op, Operand, Output, Program, Repeat, Saved,
                 ScatterAdd, Take, TensorType, Value, with_operands)

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
            elif op.result.name in self.floats and not getattr(op, "stop_gradient", False) \
                    and any(o.value in depends for o in _reads(op)):
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


class _Level(OpRules):
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
                                   add_all(len(parts)), f"{self.stmt_of(name)}.grad",
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
        copy = with_operands(op, tuple(Operand(self.resolve(o.value), o.indices)
                                       for o in op.operands))
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
            self.rule(op, Operand(cotangent, op.result.type.indices))

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
            else:
                out = body.pin_like(out, _carried_pin(op, c))
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
                                tuple(saved), reverse=True, stage_axis=op.stage_axis))

    def pin_like(self, name: str, layout) -> str:
        """Pin the statement making gradient `name` to `layout` (its value's pin): a loop
        carries a gradient in the layout it carries the value in, as Megatron's backward
        pass keeps dL/dx split like x. Nothing where this level did not make it."""
        if layout is None:
            return name
        for index, op in enumerate(self.out):
            if not isinstance(op, Repeat) and op.result.name == name:
                result = replace(op.result, layout=layout)
                self.out[index] = replace(op, result=result)
                self.g.values[name] = result
        return name

    def emit_repeat(self, op: Repeat) -> None:
        self.out.append(op)
        for c in op.carried:
            self.g.values[c.result.name] = c.result
        for s in op.saved:
            self.g.values[s.result.name] = s.result


def _carried_pin(op: Repeat, carried: Carried):
    """The layout the user pinned a loop's carried value to (the pin of the body statement
    that makes it), or None."""
    for inner in op.body:
        if not isinstance(inner, Repeat) and inner.result.name == carried.body_result:
            if inner.result.layout is not None and not inner.result.layout.partial:
                return inner.result.layout
    return None

