"""The grad pass (einpar.grad): gradients equal JAX's autodiff of the whole-array program.

The oracle is `jax.grad` of `global_program` from the module backends/jax_codegen.py writes
(an implementation of the forward program independent of the reference backend); the
derived program runs on the reference backend. Finite differences in float64 check a few
programs without JAX, and the derived program, being an ordinary Program, also partitions
and runs on the simulator.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import einpar.api as ein
from einpar.backends import reference
from einpar.grad import format_grad, grad
from einpar.grad_rules import derivative
from einpar.ir import Apply, Arg, Const, Map, Output, Repeat, ScatterAdd, walk_ops
from einpar.testing import programs
from einpar.tolerance import compare, program_tolerance

from helpers import EXAMPLES, ROOT


# ---- the oracle


def jax_grads(program, loss: str, inputs: dict) -> dict[str, np.ndarray]:
    """`w.grad` for every param `w`: jax.grad of the forward program's whole-array function."""
    import jax
    import jax.numpy as jnp

    namespace = {"__name__": "emitted"}
    exec(compile(ein.emit_jax(program), "emitted.py", "exec"), namespace)
    names = list(namespace["INPUTS"])
    params = [value.name for value in program.params]
    if not params:
        return {}
    x64 = any(value.type.dtype == "f64" for value in program.values.values())

    def loss_of(*values):
        args = {name: inputs[name] for name in names}
        args.update(zip(params, values))
        return namespace["global_program"](*(args[name] for name in names))[loss]

    with jax.enable_x64(x64):
        found = jax.jit(jax.grad(loss_of, argnums=tuple(range(len(params)))))(
            *(jnp.asarray(inputs[name]) for name in params))
        return {f"{name}.grad": np.asarray(value) for name, value in zip(params, found)}


def with_loss(text: str, file: str = "<test>", name: str = "l") -> str:
    """`text` with a float32 loss: the sum of squares of its outputs."""
    program = ein.compile_source(text, file)
    terms = []
    for output in program.outputs:
        value = program.values[output.value]
        if value.type.dtype in ("i32", "bool"):
            continue
        indices = ",".join(value.type.indices)
        terms.append(f"sum[{indices}](square({output.name}[{indices}]))" if indices
                     else f"square({output.name}[])")
    return f"{text.rstrip()}\n{name}[]: f32 = {' + '.join(terms) or '0'}\noutput {name}\n"


def assert_single_assignment(program) -> None:
    """Every value is defined once (repeat bodies included), as every later stage assumes."""
    defined = [value.name for value in program.inputs]
    for op in walk_ops(program.ops):
        if isinstance(op, Repeat):
            defined += [c.result.name for c in op.carried] + [s.result.name for s in op.saved]
        else:
            defined.append(op.result.name)
    assert len(defined) == len(set(defined)), sorted(n for n in defined if defined.count(n) > 1)


def assert_grads_match_jax(text: str, file: str = "<test>", loss: str = "l", seed: int = 0,
                           remat: frozenset[str] = frozenset()):
    return assert_program_grads_match_jax(ein.compile_source(text, file), loss, seed, remat)


def assert_program_grads_match_jax(program, loss: str = "l", seed: int = 0,
                                   remat: frozenset[str] = frozenset()):
    derived = grad(program, loss, remat)
    assert_single_assignment(derived)
    inputs = ein.random_inputs(program, seed)
    got = reference.evaluate(derived, inputs)
    want = jax_grads(program, loss, inputs)
    tolerance = program_tolerance(derived)
    for name, expected in want.items():
        found = compare(name, expected, got[name], tolerance)
        assert found.ok, (name, found.error, tolerance)
    return program, derived, got


# ---- every example


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_gradients_of_every_example_equal_jax_grad(example):
    text = example.read_text()
    compiled = ein.compile_source(text, str(example))
    if compiled.forward is not None:  # a training step: the gradient of its own loss
        derived = gradients_of_the_training_example(compiled.forward)
    else:
        if not compiled.params:  # the matmul cases: differentiate by their inputs
            text = text.replace("\ninput ", "\nparam ")
        text = with_loss(text, str(example))
        _, derived, _ = assert_grads_match_jax(text, str(example))
    params = [v.name for v in derived.params]
    assert [o.name for o in derived.outputs][-len(params):] == [f"{p}.grad" for p in params]


def gradients_of_the_training_example(forward):
    """The grad pass on a training example's forward program (its loss an output, no
    optimizer or micro-batches: the oracle differentiates the program as written) against
    jax.grad; returns the derived program."""
    training = forward.training
    outputs = tuple(o for o in forward.outputs if "." not in o.name)
    if training.loss not in {o.name for o in outputs}:
        outputs += (Output(training.loss, training.loss),)
    program = replace(forward, training=None, outputs=outputs)
    _, derived, _ = assert_program_grads_match_jax(program, training.loss, remat=training.remat)
    return derived


# ---- every op kind

EINSUM = """
dim B=4 D=3 E=5
input x[B,D]
param w[D,E]
param s[]
y[B] = x[B,D] * w[D,E] * s[]
z[B,D] = y[B] * w[D,E]
output z
"""

ELEMENTWISE = """
dim B=4 D=6
input x[B,D]
param w[D]
param v[B,D]
a[B,D] = exp(w[D] * 0.5) + log(abs(v[B,D]) + 1) + sqrt(abs(w[D]) + 1) + rsqrt(square(v[B,D]) + 1)
b[B,D] = tanh(a[B,D]) * sigmoid(v[B,D]) - relu(v[B,D]) + gelu(x[B,D] * w[D]) + silu(v[B,D]) / (abs(w[D]) + 2)
c[B,D] = max2(v[B,D], w[D]) * min2(x[B,D], v[B,D]) + where(v[B,D] > 0, w[D], -w[D])
d[B,D] = -b[B,D] * c[B,D] + (v[B,D] > x[B,D]) * a[B,D] - a[B,D] / (square(c[B,D]) + 1)
output d
"""

NEW_FUNCTIONS = """
dim S=6 T=S D=4
input x[S,D]
param w[D]
param u[S,D]
a[S,D] = sin(x[S,D] * w[D]) + cos(u[S,D]) * erf(w[D]) + pow(abs(u[S,D]) + 1, w[D])
s[S,T] = a[S,D] * a[T,D]
m[S,T] = where(pos(S) >= pos(T), s[S,T], -inf)
p[S,T] = softmax[T](m[S,T])
output p
"""

REDUCTIONS = """
dim B=3 S=5 D=4
input x[B,S,D]
param w[B,S,D]
a[B,D] = max[S](w[B,S,D] * x[B,S,D]) + min[S](w[B,S,D]) + mean[S](w[B,S,D])
b[B,S,D] = softmax[D](w[B,S,D]) + rmsnorm[D](w[B,S,D] + x[B,S,D]) * layernorm[D](w[B,S,D])
c[B,S] = logsumexp[D](w[B,S,D]) + sum[D](cumsum[S](w[B,S,D] * x[B,S,D]))
d[B,S,D] = b[B,S,D] * a[B,D] + c[B,S]
output d
"""

ROUTE = """
dim G=2 S=8 D=4 E=4 C=3 F=5
input x[G,S,D]
param wg[D,E]
param wi[E,D,F]
g[G,S,E] = softmax[E](x[G,S,D] * wg[D,E])
c[G,S,E,C] = route[E,C](g[G,S,E], k=2)
xe[E,G,C,D] = (c[G,S,E,C] > 0) * x[G,S,D]
h[E,G,C,F] = relu(xe[E,G,C,D] * wi[E,D,F])
y[G,S,F] = c[G,S,E,C] * h[E,G,C,F]
output y
"""

HALF = """
dim B=4 D=8 F=16
dtype bf16
input x[B,D]
param w1[D,F]
param w2[F,D]: f32
h[B,F] = gelu(x[B,D] * w1[D,F])
y[B,D]: f32 = h[B,F] * w2[F,D] + x[B,D]
z[B,D] = rmsnorm[D](y[B,D]) * x[B,D]
output z
"""

TAKE = """
dim B=2 S=5 V=7 D=4 E=D
input ids[B,S]: i32
param table[V,D]
param w[E,D]
e[B,S,D] = take[V](table[V,D], ids[B,S])
y[B,S,D] = e[B,S,E] * w[E,D]
output y
"""

