"""The front end fuzzed through the command line: no internal error, no crash, no hang.

Mutated examples and docs/language.md programs (einpar.fuzz) run through
`einpar.cli.main` in a watched worker process; the slow tests run a few
thousand of them, the same ones on every run. A finding that matches an issue
being fixed elsewhere (einpar.fuzz.KNOWN_ISSUES) is tolerated; any other fails
the test with the shortest input of each kind. The fast tests check the
harness itself and keep every crash the fuzzer found fixed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from einpar import cli, fuzz
from einpar.cli import main

ROOT = Path(__file__).resolve().parent.parent
SEEDS = fuzz.load_seeds(ROOT)

# Generous: the machine may be busy, and a hang is minutes, not seconds.
BUDGET_S = 30.0


def assert_no_new_findings(report: fuzz.Report) -> None:
    new = report.new()
    if new:
        shown = "\n\n".join(min(found, key=lambda f: len(f.data)).summary() + "\n" + found[0].trace
                            for kind, found in report.by_kind().items()
                            if any(f.known is None for f in found))
        pytest.fail(f"{len(new)} of {report.inputs} inputs ended in an internal error, a crash "
                    f"or a hang:\n{shown}", pytrace=False)


# ---------------------------------------------------------------- the harness


def test_seeds_are_every_example_and_the_programs_of_the_language_page():
    names = [seed.name for seed in SEEDS]
    examples = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").rglob("*.ein"))
    assert names[:len(examples)] == examples
    docs = names[len(examples):]
    assert len(docs) >= 20 and all(name.startswith("docs/language.md:") for name in docs)
    assert not any(seed.text.lstrip().startswith(("$", "error[")) for seed in SEEDS)


def test_inputs_are_a_function_of_seed_and_index():
    assert fuzz.mutant(SEEDS, 0, 20_000, sweep=False) == fuzz.mutant(SEEDS, 0, 20_000, sweep=False)
    assert fuzz.mutant(SEEDS, 0, 20_000, sweep=False) != fuzz.mutant(SEEDS, 1, 20_000, sweep=False)
    # The sweep first: every seed cut at every position, the first seed first.
    first = SEEDS[0].text.encode()
    assert fuzz.mutant(SEEDS, 0, 0)[0] == b""
    assert fuzz.mutant(SEEDS, 0, 7)[0] == first[:7]
    assert fuzz.mutant(SEEDS, 0, len(SEEDS[0].text))[0] == first
    assert fuzz.mutant(SEEDS, 0, len(SEEDS[0].text) + 1)[0] == b""


def test_every_mutation_returns_text():
    rng = random.Random(0)
    for name, mutation in fuzz.MUTATIONS.items():
        for seed in SEEDS[:4] + [fuzz.Seed("empty", "")]:
            out = mutation(seed.text, rng)
            assert isinstance(out, str), name
            out.encode("utf-8", "surrogateescape")


def test_mutations_take_linear_time_on_long_names():
    # Looking for tensor references at every position of a 100,000-character name took a minute.
    text = "dim " + "n" * 100_000 + "=2\ny[B] = x[B]\n"
    rng = random.Random(0)
    started = time.perf_counter()
    for mutation in fuzz.MUTATIONS.values():
        mutation(text, rng)
    assert time.perf_counter() - started < 2


def test_inputs_stay_under_a_megabyte():
    # An input of campaign 0 was once two long-line mutations in a row: 502 MB. Every
    # mutation is bounded now, whatever the corpus (which grows with the docs and examples).
    largest = max(len(fuzz.mutant(SEEDS, 0, index, sweep=False)[0]) for index in range(3000))
    assert largest <= fuzz.MAX_INPUT


def test_a_clean_diagnostic_is_no_finding(tmp_path):
    path = tmp_path / "bad.ein"
    path.write_text("dim B=8\ninput x[B, $]\n")
    outcome = fuzz.run_cli(["check", str(path)], BUDGET_S)
    assert (outcome.code, outcome.problem) == (1, None)
    assert "error[E100]" in outcome.output


def test_an_exception_escaping_main_is_a_finding(monkeypatch):
    def broken(argv):
        return {}["missing"]

    monkeypatch.setattr(cli, "main", broken)
    outcome = fuzz.run_cli(["check", "x.ein"], BUDGET_S)
    assert outcome.problem == "uncaught exception"
    assert outcome.error == "KeyError: 'missing'"
    assert outcome.where.endswith("test_fuzz.py:broken")


def test_an_internal_error_is_a_finding(monkeypatch, tmp_path):
    monkeypatch.delenv("EINPAR_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_print_check", lambda program, out: 1 / 0)
    path = tmp_path / "ok.ein"
    path.write_text("dim B=8\ninput x[B]\noutput x\n")
    outcome = fuzz.run_cli(["check", str(path)], BUDGET_S, debug=False)
    assert (outcome.code, outcome.problem) == (3, "internal error")
    assert outcome.error == "ZeroDivisionError: division by zero"
    # With EINPAR_DEBUG (the default) the exception escapes, and says where it was raised.
    outcome = fuzz.run_cli(["check", str(path)], BUDGET_S)
    assert outcome.problem == "uncaught exception"
    assert outcome.where == "einpar/cli.py:main"  # the innermost frame of einpar itself
    assert "EINPAR_DEBUG" not in os.environ


def test_code_shape_ignores_strings_but_not_code_smuggled_in_them():
    shape = fuzz._code_shape
    assert shape('"""from a.ein"""\nx = f"{1} a.ein"\n') == shape('"""from b"""\nx = f"{1} b"\n')
    assert shape('"""p""";print(1);""".ein"""\n') != shape('"""p.ein"""\n')


def test_minimize_keeps_the_same_failure(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def picky(program, out):  # fails for any program with a param named w
        assert "w" not in {value.name for value in program.inputs}

    monkeypatch.setattr(cli, "_print_check", picky)
    data = SEEDS[0].text.replace("wq", "w").encode()
    finding = fuzz.Finding(0, "test", data, "uncaught exception", ["check", "big.ein"],
                           "AssertionError", "einpar/cli.py:main")
    assert fuzz.minimize(finding, seconds=60) == b"param w[]"


def test_a_command_over_its_budget_is_a_hang(monkeypatch):
    monkeypatch.setattr(cli, "main", lambda argv: time.sleep(5))
    started = time.perf_counter()
    outcome = fuzz.run_cli(["check", "x.ein"], 0.2)
    assert outcome.problem == "hang" and outcome.error == "over 0.2 s"
    assert time.perf_counter() - started < 2


def test_the_campaign_counts_inputs_and_exit_codes():
    report = fuzz.Campaign(SEEDS, seed=0, budget_s=BUDGET_S, sweep=False).run(20, start=100)
    assert report.inputs == 20
    assert sum(report.exit_codes.values()) == report.commands >= 20
    assert set(report.exit_codes) <= {0, 1, 2}


class _FakeWorkers(fuzz.Campaign):
    """A campaign whose workers start, say they are ready, then run `script`."""

    def __init__(self, script: str, **options):
        super().__init__(SEEDS, **options)
        self.script = script

    def _start(self, start, end):
        self._stderr = tempfile.TemporaryFile()
        ready = 'import json, os, sys, time; print(json.dumps({"ready": True}), flush=True); '
        return subprocess.Popen([sys.executable, "-c", ready + self.script],
                                stdout=subprocess.PIPE, stderr=self._stderr)


def test_a_worker_that_dies_is_a_crash_and_the_next_input_runs():
    report = _FakeWorkers('sys.stderr.write("boom"); os._exit(9)').run(2)
    assert report.inputs == 2
    assert [(f.index, f.problem, f.error) for f in report.findings] == [
        (0, "crash", "worker exited with 9"), (1, "crash", "worker exited with 9")]
    assert report.findings[0].trace == "boom"


def test_a_worker_stuck_past_the_hard_limit_is_a_hang():
    report = _FakeWorkers("time.sleep(60)", hard_s=0.5).run(1, start=3)
    assert [(f.index, f.problem) for f in report.findings] == [(3, "hang")]
    assert report.findings[0].data == fuzz.mutant(SEEDS, 0, 3)[0]


# ---------------------------------------------------------------- the fuzz runs


@pytest.mark.slow
@pytest.mark.parametrize("seed", ["examples/mlp/megatron.ein", "examples/moe/gshard.ein"])
def test_every_truncation_fails_only_with_diagnostics(seed):
    seeds = [s for s in SEEDS if s.name == seed]
    report = fuzz.Campaign(seeds, seed=0, budget_s=BUDGET_S).run(len(seeds[0].text) + 1)
    assert report.inputs == len(seeds[0].text) + 1
    assert_no_new_findings(report)


@pytest.mark.slow
def test_mutated_programs_through_the_cli_fail_only_with_diagnostics():
    report = fuzz.Campaign(SEEDS, seed=0, budget_s=BUDGET_S, sweep=False).run(1_500)
    print(report.describe())
    assert report.inputs == 1_500
    assert report.exit_codes.get(0, 0) > 200  # many mutants are still programs, and run
    assert_no_new_findings(report)


# ---------------------------------------------------------------- what the fuzzer found

PROGRAM = "mesh dp=2\ndim b=4 s=4 red=2\ninput x[b@dp, s, red]\ny[b,s] = sum[red](x[b,s,red])\noutput y\n"
MARKUP_COMMANDS = [["check"], ["compile"], ["compile", "--emit", "ir"], ["explain"],
                   ["cost", "--cluster", "h100x8"], ["run"], ["run", "--backend", "numpy"]]


@pytest.mark.parametrize("name", ["x[/].ein", "[bold]y.ein", "[red]z.ein"])
@pytest.mark.parametrize("command", MARKUP_COMMANDS, ids=" ".join)
def test_a_file_name_like_rich_markup_is_printed_as_it_is(capsys, tmp_path, monkeypatch, name,
                                                          command):
    # `x[/].ein` once ended `run` in "internal error: MarkupError: closing tag '[/]' ...";
    # `[red]z.ein` was printed as a red `z.ein`.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x[").mkdir()
    Path(name).write_text(PROGRAM)
    assert main([command[0], name, *command[1:]]) == 0
    captured = capsys.readouterr()
    assert name in captured.out, captured.out
    assert captured.err == ""


def test_lower_case_layouts_are_shown_not_read_as_markup(capsys, tmp_path):
    # rich took `[b@dp,s,red]` for a markup tag, and check's layout column came out empty.
    path = tmp_path / "lower.ein"
    path.write_text(PROGRAM)
    assert main(["check", str(path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("x ", "y "))}
    assert "[b@dp,s,red]" in rows["x"] and "[b,s]" in rows["y"]


def test_warnings_on_stderr_are_not_read_as_the_emitted_module(tmp_path, monkeypatch):
    """`compile --emit jax` of a program with a warning (an input never read) prints the
    module on stdout and the warning on stderr; only stdout is the module."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.ein").write_text("mesh x=2\ndim B=4\ninput a[B]\ninput b[B]\ny[B] = a[B]\n"
                                    "output y\n")
    outcome = fuzz.run_cli(["compile", "p.ein", "--emit", "jax"], 60)
    assert "W100" in outcome.output and "W100" not in outcome.stdout
    assert outcome.problem is None, outcome.error


def test_the_fuzzers_vocabulary_is_the_languages():
    from einpar.check_expr import ALL_FUNCTIONS
    assert set(fuzz.FUNCTIONS) == set(ALL_FUNCTIONS) and len(fuzz.FUNCTIONS) == len(ALL_FUNCTIONS)
