"""The shape-aware matmul model (cost_model/matmul.py) and the fp8 peak."""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einpar import api
from einpar.cost_model.cluster import Efficiency, preset
from einpar.cost_model.compute import matmul_time, op_time, peak_flops, prices_by_shape
from einpar.cost_model.hardware import A100, B200, H100, TPU_V5E
from einpar.cost_model.matmul import (DEFAULT_FIT, GEMM_CHIPS, GemmShape, einsum_gemms, gemm_fit,
                                      gemm_math_time)
from einpar.flops import op_flops


def _einsum(statement: str, dims: str, inputs: str):
    """The first op of a one-statement program, and the program's index sizes."""
    text = f"dim {dims}\n{inputs}\n{statement}\noutput c\n"
    program = api.compile_source(text, "shape.ein")
    return program.ops[0], program.dim_sizes


@pytest.mark.parametrize("statement, dims, inputs, expected", [
    # a plain matmul: M the first operand's kept index, N the second's, K the summed one
    ("c[I,K] = a[I,J] * b[J,K]", "I=8 J=16 K=32", "input a[I,J]\ninput b[J,K]",
     [GemmShape(8, 32, 16, 1)]),
    # several indices on each side multiply: M = B·S, N = H·E, K = D
    ("c[B,S,H,E] = x[B,S,D] * w[D,H,E]", "B=2 S=3 D=5 H=7 E=11",
     "input x[B,S,D]\ninput w[D,H,E]", [GemmShape(6, 77, 5, 1)]),
    # two summed indices: K is their product
    ("c[I,K] = a[I,J,L] * b[J,L,K]", "I=2 J=3 L=4 K=5", "input a[I,J,L]\ninput b[J,L,K]",
     [GemmShape(2, 5, 12, 1)]),
    # batched (attention scores): the indices kept in both are the batch
    ("c[B,H,Q,T] = q[B,H,Q,D] * k[B,H,T,D]", "B=2 H=4 Q=8 T=16 D=32",
     "input q[B,H,Q,D]\ninput k[B,H,T,D]", [GemmShape(8, 16, 32, 8)]),
    # a one-operand sum and an elementwise product are no GEMM
    ("c[I] = a[I,J]", "I=4 J=8", "input a[I,J]", []),
    ("c[I,J] = a[I,J] * b[I,J]", "I=4 J=8", "input a[I,J]\ninput b[I,J]", []),
])
def test_gemm_shape_of_an_einsum(statement, dims, inputs, expected):
    op, sizes = _einsum(statement, dims, inputs)
    assert einsum_gemms(op, sizes) == expected


def test_a_chain_of_three_is_a_gemm_per_step_of_its_path():
    # with I small opt_einsum contracts x·v first, then w with that product (the path puts a
    # step's result last: w[K,L] is the step's first operand, so M = L and N = I)
    op, sizes = _einsum("c[I,L] = x[I,J] * v[J,K] * w[K,L]", "I=2 J=64 K=64 L=64",
                        "input x[I,J]\ninput v[J,K]\ninput w[K,L]")
    gemms = einsum_gemms(op, sizes)
    assert gemms == [GemmShape(2, 64, 64, 1), GemmShape(64, 2, 64, 1)]
    assert sum(g.flops for g in gemms) == op_flops(op, sizes)


# ---- the model, by hand

def test_a100_4096_cubed_by_hand():
    sms, fit = gemm_fit(A100.name, "f16")
    assert sms.value == 108
    assert (fit.sustained.value, fit.block.value, fit.launch.value) == (0.83, 4.0e-6, 0.0)
    # 128x128 tiles: 32·32 = 1024 tiles in 10 waves of 108; 128x256: 512 tiles in 5 waves of
    # twice the work. 128x128 wins on the fixed cost: 10 waves of 2·128·128·4096 FLOPs at
    # 312e12·0.83/108 per SM and 4 us each (128x256: 5 waves of twice the FLOPs, 4 us each:
    # the same FLOP time, half the fixed cost; so 128x256 wins).
    per_sm = 312e12 * 0.83 / 108
    expected = 5 * (2 * 128 * 256 * 4096 / per_sm + 4.0e-6)
    assert gemm_math_time(GemmShape(4096, 4096, 4096), 312e12, 108, fit) == pytest.approx(expected)


