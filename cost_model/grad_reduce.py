"""Overlapping a training step's gradient reductions with its last backward pass.

As written, a training step reduces its gradients over the data-parallel axes after the
backward loop of the last micro-batch: each reduction reads the whole stacked gradient, so
it waits for the loop's end. Data-parallel trainers instead reduce each layer's gradient as
soon as the last micro-batch's backward has made it (PyTorch DDP's gradient buckets, Li et
al., "PyTorch Distributed", VLDB 2020; Megatron-LM's `--overlap-grad-reduce`), so the
reductions run beside the rest of that backward pass.

Priced here in closed form from the step's own figures: the backward pass of b seconds
makes its l layers' gradients one by one (one every b/l), and the reductions of R seconds
go out layer by layer (R/l each) on the network as they are made. The last layer's
reduction starts when the pass ends, so at least R/l stays exposed; when the reductions are
slower than the pass they end R + b/l after it began. Exposed:
max(R/l, R − b·(l−1)/l); the rest of R is hidden. What comes after the loop (the optimizer's
update) still runs after the reductions it reads.

With ZeRO (`optimizer ... shard=`), the updated params are gathered back after the update.
In a run of many steps those gathers overlap the next step's first forward pass, each
layer's before that layer runs (Megatron-LM's `--overlap-param-gather`, PyTorch FSDP's
forward prefetch), priced the same way against the first forward loop: at most
max(G/l, G − f·(l−1)/l) of the G seconds of gathers stays exposed per step.
"""

from __future__ import annotations

from einpar.spmd import CollectiveStep, LocalStep, RepeatStep

from .regions import FusedStep

REDUCTIONS = ("all_reduce", "reduce_scatter")


def exposed_reduction(reduce_s: float, backward_s: float, layers: int) -> float:
    """Seconds of `reduce_s` of gradient reductions left after a backward pass of
    `backward_s` seconds that makes `layers` layers' gradients one by one."""
    if layers <= 1:
        return reduce_s
    return max(reduce_s / layers, reduce_s - backward_s * (layers - 1) / layers)


def overlapped_tail(tail_s: float, reduce_s: float, update_s: float, backward_s: float,
                    layers: int, gather_s: float = 0.0, forward_s: float = 0.0,
                    forward_layers: int = 1) -> float:
    """The time after the backward pass, `tail_s` as written (reductions `reduce_s`, the
    update's compute `update_s`, ZeRO's gathers of the updated params `gather_s`), once the
    reductions overlap the pass and the gathers the next step's first forward pass
    (`forward_s` over `forward_layers` layers)."""
    hidden = reduce_s - exposed_reduction(reduce_s, backward_s, layers)
    hidden += gather_s - exposed_reduction(gather_s, forward_s, forward_layers)
    return max(tail_s - hidden, update_s)


def is_reduction(step) -> bool:
    return isinstance(step, CollectiveStep) and step.kind in REDUCTIONS


def tail_parts(priced) -> tuple[float, float, float]:
    """(reductions, update compute, gathers of updated params) of the steps after the loops,
    in seconds. The gathers counted are those whose result no later step reads: the updated
    params delivered to their layout (ZeRO); a gather of a gradient the update reads is not."""
    read = set()
    for step, _ in priced:
        read.update(_reads(step))
    reduce_s = sum(cost.comm_s for step, cost in priced if is_reduction(step))
    gather_s = sum(cost.comm_s for step, cost in priced
                   if isinstance(step, CollectiveStep) and step.kind == "all_gather"
                   and step.dst not in read)
    update_s = sum(cost.compute_s for step, cost in priced if not isinstance(step, RepeatStep))
    return reduce_s, update_s, gather_s


def _reads(step) -> tuple[str, ...]:
    if isinstance(step, CollectiveStep):
        return (step.src,)
    if isinstance(step, LocalStep):
        return tuple(operand.value for operand in step.op.operands)
    if isinstance(step, FusedStep):
        return tuple(step.reads)
    return ()


def forward_loop(priced):
    """The first forward loop of a priced step list (the first micro-batch's): the first
    top-level repeat, or the first repeat inside it when it is the micro-batch loop."""
    for step, cost in priced:
        if isinstance(step, RepeatStep):
            inner = [entry for entry in cost if isinstance(entry[0], RepeatStep)]
            if inner:
                return inner[0]
            return None if step.reverse else (step, cost)
    return None


def backward_loop(priced) -> tuple[int, object] | None:
    """(position, the reverse repeat) of the last backward loop in a priced step list: a
    top-level reverse repeat, or the last one inside a top-level repeat (the micro-batch
    loop); None for a step without one."""
    found = None
    for position, (step, cost) in enumerate(priced):
        if not isinstance(step, RepeatStep):
            continue
        if step.reverse:
            found = (position, (step, cost))
        else:
            inner = [entry for entry in cost if isinstance(entry[0], RepeatStep) and entry[0].reverse]
            if inner:
                found = (position, inner[-1])
    return found


def compute_time(priced) -> float:
    """Seconds of compute of one run of priced steps (a nested repeat's trips counted)."""
    total = 0.0
    for step, cost in priced:
        if isinstance(step, RepeatStep):
            total += step.count * compute_time(cost)
        else:
            total += cost.compute_s
    return total
