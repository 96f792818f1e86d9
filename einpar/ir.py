"""The Program IR: what the checker produces and every later stage consumes.

A Program is a mesh, dims, the tensors it takes (inputs and params), an
ordered list of ops in SSA form (each op defines one new value), and its
outputs. Ops are a handful of frozen dataclasses:

- `Einsum`: an n-ary contraction; indices absent from the result are summed.
- `Map`: an elementwise expression over operands broadcast by index name.
- `Reduce`: sum / max / min / mean over named indices.
- `Library`: softmax, logsumexp, rmsnorm, layernorm, cumsum over one index.
- `Route`: GShard top-k routing with capacity.
- `Repeat`: a block run L times, carrying values and slicing stacked params.

Values are named after the statement that defines them: the statement's own
result keeps the program's name (`h`), temporaries get `h.1`, `h.2`, and a
redefinition inside `repeat` gets `x#2`. Each op records the statement
(`stmt`) and span it came from, so later stages can speak in the program's
terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Iterator, Union

from .errors import Span
from .layout import DTYPE_BYTES, Layout, Mesh, format_dims

FLOAT_DTYPES = ("f64", "f32", "bf16", "f16", "f8e4m3", "f8e5m2")
# Narrow floats: computed in float32 and rounded on storing (fp8 as ml_dtypes rounds it).
HALF_DTYPES = ("f16", "bf16", "f8e4m3", "f8e5m2")
DTYPES = FLOAT_DTYPES + ("i32", "bool")


def work_dtype(dtype: str) -> str:
    """The dtype a value of `dtype` is computed in: half precision in f32, rounded on storing
    (every backend and the library expansion follow this)."""
    return "f32" if dtype in HALF_DTYPES else dtype


@dataclass(frozen=True)
class TensorType:
    dtype: str
    indices: tuple[str, ...]
    shape: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def num_elements(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total

    @property
    def nbytes(self) -> int:
        return self.num_elements * DTYPE_BYTES[self.dtype]

    def format(self, layout: Layout | None = None) -> str:
        labels = tuple(f"{index}={size}" for index, size in zip(self.indices, self.shape))
        return self.dtype + format_dims(labels, layout)

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class Value:
    """A named tensor: a program input or param, or the result of an op."""

    name: str
    type: TensorType
    # "input", "param", "state" (optimizer state and master copies: zeros, or the param
    # itself for a master copy, when not supplied) or "def"
    kind: str = "def"
    layout: Layout | None = None  # the layout the user wrote, a constraint
    span: Span | None = None
    # For a param declared inside `repeat`, the repeat dims stacked in front.
    stacked_by: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.name}: {self.type.format(self.layout)}"


@dataclass(frozen=True)
class Operand:
    """A value as an op reads it: `indices` name the value's dimensions in order."""

    value: str
    indices: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.value}[{','.join(self.indices)}]"


# ---- the elementwise expression language of Map


@dataclass(frozen=True)
class Arg:
    """The Map's operand number `index`, broadcast to the Map's indices."""

    index: int


@dataclass(frozen=True)
class Const:
    value: Union[int, float, bool]
    label: str | None = None  # the dim a size came from (`sqrt(K)`), for printing


@dataclass(frozen=True)
class Apply:
    """A primitive elementwise function (see ELEMENTWISE) applied to scalars."""

    fn: str
    args: tuple["Scalar", ...]


@dataclass(frozen=True)
class Cast:
    """Convert to `dtype` (inserted by the checker where promotion needs it)."""

    dtype: str
    arg: "Scalar"


@dataclass(frozen=True)
class Pos:
    """`pos(S)`: the 0-based position along index `S` of the Map's result, as i32 (a causal
    mask compares `pos(S) >= pos(T)`). A device holding a block of `S` adds its block's offset."""

    index: str


Scalar = Union[Arg, Const, Apply, Cast, Pos]

# Primitive elementwise functions and their arity.
BINARY_OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div",
              ">": "gt", ">=": "ge", "<": "lt", "<=": "le", "==": "eq", "!=": "ne"}
