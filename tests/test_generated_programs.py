"""Properties of random well-formed programs (einpar.testing.programs).

Every generated program must check and evaluate to arrays of the declared
shapes and dtypes. Where the language states a law, it is checked against an
independent computation: a pure contraction is `numpy.einsum` of the same
subscripts; renaming indices changes nothing (the summation rule depends on
where names are used, not on what they are); a `--set` override of a dim
changes exactly the shapes indexed by it; layouts never change what a
program computes; the library functions equal their written-out
definitions; and a program with one deliberate mistake is rejected with the
diagnostic code for that mistake.

Each property runs a few dozen examples by default and many more under
`pytest -m slow`.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, find, given, settings
from hypothesis import strategies as st

from einpar.api import compile_source, random_inputs, run_reference
from einpar.errors import EinparError
from einpar.ir import Apply, Cast, Const, Einsum, Library, Map, Pos, Reduce, Repeat, Route, walk_ops
from einpar.testing.generate import (COLLIDING_TENSOR_NAMES, FLOAT_DTYPES, GeneratedProgram, MeshSpec,
                            TensorInfo, _Builder, _Options, _Tensor, contraction_programs, programs)

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
SLOW = settings(max_examples=1000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

NUMPY_DTYPE_NAMES = {"f32": "float32", "f64": "float64", "f16": "float16", "bf16": "bfloat16",
                     "f8e4m3": "float8_e4m3fn", "f8e5m2": "float8_e5m2"}
# The largest finite value of each dtype, with margin; bf16 has f32's range.
FINITE_LIMIT = {"f8e4m3": 440, "f8e5m2": 5.7e4, "f16": 6e4, "bf16": 3e38, "f32": 3e38,
                "f64": 1e308}


def compile_generated(generated: GeneratedProgram, text: str | None = None, **kwargs):
    """Compile, showing the program when the checker rejects it (a bug on one side)."""
    text = generated.text if text is None else text
    try:
        return compile_source(text, file="<generated>", **kwargs)
    except EinparError as error:
        pytest.fail(f"the checker rejected a well-formed program:\n{error}\n--- program ---\n{text}")


def layout_dims(layout):
    return None if layout is None else tuple(tuple(axes) for axes in layout.dims)


# ---------------------------------------------------------------- check and evaluate


def check_and_evaluate(generated: GeneratedProgram) -> None:
    program = compile_generated(generated)
    sizes = generated.sizes()
    assert program.dim_sizes == sizes
    assert [v.name for v in program.inputs] == [i.name for i in generated.inputs]
    for value, info in zip(program.inputs, generated.inputs):
        assert value.kind == info.kind, value.name
        assert value.type.shape == info.shape(sizes), value.name
        assert value.type.dtype == info.dtype, value.name
        assert value.stacked_by == info.stacked_by, value.name
        expected_layout = None if info.layout is None else ((),) * len(info.stacked_by) + info.layout
        assert layout_dims(value.layout) == expected_layout, value.name
    assert [o.name for o in program.outputs] == [o.name for o in generated.outputs]
    for output, info in zip(program.outputs, generated.outputs):
        assert layout_dims(output.layout) == info.layout, output.name

    results = run_reference(program, seed=0)
    assert list(results) == [o.name for o in generated.outputs]
    shapes = generated.output_shapes()
    dtypes_used = {generated.dtype} | {i.dtype for i in generated.inputs} | \
        {o.dtype for o in generated.outputs}
    bounded = generated.max_magnitude <= min(FINITE_LIMIT[d] for d in dtypes_used)
    for info in generated.outputs:
        array = results[info.name]
        assert array.shape == shapes[info.name], info.name
        assert str(array.dtype) == NUMPY_DTYPE_NAMES[info.dtype], info.name
        if bounded:
            assert np.all(np.isfinite(np.asarray(array, dtype=np.float64))), \
                f"{info.name} is not finite"


@FAST
@given(programs())
def test_generated_programs_check_and_evaluate(generated):
    check_and_evaluate(generated)


@FAST
@given(programs(max_statements=4, layouts=True, dtypes=("f32",), repeat=True, max_depth=3))
def test_deeply_nested_programs_check_and_evaluate(generated):
    check_and_evaluate(generated)


@pytest.mark.slow
@SLOW
@given(programs(max_statements=16, max_depth=3))
def test_many_generated_programs_check_and_evaluate(generated):
    check_and_evaluate(generated)


# ---------------------------------------------------------------- contractions are einsums


def check_contractions_match_einsum(generated: GeneratedProgram) -> None:
    """Evaluate each statement with numpy.einsum in float64, from the same inputs."""
    program = compile_generated(generated)
    inputs = random_inputs(program, seed=1)
    results = run_reference(program, inputs)
    values = {name: np.asarray(array, dtype=np.float64) for name, array in inputs.items()}
    magnitudes = {name: np.abs(array) for name, array in values.items()}
    for contraction in generated.contractions:
        subscripts = contraction.subscripts()
        operands = [values[name] for name, _ in contraction.operands]
        values[contraction.result] = contraction.scale * np.einsum(subscripts, *operands)
        # The same contraction of magnitudes bounds the rounding error of every entry.
        operands = [magnitudes[name] for name, _ in contraction.operands]
        magnitudes[contraction.result] = abs(contraction.scale) * np.einsum(subscripts, *operands)
    assert len(generated.contractions) == len(generated.statements)
    # A sum over an index of one operand only happens before the product, in that
    # operand's dtype: the least precise dtype of the program sets the tolerance.
    dtypes = {generated.dtype} | {i.dtype for i in generated.inputs} | \
        {s.dtype for s in generated.statements}
    relative = 1e-4 if "f32" in dtypes else 1e-10
    for info in generated.outputs:
        got = np.asarray(results[info.name], dtype=np.float64)
        error = np.abs(got - values[info.name])
        allowed = relative * (magnitudes[info.name] + 1e-30)
        worst = np.unravel_index(np.argmax(error - allowed), error.shape) if error.size else ()
        assert np.all(error <= allowed), (
            f"{info.name}{list(worst)}: reference {got[worst]}, einsum {values[info.name][worst]}")


@FAST
@given(contraction_programs())
def test_contractions_equal_numpy_einsum(generated):
    check_contractions_match_einsum(generated)


@pytest.mark.slow
@SLOW
@given(contraction_programs(max_statements=16, max_depth=3))
def test_many_contractions_equal_numpy_einsum(generated):
    check_contractions_match_einsum(generated)


# ---------------------------------------------------------------- renaming indices


# Keywords and function names are left out: renaming is about indices, not the parser.
RENAME_POOL = ("I", "J", "A", "Z", "X1", "Y2", "idx", "seq", "batch", "heads", "q") + \
    COLLIDING_TENSOR_NAMES + ("h1", "x1", "w2", "tp", "fsdp", "ep")


@st.composite
def renamings(draw, generated: GeneratedProgram):
    """A bijection on the program's dim names: a permutation of them, or new names
    (which may coincide with tensor or mesh-axis names: separate namespaces)."""
    dims = list(generated.dims)
    if draw(st.booleans()):
        targets = draw(st.permutations(dims))
    else:
        targets = draw(st.lists(st.sampled_from(RENAME_POOL), min_size=len(dims),
                                max_size=len(dims), unique=True))
    return dict(zip(dims, targets))


def renamed_expr(expr, rename):
    """A Map's scalar expression with the dims that sizes came from (`sqrt(K)`) renamed."""
    if isinstance(expr, Const):
        return replace(expr, label=rename.get(expr.label, expr.label))
    if isinstance(expr, Cast):
        return replace(expr, arg=renamed_expr(expr.arg, rename))
    if isinstance(expr, Apply):
        return replace(expr, args=tuple(renamed_expr(arg, rename) for arg in expr.args))
    if isinstance(expr, Pos):
        return replace(expr, index=rename.get(expr.index, expr.index))
    return expr


