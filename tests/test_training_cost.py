"""`einpar cost` on a training step: memory by kind (exact bytes by hand, and ZeRO's
2+2+12 bytes per parameter), time by part, model FLOPs and MFU (cost_model/training.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

import einpar.api as ein
from einpar.cost_model.cluster import load_cluster
from einpar.cost_model.estimate import estimate, in_place_updates, peak_memory
from einpar.cost_model.training import memory_kind, step_part
from einpar.ir import Optimizer, Program
from einpar.optimizer import apply_optimizer
from helpers import loop_step
from test_optimizer import with_gradients

# A bf16 regression y = x·w with loss l = sum((y − t)²) and its backward pass by hand:
# y.grad = 2(y − t), w.grad = x·y.grad.
FORWARD = """dtype bf16
{mesh}
dim B=8 D=16 F=32
input x[B{split},D]
input t[B{split},F]
param w[D,F]
y[B,F] = x[B,D] * w[D,F]
l[] = sum[B,F](square(y[B,F] - t[B,F]))
output l
"""
BACKWARD = """yg[B,F] = 2 * (y[B,F] - t[B,F])
wg[D,F] = x[B,D] * yg[B,F]
output wg
"""
N = 16 * 32  # parameters


def train_step(optimizer: Optimizer, mesh: str = "", split: str = "", overrides=None) -> Program:
    text = FORWARD.format(mesh=mesh, split=split)
    forward = ein.compile_source(text, "regression.ein", overrides)
    step = ein.compile_source(text + BACKWARD, "regression.ein", overrides)
    step = with_gradients(step, {"w": "wg"})
    step = _renamed(step, "yg", "y.grad")
    return replace(apply_optimizer(step, optimizer), forward=forward)


def _renamed(program: Program, old: str, new: str) -> Program:
    def fix(op):
        operands = tuple(replace(o, value=new if o.value == old else o.value) for o in op.operands)
        result = replace(op.result, name=new) if op.result.name == old else op.result
        if hasattr(op, "operand"):
            return replace(op, operand=operands[0], result=result)
        return replace(op, operands=operands, result=result)
    return replace(program, ops=tuple(fix(op) for op in program.ops))


def priced(program: Program, cluster: str = "h100x8", **options):
    return estimate(program, ein.compile_spmd(program, load_cluster(cluster)),
                    load_cluster(cluster), **options)


ADAM = Optimizer("adamw", lr=1e-3)


def test_mixed_precision_adam_takes_2_2_12_bytes_per_parameter():
    """One device: every byte at the peak, by kind, counted by hand."""
    result = priced(train_step(ADAM))
    memory = result.memory
    assert memory.by_kind == {
        "params": 2 * N,  # bf16 w
        "gradients": 2 * N,  # bf16 w.grad
        "optimizer_state": 8 * N,  # f32 w.m and w.v
        "master": 4 * N,  # f32 w.master
        "inputs": 8 * 16 * 2 + 8 * 32 * 2,  # x and t
        "activations": 2,  # the loss l (y is read no more once w.grad is made)
        "temporaries": 8 * 32 * 2}  # y.grad, which w.grad is made from
    model_states = sum(memory.by_kind[k] for k in ("params", "gradients", "optimizer_state", "master"))
    assert model_states == (2 + 2 + 12) * N
    assert memory.peak_bytes == sum(memory.by_kind.values()) == result.peak_memory_bytes
    assert (memory.peak_value, memory.peak_part) == ("w.grad", "backward")
    # When y.grad is made: y (bf16[8,32]) and the loss are the forward's values still alive
    assert memory.saved_activations_bytes == 8 * 32 * 2 + 2


def test_updated_state_takes_its_inputs_buffer():
    """The update writes w, w.m, w.v, w.master in place: no second copy at the end."""
    step = train_step(ADAM)
    spmd = ein.compile_spmd(step)
    bytes_of = {name: value.type.nbytes for name, value in spmd.values.items()}.__getitem__
    peak, resident = peak_memory(spmd, bytes_of)
    assert resident == 2 * N + 12 * N + 8 * 16 * 2 + 8 * 32 * 2
    assert peak == resident + 2 * N + 8 * 32 * 2 + 2  # w.grad, y.grad, l: no updated copies


def test_zero1_splits_state_and_master_copies_over_dp():
    """ZeRO-1 over dp=4: the f32 state and master copy are a quarter each per device."""
    result = priced(train_step(replace(ADAM, shard=("dp",)), "mesh dp=4", "@dp", {"B": 512}))
    kinds = result.memory.by_kind
    assert kinds["params"] == 2 * N and kinds["optimizer_state"] == 8 * N // 4
    assert kinds["master"] == 4 * N // 4
    replicated = priced(train_step(ADAM, "mesh dp=4", "@dp", {"B": 512})).memory.by_kind
    assert replicated["optimizer_state"] == 8 * N and replicated["master"] == 4 * N


@pytest.mark.parametrize("overlap", [False, True])
def test_parts_of_the_step_sum_to_its_time(overlap):
    result = priced(train_step(replace(ADAM, shard=("dp",)), "mesh dp=4", "@dp", {"B": 512}),
                    overlap=overlap)
    times = result.training.time_s
    assert set(times) == {"forward", "backward", "update"}
    assert sum(times.values()) == pytest.approx(result.step_time_s - result.cluster.step_overhead_s)
    if not overlap:  # steps in sequence: each part is the sum of its steps' times
        gather = next(op for op in result.ops if op.name == "w.new~1")
        update = [op for op in result.ops if op.name.startswith("w.m.new") or op is gather]
        assert times["update"] == pytest.approx(sum(op.compute_s or op.comm_s for op in update))
        assert times["update"] > gather.comm_s > 0  # the all-gather of the updated param


def test_model_flops_and_mfu():
    B, D, F = 512, 16, 32
    result = priced(train_step(ADAM, "mesh dp=4", "@dp", {"B": B}))
    training = result.training
    assert training.forward_flops == 2 * B * D * F  # the one contraction, y = x·w
    assert training.model_flops == 3 * 2 * B * D * F
    assert (training.params, training.tokens, training.token_dims) == (D * F, B, ("B",))
    assert training.flops_6nt == 6 * D * F * B
    peak = result.peak_flops_per_s * result.step_time_s * 4
    assert training.mfu == pytest.approx(training.model_flops / peak)
    document = result.to_json()
    assert document["training"]["model_flops"] == training.model_flops
    assert set(document["training"]) == {"forward_s", "backward_s", "update_s", "model_flops",
                                         "forward_flops", "params", "tokens", "token_dims",
                                         "flops_6nt", "mfu", "mfu_6nt"}
    assert set(document["memory"]) == {"peak_bytes", "by_kind", "peak_at",
                                       "saved_activations_bytes"}


def test_a_forward_program_has_memory_by_kind_but_no_training_figures():
    program = ein.compile_source(FORWARD.format(mesh="", split=""), "regression.ein")
    result = priced(program)
    assert result.training is None and result.to_json()["training"] is None
    kinds = result.memory.by_kind
    assert kinds["params"] == 2 * N and kinds["inputs"] == 8 * 16 * 2 + 8 * 32 * 2
    assert kinds["gradients"] == kinds["optimizer_state"] == kinds["master"] == 0
    assert result.memory.saved_activations_bytes is None
    assert sum(kinds.values()) == result.peak_memory_bytes


def test_memory_kinds_by_the_naming_contract():
    step = train_step(replace(ADAM, shard=("dp",)), "mesh dp=4", "@dp")
    forward = frozenset(step.forward.values)
    expected = {"w": "params", "w~1": "temporaries", "w.new": "params", "w.new~1": "params",
                "w.grad": "gradients", "w.grad~1": "gradients", "w.grad.2": "gradients",
                "w.m": "optimizer_state", "w.v.new": "optimizer_state", "w.master": "master",
                "w.master.new": "master", "x": "inputs", "x~1": "activations",
                "y": "activations", "y.grad": "temporaries"}
    for name, kind in expected.items():
        assert memory_kind(name, step, forward, None) == kind, name
    # a forward value recomputed in the backward pass is a temporary there
    assert memory_kind("y", step, forward, "backward") == "temporaries"
    assert step_part("y", step, forward, after_backward=True) == "backward"
    assert step_part("w.m.new", step, forward, after_backward=True) == "update"
    assert step_part("w.grad", step, forward, after_backward=False) == "backward"


def test_each_collective_is_in_the_part_it_serves_a_gradients_in_the_backward_pass():
    """FSDP: w gathered for y (forward, and kept for the backward's xg), w.grad
    reduce-scattered (backward), the loss all-reduced to be delivered (forward)."""
    from einpar.cost_model.training import forward_values, step_parts
    from einpar.spmd import collectives

    text = FORWARD.format(mesh="mesh dp=4", split="@dp").replace("param w[D,F]", "param w[D@dp,F]")
    backward = BACKWARD.replace("output wg\n", "xg[B,D] = yg[B,F] * w[D,F]\noutput xg\noutput wg\n")
    forward = ein.compile_source(text, "fsdp.ein", {"B": 512})
    step = _renamed(ein.compile_source(text + backward, "fsdp.ein", {"B": 512}), "yg", "y.grad")
    step = replace(apply_optimizer(with_gradients(step, {"w": "wg"}), ADAM), forward=forward)
    spmd = ein.compile_spmd(step, objective="bytes")
    parts, _ = step_parts(spmd.steps, step, forward_values(step))
    assert [(c.kind, c.src, c.serves, parts[id(c)]) for c in collectives(spmd)] == [
        ("all_gather", "w", "y", "forward"), ("reduce_scatter", "w.grad", "w.m.new", "backward"),
        ("all_reduce", "l", "", "forward")]


def test_trips_not_laid_out_go_to_their_part():
    """A repeat of 5,000 trips lays out 4: the rest of its time is the forward pass's."""
    from test_optimizer import STACKED

    forward = ein.compile_source(STACKED, "stacked.ein", {"L": 5000})
    step = with_gradients(ein.compile_source(STACKED, "stacked.ein", {"L": 5000}), {"s": "wg"})
    step = replace(apply_optimizer(step, ADAM), forward=forward)
    for overlap in (False, True):
        result = priced(step, overlap=overlap)
        assert any("laid out for 4 trips" in note for note in result.notes)
        times = result.training.time_s
        assert sum(times.values()) == pytest.approx(result.step_time_s - result.cluster.step_overhead_s)
        body = sum((op.compute_s or op.comm_s) * op.trips for op in result.ops if op.trips > 1)
        assert times["forward"] >= body * 0.99


def test_an_output_redefining_an_input_is_not_an_update_in_place():
    """Only the optimizer's updates (`w.new` for output `w`) take their input's buffer: a
    forward program's `x = ...; output x` keeps its own."""
    program = ein.compile_source("dim B=8 D=16 L=2\ninput x[B,D]\n"
                                 "repeat L {\n  x[B,D] = x[B,D] * 2\n}\noutput x", "redefine.ein")
    spmd = ein.compile_spmd(program)
    bytes_of = {name: value.type.nbytes for name, value in spmd.values.items()}.__getitem__
    assert in_place_updates(spmd, bytes_of) == set()
    step = train_step(ADAM)
    step_spmd = ein.compile_spmd(step)
    step_bytes = {name: value.type.nbytes for name, value in step_spmd.values.items()}.__getitem__
    assert in_place_updates(step_spmd, step_bytes) == {"w.new", "w.m.new", "w.v.new",
                                                       "w.master.new"}


# ---- what docs/training.md says of remat and micro-batches

REMAT_MLP = """mesh dp=2
dim B=64 D=32 F=128
input x[B@dp, D]
param w1[D, F]
param w2[F, D]
{remat}h[B,F] = gelu(x[B,D] * w1[D,F])
y[B,D] = h[B,F] * w2[F,D]
l[] = mean[B,D](square(y[B,D]))
loss l
"""


def priced_source(text: str, overrides=None):
    program = ein.compile_source(text, "step.ein", overrides)
    return estimate(program, ein.compile_spmd(program), load_cluster("h100x8"))


def test_remat_adds_the_recomputation_to_the_flops_run_not_to_the_model_flops():
    kept, recomputed = priced_source(REMAT_MLP.format(remat="")), priced_source(REMAT_MLP.format(remat="remat "))
    assert recomputed.training.model_flops == kept.training.model_flops
    # h = gelu(x·w1) again on each device: its contraction (2·B/2·D·F) and the map.
    again = 2 * 32 * 32 * 128
    assert recomputed.flops_per_device - kept.flops_per_device >= again
    assert recomputed.memory.saved_activations_bytes < kept.memory.saved_activations_bytes


FSDP_MICRO = """mesh dp=4
dim B=4096 D=64 F=256
input x[B@dp, D]
param w1[D@dp, F]
param w2[F@dp, D]
h[B@dp,F] = gelu(x[B,D] * w1[D,F])
y[B@dp,D] = h[B,F] * w2[F,D]
l[] = mean[B,D](square(y[B,D]))
loss l
microbatches B=4
"""


def test_an_fsdp_weight_is_gathered_once_per_micro_batch():
    cost = priced_source(FSDP_MICRO)
    gathers = [op for op in cost.ops if op.what.startswith("all_gather") and "w2" in op.what]
    assert gathers and all(op.trips == 4 for op in gathers)




def test_model_flops_count_every_trip_and_the_whole_batch():
    """docs/cost.md: a repeat body's contractions once per trip, N every stacked param in
    full, and a micro-batched step's tokens the whole batch's (not one micro-batch's)."""
    B, D, E, L = 16, 8, 16, 3
    training = priced_source(loop_step(training="microbatches B=2\n")).training
    assert training.forward_flops == L * 2 * (2 * B * D * E)  # two matmuls a trip
    assert training.model_flops == 3 * training.forward_flops
    assert (training.params, training.tokens, training.token_dims) == (L * 2 * D * E, B, ("B",))
    assert training.flops_6nt == 6 * L * 2 * D * E * B


def test_a_micro_batched_step_has_a_forward_part_and_saved_activations():
    """The accumulators' zeros are made before the micro-batch loop: they do not start the
    backward pass (they once made every step after them backward: a forward part of 0 s
    and no saved activations)."""
    whole = priced(ein.compile_source(loop_step(), "loop.ein"))
    micro = priced(ein.compile_source(loop_step(training="microbatches B=4\n"), "loop.ein"))
    for result in (whole, micro):
        assert result.training.time_s["forward"] > 0
        assert result.memory.saved_activations_bytes > 0
    # a micro-batch keeps a quarter of the batch's activations (the loss's 4 bytes aside)
    assert micro.memory.saved_activations_bytes * 4 == pytest.approx(
        whole.memory.saved_activations_bytes, abs=4)