UNARY_FUNCTIONS = ("exp", "log", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "gelu", "silu",
                   "abs", "square", "sin", "cos", "erf")
ELEMENTWISE = {
    **{name: 2 for name in BINARY_OPS.values()},
    **{name: 1 for name in UNARY_FUNCTIONS},
    "neg": 1, "where": 3, "max2": 2, "min2": 2, "pow": 2,
}
COMPARISONS = ("gt", "ge", "lt", "le", "eq", "ne")
REDUCTIONS = ("sum", "max", "min", "mean")
LIBRARY_FUNCTIONS = ("softmax", "logsumexp", "rmsnorm", "layernorm", "cumsum")

# Numerical constants of the library functions (LANGUAGE.md, "Precise meanings").
NORM_EPSILON = 1e-6


# ---- ops


@dataclass(frozen=True)
class Einsum:
    result: Value
    operands: tuple[Operand, ...]
    stmt: str
    span: Span | None = None

    @property
    def summed(self) -> tuple[str, ...]:
        seen: list[str] = []
        for operand in self.operands:
            for index in operand.indices:
                if index not in self.result.type.indices and index not in seen:
                    seen.append(index)
        return tuple(seen)


@dataclass(frozen=True)
class Map:
    result: Value
    operands: tuple[Operand, ...]
    expr: Scalar
    stmt: str
    span: Span | None = None


@dataclass(frozen=True)
class Reduce:
    result: Value
    kind: str  # sum, max, min, mean
    operand: Operand
    over: tuple[str, ...]
    stmt: str
    span: Span | None = None
    # The result carries no gradient (JAX's lax.stop_gradient): the max a softmax or
    # logsumexp subtracts for stability, whose gradient is exactly zero (it cancels).
    stop_gradient: bool = False

    @property
    def operands(self) -> tuple[Operand, ...]:
        return (self.operand,)


@dataclass(frozen=True)
class Library:
    """softmax / logsumexp / rmsnorm / layernorm / cumsum over one index."""

    result: Value
    kind: str
    operand: Operand
    index: str
    stmt: str
    span: Span | None = None

    @property
    def operands(self) -> tuple[Operand, ...]:
        return (self.operand,)


@dataclass(frozen=True)
class Route:
    """GShard routing: gate probabilities [..., E] -> combine weights [..., E, C]."""

    result: Value
    operand: Operand
    expert: str  # E
    capacity: str  # C
    k: int
    stmt: str
    span: Span | None = None

    @property
    def token(self) -> str:
        """Tokens of a group are ordered along the last index of g other than E."""
        return [index for index in self.operand.indices if index != self.expert][-1]

    @property
    def operands(self) -> tuple[Operand, ...]:
        return (self.operand,)


@dataclass(frozen=True)
class Carried:
    """A value the repeat body reads and redefines.

    In the body, `value` names the value carried in (the one from before the
    loop on the first trip, `body_result` of the previous trip after). After
    the loop, `result` holds the last trip's `body_result`.
    """

    value: str
    body_result: str
    result: Value


@dataclass(frozen=True)
class Take:
    """`take[V](table[V,D], ids[B,S])`: the rows of `table` at the integer `ids` (an
    embedding lookup). The result's indices are the ids' and the table's other than `index`,
    in the order the statement names them. An id outside [0, V) is an error in `run`.

    An index of both the table and the ids is a batch index, as in jnp.take_along_axis:
    `take[V](logits[B,S,V], tgt[B,S])` is `[B,S]`, `logits[b,s,tgt[b,s]]`."""

    result: Value
    table: Operand
    ids: Operand
    index: str  # V, the table's index the ids select along
    stmt: str
    span: Span | None = None

    @property
    def operands(self) -> tuple[Operand, ...]:
        return (self.table, self.ids)

    @property
    def batch(self) -> tuple[str, ...]:
        """The batch indices: the ids' indices the table has too, in the ids' order."""
        return tuple(i for i in self.ids.indices if i in self.table.indices)


