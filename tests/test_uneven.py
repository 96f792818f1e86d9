"""Uneven dimensions: a dimension its mesh axes do not divide is padded to the next multiple.

The last blocks hold padding, which reductions and contractions ignore and outputs drop:
every backend computes what the unsharded reference does, the padding shows in `compile`
(`local [3 of 4]`), and the bytes the planner declares are the padded bytes the simulated
devices send.
"""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from einpar.api import compile_source, compile_spmd, random_inputs, run_jax
from einpar.backends.numpy_sim import assemble, run_spmd, scatter
from einpar.backends.reference import evaluate
from einpar.errors import EinparError
from einpar.layout import Layout, Mesh, block_slices, format_local, uneven_conflict
from einpar.spmd import CollectiveStep, bytes_per_device, format_spmd
from einpar.testing import assert_equivalent, meshes, programs
from einpar.tolerance import compare, program_tolerance

from test_simulator import check_against_reference

TP4 = Mesh((("tp", 4),))
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                      HealthCheck.data_too_large])
EIGHT_OR_FEWER = meshes(max_size=4).filter(lambda mesh: mesh.num_devices <= 8)


# ---------------------------------------------------------------- layout math


def test_a_padded_block_is_ceil_of_size_over_parts_and_its_slice_is_clipped():
    layout = Layout((("tp",),))
    assert layout.local_shape((6,), TP4) == (2,)
    assert [block_slices(layout, (6,), TP4, d) for d in range(4)] == \
        [(slice(0, 2),), (slice(2, 4),), (slice(4, 6),), (slice(6, 6),)]
    assert [block_slices(layout, (15,), TP4, d)[0].stop for d in range(4)] == [4, 8, 12, 15]
    assert format_local(layout, (15,), TP4) == "[3 of 4]"
    assert format_local(layout, (6,), TP4) == "[0 of 2]"
    assert format_local(layout, (8,), TP4) == "[2]"


def test_padding_nests_only_where_each_inner_axis_divides_the_outer_blocks():
    mesh = Mesh((("dp", 2), ("tp", 2)))
    assert uneven_conflict(Layout((("dp", "tp"),)), (7,), mesh) is None  # blocks of 4, then of 2
    assert uneven_conflict(Layout((("dp", "tp"),)), (6,), mesh) == 0  # blocks of 3 over tp=2


def test_scatter_pads_blocks_and_assemble_drops_the_padding():
    value = np.arange(30.0).reshape(2, 15)
    layout = Layout(((), ("tp",)))
    blocks = scatter(value, layout, TP4)
    assert [b.shape for b in blocks] == [(2, 4)] * 4
    assert blocks[3][:, 3].tolist() == [0.0, 0.0]  # the padding
    np.testing.assert_array_equal(assemble(blocks, layout, (2, 15), TP4), value)


# ---------------------------------------------------------------- checker and compile


def test_compile_shows_the_padding_of_each_local_block():
    program = compile_source("mesh tp=4\ndim H=6 V=15\ninput x[H@tp, V]\ninput y[V@tp]\n"
                             "output x\noutput y\n")
    text = format_spmd(compile_spmd(program))
    assert "in   x: f32[6@tp,15] local [0 of 2,15]" in text
    assert "in   y: f32[15@tp] local [3 of 4]" in text


def test_padding_that_does_not_nest_is_E221():
    with pytest.raises(EinparError) as error:
        compile_source("mesh dp=2 tp=2\ndim D=6\ninput x[D@(dp,tp)]\noutput x\n")
    assert error.value.diagnostics[0].code == "E221"
    compile_source("mesh dp=2 tp=2\ndim D=7\ninput x[D@(dp,tp)]\noutput x\n")  # blocks of 4, 2


# ---------------------------------------------------------------- bytes


