"""Fusion: which local steps run as one kernel (SpmdProgram -> SpmdProgram).

A fused region is what XLA's loop and input fusion and PyTorch Inductor's
scheduler make of a chain of elementwise maps, casts and reductions: one
kernel that reads the values it needs from HBM once, keeps its intermediates
in registers and on-chip memory, and writes only what is read outside it
(XLA: "Operation Semantics"/fusion passes in xla/service/gpu/transforms
instruction_fusion, multi_output_fusion; Inductor: torch/_inductor/scheduler.py
can_fuse). Here:

- elementwise maps, casts, reductions and einsums that sum nothing or read one
  operand fuse with the fusible step that makes an operand of theirs
  (producer-consumer fusion); a value read by several fused steps is read
  once (multi-output regions write every value that is read outside them);
- contractions (an einsum that multiplies two or more operands and sums an
  index), collectives, slices, library ops and repeats are never fused with
  their neighbours, and a region never crosses a repeat boundary;
- a merge is refused when some step outside the two regions lies on a path
  between them (the region would need that step's result before it could
  finish itself);
- the attention pattern (a scores einsum summing the head dim, maps and row
  reductions over the key index such as the scale, a mask and the expanded
  softmax, at least one such reduction, and the weighted-sum einsum summing
  the key index) is one
  flash-attention region (Dao et al., "FlashAttention", NeurIPS 2022): it
  reads q, k, v (and any mask) and writes the output; the scores never reach
  HBM;
- its backward pass, as the grad pass writes it (einpar/grad.py): the
  gradient of the probabilities (dP = dO·V), the softmax's derivative maps
  and row sums down to the scores' gradient dS, and the three contractions
  dV = dO·P, dQ = dS·K, dK = dS·Q, is one flash-attention backward region
  (FlashAttention-2, Dao 2023, arXiv:2307.08691, Algorithm 2): it reads q, k,
  v, dO and the row statistics and writes dQ, dK and dV. The scores and
  probabilities are recomputed in the kernel: a `remat` statement's
  recomputation (the scores einsum from q and k and the softmax) joins the
  region; otherwise the region recomputes them from the forward region's
  steps, which then write the output and the row statistics (max, sum) only,
  so no S×T value is kept for the backward pass.

The grouping (`group`) sees only each step's reads, writes and whether it can
fuse, so any step list (a backward pass's too) is grouped the same way; the
attention matcher reads op structure (indices), never value names.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from einpar.ir import Einsum, Map, Reduce
from einpar.spmd import CollectiveStep, LocalStep, RepeatStep, SpmdProgram

from .attention import AttentionShape

FUSION_MODES = ("none", "auto")
DEFAULT_FUSION = "auto"


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


def _reads(step) -> tuple[str, ...]:
    if isinstance(step, LocalStep):
        return tuple(operand.value for operand in step.op.operands)
    if isinstance(step, CollectiveStep):
        return (step.src,)
    if isinstance(step, FusedStep):
        return step.reads
    assert isinstance(step, RepeatStep)
    made = {name for inner in _walk(step.body) for name in _writes(inner)}
    made |= {inside for _, inside, _, _ in step.carried} | {inner for _, inner in step.stacked}
    outer = [before for before, _, _, _ in step.carried] + [param for param, _ in step.stacked]
    inner_reads = [name for inner in _walk(step.body) if not isinstance(inner, RepeatStep)
                   for name in _reads(inner) if name not in made]
    return tuple(dict.fromkeys(outer + inner_reads))


def _writes(step) -> tuple[str, ...]:
    if isinstance(step, LocalStep):
        return (step.op.result.name,)
    if isinstance(step, CollectiveStep):
        return (step.dst,)
    if isinstance(step, RepeatStep):
        return tuple(after for _, _, _, after in step.carried) + tuple(after for _, after in step.saved)
    return tuple(step.writes)


def _walk(steps):
    for step in steps:
        yield step
        if isinstance(step, RepeatStep):
            yield from _walk(step.body)


# ---- the attention pattern


class _Local:
    """Local index sizes of a step's op, as the cost model prices it."""

    def __init__(self, spmd: SpmdProgram):
        self.spmd = spmd

    def sizes(self, op) -> dict[str, int]:
        sizes = dict(zip(op.result.type.indices, op.result.type.shape))
        for operand in op.operands:
            sizes.update(zip(operand.indices,
                             self.spmd.values[operand.value].local_shape(self.spmd.mesh)))
        return sizes


