"""A program's mesh and layouts in JAX's terms, for users' own `jax.shard_map` code.

`partition_spec(layout)` and `layout_from_spec(spec, labels)` translate between
einpar layouts and `jax.sharding.PartitionSpec`s (a dimension split over several
axes is a tuple of axis names, the first one major, in both); `jax_mesh(program)`
is the program's mesh over JAX devices (row-major, as einpar numbers devices);
`shard_map_specs(program)` gives the in_specs and out_specs of its inputs and
outputs (see einpar.testing.spec for which layouts those are). JAX is imported
only when one of these is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from einpar.ir import Program
from einpar.layout import Layout

from .spec import as_program, input_layouts, output_layouts


def partition_spec(layout: Layout) -> Any:
    """The `jax.sharding.PartitionSpec` of a layout: `[B@dp,S,D@(tp,sp)]` is
    `P("dp", None, ("tp", "sp"))`. A partial layout has none (JAX has no pending sums)."""
    from jax.sharding import PartitionSpec

    if layout.partial:
        raise ValueError(f"{layout} is partial (a pending reduction); a PartitionSpec cannot say "
                         "that: reduce it first (psum)")
    return PartitionSpec(*[None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
                           for axes in layout.dims])


def layout_from_spec(spec: Any, labels: Sequence[str] | int | None = None) -> Layout:
    """The einpar Layout of a `PartitionSpec` for a value whose dimensions are `labels` (their
    names, or just the rank; None: as many as the spec has entries): dimensions the spec does
    not reach are not split."""
    entries = tuple(spec)
    rank = len(entries) if labels is None else labels if isinstance(labels, int) else len(labels)
    if len(entries) > rank:
        raise ValueError(f"{spec} names {len(entries)} dimensions; the value has {rank}")
    dims = []
    for entry in entries + (None,) * (rank - len(entries)):
        if entry is None:
            dims.append(())
        elif isinstance(entry, str):
            dims.append((entry,))
        else:
            dims.append(tuple(entry))
    layout = Layout(tuple(dims))
    used = [axis for axes in dims for axis in axes]
    if len(set(used)) != len(used):
        raise ValueError(f"{spec} uses a mesh axis twice; an axis may split one dimension only")
    return layout


def jax_mesh(program: Program | str | Path, platform: str | None = "cpu") -> Any:
    """The program's mesh as a `jax.sharding.Mesh` over the first devices of `platform`
    ("cpu" by default, started in the number the mesh needs when JAX has not started yet;
    None: JAX's default platform). Device d of the mesh is einpar's device d."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from einpar.backends import jax_backend
    from einpar.errors import Diagnostic, EinparError

    mesh = as_program(program).mesh
    needed = mesh.num_devices
    # Ask for CPU devices without choosing JAX's platform for the rest of the process.
    if platform in (None, "cpu") and jax_backend._cpu_devices_asked(jax) < needed:
        jax_backend._configure(jax, "jax_num_cpu_devices", needed)
    devices = jax.devices(platform) if platform else jax.devices()
    if len(devices) < needed:
        raise EinparError(Diagnostic(
            "E400", f"the mesh needs {needed} devices, but JAX sees {len(devices)} "
                    f"{devices[0].platform} device{'s' if len(devices) != 1 else ''}",
            hint=f"start JAX with XLA_FLAGS=--xla_force_host_platform_device_count={needed} "
                 f"for {needed} CPU devices"))
    devices = devices[:needed]
    if not mesh.axes:  # one device: JAX wants a named axis all the same
        return Mesh(np.array(devices[:1]), ("_",))
    return Mesh(np.array(devices).reshape([size for _, size in mesh.axes]), mesh.names)


@dataclass(frozen=True)
class ShardMapSpecs:
    """What `jax.shard_map` needs to run a function on the program's layouts."""

    mesh: Any  # jax.sharding.Mesh
    inputs: dict[str, Any]  # input or param name -> PartitionSpec
    outputs: dict[str, Any]  # output name -> PartitionSpec


def shard_map_specs(program: Program | str | Path, platform: str | None = "cpu") -> ShardMapSpecs:
    """The mesh and the PartitionSpecs of the program's inputs (params included) and outputs:
    `jax.shard_map(f, mesh=s.mesh, in_specs=(s.inputs["x"], ...), out_specs=s.outputs["y"])`."""
    program = as_program(program)
    return ShardMapSpecs(jax_mesh(program, platform),
                         {name: partition_spec(layout) for name, layout in input_layouts(program).items()},
                         {name: partition_spec(layout) for name, layout in output_layouts(program).items()})
