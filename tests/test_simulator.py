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
from einpar.tolerance import compare, program_tolerance

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("**/*.ein"))


def check_against_reference(program, seed=0):
    inputs = random_inputs(program, seed)
    reference = evaluate(program, inputs)
    spmd = compile_spmd(program)
    outputs, traffic = run_spmd(spmd, inputs)
    for output in program.outputs:
        result = compare(output.name, reference[output.name], outputs[output.name],
                         program_tolerance(program))
        assert result.ok, (output.name, result.error, result.tolerance)
    assert traffic.sent == [bytes_per_device(spmd.steps)] * program.mesh.num_devices


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_example_on_simulated_devices_equals_the_reference(path):
    check_against_reference(load(path))


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
