"""Fusion (cost_model/fusion.py): the fused regions of every example as golden files, flash
attention's pricing, `--fusion none` as the unfused pricing, and a fused region never costing
more than its steps priced alone."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from einpar import api
from einpar.cli import main
from einpar.cost_model.attention import (DEFAULT_EFFICIENCY, AttentionShape, attention_efficiency,
                                         flash_attention_time)
from einpar.cost_model.cluster import preset
from einpar.cost_model.estimate import estimate
from einpar.cost_model.fusion import FusedStep, format_fusion, fuse, fused_regions
from einpar.cost_model.regions import Node, group, is_contraction
from einpar.explain import explain
from einpar.spmd import CollectiveStep, RepeatStep

from helpers import EXAMPLES, GOLDENS, ROOT, golden_path

EXAMPLES_DIR = ROOT / "examples"


def regions_of(text: str, file: str = "<test>") -> list[FusedStep]:
    return fused_regions(fuse(api.compile_spmd(api.compile_source(text, file))))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_fused_regions_match_their_golden_file(example, golden, monkeypatch):
    monkeypatch.chdir(ROOT)
    spmd = api.compile_spmd(api.load(example.relative_to(ROOT)))
    golden(golden_path(example, ".fusion"), format_fusion(fuse(spmd)) + "\n")


def test_every_fusion_golden_has_its_example():
    expected = {golden_path(example, ".fusion").name for example in EXAMPLES}
    assert {path.name for path in GOLDENS.glob("*.fusion")} <= expected


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.parent.name == "attention"],
                         ids=lambda p: p.stem)
def test_every_attention_example_is_one_flash_attention_region(example):
    regions = fused_regions(fuse(api.compile_spmd(api.load(example))))
    assert [region.kind for region in regions] == ["flash_attention"]
    assert regions[0].writes == ("o",)


# ---- flash attention: no S×T traffic, no S×T memory

def test_flash_attention_prices_q_k_v_and_output_only():
    program = api.load("examples/attention/data_parallel.ein")
    spmd = api.compile_spmd(program)
    cluster = preset("h100x8")
    fused, alone = (estimate(program, spmd, cluster, fusion=mode) for mode in ("auto", "none"))
    # One device: B=1 of 8, S=T=128, H=8, K=32, f32.
    x, weight = 1 * 128 * 256 * 4, 256 * 8 * 32 * 4
    head, scores, row = 1 * 128 * 8 * 32 * 4, 1 * 8 * 128 * 128 * 4, 1 * 8 * 128 * 4
    flash = next(op for op in fused.ops if op.region == "flash_attention")
    assert flash.hbm_bytes == 4 * head  # q, k, v read; o written
    members = [op for op in alone.ops if op.name in ("p.1", "p.2", "p.max", "p.exp", "p.sum", "p",
                                                     "o")]
    assert flash.flops == sum(op.flops for op in members)
    shape = AttentionShape(batch=8, seq_q=128, seq_k=128, head_dim=32, value_dim=32)
    expected = flash_attention_time(cluster, "f32", shape, flash.flops, 4 * head)
    assert flash.compute_s == expected.time_s
    # The unfused steps move the scores through HBM ten times: the scores einsum writes
    # them, the scale reads and writes them, max reads them, exp reads and writes, sum
    # reads, divide reads and writes, the weighted sum reads them; and the rows four times.
    unfused_bytes = sum(op.hbm_bytes for op in members)
    assert unfused_bytes == 10 * scores + 4 * row + 4 * head
    assert alone.hbm_bytes_per_device - fused.hbm_bytes_per_device == 10 * scores + 4 * row
    assert fused.compute_s == pytest.approx(alone.compute_s - sum(op.compute_s for op in members)
                                            + expected.time_s)
    # Memory: unfused, the peak holds two score matrices; fused, none.
    assert alone.peak_memory_bytes == x + 4 * weight + head + 2 * scores + row
    assert fused.peak_memory_bytes == x + 4 * weight + 4 * head


def test_attention_at_32k_tokens_fits_only_fused():
    program = api.load("examples/attention/data_parallel.ein", {"S": 32768, "T": 32768})
    spmd = api.compile_spmd(program)
    fused, alone = (estimate(program, spmd, preset("tpu-v5e:2x4"), fusion=mode)
                    for mode in ("auto", "none"))
    scores = 1 * 8 * 32768 * 32768 * 4
    assert alone.peak_memory_bytes - fused.peak_memory_bytes == 2 * scores + 8 * 32768 * 4 - \
        3 * 32768 * 8 * 32 * 4
    assert fused.fits and not alone.fits
    assert fused.step_time_s < alone.step_time_s


# ---- programs written elsewhere: other names, masks, kept probabilities

MASKED = """\
mesh tp=2
dim  N=4 Q=64 KV=Q E=16 F=16
input qq[N@tp, Q, E]
input kk[N@tp, KV, E]
input vv[N@tp, KV, F]
input keep[Q, KV]
w[N,Q,KV]   = where(keep[Q,KV] > 0, qq[N,Q,E] * kk[N,KV,E] * 0.25, -1000000000.0)
a[N,Q,KV]   = softmax[KV](w[N,Q,KV])
out[N,Q,F]  = a[N,Q,KV] * vv[N,KV,F]
output out
"""


def test_a_masked_attention_with_other_names_is_flash_attention():
    (region,) = regions_of(MASKED)
    assert region.kind == "flash_attention"
    assert set(region.reads) == {"qq", "kk", "vv", "keep"} and region.writes == ("out",)
    assert region.shape == AttentionShape(batch=2, seq_q=64, seq_k=64, head_dim=16, value_dim=16)


def test_probabilities_kept_as_an_output_are_not_flash_attention():
    text = MASKED.replace("output out", "output out\noutput a")
    assert [region.kind for region in regions_of(text)] == ["fused"]


def test_a_mask_computed_from_inputs_is_read_not_fused_into_attention():
    text = MASKED.replace("input keep[Q, KV]", "input bias[Q, KV]").replace(
        "w[N,Q,KV]   = where(keep[Q,KV] > 0,",
        "keep[Q,KV] = exp(bias[Q,KV])\nw[N,Q,KV]   = where(keep[Q,KV] > 0,")
    regions = regions_of(text)
    assert [region.kind for region in regions] == ["flash_attention"]
    assert "keep" in regions[0].reads


def test_a_reduction_whose_key_index_is_on_one_operand_only_is_not_attention():
    # The summed index S is on h8 alone: no probabilities to match (found by
    # test_any_program_prices_consistently).
    text = """mesh dp=2
