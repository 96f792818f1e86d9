"""Repeats that save per-trip values and run in reverse (a forward loop keeping its
activations, a backward loop reading them a trip at a time): partitioned, lowered, printed,
simulated, run on JAX (shard_map and the GSPMD twin) and priced like any other loop.

The programs are built by hand: the checked forward loop gets `saved` values, and a second,
reverse loop slices them (and the stacked params) and saves per-trip results of its own.
"""

import json
from dataclasses import replace

import numpy as np
import pytest

from einpar.api import compile_source, compile_spmd, emit_jax, explain, random_inputs, run_jax
from einpar.backends.numpy_sim import run_spmd
from einpar.backends.reference import evaluate
from einpar.cost_model.cluster import preset
from einpar.cost_model.estimate import estimate, peak_memory
from einpar.ir import (Apply, Arg, Carried, Const, Einsum, Map, Operand, Output, Repeat, Saved,
                       TensorType, Value)
from einpar.layout import Layout, local_bytes
from einpar.spmd import RepeatStep, bytes_per_device, collectives, format_spmd, to_json
from einpar.tolerance import compare, program_tolerance
from test_valid_programs import SHARDED_NESTED

FORWARD = """mesh dp=2 tp=4
dim B=256 D=32 F=128 L={L}
input x[B@dp, D]
repeat L {{
  param w[D, F@tp]
  param u[F@tp, D]
  h[B,F] = tanh(x[B,D] * w[D,F])
  x[B@dp,D] = x[B,D] + h[B,F] * u[F,D]
}}
output x
"""


def _value(name: str, indices: str, sizes: dict, layout: Layout | None = None) -> Value:
    return Value(name, TensorType("f32", tuple(indices), tuple(sizes[i] for i in indices)),
                 layout=layout)


def _operand(name: str, indices: str) -> Operand:
    return Operand(name, tuple(indices))


def forward_backward(count: int = 3, reverse: bool = True, seeded_by_forward: bool = True):
    """The checked forward loop, saving its carried-in x (`xs`) and h (`hs`); then a loop
    over the trips (last first when `reverse`) that reads this trip's slices of xs, hs, w
    and u, carries g and saves dw[D,F] and du[F,D] (`dws`, `dus`): backpropagation's shape.
    g starts from the forward's result, or from the input x (then only the slices tie the
    loops together)."""
    program = compile_source(FORWARD.format(L=count), file="saved.ein")
    sizes = program.dim_sizes
    loop = replace(program.ops[0], saved=(Saved("x", _value("xs", "LBD", sizes)),
                                          Saved("h", _value("hs", "LBF", sizes))))
    w, u = loop.stacked
    seed = Map(_value("g", "BD", sizes), (_operand("x#3" if seeded_by_forward else "x", "BD"),),
               Apply("mul", (Arg(0), Const(2.0))), "g")
    body = (
        Einsum(_value("t", "BF", sizes), (_operand("g", "BD"), _operand("u", "FD")), "t"),
        Map(_value("dh", "BF", sizes), (_operand("t", "BF"), _operand("hs", "BF")),
            Apply("mul", (Arg(0), Apply("sub", (Const(1.0), Apply("mul", (Arg(1), Arg(1))))))),
            "dh"),
        Einsum(_value("dw", "DF", sizes), (_operand("xs", "BD"), _operand("dh", "BF")), "dw"),
        Einsum(_value("du", "FD", sizes), (_operand("hs", "BF"), _operand("g", "BD")), "du"),
        Einsum(_value("g#2.1", "BD", sizes), (_operand("dh", "BF"), _operand("w", "DF")), "g"),
        Map(_value("g#2", "BD", sizes, Layout((("dp",), ()))),
            (_operand("g", "BD"), _operand("g#2.1", "BD")), Apply("add", (Arg(0), Arg(1))), "g"),
    )
    back = Repeat("L", count, (Carried("g", "g#2", _value("g#3", "BD", sizes)),),
                  (w, u, _value("hs", "BF", sizes), _value("xs", "BD", sizes)), body,
                  saved=(Saved("dw", _value("dws", "LDF", sizes)),
                         Saved("du", _value("dus", "LFD", sizes))),
                  reverse=reverse)
    outputs = program.outputs + (Output("dx", "g#3"), Output("dws", "dws", Layout(((), (), ("tp",)))),
                                 Output("dus", "dus"), Output("hs", "hs"))
    return replace(program, ops=(loop, seed, back), outputs=outputs)


