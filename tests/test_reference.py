"""The reference backend against independent NumPy formulations of the language.

The reference backend is the oracle every other backend is tested against, so
each construct of LANGUAGE.md is pinned here: a small `.ein` program is run on
seeded random inputs and compared with a NumPy computation written from the
language's own definitions ("Precise meanings", the summation rule). Expected
values are computed in float64 from the very inputs the program received.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from einpar.api import compile_source, run_reference

F32 = dict(rtol=1e-5, atol=1e-6)
# Results rounded once to the dtype are within one ulp: 2^-7 relative for bf16's
# 8 significant bits, 2^-10 for f16's 11.
BF16 = dict(rtol=2 ** -7, atol=1e-6)
F16 = dict(rtol=2 ** -10, atol=1e-6)


def run(source: str, overrides: dict[str, int] | None = None, **inputs) -> dict[str, np.ndarray]:
    return run_reference(compile_source(source, overrides=overrides), inputs)


def normal(shape, seed=0, scale=1.0, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def f64(array) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


# ---- NumPy formulations written from LANGUAGE.md, "Precise meanings"


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_logsumexp(x, axis):
    peak = x.max(axis=axis, keepdims=True)
    return np.log(np.exp(x - peak).sum(axis=axis)) + np.squeeze(peak, axis)


def np_rmsnorm(x, axis):
    return x / np.sqrt((x * x).mean(axis=axis, keepdims=True) + 1e-6)


def np_layernorm(x, axis):
    mean = x.mean(axis=axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axis, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6)


def np_cumsum_inclusive(x, axis):
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    upper = np.triu(np.ones((n, n)))  # upper[i, j] = 1 where i <= j: element j sums 0..j
    return np.moveaxis(x @ upper, -1, axis)


def np_gshard_route(gates, k, capacity):
    """gates [groups, tokens, experts] -> combine [groups, tokens, experts, capacity].

    Slots of each expert fill in token order within a group, every token's
    first choice before any token's second; an assignment finding its expert
    full is dropped; a kept one weighs gate / sum of the token's top-k gates.
    """
    groups, tokens, experts = gates.shape
    combine = np.zeros((groups, tokens, experts, capacity))
    for group in range(groups):
        top = [sorted(range(experts), key=lambda e: -gates[group, t, e])[:k] for t in range(tokens)]
        used = [0] * experts
        for rank in range(k):
            for token in range(tokens):
                expert = top[token][rank]
                if used[expert] == capacity:
                    continue
                norm = sum(gates[group, token, e] for e in top[token])
                combine[group, token, expert, used[expert]] = gates[group, token, expert] / norm
                used[expert] += 1
    return combine


# ---- elementwise functions and operators

UNARY = {
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "tanh": np.tanh,
    "sigmoid": np_sigmoid,
    "relu": lambda x: np.where(x > 0, x, 0.0),
    "gelu": np_gelu_tanh,
    "silu": lambda x: x * np_sigmoid(x),
    "abs": np.abs,
    "square": lambda x: x * x,
}
POSITIVE_ONLY = ("log", "sqrt", "rsqrt")


@pytest.mark.parametrize("fn", sorted(UNARY))
def test_elementwise_function_matches_its_definition(fn):
    x = normal((4, 6), seed=1, scale=3.0)
    if fn in POSITIVE_ONLY:
        x = np.abs(x) + np.float32(0.1)
    out = run(f"""
dim I=4 J=6
input x[I,J]
y[I,J] = {fn}(x[I,J])
output y
""", x=x)["y"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, UNARY[fn](f64(x)), **F32)


def test_gelu_is_the_tanh_approximation_not_the_erf_form():
    x = np.array([-3.0, -1.5, -0.5, 0.5, 1.5, 3.0], dtype=np.float32)
    out = run("dim I=6\ninput x[I]\ny[I] = gelu(x[I])\noutput y", x=x)["y"]
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in f64(x)])
    np.testing.assert_allclose(out, np_gelu_tanh(f64(x)), **F32)
    assert np.max(np.abs(out - exact)) > 1e-4  # the two forms differ visibly here


@pytest.mark.parametrize("op, fn", [("+", np.add), ("-", np.subtract), ("*", np.multiply),
                                    ("/", np.divide)])
def test_arithmetic_operator(op, fn):
    a, b = normal((3, 5), seed=2), normal((3, 5), seed=3)
    out = run(f"""
dim I=3 J=5
input a[I,J]
input b[I,J]
y[I,J] = a[I,J] {op} b[I,J]
output y
""", a=a, b=b)["y"]
    np.testing.assert_allclose(out, fn(f64(a), f64(b)), **F32)


def test_unary_minus_and_operator_precedence():
    a, b, c = normal(5, seed=4), normal(5, seed=5), normal(5, seed=6)
    out = run("""
dim I=5
input a[I]
input b[I]
input c[I]
p[I] = -a[I] + b[I] * c[I]
q[I] = a[I] - b[I] - c[I]
r[I] = a[I] / b[I] / c[I]
s[I] = -(a[I] - b[I]) * c[I]
output p
output q
output r
output s
""", a=a, b=b, c=c)
    a, b, c = f64(a), f64(b), f64(c)
    np.testing.assert_allclose(out["p"], -a + b * c, **F32)
    np.testing.assert_allclose(out["q"], (a - b) - c, **F32)  # left-associative
    np.testing.assert_allclose(out["r"], (a / b) / c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["s"], -(a - b) * c, **F32)


@pytest.mark.parametrize("op, fn", [(">", np.greater), (">=", np.greater_equal), ("<", np.less),
                                    ("<=", np.less_equal), ("==", np.equal), ("!=", np.not_equal)])
def test_comparison_gives_bool(op, fn):
    rng = np.random.default_rng(7)
    # Small whole numbers, so that equal pairs occur.
    a = rng.integers(-2, 3, size=(4, 5)).astype(np.float32)
    b = rng.integers(-2, 3, size=(4, 5)).astype(np.float32)
    out = run(f"""
