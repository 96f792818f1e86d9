"""Random well-formed `.ein` programs (hypothesis strategies), for property tests.

For einpar's own tests and for users who property-test their sharding:

    from hypothesis import given
    import einpar.api as ein
    from einpar.testing import programs

    @given(programs())
    def test_my_backend_agrees(generated):
        program = ein.compile_source(generated.text)
        expected = ein.run_reference(program, seed=0)
        ...

`programs()` draws random, well-formed program text together with what a
test needs to know about it (the mesh, the dims, every input's and output's
indices, dtype and layout, and for contractions the einsum they compute), so
a property can be stated without parsing the text again. Everything drawn is
valid by construction: a program einpar rejects is a bug in einpar or here.

Values stay numerically tame: every function with a restricted domain gets a
safe argument (`log(abs(e) + 1)`, `sqrt(abs(e))`, `exp` of a bounded value),
divisions are by quantities of at least one, and the generator tracks a bound
on the magnitude of every value the program stores (assuming inputs of
magnitude at most 6, which `einpar.api.random_inputs` draws with
overwhelming probability) and wraps a subexpression in `tanh` where that
bound would grow past 3e4, so even f16 programs stay finite. The fp8 types
(largest values 448 and 57344) are below that bound, so `programs()` draws
them only when asked (`dtypes=`).

This module imports hypothesis, and nothing of JAX.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from ..layout import Mesh

__all__ = [
    "FLOAT_DTYPES", "DEFAULT_DTYPES", "STATEMENT_KINDS", "MeshSpec", "TensorInfo", "OutputInfo",
    "Contraction", "StatementInfo", "GeneratedProgram", "meshes", "layouts", "programs", "contraction_programs",
]

FLOAT_DTYPES = ("f32", "f64", "bf16", "f16", "f8e4m3", "f8e5m2")
# What `programs()` draws from unless told: the float types whose range holds the generator's
# magnitude bound.
DEFAULT_DTYPES = ("f32", "f64", "bf16", "f16")

# What statements draw from (the `kinds` argument of `programs`):
#   contraction  products of tensors with implicit sums (einsums), constant scales
#   elementwise  + - * /, unary minus, exp log sqrt rsqrt tanh sigmoid relu gelu silu abs square,
#                sin cos erf, pow(abs(e) + 1, p), max2, min2, broadcasting by index name
#   comparison   > >= < <= == != inside where(c, a, b) or as a 0/1 mask `(c) * a`, of
#                values or of positions (`pos(S) >= pos(T)`, a causal mask)
#   reduction    sum[...], max[...], min[...], mean[...]
#   library      softmax, logsumexp, rmsnorm, layernorm, cumsum, and softmax written out
#   route        route[E,C](softmax[E](g), k=...)
STATEMENT_KINDS = ("contraction", "elementwise", "comparison", "reduction", "library", "route")

AXIS_NAMES = ("dp", "tp", "sp", "fsdp", "ep", "pp", "x", "y")
DIM_NAMES = ("B", "S", "D", "F", "H", "K", "E", "C", "G", "N", "M", "P")
ALIAS_NAMES = ("T", "U", "V", "W")
REPEAT_DIM = "L"
# Names shared with another namespace, drawn when `name_collisions` is on: tensor, dim and
# mesh-axis names are separate namespaces, so `input x[B, S@x]` on a mesh with axis x is legal.
COLLIDING_AXIS_NAMES = ("B", "D", "x")
COLLIDING_TENSOR_NAMES = ("x", "y", "dp", "tp", "B", "S", "D")

# Magnitudes (see the module docstring).
INPUT_BOUND = 6.0
MAGNITUDE_LIMIT = 3e4
SUMMED_SIZE_LIMIT = 64  # the product of the sizes summed at one place

_DIM_MARK = "\x1d"  # brackets every dimension name in a template, so it can be renamed
_MARKED = re.compile(_DIM_MARK + "([^" + _DIM_MARK + "]*)" + _DIM_MARK)
# Where the summation rule puts an implicit sum, the template holds
# OPEN indices MIDDLE expression CLOSE, rendered as just the expression, or as
# `sum[indices](expression)` to write the sum out.
_SUM_OPEN, _SUM_MIDDLE, _SUM_CLOSE = "\x02", "\x03", "\x04"
_SUM_HEAD = re.compile(_SUM_OPEN + "([^" + _SUM_MIDDLE + "]*)" + _SUM_MIDDLE)

# Precedence of an expression's outermost operator, for parenthesizing.
_COMPARE, _SUM, _PRODUCT, _UNARY, _ATOM = range(5)


# ---------------------------------------------------------------- public metadata types


@dataclass(frozen=True)
class MeshSpec(Mesh):
    """A generated program's mesh (an `einpar.layout.Mesh`), which writes its own line."""

    def declaration(self) -> str:
        """The `mesh ...` line, or "" for a program without a mesh."""
        if not self.axes:
            return ""
        return "mesh " + " ".join(f"{name}={size}" for name, size in self.axes)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of a generated program: an input, a param, or a statement's result.

    `indices` are the dimension names it was declared or defined with, in
    order; `layout` gives, per dimension, the mesh axes that split it (None
    when no layout was written). A param declared inside `repeat L` has
    `stacked_by == ("L",)`: the program takes it with L as an extra leading
    dimension.
    """

    name: str
    indices: tuple[str, ...]
    dtype: str
    kind: str  # "input", "param" or "def"
    layout: tuple[tuple[str, ...], ...] | None = None
    stacked_by: tuple[str, ...] = ()

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """The global shape as the program takes or returns it (stacked dims first)."""
        return tuple(sizes[index] for index in self.stacked_by + self.indices)


@dataclass(frozen=True)
class OutputInfo:
    """An `output` line: the tensor's indices and dtype, and the layout written there, if any."""

    name: str
    indices: tuple[str, ...]
    dtype: str
    layout: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class Contraction:
    """What a statement that is a product of tensor references computes.

    `result[indices] = scale * einsum(operands)`, where each operand is a
    tensor name with the indices it was read with, and every index absent
    from `indices` is summed (the summation rule).
    """

    result: str
    indices: tuple[str, ...]
    operands: tuple[tuple[str, tuple[str, ...]], ...]
    scale: float = 1.0

    def subscripts(self) -> str:
        """numpy.einsum subscripts, one letter per index name."""
        letters: dict[str, str] = {}
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

        def word(indices):
            for index in indices:
                letters.setdefault(index, alphabet[len(letters)])
            return "".join(letters[index] for index in indices)

        inputs = ",".join(word(indices) for _, indices in self.operands)
        return f"{inputs}->{word(self.indices)}"


@dataclass(frozen=True)
class StatementInfo:
    """One statement: the tensor it defines (its indices and dtype), the kind of its
    outermost expression, whether it sits in the repeat block, and its einsum if it is
    a pure contraction."""

    name: str
    indices: tuple[str, ...]
    dtype: str
    kind: str
    in_repeat: bool
    contraction: Contraction | None = None