def _product(values) -> int:
    total = 1
    for value in values:
        total *= value
    return total


def _match_attention(block: Sequence, weighted: int, escapes, local: _Local):
    """The flash-attention region ending at the einsum `block[weighted]`, as (positions,
    shape, the names of its per-row values: the max and sum over the key index), or None. `escapes(name, positions)`: whether a value is read outside them."""
    op = block[weighted].op
    if len(op.operands) != 2 or len(op.summed) != 1:
        return None
    key = op.summed[0]
    maker = {}
    for position, step in enumerate(block[:weighted]):
        for name in _writes(step):
            maker[name] = position
    for probs, values in (op.operands, op.operands[::-1]):
        # The key index is summed between the probabilities and the values: in both.
        if key not in values.indices or key not in probs.indices or probs.value not in maker:
            continue
        found = _match_scores(block, maker, probs, key, weighted, escapes, local)
        if found:
            return found
    return None


def _match_scores(block, maker, probs, key, weighted, escapes, local):
    # Each value of the region: the position of the key index in its dims, or None for a
    # per-row value (a max or sum over the key index). Filled from consumers to producers.
    key_at: dict[str, int | None] = {probs.value: probs.indices.index(key)}

    def note(name: str, position) -> bool:
        if key_at.setdefault(name, position) != position:
            return False  # two readers disagree on where the key index is
        return True

    body: list[int] = []
    frontier = [maker[probs.value]]
    seen = set(frontier)
    contractions = []
    while frontier:
        position = max(frontier)  # consumers before producers
        frontier.remove(position)
        step = block[position]
        if isinstance(step, LocalStep) and is_contraction(step.op):
            contractions.append(position)
            continue
        if not fusible(step):
            return None
        op = step.op
        made = op.result.name
        if made not in key_at:
            return None
        at = key_at[made]
        name_of_key = op.result.type.indices[at] if at is not None else None
        if isinstance(op, Reduce) or (isinstance(op, Einsum) and op.summed):
            over = op.over if isinstance(op, Reduce) else op.summed
            kind = op.kind if isinstance(op, Reduce) else "sum"
            if at is not None or len(over) != 1 or kind not in ("max", "sum"):
                return None
            name_of_key = over[0]
        body.append(position)
        for operand in op.operands:
            where = operand.indices.index(name_of_key) \
                if name_of_key is not None and name_of_key in operand.indices else None
            if operand.value not in maker:
                continue  # made outside the block (an input, a carried value): a read
            source = maker[operand.value]
            producer = block[source]
            # Follow only what depends on the scores: a mask made elsewhere is a read.
            if not (isinstance(producer, LocalStep) and
                    (fusible(producer) or is_contraction(producer.op))):
                continue
            if not note(operand.value, where):
                return None
            if source not in seen:
                seen.add(source)
                frontier.append(source)
    # The scores: the one contraction whose result carries the key index, on one side only.
    candidates = [p for p in contractions if _scores_sides(block[p].op, key_at) is not None]
    if len(candidates) != 1 or not body:
        return None
    scores = candidates[0]
    # Keep the steps downstream of the scores; the rest (a mask computed from inputs) are reads.
    downstream = {scores}
    for position in sorted(body):
        if any(maker.get(operand.value) in downstream for operand in block[position].op.operands):
            downstream.add(position)
    if maker[probs.value] not in downstream:
        return None
    body = sorted(p for p in body if p in downstream)
    if not any(key_at.get(block[p].op.result.name, 0) is None for p in body):
        return None  # no row reduction over the key index (a softmax): two matmuls, not attention
    scores_op = block[scores].op
    query_side, key_side = _scores_sides(scores_op, key_at)
    positions = tuple(sorted([scores, *body, weighted]))
    inside = [block[p].op.result.name for p in positions[:-1]]
    if any(escapes(name, positions) for name in inside):
        return None  # the probabilities (or scores) are needed elsewhere: they must be stored
    sizes = local.sizes(scores_op)
    kept = scores_op.result.type.indices
    weighted_op = block[weighted].op
    out_sizes = local.sizes(weighted_op)
    shape = AttentionShape(
        batch=_product(sizes[i] for i in kept if i in query_side.indices and i in key_side.indices),
        seq_q=_product(sizes[i] for i in kept if i not in key_side.indices),
        seq_k=_product(sizes[i] for i in kept if i not in query_side.indices),
        head_dim=_product(sizes[i] for i in scores_op.summed),
        value_dim=_product(out_sizes[i] for i in weighted_op.result.type.indices
                           if i not in probs.indices))
    rows = frozenset(block[p].op.result.name for p in body
                     if key_at.get(block[p].op.result.name, 0) is None)
    return positions, shape, rows


