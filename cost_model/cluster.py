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

from einpar.errors import LINE_END, Diagnostic, EinparError, SourceMap, Span

from .hardware import (ALIASES, INFINIBAND_NDR, NVLINK4, PROTOCOLS, Accelerator, Figure,
                       Protocol, Tier, accelerator)

# The DGX SuperPod's scalable unit: 32 nodes share one leaf switch per rail.
NODES_PER_LEAF = 32
# Today's largest machines have about 10^5 chips: a cluster beyond 2^20 devices is a mistake.
MAX_DEVICES = 2**20


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

GPU_PRESET = re.compile(r"(?P<chip>[a-z0-9]+)x(?P<gpus>\d{1,9})(?::(?P<nodes>\d{1,9}))?")
TPU_PRESET = re.compile(r"(?P<chip>tpu-v[0-9a-z]+):(?P<dims>\d{1,9}(?:x\d{1,9}){1,2})")
PRESET_EXAMPLES = ("h100x8", "h100x8:64", "a100x8:128", "h200x8", "b200x8:16",
                   "tpu-v4:4x4x4", "tpu-v5e:16x16", "tpu-v5p:8x8x8")


def torus_wraps(chip: Accelerator, dims: tuple[int, ...]) -> tuple[bool, ...]:
    """Which axes of a TPU slice have wraparound links (scaling book tpus.md)."""
    if chip.name == "TPU-v5e":
        return tuple(size == 16 for size in dims)
    return tuple(size % 4 == 0 for size in dims)


def read_text_file(path: Path, limit: int, code: str, what: str = "") -> str:
    """The UTF-8 text of a file of at most `limit` bytes; EinparError (`code`) if it is
    larger, not text, or unreadable. `what` names it in the messages ("cluster file ")."""
    try:
        with path.open("rb") as handle:  # bounded: the path may name a device such as /dev/zero
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise EinparError(Diagnostic(code, f"{what}{path} is larger than "
                                               f"{limit // 2**20} MiB"))
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise EinparError(Diagnostic(code, f"{what}{path} is not UTF-8 text ({error.reason} at "
                                           f"byte {error.start})")) from None
    except OSError as error:
        raise EinparError(Diagnostic(code, f"cannot read {what}{path}: "
                                           f"{error.strerror or error}")) from None


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
        if gpus * nodes > MAX_DEVICES:
            raise ValueError(f"{name}: {gpus * nodes:,} GPUs; a cluster has at most {MAX_DEVICES:,}")
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
#
# A cluster file is read in three passes: its nesting is bounded on the raw text (so no
# parser recurses without end), it is parsed (JSON or TOML), and the document is walked
# once against the schema, one function per section, each value checked for its type and
# range where it is read. Every mistake is an E410 pointing at the value's line and column.

# A cluster file is a few levels deep (topology.links[i].a is four); deeper is refused
# before parsing, as Python's parsers recurse once per level.
MAX_NESTING = 16
MAX_FILE_BYTES = 16 * 2**20
# A user graph is routed from each device of a collective's groups to every node (paths of up
# to a node count each): an all-reduce over a chain of 512 devices prices in about 3 s and
# 0.44 GB; one of 1,024 took 18 s and 2.9 GB.
MAX_GRAPH_NODES = 512
MAX_LINKS = 65536
MAX_STEPS = 64  # efficiency steps in one table
# Ranges of the figures (SI units): wide enough for any real chip or link, narrow enough
# that no sum or quotient of them in the estimate overflows to infinity.
RATE_RANGE = (1e-3, 1e24)  # FLOP/s, bytes/s
BYTES_RANGE = (1.0, 1e24)
SECONDS_RANGE = (0.0, 3600.0)

ACCELERATOR_FIELDS = ("hbm_bandwidth", "hbm_capacity", "scale_up_bandwidth", "scale_up_latency",
                      "scale_out_bandwidth", "scale_out_latency", "scale_up_efficiency",
                      "scale_out_efficiency")
ACCELERATOR_KEYS = ("base", "name", "family", "peak_flops", "source") + ACCELERATOR_FIELDS
FAMILIES = ("gpu", "tpu", "cpu")
TOPOLOGY_KEYS = {"switched": ("kind", "gpus_per_node", "nodes"), "torus": ("kind", "dims", "wrap"),
                 "links": ("kind", "devices", "switches", "links")}
