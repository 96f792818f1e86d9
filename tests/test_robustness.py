"""The checker fails only with diagnostics, whatever text it is given.

Mutated examples (characters deleted, inserted, swapped; tokens duplicated,
dropped, replaced; lines shuffled, duplicated, deleted), random text and
random `--set` overrides go through `einpar.api.compile_source`. The only
acceptable failure is `EinparError`, whose diagnostics carry registered
codes, spans inside the text (line 1..lines+1, column >= 1), and render as
text and JSON without raising. Any other exception is a bug in einpar.

Mutations are drawn from seeded `random.Random`s, so every run feeds the same
inputs; a failure report shows the shortest offending input of each kind of
failure. Thousands of inputs run by default, many more under `pytest -m slow`.
"""

from __future__ import annotations

import random
import re
import string
import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from einpar.api import compile_source, parse_overrides
from einpar.check_training import DIRECTIVES, MODIFIERS, OPTIMIZERS, SETTINGS
from einpar.errors import CODES, EinparError, SourceMap, render_json, render_text
from einpar.fuzz import FUNCTIONS, NAME, NUMBER, replace_random_match, split_tokens
from einpar.syntax import KEYWORDS
from einpar.testing import programs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").rglob("*.ein"))
EXAMPLE_IDS = [path.relative_to(ROOT / "examples").with_suffix("").as_posix() for path in EXAMPLES]
FILE = "<mutant>"

MUTANTS_PER_EXAMPLE = 800
SLOW_MUTANTS_PER_EXAMPLE = 10_000
RANDOM_TEXTS = 1_500
SLOW_RANDOM_TEXTS = 30_000


# ---------------------------------------------------------------- what a clean failure is


def diagnostic_problems(error: EinparError, text: str) -> list[str]:
    """What is wrong with the diagnostics of `error` for `text` (nothing, ideally)."""
    problems = []
    if not error.diagnostics:
        problems.append("EinparError without diagnostics")
    line_count = len(text.splitlines())
    sources = SourceMap({FILE: text})
    for diagnostic in error.diagnostics:
        if diagnostic.code not in CODES:
            problems.append(f"unregistered code {diagnostic.code}")
        spans = [diagnostic.span] + [label.span for label in diagnostic.labels]
        for span in spans:
            if span is None:
                continue
            if not 1 <= span.line <= line_count + 1:
                problems.append(f"{diagnostic.code} span line {span.line} outside 1..{line_count + 1}")
            if span.col < 1:
                problems.append(f"{diagnostic.code} span column {span.col} < 1")
        try:
            rendered = render_text(diagnostic, sources)
            assert isinstance(rendered, str) and rendered
        except Exception:
            problems.append(f"render_text raised for {diagnostic.code}:\n{traceback.format_exc()}")
    try:
        render_json(error.diagnostics)
    except Exception:
        problems.append(f"render_json raised:\n{traceback.format_exc()}")
    return problems


def failure_of(text: str, overrides: dict[str, int] | None = None) -> tuple[str, str] | None:
    """None when `text` compiles or fails cleanly; else (a short kind, the details)."""
    try:
        compile_source(text, file=FILE, overrides=overrides)
    except EinparError as error:
        problems = diagnostic_problems(error, text)
        if problems:
            return problems[0].splitlines()[0], "\n".join(problems)
    except Exception as error:  # anything else is a bug
        frames = traceback.extract_tb(error.__traceback__)
        inside = [f for f in frames if "einpar" in f.filename or "backends" in f.filename]
        where = f"{Path(inside[-1].filename).name}:{inside[-1].name}" if inside else "?"
        return f"{type(error).__name__} in {where}", traceback.format_exc(limit=-6)
    return None


class Failures:
    """Failures collected over a batch, reported by kind with the shortest input of each."""

    def __init__(self):
        self.by_kind: dict[str, list] = {}
        self.count = 0

    def check(self, text: str, overrides: dict[str, int] | None = None) -> None:
        self.count += 1
        found = failure_of(text, overrides)
        if found is not None:
            kind, details = found
            self.by_kind.setdefault(kind, []).append((len(text), text, overrides, details))

    def assert_none(self) -> None:
        if not self.by_kind:
            return
        report = [f"{sum(map(len, self.by_kind.values()))} of {self.count} inputs failed "
                  "with something other than clean diagnostics:"]
        for kind, cases in sorted(self.by_kind.items()):
            _, text, overrides, details = min(cases, key=lambda case: case[0])
            report.append(f"\n== {kind} ({len(cases)} inputs); shortest:\n{text!r}"
                          + (f"\noverrides={overrides!r}" if overrides else "") + f"\n{details}")
        pytest.fail("\n".join(report), pytrace=False)