dim B=2 S=4 D=2
input x1[S]
input x5[B, S, D]
input x6[D]
h4[B] = x5[B, S, D] * x6[D] * x1[S]
h8[S] = x1[S]
h10[B] = sum[S](h8[S] * (h4[B] > 0.5))
output h10
"""
    assert all(region.kind == "fused" for region in regions_of(text))


def test_a_gelu_mlp_is_not_attention():
    assert regions_of((ROOT / "examples/mlp/megatron.ein").read_text()) == []


def test_a_region_never_crosses_a_collective():
    # transformer/block: the residual x#2 fuses with the norm after it, but not with x#3,
    # which needs a reduce-scatter of what that norm feeds.
    (repeat,) = fuse(api.compile_spmd(api.load("examples/transformer/block.ein"))).steps
    names = [step.names for step in repeat.body if isinstance(step, FusedStep)]
    assert ("x#2", "n.1.square", "n.1.sumsq", "n.1", "n") in names
    assert not any("x#3" in region for region in names)


def test_grouping_sees_only_reads_and_writes():
    # a -> b -> c fuse; d (not fusible) sits between c and e, so e cannot join them even
    # though it reads b.
    nodes = [Node((), ("a",), True), Node(("a",), ("b",), True), Node(("b",), ("c",), True),
             Node(("c",), ("d",), False), Node(("b", "d"), ("e",), True)]
    assert group(nodes) == [(0, 1, 2), (3,), (4,)]


# ---- --fusion none is the unfused pricing

def test_fusion_none_prices_as_before(golden, monkeypatch):
    # The golden file was written by the pricing before fusion existed (every step alone).
    monkeypatch.chdir(ROOT)
    lines = []
    for example in EXAMPLES:
        program = api.load(example.relative_to(ROOT))
        spmd = api.compile_spmd(program)
        for overlap in (False, True):
            result = estimate(program, spmd, preset("h100x8"), overlap=overlap, fusion="none")
            assert not any(op.region for op in result.ops)
            lines.append(f"{example.relative_to(ROOT)} overlap={overlap} step={result.step_time_s!r} "
                         f"peak={result.peak_memory_bytes} hbm={result.hbm_bytes_per_device} "
                         f"compute={result.compute_s!r}")
    golden(GOLDENS / "unfused_costs.txt", "\n".join(lines) + "\n")


def test_cli_fusion_flag(capsys):
    assert main(["cost", "examples/attention/tensor_parallel.ein", "--cluster", "h100x8",
                 "--json", "--fusion", "none"]) == 0
    unfused = json.loads(capsys.readouterr().out)
    assert unfused["fusion"] == "none" and all(op["region"] is None for op in unfused["per_op"])
    assert main(["cost", "examples/attention/tensor_parallel.ein", "--cluster", "h100x8",
                 "--json"]) == 0
    fused = json.loads(capsys.readouterr().out)
    (flash,) = [op for op in fused["per_op"] if op["region"]]
    assert flash["region"]["kind"] == "flash_attention"
    assert flash["op"] == "flash_attention(q, k, v -> o)"
    assert [m.split(" = ")[0] for m in flash["region"]["members"]] == \
        ["s.1", "s", "m", "e", "p.1", "p", "o"]
    assert main(["cost", "examples/attention/tensor_parallel.ein", "--cluster", "h100x8",
                 "--fusion", "some"]) == 2


# ---- a fused region never costs more than its parts

UNARY = ["exp({})", "relu({})", "({} * 2.0)", "tanh({})", "square({})"]


@st.composite
def chains(draw):
    rows, cols = draw(st.sampled_from([(8, 8), (64, 128), (512, 1024), (1024, 2048), (2048, 1536)]))
    lines = ["mesh dp=1", f"dim I={rows} J={cols}", "input x[I, J]"]
    full, reduced = ["x"], []
    for step in range(draw(st.integers(1, 7))):
        name = f"v{step}"
        kind = draw(st.sampled_from(["unary", "reduce", "broadcast", "binary"]))
        if kind == "reduce":
            source = draw(st.sampled_from(full))
            lines.append(f"{name}[I] = {draw(st.sampled_from(['sum', 'max']))}[J]({source}[I,J])")
            reduced.append(name)
            continue
        if kind == "broadcast" and reduced:
            lines.append(f"{name}[I,J] = {draw(st.sampled_from(full))}[I,J] - "
                         f"{draw(st.sampled_from(reduced))}[I]")
        elif kind == "binary":
            lines.append(f"{name}[I,J] = {draw(st.sampled_from(full))}[I,J] + "
                         f"{draw(st.sampled_from(full))}[I,J]")
        else:
            lines.append(f"{name}[I,J] = " + draw(st.sampled_from(UNARY)).format(
                f"{draw(st.sampled_from(full))}[I,J]"))
        full.append(name)
    outputs = draw(st.lists(st.sampled_from(full[1:] + reduced or ["x"]), min_size=1, max_size=2,
                            unique=True))
    lines += [f"output {name}" for name in outputs]
    return "\n".join(lines) + "\n", draw(st.sampled_from(["h100x8", "a100x8", "tpu-v5e:2x4"]))


@settings(max_examples=60, deadline=None)
@given(chains())
def test_a_fused_region_never_costs_more_than_its_parts(case):
    text, cluster_name = case
    program = api.compile_source(text, "chain.ein")
    spmd = api.compile_spmd(program)
    cluster = preset(cluster_name)
    fused, alone = (estimate(program, spmd, cluster, fusion=mode) for mode in ("auto", "none"))
    alone_by_name = {op.name: op for op in alone.ops}
    for op in fused.ops:
        if op.region:
            parts = [alone_by_name[member.split(" = ")[0]] for member in op.members]
            assert op.compute_s <= sum(part.compute_s for part in parts) * (1 + 1e-12)
            assert op.hbm_bytes <= sum(part.hbm_bytes for part in parts)
            assert op.flops == sum(part.flops for part in parts)
    assert fused.compute_s <= alone.compute_s * (1 + 1e-12)
    assert fused.hbm_bytes_per_device <= alone.hbm_bytes_per_device
    # (Peak memory may grow: a multi-output region makes all its outputs at once.)


# ---- the backward pass: flash attention's backward and the elementwise chains

def _with_loss(example: str) -> str:
    """An attention example trained: its output's mean square is the loss."""
    text = (ROOT / example).read_text()
    lines = [line for line in text.splitlines() if not line.startswith("output")]
    return "\n".join(lines) + "\nl[] = mean[B,S,D](square(y[B,S,D]))\nloss l\n" \
                              "optimizer sgd lr=0.1\n"


