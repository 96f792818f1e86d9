"""einpar.testing's equivalence API: assert_equivalent, relayouts, inputs, shard/assemble,
tolerance; and mutation checks: a wrong lowering (a missing all-reduce, two device blocks
swapped, a collective over the wrong axis, an output's axes swapped) makes assert_equivalent
fail, so it cannot pass vacuously."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import einpar.lower as lower
from einpar.api import compile_source, load, random_inputs
from einpar.cli import main
from einpar.reshard import AllReduce, Permute
from einpar.spmd import CollectiveStep
from einpar.testing import (assemble, assert_equivalent, inputs, program_text, relayout_text,
                            relayouts, shard, tolerance, training_programs)
from einpar.testing.relayout import targets

ROOT = Path(__file__).resolve().parent.parent
MEGATRON = ROOT / "examples" / "mlp" / "megatron.ein"
# The Megatron MLP on a 2x2 mesh at sizes that run in milliseconds.
SMALL = {"tp": 2, "B": 4, "S": 8, "D": 16, "F": 32}
FAST = settings(max_examples=15, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def megatron():
    return load(MEGATRON, SMALL)


# ---------------------------------------------------------------- assert_equivalent passes


def test_a_path_text_and_program_are_equivalent_as_written(megatron):
    assert_equivalent(MEGATRON, backends=("numpy",))
    assert_equivalent(str(MEGATRON), backends=("numpy", "reference"), seed=3)
    assert_equivalent(program_text(megatron), backends=("numpy",))
    assert_equivalent(megatron, backends=("numpy",), inputs=random_inputs(megatron, 7))


def test_several_relayouts_in_one_call(megatron):
    assert_equivalent(megatron, backends=("numpy",),
                      layouts=[{}, {"h": "[B, S@tp, F]"},
                               {"x": None, "w1": ("dp", "tp"), "y": "[_, _, D@tp]"}])


def test_the_jax_backend_agrees_and_catches_a_missing_all_reduce(megatron, monkeypatch):
    assert_equivalent(megatron, backends=("jax",), layouts={"y": "[B, S, D@(dp,tp)]"})
    monkeypatch.setattr(lower, "compile_program", _mutated(_drop_all_reduce))
    with pytest.raises(AssertionError, match="on the jax \\(shard_map\\) backend"):
        assert_equivalent(megatron, backends=("jax",))


@FAST
@given(relayouts(load(MEGATRON, SMALL)))
def test_every_drawn_relayout_compiles_and_computes_the_reference(relayout):
    assert set(relayout) == {"x", "w1", "w2", "h", "y"}
    assert_equivalent(load(MEGATRON, SMALL), layouts=relayout, backends=("numpy",))


@FAST
@given(inputs(load(MEGATRON, SMALL)))
def test_drawn_inputs_take_the_programs_shapes_and_dtypes_and_stay_finite(arrays):
    program = load(MEGATRON, SMALL)
    expected = random_inputs(program, 0)
    assert {name: (a.shape, a.dtype) for name, a in arrays.items()} == \
        {name: (a.shape, a.dtype) for name, a in expected.items()}
    assert all(np.isfinite(a).all() and np.abs(a).max() <= 64 for a in arrays.values())
    assert_equivalent(program, inputs=arrays, backends=("numpy",))


def test_inputs_draw_each_edge_kind():
    program = compile_source("mesh dp=2\ndim V=6 B=4 D=8\nparam emb[V, D]\ninput ids[B@dp] : i32\n"
                             "e[B, D] = take[V](emb[V, D], ids[B])\noutput e\n")
    seen = {"zeros": False, "ties": False, "large": False}

    @settings(max_examples=60, database=None, deadline=None)
    @given(inputs(program))
    def each(arrays):
        emb, ids = arrays["emb"], arrays["ids"]
        assert ids.dtype == np.int32 and ((0 <= ids) & (ids < 6)).all()
        seen["zeros"] |= not emb.any()
        seen["ties"] |= emb.any() and np.array_equal(emb * 2, np.round(emb * 2))
        seen["large"] |= np.isclose(np.abs(emb).max(), 64)

    each()
    assert all(seen.values()), seen


def test_training_programs_are_steps_with_a_loss():
    @settings(max_examples=5, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(training_programs(max_statements=3))
    def each(generated):
        assert generated.loss is not None
        assert compile_source(generated.text).training is None  # the derived step

    each()


# ---------------------------------------------------------------- the text that reproduces


def test_relayout_text_changes_only_the_annotations_and_writes_the_sizes_compiled_with(megatron):
    text = relayout_text(megatron, {"x": "[B, S@tp, D]", "w1": None, "h": ("dp", None, "tp"),
                                    "y": "[B@dp, S, D@tp]"})
    assert text == """\
