"""What the partitioner minimizes: a plan's time on a cluster, or the bytes it sends.

`TimeObjective` prices a plan as the cost model does (cost_model/): each
collective by its algorithm, protocol, latency and bandwidth on the cluster
(cost_model.collectives.collective_time), each local op by its roofline
(cost_model.compute.op_time, FLOPs against HBM traffic), so repeated FLOPs
and the latency of every collective count. A local slice is free (the op
that reads it reads its block), as in the byte count. Times are in nanoseconds, the
unit the integer program is solved in.

`ByteObjective` is the plan for teaching: bytes each device sends first,
then FLOPs per device (as a fraction of a byte, so FLOPs only settle ties).

Without a cluster the default is one node of H100s sized to the mesh
(`default_cluster`): `h100xN` for a mesh of N <= 8 devices, otherwise
`h100x8:M`, M nodes of 8 over InfiniBand.
"""

from __future__ import annotations

from .ir import Op, Program
from .layout import Layout, Mesh, local_bytes
from .reshard import ReshardError, plan_reshard

OBJECTIVES = ("time", "bytes")
DEFAULT_OBJECTIVE = "time"
GPUS_PER_NODE = 8


def default_cluster_name(mesh: Mesh) -> str:
    n = max(mesh.num_devices, 1)
    return f"h100x{n}" if n <= GPUS_PER_NODE else f"h100x8:{-(-n // GPUS_PER_NODE)}"


def default_cluster(mesh: Mesh):
    from .cost_model.cluster import preset
    return preset(default_cluster_name(mesh))


class Objective:
    name = ""
    unit = ""
    capacity: float | None = None  # bytes of memory per device a plan must fit in, if known

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._moves: dict = {}

    def move(self, src: Layout, dst: Layout, shape: tuple[int, ...], dtype: str) -> float | None:
        """The price of resharding a value from `src` to `dst`; None if no reshard reaches it."""
        key = (src, dst, shape, dtype)
        if key not in self._moves:
            try:
                plan = plan_reshard(src, dst, shape, dtype, self.mesh)
            except ReshardError:
                self._moves[key] = None
            else:
                self._moves[key] = self.price_plan(plan, shape, dtype)
        return self._moves[key]

    def price_plan(self, plan, shape, dtype) -> float:
        raise NotImplementedError

    def transfer(self, axis: str, nbytes: int) -> float:
        """The price of each device sending `nbytes` to its neighbour along `axis` (a
        pipeline's stage-to-stage transfer: a permute)."""
        raise NotImplementedError

    def compute(self, op: Op, local_sizes: dict[str, int], flops: int,
                operand_layouts: tuple[Layout, ...], result_layout: Layout,
                operand_types) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class ByteObjective(Objective):
    name, unit = "bytes", "B"

    def __init__(self, mesh: Mesh, program: Program | None = None):
        super().__init__(mesh)
        # FLOPs weigh less than one byte in total, so they only settle ties of bytes.
        self.flop_weight = 0.5 / (_flops(program) + 1)

    def price_plan(self, plan, shape, dtype) -> float:
        return float(plan.bytes_per_device)

    def transfer(self, axis: str, nbytes: int) -> float:
        return float(nbytes)

    def compute(self, op, local_sizes, flops, operand_layouts, result_layout, operand_types) -> float:
        return flops * self.flop_weight

    def describe(self) -> str:
        return "bytes sent per device (then FLOPs per device)"


class TimeObjective(Objective):
    name, unit = "time", "s"

    def __init__(self, mesh: Mesh, cluster, precision: str | None = None,
                 program: Program | None = None):
        super().__init__(mesh)
        from .precision import DEFAULT_PRECISION
        self.cluster = cluster
        self.capacity = cluster.chip.hbm_capacity.value
        # Ops too small to be faster split (their time is the kernel's floor) tie: FLOPs per
        # device settle it, weighing 0.01 ns for the whole program, far below any real
        # difference and far above the solver's tolerance (1e-6).
        self.flop_weight = 0.01 / (_flops(program) + 1)
        self.precision = precision or DEFAULT_PRECISION
        self._collectives: dict = {}

    def collective_ns(self, kind: str, axes: tuple[str, ...], before: int) -> float:
        key = (kind, axes, before)
        if key not in self._collectives:
            from .cost_model.collectives import collective_time
            self._collectives[key] = collective_time(kind, axes, before, self.mesh,
                                                     self.cluster).time_s * 1e9
        return self._collectives[key]

    def transfer(self, axis: str, nbytes: int) -> float:
        return self.collective_ns("permute", (axis,), nbytes)

    def price_plan(self, plan, shape, dtype) -> float:
        total, layout = 0.0, plan.src
        for step in plan.steps:
            after = step.apply(layout)
            if step.kind != "slice":  # a slice is free: the op reading it reads its block
                total += self.collective_ns(step.kind, step.axes,
                                            local_bytes(layout, shape, dtype, self.mesh))
            layout = after
        return total

    def compute(self, op, local_sizes, flops, operand_layouts, result_layout, operand_types) -> float:
        from .cost_model.compute import op_hbm_bytes

        hbm = op_hbm_bytes(op, local_bytes(result_layout, op.result.type.shape, op.result.type.dtype,
                                           self.mesh),
                           [local_bytes(layout, vtype.shape, vtype.dtype, self.mesh)
                            for layout, vtype in zip(operand_layouts, operand_types)])
        return _op_ns(op, flops, hbm, self.cluster, self.precision, tuple(local_sizes.items()),
                      tuple(t.dtype for t in operand_types)) + flops * self.flop_weight

    def describe(self) -> str:
        return f"time on {self.cluster.name}"


def _flops(program: Program | None) -> int:
    if program is None:
        return 0
    from .flops import program_flops
    return program_flops(program)


def _op_ns(op, flops, hbm, cluster, precision, sizes, dtypes) -> float:
    from .cost_model.compute import op_time
    return op_time(op, flops, hbm, cluster, precision, dict(sizes), list(dtypes)).time_s * 1e9


def make_objective(program: Program, objective: str = DEFAULT_OBJECTIVE, cluster=None,
                   precision: str | None = None) -> Objective:
    """The objective named `objective` ("time" or "bytes") for `program`, on `cluster` (a
    cost_model Cluster; None: default_cluster of the program's mesh)."""
    if objective == "bytes":
        return ByteObjective(program.mesh, program)
    if objective != "time":
        raise ValueError(f"objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    return TimeObjective(program.mesh, cluster if cluster is not None else
                         default_cluster(program.mesh), precision, program)