def _flash(regions, kind):
    return [region for region in regions if region.kind == kind]


def test_the_attention_backward_is_one_region_in_the_remat_transformer():
    """megatron_selective recomputes the scores and probabilities (`remat`): the
    recomputation joins the backward region, which reads q, k, v and dO and writes dQ, dK,
    dV: the five matmuls of FlashAttention-2's backward (arXiv:2307.08691, Algorithm 2)."""
    regions = fused_regions(fuse(api.compile_spmd(
        api.load(EXAMPLES_DIR / "training" / "megatron_selective.ein"))))
    (forward,) = _flash(regions, "flash_attention")
    (backward,) = _flash(regions, "flash_attention_backward")
    assert forward.writes == ("o",)
    assert backward.reads == ("o.grad", "v", "q", "k")
    assert backward.writes == ("v.grad", "q.grad", "k.grad")
    assert backward.recomputed == ()  # the program recomputes them itself
    contractions = [m.op.result.name for m in backward.members if is_contraction(m.op)]
    assert contractions == ["p.grad", "s.1.remat", "v.grad", "q.grad", "k.grad"]
    assert backward.shape == AttentionShape(batch=8, seq_q=64, seq_k=64, head_dim=16,
                                            value_dim=16, direction="bwd")


def test_the_attention_backward_of_a_remat_loop_recomputes_from_the_row_statistics():
    """megatron_full's backward loop runs the layer again (its forward attention one flash
    region, now writing its row max and sum for the backward) and the backward region
    recomputes the scores and probabilities from q, k and those rows."""
    spmd = fuse(api.compile_spmd(api.load(EXAMPLES_DIR / "training" / "megatron_full.ein")))
    backward_loop = [step for step in spmd.steps if isinstance(step, RepeatStep)][1]
    regions = [step for step in backward_loop.body if isinstance(step, FusedStep)]
    (forward,) = _flash(regions, "flash_attention")
    (backward,) = _flash(regions, "flash_attention_backward")
    assert forward.writes == ("p.max.remat", "p.sum.remat", "o.remat")
    assert backward.recomputes == ("p.1.remat", "p.2.remat", "p.exp.remat", "p.remat")
    assert set(backward.reads) == {"q.remat", "k.remat", "v.remat", "o.grad", "p.max.remat",
                                   "p.sum.remat"}
    assert backward.writes == ("v.grad", "q.grad", "k.grad")