dim I=4 J=5
input a[I,J]
input b[I,J]
y[I,J] = a[I,J] {op} b[I,J]
output y
""", a=a, b=b)["y"]
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, fn(a, b))


def test_comparison_binds_looser_than_arithmetic():
    a, b = normal(8, seed=8), normal(8, seed=9)
    out = run("dim I=8\ninput a[I]\ninput b[I]\ny[I] = a[I] + 1 > b[I] * 2\noutput y",
              a=a, b=b)["y"]
    np.testing.assert_array_equal(out, f64(a) + 1 > f64(b) * 2)


def test_where_selects_and_broadcasts_by_name():
    a, b = normal((4, 5), seed=10), normal(5, seed=11)
    out = run("""
dim I=4 J=5
input a[I,J]
input b[J]
y[I,J] = where(a[I,J] > b[J], a[I,J], b[J])
output y
""", a=a, b=b)["y"]
    np.testing.assert_array_equal(out, np.where(a > b[None, :], a, np.broadcast_to(b, a.shape)))


def test_max2_and_min2_are_elementwise_maximum_and_minimum():
    a, b = normal((4, 5), seed=12), normal(4, seed=13)
    out = run("""
dim I=4 J=5
input a[I,J]
input b[I]
hi[I,J] = max2(a[I,J], b[I])
lo[I,J] = min2(b[I], a[I,J])
output hi
output lo
""", a=a, b=b)
    np.testing.assert_array_equal(out["hi"], np.maximum(a, b[:, None]))
    np.testing.assert_array_equal(out["lo"], np.minimum(a, b[:, None]))


# ---- indices: broadcasting and binding by name


def test_operands_broadcast_by_index_name_not_position():
    # I and J have the same size, so a positional broadcast would run silently.
    a, b = normal((4, 4), seed=14), normal((4, 4), seed=15)
    out = run("""
dim I=4 J=4
input a[I,J]
input b[J,I]
y[I,J] = a[I,J] + b[J,I]
z[J,I] = a[I,J] * 2
output y
output z
""", a=a, b=b)
    np.testing.assert_allclose(out["y"], f64(a) + f64(b).T, **F32)
    np.testing.assert_allclose(out["z"], 2 * f64(a).T, **F32)


def test_vectors_on_different_indices_broadcast_to_an_outer_combination():
    a, b = normal(3, seed=16), normal(5, seed=17)
    out = run("""
dim I=3 J=5
input a[I]
input b[J]
y[J,I] = a[I] - b[J]
output y
""", a=a, b=b)["y"]
    np.testing.assert_allclose(out, f64(a)[None, :] - f64(b)[:, None], **F32)


def test_a_left_hand_index_the_right_side_lacks_broadcasts():
    x = normal(3, seed=18)
    out = run("dim I=3 J=4\ninput x[I]\ny[I,J] = x[I]\noutput y", x=x)["y"]
    np.testing.assert_array_equal(out, np.broadcast_to(x[:, None], (3, 4)))


def test_reading_a_tensor_with_an_aliased_index_binds_it_by_position():
    # x[B,T,D] reads x's second dimension (declared S) under the name T.
    x = normal((2, 5, 3), seed=19)
    out = run("""
dim B=2 S=5 T=S D=3
input x[B,S,D]
g[B,S,T] = x[B,S,D] * x[B,T,D]
d[B,S,T,D] = x[B,S,D] - x[B,T,D]
output g
output d
""", x=x)
    np.testing.assert_allclose(out["g"], np.einsum("bsd,btd->bst", f64(x), f64(x)), **F32)
    np.testing.assert_allclose(out["d"], f64(x)[:, :, None, :] - f64(x)[:, None, :, :], **F32)


def test_an_alias_follows_its_targets_override():
    x = normal((2, 6, 3), seed=125)
    out = run("""
dim B=2 S=4 T=S D=3
input x[B,S,D]
g[B,S,T] = x[B,S,D] * x[B,T,D]
output g
""", overrides={"S": 6}, x=x)["g"]
    assert out.shape == (2, 6, 6)
    np.testing.assert_allclose(out, np.einsum("bsd,btd->bst", f64(x), f64(x)), **F32)


def test_transposing_through_an_alias():
    x = normal((4, 4), seed=20)
    out = run("dim S=4 T=S\ninput x[S,T]\ny[S,T] = x[T,S]\noutput y", x=x)["y"]
    np.testing.assert_array_equal(out, x.T)


# ---- the summation rule


def test_summation_covers_the_product_only_not_the_added_term():
    a, b, c = normal((3, 4), seed=21), normal(4, seed=22), normal(3, seed=23)
    out = run("""
dim I=3 J=4
input a[I,J]
input b[J]
input c[I]
y[I] = a[I,J] * b[J] + c[I]
output y
""", a=a, b=b, c=c)["y"]
    np.testing.assert_allclose(out, f64(a) @ f64(b) + f64(c), **F32)


def test_summation_happens_inside_the_function_that_contains_it():
    x, w = normal((2, 3, 5), seed=24), normal((5, 4), seed=25, scale=0.5)
    out = run("""
dim B=2 S=3 D=5 F=4
input x[B,S,D]
param w[D,F]
h[B,S,F] = gelu(x[B,S,D] * w[D,F])
output h
""", x=x, w=w)["h"]
    np.testing.assert_allclose(out, np_gelu_tanh(np.einsum("bsd,df->bsf", f64(x), f64(w))), **F32)


def test_an_index_used_once_inside_a_function_is_summed_before_it():
    x = normal((3, 4), seed=26, scale=0.5)
    out = run("dim I=3 J=4\ninput x[I,J]\ny[I] = exp(x[I,J])\noutput y", x=x)["y"]
    np.testing.assert_allclose(out, np.exp(f64(x).sum(axis=1)), **F32)  # exp of the sum


def test_an_index_spread_over_a_function_and_a_factor_is_summed_over_both():
    x, b = normal((3, 4), seed=27, scale=0.5), normal(4, seed=28)
    out = run("""
