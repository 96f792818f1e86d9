"""The optimizer's update (einpar.optimizer): PyTorch's formulas, state inputs and their
defaults, master copies, and ZeRO's layouts (one reduce-scatter and one all-gather)."""

from __future__ import annotations

from dataclasses import replace

import ml_dtypes
import numpy as np
import pytest

import einpar.api as ein
from einpar.inputs import check_inputs, random_inputs
from einpar.ir import Optimizer, Output, Program, Repeat, with_operands
from einpar.layout import Layout
from einpar.optimizer import apply_optimizer, param_of_state, state_layout
from einpar.spmd import collectives
from einpar.tolerance import compare, program_tolerance

# A forward program and its gradient written by hand: y = x·w, the loss's gradient dy given;
# `wg` becomes the value `w.grad`, as einpar.grad names it.
MLP = """
mesh dp=4
dim B=8 D=16 F=32
input x[B@dp,D]
input dy[B@dp,F]
param w[D,F]
y[B,F] = x[B,D] * w[D,F]
wg[D,F] = x[B,D] * dy[B,F]
output y
output wg
"""


def with_gradients(program: Program, grads: dict[str, str]) -> Program:
    """`program` with each value `grads[w]` renamed `w.grad` and delivered, unasked, in its
    param's layout (what the grad pass hands the optimizer)."""
    rename = {value: f"{param}.grad" for param, value in grads.items()}
    params = {value.name: value for value in program.params}

    def op_renamed(op):
        if isinstance(op, Repeat):
            return replace(op, body=tuple(op_renamed(inner) for inner in op.body))
        operands = tuple(replace(o, value=rename.get(o.value, o.value)) for o in op.operands)
        result = replace(op.result, name=rename.get(op.result.name, op.result.name))
        return replace(with_operands(op, operands), result=result)

    outputs = []
    for output in program.outputs:
        if output.value in rename:
            param = params[next(p for p, v in grads.items() if v == output.value)]
            layout = Layout((param.layout or Layout.replicated(param.type.rank)).dims)
            output = Output(rename[output.value], rename[output.value], layout)
        outputs.append(output)
    return replace(program, ops=tuple(op_renamed(op) for op in program.ops),
                   outputs=tuple(outputs))


def training(source: str, optimizer: Optimizer, grads: dict[str, str] | None = None,
             overrides=None) -> Program:
    forward = ein.compile_source(source, "step.ein", overrides)
    step = apply_optimizer(with_gradients(forward, grads or {"w": "wg"}), optimizer)
    return replace(step, forward=forward)


ADAMW = Optimizer("adamw", lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, step=3)


# ---- the formulas, reimplemented from PyTorch's source


def torch_adamw(w, g, m, v, opt: Optimizer):
    """torch/optim/adamw.py, _single_tensor_adamw (non-capturable), in float64."""
    w, g, m, v = (np.asarray(a, np.float64) for a in (w, g, m, v))
    w = w * (1 - opt.lr * opt.wd)
    m = m + (1 - opt.b1) * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
    v = v * opt.b2 + (1 - opt.b2) * g * g
    step_size = opt.lr / (1 - opt.b1 ** opt.step)
    denom = np.sqrt(v) / np.sqrt(1 - opt.b2 ** opt.step) + opt.eps
    return w - step_size * m / denom, m, v


def torch_sgd(w, g, opt: Optimizer):
    w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
    return w - opt.lr * (g + opt.wd * w)


def inputs_with_state(program: Program, seed: int = 1) -> dict:
    arrays = random_inputs(program, seed)
    rng = np.random.default_rng(seed + 1)
    for value in program.inputs:
        if value.kind == "state" and not value.name.endswith(".master"):
            array = rng.standard_normal(value.type.shape).astype(np.float32)
            arrays[value.name] = np.abs(array) if value.name.endswith(".v") else array
    return arrays


def test_adamw_equals_pytorch_formula_with_bias_correction():
    step = training(MLP, ADAMW)
    arrays = inputs_with_state(step)
    out = ein.run_reference(step, arrays)
    g = np.einsum("bd,bf->df", arrays["x"].astype(np.float64), arrays["dy"].astype(np.float64))
    w, m, v = torch_adamw(arrays["w"], g, arrays["w.m"], arrays["w.v"], ADAMW)
    assert set(out) == {"y", "w", "w.m", "w.v"}  # w.grad was not asked for
    np.testing.assert_allclose(out["w.m"], m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["w.v"], v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["w"], w, rtol=1e-5, atol=1e-6)
    assert out["w"].dtype == np.float32 and out["w.m"].dtype == np.float32
    # The update moved w: by about lr per element (Adam's step is lr-sized)
    assert 1e-4 < np.abs(out["w"] - arrays["w"]).mean() < 3e-2


