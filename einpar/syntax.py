"""Parse `.ein` text into a syntax tree (the first stage of the pipeline).

The grammar lives in grammar/einpar.lark (installed as einpar.grammar). This
module owns the syntax tree types, the lark parser built once per process,
and the translation of lark's exceptions into E100 diagnostics. It knows
nothing about names or sizes: that is the checker's job.
"""

from __future__ import annotations

import gc
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Union

import lark
from lark import Lark, Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput

from .errors import Diagnostic, EinparError, Span, normalize_newlines, source_lines

# ---------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Name:
    text: str
    span: Span

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class IndexSpec:
    """One dimension of a tensor as written: `D` or `D@tp` or `B@(dp,fsdp)`."""

    name: Name
    axes: tuple[Name, ...]
    span: Span


@dataclass(frozen=True)
class PinEntry:
    """`sum: tp` or `max: (tp,sp)` inside a pin: a reduction and the axes it is pending over."""

    kind: Name
    axes: tuple[Name, ...]
    span: Span


@dataclass(frozen=True)
class Pin:
    """`{sum: tp}` or `{}` after a statement's left-hand indices: the result's layout is
    exactly as written, partial over the listed axes and over no others."""

    entries: tuple[PinEntry, ...]
    span: Span


@dataclass(frozen=True)
class TensorSpec:
    """`x[B@dp, S, D]`: a tensor name with one spec per dimension, and the braces
    (`{sum: tp}`) written after them, if any."""

    name: Name
    indices: tuple[IndexSpec, ...]
    span: Span
    indices_span: Span
    pin: Pin | None = None


@dataclass(frozen=True)
class MeshAxis:
    name: Name
    size: int
    span: Span


@dataclass(frozen=True)
class MeshDecl:
    axes: tuple[MeshAxis, ...]
    span: Span


@dataclass(frozen=True)
class DimBinding:
    """`B=8` (size set) or `T=S` (alias of another dimension's size)."""

    name: Name
    size: int | None
    alias: Name | None
    span: Span


@dataclass(frozen=True)
class DimDecl:
    bindings: tuple[DimBinding, ...]
    span: Span


@dataclass(frozen=True)
class DtypeDecl:
    dtype: Name
    span: Span


@dataclass(frozen=True)
class TensorDecl:
    kind: str  # "input" or "param"
    spec: TensorSpec
    dtype: Name | None
    span: Span


@dataclass(frozen=True)
class OutputDecl:
    name: Name
    indices: tuple[IndexSpec, ...] | None
    span: Span
    pin: Pin | None = None  # parsed to be refused: an output is delivered whole
    suffix: Name | None = None  # `output w.grad`: the derived value's kind ("grad")


@dataclass(frozen=True)
class Number:
    value: Union[int, float]
    span: Span


@dataclass(frozen=True)
class SizeRef:
    name: Name
    span: Span


@dataclass(frozen=True)
class TensorRef:
    spec: TensorSpec
    span: Span


@dataclass(frozen=True)
class KeywordArg:
    name: Name
    value: "Expr"
    span: Span


@dataclass(frozen=True)
class Call:
    """`exp(e)`, `where(c, a, b)`; `indices` is set for `sum[T](e)`, `route[E,C](g, k=2)`."""

    func: Name
    indices: tuple[IndexSpec, ...] | None
    args: tuple["Expr", ...]
    kwargs: tuple[KeywordArg, ...]
    span: Span


@dataclass(frozen=True)
class Binary:
    op: str  # + - * / > >= < <= == !=
    left: "Expr"
    right: "Expr"
    span: Span
    op_span: Span


@dataclass(frozen=True)
class Negate:
    operand: "Expr"
    span: Span


Expr = Union[Number, SizeRef, TensorRef, Call, Binary, Negate]


@dataclass(frozen=True)
class Statement:
    lhs: TensorSpec
    dtype: Name | None
    rhs: Expr
    span: Span
    modifier: Name | None = None  # `remat p[...] = ...`


@dataclass(frozen=True)
class Repeat:
    dim: Name
    body: tuple["Item", ...]
    span: Span
    modifier: Name | None = None  # `repeat L remat { ... }`
    axis: Name | None = None  # `repeat L@pp { ... }`: the mesh axis of the pipeline stages


