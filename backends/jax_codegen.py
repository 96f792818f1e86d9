"""Write a program as a readable, standalone JAX module (`einpar compile --emit jax`).

The module holds two functions of the same program:

- `per_device`: einpar's SpmdProgram, the code every device runs under
  `jax.shard_map` on local blocks, with each collective written out
  (`lax.psum`, `lax.all_gather(tiled=True)`, `lax.psum_scatter`,
  `lax.all_to_all`, `lax.ppermute`);
- `global_program`: the program on whole arrays in plain `jax.numpy`, which
  under `jax.jit` with the same input and output shardings (and the layouts
  the user wrote as sharding constraints) XLA partitions by itself: the GSPMD
  twin einpar is measured against.

A pipelined program's `per_device` runs its schedule: shard_map over the
whole mesh, the stages in lockstep ticks (backends/jax_pipeline.py).

The JAX backend runs exactly this text, so what `--emit jax` prints is what
ran. Writing text needs no JAX: this module imports none.

Numerics follow the reference backend: half-precision values are computed
in float32 and rounded when stored. Float32 contractions run at the matmul
precision asked for (einpar.precision): full float32 by default, as the
reference computes and the cost model prices.
"""

from __future__ import annotations

import builtins
import keyword
import math
import string

from einpar.flops import einsum_path
from einpar.inputs import fan_in_of, id_readers
from einpar.precision import DEFAULT_PRECISION, JAX_PRECISION, check_precision
from einpar.ir import (HALF_DTYPES, INFIX, Apply, Arg, Cast, Const, Einsum, Library, Map,
                       NORM_EPSILON, Operand, Pos, Program, Reduce, Repeat, Route, Scalar, ScatterAdd,
                       Take, einsum_subscripts, work_dtype)
from einpar.layout import Layout, Mesh
from einpar.reshard import AllGather, AllReduce, AllToAll, Permute, ReduceScatter, Slice
from einpar.spmd import CollectiveStep, LocalStep, RepeatStep, SpmdProgram, format_collective

JNP_DTYPES = {"f64": "jnp.float64", "f32": "jnp.float32", "bf16": "jnp.bfloat16",
              "f16": "jnp.float16", "f8e4m3": "jnp.float8_e4m3fn", "f8e5m2": "jnp.float8_e5m2",
              "i32": "jnp.int32", "bool": "jnp.bool_"}

# Names the module defines or imports, and the locals its functions use besides the program's
# values (`_` for what lax.scan returns unused, `mesh` for global_program's keyword): a program
# value never takes one of them, nor a builtin's name.
_RESERVED = {"os", "sys", "time", "argparse", "functools", "np", "jax", "jnp", "lax", "P", "AxisType",
             "NamedSharding", "PRECISION", "X64", "MESH", "INPUTS", "IDS", "OUTPUTS", "DEVICES", "make_mesh",
             "per_device", "global_program", "spmd_step", "gspmd_step", "place", "random_inputs",
             "constrain", "route_top_k", "rmsnorm", "layernorm", "reduce_scatter", "use_cpu_devices",
             "take_rows", "scatter_add", "take_batched", "scatter_add_batched",
             "timed", "main", "carry", "stacked", "mesh", "_", "checkpoint_name", "REMAT",
             *dir(builtins)}


class Names:
    """Python identifiers for the program's value names, one each, never colliding.

    `h.1` -> `h_1`, `x#2` -> `x_v2`, `x~1` -> `x_r1` (a moved copy), `x~in` -> `x_in`. Every
    identifier is plain ASCII (Python folds some Unicode letters together), not a keyword,
    not a `__dunder__` (Python's own, and `__debug__` cannot be assigned), and not one of
    the module's own names or a builtin's; a name that would be gets a prefix or a number.
    """

    def __init__(self):
        self.table: dict[str, str] = {}
        self.used: set[str] = set(_RESERVED)

    def __call__(self, name: str) -> str:
        if name in self.table:
            return self.table[name]
        text = name.replace(".", "_").replace("#", "_v")
        text = text.replace("~in", "_in").replace("~trip", "_trip").replace("~", "_r")
        text = "".join(ch if ch in _IDENTIFIER_CHARS else "_" for ch in text)
        if not text or text[0].isdigit() or (text.startswith("__") and text.endswith("__")):
            text = "v_" + text
        if keyword.iskeyword(text) or text in self.used:
            base, n = text, 2
            while f"{base}_{n}" in self.used:
                n += 1
            text = f"{base}_{n}"
        assert text.isidentifier() and not keyword.iskeyword(text), (name, text)
        self.table[name] = text
        self.used.add(text)
        return text

    def fresh(self, base: str) -> str:
        """A new identifier for the module's own use (a loop body's function)."""
        n = 1
        while f"{base}_{n}" in self.used:
            n += 1
        self.used.add(f"{base}_{n}")
        return f"{base}_{n}"


_IDENTIFIER_CHARS = frozenset(string.ascii_letters + string.digits + "_")