def by_hand(inputs: dict, reverse: bool = True, seeded_by_forward: bool = True) -> dict:
    """The same computation in plain NumPy (float64), trip by trip."""
    x, w, u = (np.asarray(inputs[name], np.float64) for name in ("x", "w", "u"))
    xs, hs = [], []
    for trip in range(len(w)):
        xs.append(x)
        hs.append(np.tanh(x @ w[trip]))
        x = x + hs[-1] @ u[trip]
    g = 2 * (x if seeded_by_forward else np.asarray(inputs["x"], np.float64))
    dws, dus = [None] * len(w), [None] * len(w)
    for trip in (reversed(range(len(w))) if reverse else range(len(w))):
        dh = (g @ u[trip].T) * (1 - hs[trip] ** 2)
        dws[trip] = xs[trip].T @ dh
        dus[trip] = hs[trip].T @ g
        g = g + dh @ w[trip].T
    return {"x": x, "dx": g, "dws": np.stack(dws), "dus": np.stack(dus), "hs": np.stack(hs)}


def assert_close(program, expected: dict, found: dict) -> None:
    for output in program.outputs:
        result = compare(output.name, expected[output.name], found[output.name],
                         program_tolerance(program))
        assert result.ok, (output.name, result.error, result.tolerance)


@pytest.fixture(scope="module")
def program():
    return forward_backward()


@pytest.fixture(scope="module")
def spmd(program):
    return compile_spmd(program)


def test_the_reference_runs_the_backward_loop_from_its_last_trip(program):
    inputs = random_inputs(program, 0)
    assert_close(program, by_hand(inputs), evaluate(program, inputs))
    forward = forward_backward(reverse=False)
    assert_close(forward, by_hand(inputs, reverse=False), evaluate(forward, inputs))
    # The order matters: the two differ.
    assert not np.allclose(evaluate(forward, inputs)["dws"], evaluate(program, inputs)["dws"])


def test_simulated_devices_equal_the_reference_and_move_the_declared_bytes(program, spmd):
    inputs = random_inputs(program, 0)
    outputs, traffic = run_spmd(spmd, inputs)
    assert_close(program, evaluate(program, inputs), outputs)
    assert traffic.sent == [bytes_per_device(spmd.steps)] * 8


def test_saved_values_leave_the_loop_in_the_bodys_layout_and_are_sliced_where_they_are(spmd):
    values = spmd.values
    # Each trip's h is split over dp (B) and tp (F): the stack keeps that, L whole in front.
    assert values["hs"].format() == "f32[3,256@dp,128@tp]"
    assert values["hs"].local_shape(spmd.mesh) == (3, 128, 32)
    assert values["xs"].format() == "f32[3,256@dp,32]"
    # Partial over dp in the body (a contraction over B), dw is saved whole: the gradient's
    # all-reduce, each trip; F stays split over tp as the body made it.
    assert values["dws"].format() == "f32[3,32,128@tp]"
    forward, backward = [step for step in spmd.steps if isinstance(step, RepeatStep)]
    assert (forward.reverse, backward.reverse) == (False, True)
    assert forward.saved == (("x~in", "xs"), ("h", "hs"))
    assert backward.saved == (("dw~1", "dws"), ("du~1", "dus"))
    sliced = dict(backward.stacked)
    assert sliced["hs"] == "hs~trip" and sliced["xs"] == "xs~trip"  # no move before the loop
    assert values["hs~trip"].format() == "f32[256@dp,128@tp]"


