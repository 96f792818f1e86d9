"""Gradient accumulation over micro-batches (`microbatches B=M`), Program -> Program.

The forward program is first made a micro-batch's (`one_microbatch`: the
batch index `B` of size B/M everywhere, so a `mean` over it divides by a
micro-batch's rows); the gradient pass runs on that; then `accumulate` puts
the whole forward and backward program in one `repeat` of M trips over a new
index `B.micro`, before the optimizer's update. Every input with
`B` is taken stacked, `[B.micro, B/M, ...]` (the user still supplies it as
`[B, ...]`: micro-batch m is rows m·B/M ... (m+1)·B/M − 1), and the loop
carries one float32 accumulator per gradient and one for the loss (in the
layout asked of the output, a partial sum over the batch axes that layout does
not split: `_accumulated`). After the
loop each is divided by M: the step's loss is the mean of the micro-batches'
losses, and its gradients are those of that mean, which for a loss that is a
mean over `B` are the whole batch's (a sum over `B` gives 1/M of it).

Nothing else changes: params are read inside the loop from outside it, so the
partitioner and the cost model see (and price) a weight gather that happens
per micro-batch, and the update after the loop runs once.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

import numpy as np

from .ir import (Apply, Arg, Carried, Cast, Const, Einsum, Map, Operand, Program, Reduce, Repeat,
                 TensorType, Value)
from .layout import Layout


def micro_index(index: str) -> str:
    """The index that counts micro-batches (a dotted name: no user name has a dot)."""
    return f"{index}.micro"


def split_inputs(program: Program, index: str, count: int) -> tuple[tuple[Value, ...], tuple[Value, ...]]:
    """The step's inputs (those with `index` stacked by the micro-batch index) and the
    per-micro-batch views the loop body reads."""
    micro = micro_index(index)
    inputs, views = [], []
    for value in program.inputs:
        if value.kind != "input" or index not in value.type.indices:
            inputs.append(value)
            continue
        vtype = value.type
        stacked = TensorType(vtype.dtype, (micro,) + vtype.indices, (count,) + vtype.shape)
        layout = Layout(((),) + value.layout.dims) if value.layout is not None else None
        inputs.append(replace(value, type=stacked, layout=layout, stacked_by=(micro,)))
        views.append(value)  # inside the loop the input's name is one micro-batch
    return tuple(inputs), tuple(views)


def one_microbatch(program: Program, index: str, count: int) -> Program:
    """`program` on one micro-batch: `index` of 1/count its size everywhere. The gradient
    pass runs on this (so a `mean` over the batch divides by a micro-batch's rows)."""
    size = program.dim_sizes[index] // count
    dims = tuple((name, size if name == index else n) for name, n in program.dims)
    return replace(program, dims=dims, inputs=_resized(program.inputs, index, size),
                   ops=_resized(program.ops, index, size))


def accumulate(program: Program, index: str, count: int) -> Program:
    """The training step `program` of one micro-batch (`one_microbatch`; forward and
    backward, outputs the loss and `w.grad`) run as `count` micro-batches along `index`,
    with the mean of each output over them."""
    micro = micro_index(index)
    inputs, views = split_inputs(program, index, count)
    # The mesh axes that split the batch: a param's gradient is a partial sum over them.
    batch_axes = tuple(dict.fromkeys(
        axis for value in program.inputs if value.layout is not None and index in value.type.indices
        for axis in value.layout.dims[value.type.indices.index(index)]
        if program.mesh.size(axis) > 1))
    sums = _sums_over(program, index)
    before, body, after, carried, outputs = [], list(program.ops), [], [], []
    for output in program.outputs:
        result = program.values[output.value]
        rtype = result.type
        work = TensorType("f32" if rtype.dtype != "f64" else "f64", rtype.indices, rtype.shape)
        asked = _accumulated(output, result, batch_axes if sums.get(output.value) else ())
        start = Value(f"{output.name}.acc", work, layout=asked)
        inside = Value(f"{output.name}.acc#2", work, layout=asked)
        final = Value(f"{output.name}.acc#3", work)
        mean = Value(f"{output.name}.mean", rtype)
        every = tuple(rtype.indices)
        # Statements named `w.grad.acc`, not `w.grad`: the accumulators are not the backward
        # pass (whose first op is where FSDP frees gathered params, ir.after_backward_start).
        stmt = f"{output.name}.acc"
        before.append(Map(start, (), Const(0.0), stmt, None))
        body.append(Map(inside, (Operand(start.name, every), Operand(result.name, every)),
                        Apply("add", (Arg(0), Cast(work.dtype, Arg(1)))), stmt, None))
        carried.append(Carried(start.name, inside.name, final))
        after.append(Map(mean, (Operand(final.name, every),), Apply("div", (Arg(0), Const(count))),
                         stmt, None))
        outputs.append(replace(output, value=mean.name))
    loop = Repeat(micro, count, tuple(carried), views, tuple(body))
    return replace(program, dims=program.dims + ((micro, count),), inputs=inputs,
                   ops=tuple(before) + (loop,) + tuple(after), outputs=tuple(outputs))


def _sums_over(program: Program, index: str) -> dict[str, bool]:
    """Per value made at the top level, whether it is a sum over the batch `index` all the
    way down (a contraction or a sum over it, or a linear map of such sums): split over a
    batch axis, each device then makes a partial sum of it, which micro-batches can
    accumulate before reducing. A loop's saved stack is one when each trip's value is (a
    stacked param's gradient, made by the backward loop); a value made whole anyway is
    not."""
    sums: dict[str, bool] = {}
    _sums_in(program.ops, index, sums)
    return sums


def _sums_in(ops, index: str, sums: dict[str, bool]) -> None:
    from .strategies import linear_in

    for op in ops:  # in program order, so every operand is known before its reader
        if isinstance(op, (Einsum, Reduce)):
            summed = op.summed if isinstance(op, Einsum) else op.over
            sums[op.result.name] = index in summed and getattr(op, "kind", "sum") == "sum"
        elif isinstance(op, Map) and op.operands:
            positions = {k for k, o in enumerate(op.operands) if sums.get(o.value)}
            sums[op.result.name] = bool(positions) and linear_in(op.expr, positions) == "partial"
        elif isinstance(op, Repeat):
            _sums_in(op.body, index, sums)
            for saved in op.saved:
                sums[saved.result.name] = sums.get(saved.body_value, False)


def _accumulated(output, result: Value, batch_axes: tuple[str, ...]) -> Layout | None:
    """The layout a gradient is accumulated in across micro-batches: the layout asked of it
    (its param's), and a partial sum over each batch axis that layout does not split. So a
    data-parallel gradient is summed locally and all-reduced once after the last
    micro-batch (Megatron-LM's accumulation, DDP's no_sync), and an FSDP gradient is
    reduce-scattered into its shard every micro-batch (PyTorch FSDP's default)."""
    dims = output.layout.dims if output.layout is not None else ((),) * result.type.rank
    used = {axis for axes in dims for axis in axes}
    partial = tuple((axis, "sum") for axis in batch_axes if axis not in used)
    if output.layout is None and not partial:
        return None  # asked for nothing, and summed whole where it is made
    return Layout(dims, partial)


def _resized(node, index: str, size: int):
    """`node` (ops, and everything in them) with every tensor type's `index` of `size`."""
    if isinstance(node, TensorType):
        if index not in node.indices:
            return node
        return replace(node, shape=tuple(size if i == index else n
                                         for i, n in zip(node.indices, node.shape)))
    if isinstance(node, tuple):
        return tuple(_resized(item, index, size) for item in node)
    if is_dataclass(node) and not isinstance(node, type):
        changes = {}
        for field in fields(node):
            old = getattr(node, field.name)
            new = _resized(old, index, size)
            if new is not old:
                changes[field.name] = new
        return replace(node, **changes) if changes else node
    return node


def merged_shape(value: Value) -> tuple[int, ...] | None:
    """The shape a user gives a micro-batched input in (`[B, ...]`), or None for any other."""
    if value.kind != "input" or not value.stacked_by:
        return None
    (micro,) = value.stacked_by
    index = micro.removesuffix(".micro")
    count, *rest = value.type.shape
    return tuple(n * count if i == index else n for i, n in zip(value.type.indices[1:], rest))


def split_microbatches(value: Value, array):
    """A micro-batched input given as `[..., B, ...]`, as the step takes it: `[M, ..., B/M, ...]`,
    micro-batch m being rows m·B/M ... (m+1)·B/M − 1 of B."""
    (micro,) = value.stacked_by
    axis = value.type.indices[1:].index(micro.removesuffix(".micro"))
    count = value.type.shape[0]
    shape = array.shape[:axis] + (count, array.shape[axis] // count) + array.shape[axis + 1:]
    return np.moveaxis(array.reshape(shape), axis, 0)