def literal_text(text: str) -> str:
    """`text` as it may stand between the quotes of a Python string literal ("..." or
    triple-quoted): backslashes and quotes escaped, and every character that is not
    printable (line ends, NUL, the lone surrogates of undecodable file names) as an escape."""
    out = []
    for ch in text:
        if ch in "\\\"":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def comment_text(text: str) -> str:
    """`text` safe to end a line as a comment: nothing in it can end the line."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def partition_spec(layout: Layout) -> str:
    """`P("dp", None, ("tp", "sp"))` for a layout (partial sums have no spec)."""
    assert not layout.partial, layout
    parts = []
    for axes in layout.dims:
        if not axes:
            parts.append("None")
        elif len(axes) == 1:
            parts.append(repr(axes[0]))
        else:
            parts.append("(" + ", ".join(map(repr, axes)) + ")")
    return "P(" + ", ".join(parts) + ")"


def align(text: str, have: tuple[str, ...], want: tuple[str, ...]) -> str:
    """`text` (indexed by `have`) transposed to the order of `want`, with new axes where
    `want` has indices `have` lacks, so that it broadcasts against `want`."""
    present = [i for i in want if i in have]
    assert set(present) == set(have), (have, want)
    order = [have.index(i) for i in present]
    if order != sorted(order):
        text = f"{text}.transpose({', '.join(map(str, order))})"
    subscript = [":" if i in have else "None" for i in want]
    while subscript and subscript[0] == "None":  # broadcasting adds leading axes by itself
        subscript.pop(0)
    if "None" in subscript:
        text = f"{text}[{', '.join(subscript)}]"
    return text


# Expressions deeper than this are split into temporaries (each level of a scalar
# expression opens at most two parentheses; Python's parser allows 200).
HOIST_DEPTH = 32

_CALLS = {"exp": "jnp.exp", "log": "jnp.log", "sqrt": "jnp.sqrt", "tanh": "jnp.tanh",
          "sigmoid": "jax.nn.sigmoid", "silu": "jax.nn.silu", "abs": "jnp.abs",
          "square": "jnp.square", "where": "jnp.where", "max2": "jnp.maximum", "min2": "jnp.minimum",
          "sin": "jnp.sin", "cos": "jnp.cos", "erf": "lax.erf", "pow": "jnp.power"}


def _positions(expr: Scalar) -> set[str]:
    """The indices `pos(...)` reads in an expression."""
    if isinstance(expr, Pos):
        return {expr.index}
    if isinstance(expr, Cast):
        return _positions(expr.arg)
    if isinstance(expr, Apply):
        return set().union(*(_positions(arg) for arg in expr.args))
    return set()


class OpWriter:
    """Lines of Python for IR ops. `dtype_of(name)` gives a value's dtype, `shape_of(name)` the
    shape the code holds it in (local blocks in the per-device program, whole arrays in the twin),
    `block_start(name, dim)` the Python text of where the held block of dimension `dim` starts in
    the whole value (None for a whole dimension) and `whole_size(name, dim)` that dimension's
    size in the whole value."""

    def __init__(self, names: Names, dtype_of, shape_of, lines: list[str], block_start=None,
                 whole_size=None, padded=None):
        self.names = names
        # padded(name, dim): whether the held blocks of that dimension end in padding (its axes
        # do not divide it), which an op reducing over it masks (mask_padding).
        self.padded = padded or (lambda name, dim: False)
        self.dtype_of = dtype_of
        self.shape_of = shape_of
        self.lines = lines
        self.block_start = block_start or (lambda name, dim: None)
        self.whole_size = whole_size or (lambda name, dim: self.shape_of(name)[dim])
        self.helpers: set[str] = set()  # module-level helpers the ops call
        self.result: str | None = None  # the Map being written (pos(S) counts along its result)

    def emit(self, indent: str, target: str, expr: str, comment: str = "") -> None:
        line = f"{indent}{target} = {expr}"
        self.lines.append(f"{line}  # {comment_text(comment)}" if comment else line)

    def mask(self, text: str, axis: int, value: str, dim: int, kind: str) -> str:
        """`text` (holding dimension `dim` of `value` at `axis`) with its padding set to what a
        reduction of `kind` ignores; `text` itself where that dimension has none."""
        if not self.padded(value, dim):
            return text
        self.helpers.add("mask_padding")
        return (f"mask_padding({text}, axis={axis}, start={self.block_start(value, dim)}, "
                f"size={self.whole_size(value, dim)}, kind={kind!r})")

    def masked(self, operand: Operand, text: str, indices, kind: str) -> str:
        """The operand's text with the padding of its dimensions along `indices` masked."""
        for dim, index in enumerate(operand.indices):
            if index in indices:
                text = self.mask(text, dim, operand.value, dim, kind)
        return text

    def read(self, operand: Operand, dtype: str) -> str:
        """The operand as an array of `dtype` (converted if it is stored in another)."""
        text = self.names(operand.value)
        if self.dtype_of(operand.value) != dtype:
            text = f"{text}.astype({JNP_DTYPES[dtype]})"
        return text

    @staticmethod
    def store(expr: str, have: str | None, want: str) -> str:
        """`expr` converted to `want` unless it has that dtype already. Every expression
        written here is a name, a call, a subscript or parenthesized, so `.astype` binds to it."""
        return expr if have == want else f"{expr}.astype({JNP_DTYPES[want]})"

    def op(self, op, indent: str, comment: str = "") -> None:
        result = op.result
        target = self.names(result.name)
        rtype = result.type
        work = work_dtype(rtype.dtype)
        if isinstance(op, Einsum):
            dtypes = {self.dtype_of(o.value) for o in op.operands}
            spec = repr(einsum_subscripts([o.indices for o in op.operands], rtype.indices))
            # Three operands or more: the pairwise path einpar counts (einpar.flops), on the
            # shapes this code holds, so the device computes the FLOPs the cost model prices.
            path = self.path(op) if len(op.operands) > 2 else ""
            if work == "f32" and len(dtypes) == 1 and dtypes <= set(HALF_DTYPES):
                # Products of half values are exact in float32: accumulate there, as the reference does.
                args = ", ".join(self.masked(o, self.names(o.value), op.summed, "sum")
                                 for o in op.operands)
                expr = f"jnp.einsum({spec}, {args}{path}, precision=PRECISION, " \
                       f"preferred_element_type=jnp.float32)"
            else:
                args = ", ".join(self.masked(o, self.read(o, work), op.summed, "sum")
                                 for o in op.operands)
                expr = f"jnp.einsum({spec}, {args}{path}, precision=PRECISION)"
            self.emit(indent, target, self.store(expr, work, rtype.dtype), comment)
        elif isinstance(op, Map):
            self.result = result.name
            expr, have = self.scalar(op.expr, op.operands, rtype.indices, indent)
            positions = _positions(op.expr)
            covered = {i for o in op.operands for i in o.indices} | positions
            shape = "(" + "".join(f"{n}, " for n in rtype.shape) + ")"
            if not op.operands and not positions:
                expr = f"jnp.full({shape}, {expr}, {JNP_DTYPES[rtype.dtype]})"
                have = rtype.dtype
            elif not set(rtype.indices) <= covered:
                expr = f"jnp.broadcast_to({expr}, {shape})"
            self.emit(indent, target, self.store(expr, have, rtype.dtype), comment)
        elif isinstance(op, Reduce):
            array = self.masked(op.operand, self.read(op.operand, work), op.over, op.kind)
            axes = tuple(op.operand.indices.index(i) for i in op.over)
            axis = str(axes[0]) if len(axes) == 1 else "(" + ", ".join(map(str, axes)) + ")"
            kept = tuple(i for i in op.operand.indices if i not in op.over)
            expr = align(f"jnp.{op.kind}({array}, axis={axis})", kept, rtype.indices)
            self.emit(indent, target, self.store(expr, work, rtype.dtype), comment)
        elif isinstance(op, Library):
            array = self.read(op.operand, work)
            axis = op.operand.indices.index(op.index)
            kept = op.operand.indices
            if op.kind == "logsumexp":
                kept = tuple(i for i in kept if i != op.index)
                call = f"jax.nn.logsumexp({array}, axis={axis})"
            elif op.kind in ("softmax", "cumsum"):
                call = f"{'jax.nn' if op.kind == 'softmax' else 'jnp'}.{op.kind}({array}, axis={axis})"
            else:
                self.helpers.add(op.kind)
                call = f"{op.kind}({array}, axis={axis})"
            self.emit(indent, target, self.store(align(call, kept, rtype.indices), work, rtype.dtype),
                      comment)
        elif isinstance(op, Take):
            self.take(op, indent, target, comment)
        elif isinstance(op, ScatterAdd):
            self.scatter_add(op, indent, target, comment)
        else:
            assert isinstance(op, Route)
            self.route(op, indent, target, comment)

    def take(self, op: Take, indent: str, target: str, comment: str) -> None:
        """A lookup of whole rows: jnp.take, its out-of-range ids filled (NaN for floats)
        rather than clamped; of a block of rows, take_rows (zeros for other blocks' ids).
        With batch indices, the same lookup mapped over them (take_batched)."""
        axis = op.table.indices.index(op.index)
        # A padded id reads row 0 (its result is padding too).
        table = self.names(op.table.value)
        ids = self.masked(op.ids, self.read(op.ids, "i32"), op.ids.indices, "sum")
        start = self.block_start(op.table.value, axis)
        size = self.whole_size(op.table.value, axis)
        if start is not None:
            self.helpers.add("take_rows")
        if op.batch:
            self.helpers.add("take_batched")
            batch = op.batch
            free = tuple(i for i in op.ids.indices if i not in batch)
            rest = tuple(i for i in op.table.indices if i != op.index and i not in batch)
            table = align(table, op.table.indices, batch + (op.index,) + rest)
            ids = align(ids, op.ids.indices, batch + free)
            call = f"take_batched({table}, {ids}, batch={len(batch)}, start={start}, size={size})"
            order = batch + free + rest
        elif start is None:
            call = f"jnp.take({table}, {ids}, axis={axis}, mode='fill')"
            order = op.table.indices[:axis] + op.ids.indices + op.table.indices[axis + 1:]
        else:
            call = f"take_rows({table}, {ids}, axis={axis}, start={start}, size={size})"
            order = op.table.indices[:axis] + op.ids.indices + op.table.indices[axis + 1:]
        expr = align(call, order, op.result.type.indices)
        self.emit(indent, target, self.store(expr, self.dtype_of(op.table.value),
                                             op.result.type.dtype), comment)

    def scatter_add(self, op: ScatterAdd, indent: str, target: str, comment: str) -> None:
        """Rows of the result (the block this code holds) sum the update's rows by id; with
        batch indices, each batch position into its own rows (scatter_add_batched)."""
        self.helpers.add("scatter_add")
        rtype = op.result.type
        work = work_dtype(rtype.dtype)
        batch = op.batch
        free = tuple(i for i in op.ids.indices if i not in batch)
        rest = tuple(i for i in op.update.indices if i not in op.ids.indices)
        update = align(self.read(op.update, work), op.update.indices, batch + free + rest)
        if not set(op.ids.indices) <= set(op.update.indices):  # one update row for several ids
            sizes = dict(zip(op.ids.indices, self.shape_of(op.ids.value)))
            sizes.update(zip(op.update.indices, self.shape_of(op.update.value)))
            shape = ", ".join(str(sizes[i]) for i in batch + free + rest)
            update = f"jnp.broadcast_to({update}, ({shape},))"
        # A padded id adds a zero row (to row 0): the update's rows of padded ids are zeroed.
        for axis, index in enumerate(batch + free):
            update = self.mask(update, axis, op.ids.value, op.ids.indices.index(index), "sum")
        ids = self.masked(op.ids, self.read(op.ids, "i32"), op.ids.indices, "sum")
        ids = align(ids, op.ids.indices, batch + free)
        dim = rtype.indices.index(op.index)
        rows = self.shape_of(op.result.name)[dim]
        start = self.block_start(op.result.name, dim) or "0"
        if batch:
            self.helpers.add("scatter_add_batched")
            call = (f"scatter_add_batched({update}, {ids}, rows={rows}, start={start}, "
                    f"batch={len(batch)})")
        else:
            call = f"scatter_add({update}, {ids}, rows={rows}, start={start})"
        expr = align(call, batch + (op.index,) + rest, rtype.indices)
        self.emit(indent, target, self.store(expr, work, rtype.dtype), comment)

    def path(self, op: Einsum) -> str:
        sizes = {i: n for o in op.operands for i, n in zip(o.indices, self.shape_of(o.value))}
        return f", optimize={list(einsum_path(op, sizes))!r}"

    def route(self, op: Route, indent: str, target: str, comment: str) -> None:
        self.helpers.add("route_top_k")
        rtype = op.result.type
        work = work_dtype(rtype.dtype)
        groups = tuple(i for i in op.operand.indices if i not in (op.expert, op.token))
        sizes = dict(zip(rtype.indices, rtype.shape))
        gates = align(self.read(op.operand, work), op.operand.indices, groups + (op.token, op.expert))
        flat = f"{gates}.reshape(-1, {sizes[op.token]}, {sizes[op.expert]})"
        routed = groups + (op.token, op.expert, op.capacity)
        shape = ", ".join(str(sizes[i]) for i in routed)
        call = f"route_top_k({flat}, k={op.k}, capacity={sizes[op.capacity]}).reshape({shape})"
        self.emit(indent, target, self.store(align(call, routed, rtype.indices), work, rtype.dtype),
                  comment)

    def scalar(self, expr: Scalar, operands: tuple[Operand, ...], out: tuple[str, ...],
               indent: str = ""):
        """(Python text, its dtype or None when it is only Python constants). Subexpressions
        HOIST_DEPTH deep become temporaries, on lines of their own at `indent`."""
        text, dtype, _ = self._scalar(expr, operands, out, indent)
        return text, dtype

    def _scalar(self, expr: Scalar, operands, out, indent: str):
        """(text, dtype, height): height counts the calls and operators nested in the text."""
        if isinstance(expr, (Arg, Const, Pos)):
            return (*self.leaf(expr, operands, out), 0)
        children = [self._scalar(arg, operands, out, indent)
                    for arg in ((expr.arg,) if isinstance(expr, Cast) else expr.args)]
        text, dtype = self.combine(expr, [(text, dtype) for text, dtype, _ in children])
        height = 1 + max(height for _, _, height in children)
        if height >= HOIST_DEPTH:
            temporary = self.names.fresh("t")
            self.lines.append(f"{indent}{temporary} = {text}")
            text, height = temporary, 0
        return text, dtype, height

    def leaf(self, expr: Arg | Const | Pos, operands, out):
        if isinstance(expr, Pos):  # positions along the result's index, from the block's start
            dim = out.index(expr.index)
            text = f"jnp.arange({self.shape_of(self.result)[dim]}, dtype=jnp.int32)"
            start = self.block_start(self.result, dim)
            if start is not None:
                text = f"({text} + {start})"
            return align(text, (expr.index,), out), "i32"
        if isinstance(expr, Arg):
            operand = operands[expr.index]
            dtype = self.dtype_of(operand.value)
            wide = work_dtype(dtype)
            text = align(self.read(operand, wide), operand.indices, out)
            return text, wide
        value = expr.value
        if isinstance(value, float) and not math.isfinite(value):
            return ("jnp.nan" if math.isnan(value) else ("jnp.inf" if value > 0 else "-jnp.inf")), None
        return repr(value), None

    @staticmethod
    def combine(expr: Apply | Cast, args: list[tuple[str, str | None]]):
        """The text and dtype of `expr` applied to its arguments' texts and dtypes."""
        if isinstance(expr, Cast):
            text = f"jnp.asarray({args[0][0]}).astype({JNP_DTYPES[expr.dtype]})"
            if expr.dtype in HALF_DTYPES:  # rounded to the narrow type, computed in float32
                text += ".astype(jnp.float32)"
            return text, work_dtype(expr.dtype)
        texts = [text for text, _ in args]
        kinds = {dtype for _, dtype in args if dtype is not None}
        dtype = next(iter(kinds)) if len(kinds) == 1 else (None if not kinds else "?")
        if expr.fn in INFIX:
            text = f"({texts[0]} {INFIX[expr.fn]} {texts[1]})"
            if expr.fn in ("gt", "ge", "lt", "le", "eq", "ne"):
                return text, "bool" if kinds else None
            if expr.fn == "div" and dtype in ("i32", "bool"):
                return text, "?"
            return text, dtype
        if expr.fn == "neg":
            return f"(-{texts[0]})", dtype
        if expr.fn == "where":
            rest = {d for _, d in args[1:] if d is not None}
            return f"jnp.where({', '.join(texts)})", next(iter(rest)) if len(rest) == 1 else "?"
        if expr.fn in ("relu", "gelu", "rsqrt"):
            text = {"relu": f"jnp.maximum({texts[0]}, 0)",
                    "gelu": f"jax.nn.gelu({texts[0]}, approximate=True)",
                    "rsqrt": f"(1 / jnp.sqrt({texts[0]}))"}[expr.fn]
        else:
            text = f"{_CALLS[expr.fn]}({', '.join(texts)})"
        if dtype in ("i32", "bool") and expr.fn not in ("abs", "square", "max2", "min2", "relu"):
            dtype = "?"  # a float function of integers
        return text, dtype


