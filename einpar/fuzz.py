"""Fuzz einpar's front end through its own command line.

Mutated `.ein` programs (byte flips; token deletions, duplications and swaps;
hostile names and numbers; truncations; deep nesting; long lines; Unicode
line separators, control characters and byte-order marks) go through
`einpar.cli.main` exactly as a user's file would: `check` on every input,
`compile` on those that check, and on a sample `compile --emit jax`,
`explain`, `cost --cluster h100x8` and `run --backend numpy` at small sizes.
The only acceptable outcomes are success and a diagnostic (exit 1 or 2); an
internal error (exit 3, or any exception escaping `main`), a crash of the
process and an input that runs past its time budget are findings.

    from einpar.fuzz import Campaign, load_seeds
    campaign = Campaign(load_seeds("."), seed=0)
    report = campaign.run(count=5_000)        # worker processes under a watchdog
    for finding in report.findings: print(finding.summary())

Every input is a pure function of (seed, index), so a finding is reproduced
from its index alone (`mutant(seeds, seed, index)`), and runs are the same on
every machine. Inputs run in a worker process that a watchdog replaces when
it hangs in C code or dies; inside it, each command has a soft time budget
(SIGALRM) that reports where it was stuck. `bench/fuzz.py` is the long run;
tests/test_fuzz.py the bounded one.

The mutations follow the classic families of grammar-unaware fuzzers (AFL's
bit flips and dictionary tokens, https://lcamtuf.coredump.cx/afl/technical_details.txt)
plus the hazards of hand-written text: Unicode line breaks that
`str.splitlines` honours but the grammar does not, invisible characters, and
numbers written with non-ASCII digits.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .syntax import KEYWORDS  # the language's keywords, which mutations insert

__all__ = ["Seed", "load_seeds", "MUTATIONS", "mutate", "mutant", "Outcome", "run_cli",
           "run_input", "minimize", "Finding", "Report", "Campaign", "KNOWN_ISSUES",
           "known_issue"]


# ---------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Seed:
    name: str  # where it came from: "examples/mlp/megatron.ein", "docs/language.md:31"
    text: str


FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def load_seeds(root: str | Path) -> list[Seed]:
    """Every example program and every `.ein` code block of docs/language.md under `root`."""
    root = Path(root)
    seeds = [Seed(path.relative_to(root).as_posix(), path.read_text(encoding="utf-8"))
             for path in sorted((root / "examples").rglob("*.ein"))]
    page = root / "docs" / "language.md"
    if page.exists():
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            lang, body = match.groups()
            # Program text: plain or `ein` blocks, not shell sessions or printed output.
            if lang in ("", "ein") and body.strip() and not body.lstrip().startswith(("$", "error[")):
                line = text.count("\n", 0, match.start()) + 1
                seeds.append(Seed(f"docs/language.md:{line}", body))
    return seeds


# ---------------------------------------------------------------- mutations
#
# A mutation takes the text (as a str that may hold lone surrogates standing for
# bytes that are not UTF-8, `surrogateescape`) and a random.Random, and returns new text.

TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?|>=|<=|==|!=|\s+|.",
                   re.S)
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NUMBER = re.compile(r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?")
# A tensor reference, x[B,S,D]. Only from the start of a name: trying every position inside a
# 100,000-character name would take minutes.
TERM = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*+\[[^\]\n]*\]")

# The checker's functions, in an order of their own: a campaign's inputs follow from it, so
# reordering would change what every index of a published campaign means (tests/test_fuzz.py
# checks it is the same set as einpar.check_expr.ALL_FUNCTIONS).
FUNCTIONS = ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "gelu", "silu", "abs",
             "square", "where", "max2", "min2", "sum", "max", "min", "mean", "softmax",
             "logsumexp", "rmsnorm", "layernorm", "cumsum", "route", "sin", "cos", "erf", "pow",
             "take", "pos")
# Names a code generator or a Python namespace may trip over, and names in other scripts.
HOSTILE_NAMES = ("__debug__", "__import__", "__builtins__", "__name__", "__class__", "None", "True",
                 "False", "class", "def", "lambda", "import", "return", "yield", "await", "async",
                 "print", "exec", "eval", "self", "np", "jnp", "jax", "mesh_", "P", "x", "_", "__",
                 "k", "f32", "bf16", "i32", "bool", "e", "E", "inf", "nan", "NaN", "main",
                 "global_program", "a" * 300, "é", "ℌ", "ｘ", "x\u0301", "Σ", "日本")
HOSTILE_NUMBERS = ("0", "00", "-1", "-0", "1", "2", "3", "7", "1024", "4097", "2147483648",
                   "9223372036854775807", "9223372036854775808", "18446744073709551616",
                   "999999999999999999", "1" + "0" * 30, "9" * 400, "1e999", "1e-999", "1e308",
                   "0.0", ".5", "5.", "1e", "1e+", "0x10", "1_000", "²", "٣", "１２", "Ⅻ", "𝟗",
                   "nan", "inf", "+4", "1.5e3", "1E-3")
UNICODE = ("\u0301", "\u202e", "\u200f", "\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c",
           "\x1d", "\x1e", "\u200b", "\u200d", "\ufeff", "\u00a0", "\u3000", "🙂", "👩\u200d💻",
           "\x00", "\x7f", "\r", "\r\n", "\t", "é", "→", "λ",
           "\udced\udca0\udc80")  # the last: a UTF-16 surrogate encoded in UTF-8, not valid UTF-8
WRAPPERS = ("(", "exp(", "tanh(", "-", "sum[B](", "softmax[S](", "where(x[B] > 0, ",
            "max2(1, ")


def split_tokens(text: str) -> list[str]:
    """`text` as the lexer roughly sees it (names, numbers, operators, runs of space), joined
    back to `text` exactly."""
    return TOKEN.findall(text)


def replace_random_match(text: str, pattern: re.Pattern, rng: random.Random, choices) -> str:
    """One match of `pattern` in `text`, drawn at random, replaced by one of `choices`."""
    matches = list(pattern.finditer(text))
    if not matches:
        return text
    match = rng.choice(matches)
    return text[:match.start()] + rng.choice(choices) + text[match.end():]


def flip_byte(text, rng):
    """One bit of one byte flipped: often no longer UTF-8."""
    data = bytearray(text.encode("utf-8", "surrogateescape"))
    if not data:
        return text
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return data.decode("utf-8", "surrogateescape")


def random_bytes(text, rng):
    """A few arbitrary bytes inserted."""
    data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    i = rng.randint(0, len(text))
    return text[:i] + data.decode("utf-8", "surrogateescape") + text[i:]


def delete_token(text, rng):
    tokens = split_tokens(text)
    if tokens:
        del tokens[rng.randrange(len(tokens))]
    return "".join(tokens)


def duplicate_token(text, rng):
    tokens = split_tokens(text)
    if tokens:
        i = rng.randrange(len(tokens))
        tokens.insert(rng.randint(0, len(tokens)), tokens[i])
    return "".join(tokens)


def swap_tokens(text, rng):
    tokens = split_tokens(text)
    if len(tokens) > 1:
        i, j = rng.randrange(len(tokens)), rng.randrange(len(tokens))
        tokens[i], tokens[j] = tokens[j], tokens[i]
    return "".join(tokens)


def substitute_name(text, rng):
    """A name replaced by a hostile one, a keyword or another name of the program, at one
    occurrence or (half the time, which often keeps the program valid) at every one."""
    names = sorted(set(NAME.findall(text)))
    pool = names + list(KEYWORDS + FUNCTIONS + HOSTILE_NAMES)
    if names and rng.random() < 0.5:
        old, new = rng.choice(names), rng.choice(pool)
        return re.sub(rf"\b{re.escape(old)}\b", lambda _: new, text)
    return replace_random_match(text, NAME, rng, pool)


def substitute_number(text, rng):
    return replace_random_match(text, NUMBER, rng, HOSTILE_NUMBERS)


def truncate(text, rng):
    return text[:rng.randint(0, len(text))]


def deep_nesting(text, rng):
    """An operand wrapped many levels deep, or the program inside many repeat blocks."""
    depth = rng.choice((10, 50, 100, 200, 400, 1000, 3000))
    if rng.random() < 0.25:
        dims = [d for d in re.findall(r"^dim\s+([A-Za-z_]\w*)", text, re.M) if len(d) < 20] or ["L"]
        lines = text.split("\n")
        start = rng.randint(0, len(lines))
        opener = f"repeat {rng.choice(dims)} {{\n"
        return "\n".join(lines[:start]) + "\n" + opener * depth + "\n".join(lines[start:]) \
            + "\n" + "}\n" * depth
    terms = list(TERM.finditer(text))
    if not terms:
        return text
    term = rng.choice(terms)
    wrapper = rng.choice(WRAPPERS)
    closer = "" if wrapper == "-" else ")"
    return (text[:term.start()] + wrapper * depth + term.group() + closer * depth
            + text[term.end():])


def long_line(text, rng):
    """A line made very long: a sum of many terms, a long comment, a long name."""
    lines = text.split("\n")
    i = rng.randrange(len(lines))
    count = rng.choice((100, 1000, 10_000))
    kind = rng.randrange(3)
    if kind == 0 and (terms := TERM.findall(lines[i])):
        lines[i] += "".join(f" {rng.choice('+-*')} {rng.choice(terms)}" for _ in range(count))
    elif kind == 1:
        lines[i] += " # " + "x" * count * 10
    else:
        names = NAME.findall(lines[i])
        if names:
            lines[i] = re.sub(rf"\b{re.escape(rng.choice(names))}\b", "n" * count * 10, lines[i])
    return "\n".join(lines)


def insert_unicode(text, rng):
    """Invisible, combining, right-to-left, line-separating and control characters."""
    i = rng.randint(0, len(text))
    return text[:i] + rng.choice(UNICODE) + text[i:]


def line_endings(text, rng):
    """CRLF, lone CR, form feed, vertical tab, U+2028 or NEL for some or every newline."""
    ending = rng.choice(("\r\n", "\r", "\x0c", "\x0b", "\u2028", "\u2029", "\u0085", "\n\n\n"))
    if rng.random() < 0.5:
        return text.replace("\n", ending)
    breaks = [m.start() for m in re.finditer("\n", text)]
    if not breaks:
        return text
    i = rng.choice(breaks)
    return text[:i] + ending + text[i + 1:]


def byte_order_mark(text, rng):
    return rng.choice(("\ufeff", "\ufeff\ufeff", "\x00", "\ufeff\n")) + text


def delete_line(text, rng):
    lines = text.split("\n")
    del lines[rng.randrange(len(lines))]
    return "\n".join(lines)


def duplicate_line(text, rng):
    lines = text.split("\n")
    lines.insert(rng.randint(0, len(lines)), rng.choice(lines))
    return "\n".join(lines)


def swap_lines(text, rng):
    lines = text.split("\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


MUTATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "flip byte": flip_byte, "random bytes": random_bytes, "delete token": delete_token,
    "duplicate token": duplicate_token, "swap tokens": swap_tokens,
    "substitute name": substitute_name, "substitute number": substitute_number,
    "truncate": truncate, "deep nesting": deep_nesting, "long line": long_line,
    "insert unicode": insert_unicode, "line endings": line_endings,
    "byte order mark": byte_order_mark, "delete line": delete_line,
    "duplicate line": duplicate_line, "swap lines": swap_lines,
}


# Inputs stay under this size: two long-line mutations in a row could make a gigabyte, which
# any parser takes minutes to read.
MAX_INPUT = 1 << 20


def mutate(text: str, rng: random.Random) -> tuple[str, list[str]]:
    """One to three random mutations of `text`; the new text and the mutations' names."""
    applied = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        name = rng.choice(list(MUTATIONS))
        mutated = MUTATIONS[name](text, rng)
        if len(mutated) <= MAX_INPUT:
            text = mutated
            applied.append(name)
    return text, applied


