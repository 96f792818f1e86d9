"""The ops real models need (LANGUAGE.md, "More ops"): take (an embedding lookup, and its
batched form, the target logits of a cross-entropy) and its adjoint scatter-add, pos(S) and
-inf (causal masks), sin, cos, erf and pow.

Each is checked (its IR and its diagnostics, with exact codes and positions), run by the
reference against NumPy and SciPy, by the simulator on split layouts (a vocabulary-split
table, ids split over data parallelism, a causal mask over a split sequence) against the
reference, and by JAX (shard_map and the GSPMD twin) on 8 CPU devices; the vocabulary-
parallel embedding makes exactly Megatron's collective.
"""

import math

import numpy as np
import pytest
from scipy.special import erf

from einpar.api import compile_source, compile_spmd, random_inputs, run_jax
from einpar.backends.numpy_sim import run_spmd
from einpar.backends.reference import evaluate
from einpar.errors import EinparError, Span
from einpar.flops import op_flops
from einpar.inputs import check_inputs
from einpar.ir import (Const, Operand, Pos, Program, ScatterAdd, Take, TensorType, Value,
                       format_program)
from einpar.layout import Layout, Mesh
from einpar.spmd import collectives

from helpers import assert_matches_reference

EMBEDDING = """\
mesh dp=2 tp=4
dim B=4 S=8 V=256 D=16
input ids[B@dp,S] : i32
param emb[V@tp, D]
x[B@dp,S,D] = take[V](emb[V,D], ids[B,S])
output x
"""


def the_error(text: str):
    with pytest.raises(EinparError) as caught:
        compile_source(text, file="bad.ein")
    (found,) = caught.value.diagnostics
    return found


def simulated(program, inputs, objective="time"):
    spmd = compile_spmd(program, objective=objective)
    outputs, traffic = run_spmd(spmd, inputs)
    return spmd, outputs, traffic


def simulated_as_reference(program, seed: int, objective="time"):
    """The simulator's run on random inputs, checked against the reference's: (spmd, outputs)."""
    inputs = random_inputs(program, seed)
    spmd, outputs, _ = simulated(program, inputs, objective)
    assert_matches_reference(program, outputs, inputs)
    return spmd, outputs


# ---------------------------------------------------------------- checking


class TestChecking:
    def test_take_is_one_op_reading_the_table_and_the_ids(self):
        program = compile_source(EMBEDDING)
        (op,) = program.ops
        assert isinstance(op, Take)
        assert (op.table, op.ids, op.index) == (Operand("emb", ("V", "D")), Operand("ids", ("B", "S")), "V")
        assert op.result.type == TensorType("f32", ("B", "S", "D"), (4, 8, 16))

    def test_take_inside_an_expression_is_its_own_op_and_binds_V(self):
        program = compile_source("dim B=2 V=5 D=3\ninput ids[B] : i32\nparam e[V,D]\nparam w[D]\n"
                                 "y[B] = take[V](e[V,D], ids[B]) * w[D]\noutput y\n")
        assert "y.1: f32[B=2,D=3] = take[V](e[V,D], ids[B])" in format_program(program)
        assert "y: f32[B=2] = einsum(y.1[B,D], w[D])" in format_program(program)

    def test_take_keeps_the_table_dtype_and_the_left_sides_order(self):
        program = compile_source("dim B=2 V=5 D=3\ninput ids[B] : i32\nparam e[V,D] : bf16\n"
                                 "y[D,B] = take[V](e[V,D], ids[B])\noutput y\n")
        assert program.ops[0].result.type == TensorType("bf16", ("D", "B"), (3, 2))

    def test_pos_is_an_i32_map_and_a_number_times_it_is_a_float(self):
        program = compile_source("dim S=4\np[S] = pos(S)\nq[S] = pos(S) * 0.5\noutput p\noutput q\n")
        first, second = program.ops
        assert first.expr == Pos("S") and first.result.type.dtype == "i32"
        assert second.result.type.dtype == "f32"
        assert "map (f32(pos(S)) * 0.5)" in format_program(program)

    def test_minus_inf_is_a_float_literal(self):
        program = compile_source("dim S=4 T=S\ninput s[S,T]\n"
                                 "m[S,T] = where(pos(S) >= pos(T), s[S,T], -inf)\noutput m\n")
        assert program.ops[0].expr.args[2] == Const(float("-inf"))
        assert "map where((pos(S) >= pos(T)), s[S,T], -inf)" in format_program(program)

    def test_a_dim_named_inf_wins_over_the_literal(self):
        program = compile_source("dim inf=3 S=2\ninput x[S]\ny[S] = x[S] * inf\noutput y\n")
        assert program.ops[0].expr.args[1] == Const(3, "inf")

    def test_new_functions_promote_like_exp(self):
        program = compile_source("dim S=4\ninput n[S] : i32\ninput h[S] : bf16\n"
                                 "a[S] = sin(n[S])\nb[S] = pow(h[S], 2)\nc[S] = erf(h[S]) + cos(h[S])\n"
                                 "output a\noutput b\noutput c\n")
        assert [op.result.type.dtype for op in program.ops] == ["f32", "bf16", "bf16"]

    @pytest.mark.parametrize("text, code, message, line, col", [
        ("x[B,D] = take[V](e[V,D], f[B])", "E217", "take's ids must be integers (i32), not f32",
         6, 26),
        ("x[B,D] = take[B](e[V,D], ids[B])", "E217", "take along B, which the table does not have",
         6, 15),
        ("x[V,D] = take[V](e[V,D], vi[V])", "E217", "take's ids have the index V they select along",
         6, 26),
        ("x[B] = take[V,D](e[V,D], ids[B])", "E217", "take selects along one index of the table, "
         "got 2", 6, 8),
        ("x[B,D] = take(e[V,D], ids[B])", "E214", "'take' needs the index it works over in brackets",
         6, 10),
        ("x[B,D] = take[V](e[V,D])", "E214", "'take' takes 2 arguments, got 1", 6, 10),
        ("x[B] = pos(f[B])", "E218", "pos takes an index name, not an expression", 6, 12),
        ("x[B] = pos(Q)", "E203", "unknown dimension 'Q'", 6, 12),
        ("x[B] = pos[B](B)", "E214", "'pos' takes the index in parentheses, not in brackets", 6, 8),
        ("x[B] = pos(B, B)", "E214", "'pos' takes 1 argument, got 2", 6, 8),
    ])
    def test_misuse_is_a_diagnostic_at_the_mistake(self, text, code, message, line, col):
        header = ("dim B=2 V=5 D=3\ninput ids[B] : i32\ninput f[B]\nparam e[V,D]\n"
                  "input vi[V] : i32\n")
        found = the_error(header + text + "\n")
        assert (found.code, found.message, found.span.line, found.span.col) == (code, message, line, col)