# ---------------------------------------------------------------- mutations

OPERATOR = re.compile(r">=|<=|==|!=|[-+*/<>=@,:()\[\]{}]")

# The words of the training declarations are no keywords (a tensor may be named `loss`).
TRAINING_WORDS = DIRECTIVES + MODIFIERS + OPTIMIZERS + tuple(SETTINGS["adamw"]) + ("grad",)
OTHER_NAMES = ("k", "f32", "f16", "bf16", "f64", "i32", "bool", "x", "y", "B", "S", "T", "tp", "dp",
               "_", "nothing", "L", "E", "C", "a" * 200)
NUMBERS = ("0", "1", "-1", "2", "3", "8", "007", "1.5", ".5", "1e3", "1e400", "1e-400", "4097",
           "99999999999999999999", "0.0", "2.", "1e")
OPERATORS = ("+", "-", "*", "/", ">", ">=", "<", "<=", "==", "!=", "=", "@", ",", ":", "(", ")", "[",
             "]", "{", "}", "#", "\n", ".", "!", "$", "%", "^", "&", "|", "~", "`", "'", '"', ";",
             "?", "\\", "@(", "[]", "()", "{}")
CHARACTERS = string.printable + "é→λ\u00a0\u200b\x00\x7f\ufeff\u2028"
VOCABULARY = (KEYWORDS + FUNCTIONS + TRAINING_WORDS + OTHER_NAMES + NUMBERS + OPERATORS
              + ("\n",) * 6 + (" ",) * 6)


def delete_char(text, rng):
    if not text:
        return text
    i = rng.randrange(len(text))
    return text[:i] + text[i + 1:]


def insert_char(text, rng):
    i = rng.randint(0, len(text))
    return text[:i] + rng.choice(CHARACTERS) + text[i:]


def replace_char(text, rng):
    if not text:
        return text
    i = rng.randrange(len(text))
    return text[:i] + rng.choice(CHARACTERS) + text[i + 1:]


def swap_chars(text, rng):
    if len(text) < 2:
        return text
    i = rng.randrange(len(text) - 1)
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]


def duplicate_token(text, rng):
    tokens = split_tokens(text)
    if not tokens:
        return text
    i = rng.randrange(len(tokens))
    tokens.insert(i, tokens[i])
    return "".join(tokens)


def delete_token(text, rng):
    tokens = split_tokens(text)
    if not tokens:
        return text
    del tokens[rng.randrange(len(tokens))]
    return "".join(tokens)


def swap_tokens(text, rng):
    tokens = split_tokens(text)
    if len(tokens) < 2:
        return text
    i, j = rng.randrange(len(tokens)), rng.randrange(len(tokens))
    tokens[i], tokens[j] = tokens[j], tokens[i]
    return "".join(tokens)


def insert_token(text, rng):
    tokens = split_tokens(text)
    tokens.insert(rng.randint(0, len(tokens)), rng.choice(VOCABULARY))
    return "".join(tokens)


def replace_name(text, rng):
    names = NAME.findall(text)
    pool = names + list(KEYWORDS + FUNCTIONS + OTHER_NAMES) if names else list(OTHER_NAMES)
    return replace_random_match(text, NAME, rng, pool)


def replace_number(text, rng):
    return replace_random_match(text, NUMBER, rng, NUMBERS)


def replace_operator(text, rng):
    return replace_random_match(text, OPERATOR, rng, OPERATORS)


def rename_everywhere(text, rng):
    """A name replaced at every occurrence: often still a valid program."""
    names = sorted(set(NAME.findall(text)))
    if not names:
        return text
    old = rng.choice(names)
    new = rng.choice(names + list(OTHER_NAMES + KEYWORDS + FUNCTIONS))
    return re.sub(rf"\b{re.escape(old)}\b", new, text)


def _lines(text):
    return text.split("\n")


def shuffle_lines(text, rng):
    lines = _lines(text)
    rng.shuffle(lines)
    return "\n".join(lines)


def swap_lines(text, rng):
    lines = _lines(text)
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def delete_line(text, rng):
    lines = _lines(text)
    del lines[rng.randrange(len(lines))]
    return "\n".join(lines)


def duplicate_line(text, rng):
    lines = _lines(text)
    i = rng.randrange(len(lines))
    lines.insert(rng.randint(0, len(lines)), lines[i])
    return "\n".join(lines)