def mutant(seeds: list[Seed], seed: int, index: int, sweep: bool = True) -> tuple[bytes, str]:
    """Input number `index` of campaign `seed`: its bytes and how it was made.

    With `sweep`, the first inputs are every seed truncated at every position;
    the rest are random mutations of a random seed.
    """
    if sweep:
        total = sum(len(s.text) + 1 for s in seeds)
        if index < total:
            for s in seeds:
                if index <= len(s.text):
                    return s.text[:index].encode("utf-8"), f"{s.name} truncated at {index}"
                index -= len(s.text) + 1
    rng = random.Random(f"einpar-fuzz:{seed}:{index}")
    source = rng.choice(seeds)
    text, applied = mutate(source.text, rng)
    return text.encode("utf-8", "surrogateescape"), f"{source.name}: {', '.join(applied)}"


# ---------------------------------------------------------------- running one input


class Overtime(BaseException):
    """Raised by the soft time budget; a BaseException so `except Exception` lets it through."""


@dataclass
class Outcome:
    argv: list[str]
    code: int | None  # exit code; None when an exception escaped or time ran out
    seconds: float
    output: str  # stdout and stderr
    problem: str | None = None  # "internal error", "uncaught exception", "hang", or None if clean
    error: str = ""  # the exception: "RecursionError: maximum recursion depth exceeded"
    where: str = ""  # the innermost einpar frame: "lower.py:lower_ops"
    trace: str = ""
    stdout: str = ""  # what a script reads: the emitted module, the JSON document