# ---------------------------------------------------------------- values


class TestValues:
    def test_take_reads_rows(self):
        program = compile_source(EMBEDDING)
        inputs = random_inputs(program, 1)
        assert inputs["ids"].min() >= 0 and 10 <= inputs["ids"].max() < 256  # drawn among the rows
        expected = inputs["emb"][inputs["ids"]]
        np.testing.assert_array_equal(evaluate(program, inputs)["x"], expected)

    def test_functions_equal_numpy_and_scipy(self):
        program = compile_source("dim S=7\ninput x[S] : f64\n"
                                 "a[S] = sin(x[S])\nb[S] = cos(x[S])\nc[S] = erf(x[S])\n"
                                 "d[S] = pow(abs(x[S]), 1.5)\ne[S] = pow(x[S], 2)\n"
                                 "output a\noutput b\noutput c\noutput d\noutput e\n")
        x = np.array([-3.0, -1.0, -0.25, 0.0, 0.5, 2.0, 10.0])
        got = evaluate(program, {"x": x})
        np.testing.assert_array_equal(got["a"], np.sin(x))
        np.testing.assert_array_equal(got["b"], np.cos(x))
        np.testing.assert_array_equal(got["c"], erf(x))
        np.testing.assert_allclose(got["c"], [math.erf(v) for v in x], rtol=1e-15)
        np.testing.assert_array_equal(got["d"], np.abs(x) ** 1.5)
        np.testing.assert_array_equal(got["e"], x * x)

    def test_causal_softmax_puts_no_weight_on_later_positions(self):
        program = compile_source("dim S=5 T=S\ninput s[S,T]\n"
                                 "m[S,T] = where(pos(S) >= pos(T), s[S,T], -inf)\n"
                                 "p[S,T] = softmax[T](m[S,T])\noutput p\n")
        s = np.random.default_rng(0).standard_normal((5, 5)).astype(np.float32)
        p = evaluate(program, {"s": s})["p"]
        assert np.all(p[np.triu_indices(5, 1)] == 0)
        assert p[0, 0] == 1
        row = np.exp(s[3, :4] - s[3, :4].max())
        np.testing.assert_allclose(p[3, :4], row / row.sum(), rtol=1e-6)

    def test_a_number_as_the_ids_and_pos_under_a_sum(self):
        program = compile_source("dim S=4 V=6 D=2\nparam e[V,D]\na[D] = take[V](e[V,D], 3)\n"
                                 "b[] = sum[S](pos(S))\nc[] = sum[S](pos(S) * pos(S))\n"
                                 "output a\noutput b\noutput c\n")
        e = np.arange(12, dtype=np.float32).reshape(6, 2)
        got = evaluate(program, {"e": e})
        np.testing.assert_array_equal(got["a"], e[3])
        assert (got["b"], got["b"].dtype, got["c"]) == (6, np.int32, 14)

    def test_inf_literals(self):
        program = compile_source("dim S=3\ninput x[S]\ny[S] = min2(x[S], inf)\n"
                                 "z[S] = max2(x[S], -inf) + 0 * inf\noutput y\noutput z\n")
        got = evaluate(program, {"x": np.array([1.0, -2.0, 3.0], np.float32)})
        np.testing.assert_array_equal(got["y"], [1.0, -2.0, 3.0])
        assert np.isnan(got["z"]).all()  # 0 * inf, as IEEE says


