"""Overlapping collectives with the compute that depends on them: collective matmuls
(cost_model/collective_matmul.py) and a training step's data-parallel reductions and ZeRO
gathers beside its passes (cost_model/grad_reduce.py); and ZeRO's uneven state split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import einpar.api as ein
from einpar.cli import main
from einpar.cost_model.cluster import preset
from einpar.cost_model.estimate import estimate
from einpar.cost_model.grad_reduce import exposed_reduction, overlapped_tail
from einpar.layout import Layout
from einpar.optimizer import state_layout
from einpar.testing import assert_equivalent
from einpar.units import format_seconds

GATHER_MATMUL = """mesh tp=4
dim  M=8192 K=8192 N=8192
dtype bf16
input a[M@tp, K]
param w[K, N@tp]
y[M, N@tp]{} = a[M,K] * w[K,N]
output y
"""

MATMUL_SCATTER = """mesh tp=4
dim  M=8192 K=8192 N=8192
dtype bf16
input a[M, K@tp]
param w[K@tp, N]
y[M@tp, N]{} = a[M,K] * w[K,N]
output y
"""


def priced(text: str, cluster: str = "h100x4", **options):
    program = ein.compile_source(text, "pair.ein")
    spmd = ein.compile_spmd(program, preset(cluster))
    return estimate(program, spmd, preset(cluster), **options)


@pytest.mark.parametrize("text, kinds", [(GATHER_MATMUL, ("all_gather", "einsum")),
                                          (MATMUL_SCATTER, ("einsum", "reduce_scatter"))])
def test_a_collective_and_its_matmul_take_the_pipelined_time(text, kinds):
    """Decomposed into the group's n = 4 chunks, the pair takes max + min/n; without, their
    sum (the matmul needs the whole gather, the reduce-scatter the whole product)."""
    apart = priced(text, overlap=True)
    together = priced(text, overlap=True, collective_matmul=True)
    assert [op.what.split("[")[0].split("(")[0] for op in together.ops] == list(kinds)
    comm = sum(op.comm_s for op in together.ops)
    compute = sum(op.compute_s for op in together.ops)
    assert comm > 0 and compute > 0
    assert apart.step_time_s == pytest.approx(comm + compute)
    assert together.step_time_s == pytest.approx(max(comm, compute) + min(comm, compute) / 4)
    assert together.collective_matmul and not apart.collective_matmul


def test_collective_matmul_never_slows_a_step_and_needs_overlap():
    text = (Path(__file__).parent.parent / "examples/training/megatron_selective.ein").read_text()
    plain = priced(text, "h100x8", overlap=True)
    chunked = priced(text, "h100x8", overlap=True, collective_matmul=True)
    assert chunked.step_time_s <= plain.step_time_s
    assert chunked.comm_s == pytest.approx(plain.comm_s)  # the same collectives, hidden better
    without = priced(text, "h100x8", collective_matmul=True)  # no second stream: no overlap
    assert not without.collective_matmul
    assert without.step_time_s == pytest.approx(priced(text, "h100x8").step_time_s)


@given(reduce_s=st.floats(0, 10), backward_s=st.floats(0, 10), layers=st.integers(1, 200))
def test_exposed_reduction_is_bounded_by_one_layer_and_by_the_whole(reduce_s, backward_s, layers):
    exposed = exposed_reduction(reduce_s, backward_s, layers)
    assert reduce_s / layers - 1e-12 <= exposed <= reduce_s + 1e-12
    # The reductions end no earlier than the pass's first layer plus all of them.
    assert backward_s + exposed >= backward_s / layers + reduce_s - 1e-9


def test_exposed_reduction_closed_forms():
    assert exposed_reduction(4.0, 100.0, 8) == pytest.approx(0.5)  # all but the last layer's
    assert exposed_reduction(10.0, 8.0, 8) == pytest.approx(10.0 - 7.0)  # network-bound
    assert exposed_reduction(3.0, 5.0, 1) == 3.0  # one layer: nothing to overlap
    # The update waits for the reductions; the tail never drops below the update.
    assert overlapped_tail(10.0, 8.0, 2.0, 100.0, 4) == pytest.approx(10.0 - 6.0)
    assert overlapped_tail(3.0, 1.0, 2.5, 100.0, 4) == 2.5


TRAIN = """mesh dp=4
dim  B=64 S=512 D=1024 F=4096 L=8
dtype bf16
input x0[B@dp, S, D]
repeat L {
  param w1[D, F]
  param w2[F, D]
  h[B@dp,S,F] = gelu(x0[B,S,D] * w1[D,F])
  x0[B@dp,S,D] = x0[B,S,D] + h[B,S,F] * w2[F,D]
}
l[] : f32 = mean[B,S,D](x0[B,S,D] * x0[B,S,D])
loss l
optimizer adamw lr=1e-4SHARD
microbatches B=2
"""


@pytest.mark.parametrize("shard", ["", " shard=dp"])
def test_overlapped_grad_reduce_hides_what_its_note_says(shard):
    text = TRAIN.replace("SHARD", shard)
    plain = priced(text, "h100x8:4", overlap=True)
    overlapped = priced(text, "h100x8:4", overlap=True, overlap_grad_reduce=True)
    note = [n for n in overlapped.notes if "hidden" in n]
    assert len(note) == 1 and overlapped.overlap_grad_reduce
    hidden = plain.step_time_s - overlapped.step_time_s
    assert hidden > 0
    assert format_seconds(hidden) in note[0]
    # At most the reductions' and gathers' time is hidden.
    comm = sum(op.comm_s for op in plain.ops if "[dp]" in op.what and op.trips == 1)
    assert hidden <= comm + 1e-12


def test_overlapped_grad_reduce_leaves_a_forward_program_alone():
    plain = priced(GATHER_MATMUL, overlap=True)
    assert priced(GATHER_MATMUL, overlap=True, overlap_grad_reduce=True).step_time_s == \
        plain.step_time_s


def test_overlapped_grad_reduce_on_a_pipeline():
    text = TRAIN.replace("SHARD", "").replace("mesh dp=4", "mesh dp=2 pp=2").replace(
        "repeat L {", "repeat L@pp {").replace("microbatches B=2", "microbatches B=4")
    plain = priced(text, "h100x8:4", overlap=True)
    overlapped = priced(text, "h100x8:4", overlap=True, overlap_grad_reduce=True)
    assert overlapped.pipeline is not None and overlapped.overlap_grad_reduce
    assert overlapped.step_time_s < plain.step_time_s
    (note,) = [n for n in overlapped.notes if "hidden" in n]
    assert "gradient reductions run beside its last backward slot" in note


def test_cli_flags_imply_overlap_and_show_in_json(tmp_path, capsys):
    path = tmp_path / "pair.ein"
    path.write_text(GATHER_MATMUL)
    assert main(["cost", str(path), "--cluster", "h100x4", "--collective-matmul", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["overlap"] and result["collective_matmul"] and not result["overlap_grad_reduce"]
    assert main(["cost", str(path), "--cluster", "h100x4", "--overlap-grad-reduce"]) == 0
    assert "gradient reductions overlap the last backward pass" in capsys.readouterr().out


ZERO_UNEVEN = """mesh dp=4
dim  B=8 D=6 F=10
dtype bf16
input x[B@dp, D]
input t[B@dp, D]
param w1[D, F]
param w2[F, D]
h[B,F] = gelu(x[B,D] * w1[D,F])
y[B,D] = h[B,F] * w2[F,D]
l[] : f32 = mean[B,D](square(y[B,D] - t[B,D]))
loss l
optimizer adamw lr=1e-3 shard=dp
"""


def test_zero_splits_unevenly_where_no_dimension_divides():
    """Neither 6 nor 10 divides by 4: the state splits the larger, 10, in blocks of 3 (the
    last holding 1), as ZeRO pads a flat buffer; the step still computes the reference's."""
    program = ein.compile_source(ZERO_UNEVEN, "zero.ein")
    spmd = ein.compile_spmd(program)
    for name in ("w1.m", "w1.master", "w2.v"):
        value = spmd.values[name]
        assert value.local_shape(spmd.mesh) in ((6, 3), (3, 6))
    assert_equivalent(program, backends=("numpy",), seed=0)
    priced_ = estimate(program, spmd, preset("h100x4"))
    # State and master: 3 f32 copies of each param's 3-wide block of 10 (or 6).
    assert priced_.memory.by_kind["optimizer_state"] + priced_.memory.by_kind["master"] == \
        3 * 4 * (6 * 3 + 3 * 6)
    assert np.isfinite(priced_.step_time_s)


