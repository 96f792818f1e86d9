"""Compile time and what partitioning saves, for every example and for large programs.

    .venv/bin/python bench/compile.py [--parts examples axes statements training many-axes]
                                      [--limit 60] [--max-axes 8] [--runs 5]

For each example: the time to parse, check, partition and lower it (median
of several runs), the bytes each device sends under einpar's plan, and under
a naive plan that gathers every sharded input to every device and computes
everything replicated (the ratio is what partitioning saves; a naive plan
moves no bytes for a program whose inputs are all replicated).

Then two series, each point compiled in a child process (which imports the
integer-program solver and the cost model before timing: a one-time cost of
a process, about a second here) stopped after
`--limit` seconds (a series stops at its first point over the limit,
printed `> 60 s`), each with the growth ratio between successive points, so
polynomial and exponential growth tell apart (exponential in the number of
axes: a growth ratio that stays well above 1 per axis added, and an
exponent log(time ratio) / log(size ratio) that keeps rising; polynomial:
the exponent stays bounded, near the polynomial's degree):

- axes: a Llama-style layer (RMSNorm, q/k/v projections with grouped
  query heads, attention, output projection, SwiGLU MLP; `llama_layer`) on
  meshes of 1 to 8 axes of size 2, the axes in the order dp, fsdp, tp, sp,
  cp, ep, pp, xp, each named on the inputs' layouts the way its technique
  uses it: the batch over (dp, fsdp), the sequence over (sp, cp), the
  weights' model dimension over fsdp, the KV heads over tp, the MLP's
  hidden dimension over (tp, ep); pp and xp are on no input (free axes the
  partitioner may still split intermediates over). Goal: six axes under 1 s.
- statements: generated programs of 10 to 1,000 statements (stacks of
  transformer layers, bench/frontend.py) on `dp=2 tp=4`. Goal: 1,000
  statements under 2 s.

Then training steps (`--parts training`): for the Megatron block with
selective and with full recomputation (examples/training/), the transformer
block of examples/transformer/block.ein with a loss and an optimizer
appended, and the GPT model (examples/training/gpt.ein), the
compile time (check and derive, partition, lower) of the training step
against that of its forward program (the same file without its `loss`,
`optimizer`, `microbatches` and `remat`, outputting the loss), in one
process, as CPU seconds of the process (the medians of several runs, the two
programs alternating): on a machine shared with other work, wall time
measures the neighbours too (CPU time still varies with them, by a few tenths
of the ratio between runs). Goal: a training step within 3x its forward.

Then meshes of many axes, each against the same program on a small mesh (the
ratio): a matmul on 8 axes of size 2, on 64 axes (20 of size 2, 44 of size
1; 64 of size 2 are 2^64 devices, refused at check), and the Megatron MLP
with 5 more axes of size 1. Goal: axes of size 1 cost nothing, and a mesh
of many axes is searched axis by axis in bounded time (docs/compile.md).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from einpar.api import compile_source, compile_spmd, read_source  # noqa: E402
from einpar.errors import EinparError  # noqa: E402
from einpar.layout import Layout  # noqa: E402
from einpar.reshard import plan_reshard  # noqa: E402
from einpar.spmd import bytes_per_device  # noqa: E402
from frontend import program as generated_program  # noqa: E402


def naive_bytes(program) -> int:
    """Gather every sharded input and param to every device, once."""
    total = 0
    for value in program.inputs:
        if value.layout is not None and not value.layout.is_replicated:
            plan = plan_reshard(value.layout, Layout.replicated(value.type.rank), value.type.shape,
                                value.type.dtype, program.mesh)
            total += plan.bytes_per_device
    return total


def timed(text: str, file: str, runs: int) -> tuple[float, object]:
    times, spmd = [], None
    for _ in range(runs):
        plan_reshard.cache_clear()  # each run starts cold, as a fresh process would
        start = time.perf_counter()
        spmd = compile_spmd(compile_source(text, file))
        times.append(time.perf_counter() - start)
    return statistics.median(times), spmd


def examples() -> None:
    print(f"{'example':<44} {'compile ms':>10} {'einpar B/dev':>13} {'naive B/dev':>12} {'naive/einpar':>12}")
    for path in sorted((ROOT / "examples").glob("**/*.ein")):
        name = str(path.relative_to(ROOT))
        seconds, spmd = timed(read_source(path), name, runs=7)
        program = compile_source(read_source(path), name)
        ours, naive = bytes_per_device(spmd.steps), naive_bytes(program)
        ratio = f"{naive / ours:.2f}x" if ours else ("-" if not naive else "inf")
        print(f"{name:<44} {seconds * 1e3:>10.1f} {ours:>13,} {naive:>12,} {ratio:>12}")


# Mesh axes in the order the axes series adds them.
AXES = ("dp", "fsdp", "tp", "sp", "cp", "ep", "pp", "xp")


def _split(index: str, axes: list[str], mesh: tuple[str, ...]) -> str:
    """`B`, `B@dp` or `B@(dp,fsdp)`: `index` split over those of `axes` the mesh has."""
    used = [axis for axis in axes if axis in mesh]
    if not used:
        return index
    return f"{index}@{used[0]}" if len(used) == 1 else f"{index}@({','.join(used)})"


def llama_layer(num_axes: int) -> str:
    """A Llama-style layer with grouped-query attention (G KV heads of R query heads each) and
    a SwiGLU MLP, on the first `num_axes` of AXES, each of size 2."""
    mesh = AXES[:num_axes]
    batch, seq = _split("B", ["dp", "fsdp"], mesh), _split("S", ["sp", "cp"], mesh)
    model, heads = _split("D", ["fsdp"], mesh), _split("G", ["tp"], mesh)
    hidden = _split("F", ["tp", "ep"], mesh)
    return f"""\