def test_a_small_c_splits_k():
    _, fit = gemm_fit(H100.name, "fp8")
    assert (fit.sustained.value, fit.block.value, fit.launch.value) == (0.735, 2.8e-6, 3.5e-6)
    per_sm = 1979e12 * 0.735 / 132
    # C is one 128x128 tile and K = 65536: splits of 1, 2, ..., 128 blocks all fit in one wave
    # of 132 SMs, so the most (128 blocks of 512 of K each) is fastest; 256 would take two.
    expected = 3.5e-6 + 2 * 128 * 128 * 512 / per_sm + 2.8e-6
    assert gemm_math_time(GemmShape(128, 128, 65536), 1979e12, 132, fit) == \
        pytest.approx(expected)
    # the same without splitting would be 128 times the FLOP time
    assert expected < 3.5e-6 + 2.8e-6 + 2 * 128 * 128 * 65536 / per_sm / 100


def test_the_fit_reproduces_the_held_out_azure_table():
    # 4096^3 fp16 on A100 (Azure ND A100 v4: 228.0 TFLOP/s) is in the held-out half.
    cost = matmul_time(preset("a100x8"), GemmShape(4096, 4096, 4096), "f16", 2)
    assert cost.bound == "compute"
    assert cost.flops / cost.time_s / 1e12 == pytest.approx(228.0, rel=0.05)


# ---- laws

FITS = [(chip.sms.value, fit) for chip in GEMM_CHIPS.values() for fit in chip.fits.values()]
sizes = st.integers(1, 40000)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FITS), sizes, sizes, sizes, st.integers(1, 64),
       st.sampled_from(["m", "n", "k", "batch"]), st.integers(1, 5000))
def test_a_bigger_gemm_never_takes_less_time(chip_fit, m, n, k, batch, which, more):
    sms, fit = chip_fit
    shape = GemmShape(m, n, k, batch)
    bigger = dataclasses.replace(shape, **{which: getattr(shape, which) + more})
    assert gemm_math_time(bigger, 1e15, int(sms), fit) >= gemm_math_time(shape, 1e15, int(sms), fit)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FITS), sizes, sizes, sizes, st.integers(1, 64))
def test_no_gemm_beats_the_sustained_fraction_of_peak(chip_fit, m, n, k, batch):
    sms, fit = chip_fit
    shape = GemmShape(m, n, k, batch)
    efficiency = shape.flops / (1e15 * gemm_math_time(shape, 1e15, int(sms), fit))
    assert 0 < efficiency <= fit.sustained.value


# ---- where the model applies, and the fp8 peak

def test_fp8_contractions_run_at_the_fp8_peak():
    assert peak_flops(H100, "f8e4m3", True) == ("fp8", 1979e12)
    assert peak_flops(B200, "f8e5m2", True) == ("fp8", 4500e12)
    assert peak_flops(A100, "f8e4m3", True) == ("bf16", 312e12)  # no fp8 units: upcast
    assert peak_flops(H100, "f8e4m3", False) == ("bf16", 989e12)  # elementwise: not tensor cores
    fp8 = matmul_time(preset("h100x8"), GemmShape(8192, 8192, 8192), "f8e4m3", 1, 2)
    bf16 = matmul_time(preset("h100x8"), GemmShape(8192, 8192, 8192), "bf16", 2)
    assert (fp8.peak_dtype, fp8.peak, bf16.peak_dtype) == ("fp8", 1979e12, "bf16")
    assert fp8.time_s < bf16.time_s


def test_measured_tables_and_tpus_keep_their_step_tables():
    op, sizes = _einsum("c[I,K] = a[I,J] * b[J,K]", "I=4096 J=4096 K=4096",
                        "input a[I,J]\ninput b[J,K]")
    flops = op_flops(op, sizes)
    h100 = preset("h100x8")
    assert prices_by_shape(h100) and not prices_by_shape(preset("tpu-v5e:2x4"))
    measured = dataclasses.replace(h100, efficiency=Efficiency(
        matrix=((0, 0.5),), vector=((0, 0.5),), memory=((0, 0.5),), source="measured"))
    assert not prices_by_shape(measured)
    cost = op_time(op, flops, 0, measured, "highest", sizes)
    assert cost.math_s == pytest.approx(flops / (66.9e12 * 0.5))
    tpu = op_time(op, flops, 0, preset("tpu-v5e:2x4"), "default", sizes)
    # 137 GFLOP: Calculon's step of 128 GFLOP and more, 0.95
    assert tpu.math_s == pytest.approx(flops / (TPU_V5E.peak_flops["bf16"].value * 0.95))
    shaped = op_time(op, flops, 0, h100, "highest", sizes)
    _, fit = gemm_fit(H100.name, "f32")
    assert shaped.math_s == pytest.approx(gemm_math_time(GemmShape(4096, 4096, 4096), 66.9e12,
                                                         132, fit))


