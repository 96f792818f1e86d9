"""Collective matmuls: an all-gather and the matmul that reads it, or a matmul and the
reduce-scatter of its partial sums, run in chunks so that each overlaps the other.

Decomposing a collective into its group's n chunks lets the matmul start on the first
chunk while the next ones travel (Wang et al., "Overlap Communication with Dependent
Computation via Decomposition in Large Deep Learning Models", ASPLOS 2023; XLA's collective
matmul; Megatron-LM's `--tp-comm-overlap`, Transformer Engine's userbuffers, which overlap
a tensor-parallel all-gather with the GEMM after it and a GEMM with the reduce-scatter after
it). The timeline (estimate._Pricer.run) prices a pair as a pipeline of n stages: the
reader starts once the first chunk is ready and ends no earlier than one chunk after the
producer's end, so the pair takes max(comm, compute) + min(comm, compute)/n rather than
their sum. Elementwise maps between the gather and the matmul (a norm's scale) run chunk
by chunk too. What the model leaves out: a chunk's GEMM runs at the efficiency of the whole
GEMM (smaller GEMMs are a little slower), and the collective takes no compute units from
the GEMM (Transformer Engine's userbuffers copy with a few SMs, or with the copy engines).

Roles a priced step plays: "gather" (all-gather: its result arrives in n chunks),
"scatter" (reduce-scatter: reads its operand in n chunks), "matmul" (a contraction),
"map" (elementwise: passes its operand's chunks on), or none.
"""

from __future__ import annotations

from einpar.ir import Einsum, Map
from einpar.spmd import CollectiveStep, LocalStep

from .regions import FusedStep


def role(step, mesh) -> tuple[str, int] | None:
    """(role, chunks) of a step for collective matmuls; None for steps that play none."""
    if isinstance(step, CollectiveStep):
        kind = {"all_gather": "gather", "reduce_scatter": "scatter"}.get(step.kind)
        if kind is None:
            return None
        chunks = 1
        for axis in step.step.axes:
            chunks *= mesh.size(axis)
        return (kind, chunks) if chunks > 1 else None
    if isinstance(step, LocalStep):
        if isinstance(step.op, Einsum) and len(step.op.operands) == 2:
            return ("matmul", 1)
        if isinstance(step.op, Map):
            return ("map", 1)
        return None
    if isinstance(step, FusedStep) and step.kind == "fused" and \
            all(isinstance(member.op, Map) for member in step.members):
        return ("map", 1)
    return None


def read_chunks(made_by: tuple[str, int] | None, value_chunks: int,
                reader: tuple[str, int] | None) -> int:
    """In how many chunks `reader` reads a value (1: whole, once it is all ready).
    `made_by` is its producer's role, `value_chunks` the chunks the value arrives in."""
    if reader is None:
        return 1
    if reader[0] in ("matmul", "map") and value_chunks > 1:
        return value_chunks
    if reader[0] == "scatter" and made_by is not None and made_by[0] == "matmul":
        return reader[1]
    return 1


def made_chunks(step_role: tuple[str, int] | None, chunked_reads: list[int]) -> int:
    """The chunks a step's result arrives in: a gather's group, a map's chunked operand's."""
    if step_role is None:
        return 1
    if step_role[0] == "gather":
        return step_role[1]
    if step_role[0] == "map" and chunked_reads:
        return max(chunked_reads)
    return 1