# ---------------------------------------------------------------- out-of-range ids


class TestIdsOutOfRange:
    def test_an_input_id_outside_the_table_is_E310(self):
        program = compile_source(EMBEDDING)
        inputs = random_inputs(program, 0)
        inputs["ids"][1, 3] = 256
        with pytest.raises(EinparError) as caught:
            check_inputs(program, inputs, "in.npz")
        (found,) = caught.value.diagnostics
        assert found.code == "E310"
        assert found.message == ("'ids' in in.npz holds 256 at [1,3], outside [0, 256): "
                                 "take[V] in 'x' reads it as ids")
        assert (found.span.line, found.span.col) == (5, 15)

    @pytest.mark.parametrize("bad", [-1, 40])
    def test_a_computed_id_outside_the_table_is_E310_in_every_numpy_backend(self, bad):
        program = compile_source("mesh tp=2\ndim B=2 V=4 D=2\ninput ids[B] : i32\n"
                                 "param e[V@tp,D]\nj[B] : i32 = ids[B] + 0\n"
                                 "y[B,D] = take[V](e[V,D], j[B])\noutput y\n")
        inputs = {"ids": np.array([0, bad], np.int32), "e": np.ones((4, 2), np.float32)}
        for run in (lambda: evaluate(program, inputs), lambda: simulated(program, inputs)):
            with pytest.raises(EinparError) as caught:
                run()
            (found,) = caught.value.diagnostics
            assert found.code == "E310"
            assert found.message == f"id {bad} at j[B=1] is outside [0, 4) for V=4 in 'y'"

    def test_an_id_the_statement_computes_is_named_as_the_ids(self):
        program = compile_source("dim B=2 V=4 D=2\ninput ids[B] : i32\nparam e[V,D]\n"
                                 "y[B,D] = take[V](e[V,D], ids[B] + 3)\noutput y\n", file="p.ein")
        with pytest.raises(EinparError) as caught:
            evaluate(program, {"ids": np.array([0, 1], np.int32), "e": np.ones((4, 2), np.float32)})
        (found,) = caught.value.diagnostics
        assert found.message == "id 4 at the ids[B=1] is outside [0, 4) for V=4 in 'y'"
        assert (found.span.line, found.span.col) == (4, 10)


# ---------------------------------------------------------------- the simulator