@dataclass(frozen=True)
class _Backward:
    """A flash-attention backward region found in a block, before its forward is known."""

    positions: frozenset  # its steps: dP, the softmax's derivative, dV, dQ, dK, any remat
    shape: AttentionShape
    reads: frozenset  # what it reads that the block makes outside it (the forward's values)
    scores: frozenset  # of those, S×T values: recomputed from the forward region, or no match


def _is_contraction_step(step) -> bool:
    return isinstance(step, LocalStep) and is_contraction(step.op)


def _match_attention_backward(block: Sequence, middle: int, maker: dict, readers: dict,
                              kept: set, local: _Local) -> _Backward | None:
    """The flash-attention backward region around the scores' gradient dS = `block[middle]`
    (a fusible step read by dQ = dS·K and dK = dS·Q), or None. The grad pass writes it as
    dP = dO·V, the softmax's derivative from dP to dS (maps and row sums over the key
    index, reading the forward's probabilities or their recomputation), dV = dO·P, dQ, dK
    (FlashAttention-2, arXiv:2307.08691, Algorithm 2: the same five matmuls, the scores
    recomputed)."""
    step = block[middle]
    if not (isinstance(step, LocalStep) and fusible(step)):
        return None
    grad = step.op.result
    score_dims = set(grad.type.indices)
    pair = [p for p in readers.get(grad.name, ()) if _is_contraction_step(block[p])
            and len(block[p].op.operands) == 2
            and [o.value for o in block[p].op.operands].count(grad.name) == 1]
    if len(pair) != 2:
        return None
    summed = [set(block[p].op.summed) for p in pair]
    if any(not s or not s <= score_dims for s in summed) or summed[0] & summed[1]:
        return None
    others = [next(o for o in block[p].op.operands if o.value != grad.name) for p in pair]
    # Upstream of dS through fusible steps; the contractions where that stops.
    upstream, contractions, frontier = set(), set(), [middle]
    while frontier:
        position = frontier.pop()
        for operand in block[position].op.operands:
            source = maker.get(operand.value)
            if source is None or source in upstream or source in contractions:
                continue
            if _is_contraction_step(block[source]):
                contractions.add(source)
            elif isinstance(block[source], LocalStep) and fusible(block[source]):
                upstream.add(source)
                frontier.append(source)
    upstream.add(middle)

    def score_shaped(position: int) -> bool:
        return set(block[position].op.result.type.indices) == score_dims

    scores_operands = {o.value for o in others}
    found = None
    for d_probs in sorted(contractions):
        op = block[d_probs].op
        if len(op.operands) != 2 or not score_shaped(d_probs) or \
                {o.value for o in op.operands} == scores_operands:
            continue  # not dP = dO·V (that is the scores' recomputation, Q·K)
        # The gradient flows from dP: the derivative steps are those downstream of it.
        downstream = {d_probs}
        for position in sorted(upstream):
            if any(maker.get(o.value) in downstream for o in block[position].op.operands):
                downstream.add(position)
        if middle not in downstream:
            continue
        # dV = dO·P: reads one of dP's operands (dO) and an S×T value, sums what dK sums.
        for d_out in op.operands:
            for d_values in range(len(block)):
                candidate = block[d_values]
                if d_values in pair or d_values == d_probs or \
                        not _is_contraction_step(candidate) or len(candidate.op.operands) != 2:
                    continue
                values = [o.value for o in candidate.op.operands]
                if d_out.value not in values:
                    continue
                probs = candidate.op.operands[1 - values.index(d_out.value)]
                if set(probs.indices) != score_dims or set(candidate.op.summed) not in summed:
                    continue
                found = (d_probs, d_out, d_values, downstream - {d_probs})
                break
            if found:
                break
        if found:
            break
    if found is None:
        return None
    d_probs, d_out, d_values, body = found
    if not _backward_dims(block, grad, pair, d_probs, d_out, d_values, body):
        return None
    positions = {d_probs, d_values, *pair, *body}
    # A remat's recomputation (the scores from q and k, the softmax, a mask) joins the
    # region where the region alone reads it.
    grew = True
    while grew:
        grew = False
        for position in sorted(positions):
            for operand in block[position].op.operands:
                source = maker.get(operand.value)
                if source is None or source in positions or operand.value in kept:
                    continue
                producer = block[source]
                recomputed_scores = _is_contraction_step(producer) and \
                    {o.value for o in producer.op.operands} == scores_operands
                if not (recomputed_scores or (isinstance(producer, LocalStep)
                                              and fusible(producer))):
                    continue
                if all(reader in positions for reader in readers.get(operand.value, ())):
                    positions.add(source)
                    grew = True
    results = {block[p].op.result.name for p in positions}
    writes = {block[p].op.result.name for p in (d_values, *pair)}
    if any(name in kept or any(r not in positions for r in readers.get(name, ()))
           for name in results - writes):
        return None  # a value of the backward is needed elsewhere
    reads, scores = set(), set()
    for p in positions:
        for operand in block[p].op.operands:
            if operand.value in results:
                continue
            source = maker.get(operand.value)
            if source is not None:
                reads.add(operand.value)
            if set(operand.indices) != score_dims:
                continue
            if source is None or not isinstance(block[source], LocalStep):
                return None  # an S×T value kept by an earlier loop or moved: read, not recomputed
            scores.add(operand.value)  # made by the forward here: recomputed, or no match
    # The problem: dS's dims summed by dK are the queries', by dQ the keys'.
    d_key = pair[1] if set(block[pair[1]].op.summed) == set(block[d_values].op.summed) \
        else pair[0]
    d_query = pair[0] if d_key == pair[1] else pair[1]
    sizes = local.sizes(step.op)
    query_dims, key_dims = set(block[d_key].op.summed), set(block[d_query].op.summed)
    query_sizes = local.sizes(block[d_query].op)
    probs_sizes = local.sizes(block[d_probs].op)
    shape = AttentionShape(
        batch=_product(sizes[i] for i in grad.type.indices
                       if i not in query_dims and i not in key_dims),
        seq_q=_product(sizes[i] for i in grad.type.indices if i in query_dims),
        seq_k=_product(sizes[i] for i in grad.type.indices if i in key_dims),
        head_dim=_product(query_sizes[i] for i in block[d_query].op.result.type.indices
                          if i not in score_dims),
        value_dim=_product(probs_sizes[i] for i in block[d_probs].op.summed),
        direction="bwd")
    return _Backward(frozenset(positions), shape, frozenset(reads), frozenset(scores))


