"""How close a backend's result must be to the reference backend's, per dtype.

The error of an output is its largest absolute difference from the
reference, relative to the reference's largest magnitude (at least 1), so
that sums over thousands of terms are judged at their own scale. The bound
is that of the least precise dtype the program computes in (an f64 result
summed from f32 values carries f32 rounding); a program of integers and
booleans only must match exactly. The bounds leave room for a different
summation order (sharded contractions add partial sums in another order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# About a dozen units in the last place of each float type, for chains of rounded ops.
RELATIVE_TOLERANCE = {"f64": 1e-9, "f32": 1e-4, "f16": 6e-3, "bf16": 5e-2, "i32": 0.0, "bool": 0.0}


def program_tolerance(program) -> float:
    """The bound for every output of `program`: its least precise dtype's."""
    return max((RELATIVE_TOLERANCE[value.type.dtype] for value in program.values.values()),
               default=0.0)


@dataclass(frozen=True)
class Comparison:
    name: str
    error: float  # relative to the reference's scale
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def compare(name: str, reference: np.ndarray, other: np.ndarray, tolerance: float) -> Comparison:
    expected = np.asarray(reference).astype(np.float64)
    got = np.asarray(other).astype(np.float64)
    if expected.shape != got.shape:
        return Comparison(name, float("inf"), tolerance)
    if expected.size == 0:
        return Comparison(name, 0.0, tolerance)
    same_nan = np.isnan(expected) & np.isnan(got)
    same_inf = np.isinf(expected) & (expected == got)
    difference = np.where(same_nan | same_inf, 0.0, np.abs(expected - got))
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    error = float(np.max(difference)) / scale
    return Comparison(name, 0.0 if np.isnan(error) else error, tolerance)
