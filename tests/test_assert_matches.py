"""einpar.testing.assert_matches: a user's function against a `.ein` specification.

Right functions pass and wrong ones (a missing all-reduce, a wrong block order, a
swapped axis) fail, in each style, so the assertion cannot pass vacuously; the
per-device collectives agree with jax.lax's; a per-device run that goes wrong
(mismatched calls, an exception, a device that never arrives) ends with an error
naming the devices, never a hang.
"""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import einpar.api as ein
from einpar.layout import Layout, Mesh
from einpar.testing import (Collectives, DeviceRunError, assert_matches, layout_from_spec, layouts,
                            meshes, partition_spec)
from einpar.testing.collectives import run_per_device

MEGATRON = str(Path(__file__).resolve().parent.parent / "examples" / "mlp" / "megatron.ein")

# Megatron's MLP at a size where a swapped axis keeps its shape (B = D).
SMALL_MLP = """\
mesh dp=2 tp=4
dim  B=8 D=8 F=16
dtype f32
input x[B@dp, D]
param w1[D, F@tp]
param w2[F@tp, D]
h[B,F]      = gelu(x[B,D] * w1[D,F])
y[B@dp,D]   = h[B,F] * w2[F,D]
output y
"""

# What a ring all-reduce must compute: every device ends with the sum of all rows.
RING_SUM = """\
mesh r=4
dim  N=4 K=8
dtype f32
input x[N@r, K]
s[K] = sum[N](x[N,K])
output s
"""


def gelu(x):
    """The tanh approximation, as the language defines gelu."""
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


# ---- the right functions pass


def test_a_numpy_megatron_mlp_on_whole_arrays_matches_the_example():
    assert_matches(MEGATRON, lambda x, w1, w2: gelu(x @ w1) @ w2)


def test_a_per_device_megatron_mlp_matches_the_example():
    def mlp(c: Collectives, x, w1, w2):
        assert x.shape == (4, 128, 256) and w1.shape == (256, 256) and w2.shape == (256, 256)
        return c.psum(gelu(x @ w1) @ w2, "tp")

    assert_matches(MEGATRON, mlp, style="per_device")


def test_a_shard_map_megatron_mlp_matches_the_example():
    import jax

    def mlp(x, w1, w2):
        return jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, "tp")

    assert_matches(MEGATRON, mlp, style="jax")


def test_a_jitted_shard_map_on_the_programs_specs_matches_as_a_global_function():
    import jax

    from einpar.testing import shard_map_specs

    specs = shard_map_specs(MEGATRON)
    assert (specs.inputs, specs.outputs) == ({"x": partition_spec(Layout((("dp",), (), ()))),
                                              "w1": partition_spec(Layout(((), ("tp",)))),
                                              "w2": partition_spec(Layout((("tp",), ())))},
                                             {"y": partition_spec(Layout((("dp",), (), ())))})
    mlp = jax.jit(jax.shard_map(lambda x, w1, w2: jax.lax.psum(jax.nn.gelu(x @ w1) @ w2, "tp"),
                                mesh=specs.mesh, in_specs=(specs.inputs["x"], specs.inputs["w1"],
                                                           specs.inputs["w2"]),
                                out_specs=specs.outputs["y"]))
    assert_matches(MEGATRON, lambda x, w1, w2: mlp(x, w1, w2))


def ring_all_reduce(c: Collectives, x, direction: int = 1, gather: bool = True):
    """The sum of every device's rows, on every device, from n-1 ppermute steps that
    reduce one chunk each and n-1 that pass the reduced chunks around the ring."""
    n, me = c.axis_size("r"), c.axis_index("r")
    chunks = np.split(x.sum(axis=0), n)
    ring = [(i, (i + direction) % n) for i in range(n)]
    for step in range(n - 1):  # reduce-scatter: device i ends with all of chunk i+1
        received = c.ppermute(chunks[(me - step) % n], "r", ring)
        chunks[(me - step - 1) % n] = chunks[(me - step - 1) % n] + received
    for step in range(n - 1 if gather else 0):  # all-gather of the reduced chunks
        chunks[(me - step) % n] = c.ppermute(chunks[(me + 1 - step) % n], "r", ring)
    return np.concatenate(chunks)


def test_a_per_device_ring_all_reduce_from_ppermute_matches_a_sum():
    assert_matches(RING_SUM, ring_all_reduce, style="per_device")


@pytest.mark.parametrize("wrong", [{"direction": -1}, {"gather": False}],
                         ids=["ring turned the other way", "all-gather left out"])
def test_a_wrong_ring_all_reduce_fails(wrong):
    with pytest.raises(AssertionError, match="output 's' differs from the reference"):
        assert_matches(RING_SUM, lambda c, x: ring_all_reduce(c, x, **wrong), style="per_device")


