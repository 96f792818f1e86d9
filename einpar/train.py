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

from .ir import Output, Program


def forward_program(program: Program) -> Program:
    """The program as written, without the outputs only a training step has (`w.grad`)."""
    return replace(program, outputs=tuple(o for o in program.outputs if "." not in o.name))


def derive(program: Program) -> Program:
    """The training step of `program`, or `program` itself when it has no loss."""
    training = program.training
    if training is None:
        return program
    forward = program
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
