"""The NumPy device simulator: every device of the mesh, simulated with NumPy.

Each device holds its own local arrays. Collectives move data between the
simulated devices exactly as real ones would: each device sends chunks to
the others in its group, and every byte sent is counted per device, so tests
can check that the bytes the planner declares are the bytes that move.

Collective algorithms as simulated (and as counted):
- all-gather: each device sends its block to the n-1 others;
- reduce-scatter: each device sends chunk j of its (flattened, padded)
  array to the device at position j, which combines what it receives;
- all-reduce: a reduce-scatter, then an all-gather of the reduced chunks;
- all-to-all: each device sends chunk j (along the destination dimension)
  to the device at position j;
- permute: each device sends its block to one other device.
"""

from __future__ import annotations

import numpy as np

from einpar.backends.reference import _Evaluator, deep_recursion, numpy_dtype, scan
from einpar.layout import (Layout, Mesh, block_index, block_slices, device_at, device_coords,
                           group_of)
from einpar.reshard import AllGather, AllReduce, AllToAll, Permute, ReduceScatter, Slice, Step
from einpar.spmd import CollectiveStep, LocalStep, RepeatStep

_COMBINE = {"sum": np.add, "max": np.maximum, "min": np.minimum}


class Traffic:
    """Bytes sent by each device, as counted by the simulated collectives."""

    def __init__(self, devices: int):
        self.sent = [0] * devices
        # Of those, the bytes a pipeline's stage sent to another stage (numpy_pipeline.py).
        self.between_stages = [0] * devices

    def send(self, device: int, array: np.ndarray) -> np.ndarray:
        self.sent[device] += array.nbytes
        return array


def scatter(value: np.ndarray, layout: Layout, mesh: Mesh) -> list[np.ndarray]:
    """Each device's block of a whole (not partial) value."""
    assert not layout.partial
    # np.array copies into a fresh contiguous array and, unlike ascontiguousarray, keeps rank 0.
    return [np.array(value[block_slices(layout, value.shape, mesh, d)])
            for d in range(mesh.num_devices)]


def assemble(blocks: list[np.ndarray], layout: Layout, shape: tuple[int, ...], mesh: Mesh) -> np.ndarray:
    """The global value the devices hold together; partial values are combined.

    Raises AssertionError if two replicas of one block disagree.
    """
    if layout.partial:
        (op,) = {op for _, op in layout.partial}  # one kind of pending reduction at a time
        axes = tuple(axis for axis, _ in layout.partial)
        combined = []
        for device in range(mesh.num_devices):
            members = group_of(mesh, device, axes)
            total = blocks[members[0]]
            for other in members[1:]:
                total = _COMBINE[op](total, blocks[other])
            combined.append(total)
        blocks = combined
        layout = layout.without_partial(axes)
    out = np.zeros(shape, dtype=blocks[0].dtype)
    filled = np.zeros(shape, dtype=bool)
    for device, block in enumerate(blocks):
        where = block_slices(layout, shape, mesh, device)
        if filled[where].all():
            np.testing.assert_array_equal(out[where], block, err_msg="replicas disagree")
        out[where] = block
        filled[where] = True
    assert filled.all()
    return out