def test_the_program_may_be_a_path_text_or_a_program():
    def mlp(x, w1, w2):
        return gelu(x @ w1) @ w2

    for program in (SMALL_MLP, ein.compile_source(SMALL_MLP)):
        assert_matches(program, mlp)
    assert_matches(Path(MEGATRON), mlp, seed=3)


# ---- wrong functions fail: missing all-reduce, wrong block order, swapped axis


def per_device_mlp(sum_over="tp", mirror_batch=False, reduce=True):
    def mlp(c, x, w1, w2):
        y = gelu(x @ w1) @ w2
        y = c.psum(y, sum_over) if reduce else y
        # the block of the other data-parallel half: blocks in the wrong order
        return c.ppermute(y, "dp", [(0, 1), (1, 0)]) if mirror_batch else y
    return mlp


def jax_mlp(sum_over="tp", mirror_batch=False, reduce=True):
    import jax

    def mlp(x, w1, w2):
        y = jax.nn.gelu(x @ w1) @ w2
        y = jax.lax.psum(y, sum_over) if reduce else y
        return jax.lax.ppermute(y, "dp", [(0, 1), (1, 0)]) if mirror_batch else y
    return mlp


def global_mlp(mistake=None):
    def mlp(x, w1, w2):
        if mistake == "missing all-reduce":  # one tensor-parallel device's partial sum only
            return gelu(x @ w1[:, :4]) @ w2[:4]
        if mistake == "swapped axis":
            return gelu(x.T @ w1) @ w2
        h = gelu(x @ w1)
        if mistake == "wrong block order":  # F's blocks rotated by one device
            h = np.roll(h, 4, axis=1)
        return h @ w2
    return mlp


MISTAKES = {"missing all-reduce": {"reduce": False}, "wrong block order": {"mirror_batch": True},
            "swapped axis": {"sum_over": "dp"}}


@pytest.mark.parametrize("mistake", [None, *MISTAKES])
def test_per_device_mistakes_fail_and_the_right_function_passes(mistake):
    mlp = per_device_mlp(**MISTAKES.get(mistake, {}))
    if mistake is None:
        assert_matches(SMALL_MLP, mlp, style="per_device")
        return
    with pytest.raises(AssertionError, match="output 'y' differs from the reference"):
        assert_matches(SMALL_MLP, mlp, style="per_device")


@pytest.mark.parametrize("mistake", [None, *MISTAKES])
def test_shard_map_mistakes_fail_and_the_right_function_passes(mistake):
    mlp = jax_mlp(**MISTAKES.get(mistake, {}))
    if mistake is None:
        assert_matches(SMALL_MLP, mlp, style="jax")
        return
    with pytest.raises(AssertionError, match="output 'y' differs from the reference"):
        assert_matches(SMALL_MLP, mlp, style="jax", check_vma=False)


def test_shard_map_refuses_a_missing_psum_while_tracing_by_default():
    with pytest.raises(ValueError, match="replicated across mesh axis 'tp'"):
        assert_matches(SMALL_MLP, jax_mlp(reduce=False), style="jax")


@pytest.mark.parametrize("mistake", [None, "missing all-reduce", "wrong block order", "swapped axis"])
def test_global_mistakes_fail_and_the_right_function_passes(mistake):
    if mistake is None:
        assert_matches(SMALL_MLP, global_mlp())
        return
    with pytest.raises(AssertionError, match="output 'y' differs from the reference"):
        assert_matches(SMALL_MLP, global_mlp(mistake))


def test_the_report_names_the_output_the_device_block_the_error_and_the_program():
    inputs = ein.random_inputs(ein.compile_source(SMALL_MLP), 0)
    inputs["w1"][:, 12:] = 0  # only tp=3's part of the sum is zero: its devices' y is wrong
    expected = ein.run_reference(ein.compile_source(SMALL_MLP), inputs)["y"]

    def mlp(c, x, w1, w2):
        y = gelu(x @ w1) @ w2
        return y if c.axis_index("tp") == 3 else c.psum(y, "tp")  # the last tp device skips it

    with pytest.raises(DeviceRunError) as raised:
        assert_matches(SMALL_MLP, mlp, style="per_device", inputs=inputs)
    assert "devices 3, 7: returned" in str(raised.value)
    assert "devices 0, 1, 2, 4, 5, 6: psum(x, 'tp') at test_assert_matches.py:" in str(raised.value)

    def wrong(c, x, w1, w2):  # device 5 (dp=1, tp=1) holds a wrong copy
        y = c.psum(gelu(x @ w1) @ w2, "tp")
        return y + 1 if c.device == 5 else y

    with pytest.raises(AssertionError) as raised:
        assert_matches(SMALL_MLP, wrong, style="per_device", inputs=inputs, rtol=1e-3)
    report = str(raised.value)
    scale = max(1.0, float(np.abs(expected).max()))
    assert report.startswith("assert_matches(style='per_device'): fn does not match the program "
                             "(tolerance 0.001, rtol)\noutput 'y' differs from the reference\n")
    assert f"relative error {1 / scale:.3g} " in report
    assert "in the block y[4:8, 0:8] of device 5 (dp=1, tp=1); y is f32[B=8@dp,D=8]" in report
    assert "blocks over tolerance: 1 of 8 (device 5 (dp=1, tp=1))" in report
    assert report.endswith("\nthe program:\n" + "\n".join("    " + line for line in SMALL_MLP.splitlines()))
    with pytest.raises(AssertionError, match=r"^assert_matches\(style='global'\): fn does not match the "
                                             r"program \(tolerance 0.0001, f32's bound, einpar.tolerance\)"):
        assert_matches(SMALL_MLP, global_mlp("swapped axis"))


