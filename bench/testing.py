"""How long einpar.testing's assert_equivalent takes on the simulator.

    python bench/testing.py            # every example, then a 100-example property test
    python bench/testing.py --repeat 5 examples/mlp/megatron.ein

For each example: the median time of one `assert_equivalent(path, backends=("numpy",))`
(load, check, compile, reference, simulated devices, comparison). Then a property test as
a user would write one: 100 drawn relayouts of the Megatron MLP at small sizes, each checked
by assert_equivalent on the simulator.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from einpar.api import load
from einpar.testing import assert_equivalent, relayouts

ROOT = Path(__file__).resolve().parent.parent


def per_call(path: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        assert_equivalent(path, backends=("numpy",))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def property_test(count: int) -> float:
    program = load(ROOT / "examples" / "mlp" / "megatron.ein",
                   {"tp": 2, "B": 4, "S": 8, "D": 16, "F": 32})

    @settings(max_examples=count, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(relayouts(program))
    def each(relayout):
        assert_equivalent(program, layouts=relayout, backends=("numpy",))

    start = time.perf_counter()
    each()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path, help="programs (default: every example)")
    parser.add_argument("--repeat", type=int, default=3, help="calls per example (median)")
    parser.add_argument("--examples", type=int, default=100, help="examples of the property test")
    args = parser.parse_args(argv)
    files = args.files or sorted((ROOT / "examples").rglob("*.ein"))
    assert_equivalent(files[0], backends=("numpy",))  # imports and caches warmed
    print(f"{'program':52} {'per call':>9}")
    for path in files:
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        print(f"{str(shown):52} {per_call(path, args.repeat):8.3f}s", flush=True)
    total = property_test(args.examples)
    print(f"property test, {args.examples} relayouts of the small Megatron MLP: {total:.2f}s "
          f"({total / args.examples * 1000:.0f} ms per example)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