def _backward_dims(block, grad, pair, d_probs: int, d_out, d_values: int, body) -> bool:
    """Whether the steps have attention's backward dims: with dS over (batch, query, key),
    dV = dO·P sums the query dims, dK = dS·Q sums them too and dQ = dS·K the key dims; Q and
    K carry the head dims, dO and V the value dims, which dP = dO·V sums; and the softmax's
    derivative sums over the key dims (a row sum)."""
    def dims(operand) -> set:
        return set(operand.indices)

    score = set(grad.type.indices)
    values_op, probs_op = block[d_values].op, block[d_probs].op
    query = set(values_op.summed)
    if set(block[pair[0]].op.summed) == query:
        d_key, d_query = pair
    elif set(block[pair[1]].op.summed) == query:
        d_query, d_key = pair
    else:
        return False
    key = set(block[d_query].op.summed)
    batch = score - query - key
    if not query or not key or query & key or score != batch | query | key:
        return False
    head = set(block[d_query].op.result.type.indices) - score
    value = set(probs_op.summed)
    if not head or not value or head & score or value & score:
        return False
    keys_side = next(o for o in block[d_query].op.operands if o.value != grad.name)
    queries_side = next(o for o in block[d_key].op.operands if o.value != grad.name)
    v_side = next(o for o in probs_op.operands if o is not d_out)
    if dims(keys_side) != batch | key | head or dims(queries_side) != batch | query | head:
        return False
    if dims(d_out) != batch | query | value or dims(v_side) != batch | key | value:
        return False
    if set(block[d_key].op.result.type.indices) != batch | key | head or \
            set(values_op.result.type.indices) != batch | key | value:
        return False
    for position in body:  # a row sum over the keys: the softmax's derivative
        op = block[position].op
        over = set(op.over) if isinstance(op, Reduce) else \
            set(op.summed) if isinstance(op, Einsum) else set()
        if over and over == key:
            return True
    return False