# ---- the per-device program


def _fit(text: str, axis: int, have: int, want: int, rank: int) -> str:
    """`text` cut or padded with zeros from `have` to `want` along `axis`: a padded dimension's
    padding is at its end (einpar/layout.py)."""
    if have == want:
        return text
    if have > want:
        return f"lax.slice_in_dim({text}, 0, {want}, axis={axis})"
    widths = [(0, 0)] * rank
    widths[axis] = (0, want - have)
    return f"jnp.pad({text}, {widths!r})"


def _collective_text(step: CollectiveStep, names: Names, mesh: Mesh, local_shape,
                     src_shape=None) -> str:
    """The collective's JAX text; `src_shape` (the local shape before it) where the moved
    dimension is padded: the gathered dimension drops its padding, the one scattered onto is
    padded to whole blocks first."""
    move = step.step
    src = names(step.src)
    src_shape = src_shape or ()
    rank = len(local_shape)
    if isinstance(move, AllGather):
        text = f"lax.all_gather({src}, {move.axis!r}, axis={move.dim}, tiled=True)"
        if src_shape:
            text = _fit(text, move.dim, mesh.size(move.axis) * src_shape[move.dim], local_shape[move.dim],
                        rank)
        return text
    if isinstance(move, ReduceScatter):
        if src_shape:
            src = _fit(src, move.dim, src_shape[move.dim], mesh.size(move.axis) * local_shape[move.dim],
                       rank)
        if move.op == "sum":
            return f"lax.psum_scatter({src}, {move.axis!r}, scatter_dimension={move.dim}, tiled=True)"
        return f"reduce_scatter({src}, {move.axis!r}, dim={move.dim}, op=jnp.{move.op})"
    if isinstance(move, AllReduce):
        axes = repr(move.axes[0]) if len(move.axes) == 1 else repr(tuple(move.axes))
        return f"lax.p{move.op}({src}, {axes})"
    if isinstance(move, AllToAll):
        n = mesh.size(move.axis)
        if src_shape:
            src = _fit(src, move.dst_dim, src_shape[move.dst_dim], n * local_shape[move.dst_dim], rank)
        text = (f"lax.all_to_all({src}, {move.axis!r}, split_axis={move.dst_dim}, "
                f"concat_axis={move.src_dim}, tiled=True)")
        if src_shape:
            text = _fit(text, move.src_dim, n * src_shape[move.src_dim], local_shape[move.src_dim], rank)
        return text
    if isinstance(move, Slice):
        size = local_shape[move.dim]
        if src_shape:
            src = _fit(src, move.dim, src_shape[move.dim], mesh.size(move.axis) * size, rank)
        return (f"lax.dynamic_slice_in_dim({src}, lax.axis_index({move.axis!r}) * {size}, {size}, "
                f"axis={move.dim})")
    assert isinstance(move, Permute)
    n = mesh.size(move.src_axis)
    # The device at (src=i, dst=j) holds block i; the one at (src=j, dst=i) needs it.
    return (f"lax.ppermute({src}, ({move.src_axis!r}, {move.dst_axis!r}), "
            f"perm=[(i * {n} + j, j * {n} + i) for i in range({n}) for j in range({n})])")


