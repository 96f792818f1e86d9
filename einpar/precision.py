"""Matmul precision: how float32 contractions run, one choice shared by the backends and the cost model.

- `highest` (the default): true float32 products and sums
  (`jax.lax.Precision.HIGHEST`). A GPU runs them on its FP32 units and is
  priced at its FP32 peak; a TPU emulates float32 with 6 bfloat16 passes and
  is priced at a sixth of its bf16 peak.
- `default`: the accelerator's fast float32 matmul (`jax.lax.Precision.DEFAULT`):
  TF32 tensor cores on A100 and H100 (plain FP32 on a GPU without them), one
  bfloat16 pass on a TPU; priced at that peak. Results then differ from the
  reference by about bfloat16's rounding, and are checked at that tolerance.

What each mode computes on which chip is the docstring of `jax.lax.Precision`
(JAX 0.10). Half-precision contractions run on the matrix units either way,
and a CPU computes float32 either way.

`highest` is the default because einpar's reference backend computes exact
float32 and every backend is checked against it at float32's tolerance: a
run is then what the reference says, and the price is that run's price. Ask
for `default` to plan with the fast mode a training job would use.
"""

from __future__ import annotations

PRECISIONS = ("highest", "default")
DEFAULT_PRECISION = "highest"

# The expression the emitted JAX module passes as every contraction's `precision`.
JAX_PRECISION = {"highest": "lax.Precision.HIGHEST", "default": "lax.Precision.DEFAULT"}

# TPUs compute a float32 product at HIGHEST as 6 bfloat16 passes (jax.lax.Precision).
TPU_HIGHEST_PASSES = 6


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision
