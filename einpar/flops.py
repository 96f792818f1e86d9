"""FLOP counts of the ops of a Program, for `einpar check` and the cost model.

Conventions (stated once, used everywhere):
- a contraction step over the union of its operands' indices costs 2 FLOPs
  per point (a multiply and an add) when it sums an index, 1 when it only
  multiplies; an n-ary Einsum is contracted pairwise in the greedy order
  below, the order the backends may also use;
- a Map costs one FLOP per primitive function per output element (casts are
  free, transcendental functions count as one);
- a Reduce costs one FLOP per input element;
- library functions cost a fixed number of FLOPs per element (LIBRARY_FLOPS);
- routing costs k·E per token, which is negligible and counted for honesty.
"""

from __future__ import annotations

from itertools import combinations

from .ir import Apply, Cast, Einsum, Library, Map, Op, Program, Reduce, Repeat, Route, Scalar

# Per element: softmax = max, subtract, exp, sum, divide; logsumexp = max, subtract, exp, sum
# (+ log per row, ignored); rmsnorm = square, sum, scale; layernorm = sum, subtract, square,
# sum, scale (+ the per-row sqrt, ignored); cumsum = one add.
LIBRARY_FLOPS = {"softmax": 5, "logsumexp": 4, "rmsnorm": 3, "layernorm": 5, "cumsum": 1}


def _product(sizes) -> int:
    total = 1
    for size in sizes:
        total *= size
    return total


def contraction_order(operands: list[tuple[str, ...]], out: tuple[str, ...],
                      sizes: dict[str, int]) -> tuple[list[tuple[int, int]], int]:
    """Greedy pairwise order for an n-ary contraction and its FLOPs.

    At each step contract the pair whose step costs least (ties to the first
    pair), keeping only indices still needed by other operands or the output.
    Returns the list of pairs (positions in the shrinking operand list) and
    the total FLOPs.
    """
    remaining = [tuple(o) for o in operands]
    steps: list[tuple[int, int]] = []
    total = 0
    if len(remaining) == 1:
        return steps, _product(sizes[i] for i in remaining[0])
    while len(remaining) > 1:
        best = None
        for a, b in combinations(range(len(remaining)), 2):
            union = tuple(dict.fromkeys(remaining[a] + remaining[b]))
            others = [idx for k, o in enumerate(remaining) if k not in (a, b) for idx in o]
            kept = tuple(i for i in union if i in out or i in others)
            summed = len(kept) < len(union)
            cost = _product(sizes[i] for i in union) * (2 if summed else 1)
            if best is None or cost < best[0]:
                best = (cost, a, b, kept)
        cost, a, b, kept = best
        total += cost
        steps.append((a, b))
        remaining = [o for k, o in enumerate(remaining) if k not in (a, b)] + [kept]
    return steps, total


def _scalar_ops(expr: Scalar) -> int:
    if isinstance(expr, Apply):
        return 1 + sum(_scalar_ops(arg) for arg in expr.args)
    if isinstance(expr, Cast):
        return _scalar_ops(expr.arg)
    return 0


def op_flops(op: Op, sizes: dict[str, int]) -> int:
    if isinstance(op, Repeat):
        return op.count * sum(op_flops(inner, sizes) for inner in op.body)
    out = op.result.type
    if isinstance(op, Einsum):
        return contraction_order([o.indices for o in op.operands], out.indices, sizes)[1]
    if isinstance(op, Map):
        return _scalar_ops(op.expr) * _product(sizes[i] for i in out.indices)
    if isinstance(op, Reduce):
        return _product(sizes[i] for i in op.operand.indices)
    if isinstance(op, Library):
        return LIBRARY_FLOPS[op.kind] * _product(sizes[i] for i in op.operand.indices)
    assert isinstance(op, Route)
    tokens = _product(sizes[i] for i in op.operand.indices) // sizes[op.expert]
    return tokens * sizes[op.expert] * op.k


def program_flops(program: Program) -> int:
    return sum(op_flops(op, program.dim_sizes) for op in program.ops)
