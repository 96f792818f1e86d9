"""Accelerator presets: the figures of the reference notes, each with a source."""

import pytest

from einpar.cost_model.hardware import ACCELERATORS, Figure, accelerator

# The reference notes' table of recommended defaults (cost_model_notes.md, section 6):
# bf16 dense TFLOP/s, HBM GB, HBM TB/s, scale-up GB/s per device, scale-out GB/s per device.
TABLE = {
    "A100-SXM-80GB": (312, 80, 2.039, 300, 25),
    "H100-SXM": (989, 80, 3.35, 450, 50),
    "H200": (989, 141, 4.8, 450, 50),
    "B200": (2250, 192, 8.0, 900, 50),
    "TPU-v4": (275, 32 * 2**30 / 1e9, 1.2, 45 * 6, None),
    "TPU-v5e": (197, 16, 0.819, 45 * 4, 25 / 8),
    "TPU-v5p": (459, 95, 2.765, 90 * 6, 25 / 4),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_presets_carry_the_reference_figures(name):
    chip = ACCELERATORS[name]
    bf16, hbm_gb, hbm_tbs, scale_up_gbs, scale_out_gbs = TABLE[name]
    assert chip.peak("bf16").value == pytest.approx(bf16 * 1e12)
    assert chip.hbm_capacity.value == pytest.approx(hbm_gb * 1e9)
    assert chip.hbm_bandwidth.value == pytest.approx(hbm_tbs * 1e12)
    assert chip.scale_up_bandwidth_per_chip == pytest.approx(scale_up_gbs * 1e9)
    if scale_out_gbs is None:
        assert chip.scale_out_bandwidth is None
    else:
        assert chip.scale_out_bandwidth.value == pytest.approx(scale_out_gbs * 1e9)


@pytest.mark.parametrize("name", sorted(ACCELERATORS))
def test_every_figure_names_its_source(name):
    chip = ACCELERATORS[name]
    figures = [value for value in vars(chip).values() if isinstance(value, Figure)]
    figures += list(chip.peak_flops.values())
    assert len(figures) >= 6  # peaks, HBM capacity and bandwidth, scale-up bandwidth, latency, domain
    assert all(figure.source and figure.value > 0 for figure in figures)


def test_ridge_points_match_the_scaling_book():
    # Arithmetic intensity where a bf16 matmul turns compute-bound: about 295 on H100
    # (990e12 / 3.35e12, gpus.md) and about 240 on TPU v5e (1.97e14 / 8.2e11, roofline.md).
    h100, v5e = accelerator("h100"), accelerator("tpu-v5e")
    assert h100.peak("bf16").value / h100.hbm_bandwidth.value == pytest.approx(295, rel=0.01)
    assert v5e.peak("bf16").value / v5e.hbm_bandwidth.value == pytest.approx(240, rel=0.01)


def test_lookup_by_alias_and_clear_errors():
    assert accelerator("H100") is accelerator("h100-sxm") is ACCELERATORS["H100-SXM"]
    with pytest.raises(KeyError, match="no accelerator preset 'h300'"):
        accelerator("h300")
    with pytest.raises(KeyError, match="TPU-v5e has no published peak for f32"):
        accelerator("tpu-v5e").peak("f32")