# A Llama-style layer on {num_axes} mesh axes of size 2, generated by bench/compile.py.
mesh {' '.join(f'{axis}=2' for axis in mesh)}
dim B=16 S=128 T=S D=256 G=4 R=2 K=32 F=512

input x[{batch}, {seq}, D]
param g1[D]
param g2[D]
param wq[{model}, {heads}, R, K]
param wk[{model}, {heads}, K]
param wv[{model}, {heads}, K]
param wo[{heads}, R, K, {model}]
param w1[{model}, {hidden}]
param w3[{model}, {hidden}]
param w2[{hidden}, {model}]

a[B,S,D] = rmsnorm[D](x[B,S,D]) * g1[D]
q[B,S,G,R,K] = a[B,S,D] * wq[D,G,R,K]
k[B,T,G,K] = a[B,T,D] * wk[D,G,K]
v[B,T,G,K] = a[B,T,D] * wv[D,G,K]
p[B,G,R,S,T] = softmax[T](q[B,S,G,R,K] * k[B,T,G,K] / sqrt(K))
o[B,S,G,R,K] = p[B,G,R,S,T] * v[B,T,G,K]
h[B,S,D] = x[B,S,D] + o[B,S,G,R,K] * wo[G,R,K,D]
n[B,S,D] = rmsnorm[D](h[B,S,D]) * g2[D]
u[B,S,F] = silu(n[B,S,D] * w1[D,F]) * (n[B,S,D] * w3[D,F])
y[{batch}, {seq}, D] = h[B,S,D] + u[B,S,F] * w2[F,D]

