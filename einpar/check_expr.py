"""Typing the right side of a statement (part of the checker, einpar/check.py).

`ExpressionTyping.type_expr` builds a typed tree of an expression (`Node`: its
dtype, free indices and how often each is used), checking names, functions and
their arguments; `place_implicit_sums` then applies the summation rule to it.
The dtype promotion rules are here too.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Union

from .errors import Label, Span
from .ir import (BINARY_OPS, COMPARISONS, FLOAT_DTYPES, LIBRARY_FUNCTIONS, REDUCTIONS,
                 UNARY_FUNCTIONS, Operand)
from .syntax import Binary, Call, Negate, Number, SizeRef, TensorRef, TensorSpec

if TYPE_CHECKING:
    from .check import _Scope

ELEMENTWISE_FUNCTIONS = {**{name: 1 for name in UNARY_FUNCTIONS}, "where": 3, "max2": 2, "min2": 2,
                         "pow": 2}
ALL_FUNCTIONS = tuple(ELEMENTWISE_FUNCTIONS) + REDUCTIONS + LIBRARY_FUNCTIONS + ("route", "take", "pos")
# Elementwise functions whose result is a float even of integer arguments (as `/` is).
FLOAT_FUNCTIONS = ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "gelu", "silu", "sin", "cos",
                   "erf", "pow")
# `inf` in an expression is the float literal, unless a dim is named `inf` (then it is its size).
INFINITY = "inf"
DEFAULT_TOP_K = 2  # route's k when not given: GShard's top-2


class Abort(Exception):
    """Stop checking the current statement; its diagnostic is already recorded."""


def did_you_mean(name: str, candidates) -> str | None:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None



# ---------------------------------------------------------------- dtypes

WEAK_INT, WEAK_FLOAT = "~int", "~float"  # untyped numbers and sizes: they adopt the other side's type
_RANK = {"bool": 0, "i32": 1, "f8e4m3": 2, "f8e5m2": 2, "f16": 3, "bf16": 3, "f32": 4, "f64": 5}


def promote(a: str, b: str, default_float: str) -> str:
    """The dtype of an arithmetic result, by JAX's rules for weak scalars."""
    weak = (WEAK_INT, WEAK_FLOAT)
    if a in weak and b in weak:
        return WEAK_FLOAT if WEAK_FLOAT in (a, b) else WEAK_INT
    if a in weak or b in weak:
        scalar, tensor = (a, b) if a in weak else (b, a)
        if scalar == WEAK_FLOAT and tensor in ("bool", "i32"):
            return default_float
        if tensor == "bool":
            return "i32"
        return tensor
    if a == b:
        return a
    if {a, b} == {"f16", "bf16"}:
        return "f32"
    if {a, b} == {"f8e4m3", "f8e5m2"}:  # neither holds the other; bf16 holds both exactly
        return "bf16"
    return a if _RANK[a] > _RANK[b] else b


# ---------------------------------------------------------------- typed expression tree


@dataclass(frozen=True)
class Node:
    kind: str  # ref, const, apply, reduce, library, route, take, pos
    free: tuple[str, ...]  # free indices, in order of first appearance
    dtype: str  # a dtype, or WEAK_INT / WEAK_FLOAT for constants
    span: Span
    children: tuple["Node", ...] = ()
    # kind-specific payload
    operand: Operand | None = None  # ref
    value: Union[int, float, None] = None  # const
    label: str | None = None  # const: the dim whose size it is
    fn: str | None = None  # apply: primitive; reduce/library: the kind
    over: tuple[str, ...] = ()  # reduce/library indices; route: (E, C); take: (V,); pos: (S,)
    k: int = 0  # route
    # How many times each index is used inside this node (summation rule).
    uses: tuple[tuple[str, int], ...] = ()

    def use_count(self, index: str) -> int:
        return dict(self.uses).get(index, 0)

    @property
    def is_constant(self) -> bool:
        return self.kind == "const" or (self.kind == "apply" and all(c.is_constant for c in self.children))