def test_a_nan_where_the_reference_has_a_number_fails():
    with pytest.raises(AssertionError, match="got nan"):
        assert_matches(SMALL_MLP, lambda x, w1, w2: np.full((8, 8), np.nan, np.float32))


def test_what_fn_returns_must_be_the_programs_outputs_in_their_shapes():
    with pytest.raises(AssertionError, match=r"returned shape \[8, 4\]; the program's y is "
                                             r"f32\[B=8,D=8\], shape \[8, 8\]"):
        assert_matches(SMALL_MLP, lambda x, w1, w2: np.zeros((8, 4)))
    with pytest.raises(AssertionError, match=r"returned outputs 'z'; the program's outputs are 'y'"):
        assert_matches(SMALL_MLP, lambda x, w1, w2: {"z": x})
    with pytest.raises(AssertionError, match=r"device 0 \(dp=0, tp=0\) returned a block of shape \[8, 8\]; "
                                             r"its block y\[0:4, 0:8\] of y: f32\[B=8@dp,D=8\] has shape \[4, 8\]"):
        assert_matches(SMALL_MLP, lambda c, x, w1, w2: np.zeros((8, 8)), style="per_device")
    with pytest.raises(ValueError, match="style must be one of 'global', 'per_device', 'jax'"):
        assert_matches(SMALL_MLP, global_mlp(), style="sharded")


# ---- the per-device run: errors name the devices and the collective, never hang


def run_on(mesh_axes, fn, timeout=10.0, **arrays):
    mesh = Mesh(tuple(mesh_axes))
    return run_per_device(mesh, fn, [dict(arrays) for _ in range(mesh.num_devices)], timeout)


def test_an_exception_on_one_device_names_it_and_keeps_the_cause():
    def fn(c, x):
        if c.device == 2:
            raise ValueError("bad block")
        return c.psum(x, "a")

    with pytest.raises(DeviceRunError, match=r"^device 2 \(a=0, b=2\) raised ValueError: bad block$") as raised:
        run_on((("a", 2), ("b", 4)), fn, x=np.ones(3))
    assert isinstance(raised.value.__cause__, ValueError)


def test_a_device_that_never_arrives_times_out_with_the_devices_named():
    release = threading.Event()

    def fn(c, x):
        if c.device == 1:
            release.wait(5)  # stuck, as a deadlocked device would be
        return c.psum(x, "a")

    started = time.monotonic()
    with pytest.raises(DeviceRunError, match=r"devices 0, 2, 3 waited 0.3 s at psum\(x, 'a'\) at "
                                             r"test_assert_matches.py:\d+, but device 1 \(a=1\) never got there"):
        run_on((("a", 4),), fn, timeout=0.3, x=np.ones(3))
    with pytest.raises(DeviceRunError, match=r"^devices 0, 2, 3 waited 0.3 s at the end of fn, but device 1 "
                                             r"\(a=1\) never got there"):
        run_on((("a", 4),), lambda c, x: release.wait(5) if c.device == 1 else x, timeout=0.3, x=np.ones(3))
    release.set()
    assert time.monotonic() - started < 6