def join_lines(text, rng):
    breaks = [i for i, c in enumerate(text) if c == "\n"]
    if not breaks:
        return text
    i = rng.choice(breaks)
    return text[:i] + rng.choice(["", " ", ";"]) + text[i + 1:]


def truncate(text, rng):
    return text[:rng.randint(0, len(text))]


MUTATIONS = (delete_char, insert_char, replace_char, swap_chars, duplicate_token, delete_token,
             swap_tokens, insert_token, replace_name, replace_number, replace_operator,
             rename_everywhere, shuffle_lines, swap_lines, delete_line, duplicate_line, join_lines,
             truncate)


def mutate(text: str, rng: random.Random) -> str:
    """One to three random mutations of `text`."""
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
        text = rng.choice(MUTATIONS)(text, rng)
    return text


# ---------------------------------------------------------------- random text


def random_characters(rng: random.Random) -> str:
    return "".join(rng.choice(CHARACTERS) for _ in range(rng.randint(0, 120)))


def token_soup(rng: random.Random) -> str:
    """Words of the language in random order: gets past the lexer, into the parser."""
    return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 60)))


SOUP_HEADER = "mesh dp=2 tp=2\ndim B=4 S=4 T=S D=8 E=2 C=2 L=2\ninput x[B@dp, S, D@tp]\nparam w[D, E]\n"


def statement_soup(rng: random.Random) -> str:
    """A valid header and statements of random words: gets past the parser, into the checker."""
    words = ("x", "w", "h", "g", "B", "S", "T", "D", "E", "C", "L", "dp", "tp", "[", "]", "(", ")",
             ",", "*", "+", "-", "/", ">", "@", "sum", "max", "mean", "softmax", "route", "exp",
             "where", "k", "=", "2", "0.5", "[B,S,D]", "[D,E]", "[B,S,E]", "[B,S,E,C]")
    lines = [SOUP_HEADER]
    for name in rng.sample(["h", "g", "y", "z", "x", "w"], rng.randint(1, 4)):
        lhs = rng.choice(["[B,S,D]", "[B,S,E]", "[B@dp,S,E]", "[B,S,E,C]", "[B]", "[]", "[B,B]",
                          "[D@dp]", "[S@tp,D@tp]"])
        rhs = " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))
        lines.append(f"{name}{lhs} = {rhs}")
    lines.append(rng.choice(["output h", "output y", "output g[B,S,E]", "output nothing", ""]))
    return "\n".join(lines) + "\n"


TRAINING_HEADER = ("mesh dp=2 tp=2\ndim B=8 S=4 D=8 E=4 L=2\ninput x[B@dp, S, D]\n"
                   "input ids[B] : i32\nparam w[D, E@tp]\nparam e[S, D]\n"
                   "y[B,S,E] = tanh(x[B,S,D] * w[D,E])\n"
                   "repeat L remat {\n  param u[E]\n  y[B,S,E] = tanh(y[B,S,E] * u[E])\n}\n"
                   "h[B,D] = take[S](e[S,D], ids[B])\n"
                   "l[] = mean[B,S,E](square(y[B,S,E])) + mean[B,D](square(h[B,D]))\n")


def training_soup(rng: random.Random) -> str:
    """A valid model and training declarations of random words: gets into check_training.py,
    and past it into the derivation of the step (grad, micro-batches, optimizer)."""
    words = ("loss", "optimizer", "microbatches", "output", "remat", "sgd", "adamw", "l", "y", "w",
             "x", "ids", "u", "e", "w.grad", "u.grad", "ids.grad", "y.grad", "w.m", "B", "S", "L",
             "D", "dp", "tp", "=", "(", ")", ",", "-", "1", "2", "4", "8", "0", "1e-3", "0.9",
             "1e999", "1e-999", "nan", "inf", "99999999999999999999", "2.5", "schedule", "gpipe",
             "1f1b", "interleaved", "v=2", "v=", "@tp") + tuple(
        f"{name}=" for name in SETTINGS["adamw"])
    header = TRAINING_HEADER
    if rng.random() < 0.3:  # the loop as pipeline stages (over an axis that may split more)
        header = header.replace("repeat L remat {", rng.choice(
            ["repeat L@tp remat {", "repeat L@dp {", "repeat L@pp {", "repeat L@tp {"]))
    lines = [header, "loss l"]
    for _ in range(rng.randint(0, 4)):
        # A right declaration, one of its words replaced by a random one, or another added.
        tokens = rng.choice(["loss l", "optimizer adamw lr=1e-3", "optimizer sgd lr=0.1 shard=dp",
                             "microbatches B=2", "microbatches B=4", "output w.grad",
                             "schedule 1f1b", "schedule gpipe", "schedule interleaved v=2",
                             "output u.grad[L,E@tp]", "output l"]).split()
        if rng.random() < 0.6:
            tokens[rng.randrange(len(tokens))] = rng.choice(words)
        if rng.random() < 0.3:
            tokens.insert(rng.randint(0, len(tokens)), rng.choice(words))
        lines.append(" ".join(tokens))
    rng.shuffle(lines)
    if rng.random() < 0.3:  # a modifier on a statement
        lines.insert(1, "remat z[B,S,D] = x[B,S,D] * 2")
    return "\n".join(lines) + "\n"


