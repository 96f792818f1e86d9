"""The cost model against hand computation from the reference formulas (cost_model_notes.md)."""

import contextlib
import dataclasses
import io
import json
import math
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from einpar import api
from einpar.cli import main
from einpar.cost_model import nccl
from einpar.cost_model.cluster import Cluster, Links, Torus, load_cluster, parse_cluster, preset
from einpar.cost_model.collectives import (collective_time, distinct_groups, mesh_groups,
                                           representative_groups, routed_time, switched_shapes, torus,
                                           torus_shapes)
from einpar.cost_model.estimate import estimate
from einpar.cost_model.hardware import H100, TPU_V5E
from einpar.cost_model.matmul import GemmShape, gemm_fit, gemm_math_time
from einpar.cost_model.trace import trace_events
from einpar.errors import EinparError
from einpar.layout import Mesh
from einpar.spmd import CollectiveStep, bytes_per_device, local_flops
from einpar.testing import programs

MB = 2**20
NVLINK = 450e9 * 370 / 450  # H100 NVLink at what NCCL achieves (nccl-tests#212)
IB = 50e9 * 47 / 50  # one NDR NIC per GPU at what NCCL achieves (nccl-tests#290)
A_NVLINK, A_IB, A_ICI = 10e-6, 20e-6, 1e-6  # Calculon's tier constants; ICI per hop (scaling book)


def mesh(**axes) -> Mesh:
    return Mesh(tuple(axes.items()))


# ---- collectives on one node, across nodes, and on a torus


@pytest.mark.parametrize("kind, sent", [
    ("all_gather", 7), ("reduce_scatter", 7 / 8), ("all_reduce", 14 / 8), ("all_to_all", 7 / 8)])
def test_one_node_prices_what_nccl_runs(kind, sent):
    # 64 MiB per device: bandwidth-bound, so Simple rings (or NVLS, or send/recv) at H100's
    # fitted NVLink4 constants (hardware.py), every group of one node at once.
    cost = collective_time(kind, ("tp",), 64 * MB, mesh(tp=8), preset("h100x8"))
    best = nccl.fastest(kind, 8, 8, 1, 64 * MB, H100)
    assert (cost.algorithm, cost.protocol, cost.time_s) == (best.algorithm, best.protocol, best.time_s)
    ring = next(o for o in nccl.options(kind, 8, 8, 1, 64 * MB, H100)
                if o.algorithm in ("ring", "direct") and o.protocol == "Simple")
    efficiency = H100.scale_up_tier.protocols["Simple"].efficiency.value
    assert ring.bandwidth_s == pytest.approx(sent * 64 * MB / (NVLINK * efficiency))
    assert cost.time_s <= ring.time_s


def test_small_all_reduce_across_nodes_is_latency_bound_and_large_bandwidth_bound():
    # dp groups: one GPU in each of 8 nodes.
    small = collective_time("all_reduce", ("dp",), 1024, mesh(dp=8, tp=8), preset("h100x8:8"))
    large = collective_time("all_reduce", ("dp",), 256 * MB, mesh(dp=8, tp=8), preset("h100x8:8"))
    assert small.bound == "latency" and large.bound == "bandwidth"
    assert (small.algorithm, small.protocol) != (large.algorithm, large.protocol)
    assert large.tier == "ib"


def test_one_gpu_per_node_rings_over_infiniband():
    # dp groups take one GPU from each of 2 nodes: every step crosses a NIC.
    cost = collective_time("all_gather", ("dp",), MB, mesh(dp=2, tp=8), preset("h100x8:2"))
    assert (cost.algorithm, cost.tier) == ("ring", "ib")
    protocol = H100.scale_out_tier.protocols[cost.protocol]
    rate = IB * protocol.efficiency.value
    if cost.protocol == "LL":
        rate = min(rate, H100.scale_out_tier.ll_max_bandwidth.value)
    assert cost.bandwidth_s == pytest.approx(max(MB, protocol.saturation.value / 2) / rate)


@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter", "all_to_all"])
def test_groups_spanning_nodes_go_hierarchical_or_ring(kind):
    # 16 GPUs, 8 in each of 2 nodes (scaling book gpus.md: T = max(T_node, T_scaleout)).
    k, m, v = 8, 2, 64 * MB
    cost = collective_time(kind, ("dp", "tp"), v, mesh(dp=2, tp=8), preset("h100x8:2"))
    hierarchical = [o for o in nccl.options(kind, 16, k, m, v, H100) if o.algorithm == "hierarchical"]
    assert hierarchical and cost.time_s <= min(o.time_s for o in hierarchical)
    assert cost.algorithm in ("hierarchical", "ring", "direct")


def test_wrapped_torus_axis_is_a_bidirectional_ring():
    # tpu-v5e:16x16, an all-gather along a full row of 16: V/(2W) and 16/2 hops
    # (scaling book sharding.md: T_AG = V / W_bidi).
    cost = collective_time("all_gather", ("y",), MB, mesh(x=16, y=16), preset("tpu-v5e:16x16"))
    gathered = 16 * MB
    assert cost.algorithm == "torus"
    assert cost.latency_s == pytest.approx(8 * A_ICI)
    assert cost.bandwidth_s == pytest.approx(gathered * 15 / 16 / (2 * 45e9))
    # Both axes at once: twice the links.
    both = collective_time("all_gather", ("x", "y"), MB, mesh(x=16, y=16), preset("tpu-v5e:16x16"))
    assert both.bandwidth_s == pytest.approx(256 * MB * 255 / 256 / (4 * 45e9))
    assert both.latency_s == pytest.approx(16 * A_ICI)


def test_unwrapped_torus_axis_takes_twice_as_long():
    # v5e axes shorter than 16 have no wraparound ("typically doubles").
    wrapped = collective_time("all_gather", ("y",), MB, mesh(x=16, y=16), preset("tpu-v5e:16x16"))
    line = collective_time("all_gather", ("y",), 16 * MB, mesh(x=4, y=4), preset("tpu-v5e:4x4"))
    assert line.bandwidth_s == pytest.approx(64 * MB * 3 / 4 / 45e9)
    assert line.latency_s == pytest.approx(3 * A_ICI)
    assert not torus_shapes(mesh_groups(mesh(x=4, y=4), ("y",)), preset("tpu-v5e:4x4").topology)[0][1].wrap
    assert wrapped.bandwidth_s < line.bandwidth_s


