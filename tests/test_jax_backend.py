"""The JAX backend computes what the reference computes, on 8 CPU devices in this process.

Also: the emitted module is the code that runs and works on its own, the
GSPMD twin computes the same, and importing einpar or checking a program
never starts JAX.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from einpar.api import compile_source, compile_spmd, emit_jax, load, random_inputs, run_jax
from einpar.backends.reference import evaluate
from einpar.cli import main
from einpar.testing import meshes, programs
from einpar.tolerance import compare, compare_outputs, program_tolerance

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("**/*.ein"))


def check_on_jax(program, seed=0, twin=False):
    inputs = random_inputs(program, seed)
    reference = evaluate(program, inputs)
    result = run_jax(program, inputs, twin=twin, warmup=0, repeat=1)
    assert len(result.devices.devices) == program.mesh.num_devices
    for found in compare_outputs(program, inputs, reference, result.outputs):
        assert found.ok, (found.name, found.error, found.tolerance)
        assert result.outputs[found.name].dtype == reference[found.name].dtype
    return result


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_example_on_jax_equals_the_reference(path):
    result = check_on_jax(load(path))
    assert result.compile_s > 0 and len(result.step_times_s) == 1


# jax.jit places only arrays its shardings divide: no twin of an uneven program (test_uneven.py).
@pytest.mark.parametrize("path", [p for p in EXAMPLES if p.parent.name != "uneven"],
                         ids=lambda p: str(p.relative_to(p.parent.parent)))
def test_every_examples_gspmd_twin_equals_the_reference(path):
    check_on_jax(load(path), twin=True)


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f8e4m3", "f8e5m2"])
def test_half_precision_examples_on_jax_equal_the_reference(dtype):
    for name in ("mlp/megatron.ein", "attention/tensor_parallel.ein", "moe/gshard.ein"):
        text = (ROOT / "examples" / name).read_text()
        text = text.replace("dtype f32\n", "").replace("mesh ", f"dtype {dtype}\nmesh ", 1)
        check_on_jax(compile_source(text, file=name))


def test_integer_and_boolean_programs_on_jax_match_exactly():
    program = compile_source(
        "mesh dp=2 tp=4\n"
        "dim B=8 K=16 N=8\n"
        "input a[B@dp, K] : i32\n"
        "input b[K, N@tp] : i32\n"
        "input m[B, N] : bool\n"
        "c[B, N] : i32 = a[B,K] * b[K,N]\n"
        "big[B, N] = c[B,N] > 200\n"
        "both[B, N] = where(m[B,N], c[B,N], 0)\n"
        "total[B] : i32 = sum[N](both[B,N])\n"
        "output big\noutput total\n", file="ints.ein")
    inputs = random_inputs(program, 3)
    reference = evaluate(program, inputs)
    outputs = run_jax(program, inputs, warmup=0, repeat=1).outputs
    for name in ("big", "total"):
        assert outputs[name].dtype == reference[name].dtype
        np.testing.assert_array_equal(outputs[name], reference[name])


def test_a_program_with_no_mesh_runs_on_one_device():
    program = compile_source("dim I=4 J=3\ninput x[I,J]\ny[I] = sum[J](exp(x[I,J]))\noutput y\n")
    assert len(check_on_jax(program).devices.devices) == 1


# Meshes of at most 8 devices, the CPU devices this test process has.
EIGHT_OR_FEWER = meshes(max_size=4).filter(lambda mesh: mesh.num_devices <= 8)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                      HealthCheck.data_too_large])


@settings(max_examples=25, **SETTINGS)
@given(programs(mesh=EIGHT_OR_FEWER, max_statements=6, name_collisions=False, dtypes=("f32", "f64")))
def test_random_programs_on_jax_equal_the_reference(generated):
    check_on_jax(compile_source(generated.text, file="<generated>"))


@pytest.mark.slow
@settings(max_examples=300, **SETTINGS)
@given(programs(mesh=EIGHT_OR_FEWER, max_statements=10, dtypes=("f32", "f64")))
def test_many_random_programs_on_jax_equal_the_reference(generated):
    program = compile_source(generated.text, file="<generated>")
    check_on_jax(program)
    check_on_jax(program, twin=True)


# ---- the module `einpar compile --emit jax` writes


def test_the_backend_runs_the_emitted_text():
    from einpar.backends.jax_backend import load_module

    program = load(ROOT / "examples/mlp/megatron.ein")
    module = load_module(program, compile_spmd(program))
    assert "lax.psum" in emit_jax(program) and module.per_device.__code__.co_filename.startswith("<einpar-jax")


@pytest.mark.parametrize("name", ["attention/tensor_parallel.ein", "transformer/block.ein"])
def test_the_emitted_module_runs_on_its_own_and_matches_the_reference(name, tmp_path, capsys):
    assert main(["compile", str(ROOT / "examples" / name), "--emit", "jax"]) == 0
    module = tmp_path / "program.py"
    module.write_text(capsys.readouterr().out)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, str(module), "--seed", "4", "--repeat", "1",
                           "--save", str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "largest difference from the whole-array program" in done.stdout
    assert "GSPMD twin: compile" in done.stdout
    saved = np.load(tmp_path / "out.npz")
    program = load(ROOT / "examples" / name)
    inputs = random_inputs(program, 4)
    for key, array in inputs.items():  # the module draws the inputs einpar draws
        np.testing.assert_array_equal(saved[f"in.{key}"], array)
    reference = evaluate(program, inputs)
    for output in program.outputs:
        found = compare(output.name, reference[output.name], saved[f"out.{output.name}"],
                        program_tolerance(program))
        assert found.ok, (output.name, found.error)


def test_emitting_jax_does_not_start_jax():
    code = ("import sys\nfrom einpar.cli import main\n"
            f"main(['compile', {str(ROOT / 'examples/moe/gshard.ein')!r}, '--emit', 'jax'])\n"
            "assert 'jax' not in sys.modules, 'jax was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    compile(done.stdout, "emitted.py", "exec")  # valid Python


def test_importing_einpar_and_checking_a_program_do_not_import_jax():
    code = ("import sys\nimport einpar, einpar.api, einpar.cli, einpar.backends\n"
            "from einpar.cli import main\n"
            f"assert main(['check', {str(ROOT / 'examples/transformer/block.ein')!r}]) == 0\n"
            f"assert main(['run', {str(ROOT / 'examples/mlp/megatron.ein')!r}, '--backend', 'numpy']) == 0\n"
            "assert 'jax' not in sys.modules, 'jax was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---- the command line


def test_run_on_jax_prints_errors_and_times(capsys):
    path = str(ROOT / "examples/matmul/case3_both_contracting_split.ein")
    assert main(["run", path, "--backend", "jax", "--repeat", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (f"{path}: einpar's per-device program on 4 cpu devices "
                                   "(random inputs, seed 0)")
    assert "largest error" in out and "; each device sends 786,432 bytes per step" in out
    assert "(median of 3 after 1 warm-up;" in out


def test_run_on_jax_as_json(capsys):
    path = str(ROOT / "examples/moe/gshard.ein")
    assert main(["run", path, "--backend", "jax", "--twin", "--json", "--repeat", "2"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["twin"] is True and document["devices"] == 4 and document["platform"] == "cpu"
    assert len(document["step_times_s"]) == 2 and document["compile_s"] > 0
    assert document["outputs"]["y"]["ok"] is True
    assert document["planned_bytes_per_device"] is None  # the twin's plan is XLA's


def test_run_on_jax_saves_the_outputs(tmp_path, capsys):
    path = str(ROOT / "examples/mlp/megatron.ein")
    assert main(["run", path, "--backend", "jax", "--repeat", "1", "--save", str(tmp_path / "y.npz")]) == 0
    program = load(path)
    expected = evaluate(program, random_inputs(program, 0))["y"]
    assert compare("y", expected, np.load(tmp_path / "y.npz")["y"], 1e-4).ok


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "127.0.0.1:1"], "--coordinator, --num-processes and --process-id go together"),
    (["--devices", "0"], "expected a whole number from 1 to 4,096, got '0'"),
    (["--repeat", "x"], "expected a whole number from 1 to 1,000,000, got 'x'"),
    (["--timeout", "0"], "expected a positive number of seconds up to 1,000,000, got '0'"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "0", "--save", "y.npz"],
     "--save needs the whole outputs, which no one process of several holds"),
])
def test_bad_jax_flags_are_usage_errors(argv, message, capsys):
    path = str(ROOT / "examples/mlp/megatron.ein")
    assert main(["run", path, "--backend", "jax", *argv]) == 2
    assert message in capsys.readouterr().err


def test_tensors_named_like_the_modules_own_names_are_renamed():
    program = compile_source("mesh tp=2\ndim L=2 D=4\ninput layer_1[D@tp]\ninput P[D]\n"
                             "repeat L {\n  param trip_1[D]\n  layer_1[D] = layer_1[D] * trip_1[D] + P[D]\n}\n"
                             "output layer_1\n", file="names.ein")
    source = emit_jax(program)
    assert "def per_device(layer_1, P_2, trip_1):" in source
    assert "def trip_2(carry, stacked):" in source and "def layer_2(carry, stacked):" in source
    check_on_jax(program)


# ---- matmul precision: what runs is what the cost model prices


@pytest.mark.parametrize("precision, constant", [("highest", "lax.Precision.HIGHEST"),
                                                 ("default", "lax.Precision.DEFAULT")])
def test_the_emitted_module_carries_the_precision_asked_for(precision, constant, capsys):
    path = str(ROOT / "examples/mlp/megatron.ein")
    program = load(path)
    assert f"\nPRECISION = {constant}  #" in emit_jax(program, precision=precision)
    assert main(["compile", path, "--emit", "jax", "--precision", precision]) == 0
    source = capsys.readouterr().out
    assert f"\nPRECISION = {constant}  #" in source
    assert f"--emit jax --precision {precision}`" in source  # the command that wrote it
    einsums = [line for line in source.splitlines() if "jnp.einsum(" in line]
    assert einsums and all("precision=PRECISION" in line for line in einsums)


def test_the_module_defaults_to_full_float32(capsys):
    assert main(["compile", str(ROOT / "examples/mlp/megatron.ein"), "--emit", "jax"]) == 0
    assert "\nPRECISION = lax.Precision.HIGHEST  #" in capsys.readouterr().out


def test_precision_goes_with_emit_jax_only(capsys):
    path = str(ROOT / "examples/mlp/megatron.ein")
    for emit in ("ast", "ir", "spmd"):
        assert main(["compile", path, "--emit", emit, "--precision", "default"]) == 2
        assert f"it goes with --emit jax, not --emit {emit}" in capsys.readouterr().err


def test_the_jax_backend_runs_at_the_precision_asked_for(monkeypatch):
    from einpar.backends import jax_backend

    program = load(ROOT / "examples/matmul/case1_no_contracting_split.ein")
    seen = []
    real = jax_backend.write_module

    def write_module(program, spmd, command="", precision="highest"):
        seen.append(precision)
        return real(program, spmd, command, precision)

    monkeypatch.setattr(jax_backend, "write_module", write_module)
    inputs = random_inputs(program, 0)
    result = run_jax(program, inputs, warmup=0, repeat=1, precision="default")
    assert seen == ["default"]
    # On CPU both precisions compute float32; the bound at `default` is bfloat16's.
    tolerance = program_tolerance(program, "default")
    assert tolerance == 5e-2
    assert compare("c", evaluate(program, inputs)["c"], result.outputs["c"], tolerance).ok


def test_run_takes_the_precision(capsys):
    path = str(ROOT / "examples/matmul/case1_no_contracting_split.ein")
    assert main(["run", path, "--backend", "jax", "--repeat", "1", "--precision", "default",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"]["c"]["tolerance"] == 5e-2
