"""Measure this host as a cluster for the cost model: `einpar calibrate` writes what it finds.

JAX's CPU devices are the cluster: N devices of one process that share the
host's cores and memory. Each measurement runs one small jitted step under
`jax.shard_map` over a 1-D mesh of all N devices, every device working at
once, because that is how a program's step runs on them: what one device
achieves while the others compete for the same cores is what the cost model
must charge it. Measured, each a median of repeats after a warm-up:

- matrix efficiency: an f32 matmul per device at several sizes (FLOPs);
  the best per-device FLOP/s is `peak_flops.f32`, and each size's fraction
  of it a step of the `matrix` table;
- vector efficiency: an elementwise op (exp, multiply, add: 3 FLOPs per
  element) at several sizes, as fractions of the same peak;
- memory: a copy-like op (`x + 1`: every byte read once and written once)
  at sizes of 1e5 to 1e8 bytes; the best per-device bytes/s is the
  `hbm_bandwidth`, each size's fraction of it a step of the `memory` table;
- collectives: a tiled all-gather and a psum over the mesh axis at several
  sizes, fitted to the α–β model (nccl-tests doc/PERFORMANCE.md: "time ≈
  overhead + size/bw"), time = α·steps + bytes sent per device / bandwidth,
  with einpar's byte convention (einpar.reshard.collective_bytes) and ring
  steps (cost_model.collectives.ring_steps): a ring
  all-gather over n devices is n-1 steps and (n-1)·V bytes of V local
  bytes, an all-reduce 2(n-1) steps and 2(n-1)/n·V bytes;
- step overhead: a trivial step (`x + 1` on one element per device), the
  fixed cost of dispatching one step, which the estimate adds once per step.

An op is timed as what one more of it costs a step: a chain of copies in one
step (as many as make the step's work well above the noise of dispatching
it), the step's time less the step overhead, over the copies. So a program
of many ops is not charged the dispatch once per op, and a tiny op's time is
not lost in the dispatch's noise. The efficiency tables are Calculon's step model
(calculon/processor.py: the fraction of peak an op reaches, as steps over
its size, the first step it reaches applying); cost_model/compute.py reads
them. The document follows the cluster-file format of cost_model/cluster.py,
with the raw sizes and times under `measurements` for a reader to check the
fit against.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from einpar.reshard import collective_bytes

from .collectives import ring_steps

AXIS = "d"
# No op is taken to run faster than this fraction of its step's measured time: a short
# step's net time is the difference of two noisy medians and may come out at or below zero.
NET_FLOOR = 0.05
# The longest chain of one op in one step (unrolled, so it bounds the compile time too).
MAX_CHAIN = 64


@dataclass(frozen=True)
class Settings:
    """How much to measure: full (under a minute) or quick (about 15 s)."""

    matmul_flops: tuple[float, ...]
    vector_elements: tuple[int, ...]
    memory_bytes: tuple[float, ...]
    collective_bytes: tuple[float, ...]
    max_repeats: int
    budget_s: float  # time spent repeating one step, at most (after 3 repeats)


FULL = Settings(matmul_flops=(1e5, 1e6, 1e7, 1e8, 1e9),
                vector_elements=(1_000, 10_000, 100_000, 1_000_000),
                memory_bytes=(1e5, 1e6, 1e7, 1e8),
                collective_bytes=(1e3, 1e4, 1e5, 1e6, 4e6),
                max_repeats=200, budget_s=1.0)
QUICK = Settings(matmul_flops=(1e5, 1e6, 1e7, 1e8),
                 vector_elements=(1_000, 10_000, 100_000, 1_000_000),
                 memory_bytes=(1e5, 1e6, 1e7, 1e8),
                 collective_bytes=(1e3, 1e4, 1e5, 1e6),
                 max_repeats=50, budget_s=0.25)


def chain_length(size: float, work: float) -> int:
    """Copies of an op of `size` to run in one step so that the step does about `work`."""
    return int(min(MAX_CHAIN, max(1, -(-work // size))))


class _Bench:
    """Steps under shard_map on a 1-D mesh of all the devices, and their median times.

    An op is timed as a chain of `chain` copies in one step, each fed the last one's
    result through an optimization barrier (so XLA neither fuses nor drops them): the
    step's time less the step overhead, over `chain`, is what one more such op costs a
    program, measured well above the noise of the step's own dispatch.
    """

    def __init__(self, devices: list, settings: Settings, progress):
        import jax
        from jax.sharding import AxisType, NamedSharding, PartitionSpec

        self.jax, self.settings, self.progress = jax, settings, progress
        self.n = len(devices)
        self.mesh = jax.make_mesh((self.n,), (AXIS,), axis_types=(AxisType.Explicit,),
                                  devices=devices)
        self.spec = PartitionSpec(AXIS)
        self.sharded = NamedSharding(self.mesh, self.spec)
        self.overhead_s = 0.0

    def block(self, local_shape: tuple[int, ...], value: float = 0.5):
        """A global array whose block on every device has `local_shape` (split on axis 0)."""
        shape = (local_shape[0] * self.n,) + tuple(local_shape[1:])
        return self.jax.device_put(np.full(shape, value, np.float32), self.sharded)

    def time(self, label: str, op, x, *constants, chain: int = 1) -> dict:
        """Median time of one step of `chain` copies of `op(x, *constants) -> x` on every
        device: {"chain", "time_s", "net_s" (one op, net of the step overhead), "repeats"}."""
        jax = self.jax
        if self.progress is not None:
            self.progress(label)

        def per_device(x, *constants):
            for _ in range(chain):
                x = jax.lax.optimization_barrier(op(x, *constants))
            return x

        step = jax.jit(jax.shard_map(per_device, mesh=self.mesh,
                                     in_specs=(self.spec,) * (1 + len(constants)),
                                     out_specs=self.spec, check_vma=False))
        args = (x,) + constants
        compiled = step.lower(*args).compile()
        for _ in range(2):  # warm-up
            jax.block_until_ready(compiled(*args))
        times: list[float] = []
        deadline = time.perf_counter() + self.settings.budget_s
        while len(times) < self.settings.max_repeats and (len(times) < 3
                                                          or time.perf_counter() < deadline):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        net = max(seconds - self.overhead_s, NET_FLOOR * seconds) / chain
        return {"chain": chain, "time_s": seconds, "net_s": net, "repeats": len(times)}


def _steps(sizes: list[float], fractions: list[float]) -> list[list[float]]:
    """An efficiency table: [[size at least, fraction], ...] largest first, the smallest at 0."""
    table = [[0.0 if i == 0 else float(size), round(min(1.0, max(1e-4, fraction)), 4)]
             for i, (size, fraction) in enumerate(zip(sizes, fractions))]
    return sorted(table, reverse=True)


def measure_step_overhead(bench: _Bench) -> dict:
    """A step that does next to nothing: one element per device, plus one."""
    row = bench.time("step overhead", lambda a: a + 1.0, bench.block((1,)))
    bench.overhead_s = row["time_s"]
    return {"time_s": row["time_s"], "repeats": row["repeats"]}


def measure_matrix(bench: _Bench) -> list[dict]:
    from jax import lax

    rows = []
    for target in bench.settings.matmul_flops:
        m = max(2, round((target / 2) ** (1 / 3)))  # an m×m by m×m matmul is 2m³ FLOPs
        flops = 2 * m ** 3
        # b's rows average x's: the chain's values stay at 0.5.
        x, b = bench.block((m, m)), bench.block((m, m), 1.0 / m)
        row = bench.time(f"matmul {m}x{m} per device",
                         lambda x, b: lax.dot(x, b, precision=lax.Precision.HIGHEST), x, b,
                         chain=chain_length(flops, 3e7))
        rows.append({"m": m, "flops": flops, **row, "flops_per_s": flops / row["net_s"]})
        del x, b
    return rows


def measure_vector(bench: _Bench) -> list[dict]:
    import jax.numpy as jnp

    rows = []
    for elements in bench.settings.vector_elements:
        flops = 3 * elements  # exp, multiply, add
        x = bench.block((elements,))
        # exp(x)·(-1/2) + 1/4 maps x <= 1/4 into itself: the chain's values stay bounded.
        row = bench.time(f"exp(x)*a+b on {elements:,} elements per device",
                         lambda a: jnp.exp(a) * -0.5 + 0.25, x, chain=chain_length(flops, 3e6))
        rows.append({"elements": elements, "flops": flops, **row,
                     "flops_per_s": flops / row["net_s"]})
        del x
    return rows


def measure_memory(bench: _Bench) -> list[dict]:
    rows = []
    for target in bench.settings.memory_bytes:
        elements = max(1, round(target / 8))  # f32: 4 bytes read and 4 written per element
        moved = 8 * elements
        x = bench.block((elements,))
        row = bench.time(f"x+1 on {moved:,} bytes per device", lambda a: a + 1.0, x,
                         chain=chain_length(moved, 1e7))
        rows.append({"bytes": moved, **row, "bytes_per_s": moved / row["net_s"]})
        del x
    return rows


def measure_collectives(bench: _Bench) -> list[dict]:
    from jax import lax

    n, rows = bench.n, []
    kinds = {
        # One link of the chain: the gathered array's first block, and the sum over n, keep
        # the chain's shape and values.
        "all_gather": lambda a: lax.all_gather(a, AXIS, tiled=True)[:a.shape[0]],
        "all_reduce": lambda a: lax.psum(a, AXIS) * (1.0 / n),
    }
    for kind, op in kinds.items():
        for target in bench.settings.collective_bytes:
            elements = max(1, round(target / 4))
            local = 4 * elements
            sent = collective_bytes(kind, local, n)  # the cost model's convention
            x = bench.block((elements,))
            row = bench.time(f"{kind} of {local:,} bytes per device", op, x,
                             chain=chain_length(sent, 1e7))
            rows.append({"kind": kind, "local_bytes": local, "steps": ring_steps(kind, n),
                         "sent_bytes": sent, **row})
            del x
    return rows


def fit_alpha_beta(rows: list[dict]) -> dict:
    """α (s per step) and bandwidth (bytes/s) of time = α·steps + sent bytes / bandwidth.

    Least squares on relative error (each row divided by its measured time), so the small
    sizes that fix α count as much as the large ones that fix the bandwidth."""
    steps = np.array([row["steps"] for row in rows], float)
    sent = np.array([row["sent_bytes"] for row in rows], float)
    net = np.array([row["net_s"] for row in rows], float)
    weight = 1.0 / net
    (alpha, inverse), *_ = np.linalg.lstsq(np.stack([steps, sent], 1) * weight[:, None],
                                           net * weight, rcond=None)
    how = "least squares of time on (steps, bytes sent), relative error"
    if alpha < 0:  # no measurable latency: fit the bandwidth alone
        (inverse,), *_ = np.linalg.lstsq((sent * weight)[:, None], net * weight, rcond=None)
        alpha, how = 0.0, "least squares of time on bytes sent (the latency fit came out negative)"
    if inverse > 0:
        bandwidth = 1.0 / inverse
    else:  # no usable slope: the largest transfer's rate
        largest = max(rows, key=lambda row: row["sent_bytes"])
        bandwidth = largest["sent_bytes"] / largest["net_s"]
        how = "largest size's bytes over its time (the fitted bandwidth was not positive)"
    predicted = alpha * steps + sent / bandwidth
    return {"latency_s": float(alpha), "bandwidth": float(bandwidth), "method": how,
            "relative_residuals": [round(float(r), 3) for r in (predicted - net) / net]}


def measurement_count(quick: bool) -> int:
    """How many steps `calibrate` times (one `progress` call each)."""
    settings = QUICK if quick else FULL
    return 1 + len(settings.matmul_flops) + len(settings.vector_elements) + \
        len(settings.memory_bytes) + 2 * len(settings.collective_bytes)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def calibrate(devices: int = 8, quick: bool = False, progress=None) -> dict:
    """Measure and return a cluster document (the dict that is written as JSON).

    Starts JAX with `devices` CPU devices (EinparError E400 if it has already started
    with fewer). `progress`, if given, is called with a short line before each measurement.
    """
    from einpar.backends.jax_backend import start_devices

    started = start_devices(devices, cpu_devices=devices, platform="cpu")
    bench = _Bench(started.devices, QUICK if quick else FULL, progress)
    began = time.perf_counter()

    overhead = measure_step_overhead(bench)
    matrix = measure_matrix(bench)
    vector = measure_vector(bench)
    memory = measure_memory(bench)
    collectives = measure_collectives(bench)
    fit = fit_alpha_beta(collectives)

    peak = max(row["flops_per_s"] for row in matrix)
    hbm = max(row["bytes_per_s"] for row in memory)
    cores = os.cpu_count() or 1
    today = datetime.date.today().isoformat()
    return {
        "name": "local-cpu",
        "accelerator": {
            "name": "host-cpu",
            "family": "cpu",
            "peak_flops": {"f32": peak},
            "hbm_bandwidth": hbm,
            "hbm_capacity": host_memory_bytes() // devices,
            "scale_up_bandwidth": fit["bandwidth"],
            "scale_up_latency": fit["latency_s"],
            "source": f"einpar calibrate, {today}, {devices} JAX CPU devices on {cores} cores",
        },
        "topology": {"kind": "switched", "gpus_per_node": devices, "nodes": 1},
        "efficiency": {
            "matrix": _steps([row["flops"] for row in matrix],
                             [row["flops_per_s"] / peak for row in matrix]),
            "vector": _steps([row["flops"] for row in vector],
                             [row["flops_per_s"] / peak for row in vector]),
            "memory": _steps([row["bytes"] for row in memory],
                             [row["bytes_per_s"] / hbm for row in memory]),
            "source": "measured by einpar calibrate",
        },
        "step_overhead_s": overhead["time_s"],
        # The devices share the host's cores: a mesh on fewer of them gets more each.
        "shared_cores": cores,
        "measurements": {
            "devices": devices, "cores": cores, "jax": bench.jax.__version__, "quick": quick,
            "seconds": round(time.perf_counter() - began, 1),
            "note": ("time_s: median of a step of `chain` copies of the op, all devices at once; "
                     "net_s: one op, the step overhead taken off"),
            "step_overhead": overhead,
            "matrix": matrix, "vector": vector, "memory": memory,
            "collectives": collectives, "collective_fit": fit,
        },
    }


def write_cluster_file(document: dict, path) -> None:
    """Write `document` as a JSON cluster file (`--cluster FILE` reads it back)."""
    with Path(path).open("w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, allow_nan=False)  # a NaN is no JSON number
        handle.write("\n")


# ---- a GPU cluster from nccl-tests output

MAX_NCCL_TESTS_BYTES = 16 * 2**20
# nccl-tests' header names each rank's device (`device 0 [0x1b] NVIDIA H100 80GB HBM3`).
DEVICE_NAMES = (("GB200", "gb200"), ("B200", "b200"), ("H200", "h200"), ("H100", "h100"),
                ("A100", "a100"))


def _read_text(path: Path) -> str:
    from .cluster import read_text_file
    return read_text_file(path, MAX_NCCL_TESTS_BYTES, "E412")


def guess_accelerator(text: str) -> str | None:
    """The preset of the GPUs nccl-tests' header names, if it names one einpar knows."""
    devices = " ".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for marker, name in DEVICE_NAMES:
        if marker in devices:
            return name
    return None