def test_all_to_all_on_a_torus_is_a_quarter_of_an_all_gather():
    a2a = collective_time("all_to_all", ("y",), MB, mesh(x=16, y=16), preset("tpu-v5e:16x16"))
    ag = collective_time("all_gather", ("y",), MB, mesh(x=16, y=16), preset("tpu-v5e:16x16"))
    assert a2a.bandwidth_s == pytest.approx(ag.bandwidth_s / 4)


# ---- contention


def line_cluster(devices: int = 4, bandwidth: float = 1e9) -> Cluster:
    names = tuple(f"d{i}" for i in range(devices))
    links = tuple((names[i], names[i + 1], bandwidth, 1e-6) for i in range(devices - 1))
    return Cluster("line", TPU_V5E, Links(names, (), links))


def test_groups_sharing_a_link_take_longer_than_one_alone():
    cluster = line_cluster()
    alone = routed_time("all_gather", np.array([[0, 2]]), MB, cluster)
    shared = routed_time("all_gather", np.array([[0, 2], [1, 3]]), MB, cluster)  # both cross d1-d2
    assert shared.bandwidth_s == pytest.approx(2 * alone.bandwidth_s)
    assert shared.sharing == 2


def test_groups_on_disjoint_links_do_not_slow_each_other():
    cluster = line_cluster()
    alone = routed_time("all_gather", np.array([[0, 1]]), MB, cluster)
    both = routed_time("all_gather", np.array([[0, 1], [2, 3]]), MB, cluster)
    assert both.time_s == pytest.approx(alone.time_s)
    assert both.sharing == 1


def test_strided_groups_on_a_torus_share_their_links():
    # On a ring of 16, groups {0,2,..,14} and {1,3,..,15} interleave: each link carries both.
    both = collective_time("all_gather", ("a",), MB, mesh(a=8, b=2), preset("tpu-v5e:1x16"))
    # The same group alone: mesh devices on the even chips only.
    evens = Cluster("evens", TPU_V5E, Torus((1, 16), (False, True)), device_order=tuple(range(0, 16, 2)))
    alone = collective_time("all_gather", ("a",), MB, mesh(a=8), evens)
    assert (both.sharing, alone.sharing) == (2, 1)
    assert both.bandwidth_s == pytest.approx(2 * alone.bandwidth_s)
    assert both.latency_s == alone.latency_s == pytest.approx(8 * A_ICI)  # 4 hops of 2 links


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(1, 8), (1, 16), (4, 4), (2, 8)]), st.data())
def test_torus_formula_matches_routing_every_group_over_the_graph(dims, data):
    """The dimension-wise formula's bandwidth term equals the busiest link's load when every
    group's bidirectional ring is routed over the torus graph (one-axis groups)."""
    size = dims[0] * dims[1]
    inner = data.draw(st.sampled_from([d for d in (1, 2, 4, 8, 16) if size % d == 0 and d < size]))
    outer = size // inner
    axis = data.draw(st.sampled_from(["a", "b"] if inner > 1 else ["a"]))
    m = mesh(a=outer, b=inner)
    cluster = Cluster("t", TPU_V5E, Torus(dims, tuple(d == 16 for d in dims)))
    groups = mesh_groups(m, (axis,))
    shapes = torus_shapes(groups, cluster.topology)
    # The formula is exact for groups along one axis; other shapes it bounds.
    assume(len(shapes) == 1 and sum(a.extent > 1 for a in shapes[0]) == 1)
    formula = torus("all_gather", shapes[0], MB, 45e9, A_ICI)
    routed = routed_time("all_gather", groups, MB, cluster)
    assert routed.bandwidth_s == pytest.approx(formula.bandwidth_s)


def test_pricing_a_symmetric_mesh_keeps_one_group_of_each_shape():
    # 16,384 devices: 2,048 tensor-parallel groups of 8 and 8 data-parallel groups of 2,048.
    m = mesh(dp=2048, tp=8)
    groups, count = representative_groups(m, ("tp",), 8)
    assert (groups.tolist(), count) == ([list(range(8))], 2048)
    groups, count = representative_groups(m, ("dp",), 8)
    assert len(groups) == 8 and count == 8
    assert len(distinct_groups(mesh_groups(m, ("dp",)), 8)) == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([1, 2, 3, 4, 6, 8]), min_size=1, max_size=3), st.data())
def test_representative_groups_have_every_shape_all_groups_have(sizes, data):
    m = Mesh(tuple((f"a{i}", size) for i, size in enumerate(sizes)))
    axes = tuple(data.draw(st.lists(st.sampled_from(m.names), min_size=1, unique=True)))
    every = mesh_groups(m, axes)
    gpus = data.draw(st.sampled_from([2, 4, 8]))
    few, count = representative_groups(m, axes, gpus)
    assert count == len(every)
    assert set(switched_shapes(few, gpus)) == set(switched_shapes(every, gpus))
    dims = data.draw(st.sampled_from([(2, 2), (4, 4), (2, 4, 4), (8, 8)]))
    topology = Torus(dims, tuple(d % 4 == 0 for d in dims))
    if m.num_devices <= topology.num_devices:
        period = int(np.prod(dims[1:]))
        few, _ = representative_groups(m, axes, period)
        assert set(torus_shapes(few, topology)) == set(torus_shapes(every, topology))


# ---- compute and memory


def test_roofline_of_one_matmul_on_h100():
    program = api.load("examples/matmul/case1_no_contracting_split.ein")
    result = estimate(program, api.compile_spmd(program), preset("h100x8"))
    [op] = result.ops
    flops = 2 * 128 * 512 * 256  # local [128,512] x [512,256]
    hbm = 4 * (128 * 512 + 512 * 256 + 128 * 256)
    assert (op.flops, op.hbm_bytes) == (flops, hbm)
    # A GPU preset prices a contraction by its shape (cost_model/matmul.py): C is 128x256, two
    # 128x128 tiles on H100's 132 SMs, so K = 512 splits: 64 blocks per tile (128 blocks in one
    # wave), each 8 of K, plus the wave's fixed cost and the launch; the f32 matmul at the
    # default precision, highest, runs at FP32's 66.9 TFLOP/s, H100's fit per SM.
    _, fit = gemm_fit(H100.name, "f32")
    per_sm = 66.9e12 * fit.sustained.value / 132
    math_s = fit.launch.value + 2 * 128 * 128 * (512 / 64) / per_sm + fit.block.value
    # under 1 MB of traffic at 0.30 of HBM's 3.35 TB/s (Calculon's steps)
    memory_s = hbm / (3.35e12 * 0.30)
    assert op.compute_s == pytest.approx(max(math_s, memory_s))
    assert op.bound == ("compute" if math_s > memory_s else "memory")
    assert result.step_time_s == pytest.approx(op.compute_s)