class _SpmdWriter:
    def __init__(self, program: SpmdProgram, names: Names):
        self.program = program
        self.names = names
        self.lines: list[str] = []
        self.ops = OpWriter(names, lambda name: program.values[name].type.dtype,
                            lambda name: program.values[name].local_shape(program.mesh), self.lines,
                            self.block_start, lambda name, dim: program.values[name].type.shape[dim],
                            self.padded)

    def padded(self, name: str, dim: int) -> bool:
        value = self.program.values[name]
        return value.type.shape[dim] % value.layout.split_factor(dim, self.program.mesh) != 0

    def block_start(self, name: str, dim: int) -> str | None:
        """Where this device's block of dimension `dim` of `name` starts: its block number
        along the splitting axes (major first) times the block's size."""
        value = self.program.values[name]
        axes = value.layout.dims[dim]
        if not axes:
            return None
        block = f"lax.axis_index({axes[0]!r})"
        for axis in axes[1:]:
            block = f"({block} * {self.program.mesh.size(axis)} + lax.axis_index({axis!r}))"
        return f"{block} * {value.local_shape(self.program.mesh)[dim]}"

    def steps(self, steps, indent: str) -> None:
        mesh = self.program.mesh
        for step in steps:
            if isinstance(step, LocalStep):
                self.ops.op(step.op, indent, step.rule if len(step.rule) < 90 else "")
            elif isinstance(step, CollectiveStep):
                if step.step.kind == "reduce_scatter" and step.step.op != "sum":
                    self.ops.helpers.add("reduce_scatter")
                value = self.program.values[step.dst]
                local = value.local_shape(mesh)
                source = self.program.values[step.src]
                padded = value.layout.is_padded(value.type.shape, mesh) or \
                    source.layout.is_padded(source.type.shape, mesh)
                shown = format_collective(step, value.type.indices)
                note = (f"{shown}: {step.bytes_per_device:,} B/device" if step.bytes_per_device
                        else shown)
                self.ops.emit(indent, self.names(step.dst),
                              _collective_text(step, self.names, mesh, local,
                                               source.local_shape(mesh) if padded else None), note)
            else:
                self.repeat(step, indent)

    def repeat(self, step: RepeatStep, indent: str) -> None:
        body = self.loop_body(step, indent)
        before = _pack([self.names(b) for b, _, _, _ in step.carried])
        xs = _pack([self.names(s) for s, _ in step.stacked]) if step.stacked else "None"
        self.lines.append(_scan_call(indent, body, before, xs, step.count, bool(step.stacked),
                                     step.reverse,
                                     [self.names(a) for _, _, _, a in step.carried],
                                     [self.names(after) for _, after in step.saved]))

    def loop_body(self, step: RepeatStep, indent: str) -> str:
        """Write the function of one trip of `step` (lax.scan's body); returns its name."""
        body = self.names.fresh("trip")
        carried_in = [self.names(inside) for _, inside, _, _ in step.carried]
        sliced = [self.names(inside) for _, inside in step.stacked]
        self.lines.append(f"{indent}def {body}(carry, stacked):  "
                          f"# one trip of repeat {comment_text(step.dim)}={step.count}")
        self.lines.append(f"{indent}    {_pack(carried_in)} = carry")
        if sliced:
            self.lines.append(f"{indent}    {_pack(sliced)} = stacked")
        self.steps(step.body, indent + "    ")
        results = _pack([self.names(result) for _, _, result, _ in step.carried])
        ys = _pack([self.names(inside) for inside, _ in step.saved]) if step.saved else "None"
        self.lines.append(f"{indent}    return {results}, {ys}")
        return body