def test_an_all_gather_of_six_over_four_sends_padded_blocks_of_two():
    """The textbook case: D=6 over tp=4 is blocks of 2 (the last all padding); each device
    sends its block of 2 f32 to the 3 others: 24 bytes, as GSPMD would."""
    program = compile_source("mesh tp=4\ndim D=6\ninput x[D@tp]\ny[D] = exp(x[D])\noutput y[D]\n")
    spmd = compile_spmd(program)
    (gather,) = [s for s in spmd.steps if isinstance(s, CollectiveStep)]
    assert (gather.kind, gather.bytes_per_device) == ("all_gather", 3 * 2 * 4)
    inputs = random_inputs(program, 0)
    outputs, traffic = run_spmd(spmd, inputs)
    assert traffic.sent == [24] * 4
    np.testing.assert_allclose(outputs["y"], np.exp(inputs["x"]), rtol=1e-6)


def test_a_reduce_scatter_onto_a_padded_dimension_sends_padded_chunks():
    """y[5,7] partial over tp, scattered onto F=7: chunks of [5,2] to each of 3 others."""
    program = compile_source("mesh tp=4\ndim B=5 D=8 F=7\ninput x[B, D@tp]\nparam w[D@tp, F]\n"
                             "y[B, F@tp] = x[B,D] * w[D,F]\noutput y\n")
    spmd = compile_spmd(program)
    (scatter_step,) = [s for s in spmd.steps if isinstance(s, CollectiveStep)]
    assert (scatter_step.kind, scatter_step.bytes_per_device) == ("reduce_scatter", 3 * 5 * 2 * 4)
    check_against_reference(program)


# ---------------------------------------------------------------- masking at each reduction

# Each output reduces over a padded dimension (pinned partial, so each device reduces its
# padded block) where padding that is not masked would show: exp of the padding is more than
# any exp of a real element, a padded id reads a row, ...
MASKED = """
mesh tp=4
dim B=3 D=6 V=10 S=5
input x[B, D@tp]
input ids[B, S@tp] : i32
param table[V@tp, D]
param w[D@tp]
n[B,D@tp] = 0.0 - square(x[B,D]) - 1.0
top[B]{max: tp} = max[D](exp(n[B,D]))
low[B]{min: tp} = min[D](1.0 - exp(n[B,D]))
total[B]{sum: tp} = sum[D](exp(n[B,D]))
average[B]{sum: tp} = mean[D](exp(n[B,D]))
p[B,D@tp] = softmax[D](n[B,D])
l[B] = logsumexp[D](n[B,D])
g[B,S@tp,D] = take[V](table[V,D], ids[B,S])
z[B]{sum: tp} = sum[S](sum[D](g[B,S,D]))
c[B,D] = cumsum[D](exp(n[B,D]))
e[B]{sum: tp} = exp(n[B,D]) * exp(w[D])
k[B,D@tp] = x[B,D] * sum[S](sum[D](g[B,S,D]))
output top
output low
output total
output average
output p
output l
output z
output c
output k
output e
"""


def test_every_reduction_over_a_padded_dimension_ignores_the_padding_on_the_simulator():
    check_against_reference(compile_source(MASKED))


def test_every_reduction_over_a_padded_dimension_ignores_the_padding_on_jax():
    program = compile_source(MASKED)
    check_on_jax(program)


def test_the_gspmd_twin_of_an_uneven_program_is_refused():
    program = compile_source("mesh tp=4\ndim D=6\ninput x[D@tp]\noutput x\n")
    with pytest.raises(EinparError) as error:
        run_jax(program, twin=True, warmup=0, repeat=1)
    assert error.value.diagnostics[0].code == "E400"


def test_the_gspmd_twin_takes_an_output_padded_in_einpars_layout_whole():
    """y is laid out padded (6 over tp=4) but every input divides: the twin runs, jit
    returning y whole, and computes what the reference does."""
    program = compile_source("mesh tp=4\ndim D=6\ninput x[D]\ny[D@tp] = 2 * x[D]\noutput y\n")
    inputs = random_inputs(program, 0)
    result = run_jax(program, inputs, twin=True, warmup=0, repeat=1)
    np.testing.assert_allclose(result.outputs["y"], 2 * inputs["x"], rtol=1e-6)


# ---------------------------------------------------------------- property tests