RANDOM_TEXT_KINDS = {"characters": random_characters, "token soup": token_soup,
                     "statement soup": statement_soup, "training soup": training_soup}


# ---------------------------------------------------------------- the tests


def run_mutants(example: Path, count: int, seed: str) -> None:
    text = example.read_text(encoding="utf-8")
    failures = Failures()
    failures.check(text)
    rng = random.Random(f"{example.name}:{seed}")
    for _ in range(count):
        failures.check(mutate(text, rng))
    failures.assert_none()


@pytest.mark.parametrize("example", EXAMPLES, ids=EXAMPLE_IDS)
def test_mutated_examples_fail_only_with_diagnostics(example):
    run_mutants(example, MUTANTS_PER_EXAMPLE, "default")


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=EXAMPLE_IDS)
def test_many_mutated_examples_fail_only_with_diagnostics(example):
    run_mutants(example, SLOW_MUTANTS_PER_EXAMPLE, "slow")


def run_random_texts(kind: str, count: int, seed: str) -> None:
    failures = Failures()
    rng = random.Random(f"{kind}:{seed}")
    make = RANDOM_TEXT_KINDS[kind]
    for _ in range(count):
        failures.check(make(rng))
    failures.assert_none()


@pytest.mark.parametrize("kind", sorted(RANDOM_TEXT_KINDS))
def test_random_text_fails_only_with_diagnostics(kind):
    run_random_texts(kind, RANDOM_TEXTS // len(RANDOM_TEXT_KINDS), "default")


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(RANDOM_TEXT_KINDS))
def test_much_random_text_fails_only_with_diagnostics(kind):
    run_random_texts(kind, SLOW_RANDOM_TEXTS // len(RANDOM_TEXT_KINDS), "slow")


OVERRIDE_VALUES = (0, -1, 1, 2, 3, 5, 7, 1024, 10 ** 9, 10 ** 30)


def random_overrides(text: str, rng: random.Random) -> dict[str, int]:
    names = sorted(set(NAME.findall(text))) + ["", "1x", "é", "B C", "nothing"]
    return {rng.choice(names): rng.choice(OVERRIDE_VALUES) for _ in range(rng.randint(1, 3))}


def run_overrides(count: int, seed: str) -> None:
    failures = Failures()
    rng = random.Random(f"overrides:{seed}")
    texts = [path.read_text(encoding="utf-8") for path in EXAMPLES]
    for _ in range(count):
        text = rng.choice(texts)
        failures.check(text, random_overrides(text, rng))
    failures.assert_none()


def test_random_overrides_fail_only_with_diagnostics():
    run_overrides(400, "default")


@pytest.mark.slow
def test_many_random_overrides_fail_only_with_diagnostics():
    run_overrides(10_000, "slow")


def test_malformed_set_arguments_fail_only_with_diagnostics():
    rng = random.Random("parse_overrides")
    pieces = ("D", "=", "4096", "tp", "8", "-1", "0", " ", "x=", "=3", "==", "é=2", "1e3", "3.5", "",
              "D=4 tp=2", "\t", "\n")
    for _ in range(2_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
        try:
            parsed = parse_overrides([text])
        except EinparError as error:
            assert error.diagnostics and all(d.code in CODES for d in error.diagnostics), text
        else:
            assert all(isinstance(v, int) for v in parsed.values()), text


MUTATE_SETTINGS = settings(max_examples=150, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@MUTATE_SETTINGS
@given(programs(max_statements=6), st.randoms(use_true_random=False))
def test_mutated_generated_programs_fail_only_with_diagnostics(generated, rng):
    """Generated programs reach constructs the examples lack (aliases, casts, rank 0...)."""
    text = mutate(generated.text, rng)
    found = failure_of(text)
    assert found is None, f"{found[0]}\n--- input ---\n{text!r}\n{found[1]}"


@pytest.mark.slow
@settings(MUTATE_SETTINGS, max_examples=3_000)
@given(programs(max_statements=12), st.randoms(use_true_random=False))
def test_many_mutated_generated_programs_fail_only_with_diagnostics(generated, rng):
    text = mutate(generated.text, rng)
    found = failure_of(text)
    assert found is None, f"{found[0]}\n--- input ---\n{text!r}\n{found[1]}"


# ---------------------------------------------------------------- extreme inputs

HEADER = "dim B=4 L=1\ninput x[B]\n"
EXTREME_INPUTS = {
    "empty": "",
    "only comments": "# nothing\n# here\n",
    "many blank lines": "\n" * 100_000 + HEADER + "output x\n",
    "long name": HEADER + "y" * 10_000 + "[B] = x[B]\noutput " + "y" * 10_000 + "\n",
    "many dims": "dim " + " ".join(f"I{i}=1" for i in range(300)) + "\ninput x["
                 + ",".join(f"I{i}" for i in range(300)) + "]\noutput x\n",
    "crlf line endings": HEADER.replace("\n", "\r\n") + "y[B] = x[B]\r\noutput y\r\n",
    "carriage returns only": HEADER.replace("\n", "\r") + "output x\r",
    "nul byte": HEADER + "\x00\n",
    "byte order mark": "\ufeff" + HEADER + "output x\n",
    "tabs": HEADER.replace(" ", "\t") + "output\tx\n",
    "3000 nested parentheses": HEADER + "y[B] = " + "(" * 3000 + "x[B]" + ")" * 3000 + "\noutput y\n",
    "200 nested repeat blocks": HEADER + "repeat L {\n" * 200 + "x[B] = x[B]\n" + "}\n" * 200
                                + "output x\n",
    "2000-term sum": HEADER + "y[B] = " + " + ".join(["x[B]"] * 2000) + "\noutput y\n",
    "2000-factor product": HEADER + "y[B] = " + " * ".join(["x[B]"] * 2000) + "\noutput y\n",
    "2000 nested negations": HEADER + "y[B] = " + "-" * 2000 + "x[B]\noutput y\n",
    "500 nested calls": HEADER + "y[B] = " + "tanh(" * 500 + "x[B]" + ")" * 500 + "\noutput y\n",
    "5000-digit dim size": "dim B=" + "9" * 5000 + "\ninput x[B]\noutput x\n",
    "5000-digit mesh size": "mesh dp=" + "9" * 5000 + "\n" + HEADER + "output x\n",
    "5000-digit number": HEADER + "y[B] = x[B] * " + "9" * 5000 + "\noutput y\n",
    "number beyond float range": HEADER + "y[B] = x[B] * 1e999\noutput y\n",
    # Braces on a statement's left side (layout pins).
    "20000 axes in braces": "mesh tp=1\n" + HEADER + "y[B]{sum: " + ",".join(["tp"] * 20_000)
                            + "} = x[B]\noutput y\n",
    "20000 kinds in braces": "mesh tp=1\n" + HEADER + "y[B]{" + "; ".join(
        f"sum: a{i}" for i in range(20_000)) + "} = x[B]\noutput y\n",
    "5000 size-1 axes pinned": "mesh " + " ".join(f"a{i}=1" for i in range(5_000)) + "\n" + HEADER
                               + "y[B]{sum: (" + ",".join(f"a{i}" for i in range(5_000))
                               + ")} = x[B]\noutput y\n",
    "3000 nested braces": HEADER + "y[B]" + "{" * 3000 + "}" * 3000 + " = x[B]\noutput y\n",
    "3000 nested parentheses in braces": "mesh tp=1\n" + HEADER + "y[B]{sum: " + "(" * 3000 + "tp"
                                         + ")" * 3000 + "} = x[B]\noutput y\n",
    "braces spanning lines": "mesh tp=1\n" + HEADER + "y[B]{sum:\ntp} = x[B]\noutput y\n",
    "unicode in braces": "mesh tp=1\n" + HEADER + "y[B]{σum: tp; max: ｔｐ\u202e} = x[B]\noutput y\n",
    "long kind in braces": "mesh tp=1\n" + HEADER + "y[B]{" + "s" * 100_000 + ": tp} = x[B]\noutput y\n",
}


@pytest.mark.parametrize("name", sorted(EXTREME_INPUTS))
def test_extreme_inputs_fail_only_with_diagnostics(name):
    text = EXTREME_INPUTS[name]
    found = failure_of(text)
    assert found is None, f"{found[0]}\n{found[1]}"