BIG_MATMUL = """\
dim I=4096 J=4096 K=4096
input a[I, J]
input b[J, K]
c[I,K] = a[I,J] * b[J,K]
output c
"""


@pytest.mark.parametrize("cluster, highest, fast, ratio", [
    ("h100x8", "f32", "tf32", 494.7 / 66.9),  # GPU: FP32 units, or TF32 tensor cores
    ("a100x8", "f32", "tf32", 156 / 19.5),
    ("tpu-v5e:2x4", "bf16/6", "bf16", 6.0),  # TPU: 6 bf16 passes, or one
])
def test_f32_matmuls_are_priced_at_the_precision_they_run_at(cluster, highest, fast, ratio):
    program = api.compile_source(BIG_MATMUL, "matmul.ein")
    spmd = api.compile_spmd(program)
    exact = estimate(program, spmd, preset(cluster), precision="highest")
    quick = estimate(program, spmd, preset(cluster), precision="default")
    assert estimate(program, spmd, preset(cluster)).step_time_s == exact.step_time_s  # the default
    [slow_op], [fast_op] = exact.ops, quick.ops
    assert (slow_op.detail, fast_op.detail) == (f"at {highest} peak", f"at {fast} peak")
    assert slow_op.bound == fast_op.bound == "compute"  # 137 GFLOP against 201 MB: compute-bound
    chip = preset(cluster).chip
    if chip.family == "gpu":  # by shape (cost_model/matmul.py): its fixed costs do not scale
        sms, fit = gemm_fit(chip.name, "f32")
        slow_s, fast_s = (gemm_math_time(GemmShape(4096, 4096, 4096), chip.peak_flops[dtype].value,
                                         int(sms.value), fit) for dtype in (highest, fast))
        assert (slow_op.compute_s, fast_op.compute_s) == (pytest.approx(slow_s),
                                                          pytest.approx(fast_s))
        assert chip.peak_flops[highest].value * ratio == pytest.approx(chip.peak_flops[fast].value)
    else:
        assert slow_op.compute_s / fast_op.compute_s == pytest.approx(ratio)
    assert (exact.precision, quick.precision) == ("highest", "default")