# Megatron-style tensor-parallel MLP.
mesh dp=2 tp=2
dim  B=4 S=8 D=16 F=32
dtype f32

input x[B, S@tp, D]
param w1[D, F]
param w2[F@tp, D]

h[B@dp,S,F@tp]      = gelu(x[B,S,D] * w1[D,F])
y[B@dp,S,D@tp]   = h[B,S,F] * w2[F,D]

output y[B@dp, S, D@tp]
"""
    assert compile_source(text).dims == megatron.dims


def test_a_relayout_einpar_rejects_is_a_value_error_with_its_diagnostic(megatron):
    with pytest.raises(ValueError, match="no tensor 'z'"):
        assert_equivalent(megatron, layouts={"z": "[B]"})
    with pytest.raises(ValueError, match="has 2 dimensions; the tensor has 3"):
        assert_equivalent(megatron, layouts={"y": "[B, S]"})
    with pytest.raises(ValueError, match="names index F where the tensor has D"):
        assert_equivalent(megatron, layouts={"y": "[B, S, F]"})
    with pytest.raises(ValueError) as error:
        assert_equivalent(megatron, layouts={"y": "[B@tp, S@tp, D]"})
    assert "error[E220]: mesh axis 'tp' is used twice in the layout of 'y'" in str(error.value)
    # layout text is one layout: another line or statement cannot ride along into the program
    with pytest.raises(ValueError, match="a layout is one line"):
        assert_equivalent(megatron, layouts={"y": "[B, S, D]\nmesh evil=2"})
    with pytest.raises(ValueError, match="unexpected 'y'"):
        assert_equivalent(megatron, layouts={"y": "[B, S, D] y[D] = 1"})
    with pytest.raises(ValueError, match="backends are some of"):
        assert_equivalent(megatron, backends=("torch",))
    with pytest.raises(ValueError, match="inputs einpar cannot run"):
        assert_equivalent(megatron, inputs={"x": np.zeros(3)})


def test_targets_of_a_pipelined_step_are_a_micro_batchs_rows():
    program = load(ROOT / "examples" / "pipeline" / "gpt_1f1b.ein")
    found = targets(program)
    assert found["ids"].sizes == (2, 32)  # B=8 in 4 micro-batches
    assert found["wq"].indices == ("D", "H", "P", "R")  # a stacked param, per trip
    assert "l" in found and all("." not in name for name in found)


# ---------------------------------------------------------------- mutation checks


def _mutated(mutate):
    original = lower.compile_program

    def compile_program(program, objective=None):
        plan, spmd = original(program, objective)
        return plan, mutate(spmd)
    return compile_program


def _drop_all_reduce(spmd):
    """Every all-reduce over no axes: each device keeps its own partial sum."""
    assert any(isinstance(s, CollectiveStep) and s.kind == "all_reduce" for s in spmd.steps)
    return replace(spmd, steps=tuple(
        replace(s, step=AllReduce((), s.step.op)) if isinstance(s, CollectiveStep)
        and s.kind == "all_reduce" else s for s in spmd.steps))


def _reduce_over_the_other_axis(spmd):
    """The all-reduce over tp run over dp instead."""
    return replace(spmd, steps=tuple(
        replace(s, step=AllReduce(("dp",), s.step.op)) if isinstance(s, CollectiveStep)
        and s.kind == "all_reduce" else s for s in spmd.steps))


def _swap_two_device_blocks(spmd):
    """The output's blocks permuted between dp and tp: on a 2x2 mesh, devices 1 and 2 swap."""
    (output,) = spmd.outputs
    value = spmd.values[output.value]
    swapped = replace(value, name=output.value + "~swapped")
    step = CollectiveStep(Permute("dp", "tp", 0), output.value, swapped.name, value.tensor,
                          output.layout, output.layout, 0, "a mutation")
    return replace(spmd, steps=spmd.steps + (step,), values={**spmd.values, swapped.name: swapped},
                   outputs=(replace(output, value=swapped.name),))


