"""How far a program's outputs move when the values it stores round the other way.

The reference backend stores every value rounded to nearest in its dtype. A
sharded backend adds the same terms in another order, and may store a value
one neighbour away. In a well-conditioned program that moves an output by
about a unit in the last place, which the per-dtype bound of
einpar.tolerance covers. Two kinds of op make more of it:

- ill-conditioned ones: a layernorm of nearly equal values divides a
  rounding difference by a variance of about the same size;
- discontinuous ones: a comparison, `where`, or route's top-k choice at a
  tie picks another value when the tie breaks the other way (and route then
  moves later tokens to other slots).

`rounding_band` measures this for the program and inputs at hand. It runs
the reference again in float64, once storing every value exactly and
`SAMPLES` times storing each value of a dtype narrower than float64 as one of
its two neighbours in that dtype, drawn at random (from a fixed seed). Each
run is a computation a correct backend could do. The band of an output at an
element is the largest distance of these runs from the reference there: the
part of a backend's difference that the reference's own rounding accounts for.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from einpar.backends.reference import (ELEMENTWISE_NUMPY, _Evaluator, aligned, compute_dtype,
                                       deep_recursion, evaluate_scalar, numpy_dtype, widen)
from einpar.ir import (COMPARISONS, Apply, Cast, Einsum, Map, Program, Reduce, ScatterAdd,
                       TensorType)

# Runs with random roundings besides the exact one: each near tie breaks both ways in
# one of them with probability 1 - 2^-SAMPLES.
SAMPLES = 8
# How far a stored sum may move, in roundings (eps/2) of its size: n devices' partial
# sums, each rounded, then added in n-1 rounded steps, move it by about n of them.
SUM_ROUNDINGS = 4
SEED = 0


def rounds(program: Program) -> bool:
    """Whether `program` stores any value that float64 would hold more exactly (a float value
    narrower than f64): if not, every run equals the reference and the band is zero."""
    return any(value.type.dtype not in ("f64", "i32", "bool") for value in program.values.values())


def _step(values: np.ndarray, up: bool) -> np.ndarray:
    """The next representable value of `values`' dtype towards +inf (`up`) or -inf; a step
    past the finite range keeps the value."""
    width = values.dtype.itemsize * 8
    uint = np.dtype(f"uint{width}")
    sign = np.array(1 << (width - 1), dtype=uint)
    values = values + values.dtype.type(0)  # -0 becomes +0: one zero to step from
    bits = values.view(uint)
    negative = (bits & sign) != 0
    zero = bits == 0
    one = np.array(1, dtype=uint)
    if up:  # away from zero for positives, towards it for negatives; +0 to the least positive
        stepped = np.where(negative, bits - one, bits + one)
    else:  # -0 is gone, so 0 goes to the least negative
        stepped = np.where(zero, sign | one, np.where(negative, bits + one, bits - one))
    stepped = stepped.astype(uint).view(values.dtype)
    finite = np.isfinite(stepped.astype(np.float64))
    return np.where(finite, stepped, values)


def random_rounding(exact: np.ndarray, dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """`exact` (float64) stored in `dtype` as the neighbour below or above, each with
    probability 1/2 (a representable value stays as it is); as float64."""
    nearest = exact.astype(dtype)
    held = nearest.astype(np.float64)
    below = np.where(held > exact, _step(nearest, up=False), nearest).astype(np.float64)
    above = np.where(held < exact, _step(nearest, up=True), nearest).astype(np.float64)
    return np.where(rng.random(exact.shape) < 0.5, below, above)


def _sums(op) -> bool:
    return isinstance(op, (Einsum, ScatterAdd)) or (isinstance(op, Reduce) and
                                                    op.kind in ("sum", "mean"))


class _Resampled(_Evaluator):
    """The reference computing in float64, storing each float value exactly (`rng` None)
    or moved and randomly rounded to its dtype; integers and booleans as the reference does."""

    def __init__(self, rng: np.random.Generator | None, dtypes: dict[str, str]):
        super().__init__()
        self.rng = rng
        self.dtypes = dtypes  # each value's declared dtype (they are held as float64)
        self.magnitude = None  # of the sum being stored: `spread`

    def run(self, ops, env: dict) -> None:
        for op in ops:
            if self.rng is not None and _sums(op):
                self.magnitude = self.spread(op, env)
            if self.rng is not None and isinstance(op, Map) and _compares(op.expr):
                self.map_deciding_near_ties(op, env)
            else:
                super().run([op], env)
            self.magnitude = None

    def map_deciding_near_ties(self, op: Map, env: dict) -> None:
        """A map whose comparisons of values within SUM_ROUNDINGS roundings of each other
        (of its least precise float operand's dtype) go either way at random: a tie another
        order of rounding makes, or breaks."""
        rtype = op.result.type
        args = [aligned(_float64(widen(np.asarray(env[o.value]))), o.indices, rtype.indices)
                for o in op.operands]
        units = [float(ml_dtypes.finfo(numpy_dtype(self.dtype_of(o.value))).eps) / 2
                 for o in op.operands if self.dtype_of(o.value) not in ("i32", "bool")]
        near = SUM_ROUNDINGS * max(units, default=0.0)
        rng = self.rng

        def value(expr):
            if isinstance(expr, Apply) and expr.fn in COMPARISONS:
                a, b = (np.asarray(value(arg), np.float64) for arg in expr.args)
                decided = ELEMENTWISE_NUMPY[expr.fn](a, b)
                close = np.abs(a - b) <= near * np.maximum(np.abs(a), np.abs(b))
                either = rng.random(np.broadcast(a, b).shape) < 0.5
                return np.where(close, either, decided)
            if isinstance(expr, Apply):
                return ELEMENTWISE_NUMPY[expr.fn](*(value(arg) for arg in expr.args))
            if isinstance(expr, Cast):
                return np.asarray(value(expr.arg)).astype(numpy_dtype(expr.dtype)).astype(
                    compute_dtype(expr.dtype))
            return evaluate_scalar(expr, args, self.positions(op, rtype.shape))

        self.store(env, rtype, op.result.name, value(op.expr))

    def spread(self, op, env: dict) -> np.ndarray:
        """The root of the sum of its terms' squares: the size of the partial sums that
        another order adds (about that of each of a few devices' partial sums, whatever
        their signs), computed as the same op on the squares of its operands."""
        squares = dict(env)
        for operand in _operands(op):
            squares[operand] = np.square(np.asarray(env[operand], np.float64))
        rng, self.rng = self.rng, None  # exactly
        super().run([op], squares)
        self.rng = rng
        spread = np.sqrt(squares[op.result.name])
        if isinstance(op, Reduce) and op.kind == "mean":  # the mean of squares: to their sum
            shape = np.shape(env[op.operand.value])
            count = np.prod([shape[op.operand.indices.index(i)] for i in op.over])
            spread = spread / np.sqrt(count)
        return spread

    def dtype_of(self, name: str) -> str:
        return self.dtypes[name]

    def read(self, env: dict, operand, dtype: np.dtype) -> np.ndarray:
        array = np.asarray(env[operand.value])
        return array.astype(np.float64 if np.dtype(dtype).kind == "f" else dtype, copy=False)

    def store(self, env: dict, result_type: TensorType, name: str, array) -> None:
        array = np.broadcast_to(np.asarray(array), result_type.shape)
        dtype = numpy_dtype(result_type.dtype)
        if result_type.dtype in ("i32", "bool"):
            env[name] = array.astype(dtype, copy=True)
        elif self.rng is None or result_type.dtype == "f64":
            env[name] = array.astype(np.float64, copy=True)
        else:
            exact = array.astype(np.float64)
            if self.magnitude is not None:  # a sum another order rounds elsewhere
                unit = float(ml_dtypes.finfo(dtype).eps) / 2
                size = np.abs(exact) + np.broadcast_to(self.magnitude, exact.shape)
                moved = self.rng.uniform(-SUM_ROUNDINGS, SUM_ROUNDINGS, exact.shape) * unit * size
                exact = exact + np.where(np.isfinite(moved), moved, 0.0)
            env[name] = random_rounding(exact, dtype, self.rng)


def _float64(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float64) if array.dtype.kind == "f" else array


def _compares(expr) -> bool:
    return isinstance(expr, Apply) and (expr.fn in COMPARISONS or
                                        any(_compares(arg) for arg in expr.args)) or \
        isinstance(expr, Cast) and _compares(expr.arg)


def _operands(op) -> list[str]:
    if isinstance(op, Einsum):
        return [operand.value for operand in op.operands]
    if isinstance(op, ScatterAdd):
        return [op.update.value]
    return [op.operand.value]


def resampled(program: Program, inputs: dict[str, np.ndarray],
              rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """The program's outputs (float64 for floats) computed by `_Resampled(rng)`."""
    env = {value.name: np.asarray(inputs[value.name]).astype(numpy_dtype(value.type.dtype))
           for value in program.inputs}
    with np.errstate(all="ignore"), deep_recursion():
        _Resampled(rng, {name: value.type.dtype for name, value in program.values.items()}
                   ).run(program.ops, env)
    return {output.name: env[output.value] for output in program.outputs}


def rounding_band(program: Program, inputs: dict[str, np.ndarray],
                  reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """For each output, at each element, the largest distance from `reference` (the reference
    backend's outputs on `inputs`) of the program computed exactly and with `SAMPLES` random
    roundings of its stored values. Infinite where a run gives NaN or infinity and the
    reference does not (rounding decides whether the element is defined at all). All zeros
    when the program stores nothing narrower than float64 (no run is made)."""
    band = {name: np.zeros(np.shape(array)) for name, array in reference.items()}
    if not rounds(program):
        return band
    rng = np.random.default_rng(SEED)
    for generator in [None] + [rng] * SAMPLES:
        for name, array in resampled(program, inputs, generator).items():
            expected = np.asarray(reference[name]).astype(np.float64)
            got = np.asarray(array).astype(np.float64)
            same = (np.isnan(expected) & np.isnan(got)) | (np.isinf(expected) & (expected == got))
            distance = np.where(same, 0.0, np.abs(expected - got))
            band[name] = np.fmax(band[name], np.where(np.isnan(distance), np.inf, distance))
    return band