def test_cost_takes_the_precision_and_reports_it(capsys):
    assert main(["cost", "examples/matmul/case1_no_contracting_split.ein", "--cluster", "h100x8",
                 "--precision", "default", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == "default"
    assert result["per_op"][0]["detail"] == "at tf32 peak"
    assert main(["cost", "examples/matmul/case1_no_contracting_split.ein", "--cluster", "h100x8"]) == 0
    assert "f32 matmuls at highest precision" in capsys.readouterr().out
    assert main(["cost", "examples/matmul/case1_no_contracting_split.ein", "--cluster", "h100x8",
                 "--precision", "tf32"]) == 2
    assert "invalid choice: 'tf32'" in capsys.readouterr().err


def test_a_gpu_without_an_f32_peak_says_which_precision_has_one():
    program = api.load("examples/matmul/case1_no_contracting_split.ein")
    spmd = api.compile_spmd(program)
    h100 = preset("h100x8")
    tf32_only = {dtype: figure for dtype, figure in h100.chip.peak_flops.items() if dtype != "f32"}
    cluster = dataclasses.replace(h100, chip=dataclasses.replace(h100.chip, peak_flops=tf32_only))
    with pytest.raises(EinparError) as caught:
        estimate(program, spmd, cluster)
    [diagnostic] = caught.value.diagnostics
    assert diagnostic.code == "E410"
    assert "H100-SXM has no published peak for f32" in diagnostic.message
    assert diagnostic.hint.endswith("or price the other matmul precision (--precision default)")
    assert estimate(program, spmd, cluster, precision="default").ops[0].detail == "at tf32 peak"
    b200 = preset("b200x8")  # a chip with neither: no precision to suggest
    low_only = {dtype: b200.chip.peak_flops[dtype] for dtype in ("bf16", "fp8")}
    cluster = dataclasses.replace(b200, chip=dataclasses.replace(b200.chip, peak_flops=low_only))
    with pytest.raises(EinparError) as caught:
        estimate(program, spmd, cluster)
    assert "--precision" not in caught.value.diagnostics[0].hint


def test_peak_memory_of_one_matmul():
    program = api.load("examples/matmul/case1_no_contracting_split.ein")
    result = estimate(program, api.compile_spmd(program), preset("h100x8"))
    inputs = 4 * (128 * 512 + 512 * 256)
    assert result.input_bytes == inputs
    assert result.peak_memory_bytes == inputs + 4 * 128 * 256


def test_peak_memory_of_data_parallel_attention():
    # Every step alone (no fusion): the scores live in HBM (tests/test_fusion.py: with fusion).
    program = api.load("examples/attention/data_parallel.ein")
    result = estimate(program, api.compile_spmd(program), preset("h100x8"), fusion="none")
    x, weight = 4 * 128 * 256, 4 * 256 * 8 * 32
    head, scores, row = 4 * 128 * 8 * 32, 4 * 8 * 128 * 128, 4 * 128 * 8
    # The peak is at `p = p.exp / p.sum`: v, p.exp, p.sum and p live together.
    assert result.input_bytes == x + 4 * weight
    assert result.peak_memory_bytes == x + 4 * weight + head + 2 * scores + row


def test_does_not_fit_says_so():
    # Unfused, the 32k x 32k scores do not fit; flash attention (fusion auto) needs none of them.
    program = api.load("examples/attention/data_parallel.ein", {"S": 32768, "T": 32768})
    result = estimate(program, api.compile_spmd(program), preset("tpu-v5e:2x4"), fusion="none")
    assert not result.fits
    assert any("does not fit" in note for note in result.notes)


# ---- the timeline


@pytest.mark.parametrize("example", ["attention/tensor_parallel", "transformer/block", "moe/gshard"])
def test_without_overlap_the_step_is_compute_plus_communication(example):
    program = api.load(f"examples/{example}.ein")
    spmd = api.compile_spmd(program)
    serial = estimate(program, spmd, preset("h100x8"))
    assert serial.step_time_s == pytest.approx(serial.compute_s + serial.comm_s)
    assert serial.exposed_comm_s == pytest.approx(serial.comm_s)
    overlapped = estimate(program, spmd, preset("h100x8"), overlap=True)
    assert max(overlapped.compute_s, overlapped.comm_s) <= overlapped.step_time_s * (1 + 1e-9)
    assert overlapped.step_time_s <= serial.step_time_s * (1 + 1e-9)


def test_overlap_hides_a_weight_gather_behind_independent_compute():
    # The byte-minimal plan gathers o and wo for y (the time-minimal one all-reduces y instead).
    # wo's all-gather needs nothing computed, so it runs while q, k, v, s... are computed.
    program = api.load("examples/attention/tensor_parallel.ein")
    spmd = api.compile_spmd(program, objective="bytes")
    assert [(step.kind, step.tensor) for step in spmd.steps if isinstance(step, CollectiveStep)] == \
        [("all_gather", "o"), ("all_gather", "wo")]
    serial = estimate(program, spmd, preset("h100x8"))
    overlapped = estimate(program, spmd, preset("h100x8"), overlap=True)
    gather_wo = next(op for op in overlapped.ops if op.what.startswith("all_gather[tp](wo"))
    assert gather_wo.starts == [0.0]
    assert overlapped.exposed_comm_s < serial.exposed_comm_s


def test_repeat_body_is_priced_once_and_run_per_trip():
    program = api.load("examples/transformer/block.ein")
    one = estimate(api.load("examples/transformer/block.ein", {"L": 1}),
                   api.compile_spmd(api.load("examples/transformer/block.ein", {"L": 1})),
                   preset("h100x8"))
    two = estimate(program, api.compile_spmd(program), preset("h100x8"))
    assert all(op.trips == 2 and len(op.starts) == 2 for op in two.ops)
    assert two.compute_s == pytest.approx(2 * one.compute_s)
    assert two.bytes_per_device == 2 * one.bytes_per_device


def test_trace_has_both_tracks_and_every_run_of_every_step():
    program = api.load("examples/transformer/block.ein")
    result = estimate(program, api.compile_spmd(program), preset("h100x8"), overlap=True)
    document = json.loads(json.dumps(trace_events(result)))
    events = document["traceEvents"]
    threads = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    assert set(threads) == {"compute", "communication"}
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == sum(op.trips for op in result.ops)
    assert {e["tid"] for e in complete} == set(threads.values())
    for event in complete:
        assert {"name", "ts", "dur", "pid", "tid"} <= set(event) and event["dur"] >= 0
    end = max(e["ts"] + e["dur"] for e in complete)
    assert end == pytest.approx(result.step_time_s * 1e6)


# ---- the command line


def test_cost_json_has_the_documented_keys(capsys):
    assert main(["cost", "examples/attention/tensor_parallel.ein", "--cluster", "h100x8",
                 "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    for key in ("step_time_s", "compute_s", "comm_s", "exposed_comm_s", "flops_per_device",
                "bytes_per_device", "peak_memory_bytes", "per_op"):
        assert key in document
    # Megatron's all-reduce of y over tp=4: 2 * 3/4 of its local [4,128,256] f32 (ring).
    assert document["bytes_per_device"] == 2 * 3 * (4 * 128 * 256 * 4) // 4 == 786432
    assert main(["compile", "examples/attention/tensor_parallel.ein", "--json"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert document["bytes_per_device"] == compiled["totals"]["bytes_per_device"]
    kinds = [row["op"].split("[")[0] for row in document["per_op"] if row["stream"] == "comm"]
    assert kinds == [c["kind"] for c in compiled["collectives"]] == ["all_reduce"]


def test_cost_table_and_trace_file(tmp_path, capsys):
    trace = tmp_path / "t.json"
    assert main(["cost", "examples/moe/gshard.ein", "--cluster", "tpu-v5p:2x2x2", "--overlap",
                 "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "all_to_all[ep](xe, G -> E)" in out and "step time" in out and "fits" in out
    assert json.loads(trace.read_text())["traceEvents"]
    assert main(["cost", "examples/moe/gshard.ein", "--cluster", "h100x8", "--trace", str(trace)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["cost", "examples/moe/gshard.ein", "--cluster", "h100x8", "--trace", str(trace),
                 "--force"]) == 0
    out = capsys.readouterr().out
    assert "on h100x8" in json.loads(trace.read_text())["traceEvents"][0]["args"]["name"]
    assert "note: the mesh uses 4 of the cluster's 8 devices" in out


def test_mesh_bigger_than_the_cluster(capsys):
    assert main(["cost", "examples/attention/tensor_parallel.ein", "--cluster", "h100x8",
                 "--set", "dp=4"]) == 1
    err = capsys.readouterr().err
    assert "error[E411]: the mesh dp=4 tp=4 needs 16 devices; cluster h100x8 has 8" in err
    assert "hint: pick a bigger cluster" in err


def test_unknown_preset(capsys):
    assert main(["cost", "examples/attention/tensor_parallel.ein", "--cluster", "h100x9"]) == 1
    err = capsys.readouterr().err
    assert "error[E410]:" in err and "h100x9" in err


def test_bad_cluster_file_points_at_the_field(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('name = "mine"\naccelerator = "h100"\n\n[topology]\nkind = "switched"\n'
                    'gpus_per_node = 0\n')
    assert main(["cost", "examples/attention/tensor_parallel.ein", "--cluster", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error[E410]: bad cluster file: topology.gpus_per_node must be a positive whole number" in err
    assert f"{path}:6:1" in err and "gpus_per_node = 0" in err and "^" in err


def test_unreadable_cluster_files(tmp_path, capsys):
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe")
    for name, message in (("bad.json", "is not UTF-8 text (invalid start byte at byte 0)"),
                          ("none.toml", "cannot read cluster file")):
        assert main(["cost", "examples/moe/gshard.ein", "--cluster", str(tmp_path / name)]) == 1
        assert message in capsys.readouterr().err


def test_cluster_file_toml_syntax_error_has_its_position(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "mine"\naccelerator = \n')
    with pytest.raises(EinparError) as error:
        load_cluster(str(path))
    diagnostic = error.value.diagnostics[0]
    assert diagnostic.code == "E410" and diagnostic.span.line == 2


def test_cluster_file_describes_a_torus_and_a_mapping(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "name": "ring8", "accelerator": {"base": "tpu-v5e", "hbm_capacity": 1e9},
        "topology": {"kind": "torus", "dims": [8], "wrap": [True]},
        "device_order": [0, 2, 4, 6, 1, 3, 5, 7]}))
    cluster = load_cluster(str(path))
    assert cluster.chip.hbm_capacity.value == 1e9 and cluster.num_devices == 8
    # Mesh devices 0..3 land on chips 0,2,4,6: a group strided by 2, sharing links with 1,3,5,7.
    cost = collective_time("all_gather", ("b",), MB, mesh(a=2, b=4), cluster)
    assert cost.sharing == 2
    row_major = collective_time("all_gather", ("b",), MB, mesh(a=2, b=4),
                                Cluster("r", TPU_V5E, Torus((8,), (True,))))
    assert row_major.sharing == 1
    assert cost.latency_s == pytest.approx(4 * A_ICI) and row_major.latency_s == pytest.approx(3 * A_ICI)


def test_cpu_devices_sharing_cores_compute_faster_when_fewer_are_busy():
    # Rates measured with 8 devices busy on 2 cores: a mesh of 4 gets twice each device's share.
    text = json.dumps({
        "accelerator": {"name": "host", "family": "cpu", "peak_flops": {"f32": 1e10},
                        "hbm_bandwidth": 1e10, "hbm_capacity": 1e9, "scale_up_bandwidth": 1e9},
        "topology": {"kind": "switched", "gpus_per_node": 8}, "efficiency": {"matrix": 1.0},
        "shared_cores": 2})
    shared = parse_cluster(text, "host.json")
    alone = parse_cluster(text.replace('"shared_cores": 2', '"step_overhead_s": 0'), "host.json")
    program = api.load("examples/matmul/case2_one_contracting_split.ein")  # 4 devices
    spmd = api.compile_spmd(program)
    assert estimate(program, spmd, shared).compute_s == pytest.approx(
        estimate(program, spmd, alone).compute_s / 2)


def test_user_graph_cluster_prices_by_routing(tmp_path):
    text = json.dumps({
        "accelerator": "h100",
        "topology": {"kind": "links", "devices": ["a", "b", "c", "d"], "switches": ["s"],
                     "links": [{"a": d, "b": "s", "bandwidth": 1e10, "latency": 1e-6}
                               for d in "abcd"]}})
    cluster = parse_cluster(text, "g.json")
    cost = collective_time("all_gather", ("x",), MB, mesh(x=4), cluster)
    assert cost.algorithm == "routed"
    assert cost.bandwidth_s == pytest.approx(3 * MB / 1e10)  # each device's one link carries 3 chunks
    assert cost.latency_s == pytest.approx(3 * 2e-6)


def test_presets_build_graphs_with_the_figures():
    graph = preset("h100x8:2").graph
    assert sum(1 for _, kind in graph.nodes(data="kind") if kind == "device") == 16
    assert graph.edges["gpu0", "nvswitch0"]["bandwidth"] == H100.scale_up_bandwidth.value
    assert graph.edges["gpu0", "leaf0.0"]["bandwidth"] == H100.scale_out_bandwidth.value
    torus_graph = preset("tpu-v5p:4x4x4").graph
    assert all(degree == 6 for _, degree in torus_graph.degree())
    assert math.isclose(torus_graph.edges["tpu0", "tpu1"]["bandwidth"], 90e9)


# ---- any program


@settings(max_examples=25, deadline=None)
@given(programs(max_statements=6, layouts=True, repeat=True, dtypes=("f32", "bf16")),
       st.sampled_from(["h100x8:2", "tpu-v5e:4x4", "tpu-v4:4x4x4"]), st.booleans())
def test_any_program_prices_consistently(generated, cluster_name, overlap):
    program = api.compile_source(generated.text)
    spmd = api.compile_spmd(program)
    cluster = preset(cluster_name)
    assume(spmd.mesh.num_devices <= cluster.num_devices)
    result = estimate(program, spmd, cluster, overlap=overlap)
    assert result.bytes_per_device == bytes_per_device(spmd.steps)
    assert result.flops_per_device == local_flops(spmd)
    assert result.peak_memory_bytes >= result.input_bytes
    assert result.step_time_s >= max(result.compute_s, result.comm_s) * (1 - 1e-9)
    if not overlap:
        assert result.step_time_s == pytest.approx(result.compute_s + result.comm_s)
    assert all(len(op.starts) == op.trips for op in result.ops)


def test_calibrate_writes_a_cluster_file_the_cost_model_reads(tmp_path, capsys):
    out = tmp_path / "local.json"
    assert main(["calibrate", "--quick", "--out", str(out)]) == 0
    assert f"wrote {out}: 8 CPU devices" in capsys.readouterr().out
    cluster = load_cluster(str(out))
    chip = cluster.chip
    assert chip.family == "cpu" and cluster.num_devices == 8 and cluster.shared_cores >= 1
    assert chip.peak("f32").value > 0 and chip.hbm_bandwidth.value > 0
    assert chip.scale_up_bandwidth.value > 0 and chip.scale_up_latency.value >= 0
    assert cluster.step_overhead_s > 0
    assert all(0 < f <= 1 for table in (cluster.efficiency.matrix, cluster.efficiency.memory)
               for _, f in table)
    assert main(["cost", "examples/attention/tensor_parallel.ein", "--cluster", str(out)]) == 0
    assert "overhead" in capsys.readouterr().out
    assert main(["calibrate", "--quick", "--out", str(out)]) == 2  # never over the user's file


# ---- malformed cluster files: every mistake is E410 at its position, never an internal error

LINKS_JSON = """{
  "accelerator": "h100",
  "topology": {
    "kind": "links",
    "devices": ["a", "b"],
    "switches": ["s"],
    "links": [
      {"a": "a", "b": "s", "bandwidth": 1e10, "latency": 1e-6},
      {"a": "b", "b": "s", "bandwidth": 1e10, "latency": 1e-6}
    ]
  },
  "step_overhead_s": 0
}
"""
SWITCHED_TOML = """accelerator = { base = "h100", scale_up_latency = 1e-5 }
step_overhead_s = 0

[topology]
kind = "switched"
gpus_per_node = 8
"""
LINKS_TOML = """accelerator = "h100"

[topology]
kind = "links"
devices = ["a", "b"]

[[topology.links]]
a = "a"
b = "b"
bandwidth = 1e10
"""

# (name, file, text, message fragment, line, column)
MALFORMED_CLUSTERS = [
    ("links-a-number", "c.json", re.sub(r'"links": \[.*?\]', '"links": 5', LINKS_JSON, flags=re.S),
     "topology.links must be a list of at most 65,536 links, not 5", 7, 5),
    ("switches-a-number", "c.json", LINKS_JSON.replace('["s"]', "5"),
     "topology.switches must be a list of at most 512 names, not 5", 6, 5),
    ("switches-nested", "c.json", LINKS_JSON.replace('["s"]', "[[1]]"),
     "topology.switches[0] must be a non-empty string, not a list", 6, 18),
    ("link-end-a-list", "c.json", LINKS_JSON.replace('"b": "s", "bandwidth": 1e10, "latency": 1e-6}\n',
                                                      '"b": ["s"], "bandwidth": 1e10, "latency": 1e-6}\n', 1),
     "topology.links[1].b must name a device or switch, not a list", 9, 18),
    ("link-end-unknown", "c.json", LINKS_JSON.replace('{"a": "b"', '{"a": "q"'),
     "topology.links[1].a must name a device or switch, not 'q'", 9, 8),
    ("link-to-itself", "c.json", LINKS_JSON.replace('{"a": "b", "b": "s"', '{"a": "b", "b": "b"'),
     "topology.links[1] joins 'b' to itself", 9, 7),
    ("link-twice", "c.json", LINKS_JSON.replace('{"a": "b", "b": "s"', '{"a": "s", "b": "a"'),
     "topology.links[1] joins 's' and 'a' again (first at topology.links[0])", 9, 7),
    ("link-without-bandwidth", "c.json", LINKS_JSON.replace(', "bandwidth": 1e10, "latency": 1e-6}\n    ]',
                                                             "}\n    ]"),
     "topology.links[1] needs bandwidth", 9, 7),
    ("nan-latency", "c.json", LINKS_JSON.replace('"latency": 1e-6}\n    ]', '"latency": NaN}\n    ]'),
     "topology.links[1].latency must be a time in seconds from 0 to 3600, not nan", 9, 47),
    ("negative-latency", "c.json", LINKS_JSON.replace('"latency": 1e-6}\n    ]', '"latency": -1}\n    ]'),
     "topology.links[1].latency must be a time in seconds from 0 to 3600, not -1", 9, 47),
    ("infinite-bandwidth", "c.json", LINKS_JSON.replace("1e10", "Infinity", 1),
     "topology.links[0].bandwidth must be a rate in bytes/s from 0.001 to 1e+24, not inf", 8, 28),
    ("zero-bandwidth", "c.json", LINKS_JSON.replace("1e10", "0", 1),
     "topology.links[0].bandwidth must be a rate in bytes/s from 0.001 to 1e+24, not 0", 8, 28),
    ("nan-overhead", "c.json", LINKS_JSON.replace('"step_overhead_s": 0', '"step_overhead_s": NaN'),
     "step_overhead_s must be a number from 0 to 3600, not nan", 12, 3),
    ("negative-overhead", "c.toml", SWITCHED_TOML.replace("step_overhead_s = 0", "step_overhead_s = -1"),
     "step_overhead_s must be a number from 0 to 3600, not -1", 2, 1),
    ("nan-overhead-toml", "c.toml", SWITCHED_TOML.replace("step_overhead_s = 0", "step_overhead_s = nan"),
     "step_overhead_s must be a number from 0 to 3600, not nan", 2, 1),
    ("negative-chip-latency", "c.toml", SWITCHED_TOML.replace("1e-5", "-1e-5"),
     "accelerator.scale_up_latency must be a time in seconds from 0 to 3600, not -1e-05", 1, 32),
    ("infinite-hbm", "c.toml", SWITCHED_TOML.replace("scale_up_latency = 1e-5", "hbm_bandwidth = inf"),
     "accelerator.hbm_bandwidth must be a rate in bytes/s from 0.001 to 1e+24, not inf", 1, 32),
    ("efficiency-above-one", "c.toml", SWITCHED_TOML.replace("scale_up_latency = 1e-5",
                                                             "scale_up_efficiency = 2"),
     "accelerator.scale_up_efficiency must be a fraction of line rate above 0 and at most 1, not 2",
     1, 32),
    ("duplicate-devices", "c.json", LINKS_JSON.replace('["a", "b"]', '["a", "a"]'),
     "topology.devices[1]: 'a' is named twice (first at topology.devices[0])", 5, 22),
    ("device-also-a-switch", "c.json", LINKS_JSON.replace('["s"]', '["a"]'),
     "topology.switches[0]: 'a' is named twice (first at topology.devices[0])", 6, 18),
    ("huge-node-count", "c.toml", SWITCHED_TOML + "nodes = 100000000000000000000000\n",
     "topology.nodes must be a positive whole number (at most 1,048,576), not a number of 24 digits",
     7, 1),
    ("too-many-devices", "c.toml", SWITCHED_TOML + "nodes = 1000000\n",
     "8 GPUs per node times 1,000,000 nodes is more than 1,048,576 devices", 7, 1),
    ("huge-torus", "c.json", '{"accelerator": "tpu-v5e", "topology": {"kind": "torus", "dims": [4096, 4096]}}',
     "topology.dims make more than 1,048,576 devices", 1, 58),
    ("deep-json", "c.json", '{"name": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "values nested more than 16 deep", 1, 25),
    ("deep-toml", "c.toml", "name = " + "[" * 100_000 + "]" * 100_000 + "\n",
     "values nested more than 16 deep", 1, 24),
    ("deep-inline-tables", "c.toml", "name = " + "{a = " * 5_000 + "1" + "}" * 5_000 + "\n",
     "values nested more than 16 deep", 1, 88),
    ("duplicate-key", "c.json", LINKS_JSON.replace('"step_overhead_s": 0', '"accelerator": "a100"'),
     "key 'accelerator' is given twice in one table", 12, 3),
    ("long-number", "c.json", LINKS_JSON.replace('"step_overhead_s": 0', '"step_overhead_s": ' + "9" * 5000),
     "a number of 5,000 digits", 12, 22),
    ("unknown-field", "c.json", LINKS_JSON.replace('"step_overhead_s"', '"step_overhead"'),
     "unknown field step_overhead", 12, 3),
    ("unknown-link-field", "c.toml", LINKS_TOML + "speed = 5\n",
     "unknown field topology.links[0].speed", 11, 1),
    ("second-link-bad-toml", "c.toml", LINKS_TOML + '[[topology.links]]\na = "b"\nb = 5\nbandwidth = 1\n',
     "topology.links[1].b must name a device or switch, not 5", 13, 1),
    ("inline-link-end-a-list", "c.toml", 'accelerator = "h100"\n[topology]\nkind = "links"\n'
     'devices = ["a", "b"]\nlinks = [{a = "a", b = "b", bandwidth = 1e9}, {a = "a", b = ["b"], bandwidth = 1}]\n',
     "topology.links[1].b must name a device or switch, not a list", 5, 57),
    ("topology-a-string", "c.json", '{"accelerator": "h100", "topology": "switched"}',
     "the file needs a `topology` table whose kind is switched, torus or links", 1, 25),
    ("unknown-kind", "c.json", '{"accelerator": "h100", "topology": {"kind": "ring"}}',
     "the file needs a `topology` table whose kind is switched, torus or links, not 'ring'", 1, 38),
    ("accelerator-a-number", "c.json", '{"accelerator": 5, "topology": {"kind": "switched"}}',
     "accelerator must be a preset name or a table, not 5", 1, 2),
    ("unknown-base", "c.toml", SWITCHED_TOML.replace('base = "h100"', 'base = "h101"'),
     "no accelerator preset 'h101'", 1, 17),
    ("peak-flops-a-list", "c.toml", SWITCHED_TOML.replace("scale_up_latency = 1e-5", "peak_flops = [1]"),
     "accelerator.peak_flops must be a table of dtype = FLOP/s, not a list", 1, 32),
    ("peak-flops-nan", "c.toml", SWITCHED_TOML.replace("scale_up_latency = 1e-5", "peak_flops = {f32 = nan}"),
     "accelerator.peak_flops.f32 must be a rate in FLOP/s from 0.001 to 1e+24, not nan", 1, 46),
    ("family-unknown", "c.toml", SWITCHED_TOML.replace("scale_up_latency = 1e-5", 'family = "fpga"'),
     "accelerator.family must be one of gpu, tpu, cpu, not 'fpga'", 1, 32),
    ("efficiency-steps-wrong", "c.toml", SWITCHED_TOML + "\n[efficiency]\nmatrix = [[1, 2, 3]]\n",
     "efficiency.matrix must be a fraction or a list of 1 to 64 [size at least, fraction] steps", 9, 1),
    ("efficiency-fraction-nan", "c.toml", SWITCHED_TOML + "\n[efficiency]\nvector = nan\n",
     "efficiency.vector[0] must be a fraction above 0 and at most 1, not nan", 9, 1),
    ("shared-cores-fraction", "c.toml", SWITCHED_TOML.replace("step_overhead_s = 0", "shared_cores = 2.5"),
     "shared_cores must be a positive whole number (at most 1,048,576), not 2.5", 2, 1),
    ("device-order-strings", "c.toml", 'device_order = ["a"]\n' + SWITCHED_TOML,
     "device_order must list distinct cluster devices 0..N-1, one per mesh device", 1, 1),
    ("name-a-number", "c.toml", "name = 5\n" + SWITCHED_TOML,
     "name must be a non-empty string, not 5", 1, 1),
    ("not-a-table", "c.json", "[1, 2]", "the file must hold one table (a JSON object)", 1, 1),
]


@pytest.mark.parametrize("file, text, message, line, col",
                         [case[1:] for case in MALFORMED_CLUSTERS],
                         ids=[case[0] for case in MALFORMED_CLUSTERS])
def test_malformed_cluster_file_is_E410_at_its_position(tmp_path, capsys, file, text, message, line, col):
    path = tmp_path / file
    path.write_text(text)
    with pytest.raises(EinparError) as caught:
        load_cluster(str(path))
    (found,) = caught.value.diagnostics
    assert found.code == "E410" and message in found.message
    assert (found.span.line, found.span.col) == (line, col)
    assert main(["cost", "examples/matmul/case1_no_contracting_split.ein", "--cluster", str(path),
                 "--json"]) == 1
    assert '"code": "E410"' in capsys.readouterr().out


def test_valid_cluster_files_of_the_table_load(tmp_path):
    for name, text, devices in (("c.json", LINKS_JSON, 2), ("c.toml", SWITCHED_TOML, 8),
                                ("l.toml", LINKS_TOML, 2)):
        (tmp_path / name).write_text(text)
        assert load_cluster(str(tmp_path / name)).num_devices == devices


def test_huge_presets_are_E410():
    for name in ("h100x8:1000000", "h100x8:" + "9" * 30):
        with pytest.raises(EinparError) as caught:
            load_cluster(name)
        assert caught.value.diagnostics[0].code == "E410"


def _json_values(depth: int = 3):
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-2, 2**70), st.sampled_from([-1, 0, 1, 2, 8, 2**64]),
        st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), -1.0, 1e300]),
        st.text(max_size=5), st.sampled_from(["a", "s", "h100", "links", "torus", "switched"]))
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=3), inner,
                                                                        max_size=3)),
                        max_leaves=8)


def _paths(value, path=()):
    """Every path into a JSON value."""
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, path + (index,))


def _replaced(document, path, value):
    if not path:
        return value
    copy = json.loads(json.dumps(document))
    target = copy
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return copy


VALID_CLUSTERS = [json.loads(LINKS_JSON),
                  {"name": "t", "accelerator": {"base": "tpu-v5e", "hbm_capacity": 1e9},
                   "topology": {"kind": "torus", "dims": [4, 2], "wrap": [True, False]},
                   "device_order": [0, 1, 2, 3], "efficiency": {"matrix": [[0, 0.5], [1e9, 0.9]]},
                   "shared_cores": 2, "step_overhead_s": 1e-5}]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(VALID_CLUSTERS), st.data(), st.lists(_json_values(), min_size=1, max_size=3))