def _scores_sides(op, key_at: dict):
    """(query operand, key operand) of a scores einsum: two operands, every summed index (the
    head dim) in both, the key index in its result and in the key operand only; else None."""
    at = key_at.get(op.result.name)
    if at is None or len(op.operands) != 2:
        return None
    key_name = op.result.type.indices[at]
    query_side, key_side = op.operands
    if key_name in query_side.indices:
        query_side, key_side = key_side, query_side
    if key_name in query_side.indices or key_name not in key_side.indices:
        return None
    if any(index not in query_side.indices or index not in key_side.indices
           for index in op.summed):
        return None
    return query_side, key_side


# ---- the pass


def fuse(spmd: SpmdProgram, mode: str = DEFAULT_FUSION) -> SpmdProgram:
    """`spmd` with its fused regions as FusedSteps (mode "auto"), or unchanged ("none")."""
    if mode not in FUSION_MODES:
        raise ValueError(f"fusion is one of {', '.join(FUSION_MODES)}, not {mode!r}")
    if mode == "none":
        return spmd
    # Values read outside the block that makes them: outputs, loop-carried, read across a
    # repeat boundary.
    made_in: dict[str, int] = {}
    read_in: dict[str, set] = {}
    kept: set[str] = {output.value for output in spmd.outputs}

    def scan(steps, block: int) -> None:
        for step in steps:
            for name in _writes(step):
                made_in[name] = block
            if isinstance(step, RepeatStep):
                for before, inside, result, after in step.carried:
                    kept.update((before, result))
                kept.update(inside for inside, _ in step.saved)  # each trip writes it to its stack
                scan(step.body, id(step.body))
            else:
                for name in _reads(step):
                    read_in.setdefault(name, set()).add(block)
    scan(spmd.steps, id(spmd.steps))
    for name, blocks in read_in.items():
        if name in made_in and blocks - {made_in[name]}:
            kept.add(name)
    local = _Local(spmd)
    return replace(spmd, steps=_fuse_block(spmd.steps, kept, local))


