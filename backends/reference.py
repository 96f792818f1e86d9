"""The reference backend: evaluate a Program on whole NumPy arrays.

This is the oracle every other backend is tested against, so it favours
plain, obviously-right NumPy over speed: each op is computed on whole
(unsharded) arrays, in float32 for f16/bf16 values and in the value's own
type otherwise, and every result is rounded to its declared dtype.

Values live in an environment keyed by SSA name, each array in its value's
own index order; ops align operands to their indices by name.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from einpar.errors import Diagnostic, EinparError
from einpar.flops import einsum_path
from einpar.syntax import deep_recursion
from einpar.ir import (NORM_EPSILON, Arg, Cast, Const, Einsum, Library, Map, Operand, Pos,
                       Program, Reduce, Repeat, Route, Scalar, ScatterAdd, Take, TensorType,
                       einsum_subscripts, trip_order, work_dtype)

_NUMPY_DTYPES = {"f64": np.float64, "f32": np.float32, "f16": np.float16,
                 "bf16": ml_dtypes.bfloat16, "f8e4m3": ml_dtypes.float8_e4m3fn,
                 "f8e5m2": ml_dtypes.float8_e5m2, "i32": np.int32, "bool": np.bool_}
_NARROW = (np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)


def numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(_NUMPY_DTYPES[dtype])


def compute_dtype(dtype: str) -> np.dtype:
    """Half-precision values are computed in float32 and rounded on storing."""
    return numpy_dtype(work_dtype(dtype))


def widen(array: np.ndarray) -> np.ndarray:
    """Half-precision arrays as float32; others unchanged."""
    if array.dtype in _NARROW:
        return array.astype(np.float32)
    return array


def aligned(array: np.ndarray, have: tuple[str, ...], want: tuple[str, ...]) -> np.ndarray:
    """`array` (indexed by `have`) transposed to the order of `want`, with size-1 axes
    for the indices of `want` it lacks, so it broadcasts against `want`."""
    order = [have.index(index) for index in want if index in have]
    array = np.transpose(np.asarray(array), order)
    shape = []
    present = iter(array.shape)
    for index in want:
        shape.append(next(present) if index in have else 1)
    return array.reshape(shape)


def numpy_path(op: Einsum, arrays: list[np.ndarray]):
    """`np.einsum`'s `optimize` for `op` on these arrays: the path einpar counts
    (einpar.flops), on the shapes at hand, so a device's local blocks take the path the
    cost model counts for it. Two operands have only one order, and an explicit path
    still lets NumPy contract them by a matrix product (BLAS) where it can, rather than by
    its own loops (tens of times slower on a matmul); one operand is a sum by its loops."""
    if len(arrays) == 2:
        return ["einsum_path", (0, 1)]
    if len(arrays) < 2:
        return False
    sizes = {i: n for o, a in zip(op.operands, arrays) for i, n in zip(o.indices, a.shape)}
    return ["einsum_path", *einsum_path(op, sizes)]


# ---- elementwise primitives (LANGUAGE.md, "Precise meanings")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # the stable form of 1 / (1 + exp(-x))


def gelu(x):
    """The tanh approximation (GPT-2's, jax.nn.gelu's default)."""
    return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def erf(x):
    from scipy.special import erf as scipy_erf  # imported when a program uses erf

    return scipy_erf(x)


ELEMENTWISE_NUMPY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.true_divide,
    "gt": np.greater, "ge": np.greater_equal, "lt": np.less, "le": np.less_equal,
    "eq": np.equal, "ne": np.not_equal,
    "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "tanh": np.tanh, "sigmoid": sigmoid, "relu": lambda x: np.maximum(x, 0),
    "gelu": gelu, "silu": lambda x: x * sigmoid(x), "abs": np.abs, "square": np.square,
    "neg": np.negative, "where": lambda c, a, b: np.where(c, a, b),
    "max2": np.maximum, "min2": np.minimum,
    "sin": np.sin, "cos": np.cos, "erf": erf, "pow": np.power,
}


def evaluate_scalar(expr: Scalar, args: list[np.ndarray], positions=None):
    """The expression on `args` (aligned to the Map's indices); `positions(index)` gives
    `pos(index)` as an i32 array aligned the same way."""
    if isinstance(expr, Arg):
        return args[expr.index]
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, Pos):
        return positions(expr.index)
    if isinstance(expr, Cast):
        value = np.asarray(evaluate_scalar(expr.arg, args, positions))
        return value.astype(numpy_dtype(expr.dtype)).astype(compute_dtype(expr.dtype))
    return ELEMENTWISE_NUMPY[expr.fn](*(evaluate_scalar(arg, args, positions) for arg in expr.args))


# ---- take and its adjoint


def check_ids(op: Take | ScatterAdd, ids: np.ndarray, size: int, starts=None) -> None:
    """An id outside [0, size) is the user's error, never a silent wrap or clamp. `starts`:
    where the block of ids held here starts in the whole ids, along each dimension."""
    bad = (ids < 0) | (ids >= size)
    if bad.any():
        where = tuple(int(k) for k in np.argwhere(bad)[0])
        starts = starts or (0,) * ids.ndim
        position = ",".join(f"{index}={k + start}"
                            for index, k, start in zip(op.ids.indices, where, starts))
        # A value the statement made on the way has no name of the user's (`x.1`).
        label = "the ids" if "." in op.ids.value else op.ids.value
        raise EinparError(Diagnostic(
            "E310", f"id {int(ids[where])} at {label}[{position}] is outside "
                    f"[0, {size}) for {op.index}={size} in '{op.stmt}'", op.span,
            hint=f"ids index the {size} rows along {op.index}: each must be at least 0 and "
                 f"less than {size}"))


def take_rows(op: Take, table: np.ndarray, ids: np.ndarray, offset: int, size: int,
              starts=None) -> np.ndarray:
    """`take[V](table, ids)` on a block of rows `offset...` of the table's `size` rows along
    V: an id in the block reads its row, any other gives zeros (its row is another
    block's), so the blocks' results sum to the whole lookup. Batch indices (of both the
    table and the ids) pair each position's ids with that position's table, as
    np.take_along_axis does. In op's result order."""
    check_ids(op, ids, size, starts)
    batch = op.batch
    free = tuple(i for i in op.ids.indices if i not in batch)
    rest = tuple(i for i in op.table.indices if i != op.index and i not in batch)
    table = aligned(table, op.table.indices, batch + (op.index,) + rest)
    ids = aligned(ids, op.ids.indices, batch + free)
    batch_shape, rest_shape = ids.shape[:len(batch)], table.shape[len(batch) + 1:]
    rows = ids.astype(np.int64) - offset
    mine = (rows >= 0) & (rows < table.shape[len(batch)])
    # One batch axis in front of each: row r of batch k is table[k, r].
    flat = table.reshape((math.prod(batch_shape), table.shape[len(batch)]) + rest_shape)
    picked = np.where(mine, rows, 0).reshape(len(flat), -1)
    taken = flat[np.arange(len(flat))[:, None], picked].reshape(ids.shape + rest_shape)
    mask = mine.reshape(mine.shape + (1,) * len(rest))
    return aligned(np.where(mask, taken, 0), batch + free + rest, op.result.type.indices)


def scatter_add_rows(op: ScatterAdd, update: np.ndarray, ids: np.ndarray, offset: int,
                     rows: int, size: int, starts=None) -> np.ndarray:
    """The adjoint of take: row v (of `rows` rows from `offset`, of `size` in all) sums the
    rows of `update` whose id is v; ids in other blocks add nothing here. Batch indices
    (the ids' indices the result has) are kept: each batch position sums into its own rows."""
    check_ids(op, ids, size, starts)
    batch = op.batch
    free = tuple(i for i in op.ids.indices if i not in batch)
    rest = tuple(i for i in op.update.indices if i not in op.ids.indices)
    ids = aligned(ids, op.ids.indices, batch + free)
    update = aligned(update, op.update.indices, batch + free + rest)
    update = np.broadcast_to(update, ids.shape + update.shape[ids.ndim:])
    batch_shape = ids.shape[:len(batch)]
    count = math.prod(batch_shape)
    which = np.broadcast_to(np.arange(count).reshape(batch_shape + (1,) * len(free)), ids.shape)
    local = ids.astype(np.int64) - offset
    mine = (local >= 0) & (local < rows)
    out = np.zeros((count, rows) + update.shape[ids.ndim:], dtype=update.dtype)
    np.add.at(out, (which[mine], local[mine]), update[mine])
    out = out.reshape(batch_shape + out.shape[1:])
    return aligned(out, batch + (op.index,) + rest, op.result.type.indices)


# ---- library functions over one axis


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / np.sum(shifted, axis=axis, keepdims=True)


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0)
    return np.squeeze(peak, axis) + np.log(np.sum(np.exp(x - peak), axis=axis))


def rmsnorm(x: np.ndarray, axis: int) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=axis, keepdims=True) + NORM_EPSILON)


