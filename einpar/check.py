"""Check a syntax tree and build the Program IR (the second stage).

The checker resolves names (dims, mesh axes, tensors), binds indices by
position and checks their sizes, infers dtypes, validates layouts against the
mesh, applies `--set` overrides, and turns each statement into SSA ops:

1. `type_expr` (einpar/check_expr.py) builds a typed tree of the right-hand
   side, with the free indices of every node.
2. `place_implicit_sums` (check_expr.py too) applies the summation rule: an index used on the
   right but absent on the left is summed at the smallest subexpression that
   contains all of its uses.
3. `_StatementLowering` turns the typed tree into ops: products under a sum
   become one n-ary `Einsum`, elementwise subtrees fuse into one `Map`.

Errors become diagnostics; the checker reports every independent error it
finds (a statement with an error is skipped and its name poisoned, so one
mistake does not cascade into many). The training declarations are checked
in einpar/check_training.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import Diagnostic, EinparError, Label, Span
from .ir import (COMPARISONS, FLOAT_DTYPES, Apply, Arg, Carried, Cast, Const, Einsum,
                 Library, Map, Operand, Output, Pos, Program, Reduce, Repeat, Route, Take,
                 TensorType, Value, walk_ops)
from .check_expr import (WEAK_FLOAT, WEAK_INT, Abort, ExpressionTyping, Node, did_you_mean,
                         place_implicit_sums, promote)
from .check_decls import DeclarationChecking
from .check_training import TrainingChecker
from .layout import Layout, Mesh
from .syntax import KEYWORDS, MAX_SIZE_DIGITS, deep_recursion, gc_paused
from .syntax import DimDecl, Directive, Module, OutputDecl, Statement, TensorDecl
from .syntax import Repeat as RepeatItem



def parse_overrides(assignments: list[str] | None) -> dict[str, int]:
    """`["D=4096", "tp=8"]` -> {"D": 4096, "tp": 8}; a malformed one is a usage error."""
    overrides: dict[str, int] = {}
    for text in assignments or ():
        for part in text.split():
            name, sep, value = part.partition("=")
            # ASCII digits only: int() also reads other scripts' digits ('٣' is 3).
            if (not sep or not name.isidentifier() or not (value.isascii() and value.isdigit())
                    or int(value) < 1):
                raise EinparError(Diagnostic(
                    "E301", f"cannot read --set '{part}'",
                    hint="write NAME=VALUE with a dim or mesh axis and a positive integer, e.g. --set D=4096 tp=8"),
                    usage=True)
            if len(value) > MAX_SIZE_DIGITS:  # the limit on sizes written in a file
                raise EinparError(Diagnostic(
                    "E223", f"--set {name}={value[:12]}... has {len(value)} digits",
                    hint=f"sizes have at most {MAX_SIZE_DIGITS} digits"), usage=True)
            overrides[name] = int(value)
    return overrides


# ---------------------------------------------------------------- scopes


@dataclass
class _Binding:
    value: Value | None  # None when poisoned by an earlier error
    span: Span | None


@dataclass
class _Scope:
    names: dict[str, _Binding] = field(default_factory=dict)
    parent: "_Scope | None" = None
    repeat_dim: str | None = None
    stacked: list[Value] = field(default_factory=list)  # params declared in this block
    carried: dict[str, str] = field(default_factory=dict)  # outer value name -> program name
    stage_axis: str | None = None  # `repeat L@pp`: the mesh axis its trips are staged over

    def lookup(self, name: str) -> _Binding | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                return scope.names[name]
            scope = scope.parent
        return None

    def owner_of(self, name: str) -> "_Scope | None":
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.names:
                return scope
            scope = scope.parent
        return None


# ---------------------------------------------------------------- the checker


class _RepeatChecking:
    """`repeat L { ... }` blocks: their trips, the values they carry and stack, `remat`, and a
    pipelined block's stage axis (`repeat L@pp`) with the params its stages hold."""

    def repeat(self, item: RepeatItem, scope: _Scope) -> list:
        dim = item.dim
        if dim.text not in self.dims:
            if dim.text in self.dim_spans:
                raise Abort()
            self.fail("E203", f"unknown dimension '{dim}'", dim.span,
                      hint=did_you_mean(dim.text, self.dims) or "declare the trip count with `dim`")
        if item.modifier is not None:
            if item.modifier.text != "remat":
                self.error("E250", f"unknown repeat modifier '{item.modifier}'", item.modifier.span,
                           hint="`repeat L remat { ... }` recomputes each trip in the backward pass")
            else:
                self.remat_repeats.append(item.modifier.span)
        axis = self.stage_axis(item, scope)
        inner = _Scope(parent=scope, repeat_dim=dim.text, stage_axis=axis)
        body = self.body(item.body, inner)
        carried = []
        for outer_value, program_name in inner.carried.items():
            final = inner.names[program_name].value
            if final is None:
                continue
            result = replace(final, name=self.new_value_name(program_name), layout=None)
            carried.append(Carried(outer_value, final.name, result))
            owner = scope.owner_of(program_name)
            owner_binding = owner.names[program_name]
            scope.names[program_name] = _Binding(result, owner_binding.span)
            if owner is not scope:
                scope.carried.setdefault(self._outer_value(scope, program_name), program_name)
        for name, binding in inner.names.items():
            if name not in inner.carried.values():
                self.repeat_locals.setdefault(name, binding.span)
        stacked = tuple(inner.stacked)
        return [Repeat(dim.text, self.dims[dim.text], tuple(carried), stacked, tuple(body), item.span,
                       remat=item.modifier is not None and item.modifier.text == "remat",
                       stage_axis=axis)]

    def _outer_value(self, scope: _Scope, name: str) -> str:
        outer = scope.parent.lookup(name).value
        if outer is None:
            raise Abort()  # the outer definition failed and was reported
        return outer.name

    def stage_axis(self, item: RepeatItem, scope: _Scope) -> str | None:
        """The mesh axis of `repeat L@pp`, checked (E256): one pipelined block, at the top
        level, whose trips the axis divides. The body is checked either way."""
        axis = item.axis
        if axis is None:
            return None
        self.check_axis(axis)
        if scope.repeat_dim is not None:
            self.error("E256", "a pipelined repeat must be at the top level", axis.span,
                       hint=f"split the outer loop's trips over '{axis}' instead, or drop the "
                            f"'@{axis}'")
            return None
        if self.pipeline is not None:
            self.error("E256", "a program has one pipelined repeat", axis.span,
                       hint="put the stages' layers in one `repeat L@pp` block",
                       labels=(Label(self.pipeline[2], "the first one"),))
            return None
        trips, stages = self.dims[item.dim.text], self.mesh.size(axis.text)
        if trips % stages:
            self.error("E256", f"the {trips} trips of '{item.dim}' do not split evenly over "
                               f"{axis}={stages} stages", item.dim.span,
                       hint="pick a trip count the stages divide (use --set to change it)")
        self.pipeline = (axis.text, trips, item.span)
        return axis.text

    def stage_axis_kept(self, program: Program) -> None:
        """E256 where a layout other than a pipelined block's param stacks names its stage
        axis: that axis's coordinates are stages, each holding its own layers."""
        axis, _, span = self.pipeline
        pinned = [(value, value.layout.dims[len(value.stacked_by):]) for value in program.inputs
                  if value.layout is not None]
        pinned += [(op.result, op.result.layout.dims) for op in walk_ops(program.ops)
                   if not isinstance(op, Repeat) and op.result.layout is not None]
        pinned += [(output, output.layout.dims) for output in program.outputs
                   if output.layout is not None]
        for value, dims in pinned:
            if any(axis in axes for axes in dims):
                self.error("E256", f"'{value.name.split('#')[0]}' is split over '{axis}', the "
                                   f"axis of the pipeline's stages", value.span or span,
                           hint=f"each '{axis}' coordinate is a stage holding its own layers: "
                                f"split the value over another axis",
                           labels=(Label(span, "the stages"),))

    def check_staged_param(self, name, scope: _Scope, binding: _Binding) -> None:
        """E256 for a param declared outside a pipelined block and read inside it: no stage
        holds it (each holds its own trips' params)."""
        enclosing: _Scope | None = scope
        while enclosing is not None and name.text not in enclosing.names:
            if enclosing.stage_axis is not None:
                self.fail("E256", f"'{name}' is a param declared outside the pipelined block and "
                                  f"read inside it", name.span,
                          hint=f"declare it inside the block (each stage then holds its own "
                               f"trips' copies, stacked [{enclosing.repeat_dim}@"
                               f"{enclosing.stage_axis}, ...]), or compute with it outside",
                          labels=(Label(binding.span, "declared here"),) if binding.span else ())
            enclosing = enclosing.parent

    def _stacked_view(self, value: Value, stack: list[tuple[str, str | None]]) -> Value:
        if not stack:
            return value
        vtype = value.type
        dims = tuple(d for d, _ in stack)
        stacked_type = TensorType(vtype.dtype, dims + vtype.indices,
                                  tuple(self.dims[d] for d in dims) + vtype.shape)
        splits = tuple((axis,) if axis is not None and self.mesh.size(axis) > 1 else ()
                       for _, axis in stack)
        layout = None
        if value.layout is not None or any(splits):
            inner = value.layout.dims if value.layout is not None else ((),) * len(vtype.indices)
            layout = Layout(splits + inner)
        return replace(value, type=stacked_type, layout=layout, stacked_by=dims)