@dataclass(frozen=True)
class ScatterAdd:
    """The adjoint of Take (the gradient of an embedding table): `result[V,D]` is the sum of
    the rows of `update[B,S,D]` whose id is `V`. The result has the table's type.

    The ids' indices the result has too are batch indices (the adjoint of a batched take):
    they are kept, not summed, so `result[B,V] = scatter_add[V](update[B,S], ids[B,S])` adds
    `update[b,s]` into row `ids[b,s]` of batch `b`."""

    result: Value
    update: Operand
    ids: Operand
    index: str
    stmt: str
    span: Span | None = None

    @property
    def operands(self) -> tuple[Operand, ...]:
        return (self.update, self.ids)

    @property
    def batch(self) -> tuple[str, ...]:
        """The batch indices: the ids' indices the result has too, in the ids' order."""
        return tuple(i for i in self.ids.indices if i in self.result.type.indices)


@dataclass(frozen=True)
class Saved:
    """A body value kept from every trip: after the loop, `result` (the repeat dim in
    front of the body value's own) holds trip i's `body_value` at index i."""

    body_value: str
    result: Value


@dataclass(frozen=True)
class Repeat:
    dim: str
    count: int
    carried: tuple[Carried, ...]
    # Per-trip views of stacked values (the params declared inside the block, or values
    # made before it with the repeat dim in front): inside the body, the name of a
    # stacked value denotes this trip's slice.
    stacked: tuple[Value, ...]
    body: tuple["Op", ...]
    span: Span | None = None
    saved: tuple[Saved, ...] = ()
    reverse: bool = False  # trips run L-1 down to 0 (a backward pass), slices as their trip
    remat: bool = False  # `repeat L remat`: the backward pass recomputes the body
    # `repeat L@pp`: the mesh axis whose coordinates are pipeline stages, each running its
    # own L/pp trips (its params' stacks are split over it: [L@pp, ...]).
    stage_axis: str | None = None

    @property
    def operands(self) -> tuple[Operand, ...]:
        return ()


Op = Union[Einsum, Map, Reduce, Library, Route, Take, ScatterAdd, Repeat]


def trip_order(count: int, reverse: bool) -> range:
    """A loop's trip indices in the order they run: count-1 down to 0 when `reverse` (as
    lax.scan(reverse=True)), else 0 up."""
    return range(count - 1, -1, -1) if reverse else range(count)


@dataclass(frozen=True)
class Output:
    name: str  # the program's name for it
    value: str  # the SSA value it refers to
    layout: Layout | None = None
    span: Span | None = None


@dataclass(frozen=True)
class Optimizer:
    """`optimizer sgd|adamw ...` (LANGUAGE.md, Training): PyTorch's SGD and AdamW. The
    defaults here are the fields'; the checker fills in each kind's defaults as the language
    states them (check_training.py: adamw's weight decay is 0.01, as PyTorch's)."""

    kind: str  # "sgd" or "adamw"
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    wd: float = 0.0
    step: int = 1  # the step number t of Adam's bias correction
    shard: tuple[str, ...] = ()  # ZeRO: mesh axes the state and master copies split over
    span: Span | None = None


@dataclass(frozen=True)
class Training:
    """What makes a program a training step: its loss, and how the step is taken."""

    loss: str  # the scalar value whose gradient is taken
    optimizer: Optimizer | None = None
    microbatches: tuple[str, int] | None = None  # (batch index, number of micro-batches)
    remat: frozenset[str] = frozenset()  # statements recomputed in the backward pass
    span: Span | None = None
    # (name, chunks per stage) of the pipeline schedule (einpar/schedule.py), where the
    # step has a `repeat L@pp`: declared with `schedule`, else 1f1b with micro-batches
    # and gpipe (every stage in turn) with one batch.
    schedule: tuple[str, int] | None = None