def _scan_call(indent: str, body: str, init: str, xs: str, count: int, sliced: bool, reverse: bool,
               carried: list[str], saved: list[str]) -> str:
    """`(x,), (hs,) = lax.scan(trip_1, (x,), (w,), reverse=True)`: the carried values after the
    loop and the saved ones stacked by trip (lax.scan's ys, at their trip's index however
    the trips run)."""
    length = "" if sliced else f", length={count}"
    order = ", reverse=True" if reverse else ""
    after = _pack(carried) if carried else "_"
    ys = _pack(saved) if saved else "_"
    return f"{indent}{after}, {ys} = lax.scan({body}, {init}, {xs}{length}{order})"


def _pack(names: list[str]) -> str:
    return "(" + ", ".join(names) + ")" if len(names) != 1 else f"({names[0]},)"




# ---- the whole-array program (the GSPMD twin)


class _GlobalWriter:
    def __init__(self, program: Program, names: Names):
        self.program = program
        self.names = names
        self.lines: list[str] = []
        # A stacked value's name means one trip's slice inside its loop, the whole stack outside.
        self.values = dict(program.values)
        self.ops = OpWriter(names, lambda name: self.values[name].type.dtype,
                            lambda name: self.values[name].type.shape, self.lines)
        # A training program as written (differentiated whole by jax.grad, the oracle and the
        # GSPMD twin of its step) recomputes what it asks to: its `remat` statements' values are
        # named for jax.checkpoint's policy (REMAT), its `repeat L remat` bodies checkpointed.
        self.training = program.training is not None
        self.remat = program.training.remat if self.training else frozenset()
        self.remat_values: list[str] = []

    def body(self, ops, indent: str) -> None:
        for op in ops:
            if isinstance(op, Repeat):
                self.repeat(op, indent)
                continue
            self.ops.op(op, indent)
            if op.stmt in self.remat:
                name = self.names(op.result.name)
                self.remat_values.append(op.result.name)
                self.lines.append(f"{indent}{name} = checkpoint_name({name}, "
                                  f"\"{literal_text(op.result.name)}\")  # remat: recomputed")
            if op.result.layout is not None and not op.result.layout.partial:
                name = self.names(op.result.name)
                self.lines.append(f"{indent}{name} = constrain({name}, mesh, "
                                  f"{partition_spec(op.result.layout)})  # as the program asks")

    def repeat(self, op: Repeat, indent: str) -> None:
        body = self.names.fresh("layer")
        carried = [self.names(c.value) for c in op.carried]
        stacked = [self.names(v.name) for v in op.stacked]
        self.lines.append(f"{indent}def {body}(carry, stacked):  "
                          f"# one trip of repeat {comment_text(op.dim)}={op.count}")
        self.lines.append(f"{indent}    {_pack(carried)} = carry")
        if stacked:
            self.lines.append(f"{indent}    {_pack(stacked)} = stacked")
        outside = dict(self.values)
        self.values.update((v.name, v) for v in op.stacked)
        self.body(op.body, indent + "    ")
        self.values = outside
        ys = _pack([self.names(s.body_value) for s in op.saved]) if op.saved else "None"
        self.lines.append(f"{indent}    return {_pack([self.names(c.body_result) for c in op.carried])}, {ys}")
        xs = _pack(stacked) if stacked else "None"
        if op.remat and self.training:
            self.lines.append(f"{indent}{body} = jax.checkpoint({body})  # repeat remat: each "
                              "trip recomputed in the backward pass")
        self.lines.append(_scan_call(indent, body, _pack(carried), xs, op.count, bool(stacked),
                                     op.reverse, [self.names(c.result.name) for c in op.carried],
                                     [self.names(s.result.name) for s in op.saved]))


# ---- helpers the module defines when its ops call them