class _Checker(DeclarationChecking, ExpressionTyping, _RepeatChecking):
    def __init__(self, module: Module, overrides: dict[str, int], source: str):
        self.module = module
        self.file = module.file
        self.overrides = dict(overrides)
        self.source = source
        self.diagnostics: list[Diagnostic] = []
        self.mesh = Mesh()
        self.axis_names: frozenset[str] = frozenset()  # the mesh's, for lookups in O(1)
        self.dims: dict[str, int] = {}
        self.dim_spans: dict[str, Span] = {}
        self.dtype = "f32"
        self.inputs: list[Value] = []
        self.declared_inputs: dict[str, Value] = {}  # name -> its per-trip value, for E230
        self.outputs: list[Output] = []
        self.versions: dict[str, int] = {}
        self.repeat_locals: dict[str, Span] = {}  # names that died with their repeat block
        self.current_lhs: str | None = None  # the name the statement being checked defines
        self.bad_axes: set[str] = set()  # mesh axes whose declaration failed (not reported again)
        self.all_definitions = self._collect_definitions(module.items)
        # The training declarations, checked after the statements (check_training.py).
        self.directives: list[Directive] = []
        self.remat: list[tuple] = []  # (modifier, statement name) of `remat p[...] = ...`
        self.remat_repeats: list[Span] = []
        self.grad_outputs: list[OutputDecl] = []
        # The pipelined repeat (`repeat L@pp`), if any: (axis, trips, its span).
        self.pipeline: tuple[str, int, Span] | None = None

    # ---- diagnostics

    def error(self, code: str, message: str, span: Span | None, hint: str | None = None,
              labels: tuple[Label, ...] = ()) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, hint, labels))

    def fail(self, *args, **kwargs):
        self.error(*args, **kwargs)
        raise Abort()

    def _collect_definitions(self, items) -> dict[str, Span]:
        found: dict[str, Span] = {}
        for item in items:
            if isinstance(item, TensorDecl):
                found.setdefault(item.spec.name.text, item.spec.name.span)
            elif isinstance(item, Statement):
                found.setdefault(item.lhs.name.text, item.lhs.name.span)
            elif isinstance(item, RepeatItem):
                for name, span in self._collect_definitions(item.body).items():
                    found.setdefault(name, span)
        return found

    # ---- pass 1: mesh, dims, dtype

    # ---- names

    def new_value_name(self, name: str) -> str:
        version = self.versions.get(name, 0) + 1
        self.versions[name] = version
        return name if version == 1 else f"{name}#{version}"

    def declare_check(self, name, scope: _Scope, allow_redefinition: bool) -> _Binding | None:
        """E230 for a name defined twice (repeat bodies may redefine); returns the old binding."""
        previous = scope.lookup(name.text)
        if previous is not None and not allow_redefinition:
            self.fail("E230", f"'{name}' is already defined", name.span,
                      hint="each tensor is defined once; give this one a new name",
                      labels=(Label(previous.span, "first defined here"),) if previous.span else ())
        return previous

    # ---- pass 2: tensors, statements, repeat, outputs

    def body(self, items, scope: _Scope) -> list:
        ops: list = []
        for item in items:
            try:
                if isinstance(item, TensorDecl):
                    self.tensor_decl(item, scope)
                elif isinstance(item, Statement):
                    ops.extend(self.statement(item, scope))
                elif isinstance(item, RepeatItem):
                    ops.extend(self.repeat(item, scope))
                elif isinstance(item, OutputDecl):
                    if scope.repeat_dim is not None:
                        self.fail("E236", "an output cannot be declared inside repeat", item.span,
                                  hint="declare outputs after the block")
                elif isinstance(item, Directive):
                    if scope.repeat_dim is not None:
                        self.fail("E236", f"'{item.word}' is declared outside repeat blocks",
                                  item.span, hint="a training step has one loss, optimizer and "
                                                  "micro-batch count, declared at the top level")
                    self.directives.append(item)
                elif scope.repeat_dim is not None:
                    self.fail("E236", "mesh, dim and dtype are declared outside repeat blocks", item.span)
            except RecursionError:
                self.error("E101", "this statement is nested too deeply to follow", item.span,
                           hint="split it into several statements")
                if isinstance(item, Statement):
                    self.poison(item.lhs.name, scope)
            except Abort:
                if isinstance(item, Statement):
                    self.poison(item.lhs.name, scope)
                elif isinstance(item, TensorDecl):
                    self.poison(item.spec.name, scope)
        return ops

    def poison(self, name, scope: _Scope) -> None:
        if scope.lookup(name.text) is None:
            scope.names[name.text] = _Binding(None, name.span)

    def tensor_decl(self, item: TensorDecl, scope: _Scope) -> None:
        spec = item.spec
        if spec.name.text in KEYWORDS:
            self.fail("E100", f"'{spec.name}' is a keyword and cannot name a tensor", spec.name.span,
                      hint="keywords are " + ", ".join(KEYWORDS))
        self.declare_check(spec.name, scope, allow_redefinition=False)
        # Inputs and params are named once per program, whatever the scope: input files and
        # the backends key their arrays by name (a block's param is not visible after the
        # block, but its stacked array is still the program's `w`).
        declared = self.declared_inputs.get(spec.name.text)
        if declared is not None:
            self.fail("E230", f"'{spec.name}' is already declared as {'a' if declared.kind == 'param' else 'an'} "
                              f"{declared.kind}", spec.name.span,
                      hint="inputs and params are named once per program (arrays are passed by "
                           "name); give this one a new name",
                      labels=(Label(declared.span, "first declared here"),) if declared.span else ())
        if scope.repeat_dim is not None and item.kind == "input":
            self.fail("E236", "inputs are declared outside repeat blocks", item.span,
                      hint="a `param` inside repeat gets one copy per trip; an input does not")
        if spec.pin is not None:
            article = "an" if item.kind == "input" else "a"
            self.error("E225", f"braces on {article} {item.kind}", spec.pin.span,
                       hint=f"{article} {item.kind}'s layout is its `@` annotations; braces pin the "
                            "result of a statement, as in y[B,D]{sum: tp} = ...")
        shape = tuple(self.dim_size(index.name) for index in spec.indices)
        layout = self.check_layout(spec.indices, shape, f"'{spec.name}'")
        dtype = self.check_dtype(item.dtype) or self.dtype
        indices = tuple(index.name.text for index in spec.indices)
        per_trip = Value(spec.name.text, TensorType(dtype, indices, shape), item.kind, layout,
                         spec.name.span)
        self.versions[spec.name.text] = 1
        scope.names[spec.name.text] = _Binding(per_trip, spec.name.span)
        # Inside repeat blocks, the program takes the param stacked by every enclosing
        # repeat dim; each block sees it stacked by the blocks nested inside it.
        # A pipelined block's stack is split over its stage axis ([L@pp, ...]): each stage
        # holds its own trips' params.
        deeper: list[tuple[str, str | None]] = []
        enclosing: _Scope | None = scope
        while enclosing is not None:
            if enclosing.repeat_dim is not None:
                enclosing.stacked.append(self._stacked_view(per_trip, deeper))
                deeper.insert(0, (enclosing.repeat_dim, enclosing.stage_axis))
            enclosing = enclosing.parent
        self.inputs.append(self._stacked_view(per_trip, deeper))
        self.declared_inputs[spec.name.text] = per_trip

    def lookup_tensor(self, name, scope: _Scope) -> Value:
        binding = scope.lookup(name.text)
        if binding is None:
            if name.text in self.repeat_locals:
                self.fail("E234", f"'{name}' is defined inside a repeat block and cannot be used after it",
                          name.span, hint="only names defined before the block and redefined in it "
                                          "leave it (loop-carried values)",
                          labels=(Label(self.repeat_locals[name.text], "defined here"),))
            if name.text in self.all_definitions:
                if name.text == self.current_lhs:
                    hint = (f"a statement cannot read the value it defines; define '{name}' before "
                            + ("the repeat block, so that the block carries it from trip to trip"
                               if scope.repeat_dim is not None else "this statement"))
                else:
                    hint = "move the definition above this use"
                self.fail("E231", f"'{name}' is used before its definition", name.span, hint=hint,
                          labels=(Label(self.all_definitions[name.text], "defined here"),))
            self.fail("E201", f"unknown tensor '{name}'", name.span,
                      hint=did_you_mean(name.text, self.all_definitions)
                      or "declare it with `input` or `param`, or define it with a statement")
        if binding.value is None:
            raise Abort()  # poisoned by an earlier error, already reported
        if binding.value.kind == "param":
            self.check_staged_param(name, scope, binding)
        return binding.value

    # ---- statements

    def statement(self, item: Statement, scope: _Scope) -> list:
        lhs = item.lhs
        self.current_lhs = lhs.name.text
        in_repeat = scope.repeat_dim is not None
        previous = self.declare_check(lhs.name, scope, allow_redefinition=in_repeat)
        if previous is not None and previous.value is not None and previous.value.kind == "param" \
                and scope.owner_of(lhs.name.text) is scope:
            self.fail("E230", f"'{lhs.name}' is a param of this block and cannot be redefined",
                      lhs.name.span, labels=(Label(previous.span, "declared here"),))
        seen: dict[str, Span] = {}
        for index in lhs.indices:
            if index.name.text in seen:
                self.fail("E212", f"index '{index.name}' appears twice on the left of '{lhs.name}'",
                          index.name.span, labels=(Label(seen[index.name.text], "first here"),))
            seen[index.name.text] = index.name.span
        shape = tuple(self.dim_size(index.name) for index in lhs.indices)
        layout = self.check_layout(lhs.indices, shape, f"'{lhs.name}'", lhs.pin)
        cast = self.check_dtype(item.dtype)
        rhs = self.type_expr(item.rhs, scope)
        out_indices = tuple(index.name.text for index in lhs.indices)
        summed = tuple(i for i in rhs.free if i not in out_indices)
        rhs = place_implicit_sums(rhs, summed)
        dtype = cast or self.resolve_weak(rhs.dtype)
        result_type = TensorType(dtype, out_indices, shape)
        if previous is not None and previous.value is not None:
            old = previous.value.type
            if (old.shape, old.dtype) != (result_type.shape, result_type.dtype):
                self.fail("E235", f"'{lhs.name}' is redefined as {result_type} but was {old}",
                          lhs.span, hint="a value redefined in a repeat block keeps its shape and dtype",
                          labels=(Label(previous.span, "first defined here"),) if previous.span else ())
        name = self.new_value_name(lhs.name.text)
        if item.modifier is not None:
            self.remat.append((item.modifier, lhs.name.text))
        result = Value(name, result_type, "def", layout, lhs.name.span)
        lowering = _StatementLowering(self, lhs.name.text, item.span, name)
        ops = constrain_inner_ops(lowering.lower_statement(rhs, result), result)
        if previous is not None and scope.owner_of(lhs.name.text) is not scope:
            scope.carried.setdefault(self._outer_value(scope, lhs.name.text), lhs.name.text)
        scope.names[lhs.name.text] = _Binding(result, lhs.name.span)
        return ops

    def run(self) -> Program:
        self.declarations()
        top = _Scope()
        ops = self.body(self.module.items, top)
        seen: dict[str, Span] = {}
        for item in self.module.items:
            if isinstance(item, OutputDecl):
                try:
                    self.output(item, top, seen)
                except Abort:
                    pass
        program = Program(self.file, self.mesh, tuple(self.dims.items()), self.dtype,
                          tuple(self.inputs), tuple(ops), tuple(self.outputs), self.source)
        if self.pipeline is not None:
            self.stage_axis_kept(program)
        top_values = {name: binding.value for name, binding in top.names.items()}  # None: failed
        aliases = {binding.name.text: binding.alias.text for item in self.module.items
                   if isinstance(item, DimDecl) for binding in item.bindings if binding.alias}
        training = TrainingChecker(self.error, program, self.dims, aliases).check(
            self.directives, self.remat, self.remat_repeats, self.grad_outputs, top_values)
        if self.diagnostics:
            self.diagnostics.sort(key=lambda d: (d.span.line, d.span.col) if d.span else (0, 0))
            raise EinparError(self.diagnostics)
        return replace(program, training=training)


