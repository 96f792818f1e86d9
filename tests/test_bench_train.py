"""bench/train_vs_jax.py's two steps agree: einpar's training step under shard_map and its
twin (jax.value_and_grad of the forward program, the update in jax.numpy, under GSPMD with
the same layouts) give the same loss, gradients, updated params and optimizer state.
Not timed: the bench prints times, tests only check what it compares."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from einpar.api import compile_source, compile_spmd, random_inputs
from einpar.optimizer import param_of_state

from helpers import ROOT, loop_step, mlp_step

BENCH = ROOT / "bench" / "train_vs_jax.py"


def _bench():
    sys.path.insert(0, str(BENCH.parent))  # it imports its sibling vs_gspmd
    spec = importlib.util.spec_from_file_location("train_vs_jax", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


CASES = {
    # ZeRO-1 on bf16 params: f32 master copies and moments split over dp.
    "adamw_zero1_bf16": dict(dtype="bf16",
                             training="optimizer adamw lr=1e-2 b1=0.9 b2=0.95 wd=0.1 shard=dp"),
    # FSDP with plain SGD and weight decay, in four micro-batches, delivering a gradient.
    "sgd_fsdp_microbatches": dict(split="@dp", training="optimizer sgd lr=0.1 wd=0.01\n"
                                  "microbatches B=4\noutput w1.grad"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_einpars_step_and_the_gspmd_twin_agree(case):
    from einpar.backends import jax_backend

    bench = _bench()
    step = compile_source(mlp_step(B=16, D=8, F=16, **CASES[case]), f"<{case}>")
    spmd = compile_spmd(step)
    devices = jax_backend.start_devices(step.mesh.num_devices)
    both = bench.compile_both(step, spmd, random_inputs(step, 0), devices)
    ours, twin = both.ours.step(), both.twin.step()
    names = [output.name for output in step.outputs]
    assert sorted(ours) == sorted(twin) == sorted(names)
    grads = {"adamw_zero1_bf16": set(), "sgd_fsdp_microbatches": {"w1.grad"}}[case]
    assert {name for name in names if param_of_state(name) is None} == {"l", "w1", "w2"} | grads
    comparisons = bench.differences(step, ours, twin)
    assert [c.name for c in comparisons if not c.ok] == [], comparisons
    assert bench.agreement(comparisons).startswith("ok ")
    # The update moved the params: the comparison is of a real step, not of the inputs.
    inputs = random_inputs(step, 0)
    assert float(abs(twin["w2"].astype("float32") - inputs["w2"].astype("float32")).max()) > 0


def test_a_differing_output_is_named():
    bench = _bench()
    from einpar.tolerance import Comparison

    found = [Comparison("l", 0.0, 1e-4), Comparison("w1.m", 3e-3, 1e-4)]
    assert bench.agreement(found) == "NO: w1.m 30"
    assert bench.agreement(found[:1]) == "ok 0"


def test_the_twin_recomputes_a_remat_loop_as_einpars_step_does():
    """`repeat L remat` runs each trip's forward again in the backward pass, and so does its
    twin (its body checkpointed): per trip 2 matmuls forward, 4 backward and, with remat,
    the one whose result the backward pass reads (h) again. (einpar's step recomputes h too;
    how many rows of it each device computes depends on its plan.)"""
    from einpar.backends import jax_backend
    from einpar.backends.hlo_collectives import hlo_dot_flops

    bench = _bench()
    flops = {}
    for remat in ("", " remat"):
        step = compile_source(loop_step(remat), "<loop>")
        spmd = compile_spmd(step, objective="bytes")
        devices = jax_backend.start_devices(step.mesh.num_devices)
        both = bench.compile_both(step, spmd, random_inputs(step, 0), devices)
        assert all(c.ok for c in bench.differences(step, both.ours.step(), both.twin.step()))
        flops[remat] = hlo_dot_flops(both.twin.hlo())
    per_trip = 2 * (16 // 4) * 8 * 16  # one matmul's FLOPs on a device's rows of the batch
    assert flops == {"": 3 * 6 * per_trip, " remat": 3 * 7 * per_trip}


# A host whose elementwise work is slow next to its collectives, as 8 CPU devices sharing a
# few cores are: the time plan of a data-parallel AdamW step shards the update.
SLOW_UPDATE_HOST = json.dumps({
    "name": "slow-update-host",
    "accelerator": {"name": "host", "family": "cpu", "peak_flops": {"f32": 1e10},
                    "hbm_bandwidth": 1e10, "hbm_capacity": 1e9, "scale_up_bandwidth": 1e9},
    "topology": {"kind": "switched", "gpus_per_node": 8},
    "efficiency": {"matrix": 1.0, "vector": 0.01, "memory": 0.1}})

DATA_PARALLEL_ADAMW = mlp_step("optimizer adamw lr=1e-3 b1=0.9 b2=0.95 eps=1e-8 wd=0.1",
                               B=512, D=64, F=64)


def _collectives(spmd):
    from einpar.spmd import CollectiveStep

    return [(step.kind, step.tensor, step.bytes_per_device) for step in spmd.steps
            if isinstance(step, CollectiveStep) and step.kind != "slice"]


def test_a_time_plan_sending_more_than_gspmd_meets_the_byte_goal_by_its_byte_minimal_plan(capsys):
    """On a host where the update is slow, the time plan reduce-scatters each gradient, updates
    a quarter of each param and its moments and all-gathers the three: 4·(3/4) of a param's
    16 KiB per device, where GSPMD (and einpar's byte-minimal plan) all-reduce it, 2·(3/4).
    The bench times the time plan against GSPMD, and checks the byte goal on the byte-minimal
    plan's HLO, saying why the time plan sends more."""
    from einpar.backends import jax_backend
    from einpar.cost_model.cluster import parse_cluster

    bench = _bench()
    host = parse_cluster(SLOW_UPDATE_HOST, "host.json")
    step = compile_source(DATA_PARALLEL_ADAMW, "<dp-adamw>")
    quarter, loss = 3 * 64 * 64 * 4 // 4, 2 * 3 * 4  # (n-1)/n of a param; the loss's all-reduce
    sharded = [("all_reduce", "l", loss)] + [
        (kind, tensor, quarter) for w, grad in (("w1", "h.grad"), ("w2", "y.grad"))
        for kind, tensor in (("reduce_scatter", grad), ("all_gather", f"{w}.m"),
                             ("all_gather", f"{w}.v"), ("all_gather", w))]
    assert _collectives(compile_spmd(step, cluster=host)) == sharded
    assert _collectives(compile_spmd(step, objective="bytes")) == [
        ("all_reduce", "l", loss), ("all_reduce", "h.grad", 2 * quarter),
        ("all_reduce", "y.grad", 2 * quarter)]

    devices = jax_backend.start_devices(step.mesh.num_devices)
    row = bench.measure("dp_adamw", step, host, host, devices, rounds=1)
    assert row.ours.planned == row.ours.hlo == 8 * quarter + loss
    assert row.byte.planned == row.byte.hlo == row.twin.hlo == 4 * quarter + loss
    assert row.ours.modeled_s < row.byte.modeled_s  # the partitioner's reason, shown
    assert row.byte_goal == "bytes"
    assert all(c.ok for c in row.ours.same + row.byte.same)
    note = bench.byte_plan_note(row, host.name)
    assert f"byte-minimal plan: {4 * quarter + loss:,} B in its HLO (1 all_reduce[dp])" in note
    assert "the time plan sends 2.00x GSPMD's bytes" in note and "priced on slow-update-host" in note
    assert bench.summary([row], [], False) == 0
    printed = capsys.readouterr().out
    assert "bytes in the HLO einpar <= GSPMD on 1 of 1 (goal: every one); by the byte-minimal " \
           "plan on dp_adamw" in printed
    assert "einpar's HLO sends the bytes it planned on 1 of 1\n" in printed


def test_the_byte_goal_counts_the_byte_minimal_plan_only_where_the_time_plan_is_priced_faster():
    bench = _bench()

    def plan(hlo, modeled=None):
        return bench.Plan(None, None, hlo, hlo, "", 0, [], modeled)

    twin = plan(100)
    assert bench.Row("p", 0.0, plan(100), twin).byte_goal == "time"
    assert bench.Row("p", 0.0, plan(200), twin).byte_goal == ""  # no byte-minimal plan ran
    assert bench.Row("p", 0.0, plan(200, 1.0), twin, plan(100, 2.0)).byte_goal == "bytes"
    # Priced slower than the byte-minimal plan: its extra bytes have no reason, the goal is missed.
    assert bench.Row("p", 0.0, plan(200, 2.0), twin, plan(100, 1.0)).byte_goal == ""
    assert bench.Row("p", 0.0, plan(200, 1.0), twin, plan(150, 2.0)).byte_goal == ""
