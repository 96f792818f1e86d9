"""A published training run (a row of bench/published/training/*.csv) as an `.ein` training step.

    .venv/bin/python bench/training_runs.py                 # which rows are modelled, and why not
    .venv/bin/python bench/training_runs.py --show 175B     # the program of the rows named so

`program_text(row)` writes the step of the row's model on the row's mesh, as Megatron-LM runs it:

- GPT layers (Radford et al. 2019, Megatron's GPT): pre-norm LayerNorm with a scale, causal
  attention with the row's heads (head size hidden/heads), an MLP of ffn_hidden (4·hidden when
  the row leaves it empty) with GELU, residual adds; a token embedding by `take` over a
  vocab-parallel table, a final LayerNorm, an output layer and the next token's cross-entropy
  (logsumexp minus the target's logit) in float32. The output layer is a param of its own
  (untied from the embedding): tied weights would meet across the first and the last stage,
  which the pipeline lowering refuses (E256). Linear biases, learned position embeddings and
  dropout are left out (under 0.1% of the FLOPs; the language has no dropout).
- `mesh dp pp tp`: dp the row's, or gpus / (tp·pp) where the source leaves it empty.
- Megatron's tensor parallelism (Shoeybi et al. 2019): heads and the MLP's hidden units split
  over tp, the output projections partial sums over tp. With sequence parallelism
  (Korthikanti et al. 2022) the activations between the attention and the MLP are split by
  position over tp (`S@tp`: all-gather in, reduce-scatter out); without it they are whole on
  every tp rank (`{}`: an all-reduce after each block), as Megatron before it ran.
- `repeat L@pp` when pp > 1, `schedule interleaved v=N` when the row has N > 1 virtual stages
  (else `1f1b`); `microbatches B=M` with M = global_batch / (dp·micro_batch), so each
  micro-batch is micro_batch sequences per data-parallel rank.
- Recomputation: `full` is `repeat L remat` (each layer's input kept, the layer recomputed);
  `selective` recomputes the attention's scores and probabilities (`remat s`, `remat p`), as
  examples/training/megatron_selective.ein; `none` keeps everything.
- The row's dtype for params and activations (`fp16` as f16, `bf16`), bf16 where the source
  does not say; AdamW keeps f32 moments and an f32 master copy of every narrow param (2 + 2 + 12
  bytes a parameter), as Megatron's mixed-precision optimizer does, split over dp (`shard=dp`)
  where the run uses Megatron's distributed optimizer (`distributed_optimizer(row)`).
- Priced with the overlap the source states (`overlapped(row)`): the README's H100 runs with
  collective matmuls and the data-parallel reductions and gathers beside the passes.

Rows that are not modelled, each with its reason (`unmodelled(row)`): rows whose model shape
(layers, hidden, heads) the file does not give (NeMo's recipes), rows with context or expert
parallelism (cp or ep > 1), and fp8 rows (einpar would price fp8 matmuls at the fp8 peak, but the
NeMo fp8 rows lack shapes before that matters).

Assumptions for what a source leaves out are `ASSUMED` and are printed with each row: vocab
51200 (Megatron's GPT-2 vocabulary padded, as the Korthikanti notes say), micro-batch 1,
recomputation and sequence parallelism as the row's notes suggest, bf16. No constant is
fitted to any row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.published import load  # noqa: E402

# Megatron-LM SC21's reproduction script (examples/sc21/run_table_1.sh, as the CSV's notes say)
# interleaves with --num-layers-per-virtual-pipeline-stage: 5 for 76B and 145B, 3 for 310B,
# 1 for 530B. The number of chunks a stage holds is layers / (pp · that).
SC21_LAYERS_PER_VIRTUAL_STAGE = {"76B": 5, "145B": 5, "310B": 3, "530B": 1}

DTYPES = {"fp16": "f16", "bf16": "bf16", "fp8": "bf16", "": "bf16", None: "bf16"}


def assumed(row: dict) -> dict:
    """What the generator assumes where the row is silent: {field: (value, why)}."""
    out = {}
    if row["vocab"] is None:
        out["vocab"] = (51200, "vocab not published; Megatron's padded GPT-2 vocabulary")
    if row["ffn_hidden"] is None:
        out["ffn_hidden"] = (4 * (row["hidden"] or 0), "ffn_hidden not published; Megatron's default 4*hidden")
    if row["micro_batch"] is None:
        out["micro_batch"] = (1, "micro-batch not published; 1")
    if not row["recompute"]:
        out["recompute"] = ("selective", "recomputation not published; Megatron-Core's --recompute-activations (selective)")
    if row["sequence_parallel"] is None:
        sp = row["file"] != "megatron-sc21-table1.csv" and (row["tp"] or 1) > 1
        why = ("SC21 predates sequence parallelism" if row["file"] == "megatron-sc21-table1.csv"
               else "sequence parallelism not published; on with tp > 1 as in Megatron-Core's recipes")
        out["sequence_parallel"] = (sp, why)
    if not row["dtype"]:
        out["dtype"] = ("bf16", "precision not published; bf16")
    if row["virtual_stages"] is None:
        per = SC21_LAYERS_PER_VIRTUAL_STAGE.get(row["model"]) if row["file"] == "megatron-sc21-table1.csv" else None
        if per:
            out["virtual_stages"] = (row["layers"] // (row["pp"] * per),
                                     f"--num-layers-per-virtual-pipeline-stage {per} (run_table_1.sh)")
        else:
            out["virtual_stages"] = (1, "interleaving not published; none")
    if row["dp"] is None and None not in (row["tp"], row["pp"]):
        out["dp"] = (row["gpus"] // (row["tp"] * row["pp"] * (row["cp"] or 1)), "dp = gpus / (tp*pp)")
    return out


def config(row: dict) -> dict:
    """The row with every field the generator needs filled (the published, else `assumed`)."""
    filled = dict(row)
    for key, (value, _) in assumed(row).items():
        filled[key] = value
    return filled


def unmodelled(row: dict) -> str | None:
    """Why the row cannot be modelled, or None."""
    if None in (row["layers"], row["hidden"], row["heads"]):
        return "model shape (layers, hidden, heads) not published in the file"
    if (row["cp"] or 1) > 1:
        return f"context parallelism cp={row['cp']} (not generated)"
    if (row["ep"] or 1) > 1:
        return f"expert parallelism ep={row['ep']} (not generated)"
    if row["dtype"] == "fp8":
        return "fp8 (Transformer Engine's per-tensor scaling is not modelled)"
    if None in (row["tp"], row["pp"]):
        return "tensor or pipeline degree not published"
    if row["preset"] == "":
        return "no preset"
    c = config(row)
    if c["global_batch"] % (c["dp"] * c["micro_batch"]):
        return "global batch not a multiple of dp*micro_batch"
    if row["hidden"] % row["heads"]:
        return "hidden not a multiple of heads"
    return None


def program_text(row: dict, shrink: dict | None = None) -> str:
    """The `.ein` training step of `row` (see the module docstring). `shrink` overrides the
    config's fields (layers, hidden, heads, seq_len, vocab, global_batch, ...) to make a small
    program of the same structure for tests."""
    c = config(row) | (shrink or {})
    L, D, H = c["layers"], c["hidden"], c["heads"]
    # A shrunk hidden size takes Megatron's 4*hidden unless the shrink names ffn_hidden.
    F = 4 * D if shrink and "hidden" in shrink and "ffn_hidden" not in shrink else c["ffn_hidden"]
    K, S, V = D // H, c["seq_len"], c["vocab"]
    tp, pp, dp, v = c["tp"], c["pp"], c["dp"], c["virtual_stages"] or 1
    B = c["global_batch"]
    M = B // (dp * c["micro_batch"])
    dtype = DTYPES[c["dtype"]]
    sp = bool(c["sequence_parallel"]) and tp > 1
    full = c["recompute"] == "full"
    selective = c["recompute"] == "selective"
    zero = distributed_optimizer(row)
    stage = "@pp" if pp > 1 else ""
    # Megatron's layouts, pinned exactly (`{}`): the plan search left free finds plans Megatron
    # does not run (all-gathers of q, k, v over dp; the batch split over tp), see the report.
    norm = "[B@dp,S@tp,D]{}" if sp else "[B@dp,S,D]{}"
    remat = "remat " if selective else ""
    lines = [
        f"# {row['file']}: {row['model']} on {row['gpus']} GPUs ({row['preset']}), tp={tp} pp={pp} dp={dp}"
        f"{f' v={v}' if v > 1 else ''}, micro-batch {c['micro_batch']}, global batch {B}, "
        f"recompute {c['recompute']}, sequence parallel {'on' if sp else 'off'}",
        f"mesh dp={dp} pp={pp} tp={tp}",
        f"dim  B={B} S={S} T=S D={D} H={H} K={K} F={F} V={V} L={L}",
        f"dtype {dtype}",
        "",
        "input ids[B@dp, S] : i32",
        "input tgt[B@dp, S] : i32",
        "param emb[V@tp, D]",
        "param gf[D]",
        "param wout[D, V@tp]",
        "",
        f"x{norm} = take[V](emb[V,D], ids[B,S])",
        "",
        f"repeat L{stage}{' remat' if full else ''} {{",
        "  param g1[D]",
        "  param wq[D, H@tp, K]",
        "  param wk[D, H@tp, K]",
        "  param wv[D, H@tp, K]",
        "  param wo[H@tp, K, D]",
        "  param g2[D]",
        "  param w1[D, F@tp]",
        "  param w2[F@tp, D]",
        f"  a{norm} = layernorm[D](x[B,S,D]) * g1[D]",
        "  q[B@dp,S,H@tp,K]{} = a[B,S,D] * wq[D,H,K]",
        "  k[B@dp,T,H@tp,K]{} = a[B,T,D] * wk[D,H,K]",
        "  v[B@dp,T,H@tp,K]{} = a[B,T,D] * wv[D,H,K]",
        f"  {remat}s[B@dp,H@tp,S,T]{{}} = q[B,S,H,K] * k[B,T,H,K] / sqrt(K)",
        f"  {remat}p[B@dp,H@tp,S,T]{{}} = softmax[T](where(pos(S) >= pos(T), s[B,H,S,T], -inf))",
        "  o[B@dp,S,H@tp,K]{} = p[B,H,S,T] * v[B,T,H,K]",
        f"  x{norm} = x[B,S,D] + o[B,S,H,K] * wo[H,K,D]",
        f"  n{norm} = layernorm[D](x[B,S,D]) * g2[D]",
        "  h[B@dp,S,F@tp]{} = gelu(n[B,S,D] * w1[D,F])",
        f"  x{norm} = x[B,S,D] + h[B,S,F] * w2[F,D]",
        "}",
        "",
        "logits[B@dp,S,V@tp]{} = (layernorm[D](x[B,S,D]) * gf[D]) * wout[D,V]",
        "l[] : f32 = mean[B,S](logsumexp[V](logits[B,S,V]) - take[V](logits[B,S,V], tgt[B,S]))",
        "",
        "loss l",
        "optimizer adamw lr=1e-4 b1=0.9 b2=0.95 wd=0.1" + (" shard=dp" if zero and dp > 1 else ""),
    ]
    if M > 1:
        lines.append(f"microbatches B={M}")
        if pp > 1:
            lines.append(f"schedule interleaved v={v}" if v > 1 else "schedule 1f1b")
    return "\n".join(lines) + "\n"


def label(row: dict) -> str:
    return f"{row['file'].split('.csv')[0]}:{row['model']}@{row['gpus']}" + (
        f":{row['recompute']}" if row["file"] == "megatron-korthikanti-table5.csv" else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", nargs="*", default=None, help="print the programs of these models")
    args = parser.parse_args(argv)
    for row in load.training_rows():
        reason = unmodelled(row)
        if args.show is not None:
            if row["model"] in args.show and reason is None:
                print(program_text(row))
            continue
        extra = "; ".join(f"{k} {v}: {why}" for k, (v, why) in assumed(row).items())
        print(f"{label(row):<52} {'skipped: ' + reason if reason else 'modelled'}"
              + (f"  [{extra}]" if extra and not reason else ""))
    return 0


def published_flops(row: dict) -> float | None:
    """The FLOPs of one iteration as the row's source counts them, to turn a predicted time into
    the TFLOP/s per GPU it publishes (None for rows that publish an iteration time)."""
    if row["tflops_per_gpu"] is None:
        return None
    c = config(row)
    B, s, l, h, V, f = c["global_batch"], c["seq_len"], c["layers"], c["hidden"], c["vocab"], c["ffn_hidden"]
    if row["file"] == "megatron-sc21-table1.csv":
        # Narayanan et al. 2021, eq. 3: with full recomputation (the factor 4 of 96 = 4 * 24),
        # the hardware FLOPs the paper's TFLOP/s counts.
        return 96 * B * s * l * h * h * (1 + s / (6 * h) + V / (16 * l * h))
    # Megatron-LM's num_floating_point_operations (megatron/training/training.py): model FLOPs,
    # 12 B s l h^2 ((2 + s/h) + ffn/h + V/(2 l h)) without GQA, MoE or SwiGLU; the README's
    # MFU is its TFLOP/s over 989.
    return 12 * B * s * l * h * h * ((2 + s / h) + f / h + V / (2 * l * h))


def overlapped(row: dict) -> bool:
    """Whether the source says its communication overlaps computation (the Megatron-LM README's
    H100 runs: --overlap-grad-reduce --overlap-param-gather --tp-comm-overlap); priced with
    `estimate(..., overlap=True, collective_matmul=True, overlap_grad_reduce=True)` then
    (--tp-comm-overlap: the tensor-parallel all-gathers and reduce-scatters overlap their
    GEMMs, chunk by chunk; --overlap-grad-reduce: the data-parallel reductions overlap the last
    backward pass, layer by layer)."""
    return row["file"] == "megatron-lm-readme-h100.csv"


def distributed_optimizer(row: dict) -> bool:
    """Whether the run splits its optimizer state over dp (Megatron's distributed optimizer,
    ZeRO-1: `optimizer ... shard=dp`). The README's H100 runs pass --overlap-param-gather,
    which Megatron-LM accepts only with --use-distributed-optimizer (megatron/training/
    arguments.py, validate_args: "--overlap-param-gather only supported with distributed
    optimizer"). The SC21 and Korthikanti runs predate it (Megatron's mixed-precision
    optimizer, replicated)."""
    return row["file"] == "megatron-lm-readme-h100.csv"


def fusion_of(row: dict) -> str:
    """How the row's software fuses attention: the runs on Selene in 2021 and early 2022
    (SC21's Table 1, Korthikanti et al.'s Table 5) predate FlashAttention (Dao et al., May
    2022) in Megatron-LM, whose attention then wrote the S×T scores to HBM around its fused
    scale-mask-softmax kernel: priced with fusion "no_flash". Megatron-Core r0.8 (the README's
    H100 table, 2024) runs flash attention: "auto"."""
    return "auto" if row["file"] == "megatron-lm-readme-h100.csv" else "no_flash"


def price(row: dict, shrink: dict | None = None, cluster=None) -> dict:
    """Check, compile and price the row's program on its preset: the Estimate, the predicted
    measurement (iteration seconds, or TFLOP/s per GPU as the source counts FLOPs), the measured
    one and the signed error predicted/measured - 1, with the seconds each stage took."""
    import time

    from einpar.api import compile_source, compile_spmd
    from einpar.cost_model.cluster import preset
    from einpar.cost_model.estimate import estimate

    start = time.perf_counter()
    program = compile_source(program_text(row, shrink), file=label(row) + ".ein")
    checked = time.perf_counter()
    cluster = cluster or preset(row["preset"])
    spmd = compile_spmd(program, cluster)
    compiled = time.perf_counter()
    result = estimate(program, spmd, cluster, overlap=overlapped(row), fusion=fusion_of(row),
                      collective_matmul=overlapped(row), overlap_grad_reduce=overlapped(row))
    priced = time.perf_counter()
    out = {"estimate": result, "step_s": result.step_time_s,
           "seconds": {"check": checked - start, "compile": compiled - checked, "price": priced - compiled}}
    if shrink is None or shrink.get("dp") == 1:
        if row["iteration_s"] is not None:
            out |= {"quantity": "iteration_s", "predicted": result.step_time_s, "measured": row["iteration_s"]}
        else:
            flops = published_flops(row)
            out |= {"quantity": "tflops_per_gpu", "measured": row["tflops_per_gpu"],
                    "predicted": flops / (result.step_time_s * row["gpus"]) / 1e12}
        out["error"] = out["predicted"] / out["measured"] - 1
    return out


def replica_shrink(row: dict) -> dict | None:
    """For a row with dp > 1: one data-parallel replica of it (dp=1, global_batch/dp, the same
    micro-batches and pipeline), whose step time is the run's less the gradient reduction
    across replicas. With the distributed optimizer the replica also updates every param
    itself (its state is not split over dp = 1), so such a run may be faster than its replica.
    A diagnostic, not a prediction: it shows how much of a row's error comes from how the
    data-parallel step is planned (see the report of bench/fidelity_published.py)."""
    c = config(row)
    if c["dp"] == 1:
        return None
    return {"dp": 1, "global_batch": c["global_batch"] // c["dp"]}


if __name__ == "__main__":
    sys.exit(main())