NESTED = """
dim B=2 D=4 E=D L=3 M=2
input x[B,D]
repeat L {
  param w[E,D]
  param g[D]
  repeat M {
    param u[E,D]
    x[B,D] = tanh(x[B,E] * u[E,D]) + x[B,D]
  }
  x[B,D] = rmsnorm[D](x[B,E] * w[E,D]) * g[D]
}
output x
"""

CASES = {"einsum": EINSUM, "elementwise": ELEMENTWISE, "reductions": REDUCTIONS, "route": ROUTE,
         "half": HALF}


@pytest.mark.parametrize("name", CASES)
def test_gradients_of_every_op_kind_equal_jax_grad(name):
    assert_grads_match_jax(with_loss(CASES[name]))


def test_the_new_elementwise_functions_pos_and_inf_have_jax_gradients():
    assert_grads_match_jax(with_loss(NEW_FUNCTIONS))


def test_take_gradient_is_a_scatter_add():
    _, derived, _ = assert_grads_match_jax(with_loss(TAKE))
    kinds = {type(op).__name__ for op in derived.ops}
    assert "ScatterAdd" in kinds


BATCHED_TAKE = """
dim B=2 S=3 V=5 D=4 E=2
input x[B,S,D]
input tgt[B,S] : i32
input ids[E,B] : i32
param w[D,V]
param t[B,V,D]
logits[B,S,V] = x[B,S,D] * w[D,V]
l1[] = mean[B,S](logsumexp[V](logits[B,S,V]) - take[V](logits[B,S,V], tgt[B,S]))
r[E,D,B] = take[V](t[B,V,D], ids[E,B]) * 2
output l1
output r
"""


def test_a_batched_take_has_a_scatter_add_keeping_its_batch_indices():
    # The target logits of a cross-entropy and a lookup per batch row (B shared by the table
    # and the ids, repeated ids along E adding up): gradients equal jax.grad's.
    _, derived, _ = assert_grads_match_jax(with_loss(BATCHED_TAKE))
    scatters = {op.result.name: op for op in derived.ops if isinstance(op, ScatterAdd)}
    assert sorted((op.update.indices, op.ids.indices, op.result.type.indices, op.batch)
                  for op in scatters.values()) == [
        (("B", "S"), ("B", "S"), ("B", "S", "V"), ("B", "S")),
        (("E", "B", "D"), ("E", "B"), ("B", "V", "D"), ("B",))]


def test_nested_repeats_have_jax_gradients():
    program, derived, _ = assert_grads_match_jax(with_loss(NESTED))
    loops = [op for op in walk_ops(derived.ops) if isinstance(op, Repeat)]
    assert [(op.dim, op.reverse) for op in loops] == [("L", False), ("M", False), ("L", True),
                                                       ("M", True)]
    # stacked params get stacked gradients
    shapes = {o.name: derived.values[o.value].type.shape for o in derived.outputs}
    assert shapes["w.grad"] == (3, 4, 4) and shapes["u.grad"] == (3, 2, 4, 4)


def test_a_remat_repeat_saves_only_its_carried_values_and_recomputes_the_body():
    # `repeat L remat` as the checker marks it (Repeat.remat), on the transformer example
    text = with_loss((ROOT / "examples/transformer/block.ein").read_text())
    program = ein.compile_source(text)
    marked = replace(program, ops=tuple(replace(op, remat=True) if isinstance(op, Repeat) else op
                                        for op in program.ops))
    derived = grad(marked, "l")
    assert_single_assignment(derived)
    forward = derived.ops[0]
    assert isinstance(forward, Repeat) and [s.body_value for s in forward.saved] == ["x"]
    backward = next(op for op in derived.ops if isinstance(op, Repeat) and op.reverse)
    recomputed = [op.result.name for op in backward.body if op.result.name.endswith(".remat")]
    assert "p.remat" in recomputed and "q.remat" in recomputed
    inputs = ein.random_inputs(program, 0)
    got = reference.evaluate(derived, inputs)
    want = jax_grads(program, "l", inputs)
    for name, expected in want.items():
        assert compare(name, expected, got[name], 1e-4).ok, name