def _innermost_einpar_frame(tb) -> str:
    """`folder/file.py:function` of the innermost frame in einpar's code (not this harness)."""
    frames = [f for f in traceback.extract_tb(tb) if Path(f.filename).name != "fuzz.py"]
    packages = ("einpar", "backends", "cost_model", "grammar")
    inside = [f for f in frames if Path(f.filename).parent.name in packages]
    frame = (inside or frames or [None])[-1]
    if frame is None:
        return "?"
    return f"{Path(frame.filename).parent.name}/{Path(frame.filename).name}:{frame.name}"


def _on_alarm(signum, frame):
    raise Overtime()


def run_cli(argv: list[str], budget_s: float, debug: bool = True) -> Outcome:
    """`einpar.cli.main(argv)` in this process, output captured, under a soft time budget.

    With `debug`, EINPAR_DEBUG=1 makes main re-raise an internal error, so its traceback
    says where it is.
    """
    from . import cli

    was = os.environ.get("EINPAR_DEBUG")
    if debug:
        os.environ["EINPAR_DEBUG"] = "1"
    stdout, stderr = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    outcome = Outcome(list(argv), None, 0.0, "")
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            outcome.code = cli.main(argv)
    except Overtime as stop:
        outcome.problem = "hang"
        outcome.error = f"over {budget_s:g} s"
        outcome.where = _innermost_einpar_frame(stop.__traceback__)
        outcome.trace = "".join(traceback.format_exception(stop, limit=-8))
    except BaseException as error:  # noqa: BLE001 - anything escaping main is the finding
        if isinstance(error, KeyboardInterrupt):
            raise
        outcome.problem = "uncaught exception"
        outcome.error = f"{type(error).__name__}: {str(error)[:200]}"
        outcome.where = _innermost_einpar_frame(error.__traceback__)
        outcome.trace = "".join(traceback.format_exception(error, limit=-8))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        outcome.seconds = time.perf_counter() - started
        if debug and was is None:
            del os.environ["EINPAR_DEBUG"]
    outcome.stdout = stdout.getvalue()
    outcome.output = outcome.stdout + stderr.getvalue()
    if outcome.problem is None and (outcome.code == 3 or "This is a bug in einpar" in outcome.output):
        outcome.problem = "internal error"
        first = next((line for line in outcome.output.splitlines() if "internal error" in line), "")
        outcome.error = first.partition("internal error: ")[2] or first
    elif outcome.problem is None and outcome.code not in (0, 1, 2):
        outcome.problem = "unexpected exit code"
        outcome.error = f"exit code {outcome.code}"
    elif outcome.code == 0 and argv[-2:] == ["--emit", "jax"]:
        _check_emitted_module(outcome)
    elif outcome.code in (0, 1) and "--json" in argv:
        try:  # results and diagnostics alike: what a script reads
            json.loads(stdout.getvalue())
        except ValueError as error:
            outcome.problem = "invalid JSON"
            outcome.error = f"{type(error).__name__}: {error}"
            outcome.where = "einpar/cli.py:main"
    if outcome.problem and not outcome.error.strip():
        outcome.error = outcome.problem
    return outcome