@dataclass(frozen=True)
class Setting:
    """`lr=1e-3`, `shard=(dp,fsdp)`, `B=8`: a value is a number, or a tuple of names."""

    name: Name
    value: Union[int, float, tuple[Name, ...]]
    span: Span


@dataclass(frozen=True)
class Directive:
    """`loss l`, `optimizer adamw lr=1e-3 ...`, `microbatches B=8`: a word and its arguments
    (names and settings, in order). The checker knows the words."""

    word: Name
    args: tuple[Union[Name, Setting], ...]
    span: Span


Item = Union[MeshDecl, DimDecl, DtypeDecl, TensorDecl, OutputDecl, Statement, Repeat, Directive]


@dataclass(frozen=True)
class Module:
    file: str
    items: tuple[Item, ...]


# ---------------------------------------------------------------- parser

# Words of the grammar; they cannot name a tensor.
KEYWORDS = ("mesh", "dim", "dtype", "input", "param", "output", "repeat")

# Sizes beyond 18 digits cannot be real (2**63 has 19); longer whole numbers in
# expressions are read as floats.
MAX_SIZE_DIGITS = 18


class _BracketNewlines:
    """Post-lexer: a newline inside (...) or [...] does not end a statement."""

    always_accept = ("_NL",)

    def __init__(self):
        self.depth = 0  # bracket depth where lexing stopped, for syntax-error hints

    def process(self, stream):
        self.depth = 0
        for token in stream:
            if token.type in ("LPAR", "LSQB"):
                self.depth += 1
            elif token.type in ("RPAR", "RSQB"):
                self.depth = max(0, self.depth - 1)
            elif token.type == "_NL" and self.depth > 0:
                continue
            yield token


@lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("einpar.grammar").joinpath("einpar.lark").read_text()
    return Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True,
                maybe_placeholders=True, postlex=_BracketNewlines())


def _span(file: str, meta) -> Span:
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _token_span(file: str, token: Token) -> Span:
    return Span(file, token.line, token.column, token.end_line, token.end_column)


