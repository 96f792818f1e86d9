"""Warnings: a program that checks, but probably does not say what was meant.

A pass over the syntax tree of a module that `check` accepted (so every name
resolves), run by `einpar check` and `einpar compile`. Each rule is a small
function with its own code (errors.WARNING_CODES); a warning is a Diagnostic
with severity "warning", rendered like an error. Warnings never change the
exit code. They are silenced per code with `--ignore W101,W102` (a prefix such
as `W1` or `W` silences several), or on one line with a comment
`# einpar: ignore W101` (no code: every warning on that line).

The rules:

- W100, an input or param never read;
- W101, a statement whose value nothing uses (not an output, never read);
- W102, an index summed by the summation rule that appears in only one operand
  of a product of two or more operands (`o[B,S,H] = p[B,H,S,T] * v[B,T,H,K]`
  sums K over v alone); in a one-operand statement (`s[B] = x[B,S]`) the sum is
  plainly meant, and is not flagged;
- W103, `--set NAME=...` given twice (the last one wins);
- W104, an op with too many strategies to search them all at once (a mesh of
  many axes): the partitioner chose the plan axis by axis, optimal along each
  axis but not proven jointly (`search_limits`, from the compiled program).
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, NamedTuple

from .errors import WARNING_CODES, Diagnostic, Span, source_lines
from .ir import REDUCTIONS
from .syntax import (Binary, Call, Directive, Expr, Module, Name, Negate, OutputDecl, SizeRef,
                     Statement,
                     TensorDecl, TensorRef, gc_paused)
from .syntax import Repeat as RepeatItem

# `# einpar: ignore W101, W102` (or no codes: all) silences warnings on its line.
PRAGMA = re.compile(r"#.*?\beinpar:\s*ignore\b([A-Za-z0-9,\s]*)")

# Functions that bind their bracketed index (it is not free outside them).
_BINDING_FUNCTIONS = tuple(REDUCTIONS) + ("logsumexp", "take")


def _warning(code: str, message: str, span: Span | None = None, hint: str | None = None) -> Diagnostic:
    return Diagnostic(code, message, span, hint, severity="warning")


# ---------------------------------------------------------------- walking the tree


class Placed(NamedTuple):
    """A statement or declaration in program order, with the repeat blocks around it."""

    item: object
    position: int
    blocks: tuple[int, ...]  # ids of the enclosing repeat items, outermost first


def in_order(module: Module) -> list[Placed]:
    """The module's items, repeat blocks opened, in program order."""
    placed: list[Placed] = []
    stack = [(iter(module.items), ())]
    position = 0
    while stack:
        items_left, around = stack[-1]
        item = next(items_left, None)
        if item is None:
            stack.pop()
            continue
        if isinstance(item, RepeatItem):
            stack.append((iter(item.body), around + (id(item),)))
            continue
        placed.append(Placed(item, position, around))
        position += 1
    return placed


def _children(expr: Expr) -> tuple[Expr, ...]:
    if isinstance(expr, Binary):
        return (expr.left, expr.right)
    if isinstance(expr, Negate):
        return (expr.operand,)
    if isinstance(expr, Call):
        return tuple(expr.args) + tuple(kwarg.value for kwarg in expr.kwargs)
    return ()