# ---------------------------------------------------------------- typed tree -> ops


def constrain_inner_ops(ops: list, result: Value) -> list:
    """The statement's layout on the ops inside it that the result is computed from alone.

    A statement lowered to several ops (`s = q*k / sqrt(K)`: a contraction, then a map
    of it) constrains, besides its last op, each op up the chain of ops with its indices
    that feed it: walking back from the last op, while an op reads exactly one value with
    the left side's indices (in any order) and this statement computed it, that value is
    asked for the same splits, so the compiler does not move the operands of the
    contraction to another layout and back. Where an op reads two such values (a
    residual add, `x = x + h*w`), the chain stops: which one to move is the compiler's
    choice to make. A partial pin stays on the op that produces the result (the scaled
    contraction of `lower_statement` carries it already); inner ops are asked for their
    splits only.
    """
    layout = result.layout
    if layout is None or len(ops) < 2:
        return ops
    split = dict(zip(result.type.indices, layout.dims))
    wanted = sorted(result.type.indices)
    position = {op.result.name: i for i, op in enumerate(ops)}
    ops = list(ops)
    current = ops[-1]
    while True:
        full = [operand for operand in current.operands if sorted(operand.indices) == wanted]
        if len(full) != 1 or full[0].value not in position:
            return ops
        i = position[full[0].value]
        inner = ops[i].result
        if inner.layout is None:
            inner = replace(inner, layout=Layout(tuple(split[index] for index in inner.type.indices)))
            ops[i] = replace(ops[i], result=inner)
        current = ops[i]


