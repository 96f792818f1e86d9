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

from dataclasses import replace

from einpar.spmd import RepeatStep, SpmdProgram

from .attention_match import (LocalSizes, match_attention_backward, match_forwards,
                              recompute_owner, recomputation)
from .regions import FusedStep, Node, fusible, group, step_reads, step_writes, walk

# "no_flash": the fused regions, but attention as its einsums around a fused softmax, the
# S×T scores written to HBM and kept for the backward pass (as training stacks ran before
# FlashAttention: Megatron-LM's fused scale-mask-softmax kernel, Shoeybi et al. 2019).
FUSION_MODES = ("none", "no_flash", "auto")
DEFAULT_FUSION = "auto"


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
            for name in step_writes(step):
                made_in[name] = block
            if isinstance(step, RepeatStep):
                for before, inside, result, after in step.carried:
                    kept.update((before, result))
                kept.update(inside for inside, _ in step.saved)  # each trip writes it to its stack
                scan(step.body, id(step.body))
            else:
                for name in step_reads(step):
                    read_in.setdefault(name, set()).add(block)
    scan(spmd.steps, id(spmd.steps))
    for name, blocks in read_in.items():
        if name in made_in and blocks - {made_in[name]}:
            kept.add(name)
    local = LocalSizes(spmd)
    return replace(spmd, steps=_fuse_block(spmd.steps, kept, local, mode == "auto"))


def _fuse_block(steps: tuple, kept: set, local: LocalSizes, attention: bool = True) -> tuple:
    steps = tuple(replace(step, body=_fuse_block(step.body, kept, local, attention))
                  if isinstance(step, RepeatStep) else step for step in steps)
    readers: dict[str, list[int]] = {}
    maker: dict[str, int] = {}
    for position, step in enumerate(steps):
        for name in step_reads(step):
            readers.setdefault(name, []).append(position)
        for name in step_writes(step):
            maker[name] = position
    backward = []
    taken: set = set()
    for position in range(len(steps) - 1, -1, -1) if attention else ():
        if position in taken:
            continue
        found = match_attention_backward(steps, position, maker, readers, kept, local)
        if found and not taken.intersection(found.positions):
            backward.append(found)
            taken.update(found.positions)
    # Forward regions whose S×T values a backward region reads, and backward regions that
    # read S×T values no forward region can recompute, are given up until both agree.
    forward: list = []
    while attention:
        forward, recompute = match_forwards(steps, backward, kept, readers, local)
        kept_backward = [b for b in backward
                         if all(name in recompute.get(b.positions, {}) for name in b.scores)]
        if len(kept_backward) == len(backward):
            break
        backward = kept_backward
    fixed = [tuple(sorted(f[0])) for f in forward] + [tuple(sorted(b.positions)) for b in backward]
    nodes = [Node(step_reads(step), step_writes(step), fusible(step)) for step in steps]
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
        again, rows = recomputation(steps, b, forward, maker)
        recomputed_by[key] = again
        for name in rows:
            saved_for.setdefault(recompute_owner(forward, maker[name]), set()).add(name)
    again_names = {steps[p].op.result.name for again in recomputed_by.values() for p in again}
    units = []
    for positions in regions:
        if len(positions) == 1:
            units.append((positions, steps[positions[0]]))
            continue
        made = {name for p in positions for name in step_writes(steps[p])}
        again = recomputed_by.get(tuple(positions), ())
        remade = {steps[p].op.result.name for p in again}
        reads = tuple(dict.fromkeys(
            name for p in (*again, *positions) for name in step_reads(steps[p])
            if name not in made and name not in remade))
        # A forward region's S×T values its backward recomputes are not written; the row
        # statistics the recomputation reads are.
        writes = tuple(name for p in positions for name in step_writes(steps[p])
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


def _in_dependency_order(units) -> tuple:
    """Regions in program order where their reads allow (a region runs where its last input
    is ready): Kahn's algorithm, the earliest first position first."""
    import heapq

    maker = {}
    for index, (_, step) in enumerate(units):
        for name in step_writes(step):
            maker[name] = index
    waiting = []
    after: dict[int, list[int]] = {}
    for index, (_, step) in enumerate(units):
        needs = {maker[name] for name in step_reads(step) if name in maker and maker[name] != index}
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
    return [step for step in walk(spmd.steps) if isinstance(step, FusedStep)]


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