def test_a_chip_without_data_takes_the_default_fit():
    sms, fit = gemm_fit("some future GPU", "bf16")
    assert (sms.value, fit) == (132, DEFAULT_FIT)
    assert all("fit half" in f.source for f in (fit.sustained, fit.block, fit.launch))
    assert math.isclose(gemm_fit(B200.name, "bf16")[0].value, 148)


# ---- flash attention's efficiency (cost_model/attention.py)

def test_flash_attention_efficiency_by_hand():
    from einpar.cost_model.attention import DEFAULT_EFFICIENCY, AttentionShape, attention_efficiency
    shape = AttentionShape(batch=16, seq_q=4096, seq_k=4096, head_dim=128, value_dim=128)
    # H100 is priced with FlashAttention-3: top 0.639 at head_dim 128, L0 = 240 keys
    h100 = attention_efficiency(preset("h100x8"), "bf16", shape)
    assert h100.value == pytest.approx(0.639 * 4096 / (4096 + 240))
    assert "fit half" in h100.source
    # causal: a query sees half the keys on average
    causal = attention_efficiency(preset("h100x8"), "bf16", dataclasses.replace(shape, causal=True))
    assert causal.value == pytest.approx(0.639 * 2048 / (2048 + 240))
    # head_dim 96 has no figure: the nearest one's, and 96 is as far from 64 as from 128, so
    # the smaller (the lower efficiency) wins the tie
    d96 = attention_efficiency(preset("h100x8"), "bf16", dataclasses.replace(shape, head_dim=96))
    assert d96.value == pytest.approx(0.428 * 4096 / (4096 + 240))
    # a named kernel, and a chip without data
    flash2 = attention_efficiency(preset("h100x8"), "bf16", shape, kernel="flash2")
    assert flash2.value == pytest.approx(0.309 * 4096 / (4096 + 64))
    assert attention_efficiency(preset("a100x8"), "bf16", shape) == DEFAULT_EFFICIENCY


def test_a_small_flash_attention_pays_a_kernel_launch():
    from einpar.cost_model.attention import AttentionShape, flash_attention_time
    h100 = preset("h100x8")
    shape = AttentionShape(batch=1, seq_q=16, seq_k=16, head_dim=64, value_dim=64)
    flops = 4 * 16 * 16 * 64
    time = flash_attention_time(h100, "bf16", shape, flops, 4 * 16 * 64 * 2)
    launch = gemm_fit("H100-SXM", "bf16")[1].launch.value
    assert time.math_s >= launch > 0
    # a calibrated host has no such launch of its own
    assert flash_attention_time(preset("tpu-v5e:2x2"), "bf16", shape, flops, 1).math_s < launch


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1 << 17), st.integers(1, 1 << 17), st.sampled_from([64, 96, 128, 256]),
       st.booleans())
def test_longer_keys_never_lower_flash_attention_efficiency(seq_k, more, head_dim, causal):
    from einpar.cost_model.attention import AttentionShape, attention_efficiency
    h100 = preset("h100x8")
    shape = AttentionShape(8, 1024, seq_k, head_dim, head_dim, causal)
    longer = dataclasses.replace(shape, seq_k=seq_k + more)
    low, high = (attention_efficiency(h100, "bf16", s).value for s in (shape, longer))
    assert 0 < low <= high < 1


# ---- the constants are the fit of the published data's fit half

KERNELS = Path(__file__).resolve().parent.parent / "bench" / "published" / "kernels"


def _bench():
    spec = importlib.util.spec_from_file_location(
        "published_kernels", KERNELS.parent.parent / "published_kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_constants_are_the_fit_of_the_fit_half():
    bench = _bench()
    rows = bench.read_rows(KERNELS)
    for (chip, dtype), (fit, _, _) in bench.fit_matmul(rows).items():
        [held] = [f for name, c in GEMM_CHIPS.items() if name == chip for d, f in c.fits.items()
                  if d == dtype]
        assert (held.sustained.value, held.block.value, held.launch.value) == pytest.approx(
            (fit.sustained.value, fit.block.value, fit.launch.value), abs=1e-9), (chip, dtype)
    from einpar.cost_model.attention import ATTENTION_FITS
    for (chip, kernel, direction), (overhead, tops, _, _, _) in bench.fit_attention(rows).items():
        held = ATTENTION_FITS[(chip, kernel)]
        assert held.keys_overhead[direction].value == overhead
        for (dtype, direction, head_dim), top in tops.items():
            assert held.top[(dtype, direction)][head_dim].value == pytest.approx(top, abs=5e-4)


def test_held_out_kernels_within_15_percent():
    for entry in _bench().report(KERNELS):
        if entry["half"] == "held_out":
            assert entry["median_abs_error"] < 0.15, entry
