"""nccl-tests output read as measurements, and NCCL's tier constants fitted to measurements.

`parse_nccl_tests` reads what an nccl-tests binary (all_reduce_perf, ...)
prints: the `#` header (`# nThread 1 nGpus 8 ...`, one `#  Rank  0 Group 0
Pid ... device 0 [0x..] NVIDIA H100` line per rank), the table of sizes
(`size count type redop root time algbw busbw #wrong` out of place, then
the same in place), and the collective from the binary's name in the
header's command line or the caller's. `fit_tier` fits a tier's protocol
constants (a few knobs, each within bounds around NCCL's: KNOBS below) to
measured times: least squares on log(predicted/measured), so a 10 µs and a
10 ms row count alike, with a weak pull toward the starting constants (the
accelerator preset's tier) so that a knob the measurements never exercise
keeps the preset's value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from . import nccl
from .hardware import (MICRO, NCCL_RING_US, NCCL_SATURATION, PROTOCOLS, Accelerator, Figure,
                       Tier, tier_with)

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
        return nccl.rank_bytes(self.kind, self.bytes, self.gpus)


MIN_TIME_US = 0.001


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
        # nccl-tests prints µs to two decimals: no collective takes under a nanosecond.
        if not math.isfinite(time_us) or time_us < MIN_TIME_US:
            raise NcclTestsError(f"size {size}: a time must be at least {MIN_TIME_US} µs, not "
                                 f"{rest[0]}", number)
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
    if gpus < 2:
        raise NcclTestsError("the run has one rank: it moves nothing, so it says nothing of the "
                             "links (run nccl-tests on 2 or more GPUs, `-g 8` or under mpirun)", 1)
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
#
# What the fit may move, and how far. A free constant per protocol per tier (15 of them) on a
# dozen rows of one collective fits anything, with constants that mean nothing (an LL128 at 2%
# of NVLink, a 80 µs NVLS). So the fit moves a few knobs, each bounded to what its physical
# meaning allows around NCCL's own constants (NVIDIA/nccl src/graph/tuning.cc, src/enqueue.cc),
# and leaves the rest at NCCL's values:
#
# - latency.LL, latency.LL128, latency.Simple: a ring step's latency (hwLat), 0.5-5x NCCL's
#   (NVLink 0.6/1.9/3.4 µs, network 2.7/4.0/14 µs). NCCL's figures are its tuner's, not
#   measurements; measured small-buffer times on these systems are 2-4x what they imply
#   (launch and synchronisation the tuner does not price). On the network a protocol's tree
#   step scales with its ring step, and an NVLS-tree level with Simple's.
# - efficiency.LL128: 0.6-0.95 of the bus bandwidth (a 128-byte line carries 120 bytes of data:
#   0.9375 at most; NCCL uses 0.92). LL is fixed at NCCL's 0.5 (8 bytes of data in each
#   16-byte line: 0.5 at most).
# - efficiency.Simple: 0.6-1.0 of the bus bandwidth (NCCL: 1.0).
# - saturation: NCCL's channel-threshold sizes (16 channels x threads x bytes per thread:
#   512 KiB LL, 80 KiB LL128, 512 KiB Simple) times 0.5-2, as NCCL runs 8 to 32 channels on
#   these systems.
# - channels: the channels of a saturated collective, 2-32 (NCCL's MAXCHANNELS is 32): a buffer
#   below saturation/channels runs on one channel, at 1/channels of the rate.
# - nvls.latency: 12.5-75 µs (NCCL's hwLat 25 µs, 0.5-3x). nvls.efficiency: 0.55-0.80 of the
#   bus bandwidth per direction (NCCL's nvlsEfficiency is 0.85 on Hopper and 0.74 on Blackwell,
#   times 15/16 of the channels: 0.80 and 0.71; the nccl-tests maintainer calls 476 GB/s busbw
#   the expected H100 NVLS all-reduce (nccl-tests#290), which is 0.64 of the 370 GB/s ring bus
#   bandwidth pipelined twice, so NCCL's top figure overstates it and 0.55 is the floor).
# - bandwidth (calibration only): the fraction of the tier's line rate that Simple achieves
#   (the accelerator's scale_up/scale_out_efficiency), 0.02-1.0: a user's cluster achieves
#   what it achieves (a RoCE or TCP network, fewer NICs, a misconfigured fabric), and nccl-tests'
#   busbw plateau measures it; with it fitted, efficiency.Simple stays the preset's. Presets
#   take it from the spec and published figures instead.
#
# Fitted on log(predicted/measured), so a 10 µs and a 10 ms row count alike, with a weak pull
# toward the starting value (the preset's) so that a knob the rows do not exercise keeps it.

PULL = 0.05  # weight of log(value / starting value) against log errors of the rows


@dataclass(frozen=True)
class Knob:
    low: float  # for latencies: times NCCL's value of the tier
    high: float
    relative: bool = False  # bounds times NCCL's constant rather than absolute


KNOBS = {
    "latency.LL": Knob(0.5, 5.0, True), "latency.LL128": Knob(0.5, 5.0, True),
    "latency.Simple": Knob(0.5, 5.0, True),
    "efficiency.LL128": Knob(0.6, 0.95), "efficiency.Simple": Knob(0.6, 1.0),
    "saturation": Knob(0.5, 2.0), "channels": Knob(2.0, 32.0),
    "nvls.latency": Knob(12.5 * MICRO, 75.0 * MICRO), "nvls.efficiency": Knob(0.55, 0.80),
    "bandwidth": Knob(0.02, 1.0),
}
# What a preset fits (its NVLink tier, on its system's single-node curves): everything the
# rows exercise but the bus bandwidth, which is the spec's and published figures'.
PRESET_KNOBS = ("latency.LL", "latency.LL128", "latency.Simple", "efficiency.LL128",
                "efficiency.Simple", "saturation", "channels", "nvls.latency", "nvls.efficiency")
# What calibration fits: the same, with the bus bandwidth instead of Simple's efficiency.
CALIBRATION_KNOBS = ("latency.LL", "latency.LL128", "latency.Simple", "efficiency.LL128",
                     "saturation", "channels", "nvls.latency", "nvls.efficiency", "bandwidth")


# A user's network may be no InfiniBand at all (RoCE, TCP offload: GCP's TCPXO floor is about
# 120 µs, 15-20x InfiniBand's): calibrating a scale-out tier lets its step latencies go this
# far above NCCL's, as its bandwidth goes down to 2% of line rate.
CALIBRATION_NETWORK_LATENCY = 50.0


def bounds(knob: str, which: str, calibration: bool = False) -> tuple[float, float]:
    """The range `knob` of a scale-`which` tier may take (seconds for latencies); a
    calibration's network tier may be slower than any preset's."""
    spec = KNOBS[knob]
    if not spec.relative:
        return spec.low, spec.high
    nccl_value = NCCL_RING_US[which][knob.split(".")[1]] * MICRO
    high = CALIBRATION_NETWORK_LATENCY if calibration and which == "out" else spec.high
    return spec.low * nccl_value, high * nccl_value


def knob_values(chip: Accelerator, which: str, knobs) -> dict:
    """The current value of each of `knobs` in `chip`'s scale-`which` tier."""
    tier = getattr(chip, f"scale_{which}_tier")
    found = {}
    for knob in knobs:
        kind, _, protocol = knob.partition(".")
        if knob == "bandwidth":
            found[knob] = getattr(chip, f"scale_{which}_efficiency").value
        elif knob == "channels":
            found[knob] = tier.channels.value
        elif knob == "saturation":
            found[knob] = tier.protocols["Simple"].saturation.value / NCCL_SATURATION["Simple"]
        elif kind == "nvls":
            found[knob] = getattr(tier.nvls, protocol).value
        else:
            found[knob] = getattr(tier.protocols[protocol], kind).value
    return found