class TestSimulator:
    def test_vocabulary_parallel_embedding_is_a_local_take_and_one_all_reduce(self):
        program = compile_source(EMBEDDING.replace("B=4 S=8 V=256 D=16", "B=8 S=512 V=32768 D=1024"))
        spmd = compile_spmd(program)
        (move,) = collectives(spmd)
        assert (move.kind, move.step.axes) == ("all_reduce", ("tp",))
        local = [s for s in spmd.steps if hasattr(s, "op")][0]
        assert spmd.values[local.op.table.value].layout == Layout((("tp",), ()))
        assert spmd.values[local.op.result.name].layout == Layout((("dp",), (), ()), (("tp", "sum"),))
        # The local result, 4·512·1024 floats, all-reduced over 4 devices: 2·3/4 of it.
        assert move.bytes_per_device == 4 * 512 * 1024 * 4 * 2 * 3 // 4

    def test_vocabulary_parallel_embedding_on_the_simulator_equals_the_reference(self):
        # Planned for bytes: at this size, time on h100x8 prefers gathering the small table.
        program = compile_source(EMBEDDING)
        inputs = random_inputs(program, 2)
        spmd, outputs, traffic = simulated(program, inputs, "bytes")
        assert [(c.kind, c.step.axes) for c in collectives(spmd)] == [("all_reduce", ("tp",))]
        np.testing.assert_array_equal(outputs["x"], inputs["emb"][inputs["ids"]])
        assert traffic.sent == [2 * 8 * 16 * 4 * 2 * 3 // 4] * 8

    def test_sequence_split_output_makes_it_a_reduce_scatter(self):
        program = compile_source(EMBEDDING.replace("x[B@dp,S,D]", "x[B@dp,S@tp,D]"))
        inputs = random_inputs(program, 3)
        spmd, outputs, _ = simulated(program, inputs, "bytes")
        assert [(c.kind, c.step.axes) for c in collectives(spmd)] == [("reduce_scatter", ("tp",))]
        np.testing.assert_array_equal(outputs["x"], inputs["emb"][inputs["ids"]])

    def test_ids_split_and_a_whole_table_need_no_communication(self):
        program = compile_source(EMBEDDING.replace("emb[V@tp, D]", "emb[V, D@tp]")
                                 .replace("x[B@dp,S,D]", "x[B@dp,S,D@tp]"))
        inputs = random_inputs(program, 4)
        spmd, outputs, traffic = simulated(program, inputs)
        assert collectives(spmd) == [] and traffic.sent == [0] * 8
        np.testing.assert_array_equal(outputs["x"], inputs["emb"][inputs["ids"]])

    def test_causal_mask_over_a_split_sequence(self):
        # Context parallelism: queries (S) split over sp; pos(S) counts from each device's block.
        program = compile_source("mesh sp=4\ndim S=16 T=S K=8\ninput q[S@sp,K]\ninput k[T,K]\n"
                                 "s[S@sp,T] = q[S,K] * k[T,K]\n"
                                 "m[S@sp,T] = where(pos(S) >= pos(T), s[S,T], -inf)\n"
                                 "p[S@sp,T] = softmax[T](m[S,T])\noutput p\n")
        _, outputs = simulated_as_reference(program, 5)
        assert np.all(outputs["p"][np.triu_indices(16, 1)] == 0)

    def test_pos_in_a_loop_body_counts_from_the_devices_block(self):
        # Each trip adds pos(S): x + L·pos(S) when w is ones, on a sequence split over sp.
        program = compile_source("mesh sp=2\ndim L=3 S=8 D=2\ninput x[S@sp,D]\nrepeat L {\n"
                                 "  param w[D]\n  x[S@sp,D] = x[S,D] * w[D] + pos(S)\n}\noutput x\n")
        inputs = {"x": np.zeros((8, 2), np.float32), "w": np.ones((3, 2), np.float32)}
        _, outputs, _ = simulated(program, inputs)
        np.testing.assert_array_equal(outputs["x"], 3 * np.arange(8.0)[:, None].repeat(2, axis=1))

    def test_pos_over_two_axes_counts_major_first(self):
        program = compile_source("mesh a=2 b=2\ndim S=8\np[S@(a,b)] = pos(S)\noutput p\n")
        _, outputs, _ = simulated(program, {})
        np.testing.assert_array_equal(outputs["p"], np.arange(8))

    def test_new_functions_on_split_values(self):
        program = compile_source("mesh dp=2 tp=2\ndim B=4 D=8\ninput x[B@dp,D@tp]\n"
                                 "y[B@dp,D@tp] = sin(x[B,D]) * cos(x[B,D]) + erf(x[B,D])"
                                 " + pow(abs(x[B,D]) + 1, 1.5)\noutput y\n")
        simulated_as_reference(program, 6)


# ---------------------------------------------------------------- pricing


def test_a_take_is_priced_by_the_rows_it_moves_not_the_table():
    from einpar.cost_model.cluster import preset
    from einpar.cost_model.estimate import estimate

    program = compile_source(EMBEDDING.replace("B=4 S=8 V=256 D=16", "B=8 S=512 V=32768 D=1024"))
    spmd = compile_spmd(program)
    (take,) = [op for op in estimate(program, spmd, preset("h100x8")).ops if op.what.startswith("take")]
    result, ids = 4 * 512 * 1024 * 4, 4 * 512 * 4
    assert (take.flops, take.hbm_bytes, take.bound) == (0, 2 * result + ids, "memory")


# ---------------------------------------------------------------- scatter-add


def scatter_program(table_layout, update_layout) -> Program:
    """g[V,D] = scatter_add[V](u[B,S,D], ids[B,S]): the gradient of an embedding table (no
    syntax writes it; the grad pass makes it from take)."""
    mesh = Mesh((("dp", 2), ("tp", 2)))
    dims = (("B", 4), ("S", 3), ("V", 8), ("D", 4))
    u = Value("u", TensorType("f32", ("B", "S", "D"), (4, 3, 4)), "input", update_layout)
    ids = Value("ids", TensorType("i32", ("B", "S"), (4, 3)), "input",
                Layout((update_layout.dims[0], ())) if update_layout else None)
    g = Value("g", TensorType("f32", ("V", "D"), (8, 4)), layout=table_layout)
    op = ScatterAdd(g, Operand("u", ("B", "S", "D")), Operand("ids", ("B", "S")), "V", "g",
                    Span("scatter.ein", 1, 1, 1, 2))
    from einpar.ir import Output
    return Program("scatter.ein", mesh, dims, "f32", (u, ids), (op,), (Output("g", "g", table_layout),))


def scatter_inputs():
    rng = np.random.default_rng(7)
    return {"u": rng.standard_normal((4, 3, 4)).astype(np.float32),
            "ids": np.array([[0, 7, 7], [3, 3, 3], [0, 5, 1], [7, 2, 0]], np.int32)}


def scatter_expected(inputs):
    expected = np.zeros((8, 4), np.float32)
    np.add.at(expected, inputs["ids"], inputs["u"])
    return expected


class TestScatterAdd:
    def test_reference_equals_numpy_add_at(self):
        program = scatter_program(None, None)
        inputs = scatter_inputs()
        np.testing.assert_allclose(evaluate(program, inputs)["g"], scatter_expected(inputs), rtol=1e-6)
        assert op_flops(program.ops[0], program.dim_sizes) == 4 * 3 * 4

    def test_split_rows_need_no_communication(self):
        # Rows V over tp and D over dp: each device keeps its own rows, sums its own columns.
        program = scatter_program(Layout((("tp",), ("dp",))), Layout(((), (), ("dp",))))
        inputs = scatter_inputs()
        spmd, outputs, traffic = simulated(program, inputs)
        assert collectives(spmd) == [] and traffic.sent == [0] * 4
        np.testing.assert_allclose(outputs["g"], scatter_expected(inputs), rtol=1e-6)

    def test_a_split_batch_leaves_the_rows_partial(self):
        # The update's B over dp: each device adds its own rows, a partial sum over dp.
        program = scatter_program(Layout((("tp",), ())), Layout((("dp",), (), ())))
        inputs = scatter_inputs()
        spmd, outputs, _ = simulated(program, inputs)
        assert [(c.kind, c.step.axes) for c in collectives(spmd)] in (
            [("all_reduce", ("dp",))], [("reduce_scatter", ("dp",)), ("all_gather", ("dp",))])
        local = [s for s in spmd.steps if hasattr(s, "op")][0]
        assert dict(spmd.values[local.op.result.name].layout.partial) == {"dp": "sum"}
        np.testing.assert_allclose(outputs["g"], scatter_expected(inputs), rtol=1e-6)


# ---------------------------------------------------------------- JAX


def on_jax(program, inputs, exact=False, objective="time"):
    """shard_map (einpar's plan for `objective`) and the GSPMD twin equal the reference."""
    reference = evaluate(program, inputs)
    spmd = compile_spmd(program, objective=objective)
    for twin in (False, True):
        got = run_jax(program, inputs, twin=twin, warmup=0, repeat=1, spmd=spmd).outputs
        for output in program.outputs:
            if exact:
                np.testing.assert_array_equal(got[output.name], reference[output.name])
            else:
                np.testing.assert_allclose(got[output.name], reference[output.name],
                                           rtol=2e-5, atol=2e-6)


class TestJax:
    def test_vocabulary_parallel_embedding(self):
        program = compile_source(EMBEDDING)
        assert [c.kind for c in collectives(compile_spmd(program, objective="bytes"))] == ["all_reduce"]
        on_jax(program, random_inputs(program, 8), exact=True, objective="bytes")

    def test_ids_split(self):
        program = compile_source(EMBEDDING.replace("emb[V@tp, D]", "emb[V, D@tp]"))
        on_jax(program, random_inputs(program, 9), exact=True)

    def test_causal_softmax_over_a_split_sequence(self):
        program = compile_source("mesh dp=2 sp=4\ndim B=2 S=16 T=S K=8\ninput q[B@dp,S@sp,K]\n"
                                 "input k[B,T,K]\ns[B,S@sp,T] = q[B,S,K] * k[B,T,K]\n"
                                 "m[B,S@sp,T] = where(pos(S) >= pos(T), s[B,S,T], -inf)\n"
                                 "p[B@dp,S@sp,T] = softmax[T](m[B,S,T])\n"
                                 "n[S@sp] = pos(S) * 2\noutput p\noutput n\n")
        on_jax(program, random_inputs(program, 10))

    def test_functions(self):
        program = compile_source("mesh dp=2 tp=4\ndim B=4 D=8\ninput x[B@dp,D@tp]\n"
                                 "y[B,D] = sin(x[B,D]) * cos(x[B,D]) + erf(x[B,D])"
                                 " + pow(abs(x[B,D]) + 1, 1.5)\noutput y\n")
        on_jax(program, random_inputs(program, 11))

    @pytest.mark.parametrize("layouts", [(None, None),
                                         (Layout((("tp",), ())), Layout((("dp",), (), ()))),
                                         (Layout((("tp",), ("dp",))), Layout(((), (), ("dp",))))])
    def test_scatter_add(self, layouts):
        on_jax(scatter_program(*layouts), scatter_inputs())

    def test_an_out_of_range_input_id_is_refused_before_jax_runs(self):
        program = compile_source(EMBEDDING)
        inputs = random_inputs(program, 0)
        inputs["ids"][0, 0] = -5
        with pytest.raises(EinparError) as caught:
            run_jax(program, inputs, warmup=0, repeat=1)
        assert [d.code for d in caught.value.diagnostics] == ["E310"]


# ---------------------------------------------------------------- batched take


CROSS_ENTROPY = """\
mesh dp=2 tp=4
dim B=4 S=8 V=256
input logits[B@dp,S,V@tp]
input tgt[B@dp,S] : i32
l[B@dp,S] = logsumexp[V](logits[B,S,V]) - take[V](logits[B,S,V], tgt[B,S])
output l
"""

# The gradient of a vocabulary-parallel output layer's cross-entropy (the grad pass turns
# the target logits' take into a batched scatter-add into logits[B,S,V]).
LM_HEAD = """\
mesh dp=2 tp=4
dim B=4 S=8 D=16 V=256
input x[B@dp,S,D]
input tgt[B@dp,S] : i32
param wout[D,V@tp]
logits[B@dp,S,V@tp] = x[B,S,D] * wout[D,V]
l[] = mean[B,S](logsumexp[V](logits[B,S,V]) - take[V](logits[B,S,V], tgt[B,S]))
loss l
"""


def target_logits(logits, tgt):
    return np.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]