def op_signature(op, rename=None):
    """What an op does, in terms of value names and (renamed) index names."""
    rename = rename or {}

    def names(indices):
        return tuple(rename.get(i, i) for i in indices)

    if isinstance(op, Repeat):
        return ("repeat", rename.get(op.dim, op.dim), op.count,
                tuple((c.value, c.body_result) for c in op.carried))
    head = (type(op).__name__, op.result.name, names(op.result.type.indices), op.result.type.dtype,
            tuple((o.value, names(o.indices)) for o in op.operands))
    if isinstance(op, Reduce):
        return head + (op.kind, names(op.over))
    if isinstance(op, Library):
        return head + (op.kind, rename.get(op.index, op.index))
    if isinstance(op, Route):
        return head + (names((op.expert, op.capacity)), op.k)
    if isinstance(op, Map):
        return head + (renamed_expr(op.expr, rename),)
    assert isinstance(op, Einsum)
    return head


def check_renaming_invariance(generated: GeneratedProgram, rename: dict[str, str]) -> None:
    original = compile_generated(generated)
    renamed = compile_generated(generated, generated.render(rename))
    expected_ops = [op_signature(op, rename) for op in walk_ops(original.ops)]
    assert [op_signature(op) for op in walk_ops(renamed.ops)] == expected_ops
    inputs = random_inputs(original, seed=2)
    before = run_reference(original, inputs)
    after = run_reference(renamed, inputs)
    for name, array in before.items():
        np.testing.assert_array_equal(np.asarray(after[name], dtype=np.float64),
                                      np.asarray(array, dtype=np.float64), err_msg=name)


