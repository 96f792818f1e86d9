"""The checker's IR: which ops a statement becomes, where sums go, sizes and dtypes."""

import pytest

from einpar.api import compile_source
from einpar.errors import EinparError
from einpar.ir import Apply, Einsum, Library, Map, Reduce, Repeat, Route, format_program
from einpar.layout import Layout, format_dims
from einpar.syntax import format_ast, parse

HEADER = "dim I=4 J=3 K=5 L=2\n"


def ops_of(body: str, header: str = HEADER):
    return compile_source(header + body).ops


def describe(op) -> str:
    """A compact signature: kind, result, operands."""
    if isinstance(op, Einsum):
        return f"einsum {op.result.name}[{','.join(op.result.type.indices)}] <- " + \
            " ".join(str(o) for o in op.operands)
    if isinstance(op, Reduce):
        return f"{op.kind}[{','.join(op.over)}] {op.result.name} <- {op.operand}"
    if isinstance(op, Map):
        return f"map {op.result.name}[{','.join(op.result.type.indices)}] <- " + \
            " ".join(str(o) for o in op.operands)
    if isinstance(op, Library):
        return f"{op.kind}[{op.index}] {op.result.name} <- {op.operand}"
    if isinstance(op, Route):
        return f"route {op.result.name} <- {op.operand}"
    return type(op).__name__


class TestSummationRule:
    def test_product_under_a_function_is_summed_inside_it(self):
        ops = ops_of("input x[I,J]\ninput w[J,K]\nh[I,K] = gelu(x[I,J] * w[J,K])\n")
        assert [describe(o) for o in ops] == [
            "einsum h.1[I,K] <- x[I,J] w[J,K]",
            "map h[I,K] <- h.1[I,K]",
        ]
        assert ops[1].expr == Apply("gelu", (ops[1].expr.args[0],))

    def test_sum_covers_the_product_only(self):
        # y[I] = a[I,J] * b[J] + c[I] sums J over the product, then adds c.
        ops = ops_of("input a[I,J]\ninput b[J]\ninput c[I]\ny[I] = a[I,J] * b[J] + c[I]\n")
        assert [describe(o) for o in ops] == [
            "einsum y.1[I] <- a[I,J] b[J]",
            "map y[I] <- y.1[I] c[I]",
        ]

    def test_single_use_is_summed_at_the_reference(self):
        # exp(x[I,J]) with J absent on the left is exp of the sum over J.
        ops = ops_of("input x[I,J]\ny[I] = exp(x[I,J])\n")
        assert [describe(o) for o in ops] == ["sum[J] y.1 <- x[I,J]", "map y[I] <- y.1[I]"]

    def test_uses_in_both_factors_of_a_sum_make_one_reduction(self):
        ops = ops_of("input a[I,J]\ninput b[J]\ny[I] = a[I,J] + b[J]\n")
        assert [describe(o) for o in ops] == ["map y.1[I,J] <- a[I,J] b[J]", "sum[J] y <- y.1[I,J]"]

    def test_whole_statement_contraction_writes_the_result_directly(self):
        ops = ops_of("input a[I,J]\ninput b[J,K]\nc[K,I] = a[I,J] * b[J,K]\n")
        assert [describe(o) for o in ops] == ["einsum c[K,I] <- a[I,J] b[J,K]"]

    def test_three_operand_product_is_one_contraction(self):
        ops = ops_of("input a[I,J]\ninput b[J,K]\ninput c[K]\ny[I] = a[I,J] * b[J,K] * c[K]\n")
        assert [describe(o) for o in ops] == ["einsum y[I] <- a[I,J] b[J,K] c[K]"]

    def test_constant_factors_scale_the_contraction(self):
        ops = ops_of("input a[I,J]\ninput b[J]\ny[I] = 2 * a[I,J] * b[J] / sqrt(J)\n")
        assert [describe(o) for o in ops] == ["einsum y.1[I] <- a[I,J] b[J]", "map y[I] <- y.1[I]"]

    def test_explicit_sum_binds_its_index(self):
        # T inside sum[T] is bound there; the outer T stays free.
        ops = ops_of("input e[I,J]\np[I,J] = e[I,J] / sum[J](e[I,J])\n")
        assert [describe(o) for o in ops] == ["sum[J] p.1 <- e[I,J]", "map p[I,J] <- e[I,J] p.1[I]"]

    def test_explicit_sum_of_a_product_is_a_contraction(self):
        ops = ops_of("input a[I,J]\ninput b[J]\ny[I] = sum[J](a[I,J] * b[J])\n")
        assert [describe(o) for o in ops] == ["einsum y[I] <- a[I,J] b[J]"]

    def test_sum_over_a_softmax_index_is_outside_the_softmax(self):
        ops = ops_of("input x[I,J]\ny[I] = softmax[J](x[I,J])\n")
        assert [describe(o) for o in ops] == ["softmax[J] y.1 <- x[I,J]", "sum[J] y <- y.1[I,J]"]

    def test_logsumexp_reduces_its_index(self):
        ops = ops_of("input x[I,J]\ny[I] = logsumexp[J](x[I,J])\n")
        assert [describe(o) for o in ops] == ["logsumexp[J] y <- x[I,J]"]

    def test_summing_the_softmax_input_happens_inside(self):
        ops = ops_of("input x[I,K]\ninput w[K,J]\ng[I,J] = softmax[J](x[I,K] * w[K,J])\n")
        assert [describe(o) for o in ops] == ["einsum g.1[I,J] <- x[I,K] w[K,J]",
                                              "softmax[J] g <- g.1[I,J]"]

    def test_left_hand_side_index_absent_on_the_right_broadcasts(self):
        ops = ops_of("input x[I]\ny[I,K] = x[I]\n")
        assert [describe(o) for o in ops] == ["map y[I,K] <- x[I]"]
        assert ops[0].result.type.shape == (4, 5)