def check_on_jax(program, seed=0):
    inputs = random_inputs(program, seed)
    reference = evaluate(program, inputs)
    result = run_jax(program, inputs, warmup=0, repeat=1)
    for output in program.outputs:
        found = compare(output.name, reference[output.name], result.outputs[output.name],
                        program_tolerance(program))
        assert found.ok, (output.name, found.error, found.tolerance)


def uneven_programs(**kwargs):
    return programs(mesh=EIGHT_OR_FEWER, uneven=True, name_collisions=False, training=False,
                    dtypes=("f32", "f64"), **kwargs)


def _has_padding(generated) -> bool:
    spmd = compile_spmd(compile_source(generated.text, file="<generated>"))
    return any(v.layout.is_padded(v.type.shape, spmd.mesh) for v in spmd.values.values())


@settings(max_examples=40, **SETTINGS)
@given(uneven_programs(max_statements=6))
def test_uneven_programs_on_the_simulator_equal_the_reference_and_send_what_is_planned(generated):
    check_against_reference(compile_source(generated.text, file="<generated>"))


@settings(max_examples=8, **SETTINGS)
@given(uneven_programs(max_statements=4))
def test_uneven_programs_on_jax_equal_the_reference(generated):
    check_on_jax(compile_source(generated.text, file="<generated>"))


@pytest.mark.slow
@settings(max_examples=400, **SETTINGS)
@given(uneven_programs(max_statements=10))
def test_many_uneven_programs_on_the_simulator_equal_the_reference(generated):
    check_against_reference(compile_source(generated.text, file="<generated>"))


@pytest.mark.slow
@settings(max_examples=100, **SETTINGS)
@given(uneven_programs(max_statements=8))
def test_many_uneven_programs_on_jax_equal_the_reference(generated):
    check_on_jax(compile_source(generated.text, file="<generated>"))


def test_uneven_programs_draw_padding_often():
    """The generator's `uneven=True` is not vacuous: many programs it draws hold padding (the
    same draws every run: a count of random draws against a bound would fail now and then)."""
    drawn = []

    @settings(max_examples=30, database=None, derandomize=True, **SETTINGS)
    @given(uneven_programs(max_statements=3))
    def draw(generated):
        drawn.append(_has_padding(generated))

    draw()
    assert sum(drawn) >= len(drawn) // 3


def test_the_masks_are_what_makes_padding_neutral(monkeypatch):
    """Without them, the reductions of MASKED over padded blocks go wrong (not vacuous)."""
    import einpar.backends.numpy_sim as numpy_sim

    monkeypatch.setattr(numpy_sim, "_masks", lambda op: [])
    program = compile_source(MASKED)
    inputs = random_inputs(program, 0)
    reference = evaluate(program, inputs)
    outputs, _ = run_spmd(compile_spmd(program), inputs)
    wrong = {name for name in reference if not np.allclose(outputs[name], reference[name])}
    assert wrong >= {"top", "low", "total", "average", "e"}


@pytest.mark.parametrize("D", [8, 6])
def test_a_pipelined_program_runs_on_jax_even_or_uneven(D):
    """The layers' output comes from the last stage (every other stage holds a stand-in), and
    an uneven dimension goes in padded and comes out cut, as outside pipelines."""
    program = compile_source(f"mesh pp=2 tp=4\ndim L=2 D={D}\ninput x[D@tp]\n"
                             "repeat L@pp {\n  param w[D]\n  x[D] = x[D] * w[D]\n}\noutput x\n")
    assert_equivalent(program, backends=("numpy", "jax"), seed=0)


def test_an_interleaved_gpt_step_with_uneven_dimensions_runs_on_jax():
    """F=99 and V=33 over tp=2: the stacks go in stage order (STAGED) and padded (PADDED) at
    once, and the step agrees with the reference on both backends."""
    text = (Path(__file__).parent.parent / "examples/pipeline/gpt_interleaved.ein").read_text()
    program = compile_source(text, "gpt_interleaved.ein", {"F": 99, "V": 33})
    spmd = compile_spmd(program)
    assert any(v.layout.is_padded(v.type.shape, spmd.mesh) for v in spmd.values.values())
    assert_equivalent(program, backends=("numpy", "jax"), seed=0)