def test_mutated_cluster_files_are_priced_or_refused_never_nan(tmp_path_factory, document, data, values):
    for value in values:
        path = data.draw(st.sampled_from(list(_paths(document))))
        document = _replaced(document, path, value)
    path = tmp_path_factory.mktemp("cluster") / "c.json"
    path.write_text(json.dumps(document))  # NaN and Infinity as Python's json writes them
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["cost", "examples/matmul/case1_no_contracting_split.ein", "--cluster",
                     str(path), "--json"])
    assert code in (0, 1)

    def no_constant(name):  # a bare NaN or Infinity token: a number that is not one
        raise AssertionError(f"{name} in the output")
    json.loads(out.getvalue(), parse_constant=no_constant)  # a name in a message may say "NaN"


# ---- a repeat is priced in time independent of its trip count

NESTED_REPEATS = """mesh dp=2 tp=4
dim B=8 D=64 F=256 L=3 M=2
input x[B@dp, D]
repeat L {
  param w[D, F@tp]
  param u[F@tp, D]
  repeat M {
    x[B,D] = x[B,D] + gelu(x[B,D] * w[D,F]) * u[F,D]
  }
  x[B@dp,D] = x[B,D] * 2
}
y[B@dp,D] = x[B,D] * 3
output y
"""


def _priced(text_or_file, overrides, cluster="h100x8", overlap=False):
    if text_or_file.endswith(".ein"):
        program = api.load(text_or_file, overrides)
    else:
        program = api.compile_source(text_or_file, "nested.ein", overrides)
    return estimate(program, api.compile_spmd(program), preset(cluster), overlap=overlap)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("source, counts", [
    ("examples/transformer/block.ein", {"L": 3}), ("examples/transformer/block.ein", {"L": 7}),
    (NESTED_REPEATS, {"L": 3, "M": 2}), (NESTED_REPEATS, {"L": 6, "M": 5})])