def _swap_output_axes(spmd):
    """The output assembled as if its dp and tp splits were each other's."""
    (output,) = spmd.outputs
    swap = {"dp": "tp", "tp": "dp"}
    layout = output.layout
    swapped = replace(layout, dims=tuple(tuple(swap.get(a, a) for a in axes) for axes in layout.dims))
    return replace(spmd, outputs=(replace(output, layout=swapped),))


@pytest.mark.parametrize("mutation", [_drop_all_reduce, _reduce_over_the_other_axis,
                                      _swap_two_device_blocks])
def test_a_wrong_lowering_fails(megatron, monkeypatch, mutation):
    monkeypatch.setattr(lower, "compile_program", _mutated(mutation))
    with pytest.raises(AssertionError, match="output 'y' differs from the reference"):
        assert_equivalent(megatron, backends=("numpy",))
    assert_equivalent(megatron, backends=("reference",))  # the oracle alone sees nothing


def test_swapped_output_axes_fail_on_the_blocks_they_misplace(monkeypatch):
    program = load(MEGATRON, SMALL)
    monkeypatch.setattr(lower, "compile_program", _mutated(_swap_output_axes))
    with pytest.raises(AssertionError) as error:
        assert_equivalent(program, backends=("numpy",), layouts={"y": "[B@dp, S, D@tp]"})
    assert "wrong on 2 of 4 devices: 1, 2" in str(error.value)


def test_the_report_names_the_block_and_its_program_reproduces_the_failure(monkeypatch, tmp_path, capsys):
    program = load(MEGATRON, SMALL)
    monkeypatch.setattr(lower, "compile_program", _mutated(_swap_two_device_blocks))
    with pytest.raises(AssertionError) as error:
        assert_equivalent(program, backends=("numpy",), seed=5, layouts={"h": "[B, S, F@tp]"})
    report = str(error.value)
    lines = report.splitlines()
    assert lines[0] == "output 'y' differs from the reference on the numpy (simulated devices) backend"
    assert lines[1].startswith("  largest error ") and lines[1].endswith(", tolerance 0.0001")
    assert lines[2] in ("  worst block: device 1 (dp=0, tp=1) holds y[0:2, 0:8, 0:16]",
                        "  worst block: device 2 (dp=1, tp=0) holds y[2:4, 0:8, 0:16]")
    assert lines[3] == "  wrong on 2 of 4 devices: 1, 2"
    assert lines[4].startswith("  at y[")
    assert lines[5] == "  layouts: {h: [B, S, F@tp]}"
    assert lines[6] == ("reproduce: save the program below as FILE.ein, then "
                        "`einpar run FILE.ein --backend numpy --seed 5`")
    text = report.split("-\n", 1)[1].rsplit("\n-", 1)[0] + "\n"
    assert text == relayout_text(program, {"h": "[B, S, F@tp]"})
    (tmp_path / "repro.ein").write_text(text)
    # The wrong lowering leaves two copies of y's blocks disagreeing: the command says so.
    assert main(["run", str(tmp_path / "repro.ein"), "--backend", "numpy", "--seed", "5"]) == 3
    assert "replicas disagree" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["run", str(tmp_path / "repro.ein"), "--backend", "numpy", "--seed", "5"]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------- shard, assemble, tolerance