LINK_KEYS = ("a", "b", "bandwidth", "latency")
DOCUMENT_KEYS = ("name", "accelerator", "topology", "efficiency", "device_order", "step_overhead_s",
                 "shared_cores", "collectives", "measurements")  # measurements: what `einpar calibrate` saw
# `collectives`: NCCL's constants per tier (cost_model/nccl.py), as `einpar calibrate
# --nccl-tests` fits them; each value overrides the accelerator's.
COLLECTIVE_TIERS = ("scale_up", "scale_out")
TIER_KEYS = ("LL", "LL128", "Simple", "NVLS", "tree_latency", "nvls_tree_latency", "ll_max_bandwidth",
             "channels")
PROTOCOL_KEYS = ("latency", "efficiency", "saturation")


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
    text = read_text_file(path, MAX_FILE_BYTES, "E410", "cluster file ")
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


def parse_cluster(text: str, file: str = "<cluster>") -> Cluster:
    """The cluster a file's text describes; ClusterFileError at the first mistake."""
    is_json = file.lower().endswith(".json")
    _check_nesting(text, is_json)
    document = _parse(text, is_json)
    return _Schema(document, _Positions(text, is_json)).cluster(Path(file))


# -- reading the text


def _line_col(text: str, offset: int) -> tuple[int, int]:
    """Line and column of `offset`, with lines ended as diagnostics end them (LINE_END)."""
    lines = LINE_END.split(text[:offset].removeprefix("\ufeff"))
    return len(lines), len(lines[-1]) + 1


def _check_nesting(text: str, is_json: bool) -> None:
    """Refuse arrays and tables nested deeper than MAX_NESTING, at the bracket that goes too
    deep (strings and, in TOML, comments skipped; header lines such as [[a.b]] close at once)."""
    depth, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'" and (c == '"' or not is_json):
            quote = text[i:i + 3] if text[i:i + 3] in ('"""', "'''") and not is_json else c
            i += len(quote)
            while i < n and not text.startswith(quote, i):
                i += 2 if text[i] == "\\" and quote[0] == '"' else 1
            i += len(quote)
            continue
        if c == "#" and not is_json:
            newline = text.find("\n", i)
            i = n if newline < 0 else newline
            continue
        if c in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise ClusterFileError(f"values nested more than {MAX_NESTING} deep",
                                       *_line_col(text, i),
                                       hint="a cluster file is a few tables deep; see docs/cost.md")
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(f"key {key!r} is given twice in one table")
        self.key = key


def _reject_duplicate_keys(pairs: list) -> dict:
    table = {}
    for key, value in pairs:
        if key in table:
            raise DuplicateKey(key)
        table[key] = value
    return table


# Python refuses to read integers longer than this (sys.get_int_max_str_digits).
LONGEST_NUMBER = 4300


def _parse(text: str, is_json: bool) -> dict:
    try:
        if is_json:
            document = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
        else:
            import tomllib

            document = tomllib.loads(text)
    except json.JSONDecodeError as error:
        raise ClusterFileError(error.msg, error.lineno, error.colno) from None
    except RecursionError:
        raise ClusterFileError("values nested too deeply", 1, 1) from None
    except ValueError as error:  # TOMLDecodeError, a duplicate key, an integer of 5,000 digits
        message = str(error)
        where = re.search(r"\(at line (\d+), column (\d+)\)", message)
        if where:
            raise ClusterFileError(re.sub(r"\s*\(at line.*\)$", "", message),
                                   int(where[1]), int(where[2])) from None
        if isinstance(error, DuplicateKey):
            repeated = list(re.finditer(rf'"{re.escape(error.key)}"\s*:', text))
            offset = repeated[1].start() if len(repeated) > 1 else 0
            raise ClusterFileError(message, *_line_col(text, offset)) from None
        digits = re.search(r"\d{%d,}" % LONGEST_NUMBER, text)
        if digits:
            raise ClusterFileError(f"a number of {len(digits[0]):,} digits",
                                   *_line_col(text, digits.start())) from None
        raise ClusterFileError(message, 1, 1) from None
    if not isinstance(document, dict):
        raise ClusterFileError("the file must hold one table (a JSON object)", 1, 1)
    return document