@dataclass(frozen=True)
class Program:
    file: str
    mesh: Mesh
    dims: tuple[tuple[str, int], ...]
    dtype: str
    inputs: tuple[Value, ...]  # inputs and params, in declaration order
    ops: tuple[Op, ...]
    outputs: tuple[Output, ...]
    source: str = field(default="", repr=False, compare=False)
    # A training step as written (loss, optimizer...); None for a forward program and for
    # the derived step, whose ops already include the backward pass and the update.
    training: Training | None = None
    # The derived step's forward program (with its `training`), for oracles and printing.
    forward: "Program | None" = field(default=None, repr=False, compare=False)

    @cached_property
    def dim_sizes(self) -> dict[str, int]:
        return dict(self.dims)

    @cached_property
    def values(self) -> dict[str, Value]:
        """Every value of the program by name, those inside repeat bodies included."""
        table = {value.name: value for value in self.inputs}
        for op in walk_ops(self.ops):
            if isinstance(op, Repeat):
                table.update((c.result.name, c.result) for c in op.carried)
                table.update((saved.result.name, saved.result) for saved in op.saved)
            else:
                table[op.result.name] = op.result
        return table

    @property
    def params(self) -> tuple[Value, ...]:
        return tuple(value for value in self.inputs if value.kind == "param")


def einsum_subscripts(operands: list[tuple[str, ...]], out: tuple[str, ...],
                      readable: bool = True) -> str:
    """NumPy/JAX einsum subscripts for an Einsum. `readable`: each index by its own first
    letter where that letter is free (`'bsd,df->bsf'`), for code people read. Otherwise
    letters in order of first appearance, so that renaming indices cannot change the
    contraction order NumPy picks (the reference backend's results stay bit-identical)."""
    letters: dict[str, str] = {}
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

    def letter(index: str) -> str:
        taken = set(letters.values())
        own = (index[0].lower(), index[0].upper()) if readable else ()
        for choice in (*own, *alphabet):
            if choice.isascii() and choice.isalpha() and choice not in taken:
                return choice
        raise ValueError("an einsum of more than 52 indices")

    def word(indices) -> str:
        for index in indices:
            if index not in letters:
                letters[index] = letter(index)
        return "".join(letters[i] for i in indices)

    return ",".join(word(indices) for indices in operands) + "->" + word(out)


BACKWARD_STMT = ".grad"  # the grad pass names a backward op's statement `h.grad`


def is_backward(op: Op) -> bool:
    """An op of a training step's backward pass (not a repeat: its body says)."""
    return not isinstance(op, Repeat) and op.stmt.endswith(BACKWARD_STMT)


def after_backward_start(ops: tuple[Op, ...]) -> set[int]:
    """The ids of the ops (repeat bodies included) from a program's first backward op on:
    the copies of params that ops before it moved out of their own layout are freed there
    (FSDP's reshard after forward), so these ops read params moved afresh (einpar/lower.py
    frees them, the partitioner prices their moves apart)."""
    for index, op in enumerate(ops):
        if is_backward(op):
            return {id(later) for later in walk_ops(ops[index:])}
    return set()


def with_operands(op: Op, operands: tuple[Operand, ...]) -> Op:
    """`op` (not a Repeat) reading `operands` instead of its own, in the order of `op.operands`."""
    if isinstance(op, Take):
        return replace(op, table=operands[0], ids=operands[1])
    if isinstance(op, ScatterAdd):
        return replace(op, update=operands[0], ids=operands[1])
    if isinstance(op, (Reduce, Library, Route)):
        return replace(op, operand=operands[0])
    return replace(op, operands=operands)


def walk_ops(ops: tuple[Op, ...]) -> Iterator[Op]:
    """Every op, descending into repeat bodies (the Repeat itself comes first)."""
    for op in ops:
        yield op
        if isinstance(op, Repeat):
            yield from walk_ops(op.body)


# ---- printing (`einpar compile --emit ir`)

INFIX = {name: symbol for symbol, name in BINARY_OPS.items()}  # "add" -> "+"