def _check_emitted_module(outcome: Outcome) -> None:
    """The module `--emit jax` printed must be Python (it is run as it is)."""
    try:
        compile(outcome.stdout, "<emitted>", "exec")
    except (SyntaxError, ValueError) as error:
        outcome.problem = "invalid emitted module"
        outcome.error = f"{type(error).__name__}: {error}"
        outcome.where = "backends/jax_codegen.py:write_module"


# Sizes for the sampled `run` and `cost`: every dim as large as the mesh has devices, so every
# layout divides it, and no tensor holds more than this many elements.
RUN_ELEMENTS = 1 << 16
RUN_DEVICES = 64


def small_sizes(path: str) -> list[str] | None:
    """`--set` arguments that make the program at `path` small, or None if it cannot be."""
    from . import api
    from .errors import EinparError

    try:
        program = api.load(path)
    except EinparError:
        return None
    devices = program.mesh.num_devices
    if devices > RUN_DEVICES:
        return None
    axes = set(program.mesh.names)
    settable = [name for name, _ in program.dims if name not in axes]
    if any(devices ** len(value.type.shape) > RUN_ELEMENTS for value in program.values.values()):
        return None
    return [f"{name}={devices}" for name in settable]


# A sampled run's limit by einpar's own estimate (E421 past it): honest work longer than the
# watchdog's budget (a mutant nesting ten repeat blocks runs 4^10 trips) is refused up front,
# so a run the watchdog stops means an estimate far off, which is a finding.
RUN_TIME_LIMIT = "3s"


