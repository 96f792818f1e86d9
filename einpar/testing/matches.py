"""`assert_matches`: a user's own function agrees with a `.ein` program, its specification.

The program's unsharded reference (einpar.api.run_reference) is the truth; the
user's function is run in one of three styles and every output it returns is
compared with the reference within the program's tolerance (einpar.tolerance):

- "global": `fn(**arrays)` on whole arrays, NumPy or JAX;
- "per_device": `fn(collectives, **blocks)` once per device, on the blocks the
  program's input layouts give that device, with NumPy collectives over named
  mesh axes (einpar.testing.collectives); each device returns its blocks of the
  outputs under the program's output layouts (einpar.testing.spec);
- "jax": `fn(**blocks)` under `jax.shard_map` on the program's mesh of JAX CPU
  devices, with the program's layouts as in_specs and out_specs.

Blocks are checked one by one against the reference, so a failure names the
device whose block is wrong, where in the whole output, and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from einpar.ir import Program
from einpar.layout import block_slices
from einpar.tolerance import RELATIVE_TOLERANCE, _scale, program_tolerance

from .collectives import DEFAULT_TIMEOUT_S, describe_devices, run_per_device
from .spec import as_program, input_layouts, output_layouts

Style = Literal["global", "per_device", "jax"]
STYLES = ("global", "per_device", "jax")
Index = tuple[slice, ...]


@dataclass(frozen=True)
class Block:
    """What a function returned for one part of one output: `device` (None for a whole
    array) held `array` as the part `index` of the output."""

    device: int | None
    index: Index
    array: np.ndarray


def assert_matches(program: Program | str | Path, fn: Callable[..., Any], *, style: Style = "global",
                   inputs: dict[str, np.ndarray] | None = None, seed: int | None = None,
                   rtol: float | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                   check_vma: bool = True) -> None:
    """Check that `fn` computes what `program` (a path, `.ein` text or a Program) computes.

    `fn` is called, by `style`, as `fn(**arrays)` ("global": whole arrays), as
    `fn(collectives, **blocks)` on every device ("per_device": NumPy, see
    einpar.testing.Collectives) or as `fn(**blocks)` under `jax.shard_map` on the program's
    mesh ("jax"); keyword names are the program's inputs and params. It returns an array
    (a program of one output), or a dict of its outputs by name. `inputs`: the arrays to
    use (by default random ones from `seed`, 0 if None); `rtol`: the tolerance (by default
    the program's, einpar.tolerance.program_tolerance); `timeout`: how long a device waits
    for the others at a collective ("per_device"); `check_vma` ("jax"): passed to
    jax.shard_map, whose check refuses, while tracing, an output that varies along an axis
    its spec says it is replicated over (a missing psum); with False such code runs, and
    every device's block is compared with the reference.

    Raises AssertionError with a report (the output, the device's block and its index
    range, the largest error and where, the tolerance, the program) if an output differs;
    einpar.testing.DeviceRunError (an AssertionError) if a per-device run goes wrong.
    """
    import einpar.api as ein

    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(map(repr, STYLES))}, not {style!r}")
    if not callable(fn):
        raise TypeError(f"fn must be a function, not {type(fn).__name__}")
    program = as_program(program)
    arrays = ein.random_inputs(program, seed or 0) if inputs is None else \
        ein.check_inputs(program, inputs, "inputs")
    expected = ein.run_reference(program, arrays)
    tolerance = program_tolerance(program) if rtol is None else float(rtol)
    if style == "global":
        got = {name: _jax_blocks(array, program) or [Block(None, _whole(expected[name]), np.asarray(array))]
               for name, array in _by_output(fn(**arrays), program, "fn").items()}
    elif style == "per_device":
        got = _run_per_device(program, fn, arrays, timeout)
    else:
        got = _run_shard_map(program, fn, arrays, check_vma)
    failures = [report for name in expected
                if (report := _compare_output(program, name, expected[name], got[name], tolerance))]
    if failures:
        raise AssertionError(_report(program, style, failures, tolerance, rtol is None))


def _whole(array: np.ndarray) -> Index:
    return tuple(slice(0, size) for size in np.shape(array))


def _by_output(result: Any, program: Program, who: str) -> dict[str, Any]:
    """What `fn` returned, by output name: a dict, a tuple in the program's output order,
    or an array for a program of one output."""
    names = [output.name for output in program.outputs]
    listed = ", ".join(map(repr, names))
    if isinstance(result, dict):
        missing = [name for name in names if name not in result]
        extra = [key for key in result if key not in names]
        if missing or extra:
            raise AssertionError(f"{who} returned outputs {', '.join(map(repr, result))}; the program's "
                                 f"outputs are {listed}")
        return dict(result)
    if isinstance(result, (tuple, list)):
        if len(result) != len(names):
            raise AssertionError(f"{who} returned {len(result)} values; the program has "
                                 f"{len(names)} outputs ({listed}): return one each, or a dict")
        return dict(zip(names, result))
    if len(names) != 1:
        raise AssertionError(f"{who} returned one array; the program has {len(names)} outputs "
                             f"({listed}): return a dict of them by name")
    return {names[0]: result}


def _run_per_device(program: Program, fn, arrays: dict[str, np.ndarray],
                    timeout: float) -> dict[str, list[Block]]:
    from einpar.backends.numpy_sim import scatter

    mesh = program.mesh
    layouts = input_layouts(program)
    blocks: list[dict[str, np.ndarray]] = [{} for _ in range(mesh.num_devices)]
    for name, array in arrays.items():
        for device, block in enumerate(scatter(np.asarray(array), layouts[name], mesh)):
            blocks[device][name] = block
    returned = run_per_device(mesh, fn, blocks, timeout)
    got: dict[str, list[Block]] = {output.name: [] for output in program.outputs}
    out_layouts = output_layouts(program)
    for device, result in enumerate(returned):
        for name, block in _by_output(result, program, describe_devices(mesh, [device])).items():
            shape = program.values[_value_of(program, name)].type.shape
            index = block_slices(out_layouts[name], shape, mesh, device)
            got[name].append(Block(device, index, np.asarray(block)))
    return got


def _value_of(program: Program, output: str) -> str:
    return next(o.value for o in program.outputs if o.name == output)


def _run_shard_map(program: Program, fn, arrays: dict[str, np.ndarray],
                   check_vma: bool) -> dict[str, list[Block]]:
    import jax

    from .jax_specs import shard_map_specs

    specs = shard_map_specs(program)
    names = list(arrays)
    outputs = [output.name for output in program.outputs]

    def per_device(*blocks):
        by_name = _by_output(fn(**dict(zip(names, blocks))), program, "fn")
        return tuple(by_name[name] for name in outputs)

    mapped = jax.jit(jax.shard_map(per_device, mesh=specs.mesh,
                                   in_specs=tuple(specs.inputs[name] for name in names),
                                   out_specs=tuple(specs.outputs[name] for name in outputs),
                                   check_vma=check_vma))
    results = mapped(*(arrays[name] for name in names))
    return {name: _jax_blocks(result, program) for name, result in zip(outputs, results)}


def _jax_blocks(result: Any, program: Program) -> list[Block]:
    """Each device's block of a JAX array laid out on the program's mesh (so that replicas
    that disagree are seen); [] for anything else."""
    mesh = getattr(getattr(result, "sharding", None), "mesh", None)
    if mesh is None or tuple(mesh.shape.items()) != program.mesh.axes:
        return []
    device_of = {device.id: k for k, device in enumerate(mesh.devices.flat)}
    return sorted((Block(device_of[shard.device.id],
                         tuple(slice(*part.indices(size)[:2]) for part, size in zip(shard.index, result.shape)),
                         np.asarray(shard.data))
                   for shard in result.addressable_shards), key=lambda block: block.device)


# ---- comparing and reporting


@dataclass(frozen=True)
class _Worst:
    """The largest difference within one block."""

    error: float  # relative to the whole reference's scale
    where: tuple[int, ...]  # in the whole output
    expected: float
    got: float
    block: Block


def _worst_in(expected: np.ndarray, block: Block, scale: float) -> _Worst | None:
    """The block's largest difference from the reference (None for an empty block). A NaN
    or infinity where the reference has another value is an infinite error."""
    want = np.asarray(expected[block.index]).astype(np.float64)
    got = block.array.astype(np.float64)
    if want.size == 0:
        return None
    agree = (np.isnan(want) & np.isnan(got)) | (np.isinf(want) & (want == got))
    difference = np.where(agree, 0.0, np.abs(want - got))
    difference = np.where(np.isnan(difference), np.inf, difference)
    local = np.unravel_index(int(np.argmax(difference)), difference.shape)
    where = tuple(int(part.start + k) for part, k in zip(block.index, local))
    return _Worst(float(difference[local]) / scale, where, float(want[local]), float(got[local]), block)


def _compare_output(program: Program, name: str, expected: np.ndarray, blocks: Sequence[Block],
                    tolerance: float) -> str | None:
    """The report of one output (None if it matches)."""
    value = program.values[_value_of(program, name)]
    mesh = program.mesh
    for block in blocks:
        want = tuple(part.stop - part.start for part in block.index)
        if block.array.shape != want:
            got = list(block.array.shape)
            if block.device is None:
                return (f"output {name!r}: fn returned shape {got}; the program's {name} is "
                        f"{value.type.format()}, shape {list(want)}")
            return (f"output {name!r}: {describe_devices(mesh, [block.device])} returned a block of "
                    f"shape {got}; its block {_span(name, block.index)} of {name}: "
                    f"{value.type.format(output_layouts(program)[name])} has shape {list(want)}")
    scale = _scale(np.asarray(expected).astype(np.float64))
    worst = [w for block in blocks if (w := _worst_in(expected, block, scale)) is not None]
    bad = [w for w in worst if not w.error <= tolerance]
    if not bad:
        return None
    top = max(bad, key=lambda w: w.error)
    position = ", ".join(map(str, top.where))
    lines = [f"output {name!r} differs from the reference",
             f"  largest error at {name}[{position}]: expected {top.expected:.6g}, got {top.got:.6g}",
             f"  relative error {top.error:.3g} (|difference| / {scale:.4g}, the reference's largest "
             f"magnitude) > tolerance {tolerance:.3g}"]
    if top.block.device is not None:
        layout = output_layouts(program)[name]
        lines.append(f"  in the block {_span(name, top.block.index)} of "
                     f"{describe_devices(mesh, [top.block.device])}; {name} is "
                     f"{value.type.format(layout)}")
        devices = sorted({w.block.device for w in bad})
        lines.append(f"  blocks over tolerance: {len(devices)} of {len(blocks)} "
                     f"({describe_devices(mesh, devices)})")
    return "\n".join(lines)


def _loosest_dtype(program: Program) -> str:
    """The dtype whose bound is the program's tolerance (einpar.tolerance.program_tolerance)."""
    dtypes = {value.type.dtype for value in program.values.values()}
    return max(sorted(dtypes), key=lambda dtype: RELATIVE_TOLERANCE[dtype])


def _span(name: str, index: Index) -> str:
    return f"{name}[" + ", ".join(f"{part.start}:{part.stop}" for part in index) + "]"


def _report(program: Program, style: str, failures: list[str], tolerance: float,
            programs_own: bool) -> str:
    source = program.source
    if not source:
        try:
            source = Path(program.file).read_text()
        except OSError:
            source = "(its text is not at hand)"
    where = "" if program.file in ("", "<string>") else f" {program.file}"
    rule = f"{_loosest_dtype(program)}'s bound, einpar.tolerance" if programs_own else "rtol"
    text = [f"assert_matches(style={style!r}): fn does not match the program{where} "
            f"(tolerance {tolerance:.3g}, {rule})"]
    text += failures
    text.append("the program:")
    text += ["    " + line if line.strip() else "" for line in source.rstrip("\n").split("\n")]
    return "\n".join(text)