@dataclass(frozen=True)
class GeneratedProgram:
    """Random well-formed `.ein` text and what a test needs to know about it.

    `text` is the program. `dim_declarations` lists each dim as written:
    a size, or the name of the dim it aliases (`T=S`); `sizes()` resolves them,
    `--set`-style overrides included. `inputs` are the program's inputs and
    params in declaration order; `outputs` its outputs in order.
    `positional_renames` holds the (declared index, index read with) pairs
    where the text reads a tensor with another name of the same size, which ties
    those dims' sizes together. `max_magnitude` bounds every value the
    program stores, for inputs of magnitude at most 6.
    """

    template: str = field(repr=False)
    mesh: MeshSpec
    dim_declarations: tuple[tuple[str, int | str], ...]
    dtype: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[OutputInfo, ...]
    statements: tuple[StatementInfo, ...]
    repeat_dim: str | None = None
    positional_renames: frozenset[tuple[str, str]] = frozenset()
    max_magnitude: float = 0.0
    loss: str | None = None  # the loss's name, for programs drawn with `training=True`
    optimizer: str | None = None  # the `optimizer ...` line drawn with it, if any

    @property
    def text(self) -> str:
        return self.render()

    def render(self, rename: Mapping[str, str] | None = None, explicit_sums: bool = False) -> str:
        """The program text, with dimension names replaced per `rename` (a dim -> new name map).

        Only dimension names are renamed (in `dim` lines, index positions,
        reductions' brackets and bare sizes); tensor and mesh-axis names stay,
        even where they are spelled like a dim.

        With `explicit_sums`, every sum the summation rule implies is written out as
        `sum[...](...)` around the subexpression the rule puts it on: the program
        means the same.
        """
        rename = rename or {}
        text = _MARKED.sub(lambda match: rename.get(match[1], match[1]), self.template)
        if explicit_sums:
            return _SUM_HEAD.sub(r"sum[\1](", text).replace(_SUM_CLOSE, ")")
        return _SUM_HEAD.sub("", text).replace(_SUM_CLOSE, "")

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.dim_declarations)

    @property
    def aliases(self) -> dict[str, str]:
        """alias -> the dim it was declared equal to."""
        return {name: value for name, value in self.dim_declarations if isinstance(value, str)}

    def sizes(self, overrides: Mapping[str, int] | None = None) -> dict[str, int]:
        """Every dim's size; with `overrides` as `--set` applies them (aliases follow their
        target unless set themselves). Names in `overrides` that are not dims are ignored."""
        overrides = overrides or {}
        sizes = {name: overrides.get(name, value) for name, value in self.dim_declarations
                 if isinstance(value, int)}
        pending = dict(self.aliases)
        while pending:
            for alias, target in list(pending.items()):
                if target in sizes:
                    sizes[alias] = overrides.get(alias, sizes[target])
                    del pending[alias]
        return {name: sizes[name] for name in self.dims}

    def family(self, dim: str) -> frozenset[str]:
        """The dims whose size follows `dim` when it alone is overridden: itself and its aliases."""
        members = {dim}
        grew = True
        while grew:
            grew = False
            for alias, target in self.aliases.items():
                if target in members and alias not in members:
                    members.add(alias)
                    grew = True
        return frozenset(members)

    def input_shapes(self, overrides: Mapping[str, int] | None = None) -> dict[str, tuple[int, ...]]:
        sizes = self.sizes(overrides)
        return {info.name: info.shape(sizes) for info in self.inputs}

    def output_shapes(self, overrides: Mapping[str, int] | None = None) -> dict[str, tuple[int, ...]]:
        sizes = self.sizes(overrides)
        return {out.name: tuple(sizes[index] for index in out.indices) for out in self.outputs}

    @property
    def contractions(self) -> tuple[Contraction, ...]:
        return tuple(s.contraction for s in self.statements if s.contraction is not None)

    def __repr__(self) -> str:
        return f"GeneratedProgram(text=\n{self.text})"

    def _repr_pretty_(self, printer, cycle) -> None:
        """How hypothesis shows a falsifying example: the program text, not every field."""
        printer.text(repr(self))


# ---------------------------------------------------------------- small strategies


def meshes(min_axes: int = 1, max_axes: int = 3, max_size: int = 4,
           names: Iterable[str] = AXIS_NAMES) -> SearchStrategy[MeshSpec]:
    """Meshes of `min_axes`..`max_axes` axes with distinct names drawn from `names`,
    each of size 1..`max_size`. `min_axes=0` allows programs without a mesh."""
    names = tuple(names)
    if not 0 <= min_axes <= max_axes <= len(names):
        raise ValueError("need 0 <= min_axes <= max_axes <= len(names)")

    def with_sizes(axis_names):
        sizes = st.tuples(*(st.integers(1, max_size) for _ in axis_names))
        return sizes.map(lambda drawn: MeshSpec(tuple(zip(axis_names, drawn))))

    return st.lists(st.sampled_from(names), min_size=min_axes, max_size=max_axes,
                    unique=True).flatmap(with_sizes)


def _draw_layout(draw, mesh: MeshSpec, sizes: tuple[int, ...],
                 uneven: bool = False) -> tuple[tuple[str, ...], ...]:
    """Each mesh axis splits at most one dimension, and only one its size divides; with
    `uneven`, a dimension's first axis need not divide it (it is padded), and each axis
    after it divides the padded blocks the ones before leave (einpar.layout.uneven_conflict)."""
    split: list[list[str]] = [[] for _ in sizes]
    factors = [1] * len(sizes)
    if uneven:
        blocks = list(sizes)
        order = list(range(len(mesh.axes)))
        if len(order) > 1:
            order = draw(st.permutations(order))
        for position in order:
            axis, axis_size = mesh.axes[position]
            fits = [d for d, block in enumerate(blocks) if not split[d] or block % axis_size == 0]
            choice = draw(st.sampled_from([None] + fits))
            if choice is not None:
                split[choice].append(axis)
                blocks[choice] = -(-blocks[choice] // axis_size)
        return tuple(tuple(axes) for axes in split)
    order = list(range(len(mesh.axes)))
    if len(order) > 1:
        order = draw(st.permutations(order))
    for position in order:
        axis, axis_size = mesh.axes[position]
        fits = [d for d, size in enumerate(sizes) if size % (factors[d] * axis_size) == 0]
        choice = draw(st.sampled_from([None] + fits))
        if choice is not None:
            split[choice].append(axis)
            factors[choice] *= axis_size
    return tuple(tuple(axes) for axes in split)


def layouts(mesh: MeshSpec, sizes: Iterable[int]) -> SearchStrategy[tuple[tuple[str, ...], ...]]:
    """Valid layouts of a tensor with dimension `sizes` on `mesh`: per dimension, the
    axes splitting it (major first); no axis used twice, each dimension divisible by
    the product of its axes."""
    sizes = tuple(sizes)
    return st.composite(lambda draw: _draw_layout(draw, mesh, sizes))()


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True)
class _Expr:
    """A generated expression: template text, free indices, dtype, magnitude bound."""

    text: str
    free: tuple[str, ...]
    dtype: str  # a float dtype, "weak" (an untyped constant) or "bool" (a comparison)
    bound: float
    prec: int
    # As a product of tensor references: (tensor, indices read with) pairs, and the scale.
    product: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    scale: float = 1.0
    kind: str = "ref"


_RANK = {"f8e4m3": 0, "f8e5m2": 0, "f16": 1, "bf16": 1, "f32": 2, "f64": 3}