def commands_for(path: str, rng: random.Random, sample: float) -> Iterator[list[str]]:
    """The command lines one input goes through: check; compile if it checks (and the JAX
    module, under a hostile file name); and, for a `sample` fraction of those, one more view
    or backend at small sizes."""
    yield ["check", path]
    yield ["compile", path]
    if path != PLAIN_NAME:
        yield ["compile", path, "--emit", "jax"]
    if rng.random() >= sample:
        return
    extra = rng.choice(("emit jax", "emit ir", "json", "explain", "cost", "run", "run"))
    if extra == "emit jax":
        yield ["compile", path, "--emit", "jax"]
    elif extra == "emit ir":
        yield ["compile", path, "--emit", rng.choice(("ir", "ast", "layouts"))]
    elif extra == "json":
        yield [rng.choice(("check", "compile")), path, "--json"]
    else:
        sizes = small_sizes(path)
        if sizes is None:
            return
        sets = ["--set", *sizes] if sizes else []
        if extra == "explain":
            yield ["explain", path, *sets]
        elif extra == "cost":
            yield ["cost", path, "--cluster", "h100x8", *sets]
        else:
            yield ["run", path, "--backend", "numpy", "--max-time", RUN_TIME_LIMIT, *sets]


# File names a user may have: rich markup, quotes and backslashes (which once reached printed
# text and emitted code as they were), spaces, non-ASCII and right-to-left characters.
FILE_NAMES = ("x[/].ein", "[bold]m.ein", 'p""";print(1);""".ein', "back\\slash.ein",
              "back\\x.ein", "it's.ein", "sp ace.ein", "é.ein", "\u202em.ein", "m{0}%s.ein",
              "m\nn.ein")
FILE_NAME_SAMPLE = 0.05
PLAIN_NAME = "mutant.ein"


def file_name(seed: int, index: int) -> str:
    """The name input `index` is saved under: mostly plain, sometimes hostile."""
    rng = random.Random(f"einpar-fuzz-file:{seed}:{index}")
    return rng.choice(FILE_NAMES) if rng.random() < FILE_NAME_SAMPLE else PLAIN_NAME


# The front end is linear in its input, but a 1 MB line takes seconds to parse and to quote in
# a diagnostic: each command has this much more time per megabyte before it counts as a hang.
SECONDS_PER_MB = 60.0


