"""The collectives in an optimized HLO module, and the bytes each device sends for them.

Reads the text of `jax.jit(...).lower(...).compile().as_text()`: every
all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute
(and their async `-start` forms), with its group size from
`replica_groups` and how many times it runs (a collective inside a while
loop runs once per trip; XLA records the trip count as `known_trip_count`).

Bytes follow einpar's convention (`einpar.reshard.collective_bytes`), so the
two can be put side by side: for a group of n devices, all-gather sends
(n-1)/n of its result, reduce-scatter (n-1) result-sized chunks, all-reduce
2(n-1) chunks of ceil(size/n) elements, all-to-all (n-1) such chunks, a
permute its block.

Pure text processing: no JAX here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from einpar.reshard import collective_bytes

# Bytes per element of HLO's element types.
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([\d,]*)\]")
_OPS = {"all-gather": "all_gather", "reduce-scatter": "reduce_scatter", "all-reduce": "all_reduce",
        "all-to-all": "all_to_all", "collective-permute": "permute"}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*")


@dataclass(frozen=True)
class HloCollective:
    kind: str  # all_gather, reduce_scatter, all_reduce, all_to_all, permute
    # (elements, bytes per element) of each array it makes (a combined collective makes several)
    arrays: tuple[tuple[int, int], ...]
    group: int  # devices in each replica group
    runs: int  # times it runs per step (trip counts of enclosing loops multiplied)

    @property
    def bytes_per_device(self) -> int:
        n = self.group
        total = 0
        for size, item_bytes in self.arrays:
            # What each device holds before: a gather's result is n blocks, a scatter's one chunk.
            before = {"all_gather": size // n, "reduce_scatter": size * n}.get(self.kind, size)
            total += collective_bytes(self.kind, before, n) * item_bytes
        return total * self.runs


def _split_type(rest: str) -> tuple[str, str]:
    """(result type, text after it) of an instruction's right-hand side."""
    if rest.startswith("("):
        depth = 0
        for position, char in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                return rest[:position + 1], rest[position + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _arrays(type_text: str) -> list[tuple[int, int]]:
    """(elements, bytes per element) of each array in a type."""
    found = []
    for dtype, dims in _ARRAY.findall(type_text):
        elements = 1
        for size in filter(None, dims.split(",")):
            elements *= int(size)
        found.append((elements, _ITEM_BYTES[dtype]))
    return found


def _group_size(attributes: str, devices: int) -> int:
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
    if listed:
        return len(listed.group(1).split(","))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", attributes)
    if iota:
        return int(iota.group(2))
    return devices  # replica_groups={}: every device in one group


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    bodies: dict[str, list[str]] = {}
    entry = ""
    current = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            bodies[current] = []
            if header.group(1):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    return bodies, entry


def hlo_collectives(text: str, devices: int) -> list[HloCollective]:
    """Every collective of an optimized HLO module, with the times it runs per step."""
    bodies, entry = _computations(text)
    found: list[HloCollective] = []

    def visit(name: str, runs: int, seen: tuple[str, ...]) -> None:
        for line in bodies.get(name, ()):
            head = _INSTRUCTION.match(line)
            if not head:
                continue
            type_text, rest = _split_type(line[head.end():])
            op = rest.split("(", 1)[0]
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                if body and body.group(1) not in seen:
                    visit(body.group(1), runs * (int(trips.group(1)) if trips else 1),
                          seen + (body.group(1),))
                continue
            if op in ("call", "conditional", "async-start"):
                # A conditional's branches each count once: an upper bound on what runs.
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                callees = re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", rest)
                callees += re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else []
                for callee in callees:
                    if callee not in seen:
                        visit(callee, runs, seen + (callee,))
                continue
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in _OPS:
                continue
            arrays = _arrays(type_text)
            if not arrays:
                continue
            if op.endswith("-start") and base == "all-gather":
                arrays = arrays[-1:]  # (operand, result): the result
            elif op.endswith("-start") and base == "collective-permute":
                arrays = arrays[:1]  # (operand, result, contexts...): one block
            found.append(HloCollective(_OPS[base], tuple(arrays), _group_size(rest, devices), runs))

    visit(entry, 1, (entry,))
    return found


def bytes_per_device(collectives: list[HloCollective]) -> int:
    return sum(c.bytes_per_device for c in collectives)