def _promote(a: str, b: str) -> str:
    """The dtype of an arithmetic result (LANGUAGE.md: JAX's rules, constants are weak)."""
    if a in ("weak", "bool"):
        return b if b != "bool" else a
    if b in ("weak", "bool"):
        return a
    if a == b:
        return a
    if {a, b} == {"f16", "bf16"}:
        return "f32"
    if {a, b} == {"f8e4m3", "f8e5m2"}:
        return "bf16"
    return a if _RANK[a] > _RANK[b] else b


def _paren(expr: _Expr, minimum: int) -> str:
    return expr.text if expr.prec >= minimum else f"({expr.text})"


@dataclass
class _Tensor:
    info: TensorInfo
    bound: float


@dataclass
class _Options:
    kinds: frozenset[str]
    max_rank: int
    max_depth: int
    layouts: bool
    dtypes: tuple[str, ...]
    formatting: bool
    name_collisions: bool
    uneven: bool = False

    @property
    def pure(self) -> bool:
        return self.kinds == frozenset({"contraction"})


class _Scope:
    """What a program being drawn has in scope: its tensors, names and indices, and the
    helpers that draw them. The expression and statement drawers below build on it."""

    def __init__(self, draw, options: _Options, mesh: MeshSpec, sizes: dict[str, int],
                 roots: dict[str, str], dtype: str):
        self.draw = draw
        self.options = options
        self.mesh = mesh
        self.sizes = sizes
        self.roots = roots  # dim -> the root of its alias family
        self.pool = tuple(name for name in sizes if name != REPEAT_DIM)
        self.dtype = dtype
        self.lines: list[str] = []
        self.visible: dict[str, _Tensor] = {}  # in definition order
        self.taken_names: set[str] = set()
        self.inputs: list[TensorInfo] = []
        self.statements: list[StatementInfo] = []
        # (declared index, index read with) -> how many reads in the text rename so; a read
        # dropped from the text is taken back out (see `forget`).
        self.renames: Counter[tuple[str, str]] = Counter()
        self.max_bound = 0.0
        self.counter = 0
        self.in_block = False
        self.indent = ""
        self.used: set[str] = set()
        self.lhs: tuple[str, ...] = ()
        self.pending: list[str] = []
        self.sep = ", "
        self.wrap_calls = False

    # ---- drawing helpers

    def pick(self, options, weights=None):
        """One of `options`; weights repeat entries. Shrinks toward the first."""
        options = list(options)
        if weights is not None:
            options = [o for o, w in zip(options, weights) for _ in range(w)]
        return self.draw(st.sampled_from(options))

    def chance(self, one_in: int) -> bool:
        """True with probability 1/one_in (shrinks to False)."""
        return self.draw(st.integers(0, one_in - 1)) == one_in - 1

    def note(self, bound: float) -> float:
        bound = max(1.0, bound)
        self.max_bound = max(self.max_bound, bound)
        return bound

    # ---- names and text

    def dim(self, name: str) -> str:
        return f"{_DIM_MARK}{name}{_DIM_MARK}"

    def implicit_sum(self, summed: tuple[str, ...], text: str) -> str:
        """`text`, marked as where the summation rule sums `summed` (see `render`)."""
        if not summed:
            return text
        return f"{_SUM_OPEN}{','.join(map(self.dim, summed))}{_SUM_MIDDLE}{text}{_SUM_CLOSE}"

    def fresh_name(self, prefix: str) -> str:
        if self.options.name_collisions and self.chance(6):
            candidates = [n for n in COLLIDING_TENSOR_NAMES if n not in self.taken_names]
            if candidates:
                name = self.pick(candidates)
                self.taken_names.add(name)
                return name
        while True:
            self.counter += 1
            name = f"{prefix}{self.counter}"
            if name not in self.taken_names:
                self.taken_names.add(name)
                return name

    def index_list(self, indices: tuple[str, ...], layout=None) -> str:
        parts = []
        for position, index in enumerate(indices):
            text = self.dim(index)
            axes = layout[position] if layout else ()
            if len(axes) == 1 and not self.chance(8):
                text += "@" + axes[0]
            elif axes:
                text += "@(" + ",".join(axes) + ")"
            parts.append(text)
        return "[" + self.sep.join(parts) + "]"

    def call(self, name: str, *args: str, indices: tuple[str, ...] | None = None) -> str:
        head = name + (self.index_list(indices) if indices is not None else "")
        inner = ", ".join(args)
        if self.wrap_calls and len(inner) > 60:
            inner = "\n" + self.indent + "        " + inner
        return f"{head}({inner})"

    def family(self, index: str) -> str:
        return self.roots[index]

    def draw_layout(self, indices: tuple[str, ...]):
        if not self.options.layouts or not self.mesh.axes or not indices or self.chance(3):
            return None
        layout = _draw_layout(self.draw, self.mesh, tuple(self.sizes[i] for i in indices),
                              self.options.uneven)
        return layout if any(layout) else None

    def draw_dtype(self) -> str:
        if len(self.options.dtypes) > 1 and self.chance(6):
            return self.pick(self.options.dtypes)
        return self.dtype

    # ---- tensors

    def declare(self, indices: tuple[str, ...], kind: str | None = None) -> _Tensor:
        """A new input or param over `indices`, declared before the current statement."""
        if kind is None:
            kind = "param" if self.in_block or self.chance(3) else "input"
        name = self.fresh_name("w" if kind == "param" else "x")
        dtype = self.draw_dtype()
        layout = self.draw_layout(indices)
        stacked = (REPEAT_DIM,) if self.in_block else ()
        info = TensorInfo(name, indices, dtype, kind, layout, stacked)
        suffix = f" : {dtype}" if dtype != self.dtype or self.chance(10) else ""
        self.pending.append(f"{self.indent}{kind} {name}{self.index_list(indices, layout)}{suffix}")
        tensor = _Tensor(info, INPUT_BOUND)
        self.visible[name] = tensor
        self.inputs.append(info)
        return tensor

    def matches(self, tensor: _Tensor, free: tuple[str, ...]) -> bool:
        have = sorted(self.family(i) for i in tensor.info.indices)
        return len(have) == len(free) and have == sorted(self.family(i) for i in free)

    def bind(self, tensor: _Tensor, free: tuple[str, ...]) -> tuple[str, ...]:
        """The indices to read `tensor` with: each position gets an index of `free` of the
        same size family, its own name unless the draw renames it."""
        left = list(free)
        chosen = []
        for declared in tensor.info.indices:
            options = [i for i in left if self.family(i) == self.family(declared)]
            if declared in options and not self.chance(5):
                index = declared
            else:
                index = self.pick(options)
            if index != declared:
                self.renames[(declared, index)] += 1
            left.remove(index)
            chosen.append(index)
        return tuple(chosen)

    def positional_renames(self) -> frozenset[tuple[str, str]]:
        """The renames the text's reads make so far (see `GeneratedProgram`)."""
        return frozenset(pair for pair, reads in self.renames.items() if reads > 0)

    def forget(self, dropped: _Expr) -> None:
        """Take back the renames of `dropped`'s reads: it was drawn but left out of the text,
        and a rename only ties sizes where the text reads a tensor so."""
        assert dropped.product is not None, "only a product lists all of its reads"
        for name, indices in dropped.product:
            for declared, index in zip(self.visible[name].info.indices, indices):
                if index != declared:
                    self.renames[(declared, index)] -= 1

    def ref(self, free: tuple[str, ...], fresh: bool = False) -> _Expr:
        candidates = [t for t in self.visible.values() if self.matches(t, free)]
        if candidates and not fresh and not self.chance(4):
            candidates.reverse()  # most recent first
            tensor = candidates[self.draw(st.integers(0, len(candidates) - 1))]
        else:
            tensor = self.declare(tuple(self.draw(st.permutations(free))) if len(free) > 1 else free)
        indices = self.bind(tensor, free)
        text = tensor.info.name + self.index_list(indices)
        return _Expr(text, free, tensor.info.dtype, self.note(tensor.bound), _ATOM,
                     product=((tensor.info.name, indices),), kind="ref")

    # ---- indices summed or bound inside a statement

    def fresh_indices(self, most: int, limit: int = SUMMED_SIZE_LIMIT) -> tuple[str, ...]:
        """Up to `most` dims not yet used in this statement, their sizes' product <= limit."""
        count = self.draw(st.integers(0, most))
        return self.take_indices(count, lambda: [d for d in self.pool if d not in self.used], limit)

    def bound_indices(self, free: tuple[str, ...], most: int) -> tuple[str, ...]:
        """Indices for an explicit reduction at a node with free indices `free`: fresh dims,
        or indices of the statement's left side the node lacks (bound locally there)."""
        shadowing = [i for i in self.lhs if i not in free]
        count = self.draw(st.integers(1, most))
        return self.take_indices(
            count, lambda: shadowing + [d for d in self.pool if d not in self.used], SUMMED_SIZE_LIMIT)

    def take_indices(self, count: int, candidates, limit: int) -> tuple[str, ...]:
        """Up to `count` indices picked one by one from `candidates()`, distinct, their
        sizes' product <= limit; each is marked used in this statement."""
        chosen: list[str] = []
        product = 1
        for _ in range(count):
            options = [d for d in candidates() if d not in chosen and product * self.sizes[d] <= limit]
            if not options:
                break
            index = self.pick(options)
            chosen.append(index)
            product *= self.sizes[index]
            self.used.add(index)
        return tuple(chosen)

    def size_product(self, indices) -> int:
        return math.prod(self.sizes[i] for i in indices)