class _ToAst:
    """lark tree -> the frozen syntax tree above, with spans.

    A plain recursive walk, not a lark Transformer: lark's per-call method
    wrappers cost more than the parse itself on large files.
    """

    def __init__(self, file: str):
        self.file = file
        self.rules = {}

    def transform(self, node):
        if not isinstance(node, lark.Tree):
            return node  # a token, or None for an absent optional part
        children = [self.transform(child) for child in node.children]
        rule = self.rules.get(node.data)
        if rule is None:
            rule = self.rules[node.data] = getattr(self, node.data)
        return rule(node.meta, children)

    def _name(self, token: Token) -> Name:
        return Name(str(token), _token_span(self.file, token))

    def _size(self, token: Token) -> int:
        if len(token) > MAX_SIZE_DIGITS:
            raise EinparError(Diagnostic("E223", f"size {str(token)[:12]}... has {len(token)} digits",
                                         _token_span(self.file, token),
                                         hint=f"sizes have at most {MAX_SIZE_DIGITS} digits"))
        return int(token)

    def start(self, meta, items):
        return Module(self.file, tuple(items))

    def mesh_decl(self, meta, axes):
        return MeshDecl(tuple(axes), _span(self.file, meta))

    def mesh_axis(self, meta, children):
        name, size = children
        return MeshAxis(self._name(name), self._size(size), _span(self.file, meta))

    def dim_decl(self, meta, bindings):
        return DimDecl(tuple(bindings), _span(self.file, meta))

    def dim_binding(self, meta, children):
        name, value = children
        if value.type == "INT":
            return DimBinding(self._name(name), self._size(value), None, _span(self.file, meta))
        return DimBinding(self._name(name), None, self._name(value), _span(self.file, meta))

    def dtype_decl(self, meta, children):
        return DtypeDecl(self._name(children[0]), _span(self.file, meta))

    def dtype_name(self, meta, children):
        return self._name(children[0])

    def tensor_decl(self, meta, children):
        kind, spec, pin, dtype = children
        return TensorDecl(kind, self._pinned(spec, pin), dtype, _span(self.file, meta))

    def input_kind(self, meta, _):
        return "input"

    def param_kind(self, meta, _):
        return "param"

    def output_decl(self, meta, children):
        name, suffix, specs, pin = children
        indices = specs[0] if specs is not None else None
        return OutputDecl(self._name(name), indices, _span(self.file, meta), pin,
                          self._name(suffix) if suffix is not None else None)

    def statement(self, meta, children):
        modifier, lhs, pin, dtype, rhs = children
        return Statement(self._pinned(lhs, pin), dtype, rhs, _span(self.file, meta),
                         self._name(modifier) if modifier is not None else None)

    def directive(self, meta, children):
        word, *args = children
        return Directive(self._name(word), tuple(
            arg if isinstance(arg, Setting) else self._name(arg) for arg in args),
            _span(self.file, meta))

    def setting(self, meta, children):
        name, value = children
        return Setting(self._name(name), value, _span(self.file, meta))

    def number_setting(self, meta, children):
        return self.number(meta, children).value

    def negative_setting(self, meta, children):
        return -self.number(meta, children).value

    def name_setting(self, meta, children):
        return (self._name(children[0]),)

    def names_setting(self, meta, children):
        return tuple(self._name(name) for name in children)

    @staticmethod
    def _pinned(spec: TensorSpec, pin: Pin | None) -> TensorSpec:
        """The spec with its braces, its span reaching to the closing one."""
        if pin is None:
            return spec
        span = Span(spec.span.file, spec.span.line, spec.span.col, pin.span.end_line, pin.span.end_col)
        return TensorSpec(spec.name, spec.indices, span, spec.indices_span, pin)

    def pin(self, meta, entries):
        return Pin(tuple(entry for entry in entries if entry is not None), _span(self.file, meta))

    def pin_entry(self, meta, children):
        kind, axes = children
        return PinEntry(self._name(kind), axes, _span(self.file, meta))

    def pin_axes(self, meta, names):
        return tuple(self._name(name) for name in names)

    def repeat(self, meta, children):
        dim, axis, modifier, *body = children
        return Repeat(self._name(dim), tuple(body), _span(self.file, meta),
                      self._name(modifier) if modifier is not None else None,
                      self._name(axis) if axis is not None else None)

    def tensor_spec(self, meta, children):
        name, (indices, indices_span) = children
        return TensorSpec(self._name(name), indices, _span(self.file, meta), indices_span)

    def index_specs(self, meta, children):
        specs = tuple(child for child in children if child is not None)
        return specs, _span(self.file, meta)

    def index_spec(self, meta, children):
        name, axes = children
        return IndexSpec(self._name(name), axes or (), _span(self.file, meta))

    def axes(self, meta, names):
        return tuple(self._name(name) for name in names)

    # expressions

    def number(self, meta, children):
        text = str(children[0])
        # Whole numbers stay exact unless they are too long to be anything but a float.
        is_int = all(c.isdigit() for c in text) and len(text) <= MAX_SIZE_DIGITS
        value = int(text) if is_int else float(text)
        if math.isinf(value):
            raise EinparError(Diagnostic("E223", f"number {text[:12]}{'...' * (len(text) > 12)} is "
                                                 "too large for a float", _span(self.file, meta)))
        return Number(value, _span(self.file, meta))

    def size_ref(self, meta, children):
        return SizeRef(self._name(children[0]), _span(self.file, meta))

    def tensor_ref(self, meta, children):
        return TensorRef(children[0], _span(self.file, meta))

    def pinned_ref(self, meta, children):
        # Braces in an expression parse, so that the checker can say where they belong (E216).
        spec, pin = children
        return TensorRef(self._pinned(spec, pin), _span(self.file, meta))

    def call(self, meta, children):
        func, (args, kwargs) = children
        return Call(self._name(func), None, args, kwargs, _span(self.file, meta))

    def indexed_call(self, meta, children):
        func, (indices, _), (args, kwargs) = children
        return Call(self._name(func), indices, args, kwargs, _span(self.file, meta))

    def args(self, meta, children):
        args = tuple(c for c in children if not isinstance(c, KeywordArg))
        kwargs = tuple(c for c in children if isinstance(c, KeywordArg))
        return args, kwargs

    def keyword_arg(self, meta, children):
        name, value = children
        return KeywordArg(self._name(name), value, _span(self.file, meta))

    def binary(self, meta, children):
        left, op, right = children
        return Binary(str(op), left, right, _span(self.file, meta), _token_span(self.file, op))

    compare = binary

    def negate(self, meta, children):
        return Negate(children[0], _span(self.file, meta))