def _fuse_block(steps: tuple, kept: set, local: _Local) -> tuple:
    steps = tuple(replace(step, body=_fuse_block(step.body, kept, local))
                  if isinstance(step, RepeatStep) else step for step in steps)
    readers: dict[str, list[int]] = {}
    maker: dict[str, int] = {}
    for position, step in enumerate(steps):
        for name in _reads(step):
            readers.setdefault(name, []).append(position)
        for name in _writes(step):
            maker[name] = position
    backward = []
    taken: set = set()
    for position in range(len(steps) - 1, -1, -1):
        if position in taken:
            continue
        found = _match_attention_backward(steps, position, maker, readers, kept, local)
        if found and not taken.intersection(found.positions):
            backward.append(found)
            taken.update(found.positions)
    # Forward regions whose S×T values a backward region reads, and backward regions that
    # read S×T values no forward region can recompute, are given up until both agree.
    while True:
        forward, recompute = _match_forwards(steps, backward, kept, readers, local)
        kept_backward = [b for b in backward
                         if all(name in recompute.get(b.positions, {}) for name in b.scores)]
        if len(kept_backward) == len(backward):
            break
        backward = kept_backward
    fixed = [tuple(sorted(f[0])) for f in forward] + [tuple(sorted(b.positions)) for b in backward]
    nodes = [Node(_reads(step), _writes(step), fusible(step)) for step in steps]
    regions = group(nodes, fixed)
    formed = set(regions)
    shapes = {tuple(sorted(f[0])): f[1] for f in forward}
    backs = {tuple(sorted(b.positions)): b for b in backward}
    # What each forward region writes for the backward regions, and what they make again.
    recomputed_by: dict[tuple, tuple[int, ...]] = {}
    saved_for: dict[tuple, set] = {}
    for b in backward:
        key = tuple(sorted(b.positions))
        if key not in formed:
            continue
        again, rows = _recomputation(steps, b, forward, maker)
        recomputed_by[key] = again
        for name in rows:
            saved_for.setdefault(recompute_owner(forward, maker[name]), set()).add(name)
    again_names = {steps[p].op.result.name for again in recomputed_by.values() for p in again}
    units = []
    for positions in regions:
        if len(positions) == 1:
            units.append((positions, steps[positions[0]]))
            continue
        made = {name for p in positions for name in _writes(steps[p])}
        again = recomputed_by.get(tuple(positions), ())
        remade = {steps[p].op.result.name for p in again}
        reads = tuple(dict.fromkeys(
            name for p in (*again, *positions) for name in _reads(steps[p])
            if name not in made and name not in remade))
        # A forward region's S×T values its backward recomputes are not written; the row
        # statistics the recomputation reads are.
        writes = tuple(name for p in positions for name in _writes(steps[p])
                       if (_escapes(name, positions, kept, readers) and name not in again_names)
                       or name in saved_for.get(positions, ()))
        if tuple(positions) in backs:
            units.append((positions, FusedStep(
                "flash_attention_backward", tuple(steps[p] for p in positions), reads, writes,
                backs[tuple(positions)].shape, tuple(steps[p] for p in again))))
            continue
        shape = shapes.get(tuple(positions))
        units.append((positions, FusedStep("flash_attention" if shape else "fused",
                                           tuple(steps[p] for p in positions), reads, writes,
                                           shape)))
    return _in_dependency_order(units)


def _escapes(name: str, positions, kept: set, readers: dict) -> bool:
    return name in kept or any(p not in positions for p in readers.get(name, ()))


def recompute_owner(forward, position: int) -> tuple:
    """The positions of the forward region that has the step at `position`."""
    return next(tuple(sorted(f[0])) for f in forward if position in f[0])


def _match_forwards(steps, backward, kept: set, readers: dict, local: _Local):
    """The flash-attention (forward) regions of a block, as (positions, shape, rows); and per
    backward region (by its positions) the values it reads from a forward region, by name,
    with that region's row values. A forward region's value may be read by backward regions
    only: they recompute what is S×T and read the row statistics."""
    claimed = set().union(*(b.positions for b in backward)) if backward else set()

    def escapes(name: str, positions) -> bool:
        return name in kept or any(p not in positions and p not in claimed
                                   for p in readers.get(name, ()))

    forward, taken = [], set(claimed)
    for position in range(len(steps) - 1, -1, -1):
        step = steps[position]
        if position in taken or not _is_contraction_step(step):
            continue
        found = _match_attention(steps, position, escapes, local)
        if found and not taken.intersection(found[0]):
            forward.append(found)
            taken.update(found[0])
    recompute: dict = {}
    for b in backward:
        for positions, _, rows in forward:
            inside = {steps[p].op.result.name: p for p in positions}
            for name in b.reads:
                if name in inside and inside[name] != max(positions):
                    recompute.setdefault(b.positions, {})[name] = (positions, rows)
    return forward, recompute


