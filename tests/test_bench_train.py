"""bench/train_vs_jax.py's two steps agree: einpar's training step under shard_map and its
twin (jax.value_and_grad of the forward program, the update in jax.numpy, under GSPMD with
the same layouts) give the same loss, gradients, updated params and optimizer state.
Not timed: the bench prints times, tests only check what it compares."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from einpar.api import compile_source, compile_spmd, random_inputs
from einpar.optimizer import param_of_state

from helpers import ROOT

BENCH = ROOT / "bench" / "train_vs_jax.py"


def _bench():
    sys.path.insert(0, str(BENCH.parent))  # it imports its sibling vs_gspmd
    spec = importlib.util.spec_from_file_location("train_vs_jax", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


MLP = """
mesh dp=4
dim  B=16 D=8 F=16
{dtype}
input x[B@dp, D]
input t[B@dp, D]
param w1[D{split}, F]
param w2[F, D]

h[B,F] = gelu(x[B,D] * w1[D,F])
y[B,D] = h[B,F] * w2[F,D]
l[] : f32 = mean[B,D](square(y[B,D] - t[B,D]))

loss l
{training}
"""

CASES = {
    # ZeRO-1 on bf16 params: f32 master copies and moments split over dp.
    "adamw_zero1_bf16": dict(dtype="dtype bf16", split="",
                             training="optimizer adamw lr=1e-2 b1=0.9 b2=0.95 wd=0.1 shard=dp"),
    # FSDP with plain SGD and weight decay, in four micro-batches, delivering a gradient.
    "sgd_fsdp_microbatches": dict(dtype="", split="@dp", training="optimizer sgd lr=0.1 wd=0.01\n"
                                  "microbatches B=4\noutput w1.grad"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_einpars_step_and_the_gspmd_twin_agree(case):
    from einpar.backends import jax_backend

    bench = _bench()
    step = compile_source(MLP.format(**CASES[case]), f"<{case}>")
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


LOOP = """
mesh dp=4
dim  B=16 D=8 E=16 L=3

input x[B@dp, D]

repeat L{remat} {{
  param w1[D, E]
  param w2[E, D]
  h[B,E]    = tanh(x[B,D] * w1[D,E])
  x[B@dp,D] = x[B,D] + h[B,E] * w2[E,D]
}}

l[] = mean[B,D](square(x[B,D]))

loss l
optimizer sgd lr=0.1
"""


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
        step = compile_source(LOOP.format(remat=remat), "<loop>")
        spmd = compile_spmd(step, objective="bytes")
        devices = jax_backend.start_devices(step.mesh.num_devices)
        both = bench.compile_both(step, spmd, random_inputs(step, 0), devices)
        assert all(c.ok for c in bench.differences(step, both.ours.step(), both.twin.step()))
        flops[remat] = hlo_dot_flops(both.twin.hlo())
    per_trip = 2 * (16 // 4) * 8 * 16  # one matmul's FLOPs on a device's rows of the batch
    assert flops == {"": 3 * 6 * per_trip, " remat": 3 * 7 * per_trip}