def test_zero_state_layout_falls_back_to_padding():
    program = ein.compile_source("mesh dp=4\ndim D=6 F=10\nparam c[D,F]\ny[D,F] = c[D,F]\n"
                                 "output y", "t.ein")
    (param,) = program.inputs
    assert state_layout(param, program.mesh, ("dp",)) == Layout(((), ("dp",)))  # 10 > 6
    small = ein.compile_source("mesh dp=4\ndim D=3 F=2\nparam c[D,F]\ny[D,F] = c[D,F]\n"
                               "output y", "t.ein")
    (param,) = small.inputs  # no block as long as the axis: the state stays whole
    assert state_layout(param, small.mesh, ("dp",)) == Layout(((), ()))


PIPELINED_ZERO = """mesh dp=2 pp=2
dim  B=8 D=5 F=9 L=4
input x0[B@dp, D]
repeat L@pp {
  param w1[D, F]
  param w2[F, D]
  h[B@dp,F] = gelu(x0[B,D] * w1[D,F])
  x0[B@dp,D] = x0[B,D] + h[B,F] * w2[F,D]
}
l[] : f32 = mean[B,D](x0[B,D] * x0[B,D])
loss l
optimizer adamw lr=1e-3 shard=dp
microbatches B=2
"""


def test_a_pipelined_step_splits_its_state_unevenly_too():
    """dp=2 divides neither 5 nor 9: the state splits the larger, 9, in blocks of 5 and 4, and
    the pipelined step still computes the reference's on both backends."""
    program = ein.compile_source(PIPELINED_ZERO, "pipelined_zero.ein")
    spmd = ein.compile_spmd(program)
    assert spmd.values["w1.m"].local_shape(spmd.mesh)[-1] == 5
    assert_equivalent(program, backends=("numpy", "jax"), seed=0)