def test_adamw_first_step_from_zero_state_moves_every_weight_by_lr():
    """At t = 1 from zero moments, m̂ = g and v̂ = g², so the step is lr·sign(g) (+ decay)."""
    opt = Optimizer("adamw", lr=1e-3, eps=1e-12)
    step = training(MLP, opt)
    arrays = random_inputs(step, 0)  # state at its defaults
    assert not arrays["w.m"].any() and not arrays["w.v"].any()
    out = ein.run_reference(step, arrays)
    g = np.einsum("bd,bf->df", arrays["x"], arrays["dy"])
    np.testing.assert_allclose(out["w"], arrays["w"] - 1e-3 * np.sign(g), rtol=1e-5, atol=1e-6)


def test_sgd_equals_pytorch_formula():
    opt = Optimizer("sgd", lr=0.1, wd=0.01)
    step = training(MLP, opt)
    assert [v.name for v in step.inputs if v.kind == "state"] == []
    arrays = random_inputs(step, 2)
    out = ein.run_reference(step, arrays)
    g = np.einsum("bd,bf->df", arrays["x"].astype(np.float64), arrays["dy"].astype(np.float64))
    np.testing.assert_allclose(out["w"], torch_sgd(arrays["w"], g, opt), rtol=1e-5, atol=1e-6)
    assert set(out) == {"y", "w"}


BF16 = MLP.replace("param w[D,F]", "param w[D,F] : bf16")