def test_exact_collectives(spmd):
    found = [(c.kind, c.step.axes, c.tensor, c.bytes_per_device, c.reason) for c in collectives(spmd)]
    # An all-reduce over n devices sends 2·(n−1)/n of its local bytes per device.
    assert found == [
        ("all_reduce", ("tp",), "x", 2 * 3 * (128 * 32 * 4) // 4, "x reads x"),  # forward
        ("all_reduce", ("tp",), "g", 2 * 3 * (128 * 32 * 4) // 4, "g reads g"),  # backward
        # dw [32, 128@tp] and du [128@tp, 32], partial over dp (n = 2), saved whole
        ("all_reduce", ("dp",), "dw", 2 * 1 * (32 * 32 * 4) // 2, "the loop saves it"),
        ("all_reduce", ("dp",), "du", 2 * 1 * (32 * 32 * 4) // 2, "the loop saves it"),
    ]
    assert bytes_per_device(spmd.steps) == 3 * (24576 + 24576 + 4096 + 4096)


def test_printed_with_its_slices_saves_and_order(spmd):
    text = format_spmd(spmd)
    assert "repeat L=3 {" in text and "repeat L=3 reverse {" in text
    assert "  slice hs~trip = hs[trip]\n  slice xs~trip = xs[trip]\n" in text
    assert "slice w" not in text  # a param's slices go without saying
    assert "  save h -> hs: f32[3,256@dp,128@tp] local [3,128,32]\n" in text
    assert "  save dw~1 -> dws: f32[3,32,128@tp] local [3,32,32]\n" in text
    steps = json.loads(json.dumps(to_json(spmd)))["steps"]
    backward = [step for step in steps if "repeat" in step][1]
    assert backward["reverse"] is True
    assert {"source": "hs", "inside": "hs~trip"} in backward["stacked"]
    assert backward["saved"] == [{"inside": "dw~1", "after": "dws"}, {"inside": "du~1", "after": "dus"}]


def test_on_jax_shard_map_and_the_gspmd_twin_equal_the_reference(program, spmd):
    inputs = random_inputs(program, 1)
    reference = evaluate(program, inputs)
    text = emit_jax(program, spmd=spmd)
    assert "(g_v3,), (dws, dus) = lax.scan(trip_2, (g,), (w, u, hs, xs), reverse=True)" in text
    assert "return (x_v2,), (x_in, h)" in text
    for twin in (False, True):
        outputs = run_jax(program, inputs, twin=twin, warmup=0, repeat=1, spmd=spmd).outputs
        assert_close(program, reference, outputs)


def test_peak_memory_holds_the_saved_stacks_from_the_forward_loop_to_their_last_reader(program, spmd):
    def bytes_of(name: str, leaving_out=()) -> int:
        value = spmd.values[name]
        return 0 if name in leaving_out else \
            local_bytes(value.layout, value.type.shape, value.type.dtype, spmd.mesh)

    stacks = {"xs": 3 * 128 * 32 * 4, "hs": 3 * 128 * 32 * 4, "dws": 3 * 32 * 32 * 4,
              "dus": 3 * 32 * 32 * 4}
    assert {name: bytes_of(name) for name in stacks} == stacks
    peak, resident = peak_memory(spmd, bytes_of)
    without, _ = peak_memory(spmd, lambda name: bytes_of(name, stacks))
    # All four are live at once (through the backward loop), on top of everything else.
    assert peak - without == sum(stacks.values()) == 122880
    assert resident == 128 * 32 * 4 + 2 * 3 * 32 * 32 * 4
    cost = estimate(program, spmd, preset("h100x8"))
    assert cost.peak_memory_bytes == peak


def _ends(cost, name: str) -> list[float]:
    op = next(op for op in cost.ops if op.name == name)
    return [start + op.compute_s for start in op.starts]


@pytest.mark.parametrize("reverse", [True, False])
def test_a_trip_waits_for_the_trip_that_saved_its_slice(reverse):
    # g starts from the input, so only the saved slices tie the backward loop to the forward.
    program = forward_backward(reverse=reverse, seeded_by_forward=False)
    cost = estimate(program, compile_spmd(program), preset("h100x8"), overlap=True)
    h = next(op for op in cost.ops if op.name == "h")
    dh = next(op for op in cost.ops if op.name == "dh")
    first_dh = min(dh.starts)
    h_ends = sorted(start + h.compute_s for start in h.starts)
    if reverse:  # its first trip reads the forward's last trip's h
        assert first_dh >= h_ends[-1]
    else:  # its first trip needs only the forward's first: the loops overlap
        assert h_ends[0] <= first_dh < h_ends[-1]


def test_a_long_loop_is_laid_out_for_a_few_trips_and_priced_for_all():
    cost = estimate(*(lambda p: (p, compile_spmd(p)))(forward_backward(count=512)),
                    preset("h100x8"), overlap=True)
    assert any("laid out for 4 trips" in note for note in cost.notes)
    small = estimate(*(lambda p: (p, compile_spmd(p)))(forward_backward(count=256)),
                     preset("h100x8"), overlap=True)
    overhead = cost.cluster.step_overhead_s
    assert (cost.step_time_s - overhead) == pytest.approx(2 * (small.step_time_s - overhead), rel=0.01)


def test_a_stacked_value_split_along_the_repeat_dim_is_gathered_before_the_loop():
    program = compile_source("mesh dp=2 tp=4\ndim B=8 D=16 L=2\ninput y[L, B, D]\n"
                             "s[L@dp, B, D] = y[L,B,D] * 2\noutput s\n", file="gather.ein")
    sizes = program.dim_sizes
    body = (Map(_value("c#2", "BD", sizes, Layout((("dp",), ()))),
                (_operand("c", "BD"), _operand("s", "BD")), Apply("add", (Arg(0), Arg(1))), "c"),)
    loop = Repeat("L", 2, (Carried("c", "c#2", _value("c#3", "BD", sizes)),),
                  (_value("s", "BD", sizes),), body, reverse=True,
                  saved=(Saved("c#2", _value("cs", "LBD", sizes)),))
    start = Einsum(_value("c", "BD", sizes), (_operand("y", "LBD"),), "c")
    program = replace(program, ops=program.ops + (start, loop),
                      outputs=(Output("c", "c#3"), Output("cs", "cs")))
    spmd = compile_spmd(program)
    gathers = [(c.kind, c.step.axes, c.tensor, c.reason) for c in collectives(spmd)]
    assert ("all_gather", ("dp",), "s", "the loop reads it a trip's slice at a time") in gathers
    inputs = random_inputs(program, 0)
    y = np.asarray(inputs["y"], np.float64)
    c = [y.sum(axis=0)]
    for trip in (1, 0):
        c.append(c[-1] + 2 * y[trip])
    expected = {"c": c[-1], "cs": np.stack([c[2], c[1]])}
    assert_close(program, expected, evaluate(program, inputs))
    outputs, traffic = run_spmd(spmd, inputs)
    assert_close(program, expected, outputs)
    assert traffic.sent == [bytes_per_device(spmd.steps)] * 8
    # explain puts the gather on the loop's edge, run once, not on a statement of the body
    edge = next(s for s in explain(program, source="\n").statements if s.name == "repeat L")
    assert edge.trips == 1 and [m.call for m in edge.movements] == ["all_gather[dp](s, L)"]


def test_explain_words_a_saved_partial_sum_on_the_statement_that_makes_it(program):
    statements = explain(program, source="\n" * 20).statements
    dw = next(s for s in statements if s.name == "dw")
    assert dw.trips == 3
    assert [m.call for m in dw.movements] == ["all_reduce[dp](dw, sum)"]
    assert "the loop saves every trip's f32[32,128@tp]" in dw.movements[0].sentence
    assert dw.made_as.text() == "f32[32,128@tp] {sum: dp}" and dw.result.text() == "f32[32,128@tp]"


def test_a_stack_asked_for_split_is_reduce_scattered_into_its_layout_each_trip():
    # FSDP: the gradient stack asked for in the layout of a param split over dp; each trip's
    # partial sum is reduce-scattered into it, half the bytes of saving it whole.
    program = forward_backward()
    program = replace(program, outputs=tuple(
        Output("dws", "dws", Layout(((), ("dp",), ("tp",)))) if output.name == "dws" else output
        for output in program.outputs))
    spmd = compile_spmd(program)
    found = [(c.kind, c.step.axes, c.tensor, c.bytes_per_device) for c in collectives(spmd)
             if c.tensor == "dw"]
    assert found == [("reduce_scatter", ("dp",), "dw", (32 * 32 * 4) // 2)]
    assert spmd.values["dws"].format() == "f32[3,32@dp,128@tp]"
    assert [output.value for output in spmd.outputs if output.name == "dws"] == ["dws"]  # no move
    inputs = random_inputs(program, 2)
    outputs, traffic = run_spmd(spmd, inputs)
    assert_close(program, evaluate(program, inputs), outputs)
    assert traffic.sent == [bytes_per_device(spmd.steps)] * 8


# The sharded nested program of test_valid_programs (a param in each block, collectives
# inside both, the outer block's param read after the inner block).
NESTED = SHARDED_NESTED


@pytest.mark.parametrize("make", [forward_backward, lambda: compile_source(NESTED, file="nested.ein")],
                         ids=["saving", "nested"])
def test_explain_counts_each_move_at_a_loops_edge_as_often_as_it_runs(make):
    # The inner loop's all-reduce back to the carried layout runs L·M = 6 times; the gather
    # before the outer loop once. Explain's statements send what the program sends.
    program = make()
    statements = explain(program, source=program.source or "\n" * 20).statements
    assert sum(s.bytes_per_device * s.trips for s in statements) == \
        bytes_per_device(compile_spmd(program).steps)