@FAST
@given(st.data())
def test_summation_rule_is_invariant_under_renaming_indices(data):
    generated = data.draw(programs(), label="program")
    check_renaming_invariance(generated, data.draw(renamings(generated), label="rename"))


@pytest.mark.slow
@SLOW
@given(st.data())
def test_many_renamings_change_nothing(data):
    generated = data.draw(programs(max_statements=12), label="program")
    check_renaming_invariance(generated, data.draw(renamings(generated), label="rename"))


# ---------------------------------------------------------------- --set overrides


def check_dim_override(generated: GeneratedProgram, dim: str, factor: int) -> None:
    """Multiplying a dim keeps every layout divisible; exactly the shapes it indexes
    (through its aliases too) change."""
    original = compile_generated(generated)
    new_size = generated.sizes()[dim] * factor
    overridden = compile_generated(generated, overrides={dim: new_size})
    family = generated.family(dim)
    assert overridden.dim_sizes == generated.sizes({dim: new_size})
    assert {v.name: v.type.shape for v in overridden.inputs} == \
        generated.input_shapes({dim: new_size})
    values = overridden.values
    assert {o.name: values[o.value].type.shape for o in overridden.outputs} == \
        generated.output_shapes({dim: new_size})
    for name, value in original.values.items():
        changed = values[name].type
        assert changed.indices == value.type.indices, name
        expected = tuple(new_size if index in family else size
                         for index, size in zip(value.type.indices, value.type.shape))
        assert changed.shape == expected, name


@FAST
@given(st.data())
def test_overriding_a_dim_changes_exactly_the_shapes_that_use_it(data):
    generated = data.draw(programs(), label="program")
    # `--set NAME` means the mesh axis when a dim has the same name.
    dims = [name for name, value in generated.dim_declarations
            if isinstance(value, int) and name not in generated.mesh.names]
    assume(dims)
    check_dim_override(generated, data.draw(st.sampled_from(dims), label="dim"),
                       data.draw(st.sampled_from([2, 3]), label="factor"))


@pytest.mark.slow
@SLOW
@given(st.data())
def test_many_dim_overrides(data):
    generated = data.draw(programs(max_statements=12), label="program")
    dims = [name for name, value in generated.dim_declarations
            if isinstance(value, int) and name not in generated.mesh.names]
    assume(dims)
    check_dim_override(generated, data.draw(st.sampled_from(dims), label="dim"),
                       data.draw(st.sampled_from([2, 3]), label="factor"))