def cross_entropy(logits, tgt):
    top = logits.max(axis=-1)
    return top + np.log(np.exp(logits - top[..., None]).sum(axis=-1)) - target_logits(logits, tgt)


def batched_scatter_program(table_layout, update_layout) -> Program:
    """g[B,V,D] = scatter_add[V](u[B,S,D], ids[B,S]), the adjoint of take[V](t[B,V,D], ids[B,S]):
    B is a batch index (kept), S is summed where ids match."""
    from einpar.ir import Output
    mesh = Mesh((("dp", 2), ("tp", 2)))
    dims = (("B", 4), ("S", 4), ("V", 8), ("D", 4))
    u = Value("u", TensorType("f32", ("B", "S", "D"), (4, 4, 4)), "input", update_layout)
    ids = Value("ids", TensorType("i32", ("B", "S"), (4, 4)), "input",
                Layout(update_layout.dims[:2]) if update_layout else None)
    g = Value("g", TensorType("f32", ("B", "V", "D"), (4, 8, 4)), layout=table_layout)
    op = ScatterAdd(g, Operand("u", ("B", "S", "D")), Operand("ids", ("B", "S")), "V", "g",
                    Span("scatter.ein", 1, 1, 1, 2))
    return Program("scatter.ein", mesh, dims, "f32", (u, ids), (op,),
                   (Output("g", "g", table_layout),))


