"""Finding flash-attention regions in a block of local steps, by op structure (indices),
never by value names: the forward pattern (FlashAttention, Dao et al., NeurIPS 2022) and
the backward pass as the grad pass writes it (FlashAttention-2, arXiv:2307.08691,
Algorithm 2), with what a backward region recomputes from its forward region.
cost_model/fusion.py's pass keeps each region found whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from einpar.ir import Einsum, Reduce
from einpar.spmd import LocalStep, SpmdProgram

from .attention import AttentionShape
from .regions import fusible, is_contraction, step_writes


# ---- the attention pattern


class LocalSizes:
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


def _match_attention(block: Sequence, weighted: int, escapes, local: LocalSizes):
    """The flash-attention region ending at the einsum `block[weighted]`, as (positions,
    shape, the names of its per-row values: the max and sum over the key index), or None. `escapes(name, positions)`: whether a value is read outside them."""
    op = block[weighted].op
    if len(op.operands) != 2 or len(op.summed) != 1:
        return None
    key = op.summed[0]
    maker = {}
    for position, step in enumerate(block[:weighted]):
        for name in step_writes(step):
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
class BackwardRegion:
    """A flash-attention backward region found in a block, before its forward is known."""

    positions: frozenset  # its steps: dP, the softmax's derivative, dV, dQ, dK, any remat
    shape: AttentionShape
    reads: frozenset  # what it reads that the block makes outside it (the forward's values)
    scores: frozenset  # of those, S×T values: recomputed from the forward region, or no match


def _is_contraction_step(step) -> bool:
    return isinstance(step, LocalStep) and is_contraction(step.op)


def match_attention_backward(block: Sequence, middle: int, maker: dict, readers: dict,
                              kept: set, local: LocalSizes) -> BackwardRegion | None:
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
    return BackwardRegion(frozenset(positions), shape, frozenset(reads), frozenset(scores))


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


def recompute_owner(forward, position: int) -> tuple:
    """The positions of the forward region that has the step at `position`."""
    return next(tuple(sorted(f[0])) for f in forward if position in f[0])


def match_forwards(steps, backward, kept: set, readers: dict, local: LocalSizes):
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


def recomputation(steps, backward: BackwardRegion, forward, maker: dict):
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


