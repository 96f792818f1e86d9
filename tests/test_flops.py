"""FLOP counts of n-ary contractions, and the path behind them, which every backend runs.

The count is einpar's convention (einpar/flops.py): 2 FLOPs per point of a
pairwise step that sums an index, 1 of one that only multiplies, along the
path opt_einsum's search picks. The backends run that same path on the
shapes they hold, so `check`, `cost` and the devices agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import opt_einsum
import pytest

from einpar import api
from einpar.backends import reference
from einpar.cli import main
from einpar.flops import contraction_flops, contraction_path, einsum_path, op_flops, program_flops
from einpar.ir import Einsum, walk_ops
from einpar.spmd import LocalStep, local_flops

SWIGLU = """\
mesh tp=2
dim B={B} S={S} D={D} F={F}
input gate[B, S, F@tp]
input n[B, S, D]
param wu[D, F@tp]
h[B,S,F@tp] = gate[B,S,F] * (n[B,S,D] * wu[D,F])
output h
"""

# a @ b @ c @ d, cheapest as (a b)(c d): two narrow products, then a small one.
CHAIN = """\
dim A=2 B=64 C=2 D=64 E=2
input a[A, B]
input b[B, C]
input c[C, D]
input d[D, E]
y[A,E] = a[A,B] * b[B,C] * c[C,D] * d[D,E]
output y
"""


def swiglu(B=2, S=8, D=16, F=32):
    return api.compile_source(SWIGLU.format(B=B, S=S, D=D, F=F), "swiglu.ein")


def the_einsum(program) -> Einsum:
    [op] = [op for op in walk_ops(program.ops) if isinstance(op, Einsum)]
    return op


def test_swiglu_counts_the_up_projection_and_the_gate_multiply():
    B, S, D, F = 8, 2048, 4096, 16384
    program = swiglu(B, S, D, F)
    assert len(the_einsum(program).operands) == 3  # one three-operand einsum
    # n·wu: 2 FLOPs per point of [B,S,D,F]; then gate times that: 1 per point of [B,S,F].
    assert program_flops(program) == 2 * B * S * D * F + B * S * F


def test_the_transformer_example_in_check_equals_the_hand_count(capsys):
    assert main(["check", "examples/transformer/block.ein", "--json", "--set", "B=8", "S=2048",
                 "D=4096", "F=16384", "K=128", "H=32"]) == 0
    # Per layer, by hand: attention projections 4 · 2BSDHK, scores and values 2 · 2BSTHK,
    # the softmax 5BHST, the scale 2BHST (`/ sqrt(K)`: the count takes sqrt per element); the
    # MLP 3 · 2BSDF, silu and the gate 2BSF; two rmsnorms with their g 2 · 4BSD; two residual
    # adds 2BSD.
    B, S, D, F, H, K, L = 8, 2048, 4096, 16384, 32, 128, 2
    T = S
    layer = (4 * 2 * B * S * D * H * K + 2 * 2 * B * S * T * H * K + 7 * B * H * S * T
             + 3 * 2 * B * S * D * F + 2 * B * S * F + 2 * 4 * B * S * D + 2 * B * S * D)
    assert json.loads(capsys.readouterr().out)["flops"] == L * layer


def test_a_four_operand_chain_takes_the_cheapest_order():
    program = api.compile_source(CHAIN, "chain.ein")
    op = the_einsum(program)
    assert len(op.operands) == 4
    A, B, C, D, E = 2, 64, 2, 64, 2
    # (a b) -> [A,C], (c d) -> [C,E], then [A,C](C,E) -> [A,E]; every step sums one index.
    assert program_flops(program) == 2 * (A * B * C + C * D * E + A * C * E)
    sizes = dict(program.dims)
    _, info = opt_einsum.contract_path("ab,bc,cd,de->ae", *[(A, B), (B, C), (C, D), (D, E)],
                                       shapes=True, optimize="optimal")
    assert op_flops(op, sizes) == info.opt_cost  # the same convention as opt_einsum's
    assert einsum_path(op, sizes) == ((0, 1), (0, 1), (0, 1))


def test_many_operands_sharing_indices_take_the_greedy_search():
    """Dynamic programming is exponential when every operand shares an index with every
    other (13 such operands took 27 s to plan): past 8 operands the path is opt_einsum's
    greedy one."""
    n = 13
    operands = tuple(tuple(f"I{min(i, j)}_{max(i, j)}" for j in range(n) if j != i)
                     for i in range(n))
    sizes = {index: 2 for operand in operands for index in operand}
    symbols = {index: opt_einsum.get_symbol(k) for k, index in enumerate(sizes)}
    spec = ",".join("".join(symbols[i] for i in o) for o in operands) + "->"
    greedy, _ = opt_einsum.contract_path(spec, *[(2,) * (n - 1)] * n, shapes=True,
                                         optimize="greedy")
    assert contraction_path(operands, (), sizes) == tuple(tuple(step) for step in greedy)


def test_a_pairwise_path_counts_as_opt_einsum_counts_it():
    operands = (("i", "j"), ("j", "k"), ("k", "l"), ("l", "m"), ("m", "n"), ("n", "i"))
    sizes = dict(zip("ijklmn", (3, 50, 4, 60, 5, 70)))
    path = contraction_path(operands, (), sizes)
    spec = "ij,jk,kl,lm,mn,ni->"
    shapes = [tuple(sizes[i] for i in o) for o in operands]
    _, info = opt_einsum.contract_path(spec, *shapes, shapes=True, optimize=list(path))
    assert contraction_flops(operands, (), sizes) == info.opt_cost


def test_the_path_does_not_depend_on_hash_seeds():
    code = ("from einpar.flops import contraction_path;"
            "o=(('i','j'),('j','k'),('k','l'),('l','m'),('m','n'),('n','i'));"
            "print(contraction_path(o, ('i',), dict(i=8, j=8, k=8, l=8, m=8, n=8)))")
    paths = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": seed}).stdout
             for seed in ("0", "1", "2")}
    assert len(paths) == 1


def recorded_einsums(monkeypatch) -> list:
    """Every np.einsum the NumPy backends call: (subscripts, operand shapes, optimize)."""
    calls = []
    real = np.einsum

    def einsum(subscripts, *arrays, optimize=False, **kwargs):
        calls.append((subscripts, [a.shape for a in arrays], optimize))
        return real(subscripts, *arrays, optimize=optimize, **kwargs)

    monkeypatch.setattr(reference.np, "einsum", einsum)
    return calls


def test_the_reference_runs_the_path_check_counts(monkeypatch):
    program = swiglu()
    op = the_einsum(program)
    calls = recorded_einsums(monkeypatch)
    reference.evaluate(program, api.random_inputs(program, 0))
    [(_, shapes, optimize)] = calls
    assert optimize == ["einsum_path", *einsum_path(op, dict(program.dims))]
    assert optimize == ["einsum_path", (1, 2), (0, 1)]


def test_each_simulated_device_runs_the_path_the_cost_model_counts(monkeypatch):
    program = swiglu()
    spmd = api.compile_spmd(program)
    [step] = [s for s in spmd.steps if isinstance(s, LocalStep) and isinstance(s.op, Einsum)]
    calls = recorded_einsums(monkeypatch)
    api.run_simulated(program)
    assert len(calls) == spmd.mesh.num_devices
    local = {i: n for o in step.op.operands
             for i, n in zip(o.indices, spmd.values[o.value].local_shape(spmd.mesh))}
    assert local["F"] == 16  # F is split over tp=2: the devices hold local blocks
    for subscripts, shapes, optimize in calls:
        sizes = {i: n for o, shape in zip(step.op.operands, shapes) for i, n in zip(o.indices, shape)}
        assert sizes == local
        assert optimize == ["einsum_path", *einsum_path(step.op, local)]
        # What a device computes along that path is what the cost model counts for it.
        assert contraction_flops(tuple(o.indices for o in step.op.operands),
                                 step.op.result.type.indices, sizes, tuple(optimize[1:])) \
            == local_flops(spmd)


def test_the_emitted_jax_passes_the_counted_path():
    program = swiglu()
    spmd = api.compile_spmd(program)
    text = api.emit_jax(program)
    [step] = [s for s in spmd.steps if isinstance(s, LocalStep) and isinstance(s.op, Einsum)]
    local = {i: n for o in step.op.operands
             for i, n in zip(o.indices, spmd.values[o.value].local_shape(spmd.mesh))}
    per_device, _, whole = text.partition("def global_program")
    assert f"optimize={list(einsum_path(step.op, local))!r}" in per_device.split("def per_device")[1]
    assert f"optimize={list(einsum_path(the_einsum(program), dict(program.dims)))!r}" in whole


def test_jax_runs_the_swiglu_as_the_reference_computes_it():
    program = swiglu()
    inputs = api.random_inputs(program, 0)
    expected = reference.evaluate(program, inputs)["h"]
    result = api.run_jax(program, inputs, warmup=0, repeat=1)
    np.testing.assert_allclose(result.outputs["h"], expected, rtol=1e-5, atol=1e-5)
    simulated, _ = api.run_simulated(program, inputs)
    np.testing.assert_allclose(simulated["h"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cluster", ["h100x8", "tpu-v5e:2x4"])
def test_cost_counts_the_flops_check_counts(cluster, capsys):
    program = swiglu(8, 2048, 4096, 16384)
    from einpar.cost_model.cluster import preset
    from einpar.cost_model.estimate import estimate

    result = estimate(program, api.compile_spmd(program), preset(cluster))
    assert result.model_flops == program_flops(program)
    # F splits over tp=2 and nothing is computed twice: the devices share the count exactly.
    assert result.flops_per_device * result.devices == program_flops(program)