def test_different_calls_or_shapes_on_the_devices_are_reported():
    with pytest.raises(DeviceRunError, match=r"did not make the same collective call.*\n"
                                             r"  devices 0, 1: all_gather\(x, 'a', dim=0, tiled=True\) at .*\n"
                                             r"  devices 2, 3: all_gather\(x, 'a', dim=1, tiled=True\) at "):
        run_on((("a", 4),), lambda c, x: c.all_gather(x, "a", dim=c.device // 2), x=np.ones((2, 2)))
    with pytest.raises(DeviceRunError, match=r"psum\(x, 'a'\) at .*: the devices passed arrays of different "
                                             r"shapes.*\n  devices 0, 2: float64\[2\]\n  devices 1, 3: float64\[3\]"):
        run_on((("a", 4),), lambda c, x: c.psum(np.ones(2 + c.device % 2), "a"), x=np.ones(1))
    with pytest.raises(DeviceRunError, match=r"raised ValueError: 'tq' is not an axis of the mesh a=4; "
                                             r"the axes are 'a'"):
        run_on((("a", 4),), lambda c, x: c.psum(x, "tq"), x=np.ones(1))


# ---- the collectives mean what jax.lax's mean


COLLECTIVES = {
    "psum": lambda lax, x: lax.psum(x, "b"),
    "psum over both axes": lambda lax, x: lax.psum(x, ("a", "b")),
    "pmax": lambda lax, x: lax.pmax(x, "a"),
    "pmean": lambda lax, x: lax.pmean(x, "b"),
    "all_gather tiled": lambda lax, x: lax.all_gather(x, "b", axis=1, tiled=True),
    "all_gather stacked": lambda lax, x: lax.all_gather(x, ("a", "b"), axis=1),
    "psum_scatter tiled": lambda lax, x: lax.psum_scatter(x, "b", scatter_dimension=1, tiled=True),
    "psum_scatter": lambda lax, x: lax.psum_scatter(x, "b", scatter_dimension=0),
    "all_to_all tiled": lambda lax, x: lax.all_to_all(x, "b", 1, 0, tiled=True),
    "all_to_all": lambda lax, x: lax.all_to_all(x, "b", 0, 1),
    "ppermute ring": lambda lax, x: lax.ppermute(x, "b", [(i, (i + 1) % 4) for i in range(4)]),
    "ppermute partial": lambda lax, x: lax.ppermute(x, ("a", "b"), [(0, 7), (5, 2)]),
    "axis_index": lambda lax, x: x + lax.axis_index(("a", "b")) * 100 + lax.axis_index("b"),
}


class AsJaxLax:
    """jax.lax's spelling of the collectives, on einpar's: the same test drives both."""

    def __init__(self, c: Collectives):
        self.c = c

    def __getattr__(self, name):
        return getattr(self.c, name)

    def all_gather(self, x, axis_name, *, axis=0, tiled=False):
        return self.c.all_gather(x, axis_name, axis, tiled=tiled)

    def psum_scatter(self, x, axis_name, *, scatter_dimension=0, tiled=False):
        return self.c.psum_scatter(x, axis_name, scatter_dimension, tiled=tiled)

    def all_to_all(self, x, axis_name, split_axis, concat_axis, *, tiled=False):
        return self.c.all_to_all(x, axis_name, split_axis, concat_axis, tiled=tiled)


def test_the_collectives_mean_what_jax_lax_means():
    import jax
    from jax.sharding import PartitionSpec as P

    mesh = Mesh((("a", 2), ("b", 4)))
    blocks = np.arange(8 * 4 * 8, dtype=np.float32).reshape(8, 4, 8) % 13 - 6  # one per device
    jax_mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("a", "b"))
    for name, collective in COLLECTIVES.items():
        ours = run_per_device(mesh, lambda c, x: collective(AsJaxLax(c), x),
                              [{"x": block} for block in blocks])
        theirs = jax.jit(jax.shard_map(lambda x: collective(jax.lax, x[0])[None], mesh=jax_mesh,
                                       in_specs=P(("a", "b")), out_specs=P(("a", "b")),
                                       check_vma=False))(blocks)
        np.testing.assert_array_equal(np.stack(ours), np.asarray(theirs), err_msg=name)


# ---- PartitionSpecs


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_layout_from_spec_inverts_partition_spec(data):
    mesh = data.draw(meshes())
    dims = data.draw(layouts(mesh, data.draw(st.lists(st.sampled_from([4, 8, 12]), max_size=4))))
    layout = Layout(dims)
    assert layout_from_spec(partition_spec(layout), len(dims)) == layout


def test_specs_read_as_jax_writes_them():
    from jax.sharding import PartitionSpec as P

    assert partition_spec(Layout((("dp",), (), ("tp", "sp")))) == P("dp", None, ("tp", "sp"))
    assert layout_from_spec(P(None, "tp"), ("B", "S", "D")) == Layout(((), ("tp",), ()))
    assert layout_from_spec(P(None, "tp")) == Layout(((), ("tp",)))  # as many dims as entries
    with pytest.raises(ValueError, match="uses a mesh axis twice"):
        layout_from_spec(P("tp", "tp"), 2)
    with pytest.raises(ValueError, match="partial"):
        partition_spec(Layout(((),), (("tp", "sum"),)))
