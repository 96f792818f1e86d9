"""Reading collectives out of XLA's optimized HLO, and what XLA runs for einpar's programs."""

from collections import Counter
from pathlib import Path

import pytest

from einpar.api import compile_spmd, load, random_inputs
from einpar.backends.hlo_collectives import bytes_per_device, hlo_collectives
from einpar.spmd import COLLECTIVE_KINDS, CollectiveStep, RepeatStep
from einpar.spmd import bytes_per_device as plan_bytes

ROOT = Path(__file__).resolve().parent.parent
# The forward examples. On a training step XLA's CPU compiler merges what einpar keeps
# apart on purpose (FSDP's second gather of a weight for the backward pass, a remat's
# recomputation) and runs bf16 collectives in float32, so its HLO is not einpar's plan
# step for step; bench/train_vs_jax.py reports both programs' HLO bytes instead.
# A pipeline's JAX module runs the schedule in lockstep ticks, every stage computing a
# forward and a backward chunk each tick (backends/jax_pipeline.py): its HLO is not the
# stage's plan step for step either; tests/test_pipeline.py checks its bytes stage by stage
# against the simulator's and the cost model's.
EXAMPLES = sorted(path for path in (ROOT / "examples").glob("**/*.ein")
                  if path.parent.name not in ("training", "pipeline"))

MODULE = """\
HloModule jit_step, entry_computation_layout={(f32[2,64]{1,0})->f32[8,64]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (param: (s32[], f32[2,64])) -> (s32[], f32[2,64]) {
  %param = (s32[], f32[2,64]{1,0}) parameter(0)
  %x.1 = f32[2,64]{1,0} get-tuple-element(%param), index=1
  %ar = f32[2,64]{1,0} all-reduce(%x.1), channel_id=2, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %i = s32[] get-tuple-element(%param), index=0
  ROOT %t = (s32[], f32[2,64]{1,0}) tuple(%i, %ar)
}

%left (a: f32[2,64]) -> f32[2,64] {
  %a = f32[2,64]{1,0} parameter(0)
  ROOT %gl = f32[2,64]{1,0} all-reduce(%a), channel_id=6, replica_groups={{0,1}}, to_apply=%add
}

%right (b: f32[2,64]) -> f32[2,64] {
  %b = f32[2,64]{1,0} parameter(0)
  ROOT %gr = f32[2,64]{1,0} all-to-all(%b), channel_id=7, replica_groups={{0,1}}
}

%cond (param.1: (s32[], f32[2,64])) -> pred[] {
  %param.1 = (s32[], f32[2,64]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (p: f32[2,64]) -> f32[8,64] {
  %p = f32[2,64]{1,0} parameter(0)
  %ag = f32[8,64]{1,0} all-gather(%p), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %rs = bf16[1,64]{1,0} reduce-scatter(%p), channel_id=3, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}, to_apply=%add
  %a2a = (f32[2,16]{1,0}, f32[2,16]{1,0}) all-to-all(%p, %p), channel_id=4, replica_groups={}
  %cp = f32[2,64]{1,0} collective-permute(%p), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %t.1 = (s32[], f32[2,64]{1,0}) tuple(%p, %p)
  %w = (s32[], f32[2,64]{1,0}) while(%t.1), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %pick = s32[] constant(0)
  %branch = f32[2,64]{1,0} conditional(%pick, %p, %p), branch_computations={%left, %right}
  ROOT %out = f32[8,64]{1,0} copy(%ag)
}
"""


def test_every_kind_of_collective_with_its_group_and_runs():
    found = hlo_collectives(MODULE, devices=8)
    assert [(c.kind, c.arrays, c.group, c.runs) for c in found] == [
        ("all_gather", ((512, 4),), 4, 1),
        ("reduce_scatter", ((64, 2),), 2, 1),
        ("all_to_all", ((32, 4), (32, 4)), 8, 1),  # replica_groups={}: all 8 devices
        ("permute", ((128, 4),), 8, 1),
        ("all_reduce", ((128, 4),), 4, 3),  # iota groups [2,4]: groups of 4; 3 trips
        ("all_reduce", ((128, 4),), 2, 1),  # both branches of the conditional
        ("all_to_all", ((128, 4),), 2, 1),
    ]


def test_bytes_follow_einpars_convention():
    found = hlo_collectives(MODULE, devices=8)
    assert [c.bytes_per_device for c in found] == [
        3 * 128 * 4,  # all-gather: (n-1) blocks of the operand
        1 * 64 * 2,  # reduce-scatter: (n-1) chunks the size of the result
        2 * 7 * 4 * 4,  # all-to-all: (n-1) chunks of ceil(size/n), per array
        128 * 4,  # permute: the block
        3 * 2 * 3 * 32 * 4,  # all-reduce: 2(n-1) chunks, three times
        2 * 1 * 64 * 4,
        1 * 64 * 4]
    assert bytes_per_device(found) == sum(c.bytes_per_device for c in found)


