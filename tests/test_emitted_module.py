"""The JAX module einpar writes (`einpar compile --emit jax`, and what `run --backend
jax` executes) is valid, safe and stands alone.

- Every name from the program becomes a validated Python identifier that
  collides with nothing: not a keyword, a builtin, a `__dunder__`, the
  module's own names or another value's name.
- The file name and the command reach the module only inside its docstring,
  escaped: a hostile file name neither breaks the module nor runs code.
- A program with no inputs is a module too.
- Run as `python module.py` without an accelerator, the module asks JAX for
  the CPU devices it needs (no XLA_FLAGS).
"""

from __future__ import annotations

import ast
import builtins
import keyword
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from einpar.api import compile_source, emit_jax, random_inputs, run_jax, shown_path
from einpar.backends.jax_codegen import _RESERVED, Names, literal_text
from einpar.cli import main

from helpers import assert_matches_reference

ROOT = Path(__file__).resolve().parent.parent

# In this order: the user's names before those shaped like the generator's.
HOSTILE_NAMES = list(dict.fromkeys(
    keyword.kwlist + keyword.softkwlist + dir(builtins) + sorted(_RESERVED)
    + ["__debug__", "__name__", "__doc__", "__class__", "__builtins__", "_", "__", "_x", "x_",
       # shaped like what the generator makes of IR names, and those IR names
       "h_1", "x_v2", "x_r1", "x_in", "w_trip", "w_trip2", "t_1", "trip_1", "layer_1", "def_2",
       "h.1", "x#2", "x~1", "x~in", "w~trip", "w~trip2", "x#2~in", "x#2~1",
       # not possible in a .ein name, but the mangling takes any text
       "", "1x", "é", "ﬁ", "fi", "x²", "x\u2028y", "١", "a-b", "a b", "\x00", "\udcff", "🙂"]))


def test_every_name_becomes_its_own_valid_identifier():
    names = Names()
    made = {name: names(name) for name in HOSTILE_NAMES}
    assert len(set(made.values())) == len(made)  # no two names share an identifier
    for name, text in made.items():
        assert text.isidentifier() and text.isascii(), (name, text)
        assert not keyword.iskeyword(text), (name, text)
        assert not (text.startswith("__") and text.endswith("__")), (name, text)
        assert text not in _RESERVED and not hasattr(builtins, text), (name, text)
        assert names(name) == text  # stable
    # Every one can be assigned and read back as a local, each its own.
    body = "".join(f"    {text} = {i}\n" for i, text in enumerate(made.values()))
    values = "[" + ", ".join(made.values()) + "]"
    scope: dict = {}
    exec(compile(f"def f():\n{body}    return {values}\n", "names.py", "exec"), scope)
    assert scope["f"]() == list(range(len(made)))
    assert (made["x#2"], made["h.1"], made["x~1"], made["x~in"], made["w~trip2"]) == \
        ("x_v2_2", "h_1_2", "x_r1_2", "x_in_2", "w_trip2_2")  # the user's x_v2 etc. came first
    assert (made["def"], made["def_2"], made["__debug__"], made["_"], made["sum"]) == \
        ("def_2", "def_2_2", "v___debug__", "__2", "sum_2")


# A program whose tensors are named like Python's and the module's own names, with a
# loop body, a temporary (`h.1`), an expression deep enough to need temporaries (`t_1`), and
# collectives.
HOSTILE_PROGRAM = """\
mesh dp=2 tp=2
dim B=4 D=4 F=8 L=2
input def[B@dp,D]
input __debug__[D]
param _[D,F@tp]
param lambda[F@tp,D]
input None[B,D]
repeat L {
  param carry[D]
  def[B,D] = def[B,D] * carry[D] + __debug__[D]
}
t_1[B,F] = gelu(def[B,D] * _[D,F])
print[B,D] = t_1[B,F] * lambda[F,D] + None[B,D]
sum[B,D] = """ + "tanh(" * 80 + "print[B,D]" + ")" * 80 + """
output sum
output print
"""


@pytest.mark.parametrize("twin", [False, True], ids=["per-device", "twin"])
def test_a_program_named_like_python_runs_on_jax(twin):
    program = compile_source(HOSTILE_PROGRAM, file="hostile.ein")
    source = emit_jax(program)
    tree = ast.parse(source)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert [a.arg for a in functions["per_device"].args.args] == \
        ["def_2", "v___debug__", "__2", "lambda_2", "None_2", "carry_2"]
    inputs = random_inputs(program, 1)
    result = run_jax(program, inputs, twin=twin, warmup=0, repeat=1)
    assert_matches_reference(program, result.outputs, inputs)


NO_INPUTS = "dim B=4\ny[B] = B * 2\noutput y\n"


def test_a_program_without_inputs_is_a_module():
    source = emit_jax(compile_source(NO_INPUTS, file="none.ein"))
    assert "def per_device():" in source and "def global_program(*, mesh=None):" in source
    ast.parse(source)


@pytest.mark.parametrize("twin", [False, True], ids=["per-device", "twin"])
def test_a_program_without_inputs_runs_on_jax(twin):
    result = run_jax(compile_source(NO_INPUTS, file="none.ein"), twin=twin, warmup=0, repeat=1)
    np.testing.assert_array_equal(result.outputs["y"], np.full(4, 8, np.float32))


def test_run_on_jax_takes_a_program_without_inputs(tmp_path, capsys):
    path = tmp_path / "none.ein"
    path.write_text(NO_INPUTS)
    assert main(["run", str(path), "--backend", "jax", "--repeat", "1"]) == 0
    assert "largest error 0;" in capsys.readouterr().out