class TestTypes:
    def test_alias_dims_follow_their_target_and_overrides(self):
        program = compile_source("dim S=8 T=S\ninput x[S]\ny[T] = x[T]\noutput y\n", overrides={"S": 16})
        assert program.dim_sizes == {"S": 16, "T": 16}
        program = compile_source("dim S=8 T=S\ninput x[S]\noutput x\n", overrides={"S": 16, "T": 4})
        assert program.dim_sizes == {"S": 16, "T": 4}

    def test_mesh_overrides(self):
        program = compile_source("mesh dp=2 tp=4\ndim B=16\ninput x[B@(dp,tp)]\noutput x\n",
                                 overrides={"tp": 8})
        assert program.mesh.axes == (("dp", 2), ("tp", 8))
        assert program.inputs[0].layout.dims == (("dp", "tp"),)

    def test_dtype_promotion(self):
        program = compile_source(
            "dtype bf16\ndim I=4\ninput a[I] : i32\ninput b[I] : bool\ninput c[I] : f16\ninput d[I]\n"
            "p[I] = a[I] * 2\nq[I] = a[I] * 2.5\nr[I] = b[I] + b[I]\ns[I] = c[I] + d[I]\n"
            "t[I] = a[I] > 1\nu[I] = exp(a[I])\nv[I] : f32 = d[I]\nw[I] = a[I] / 2\n")
        dtypes = {op.result.name: op.result.type.dtype for op in program.ops}
        assert dtypes == {"p": "i32", "q": "bf16", "r": "i32", "s": "f32", "t": "bool",
                          "u": "bf16", "v": "f32", "w": "bf16"}

    def test_reductions_of_booleans_count(self):
        program = compile_source("dim I=4\ninput b[I] : bool\nn[] = sum[I](b[I])\nm[] = mean[I](b[I])\n")
        assert [op.result.type.dtype for op in program.ops] == ["i32", "f32"]


class TestRepeat:
    PROGRAM = """\
mesh tp=2
dim B=4 D=8 F=16 L=3
input x[B, D]
repeat L {
  param w1[D, F@tp]
  param w2[F@tp, D]
  h[B,F] = relu(x[B,D] * w1[D,F])
  x[B,D] = x[B,D] + h[B,F] * w2[F,D]
  x[B,D] = x[B,D] * 0.5
}
output x
"""

    def test_stacked_params_and_carried_values(self):
        program = compile_source(self.PROGRAM)
        params = {v.name: v for v in program.params}
        assert params["w1"].type.shape == (3, 8, 16)
        assert params["w1"].stacked_by == ("L",)
        assert params["w1"].layout.dims == ((), (), ("tp",))
        (loop,) = program.ops
        assert isinstance(loop, Repeat) and loop.count == 3
        assert [v.type.shape for v in loop.stacked] == [(8, 16), (16, 8)]
        (carried,) = loop.carried
        assert (carried.value, carried.body_result, carried.result.name) == ("x", "x#3", "x#4")
        assert program.outputs[0].value == "x#4"
        # Values are in SSA form: every name is defined once.
        names = [op.result.name for op in loop.body]
        assert len(names) == len(set(names))

    def test_nested_repeat_stacks_params_by_both_dims(self):
        program = compile_source("dim B=2 D=4 L=3 M=2\ninput x[B,D]\nrepeat L {\n repeat M {\n"
                                 "  param w[D]\n  x[B,D] = x[B,D] * w[D]\n }\n}\noutput x\n")
        (w,) = program.params
        assert w.type.shape == (3, 2, 4) and w.stacked_by == ("L", "M")
        (outer,) = program.ops
        assert outer.stacked[0].type.shape == (2, 4)
        assert outer.body[0].stacked[0].type.shape == (4,)

    def test_printed_ir_is_readable(self):
        text = format_program(compile_source(self.PROGRAM, file="block.ein"))
        assert "param  w1: f32[L=3,D=8,F=16@tp]  (stacked by L)" in text
        assert "carry x <- x#3" in text
        assert "output x = x#4" in text