@FAST
@given(st.data())
def test_overriding_a_mesh_axis_keeps_global_shapes(data):
    generated = data.draw(programs(), label="program")
    axes = [name for name in generated.mesh.names if name not in generated.dims]
    assume(axes)
    axis = data.draw(st.sampled_from(axes), label="axis")
    original = compile_generated(generated)
    overridden = compile_generated(generated, overrides={axis: 1})
    assert dict(overridden.mesh.axes) == {**dict(generated.mesh.axes), axis: 1}
    assert {n: v.type.shape for n, v in overridden.values.items()} == \
        {n: v.type.shape for n, v in original.values.items()}


def renames_in_text(generated: GeneratedProgram) -> set[tuple[str, str]]:
    """The (declared index, index read with) pairs of the reads the program text makes:
    every `t[...]` of a tensor `t` but its declaration and the left side defining it."""
    declared = {info.name: info.indices for info in generated.inputs}
    declared.update((info.name, info.indices) for info in generated.statements)
    names = "|".join(map(re.escape, sorted(declared, key=len, reverse=True)))
    read = re.compile(rf"(?<![\w@])({names})\[([^\]]*)\](?!\()")
    pairs = set()
    for match in read.finditer(generated.text):
        line_start = generated.text.rfind("\n", 0, match.start()) + 1
        before = generated.text[line_start:match.start()]
        if before.strip() in ("input", "param"):
            continue
        if not before.strip() and re.match(r"\s*(:\s*\w+\s*)?=(?!=)", generated.text[match.end():]):
            continue  # the left side of a definition
        indices = [part.strip() for part in re.sub(r"@\([^)]*\)|@\w+", "", match[2]).split(",")]
        pairs.update((d, i) for d, i in zip(declared[match[1]], indices) if d != i)
    return pairs


@FAST
@given(programs())
def test_positional_renames_are_the_renames_the_text_reads_with(generated):
    """A read drawn but then left out of the text (a factor replaced by a fresh input)
    ties no sizes, so its renames must not be reported."""
    assert generated.positional_renames == renames_in_text(generated)


@pytest.mark.parametrize("kinds", [("contraction",), ("contraction", "elementwise")])
def test_a_read_replaced_by_a_fresh_input_leaves_no_rename(kinds):
    """The failing case: `h[T]` for an `h` declared `[H]` (T=H) is too large to sum where it
    stands, so the generator reads a fresh `x1[T]` instead; T is then read in place of H
    nowhere, and overriding T must compile. Every draw takes the simplest choice."""
    def simplest(strategy):
        return find(strategy, lambda _: True, settings=settings(database=None))

    options = _Options(frozenset(kinds), max_rank=2, max_depth=0, layouts=False, dtypes=("f32",),
                       formatting=False, name_collisions=False)
    builder = _Builder(simplest, options, MeshSpec(()), {"H": 9, "T": 9}, {"H": "H", "T": "H"},
                       "f32")
    huge = TensorInfo("h", ("H",), "f32", "def")
    builder.visible["h"] = _Tensor(huge, bound=1e9)
    builder.begin_statement(())
    factor = builder.contraction(("T",), depth=0)
    assert factor.product == (("x1", ("T",)),)
    assert builder.positional_renames() == frozenset()


@settings(FAST, max_examples=25)
@given(st.data())
def test_overriding_an_alias_read_in_place_of_its_dim_is_rejected(data):
    """`x[B,T]` for an `x` declared `[B,S]` ties T's size to S's: setting T alone (and
    so the aliases of T, but not S) breaks it."""
    generated = data.draw(programs(), label="program")

    def splits_a_tie(alias):
        family = generated.family(alias)
        return any((a in family) != (b in family) for a, b in generated.positional_renames)

    tied = [name for name in generated.aliases
            if name not in generated.mesh.names and splits_a_tie(name)]
    assume(tied)
    alias = data.draw(st.sampled_from(tied), label="alias")
    size = generated.sizes()[alias]
    with pytest.raises(EinparError) as raised:
        compile_source(generated.text, overrides={alias: size * 2})
    assert "E211" in [d.code for d in raised.value.diagnostics]