dim I=3 J=4
input x[I,J]
input b[J]
y[I] = exp(x[I,J]) * b[J]
output y
""", x=x, b=b)["y"]
    np.testing.assert_allclose(out, np.exp(f64(x)) @ f64(b), **F32)


def test_an_index_in_both_terms_of_a_sum_is_summed_over_the_whole_sum():
    a, b = normal((3, 4), seed=29), normal(4, seed=30)
    out = run("""
dim I=3 J=4
input a[I,J]
input b[J]
s[I] = a[I,J] + b[J]
m[I] = max2(a[I,J], b[J])
output s
output m
""", a=a, b=b)
    np.testing.assert_allclose(out["s"], (f64(a) + f64(b)).sum(axis=1), **F32)
    np.testing.assert_allclose(out["m"], np.maximum(f64(a), f64(b)).sum(axis=1), **F32)


def test_an_index_alone_in_an_added_term_is_summed_within_that_term():
    a, c = normal((3, 4), seed=31), normal(3, seed=32)
    out = run("dim I=3 J=4\ninput a[I,J]\ninput c[I]\ny[I] = a[I,J] + c[I]\noutput y",
              a=a, c=c)["y"]
    # Not (a + c) summed over J, which would count c four times.
    np.testing.assert_allclose(out, f64(a).sum(axis=1) + f64(c), **F32)


def test_different_summed_indices_are_placed_independently():
    a, b, c = normal((3, 4), seed=33), normal((3, 5), seed=34), normal(5, seed=35)
    out = run("""
dim I=3 J=4 K=5
input a[I,J]
input b[I,K]
input c[K]
y[I] = exp(a[I,J] / 4) + b[I,K] * c[K]
output y
""", a=a, b=b, c=c)["y"]
    np.testing.assert_allclose(out, np.exp(f64(a).sum(axis=1) / 4) + f64(b) @ f64(c), **F32)


def test_a_product_divided_by_a_size_sums_before_dividing():
    a, b = normal((3, 16), seed=36), normal(16, seed=37)
    out = run("""
dim I=3 J=16
input a[I,J]
input b[J]
y[I] = a[I,J] * b[J] / sqrt(J)
output y
""", a=a, b=b)["y"]
    np.testing.assert_allclose(out, f64(a) @ f64(b) / 4.0, **F32)


def test_an_index_in_a_denominator_is_summed_over_the_whole_quotient():
    a, b, c = normal((3, 4), seed=111), normal(4, seed=112), normal(4, seed=113) + np.float32(3)
    out = run("""
dim I=3 J=4
input a[I,J]
input b[J]
input c[J]
y[I] = a[I,J] * b[J] / c[J]
output y
""", a=a, b=b, c=c)["y"]
    np.testing.assert_allclose(out, (f64(a) * f64(b) / f64(c)).sum(axis=1), **F32)


def test_parenthesised_inner_contraction_sums_its_own_index():
    a, b, c = normal((3, 4), seed=38), normal((4, 5), seed=39), normal(5, seed=40)
    out = run("""
dim I=3 J=4 K=5
input a[I,J]
input b[J,K]
input c[K]
y[I] = relu(a[I,J] * relu(b[J,K] * c[K]))
output y
""", a=a, b=b, c=c)["y"]
    inner = np.maximum(f64(b) @ f64(c), 0)
    np.testing.assert_allclose(out, np.maximum(f64(a) @ inner, 0), **F32)


def test_an_index_bound_by_an_explicit_reduction_is_not_the_same_as_one_outside_it():
    # The J inside sum[J] is bound there; the J of b[J] outside is summed on its own.
    a, b = normal((3, 4), seed=41), normal(4, seed=42)
    out = run("""
dim I=3 J=4
input a[I,J]
input b[J]
y[I] = sum[J](a[I,J]) * b[J]
output y
""", a=a, b=b)["y"]
    np.testing.assert_allclose(out, f64(a).sum(axis=1) * f64(b).sum(), **F32)


def test_a_library_functions_own_index_is_a_use_so_omitting_it_sums_the_result():
    x = normal((3, 4), seed=43)
    out = run("""
dim I=3 J=4
input x[I,J]
p[I] = softmax[J](x[I,J])
c[I] = cumsum[J](x[I,J])
output p
output c
""", x=x)
    np.testing.assert_allclose(out["p"], np.ones(3), **F32)
    weights = np.array([4.0, 3.0, 2.0, 1.0])  # x[j] appears in the cumsums at j, j+1, ...
    np.testing.assert_allclose(out["c"], f64(x) @ weights, **F32)


def test_constant_factors_of_a_contraction_scale_it():
    a, b = normal((3, 4), seed=44), normal(4, seed=45)
    out = run("""
dim I=3 J=4 K=7
input a[I,J]
input b[J]
p[I] = 0.5 * a[I,J] * b[J]
q[I] = a[I,J] * K * b[J] * 2
output p
output q
""", a=a, b=b)
    np.testing.assert_allclose(out["p"], 0.5 * (f64(a) @ f64(b)), **F32)
    np.testing.assert_allclose(out["q"], 14.0 * (f64(a) @ f64(b)), **F32)


def test_constant_factor_of_a_contraction_with_reordered_result():
    a, b = normal((3, 4), seed=114), normal((4, 5), seed=115)
    out = run("""