def _chunks(array: np.ndarray, n: int) -> list[np.ndarray]:
    flat = array.reshape(-1)
    size = -(-flat.size // n)
    padded = np.zeros(size * n, dtype=array.dtype)
    padded[:flat.size] = flat
    return [padded[k * size:(k + 1) * size] for k in range(n)]


def _reduce_scatter_flat(blocks, mesh, axes, op, traffic) -> list[list[np.ndarray]]:
    """Reduce-scatter of flattened arrays over `axes`: device at position j gets chunk j."""
    reduced: dict[int, np.ndarray] = {}
    for device in range(mesh.num_devices):
        members = group_of(mesh, device, axes)
        position = members.index(device)
        total = None
        for member in members:
            chunk = _chunks(blocks[member], len(members))[position]
            if member != device:
                traffic.send(member, chunk)
            total = chunk.copy() if total is None else _COMBINE[op](total, chunk)
        reduced[device] = total
    return reduced


def run_step(step: Step, blocks: list[np.ndarray], mesh: Mesh, traffic: Traffic) -> list[np.ndarray]:
    """One reshard step on every device; returns the new local arrays."""
    out: list[np.ndarray] = []
    if isinstance(step, Slice):
        n = mesh.size(step.axis)
        for device, block in enumerate(blocks):
            k = device_coords(mesh, device)[step.axis]
            size = block.shape[step.dim] // n
            out.append(np.take(block, range(k * size, (k + 1) * size), axis=step.dim))
        return out
    if isinstance(step, AllGather):
        for device in range(mesh.num_devices):
            members = group_of(mesh, device, (step.axis,))
            parts = [blocks[m] if m == device else traffic.send(m, blocks[m]) for m in members]
            out.append(np.concatenate(parts, axis=step.dim))
        return out
    if isinstance(step, AllToAll):
        n = mesh.size(step.axis)
        for device in range(mesh.num_devices):
            members = group_of(mesh, device, (step.axis,))
            position = members.index(device)
            parts = []
            for member in members:
                chunk = np.split(blocks[member], n, axis=step.dst_dim)[position]
                parts.append(chunk if member == device else traffic.send(member, chunk))
            out.append(np.concatenate(parts, axis=step.src_dim))
        return out
    if isinstance(step, Permute):
        for device in range(mesh.num_devices):
            coords = device_coords(mesh, device)
            source = device_at(mesh, dict(coords, **{step.src_axis: coords[step.dst_axis],
                                                     step.dst_axis: coords[step.src_axis]}))
            out.append(traffic.send(source, blocks[source]).copy())
        return out
    if isinstance(step, ReduceScatter):
        n = mesh.size(step.axis)
        # Bring dimension `dim` first so that flat chunk k is block k of it.
        moved = [np.moveaxis(b, step.dim, 0) for b in blocks]
        reduced = _reduce_scatter_flat(moved, mesh, (step.axis,), step.op, traffic)
        for device, block in enumerate(moved):
            shape = (block.shape[0] // n,) + block.shape[1:]
            size = int(np.prod(shape))
            out.append(np.moveaxis(reduced[device][:size].reshape(shape), 0, step.dim))
        return out
    assert isinstance(step, AllReduce)
    reduced = _reduce_scatter_flat(blocks, mesh, step.axes, step.op, traffic)
    for device, block in enumerate(blocks):
        members = group_of(mesh, device, step.axes)
        parts = [reduced[m] if m == device else traffic.send(m, reduced[m]) for m in members]
        out.append(np.concatenate(parts)[:block.size].reshape(block.shape))
    return out


# ---- running a whole SpmdProgram


class _Device(_Evaluator):
    """The local ops of one simulated device, which holds blocks: `pos(S)` over a split S
    counts from the device's block, and a take from a table split along its rows looks up
    only the rows the device holds (Megatron's vocabulary-parallel embedding)."""

    def __init__(self, values: dict, mesh: Mesh, device: int):
        super().__init__()
        self.values = values  # local name -> SpmdValue (its layout and global type)
        self.mesh = mesh
        self.coords = device_coords(mesh, device)

    def offset(self, value: str, dim: int, size: int) -> int:
        return block_index(self.values[value].layout, dim, self.mesh, self.coords) * size

    def global_size(self, value: str, dim: int, size: int) -> int:
        return self.values[value].type.shape[dim]


def _run_steps(steps, envs: list[dict], mesh: Mesh, traffic: Traffic, record: dict | None,
               tick=None, values: dict | None = None) -> None:
    evaluators = [_Device(values or {}, mesh, device) for device in range(len(envs))]
    for step in steps:
        if isinstance(step, LocalStep):
            for evaluator, env in zip(evaluators, envs):
                evaluator.run((step.op,), env)
            made = step.op.result.name
        elif isinstance(step, CollectiveStep):
            blocks = run_step(step.step, [env[step.src] for env in envs], mesh, traffic)
            for env, block in zip(envs, blocks):
                env[step.dst] = block
            made = step.dst
        else:
            assert isinstance(step, RepeatStep)
            _run_repeat(step, envs, mesh, traffic, record, tick, values)
            continue
        if record is not None:  # a loop body's values as its first trip made them
            record.setdefault(made, [env[made] for env in envs])
        if tick is not None:
            tick()


def trip_envs(loop: RepeatStep, envs: list[dict], carried: list[dict], trip: int) -> list[dict]:
    """Each device's values in trip `trip` of `loop`: its own, the carried values coming in,
    and this trip's slice of each stack."""
    inner = []
    for env, carried_in in zip(envs, carried):
        trip_env = dict(env)
        trip_env.update(carried_in)
        trip_env.update((inside, env[stacked][trip]) for stacked, inside in loop.stacked)
        inner.append(trip_env)
    return inner


def _run_repeat(step: RepeatStep, envs: list[dict], mesh: Mesh, traffic: Traffic,
                record: dict | None, tick, values: dict | None) -> None:
    """A loop on every device, trip by trip (`scan`): each trip's body runs on all devices
    before the next, as its collectives need."""
    def trip(i: int, carried: list[dict]):
        inner = trip_envs(step, envs, carried, i)
        if record is not None:
            for name in [inside for _, inside, _, _ in step.carried] + \
                    [inside for _, inside in step.stacked]:
                record.setdefault(name, [env[name] for env in inner])
        _run_steps(step.body, inner, mesh, traffic, record, tick, values)
        return ([{inside: env[result] for _, inside, result, _ in step.carried} for env in inner],
                [[env[inside] for inside, _ in step.saved] for env in inner])

    carried, kept = scan(step.count, step.reverse,
                         [{inside: env[before] for before, inside, _, _ in step.carried}
                          for env in envs], trip)
    for device, (env, leaving) in enumerate(zip(envs, carried)):
        for _, inside, _, after in step.carried:
            env[after] = leaving[inside]
        for k, (_, after) in enumerate(step.saved):
            env[after] = np.stack([ys[device][k] for ys in kept])
    if record is not None:  # what the loop leaves: its carried results and stacks
        for after in [a for _, _, _, a in step.carried] + [a for _, a in step.saved]:
            record.setdefault(after, [env[after] for env in envs])


def run_spmd(program, inputs: dict[str, np.ndarray], record: dict | None = None,
             tick=None) -> tuple[dict[str, np.ndarray], Traffic]:
    """Run an SpmdProgram on every simulated device; returns the assembled outputs
    (global arrays, by output name) and the bytes each device sent. With `record`,
    also fills it with every local value: its name -> each device's block. `tick`,
    if given, is called after each step (on all devices; a repeat body's once per trip)."""
    if program.pipeline is not None:
        from einpar.backends.numpy_pipeline import run_pipeline

        return run_pipeline(program, inputs)
    mesh = program.mesh
    envs: list[dict] = [{} for _ in range(mesh.num_devices)]
    for name in program.inputs:
        value = program.values[name]
        array = np.asarray(inputs[name]).astype(numpy_dtype(value.type.dtype), copy=False)
        for env, block in zip(envs, scatter(array, value.layout, mesh)):
            env[name] = block
        if record is not None:
            record[name] = [env[name] for env in envs]
    traffic = Traffic(mesh.num_devices)
    with np.errstate(all="ignore"), deep_recursion():
        _run_steps(program.steps, envs, mesh, traffic, record, tick, program.values)
    outputs = {}
    for output in program.outputs:
        value = program.values[output.value]
        outputs[output.name] = assemble([env[output.value] for env in envs], output.layout,
                                        value.type.shape, mesh)
    return outputs, traffic