def with_values(chip: Accelerator, which: str, values: dict, source: str) -> Accelerator:
    """`chip` with its scale-`which` tier (and bus bandwidth, for `bandwidth`) set to `values`."""
    tier = tier_with(getattr(chip, f"scale_{which}_tier"), which, values, source)
    changes = {f"scale_{which}_tier": tier}
    if "bandwidth" in values:
        changes[f"scale_{which}_efficiency"] = Figure(values["bandwidth"], source)
    return replace(chip, **changes)


def _constants(tier: Tier) -> list[tuple[str, float]]:
    """(name, value) of every NCCL constant of `tier`, as a cluster file's collectives section
    names them: per protocol its latency, efficiency and saturation, tree latencies, NVLS
    trees' latency."""
    found = []
    protocols = [(p, tier.protocols[p]) for p in PROTOCOLS]
    for name, protocol in protocols + ([("NVLS", tier.nvls)] if tier.nvls is not None else []):
        found += [(f"{name}.latency", protocol.latency.value),
                  (f"{name}.efficiency", protocol.efficiency.value),
                  (f"{name}.saturation", protocol.saturation.value)]
    found += [(f"tree.{p}", tier.tree_latency[p].value) for p in PROTOCOLS]
    if tier.nvls_tree_latency is not None:
        found.append(("nvls_tree", tier.nvls_tree_latency.value))
    found.append(("channels", tier.channels.value))
    return found