def calibrate_nccl_tests(paths: list, gpus_per_node: int | None = None,
                         collective: str | None = None, accelerator_name: str | None = None,
                         sources=None) -> dict:
    """A cluster document whose collective constants are fitted to nccl-tests runs: runs
    inside one node fit the scale-up tier, runs across nodes the scale-out tier (on the
    scale-up tier as fitted). EinparError (E412) at a file's first mistake."""

    from einpar.errors import Diagnostic, EinparError, Span

    from .hardware import accelerator
    from .nccl_fit import CALIBRATION_KNOBS, NcclTestsError, _constants, fit, parse_nccl_tests

    measurements, guessed = [], None
    for path in map(Path, paths):
        text = _read_text(path)
        if sources is not None:
            sources.texts[str(path)] = text
        try:
            measurements += parse_nccl_tests(text, collective, gpus_per_node)
        except NcclTestsError as error:
            span = Span(str(path), error.line, 1, error.line, 2) if error.line else None
            raise EinparError(Diagnostic("E412", f"bad nccl-tests output: {error}", span,
                                         hint=error.hint or "give nccl-tests' own output, "
                                                            "header and table")) from None
        guessed = guessed or guess_accelerator(text)
    name = accelerator_name or guessed or "h100"
    chip = accelerator(name)
    today = datetime.date.today().isoformat()
    source = f"einpar calibrate --nccl-tests, {today}, {len(paths)} file(s)"
    inside = [m for m in measurements if m.nodes == 1]
    across = [m for m in measurements if m.nodes > 1]
    document_tiers, fits, bandwidths = {}, {}, {}
    for which, rows in (("up", inside), ("out", across)):
        if not rows:
            continue
        # Within nccl_fit's bounds: the protocols stay NCCL's in kind; the bus bandwidth is
        # what this cluster achieves.
        chip, fitted = fit(chip, rows, which, source, knobs=CALIBRATION_KNOBS)
        bandwidths[f"scale_{which}_efficiency"] = round(fitted["bandwidth"], 4)
        tier = getattr(chip, f"scale_{which}_tier")
        values = dict(_constants(tier))
        section = {}
        for protocol in ("LL", "LL128", "Simple", "NVLS"):
            if f"{protocol}.latency" in values:
                section[protocol] = {
                    "latency": values[f"{protocol}.latency"],
                    "efficiency": values[f"{protocol}.efficiency"],
                    "saturation": values[f"{protocol}.saturation"]}
        section["tree_latency"] = {p: values[f"tree.{p}"] for p in ("LL", "LL128", "Simple")}
        if "nvls_tree" in values:
            section["nvls_tree_latency"] = values["nvls_tree"]
        section["channels"] = values["channels"]
        document_tiers[f"scale_{which}"] = section
        from .nccl_fit import predict
        fits[which] = [round(predict(chip, row) / row.time_s - 1, 3) for row in rows]
    per_node = max((m.gpus // m.nodes for m in measurements), default=1)
    nodes = max((m.nodes for m in measurements), default=1)
    return {
        "name": f"{name}-nccl-tests",
        "accelerator": {"base": name, **bandwidths},
        "topology": {"kind": "switched", "gpus_per_node": per_node, "nodes": nodes},
        "collectives": {**document_tiers, "source": source},
        "measurements": {
            "files": [str(path) for path in paths],
            "note": "nccl-tests out-of-place times; relative_errors: the fitted model's, per row",
            "rows": [{"collective": m.kind, "gpus": m.gpus, "nodes": m.nodes, "bytes": m.bytes,
                      "time_s": m.time_s} for m in measurements],
            "relative_errors": fits,
        },
    }