def test_overrides_that_break_nested_padding_are_reported_at_the_annotation():
    with pytest.raises(EinparError) as error:
        compile_source("mesh dp=2 tp=2\ndim D=8\ninput x[D@(dp,tp)]\noutput x\n", overrides={"D": 6})
    (diagnostic,) = error.value.diagnostics
    assert diagnostic.code == "E221"
    assert (diagnostic.span.line, diagnostic.span.col) == (3, 9)


class TestLayoutPins:
    """Braces on a statement's left side: an exact layout, partial where they say."""

    HEADER = ("mesh dp=2 tp=2 sp=2\ndim B=4 S=4 D=8 H=2 K=4\n"
              "input o[B,S,H,K]\nparam wo[H,K,D]\n")
    RHS = "o[B,S,H,K] * wo[H,K,D]"

    def layout_of(self, lhs: str):
        program = compile_source(self.HEADER + f"{lhs} = {self.RHS}\noutput y\n")
        (op,) = program.ops
        return op.result.layout

    @pytest.mark.parametrize("lhs, dims, partial", [
        ("y[B@dp,S,D]{sum: tp}", (("dp",), (), ()), (("tp", "sum"),)),
        ("y[B@dp,S,D] {sum: tp}", (("dp",), (), ()), (("tp", "sum"),)),
        ("y[B,S,D]{max: sp}", ((), (), ()), (("sp", "max"),)),
        ("y[B,S,D]{min: tp}", ((), (), ()), (("tp", "min"),)),
        ("y[B,S,D]{sum: (tp,sp)}", ((), (), ()), (("sp", "sum"), ("tp", "sum"))),
        ("y[B,S,D]{sum: tp,sp}", ((), (), ()), (("sp", "sum"), ("tp", "sum"))),
        ("y[B,S,D]{sum: tp; max: sp}", ((), (), ()), (("sp", "max"), ("tp", "sum"))),
        ("y[B@dp,S,D@sp]{ sum : tp }", (("dp",), (), ("sp",)), (("tp", "sum"),)),
        ("y[B,S,D]{}", ((), (), ()), ()),
        ("y[B@dp,S,D]{}", (("dp",), (), ()), ()),
    ])
    def test_each_form_checks_to_its_layout(self, lhs, dims, partial):
        assert self.layout_of(lhs) == Layout(dims, partial)

    def test_empty_braces_ask_for_the_whole_value_but_no_braces_for_nothing(self):
        assert self.layout_of("y[B,S,D]{}") == Layout.replicated(3)
        assert self.layout_of("y[B,S,D]") is None

    def test_a_pin_with_a_cast_and_inside_repeat(self):
        program = compile_source("mesh tp=2\ndim B=4 D=8 E=8 L=2\ninput x[B,D] : bf16\n"
                                 "repeat L {\n param w[E,D] : bf16\n"
                                 " x[B,D]{sum: tp} : bf16 = x[B,E] * w[E,D]\n}\noutput x\n")
        (loop,) = program.ops
        (op,) = loop.body
        assert op.result.type.dtype == "bf16"
        assert op.result.layout == Layout(((), ()), (("tp", "sum"),))

    @pytest.mark.parametrize("partial", [
        (("tp", "sum"),), (("sp", "sum"), ("tp", "sum")), (("sp", "max"), ("tp", "sum")),
        (("dp", "min"), ("sp", "sum"), ("tp", "sum")),
    ])
    def test_a_printed_layout_pastes_back_as_the_same_constraint(self, partial):
        layout = Layout((("dp",) if all(a != "dp" for a, _ in partial) else (), (), ()), partial)
        printed = format_dims(("B", "S", "D"), layout)
        assert self.layout_of(f"y{printed}") == layout

    def test_several_partial_axes_print_in_parentheses(self):
        layout = Layout(((), ("dp",)), (("tp", "sum"), ("sp", "sum"), ("dp2", "max")))
        assert format_dims(("B", "D"), layout) == "[B,D@dp] {max: dp2; sum: (sp,tp)}"

    def test_the_syntax_tree_keeps_the_braces(self):
        module = parse("y[B@dp,S] {sum: (tp,sp); max: cp} = x[B,S]\n")
        (statement,) = module.items
        pin = statement.lhs.pin
        assert [(e.kind.text, [a.text for a in e.axes]) for e in pin.entries] == [
            ("sum", ["tp", "sp"]), ("max", ["cp"])]
        assert (pin.span.line, pin.span.col, pin.span.end_col) == (1, 11, 34)
        assert statement.lhs.span.end_col == 34
        assert "Statement y[B@dp, S] {sum: (tp,sp); max: cp}" in format_ast(module)
        assert parse("y[B]{} = x[B]\n").items[0].lhs.pin.entries == ()
        assert parse("y[B] = x[B]\n").items[0].lhs.pin is None

    def test_repeat_blocks_still_open_with_a_brace(self):
        module = parse("repeat L {\n  x[B] {sum: tp} = x[B]\n}\n")
        (block,) = module.items
        assert block.body[0].lhs.pin.entries[0].kind.text == "sum"