def einpar_collectives(steps, trips=1) -> Counter:
    found = Counter()
    for step in steps:
        if isinstance(step, RepeatStep):
            found += einpar_collectives(step.body, trips * step.count)
        elif isinstance(step, CollectiveStep) and step.kind in COLLECTIVE_KINDS:
            found[step.kind] += trips
    return found


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_xla_runs_exactly_the_collectives_and_bytes_einpar_planned(path):
    from einpar.backends import jax_backend

    program = load(path)
    spmd = compile_spmd(program)
    devices = jax_backend.start_devices(program.mesh.num_devices)
    compiled = jax_backend.compile_program(program, spmd, random_inputs(program), devices)
    found = hlo_collectives(compiled.hlo(), program.mesh.num_devices)
    runs = Counter()
    for collective in found:
        runs[collective.kind] += collective.runs
    assert runs == einpar_collectives(spmd.steps)
    assert bytes_per_device(found) == plan_bytes(spmd.steps)


# ---- replica groups in every form, the mesh axes they span, and their price


def test_replica_groups_in_every_form_xla_prints():
    from einpar.backends.hlo_collectives import replica_groups

    def groups(attributes):
        return replica_groups(attributes, devices=8).tolist()

    assert groups("replica_groups={{0,2},{1,3}}, to_apply=%add") == [[0, 2], [1, 3]]
    assert groups("replica_groups={}, dimensions={0}") == [list(range(8))]
    assert groups("replica_groups=[2,4]<=[8], use_global_device_ids=true") == [
        [0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups("replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}") == [
        [0, 4], [1, 5], [2, 6], [3, 7]]
    # GSPMD's named-mesh form: the devices differing only along the listed axes.
    named = "replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_2'}, to_apply=%add"
    assert groups(named) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert groups("replica_groups=mesh['a'=2,'b'=4] {'a'}") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # A sub-axis 'b':(2)2: the factor of 2 after b's first 2 (b's minor half here).
    assert groups("replica_groups=mesh['a'=2,'b'=4] {'b':(2)2}") == [
        [0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups("source_target_pairs={{0,1},{1,0}}") == [[0, 1], [1, 0]]
    assert replica_groups("dimensions={0}", devices=8) is None


def test_the_named_mesh_form_gives_the_group_size():
    """GSPMD writes groups as `mesh[...] {axes}`: a group of 4, not all 8 devices."""
    line = ("  %ar = f32[2,4,64]{2,1,0} all-reduce(%p), channel_id=2, replica_groups="
            "mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, use_global_device_ids=true, to_apply=%add")
    module = MODULE.replace("  ROOT %out", line + "\n  ROOT %out")
    found = [c for c in hlo_collectives(module, devices=8)
             if c.kind == "all_reduce" and c.arrays == ((512, 4),)]
    assert [(c.kind, c.group, c.groups) for c in found] == [
        ("all_reduce", 4, ((0, 1, 2, 3), (4, 5, 6, 7)))]
    assert found[0].bytes_per_device == 2 * 3 * 128 * 4  # 2(n-1) chunks of 512/4 elements


def test_groups_map_to_the_mesh_axes_they_span():
    import numpy as np

    from einpar.backends.hlo_collectives import group_axes, mesh_axes_text, refined_mesh
    from einpar.layout import Mesh

    mesh = Mesh((("dp", 2), ("tp", 4)))
    assert refined_mesh(mesh).axes == (("dp", 2), ("tp.0", 2), ("tp.1", 2))

    def spans(groups, pairs=False):
        axes, exact = group_axes(np.array(groups), mesh, pairs)
        return mesh_axes_text(axes, mesh), exact

    assert spans([[0, 1, 2, 3], [4, 5, 6, 7]]) == ("tp", True)
    assert spans([[0, 4], [1, 5], [2, 6], [3, 7]]) == ("dp", True)
    assert spans([[0, 1], [2, 3], [4, 5], [6, 7]]) == ("tp.1", True)  # half of tp
    assert spans([[0, 2], [1, 3], [4, 6], [5, 7]]) == ("tp.0", True)
    assert spans([list(range(8))]) == ("dp,tp", True)
    # Not the groups of any axes: 0 and 5 differ along dp and tp.1, but a group of those
    # axes has 4 devices. Covered, not exact.
    assert spans([[0, 5], [1, 4], [2, 7], [3, 6]]) == ("dp,tp.1", False)
    assert spans([[0, 1], [1, 0], [4, 5], [5, 4]], pairs=True) == ("tp.1", True)
    assert spans([[0, 9]]) == ("dp,tp", False)  # not this mesh's devices


def test_collectives_are_priced_by_the_cost_model_over_their_axes():
    from einpar.backends.hlo_collectives import price_collectives
    from einpar.cost_model.cluster import load_cluster
    from einpar.cost_model.collectives import collective_time
    from einpar.layout import Mesh

    mesh, cluster = Mesh((("dp", 2), ("tp", 4))), load_cluster("h100x8")
    priced = price_collectives(hlo_collectives(MODULE, devices=8), mesh, cluster)
    expected = [
        ("all_gather", ("tp",), 128 * 4, 1),  # {{0,1,2,3},{4,5,6,7}}: tp; holds 1/4 of 512
        ("reduce_scatter", ("tp.1",), 64 * 2 * 2, 1),  # {{0,1},...}: tp's minor half
        ("all_to_all", ("dp", "tp"), 2 * 32 * 4, 1),  # {}: every device; both arrays
        ("permute", ("tp.1",), 128 * 4, 1),  # 0 <-> 1
        ("all_reduce", ("tp",), 128 * 4, 3),  # [2,4]<=[8], three trips
        ("all_reduce", ("tp.1",), 128 * 4, 1),
        ("all_to_all", ("tp.1",), 128 * 4, 1)]
    fine = Mesh((("dp", 2), ("tp.0", 2), ("tp.1", 2)))
    for cost, (kind, axes, local, runs) in zip(priced, expected, strict=True):
        names = ("tp.0", "tp.1") if axes == ("tp",) else ("dp", "tp.0", "tp.1") \
            if axes == ("dp", "tp") else axes
        assert (cost.collective.kind, cost.axes, cost.exact) == (kind, names, True)
        assert cost.collective.local_bytes == local
        assert cost.time_s == runs * collective_time(kind, names, local, fine, cluster).time_s
    # A group over all of tp costs what einpar prices for a collective over tp.
    assert priced[0].time_s == collective_time("all_gather", ("tp",), 512, mesh, cluster).time_s


DOTS = """\
HloModule jit_step

%fused (p0: f32[8,16], p1: f32[16,4]) -> f32[8,4] {
  %p0 = f32[8,16]{1,0} parameter(0)
  %p1 = f32[16,4]{1,0} parameter(1)
  ROOT %d = f32[8,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (param: (s32[], f32[2,8,16])) -> (s32[], f32[2,8,16]) {
  %param = (s32[], f32[2,8,16]{2,1,0}) parameter(0)
  %x = f32[2,8,16]{2,1,0} get-tuple-element(%param), index=1
  %bd = f32[2,8,8]{2,1,0} dot(%x, %x), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}
  ROOT %t = (s32[], f32[2,8,16]{2,1,0}) tuple(%x, %x)
}

ENTRY %main (a: f32[8,16], b: f32[16,4]) -> f32[8,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  %t.1 = (s32[], f32[2,8,16]{2,1,0}) tuple(%a, %a)
  %w = (s32[], f32[2,8,16]{2,1,0}) while(%t.1), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %f = f32[8,4]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused
}
"""


def test_dot_flops_counted_inside_fusions_and_loops():
    from einpar.backends.hlo_collectives import hlo_dot_flops

    assert hlo_dot_flops(DOTS) == 2 * 8 * 4 * 16 + 5 * 2 * (2 * 8 * 8) * 16


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_pricing_einpars_own_hlo_gives_its_estimates_collective_time(path):
    """What bench/vs_gspmd.py does to GSPMD's HLO, done to einpar's: the same time as the
    estimate of its plan, so the two plans are priced alike."""
    from einpar.backends import jax_backend
    from einpar.backends.hlo_collectives import price_collectives
    from einpar.cost_model.cluster import load_cluster
    from einpar.cost_model.estimate import estimate

    program = load(path)
    spmd = compile_spmd(program)
    cluster = load_cluster("h100x8")
    devices = jax_backend.start_devices(program.mesh.num_devices)
    compiled = jax_backend.compile_program(program, spmd, random_inputs(program), devices)
    priced = price_collectives(hlo_collectives(compiled.hlo(), program.mesh.num_devices),
                               program.mesh, cluster)
    assert all(cost.exact for cost in priced)
    assert sum(cost.time_s for cost in priced) == pytest.approx(
        estimate(program, spmd, cluster).comm_s, rel=1e-9)