def predict(chip: Accelerator, row, algorithms: tuple[str, ...] | None = None) -> float:
    per_node = row.gpus // row.nodes
    return nccl.fastest(row.kind, row.gpus, per_node, row.nodes, row.local_bytes, chip,
                        algorithms).time_s


def fit(chip: Accelerator, rows: list, which: str, source: str, algorithms: list | None = None,
        knobs=PRESET_KNOBS) -> tuple[Accelerator, dict]:
    """`chip` with the `knobs` of its scale-up or scale-out tier (`which`) fitted to `rows`
    (Measurements, or anything with kind, gpus, nodes, bytes, local_bytes, time_s) within
    their bounds, and the fitted values; `algorithms`, if given, the algorithms each row's run
    allowed (None: the tuner's choice). Knobs the tier lacks (NVLS off NVSwitch) are left out."""
    from scipy.optimize import least_squares

    tier = getattr(chip, f"scale_{which}_tier")
    knobs = [k for k in knobs if not (k.startswith("nvls.") and tier.nvls is None)]
    ranges = [bounds(k, which, calibration="bandwidth" in knobs) for k in knobs]
    low, high = np.log([lo for lo, _ in ranges]), np.log([hi for _, hi in ranges])
    start_values = knob_values(chip, which, knobs)
    start = np.clip(np.log([start_values[k] for k in knobs]), low, high)
    measured = np.log([row.time_s for row in rows])
    allowed = algorithms or [None] * len(rows)

    def trial(vector: np.ndarray) -> Accelerator:
        values = dict(zip(knobs, np.exp(np.clip(vector, low, high)).tolist()))
        return with_values(chip, which, values, source)

    def residuals(vector: np.ndarray) -> np.ndarray:
        candidate = trial(vector)
        predicted = np.log([predict(candidate, row, algos) for row, algos in zip(rows, allowed)])
        return np.concatenate([predicted - measured, PULL * (vector - start)])

    best = None
    # The model is piecewise (the tuner's choice): start from NCCL's values and from either
    # side of them, keep the best.
    for attempt in (start, np.clip(start + math.log(2.0), low, high),
                    np.clip(start - math.log(2.0), low, high)):
        result = least_squares(residuals, attempt, bounds=(low, high), diff_step=0.05,
                               max_nfev=400)
        if best is None or result.cost < best.cost:
            best = result
    values = dict(zip(knobs, np.exp(np.clip(best.x, low, high)).tolist()))
    return with_values(chip, which, values, source), values


def fit_tier(chip: Accelerator, rows: list, which: str, source: str,
             algorithms: list | None = None, knobs=PRESET_KNOBS) -> Tier:
    """`fit`'s tier alone."""
    fitted, _ = fit(chip, rows, which, source, algorithms, knobs)
    return getattr(fitted, f"scale_{which}_tier")
