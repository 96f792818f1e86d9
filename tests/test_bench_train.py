"""bench/train_vs_jax.py's two steps agree: einpar's training step under shard_map and its
twin (jax.value_and_grad of the forward program, the update in jax.numpy, under GSPMD with
the same layouts) give the same loss, gradients, updated params and optimizer state.
Not timed: the bench prints times, tests only check what it compares."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from einpar.api import compile_source, compile_spmd, random_inputs

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
    # FSDP with plain SGD and weight decay, in four micro-batches.
    "sgd_fsdp_microbatches": dict(dtype="", split="@dp",
                                  training="optimizer sgd lr=0.1 wd=0.01\nmicrobatches B=4"),
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
    assert {"l", "w1", "w2", "w1.grad", "w2.grad"} <= set(names)
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