def test_bf16_param_is_updated_on_its_f32_master_copy():
    step = training(BF16, ADAMW)
    state = {v.name: v for v in step.inputs if v.kind == "state"}
    assert {name: v.type.dtype for name, v in state.items()} == \
        {"w.m": "f32", "w.v": "f32", "w.master": "f32"}
    arrays = inputs_with_state(step)
    # The master copy is the param in float32 by default, and differs from it once trained.
    master = random_inputs(step, 1)["w.master"]
    np.testing.assert_array_equal(master, arrays["w"].astype(np.float32))
    arrays["w.master"] = master + np.float32(1e-3) * np.random.default_rng(5).standard_normal(
        master.shape).astype(np.float32)
    out = ein.run_reference(step, arrays)
    g = np.einsum("bd,bf->df", arrays["x"].astype(np.float64),
                  arrays["dy"].astype(np.float64)).astype(np.float32)  # g computed in f32
    w, m, v = torch_adamw(arrays["w.master"], g, arrays["w.m"], arrays["w.v"], ADAMW)
    np.testing.assert_allclose(out["w.master"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["w.m"], m, rtol=1e-5, atol=1e-6)
    assert out["w"].dtype == ml_dtypes.bfloat16
    # The param is the updated master copy rounded to bf16, not the bf16 param updated.
    np.testing.assert_array_equal(out["w"], out["w.master"].astype(ml_dtypes.bfloat16))
    assert set(out) == {"y", "w", "w.m", "w.v", "w.master"}


def test_sgd_on_a_bf16_param_keeps_a_master_copy():
    step = training(BF16, Optimizer("sgd", lr=0.5))
    assert [v.name for v in step.inputs if v.kind == "state"] == ["w.master"]
    arrays = random_inputs(step, 3)
    out = ein.run_reference(step, arrays)
    g = np.einsum("bd,bf->df", arrays["x"].astype(np.float64), arrays["dy"].astype(np.float64))
    np.testing.assert_allclose(out["w.master"], arrays["w"].astype(np.float64) - 0.5 * g,
                               rtol=1e-5, atol=1e-5)


def test_an_asked_for_gradient_stays_an_output():
    forward = ein.compile_source(MLP, "step.ein")
    program = with_gradients(forward, {"w": "wg"})
    asked = tuple(replace(o, span=forward.outputs[-1].span) if o.name == "w.grad" else o
                  for o in program.outputs)
    assert asked[-1].span is not None
    step = apply_optimizer(replace(program, outputs=asked), ADAMW)
    assert [o.name for o in step.outputs] == ["y", "w.grad", "w", "w.m", "w.v"]


def test_state_names():
    assert param_of_state("w.m") == ("w", "m")
    assert param_of_state("w1.master") == ("w1", "master")
    assert param_of_state("w.grad") is None and param_of_state("w") is None
    assert param_of_state("h.grad.m") is None


# ---- inputs


def test_state_defaults_and_loaded_state(tmp_path):
    step = training(BF16, ADAMW)
    forward_arrays = random_inputs(step.forward, 4)
    arrays = random_inputs(step, 4)
    for name, array in forward_arrays.items():  # state draws nothing: same seed, same inputs
        np.testing.assert_array_equal(arrays[name], array)
    given = {name: forward_arrays[name] for name in ("x", "dy", "w")}
    checked = check_inputs(step, given, "inputs")
    assert not checked["w.m"].any() and checked["w.m"].dtype == np.float32
    np.testing.assert_array_equal(checked["w.master"], forward_arrays["w"].astype(np.float32))
    path = tmp_path / "state.npz"
    m = np.full((16, 32), 0.5, np.float32)
    np.savez(path, **given, **{"w.m": m})
    loaded = ein.load_inputs(step, str(path))
    np.testing.assert_array_equal(loaded["w.m"], m)
    assert not loaded["w.v"].any()


# ---- backends agree


@pytest.mark.parametrize("source", [MLP, BF16])
def test_numpy_simulator_equals_reference(source):
    step = training(source, replace(ADAMW, shard=("dp",)))
    arrays = inputs_with_state(step)
    expected = ein.run_reference(step, arrays)
    got, _ = ein.run_simulated(step, arrays)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(np.asarray(got[name], np.float64),
                                   np.asarray(expected[name], np.float64), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


# ---- layouts and collectives


def test_zero_state_layout_rule():
    tp = ein.compile_source("mesh dp=4 tp=2\ndim D=8 F=6 L=3\nparam a[D,F@tp]\nparam c[F,D]\n"
                            "param e[F@tp,D@dp]\n"
                            "repeat L { param s[F,D]\n }\n"
                            "y[D,F] = a[D,F] + c[F,D] + e[F,D]\noutput y", "t.ein")
    params = {p.name: p for p in tp.inputs}
    mesh = tp.mesh
    # D=8 is the first dimension dp=4 divides
    assert state_layout(params["a"], mesh, ("dp",)) == Layout((("dp",), ("tp",)))
    # F=6 is not divisible by 4: the next dimension
    assert state_layout(params["c"], mesh, ("dp",)) == Layout(((), ("dp",)))
    # already split by dp (FSDP): no further split
    assert state_layout(params["e"], mesh, ("dp",)) == Layout((("tp",), ("dp",)))
    # two axes: each placed in turn, on the block the axes before it leave
    assert state_layout(params["a"], mesh, ("dp", "tp")) == Layout((("dp",), ("tp",)))
    # a stacked param's repeat dim is never split
    assert state_layout(params["s"], mesh, ("dp",)) == Layout(((), (), ("dp",)))


def _moves(program: Program, objective: str) -> list[tuple[str, str, int]]:
    spmd = ein.compile_spmd(program, objective=objective)
    return [(c.kind, c.src, c.bytes_per_device) for c in collectives(spmd)]


@pytest.mark.parametrize("objective", ["time", "bytes"])
def test_data_parallel_gradient_is_one_all_reduce(objective):
    step = training(MLP, ADAMW, overrides={"B": 512})
    # 2·(n−1)/n of the f32 gradient's 16·32·4 bytes, n = 4
    assert _moves(step, objective) == [("all_reduce", "w.grad", 2 * 3 * 2048 // 4)]


@pytest.mark.parametrize("objective", ["time", "bytes"])
@pytest.mark.parametrize("source, param_bytes", [(MLP, 4), (BF16, 2)])
def test_zero1_is_one_reduce_scatter_and_one_all_gather(objective, source, param_bytes):
    """ZeRO-1 on a dp-replicated param: the gradient is reduce-scattered into the sharded
    state (not all-reduced) and the updated param all-gathered back whole."""
    step = training(source, replace(ADAMW, shard=("dp",)), overrides={"B": 512})
    state = [v for v in step.inputs if v.kind == "state"]
    assert all(v.layout == Layout((("dp",), ())) for v in state)
    n, grad_bytes = 4, 16 * 32 * 4
    assert _moves(step, objective) == [
        ("reduce_scatter", "w.grad", (n - 1) * grad_bytes // n),
        ("all_gather", "w.new", (n - 1) * 16 * 32 * param_bytes // n)]


def test_fsdp_param_state_stays_in_its_layout():
    source = MLP.replace("param w[D,F]", "param w[D@dp,F]")
    step = training(source, replace(ADAMW, shard=("dp",)), overrides={"B": 512})
    assert all(v.layout == Layout((("dp",), ())) for v in step.inputs if v.kind == "state")
    # the gradient is reduce-scattered into the param's own shards; no gather after the update
    moves = _moves(step, "time")
    assert ("reduce_scatter", "w.grad", 3 * 16 * 32 * 4 // 4) in moves
    assert not any(tensor == "w.new" for _, tensor, _ in moves)


STACKED = """
mesh dp=4
dim B=8 D=16 E=16 L=3
input x[B@dp,D]
input dy[B@dp,E]
input c[L]
repeat L {
  param s[D,E]
  x[B,D] = x[B,D] * s[D,E] * x[B,E]
}
wg[L,D,E] = x[B,D] * dy[B,E] * c[L]
output x
output wg
"""


def test_stacked_param_has_stacked_state():
    step = training(STACKED, replace(ADAMW, shard=("dp",)), grads={"s": "wg"})
    state = {v.name: v for v in step.inputs if v.kind == "state"}
    assert set(state) == {"s.m", "s.v"}
    for value in state.values():
        assert value.stacked_by == ("L",) and value.type.shape == (3, 16, 16)
        assert value.layout == Layout(((), ("dp",), ()))
    arrays = inputs_with_state(step)
    out = ein.run_reference(step, arrays)
    after = out["x"]  # the gradient is written with the loop's result x
    g = np.einsum("bd,be,l->lde", *(a.astype(np.float64) for a in (after, arrays["dy"], arrays["c"])))
    w, m, v = torch_adamw(arrays["s"], g, arrays["s.m"], arrays["s.v"], ADAMW)
    np.testing.assert_allclose(out["s"], w, rtol=1e-5, atol=1e-6)
    got, _ = ein.run_simulated(step, arrays)
    for name in ("s", "s.m", "s.v"):
        np.testing.assert_allclose(got[name], out[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("twin", [False, True], ids=["shard_map", "gspmd"])
def test_jax_runs_the_zero_update_as_the_reference(twin):
    step = training(BF16, replace(ADAMW, shard=("dp",)))
    arrays = inputs_with_state(step)
    reference = ein.run_reference(step, arrays)
    result = ein.run_jax(step, arrays, twin=twin, warmup=0, repeat=1)
    for output in step.outputs:
        found = compare(output.name, reference[output.name], result.outputs[output.name],
                        program_tolerance(step))
        assert found.ok, (output.name, found.error, found.tolerance)
        assert result.outputs[output.name].dtype == reference[output.name].dtype


TWO_LAYERS = """
mesh dp=4
dim B=512 D=16 F=32 E=8
input x[B@dp,D]
input dz[B@dp,E]
param w1[D,F]
param w2[F,E] : bf16
y[B,F] = x[B,D] * w1[D,F]
z[B,E] = y[B,F] * w2[F,E]
g2[F,E] : bf16 = y[B,F] * dz[B,E]
dy[B,F] = dz[B,E] * w2[F,E]
g1[D,F] = x[B,D] * dy[B,F]
output z
output g1
output g2
"""


def test_zero1_moves_each_param_once_each_way():
    step = training(TWO_LAYERS, replace(ADAMW, shard=("dp",)), grads={"w1": "g1", "w2": "g2"})
    moves = sorted(_moves(step, "time"))
    assert moves == sorted([
        ("reduce_scatter", "w1.grad", 3 * 16 * 32 * 4 // 4), ("all_gather", "w1.new", 3 * 16 * 32 * 4 // 4),
        ("reduce_scatter", "w2.grad", 3 * 32 * 8 * 2 // 4), ("all_gather", "w2.new", 3 * 32 * 8 * 2 // 4)])
    arrays = inputs_with_state(step)
    expected = ein.run_reference(step, arrays)
    got, _ = ein.run_simulated(step, arrays)
    # w2's bf16 gradient is summed in bf16 blocks on the devices: equal within bf16's tolerance
    for output in step.outputs:
        found = compare(output.name, expected[output.name], got[output.name],
                        program_tolerance(step))
        assert found.ok, (output.name, found.error, found.tolerance)


def test_a_gradient_pinned_only_to_be_delivered_goes_straight_into_the_sharded_update():
    """A gradient value pinned whole (as if for its output) is unpinned when its output is
    dropped, so ZeRO reduce-scatters it rather than all-reducing it first."""
    program = with_gradients(ein.compile_source(MLP, "step.ein", {"B": 512}), {"w": "wg"})
    pinned = tuple(replace(op, result=replace(op.result, layout=Layout(((), ()))))
                   if op.result.name == "w.grad" else op for op in program.ops)
    step = apply_optimizer(replace(program, ops=pinned), replace(ADAMW, shard=("dp",)))
    assert program.values["w.grad"].layout is None
    assert replace(program, ops=pinned).values["w.grad"].layout == Layout(((), ()))
    assert step.values["w.grad"].layout is None
    assert [kind for kind, _, _ in _moves(step, "time")] == ["reduce_scatter", "all_gather"]