def _merge_free(*groups: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for group in groups:
        for index in group:
            if index not in out:
                out.append(index)
    return tuple(out)


def _merge_uses(*children: Node, extra: tuple[str, ...] = (), remove: tuple[str, ...] = ()):
    counts: dict[str, int] = {}
    for child in children:
        for index, n in child.uses:
            counts[index] = counts.get(index, 0) + n
    for index in extra:
        counts[index] = counts.get(index, 0) + 1
    for index in remove:
        counts.pop(index, None)
    return tuple(counts.items())


def _sum_node(over: tuple[str, ...], child: Node) -> Node:
    dtype = "i32" if child.dtype == "bool" else child.dtype
    return _with_children(Node("reduce", (), dtype, child.span, fn="sum", over=over), (child,))


def _with_children(node: Node, children: tuple[Node, ...]) -> Node:
    """The node over new children, its free indices and use counts derived again."""
    if node.kind == "apply":
        free = _merge_free(*(child.free for child in children))
        uses = _merge_uses(*children)
    elif node.kind == "reduce":
        free = tuple(i for i in children[0].free if i not in node.over)
        uses = _merge_uses(*children, remove=node.over)
    elif node.kind == "take":
        # take[V] binds V like a reduction: the result has the ids' indices, then the
        # table's other than V (an index of both, a batch index, once).
        table, ids = children
        free = _merge_free(ids.free, tuple(i for i in table.free if i not in node.over))
        uses = _merge_uses(*children, remove=node.over)
    elif node.kind == "library" and node.fn == "logsumexp":
        # logsumexp reduces its index: like sum[T], it binds the index locally.
        free = tuple(i for i in children[0].free if i not in node.over)
        uses = _merge_uses(*children, remove=node.over)
    elif node.kind == "library":
        # The others keep their index, and use it themselves: a sum over it
        # happens outside the op (sum[T] of softmax[T] is 1, not softmax of a sum).
        free, uses = children[0].free, _merge_uses(*children, extra=node.over)
    else:
        assert node.kind == "route"
        expert, capacity = node.over
        free = _merge_free(*((i, capacity) if i == expert else (i,) for i in children[0].free))
        uses = _merge_uses(*children, extra=node.over)
    return replace(node, children=children, free=free, uses=uses)


def place_implicit_sums(root: Node, summed: tuple[str, ...]) -> Node:
    """The summation rule: sum each index at the smallest subexpression holding all its uses."""

    def place(node: Node, targets: tuple[str, ...]) -> Node:
        here: list[str] = []
        per_child: list[list[str]] = [[] for _ in node.children]
        for index in targets:
            total = node.use_count(index)
            for position, child in enumerate(node.children):
                if child.use_count(index) == total:
                    per_child[position].append(index)
                    break
            else:
                here.append(index)
        if any(per_child):
            children = tuple(place(child, tuple(t)) if t else child
                             for child, t in zip(node.children, per_child))
            node = _with_children(node, children)
        if here:
            ordered = tuple(i for i in node.free if i in here)
            node = _sum_node(ordered, node)
        return node

    return place(root, summed) if summed else root


class ExpressionTyping:
    """The checker's typing of expressions, a mixin of check._Checker."""


    # ---- expressions

    def type_expr(self, expr, scope: _Scope) -> Node:
        if isinstance(expr, Number):
            weak = WEAK_INT if isinstance(expr.value, int) else WEAK_FLOAT
            return Node("const", (), weak, expr.span, value=expr.value)
        if isinstance(expr, SizeRef):
            name = expr.name
            if name.text not in self.dims:
                if name.text in self.dim_spans:
                    raise Abort()
                if name.text == INFINITY:
                    return Node("const", (), WEAK_FLOAT, expr.span, value=float("inf"))
                hint = did_you_mean(name.text, self.dims)
                if scope.lookup(name.text) is not None or name.text in self.all_definitions:
                    hint = f"'{name}' is a tensor: index it, e.g. {name}[...]"
                self.fail("E203", f"unknown dimension '{name}'", name.span,
                          hint=hint or "a bare name in an expression is a dimension's size")
            return Node("const", (), WEAK_INT, expr.span, value=self.dims[name.text], label=name.text)
        if isinstance(expr, TensorRef):
            return self.type_ref(expr.spec, scope)
        if isinstance(expr, Negate):
            child = self.type_expr(expr.operand, scope)
            if child.kind == "const" and child.value == float("inf") and child.label is None:
                return replace(child, value=float("-inf"), span=expr.span)  # the literal -inf
            return self.apply("neg", (child,), expr.span)
        if isinstance(expr, Binary):
            left = self.type_expr(expr.left, scope)
            right = self.type_expr(expr.right, scope)
            return self.apply(BINARY_OPS[expr.op], (left, right), expr.span)
        assert isinstance(expr, Call)
        return self.type_call(expr, scope)

    def type_ref(self, spec: TensorSpec, scope: _Scope) -> Node:
        value = self.lookup_tensor(spec.name, scope)
        vtype = value.type
        if len(spec.indices) != vtype.rank:
            declared = ", ".join(vtype.indices)
            self.fail("E210", f"'{spec.name}' has {vtype.rank} dimension{'s' * (vtype.rank != 1)} "
                              f"[{declared}] but is indexed with {len(spec.indices)}",
                      spec.indices_span, hint=f"write {spec.name}[{declared}] (indices bind by position)",
                      labels=(Label(value.span, "declared here"),) if value.span else ())
        seen: dict[str, Span] = {}
        if spec.pin is not None:
            self.fail("E216", f"layout braces in an expression: '{spec.name}[...]{{...}}'", spec.pin.span,
                      hint="braces go on the left of a statement, as in y[B,D]{sum: tp} = ...")
        for position, index in enumerate(spec.indices):
            if index.axes:
                self.fail("E216", f"layout annotation in an expression: '{index.name}@...'",
                          index.span, hint="layouts go on declarations and on the left of statements")
            size = self.dim_size(index.name)
            if index.name.text in seen:
                self.fail("E212", f"index '{index.name}' appears twice in '{spec.name}'", index.name.span,
                          hint=f"declare an alias (`dim {index.name}2={index.name}`) and use it for "
                               "the second dimension",
                          labels=(Label(seen[index.name.text], "first here"),))
            seen[index.name.text] = index.name.span
            if size != vtype.shape[position]:
                self.fail("E211", f"index {index.name} has size {size} but dimension {position + 1} "
                                  f"of '{spec.name}' ({vtype.indices[position]}) has size "
                                  f"{vtype.shape[position]}", index.name.span,
                          hint=f"use an index of size {vtype.shape[position]} here, "
                               f"such as {vtype.indices[position]}",
                          labels=(Label(value.span, "declared here"),) if value.span else ())
        indices = tuple(index.name.text for index in spec.indices)
        return Node("ref", indices, vtype.dtype, spec.span, operand=Operand(value.name, indices),
                     uses=tuple((i, 1) for i in indices))

    def resolve_weak(self, dtype: str) -> str:
        """Numbers alone take the program's dtype; fractions never truncate to integers."""
        if dtype == WEAK_FLOAT:
            return self.default_float
        return self.dtype if dtype == WEAK_INT else dtype

    @property
    def default_float(self) -> str:
        return self.dtype if self.dtype in FLOAT_DTYPES else "f32"

    def apply(self, fn: str, children: tuple[Node, ...], span: Span) -> Node:
        """An elementwise node; its dtype by promotion."""
        dtypes = [child.dtype for child in children]
        if fn in COMPARISONS:
            dtype = "bool"
        elif fn == "where":
            dtype = promote(dtypes[1], dtypes[2], self.default_float)
        else:
            dtype = dtypes[0]
            for other in dtypes[1:]:
                dtype = promote(dtype, other, self.default_float)
            float_result = fn == "div" or fn in FLOAT_FUNCTIONS
            if float_result and dtype in ("bool", "i32", WEAK_INT):
                dtype = self.default_float if dtype != WEAK_INT else WEAK_FLOAT
            elif dtype == "bool":
                dtype = "i32"  # arithmetic on booleans counts them
        if fn == "mul":
            # A product of several factors is one n-ary node: the summation rule
            # sums an index over the whole product (one n-ary contraction), and
            # since a product distributes over sums, that is the same value.
            children = tuple(factor for child in children
                             for factor in (child.children if child.kind == "apply" and child.fn == "mul"
                                            else (child,)))
        free = _merge_free(*(child.free for child in children))
        return Node("apply", free, dtype, span, children, fn=fn, uses=_merge_uses(*children))

    def type_call(self, call: Call, scope: _Scope) -> Node:
        name = call.func.text
        if name not in ALL_FUNCTIONS:
            self.fail("E204", f"unknown function '{name}'", call.func.span,
                      hint=did_you_mean(name, ALL_FUNCTIONS) or
                      "see docs/language.md for the functions of the language")
        if name == "pos":
            return self.type_pos(call)
        indexed = name in REDUCTIONS or name in LIBRARY_FUNCTIONS or name in ("route", "take")
        if indexed and call.indices is None:
            example = "route[E,C](g, k=2)" if name == "route" else f"{name}[I](...)"
            self.fail("E214", f"'{name}' needs the index it works over in brackets", call.func.span,
                      hint=f"write {example}")
        if not indexed and call.indices is not None:
            self.fail("E214", f"'{name}' is elementwise and takes no indices", call.span,
                      hint=f"write {name}(...)")
        allowed_kwargs = ("k",) if name == "route" else ()
        for kwarg in call.kwargs:
            if kwarg.name.text not in allowed_kwargs:
                self.fail("E214", f"'{name}' has no argument '{kwarg.name}'", kwarg.span,
                          hint="route takes k=...; other functions take no named arguments"
                          if name != "route" else "route takes only k=...")
        arity = ELEMENTWISE_FUNCTIONS.get(name, 2 if name == "take" else 1)
        if len(call.args) != arity:
            self.fail("E214", f"'{name}' takes {arity} argument{'s' * (arity != 1)}, "
                              f"got {len(call.args)}", call.span)
        args = tuple(self.type_expr(arg, scope) for arg in call.args)
        if not indexed:
            return self.apply(name, args, call.span)
        indices = []
        seen: dict[str, Span] = {}
        for spec in call.indices:
            if spec.axes:
                self.fail("E216", f"layout annotation in an expression: '{spec.name}@...'", spec.span,
                          hint="layouts go on declarations and on the left of statements")
            self.dim_size(spec.name)
            if spec.name.text in seen:
                self.fail("E212", f"index '{spec.name}' appears twice in {name}[...]", spec.name.span,
                          labels=(Label(seen[spec.name.text], "first here"),))
            seen[spec.name.text] = spec.name.span
            indices.append(spec.name.text)
        if name == "route":
            return self.type_route(call, args[0], tuple(indices))
        if name == "take":
            return self.type_take(call, args, tuple(indices))
        if name in LIBRARY_FUNCTIONS and len(indices) != 1:
            self.fail("E214", f"'{name}' works over one index, got {len(indices)}", call.span,
                      hint=f"write {name}[{indices[0] if indices else 'I'}](...)")
        if not indices:
            self.fail("E214", f"'{name}' over no index", call.span,
                      hint=f"write {name}[I](...) with the indices it reduces over")
        child = args[0]
        for spec in call.indices:
            if spec.name.text not in child.free:
                have = ", ".join(child.free) or "none"
                self.fail("E213", f"{name} over index {spec.name}, which its operand does not have",
                          spec.name.span, hint=f"the operand's indices are: {have}")
        if name in REDUCTIONS:
            dtype = child.dtype
            if name == "mean" and dtype in ("bool", "i32"):
                dtype = self.default_float
            elif name == "sum" and dtype == "bool":
                dtype = "i32"
            node = Node("reduce", (), dtype, call.span, fn=name, over=tuple(indices))
            return _with_children(node, (child,))
        dtype = child.dtype
        if name != "cumsum" and dtype in ("bool", "i32", WEAK_INT, WEAK_FLOAT):
            dtype = self.default_float
        elif name == "cumsum" and dtype == "bool":
            dtype = "i32"
        node = Node("library", (), dtype, call.span, fn=name, over=tuple(indices))
        return _with_children(node, (child,))

    def type_pos(self, call: Call) -> Node:
        """`pos(S)`: the position along index S, an i32 that varies along S only."""
        if call.indices is not None:
            self.fail("E214", "'pos' takes the index in parentheses, not in brackets", call.span,
                      hint="write pos(S)")
        if call.kwargs:
            self.fail("E214", f"'pos' has no argument '{call.kwargs[0].name}'", call.kwargs[0].span,
                      hint="write pos(S)")
        if len(call.args) != 1:
            self.fail("E214", f"'pos' takes 1 argument, got {len(call.args)}", call.span,
                      hint="write pos(S) with the index whose positions you want")
        arg = call.args[0]
        if not isinstance(arg, SizeRef):
            self.fail("E218", "pos takes an index name, not an expression", arg.span,
                      hint="write pos(S): the 0-based position along S (a dim)")
        name = arg.name
        if name.text not in self.dims:
            if name.text in self.dim_spans:
                raise Abort()  # its declaration already failed
            self.fail("E203", f"unknown dimension '{name}'", name.span,
                      hint=did_you_mean(name.text, self.dims) or "pos(S) needs S declared with `dim`")
        return Node("pos", (name.text,), "i32", call.span, over=(name.text,),
                     uses=((name.text, 1),))

    def type_take(self, call: Call, args: tuple[Node, ...], indices: tuple[str, ...]) -> Node:
        """`take[V](table, ids)`: rows of the table at integer ids (an embedding lookup)."""
        if len(indices) != 1:
            self.fail("E217", f"take selects along one index of the table, got {len(indices)}",
                      call.span, hint="write take[V](table[V,D], ids[B,S])")
        (index,) = indices
        index_span = call.indices[0].name.span
        table, ids = args
        if index not in table.free:
            self.fail("E217", f"take along {index}, which the table does not have", index_span,
                      hint=f"the table's indices are: {', '.join(table.free) or 'none'}")
        if ids.dtype not in ("i32", WEAK_INT):
            self.fail("E217", f"take's ids must be integers (i32), not {self.resolve_weak(ids.dtype)}",
                      ids.span, hint="declare them as integers, e.g. `input ids[B,S] : i32`")
        if index in ids.free:
            self.fail("E217", f"take's ids have the index {index} they select along", ids.span,
                      hint=f"the ids pick positions along {index}; index them by other dims, "
                           f"e.g. ids[B,S]")
        # An index of both the table and the ids is a batch index (jnp.take_along_axis): the
        # ids at each of its positions look up that position's table.
        ids = replace(ids, dtype="i32")  # a number as an id is an i32
        node = Node("take", (), table.dtype, call.span, over=(index,))
        return _with_children(node, (table, ids))

    def type_route(self, call: Call, gate: Node, indices: tuple[str, ...]) -> Node:
        if len(indices) != 2:
            self.fail("E215", f"route takes two indices, the experts and their capacity slots "
                              f"(route[E,C]), got {len(indices)}", call.span)
        expert, capacity = indices
        expert_span, capacity_span = call.indices[0].name.span, call.indices[1].name.span
        if expert not in gate.free:
            self.fail("E215", f"route over experts {expert}, which the gate does not have", expert_span,
                      hint=f"the gate's indices are: {', '.join(gate.free) or 'none'}")
        if capacity in gate.free:
            self.fail("E215", f"capacity index {capacity} is already an index of the gate", capacity_span,
                      hint="the capacity index is new: it numbers each expert's slots")
        if len(gate.free) < 2:
            self.fail("E215", "route needs a token index besides the experts", call.span,
                      hint="the gate is g[..., S, E]: tokens along S, one probability per expert")
        k, k_span = DEFAULT_TOP_K, call.span
        for kwarg in call.kwargs:
            if not isinstance(kwarg.value, Number) or not isinstance(kwarg.value.value, int):
                self.fail("E215", "route's k must be a whole number", kwarg.value.span)
            k, k_span = kwarg.value.value, kwarg.value.span
        if not 1 <= k <= self.dims[expert]:
            default = "" if call.kwargs else f" (the default, top-{DEFAULT_TOP_K})"
            self.fail("E215", f"route's k={k}{default} must be between 1 and the number of experts "
                              f"({expert}={self.dims[expert]})", k_span)
        dtype = gate.dtype if gate.dtype in FLOAT_DTYPES else self.default_float
        node = Node("route", (), dtype, call.span, over=(expert, capacity), k=k)
        return _with_children(node, (gate,))