# ---------------------------------------------------------------- layouts do not change values


LAYOUT = re.compile(r"@\([^)]*\)|@\w+")


@FAST
@given(programs(dtypes=("f32", "f64")))
def test_layouts_do_not_change_what_a_program_computes(generated):
    """The reference evaluates whole arrays; a layout only says where data lives."""
    assume("@" in generated.text)
    with_layouts = compile_generated(generated)
    without = compile_generated(generated, LAYOUT.sub("", generated.text))
    inputs = random_inputs(with_layouts, seed=3)
    expected = run_reference(without, inputs)
    for name, array in run_reference(with_layouts, inputs).items():
        np.testing.assert_array_equal(array, expected[name], err_msg=name)


# ---------------------------------------------------------------- library functions


LIBRARY_DEFINITIONS = {
    # name: (library form, written out per LANGUAGE.md "Precise meanings"), over index J of x[I,J,K]
    "softmax": ("softmax[J](x[I,J,K])",
                "exp(x[I,J,K] - max[J](x[I,J,K])) / sum[J](exp(x[I,J,K] - max[J](x[I,J,K])))"),
    "rmsnorm": ("rmsnorm[J](x[I,J,K])", "x[I,J,K] / sqrt(mean[J](square(x[I,J,K])) + 1e-6)"),
    "layernorm": ("layernorm[J](x[I,J,K])",
                  "(x[I,J,K] - mean[J](x[I,J,K])) / "
                  "sqrt(mean[J](square(x[I,J,K] - mean[J](x[I,J,K]))) + 1e-6)"),
    "mean": ("mean[J](x[I,J,K])", "sum[J](x[I,J,K]) / J"),
    "sum of softmax": ("sum[J](softmax[J](x[I,J,K]))", "1 + 0 * x[I,J,K]"),
}


@FAST
@given(st.sampled_from(sorted(LIBRARY_DEFINITIONS)), st.integers(1, 5), st.integers(1, 6),
       st.integers(1, 4), st.integers(0, 2 ** 16))
def test_library_functions_equal_their_definitions(function, i, j, k, seed):
    library, written = LIBRARY_DEFINITIONS[function]
    reduced = function in ("mean", "sum of softmax")
    lhs = "[I,K]" if reduced else "[I,J,K]"
    text = (f"dim I={i} J={j} K={k}\ndtype f64\ninput x[I,J,K]\n"
            f"a{lhs} = {library}\nb{lhs} = {written}\noutput a\noutput b\n")
    if function == "sum of softmax":
        text = text.replace("1 + 0 * x[I,J,K]", "1 + 0 * sum[J](x[I,J,K])")
    results = run_reference(compile_source(text), seed=seed)
    np.testing.assert_allclose(results["a"], results["b"], rtol=1e-9, atol=1e-9)


