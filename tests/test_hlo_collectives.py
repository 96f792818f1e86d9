"""Reading collectives out of XLA's optimized HLO, and what XLA runs for einpar's programs."""

from collections import Counter
from pathlib import Path

import pytest

from einpar.api import compile_spmd, load, random_inputs
from einpar.backends.hlo_collectives import bytes_per_device, hlo_collectives
from einpar.spmd import COLLECTIVE_KINDS, CollectiveStep, RepeatStep
from einpar.spmd import bytes_per_device as plan_bytes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("**/*.ein"))

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
