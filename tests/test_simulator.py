"""The NumPy device simulator computes what the reference computes, moving the bytes the plan declares."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from einpar.api import compile_source, compile_spmd, load, random_inputs
from einpar.backends.numpy_sim import run_spmd
from einpar.backends.reference import evaluate
from einpar.spmd import bytes_per_device
from einpar.testing import programs
from einpar.tolerance import compare, compare_outputs, program_tolerance

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("**/*.ein"))


def perturbed(inputs: dict, seed: int) -> dict:
    """The inputs with every float value moved by a few float32 units in the last place."""
    rng = np.random.default_rng(seed)
    moved = {}
    for name, array in inputs.items():
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating):
            signs = rng.choice([-1.0, 1.0], size=array.shape)
            array = (array * (1 + 4 * np.finfo(np.float32).eps * signs)).astype(array.dtype)
        moved[name] = array
    return moved


def sensitivity(program, name: str, inputs: dict, reference: dict, seed: int = 1) -> float:
    """How far the reference's own `name` moves when its inputs move by rounding: an output
    that cancels to noise (a sum over the index a normalization just centred) is set by
    rounding, so another summation order may change it by as much."""
    again = evaluate(program, perturbed(inputs, seed))
    return compare(name, reference[name], again[name], 0.0).error


def check_against_reference(program, seed=0):
    inputs = random_inputs(program, seed)
    reference = evaluate(program, inputs)
    spmd = compile_spmd(program)
    outputs, traffic = run_spmd(spmd, inputs)
    # Beyond the dtype's bound, judged at what rounding alone does (einpar.rounding).
    for result in compare_outputs(program, inputs, reference, outputs):
        assert result.ok, (result.name, result.error, result.tolerance)
    if spmd.pipeline is None:  # a pipeline's stages send apart: test_pipeline.py
        assert traffic.sent == [bytes_per_device(spmd.steps)] * program.mesh.num_devices


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_example_on_simulated_devices_equals_the_reference(path):
    check_against_reference(load(path))


def test_examples_are_far_from_rounding_noise():
    # The widened bound never applies to the forward examples: rounding moves their outputs
    # by a twentieth of the tolerance at most (about 1e-6 of 1e-4). (A training step's
    # second moments are squares of small gradients: tests/test_training.py judges them.)
    for path in [p for p in EXAMPLES if p.parent.name not in ("training", "pipeline")]:
        program = load(path)
        inputs = random_inputs(program, 0)
        reference = evaluate(program, inputs)
        for output in program.outputs:
            assert sensitivity(program, output.name, inputs, reference) \
                < program_tolerance(program) / 20, (path.name, output.name)


# Found by test_many_random_programs_on_simulated_devices_equal_the_reference: the sum over B
# of a layernorm over B is rounding noise (about 1e-6), which the layernorm over D scales up.
NOISE = """mesh dp=2 sp=2
dim B=8 S=12 D=12
input x7[S@sp, B]
input x[D, S] : f64
input w[S]
h6[S@dp, B] = layernorm[B](x7[S, B])
out[D@sp, S@dp] = layernorm[D](h6[S, B] * x[D, S] * w[S])
output out
"""


def test_an_output_of_rounding_noise_is_judged_at_what_rounding_does_to_it():
    program = compile_source(NOISE, file="noise.ein")
    inputs = random_inputs(program, 0)
    reference = evaluate(program, inputs)
    assert sensitivity(program, "out", inputs, reference) > program_tolerance(program)
    check_against_reference(program)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# f32 and f64 only: generated programs may normalize over a handful of nearly equal
# values, which turns a half-precision rounding difference (a different summation
# order) into an error of any size; that is the program's conditioning, not sharding.
PRECISE = ("f32", "f64")


@settings(max_examples=100, **SETTINGS)
@given(programs(max_statements=6, name_collisions=False, dtypes=PRECISE))
def test_random_programs_on_simulated_devices_equal_the_reference(generated):
    check_against_reference(compile_source(generated.text, file="<generated>"))


@pytest.mark.slow
@settings(max_examples=1500, **SETTINGS)
@given(programs(max_statements=10, dtypes=PRECISE))
def test_many_random_programs_on_simulated_devices_equal_the_reference(generated):
    check_against_reference(compile_source(generated.text, file="<generated>"))


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_half_precision_examples_on_simulated_devices_equal_the_reference(dtype):
    for name in ("mlp/megatron.ein", "attention/tensor_parallel.ein", "moe/gshard.ein"):
        text = (EXAMPLES[0].parent.parent / name).read_text()
        text = text.replace("dtype f32\n", "").replace("mesh ", f"dtype {dtype}\nmesh ", 1)
        check_against_reference(compile_source(text, file=name))


def test_pos_in_a_loop_that_carries_nothing_runs():
    """`pos` in a loop body looks up its value's layout; a loop that carries nothing once
    handed the body an empty table instead (KeyError, an internal error)."""
    program = compile_source("dim B=2 U=B L=2\ninput a[B]\nrepeat L {\n  param v[]\n"
                             "  x[B, U] = a[B] * (pos(B) > pos(U)) * v[]\n}\n"
                             "y[] = sum[B](a[B])\noutput y\n", file="pos_loop.ein")
    check_against_reference(program)


def test_replicas_holding_the_same_nan_in_bfloat16_agree():
    """Replicated blocks are compared as numbers NumPy knows NaN in (bfloat16 has no NaN to
    NumPy's testing): two replicas holding NaN at one place are the same value."""
    import ml_dtypes

    from einpar.backends.numpy_sim import assemble
    from einpar.layout import Layout, Mesh

    block = np.array([np.nan, 1.0], dtype=ml_dtypes.bfloat16)
    whole = assemble([block, block.copy()], Layout(((),)), (2,), Mesh((("tp", 2),)))
    assert np.isnan(whole[0].astype(np.float32)) and whole[1] == 1.0
    with pytest.raises(AssertionError, match="replicas disagree"):
        assemble([block, np.array([np.nan, 2.0], dtype=ml_dtypes.bfloat16)], Layout(((),)), (2,),
                 Mesh((("tp", 2),)))