def _preorder(root: Expr) -> Iterator[Expr]:
    """Every node of an expression, parents before children, left to right (no recursion:
    expressions may be hundreds of levels deep)."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(_children(node)))


def _free_indices(root: Expr) -> dict[int, frozenset[str]]:
    """The free indices of every node (by id), by the language's rules: a reduction or
    logsumexp binds its index, other library functions keep theirs, route adds the
    capacity index."""
    free: dict[int, frozenset[str]] = {}
    for node in reversed(list(_preorder(root))):  # children before parents
        if isinstance(node, TensorRef):
            found = frozenset(index.name.text for index in node.spec.indices)
        else:
            found = frozenset().union(*(free[id(child)] for child in _children(node)))
            if isinstance(node, Call) and node.func.text == "pos" and len(node.args) == 1 \
                    and isinstance(node.args[0], SizeRef):
                found = frozenset((node.args[0].name.text,))  # pos(S) varies along S
            if isinstance(node, Call) and node.indices is not None:
                bracket = [index.name.text for index in node.indices]
                if node.func.text in _BINDING_FUNCTIONS:
                    found = found - set(bracket)
                elif node.func.text == "route" and len(bracket) == 2:
                    found = found | {bracket[1]}
        free[id(node)] = found
    return free


def _factors(product: Binary) -> list[Expr]:
    """The operands of a product, `(a * b) * c` and `a * (b * c)` alike (one n-ary product,
    as the checker contracts it)."""
    factors, stack = [], [product]
    while stack:
        node = stack.pop()
        if isinstance(node, Binary) and node.op == "*":
            stack.extend((node.right, node.left))
        else:
            factors.append(node)
    return factors


def _reads(expr: Expr) -> Iterator[str]:
    for node in _preorder(expr):
        if isinstance(node, TensorRef):
            yield node.spec.name.text


# ---------------------------------------------------------------- the rules


def unread_tensors(placed: list[Placed]) -> Iterator[Diagnostic]:
    """W100: an input or param that no statement reads and no output names."""
    read = {name for p in placed if isinstance(p.item, Statement) for name in _reads(p.item.rhs)}
    read |= {p.item.name.text for p in placed if isinstance(p.item, OutputDecl)}
    for p in placed:
        if isinstance(p.item, TensorDecl) and p.item.spec.name.text not in read:
            name = p.item.spec.name
            yield _warning("W100", f"{p.item.kind} '{name}' is never read", name.span,
                           hint="use it in a statement, or remove the declaration")


def unused_values(placed: list[Placed]) -> Iterator[Diagnostic]:
    """W101: a statement whose value is not an output and is read by no later statement
    (nor, inside a repeat block, by any statement of the block: the next trip reads it)."""
    outputs = {p.item.name.text for p in placed if isinstance(p.item, OutputDecl)}
    # The loss of a training step is used: its gradient is taken.
    outputs |= {p.item.args[0].text for p in placed if isinstance(p.item, Directive)
                and p.item.word.text == "loss" and len(p.item.args) == 1
                and isinstance(p.item.args[0], Name)}
    reads: dict[str, list[Placed]] = {}
    for p in placed:
        if isinstance(p.item, Statement):
            for name in set(_reads(p.item.rhs)):
                reads.setdefault(name, []).append(p)
    for p in placed:
        if not isinstance(p.item, Statement):
            continue
        name = p.item.lhs.name
        if name.text in outputs:
            continue
        blocks = set(p.blocks)
        if any(r.position > p.position or blocks & set(r.blocks) for r in reads.get(name.text, ())):
            continue
        yield _warning("W101", f"'{name}' is computed but never used", name.span,
                       hint=f"declare it an output (`output {name}`), read it in a later statement, "
                            "or remove the statement")


def summed_in_one_operand(placed: list[Placed]) -> Iterator[Diagnostic]:
    """W102: the summation rule sums an index that only one operand of a product has."""
    for p in placed:
        if not isinstance(p.item, Statement):
            continue
        statement = p.item
        free = _free_indices(statement.rhs)
        kept = {index.name.text for index in statement.lhs.indices}
        summed = free[id(statement.rhs)] - kept
        if not summed:
            continue
        bound = _bound_above(statement.rhs)
        products = [node for node in _preorder(statement.rhs) if _is_product(node)]
        # `a * b * c` is one product, ((a * b) * c) in the tree: only its top node counts.
        inner = {id(child) for node in products for child in _children(node) if _is_product(child)}
        warned: set[str] = set()
        for node in products:
            if id(node) in inner:
                continue
            operands = [f for f in _factors(node) if free[id(f)]]  # numbers and sizes only scale
            if len(operands) < 2:
                continue
            # An index a sum[...] around the product binds is summed there, on purpose.
            candidates = summed - warned - bound[id(node)]
            for index in sorted(candidates, key=lambda i: _position(statement.rhs, i)):
                having = [f for f in operands if index in free[id(f)]]
                if len(having) != 1:
                    continue
                warned.add(index)
                where = _first_use(having[0], index)
                lhs = statement.lhs.name
                yield _warning(
                    "W102", f"index '{index}' is summed, but only one operand of the product has it",
                    where, hint=f"'{lhs}' does not have {index}: add it to the left-hand side to keep "
                                f"it, or write sum[{index}](...) around that operand to sum it on purpose")


def _bound_above(root: Expr) -> dict[int, frozenset[str]]:
    """For every node (by id), the indices a reduction or logsumexp around it binds."""
    bound = {id(root): frozenset()}
    for node in _preorder(root):
        inside = bound[id(node)]
        if isinstance(node, Call) and node.indices is not None \
                and node.func.text in _BINDING_FUNCTIONS:
            inside = inside | {index.name.text for index in node.indices}
        for child in _children(node):
            bound[id(child)] = inside
    return bound


def _is_product(node: Expr) -> bool:
    return isinstance(node, Binary) and node.op == "*"


def _position(expr: Expr, index: str) -> tuple[int, int]:
    span = _first_use(expr, index)
    return span.line, span.col


def _first_use(expr: Expr, index: str) -> Span:
    for node in _preorder(expr):
        if isinstance(node, TensorRef):
            for spec in node.spec.indices:
                if spec.name.text == index:
                    return spec.name.span
    return expr.span


RULES = (unread_tensors, unused_values, summed_in_one_operand)


# ---------------------------------------------------------------- running them


def lint(module: Module, source: str = "", ignore: Iterable[str] = ()) -> list[Diagnostic]:
    """The warnings for a module that checks, in source order, less those ignored by code
    (or code prefix) and those silenced by a `# einpar: ignore` comment on their line."""
    with gc_paused():  # many small objects, none freed: the collector's passes are wasted
        placed = in_order(module)
        found = [warning for rule in RULES for warning in rule(placed)]
    return _kept(found, source, ignore)


def _kept(found: list[Diagnostic], source: str, ignore: Iterable[str]) -> list[Diagnostic]:
    """`found` in source order, less the warnings `--ignore` or a line's pragma silences."""
    silenced = pragmas(source)
    kept = [w for w in found if not ignored(w, ignore)
            and not (w.span and ignored(w, silenced.get(w.span.line, ())))]
    return sorted(kept, key=lambda w: (w.span.line, w.span.col) if w.span else (0, 0))