def test_flash_attention_backward_bytes_flops_time_and_memory():
    """Attention trained without remat: the forward region keeps o and the row statistics
    (m, the softmax's sum p.1), never an S×T value; the backward region reads q, k, v, dO and
    the rows, recomputes s.1, s, e, p, and is priced as one kernel at the backward's
    efficiency."""
    program = api.compile_source(_with_loss("examples/attention/tensor_parallel.ein"), "<tp>")
    spmd = api.compile_spmd(program)
    cluster = preset("h100x8")
    fused, alone = (estimate(program, spmd, cluster, fusion=mode) for mode in ("auto", "none"))
    forward = next(op for op in fused.ops if op.region == "flash_attention")
    backward = next(op for op in fused.ops if op.region == "flash_attention_backward")
    assert forward.name == "m, p.1, o"
    assert backward.what == ("flash_attention_backward(q, k, m, p.1, o.grad, v -> "
                             "v.grad, q.grad, k.grad)")
    # One device: B=8 (gathered), H=2 of 8, S=T=128, K=32, f32.
    head, row, scores = 8 * 128 * 2 * 32 * 4, 8 * 2 * 128 * 4, 8 * 2 * 128 * 128 * 4
    assert backward.hbm_bytes == 7 * head + 2 * row  # q, k, v, dO read, dQ, dK, dV written
    # FLOPs: its steps' and the recomputed ones', each as the unfused step counts them.
    flops = {op.name: op.flops for op in alone.ops}
    names = [m.split(" = ")[0] for m in backward.members + backward.recomputed]
    assert backward.flops == sum(flops[name] for name in names)
    assert [m.split(" = ")[0] for m in backward.recomputed] == ["s.1", "s", "e", "p"]
    # Five matmuls to the forward's two (FlashAttention-2, section 4.1: 2.5x the FLOPs).
    matmul = 2 * 8 * 2 * 128 * 128 * 32
    contractions = [name for name in names if name in ("s.1", "p.grad", "v.grad", "q.grad",
                                                       "k.grad")]
    assert sum(flops[name] for name in contractions) == 5 * matmul
    assert flops["s.1"] + flops["o"] == 2 * matmul
    shape = AttentionShape(batch=16, seq_q=128, seq_k=128, head_dim=32, value_dim=32,
                           direction="bwd")
    expected = flash_attention_time(cluster, "f32", shape, backward.flops, backward.hbm_bytes)
    assert backward.compute_s == expected.time_s
    assert "recomputes s.1, s, e, p" in backward.detail
    # Memory: unfused, the backward pass keeps three S×T values (s, e, p); fused, none.
    assert alone.memory.saved_activations_bytes - fused.memory.saved_activations_bytes == \
        3 * scores