def test_a_repeat_saves_what_its_backward_body_reads():
    program = ein.compile_source(with_loss((ROOT / "examples/transformer/block.ein").read_text()))
    derived = grad(program, "l")
    forward, backward = derived.ops[0], next(op for op in derived.ops if isinstance(op, Repeat)
                                             and op.reverse)
    saved = {s.body_value: s.result for s in forward.saved}
    assert "x" in saved and "p" in saved and saved["p"].type.shape == (2, 4, 8, 64, 64)
    assert saved["p"].name == "p.saved"
    # the backward loop reads them as stacked views, and stacks the params' gradients
    assert {v.name for v in backward.stacked} >= {"x.saved", "p.saved", "wq", "wo"}
    assert {s.result.name for s in backward.saved} >= {"wq.grad", "g1.grad"}
    assert derived.values["wq.grad"].type.shape == (2, 128, 8, 16)


def test_recomputed_statements_are_emitted_before_their_first_backward_use():
    text = with_loss((ROOT / "examples/attention/tensor_parallel.ein").read_text())
    program = ein.compile_source(text)
    plain = grad(program, "l")
    remat = grad(program, "l", frozenset({"p"}))
    names = [op.result.name for op in remat.ops]
    assert "p.remat" in names
    first_read = next(i for i, op in enumerate(remat.ops)
                      if any(o.value == "p.remat" for o in op.operands))
    assert names.index("p.remat") < first_read
    assert names.index("p.remat") > names.index("l.grad")  # in the backward pass
    assert not any(o.value == "p" for op in remat.ops[names.index("l.grad"):] for o in op.operands)
    inputs = ein.random_inputs(program, 1)
    a, b = reference.evaluate(plain, inputs), reference.evaluate(remat, inputs)
    for param in program.params:
        np.testing.assert_allclose(a[f"{param.name}.grad"], b[f"{param.name}.grad"], rtol=1e-5,
                                   atol=1e-6)


# ---- JAX's conventions where a function has no derivative, exactly


def _grads(text: str, inputs: dict) -> dict:
    program = ein.compile_source(text)
    return reference.evaluate(grad(program, "l"), inputs)


def test_a_max_splits_its_gradient_equally_among_tied_maxima():
    text = "dim B=2 D=4\nparam w[B,D]\nl[] = sum[B](max[D](w[B,D]))\noutput l\n"
    w = np.array([[1, 3, 3, 2], [5, 5, 5, 0]], np.float32)
    assert _grads(text, {"w": w})["w.grad"].tolist() == [[0, 0.5, 0.5, 0], [np.float32(1 / 3)] * 3 + [0]]
    text = text.replace("max[D]", "min[D]")
    assert _grads(text, {"w": w})["w.grad"].tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]


def test_relu_abs_and_max2_at_their_kinks_follow_jax():
    text = ("dim D=3\nparam w[D]\ninput x[D]\n"
            "l[] = sum[D](relu(w[D]) + 2 * abs(w[D]) + 4 * max2(w[D], x[D]))\noutput l\n")
    w = np.array([0, 1, -1], np.float32)
    x = np.array([0, 2, -3], np.float32)
    # relu'(0) = 0, abs'(0) = 0, a tie of max2 gives half
    assert _grads(text, {"w": w, "x": x})["w.grad"].tolist() == [2, 1 + 2, -2 + 4]


def test_comparisons_and_where_conditions_carry_no_gradient():
    text = ("dim D=3\nparam w[D]\n"
            "l[] = sum[D]((w[D] > 0) * 3 + where(w[D] > 1, 2 * w[D], 5))\noutput l\n")
    w = np.array([0.5, 2, -1], np.float32)
    assert _grads(text, {"w": w})["w.grad"].tolist() == [0, 2, 0]


def test_derivatives_are_symbolic_and_simplified():
    assert derivative(Apply("add", (Arg(0), Arg(1))), 1) == Const(1.0)
    assert derivative(Apply("gt", (Arg(0), Arg(1))), 0) is None
    assert derivative(Apply("mul", (Arg(0), Const(3.0))), 0) == Const(3.0)


# ---- finite differences in float64


def _finite_difference_check(text: str, step: float = 1e-6, samples: int = 6):
    program = ein.compile_source(text)
    derived = grad(program, "l")
    inputs = ein.random_inputs(program, 3)
    got = reference.evaluate(derived, inputs)
    rng = np.random.default_rng(0)
    for param in program.params:
        gradient = got[f"{param.name}.grad"]
        for _ in range(samples):
            index = tuple(int(rng.integers(n)) for n in param.type.shape)
            moved = []
            for sign in (1, -1):
                shifted = dict(inputs)
                shifted[param.name] = inputs[param.name].copy()
                shifted[param.name][index] += sign * step
                moved.append(float(reference.evaluate(program, shifted)["l"]))
            estimate = (moved[0] - moved[1]) / (2 * step)
            assert abs(estimate - gradient[index]) <= 1e-6 * max(1.0, abs(estimate)), \
                (param.name, index, estimate, gradient[index])