class TestStatementLayoutOnInnerOps:
    """A statement's layout constrains the ops inside it that its result is computed from
    alone, when they have its indices."""

    SCORES = ("mesh dp=2 cp=2\ndim B=4 S=8 T=8 H=2 K=4\n"
              "input q[B,S,H,K]\ninput k[B,T,H,K]\n")

    def test_the_contraction_of_attention_scores_is_constrained_too(self):
        program = compile_source(self.SCORES + "s[B@dp,H,S@cp,T] = q[B,S,H,K] * k[B,T,H,K] / sqrt(K)\n"
                                               "output s\n")
        contraction, scale = program.ops
        assert isinstance(contraction, Einsum) and isinstance(scale, Map)
        assert contraction.result.type.indices == ("B", "S", "H", "T")
        assert contraction.result.layout == Layout((("dp",), ("cp",), (), ()))
        assert scale.result.layout == Layout((("dp",), (), ("cp",), ()))

    def test_the_chain_the_result_is_computed_from_is_constrained_and_nothing_else(self):
        program = compile_source(
            "mesh tp=2\ndim B=4 D=8 E=8 F=16\ninput u[B,E]\nparam w1[E,F]\nparam w2[F,D]\n"
            "param g[D]\ny[B,D@tp] = gelu(relu(u[B,E] * w1[E,F]) * w2[F,D]) * g[D]\noutput y\n")
        found = [(op.result.name, op.result.type.indices, op.result.layout) for op in program.ops]
        by_tp = Layout(((), ("tp",)))
        assert found == [
            ("y.2", ("B", "F"), None),   # u * w1: other indices
            ("y.3", ("B", "F"), None),   # relu
            ("y.1", ("B", "D"), by_tp),  # * w2, which the last op reads besides g[D]
            ("y", ("B", "D"), by_tp),    # gelu(...) * g
        ]

    def test_an_op_reading_two_values_with_the_result_indices_stops_the_chain(self):
        # A residual add: the compiler chooses which of x and the contraction to move (a
        # reduce-scatter of the contraction and a gather after the add, in sequence parallelism).
        program = compile_source(
            "mesh tp=2\ndim B=4 D=8 E=8 F=16\ninput x[B,D]\ninput u[B,E]\nparam w1[E,F]\n"
            "param w2[F,D]\ny[B,D@tp] = rmsnorm[D](x[B,D]) + gelu(u[B,E] * w1[E,F]) * w2[F,D]\n"
            "output y\n")
        found = [(op.result.name, op.result.layout) for op in program.ops]
        assert found == [("y.1", None), ("y.3", None), ("y.4", None), ("y.2", None),
                         ("y", Layout(((), ("tp",))))]

    def test_a_partial_pin_stays_on_the_op_that_makes_the_result(self):
        program = compile_source(
            "mesh tp=2\ndim B=4 D=8 F=16\ninput x[B,F]\nparam w[F,D]\n"
            "y[B,D]{sum: tp} = exp(x[B,F] * w[F,D]) * 2\noutput y\n")
        inner, last = program.ops
        assert inner.result.layout == Layout.replicated(2)
        assert last.result.layout == Layout(((), ()), (("tp", "sum"),))

    def test_a_scaled_contraction_carries_the_partial_pin(self):
        # `sum * 2` lowers to the contraction and a map that only scales it: a pinned partial
        # sum can only come from the contraction, so it is pinned there too.
        program = compile_source(
            "mesh tp=2\ndim B=4 D=8 F=16\ninput x[B,F]\nparam w[F,D]\n"
            "y[B,D]{sum: tp} = 2 * x[B,F] * w[F,D]\noutput y\n")
        contraction, scale = program.ops
        assert isinstance(contraction, Einsum) and isinstance(scale, Map)
        pinned = Layout(((), ()), (("tp", "sum"),))
        assert contraction.result.layout == scale.result.layout == pinned

    def test_no_layout_means_no_constraint_anywhere(self):
        program = compile_source(self.SCORES + "s[B,H,S,T] = q[B,S,H,K] * k[B,T,H,K] / sqrt(K)\n"
                                               "output s\n")
        assert [op.result.layout for op in program.ops] == [None, None]


