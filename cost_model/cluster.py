"""Clusters: chips, switches and links as a networkx graph, and where the mesh lands on them.

Three kinds of topology:

- `Switched`: nodes of `gpus_per_node` GPUs joined by an NVSwitch (non-blocking,
  so one logical switch per node), the nodes joined by a rail-optimized
  InfiniBand fat tree: GPU i of every node has its own NIC on rail i's leaf
  switch, leaves reach each other through the spine at full bisection
  (DGX SuperPod reference design, as the scaling book's gpus.md describes it).
- `Torus`: TPU chips on a 2D or 3D torus of ICI links, with wraparound where
  the slice has it (scaling book tpus.md: v5e wraps only axes of 16; v4 and
  v5p wrap axes that are multiples of 4).
- `Links`: any graph a user writes in a cluster file (devices, switches,
  links with bandwidth and latency).

Presets are named `h100x8` (one node of 8), `h100x8:64` (64 nodes),
`a100x8:128`, `tpu-v5e:16x16`, `tpu-v5p:8x8x8`. A cluster file (TOML or JSON,
see docs/cost.md) describes anything else.

The mesh lands on devices row-major: mesh device d (the last mesh axis
innermost) is cluster device d, so the innermost axes share a node or a
torus line. A cluster file's `device_order` overrides it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Union

import networkx as nx

from einpar.errors import Diagnostic, EinparError, SourceMap, Span, source_lines

from .hardware import ALIASES, Accelerator, Figure, accelerator

# The DGX SuperPod's scalable unit: 32 nodes share one leaf switch per rail.
NODES_PER_LEAF = 32


@dataclass(frozen=True)
class Switched:
    gpus_per_node: int
    nodes: int

    @property
    def num_devices(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Torus:
    dims: tuple[int, ...]
    wrap: tuple[bool, ...]

    @property
    def num_devices(self) -> int:
        return math.prod(self.dims)


@dataclass(frozen=True)
class Links:
    """A user-written graph: device names in device order, and links."""

    devices: tuple[str, ...]
    switches: tuple[str, ...]
    # (a, b, bandwidth bytes/s per direction, latency s)
    links: tuple[tuple[str, str, float, float], ...]

    @property
    def num_devices(self) -> int:
        return len(self.devices)


Topology = Union[Switched, Torus, Links]


@dataclass(frozen=True)
class Efficiency:
    """The fraction of peak a local op reaches, as steps over its size (Calculon's model).

    `matrix` and `vector` are ((FLOPs at least, fraction), ...) and `memory` is
    ((bytes at least, fraction), ...), largest first; the first step the op
    reaches applies. A single step (0, f) is a constant efficiency.
    """

    matrix: tuple[tuple[float, float], ...]
    vector: tuple[tuple[float, float], ...]
    memory: tuple[tuple[float, float], ...]
    source: str

    @staticmethod
    def step(table, size: float) -> float:
        for threshold, fraction in table:
            if size >= threshold:
                return fraction
        return table[-1][1]


# calculon-ai/calculon@caa4b11 systems/a100_80g.json (matrix and vector units, HBM tier).
CALCULON_EFFICIENCY = Efficiency(
    matrix=((128e9, 0.95), (16e9, 0.90), (1e9, 0.60), (0, 0.10)),
    vector=((16e9, 0.95), (1e9, 0.50), (0, 0.10)),
    memory=((100e6, 0.90), (10e6, 0.75), (1e6, 0.60), (0, 0.30)),
    source="calculon-ai/calculon@caa4b11 systems/a100_80g.json (step tables)",
)


@dataclass
class Cluster:
    name: str
    chip: Accelerator
    topology: Topology
    efficiency: Efficiency = CALCULON_EFFICIENCY
    # Cluster device of each mesh device; None is row-major (mesh device d on device d).
    device_order: tuple[int, ...] | None = None
    # A fixed cost per step (dispatching the program); measured by `einpar calibrate`.
    step_overhead_s: float = 0.0
    # CPU devices of one host share its cores: the calibrated rates are each device's share
    # with every device busy, and a mesh on fewer devices gets more each (estimate.py).
    shared_cores: int | None = None
    source: str = "preset"

    @property
    def num_devices(self) -> int:
        return self.topology.num_devices

    def device_name(self, device: int) -> str:
        if isinstance(self.topology, Links):
            return self.topology.devices[device]
        return f"{'tpu' if isinstance(self.topology, Torus) else 'gpu'}{device}"

    def describe(self) -> str:
        topo = self.topology
        if isinstance(topo, Switched):
            shape = f"{topo.nodes} node{'s' * (topo.nodes > 1)} of {topo.gpus_per_node} {self.chip.name}"
        elif isinstance(topo, Torus):
            dims = "x".join(map(str, topo.dims))
            wraps = "".join("w" if w else "-" for w in topo.wrap)
            shape = f"{self.chip.name} {dims} torus (wraparound {wraps})"
        else:
            shape = f"{len(topo.devices)} {self.chip.name} on {len(topo.links)} links"
        return f"{self.name}: {shape}"

    @cached_property
    def graph(self) -> nx.Graph:
        """Devices, switches and links; each link has `bandwidth` (bytes/s, per direction),
        `latency` (s) and `tier` (nvlink, ib, ici or the file's name)."""
        return build_graph(self)


# ---- the graph


def build_graph(cluster: Cluster) -> nx.Graph:
    chip, topo = cluster.chip, cluster.topology
    graph = nx.Graph(name=cluster.name)
    if isinstance(topo, Links):
        for name in topo.devices:
            graph.add_node(name, kind="device")
        for name in topo.switches:
            graph.add_node(name, kind="switch")
        for a, b, bandwidth, latency in topo.links:
            graph.add_edge(a, b, bandwidth=bandwidth, latency=latency, tier="link")
        return graph
    for device in range(topo.num_devices):
        graph.add_node(cluster.device_name(device), kind="device", index=device)
    if isinstance(topo, Torus):
        link = dict(bandwidth=chip.scale_up_bandwidth.value, latency=chip.scale_up_latency.value,
                    tier="ici")
        for device in range(topo.num_devices):
            coords = unravel(device, topo.dims)
            for axis, size in enumerate(topo.dims):
                if size == 1 or (coords[axis] == size - 1 and not topo.wrap[axis]):
                    continue
                neighbour = list(coords)
                neighbour[axis] = (coords[axis] + 1) % size
                graph.add_edge(cluster.device_name(device),
                               cluster.device_name(ravel(neighbour, topo.dims)), **link)
        return graph
    # Switched: the path GPU-switch-GPU costs the tier's latency in all.
    nvlink = dict(bandwidth=chip.scale_up_bandwidth.value, latency=chip.scale_up_latency.value / 2,
                  tier="nvlink")
    for node in range(topo.nodes):
        graph.add_node(f"nvswitch{node}", kind="switch")
        for local in range(topo.gpus_per_node):
            graph.add_edge(cluster.device_name(node * topo.gpus_per_node + local),
                           f"nvswitch{node}", **nvlink)
    if topo.nodes == 1:
        return graph
    nic = chip.scale_out_bandwidth.value
    ib = dict(bandwidth=nic, latency=chip.scale_out_latency.value / 2, tier="ib")
    graph.add_node("spine", kind="switch")
    for leaf_group in range(-(-topo.nodes // NODES_PER_LEAF)):
        nodes = range(leaf_group * NODES_PER_LEAF, min(topo.nodes, (leaf_group + 1) * NODES_PER_LEAF))
        for rail in range(topo.gpus_per_node):
            leaf = f"leaf{leaf_group}.{rail}"
            graph.add_node(leaf, kind="switch")
            for node in nodes:
                graph.add_edge(cluster.device_name(node * topo.gpus_per_node + rail), leaf, **ib)
            # Full bisection: a leaf's uplinks carry as much as its downlinks.
            graph.add_edge(leaf, "spine", bandwidth=nic * len(nodes), latency=0.0, tier="ib")
    return graph


def unravel(index: int, dims: tuple[int, ...]) -> tuple[int, ...]:
    coords = []
    for size in reversed(dims):
        coords.append(index % size)
        index //= size
    return tuple(reversed(coords))


def ravel(coords, dims: tuple[int, ...]) -> int:
    index = 0
    for coord, size in zip(coords, dims):
        index = index * size + coord
    return index


# ---- presets

GPU_PRESET = re.compile(r"(?P<chip>[a-z0-9]+)x(?P<gpus>\d+)(?::(?P<nodes>\d+))?")
TPU_PRESET = re.compile(r"(?P<chip>tpu-v[0-9a-z]+):(?P<dims>\d+(?:x\d+){1,2})")
PRESET_EXAMPLES = ("h100x8", "h100x8:64", "a100x8:128", "h200x8", "b200x8:16",
                   "tpu-v4:4x4x4", "tpu-v5e:16x16", "tpu-v5p:8x8x8")


def torus_wraps(chip: Accelerator, dims: tuple[int, ...]) -> tuple[bool, ...]:
    """Which axes of a TPU slice have wraparound links (scaling book tpus.md)."""
    if chip.name == "TPU-v5e":
        return tuple(size == 16 for size in dims)
    return tuple(size % 4 == 0 for size in dims)


def preset(name: str) -> Cluster:
    """A named cluster; raises ValueError with the known forms when `name` is not one."""
    key = name.strip().lower()
    gpu = GPU_PRESET.fullmatch(key)
    tpu = TPU_PRESET.fullmatch(key)
    if gpu and gpu["chip"] in ALIASES and ALIASES[gpu["chip"]].family == "gpu":
        chip = ALIASES[gpu["chip"]]
        gpus, nodes = int(gpu["gpus"]), int(gpu["nodes"] or 1)
        domain = int(chip.scale_up_domain.value)
        if not 1 <= gpus <= domain or nodes < 1:
            raise ValueError(f"{name}: a {chip.name} node has 1 to {domain} GPUs, and a cluster "
                             f"at least one node")
        if nodes > 1 and chip.scale_out_bandwidth is None:
            raise ValueError(f"{name}: {chip.name} has no published scale-out bandwidth")
        return Cluster(key, chip, Switched(gpus, nodes))
    if tpu and tpu["chip"] in ALIASES and ALIASES[tpu["chip"]].family == "tpu":
        chip = ALIASES[tpu["chip"]]
        dims = tuple(int(size) for size in tpu["dims"].split("x"))
        pod = int(chip.scale_up_domain.value)
        if min(dims) < 1 or math.prod(dims) > pod:
            raise ValueError(f"{name}: a {chip.name} slice has 1 to {pod} chips (one pod)")
        return Cluster(key, chip, Torus(dims, torus_wraps(chip, dims)))
    raise ValueError(f"no cluster preset {name!r}; presets look like " + ", ".join(PRESET_EXAMPLES))


# ---- cluster files


class ClusterFileError(Exception):
    def __init__(self, message: str, line: int = 0, col: int = 0, hint: str | None = None):
        super().__init__(message)
        self.line, self.col, self.hint = line, col, hint


def load_cluster(name_or_path: str, sources: SourceMap | None = None) -> Cluster:
    """A preset by name, or a cluster file (.toml or .json); EinparError (E410) if neither.
    A file's text goes into `sources`, if given, so its diagnostics can show its lines."""
    path = Path(name_or_path)
    if path.suffix.lower() not in (".toml", ".json"):
        try:
            return preset(name_or_path)
        except ValueError as error:
            raise EinparError(Diagnostic(
                "E410", str(error),
                hint="or give a cluster file (.toml or .json); see docs/cost.md")) from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise EinparError(Diagnostic("E410", f"cluster file {path} is not UTF-8 text "
                                             f"({error.reason} at byte {error.start})")) from None
    except OSError as error:
        raise EinparError(Diagnostic("E410", f"cannot read cluster file {path}: "
                                             f"{error.strerror or error}")) from None
    if sources is not None:
        sources.texts[str(path)] = text
    try:
        return parse_cluster(text, str(path))
    except ClusterFileError as error:
        span = None
        if error.line:
            span = Span(str(path), error.line, max(1, error.col), error.line, max(1, error.col) + 1)
        raise EinparError(Diagnostic("E410", f"bad cluster file: {error}", span,
                                     hint=error.hint or "see docs/cost.md for the format")) from None


def _read_document(text: str, file: str) -> dict:
    if file.lower().endswith(".json"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ClusterFileError(error.msg, error.lineno, error.colno) from None
    else:
        import tomllib

        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            where = re.search(r"\(at line (\d+), column (\d+)\)", str(error))
            message = re.sub(r"\s*\(at line.*\)$", "", str(error))
            line, col = (int(where[1]), int(where[2])) if where else (0, 0)
            raise ClusterFileError(message, line, col) from None
    if not isinstance(document, dict):
        raise ClusterFileError("the file must hold one table (a JSON object)", 1, 1)
    return document


def _locate(text: str, key: str) -> tuple[int, int]:
    """Line and column where `key` first appears (for pointing at a bad field)."""
    for number, line in enumerate(source_lines(text), 1):
        col = line.find(key)
        if col >= 0:
            return number, col + 1
    return 0, 0


def _number(table: dict, key: str, text: str, positive: bool = True) -> float | None:
    if key not in table:
        return None
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and not value > 0):
        raise ClusterFileError(f"{key} must be a positive number, not {value!r}", *_locate(text, key))
    return float(value)


# Accelerator figures a file may set, by their field names: bytes, bytes/s, seconds, fractions.
ACCELERATOR_FIELDS = ("hbm_bandwidth", "hbm_capacity", "scale_up_bandwidth", "scale_up_latency",
                      "scale_out_bandwidth", "scale_out_latency", "scale_up_efficiency",
                      "scale_out_efficiency")


def _accelerator(document: dict, text: str, file: str) -> Accelerator:
    spec = document.get("accelerator")
    if isinstance(spec, str):
        spec = {"base": spec}
    if not isinstance(spec, dict):
        raise ClusterFileError("the file needs `accelerator`: a preset name or a table",
                               *_locate(text, "accelerator"),
                               hint="known presets: " + ", ".join(sorted(ALIASES)))
    unknown = set(spec) - set(ACCELERATOR_FIELDS) - {"base", "name", "peak_flops", "source", "family"}
    if unknown:
        key = sorted(unknown)[0]
        raise ClusterFileError(f"unknown accelerator field {key!r}", *_locate(text, key),
                               hint="fields: base, name, peak_flops, " + ", ".join(ACCELERATOR_FIELDS))
    source = str(spec.get("source", f"cluster file {Path(file).name}"))
    if "base" in spec:
        try:
            chip = accelerator(str(spec["base"]))
        except KeyError as error:
            raise ClusterFileError(error.args[0], *_locate(text, str(spec["base"]))) from None
    else:
        missing = [key for key in ("peak_flops", "hbm_bandwidth", "hbm_capacity", "scale_up_bandwidth")
                   if key not in spec]
        if missing:
            raise ClusterFileError(f"an accelerator without `base` needs {', '.join(missing)}",
                                   *_locate(text, "accelerator"))
        none = Figure(0.0, source)
        chip = Accelerator(name="custom", family=str(spec.get("family", "gpu")), peak_flops={},
                           hbm_capacity=none, hbm_bandwidth=none, scale_up_bandwidth=none,
                           scale_up_latency=Figure(0.0, source), scale_up_domain=Figure(1e9, source),
                           scale_out_bandwidth=None, scale_out_latency=None)
    changes = {}
    if "name" in spec:
        changes["name"] = str(spec["name"])
    if "peak_flops" in spec:
        peaks = spec["peak_flops"]
        if not isinstance(peaks, dict) or not peaks:
            raise ClusterFileError("peak_flops must be a table of dtype = FLOP/s",
                                   *_locate(text, "peak_flops"))
        merged = dict(chip.peak_flops)
        for dtype, value in peaks.items():
            merged[dtype] = Figure(_number(peaks, dtype, text), source)
        changes["peak_flops"] = merged
    for key in ACCELERATOR_FIELDS:
        value = _number(spec, key, text, positive=not key.endswith("latency"))
        if value is not None:
            if key.endswith("efficiency") and value > 1:
                raise ClusterFileError(f"{key} is a fraction of line rate, at most 1",
                                       *_locate(text, key))
            changes[key] = Figure(value, source)
    return replace(chip, **changes) if changes else chip


def _topology(document: dict, text: str) -> Topology:
    topo = document.get("topology")
    if not isinstance(topo, dict) or topo.get("kind") not in ("switched", "torus", "links"):
        raise ClusterFileError("the file needs a `topology` table whose kind is switched, torus "
                               "or links", *_locate(text, "topology"))
    kind = topo["kind"]

    def positive_int(key: str) -> int:
        value = topo.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ClusterFileError(f"topology.{key} must be a positive whole number, not {value!r}",
                                   *_locate(text, key))
        return value

    if kind == "switched":
        return Switched(positive_int("gpus_per_node"), positive_int("nodes") if "nodes" in topo else 1)
    if kind == "torus":
        dims = topo.get("dims")
        if not isinstance(dims, list) or not 1 <= len(dims) <= 3 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ClusterFileError("topology.dims must be a list of 1 to 3 positive sizes",
                                   *_locate(text, "dims"))
        wrap = topo.get("wrap", [True] * len(dims))
        if not isinstance(wrap, list) or len(wrap) != len(dims) or not all(
                isinstance(w, bool) for w in wrap):
            raise ClusterFileError("topology.wrap must be a list of true/false, one per dim",
                                   *_locate(text, "wrap"))
        return Torus(tuple(dims), tuple(wrap))
    devices = topo.get("devices")
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) for d in devices):
        raise ClusterFileError("topology.devices must be a list of device names",
                               *_locate(text, "devices"))
    switches = topo.get("switches", [])
    names = set(devices) | set(switches)
    links = []
    for link in topo.get("links", []):
        if not isinstance(link, dict) or {"a", "b", "bandwidth"} - set(link):
            raise ClusterFileError("each link needs a, b and bandwidth (and may give latency)",
                                   *_locate(text, "links"))
        for end in (link["a"], link["b"]):
            if end not in names:
                raise ClusterFileError(f"link end {end!r} is not a device or switch",
                                       *_locate(text, f'"{end}"'))
        links.append((link["a"], link["b"], _number(link, "bandwidth", text),
                      _number(link, "latency", text, positive=False) or 0.0))
    graph = nx.Graph([(a, b) for a, b, _, _ in links])
    graph.add_nodes_from(devices)
    if not nx.is_connected(graph):
        raise ClusterFileError("the links leave some devices unreachable from others",
                               *_locate(text, "links"))
    return Links(tuple(devices), tuple(switches), tuple(links))


def _efficiency(document: dict, text: str) -> Efficiency:
    spec = document.get("efficiency")
    if spec is None:
        return CALCULON_EFFICIENCY
    if not isinstance(spec, dict):
        raise ClusterFileError("efficiency must be a table", *_locate(text, "efficiency"))
    tables = {}
    for key in ("matrix", "vector", "memory"):
        steps = spec.get(key, getattr(CALCULON_EFFICIENCY, key))
        if isinstance(steps, (int, float)) and not isinstance(steps, bool):
            steps = [[0, steps]]
        try:
            table = tuple(sorted(((float(a), float(f)) for a, f in steps), reverse=True))
        except (TypeError, ValueError):
            raise ClusterFileError(f"efficiency.{key} must be a fraction or a list of "
                                   f"[size at least, fraction] steps", *_locate(text, key)) from None
        if not table or not all(0 < f <= 1 for _, f in table):
            raise ClusterFileError(f"efficiency.{key} fractions must be in (0, 1]", *_locate(text, key))
        tables[key] = table
    return Efficiency(**tables, source=str(spec.get("source", "cluster file")))


def parse_cluster(text: str, file: str = "<cluster>") -> Cluster:
    document = _read_document(text, file)
    chip = _accelerator(document, text, file)
    topology = _topology(document, text)
    if isinstance(topology, Switched) and topology.nodes > 1 and chip.scale_out_bandwidth is None:
        raise ClusterFileError("a cluster of several nodes needs accelerator.scale_out_bandwidth",
                               *_locate(text, "nodes"))
    order = document.get("device_order")
    if order is not None:
        if (not isinstance(order, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                   for d in order)
                or sorted(order) != list(range(len(order))) or len(order) > topology.num_devices):
            raise ClusterFileError("device_order must list distinct cluster devices 0..N-1, one per "
                                   "mesh device", *_locate(text, "device_order"))
        order = tuple(order)
    overhead = _number(document, "step_overhead_s", text, positive=False) or 0.0
    cores = _number(document, "shared_cores", text)
    return Cluster(name=str(document.get("name", Path(file).stem)), chip=chip, topology=topology,
                   efficiency=_efficiency(document, text), device_order=order,
                   step_overhead_s=overhead, shared_cores=None if cores is None else int(cores),
                   source=file)


# ---- where the mesh lands


def check_fits(cluster: Cluster, num_devices: int, mesh_text: str) -> None:
    """EinparError (E411) when the mesh needs more devices than the cluster places."""
    if cluster.device_order is not None and num_devices > len(cluster.device_order):
        raise EinparError(Diagnostic(
            "E411", f"the {mesh_text} has {num_devices} devices but the cluster file's device_order "
                    f"places {len(cluster.device_order)}",
            hint="list one cluster device per mesh device in device_order"))
    if num_devices > cluster.num_devices:
        raise EinparError(Diagnostic(
            "E411", f"the {mesh_text} needs {num_devices} devices; cluster {cluster.name} has "
                    f"{cluster.num_devices}",
            hint="pick a bigger cluster (e.g. h100x8:64, tpu-v5p:8x8x8) or shrink the mesh with --set"))