class _Positions:
    """Where each value of the document is in the text, by its path of keys and list indices:
    a table's field at its key, a list's item at the item. Exact for JSON; for TOML, the
    first occurrence of each key of the path after the one before (tomllib keeps no positions)."""

    def __init__(self, text: str, is_json: bool):
        self.text, self.is_json = text, is_json
        self.offsets: dict = {}
        if is_json:
            self._json_value(0, ())

    def __call__(self, path: tuple) -> tuple[int, int]:
        offset = None
        while offset is None and path:
            offset = self.offsets.get(path) if self.is_json else self._toml(path)
            path = path[:-1]
        return _line_col(self.text, offset) if offset is not None else (1, 1)

    # JSON: the text parsed, so it is well formed and at most MAX_NESTING deep.
    _SPACE = re.compile(r"[ \t\n\r]*")
    _SCALAR = re.compile(r"[^,\]}\s]*")

    def _skip(self, i: int) -> int:
        return self._SPACE.match(self.text, i).end()

    def _json_value(self, i: int, path: tuple) -> int:
        text = self.text
        i = self._skip(i)
        self.offsets.setdefault(path, i)
        if text[i] == "{":
            i = self._skip(i + 1)
            while text[i] != "}":
                key, end = json.decoder.scanstring(text, i + 1)
                self.offsets[path + (key,)] = i
                i = self._skip(self._json_value(self._skip(end) + 1, path + (key,)))
                i = self._skip(i + 1) if text[i] == "," else i
            return i + 1
        if text[i] == "[":
            i, index = self._skip(i + 1), 0
            while text[i] != "]":
                i = self._skip(self._json_value(i, path + (index,)))
                i, index = (self._skip(i + 1) if text[i] == "," else i), index + 1
            return i + 1
        if text[i] == '"':
            return json.decoder.scanstring(text, i + 1)[1]
        return self._SCALAR.match(text, i).end()

    def _toml(self, path: tuple) -> int | None:
        offset, key = 0, None
        for part in path:
            if isinstance(part, int):
                offset = self._toml_item(offset, key, part)
                if offset is None:
                    return None
                continue
            key = re.escape(part)
            match = re.compile(rf"(?<![\w\"'-])(?:{key}|\"{key}\"|'{key}')\s*[=.\]]").search(
                self.text, offset)
            if match is None:
                return None
            offset = match.start()
        return offset

    def _toml_item(self, offset: int, key: str | None, index: int) -> int | None:
        """The `index`th table of an array of tables [[...key]], or item of an inline array."""
        if key is not None and self.text.rfind("[[", 0, offset) > self.text.rfind("\n", 0, offset):
            line_start = self.text.rfind("\n", 0, offset) + 1
            headers = [header for header in re.finditer(rf"^[ \t]*\[\[[^\]\n]*\b{key}\s*\]\]",
                                                        self.text, re.M)
                       if header.start() >= line_start]
            return headers[index].start() if index < len(headers) else None
        equals = self.text.find("=", offset)
        start = self.text.find("[", equals)
        if equals < 0 or start < 0:
            return None
        depth, count, i = 0, 0, start + 1
        while i < len(self.text):
            c = self.text[i]
            if c in "\"'":
                end = self.text.find(c, i + 1)
                while end > 0 and c == '"' and self.text[end - 1] == "\\":
                    end = self.text.find(c, end + 1)
                i = len(self.text) if end < 0 else end + 1
                continue
            if depth == 0 and count == index and not c.isspace():
                return i
            if c in "[{":
                depth += 1
            elif c in "]}":
                if depth == 0:
                    return None
                depth -= 1
            elif c == "," and depth == 0:
                count += 1
            i += 1
        return None