class _StatementLowering:
    """Emit the ops of one statement: einsums for products under sums, fused maps."""

    def __init__(self, checker: _Checker, stmt: str, span: Span, prefix: str):
        self.checker = checker
        self.stmt = stmt
        self.prefix = prefix  # the statement's SSA name: temporaries are prefix.1, prefix.2, ...
        self.span = span
        self.ops: list = []
        self.temps = 0

    def temp_value(self, free: tuple[str, ...], dtype: str) -> Value:
        self.temps += 1
        shape = tuple(self.checker.dims[i] for i in free)
        return Value(f"{self.prefix}.{self.temps}", TensorType(self.resolve(dtype), free, shape))

    def resolve(self, dtype: str) -> str:
        return self.checker.resolve_weak(dtype)

    def lower_statement(self, root: Node, result: Value) -> list:
        indices = result.type.indices
        natural = self.resolve(root.dtype)
        wanted = result.type.dtype
        # A widening annotation (bf16 operands, `: f32` result) is computed in the wide type,
        # as an accumulator would be; a narrowing one rounds the finished value once.
        computes_in_wanted = natural == wanted or (
            wanted in FLOAT_DTYPES and natural in FLOAT_DTYPES
            and promote(natural, wanted, self.checker.default_float) == wanted)
        if root.kind in ("reduce", "library", "route", "take") and set(root.free) == set(indices) \
                and computes_in_wanted:
            # The statement's own op produces the result directly, in the left-hand side's order.
            scale = self.emit_structured(root, result)
            if scale is not None:
                # Constant factors of a product under a sum: scale the contraction after. The
                # contraction takes the statement's whole layout, partial pin included: scaling
                # is linear, so a pinned partial sum can only come from the contraction itself.
                temp = replace(result, name=self.temp_value(indices, result.type.dtype).name)
                self.ops[-1] = replace(self.ops[-1], result=temp)
                expr = Apply("mul", (Arg(0), scale))
                self.ops.append(Map(result, (Operand(temp.name, indices),), expr, self.stmt, self.span))
            return self.ops
        operands: list[Operand] = []
        expr = self.lower(root, operands)
        if self.resolve(root.dtype) != result.type.dtype:
            expr = Cast(result.type.dtype, expr)
        self.ops.append(Map(result, tuple(operands), expr, self.stmt, self.span))
        return self.ops

    def lower(self, node: Node, operands: list[Operand]):
        """The node as a scalar expression over `operands` (the Map being built)."""
        if node.kind == "ref":
            return Arg(self.add_operand(operands, node.operand))
        if node.kind == "const":
            return Const(node.value, node.label)
        if node.kind == "pos":
            return Pos(node.over[0])
        if node.kind == "apply":
            args = []
            target = self.resolve(node.dtype) if node.dtype not in (WEAK_INT, WEAK_FLOAT) else None
            for position, child in enumerate(node.children):
                arg = self.lower(child, operands)
                if node.fn in COMPARISONS:
                    other = node.children[1 - position].dtype
                    want = promote(child.dtype, other, self.checker.default_float)
                    want = want if want not in (WEAK_INT, WEAK_FLOAT) else None
                elif node.fn == "where" and position == 0:
                    want = None
                else:
                    want = target
                if want and child.dtype not in (WEAK_INT, WEAK_FLOAT, want):
                    arg = Cast(want, arg)
                args.append(arg)
            if node.fn == "mul":  # n-ary in the typed tree, binary in the IR
                expr = args[0]
                for arg in args[1:]:
                    expr = Apply("mul", (expr, arg))
                return expr
            return Apply(node.fn, tuple(args))
        # sums, reductions, library ops and routing are ops of their own
        value = self.temp_value(node.free, node.dtype)
        scale = self.emit_structured(node, value)
        expr = Arg(self.add_operand(operands, Operand(self.ops[-1].result.name, node.free)))
        return Apply("mul", (expr, scale)) if scale is not None else expr

    @staticmethod
    def add_operand(operands: list[Operand], operand: Operand) -> int:
        if operand in operands:
            return operands.index(operand)
        operands.append(operand)
        return len(operands) - 1

    def materialize(self, node: Node) -> Operand:
        """The node as a value of its own (a plain reference needs no op)."""
        if node.kind == "ref":
            return node.operand
        if node.kind not in ("apply", "pos", "const"):
            value = self.temp_value(node.free, node.dtype)
            scale = self.emit_structured(node, value)
            operand = Operand(self.ops[-1].result.name, node.free)
            if scale is None:
                return operand
            operands = [operand]
            expr = Apply("mul", (Arg(0), scale))
        else:
            operands = []
            expr = self.lower(node, operands)
        value = self.temp_value(node.free, node.dtype)
        self.ops.append(Map(value, tuple(operands), expr, self.stmt, node.span))
        return Operand(value.name, node.free)

    def emit_structured(self, node: Node, result: Value):
        """Emit the op for a reduce/library/route node into `result`.

        Returns a constant factor the caller must still multiply the result by
        (the constants of a product under a sum), or None.
        """
        child = node.children[0]
        if node.kind == "take":
            table, ids = (self.materialize(c) for c in node.children)
            self.ops.append(Take(result, table, ids, node.over[0], self.stmt, node.span))
            return None
        if node.kind == "library":
            operand = self.materialize(child)
            self.ops.append(Library(result, node.fn, operand, node.over[0], self.stmt, node.span))
            return None
        if node.kind == "route":
            operand = self.materialize(child)
            expert, capacity = node.over
            self.ops.append(Route(result, operand, expert, capacity, node.k, self.stmt, node.span))
            return None
        if node.fn in ("sum", "mean") and child.kind == "apply" and child.fn == "mul":
            factors = self.flatten_product(child)
            constants = [f for f in factors if f.is_constant]
            tensors = [f for f in factors if not f.is_constant]
            scale = None
            for factor in constants:
                term = self.lower(factor, [])
                scale = term if scale is None else Apply("mul", (scale, term))
            if node.fn == "mean":
                count = 1
                for index in node.over:
                    count *= self.checker.dims[index]
                mean_scale = Apply("div", (Const(1.0), Const(count)))
                scale = mean_scale if scale is None else Apply("mul", (scale, mean_scale))
            if len(tensors) >= 2:
                operands = tuple(self.materialize(f) for f in tensors)
                self.ops.append(Einsum(result, operands, self.stmt, node.span))
                return scale
            if len(tensors) == 1:
                operand = self.materialize(tensors[0])
                self.ops.append(Reduce(result, "sum", operand, node.over, self.stmt, node.span))
                return scale
        operand = self.materialize(child)
        self.ops.append(Reduce(result, node.fn, operand, node.over, self.stmt, node.span))
        return None

    def flatten_product(self, node: Node) -> list[Node]:
        if node.kind == "apply" and node.fn == "mul":
            return [f for child in node.children for f in self.flatten_product(child)]
        return [node]


def check(module: Module, overrides: dict[str, int] | None = None, source: str = "") -> Program:
    """Check a parsed module and build its Program; raises EinparError with diagnostics. A
    program with a loss becomes its training step (einpar/train.py)."""
    from .train import derive

    with gc_paused(), deep_recursion():
        return derive(_Checker(module, overrides or {}, source).run())
