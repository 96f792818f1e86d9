"""Fused regions: what one is (`FusedStep`), which local steps may join one, and how steps
group into regions from their reads and writes alone (`group`). cost_model/fusion.py runs
the pass; cost_model/attention_match.py finds the flash-attention regions it keeps whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from einpar.ir import Einsum, Map, Reduce
from einpar.spmd import CollectiveStep, LocalStep, RepeatStep

from .attention import AttentionShape


@dataclass(frozen=True)
class FusedStep:
    """Local steps that run as one kernel."""

    # "fused" (a loop/input fusion), "flash_attention" or "flash_attention_backward"
    kind: str
    members: tuple[LocalStep, ...]  # in program order
    reads: tuple[str, ...]  # values it reads from HBM: made outside it
    writes: tuple[str, ...]  # values it writes to HBM: read outside it, outputs, carried
    shape: AttentionShape | None = None  # a flash-attention region's problem
    # A backward region's recomputation: steps of the forward region (the scores and the
    # probabilities) it runs again on chip instead of reading their S×T results.
    recomputed: tuple[LocalStep, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(step.op.result.name for step in self.members)

    @property
    def internal(self) -> tuple[str, ...]:
        """Values made and used inside: they never live in HBM."""
        return tuple(name for name in self.names if name not in self.writes)

    def describe(self) -> str:
        """`fused(a, b, c)`: the steps it runs; `flash_attention(q, k, v -> o)`: what the
        kernel reads and writes (its steps are the scores and softmax it never stores)."""
        if self.kind in ("flash_attention", "flash_attention_backward"):
            return f"{self.kind}({', '.join(self.reads)} -> {', '.join(self.writes)})"
        return f"{self.kind}({', '.join(self.names)})"

    @property
    def recomputes(self) -> tuple[str, ...]:
        """The forward values a backward region makes again on chip."""
        return tuple(step.op.result.name for step in self.recomputed)



# ---- grouping, from reads and writes alone


@dataclass(frozen=True)
class Node:
    """A step as grouping sees it."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]
    fusible: bool


def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def group(nodes: Sequence[Node], fixed: Sequence[Sequence[int]] = ()) -> list[tuple[int, ...]]:
    """Positions of `nodes` (steps in program order) in fused regions, each region's positions
    ascending, regions ordered by their first position. `fixed` are regions decided already
    (flash attention): kept whole and fused with nothing else."""
    count = len(nodes)
    producer: dict[str, int] = {}
    for position, node in enumerate(nodes):
        for name in node.writes:
            producer[name] = position
    ancestors = [0] * count  # bit p: node p is upstream of this node
    preds: list[list[int]] = []
    for position, node in enumerate(nodes):
        mine = sorted({producer[name] for name in node.reads
                       if name in producer and producer[name] < position})
        preds.append(mine)
        for p in mine:
            ancestors[position] |= ancestors[p] | (1 << p)
    region = list(range(count))  # node -> region id
    members = {position: 1 << position for position in range(count)}
    upstream = {position: ancestors[position] for position in range(count)}
    fusible = {position: nodes[position].fusible for position in range(count)}

    def between(mask: int, up: int) -> bool:
        """Whether a node outside `mask` is both downstream and upstream of it."""
        low = (mask & -mask).bit_length() - 1
        outside = up & ~mask & ~((1 << low) - 1)  # a node on a path lies after the first member
        return any(ancestors[x] & mask for x in _bits(outside))

    def merge(a: int, b: int, force: bool = False) -> bool:
        mask, up = members[a] | members[b], upstream[a] | upstream[b]
        if not force and between(mask, up):
            return False
        keep, gone = min(a, b), max(a, b)
        members[keep], upstream[keep] = mask, up
        for x in _bits(members[gone]):
            region[x] = keep
        del members[gone], upstream[gone], fusible[gone]
        return True

    for positions in fixed:
        positions = sorted(positions)
        mask = 0
        for p in positions:
            mask |= 1 << p
        if between(mask, 0 if not positions else _or(ancestors[p] for p in positions)):
            continue  # a step outside runs between its parts: price them apart
        for p in positions[1:]:
            merge(region[positions[0]], region[p], force=True)
        fusible[region[positions[0]]] = False
    for position in range(count):
        if not nodes[position].fusible or not fusible.get(region[position], False):
            continue
        for p in preds[position]:
            mine, theirs = region[position], region[p]
            if mine != theirs and fusible.get(theirs, False):
                merge(mine, theirs)
    return sorted(tuple(_bits(mask)) for mask in members.values())


def _or(masks) -> int:
    total = 0
    for mask in masks:
        total |= mask
    return total



# ---- which local steps fuse


def is_contraction(op) -> bool:
    return isinstance(op, Einsum) and len(op.operands) > 1 and bool(op.summed)


def fusible(step) -> bool:
    """Elementwise maps and casts, reductions, and einsums that are one of those."""
    if not isinstance(step, LocalStep):
        return False
    op = step.op
    return isinstance(op, (Map, Reduce)) or (isinstance(op, Einsum) and not is_contraction(op))


def step_reads(step) -> tuple[str, ...]:
    if isinstance(step, LocalStep):
        return tuple(operand.value for operand in step.op.operands)
    if isinstance(step, CollectiveStep):
        return (step.src,)
    if isinstance(step, FusedStep):
        return step.reads
    assert isinstance(step, RepeatStep)
    made = {name for inner in walk(step.body) for name in step_writes(inner)}
    made |= {inside for _, inside, _, _ in step.carried} | {inner for _, inner in step.stacked}
    outer = [before for before, _, _, _ in step.carried] + [param for param, _ in step.stacked]
    inner_reads = [name for inner in walk(step.body) if not isinstance(inner, RepeatStep)
                   for name in step_reads(inner) if name not in made]
    return tuple(dict.fromkeys(outer + inner_reads))


def step_writes(step) -> tuple[str, ...]:
    if isinstance(step, LocalStep):
        return (step.op.result.name,)
    if isinstance(step, CollectiveStep):
        return (step.dst,)
    if isinstance(step, RepeatStep):
        return tuple(after for _, _, _, after in step.carried) + tuple(after for _, after in step.saved)
    return tuple(step.writes)


def walk(steps):
    for step in steps:
        yield step
        if isinstance(step, RepeatStep):
            yield from walk(step.body)