def layernorm(x: np.ndarray, axis: int) -> np.ndarray:
    centered = x - np.mean(x, axis=axis, keepdims=True)
    return centered / np.sqrt(np.mean(centered * centered, axis=axis, keepdims=True) + NORM_EPSILON)


def cumsum(x: np.ndarray, axis: int) -> np.ndarray:
    return np.cumsum(x, axis=axis)


LIBRARY_NUMPY = {"softmax": softmax, "rmsnorm": rmsnorm, "layernorm": layernorm, "cumsum": cumsum}


def route_top_k(gates: np.ndarray, k: int, capacity: int) -> np.ndarray:
    """GShard routing for gates [groups, tokens, experts] -> combine [groups, tokens, experts, capacity].

    Each token's top-k experts (ties to the lower expert number) take the next
    free slot of that expert within the token's group, every token's first
    choice before any token's second; an assignment past capacity is dropped.
    A kept assignment weighs the gate probability over the sum of the token's
    top-k probabilities.
    """
    groups, tokens, experts = gates.shape
    combine = np.zeros((groups, tokens, experts, capacity), dtype=gates.dtype)
    # Stable sort of -gates keeps lower expert numbers first among ties.
    choices = np.argsort(-gates, axis=-1, kind="stable")[..., :k]
    chosen = np.take_along_axis(gates, choices, axis=-1)
    norm = chosen.sum(axis=-1)
    for group in range(groups):
        filled = np.zeros(experts, dtype=np.int64)
        for rank in range(k):
            for token in range(tokens):
                expert = choices[group, token, rank]
                slot = filled[expert]
                if slot < capacity:
                    combine[group, token, expert, slot] = chosen[group, token, rank] / norm[group, token]
                    filled[expert] += 1
    return combine