def search_limits(limits, source: str = "", ignore: Iterable[str] = ()) -> list[Diagnostic]:
    """W104 where the partitioner searched axis by axis (partition.SearchLimit)."""
    found = [_warning(
        "W104", f"'{limit.value.name}' has {limit.strategies:,} ways to lay out its work over the "
                f"mesh's {limit.axes} axes, too many to search together; the partitioner chose "
                "the plan axis by axis (optimal along each axis, not proven jointly)",
        limit.value.span,
        hint="a better plan may change several axes at once: pin this statement's layout (or "
             "its operands') to the one you want, or set unused mesh axes to 1 with --set")
        for limit in limits]
    return _kept(found, source, ignore)


def pragmas(source: str) -> dict[int, tuple[str, ...]]:
    """Line number -> the codes a `# einpar: ignore ...` comment on it silences ("" for all)."""
    silenced: dict[int, tuple[str, ...]] = {}
    for number, line in enumerate(source_lines(source), 1):
        match = PRAGMA.search(line)
        if match:
            silenced[number] = tuple(re.findall(r"[A-Za-z]+\d*", match.group(1))) or ("",)
    return silenced


def ignored(warning: Diagnostic, codes: Iterable[str]) -> bool:
    return any(warning.code.startswith(code.upper()) for code in codes)


def unknown_codes(codes: Iterable[str]) -> list[str]:
    """The codes of `--ignore` that silence no warning (neither a code nor a prefix of one)."""
    return [code for code in codes
            if not any(known.startswith(code.upper()) for known in WARNING_CODES) or not code]


def repeated_overrides(assignments: Iterable[str], ignore: Iterable[str] = ()) -> list[Diagnostic]:
    """W103: a `--set` name given more than once; the last value is the one used."""
    given: dict[str, list[str]] = {}
    for text in assignments:
        for part in text.split():
            name, _, value = part.partition("=")
            given.setdefault(name, []).append(value)
    found = []
    for name, values in given.items():
        if len(values) > 1:
            earlier = ", ".join(f"{name}={value}" for value in values[:-1])
            times = "twice" if len(values) == 2 else f"{len(values)} times"
            found.append(_warning("W103", f"--set {name} is given {times}; the last, "
                                          f"{name}={values[-1]}, is used",
                                  hint=f"drop {earlier}"))
    return [w for w in found if not ignored(w, ignore)]