dim I=3 J=4 K=5
input a[I,J]
input b[J,K]
y[K,I] = 2 * a[I,J] * b[J,K]
output y
""", a=a, b=b)["y"]
    np.testing.assert_allclose(out, 2 * (f64(a) @ f64(b)).T, **F32)


def test_a_contraction_broadcasts_to_a_left_hand_index_it_lacks():
    a, b = normal((3, 4), seed=116), normal(4, seed=117)
    out = run("""
dim I=3 J=5 K=4
input a[I,K]
input b[K]
y[I,J] = a[I,K] * b[K]
output y
""", a=a, b=b)["y"]
    np.testing.assert_allclose(out, np.broadcast_to((f64(a) @ f64(b))[:, None], (3, 5)), **F32)


def test_three_operand_contraction():
    a, b, c = normal((3, 4), seed=46), normal((4, 5), seed=47), normal((5, 2), seed=48)
    out = run("""
dim I=3 J=4 K=5 L=2
input a[I,J]
input b[J,K]
input c[K,L]
y[I,L] = a[I,J] * b[J,K] * c[K,L]
output y
""", a=a, b=b, c=c)["y"]
    np.testing.assert_allclose(out, f64(a) @ f64(b) @ f64(c), **F32)


def test_contraction_with_an_index_shared_by_three_operands():
    a, b, c = normal((3, 4), seed=49), normal((4, 5), seed=50), normal((4, 5), seed=51)
    out = run("""
dim I=3 J=4 K=5
input a[I,J]
input b[J,K]
input c[J,K]
y[K,I] = a[I,J] * b[J,K] * c[J,K]
output y
""", a=a, b=b, c=c)["y"]
    np.testing.assert_allclose(out, np.einsum("ij,jk,jk->ki", f64(a), f64(b), f64(c)), **F32)


def test_full_contraction_to_a_scalar():
    x, y = normal(6, seed=52), normal(6, seed=53)
    out = run("dim I=6\ninput x[I]\ninput y[I]\nd[] = x[I] * y[I]\noutput d", x=x, y=y)["d"]
    assert out.shape == ()
    np.testing.assert_allclose(out, f64(x) @ f64(y), **F32)


# ---- constants and sizes


def test_numbers_and_dimension_sizes_are_scalars():
    x = normal(5, seed=54)
    out = run("""
dim I=5 K=64
input x[I]
y[I] = x[I] / sqrt(K) + 2 * I - 0.25
z[I] = x[I] * 1e-3 + .5
output y
output z
""", x=x)
    np.testing.assert_allclose(out["y"], f64(x) / 8.0 + 10.0 - 0.25, **F32)
    np.testing.assert_allclose(out["z"], f64(x) * 1e-3 + 0.5, **F32)


def test_sizes_follow_overrides():
    x = normal(5, seed=55)
    out = run("dim I=5 K=64\ninput x[I]\ny[I] = x[I] * K\noutput y", overrides={"K": 9}, x=x)["y"]
    np.testing.assert_allclose(out, 9 * f64(x), **F32)


# ---- explicit reductions

REDUCERS = {"sum": np.sum, "max": np.max, "min": np.min, "mean": np.mean}


@pytest.mark.parametrize("kind", sorted(REDUCERS))
@pytest.mark.parametrize("over, axes, kept", [("J", (1,), "I,K"), ("K", (2,), "I,J"),
                                              ("I,K", (0, 2), "J"), ("J,I", (0, 1), "K")])
def test_explicit_reduction(kind, over, axes, kept):
    x = normal((3, 4, 5), seed=56)
    out = run(f"""
dim I=3 J=4 K=5
input x[I,J,K]
y[{kept}] = {kind}[{over}](x[I,J,K])
output y
""", x=x)["y"]
    np.testing.assert_allclose(out, REDUCERS[kind](f64(x), axis=axes), **F32)


def test_reduction_result_takes_the_left_hand_index_order():
    x = normal((3, 4, 5), seed=57)
    out = run("dim I=3 J=4 K=5\ninput x[I,J,K]\ny[K,I] = max[J](x[I,J,K])\noutput y", x=x)["y"]
    np.testing.assert_array_equal(out, x.max(axis=1).T)


def test_mean_divides_by_the_size_of_its_indices():
    x = normal((3, 4, 5), seed=58)
    out = run("dim I=3 J=4 K=5\ninput x[I,J,K]\ny[I] = mean[J,K](x[I,J,K])\noutput y", x=x)["y"]
    np.testing.assert_allclose(out, f64(x).sum(axis=(1, 2)) / 20, **F32)


def test_explicit_sum_and_mean_of_a_scaled_product():
    a, b = normal((3, 4), seed=59), normal(4, seed=60)
    out = run("""
dim I=3 J=4
input a[I,J]
input b[J]
s[I] = sum[J](3 * a[I,J] * b[J])
m[I] = mean[J](a[I,J] * b[J] * 0.5)
output s
output m
""", a=a, b=b)
    np.testing.assert_allclose(out["s"], 3 * (f64(a) @ f64(b)), **F32)
    np.testing.assert_allclose(out["m"], 0.5 * (f64(a) @ f64(b)) / 4, **F32)


def test_max_and_min_of_a_product_are_not_contractions():
    a, b = normal((3, 4), seed=61), normal(4, seed=62)
    out = run("""
dim I=3 J=4
input a[I,J]
input b[J]
hi[I] = max[J](-2 * a[I,J] * b[J])
lo[I] = min[J](a[I,J] * b[J])
output hi
output lo
""", a=a, b=b)
    np.testing.assert_allclose(out["hi"], (-2 * f64(a) * f64(b)).max(axis=1), **F32)
    np.testing.assert_allclose(out["lo"], (f64(a) * f64(b)).min(axis=1), **F32)


def test_explicit_sum_of_a_non_product():
    a = normal((3, 4), seed=63)
    out = run("dim I=3 J=4\ninput a[I,J]\ny[I] = sum[J](exp(a[I,J]))\noutput y", a=a)["y"]
    np.testing.assert_allclose(out, np.exp(f64(a)).sum(axis=1), **F32)


# ---- library functions over one index, in every position

LIBRARY = {"softmax": np_softmax, "rmsnorm": np_rmsnorm, "layernorm": np_layernorm,
           "cumsum": np_cumsum_inclusive}
AXES = [("A", 0), ("B", 1), ("C", 2)]


@pytest.mark.parametrize("kind", sorted(LIBRARY))
@pytest.mark.parametrize("index, axis", AXES)
def test_library_function_over_an_index_in_any_position(kind, index, axis):
    x = normal((3, 4, 5), seed=64, scale=2.0)
    out = run(f"""