class _Elementwise(_Scope):
    """Draws expression nodes: contractions, arithmetic, functions, min and max."""

    def node(self, free: tuple[str, ...], depth: int) -> _Expr:
        """A non-constant expression whose free indices (after implicit sums) are `free`."""
        kinds = self.options.kinds
        if self.options.pure:
            return self.contraction(free, depth)
        choices: list[tuple[str, int]] = [("ref", 3 if depth == 0 else 1)]
        if "contraction" in kinds:
            choices.append(("contraction", 3))
        if depth > 0:
            if "elementwise" in kinds:
                choices += [("arith", 4), ("function", 2), ("minmax", 1)]
            if "comparison" in kinds and free:
                choices += [("where", 1), ("mask", 1)]
            if "reduction" in kinds:
                choices.append(("reduction", 2))
            if "library" in kinds:
                choices += [("library", 2), ("logsumexp", 1)]
                if free:
                    choices.append(("manual_softmax", 1))
            if "route" in kinds and len(free) >= 3:
                choices.append(("route", 1))
        kind = self.pick([c for c, _ in choices], [w for _, w in choices])
        if kind == "ref":
            return self.ref(free)
        return getattr(self, kind)(free, depth)

    def tame(self, expr: _Expr) -> _Expr:
        """`tanh(expr)`: bounded by 1 whatever `expr` is."""
        return _Expr(self.call("tanh", expr.text), expr.free, expr.dtype, self.note(1.0), _ATOM,
                     kind="function")

    def constant(self, largest: float = 2.0) -> tuple[str, float]:
        text = self.pick(["0.5", "1", "2", "0.25", "1.5", "1e-1", ".5", "2.0", "3"])
        value = float(text)
        if value > largest:
            text, value = "0.5", 0.5
        return text, value

    def split(self, free: tuple[str, ...], parts: int, at_least_two: Iterable[str] = ()):
        """Free-index sets of `parts` operands whose union is `free`: each index goes to a
        nonempty subset of them (at least two for those in `at_least_two`)."""
        groups: list[list[str]] = [[] for _ in range(parts)]
        twice = set(at_least_two)
        for index in free:
            if parts == 1:
                members = [0]
            else:
                mask = self.draw(st.integers(1, 2 ** parts - 1))
                members = [k for k in range(parts) if mask >> k & 1]
                if index in twice and len(members) < 2:
                    members = [members[0], (members[0] + 1) % parts]
            for k in members:
                groups[k].append(index)
        return [tuple(group) for group in groups]

    def contraction(self, free: tuple[str, ...], depth: int) -> _Expr:
        """A product of 1-3 factors; the fresh indices it uses are summed over the product."""
        most = 2 if len(free) <= 2 else (1 if len(free) <= 3 else 0)
        summed = self.fresh_indices(most)
        everything = free + summed
        count = self.draw(st.integers(1, 3))
        if count == 1:
            factors = [self.ref(everything)]
        else:
            groups = self.split(everything, count, at_least_two=summed)
            factors = []
            for group in groups:
                if self.options.pure:
                    nested = depth > 0 and len(group) >= 1 and self.chance(4)
                    factor = self.contraction(group, depth - 1) if nested else self.ref(group)
                else:
                    factor = self.node(group, depth - 1) if depth > 0 else self.ref(group)
                factors.append(factor)
        extent = self.size_product(summed)

        def unscaled(parts):
            return math.prod(f.bound for f in parts) * extent

        while unscaled(factors) > MAGNITUDE_LIMIT:
            largest = max(range(len(factors)), key=lambda k: factors[k].bound)
            if len(factors) > 1 and not self.options.pure:
                factors[largest] = self.tame(factors[largest])
            else:
                # A lone factor summed where it stands, or a pure contraction: read a
                # fresh input instead, whose magnitude is known.
                self.forget(factors[largest])
                factors[largest] = self.ref(factors[largest].free, fresh=True)
        bound = self.note(unscaled(factors))
        scale = 1.0
        prefix = suffix = ""
        style = self.pick(["none", "prefix", "sqrt", "size"], [4, 1, 1, 1])
        if style == "prefix":
            text, scale = self.constant(largest=1.0)
            prefix = f"{text} * "
        elif style in ("sqrt", "size"):
            index = self.pick(everything) if everything else None
            if index is not None:
                size = self.sizes[index]
                scale = 1.0 / math.sqrt(size) if style == "sqrt" else 1.0 / size
                suffix = f" / sqrt({self.dim(index)})" if style == "sqrt" else f" / {self.dim(index)}"
        texts = [_paren(factors[0], _PRODUCT)] + [_paren(f, _PRODUCT + 1) for f in factors[1:]]
        text = prefix + self.implicit_sum(summed, " * ".join(texts)) + suffix
        dtype = factors[0].dtype
        for factor in factors[1:]:
            dtype = _promote(dtype, factor.dtype)
        product = None
        if all(f.product is not None for f in factors):
            product = tuple(operand for f in factors for operand in f.product)
            scale *= math.prod(f.scale for f in factors)
        prec = _PRODUCT if len(factors) > 1 or prefix or suffix else factors[0].prec
        return _Expr(text, free, dtype, self.note(bound * scale), prec, product, scale,
                     kind="contraction")

    def operand(self, free: tuple[str, ...], depth: int, constant_ok: bool, largest=2.0):
        """A child of a binary operation; a constant where allowed and drawn."""
        if constant_ok and not free and self.chance(2):
            text, value = self.constant(largest)
            return _Expr(text, (), "weak", self.note(abs(value)), _ATOM, kind="constant")
        return self.node(free, depth - 1)

    def arith(self, free: tuple[str, ...], depth: int) -> _Expr:
        op = self.pick(["+", "*", "-", "/"])
        if op == "/":
            return self.divide(free, depth)
        left_free, right_free = self.split(free, 2)
        left = self.node(left_free, depth - 1)
        right = self.operand(right_free, depth, constant_ok=True)
        if op == "*":
            while left.bound * right.bound > MAGNITUDE_LIMIT:
                if left.bound >= right.bound:
                    left = self.tame(left)
                else:
                    right = self.tame(right)
            bound = left.bound * right.bound
            prec = _PRODUCT
        else:
            bound = left.bound + right.bound
            prec = _SUM
        text = f"{_paren(left, prec)} {op} {_paren(right, prec + 1)}"
        if bound > MAGNITUDE_LIMIT:
            return self.tame(_Expr(text, free, _promote(left.dtype, right.dtype), bound, prec))
        return _Expr(text, free, _promote(left.dtype, right.dtype), self.note(bound), prec,
                     kind="elementwise")

    def divide(self, free: tuple[str, ...], depth: int) -> _Expr:
        """Division by a quantity of at least one, so quotients stay bounded."""
        top_free, bottom_free = self.split(free, 2)
        top = self.node(top_free, depth - 1)
        style = self.pick(["size", "sqrt", "number", "abs", "sigmoid"])
        if bottom_free or style in ("abs", "sigmoid"):
            inner = self.node(bottom_free, depth - 1)
            if style == "sigmoid":
                bottom = f"({self.call('sigmoid', inner.text)} + 1)"
            else:
                bottom = f"({self.call('abs', inner.text)} + 1)"
            divisor, dtype = 1.0, _promote(top.dtype, inner.dtype)
        else:
            index = self.pick(self.pool)
            dtype = top.dtype
            if style == "size":
                bottom, divisor = self.dim(index), float(self.sizes[index])
            elif style == "sqrt":
                bottom, divisor = self.call("sqrt", self.dim(index)), math.sqrt(self.sizes[index])
            else:
                bottom = self.pick(["2", "4.0", "1e1", "8"])
                divisor = float(bottom)
        text = f"{_paren(top, _PRODUCT)} / {bottom}"
        return _Expr(text, free, dtype, self.note(top.bound / divisor), _PRODUCT, kind="elementwise")

    def function(self, free: tuple[str, ...], depth: int) -> _Expr:
        fn = self.pick(["tanh", "relu", "exp", "gelu", "silu", "sigmoid", "abs", "square",
                        "log", "sqrt", "rsqrt", "neg", "sin", "cos", "erf", "pow"])
        child = self.node(free, depth - 1)
        b = child.bound
        if fn in ("sin", "cos") and b > 64:
            # Backends agree on sin and cos of moderate arguments; far out, float32 range
            # reduction differs between libraries by more than a few ulps.
            child, b = self.tame(child), 1.0
        if fn == "pow":
            exponent = self.pick(["2", "0.5", "1.5", "3"])
            if (b + 1) ** float(exponent) > MAGNITUDE_LIMIT:
                child, b = self.tame(child), 1.0
            text = self.call("pow", self.call("abs", child.text) + " + 1", exponent)
            return _Expr(text, free, child.dtype, self.note((b + 1) ** float(exponent)), _ATOM,
                         kind="elementwise")
        if fn == "neg":
            return _Expr("-" + _paren(child, _UNARY), free, child.dtype, b, _UNARY,
                         kind="elementwise")
        if fn == "exp":
            if b > 8:
                if self.chance(2):
                    return _Expr(self.call("exp", "-" + self.call("abs", child.text)), free,
                                 child.dtype, self.note(1.0), _ATOM, kind="elementwise")
                child, b = self.tame(child), 1.0
            text, bound = self.call("exp", child.text), math.exp(b)
        elif fn == "log":
            text, bound = self.call("log", self.call("abs", child.text) + " + 1"), math.log(b + 1)
        elif fn == "sqrt":
            text, bound = self.call("sqrt", self.call("abs", child.text)), math.sqrt(b)
        elif fn == "rsqrt":
            text, bound = self.call("rsqrt", self.call("square", child.text) + " + 1"), 1.0
        elif fn == "square":
            if b * b > MAGNITUDE_LIMIT:
                child, b = self.tame(child), 1.0
            text, bound = self.call("square", child.text), b * b
        elif fn in ("tanh", "sigmoid", "sin", "cos", "erf"):
            text, bound = self.call(fn, child.text), 1.0
        else:  # relu gelu silu abs: |f(x)| <= |x|
            text, bound = self.call(fn, child.text), b
        return _Expr(text, free, child.dtype, self.note(bound), _ATOM, kind="elementwise")

    def minmax(self, free: tuple[str, ...], depth: int) -> _Expr:
        fn = self.pick(["max2", "min2"])
        left_free, right_free = self.split(free, 2)
        left = self.node(left_free, depth - 1)
        right = self.operand(right_free, depth, constant_ok=True)
        return _Expr(self.call(fn, left.text, right.text), free, _promote(left.dtype, right.dtype),
                     self.note(max(left.bound, right.bound)), _ATOM, kind="elementwise")