@pytest.mark.parametrize("text", [
    with_loss(REDUCTIONS.replace("dim B", "dtype f64\ndim B")),
    with_loss(ELEMENTWISE.replace("dim B", "dtype f64\ndim B")).replace(": f32", ": f64"),
    with_loss(NESTED.replace("dim B", "dtype f64\ndim B")).replace(": f32", ": f64"),
], ids=["reductions", "elementwise", "nested repeats"])
def test_gradients_equal_finite_differences_in_float64(text):
    _finite_difference_check(text.replace(": f32", ": f64"))


# ---- names, pruning, layouts


def test_names_layouts_and_pruning():
    text = with_loss((ROOT / "examples/mlp/megatron.ein").read_text())
    program = ein.compile_source(text)
    derived = grad(program, "l")
    outputs = {o.name: o for o in derived.outputs}
    assert list(outputs) == ["y", "l", "w1.grad", "w2.grad"]
    assert outputs["w1.grad"].layout == program.values["w1"].layout
    assert outputs["w1.grad"].value == "w1.grad"
    names = {op.result.name: op for op in derived.ops}
    assert "x.grad" not in names  # an input gets no gradient
    assert names["h.grad"].stmt == "y.grad" and names["h.grad"].span == names["y"].span
    assert derived.values["w1.grad"].type == program.values["w1"].type


def test_a_value_read_twice_sums_its_contributions_and_an_unused_param_gets_zeros():
    text = ("dim B=2 D=3\ninput x[B,D]\nparam w[D]\nparam unused[D]\n"
            "h[B,D] = x[B,D] * w[D]\na[B,D] = h[B,D] * h[B,D]\nb[B,D] = exp(h[B,D])\n"
            "l[] = sum[B,D](a[B,D] + b[B,D])\noutput l\n")
    derived = grad(ein.compile_source(text), "l")
    ops = {op.result.name: op for op in derived.ops}
    assert [o.value for o in ops["h.grad"].operands] == ["h.grad.1", "h.grad.2"]
    assert ops["h.grad"].expr == Apply("add", (Arg(0), Arg(1)))
    assert "a.grad" not in ops  # `a + b` passes the gradient of l.1 on as it is
    assert isinstance(ops["unused.grad"], Map) and ops["unused.grad"].expr == Const(0.0)
    inputs = {"x": np.ones((2, 3), np.float32), "w": np.array([1, 2, 3], np.float32),
              "unused": np.ones(3, np.float32)}
    got = reference.evaluate(derived, inputs)
    w = inputs["w"]
    np.testing.assert_allclose(got["w.grad"], 2 * (2 * w + np.exp(w)), rtol=1e-6)
    assert got["unused.grad"].tolist() == [0, 0, 0]


# ---- the derived program is an ordinary program


@pytest.mark.parametrize("example", ["mlp/megatron.ein", "attention/tensor_parallel.ein",
                                     "attention/fsdp.ein", "moe/gshard.ein"])
def test_the_derived_program_partitions_and_runs_on_the_simulator(example):
    program = ein.compile_source(with_loss((ROOT / "examples" / example).read_text()))
    derived = grad(program, "l")
    inputs = ein.random_inputs(program, 0)
    expected = reference.evaluate(derived, inputs)
    outputs, _ = ein.run_simulated(derived, inputs)
    for output in derived.outputs:
        found = compare(output.name, expected[output.name], outputs[output.name],
                        program_tolerance(derived))
        assert found.ok, (output.name, found.error)


def test_format_grad_is_ein_text_that_computes_the_same_gradients():
    text = with_loss(ELEMENTWISE)
    program = ein.compile_source(text)
    derived = grad(program, "l")
    printed = format_grad(derived)
    again = ein.compile_source(printed, "grad.ein")
    inputs = ein.random_inputs(program, 2)
    want = reference.evaluate(derived, inputs)
    got = reference.evaluate(again, inputs)
    for param in program.params:
        np.testing.assert_allclose(got[f"{param.name}_grad"], want[f"{param.name}.grad"],
                                   rtol=1e-5, atol=1e-6)
    assert "# the backward pass" in printed and "l_grad[]: f32 = 1.0" in printed


