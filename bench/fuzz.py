"""Fuzz the front end through the command line for a long run, and count what happens.

    .venv/bin/python bench/fuzz.py --count 100000 --seed 0
    .venv/bin/python bench/fuzz.py --count 2000 --start 50000   # a slice of the same run
    .venv/bin/python bench/fuzz.py --show 12345                 # the text of input 12345

Inputs are mutated examples and docs/language.md programs (einpar.fuzz); the
first ones cut every seed at every position. Prints inputs per second, the
exit codes of every command run, and every internal error, crash and hang
grouped by kind, with the shortest input of each; `--out` keeps them all as
JSON. Exit status 1 if any finding is not a known issue (einpar.fuzz.KNOWN_ISSUES).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from einpar.fuzz import Campaign, load_seeds, minimize, mutant  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="inputs to run (default 10000)")
    parser.add_argument("--start", type=int, default=0, help="first input's index (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="the campaign (default 0)")
    parser.add_argument("--budget", type=float, default=10.0,
                        help="seconds one command may take before it counts as a hang (default 10)")
    parser.add_argument("--sample", type=float, default=0.1,
                        help="fraction of valid inputs also sent through another view, explain, "
                             "cost or run --backend numpy (default 0.1)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the truncations of every seed at every position")
    parser.add_argument("--out", type=Path, help="write every finding to this file, one JSON "
                                                 "object a line, as they are found")
    parser.add_argument("--minimize", type=float, default=60.0, metavar="SECONDS",
                        help="at the end, shrink the shortest input of each kind of finding for "
                             "up to this long (default 60; 0 to skip)")
    parser.add_argument("--show", type=int, metavar="INDEX", help="print input INDEX and exit")
    args = parser.parse_args()

    seeds = load_seeds(ROOT)
    if args.show is not None:
        data, made = mutant(seeds, args.seed, args.show, not args.no_sweep)
        print(f"# input {args.show}: {made}", file=sys.stderr)
        sys.stdout.buffer.write(data)
        return 0
    sweep = sum(len(s.text) + 1 for s in seeds)
    print(f"{len(seeds)} seeds; inputs 0 to {sweep - 1} are their truncations"
          if not args.no_sweep else f"{len(seeds)} seeds", flush=True)
    campaign = Campaign(seeds, seed=args.seed, budget_s=args.budget, sample=args.sample,
                        sweep=not args.no_sweep)

    def progress(report) -> None:
        print(f"  {report.inputs} inputs, {report.inputs / report.seconds:.1f}/s, "
              f"{len(report.findings)} findings", flush=True)

    kinds = set()
    log = args.out.open("w") if args.out else None

    def found(finding) -> None:
        if finding.kind not in kinds:
            kinds.add(finding.kind)
            print(f"new kind: {finding.summary()}", flush=True)
        if log is not None:
            log.write(json.dumps({
                "index": finding.index, "made": finding.made,
                "input": finding.data.decode("utf-8", "backslashreplace"),
                "problem": finding.problem, "command": finding.argv, "error": finding.error,
                "where": finding.where, "known": finding.known, "trace": finding.trace}) + "\n")
            log.flush()

    report = campaign.run(args.count, start=args.start, progress=progress, every_s=60,
                          found=found)
    print(report.describe(), flush=True)
    if args.minimize > 0:
        import os
        import tempfile

        os.chdir(tempfile.mkdtemp(prefix="einpar-minimize-"))
        print("\nminimized, one per kind:")
        for kind, found in sorted(report.by_kind().items()):
            shortest = min(found, key=lambda f: len(f.data))
            small = minimize(shortest, budget_s=args.budget, seconds=args.minimize)
            command = " ".join(["einpar", *shortest.argv])
            print(f"== {kind} (input #{shortest.index}; {command})\n{small!r}", flush=True)
    return 1 if report.new() else 0


if __name__ == "__main__":
    sys.exit(main())