dim A=3 B=4 C=5
input x[A,B,C]
y[A,B,C] = {kind}[{index}](x[A,B,C])
output y
""", x=x)["y"]
    np.testing.assert_allclose(out, LIBRARY[kind](f64(x), axis), **F32)


@pytest.mark.parametrize("index, axis", AXES)
def test_logsumexp_removes_its_index(index, axis):
    x = normal((3, 4, 5), seed=65, scale=2.0)
    kept = ",".join(name for name, _ in AXES if name != index)
    out = run(f"""
dim A=3 B=4 C=5
input x[A,B,C]
y[{kept}] = logsumexp[{index}](x[A,B,C])
output y
""", x=x)["y"]
    np.testing.assert_allclose(out, np_logsumexp(f64(x), axis), **F32)


def test_logsumexp_binds_its_index_so_it_broadcasts_back_as_log_softmax():
    x = normal((3, 4, 5), seed=118, scale=2.0)
    out = run("""
dim A=3 B=4 C=5
input x[A,B,C]
y[A,B,C] = x[A,B,C] - logsumexp[B](x[A,B,C])
r[C,A] = logsumexp[B](x[A,B,C])
output y
output r
""", x=x)
    np.testing.assert_allclose(out["y"], np.log(np_softmax(f64(x), 1)), **F32)
    np.testing.assert_allclose(out["r"], np_logsumexp(f64(x), 1).T, **F32)


def test_a_normalised_operand_contracts_with_a_factor_over_the_norm_index():
    # rmsnorm[D] keeps D, so D used again outside it is summed over the product.
    x, w = normal((3, 6), seed=123), normal((6, 2), seed=124)
    out = run("""
dim I=3 D=6 F=2
input x[I,D]
param w[D,F]
y[I,F] = rmsnorm[D](x[I,D]) * w[D,F]
output y
""", x=x, w=w)["y"]
    np.testing.assert_allclose(out, np_rmsnorm(f64(x), 1) @ f64(w), **F32)


def test_library_result_takes_the_left_hand_index_order():
    x = normal((3, 4, 5), seed=66)
    out = run("dim A=3 B=4 C=5\ninput x[A,B,C]\ny[C,A,B] = softmax[A](x[A,B,C])\noutput y",
              x=x)["y"]
    np.testing.assert_allclose(out, np.transpose(np_softmax(f64(x), 0), (2, 0, 1)), **F32)


def test_cumsum_is_inclusive():
    x = np.array([[1, 2, 3, 4], [10, 20, 30, 40]], dtype=np.float32)
    out = run("dim I=2 J=4\ninput x[I,J]\ny[I,J] = cumsum[J](x[I,J])\noutput y", x=x)["y"]
    np.testing.assert_array_equal(out, [[1, 3, 6, 10], [10, 30, 60, 100]])


def test_cumsum_of_integers_stays_exact_integers():
    x = np.random.default_rng(67).integers(0, 1 << 20, size=(2, 40)).astype(np.int32)
    out = run("dim I=2 J=40\ninput x[I,J] : i32\ny[I,J] = cumsum[J](x[I,J])\noutput y", x=x)["y"]
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np_cumsum_inclusive(x.astype(np.int64), 1))


def test_norms_use_an_epsilon_of_1e_minus_6():
    # At this scale mean(x^2) is about 1e-6, so the epsilon shows in the result.
    x = normal((4, 8), seed=68, scale=1e-3)
    out = run("""
dim I=4 D=8
input x[I,D]
r[I,D] = rmsnorm[D](x[I,D])
l[I,D] = layernorm[D](x[I,D])
output r
output l
""", x=x)
    np.testing.assert_allclose(out["r"], np_rmsnorm(f64(x), 1), **F32)
    np.testing.assert_allclose(out["l"], np_layernorm(f64(x), 1), **F32)
    assert np.max(np.abs(out["r"] - f64(x) / np.sqrt((f64(x) ** 2).mean(1, keepdims=True)))) > 0.01


def test_softmax_and_logsumexp_of_large_logits_stay_finite():
    x = (normal((3, 6), seed=69) + np.float32(1000)).astype(np.float32)
    out = run("""
dim I=3 J=6
input x[I,J]
p[I,J] = softmax[J](x[I,J])
l[I] = logsumexp[J](x[I,J])
output p
output l
""", x=x)
    np.testing.assert_allclose(out["p"], np_softmax(f64(x), 1), **F32)
    np.testing.assert_allclose(out["l"], np_logsumexp(f64(x), 1), **F32)


def test_library_function_of_a_contraction_sums_inside_it():
    q, k = normal((4, 3), seed=70), normal((5, 3), seed=71)
    out = run("""
dim S=4 T=5 K=3
input q[S,K]
input k[T,K]
p[S,T] = softmax[T](q[S,K] * k[T,K] / sqrt(K))
output p
""", q=q, k=k)["p"]
    np.testing.assert_allclose(out, np_softmax(f64(q) @ f64(k).T / math.sqrt(3), 1), **F32)


# ---- route: GShard top-k routing with capacity


def test_route_top1_drops_tokens_past_capacity():
    g = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=np.float32)
    out = run("""