_HELPERS = {
    "mask_padding": '''
def mask_padding(x, axis, start, size, kind):
    """`x`, whose block along `axis` starts at `start` of `size` real elements, with the padding
    past them set to what a reduction of `kind` ignores: 0 for a sum, -inf for a max, +inf
    for a min (the extreme integers for integers)."""
    if kind == "sum":
        fill = jnp.zeros((), x.dtype)
    elif jnp.issubdtype(x.dtype, jnp.floating):
        fill = jnp.asarray(-jnp.inf if kind == "max" else jnp.inf, x.dtype)
    elif x.dtype == jnp.bool_:
        fill = jnp.asarray(kind == "min")
    else:
        info = jnp.iinfo(x.dtype)
        fill = jnp.asarray(info.min if kind == "max" else info.max, x.dtype)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    real = (start + jnp.arange(x.shape[axis])).reshape(shape) < size
    return jnp.where(real, x, fill)
''',
    "take_rows": '''
def take_rows(table, ids, axis, start, size):
    """take along `axis` of a block of a table's rows, from row `start` of `size` in all: an id
    in the block reads its row and any other gives zeros (another block's row), so the blocks'
    lookups sum to the whole one (vocabulary-parallel embedding). An id outside [0, size) gives
    NaN in a float table, never a clamped row."""
    rows = ids - start
    mine = (rows >= 0) & (rows < table.shape[axis])
    taken = jnp.take(table, jnp.where(mine, rows, 0), axis=axis)
    shape = (1,) * axis + ids.shape + (1,) * (table.ndim - axis - 1)
    outside = jnp.zeros((), table.dtype)
    if jnp.issubdtype(table.dtype, jnp.inexact):
        outside = jnp.where((ids < 0) | (ids >= size), jnp.nan, 0).astype(table.dtype).reshape(shape)
    return jnp.where(mine.reshape(shape), taken, outside)
''',
    "scatter_add": '''
def scatter_add(update, ids, rows, start):
    """The adjoint of take: row v of the `rows` rows from `start` sums the rows of `update`
    (the ids' dimensions first) whose id is start + v; other ids add nothing here."""
    local = ids - start
    local = jnp.where((local >= 0) & (local < rows), local, rows)  # past the end: dropped
    out = jnp.zeros((rows,) + update.shape[ids.ndim:], update.dtype)
    return out.at[local].add(update, mode="drop")
''',
    "take_batched": '''
def take_batched(table, ids, batch, start, size):
    """take along axis `batch` of `table` [batch dims, rows, rest] at `ids` [batch dims, ...]:
    each batch position's ids read that position's rows (jnp.take_along_axis's gather with
    batch dimensions), -> [batch dims, the ids' other dims, rest]. `start` is None for whole
    rows, else where the block of rows held here starts (take_rows)."""
    if start is None:
        def lookup(t, i):
            return jnp.take(t, i, axis=0, mode="fill")
    else:
        def lookup(t, i):
            return take_rows(t, i, axis=0, start=start, size=size)
    for _ in range(batch):
        lookup = jax.vmap(lookup)
    return lookup(table, ids)
''',
    "scatter_add_batched": '''
def scatter_add_batched(update, ids, rows, start, batch):
    """scatter_add with `batch` leading batch dimensions kept: [batch dims, rows, rest]."""
    def add(u, i):
        return scatter_add(u, i, rows=rows, start=start)
    for _ in range(batch):
        add = jax.vmap(add)
    return add(update, ids)
''',
    "rmsnorm": f'''
def rmsnorm(x, axis):
    return x / jnp.sqrt(jnp.mean(x * x, axis=axis, keepdims=True) + {NORM_EPSILON!r})
''',
    "layernorm": f'''
def layernorm(x, axis):
    centered = x - jnp.mean(x, axis=axis, keepdims=True)
    return centered / jnp.sqrt(jnp.mean(centered * centered, axis=axis, keepdims=True) + {NORM_EPSILON!r})
''',
    "reduce_scatter": '''
def reduce_scatter(x, axis_name, dim, op):
    """A max or min reduce-scatter (JAX has psum_scatter only): an all-to-all sends each
    device its chunk of `dim` from every other, then each combines what it got."""
    parts = lax.all_to_all(x[None], axis_name, split_axis=dim + 1, concat_axis=0, tiled=True)
    return op(parts, axis=0)
''',
    "route_top_k": '''
def route_top_k(gates, k, capacity):
    """GShard routing: gates [groups, tokens, experts] -> combine [groups, tokens, experts, capacity].

    Each token's top-k experts (ties to the lower expert) take the next free slot of that
    expert in the token's group, every token's first choice before any token's second;
    an assignment past capacity is dropped. A kept one weighs its gate over the sum of the
    token's top-k gates.
    """
    groups, tokens, experts = gates.shape
    choices = jnp.argsort(-gates, axis=-1, stable=True)[..., :k]  # [groups, tokens, k]
    chosen = jnp.take_along_axis(gates, choices, axis=-1)
    weights = chosen / jnp.sum(chosen, axis=-1, keepdims=True)
    picked = jax.nn.one_hot(choices, experts, dtype=jnp.int32)  # [groups, tokens, k, experts]
    # Slots are taken in (choice rank, token) order: count earlier picks of each expert.
    order = picked.transpose(0, 2, 1, 3).reshape(groups, k * tokens, experts)
    taken = (jnp.cumsum(order, axis=1) - order).reshape(groups, k, tokens, experts)
    slot = jnp.sum(taken.transpose(0, 2, 1, 3) * picked, axis=-1)  # [groups, tokens, k]
    kept = jax.nn.one_hot(slot, capacity, dtype=gates.dtype)  # all zeros past capacity
    combine = weights[..., None, None] * picked[..., :, None] * kept[..., None, :]
    return jnp.sum(combine, axis=2)  # a token picks an expert at most once: one term each
''',
}


# ---- the module


def _fan_ins(program: Program) -> dict[str, int | None]:
    """Each param's fan-in (random values are divided by its square root); None for inputs."""
    fan_in = fan_in_of(program)
    return {v.name: fan_in.get(v.name, 1) if v.kind == "param" else None for v in program.inputs}