def test_the_backward_efficiency_is_fitted_on_published_backward_runs():
    """FlashAttention-3 backward on H100 (arXiv:2407.08608, section 4.1): top 0.596 at head
    dim 128, L0 440 keys, fitted on the fit half of its published figures."""
    shape = AttentionShape(batch=16, seq_q=4096, seq_k=4096, head_dim=128, value_dim=128,
                           direction="bwd")
    efficiency = attention_efficiency(preset("h100x8"), "bf16", shape)
    assert efficiency.value == pytest.approx(0.596 * 4096 / (4096 + 440))
    assert "flashattention3-paper-backward.csv" in efficiency.source
    # A chip without backward data takes the forward's figure.
    assert attention_efficiency(preset("a100x8"), "bf16", shape) == DEFAULT_EFFICIENCY


def test_the_explanation_says_the_backward_recomputes():
    source = _with_loss("examples/attention/tensor_parallel.ein")
    explanation = explain(api.compile_spmd(api.compile_source(source, "<tp>")), source)
    fused = [line for statement in explanation.statements for line in statement.fused]
    assert any("one flash-attention backward kernel: it recomputes s.1, s, e, p on chip from "
               "q, k, m, p.1, o.grad, v" in line for line in fused), fused


def test_norm_and_softmax_backward_chains_fuse_as_the_forward_does():
    """The derivative maps and row sums of a layernorm's backward are one region, reading
    the forward's saved statistics and the incoming gradient and writing one gradient."""
    regions = fused_regions(fuse(api.compile_spmd(
        api.load(EXAMPLES_DIR / "training" / "megatron_selective.ein"))))
    (norm,) = [region for region in regions if "n.1.sumsq.grad" in region.names]
    assert norm.kind == "fused"
    assert norm.names == ("n.1.grad", "n.1.centered.grad.1", "n.1.sumsq.grad.full",
                          "n.1.sumsq.grad", "n.1.square.grad", "n.1.centered.grad.2",
                          "n.1.centered.grad", "n.1.mean.grad.full", "n.1.mean.grad",
                          "n.1.mean.sum.grad", "r.grad.3", "r.grad")
    assert norm.writes == ("r.grad",)


def test_a_backward_reading_a_moved_score_is_not_flash_attention():
    """Where S×T values are moved (here a pin splits the probabilities by key position, so
    the scores go through an all-to-all), no kernel could keep them on chip: the steps fuse
    as ordinary regions, forward and backward."""
    text = _with_loss("examples/attention/data_parallel.ein").replace(
        "p[B,H,S,T]  = softmax", "p[B,H,S,T@dp]  = softmax")
    spmd = fuse(api.compile_spmd(api.compile_source(text, "<dp>")))
    kinds = [region.kind for region in fused_regions(spmd)]
    assert any(isinstance(step, CollectiveStep) and step.kind == "all_to_all"
               and step.src == "p.2" for step in spmd.steps)
    assert "flash_attention_backward" not in kinds and "flash_attention" not in kinds


def test_data_parallel_attention_trains_with_flash_attention_both_ways():
    """Batch-split attention moves no S×T value: its forward and backward each fuse into one
    flash-attention kernel."""
    spmd = fuse(api.compile_spmd(api.compile_source(
        _with_loss("examples/attention/data_parallel.ein"), "<dp>")))
    kinds = [region.kind for region in fused_regions(spmd)]
    assert kinds.count("flash_attention") == 1 and kinds.count("flash_attention_backward") == 1


def test_an_mlp_backward_is_not_attention_backward():
    """Two contractions reading one gradient (dW and dX of a layer) without attention's
    dims (a key index summed by a row sum, the head and value dims) are not flash attention."""
    regions = fused_regions(fuse(api.compile_spmd(
        api.load(EXAMPLES_DIR / "training" / "mlp_data_parallel.ein"))))
    assert regions and all(region.kind == "fused" for region in regions)
