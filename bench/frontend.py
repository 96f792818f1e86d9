"""How parse and check time grow with program size.

Generates programs of 100, 1,000 and 10,000 statements that look like real
models (stacks of transformer layers: norms, attention with contractions and
softmaxes, MLPs, a few reductions; params with tensor-parallel layouts, data
parallel activations), then times the front end's two stages on each:

    .venv/bin/python bench/frontend.py
    .venv/bin/python bench/frontend.py --sizes 1000 20000 --profile 10000

The table shows the median of a few runs per size and the time per
statement: a front end that is linear in the program keeps that last column
flat. The goal is a 1,000-statement program checked in well under a second.
`--profile N` prints where the time goes for N statements (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from einpar.check import check  # noqa: E402
from einpar.syntax import parse  # noqa: E402

HEADER = """\
# A generated stack of transformer layers, for timing the front end.
mesh dp=2 tp=4
dim B=8 S=128 T=S D=256 H=8 K=32 F=1024
dtype f32

input x_0[B@dp, S, D]
"""


def norm(rng: random.Random, out: str, x: str, gain: str) -> str:
    kind = rng.choice(["rmsnorm", "layernorm"])
    return f"{out}[B,S,D] = {kind}[D]({x}[B,S,D]) * {gain}[D]"


def attention(rng: random.Random, layer: int, a: str) -> list[str]:
    i = layer
    lines = [
        f"q_{i}[B,S,H,K] = {a}[B,S,D] * wq_{i}[D,H,K]",
        f"k_{i}[B,T,H,K] = {a}[B,T,D] * wk_{i}[D,H,K]",
        f"v_{i}[B,T,H,K] = {a}[B,T,D] * wv_{i}[D,H,K]",
    ]
    if rng.random() < 0.5:
        lines.append(f"p_{i}[B,H,S,T] = softmax[T](q_{i}[B,S,H,K] * k_{i}[B,T,H,K] / sqrt(K))")
    else:
        lines += [
            f"s_{i}[B,H,S,T] = q_{i}[B,S,H,K] * k_{i}[B,T,H,K] / sqrt(K)",
            f"m_{i}[B,H,S] = max[T](s_{i}[B,H,S,T])",
            f"e_{i}[B,H,S,T] = exp(s_{i}[B,H,S,T] - m_{i}[B,H,S])",
            f"p_{i}[B,H,S,T] = e_{i}[B,H,S,T] / sum[T](e_{i}[B,H,S,T])",
        ]
    lines.append(f"o_{i}[B,S,H,K] = p_{i}[B,H,S,T] * v_{i}[B,T,H,K]")
    return lines


def mlp(rng: random.Random, layer: int, n: str) -> list[str]:
    i = layer
    if rng.random() < 0.5:
        return [f"u_{i}[B,S,F] = gelu({n}[B,S,D] * w1_{i}[D,F])"]
    return [f"g_{i}[B,S,F] = silu({n}[B,S,D] * w1_{i}[D,F])",
            f"u_{i}[B,S,F] = g_{i}[B,S,F] * ({n}[B,S,D] * w3_{i}[D,F])"]


def layer_lines(rng: random.Random, i: int) -> tuple[list[str], list[str]]:
    """(param declarations, statements) of one layer reading x_{i} and defining x_{i+1}."""
    params = [f"param g1_{i}[D]", f"param g2_{i}[D]",
              f"param wq_{i}[D, H@tp, K]", f"param wk_{i}[D, H@tp, K]",
              f"param wv_{i}[D, H@tp, K]", f"param wo_{i}[H@tp, K, D]",
              f"param w1_{i}[D, F@tp]", f"param w3_{i}[D, F@tp]", f"param w2_{i}[F@tp, D]"]
    statements = [norm(rng, f"a_{i}", f"x_{i}", f"g1_{i}")]
    statements += attention(rng, i, f"a_{i}")
    statements.append(f"r_{i}[B@dp,S,D] = x_{i}[B,S,D] + o_{i}[B,S,H,K] * wo_{i}[H,K,D]")
    statements.append(norm(rng, f"n_{i}", f"r_{i}", f"g2_{i}"))
    statements += mlp(rng, i, f"n_{i}")
    if rng.random() < 0.3:
        statements.append(f"l_{i}[B] = mean[S,D](square(r_{i}[B,S,D]))")
    if rng.random() < 0.2:
        statements.append(f"c_{i}[B,S,F] = where(u_{i}[B,S,F] > 0, u_{i}[B,S,F], 0)")
    statements.append(f"x_{i + 1}[B@dp,S,D] = r_{i}[B,S,D] + u_{i}[B,S,F] * w2_{i}[F,D]")
    return params, statements


def program(statements: int, seed: int = 0) -> str:
    """A program of exactly `statements` statements (the last layer cut short)."""
    rng = random.Random(seed)
    lines = [HEADER]
    written = layer = 0
    last = "x_0"
    while written < statements:
        params, body = layer_lines(rng, layer)
        body = body[:statements - written]
        lines += params + body + [""]
        written += len(body)
        last = body[-1].split("[", 1)[0]
        layer += 1
    lines.append(f"output {last}")
    return "\n".join(lines) + "\n"


def timed(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def measure(text: str, runs: int) -> tuple[float, float]:
    """Median parse and check seconds over `runs` runs."""
    parse_times, check_times = [], []
    for _ in range(runs):
        parse_seconds, module = timed(parse, text, "<bench>")
        check_seconds, _ = timed(check, module, None, text)
        parse_times.append(parse_seconds)
        check_times.append(check_seconds)
    return statistics.median(parse_times), statistics.median(check_times)


def profile(statements: int, top: int = 20) -> None:
    text = program(statements)
    profiler = cProfile.Profile()
    profiler.enable()
    check(parse(text, "<bench>"), None, text)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(entry[2] for entry in stats.stats.values())
    print(f"\ncProfile of parse + check, {statements:,} statements "
          f"({total * 1e3:.0f} ms under the profiler):")
    by_part: dict[str, float] = {}
    for (filename, _, _), (_, _, own, _, _) in stats.stats.items():
        path = Path(filename).as_posix()
        if "/lark/" in path:
            part = "lark " + Path(filename).stem
        elif "/einpar/" in path or "/grammar/" in path:
            part = "einpar " + Path(filename).stem
        else:
            part = "other (builtins, stdlib)"
        by_part[part] = by_part.get(part, 0.0) + own
    print(f"{'own ms':>9} {'share':>6}  module")
    for part, own in sorted(by_part.items(), key=lambda item: item[1], reverse=True):
        print(f"{own * 1e3:9.1f} {own / total:6.1%}  {part}")
    stats = stats.strip_dirs()
    print()
    print(f"{'own ms':>9} {'share':>6} {'calls':>9}  function")
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    for (filename, line, name), (_, calls, own, _, _) in rows:
        print(f"{own * 1e3:9.1f} {own / total:6.1%} {calls:9,}  {name} ({filename}:{line})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000])
    parser.add_argument("--profile", type=int, metavar="N", help="profile N statements")
    args = parser.parse_args(argv)
    check(parse(program(10), "<warm-up>"), None, program(10))  # build the parser once
    print(f"{'statements':>10} {'lines':>7} {'runs':>4} {'parse ms':>9} {'check ms':>9} "
          f"{'total ms':>9} {'µs/stmt':>8} {'vs first':>8}")
    first = None
    for size in args.sizes:
        text = program(size)
        runs = 7 if size <= 1_000 else 3
        parse_seconds, check_seconds = measure(text, runs)
        total = parse_seconds + check_seconds
        per_statement = total / size
        first = first or per_statement
        print(f"{size:>10,} {text.count(chr(10)):>7,} {runs:>4} {parse_seconds * 1e3:>9.1f} "
              f"{check_seconds * 1e3:>9.1f} {total * 1e3:>9.1f} {per_statement * 1e6:>8.1f} "
              f"{per_statement / first:>7.2f}x")
    print("\nA linear front end keeps µs/stmt flat ('vs first' near 1.00x).")
    if args.profile:
        profile(args.profile)


if __name__ == "__main__":
    main()