class TestPinsEndToEnd:
    """Pins through the partitioner: the value is made in the pinned layout, and the
    program still computes what the reference does."""

    MEGATRON = ("mesh dp=2 tp=2\ndim B=4 S=4 D=8 F=16\n"
                "input x[B@dp,S,D]\nparam w1[D,F@tp]\nparam w2[F@tp,D]\n"
                "h[B,S,F] = gelu(x[B,S,D] * w1[D,F])\n"
                "y[B@dp,S,D]{sum: tp} = h[B,S,F] * w2[F,D]\n"
                "z[B@dp,S,D] = y[B,S,D] * 2\noutput z\n")

    @staticmethod
    def made_layout(spmd, value: str):
        """The layout of `value` (an IR name) as the op that makes it leaves it."""
        from einpar.spmd import LocalStep, walk_steps
        (layout,) = [spmd.values[step.op.result.name].layout for step in walk_steps(spmd.steps)
                     if isinstance(step, LocalStep) and step.op.result.name == value]
        return layout

    def test_empty_braces_make_the_value_whole(self):
        from einpar.api import compile_spmd, random_inputs, run_simulated
        from helpers import assert_matches_reference
        program = compile_source(TestStatementLayoutOnInnerOps.SCORES
                                 + "s[B@dp,H,S@cp,T] = q[B,S,H,K] * k[B,T,H,K] / sqrt(K)\n"
                                   "m[B,H,S]{} = sum[T](s[B,H,S,T]) * 2\noutput s\noutput m\n")
        spmd = compile_spmd(program)
        assert self.made_layout(spmd, "m") == Layout.replicated(3)
        assert self.made_layout(spmd, "s.1") == Layout((("dp",), ("cp",), (), ()))
        inputs = random_inputs(program, 1)
        outputs, _ = run_simulated(program, inputs)
        assert_matches_reference(program, outputs, inputs)

    @pytest.mark.parametrize("objective", ["time", "bytes"])
    def test_a_partial_pin_leaves_the_value_partial(self, objective):
        from einpar.api import compile_spmd, random_inputs, run_simulated
        from helpers import assert_matches_reference
        program = compile_source(self.MEGATRON)
        spmd = compile_spmd(program, objective=objective)
        assert self.made_layout(spmd, "y") == Layout((("dp",), (), ()), (("tp", "sum"),))
        inputs = random_inputs(program, 2)
        outputs, _ = run_simulated(program, inputs)
        assert_matches_reference(program, outputs, inputs)

    def test_a_pin_no_strategy_can_make_is_E240(self):
        from einpar.api import compile_spmd
        from einpar.errors import EinparError
        program = compile_source("mesh tp=2\ndim B=4 D=8\ninput x[B,D]\n"
                                 "y[B,D]{sum: tp} = gelu(x[B,D])\noutput y\n")
        with pytest.raises(EinparError) as caught:
            compile_spmd(program)
        (found,) = caught.value.diagnostics
        assert (found.code, found.span.line, found.span.col) == ("E240", 4, 1)
        assert found.message == ("no strategy of 'y' makes it in the layout it is asked for "
                                 "(y[B,D] {sum: tp})")