dim S=4 E=2 C=1
input g[S,E]
c[S,E,C] = route[E,C](g[S,E], k=1)
output c
""", g=g)["c"]
    expected = np.zeros((4, 2, 1))
    expected[0, 0, 0] = 1.0  # token 0 takes expert 0's only slot; token 1 finds it full
    expected[2, 1, 0] = 1.0  # token 2 takes expert 1's only slot; token 3 finds it full
    np.testing.assert_array_equal(out, expected)


def test_route_top2_places_every_first_choice_before_any_second():
    g = np.array([[0.5, 0.3, 0.2],
                  [0.6, 0.1, 0.3],
                  [0.7, 0.2, 0.1]], dtype=np.float32)
    out = run("""
dim S=3 E=3 C=2
input g[S,E]
c[S,E,C] = route[E,C](g[S,E], k=2)
output c
""", g=g)["c"]
    expected = np.zeros((3, 3, 2))
    # First choices: tokens 0 and 1 fill expert 0; token 2's first choice is dropped.
    expected[0, 0, 0] = 0.5 / 0.8
    expected[1, 0, 1] = 0.6 / 0.9
    # Second choices, in token order: token 0 -> expert 1 slot 0, token 1 -> expert 2
    # slot 0, token 2 -> expert 1 slot 1 (weighed by its top-2 sum, dropped one included).
    expected[0, 1, 0] = 0.3 / 0.8
    expected[1, 2, 0] = 0.3 / 0.9
    expected[2, 1, 1] = 0.2 / 0.9
    np.testing.assert_allclose(out, expected, **F32)


def _softmax_gates(shape, seed):
    return np_softmax(normal(shape, seed=seed, scale=2.0).astype(np.float64), -1).astype(np.float32)


@pytest.mark.parametrize("k, capacity", [(1, 2), (1, 8), (2, 3), (2, 16), (3, 2)])
def test_route_with_groups_matches_gshard(k, capacity):
    g = _softmax_gates((3, 16, 4), seed=72 + k + capacity)
    out = run(f"""
dim G=3 S=16 E=4 C={capacity}
input g[G,S,E]
c[G,S,E,C] = route[E,C](g[G,S,E], k={k})
output c
""", g=g)["c"]
    expected = np_gshard_route(f64(g), k, capacity)
    np.testing.assert_allclose(out, expected, **F32)
    if k * 16 > 4 * capacity:
        # Small capacity: some assignment was dropped.
        assert np.count_nonzero(out) < 3 * 16 * k


def test_route_groups_are_independent():
    g = _softmax_gates((2, 8, 4), seed=80)
    source = """
dim G=2 S=8 E=4 C=2
input g[G,S,E]
c[G,S,E,C] = route[E,C](g[G,S,E], k=2)
output c
"""
    both = run(source, g=g)["c"]
    alone = run(source.replace("G=2", "G=1"), g=g[1:])["c"]
    np.testing.assert_array_equal(both[1:], alone)


def test_route_result_takes_the_left_hand_index_order():
    g = _softmax_gates((2, 8, 4), seed=81)
    out = run("""
dim G=2 S=8 E=4 C=3
input g[G,S,E]
c[E,C,G,S] = route[E,C](g[G,S,E], k=2)
output c
""", g=g)["c"]
    expected = np.transpose(np_gshard_route(f64(g), 2, 3), (2, 3, 0, 1))
    np.testing.assert_allclose(out, expected, **F32)


def test_route_of_a_softmax_expression():
    x, w = normal((2, 8, 5), seed=82), normal((5, 4), seed=83)
    out = run("""
dim G=2 S=8 D=5 E=4 C=3
input x[G,S,D]
param w[D,E]
c[G,S,E,C] = route[E,C](softmax[E](x[G,S,D] * w[D,E]), k=2)
output c
""", x=x, w=w)["c"]
    gates = np_softmax(np.einsum("gsd,de->gse", f64(x), f64(w)), -1)
    np.testing.assert_allclose(out, np_gshard_route(gates, 2, 3), **F32)


# ---- repeat


def test_repeat_uses_one_slice_of_each_stacked_param_per_trip():
    x, w, b = normal((3, 4), seed=84), normal((3, 4, 4), seed=85, scale=0.5), normal((3, 4), seed=86)
    out = run("""
dim B=3 D=4 E=D L=3
input x[B,D]
repeat L {
  param w[D,E]
  param b[D]
  h[B,E] = tanh(x[B,D] * w[D,E])
  x[B,D] = x[B,D] + h[B,D]
  x[B,D] = x[B,D] * b[D]
}
output x
""", x=x, w=w, b=b)["x"]
    expected = f64(x)
    for trip in range(3):
        h = np.tanh(expected @ f64(w[trip]))
        expected = expected + h  # the second redefinition sees the first
        expected = expected * f64(b[trip])
    np.testing.assert_allclose(out, expected, **F32)


def test_repeat_carries_several_values_and_reads_outer_ones():
    x, scale, w = normal((2, 5), seed=87), normal(5, seed=88), normal((4, 5), seed=89)
    out = run("""
dim B=2 D=5 L=4
input x[B,D]
input scale[D]
acc[B] = max[D](x[B,D])
repeat L {
  param w[D]
  x[B,D] = tanh(x[B,D] * scale[D] + w[D])
  acc[B] = acc[B] + sum[D](x[B,D])
}
total[B] = acc[B] + sum[D](x[B,D])
output x
output acc
output total
""", x=x, scale=scale, w=w)
    xs, acc = f64(x), f64(x).max(axis=1)
    for trip in range(4):
        xs = np.tanh(xs * f64(scale) + f64(w[trip]))
        acc = acc + xs.sum(axis=1)
    np.testing.assert_allclose(out["x"], xs, **F32)
    np.testing.assert_allclose(out["acc"], acc, **F32)
    np.testing.assert_allclose(out["total"], acc + xs.sum(axis=1), **F32)


def test_repeat_count_follows_an_override():
    x, w = normal(3, seed=90), normal((5, 3), seed=91)
    out = run("""