def test_a_repeat_laid_out_for_a_few_trips_prices_as_every_trip_laid_out(monkeypatch, source, counts,
                                                                          overlap):
    every_trip = _priced(source, counts, overlap=overlap)
    assert every_trip.notes == [] and all(len(op.starts) == op.trips for op in every_trip.ops)
    runs = sum(len(op.starts) for op in every_trip.ops)
    monkeypatch.setattr("einpar.cost_model.estimate.MAX_RUNS", runs - 1)
    monkeypatch.setattr("einpar.cost_model.estimate.LAID_OUT_TRIPS", 2)
    few_trips = _priced(source, counts, overlap=overlap)
    assert few_trips.step_time_s == pytest.approx(every_trip.step_time_s, rel=1e-12)
    assert few_trips.exposed_comm_s == pytest.approx(every_trip.exposed_comm_s, rel=1e-9, abs=1e-18)
    assert (few_trips.compute_s, few_trips.flops_per_device) == pytest.approx(
        (every_trip.compute_s, every_trip.flops_per_device))
    assert any(note.startswith("repeat L=") for note in few_trips.notes)
    if source == NESTED_REPEATS and not overlap:
        # The step after the repeats starts where it would with every trip laid out.
        assert few_trips.ops[-1].name == every_trip.ops[-1].name == "y"
        assert few_trips.ops[-1].starts == pytest.approx(every_trip.ops[-1].starts, rel=1e-9)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_billion_trips_are_priced_from_four_laid_out_and_scale_linearly(overlap):
    """The work does not grow with the count: 4 trips are laid out, whatever it is."""
    three = _priced("examples/transformer/block.ein", {"L": 3}, overlap=overlap)
    billion = _priced("examples/transformer/block.ein", {"L": 10**9}, overlap=overlap)
    two_billion = _priced("examples/transformer/block.ein", {"L": 2 * 10**9}, overlap=overlap)
    assert billion.step_time_s == pytest.approx(three.step_time_s * 10**9 / 3, rel=1e-9)
    assert two_billion.step_time_s == pytest.approx(2 * billion.step_time_s, rel=1e-12)
    assert billion.flops_per_device == three.flops_per_device * 10**9 // 3
    # The table shows the body once, with its count; the timeline lays out a few trips.
    assert {op.trips for op in billion.ops} == {10**9}
    assert all(len(op.starts) == 4 for op in billion.ops)
    assert billion.notes[0] == ("repeat L=1,000,000,000 is laid out for 4 trips; the other trips "
                                "each take what the last one laid out added")