output y
"""


def time_in_child(text: str, limit: float) -> float | None:
    """Median compile seconds of `text` in a child process (three runs, or one if a run
    takes over a second), or None if it passed `limit` seconds (and STARTUP_S for the child
    to start and import einpar)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ein", delete=False) as file:
        file.write(text)
    try:
        done = subprocess.run([sys.executable, __file__, "--time-one", file.name],
                              capture_output=True, text=True, timeout=limit + STARTUP_S)
    except subprocess.TimeoutExpired:
        return None
    finally:
        Path(file.name).unlink()
    if done.returncode != 0:
        raise SystemExit(f"compiling a generated program failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


# Seconds a child process may take to start and import einpar, beyond the point's limit.
STARTUP_S = 10.0


def time_one(path: str) -> None:
    """The child's side: print the median compile seconds of the program at `path`."""
    import scipy.optimize  # noqa: F401 - imported once per process, not per compile
    import einpar.cost_model.collectives  # noqa: F401

    text = read_source(path)
    times = []
    while len(times) < 3 and sum(times) < 1.0:
        times.append(timed(text, path, runs=1)[0])
    print(statistics.median(times))


def series(title: str, points, limit: float) -> None:
    """Compile time per point, the growth ratio from the point before, and the exponent of
    that growth against the size (log ratio / log size ratio); stops past `limit`."""
    print(f"{title:<44} {'compile ms':>10} {'growth':>8} {'exponent':>9}")
    previous = None
    for label, size, text in points:
        seconds = time_in_child(text, limit)
        if seconds is None:
            print(f"{label:<44} {f'> {limit:g} s':>10}   (series stopped)")
            return
        growth = exponent = ""
        if previous is not None and previous[1] > 0:
            ratio = seconds / previous[1]
            growth = f"{ratio:.2f}x"
            exponent = f"{math.log(ratio) / math.log(size / previous[0]):.2f}" if ratio > 0 else ""
        print(f"{label:<44} {seconds * 1e3:>10.1f} {growth:>8} {exponent:>9}")
        if seconds > limit:
            print(f"{'':<44} {f'> {limit:g} s':>10}   (series stopped)")
            return
        previous = (size, seconds)


def axes_series(limit: float, most: int) -> None:
    series("Llama-style layer, mesh axes of size 2",
           [(f"{n} ax{'is' if n == 1 else 'es'} ({' '.join(AXES[:n])})", n, llama_layer(n))
            for n in range(1, most + 1)], limit)


def statements_series(limit: float) -> None:
    series("generated program (dp=2 tp=4)",
           [(f"{n:,} statements", n, generated_program(n)) for n in (10, 30, 100, 300, 1000)],
           limit)


# ---- training steps against their forward programs

# The transformer block trained: a regression loss against a target and AdamW.
BLOCK_LOSS = """
l[] = mean[B,S,D](square(x[B,S,D] - t[B,S,D]))

loss l
optimizer adamw lr=3e-4 b1=0.9 b2=0.95 wd=0.1
"""
TRAINING_GOAL = 3.0  # a training step compiles within 3x its forward


def trained_block() -> str:
    """examples/transformer/block.ein with a target input, a loss and an optimizer."""
    text = read_source(ROOT / "examples/transformer/block.ein")
    text = text.replace("input x[B@dp, S, D]\n", "input x[B@dp, S, D]\ninput t[B@dp, S, D]\n")
    return text.replace("\noutput x\n", "\n") + BLOCK_LOSS


def forward_of(text: str) -> str:
    """A training program's forward: without its loss, optimizer, micro-batches and remat
    (which need a loss), outputting what was its loss."""
    lines = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] in (["optimizer"], ["microbatches"]):
            continue
        if words[:1] == ["loss"]:
            lines.append(f"output {words[1]}")
            continue
        line = re.sub(r"^(\s*)remat\s+", r"\1", line)
        lines.append(re.sub(r"^(\s*repeat\s+\w+)\s+remat\b", r"\1", line))
    return "\n".join(lines) + "\n"


def compile_stages(text: str, file: str) -> tuple[float, float, float]:
    """CPU seconds of check (and derive), partition and lower, each from a cold start."""
    from einpar.lower import lower
    from einpar.objective import make_objective
    from einpar.partition import partition

    plan_reshard.cache_clear()
    start = time.process_time()
    program = compile_source(text, file)
    checked = time.process_time()
    plan = partition(program, make_objective(program))
    partitioned = time.process_time()
    lower(plan)
    return checked - start, partitioned - checked, time.process_time() - partitioned