def evaluate_route(op: Route, gates: np.ndarray) -> np.ndarray:
    """Bring g to [groups..., tokens, E], route, and put the result in op's index order."""
    indices = op.operand.indices
    token = op.token
    groups = tuple(i for i in indices if i not in (op.expert, token))
    arranged = aligned(gates, indices, groups + (token, op.expert))
    group_shape = arranged.shape[:len(groups)]
    flat = arranged.reshape((-1,) + arranged.shape[len(groups):])
    capacity = op.result.type.shape[op.result.type.indices.index(op.capacity)]
    combine = route_top_k(flat, op.k, capacity)
    combine = combine.reshape(group_shape + combine.shape[1:])
    return aligned(combine, groups + (token, op.expert, op.capacity), op.result.type.indices)


# ---- the evaluator


class _Evaluator:
    def __init__(self, tick=None):
        self.tick = tick  # called after each op, for a progress bar

    # Where this evaluator's arrays sit in the whole ones: whole arrays here; a simulated
    # device (backends/numpy_sim.py) holds blocks and says where its blocks start.

    def offset(self, value: str, dim: int, size: int) -> int:
        """The global position of element 0 along dimension `dim` of the array held for
        `value` (whose local size there is `size`)."""
        return 0

    def global_size(self, value: str, dim: int, size: int) -> int:
        """The whole size of dimension `dim` of `value`."""
        return size

    def positions(self, op: Map, shape: tuple[int, ...]):
        """`pos(S)` in `op`: positions along S of its result, aligned to its indices."""
        indices = op.result.type.indices

        def position(index: str) -> np.ndarray:
            dim = indices.index(index)
            start = self.offset(op.result.name, dim, shape[dim])
            line = np.arange(start, start + shape[dim], dtype=np.int32)
            return line.reshape(tuple(-1 if d == dim else 1 for d in range(len(indices))))

        return position

    def starts(self, value: str, array: np.ndarray) -> tuple[int, ...]:
        return tuple(self.offset(value, dim, size) for dim, size in enumerate(array.shape))

    def take(self, env: dict, op: Take) -> np.ndarray:
        table, ids = np.asarray(env[op.table.value]), np.asarray(env[op.ids.value])
        dim = op.table.indices.index(op.index)
        rows = table.shape[dim]
        return take_rows(op, table, ids, self.offset(op.table.value, dim, rows),
                         self.global_size(op.table.value, dim, rows), self.starts(op.ids.value, ids))

    def scatter_add(self, env: dict, op: ScatterAdd, work: np.dtype) -> np.ndarray:
        ids = np.asarray(env[op.ids.value])
        dim = op.result.type.indices.index(op.index)
        rows = op.result.type.shape[dim]
        return scatter_add_rows(op, self.read(env, op.update, work), ids,
                                self.offset(op.result.name, dim, rows), rows,
                                self.global_size(op.result.name, dim, rows),
                                self.starts(op.ids.value, ids))

    def read(self, env: dict, operand: Operand, dtype: np.dtype) -> np.ndarray:
        return np.asarray(env[operand.value]).astype(dtype, copy=False)

    def store(self, env: dict, result_type: TensorType, name: str, array) -> None:
        array = np.broadcast_to(np.asarray(array), result_type.shape)
        # astype copies: a fresh, contiguous array even from a broadcast view (and keeps rank 0).
        env[name] = array.astype(numpy_dtype(result_type.dtype), copy=True)

    def run(self, ops, env: dict) -> None:
        for op in ops:
            if isinstance(op, Repeat):
                self.repeat(op, env)
                continue
            rtype = op.result.type
            work = compute_dtype(rtype.dtype)
            if isinstance(op, Einsum):
                arrays = [self.read(env, o, work) for o in op.operands]
                subscripts = einsum_subscripts([o.indices for o in op.operands], rtype.indices,
                                               readable=False)
                value = np.einsum(subscripts, *arrays, optimize=numpy_path(op, arrays))
            elif isinstance(op, Map):
                args = []
                for operand in op.operands:
                    array = widen(np.asarray(env[operand.value]))
                    args.append(aligned(array, operand.indices, rtype.indices))
                value = evaluate_scalar(op.expr, args, self.positions(op, rtype.shape))
            elif isinstance(op, Reduce):
                array = self.read(env, op.operand, work)
                axes = tuple(op.operand.indices.index(i) for i in op.over)
                reducer = {"sum": np.sum, "max": np.max, "min": np.min, "mean": np.mean}[op.kind]
                kept = tuple(i for i in op.operand.indices if i not in op.over)
                value = aligned(reducer(array, axis=axes), kept, rtype.indices)
            elif isinstance(op, Library):
                array = self.read(env, op.operand, work)
                axis = op.operand.indices.index(op.index)
                if op.kind == "logsumexp":
                    kept = tuple(i for i in op.operand.indices if i != op.index)
                    value = aligned(logsumexp(array, axis), kept, rtype.indices)
                else:
                    value = aligned(LIBRARY_NUMPY[op.kind](array, axis), op.operand.indices,
                                    rtype.indices)
            elif isinstance(op, Take):
                value = self.take(env, op)
            elif isinstance(op, ScatterAdd):
                value = self.scatter_add(env, op, work)
            else:
                assert isinstance(op, Route)
                value = evaluate_route(op, self.read(env, op.operand, work))
            self.store(env, rtype, op.result.name, value)
            if self.tick is not None:
                self.tick()

    def repeat(self, op: Repeat, env: dict) -> None:
        """Trips as lax.scan runs them (`scan`): each sees trip i's slice of every stacked
        value, and `saved` keeps trip i's values at index i."""
        def trip(i: int, carried: dict):
            inner = dict(env)
            inner.update(carried)
            inner.update((view.name, env[view.name][i]) for view in op.stacked)
            self.run(op.body, inner)
            return ({c.value: inner[c.body_result] for c in op.carried},
                    [inner[s.body_value] for s in op.saved])

        carried, kept = scan(op.count, op.reverse, {c.value: env[c.value] for c in op.carried},
                             trip)
        for c in op.carried:
            env[c.result.name] = carried[c.value]
        for k, s in enumerate(op.saved):
            self.store(env, s.result.type, s.result.name, np.stack([ys[k] for ys in kept]))


def scan(count: int, reverse: bool, carry, trip):
    """lax.scan's loop: `trip(i, carry) -> (carry, ys)` for trips i in the order they run
    (ir.trip_order); returns the last carry and every trip's ys, trip i's at index i. The
    reference runs a repeat with it, the simulator a repeat step on all its devices at once."""
    ys = [None] * count
    for i in trip_order(count, reverse):
        carry, ys[i] = trip(i, carry)
    return carry, ys


def evaluate(program: Program, inputs: dict[str, np.ndarray], tick=None) -> dict[str, np.ndarray]:
    """Run `program` on whole arrays; returns its outputs by the program's names.
    `tick`, if given, is called after each op (a repeat body's once per trip)."""
    env: dict[str, np.ndarray] = {}
    for value in program.inputs:
        # No copy of an input already in its dtype: the caller keeps it, and ops never write in place.
        env[value.name] = np.asarray(inputs[value.name]).astype(numpy_dtype(value.type.dtype),
                                                                 copy=False)
    with np.errstate(all="ignore"), deep_recursion():
        _Evaluator(tick).run(program.ops, env)
    return {output.name: env[output.value] for output in program.outputs}