def write_module(program: Program, spmd: SpmdProgram, command: str = "",
                 precision: str = DEFAULT_PRECISION) -> str:
    """The standalone module for `program` and its per-device program `spmd`, its float32
    contractions at `precision` (einpar.precision)."""
    check_precision(precision)
    pipeline = spmd.pipeline
    names = Names()
    if pipeline is not None:  # the stages' schedule runs in per_device (backends/jax_pipeline.py)
        from . import jax_pipeline

        names.used |= jax_pipeline.RESERVED
    params = [names(name) for name in spmd.inputs]
    if pipeline is None:
        per_device = _SpmdWriter(spmd, names)
        per_device.steps(spmd.steps, "    ")
    else:
        per_device = jax_pipeline.PipelineWriter(spmd, names)
        per_device.write()
    whole = _GlobalWriter(program, names)
    whole.body(program.ops, "    ")
    helpers = sorted(per_device.ops.helpers | whole.ops.helpers)
    mesh = spmd.mesh if pipeline is None else pipeline.mesh  # the stages' whole mesh
    axes = mesh.axes or (("devices", 1),)  # a program without a mesh runs on one device
    fan_ins = _fan_ins(program)
    uses_f64 = any(v.type.dtype == "f64" for v in spmd.values.values())

    out: list[str] = []
    add = out.append
    # The file name and the command are the user's text: escaped, they stay inside the docstring.
    add(f'"""{literal_text(program.file)} as JAX: einpar\'s per-device program under jax.shard_map, '
        'and its GSPMD twin.')
    add("")
    if command:
        add(f"Written by `{literal_text(command)}`.")
    add(literal_text(f"Mesh {' '.join(f'{a}={n}' for a, n in axes)} ({mesh.num_devices} devices). "
                     "Run it: python THIS_FILE.py --help"))
    add('"""')
    add("")
    add("import argparse")
    add("import functools")
    add("import os")
    add("import time")
    add("")
    add("import numpy as np")
    add("import jax")
    add("import jax.numpy as jnp")
    add("from jax import lax")
    add("from jax.sharding import AxisType, NamedSharding, PartitionSpec as P")
    if whole.remat_values:
        add("from jax.ad_checkpoint import checkpoint_name")
    add("")
    add(f"MESH = {tuple(axes)!r}  # (axis, size), major to minor; devices in row-major order")
    add(f"DEVICES = {mesh.num_devices}")
    add(f"PRECISION = {JAX_PRECISION[precision]}  # " + (
        "full float32 contractions, as the reference computes" if precision == "highest" else
        "the accelerator's fast float32 matmuls (TF32 on GPUs, one bfloat16 pass on TPUs)"))
    add(f"X64 = {uses_f64}  # the program computes in float64")
    add("")
    add("# name: (global shape, dtype, layout, fan-in of a param: its random values are scaled by 1/sqrt)")
    add("INPUTS = {")
    for name in spmd.inputs:
        value = spmd.values[name]
        shape, spec = tuple(value.type.shape), partition_spec(value.layout)
        if pipeline is not None:  # a stack over the pipelined index: all trips, split by stage
            shape, spec = jax_pipeline.global_shape(spmd, name), jax_pipeline.input_spec(spmd, name)
        add(f"    {name!r}: ({shape!r}, {JNP_DTYPES[value.type.dtype]}, {spec}, {fan_ins[name]!r}),")
    add("}")
    ids = {name: min(size for size, _ in readers) for name, readers in id_readers(program).items()
           if name in spmd.inputs}
    add(f"IDS = {ids!r}  # inputs read as ids by a take: name -> the rows they index")
    add("OUTPUTS = {")
    for output in spmd.outputs:
        add(f"    {output.name!r}: {partition_spec(output.layout)},")
    add("}")
    padded = {name: _padded_shape(spmd, name) for name in spmd.inputs if _is_padded(spmd, name)}
    cut = {o.name: _global_shape(spmd, o.value) for o in spmd.outputs if _is_padded(spmd, o.value)}
    if padded or cut:
        add(f"PADDED = {padded!r}  # inputs placed with zeros past their real shape: their axes "
            "do not divide a dimension")
        add(f"CUT = {cut!r}  # outputs cut to their real shape: shard_map returns them padded")
    if whole.remat_values:
        add(f"REMAT = {tuple(whole.remat_values)!r}  # values global_program names for recomputation: "
            "differentiate it under jax.checkpoint(policy=jax.checkpoint_policies."
            "save_anything_except_these_names(*REMAT))")
    if pipeline is not None:
        staged = jax_pipeline.staged_inputs(spmd)
        add(f"STAGED = {staged!r}  # stacks put in stage order on the host (name: axis, order): "
            "stage k's block holds its own trips")
        add("")
        out.extend(jax_pipeline.schedule_lines(spmd))
        out.extend(jax_pipeline.HELPERS.rstrip("\n").splitlines())
    for helper in helpers:
        add("")
        out.extend(_HELPERS[helper].strip("\n").splitlines())

    def function(signature: str, doc: str, body: list[str], outputs) -> None:
        out.extend(["", "", f"def {signature}:", f'    """{doc}"""', *body])
        add("    return {" + ", ".join(f"{o.name!r}: {names(o.value)}" for o in outputs) + "}")

    function(f"per_device({', '.join(params)})",
             "What every device runs: its blocks of the inputs in, its blocks of the outputs out.",
             per_device.lines, spmd.outputs)
    out.extend(["", "", "def constrain(value, mesh, spec):",
                '    """Pin a value to the layout the program gave it (nothing to pin without a mesh)."""',
                "    return value if mesh is None else lax.with_sharding_constraint(value, "
                "NamedSharding(mesh, spec))"])
    function(f"global_program({', '.join(params + ['*', 'mesh=None'])})",
             "The same program on whole arrays: what XLA partitions by itself under jax.jit.",
             whole.lines, program.outputs)
    add("")
    add("")
    driver = _DRIVER
    if padded or cut:
        for plain, uneven in _PADDED_DRIVER + (_NO_TWIN if padded else ()):
            assert driver.count(plain) == 1, plain
            driver = driver.replace(plain, uneven)
    if pipeline is not None:  # the stacks split over the stages in stage order (not for the twin)
        for plain, staged in _STAGED_DRIVER:
            if padded and "twin_mesh" in plain:
                continue  # no twin to place for (_NO_TWIN)
            assert driver.count(plain) == 1, plain
            driver = driver.replace(plain, staged)
    out.extend(driver.strip("\n").splitlines())
    add("")
    return "\n".join(out)


def _is_padded(spmd: SpmdProgram, name: str) -> bool:
    value = spmd.values[name]
    return value.layout.is_padded(value.type.shape, spmd.mesh)


def _global_shape(spmd: SpmdProgram, name: str) -> tuple[int, ...]:
    """A value's real shape on the whole mesh (a pipeline's stacks hold all trips)."""
    if spmd.pipeline is not None:
        from . import jax_pipeline  # a pipeline's module only (it imports this one)

        return jax_pipeline.global_shape(spmd, name)
    return tuple(spmd.values[name].type.shape)


def _padded_shape(spmd: SpmdProgram, name: str) -> tuple[int, ...]:
    """An input's shape on the whole mesh with each dimension its axes do not divide padded
    to whole blocks (the pipelined index, which the stages divide, as it is)."""
    value, mesh = spmd.values[name], spmd.mesh
    real = _global_shape(spmd, name)
    return tuple(whole if whole != size else n * value.layout.split_factor(d, mesh)
                 for d, (whole, size, n) in enumerate(zip(real, value.type.shape,
                                                          value.local_shape(mesh))))