class _Selections(_Elementwise):
    """Draws comparisons and `where`, masks, reductions, library ops and `route`."""

    def comparison(self, free: tuple[str, ...], depth: int) -> str:
        op = self.pick([">", "<", ">=", "<=", "==", "!="])
        if 1 <= len(free) <= 2 and self.chance(5):
            # Positions, as a causal mask compares them: pos(S) >= pos(T).
            left = f"pos({self.dim(free[0])})"
            right = f"pos({self.dim(free[-1])})" if len(free) == 2 else self.pick(["1", "2", "3"])
            return f"{left} {op} {right}"
        left = self.node(free, depth - 1)
        if free and self.chance(2):
            right_free = tuple(i for i in free if not self.chance(2))
            right = self.node(right_free, depth - 1)
        else:
            text, value = self.constant()
            right = _Expr(text, (), "weak", value, _ATOM)
        if self.chance(4):
            left, right = right, left
        return f"{_paren(left, _SUM)} {op} {_paren(right, _SUM)}"

    def where(self, free: tuple[str, ...], depth: int) -> _Expr:
        cond_free, a_free, b_free = self.split(free, 3)
        if not cond_free:
            cond_free = (free[0],)
        condition = self.comparison(cond_free, depth)
        a = self.node(a_free, depth - 1)
        b = self.operand(b_free, depth, constant_ok=True)
        if self.chance(3):
            a, b = b, a
        text = self.call("where", condition, a.text, b.text)
        return _Expr(text, free, _promote(a.dtype, b.dtype), self.note(max(a.bound, b.bound)),
                     _ATOM, kind="comparison")

    def mask(self, free: tuple[str, ...], depth: int) -> _Expr:
        cond_free, value_free = self.split(free, 2)
        if not cond_free:
            cond_free = (free[0],)
        condition = f"({self.comparison(cond_free, depth)})"
        value = self.node(value_free, depth - 1)
        if self.chance(2):
            text = f"{condition} * {_paren(value, _PRODUCT + 1)}"
        else:
            text = f"{_paren(value, _PRODUCT)} * {condition}"
        return _Expr(text, free, value.dtype, value.bound, _PRODUCT, kind="comparison")

    def reduction(self, free: tuple[str, ...], depth: int) -> _Expr:
        fn = self.pick(["sum", "max", "mean", "min"])
        over = self.bound_indices(free, 2)
        if not over:
            return self.ref(free)
        child = self.node(free + over, depth - 1)
        extent = self.size_product(over) if fn == "sum" else 1
        if child.bound * extent > MAGNITUDE_LIMIT:
            child = self.tame(child)
        text = self.call(fn, child.text, indices=over)
        return _Expr(text, free, child.dtype, self.note(child.bound * extent), _ATOM,
                     kind="reduction")

    def library(self, free: tuple[str, ...], depth: int) -> _Expr:
        fn = self.pick(["softmax", "rmsnorm", "layernorm", "cumsum"])
        if free and not self.chance(4):
            index, summed_outside = self.pick(free), 1
            inner_free = free
        else:
            fresh = self.fresh_indices(1, limit=12)
            if not fresh:
                return self.ref(free)
            index, summed_outside = fresh[0], self.sizes[fresh[0]]
            inner_free = free + fresh
        if fn == "layernorm" and index not in free:
            # Summed over its own index a layernorm is zero: its value would be rounding
            # noise, which a norm around it scales up past any tolerance (rmsnorm of it
            # divides by about sqrt(eps)). A sum of rmsnorms means something.
            fn = "rmsnorm"
        size = self.sizes[index]
        child = self.node(inner_free, depth - 1)
        if fn == "cumsum" and child.bound * size * summed_outside > MAGNITUDE_LIMIT:
            child = self.tame(child)
        result = {"softmax": 1.0, "rmsnorm": math.sqrt(size), "layernorm": math.sqrt(size),
                  "cumsum": child.bound * size}[fn]
        self.note(result)
        text = self.call(fn, child.text, indices=(index,))
        if index not in free:
            text = self.implicit_sum((index,), text)
        return _Expr(text, free, child.dtype, self.note(result * summed_outside), _ATOM,
                     kind="library")

    def logsumexp(self, free: tuple[str, ...], depth: int) -> _Expr:
        over = self.bound_indices(free, 1)
        if not over:
            return self.ref(free)
        child = self.node(free + over, depth - 1)
        bound = child.bound + math.log(self.sizes[over[0]])
        return _Expr(self.call("logsumexp", child.text, indices=over), free, child.dtype,
                     self.note(bound), _ATOM, kind="library")

    def manual_softmax(self, free: tuple[str, ...], depth: int) -> _Expr:
        """softmax written out: exp(s - max[I](s)) / sum[I](exp(s - max[I](s))); the sum
        is at least one, so the quotient is bounded by one."""
        index = self.pick(free)
        scores = self.ref(free)
        peak = self.call("max", scores.text, indices=(index,))
        numerator = self.call("exp", f"{scores.text} - {peak}")
        denominator = self.call("sum", numerator, indices=(index,))
        return _Expr(f"{numerator} / {denominator}", free, scores.dtype, self.note(1.0),
                     _PRODUCT, kind="library")

    def route(self, free: tuple[str, ...], depth: int) -> _Expr:
        expert = self.pick(free)
        capacity = self.pick([i for i in free if i != expert])
        gate_free = tuple(i for i in free if i != capacity)
        logits = self.node(gate_free, depth - 1)
        gate = self.call("softmax", logits.text, indices=(expert,))
        experts = self.sizes[expert]
        if experts >= 2 and self.chance(3):
            text = self.call("route", gate, indices=(expert, capacity))  # k defaults to 2
        else:
            k = self.draw(st.integers(1, min(3, experts)))
            text = self.call("route", gate, f"k={k}", indices=(expert, capacity))
        return _Expr(text, free, logits.dtype, self.note(1.0), _ATOM, kind="route")