def scalar_nodes(expr: Scalar) -> Iterator[Scalar]:
    """Every node of a Map's scalar expression, the root first."""
    yield expr
    if isinstance(expr, Apply):
        for arg in expr.args:
            yield from scalar_nodes(arg)
    elif isinstance(expr, Cast):
        yield from scalar_nodes(expr.arg)


def apply_text(fn: str, args: list[str]) -> str:
    """A primitive function applied to its arguments' text: infix, negation or a call."""
    if fn in INFIX:
        return f"({args[0]} {INFIX[fn]} {args[1]})"
    if fn == "neg":
        return f"-{args[0]}"
    return f"{fn}({', '.join(args)})"


def call_text(op: Op, operand=str) -> str:
    """A reduction, library op, route, take or scatter-add as text, each operand as
    `operand(o)` gives it (an einsum and a map are written by each printer its own way)."""
    if isinstance(op, Reduce):
        return f"{op.kind}[{','.join(op.over)}]({operand(op.operand)})"
    if isinstance(op, Library):
        return f"{op.kind}[{op.index}]({operand(op.operand)})"
    if isinstance(op, Take):
        return f"take[{op.index}]({operand(op.table)}, {operand(op.ids)})"
    if isinstance(op, ScatterAdd):  # no .ein syntax: the adjoint of take
        return f"scatter_add[{op.index}]({operand(op.update)}, {operand(op.ids)})"
    assert isinstance(op, Route), op
    return f"route[{op.expert},{op.capacity}]({operand(op.operand)}, k={op.k})"


def format_scalar(expr: Scalar, operands: tuple[Operand, ...]) -> str:
    if isinstance(expr, Arg):
        return str(operands[expr.index])
    if isinstance(expr, Const):
        text = repr(expr.value) if not isinstance(expr.value, float) else f"{expr.value:g}"
        return f"{expr.label}" if expr.label else text
    if isinstance(expr, Cast):
        return f"{expr.dtype}({format_scalar(expr.arg, operands)})"
    if isinstance(expr, Pos):
        return f"pos({expr.index})"
    return apply_text(expr.fn, [format_scalar(a, operands) for a in expr.args])


def format_op(op: Op, indent: str = "") -> list[str]:
    if isinstance(op, Repeat):
        flags = "".join(f" {flag}" for flag, on in (("reverse", op.reverse), ("remat", op.remat)) if on)
        staged = f" over stages {op.stage_axis}" if op.stage_axis else ""
        lines = [f"{indent}repeat {op.dim}={op.count}{staged}{flags} {{"]
        for value in op.stacked:
            lines.append(f"{indent}  stacked {value}")
        for carried in op.carried:
            lines.append(f"{indent}  carry {carried.value} <- {carried.body_result}")
        for inner in op.body:
            lines.extend(format_op(inner, indent + "  "))
        for saved in op.saved:
            lines.append(f"{indent}  save {saved.body_value} -> {saved.result}")
        lines.append(f"{indent}}} -> " + ", ".join(str(c.result) for c in op.carried))
        return lines
    head = f"{indent}{op.result}"
    if isinstance(op, Einsum):
        body = "einsum(" + ", ".join(map(str, op.operands)) + ")"
    elif isinstance(op, Map):
        body = "map " + format_scalar(op.expr, op.operands)
    else:
        body = call_text(op)
    where = f"  # line {op.span.line}" if op.span else ""
    return [f"{head} = {body}{where}"]


def format_program(program: Program) -> str:
    lines = [f"program {program.file}", str(program.mesh),
             "dims " + " ".join(f"{name}={size}" for name, size in program.dims),
             f"dtype {program.dtype}"]
    for value in program.inputs:
        stacked = f"  (stacked by {','.join(value.stacked_by)})" if value.stacked_by else ""
        lines.append(f"{value.kind:<6} {value}{stacked}")
    for op in program.ops:
        lines.extend(format_op(op))
    for output in program.outputs:
        shown = output.value if output.value == output.name else f"{output.name} = {output.value}"
        layout = f"  layout {output.layout}" if output.layout else ""
        lines.append(f"output {shown}{layout}")
    return "\n".join(lines)
