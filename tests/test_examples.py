"""Every example parses, checks and evaluates, and means what its comments say.

Each example's result from the reference backend is compared with a NumPy
formulation of the model it describes (attention, Megatron MLP, matmul, MoE
with GShard routing, a stack of transformer blocks), written from the model's
textbook definition and computed in float64.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from einpar.api import load, parse_file, random_inputs, run_reference

ROOT = Path(__file__).resolve().parent.parent
# The forward examples; a training step's outputs (gradients, updated params and state)
# are checked against jax.grad and finite differences instead (tests/test_grad.py,
# tests/test_training.py), gpt.ein's forward pass against a NumPy GPT below, and the
# pipelined GPTs of examples/pipeline/ against gpt.ein (tests/test_pipeline.py).
EXAMPLES = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / "examples").rglob("*.ein")
                  if path.parent.name not in ("training", "pipeline"))


def f64(array) -> np.ndarray:
    return np.asarray(array).astype(np.float64)


def softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def rmsnorm(x, axis):
    return x / np.sqrt((x * x).mean(axis=axis, keepdims=True) + 1e-6)


def gshard_combine(gates, k, capacity):
    """gates [groups, tokens, experts] -> combine weights [groups, tokens, experts, capacity]."""
    groups, tokens, experts = gates.shape
    combine = np.zeros((groups, tokens, experts, capacity))
    for group in range(groups):
        top = np.argsort(-gates[group], axis=-1, kind="stable")[:, :k]
        norm = np.take_along_axis(gates[group], top, axis=-1).sum(axis=-1)
        used = np.zeros(experts, dtype=int)
        for rank in range(k):  # every token's first choice before any token's second
            for token in range(tokens):
                expert = top[token, rank]
                if used[expert] < capacity:
                    combine[group, token, expert, used[expert]] = gates[group, token, expert] / norm[token]
                    used[expert] += 1
    return combine


# ---- the models


def multi_head_attention(x, wq, wk, wv, wo):
    q = np.einsum("bsd,dhk->bshk", x, wq)
    k = np.einsum("btd,dhk->bthk", x, wk)
    v = np.einsum("btd,dhk->bthk", x, wv)
    scores = np.einsum("bshk,bthk->bhst", q, k) / math.sqrt(q.shape[-1])
    p = softmax(scores, axis=-1)
    o = np.einsum("bhst,bthk->bshk", p, v)
    return np.einsum("bshk,hkd->bsd", o, wo)


def attention(inputs):
    return {"y": multi_head_attention(*(inputs[n] for n in ("x", "wq", "wk", "wv", "wo")))}


def megatron_mlp(inputs):
    return {"y": gelu_tanh(inputs["x"] @ inputs["w1"]) @ inputs["w2"]}


def matmul(inputs):
    return {"c": inputs["a"] @ inputs["b"]}


def gshard_moe(inputs, k=2):
    x, wg, wi, wo = inputs["x"], inputs["wg"], inputs["wi"], inputs["wo"]
    capacity = 32
    gates = softmax(x @ wg, axis=-1)
    combine = gshard_combine(gates, k, capacity)  # [G,S,E,C]
    dispatch = (combine > 0).astype(np.float64)
    expert_in = np.einsum("gsec,gsd->egcd", dispatch, x)
    hidden = np.maximum(np.einsum("egcd,edf->egcf", expert_in, wi), 0.0)
    expert_out = np.einsum("egcf,efd->egcd", hidden, wo)
    return {"y": np.einsum("gsec,egcd->gsd", combine, expert_out)}


def transformer_stack(inputs):
    x = inputs["x"]
    for layer in range(inputs["wq"].shape[0]):
        p = {name: array[layer] for name, array in inputs.items() if name != "x"}
        a = rmsnorm(x, -1) * p["g1"]
        x = x + multi_head_attention(a, p["wq"], p["wk"], p["wv"], p["wo"])
        n = rmsnorm(x, -1) * p["g2"]
        x = x + (silu(n @ p["wg"]) * (n @ p["wu"])) @ p["wd"]
    return {"x": x}


MODELS = {
    "examples/attention/context_parallel.ein": attention,
    "examples/attention/data_parallel.ein": attention,
    "examples/attention/fsdp.ein": attention,
    "examples/attention/sequence_parallel.ein": attention,
    "examples/attention/tensor_parallel.ein": attention,
    "examples/attention/ulysses.ein": attention,
    "examples/matmul/case1_no_contracting_split.ein": matmul,
    "examples/matmul/case2_one_contracting_split.ein": matmul,
    "examples/matmul/case3_both_contracting_split.ein": matmul,
    "examples/matmul/case4_same_axis_noncontracting.ein": matmul,
    "examples/mlp/megatron.ein": megatron_mlp,
    "examples/moe/gshard.ein": gshard_moe,
    "examples/transformer/block.ein": transformer_stack,
    "examples/uneven/attention_6_heads.ein": attention,
}


def test_every_numpy_model_names_an_example_that_exists():
    assert sorted(set(MODELS) - set(EXAMPLES)) == []


def test_every_example_has_a_numpy_model():
    assert sorted(set(EXAMPLES) - set(MODELS)) == []


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_parses_checks_and_evaluates(example):
    path = ROOT / example
    parse_file(path)
    program = load(path)
    outputs = run_reference(program, random_inputs(program, seed=0))
    assert set(outputs) == {output.name for output in program.outputs}
    for output in program.outputs:
        array = outputs[output.name]
        assert array.shape == program.values[output.value].type.shape
        assert np.all(np.isfinite(array.astype(np.float64)))


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_means_its_numpy_model(example):
    if example not in MODELS:
        pytest.fail(f"{example} has no NumPy model in MODELS")
    program = load(ROOT / example)
    inputs = random_inputs(program, seed=1)
    outputs = run_reference(program, inputs)
    expected = MODELS[example]({name: f64(array) for name, array in inputs.items()})
    assert set(outputs) == set(expected)
    for name, want in expected.items():
        got = f64(outputs[name])
        scale = np.max(np.abs(want))
        assert scale > 0
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_moe_example_drops_tokens_when_an_expert_is_full():
    # With a capacity of 32 per expert and 64 tokens choosing 2 experts each among
    # 4, slots for 128 assignments cover all 128 only under a perfect balance.
    program = load(ROOT / "examples/moe/gshard.ein", overrides={"C": 8})
    inputs = random_inputs(program, seed=2)
    got = run_reference(program, inputs)["y"]
    x, wg, wi, wo = (f64(inputs[n]) for n in ("x", "wg", "wi", "wo"))
    gates = softmax(x @ wg, axis=-1)
    combine = gshard_combine(gates, 2, 8)
    assert np.count_nonzero(combine) < 8 * 64 * 2  # some assignments were dropped
    dispatch = (combine > 0).astype(np.float64)
    hidden = np.maximum(np.einsum("gsec,gsd,edf->egcf", dispatch, x, wi), 0.0)
    want = np.einsum("gsec,egcf,efd->gsd", combine, hidden, wo)
    np.testing.assert_allclose(f64(got), want, rtol=1e-4, atol=1e-5 * np.max(np.abs(want)))


def gpt_logits_and_loss(inputs):
    """examples/training/gpt.ein's forward pass: token embedding, pre-norm blocks of causal
    attention with rotary embeddings (each head dimension pair (q0, q1) at position s turned by
    s·10000^(-p/P), Su et al. 2021) and a GELU MLP, then the next-token cross-entropy."""
    ids, tgt = inputs["ids"].astype(np.int64), inputs["tgt"].astype(np.int64)
    x = inputs["emb"][ids]
    positions, pairs = x.shape[1], inputs["wq"].shape[3]
    angle = np.arange(positions)[:, None] * 10000.0 ** (-np.arange(pairs)[None] / pairs)
    cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]

    def rotary(q):  # [B,S,H,P,2]
        return np.stack([q[..., 0] * cos - q[..., 1] * sin, q[..., 1] * cos + q[..., 0] * sin], -1)

    causal = np.tril(np.ones((positions, positions), bool))
    for layer in range(inputs["wq"].shape[0]):
        p = {name: inputs[name][layer] for name in ("g1", "wq", "wk", "wv", "wo", "g2", "w1", "w2")}
        a = rmsnorm(x, -1) * p["g1"]
        q, k, v = (np.einsum("bsd,dhpr->bshpr", a, p[w]) for w in ("wq", "wk", "wv"))
        q, k = rotary(q), rotary(k)
        scores = np.einsum("bshpr,bthpr->bhst", q, k) / math.sqrt(q.shape[3] * q.shape[4])
        weights = softmax(np.where(causal, scores, -np.inf), -1)
        x = x + np.einsum("bhst,bthpr,hprd->bsd", weights, v, p["wo"])
        n = rmsnorm(x, -1) * p["g2"]
        x = x + gelu_tanh(n @ p["w1"]) @ p["w2"]
    logits = (rmsnorm(x, -1) * inputs["gf"]) @ inputs["wout"]
    top = logits.max(-1)
    logsumexp = top + np.log(np.exp(logits - top[..., None]).sum(-1))
    target = np.take_along_axis(logits, tgt[..., None], -1)[..., 0]
    return logits, (logsumexp - target).mean()


def test_gpt_example_is_a_gpt():
    from dataclasses import replace

    from einpar.ir import Output

    forward = load(ROOT / "examples/training/gpt.ein").forward
    forward = replace(forward, training=None, outputs=(Output("logits", "logits"), Output("l", "l")))
    inputs = random_inputs(forward, seed=2)
    got = run_reference(forward, inputs)
    logits, loss = gpt_logits_and_loss({name: f64(array) for name, array in inputs.items()})
    np.testing.assert_allclose(f64(got["logits"]), logits, rtol=1e-4, atol=1e-5 * np.abs(logits).max())
    np.testing.assert_allclose(f64(got["l"]), loss, rtol=1e-5)