def training(runs: int) -> None:
    import scipy.optimize  # noqa: F401 - imported once, not timed
    import einpar.cost_model.collectives  # noqa: F401

    cases = [(str(path.relative_to(ROOT)), read_source(path))
             for path in (ROOT / "examples/training/megatron_selective.ein",
                          ROOT / "examples/training/megatron_full.ein")]
    cases.append(("examples/transformer/block.ein + loss", trained_block()))
    cases.append(("examples/training/gpt.ein", read_source(ROOT / "examples/training/gpt.ein")))
    print(f"{'training step (CPU s, median of ' + str(runs) + ')':<40} {'check':>6} {'part.':>6} "
          f"{'lower':>6} {'total':>6} {'fwd':>6} {'ratio':>6}  goal {TRAINING_GOAL:g}x")
    for name, text in cases:
        try:
            compile_source(text, name)
            compile_source(forward_of(text), name)
        except EinparError as error:
            print(f"{name:<40} does not check: {error.diagnostics[0].code} "
                  f"{error.diagnostics[0].message}")
            continue
        step, forward = [], []
        try:
            for _ in range(runs):  # alternating, so that both see the same machine
                forward.append(compile_stages(forward_of(text), name))
                step.append(compile_stages(text, name))
        except Exception as error:  # a bug to report, not a reason to stop the table
            print(f"{name:<40} fails to compile: {type(error).__name__}: {error}")
            continue
        stages = [statistics.median(run[i] for run in step) for i in range(3)]
        total = statistics.median(sum(run) for run in step)
        base = statistics.median(sum(run) for run in forward)
        verdict = "meets" if total <= TRAINING_GOAL * base else "misses"
        print(f"{name:<40} {stages[0]:>6.2f} {stages[1]:>6.2f} {stages[2]:>6.2f} {total:>6.2f} "
              f"{base:>6.2f} {total / base:>5.1f}x  {verdict}")


PARTS = ("examples", "axes", "statements", "training", "many-axes")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="which tables to print (default: all)")
    parser.add_argument("--limit", type=float, default=60.0,
                        help="seconds a point of a series may take (default 60)")
    parser.add_argument("--max-axes", type=int, default=8, choices=range(1, len(AXES) + 1),
                        metavar="1..8", help="the axes series' last point (default 8)")
    parser.add_argument("--runs", type=int, default=5,
                        help="runs of each program in the training part (default 5)")
    parser.add_argument("--time-one", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_one:
        time_one(args.time_one)
        return
    if args.limit <= 0:
        parser.error("--limit must be positive")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    for number, part in enumerate(args.parts):
        if number:
            print()
        if part == "examples":
            examples()
        elif part == "axes":
            axes_series(args.limit, args.max_axes)
        elif part == "statements":
            statements_series(args.limit)
        elif part == "training":
            training(args.runs)
        else:
            many_axes()


def matmul_on(sizes) -> str:
    axes = " ".join(f"a{i}={size}" for i, size in enumerate(sizes))
    return (f"mesh {axes}\ndim I=256 J=512 K=1024\ninput a[I,J]\ninput b[J,K]\n"
            "c[I,K] = a[I,J] * b[J,K]\noutput c\n")


def many_axes() -> None:
    megatron = read_source(ROOT / "examples/mlp/megatron.ein")
    padded = megatron.replace("mesh dp=2 tp=4", "mesh dp=2 tp=4 u1=1 u2=1 u3=1 u4=1 u5=1")
    cases = [("matmul, 8 axes of size 2", matmul_on([2] * 8), matmul_on([2])),
             ("matmul, 20 axes of size 2 and 44 of 1", matmul_on([2] * 20 + [1] * 44), matmul_on([2])),
             ("matmul, 64 axes of size 2 (E223)", matmul_on([2] * 64), matmul_on([2])),
             ("megatron + 5 axes of size 1", padded, megatron)]
    print(f"{'mesh of many axes':<44} {'compile ms':>10} {'small mesh ms':>13} {'ratio':>8}")
    for name, text, small in cases:
        try:
            seconds, _ = timed(text, "many-axes.ein", runs=3)
        except EinparError as error:  # refused at check, as it should be
            start = time.perf_counter()
            try:
                compile_source(text, "many-axes.ein")
            except EinparError:
                pass
            seconds = time.perf_counter() - start
            name = f"{name}: {error.diagnostics[0].code}"
        base, _ = timed(small, "small.ein", runs=3)
        print(f"{name:<44} {seconds * 1e3:>10.1f} {base * 1e3:>13.1f} {seconds / base:>7.1f}x")


if __name__ == "__main__":
    main()