@FAST
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2 ** 16))
def test_logsumexp_and_cumsum_equal_their_definitions(i, j, seed):
    text = (f"dim I={i} J={j}\ndtype f64\ninput x[I,J]\n"
            "l[I] = logsumexp[J](x[I,J])\nm[I] = log(sum[J](exp(x[I,J])))\n"
            "c[I,J] = cumsum[J](x[I,J])\n"
            "output l\noutput m\noutput c\noutput x\n")
    results = run_reference(compile_source(text), seed=seed)
    np.testing.assert_allclose(results["l"], results["m"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(results["c"], np.cumsum(results["x"], axis=1), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- mistakes are rejected


def mistakes(generated: GeneratedProgram):
    """(description, text appended to the program, overrides, expected code) for one
    deliberate mistake each; appended names start with z and never clash."""
    found = []
    inputs = [i for i in generated.inputs if not i.stacked_by]
    dims = generated.dims
    first = inputs[0]
    found.append(("unknown tensor", f"zq[{dims[0]}] = znothing[{dims[0]}]\n", None, "E201"))
    found.append(("output never defined", "output znothing\n", None, "E232"))
    found.append(("duplicate definition",
                  f"{first.name}[{','.join(first.indices)}] = {first.name}[{','.join(first.indices)}]\n",
                  None, "E230"))
    found.append(("use before definition", "dim ZA=2\nzq1[ZA] = zq2[ZA]\nzq2[ZA] = zq1[ZA]\n",
                  None, "E231"))
    found.append(("wrong number of indices",
                  f"dim ZA=2\nzq[ZA] = {first.name}[{','.join(first.indices + ('ZA',))}]\n",
                  None, "E210"))
    found.append(("size disagrees",
                  "dim ZA=2 ZB=3\ninput zx[ZA]\nzq[ZB] = zx[ZB]\n", None, "E211"))
    found.append(("index repeated on the left", "dim ZA=2\ninput zx[ZA]\nzq[ZA,ZA] = zx[ZA]\n",
                  None, "E212"))
    found.append(("reduction over a missing index",
                  "dim ZA=2 ZB=3\ninput zx[ZA]\nzq[ZA] = sum[ZB](zx[ZA])\n", None, "E213"))
    found.append(("unknown dim in an alias", "dim ZA=ZNOTHING\n", None, "E203"))
    found.append(("unknown function", "dim ZA=2\ninput zx[ZA]\nzq[ZA] = znothing(zx[ZA])\n",
                  None, "E204"))
    found.append(("route's default k=2 needs two experts",
                  "dim ZE=1 ZC=2 ZS=3\ninput zg[ZS,ZE]\nzq[ZS,ZE,ZC] = route[ZE,ZC](zg[ZS,ZE])\n",
                  None, "E215"))
    found.append(("route's k beyond the experts",
                  "dim ZE=2 ZC=2 ZS=3\ninput zg[ZS,ZE]\n"
                  "zq[ZS,ZE,ZC] = route[ZE,ZC](zg[ZS,ZE], k=3)\n", None, "E215"))
    found.append(("layout in an expression",
                  "dim ZA=2\ninput zx[ZA]\nzq[ZA] = zx[ZA@znothing]\n", None, "E216"))
    found.append(("input inside repeat",
                  "dim ZL=2 ZA=2\nrepeat ZL {\n  input zx[ZA]\n}\n", None, "E236"))
    found.append(("unknown mesh axis", "dim ZA=2\ninput zx[ZA@znothing]\n", None, "E202"))
    found.append(("unknown index", "dim ZA=2\ninput zx[ZA]\nzq[ZNOTHING] = zx[ZA]\n", None, "E200"))
    found.append(("unknown dtype", "dim ZA=2\ninput zx[ZA] : f8\n", None, "E205"))
    # An input not yet an output, or the mistake would be a duplicate output (E233) first.
    unlisted = [i for i in inputs if i.name not in {o.name for o in generated.outputs}]
    if unlisted:
        name, indices = unlisted[0].name, unlisted[0].indices
        found.append(("output with the wrong number of indices",
                      f"output {name}[{','.join(indices + ('ZA',))}]\ndim ZA=2\n", None, "E210"))
    found.append(("value used after its repeat block",
                  "dim ZL=2 ZA=2\ninput zx[ZA]\nrepeat ZL {\n  zl[ZA] = zx[ZA]\n}\n"
                  "zq[ZA] = zl[ZA]\n", None, "E234"))
    found.append(("carried value changes type",
                  "dim ZL=2 ZA=2 ZB=3\ninput zx[ZA]\ninput zy[ZB]\nrepeat ZL {\n"
                  "  zx[ZB] = zy[ZB]\n}\n", None, "E235"))
    found.append(("dim declared inside repeat",
                  "dim ZL=2\nrepeat ZL {\n  dim ZA=2\n}\n", None, "E236"))
    if generated.mesh.axes:
        axis, size = generated.mesh.axes[0]
        found.append(("axis used twice",
                      f"dim ZA={size} ZB={size}\ninput zx[ZA@{axis}, ZB@{axis}]\n", None, "E220"))
        inner = [(name, n) for name, n in generated.mesh.axes[1:] if n > 1]
        if inner:  # blocks of the first axis that the second does not divide: padding not at the end
            other, n = inner[0]
            found.append(("padding does not nest", f"dim ZA={size * (n + 1)}\n"
                          f"input zx[ZA@({axis},{other})]\n", None, "E221"))
            found.append(("left side padding does not nest", f"dim ZA={size * (n + 1)}\n"
                          f"input zx[ZA]\nzq[ZA@({axis},{other})] = zx[ZA]\n", None, "E221"))
        if axis not in generated.dims:  # a name both a dim and an axis: --set is ambiguous
            found.append(("mesh axis of size zero", "", {axis: 0}, "E222"))
        else:
            found.append(("--set of a name both a dim and a mesh axis", "", {axis: 0}, "E301"))
        found.append(("second mesh", "mesh zaxis=2\n", None, "E233"))
    if dims[0] not in generated.mesh.names:  # `--set NAME` means the axis when both exist
        found.append(("dim of size zero", "", {dims[0]: 0}, "E222"))
    found.append(("--set of an unknown name", "", {"ZNOTHING": 1}, "E301"))
    return found


def small_program() -> GeneratedProgram:
    """A hand-written program in the generator's terms, for the one-mistake-each tests."""
    text = "mesh dp=2\ndim B=4\ninput x[B@dp]\nh[B] = x[B]\noutput h\n"
    return GeneratedProgram(text, MeshSpec((("dp", 2),)), (("B", 4),), "f32",
                            (TensorInfo("x", ("B",), "f32", "input", (("dp",),)),), (), ())


MISTAKE_NAMES = [m[0] for m in mistakes(small_program())]


# No shrinking: the drawn mistake says what went wrong, and shrinking the program
# around it only costs minutes.
@settings(FAST, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(st.data())
def test_programs_with_one_mistake_are_rejected(data):
    generated = data.draw(programs(max_statements=4), label="program")
    options = {m[0]: m for m in mistakes(generated)}
    name = data.draw(st.sampled_from(sorted(options)), label="mistake")
    _, appended, overrides, code = options[name]
    text = generated.text + appended
    with pytest.raises(EinparError) as raised:
        compile_source(text, overrides=overrides)
    codes = [d.code for d in raised.value.diagnostics]
    assert code in codes, f"{name}: expected {code}, got {codes}\n{text}"


@pytest.mark.parametrize("mistake", MISTAKE_NAMES)
def test_each_mistake_is_rejected_in_a_small_program(mistake):
    """The same mistakes, one test each, so a regression names the mistake."""
    generated = small_program()
    text = generated.text
    _, appended, overrides, code = {m[0]: m for m in mistakes(generated)}[mistake]
    with pytest.raises(EinparError) as raised:
        compile_source(text + appended, overrides=overrides)
    assert code in [d.code for d in raised.value.diagnostics]


def test_generator_dtypes_are_the_languages_float_dtypes():
    from einpar.ir import FLOAT_DTYPES as LANGUAGE_FLOAT_DTYPES

    assert set(FLOAT_DTYPES) == set(LANGUAGE_FLOAT_DTYPES)


# ---------------------------------------------------------------- the summation rule, written out


def check_explicit_sums(generated: GeneratedProgram) -> None:
    """Writing each implied sum as `sum[...](...)` where the rule puts it changes no value."""
    implicit = compile_generated(generated)
    explicit = compile_generated(generated, generated.render(explicit_sums=True))
    inputs = random_inputs(implicit, seed=4)
    expected = run_reference(explicit, inputs)
    scale = max(1.0, generated.max_magnitude)
    for name, array in run_reference(implicit, inputs).items():
        np.testing.assert_allclose(array, expected[name], rtol=1e-9, atol=1e-12 * scale,
                                   err_msg=name)


@FAST
@given(programs(dtypes=("f64",)))
def test_implicit_sums_equal_sums_written_out(generated):
    assume("sum[" in generated.render(explicit_sums=True))
    check_explicit_sums(generated)


@pytest.mark.slow
@SLOW
@given(programs(dtypes=("f64",), max_statements=12))
def test_many_implicit_sums_equal_sums_written_out(generated):
    check_explicit_sums(generated)