def test_format_grad_of_a_step_with_an_optimizer_runs_and_updates_the_same():
    """The updated params are outputs of their new values (a param cannot be redefined)."""
    step = ein.load(ROOT / "examples/training/mlp_data_parallel.ein", {"B": 64, "D": 8, "F": 16})
    printed = format_grad(step)
    again = ein.compile_source(printed, "grad.ein")
    inputs = ein.random_inputs(step, 3)
    want = reference.evaluate(step, inputs)
    got = reference.evaluate(again, {name.replace(".", "_"): array for name, array in inputs.items()})
    for name in ("w1", "w1.m", "w2.v"):
        np.testing.assert_allclose(got[name.replace(".", "_") + "_new"], want[name], rtol=1e-5,
                                   atol=1e-7)


def test_format_grad_of_a_program_without_dims_is_ein_text():
    derived = grad(ein.compile_source("param w[]\nl[] = square(w[]) * 3\noutput l\n"), "l")
    again = ein.compile_source(format_grad(derived), "grad.ein")
    assert reference.evaluate(again, {"w": np.float32(2)})["w_grad"] == 12


def test_format_grad_writes_the_file_name_as_one_comment_line():
    derived = grad(ein.compile_source("param w[]\nl[] = square(w[])\noutput l\n",
                                      "a\nmesh x=2\n"), "l")
    printed = format_grad(derived)
    assert printed.splitlines()[0] == "# a\\nmesh x=2\\n with its backward pass (einpar grad)"
    assert "mesh" not in printed.split("\n", 1)[1]


def test_format_grad_shows_a_backward_loop():
    derived = grad(ein.compile_source(with_loss(NESTED)), "l")
    printed = format_grad(derived)
    assert "repeat L reverse {" in printed and "# saved: " in printed and "# stacked: " in printed


# ---- generated programs


def _generated_case(generated):
    text = with_loss(generated.text, name="lossz")
    program = ein.compile_source(text)
    return text, program


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(programs(max_statements=4, max_dim_size=6))
def test_generated_programs_have_jax_gradients(generated):
    text, _ = _generated_case(generated)
    assert_grads_match_jax(text, loss="lossz")


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(programs(max_statements=8), st.integers(0, 3))
def test_generated_programs_have_jax_gradients_wider(generated, seed):
    text, _ = _generated_case(generated)
    assert_grads_match_jax(text, loss="lossz", seed=seed)


def test_a_backward_loop_carries_a_gradient_in_its_values_pin():
    """megatron_full pins the carried x to [B@dp,S@tp,D]: the backward loop's statement
    that makes x's gradient for the next trip is pinned alike, so the gradient crosses
    the loop split as x does (carried whole, it was gathered in full on every trip)."""
    from einpar.layout import Layout

    step = ein.load(ROOT / "examples/training/megatron_full.ein")
    backward = [op for op in step.ops if isinstance(op, Repeat) and op.reverse]
    assert len(backward) == 1
    made = {op.result.name: op for op in backward[0].body if not isinstance(op, Repeat)}
    (carried,) = [c for c in backward[0].carried if c.result.name.startswith("x")]
    assert made[carried.body_result].result.layout == Layout((("dp",), ("tp",), ()))


def test_a_micro_batched_steps_accumulators_are_not_backward_statements():
    """The accumulators of `microbatches` (set up before the micro-batch loop) are not the
    backward pass: FSDP frees gathered params at the backward pass's first op
    (ir.after_backward_start), which must not be before the forward pass has run."""
    from einpar.ir import after_backward_start, is_backward, walk_ops

    text = (ROOT / "examples/training/mlp_fsdp.ein").read_text().replace(
        "loss l", "microbatches B=2\nloss l")
    step = ein.compile_source(text, "micro.ein")
    assert not any(is_backward(op) for op in step.ops)  # all of it runs in the loop
    accumulators = [op for op in walk_ops(step.ops)
                    if not isinstance(op, Repeat) and op.result.name.endswith(".acc#2")]
    assert accumulators and not any(is_backward(op) for op in accumulators)
    assert after_backward_start(step.ops) == set()
