"""The reshard algebra: any planned reshard moves the value, and moves the bytes it declares."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einpar.backends.numpy_sim import Traffic, assemble, group_of, run_step, scatter
from einpar.layout import Layout, Mesh
from einpar.reshard import (AllGather, AllReduce, AllToAll, Permute, ReduceScatter, Slice,
                            plan_reshard)


@st.composite
def layouts(draw, mesh: Mesh, shape: tuple[int, ...], allow_partial: bool):
    """A random valid layout: each axis splits at most one dimension it divides, or is partial."""
    dims = [[] for _ in shape]
    partial = []
    kind = draw(st.sampled_from(["sum", "max"]))
    for axis in draw(st.permutations(mesh.names)):
        choice = draw(st.integers(-2 if allow_partial else -1, len(shape) - 1))
        if choice == -2:
            partial.append((axis, kind))
        elif choice >= 0:
            factor = mesh.size(axis)
            for other in dims[choice]:
                factor *= mesh.size(other)
            if shape[choice] % factor == 0:
                dims[choice].append(axis)
    return Layout(tuple(tuple(d) for d in dims), tuple(partial))


@st.composite
def cases(draw):
    sizes = draw(st.lists(st.sampled_from([1, 2, 3, 4]), min_size=1, max_size=3))
    mesh = Mesh(tuple((f"a{k}", n) for k, n in enumerate(sizes)))
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 4, 6, 8, 12]), min_size=1, max_size=3)))
    src = draw(layouts(mesh, shape, allow_partial=True))
    dst = draw(layouts(mesh, shape, allow_partial=False))
    if draw(st.booleans()):  # keep some of the pending reductions pending
        dst = Layout(dst.dims, tuple(p for p in src.partial if dst.dim_of(p[0]) is None
                                     and draw(st.booleans())))
    return mesh, shape, src, dst


def distribute(value: np.ndarray, layout: Layout, mesh: Mesh, rng) -> list[np.ndarray]:
    """Local arrays under `layout`; a partial layout gets random summands (or candidates)."""
    whole = layout.without_partial(tuple(a for a, _ in layout.partial))
    blocks = scatter(value, whole, mesh)
    if not layout.partial:
        return blocks
    (op,) = {op for _, op in layout.partial}
    axes = tuple(a for a, _ in layout.partial)
    out = [None] * mesh.num_devices
    # The same summands for every group, so that replicas of a block stay bit-identical.
    group = len(group_of(mesh, 0, axes))
    noise = [scatter(rng.standard_normal(value.shape), whole, mesh) for _ in range(group - 1)]
    for device in range(mesh.num_devices):
        members = group_of(mesh, device, axes)
        if device != members[0]:
            continue
        parts = [n[device] for n in noise]
        if op == "sum":
            first = blocks[device] - sum(parts, np.zeros_like(blocks[device]))
        else:
            first = blocks[device]
            parts = [blocks[device] - np.abs(p) - 0.1 for p in parts]
        for member, part in zip(members, [first] + parts):
            out[member] = part
    return out


@settings(max_examples=300, deadline=None)
@given(cases(), st.integers(0, 2**16))
def test_planned_reshard_moves_the_value_and_the_declared_bytes(case, seed):
    mesh, shape, src, dst = case
    rng = np.random.default_rng(seed)
    value = rng.standard_normal(shape)
    plan = plan_reshard(src, dst, shape, "f64", mesh)
    blocks = distribute(value, src, mesh, rng)
    traffic = Traffic(mesh.num_devices)
    layout = src
    for step in plan.steps:
        blocks = run_step(step, blocks, mesh, traffic)
        layout = step.apply(layout)
        assert [b.shape for b in blocks] == [layout.local_shape(shape, mesh)] * mesh.num_devices
    assert layout == dst
    np.testing.assert_allclose(assemble(blocks, dst, shape, mesh), value, rtol=1e-12, atol=1e-12)
    assert traffic.sent == [plan.bytes_per_device] * mesh.num_devices


MESH = Mesh((("x", 2), ("y", 4)))
SHAPE = (8, 16)


def plan(src, dst, shape=SHAPE, mesh=MESH):
    return plan_reshard(src, dst, shape, "f32", mesh)


def test_partial_to_whole_is_an_all_reduce():
    result = plan(Layout(((), ()), (("y", "sum"),)), Layout(((), ())))
    assert result.steps == (AllReduce(("y",), "sum"),)
    assert result.bytes_per_device == 2 * 3 * (8 * 16 // 4) * 4


def test_partial_to_split_is_a_reduce_scatter():
    result = plan(Layout(((), ()), (("y", "sum"),)), Layout(((), ("y",))))
    assert result.steps == (ReduceScatter("y", 1, "sum"),)
    assert result.bytes_per_device == 3 * (8 * 16 // 4) * 4


def test_partial_over_two_axes_is_one_all_reduce():
    result = plan(Layout(((), ()), (("x", "sum"), ("y", "sum"))), Layout(((), ())))
    assert result.steps == (AllReduce(("x", "y"), "sum"),)


def test_split_to_whole_is_an_all_gather():
    result = plan(Layout((("y",), ())), Layout(((), ())))
    assert result.steps == (AllGather("y", 0),)
    assert result.bytes_per_device == 3 * (2 * 16) * 4


def test_moving_a_split_between_dimensions_is_an_all_to_all():
    result = plan(Layout((("y",), ())), Layout(((), ("y",))))
    assert result.steps == (AllToAll("y", 0, 1),)
    assert result.bytes_per_device == 3 * (2 * 16 // 4) * 4


def test_whole_to_split_is_a_free_slice():
    result = plan(Layout(((), ())), Layout((("x",), ("y",))))
    assert result.steps == (Slice("x", 0), Slice("y", 1))
    assert result.bytes_per_device == 0


def test_swapping_axes_of_equal_size_is_a_permute():
    mesh = Mesh((("x", 4), ("y", 4)))
    result = plan(Layout((("x",), ())), Layout((("y",), ())), mesh=mesh)
    assert result.steps == (Permute("x", "y", 0),)
    assert result.bytes_per_device == 2 * 16 * 4


def test_multi_axis_split_is_undone_minor_axis_first():
    result = plan(Layout((("x", "y"), ())), Layout(((), ())))
    assert result.steps == (AllGather("y", 0), AllGather("x", 0))


def test_identity_costs_nothing():
    layout = Layout((("x",), ("y",)))
    assert plan(layout, layout).steps == ()


def test_a_value_cannot_be_made_partial():
    from einpar.reshard import ReshardError
    with pytest.raises(ReshardError):
        plan(Layout(((), ())), Layout(((), ()), (("x", "sum"),)))