def _show(value) -> str:
    """A value as the file wrote it, short enough for a message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and abs(value) >= 10**15:
        return f"a number of {len(str(abs(value)))} digits"
    text = f"{value:g}" if isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _dotted(path: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path).lstrip(".")


# -- the schema, one section at a time


class _Values:
    """Reading one value of the document: its type and range checked, a failure at its
    position."""

    def __init__(self, document: dict, where: _Positions):
        self.document, self.where = document, where

    def fail(self, path: tuple, message: str, hint: str | None = None):
        raise ClusterFileError(message, *self.where(path), hint=hint)

    # values

    def table(self, path: tuple, value, keys) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"{_dotted(path)} must be a table, not {_show(value)}")
        unknown = [key for key in value if key not in keys]
        if unknown:
            self.fail(path + (unknown[0],), f"unknown field {_dotted(path + (unknown[0],))}",
                      hint="fields: " + ", ".join(keys))
        return value

    def listed(self, path: tuple, value, what: str, most: int, least: int = 1) -> list:
        if not isinstance(value, list) or not least <= len(value) <= most:
            count = f"{least} to {most:,}" if least else f"at most {most:,}"
            self.fail(path, f"{_dotted(path)} must be a list of {count} {what}, not {_show(value)}"
                      + (f" of {len(value):,}" if isinstance(value, list) else ""))
        return value

    def text(self, path: tuple, value) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, f"{_dotted(path)} must be a non-empty string, not {_show(value)}")
        return value

    def number(self, path: tuple, value, bounds: tuple[float, float], what: str = "a number",
               low_open: bool = False) -> float:
        """A finite number in `bounds` (the low end excluded if `low_open`)."""
        low, high = bounds
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                ok = False
            else:
                ok = math.isfinite(number) and (low < number if low_open else low <= number) \
                    and number <= high
        if not ok:
            span = f"above {low:g} and at most {high:g}" if low_open else f"from {low:g} to {high:g}"
            self.fail(path, f"{_dotted(path)} must be {what} {span}, not {_show(value)}")
        return number

    def whole(self, path: tuple, value, most: int, what: str = "positive whole number") -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            self.fail(path, f"{_dotted(path)} must be a {what} (at most {most:,}), not {_show(value)}")
        return value

    # sections


class _ChipSection(_Values):
    """The `accelerator` and `collectives` sections: what one chip computes, holds and moves."""

    def accelerator(self, spec, file: Path) -> Accelerator:
        path = ("accelerator",)
        if isinstance(spec, str):
            spec = {"base": spec}
        if not isinstance(spec, dict):
            self.fail(path, f"accelerator must be a preset name or a table, not {_show(spec)}",
                      hint="known presets: " + ", ".join(sorted(ALIASES)))
        self.table(path, spec, ACCELERATOR_KEYS)
        source = self.text(path + ("source",), spec["source"]) if "source" in spec \
            else f"cluster file {file.name}"
        if "base" in spec:
            try:
                chip = accelerator(self.text(path + ("base",), spec["base"]))
            except KeyError as error:
                self.fail(path + ("base",), error.args[0])
        else:
            missing = [key for key in ("peak_flops", "hbm_bandwidth", "hbm_capacity",
                                       "scale_up_bandwidth") if key not in spec]
            if missing:
                self.fail(path, f"an accelerator without `base` needs {', '.join(missing)}")
            none = Figure(0.0, source)
            chip = Accelerator(name="custom", family="gpu", peak_flops={},
                               hbm_capacity=none, hbm_bandwidth=none, scale_up_bandwidth=none,
                               scale_up_latency=Figure(0.0, source),
                               scale_up_domain=Figure(1e9, source),
                               scale_out_bandwidth=None, scale_out_latency=None)
        changes = {}
        if "name" in spec:
            changes["name"] = self.text(path + ("name",), spec["name"])
        if "family" in spec:
            if not isinstance(spec["family"], str) or spec["family"] not in FAMILIES:
                self.fail(path + ("family",), f"accelerator.family must be one of "
                                              f"{', '.join(FAMILIES)}, not {_show(spec['family'])}")
            changes["family"] = spec["family"]
        if "peak_flops" in spec:
            peaks = spec["peak_flops"]
            if not isinstance(peaks, dict) or not peaks:
                self.fail(path + ("peak_flops",), "accelerator.peak_flops must be a table of "
                                                  f"dtype = FLOP/s, not {_show(peaks)}")
            changes["peak_flops"] = dict(chip.peak_flops) | {
                dtype: Figure(self.number(path + ("peak_flops", dtype), value, RATE_RANGE,
                                          "a rate in FLOP/s"), source)
                for dtype, value in peaks.items()}
        for key in ACCELERATOR_FIELDS:
            if key in spec:
                if key.endswith("efficiency"):
                    value = self.number(path + (key,), spec[key], (0.0, 1.0),
                                        "a fraction of line rate", low_open=True)
                elif key.endswith("latency"):
                    value = self.number(path + (key,), spec[key], SECONDS_RANGE, "a time in seconds")
                elif key == "hbm_capacity":
                    value = self.number(path + (key,), spec[key], BYTES_RANGE, "a size in bytes")
                else:
                    value = self.number(path + (key,), spec[key], RATE_RANGE, "a rate in bytes/s")
                changes[key] = Figure(value, source)
        if "scale_out_bandwidth" in changes and chip.scale_out_latency is None \
                and "scale_out_latency" not in changes:
            changes["scale_out_latency"] = Figure(0.0, source)
        return replace(chip, **changes) if changes else chip

    def collectives(self, spec, chip: Accelerator, file: Path) -> Accelerator:
        """NCCL's constants of the scale-up and scale-out tiers, each over the chip's own (or,
        for a GPU without them, NCCL's NVLink4 without NVLS and InfiniBand NDR defaults)."""
        path = ("collectives",)
        if chip.family != "gpu":
            self.fail(path, f"a collectives section sets NCCL's constants, for GPUs; "
                            f"{chip.name} is a {chip.family.upper()} accelerator, whose collectives "
                            f"this file prices by its latency and bandwidth")
        self.table(path, spec, COLLECTIVE_TIERS + ("source",))
        source = self.text(path + ("source",), spec["source"]) if "source" in spec \
            else f"cluster file {file.name}"
        changes = {}
        # A GPU of the file's own has no NVSwitch reduction unless the section gives one.
        for which, default in zip(COLLECTIVE_TIERS, (replace(NVLINK4, nvls=None), INFINIBAND_NDR)):
            if which in spec:
                tier = getattr(chip, f"{which}_tier") or default
                changes[f"{which}_tier"] = self.tier(path + (which,), spec[which], tier, source)
        return replace(chip, **changes)

    def tier(self, path: tuple, spec, tier: Tier, source: str) -> Tier:
        self.table(path, spec, TIER_KEYS)
        protocols = dict(tier.protocols)
        nvls = tier.nvls
        for name in PROTOCOLS + ("NVLS",):
            if name not in spec:
                continue
            here = path + (name,)
            values = self.table(here, spec[name], PROTOCOL_KEYS)
            old = protocols.get(name) if name != "NVLS" else nvls
            if old is None and set(values) != set(PROTOCOL_KEYS):
                self.fail(here, f"{_dotted(here)} needs latency, efficiency and saturation "
                                "(this tier has no NVLS to start from)")
            figures = {}
            for key, bounds, what, low_open in (
                    ("latency", SECONDS_RANGE, "a time in seconds", False),
                    ("efficiency", (0.0, 1.0), "a fraction of the tier's bandwidth", True),
                    ("saturation", (0.0, 1e24), "a size in bytes", False)):
                figures[key] = Figure(self.number(here + (key,), values[key], bounds, what,
                                                  low_open), source) \
                    if key in values else getattr(old, key)
            made = Protocol(**figures)
            if name == "NVLS":
                nvls = made
            else:
                protocols[name] = made
        trees = dict(tier.tree_latency)
        if "tree_latency" in spec:
            here = path + ("tree_latency",)
            for name, value in self.table(here, spec["tree_latency"], PROTOCOLS).items():
                trees[name] = Figure(self.number(here + (name,), value, SECONDS_RANGE,
                                                 "a time in seconds"), source)
        nvls_tree = tier.nvls_tree_latency
        if "nvls_tree_latency" in spec:
            nvls_tree = Figure(self.number(path + ("nvls_tree_latency",), spec["nvls_tree_latency"],
                                           SECONDS_RANGE, "a time in seconds"), source)
        ll_max = tier.ll_max_bandwidth
        if "ll_max_bandwidth" in spec:
            ll_max = Figure(self.number(path + ("ll_max_bandwidth",), spec["ll_max_bandwidth"],
                                        RATE_RANGE, "a rate in bytes/s"), source)
        channels = tier.channels
        if "channels" in spec:
            channels = Figure(self.number(path + ("channels",), spec["channels"], (1.0, 64.0),
                                          "a number of channels (NCCL runs at most 32)"), source)
        return Tier(f"{tier.name} ({source})", protocols, trees, ll_max, nvls, nvls_tree, channels)


class _NetworkSection(_Values):
    """The `topology` section: a switched cluster, a torus or a graph of links."""

    def topology(self, spec) -> Topology:
        path = ("topology",)
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if not isinstance(kind, str) or kind not in TOPOLOGY_KEYS:
            self.fail(path + (("kind",) if isinstance(spec, dict) and "kind" in spec else ()),
                      "the file needs a `topology` table whose kind is switched, torus or links"
                      + (f", not {_show(kind)}" if kind is not None else ""))
        self.table(path, spec, TOPOLOGY_KEYS[kind])
        if kind == "switched":
            if "gpus_per_node" not in spec:
                self.fail(path, "a switched topology needs gpus_per_node")
            gpus = self.whole(path + ("gpus_per_node",), spec["gpus_per_node"], MAX_DEVICES)
            nodes = self.whole(path + ("nodes",), spec.get("nodes", 1), MAX_DEVICES)
            if gpus * nodes > MAX_DEVICES:
                self.fail(path + ("nodes",), f"{gpus:,} GPUs per node times {nodes:,} nodes is more "
                                             f"than {MAX_DEVICES:,} devices")
            return Switched(gpus, nodes)
        if kind == "torus":
            return self.torus(path, spec)
        return self.links(path, spec)

    def torus(self, path: tuple, spec: dict) -> Torus:
        dims = spec.get("dims")
        if not isinstance(dims, list) or not 1 <= len(dims) <= 3 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            self.fail(path + ("dims",), "topology.dims must be a list of 1 to 3 positive sizes")
        if math.prod(dims) > MAX_DEVICES:
            self.fail(path + ("dims",), f"topology.dims make more than {MAX_DEVICES:,} devices")
        wrap = spec.get("wrap", [True] * len(dims))
        if not isinstance(wrap, list) or len(wrap) != len(dims) or not all(
                isinstance(w, bool) for w in wrap):
            self.fail(path + ("wrap",), "topology.wrap must be a list of true/false, one per dim")
        return Torus(tuple(dims), tuple(wrap))

    def links(self, path: tuple, spec: dict) -> Links:
        names: dict[str, tuple] = {}  # device or switch name -> its path
        for key in ("devices", "switches"):
            if key == "devices" and key not in spec:
                self.fail(path, "a links topology needs devices")
            items = self.listed(path + (key,), spec.get(key, []), "names", MAX_GRAPH_NODES,
                                least=1 if key == "devices" else 0)
            for index, item in enumerate(items):
                here = path + (key, index)
                self.text(here, item)
                if item in names:
                    self.fail(here, f"{_dotted(here)}: {item!r} is named twice "
                                    f"(first at {_dotted(names[item])})")
                names[item] = here
        if len(names) > MAX_GRAPH_NODES:
            self.fail(path + ("switches",), f"at most {MAX_GRAPH_NODES:,} devices and switches "
                                            "in all (the graph is routed over all pairs)")
        devices, switches = tuple(spec["devices"]), tuple(spec.get("switches", []))
        links, seen = [], {}
        for index, link in enumerate(self.listed(path + ("links",), spec.get("links", []),
                                                 "links", MAX_LINKS, least=0)):
            here = path + ("links", index)
            self.table(here, link, LINK_KEYS)
            missing = [key for key in ("a", "b", "bandwidth") if key not in link]
            if missing:
                self.fail(here, f"{_dotted(here)} needs {', '.join(missing)} "
                                "(each link has a, b and bandwidth, and may give latency)")
            for end in ("a", "b"):
                if not isinstance(link[end], str) or link[end] not in names:
                    self.fail(here + (end,), f"{_dotted(here + (end,))} must name a device or "
                                             f"switch, not {_show(link[end])}")
            pair = frozenset((link["a"], link["b"]))
            if len(pair) == 1:
                self.fail(here, f"{_dotted(here)} joins {link['a']!r} to itself")
            if pair in seen:
                self.fail(here, f"{_dotted(here)} joins {link['a']!r} and {link['b']!r} again "
                                f"(first at {_dotted(seen[pair])})",
                          hint="give one link per pair, with the bandwidth of all of them")
            seen[pair] = here
            links.append((link["a"], link["b"],
                          self.number(here + ("bandwidth",), link["bandwidth"], RATE_RANGE,
                                      "a rate in bytes/s"),
                          self.number(here + ("latency",), link.get("latency", 0.0), SECONDS_RANGE,
                                      "a time in seconds")))
        graph = nx.Graph([(a, b) for a, b, _, _ in links])
        graph.add_nodes_from(devices)
        if not nx.is_connected(graph):
            self.fail(path + ("links",), "the links leave some devices unreachable from others")
        return Links(devices, switches, tuple(links))


class _Schema(_ChipSection, _NetworkSection):
    """The document walked once: each section's function reads its values, checks each for
    type and range as it goes, and fails at the first mistake with the value's position."""

    def cluster(self, file: Path) -> Cluster:
        document = self.table((), self.document, DOCUMENT_KEYS)
        if "accelerator" not in document:
            self.fail((), "the file needs `accelerator`: a preset name or a table",
                      hint="known presets: " + ", ".join(sorted(ALIASES)))
        if "topology" not in document:
            self.fail((), "the file needs a `topology` table whose kind is switched, torus or links")
        chip = self.accelerator(document["accelerator"], file)
        if "collectives" in document:
            chip = self.collectives(document["collectives"], chip, file)
        topology = self.topology(document["topology"])
        if isinstance(topology, Switched) and topology.nodes > 1 and chip.scale_out_bandwidth is None:
            self.fail(("topology", "nodes"),
                      "a cluster of several nodes needs accelerator.scale_out_bandwidth")
        order = None
        if "device_order" in document:
            order = self.device_order(document["device_order"], topology.num_devices)
        name = self.text(("name",), document["name"]) if "name" in document else file.stem
        overhead = 0.0
        if "step_overhead_s" in document:
            overhead = self.number(("step_overhead_s",), document["step_overhead_s"], SECONDS_RANGE)
        cores = None
        if "shared_cores" in document:
            cores = self.whole(("shared_cores",), document["shared_cores"], MAX_DEVICES)
        efficiency = self.efficiency(document["efficiency"]) if "efficiency" in document \
            else CALCULON_EFFICIENCY
        return Cluster(name=name, chip=chip, topology=topology, efficiency=efficiency,
                       device_order=order, step_overhead_s=overhead, shared_cores=cores,
                       source=str(file))

    def efficiency(self, spec) -> Efficiency:
        path = ("efficiency",)
        self.table(path, spec, ("matrix", "vector", "memory", "source"))
        tables = {}
        for key in ("matrix", "vector", "memory"):
            here = path + (key,)
            steps = spec.get(key, getattr(CALCULON_EFFICIENCY, key))
            if isinstance(steps, (int, float)) and not isinstance(steps, bool):
                steps = [[0, steps]]
            if not isinstance(steps, (list, tuple)) or not 1 <= len(steps) <= MAX_STEPS or not all(
                    isinstance(step, (list, tuple)) and len(step) == 2 for step in steps):
                self.fail(here, f"efficiency.{key} must be a fraction or a list of 1 to {MAX_STEPS} "
                                "[size at least, fraction] steps")
            table = []
            for index, (size, fraction) in enumerate(steps):
                table.append((self.number(here + (index,), size, (0.0, 1e30), "a size"),
                              self.number(here + (index,), fraction, (0.0, 1.0), "a fraction",
                                          low_open=True)))
            tables[key] = tuple(sorted(table, reverse=True))
        source = self.text(path + ("source",), spec["source"]) if "source" in spec else "cluster file"
        return Efficiency(**tables, source=source)

    def device_order(self, order, devices: int) -> tuple[int, ...]:
        path = ("device_order",)
        if (not isinstance(order, list) or not 1 <= len(order) <= devices
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in order)
                or sorted(order) != list(range(len(order)))):
            self.fail(path, "device_order must list distinct cluster devices 0..N-1, one per "
                            "mesh device")
        return tuple(order)


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
