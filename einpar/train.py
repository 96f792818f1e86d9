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

from .ir import Program


def forward_program(program: Program) -> Program:
    """The program as written, without the outputs only a training step has (`w.grad`)."""
    return replace(program, outputs=tuple(o for o in program.outputs if "." not in o.name))


def derive(program: Program) -> Program:
    """The training step of `program`, or `program` itself when it has no loss."""
    training = program.training
    if training is None:
        return program
    from .grad import grad
    from .microbatch import accumulate
    from .optimizer import apply_optimizer

    step = grad(program, training.loss, training.remat)
    if training.microbatches is not None:
        step = accumulate(step, *training.microbatches)
    if training.optimizer is not None:
        step = apply_optimizer(step, training.optimizer)
    return replace(step, training=None, forward=program)
