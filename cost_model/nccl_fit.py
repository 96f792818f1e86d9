"""nccl-tests output read as measurements, and NCCL's tier constants fitted to measurements.

`parse_nccl_tests` reads what an nccl-tests binary (all_reduce_perf, ...)
prints: the `#` header (`# nThread 1 nGpus 8 ...`, one `#  Rank  0 Group 0
Pid ... device 0 [0x..] NVIDIA H100` line per rank), the table of sizes
(`size count type redop root time algbw busbw #wrong` out of place, then
the same in place), and the collective from the binary's name in the
header's command line or the caller's. `fit_tier` fits a tier's protocol
constants (per protocol: latency, efficiency, saturation size; NVLS's too)
to measured times: least squares on log(predicted/measured), so a 10 µs and
a 10 ms row count alike, with a weak pull toward the starting constants
(NCCL's) so that a protocol the measurements never exercise keeps NCCL's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from . import nccl
from .hardware import PROTOCOLS, Accelerator, Figure, Protocol, Tier

KINDS = {"all_reduce", "all_gather", "reduce_scatter", "all_to_all"}
# nccl-tests binaries and the collective each runs (alltoall_perf is all_to_all).
BINARIES = {"all_reduce_perf": "all_reduce", "all_gather_perf": "all_gather",
            "reduce_scatter_perf": "reduce_scatter", "alltoall_perf": "all_to_all"}
# A table row: size count type redop root, then time algbw busbw #wrong out of place and in
# place (nccl-tests prints N/A for #wrong when it does not check).
ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\w+)\s+(\S+)\s+(-?\d+)\s+(.*)$")
NUMBER = r"(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|N/A)"


class NcclTestsError(Exception):
    def __init__(self, message: str, line: int = 0, hint: str | None = None):
        super().__init__(message)
        self.line, self.hint = line, hint


@dataclass(frozen=True)
class Measurement:
    kind: str
    gpus: int
    nodes: int
    bytes: int  # nccl-tests' size: the buffer (all-gather, reduce-scatter: the gathered one)
    time_s: float  # out of place
    line: int = 0

    @property
    def local_bytes(self) -> float:
        """What each rank holds before the collective (einpar's convention)."""
        return self.bytes / self.gpus if self.kind == "all_gather" else float(self.bytes)


def parse_nccl_tests(text: str, collective: str | None = None,
                     gpus_per_node: int | None = None) -> list[Measurement]:
    """The out-of-place rows of one nccl-tests run; NcclTestsError with the line of the first
    problem. The ranks are counted from the header's `Rank` lines and the nodes from their
    host names (`Pid ... on HOST`), or from `gpus_per_node` if given."""
    kind = collective
    ranks: list[str] = []
    rows: list[Measurement] = []
    pending: list[tuple[int, int, float]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            binary = re.search(r"\b(\w+_perf)\b", stripped)
            if binary and kind is None and binary[1] in BINARIES:
                kind = BINARIES[binary[1]]
            rank = re.match(r"#\s*Rank\s+\d+\s+Group\s+\d+\s+Pid\s+\d+\s+on\s+(\S+)", stripped)
            if rank:
                ranks.append(rank[1])
            continue
        match = ROW.match(line)
        if not match:
            if re.match(r"^\s*\d", line):
                raise NcclTestsError(f"a table row needs size, count, type, redop, root and "
                                     f"time, algbw, busbw: {stripped[:60]!r}", number)
            continue  # nccl-tests' other lines (warnings, "Avg bus bandwidth")
        size, rest = int(match[1]), match[6].split()
        if len(rest) < 3 or not all(re.fullmatch(NUMBER, v) for v in rest[:3]):
            raise NcclTestsError(f"size {size}: the out-of-place time, algbw and busbw are not "
                                 f"numbers: {' '.join(rest[:3])!r}", number)
        if rest[0] == "N/A":
            raise NcclTestsError(f"size {size}: no out-of-place time", number)
        time_us = float(rest[0])
        if not math.isfinite(time_us) or time_us <= 0:
            raise NcclTestsError(f"size {size}: a time must be above 0 µs, not {rest[0]}", number)
        if size > 0:
            pending.append((number, size, time_us * 1e-6))
    if not pending:
        raise NcclTestsError("no table of sizes and times (nccl-tests' `size count type ...` "
                             "rows) was found", 1)
    if kind is None:
        raise NcclTestsError("which collective this is was not found in the header", 1,
                             hint="pass --collective all_reduce (or all_gather, reduce_scatter, "
                                  "all_to_all)")
    if kind not in KINDS:
        raise NcclTestsError(f"collective {kind!r} is not one of {', '.join(sorted(KINDS))}", 1)
    if not ranks:
        raise NcclTestsError("the header lists no ranks (`#  Rank  0 Group  0 Pid ... on HOST "
                             "device ...` lines)", 1)
    gpus = len(ranks)
    if gpus_per_node:
        if gpus % gpus_per_node:
            raise NcclTestsError(f"{gpus} ranks do not fill nodes of {gpus_per_node}", 1)
        nodes = gpus // gpus_per_node
    else:
        nodes = len(set(ranks))
        if gpus % nodes:
            raise NcclTestsError(f"{gpus} ranks on {nodes} hosts are not the same number on "
                                 "each", 1, hint="pass --gpus-per-node N")
    for number, size, seconds in pending:
        rows.append(Measurement(kind, gpus, nodes, size, seconds, number))
    return rows


# ---- the fit

SATURATION_RANGE = (1.0, 1e10)
LATENCY_RANGE = (1e-8, 1e-3)
EFFICIENCY_RANGE = (1e-3, 1.0)
PULL = 0.05  # weight of log(constant / starting constant) against log errors of the rows


def _protocols(tier: Tier) -> list[tuple[str, Protocol]]:
    found = [(p, tier.protocols[p]) for p in PROTOCOLS]
    return found + ([("NVLS", tier.nvls)] if tier.nvls is not None else [])


def _constants(tier: Tier) -> list[tuple[str, float, tuple[float, float]]]:
    """(name, value, range) of every constant of `tier` the fit moves: per protocol its latency,
    efficiency and saturation (+1: it may be 0), tree latencies, NVLS trees' latency."""
    found = []
    for name, protocol in _protocols(tier):
        found += [(f"{name}.latency", protocol.latency.value, LATENCY_RANGE),
                  (f"{name}.efficiency", protocol.efficiency.value, EFFICIENCY_RANGE),
                  (f"{name}.saturation", protocol.saturation.value + 1.0,
                   (SATURATION_RANGE[0] + 1.0, SATURATION_RANGE[1]))]
    found += [(f"tree.{p}", tier.tree_latency[p].value, LATENCY_RANGE) for p in PROTOCOLS]
    if tier.nvls_tree_latency is not None:
        found.append(("nvls_tree", tier.nvls_tree_latency.value, LATENCY_RANGE))
    return found


def tier_vector(tier: Tier) -> np.ndarray:
    """The log of each constant the fit moves (`_constants`)."""
    return np.log(np.array([value for _, value, _ in _constants(tier)]))


def tier_from_vector(tier: Tier, vector: np.ndarray, source: str) -> Tier:
    values = dict(zip([name for name, _, _ in _constants(tier)], np.exp(vector).tolist()))
    fitted = {name: Protocol(Figure(values[f"{name}.latency"], source),
                             Figure(values[f"{name}.efficiency"], source),
                             Figure(max(0.0, values[f"{name}.saturation"] - 1.0), source))
              for name, _ in _protocols(tier)}
    nvls = fitted.pop("NVLS", None)
    trees = {p: Figure(values[f"tree.{p}"], source) for p in PROTOCOLS}
    nvls_tree = Figure(values["nvls_tree"], source) if "nvls_tree" in values else None
    return replace(tier, protocols=fitted, nvls=nvls, tree_latency=trees,
                   nvls_tree_latency=nvls_tree)


def predict(chip: Accelerator, row, algorithms: tuple[str, ...] | None = None) -> float:
    per_node = row.gpus // row.nodes
    return nccl.fastest(row.kind, row.gpus, per_node, row.nodes, row.local_bytes, chip,
                        algorithms).time_s


def fit_tier(chip: Accelerator, rows: list, which: str, source: str,
             algorithms: list | None = None) -> Tier:
    """`chip`'s scale-up or scale-out tier (`which`) with its constants fitted to `rows`
    (Measurements, or anything with kind, gpus, nodes, bytes, local_bytes, time_s);
    `algorithms`, if given, the algorithms each row's run allowed (None: the tuner's choice)."""
    from scipy.optimize import least_squares

    attribute = f"scale_{which}_tier"
    start_tier = getattr(chip, attribute)
    start = tier_vector(start_tier)
    measured = np.log([row.time_s for row in rows])
    allowed = algorithms or [None] * len(rows)
    ranges = [bounds for _, _, bounds in _constants(start_tier)]
    low = np.log([lo for lo, _ in ranges])
    high = np.log([hi for _, hi in ranges])

    def residuals(vector: np.ndarray) -> np.ndarray:
        trial = replace(chip, **{attribute: tier_from_vector(start_tier, vector, source)})
        predicted = np.log([predict(trial, row, algos) for row, algos in zip(rows, allowed)])
        return np.concatenate([predicted - measured, PULL * (vector - start)])

    best = None
    for attempt in (np.clip(start, low, high), np.clip(start + math.log(2.0), low, high),
                    np.clip(start - math.log(2.0), low, high)):
        result = least_squares(residuals, attempt, bounds=(low, high), diff_step=0.05,
                               max_nfev=400)
        if best is None or result.cost < best.cost:
            best = result
    return tier_from_vector(start_tier, best.x, source)