def batched_scatter_inputs():
    rng = np.random.default_rng(8)
    return {"u": rng.standard_normal((4, 4, 4)).astype(np.float32),
            "ids": np.array([[0, 7, 7, 7], [3, 3, 3, 1], [0, 5, 1, 5], [7, 2, 0, 6]], np.int32)}


def batched_scatter_expected(inputs):
    expected = np.zeros((4, 8, 4), np.float32)
    for b in range(4):
        np.add.at(expected[b], inputs["ids"][b], inputs["u"][b])
    return expected


class TestBatchedTake:
    def test_an_index_of_both_the_table_and_the_ids_is_a_batch_index(self):
        program = compile_source(CROSS_ENTROPY)
        (take,) = [op for op in program.ops if isinstance(op, Take)]
        assert (take.table, take.ids, take.batch) == (
            Operand("logits", ("B", "S", "V")), Operand("tgt", ("B", "S")), ("B", "S"))
        assert take.result.type == TensorType("f32", ("B", "S"), (4, 8))

    def test_a_batch_index_the_left_side_lacks_is_summed_after_the_lookup(self):
        program = compile_source("dim B=2 S=3 V=5\ninput t[B,S,V]\ninput tgt[B,S] : i32\n"
                                 "y[S] = take[V](t[B,S,V], tgt[B,S])\noutput y\n")
        text = format_program(program)
        assert "y.1: f32[B=2,S=3] = take[V](t[B,S,V], tgt[B,S])" in text
        assert "y: f32[S=3] = sum[B](y.1[B,S])" in text
        t = np.arange(30, dtype=np.float32).reshape(2, 3, 5)
        tgt = np.array([[0, 4, 2], [1, 1, 3]], np.int32)
        np.testing.assert_array_equal(evaluate(program, {"t": t, "tgt": tgt})["y"],
                                      target_logits(t, tgt).sum(axis=0))

    def test_the_reference_pairs_each_batch_position_with_its_rows(self):
        # table[B,V,D] and ids[S,B]: result[d,s,b] = table[b, ids[s,b], d], in the left side's order.
        program = compile_source("dim B=3 S=4 V=6 D=2\ninput t[B,V,D]\ninput ids[S,B] : i32\n"
                                 "y[D,S,B] = take[V](t[B,V,D], ids[S,B])\noutput y\n")
        rng = np.random.default_rng(0)
        t = rng.standard_normal((3, 6, 2)).astype(np.float32)
        ids = rng.integers(0, 6, (4, 3)).astype(np.int32)
        expected = np.array([[[t[b, ids[s, b], d] for b in range(3)] for s in range(4)]
                             for d in range(2)])
        np.testing.assert_array_equal(evaluate(program, {"t": t, "ids": ids})["y"], expected)

    def test_a_former_E217_program_is_a_batched_lookup(self):
        # ids[B,D] and table[V,D] share D: x[b,d] = e[ids[b,d], d].
        program = compile_source("dim B=2 V=5 D=3\ninput bd[B,D] : i32\nparam e[V,D]\n"
                                 "x[B,D] = take[V](e[V,D], bd[B,D])\noutput x\n")
        e = np.arange(15, dtype=np.float32).reshape(5, 3)
        bd = np.array([[4, 0, 2], [1, 1, 3]], np.int32)
        np.testing.assert_array_equal(evaluate(program, {"e": e, "bd": bd})["x"],
                                      [[12, 1, 8], [3, 4, 11]])

    def test_cross_entropy_on_the_reference(self):
        program = compile_source(CROSS_ENTROPY)
        inputs = random_inputs(program, 12)
        np.testing.assert_allclose(evaluate(program, inputs)["l"],
                                   cross_entropy(inputs["logits"].astype(np.float64), inputs["tgt"]),
                                   rtol=1e-6)

    def test_vocabulary_parallel_cross_entropy_is_three_all_reduces(self):
        # Megatron's vocab-parallel cross-entropy: the max, the sum of exponentials and the
        # target logit (each device's own rows, zeros for the others') all-reduced over tp,
        # each [B/dp, S] = 4·512 floats: 2·3/4 of 8192 bytes per device.
        program = compile_source(CROSS_ENTROPY.replace("B=4 S=8 V=256", "B=8 S=512 V=32768"))
        spmd = compile_spmd(program)
        assert [(c.kind, c.step.axes, c.step.op, c.src, c.bytes_per_device)
                for c in collectives(spmd)] == [
            ("all_reduce", ("tp",), "max", "l.1.max", 12288),
            ("all_reduce", ("tp",), "sum", "l.1.sum", 12288),
            ("all_reduce", ("tp",), "sum", "l.2", 12288)]
        (take,) = [s.op for s in spmd.steps if isinstance(getattr(s, "op", None), Take)]
        assert spmd.values[take.table.value].layout == Layout((("dp",), (), ("tp",)))
        assert spmd.values[take.result.name].layout == Layout((("dp",), ()), (("tp", "sum"),))

    @pytest.mark.parametrize("objective", ["time", "bytes"])
    def test_vocabulary_parallel_cross_entropy_on_the_simulator(self, objective):
        simulated_as_reference(compile_source(CROSS_ENTROPY), 13, objective)

    def test_a_batch_index_split_on_both_operands_needs_no_communication(self):
        program = compile_source("mesh dp=2 tp=4\ndim B=4 S=8 V=256\n"
                                 "input logits[B@dp,S@tp,V]\ninput tgt[B@dp,S@tp] : i32\n"
                                 "y[B@dp,S@tp] = take[V](logits[B,S,V], tgt[B,S])\noutput y\n")
        inputs = random_inputs(program, 14)
        spmd, outputs, traffic = simulated(program, inputs)
        assert collectives(spmd) == [] and traffic.sent == [0] * 8
        (take,) = [s.op for s in spmd.steps if isinstance(getattr(s, "op", None), Take)]
        assert spmd.values[take.table.value].layout == Layout((("dp",), ("tp",), ()))
        assert spmd.values[take.ids.value].layout == Layout((("dp",), ("tp",)))
        np.testing.assert_array_equal(outputs["y"], target_logits(inputs["logits"], inputs["tgt"]))

    def test_scatter_add_keeps_batch_indices_on_the_reference(self):
        program = batched_scatter_program(None, None)
        inputs = batched_scatter_inputs()
        np.testing.assert_allclose(evaluate(program, inputs)["g"], batched_scatter_expected(inputs),
                                   rtol=1e-6)
        assert op_flops(program.ops[0], program.dim_sizes) == 4 * 4 * 4
        assert program.ops[0].batch == ("B",)

    @pytest.mark.parametrize("layouts, moves", [
        # B over dp on both (a batch index), rows V over tp: each device its own rows.
        ((Layout((("dp",), ("tp",), ())), Layout((("dp",), (), ()))), []),
        # S over tp: summed where ids match, so each device's rows are a partial sum over tp,
        # all-reduced: g's block [2,8,4] of floats, 2·1/2 of 256 bytes.
        ((Layout((("dp",), (), ())), Layout((("dp",), ("tp",), ()))),
         [("all_reduce", ("tp",), "g", 256)]),
    ])
    def test_scatter_add_with_batch_indices_on_the_simulator(self, layouts, moves):
        program = batched_scatter_program(*layouts)
        inputs = batched_scatter_inputs()
        spmd, outputs, _ = simulated(program, inputs)
        assert [(c.kind, c.step.axes, c.src, c.bytes_per_device)
                for c in collectives(spmd)] == moves
        np.testing.assert_allclose(outputs["g"], batched_scatter_expected(inputs), rtol=1e-6)

    def test_the_gradient_of_a_vocabulary_parallel_cross_entropy_on_the_simulator(self):
        program = compile_source(LM_HEAD)
        (scatter,) = [op for op in program.ops if isinstance(op, ScatterAdd)]
        assert (scatter.update.indices, scatter.ids.indices, scatter.result.type.indices,
                scatter.batch) == (("B", "S"), ("B", "S"), ("B", "S", "V"), ("B", "S"))
        spmd, _ = simulated_as_reference(program, 15)
        # The scatter-add runs where the logits are: B over dp, each device's rows V over tp.
        (local,) = [s.op for s in spmd.steps if isinstance(getattr(s, "op", None), ScatterAdd)]
        assert spmd.values[local.result.name].layout == Layout((("dp",), (), ("tp",)))