dim D=3 L=2
input x[D]
repeat L {
  param w[D]
  x[D] = x[D] * w[D] + 1
}
output x
""", overrides={"L": 5}, x=x, w=w)["x"]
    expected = f64(x)
    for trip in range(5):
        expected = expected * f64(w[trip]) + 1
    np.testing.assert_allclose(out, expected, **F32)


def test_nested_repeat_stacks_params_by_every_enclosing_dim():
    x, u, v = normal(3, seed=92), normal((2, 3), seed=93), normal((2, 3, 3), seed=94)
    out = run("""
dim D=3 L=2 M=3
input x[D]
repeat L {
  param u[D]
  x[D] = x[D] + u[D]
  repeat M {
    param v[D]
    x[D] = tanh(x[D] * v[D])
  }
}
output x
""", x=x, u=u, v=v)["x"]
    expected = f64(x)
    for outer in range(2):
        expected = expected + f64(u[outer])
        for inner in range(3):
            expected = np.tanh(expected * f64(v[outer, inner]))
    np.testing.assert_allclose(out, expected, **F32)


def test_nested_repeat_carries_a_value_only_the_inner_block_redefines():
    x, v = normal(3, seed=119), normal((2, 3, 3), seed=120)
    out = run("""
dim D=3 L=2 M=3
input x[D]
repeat L {
  repeat M {
    param v[D]
    x[D] = tanh(x[D] + v[D])
  }
}
output x
""", x=x, v=v)["x"]
    expected = f64(x)
    for outer in range(2):
        for inner in range(3):
            expected = np.tanh(expected + f64(v[outer, inner]))
    np.testing.assert_allclose(out, expected, **F32)


# ---- dtypes


def test_bf16_results_are_rounded_to_bf16():
    a = normal((4, 8), seed=95).astype(ml_dtypes.bfloat16)
    b = normal((8, 3), seed=96).astype(ml_dtypes.bfloat16)
    out = run("""
dtype bf16
dim I=4 J=8 K=3
input a[I,J]
input b[J,K]
c[I,K] = a[I,J] * b[J,K]
e[I,J] = exp(a[I,J]) * 3
output c
output e
""", a=a, b=b)
    assert out["c"].dtype == ml_dtypes.bfloat16 and out["e"].dtype == ml_dtypes.bfloat16
    np.testing.assert_allclose(f64(out["c"]), f64(a) @ f64(b), **BF16)
    np.testing.assert_allclose(f64(out["e"]), np.exp(f64(a)) * 3, **BF16)


def test_f16_results_are_rounded_to_f16():
    x = normal((4, 6), seed=97).astype(np.float16)
    out = run("""
dtype f16
dim I=4 J=6
input x[I,J]
s[I,J] = softmax[J](x[I,J])
g[I,J] = gelu(x[I,J])
output s
output g
""", x=x)
    assert out["s"].dtype == np.float16 and out["g"].dtype == np.float16
    np.testing.assert_allclose(f64(out["s"]), np_softmax(f64(x), 1), **F16)
    np.testing.assert_allclose(f64(out["g"]), np_gelu_tanh(f64(x)), **F16)


def test_f64_is_computed_in_double_precision():
    x = np.random.default_rng(98).standard_normal((3, 4))
    out = run("dtype f64\ndim I=3 J=4\ninput x[I,J]\ny[I,J] = softmax[J](x[I,J]) * 3\noutput y",
              x=x)["y"]
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, np_softmax(x, 1) * 3, rtol=1e-13)


def test_i32_arithmetic_and_contraction_are_exact():
    rng = np.random.default_rng(99)
    # Products near 9e6 summed eight times pass 2^24, where f32 would round.
    a = rng.integers(2000, 3000, size=(3, 8)).astype(np.int32)
    b = rng.integers(2000, 3000, size=(8, 2)).astype(np.int32)
    out = run("""
dim I=3 J=8 K=2
input a[I,J] : i32
input b[J,K] : i32
c[I,K] = a[I,J] * b[J,K]
d[I,J] = a[I,J] * 3 - a[I,J] * a[I,J] + 1
output c
output d
""", a=a, b=b)
    assert out["c"].dtype == np.int32 and out["d"].dtype == np.int32
    np.testing.assert_array_equal(out["c"], a.astype(np.int64) @ b.astype(np.int64))
    np.testing.assert_array_equal(out["d"], a.astype(np.int64) * 3 - a.astype(np.int64) ** 2 + 1)


def test_i32_elementwise_functions_stay_exact_integers():
    a = np.random.default_rng(122).integers(-40000, 40000, size=7).astype(np.int32)
    out = run("""
dim I=7
input a[I] : i32
r[I] = relu(a[I])
m[I] = abs(-a[I])
s[I] = square(a[I]) + max2(a[I], 7) - min2(a[I], 7)
output r
output m
output s
""", a=a)
    wide = a.astype(np.int64)
    assert all(array.dtype == np.int32 for array in out.values())
    np.testing.assert_array_equal(out["r"], np.maximum(wide, 0))
    np.testing.assert_array_equal(out["m"], np.abs(wide))
    np.testing.assert_array_equal(out["s"], wide * wide + np.abs(wide - 7))


def test_summing_a_comparison_counts_exactly():
    x = normal((3, 50), seed=100)
    out = run("dim I=3 J=50\ninput x[I,J]\nn[I] = sum[J](x[I,J] > 0)\noutput n", x=x)["n"]
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, (x > 0).sum(axis=1))


def test_mean_of_a_comparison_is_a_fraction():
    x = normal((3, 50), seed=121)
    out = run("dim I=3 J=50\ninput x[I,J]\nf[I] = mean[J](x[I,J] > 0)\noutput f", x=x)["f"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (x > 0).mean(axis=1), **F32)


def test_bool_inputs_select_and_mask():
    rng = np.random.default_rng(101)
    m = rng.random((3, 4)) < 0.5
    x = normal((3, 4), seed=102)
    out = run("""