# A program whose axes do not divide a dimension: JAX places only arrays its shardings divide,
# so the inputs go in padded and the outputs come out cut; the GSPMD twin takes a padded output
# whole, and cannot place a padded input.
_PADDED_DRIVER = (
    ("""    outputs = spmd_step(mesh)(*placed)
""", """    outputs = spmd_step(mesh)(*placed)
    outputs = {name: np.asarray(value)[tuple(slice(0, n) for n in CUT[name])] if name in CUT
               else value for name, value in outputs.items()}  # the padding off, on the host
"""),
    ("""        whole = np.asarray(arrays[name])
""", """        whole = np.asarray(arrays[name])
        if name in PADDED:  # zeros past the end of each dimension its axes do not divide
            shape = PADDED[name]
            whole = np.pad(whole, [(0, n - m) for n, m in zip(shape, whole.shape)])
"""),
    ("""                   out_shardings={name: shard(spec) for name, spec in OUTPUTS.items()})
""", """                   # an output padded in einpar's layout comes whole: jit's shardings divide
                   out_shardings={name: shard(P() if name in CUT else spec)
                                  for name, spec in OUTPUTS.items()})
"""),
)
# Inputs placed padded: the twin cannot place them (jax.jit's shardings divide what they place).
_NO_TWIN = (
    ("""    spmd_times = timed(spmd_step(mesh), placed, args.repeat)
    twin_mesh = make_mesh(axis_types=AxisType.Auto)
    gspmd_times = timed(gspmd_step(twin_mesh), place(arrays, twin_mesh), args.repeat)
    for label, (compile_s, step_s) in (("shard_map (einpar)", spmd_times), ("GSPMD twin", gspmd_times)):
""", """    spmd_times = timed(spmd_step(mesh), placed, args.repeat)
    # No GSPMD twin: jax.jit's shardings must divide the arrays they place.
    for label, (compile_s, step_s) in (("shard_map (einpar)", spmd_times),):
"""),
)


_STAGED_DRIVER = (
    ("def place(arrays, mesh):\n", "def place(arrays, mesh, stages=True):\n"),
    ("each process supplies only its own blocks.",
     "each process supplies only its own blocks.\n    With `stages`, the stacks in STAGED are put "
     "in stage order (spmd_step's inputs; the twin\n    takes them as they are)."),
    ("        whole = np.asarray(arrays[name])\n",
     "        whole = np.asarray(arrays[name])\n"
     "        if stages and name in STAGED:  # a stack over the pipelined index: each stage's trips together\n"
     "            axis, order = STAGED[name]\n"
     "            whole = np.take(whole, order, axis=axis)\n"),
    ("place(arrays, twin_mesh)", "place(arrays, twin_mesh, stages=False)"),
)

_DRIVER = '''


def make_mesh(devices=None, axis_types=AxisType.Explicit):
    """The program's mesh over the first DEVICES devices JAX sees (or over `devices`)."""
    devices = jax.devices()[:DEVICES] if devices is None else devices
    if len(devices) < DEVICES:
        raise SystemExit(f"this program needs {DEVICES} devices; JAX sees {len(jax.devices())}")
    shape, names = tuple(n for _, n in MESH), tuple(a for a, _ in MESH)
    return jax.make_mesh(shape, names, axis_types=(axis_types,) * len(MESH), devices=devices)


def spmd_step(mesh):
    """einpar's program, jitted: each device runs per_device on its own blocks."""
    in_specs = tuple(spec for _, _, spec, _ in INPUTS.values())
    # check_vma=False: einpar's layouts already say which values are replicated.
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=OUTPUTS,
                                 check_vma=False))


def gspmd_step(mesh):
    """The GSPMD twin: the whole-array program jitted with the same input and output layouts
    (on a mesh of Auto axes, so XLA chooses every layout the program leaves open)."""
    shard = lambda spec: NamedSharding(mesh, spec)
    return jax.jit(functools.partial(global_program, mesh=mesh),
                   in_shardings=tuple(shard(spec) for _, _, spec, _ in INPUTS.values()),
                   out_shardings={name: shard(spec) for name, spec in OUTPUTS.items()})


def place(arrays, mesh):
    """The inputs as global arrays on the mesh; each process supplies only its own blocks."""
    placed = []
    for name, (shape, dtype, spec, _) in INPUTS.items():
        whole = np.asarray(arrays[name])
        placed.append(jax.make_array_from_callback(shape, NamedSharding(mesh, spec),
                                                   lambda index, whole=whole: whole[index]))
    return placed


def random_inputs(seed=0):
    """Unit-scale inputs and fan-in-scaled params: the arrays `einpar run --seed` uses."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, (shape, dtype, _, fan_in) in INPUTS.items():
        if jnp.issubdtype(dtype, jnp.floating):  # in float32 (float64 for f64), then rounded
            wide = np.float64 if np.dtype(dtype) == np.float64 else np.float32
            array = rng.standard_normal(shape, dtype=wide)
            if fan_in is not None:
                array *= array.dtype.type(1 / np.sqrt(fan_in))
        elif dtype == jnp.int32:  # ids among the rows they index, other integers in [0, 10)
            array = rng.integers(0, IDS.get(name, 10), size=shape, dtype=np.int32)
        else:
            array = rng.integers(0, 2, size=shape, dtype=np.uint8).view(np.bool_)
        arrays[name] = np.asarray(array).astype(dtype)
    return arrays


def timed(step, args, repeat):
    """(compile seconds, median step seconds) of a jitted function."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, sorted(times)[len(times) // 2]


def use_cpu_devices():
    """Ask JAX for DEVICES CPU devices, before anything starts its backends: without an
    accelerator the program runs on them. Only the CPU backend reads this setting, so an
    accelerator's devices are unchanged; a device count in XLA_FLAGS is left to rule."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        jax.config.update("jax_num_cpu_devices", DEVICES)
    except RuntimeError:  # the backends had started (the module was imported and used first)
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--repeat", type=int, default=10, help="timed steps after one warm-up")
    parser.add_argument("--save", metavar="OUT.npz", help="write the inputs and outputs "
                        "(as in.NAME and out.NAME)")
    args = parser.parse_args(argv)
    if X64:
        jax.config.update("jax_enable_x64", True)
    use_cpu_devices()
    if jax.default_backend() == "cpu" and len(jax.devices()) < DEVICES:
        raise SystemExit(f"run with XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES} "
                         f"for {DEVICES} CPU devices")
    arrays = random_inputs(args.seed)
    mesh = make_mesh()
    placed = place(arrays, mesh)
    outputs = spmd_step(mesh)(*placed)
    expected = jax.jit(global_program)(*(arrays[name] for name in INPUTS))
    for name, value in outputs.items():
        got, want = np.asarray(value, np.float64), np.asarray(expected[name], np.float64)
        scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
        error = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
        print(f"{name}: {value.dtype}{list(value.shape)}, largest difference from the "
              f"whole-array program {error:.3g} (relative)")
    spmd_times = timed(spmd_step(mesh), placed, args.repeat)
    twin_mesh = make_mesh(axis_types=AxisType.Auto)
    gspmd_times = timed(gspmd_step(twin_mesh), place(arrays, twin_mesh), args.repeat)
    for label, (compile_s, step_s) in (("shard_map (einpar)", spmd_times), ("GSPMD twin", gspmd_times)):
        print(f"{label}: compile {compile_s * 1e3:.1f} ms, step {step_s * 1e3:.3f} ms "
              f"(median of {args.repeat})")
    if args.save:
        np.savez(args.save, **{f"in.{n}": a for n, a in arrays.items()},
                 **{f"out.{n}": np.asarray(v) for n, v in outputs.items()})


if __name__ == "__main__":
    main()
'''