def run_input(data: bytes, path: str, rng: random.Random, budget_s: float,
              sample: float = 0.1) -> list[Outcome]:
    """Write `data` to `path` and run it through the CLI; stops at the first command that
    fails (a diagnostic from `check` means the later commands would report the same one).
    Each command may take `budget_s`, plus SECONDS_PER_MB per megabyte of `data`."""
    Path(path).write_bytes(data)
    budget_s += SECONDS_PER_MB * len(data) / 1e6
    outcomes = []
    for argv in commands_for(path, rng, sample):
        outcome = run_cli(argv, budget_s)
        outcomes.append(outcome)
        if outcome.problem is None and argv[-2:] == ["--emit", "jax"] and path != PLAIN_NAME:
            _compare_with_plain_name(outcome, data, budget_s)
        if outcome.problem or outcome.code != 0:
            break
    return outcomes


def _code_shape(module: str) -> str:
    """The module's syntax tree with every string constant blanked: the code that runs."""
    tree = ast.parse(module)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = ""
    return ast.dump(tree)


def _compare_with_plain_name(outcome: Outcome, data: bytes, budget_s: float) -> None:
    """The module emitted for a program saved under a hostile name must be the same code as
    for a plain name: the name may reach it only inside string literals."""
    Path(PLAIN_NAME).write_bytes(data)
    try:
        plain = run_cli([PLAIN_NAME if arg == outcome.argv[1] else arg for arg in outcome.argv],
                        budget_s)
    finally:
        os.remove(PLAIN_NAME)
    if plain.problem is None and _code_shape(plain.stdout) != _code_shape(outcome.stdout):
        outcome.problem = "file name in emitted code"
        outcome.error = f"the module for {outcome.argv[1]!r} runs other code than for a plain name"
        outcome.where = "backends/jax_codegen.py:write_module"


# ---------------------------------------------------------------- findings and known issues


@dataclass
class Finding:
    index: int
    made: str  # how the input was made
    data: bytes
    problem: str  # "internal error", "uncaught exception", "hang", "crash"
    argv: list[str]
    error: str
    where: str
    trace: str = ""
    known: str | None = None  # the known issue it matches, if any

    @property
    def kind(self) -> str:
        """What groups findings: the problem, the exception's type and where it was raised."""
        return f"{self.problem}: {self.error.split(':')[0]} in {self.where}"

    def summary(self) -> str:
        known = f" [known: {self.known}]" if self.known else ""
        command = " ".join(["einpar", *self.argv])
        return (f"{self.kind}{known}\n  input #{self.index} ({self.made}), {len(self.data)} bytes: "
                f"{self.data[:300]!r}{'...' if len(self.data) > 300 else ''}\n  {command}\n"
                f"  {self.error}")


# Failure classes already reported and awaiting a fix, so a long run can go on counting the
# rest; a finding that matches one is counted apart, anything else fails the test. Empty
# while einpar has no known failure. (problem, error type, where regex, description)
KNOWN_ISSUES: tuple[tuple[str, str, str, str], ...] = ()


def known_issue(finding: Finding) -> str | None:
    error_type = finding.error.split(":")[0]
    for problem, kind, where, description in KNOWN_ISSUES:
        if problem not in ("*", finding.problem):
            continue
        if kind and kind != error_type:
            continue
        if re.search(where, finding.where):
            return description
    return None


@dataclass
class Report:
    inputs: int = 0
    commands: int = 0
    seconds: float = 0.0
    exit_codes: dict[int, int] = field(default_factory=dict)  # over every command run
    findings: list[Finding] = field(default_factory=list)
    slowest: tuple[int, float] = (-1, 0.0)  # the input that took longest (index, seconds)

    def by_kind(self) -> dict[str, list[Finding]]:
        kinds: dict[str, list[Finding]] = {}
        for finding in self.findings:
            kinds.setdefault(finding.kind, []).append(finding)
        return kinds

    def new(self) -> list[Finding]:
        return [f for f in self.findings if f.known is None]

    def describe(self) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        codes = ", ".join(f"exit {code}: {n}" for code, n in sorted(self.exit_codes.items()))
        lines = [f"{self.inputs} inputs, {self.commands} commands in {self.seconds:.1f} s "
                 f"({rate:.1f} inputs/s); {codes}; slowest input #{self.slowest[0]}, "
                 f"{self.slowest[1]:.2f} s",
                 f"{len(self.findings)} findings ({len(self.new())} new) in "
                 f"{len(self.by_kind())} kinds"]
        for kind, found in sorted(self.by_kind().items()):
            shortest = min(found, key=lambda f: len(f.data))
            lines.append(f"\n== {len(found)} x {shortest.summary()}")
        return "\n".join(lines)


