"""The optimizer's update, appended to a training step (Program -> Program).

`apply_optimizer` takes a program that already computes, for every param
`w`, its gradient as the value `w.grad` (einpar.grad makes it), and appends
the update as ordinary elementwise ops (Maps), so the partitioner, every
backend and the cost model handle it like any other statement:

- SGD, as `torch.optim.SGD` without momentum: `w - lr·(g + wd·w)`.
- AdamW, as `torch.optim.AdamW` computes it (torch/optim/adamw.py, the
  single-tensor path): `m = b1·m + (1−b1)·g`, `v = b2·v + (1−b2)·g²`,
  then `w·(1 − lr·wd) − (lr / (1−b1^t)) · m / (√v / √(1−b2^t) + eps)`,
  which is `w − lr·(m̂/(√v̂ + eps) + wd·w)` with the weight decay taken on
  the pre-update `w` (Loshchilov and Hutter, "Decoupled Weight Decay
  Regularization", 2019). The bias corrections are constants of the step
  number `t` (`Optimizer.step`), computed in double precision as PyTorch does.

State. AdamW reads `w.m` and `w.v`; a param stored below float32 (bf16,
f16, fp8) also reads its float32 master copy `w.master`, the update runs on
the master copy and the param becomes the updated master rounded to its
dtype (mixed precision, Micikevicius et al. 2018). They are inputs of kind
"state", float32 (float64 for a float64 param), shaped and stacked like the
param; einpar.inputs supplies them when a run is given none (zeros, and the
param itself for a master copy). The step outputs `w`, `w.m`, `w.v`,
`w.master` updated; their SSA values are `w.new`, `w.m.new`, ... (user
names never contain dots, so these never collide). The gradient output
`w.grad` is dropped unless the program asked for it (`output w.grad`), so
the gradient need not be delivered whole.

Layouts. State and master copies are in the param's layout; the updated param
is delivered in it. With `shard=AXES` (ZeRO) each axis of AXES that the
param's layout does not already use splits the state and master copy further:
the first dimension, in the param's order and past the repeat dims it is
stacked by, whose block is divisible by the axis's size (after the axes placed
before it), as that dimension's minor-most axis. Where the axis divides no
dimension, it splits the largest block at least its size unevenly (the last
blocks padded, as ZeRO pads a flat buffer); where no block is that long, the
state stays whole over it. The update then runs on each
device's block of the state: the partitioner reduce-scatters the gradient
into it (instead of all-reducing it) and all-gathers the updated param back
to its own layout (ZeRO-1; Rajbhandari et al., "ZeRO", 2020).
"""

from __future__ import annotations

from dataclasses import replace

from .ir import (HALF_DTYPES, Apply, Arg, Const, Map, Op, Operand, Optimizer, Output, Program,
                 Repeat, Scalar, TensorType, Value)
from .layout import Layout, Mesh

# The state an optimizer keeps per param, besides a master copy.
OPTIMIZER_STATE = {"sgd": (), "adamw": ("m", "v")}
MASTER = "master"
GRAD = "grad"
UPDATED = "new"  # the SSA value of an updated param or state: `w.new`, `w.m.new`


def grad_name(param: str) -> str:
    return f"{param}.{GRAD}"


def state_name(param: str, kind: str) -> str:
    """`w.m`, `w.v`, `w.master`: the name of a param's state input (and its output)."""
    return f"{param}.{kind}"


def updated_name(name: str) -> str:
    return f"{name}.{UPDATED}"


def param_of_state(name: str) -> tuple[str, str] | None:
    """("w", "m") for `w.m`; None for a name that is no state's."""
    param, dot, kind = name.rpartition(".")
    if dot and kind in ("m", "v", MASTER) and "." not in param:
        return param, kind
    return None


def needs_master(param: Value) -> bool:
    """A param stored below float32 is updated on a float32 master copy."""
    return param.type.dtype in HALF_DTYPES


def state_dtype(param: Value) -> str:
    return "f64" if param.type.dtype == "f64" else "f32"


