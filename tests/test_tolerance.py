"""The tolerance model: the per-dtype bound, and the rounding band (einpar.rounding) that judges
ill-conditioned and discontinuous ops in low precision by what the reference's own rounding does."""

import ml_dtypes
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from einpar.api import compile_source, compile_spmd, random_inputs
from einpar.backends.numpy_sim import run_spmd
from einpar.backends.reference import evaluate
from einpar.rounding import _step, random_rounding, rounding_band, rounds
from einpar.tolerance import compare, compare_outputs, program_tolerance

# Rows of h nearly constant along D (b's columns differ by one bf16 unit): the layernorm divides
# a rounding difference by a variance of about its size. The simulator sums h over K in four
# rounded partial sums, the reference in one.
NEAR_CONSTANT = """mesh tp=4
dim B=4 K=16 D=8
dtype bf16
input a[B, K@tp]
input b[K@tp, D]
h[B, D] = a[B, K] * b[K, D]
out[B, D] = layernorm[D](h[B, D])
output out
"""

# Gshard's gates in bf16, summed over a split K: a token's top two experts tie in bf16 now
# and then, and the simulator's rounding breaks the tie the other way.
ROUTE = """mesh tp=4
dim T=64 K=64 E=8 C=16
dtype bf16
input x[T, K@tp]
input w[K@tp, E]
g[T, E] = softmax[E](x[T, K] * w[K, E])
c[T, E, C] = route[E, C](g[T, E], k=2)
output c
"""


def near_constant_inputs(program, seed: int) -> dict:
    inputs = random_inputs(program, seed)
    rng = np.random.default_rng(seed)
    inputs["b"] = (1 + rng.integers(-1, 2, size=(16, 8)) / 128).astype(ml_dtypes.bfloat16)
    return inputs


def judged(program, inputs, outputs):
    return {c.name: c for c in compare_outputs(program, inputs, evaluate(program, inputs), outputs)}


def test_a_near_constant_layernorm_in_bf16_is_judged_by_what_rounding_does_to_it():
    program = compile_source(NEAR_CONSTANT, file="near_constant.ein")
    for seed in range(6):
        inputs = near_constant_inputs(program, seed)
        reference = evaluate(program, inputs)
        outputs, _ = run_spmd(compile_spmd(program), inputs)
        assert not compare("out", reference["out"], outputs["out"], program_tolerance(program)).ok
        found = judged(program, inputs, outputs)["out"]
        assert found.ok and found.banded, (seed, found)


def test_a_route_tie_broken_the_other_way_is_not_a_mismatch():
    program = compile_source(ROUTE, file="route.ein")
    for seed in (4, 8, 9):  # seeds whose gates tie (found by trying 300)
        inputs = random_inputs(program, seed)
        reference = evaluate(program, inputs)
        outputs, _ = run_spmd(compile_spmd(program), inputs)
        assert not compare("c", reference["c"], outputs["c"], 0.05).ok
        assert judged(program, inputs, outputs)["c"].ok, seed


def test_wrong_results_still_fail_where_the_band_is_narrow():
    """The band cannot make a wrong result pass where the program is well conditioned: a
    layernorm of ordinary rows, one block doubled; and the same with the all-reduce over K
    left out (each device's partial sum)."""
    program = compile_source(NEAR_CONSTANT, file="ordinary.ein")
    inputs = random_inputs(program, 0)
    reference = evaluate(program, inputs)
    outputs, _ = run_spmd(compile_spmd(program), inputs)
    assert judged(program, inputs, outputs)["out"].ok
    doubled = np.asarray(outputs["out"], np.float32).copy()
    doubled[:1] *= 2
    found = judged(program, inputs, {"out": doubled.astype(ml_dtypes.bfloat16)})["out"]
    assert not found.ok and found.banded
    partial = dict(inputs)
    partial["a"] = np.asarray(inputs["a"]).copy()
    partial["a"][:, 4:] = 0  # device 0's quarter of K only
    missing = evaluate(program, partial)["out"]
    assert not judged(program, inputs, {"out": missing})["out"].ok
    assert not compare("out", reference["out"], missing, program_tolerance(program)).ok


def test_a_nan_on_one_side_only_is_a_mismatch():
    program = compile_source("dim I=4\ninput x[I]\ny[I] = x[I] * 2\noutput y\n", file="nan.ein")
    inputs = random_inputs(program, 0)
    got = evaluate(program, inputs)["y"].copy()
    got[1] = np.nan
    assert not judged(program, inputs, {"y": got})["y"].ok
    both = got.copy()
    assert compare("y", both, got, 0.0).ok  # the same NaN in both is no difference


def test_the_band_is_zero_and_costs_nothing_for_float64_programs():
    program = compile_source("dim I=8 J=8\ninput x[I, J] : f64\ny[I, J] : f64 = layernorm[J](x[I, J])\n"
                             "output y\n", file="f64.ein")
    assert not rounds(program)
    inputs = random_inputs(program, 0)
    band = rounding_band(program, inputs, evaluate(program, inputs))
    assert not band["y"].any()


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=5),
                  elements=st.floats(-1e6, 1e6, width=32)))
def test_an_array_equals_itself(array):
    assert compare("x", array, array, 0.0).ok


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e4, 1e4)),
       st.sampled_from(["bfloat16", "float16", "float8_e4m3fn", "float32"]), st.integers(0, 99))
def test_a_random_rounding_is_one_of_the_two_neighbours(exact, name, seed):
    """A value rounded either way is representable, and no representable value lies strictly
    between it and the exact value (it is the neighbour below or above)."""
    dtype = np.dtype(getattr(ml_dtypes, name, None) or name)
    stored = random_rounding(exact, dtype, np.random.default_rng(seed))
    held = stored.astype(dtype)
    finite = np.isfinite(held.astype(np.float64))
    assert np.array_equal(held.astype(np.float64)[finite], stored[finite])
    towards_exact = np.where(stored > exact, _step(held, up=False).astype(np.float64),
                             _step(held, up=True).astype(np.float64))
    beyond = np.where(stored > exact, towards_exact <= exact, towards_exact >= exact)
    assert np.all((beyond | (stored == exact))[finite])


def test_the_band_of_a_mean_is_that_of_its_sum_over_the_count():
    """A mean's spread is its sum's over the count (the op run on squares is a mean of
    them): a bf16 mean of n equal values has a band near a unit of bf16 at the value, not
    n times more, in a repeat body as at the top."""
    program = compile_source("dim L=2 D=64\ndtype bf16\ninput x[D]\ny[] = mean[D](x[D])\n"
                             "repeat L {\n  y[] = y[] + mean[D](x[D])\n}\noutput y\n")
    inputs = {"x": np.full(64, 1.0, dtype=ml_dtypes.bfloat16)}
    reference = evaluate(program, inputs)
    band = rounding_band(program, inputs, reference)["y"]
    assert 0 < float(band) < 0.1  # y = 3; one unit of bf16 at 3 is 2^-6