# ---------------------------------------------------------------- minimizing


def _ddmin(units: list[str], fails: Callable[[list[str]], bool], deadline: float) -> list[str]:
    """Zeller's delta debugging (ddmin, "Simplifying and Isolating Failure-Inducing Input",
    TSE 2002): remove ever smaller chunks while the input still fails."""
    chunks = 2
    while len(units) >= 2 and time.perf_counter() < deadline:
        size = -(-len(units) // chunks)
        for start in range(0, len(units), size):
            candidate = units[:start] + units[start + size:]
            if time.perf_counter() > deadline:
                return units
            if fails(candidate):
                units = candidate
                chunks = max(chunks - 1, 2)
                break
        else:
            if size == 1:
                return units
            chunks = min(chunks * 2, len(units))
    return units


def minimize(finding: Finding, budget_s: float = 10.0, seconds: float = 60.0,
             path: str = "minimized.ein") -> bytes:
    """The shortest input found in `seconds` that still fails `finding.argv` the same way
    (same problem, exception type and place), by lines, then tokens, then characters."""
    def same(data: bytes) -> bool:
        Path(path).write_bytes(data)
        argv = [path if arg == finding.argv[1] else arg for arg in finding.argv]
        outcome = run_cli(argv, budget_s)
        return (outcome.problem == finding.problem and outcome.where == finding.where
                and outcome.error.split(":")[0] == finding.error.split(":")[0])

    if len(finding.argv) < 2 or finding.problem == "crash" or not same(finding.data):
        return finding.data
    deadline = time.perf_counter() + seconds
    text = finding.data.decode("utf-8", "surrogateescape")

    def fails(units: list[str]) -> bool:
        return same("".join(units).encode("utf-8", "surrogateescape"))

    previous = None
    while text != previous and time.perf_counter() < deadline:  # until no pass removes more
        previous = text
        for split in (lambda t: t.splitlines(keepends=True), split_tokens, list):
            text = "".join(_ddmin(split(text), fails, deadline))
    return text.encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- the campaign


class Campaign:
    """Inputs `start` to `start + count` of campaign `seed`, run in a worker process.

    The worker runs each input in-process with a soft budget per command
    (`budget_s`); the watchdog here replaces a worker that stays on one input
    longer than `hard_s` (stuck in C code) or dies (a crash), and goes on with
    the next input.
    """

    def __init__(self, seeds: list[Seed], seed: int = 0, budget_s: float = 10.0,
                 hard_s: float | None = None, sample: float = 0.1, sweep: bool = True):
        self.seeds = seeds
        self.seed = seed
        self.budget_s = budget_s
        # Room for every command of the largest input, and for the machine being busy.
        longest = budget_s + SECONDS_PER_MB * MAX_INPUT / 1e6
        self.hard_s = hard_s if hard_s is not None else 4 * longest + 30
        self.sample = sample
        self.sweep = sweep

    def run(self, count: int, start: int = 0, progress: Callable[[Report], None] | None = None,
            every_s: float = 30.0, found: Callable[[Finding], None] | None = None) -> Report:
        """Run the inputs; `progress(report)` every `every_s` seconds, `found(finding)` at once."""
        self._found = found
        report = Report()
        began = self._last_progress = time.perf_counter()
        index = start
        end = start + count
        while index < end:
            worker = self._start(index, end)
            try:
                index = self._drain(worker, index, end, report, progress, every_s, began)
            finally:
                if worker.poll() is None:
                    worker.kill()
                worker.wait()
                worker.stdout.close()
                self._stderr.close()
        report.seconds = time.perf_counter() - began
        return report

    def _start(self, start: int, end: int) -> subprocess.Popen:
        config = {"seeds": [[s.name, s.text] for s in self.seeds], "seed": self.seed,
                  "start": start, "end": end, "budget_s": self.budget_s, "sample": self.sample,
                  "sweep": self.sweep}
        env = dict(os.environ, PYTHONHASHSEED="0", COLUMNS="100",
                   OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._stderr = tempfile.TemporaryFile()
        worker = subprocess.Popen([sys.executable, "-m", "einpar.fuzz"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        worker.stdin.write(json.dumps(config).encode())
        worker.stdin.close()
        return worker

    def _drain(self, worker, index, end, report, progress, every_s, began) -> int:
        """Read the worker's results until it finishes, hangs or dies; the next index to run."""
        buffer = b""
        waited_since = time.perf_counter()
        while index < end:
            ready, _, _ = select.select([worker.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(worker.stdout.fileno(), 1 << 16)
                if not chunk:  # the worker died on `index`
                    worker.wait()
                    self._stderr.seek(0)
                    said = self._stderr.read()[-3000:].decode("utf-8", "replace")
                    self._record(report, index, "crash", [],
                                 f"worker exited with {worker.returncode}", "?", said)
                    return index + 1
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    result = json.loads(line)
                    waited_since = time.perf_counter()
                    if "ready" in result:  # started: the clock runs from here, not from the imports
                        continue
                    assert result["index"] == index, (result["index"], index)
                    self._count(report, result)
                    index += 1
            elif time.perf_counter() - waited_since > self.hard_s:
                self._record(report, index, "hang", [], f"over {self.hard_s:g} s (watchdog)", "?")
                return index + 1
            now = time.perf_counter()
            if progress is not None and now - self._last_progress > every_s:
                self._last_progress = now
                report.seconds = now - began
                progress(report)
        return index

    def _count(self, report: Report, result: dict) -> None:
        report.inputs += 1
        if result["seconds"] > report.slowest[1]:
            report.slowest = (result["index"], result["seconds"])
        for code in result["codes"]:
            report.commands += 1
            report.exit_codes[code] = report.exit_codes.get(code, 0) + 1
        if result.get("problem"):
            self._record(report, result["index"], result["problem"], result["argv"],
                         result["error"], result["where"], result["trace"])

    def _record(self, report, index, problem, argv, error, where, trace="") -> None:
        if problem in ("crash", "hang") and not argv:  # from the watchdog: not counted yet
            report.inputs += 1
        data, made = mutant(self.seeds, self.seed, index, self.sweep)
        finding = Finding(index, made, data, problem, argv, error, where, trace)
        finding.known = known_issue(finding)
        report.findings.append(finding)
        if self._found is not None:
            self._found(finding)


# Address space for a worker: a runaway allocation ends in MemoryError (a finding), not in
# the machine swapping.
WORKER_MEMORY = 6 << 30


def _worker() -> None:
    """Run the inputs the campaign's config (on stdin) names; one JSON line per input."""
    import resource

    config = json.loads(sys.stdin.read())
    seeds = [Seed(name, text) for name, text in config["seeds"]]
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY, resource.RLIM_INFINITY))
    # Results go to the original stdout; anything else written to it (by C code) goes nowhere.
    results = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    from . import api, cli  # noqa: F401 - imported before the watchdog's clock starts
    from .syntax import _parser

    _parser()  # lark builds its tables once per process: start-up, not the first input's time

    results.write(json.dumps({"ready": True}) + "\n")
    results.flush()
    with tempfile.TemporaryDirectory(prefix="einpar-fuzz-") as folder:
        os.chdir(folder)  # file names as the user types them: `einpar check 'x[/].ein'`
        os.mkdir("x[")
        for index in range(config["start"], config["end"]):
            data, _ = mutant(seeds, config["seed"], index, config["sweep"])
            path = file_name(config["seed"], index)
            rng = random.Random(f"einpar-fuzz-commands:{config['seed']}:{index}")
            outcomes = run_input(data, path, rng, config["budget_s"], config["sample"])
            os.remove(path)
            bad = next((o for o in outcomes if o.problem), None)
            result = {"index": index, "codes": [o.code for o in outcomes if o.code is not None],
                      "seconds": sum(o.seconds for o in outcomes)}
            if bad is not None:
                result.update(problem=bad.problem, argv=bad.argv, error=bad.error, where=bad.where,
                              trace=bad.trace)
            results.write(json.dumps(result) + "\n")
            results.flush()


if __name__ == "__main__":
    _worker()