class TestBatchedTakeOnJax:
    @pytest.mark.parametrize("objective", ["time", "bytes"])
    def test_vocabulary_parallel_cross_entropy(self, objective):
        program = compile_source(CROSS_ENTROPY)
        on_jax(program, random_inputs(program, 16), objective=objective)

    def test_a_batch_index_split_on_both_operands(self):
        program = compile_source("mesh dp=2 tp=4\ndim B=4 S=8 V=64 D=2\n"
                                 "input t[B@dp,S@tp,V,D]\ninput tgt[S@tp,B@dp] : i32\n"
                                 "y[D,B@dp,S@tp] = take[V](t[B,S,V,D], tgt[S,B])\noutput y\n")
        on_jax(program, random_inputs(program, 17), exact=True)

    @pytest.mark.parametrize("layouts", [(None, None),
                                         (Layout((("dp",), ("tp",), ())), Layout((("dp",), (), ()))),
                                         (Layout((("dp",), (), ())), Layout((("dp",), ("tp",), ())))])
    def test_scatter_add_with_batch_indices(self, layouts):
        on_jax(batched_scatter_program(*layouts), batched_scatter_inputs())

    def test_the_gradient_of_a_vocabulary_parallel_cross_entropy(self):
        program = compile_source(LM_HEAD)
        on_jax(program, random_inputs(program, 18))