# Human names for the grammar's terminals, for "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name", "INT": "an integer", "NUMBER": "a number", "_NL": "end of line",
    "COMPARE": "a comparison", "ADD_OP": "'+' or '-'", "MUL_OP": "'*' or '/'",
"$END": "end of file",
}


def _describe_terminal(parser: Lark, name: str) -> str:
    if name in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[name]
    try:
        pattern = parser.get_terminal(name).pattern
    except KeyError:
        return name
    if isinstance(pattern, lark.lexer.PatternStr):
        return f"'{pattern.value}'"
    return name.lower()


def _describe_token(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    if token.type == "_NL":
        return "end of line"
    return f"'{token}'"


def _expected_terminals(error: UnexpectedInput, parser: Lark) -> set[str]:
    """What the parser would have accepted where it stopped.

    lark's `expected` is a merged state's table; `accepts` tries each token,
    so it names only what could really follow. Inside brackets a newline is
    not a token at all, so it is never what was expected there.
    """
    expected: set[str] = set(getattr(error, "expected", None) or ())
    interactive = getattr(error, "interactive_parser", None)
    if interactive is not None:
        try:
            expected = set(interactive.accepts())
        except Exception:  # accepts() replays the parser; keep lark's answer if it cannot
            pass
    if parser.options.postlex.depth > 0:
        expected.discard("_NL")
    return {name for name in expected if not name.startswith("__")}


def _syntax_diagnostic(error: UnexpectedInput, file: str, text: str, parser: Lark) -> Diagnostic:
    line, col = max(1, error.line if error.line != -1 else 1), max(1, error.column if error.column != -1 else 1)
    if isinstance(error, UnexpectedCharacters):
        char = text[error.pos_in_stream] if error.pos_in_stream < len(text) else ""
        span = Span(file, line, col, line, col + 1)
        return Diagnostic("E100", f"unexpected character {char!r}", span,
                          hint="names are letters, digits and '_'; see docs/language.md for the operators")
    token = getattr(error, "token", None)
    terminals = _expected_terminals(error, parser)
    expected = sorted({_describe_terminal(parser, name) for name in terminals})
    if isinstance(error, UnexpectedEOF) or token is None or token.type == "$END":
        # Point just past the last line with text on it, where something is missing.
        lines = source_lines(text) or [""]
        last = len(lines)
        while last > 1 and not lines[last - 1].strip():
            last -= 1
        end = len(lines[last - 1].rstrip()) + 1
        span = Span(file, last, end, last, end + 1)
        message = "unexpected end of file"
    else:
        line, col = token.line, token.column
        if token.type == "_NL":
            # Point at the end of the line the statement was on, not the next one.
            end_col = col + 1
        else:
            end_col = token.end_column if token.end_line == line else col + 1
        span = Span(file, line, col, line, end_col)
        message = f"unexpected {_describe_token(token)}"
    hint = None
    if expected:
        listed = ", ".join(expected[:-1]) + (" or " if len(expected) > 1 else "") + expected[-1]
        hint = f"expected {listed}" + _pin_advice(token, terminals)
    return Diagnostic("E100", message, span, hint=hint)


def _pin_advice(token: Token | None, expected: set[str]) -> str:
    """What to write instead of a common slip in a statement's braces, after the hint."""
    if token is None:
        return ""
    if token.type == "COLON" and "SEMICOLON" in expected:  # {sum: tp, max: sp}
        return "; kinds in braces are apart by ';', as in {sum: tp; max: sp}"
    if token.type == "LBRACE" and expected == {"EQUAL"}:  # y[B] : bf16 {sum: tp} = ...
        return "; braces come right after the indices, as in y[B]{sum: tp} : bf16 = ..."
    return ""


@contextmanager
def gc_paused():
    """Pause the cyclic garbage collector while building large acyclic trees.

    Parsing and checking allocate many small objects and free none; the
    collector's repeated full passes over them made a 10,000-statement file
    take twice as long, growing faster than linearly.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def deep_recursion(limit: int = 20_000):
    """Room for the parser and checker to build and reject trees deeper than the
    nesting limits below (the E101 check runs on the finished tree)."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def parse(text: str, file: str = "<string>") -> Module:
    """Parse `.ein` source into a Module; raises EinparError with an E100 on bad syntax."""
    return _parse(text, file)


# The checker and the warnings (einpar/lint.py) both read a file's syntax tree, which is
# immutable; the last one is kept, so a large file is parsed once, not twice.
@lru_cache(maxsize=1)
def _parse(text: str, file: str) -> Module:
    # Windows (and old Mac) line ends and a byte-order mark change nothing about the program;
    # lines are counted as errors.source_lines counts them, so positions quote the right line.
    text = normalize_newlines(text.removeprefix("\ufeff"))
    parser = _parser()
    with gc_paused(), deep_recursion():
        try:
            tree = parser.parse(text + "\n")
        except UnexpectedInput as error:
            raise EinparError(_syntax_diagnostic(error, file, text, parser)) from None
        try:
            module = _ToAst(file).transform(tree)
        except RecursionError:
            raise EinparError(too_deep(file)) from None
    problems = nesting_problems(module)
    if problems:
        raise EinparError(problems)
    return module


def too_deep(file: str, span: Span | None = None) -> Diagnostic:
    return Diagnostic("E101", f"{file}: an expression is nested too deeply to follow", span,
                      hint="split it into several statements")


# How deeply a program may nest (E101). Every stage after parsing walks
# expressions and repeat blocks recursively, a few Python frames per level,
# and must fit in Python's default recursion limit (1000 frames); the JAX
# module nests one Python function per repeat block, and Python allows 100
# levels of indentation. A sum of 201 terms is 200 operators deep.
MAX_EXPRESSION_DEPTH = 200  # operators and calls inside one another
MAX_REPEAT_DEPTH = 32  # repeat blocks inside one another


def _expression_depth(rhs: Expr) -> tuple[int, Span | None]:
    """How many operators and calls `rhs` nests, and where its first one nested past
    MAX_EXPRESSION_DEPTH is (None if none is). Iterative: the tree may be very deep."""
    deepest, past = 0, None
    stack: list[tuple[Expr, int]] = [(rhs, 0)]
    while stack:
        node, above = stack.pop()
        if isinstance(node, (Number, SizeRef, TensorRef)):
            continue
        level = above + 1
        deepest = max(deepest, level)
        if level == MAX_EXPRESSION_DEPTH + 1 and past is None:
            past = node.op_span if isinstance(node, Binary) else (
                node.func.span if isinstance(node, Call) else node.span)
        if isinstance(node, Binary):
            stack += [(node.right, level), (node.left, level)]
        elif isinstance(node, Negate):
            stack.append((node.operand, level))
        else:
            stack += [(kwarg.value, level) for kwarg in reversed(node.kwargs)]
            stack += [(arg, level) for arg in reversed(node.args)]
    return deepest, past


def nesting_problems(module: Module) -> list[Diagnostic]:
    """E101 for each statement nested more than MAX_EXPRESSION_DEPTH deep and each
    repeat block nested more than MAX_REPEAT_DEPTH deep."""
    problems = []
    stack: list[tuple[Item, int]] = [(item, 0) for item in reversed(module.items)]
    while stack:
        item, blocks = stack.pop()
        if isinstance(item, Repeat):
            if blocks == MAX_REPEAT_DEPTH:
                problems.append(Diagnostic(
                    "E101", f"this repeat block is nested {MAX_REPEAT_DEPTH + 1} blocks deep; "
                            f"at most {MAX_REPEAT_DEPTH} may nest", item.dim.span,
                    hint="nest fewer repeat blocks"))
                continue
            stack += [(sub, blocks + 1) for sub in reversed(item.body)]
        elif isinstance(item, Statement):
            depth, past = _expression_depth(item.rhs)
            if past is not None:
                problems.append(Diagnostic(
                    "E101", f"this expression nests {depth} operators and calls inside one "
                            f"another; at most {MAX_EXPRESSION_DEPTH} may nest", past,
                    hint="split it into several statements"))
    return problems


# ---------------------------------------------------------------- printing


def format_ast(module: Module) -> str:
    """An indented rendering of the syntax tree, for `einpar compile --emit ast`."""
    lines: list[str] = []

    def spec(s: TensorSpec) -> str:
        return f"{s.name}[{', '.join(index(i) for i in s.indices)}]" + (f" {pin(s.pin)}" if s.pin else "")

    def pin(p: Pin) -> str:
        return "{" + "; ".join(f"{e.kind}: " + (str(e.axes[0]) if len(e.axes) == 1 else
                                                 f"({','.join(map(str, e.axes))})")
                               for e in p.entries) + "}"

    def index(i: IndexSpec) -> str:
        if not i.axes:
            return str(i.name)
        if len(i.axes) == 1:
            return f"{i.name}@{i.axes[0]}"
        return f"{i.name}@({','.join(map(str, i.axes))})"

    def expr(e: Expr, depth: int) -> None:
        pad = "  " * depth
        where = f"  @{e.span.line}:{e.span.col}"
        if isinstance(e, Number):
            lines.append(f"{pad}Number {e.value}{where}")
        elif isinstance(e, SizeRef):
            lines.append(f"{pad}SizeRef {e.name}{where}")
        elif isinstance(e, TensorRef):
            lines.append(f"{pad}TensorRef {spec(e.spec)}{where}")
        elif isinstance(e, Negate):
            lines.append(f"{pad}Negate{where}")
            expr(e.operand, depth + 1)
        elif isinstance(e, Binary):
            lines.append(f"{pad}Binary {e.op}{where}")
            expr(e.left, depth + 1)
            expr(e.right, depth + 1)
        elif isinstance(e, Call):
            bracket = f"[{', '.join(index(i) for i in e.indices)}]" if e.indices is not None else ""
            lines.append(f"{pad}Call {e.func}{bracket}{where}")
            for a in e.args:
                expr(a, depth + 1)
            for k in e.kwargs:
                lines.append(f"{pad}  {k.name}=")
                expr(k.value, depth + 2)

    def item(it: Item, depth: int) -> None:
        pad = "  " * depth
        where = f"  @{it.span.line}:{it.span.col}"
        if isinstance(it, MeshDecl):
            lines.append(f"{pad}Mesh {' '.join(f'{a.name}={a.size}' for a in it.axes)}{where}")
        elif isinstance(it, DimDecl):
            parts = [f"{b.name}={b.size if b.size is not None else b.alias}" for b in it.bindings]
            lines.append(f"{pad}Dim {' '.join(parts)}{where}")
        elif isinstance(it, DtypeDecl):
            lines.append(f"{pad}Dtype {it.dtype}{where}")
        elif isinstance(it, TensorDecl):
            dtype = f" : {it.dtype}" if it.dtype else ""
            lines.append(f"{pad}{it.kind.capitalize()} {spec(it.spec)}{dtype}{where}")
        elif isinstance(it, OutputDecl):
            shown = f"[{', '.join(index(i) for i in it.indices)}]" if it.indices is not None else ""
            shown += f" {pin(it.pin)}" if it.pin is not None else ""
            lines.append(f"{pad}Output {it.name}{shown}{where}")
        elif isinstance(it, Statement):
            dtype = f" : {it.dtype}" if it.dtype else ""
            lines.append(f"{pad}Statement {spec(it.lhs)}{dtype}{where}")
            expr(it.rhs, depth + 1)
        elif isinstance(it, Repeat):
            lines.append(f"{pad}Repeat {it.dim}{where}")
            for sub in it.body:
                item(sub, depth + 1)

    lines.append(f"Module {module.file}")
    for it in module.items:
        item(it, 1)
    return "\n".join(lines)
