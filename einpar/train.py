"""Derive a training step from a program with a loss (Program -> Program).

The passes run in the order DESIGN.md gives, each one Program -> Program:

    expand the library ops -> grad (backward) -> micro-batches -> optimizer (update)

The result is an ordinary Program (its `training` is None): the partitioner,
every backend, the cost model and `explain` see ordinary ops, so the backward
pass and the update are partitioned, run and priced like the forward. The
program as written stays at hand as the step's `forward`, for printing and for
the oracles that differentiate it independently.
"""

from __future__ import annotations

from dataclasses import replace

from .ir import Output, Program, Repeat


def forward_program(program: Program) -> Program:
    """The program as written, without the outputs only a training step has (`w.grad`)."""
    return replace(program, outputs=tuple(o for o in program.outputs if "." not in o.name))


def distinct_indices(program: Program) -> Program:
    """`program` with each input and param declared with an index twice (`param w[D, D]`)
    given a fresh name for the repeat (`w[D, D_2]`, `dim D_2` of D's size): the passes
    build ops over whole values from their declared indices (`w.grad[D, D_2] = ...`), and
    an op names each of its dimensions once."""
    taken = set(program.dim_sizes) | set(program.mesh.names)
    dims = list(program.dims)
    inputs = []
    for value in program.inputs:
        indices: list[str] = []
        for index in value.type.indices:
            if index in indices:
                number = 2
                while f"{index}_{number}" in taken:
                    number += 1
                fresh = f"{index}_{number}"
                taken.add(fresh)
                dims.append((fresh, program.dim_sizes[index]))
                index = fresh
            indices.append(index)
        if tuple(indices) != value.type.indices:
            value = replace(value, type=replace(value.type, indices=tuple(indices)))
        inputs.append(value)
    if len(dims) == len(program.dims):
        return program
    renamed = {value.name: value.type.indices for value in inputs}

    def views(ops):  # a repeat's per-trip view of a stacked param: its trailing indices
        out = []
        for op in ops:
            if isinstance(op, Repeat):
                stacked = tuple(replace(view, type=replace(
                    view.type, indices=renamed[view.name][-view.type.rank:]))
                    if view.name in renamed and view.type.rank else view for view in op.stacked)
                op = replace(op, stacked=stacked, body=views(op.body))
            out.append(op)
        return tuple(out)

    return replace(program, dims=tuple(dims), inputs=tuple(inputs), ops=views(program.ops))


def derive(program: Program) -> Program:
    """The training step of `program`, or `program` itself when it has no loss."""
    training = program.training
    if training is None:
        return program
    forward = program
    program = distinct_indices(program)
    from .grad import grad
    from .microbatch import accumulate, one_microbatch
    from .optimizer import apply_optimizer

    # The loss is output under its program name (`s`, not the version `s#3` a repeat made).
    loss = training.loss.split("#")[0]
    if not any(output.name == loss for output in program.outputs):
        program = replace(program, outputs=program.outputs + (Output(loss, training.loss),))
    micro = training.microbatches
    step = grad(program if micro is None else one_microbatch(program, *micro), loss,
                training.remat)
    if micro is not None:
        step = accumulate(step, *micro)
    if training.optimizer is not None:
        step = apply_optimizer(step, training.optimizer)
    return replace(step, training=None, forward=forward)