def state_layout(param: Value, mesh: Mesh, shard: tuple[str, ...]) -> Layout:
    """The layout of a param's state and master copy: the param's, each axis of `shard` it
    does not use splitting the first dimension (past the stacked repeat dims) whose block it
    divides, else the largest block at least its size, unevenly (the rule in the module
    docstring)."""
    rank = param.type.rank
    layout = param.layout or Layout.replicated(rank)
    layout = Layout(layout.dims)  # a param is never partial; state never is
    for axis in shard:
        if layout.dim_of(axis) is not None:
            continue
        size = mesh.size(axis)
        blocks = layout.local_shape(param.type.shape, mesh)
        dims = range(len(param.stacked_by), rank)
        even = [dim for dim in dims if blocks[dim] % size == 0]
        # No block divides: the largest at least `size` long is split unevenly (padded), as
        # ZeRO splits a flat buffer of any length.
        padded = [dim for dim in dims if blocks[dim] >= size]
        if even or padded:
            layout = layout.split(even[0] if even else max(padded, key=lambda d: blocks[d]), axis)
    return layout


def state_inputs(param: Value, optimizer: Optimizer, mesh: Mesh) -> list[Value]:
    """The state inputs the update of `param` reads, in the order they are declared."""
    kinds = OPTIMIZER_STATE[optimizer.kind] + ((MASTER,) if needs_master(param) else ())
    layout = state_layout(param, mesh, optimizer.shard)
    vtype = TensorType(state_dtype(param), param.type.indices, param.type.shape)
    return [Value(state_name(param.name, kind), vtype, "state", layout, param.span,
                  param.stacked_by) for kind in kinds]


# ---- the update as elementwise expressions


def _c(value: float) -> Const:
    return Const(float(value))


def _add(a: Scalar, b: Scalar) -> Apply:
    return Apply("add", (a, b))


def _sub(a: Scalar, b: Scalar) -> Apply:
    return Apply("sub", (a, b))


def _mul(a: Scalar, b: Scalar) -> Apply:
    return Apply("mul", (a, b))


def _div(a: Scalar, b: Scalar) -> Apply:
    return Apply("div", (a, b))


def _decayed(weight: Scalar, optimizer: Optimizer) -> Scalar:
    """AdamW's decoupled decay of the pre-update weight: `w·(1 − lr·wd)`."""
    return _mul(weight, _c(1 - optimizer.lr * optimizer.wd)) if optimizer.wd else weight


def sgd_expr(optimizer: Optimizer) -> Scalar:
    """Arg 0 the weight, Arg 1 the gradient: `w − lr·(g + wd·w)` (torch.optim.SGD)."""
    grad: Scalar = Arg(1)
    if optimizer.wd:
        grad = _add(grad, _mul(_c(optimizer.wd), Arg(0)))
    return _sub(Arg(0), _mul(_c(optimizer.lr), grad))


def adam_moment_expr(beta: float, squared: bool) -> Scalar:
    """Arg 0 the moment, Arg 1 the gradient: `β·m + (1−β)·g` (or `g·g` for the second)."""
    grad: Scalar = _mul(Arg(1), Arg(1)) if squared else Arg(1)
    return _add(_mul(Arg(0), _c(beta)), _mul(_c(1 - beta), grad))


def adamw_expr(optimizer: Optimizer) -> Scalar:
    """Arg 0 the weight, Arg 1 the updated m, Arg 2 the updated v:
    `w·(1 − lr·wd) − step_size · m / (√v / √(1−b2^t) + eps)`, step_size = lr / (1−b1^t)."""
    t = optimizer.step
    step_size = optimizer.lr / (1 - optimizer.b1 ** t)
    correction2_sqrt = (1 - optimizer.b2 ** t) ** 0.5
    denominator = _add(_div(Apply("sqrt", (Arg(2),)), _c(correction2_sqrt)), _c(optimizer.eps))
    return _sub(_decayed(Arg(0), optimizer), _mul(_c(step_size), _div(Arg(1), denominator)))


# ---- the pass


