"""The fp8 element types, f8e4m3 and f8e5m2: checked, run and priced end to end."""

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from einpar import api
from einpar.backends.reference import evaluate
from einpar.cost_model.cluster import preset
from einpar.cost_model.estimate import estimate
from einpar.errors import EinparError
from einpar.inputs import load_inputs
from einpar.testing import programs
from einpar.tolerance import compare, compare_outputs, program_tolerance

from test_generated_programs import check_and_evaluate, compile_generated  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """\
mesh tp=4
dim B=8 D=16 F=64
dtype {dtype}

input x[B, D]
param w1[D, F@tp]
param w2[F@tp, D]

h[B,F] = relu(x[B,D] * w1[D,F])
y[B,D] : f32 = h[B,F] * w2[F,D]

output y
"""


@pytest.mark.parametrize("dtype, numpy", [("f8e4m3", ml_dtypes.float8_e4m3fn),
                                          ("f8e5m2", ml_dtypes.float8_e5m2)])
def test_a_contraction_accumulates_in_f32_and_rounds_as_ml_dtypes(dtype, numpy):
    program = api.compile_source(PROGRAM.format(dtype=dtype), "fp8.ein")
    assert program.values["h"].type.nbytes == 8 * 64  # one byte an element
    inputs = api.random_inputs(program, 0)
    assert inputs["x"].dtype == np.dtype(numpy)
    out = evaluate(program, inputs)
    wide = {name: array.astype(np.float32) for name, array in inputs.items()}
    h = np.maximum(wide["x"] @ wide["w1"], 0).astype(numpy)  # stored: rounded to fp8
    y = h.astype(np.float32) @ wide["w2"]  # the f32 result keeps the f32 accumulation
    np.testing.assert_array_equal(out["y"], y)


@pytest.mark.parametrize("dtype", ["f8e4m3", "f8e5m2"])
@pytest.mark.parametrize("name", ["mlp/megatron.ein", "attention/tensor_parallel.ein",
                                  "moe/gshard.ein"])
def test_fp8_examples_on_simulated_devices_equal_the_reference(dtype, name):
    text = (ROOT / "examples" / name).read_text()
    text = text.replace("dtype f32\n", "").replace("mesh ", f"dtype {dtype}\nmesh ", 1)
    program = api.compile_source(text, name)
    inputs = api.random_inputs(program, 0)
    reference = evaluate(program, inputs)
    outputs, _ = api.run_simulated(program, inputs)
    tolerance = program_tolerance(program)
    assert tolerance == {"f8e4m3": 0.25, "f8e5m2": 0.5}[dtype]
    for output in program.outputs:
        assert outputs[output.name].dtype == reference[output.name].dtype
        assert compare(output.name, reference[output.name], outputs[output.name], tolerance).ok


@pytest.mark.parametrize("left, right, result", [
    ("f8e4m3", "f8e5m2", "bf16"),  # neither holds the other
    ("f8e4m3", "bf16", "bf16"), ("f8e5m2", "f16", "f16"), ("f8e4m3", "f32", "f32"),
    ("f8e5m2", "i32", "f8e5m2"), ("f8e4m3", "f8e4m3", "f8e4m3"),
])
def test_fp8_promotion(left, right, result):
    text = f"dim B=4\ninput a[B] : {left}\ninput b[B] : {right}\nc[B] = a[B] + b[B]\noutput c\n"
    program = api.compile_source(text, "promote.ein")
    assert program.values["c"].type.dtype == result


def test_an_unknown_dtype_lists_the_fp8_types():
    with pytest.raises(EinparError) as caught:
        api.compile_source("dim B=4\ninput a[B] : f8\noutput a\n", "bad.ein")
    [diagnostic] = caught.value.diagnostics
    assert diagnostic.code == "E205"
    assert "f8e4m3, f8e5m2" in diagnostic.hint


def test_fp8_inputs_saved_raw_by_savez_load(tmp_path):
    program = api.compile_source(PROGRAM.format(dtype="f8e4m3"), "fp8.ein")
    arrays = api.random_inputs(program, 1)
    path = tmp_path / "inputs.npz"
    np.savez(path, **arrays)  # ml_dtypes arrays are stored as raw one-byte voids
    loaded = load_inputs(program, path)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name].view(np.uint8), array.view(np.uint8))


@pytest.mark.parametrize("cluster, peak", [("h100x8", "fp8"), ("a100x8", "bf16")])
def test_fp8_contractions_are_priced_at_the_fp8_peak(cluster, peak):
    program = api.compile_source(PROGRAM.format(dtype="f8e4m3"), "fp8.ein")
    result = estimate(program, api.compile_spmd(program), preset(cluster))
    details = {op.name: op.detail for op in result.ops if op.stream == "compute"}
    # h.1 is an fp8 contraction; y's fp8 operands accumulate into f32 on the same units
    assert details["h.1"] == details["y"] == f"at {peak} peak"
    assert details["h"] == "at bf16 peak"  # elementwise fp8 work: the half-precision rules


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs(dtypes=("f8e4m3", "f8e5m2", "bf16"), max_statements=4))
def test_generated_fp8_programs_check_and_simulate_as_the_reference(generated):
    """The generator's promotion (einpar.testing) agrees with the checker's on fp8, and the
    simulated devices compute what the reference does."""
    check_and_evaluate(generated)
    program = compile_generated(generated)
    inputs = api.random_inputs(program, 0)
    reference = evaluate(program, inputs)
    outputs, _ = api.run_simulated(program, inputs)
    # A comparison of an fp8 sum the devices add in another order may decide the other way:
    # judged with the reference's own rounding band (docs/testing.md, "Tolerances").
    for result in compare_outputs(program, inputs, reference, outputs):
        assert result.ok, result