class _Builder(_Selections):
    """Draws one program, statement by statement, keeping what is in scope."""

    def begin_statement(self, lhs: tuple[str, ...]) -> None:
        self.lhs = lhs
        self.used = set(lhs)
        self.pending = []

    def emit(self, line: str) -> None:
        self.lines.extend(self.pending)
        self.pending = []
        if self.options.formatting and self.chance(8):
            line += "  # " + self.pick(["note", "summed over the rest", "layout is a constraint"])
        self.lines.append(line)
        if self.options.formatting and self.chance(10):
            self.lines.append("")

    def result_indices(self) -> tuple[str, ...]:
        rank = self.draw(st.integers(0 if self.chance(8) else 1, self.options.max_rank))
        return tuple(self.draw(st.lists(st.sampled_from(self.pool), min_size=min(rank, len(self.pool)),
                                        max_size=min(rank, len(self.pool)), unique=True)))

    def statement(self) -> None:
        lhs = self.result_indices()
        name = self.fresh_name("h")
        self.begin_statement(lhs)
        root = self.node(lhs, self.options.max_depth)
        self.finish_statement(name, lhs, root)

    def finish_statement(self, name: str, lhs: tuple[str, ...], root: _Expr, dtype: str | None = None,
                         bound: float | None = None) -> None:
        computed = root.dtype if root.dtype not in ("weak", "bool") else self.dtype
        cast = None
        if dtype is not None and dtype != computed:
            cast = dtype
        elif dtype is None and len(self.options.dtypes) > 1 and self.chance(10):
            cast = self.pick(self.options.dtypes)
        result_dtype = cast or computed
        layout = self.draw_layout(lhs)
        cast_text = f" : {cast}" if cast else ""
        self.emit(f"{self.indent}{name}{self.index_list(lhs, layout)}{cast_text} = {root.text}")
        contraction = None
        if root.product is not None and root.kind in ("contraction", "ref"):
            contraction = Contraction(name, lhs, root.product, root.scale)
        self.statements.append(StatementInfo(name, lhs, result_dtype, root.kind, self.in_block,
                                             contraction))
        info = TensorInfo(name, lhs, result_dtype, "def", layout)
        self.visible.pop(name, None)
        self.visible[name] = _Tensor(info, root.bound if bound is None else bound)

    def repeat_block(self, budget: int) -> int:
        """`repeat L { params; statements; x = update }`, carrying one outer tensor.

        The update is wrapped in a bounded function (or mixed half-and-half with the
        carried value), so the carried value's bound holds on every trip.
        Returns the number of statements written.
        """
        carried_name = self.pick(list(self.visible)[::-1])
        carried = self.visible[carried_name]
        free = carried.info.indices
        wrappers = ["tanh", "residual", "sigmoid"] + (["rmsnorm", "layernorm", "softmax"] if free else [])
        wrapper = self.pick(wrappers)
        index = self.pick(free) if free else None
        wrap_bound = {"tanh": 1.0, "sigmoid": 1.0, "residual": 1.0, "softmax": 1.0}.get(
            wrapper, math.sqrt(self.sizes[index]) if index else 1.0)
        carry_bound = max(carried.bound, wrap_bound)
        outer_visible = dict(self.visible)
        self.pending = []
        self.emit(f"repeat {self.dim(REPEAT_DIM)} {{")
        self.in_block, self.indent = True, "  "
        self.visible[carried_name] = _Tensor(carried.info, carry_bound)
        # The block's own param (stacked by L), read by the update.
        own = tuple(i for i in free if not self.chance(3))
        extra = [d for d in self.pool if d not in free and self.sizes[d] <= 12]
        if extra and self.chance(2):
            own = own + (self.pick(extra),)
        param = self.declare(own, kind="param")
        self.lines.extend(self.pending)
        self.pending = []
        written = 0
        for _ in range(self.draw(st.integers(0, max(0, min(2, budget - 1))))):
            self.statement()
            written += 1
        # The update: x = wrap(x op param * rest), summing the param's other indices.
        self.begin_statement(free)
        summed = tuple(i for i in param.info.indices if i not in free)
        self.used.update(summed)
        indices = self.bind(param, param.info.indices)
        term_text = param.info.name + self.index_list(indices)
        term = _Expr(term_text, free, param.info.dtype, INPUT_BOUND, _ATOM)
        rest_free = tuple(i for i in free if i not in param.info.indices) + summed
        if rest_free:
            rest = self.node(rest_free, max(0, self.options.max_depth - 1))
            if INPUT_BOUND * rest.bound * self.size_product(summed) > MAGNITUDE_LIMIT:
                rest = self.tame(rest)
            product_text = f"{term_text} * {_paren(rest, _PRODUCT + 1)}"
            term = _Expr(self.implicit_sum(summed, product_text), free,
                         _promote(param.info.dtype, rest.dtype),
                         self.note(INPUT_BOUND * rest.bound * self.size_product(summed)), _PRODUCT)
        carried_ref = carried_name + self.index_list(free)
        combine = self.pick(["+", "*", "none"])
        combined = {"+": carry_bound + term.bound, "*": carry_bound * term.bound,
                    "none": term.bound}[combine]
        if combined > MAGNITUDE_LIMIT:
            term = self.tame(term)
        if combine == "none":
            inner, inner_dtype = term.text, term.dtype
        else:
            inner = f"{carried_ref} {combine} {_paren(term, _PRODUCT + 1)}"
            inner_dtype = _promote(carried.info.dtype, term.dtype)
        self.note(min(combined, MAGNITUDE_LIMIT))
        if wrapper == "residual":
            text = f"0.5 * {carried_ref} + 0.5 * {self.call('tanh', inner)}"
            inner_dtype = _promote(carried.info.dtype, inner_dtype)
        elif wrapper in ("tanh", "sigmoid"):
            text = self.call(wrapper, inner)
        else:
            text = self.call(wrapper, inner, indices=(index,))
        root = _Expr(text, free, inner_dtype, carry_bound, _ATOM, kind="repeat_update")
        self.finish_statement(carried_name, free, root, dtype=carried.info.dtype, bound=carry_bound)
        written += 1
        self.in_block, self.indent = False, ""
        self.lines.append("}")
        self.visible = outer_visible
        self.visible[carried_name] = _Tensor(carried.info, carry_bound)
        return written

    def outputs(self) -> list[OutputInfo]:
        names = list(self.visible)
        defined = [n for n in names if self.visible[n].info.kind == "def"]
        first = defined[-1] if defined else names[-1]
        others = [n for n in names if n != first]
        chosen = [first] + self.draw(st.lists(st.sampled_from(others), unique=True, max_size=2)) \
            if others else [first]
        result = []
        for name in chosen:
            info = self.visible[name].info
            layout = None
            if self.chance(2):
                written = self.bind(self.visible[name], info.indices)
                # Indices written on an output are a layout even without `@`: whole.
                layout = self.draw_layout(info.indices) or tuple(() for _ in info.indices)
                self.lines.append(f"output {name}{self.index_list(written, layout)}")
            else:
                self.lines.append(f"output {name}")
            result.append(OutputInfo(name, info.indices, info.dtype, layout))
        return result

    def loss(self, outputs: list[OutputInfo], optimizers: bool) -> tuple[str, str | None]:
        """A float32 scalar loss over the float outputs, `loss` and perhaps an optimizer."""
        name = self.fresh_name("loss")
        terms = []
        for output in outputs:
            if output.dtype not in FLOAT_DTYPES:
                continue
            ref = output.name + self.index_list(output.indices)
            term = self.call("square", self.call("tanh", ref))
            terms.append(self.call("mean", term, indices=output.indices) if output.indices else term)
        self.lines.append(f"{name}[] : f32 = {' + '.join(terms) or '0'}")
        self.lines.append(f"loss {name}")
        optimizer = None
        if optimizers:
            kind = self.pick(["none", "sgd", "adamw"])
            if kind == "sgd":
                optimizer = "optimizer sgd lr=0.1" + (" wd=0.01" if self.chance(2) else "")
            elif kind == "adamw":
                optimizer = "optimizer adamw lr=0.01 b1=0.9 b2=0.99 wd=0.1"
            if optimizer and self.mesh.axes and self.chance(3):
                optimizer += f" shard={self.pick([axis for axis, _ in self.mesh.axes])}"
        if optimizer:
            self.lines.append(optimizer)
        return name, optimizer