def test_nested_repeats_of_many_trips_scale_with_both_counts():
    base = _priced(NESTED_REPEATS, {"L": 10, "M": 10}, overlap=True)
    big = _priced(NESTED_REPEATS, {"L": 10**6, "M": 10**3}, overlap=True)
    per_inner = _priced(NESTED_REPEATS, {"L": 10, "M": 11}, overlap=True).step_time_s - base.step_time_s
    per_outer = _priced(NESTED_REPEATS, {"L": 11, "M": 10}, overlap=True).step_time_s - base.step_time_s
    # Linear in each count: 10^6 outer trips of (the outer trip's own steps + 10^3 inner trips).
    expected = base.step_time_s + (10**6 - 10) * per_outer + (10**6 * 10**3 - 10 * 10 - (10**6 - 10) * 10) \
        * per_inner / 10
    assert big.step_time_s == pytest.approx(expected, rel=1e-6)


def test_trace_of_a_million_trips_shows_a_few_and_says_so(tmp_path, capsys):
    trace = tmp_path / "t.json"
    assert main(["cost", "examples/transformer/block.ein", "--cluster", "h100x8", "--set",
                 "L=1000000", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "note: repeat L=1,000,000 is laid out for 4 trips" in out
    events = json.loads(trace.read_text())
    runs = [event for event in events["traceEvents"] if event["ph"] == "X"]
    assert len(runs) == 4 * len({event["name"] for event in runs})
    assert "a long repeat shows its first trips only" in events["traceEvents"][0]["args"]["name"]
    assert events["otherData"]["notes"][0].startswith("repeat L=1,000,000 is laid out for 4 trips")


def test_explain_of_a_billion_trips(capsys):
    import time

    began = time.perf_counter()
    assert main(["explain", "examples/transformer/block.ein", "--set", "L=1000000000",
                 "--cluster", "h100x8"]) == 0
    assert time.perf_counter() - began < 10
    assert "(runs 1000000000 times)" in capsys.readouterr().out


# ---- calibrate's progress and Ctrl-C

def test_calibrate_logs_one_line_per_measurement_off_a_terminal(tmp_path, monkeypatch, capsys):
    """Off a terminal (a log, CI) there is no bar: each measurement is a line on stderr."""
    from einpar.cost_model import calibrate as calibration

    def measured(devices, quick, progress):
        progress("step overhead")
        progress("matmul 8x8")
        raise KeyboardInterrupt  # stops before anything is written

    monkeypatch.setattr(calibration, "calibrate", measured)
    assert main(["calibrate", "--quick", "--out", str(tmp_path / "local.json")]) == 130
    assert capsys.readouterr().err.splitlines()[:2] == ["step overhead", "matmul 8x8"]


def test_calibrate_stops_cleanly_on_ctrl_c(tmp_path, monkeypatch, capsys):
    from einpar.cost_model import calibrate as calibration

    def interrupted(devices, quick, progress):
        progress("step overhead")
        progress("matmul 8x8")
        raise KeyboardInterrupt

    monkeypatch.setattr(calibration, "calibrate", interrupted)
    out = tmp_path / "local.json"
    assert main(["calibrate", "--quick", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"calibrate: interrupted after 1 of {calibration.measurement_count(True)} measurements; " \
           "nothing written" in err
    assert "Traceback" not in err and not out.exists()