def test_shard_gives_each_device_its_block_row_major():
    x = np.arange(16.0).reshape(4, 4)
    blocks = shard(x, "[B@dp, D@tp]", "dp=2 tp=2")
    assert [b.tolist() for b in blocks] == [[[0, 1], [4, 5]], [[2, 3], [6, 7]],
                                            [[8, 9], [12, 13]], [[10, 11], [14, 15]]]
    assert np.array_equal(assemble(blocks, "[B@dp, D@tp]", {"dp": 2, "tp": 2}), x)
    both = shard(x, "[B@(dp,tp), D]", "mesh dp=2 tp=2")
    assert [b[:, 0].tolist() for b in both] == [[0], [4], [8], [12]]
    copies = shard(x, None, "dp=2")
    assert all(np.array_equal(block, x) for block in copies)


def test_assemble_combines_partial_blocks_and_refuses_disagreeing_copies():
    parts = [np.full((2,), 1.0), np.full((2,), 2.0)]
    assert assemble(parts, "[D] {sum: tp}", "tp=2").tolist() == [3.0, 3.0]
    assert assemble(parts, "[D] {max: tp}", "tp=2").tolist() == [2.0, 2.0]
    with pytest.raises(AssertionError, match="replicas disagree"):
        assemble(parts, "[D]", "tp=2")


def test_shard_and_assemble_say_what_is_wrong():
    x = np.zeros((6, 4))
    with pytest.raises(ValueError, match="do not evenly divide dimension 0 of size 6"):
        shard(x, "[B@tp, D]", "tp=4")
    with pytest.raises(ValueError, match="names axis 'sp'"):
        shard(x, "[B@sp, D]", "tp=2")
    with pytest.raises(ValueError, match="has 1 dimensions; the tensor has 2"):
        shard(x, "[B@tp]", "tp=2")
    with pytest.raises(ValueError, match="has 2 devices; got 3 blocks"):
        assemble([x, x, x], "[B, D]", "tp=2")
    with pytest.raises(ValueError, match="cannot read mesh"):
        shard(x, "[B, D]", "tp 2")


def test_tolerance_is_the_least_precise_dtypes_bound(megatron):
    assert tolerance(megatron) == 1e-4
    assert tolerance("dim B=4\ninput x[B] : bf16\ny[B] = x[B]\noutput y\n") == 5e-2
    assert tolerance(megatron, precision="default") == 5e-2


def test_loading_the_plugin_imports_neither_numpy_nor_hypothesis():
    code = ("import sys, einpar.testing.pytest_plugin; "
            "print(sorted({'numpy', 'hypothesis', 'jax'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60).stdout.strip() == "[]"


def test_uneven_outputs_are_compared_by_their_real_part():
    """D=2 over tp=4: blocks of 1, devices 2 and 3 hold only padding, which no output keeps;
    and relayouts draws padded layouts by default."""
    text = "mesh tp=4\ndim D=2 F=3\ninput x[D@tp, F]\ny[D, F@tp] = 2 * x[D, F]\noutput y\n"
    assert_equivalent(text, backends=("numpy",))
    assert_equivalent(text, backends=("numpy",), layouts={"y": "[D@tp, F]"})
    drawn = []

    @settings(max_examples=20, deadline=None, database=None, derandomize=True)
    @given(relayouts(text))
    def draw(relayout):
        drawn.append(relayout)
        assert_equivalent(text, layouts=relayout, backends=("numpy",))

    draw()
    assert any(layout and "@tp" in layout for relayout in drawn for layout in relayout.values())
