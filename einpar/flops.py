"""FLOP counts of the ops of a Program, for `einpar check` and the cost model.

Conventions (stated once, used everywhere):
- a contraction step over the union of its operands' indices costs 2 FLOPs
  per point (a multiply and an add) when it sums an index, 1 when it only
  multiplies; an n-ary Einsum is contracted pairwise along the path
  `contraction_path` chooses (opt_einsum's search, the one NumPy's and JAX's
  einsum use), and every backend runs that same path on the shapes it holds:
  whole arrays for the reference, local blocks on a device, so what the cost
  model counts per device is what the device computes;
- a Map costs one FLOP per primitive function per output element (casts are
  free, transcendental functions such as exp, sin, erf and pow count as one,
  `pos(S)` is an index, not arithmetic);
- a Reduce costs one FLOP per input element;
- library functions cost a fixed number of FLOPs per element (LIBRARY_FLOPS);
- routing costs k·E per token, which is negligible and counted for honesty;
- a take (an embedding lookup) computes nothing: it moves rows, and the cost
  model prices the bytes; its adjoint, a scatter-add, costs one add per
  element of the update it sums (an update row added for several ids, once
  per id; batch indices are kept, not summed, and count like the others).
"""

from __future__ import annotations

from functools import lru_cache

import opt_einsum

from .ir import (Apply, Cast, Einsum, Library, Map, Op, Program, Reduce, Repeat, Route, Scalar,
                 ScatterAdd, Take)

# Per element: softmax = max, subtract, exp, sum, divide; logsumexp = max, subtract, exp, sum
# (+ log per row, ignored); rmsnorm = square, sum, scale; layernorm = sum, subtract, square,
# sum, scale (+ the per-row sqrt, ignored); cumsum = one add.
LIBRARY_FLOPS = {"softmax": 5, "logsumexp": 4, "rmsnorm": 3, "layernorm": 5, "cumsum": 1}


def _product(sizes) -> int:
    total = 1
    for size in sizes:
        total *= size
    return total


# Exhaustive search while it is cheap; beyond, opt_einsum's dynamic programming, which is
# still exact for FLOPs among paths without outer products (opt_einsum docs, "The
# Dynamic Programming Path") but exponential in the worst case (13 operands that all share
# indices took 27 s); past _DP_UP_TO operands, its greedy search. All are deterministic.
_OPTIMAL_UP_TO = 4
_DP_UP_TO = 8

Path = tuple[tuple[int, ...], ...]


def contraction_path(operands: tuple[tuple[str, ...], ...], out: tuple[str, ...],
                     sizes: dict[str, int]) -> Path:
    """The pairwise order of an n-ary contraction, in opt_einsum's (and NumPy's) form:
    each step names positions in the current operand list; those leave it and their
    product is appended at its end. One operand: `((0,),)`."""
    operands = tuple(tuple(o) for o in operands)
    used = {i for o in operands for i in o} | set(out)
    return _path(operands, tuple(out), tuple(sorted((i, sizes[i]) for i in used)))


@lru_cache(maxsize=4096)  # the partitioner asks for the same op on the same shapes often
def _path(operands: tuple[tuple[str, ...], ...], out: tuple[str, ...],
          sizes: tuple[tuple[str, int], ...]) -> Path:
    if len(operands) <= 2:
        return (tuple(range(len(operands))),)
    symbols = {index: opt_einsum.get_symbol(k) for k, (index, _) in enumerate(sizes)}
    size_of = dict(sizes)
    spec = ",".join("".join(symbols[i] for i in o) for o in operands) + "->" + \
        "".join(symbols[i] for i in out)
    shapes = [tuple(size_of[i] for i in o) for o in operands]
    method = "optimal" if len(operands) <= _OPTIMAL_UP_TO else \
        "dp" if len(operands) <= _DP_UP_TO else "greedy"
    path, _ = opt_einsum.contract_path(spec, *shapes, shapes=True, optimize=method)
    return tuple(tuple(step) for step in path)


def contraction_steps(operands: tuple[tuple[str, ...], ...], out: tuple[str, ...],
                      path: Path) -> list[tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]]:
    """Each pairwise step of `path`: (the indices of the operands it takes, the indices it
    keeps: those still needed by a later operand or the output)."""
    remaining = [tuple(o) for o in operands]
    steps = []
    for positions in path:
        taken = tuple(remaining[k] for k in positions)
        remaining = [o for k, o in enumerate(remaining) if k not in positions]
        needed = set(out).union(*remaining)
        union = dict.fromkeys(i for o in taken for i in o)
        kept = tuple(i for i in union if i in needed) if remaining else tuple(out)
        steps.append((taken, kept))
        remaining.append(kept)
    return steps


def contraction_flops(operands: tuple[tuple[str, ...], ...], out: tuple[str, ...],
                      sizes: dict[str, int], path: Path | None = None) -> int:
    """FLOPs of contracting along `path` (by default `contraction_path`'s), by the
    convention above. A single operand costs one FLOP per input element."""
    if len(operands) == 1:
        return _product(sizes[i] for i in operands[0])
    if path is None:
        path = contraction_path(operands, out, sizes)
    total = 0
    for taken, kept in contraction_steps(operands, out, path):
        union = dict.fromkeys(i for o in taken for i in o)
        total += _product(sizes[i] for i in union) * (2 if len(kept) < len(union) else 1)
    return total


def einsum_path(op: Einsum, sizes: dict[str, int]) -> Path:
    """The path `op` runs on operands of these index sizes (global or local)."""
    return contraction_path(tuple(o.indices for o in op.operands), op.result.type.indices, sizes)


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
        return contraction_flops(tuple(o.indices for o in op.operands), out.indices, sizes)
    if isinstance(op, Map):
        return _scalar_ops(op.expr) * _product(sizes[i] for i in out.indices)
    if isinstance(op, Reduce):
        return _product(sizes[i] for i in op.operand.indices)
    if isinstance(op, Library):
        return LIBRARY_FLOPS[op.kind] * _product(sizes[i] for i in op.operand.indices)
    if isinstance(op, Take):
        return 0
    if isinstance(op, ScatterAdd):
        return _product(sizes[i] for i in dict.fromkeys(op.ids.indices + op.update.indices))
    assert isinstance(op, Route)
    tokens = _product(sizes[i] for i in op.operand.indices) // sizes[op.expert]
    return tokens * sizes[op.expert] * op.k


def program_flops(program: Program) -> int:
    return sum(op_flops(op, program.dim_sizes) for op in program.ops)
