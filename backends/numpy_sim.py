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

A dimension its axes do not divide is padded (einpar/layout.py): every
block has the padded local size, collectives move whole padded blocks (and
count them), and each device masks the padding of an operand where an op
reduces over it (`_Device`): zeros for a sum or contraction, -inf for a max,
+inf for a min, a valid id for a take. Elsewhere padding holds whatever the
ops made of it; outputs drop it.
"""

from __future__ import annotations

import numpy as np

from einpar.backends.reference import _Evaluator, deep_recursion, numpy_dtype, scan
from dataclasses import replace

from einpar.ir import Einsum, Operand, Reduce, Repeat, ScatterAdd, Take
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


def _fit(array: np.ndarray, dim: int, size: int) -> np.ndarray:
    """`array` cut or padded with zeros to `size` along `dim` (padding is at the end)."""
    have = array.shape[dim]
    if have == size:
        return array
    if have > size:
        return np.take(array, range(size), axis=dim)
    widths = [(0, 0)] * array.ndim
    widths[dim] = (0, size - have)
    return np.pad(array, widths)


def scatter(value: np.ndarray, layout: Layout, mesh: Mesh) -> list[np.ndarray]:
    """Each device's block of a whole (not partial) value, padded to the local shape where
    the axes do not divide a dimension."""
    assert not layout.partial
    local = layout.local_shape(value.shape, mesh)
    blocks = []
    for d in range(mesh.num_devices):
        # np.array copies into a fresh contiguous array and, unlike ascontiguousarray, keeps rank 0.
        block = np.array(value[block_slices(layout, value.shape, mesh, d)])
        for dim, size in enumerate(local):
            block = _fit(block, dim, size)
        blocks.append(block)
    return blocks


def combine_partials(blocks: list[np.ndarray], layout: Layout, mesh: Mesh) -> tuple[list, Layout]:
    """Each device's block with its pending reduction done over its group (a partial sum's
    summand alone says nothing), and the layout without the partial axes."""
    if not layout.partial:
        return blocks, layout
    (op,) = {op for _, op in layout.partial}  # one kind of pending reduction at a time
    axes = tuple(axis for axis, _ in layout.partial)
    combined = []
    for device in range(mesh.num_devices):
        members = group_of(mesh, device, axes)
        total = np.asarray(blocks[members[0]])
        for other in members[1:]:
            total = _COMBINE[op](total, blocks[other])
        combined.append(total)
    return combined, layout.without_partial(axes)


def real_part(block: np.ndarray, where: tuple[slice, ...]) -> np.ndarray:
    """A block less its padding (an uneven dimension's last blocks end in padding)."""
    return np.asarray(block)[tuple(slice(0, s.stop - s.start) for s in where)]


def assemble(blocks: list[np.ndarray], layout: Layout, shape: tuple[int, ...], mesh: Mesh) -> np.ndarray:
    """The global value the devices hold together; partial values are combined.

    Raises AssertionError if two replicas of one block disagree.
    """
    blocks, layout = combine_partials(blocks, layout, mesh)
    out = np.zeros(shape, dtype=blocks[0].dtype)
    filled = np.zeros(shape, dtype=bool)
    for device, block in enumerate(blocks):
        where = block_slices(layout, shape, mesh, device)
        block = real_part(block, where)
        if filled[where].all():
            # in float64, where NumPy knows NaN from NaN (not for ml_dtypes' bfloat16, fp8)
            np.testing.assert_array_equal(out[where].astype(np.float64), block.astype(np.float64),
                                          err_msg="replicas disagree")
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


def run_step(step: Step, blocks: list[np.ndarray], mesh: Mesh, traffic: Traffic,
             local: tuple[int, ...] | None = None) -> list[np.ndarray]:
    """One reshard step on every device; returns the new local arrays. `local` is the local
    shape after the step, where a padded dimension needs it (None: the axes divide)."""
    out: list[np.ndarray] = []
    if isinstance(step, Slice):
        n = mesh.size(step.axis)
        for device, block in enumerate(blocks):
            k = device_coords(mesh, device)[step.axis]
            size = local[step.dim] if local else block.shape[step.dim] // n
            block = _fit(block, step.dim, n * size)  # a whole dimension padded to n blocks
            out.append(np.take(block, range(k * size, (k + 1) * size), axis=step.dim))
        return out
    if isinstance(step, AllGather):
        for device in range(mesh.num_devices):
            members = group_of(mesh, device, (step.axis,))
            parts = [blocks[m] if m == device else traffic.send(m, blocks[m]) for m in members]
            gathered = np.concatenate(parts, axis=step.dim)
            # A whole dimension again: its padding, at the end, drops off.
            out.append(_fit(gathered, step.dim, local[step.dim]) if local else gathered)
        return out
    if isinstance(step, AllToAll):
        n = mesh.size(step.axis)
        for device in range(mesh.num_devices):
            members = group_of(mesh, device, (step.axis,))
            position = members.index(device)
            parts = []
            for member in members:
                block = blocks[member]
                if local:
                    block = _fit(block, step.dst_dim, n * local[step.dst_dim])
                chunk = np.split(block, n, axis=step.dst_dim)[position]
                parts.append(chunk if member == device else traffic.send(member, chunk))
            gathered = np.concatenate(parts, axis=step.src_dim)
            out.append(_fit(gathered, step.src_dim, local[step.src_dim]) if local else gathered)
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
        # Bring dimension `dim` first so that flat chunk k is block k of it (padded to n blocks).
        moved = [np.moveaxis(b, step.dim, 0) for b in blocks]
        if local:
            moved = [_fit(b, 0, n * local[step.dim]) for b in moved]
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
        self.cuts: dict[str, list[tuple[int, int]]] = {}  # value -> (dim, real elements) where padded

    def offset(self, value: str, dim: int, size: int) -> int:
        return block_index(self.values[value].layout, dim, self.mesh, self.coords) * size

    def global_size(self, value: str, dim: int, size: int) -> int:
        return self.values[value].type.shape[dim]

    def real(self, value: str, dim: int, size: int) -> int:
        """How many of the `size` elements along `dim` of this device's block are not padding."""
        if value not in self.values:
            return size
        whole = self.global_size(value, dim, size)
        return max(0, min(size, whole - self.offset(value, dim, size)))

    def padded(self, op, env: dict) -> dict[str, int]:
        """The op's indices whose blocks here hold padding -> how many real elements they hold
        (an index is split alike in every operand that has it)."""
        reals = {}
        for operand in op.operands:
            if operand.value not in self.cuts:
                shape = np.shape(env[operand.value])
                self.cuts[operand.value] = [(dim, self.real(operand.value, dim, size))
                                            for dim, size in enumerate(shape)
                                            if self.real(operand.value, dim, size) < size]
            for dim, real in self.cuts[operand.value]:
                reals[operand.indices[dim]] = real
        return reals

    def run(self, ops, env: dict) -> None:
        """Each op on this device's blocks, padding masked where the op reduces over it: the op
        alone reads the masked operands, the values themselves keep their padding."""
        for op in ops:
            reals = {} if isinstance(op, Repeat) else self.padded(op, env)
            if not reals:
                super().run((op,), env)
                continue
            view = dict(env)
            if isinstance(op, ScatterAdd):
                op = _update_per_id(op, view, reals)
            for operand, indices, kind in _masks(op):
                array = np.asarray(view[operand.value])
                cut = [(dim, reals[i]) for dim, i in enumerate(operand.indices)
                       if i in indices and i in reals]
                if cut:
                    array = array.copy()
                    for dim, real in cut:
                        where = [slice(None)] * array.ndim
                        where[dim] = slice(real, None)
                        array[tuple(where)] = _fill(array.dtype, kind)
                    view[operand.value] = array
            super().run((op,), view)
            env[op.result.name] = view[op.result.name]


def _update_per_id(op: ScatterAdd, view: dict, reals: dict[str, int]) -> ScatterAdd:
    """A scatter-add whose padded ids would share an update row with real ones (the update
    lacks their index) reads the update broadcast to every id, so that the padded ids' rows
    can be zeroed; `op` itself where no such id is padded."""
    missing = tuple(i for i in op.ids.indices if i in reals and i not in op.update.indices)
    if not missing:
        return op
    sizes = dict(zip(op.ids.indices, np.shape(view[op.ids.value])))
    update = np.asarray(view[op.update.value])
    update = update.reshape(update.shape + (1,) * len(missing))
    name = op.update.value + "~per-id"
    view[name] = np.broadcast_to(update, update.shape[:update.ndim - len(missing)]
                                 + tuple(sizes[i] for i in missing))
    return replace(op, update=Operand(name, op.update.indices + missing))


def _fill(dtype: np.dtype, kind: str):
    """The element a reduction of `kind` ignores, in `dtype`."""
    if kind == "sum":
        return 0
    if dtype == np.bool_:
        return kind == "min"
    if np.issubdtype(dtype, np.integer):
        return np.iinfo(dtype).min if kind == "max" else np.iinfo(dtype).max
    return -np.inf if kind == "max" else np.inf


def _masks(op) -> list:
    """(operand, the indices whose padding it masks, the fill) for one op."""
    if isinstance(op, Einsum):
        return [(operand, set(op.summed), "sum") for operand in op.operands]
    if isinstance(op, Reduce):  # sum, max or min (a mean is a sum and a scale by now)
        return [(op.operand, set(op.over), op.kind)]
    if isinstance(op, Take):  # a padded id reads row 0; its result is padding too
        return [(op.ids, set(op.ids.indices), "sum")]
    if isinstance(op, ScatterAdd):  # a padded update row adds zeros to row 0
        summed = set(op.ids.indices) - set(op.batch)
        return [(op.update, summed, "sum"), (op.ids, set(op.ids.indices), "sum")]
    return []


def _run_steps(steps, envs: list[dict], mesh: Mesh, traffic: Traffic, record: dict | None,
               tick=None, values: dict | None = None) -> None:
    evaluators = [_Device(values or {}, mesh, device) for device in range(len(envs))]
    for step in steps:
        if isinstance(step, LocalStep):
            for evaluator, env in zip(evaluators, envs):
                evaluator.run((step.op,), env)
            made = step.op.result.name
        elif isinstance(step, CollectiveStep):
            local = values[step.dst].local_shape(mesh) if values else None
            blocks = run_step(step.step, [env[step.src] for env in envs], mesh, traffic, local)
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