# ---------------------------------------------------------------- hostile file names

MARKER = "INJECTED"
PAYLOAD = f'__import__("os").system("touch {MARKER}")'
HOSTILE_FILES = {
    "triple quotes": f'p""";{PAYLOAD};""".ein',
    "single triple quotes": f"p''';{PAYLOAD};'''.ein",
    "a quote at the end": 'p.ein"',
    "backslashes": "p\\.ein\\",
    "a backslash before quotes": 'p\\""".ein',
    "a newline": f"p\n{PAYLOAD}\n.ein",
    "a carriage return and a form feed": f"p\r{PAYLOAD}\x0c.ein",
    "a line separator": f"p\u2028{PAYLOAD}.ein",
    "an undecodable byte": os.fsdecode(b"p\xff.ein"),
    "control characters": "p\x01\x1b[31m\x7f.ein",
    "rich markup": "[red]p[/x].ein",
}
TINY = "mesh tp=2\ndim B=4\ninput x[B@tp]\ny[B] = x[B] * 2\noutput y\n"


@pytest.mark.parametrize("kind", sorted(HOSTILE_FILES))
def test_a_hostile_file_name_stays_in_the_docstring(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    name = HOSTILE_FILES[kind]
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    Path(name).write_text(TINY)
    assert main(["compile", name, "--emit", "jax"]) == 0
    source = capsys.readouterr().out
    tree = ast.parse(source)
    docstring = ast.get_docstring(tree, clean=False)
    shown = shown_path(name)  # unprintable characters as escapes, as einpar shows the name
    assert (shown == name) == name.isprintable()
    assert docstring.startswith(f"{shown} as JAX: ")
    assert f"Written by `einpar compile {shown} --emit jax`." in docstring
    # Executing the module (its definitions, not main) runs nothing the name holds.
    exec(compile(source, "emitted.py", "exec"), {"__name__": "emitted"})
    # `run --backend jax` executes the module it writes for the file.
    assert main(["run", name, "--backend", "jax", "--repeat", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{shown}: einpar's per-device program") and "largest error 0;" in out
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("file", ["p\x00.ein", '"""\x00\\', "\ud800"])
def test_file_names_no_path_can_have_still_make_a_valid_module(file):
    """Through the API a program's file is any text (a NUL, a lone surrogate)."""
    program = compile_source(TINY, file=file)
    source = emit_jax(program, command=f"einpar compile {file}")
    assert ast.get_docstring(ast.parse(source), clean=False).startswith(f"{file} as JAX: ")
    result = run_jax(program, warmup=0, repeat=1)
    assert_matches_reference(program, result.outputs, random_inputs(program, 0))


def test_literal_text_round_trips_through_a_literal():
    for text in list(HOSTILE_FILES.values()) + ["\\", '"', '\\"', "x\\\n", "\x00\udcff\u2028"]:
        for quotes in ('"', '"""'):
            assert ast.literal_eval(f"{quotes}{literal_text(text)}{quotes}") == text


# ---------------------------------------------------------------- standing alone


def test_the_module_asks_for_its_cpu_devices_itself(tmp_path, capsys):
    """`python module.py` of an 8-device program, with no XLA_FLAGS and no accelerator."""
    assert main(["compile", str(ROOT / "examples/mlp/megatron.ein"), "--emit", "jax"]) == 0
    module = tmp_path / "megatron_jax.py"
    module.write_text(capsys.readouterr().out)
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, str(module), "--repeat", "1"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("y: float32[8, 128, 256], largest difference from the "
                                  "whole-array program")
    assert "GSPMD twin: compile" in done.stdout


REMAT_PROGRAM = """
dim B=4 D=8 E=8 L=2
input x[B, D]
param w[D, E]
remat s[B,E] = tanh(x[B,D] * w[D,E])
y[B,D] = s[B,E] * w[D,E]
repeat L remat {
  param v[D, E]
  y[B,D] = y[B,D] + tanh(y[B,D] * v[D,E]) * v[D,E]
}
l[] = mean[B,D](square(y[B,D]))
output l
loss l
optimizer sgd lr=0.1
"""


def test_a_training_programs_whole_array_function_recomputes_what_it_asks_to():
    """Differentiated by jax.grad (the oracle, the GSPMD twin of its step), the program as
    written recomputes as its step does: `remat` values are named for a checkpoint policy
    (REMAT), `repeat L remat` bodies are checkpointed. The derived step, a program without a
    loss, has neither: nothing differentiates it."""
    import jax

    step = compile_source(REMAT_PROGRAM, "<remat>")
    text = emit_jax(step.forward)
    assert "REMAT = ('s.1', 's')" in text and 's = checkpoint_name(s, "s")' in text  # s's two ops
    assert "layer_1 = jax.checkpoint(layer_1)" in text
    assert "checkpoint" not in emit_jax(step)
    module = {}
    exec(compile(text, "<emitted>", "exec"), module)
    arrays = random_inputs(step.forward)

    def loss(w, v):
        return module["global_program"](arrays["x"], w, v)["l"]

    policy = jax.checkpoint_policies.save_anything_except_these_names(*module["REMAT"])
    got = jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1))(arrays["w"], arrays["v"])
    want = jax.grad(loss, argnums=(0, 1))(arrays["w"], arrays["v"])
    for found, expected in zip(got, want):
        np.testing.assert_allclose(found, expected, rtol=1e-6)