dim I=3 J=4
input m[I,J] : bool
input x[I,J]
both[I,J] = m[I,J] == (x[I,J] > 0)
picked[I,J] = where(m[I,J], x[I,J], 0.0)
masked[I,J] = (x[I,J] > 0) * x[I,J]
output both
output picked
output masked
""", m=m, x=x)
    assert out["both"].dtype == np.bool_
    np.testing.assert_array_equal(out["both"], m == (x > 0))
    np.testing.assert_array_equal(out["picked"], np.where(m, x, 0))
    assert out["masked"].dtype == np.float32
    np.testing.assert_array_equal(out["masked"], np.where(x > 0, x, 0))


def test_mixing_an_i32_input_with_f32_gives_f32():
    n = np.arange(5, dtype=np.int32)
    x = normal(5, seed=103)
    out = run("dim I=5\ninput n[I] : i32\ninput x[I]\ny[I] = x[I] * n[I] + 0.5\noutput y",
              n=n, x=x)["y"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, f64(x) * n + 0.5, **F32)


def test_left_hand_dtype_annotation_sets_the_result_type():
    a = normal((3, 64), seed=104).astype(ml_dtypes.bfloat16)
    b = normal(64, seed=105).astype(ml_dtypes.bfloat16)
    x = normal(64, seed=106)
    out = run("""
dtype bf16
dim I=3 J=64
input a[I,J]
input b[J]
input x[J] : f32
wide[I] : f32 = a[I,J] * b[J]
narrow[J] : bf16 = x[J] * 3
n[I] : i32 = sum[J](a[I,J] > 0)
output wide
output narrow
output n
""", a=a, b=b, x=x)
    assert out["wide"].dtype == np.float32
    # An f32 result is not rounded through bf16 on the way.
    np.testing.assert_allclose(out["wide"], f64(a) @ f64(b), **F32)
    assert out["narrow"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out["narrow"], (f64(x) * 3).astype(ml_dtypes.bfloat16))
    assert out["n"].dtype == np.int32
    np.testing.assert_array_equal(out["n"], (f64(a) > 0).sum(axis=1))


def test_left_hand_dtype_annotation_converts_the_value_not_the_operands():
    # Every sum here is a whole number, so converting it to i32 is exact; converting
    # each operand first would truncate the halves and quarters away.
    x = np.array([[0.5, 0.5, 0.5, 0.5], [1.5, 1.5, 0.25, 0.75]], dtype=np.float32)
    half = np.full(4, 0.5, dtype=np.float32)
    out = run("""
dim I=2 J=4
input x[I,J]
input half[J]
total[I] : i32 = sum[J](x[I,J])
plus_zero[I] : i32 = sum[J](x[I,J]) + 0
implicit[I] : i32 = x[I,J]
dot[I] : i32 = x[I,J] * half[J] * 2
output total
output plus_zero
output implicit
output dot
""", x=x, half=half)
    assert all(array.dtype == np.int32 for array in out.values())
    assert {name: out[name].tolist() for name in out} == {name: [2, 4] for name in out}


def test_narrowing_annotation_rounds_the_result_once_not_the_operands():
    # In f64 the sum is exactly 1; summing after rounding the operands to f32 loses it.
    x = np.array([[1e8, 1.0, -1e8]])
    out = run("""
dtype f64
dim I=1 J=3
input x[I,J]
direct[I] : f32 = sum[J](x[I,J])
plus_zero[I] : f32 = sum[J](x[I,J]) + 0
output direct
output plus_zero
""", x=x)
    assert out["direct"].dtype == np.float32
    assert {name: out[name].tolist() for name in out} == {"direct": [1.0], "plus_zero": [1.0]}


# ---- scalar (rank-0) tensors


def test_scalar_tensors_reduce_and_broadcast_back():
    x = normal((3, 4), seed=107)
    out = run("""
dim I=3 J=4
input x[I,J]
s[] = sum[I,J](x[I,J])
m[] = max[I,J](x[I,J])
centered[I,J] = x[I,J] - s[] / 12
scaled[I,J] = x[I,J] / m[]
output s
output m
output centered
output scaled
""", x=x)
    assert out["s"].shape == () and out["m"].shape == ()
    np.testing.assert_allclose(out["s"], f64(x).sum(), **F32)
    np.testing.assert_array_equal(out["m"], x.max())
    np.testing.assert_allclose(out["centered"], f64(x) - f64(x).mean(), **F32)
    np.testing.assert_allclose(out["scaled"], f64(x) / f64(x).max(), **F32)


def test_scalar_input():
    s, x = np.float32(2.5), normal(4, seed=108)
    out = run("dim I=4\ninput s[]\ninput x[I]\ny[I] = x[I] * s[]\noutput y", s=s, x=x)["y"]
    np.testing.assert_allclose(out, 2.5 * f64(x), **F32)


# ---- layouts


def test_layouts_do_not_change_values():
    a, b = normal((8, 4), seed=109), normal((4, 8), seed=110)
    sharded = run("""
mesh x=2 y=4
dim I=8 J=4 K=8
input a[I@x, J@y]
input b[J, K@(x,y)]
c[I@y, K] = a[I,J] * b[J,K]
output c[I, K@x]
""", a=a, b=b)["c"]
    plain = run("dim I=8 J=4 K=8\ninput a[I,J]\ninput b[J,K]\nc[I,K] = a[I,J] * b[J,K]\noutput c",
                a=a, b=b)["c"]
    np.testing.assert_array_equal(sharded, plain)
    np.testing.assert_allclose(plain, f64(a) @ f64(b), **F32)