def _recomputation(steps, backward: _Backward, forward, maker: dict):
    """(positions of the forward steps the backward region runs again, in program order; the
    forward's row values it reads instead of recomputing). Every S×T value it reads is made
    again from what the forward region reads and its row statistics (the max and sum over
    the key index, which the forward region writes, as flash attention keeps its
    logsumexp)."""
    owner = {p: (positions, rows) for positions, _, rows in forward for p in positions}
    again, rows = set(), set()
    stack = [name for name in backward.reads if maker[name] in owner]
    while stack:
        name = stack.pop()
        position = maker[name]
        positions, row_values = owner[position]
        if name in row_values:
            rows.add(name)
            continue
        if position in again or position == max(positions):
            continue  # the output (o) is written by the forward region anyway
        again.add(position)
        for operand in steps[position].op.operands:
            if maker.get(operand.value) in positions:
                stack.append(operand.value)
    return tuple(sorted(again)), rows


def _in_dependency_order(units) -> tuple:
    """Regions in program order where their reads allow (a region runs where its last input
    is ready): Kahn's algorithm, the earliest first position first."""
    import heapq

    maker = {}
    for index, (_, step) in enumerate(units):
        for name in _writes(step):
            maker[name] = index
    waiting = []
    after: dict[int, list[int]] = {}
    for index, (_, step) in enumerate(units):
        needs = {maker[name] for name in _reads(step) if name in maker and maker[name] != index}
        waiting.append(len(needs))
        for need in needs:
            after.setdefault(need, []).append(index)
    heap = [(units[index][0][0], index) for index, count in enumerate(waiting) if not count]
    heapq.heapify(heap)
    order = []
    while heap:
        _, index = heapq.heappop(heap)
        order.append(units[index][1])
        for reader in after.get(index, ()):
            waiting[reader] -= 1
            if not waiting[reader]:
                heapq.heappush(heap, (units[reader][0][0], reader))
    assert len(order) == len(units), "fused regions form a cycle"
    return tuple(order)


def fused_regions(spmd: SpmdProgram) -> list[FusedStep]:
    """Every FusedStep of a fused SpmdProgram, repeat bodies included, in program order."""
    return [step for step in _walk(spmd.steps) if isinstance(step, FusedStep)]


# ---- printing (the golden files)


def format_fusion(spmd: SpmdProgram) -> str:
    """Every fused region of a fused SpmdProgram, one a line, nested in repeats."""
    lines = [f"# {spmd.file}: fused regions, per device"]

    def emit(steps, indent: str) -> None:
        for step in steps:
            if isinstance(step, RepeatStep):
                lines.append(f"{indent}repeat {step.dim}={step.count} {{")
                emit(step.body, indent + "  ")
                lines.append(f"{indent}}}")
            elif isinstance(step, FusedStep):
                text = f"{indent}{step.describe()}  reads {', '.join(step.reads)}" \
                       f"  writes {', '.join(step.writes) or 'nothing'}"
                if step.recomputed:
                    text += f"  recomputes {', '.join(step.recomputes)}"
                if step.shape:
                    s = step.shape
                    text += (f"  [batch {s.batch}, seq_q {s.seq_q}, seq_k {s.seq_k}, "
                             f"head_dim {s.head_dim}, value_dim {s.value_dim}]")
                lines.append(text)
    emit(spmd.steps, "")
    if len(lines) == 1:
        lines.append("no steps fuse")
    return "\n".join(lines)
