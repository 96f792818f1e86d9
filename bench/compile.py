"""Compile time and what partitioning saves, for every example and for large programs.

    .venv/bin/python bench/compile.py

For each example: the time to parse, check, partition and lower it (median
of several runs), the bytes each device sends under einpar's plan, and under
a naive plan that gathers every sharded input to every device and computes
everything replicated (the ratio is what partitioning saves; a naive plan
moves no bytes for a program whose inputs are all replicated). Then the
compile time of generated programs of 100 and 1,000 statements. Goals: the
attention example in tens of milliseconds, 1,000 statements under 2 s. Then
meshes of many axes, each against the same program on a small mesh (the
ratio): a matmul on 8 axes of size 2, on 64 axes (20 of size 2, 44 of size
1; 64 of size 2 are 2^64 devices, refused at check), and the Megatron MLP
with 5 more axes of size 1. Goal: axes of size 1 cost nothing, and the
candidates priced per op are bounded (partition.MAX_CANDIDATES).
"""

from __future__ import annotations

import statistics
import sys
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


def main() -> None:
    print(f"{'example':<44} {'compile ms':>10} {'einpar B/dev':>13} {'naive B/dev':>12} {'naive/einpar':>12}")
    for path in sorted((ROOT / "examples").glob("**/*.ein")):
        name = str(path.relative_to(ROOT))
        seconds, spmd = timed(read_source(path), name, runs=7)
        program = compile_source(read_source(path), name)
        ours, naive = bytes_per_device(spmd.steps), naive_bytes(program)
        ratio = f"{naive / ours:.2f}x" if ours else ("-" if not naive else "inf")
        print(f"{name:<44} {seconds * 1e3:>10.1f} {ours:>13,} {naive:>12,} {ratio:>12}")
    print()
    print(f"{'generated program':<44} {'compile ms':>10} {'ms/statement':>13}")
    for statements in (100, 1000):
        seconds, _ = timed(generated_program(statements), f"generated-{statements}.ein", runs=3)
        print(f"{f'{statements:,} statements':<44} {seconds * 1e3:>10.0f} {seconds * 1e3 / statements:>13.2f}")
    print()
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