class _Update:
    def __init__(self, program: Program, optimizer: Optimizer):
        self.program, self.optimizer = program, optimizer
        self.ops: list[Op] = []
        self.inputs: list[Value] = []
        self.outputs: list[Output] = []

    def map(self, name: str, template: Value, dtype: str, operands: list[Value], expr: Scalar,
            stmt: str, layout: Layout | None) -> Value:
        result = Value(name, TensorType(dtype, template.type.indices, template.type.shape),
                       layout=layout)
        # Operands are read positionally in the param's indices (all have the param's shape).
        self.ops.append(Map(result, tuple(Operand(v.name, template.type.indices) for v in operands),
                            expr, stmt, self.optimizer.span))
        return result

    def param(self, param: Value) -> None:
        values = self.program.values
        # The gradient is the value output as `w.grad` (after micro-batches, their mean).
        delivered = {output.name: output.value for output in self.program.outputs}
        name = delivered.get(grad_name(param.name), grad_name(param.name))
        if name not in values:
            raise ValueError(f"the program has no gradient '{grad_name(param.name)}' of param "
                             f"'{param.name}' to update it with")
        grad = values[name]
        state = {value.name.rpartition(".")[2]: value
                 for value in state_inputs(param, self.optimizer, self.program.mesh)}
        self.inputs.extend(state.values())
        layout = state_layout(param, self.program.mesh, self.optimizer.shard)
        dtype = state_dtype(param)
        weight = state.get(MASTER, param)
        weight_name = updated_name(weight.name)
        updated: list[Value] = []
        if self.optimizer.kind == "sgd":
            new_weight = self.map(weight_name, param, weight.type.dtype, [weight, grad],
                                  sgd_expr(self.optimizer), weight.name, layout)
        else:
            opt = self.optimizer
            moments = []
            for kind, beta in (("m", opt.b1), ("v", opt.b2)):
                moment = state[kind]
                moments.append(self.map(updated_name(moment.name), param, dtype, [moment, grad],
                                        adam_moment_expr(beta, kind == "v"), moment.name, layout))
            new_weight = self.map(weight_name, param, weight.type.dtype, [weight, *moments],
                                  adamw_expr(opt), weight.name, layout)
            updated.extend(moments)
        if MASTER in state:
            updated.append(new_weight)
            # The param is the updated master copy rounded to its dtype on storing.
            new_weight = self.map(updated_name(param.name), param, param.type.dtype, [new_weight],
                                  Arg(0), param.name, None)
        param_layout = Layout((param.layout or Layout.replicated(param.type.rank)).dims)
        self.outputs.append(Output(param.name, new_weight.name, param_layout))
        for value in updated:
            self.outputs.append(Output(value.name.removesuffix("." + UPDATED), value.name, layout))


def apply_optimizer(program: Program, optimizer: Optimizer) -> Program:
    """`program` (which computes `w.grad` for every param `w`) with `optimizer`'s update
    appended: new state inputs, the update's ops, and the updated param and state as
    outputs; `w.grad` outputs the program did not ask for are dropped."""
    if optimizer.kind not in OPTIMIZER_STATE:
        raise ValueError(f"unknown optimizer '{optimizer.kind}'")
    if optimizer.step < 1:
        raise ValueError(f"Adam's step number t is at least 1, not {optimizer.step}")
    for axis in optimizer.shard:
        if axis not in program.mesh.names:
            raise ValueError(f"optimizer shard axis '{axis}' is not a mesh axis")
    update = _Update(program, optimizer)
    for param in program.params:
        update.param(param)
    grads = {grad_name(param.name) for param in program.params}
    dropped = {output.value for output in program.outputs
               if output.name in grads and output.span is None}
    kept = tuple(output for output in program.outputs
                 if not (output.name in grads and output.span is None))
    ops = _unpinned(program.ops, dropped - {output.value for output in kept})
    return replace(program, inputs=program.inputs + tuple(update.inputs),
                   ops=ops + tuple(update.ops), outputs=kept + tuple(update.outputs))


def _unpinned(ops: tuple[Op, ...], names: set[str]) -> tuple[Op, ...]:
    """`ops` with the layouts of the values `names` left free: a gradient pinned to its param's
    layout only to be delivered so may then go straight into a sharded update."""
    if not names:
        return ops

    def free(value: Value) -> Value:
        return replace(value, layout=None) if value.name in names and value.layout else value

    out: list[Op] = []
    for op in ops:
        if isinstance(op, Repeat):
            op = replace(op, carried=tuple(replace(c, result=free(c.result)) for c in op.carried),
                         saved=tuple(replace(s, result=free(s.result)) for s in op.saved))
        else:
            op = replace(op, result=free(op.result))
        out.append(op)
    return tuple(out)