def _draw_dims(draw, mesh: MeshSpec, max_dims: int, max_dim_size: int, aliases: bool,
               repeat: bool, uneven: bool = False) -> list[tuple[str, int | str]]:
    """Dims whose sizes the mesh axes often divide: a product of some axes' sizes times
    a small factor, at most `max_dim_size`; with `uneven`, often one more or one less,
    so that they do not."""
    names = draw(st.lists(st.sampled_from(DIM_NAMES), min_size=3, max_size=max_dims, unique=True))
    declared: list[tuple[str, int | str]] = []
    for name in names:
        product = 1
        for _, axis_size in mesh.axes:
            if draw(st.booleans()) and product * axis_size <= max_dim_size:
                product *= axis_size
        factor = draw(st.integers(1, max(1, max_dim_size // product)))
        size = product * factor
        if uneven:
            size = max(1, size + draw(st.sampled_from([-1, 0, 1])))
        declared.append((name, size))
    if aliases:
        for alias in draw(st.lists(st.sampled_from(ALIAS_NAMES), max_size=2, unique=True)):
            declared.append((alias, draw(st.sampled_from([n for n, _ in declared]))))
    if repeat:
        declared.append((REPEAT_DIM, draw(st.integers(1, 3))))
    return declared


def programs(*, mesh: MeshSpec | SearchStrategy[MeshSpec] | None = None, min_statements: int = 1,
             max_statements: int = 8, kinds: Iterable[str] | None = None, repeat: bool = True,
             layouts: bool = True, dtypes: Iterable[str] = DEFAULT_DTYPES, max_dims: int = 7,
             max_dim_size: int = 12, max_rank: int = 3, max_depth: int = 2,
             aliases: bool = True, formatting: bool = True,
             name_collisions: bool = True, training: bool = False,
             optimizers: bool = True, uneven: bool = False) -> SearchStrategy[GeneratedProgram]:
    """Random well-formed programs, as `GeneratedProgram`s.

    Parameters:
      mesh: a MeshSpec, a strategy of them, or None for `meshes()` (1-3 axes of size 1-4).
      min_statements, max_statements: how many statements (those of the repeat block
        included).
      kinds: which of STATEMENT_KINDS expressions draw from (default: all). With only
        "contraction", every statement is a product of tensor references with an
        optional constant scale (its `Contraction` is recorded), there is no repeat
        block, and magnitudes are kept down by reading fresh inputs, not by `tanh`.
      repeat: whether a `repeat L { ... }` block (one stacked param, one carried value)
        may appear.
      layouts: whether inputs, params, left sides and outputs get random layouts
        (single axes and `B@(dp,fsdp)`; never one axis twice in a tensor).
      dtypes: float dtypes to draw from (of FLOAT_DTYPES; by default DEFAULT_DTYPES):
        the program's default (`dtype ...`) and, now and then, a tensor's own
        (`input x[B] : f16`) or a statement's cast.
      max_dims: at most this many dims besides aliases and the repeat count L.
      max_dim_size: the largest dim size; sizes are products of mesh axis sizes times
        a small factor, so layouts often fit.
      max_rank: the largest rank of a statement's result.
      max_depth: how deeply expressions nest.
      aliases: whether dims like `T=S` appear (and tensors get read with them).
      formatting: whether to vary comments, blank lines and calls wrapped over lines.
      name_collisions: whether tensor, dim and axis names sometimes coincide (they are
        separate namespaces).
      training: draw training steps: at least one param, and after the outputs a float32
        scalar loss, the mean of `square(tanh(o))` over each float output `o` (bounded,
        so its gradients stay finite in every dtype), declared with `loss` (its name is
        `GeneratedProgram.loss`). einpar then derives the gradient of every param and,
        with an optimizer, the update (docs/training.md).
      optimizers: with `training`, whether an `optimizer` line may follow the loss (none,
        `sgd`, or `adamw`, now and then with `shard=` a mesh axis: ZeRO); the line drawn is
        `GeneratedProgram.optimizer`.
      uneven: draw dim sizes the mesh axes often do not divide, and layouts that split
        them anyway: the dimension is padded (docs/language.md, "Uneven dimensions").
    """
    kind_set = frozenset(STATEMENT_KINDS if kinds is None else kinds)
    unknown = kind_set - set(STATEMENT_KINDS)
    if unknown or not kind_set:
        raise ValueError(f"kinds must be a nonempty subset of {STATEMENT_KINDS}, got {sorted(unknown)}")
    dtypes = tuple(dtypes)
    if not dtypes or set(dtypes) - set(FLOAT_DTYPES):
        raise ValueError(f"dtypes must be a nonempty subset of {FLOAT_DTYPES}")
    if not 1 <= min_statements <= max_statements:
        raise ValueError("need 1 <= min_statements <= max_statements")
    if mesh is None:
        axis_names = AXIS_NAMES + (COLLIDING_AXIS_NAMES if name_collisions else ())
        mesh_strategy = meshes(names=axis_names)
    elif isinstance(mesh, MeshSpec):
        mesh_strategy = st.just(mesh)
    else:
        mesh_strategy = mesh
    options = _Options(kind_set, max_rank, max_depth, layouts, dtypes, formatting, name_collisions,
                       uneven)
    repeat = repeat and not options.pure

    @st.composite
    def draw_program(draw) -> GeneratedProgram:
        drawn_mesh = draw(mesh_strategy)
        statements = draw(st.integers(min_statements, max_statements))
        block_at = draw(st.integers(0, statements - 1)) if repeat and draw(st.booleans()) else None
        declared = _draw_dims(draw, drawn_mesh, max_dims, max_dim_size, aliases, block_at is not None,
                              uneven)
        sizes = GeneratedProgram("", drawn_mesh, tuple(declared), "f32", (), (), ()).sizes()
        roots = {}
        for name, value in declared:
            root = name
            while isinstance(dict(declared)[root], str):
                root = dict(declared)[root]
            roots[name] = root
        dtype = draw(st.sampled_from(dtypes))
        builder = _Builder(draw, options, drawn_mesh, sizes, roots, dtype)
        builder.taken_names.update(drawn_mesh.names if not name_collisions else ())
        if formatting:
            builder.sep = draw(st.sampled_from([", ", ","]))
            builder.wrap_calls = draw(st.booleans())
        # Header: comment, mesh, dims (over one or two lines, in any order), dtype.
        header = []
        if formatting and draw(st.booleans()):
            header.append("# a generated program")
        if drawn_mesh.axes:
            header.append(drawn_mesh.declaration())
        order = draw(st.permutations(declared))
        cut = draw(st.integers(1, len(order)))
        for part in (order[:cut], order[cut:]):
            if part:
                header.append("dim " + " ".join(
                    f"{builder.dim(name)}={value if isinstance(value, int) else builder.dim(value)}"
                    for name, value in part))
        if dtype != "f32" or draw(st.booleans()):
            header.append(f"dtype {dtype}")
        builder.lines.extend(header)
        builder.lines.append("")
        for _ in range(draw(st.integers(1, 3))):
            rank = draw(st.integers(1, min(max_rank, len(builder.pool))))
            indices = tuple(draw(st.lists(st.sampled_from(builder.pool), min_size=rank,
                                          max_size=rank, unique=True)))
            builder.pending = []
            kind = "param" if training and not builder.inputs else draw(st.sampled_from(["input", "param"]))
            builder.declare(indices, kind=kind)
            builder.lines.extend(builder.pending)
        builder.pending = []
        written = 0
        while written < statements:
            if block_at is not None and written >= block_at:
                written += builder.repeat_block(statements - written)
                block_at = None
            else:
                builder.statement()
                written += 1
        builder.lines.append("")
        outputs = builder.outputs()
        loss = optimizer = None
        if training:
            loss, optimizer = builder.loss(outputs, optimizers)
        if optimizer:  # the step outputs each updated param under its name: no `output w` too
            params = {info.name for info in builder.inputs if info.kind == "param"}
            builder.lines = [line for line in builder.lines if not line.startswith("output ")
                             or line.split()[1].split("[")[0] not in params]
            outputs = [output for output in outputs if output.name not in params]
        template = "\n".join(builder.lines) + "\n"
        return GeneratedProgram(
            template=template, mesh=drawn_mesh, dim_declarations=tuple(declared), dtype=dtype,
            inputs=tuple(builder.inputs), outputs=tuple(outputs),
            statements=tuple(builder.statements),
            repeat_dim=REPEAT_DIM if any(s.in_repeat for s in builder.statements) else None,
            positional_renames=builder.positional_renames(), max_magnitude=builder.max_bound,
            loss=loss, optimizer=optimizer)

    return draw_program()


def contraction_programs(**kwargs) -> SearchStrategy[GeneratedProgram]:
    """Programs whose every statement is a contraction (see `programs(kinds=...)`), in
    f32 and f64 unless `dtypes` says otherwise; each statement's `Contraction` says
    which einsum it computes."""
    kwargs.setdefault("dtypes", ("f32", "f64"))
    return programs(kinds=("contraction",), **kwargs)
