"""How close a backend's result must be to the reference backend's, per dtype.

The error of an output is its largest absolute difference from the
reference, relative to the reference's largest magnitude (at least 1), so
that sums over thousands of terms are judged at their own scale. The bound
is that of the least precise dtype the program computes in (an f64 result
summed from f32 values carries f32 rounding); a program of integers and
booleans only must match exactly. The bounds leave room for a different
summation order (sharded contractions add partial sums in another order).
At matmul precision `default` (einpar.precision) float32 contractions may run
in one bfloat16 pass (a TPU's), so a program with float32 values is judged
at bfloat16's bound. A NaN on one side only is an infinite difference.

An output beyond that bound is judged again by `compare_outputs` with the
rounding band (einpar.rounding): an element passes when
|got - reference| <= tolerance * scale + BAND_FACTOR * band, the band being
the largest distance from the reference of the program rerun exactly and with
its stored values rounded other ways. That covers ill-conditioned ops (a
layernorm of nearly equal values) and discontinuous ones (a tie in a
comparison or route's top-k broken the other way) in low precision; the runs
are made only for an output that needs them. docs/testing.md, "Tolerances".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# About a dozen units in the last place of each float type, for chains of rounded ops.
RELATIVE_TOLERANCE = {"f64": 1e-9, "f32": 1e-4, "f16": 6e-3, "bf16": 5e-2, "i32": 0.0, "bool": 0.0,
                      # fp8: two units in the last place at the top of the scale (3 and 2
                      # mantissa bits): another summation order may round a value one unit away
                      "f8e4m3": 0.25, "f8e5m2": 0.5}

# A backend's difference beyond the per-dtype bound may be up to this many times the
# rounding band (einpar.rounding): the band is the farthest of a few correct roundings,
# and a backend's own rounding is another, which may fall a little farther.
BAND_FACTOR = 2.0


def program_tolerance(program, precision: str = "highest") -> float:
    """The bound for every output of `program`: its least precise dtype's, with its float32
    contractions run at `precision`."""
    dtypes = {value.type.dtype for value in program.values.values()}
    if precision == "default" and "f32" in dtypes:
        dtypes.add("bf16")
    return max((RELATIVE_TOLERANCE[dtype] for dtype in dtypes), default=0.0)


@dataclass(frozen=True)
class Comparison:
    name: str
    error: float  # relative to the reference's scale (beyond the rounding band, if `banded`)
    tolerance: float
    banded: bool = False  # judged with the rounding band (einpar.rounding) allowed for

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def _scale(reference: np.ndarray) -> float:
    finite = reference[np.isfinite(reference)]
    return max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0


def _largest_difference(expected: np.ndarray, got: np.ndarray, allowed=None) -> float:
    """The largest |expected - got| (less `allowed` there, at least 0); 0 where both are
    the same NaN or infinity."""
    if expected.shape != got.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    same_nan = np.isnan(expected) & np.isnan(got)
    same_inf = np.isinf(expected) & (expected == got)
    difference = np.where(same_nan | same_inf, 0.0, np.abs(expected - got))
    difference = np.where(np.isnan(difference), np.inf, difference)  # NaN on one side only
    if allowed is not None:
        difference = np.where(np.isinf(allowed), 0.0, np.maximum(difference - allowed, 0.0))
    return float(np.max(difference))


def _allowed(band, index=...):
    return None if band is None else BAND_FACTOR * np.asarray(band, np.float64)[index]


def compare(name: str, reference: np.ndarray, other: np.ndarray, tolerance: float,
            band: np.ndarray | None = None) -> Comparison:
    """`other`'s largest difference from `reference`, relative to the reference's scale;
    with `band` (einpar.rounding.rounding_band's, of this output), the largest difference
    beyond BAND_FACTOR times the band at each element."""
    expected = np.asarray(reference).astype(np.float64)
    got = np.asarray(other).astype(np.float64)
    return Comparison(name, _largest_difference(expected, got, _allowed(band)) / _scale(expected),
                      tolerance, band is not None)


def compare_blocks(name: str, reference: np.ndarray, blocks, tolerance: float,
                   band: np.ndarray | None = None) -> Comparison:
    """`compare` for the blocks of an output one process holds: (index, block) pairs, each
    checked against that part of the whole reference, at the whole reference's scale."""
    expected = np.asarray(reference).astype(np.float64)
    worst = max((_largest_difference(expected[index], np.asarray(block).astype(np.float64),
                                      _allowed(band, index))
                 for index, block in blocks), default=0.0)
    return Comparison(name, worst / _scale(expected), tolerance, band is not None)


def compare_outputs(program, inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                    outputs: dict, precision: str = "highest",
                    tolerance: float | None = None) -> list[Comparison]:
    """Each output of a backend's run of `program` on `inputs` against the reference
    backend's (`reference`): at `program_tolerance` (or `tolerance`), and, for an output
    beyond it, again with the rounding band allowed for (the band's runs are made only
    then, once). `outputs` maps each name to the whole array, or to the (index, block)
    pairs one process holds."""
    from einpar.rounding import rounding_band, rounds

    tolerance = program_tolerance(program, precision) if tolerance is None else tolerance
    band = None

    def judged(name: str, got, with_band=None) -> Comparison:
        if isinstance(got, np.ndarray) or np.isscalar(got):
            return compare(name, reference[name], got, tolerance, with_band)
        return compare_blocks(name, reference[name], got, tolerance, with_band)

    found = []
    for name in reference:
        got = outputs[name]
        result = judged(name, got)
        if not result.ok and rounds(program):
            band = rounding_band(program, inputs, reference) if band is None else band
            result = judged(name, got, band[name])
        found.append(result)
    return found
