"""`assert_equivalent`: a sharded program computes what its unsharded reference does.

    assert_equivalent("examples/mlp/megatron.ein", backends=("numpy",))
    assert_equivalent(program, layouts={"h": "[B@dp, S, F]"})

For each layout (the program as written, or each relayout given) the program
is compiled to the per-device program and run on each backend: "numpy" (every
device simulated with NumPy), "jax" (`jax.shard_map` on as many CPU devices as
the mesh needs, or the accelerators JAX sees) or "reference" (the oracle
itself, trivially equal). Each output is compared with the reference device
block by device block, at `einpar.testing.tolerance(program)` unless `rtol`
says otherwise. A mismatch raises AssertionError with a report: the output,
the device block (its mesh coordinates and index range), the largest error and
the tolerance, the backend and layout, and the program as `.ein` text with
that layout, which `einpar run FILE --backend ...` reproduces.

The program is compiled by `einpar.api.compile_spmd` (which calls
`einpar.lower.compile_program`), looked up at each call, so a test can
substitute a wrong lowering and see this fail (tests/test_testing_api.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from .. import api
from ..backends.numpy_sim import combine_partials, real_part, run_spmd
from ..backends.reference import evaluate
from ..errors import EinparError
from ..inputs import check_inputs, random_inputs
from ..ir import Program
from ..layout import Layout, block_slices, device_coords
from ..rounding import rounding_band, rounds
from ..tolerance import _allowed, _largest_difference, _scale, program_tolerance
from .relayout import ProgramLike, Relayout, apply_relayout, as_program, format_relayout, program_text

__all__ = ["BACKENDS", "assert_equivalent"]

BACKENDS = ("reference", "numpy", "jax")
_BACKEND_NAMES = {"numpy": "numpy (simulated devices)", "jax": "jax (shard_map)"}
def assert_equivalent(program: ProgramLike, *, layouts: Relayout | Iterable[Relayout] | None = None,
                      backends: Iterable[str] = ("numpy", "jax"),
                      inputs: Mapping[str, np.ndarray] | None = None, seed: int | None = None,
                      rtol: float | None = None) -> None:
    """Assert that `program` (a Program, a path to a `.ein` file, or `.ein` text), under
    each layout, computes on each backend what its unsharded reference does.

    layouts: None (the program as written), a relayout ({tensor: layout}, as
      `relayouts(program)` draws; a layout is text such as "[B@dp, S, D]", a Layout or
      None for no annotation), or an iterable of relayouts, each checked in turn.
    backends: of "numpy", "jax" and "reference".
    inputs: arrays by input name (default: random ones from `seed`, 0 if None, as
      `einpar run --seed` draws them).
    rtol: the bound on the largest error relative to the reference's largest magnitude
      (default: `einpar.testing.tolerance(program)`).

    Raises AssertionError with a report on the first mismatch; ValueError for a relayout
    or inputs einpar rejects (with its diagnostic); EinparError for a program it rejects.
    """
    base = as_program(program)
    chosen = _backends(backends)
    relayouts = _relayouts(layouts)
    try:
        arrays = random_inputs(base, seed or 0) if inputs is None else \
            check_inputs(base, dict(inputs), "inputs")
    except EinparError as error:
        raise ValueError(f"inputs einpar cannot run: {error}") from None
    expected = evaluate(base, arrays)
    bound = program_tolerance(base) if rtol is None else float(rtol)
    band = None  # the rounding band, made only for an output beyond the bound
    for relayout in relayouts:
        text, compiled = apply_relayout(base, relayout) if relayout else (None, base)
        spmd = api.compile_spmd(compiled)
        for backend in chosen:
            if backend == "reference":
                continue
            got = _run(backend, compiled, spmd, arrays)
            for name, reference in expected.items():
                mismatch = _mismatch(name, reference, got.get(name), spmd, bound)
                if mismatch is not None and mismatch.problem == "" and rounds(base):
                    # Judged again with the reference's own rounding band allowed for (an
                    # ill-conditioned or discontinuous op; docs/testing.md "Tolerances").
                    band = rounding_band(base, arrays, expected) if band is None else band
                    mismatch = _mismatch(name, reference, got.get(name), spmd, bound, band[name])
                if mismatch is not None:
                    raise AssertionError(_report(mismatch, backend, compiled, relayout, text, bound,
                                                 (seed or 0) if inputs is None else None))


def _backends(backends: Iterable[str]) -> tuple[str, ...]:
    if isinstance(backends, str):
        backends = (backends,)
    chosen = tuple(backends)
    unknown = [backend for backend in chosen if backend not in BACKENDS]
    if unknown or not chosen:
        raise ValueError(f"backends are some of {', '.join(BACKENDS)}; got {chosen}")
    return chosen


def _relayouts(layouts) -> list[dict]:
    if layouts is None:
        return [{}]
    if isinstance(layouts, Mapping):
        return [dict(layouts)]
    listed = [dict(layout or {}) for layout in layouts]
    if not listed:
        raise ValueError("layouts is empty: pass None for the program as written")
    return listed


# ---------------------------------------------------------------- running


@dataclass
class _Output:
    """What a backend made of one output: its blocks per device where the backend shows
    them (the simulator), else the whole array, cut into the blocks of `layout`."""

    whole: np.ndarray | None = None
    blocks: list[np.ndarray] | None = None  # per device, partial blocks not yet combined


def _run(backend: str, program: Program, spmd, arrays) -> dict[str, _Output]:
    if backend == "jax":
        run = api.run_jax(program, arrays, spmd=spmd, warmup=0, repeat=1)
        return {name: _Output(whole=np.asarray(array)) for name, array in run.outputs.items()}
    if spmd.pipeline is not None:  # stages run in turn: the whole outputs only
        outputs, _ = run_spmd(spmd, arrays)
        return {name: _Output(whole=array) for name, array in outputs.items()}
    record: dict[str, list[np.ndarray]] = {}
    try:
        run_spmd(spmd, arrays, record=record)
    except AssertionError:  # copies of a block disagree: the device blocks below say where
        pass
    return {output.name: _Output(blocks=record[output.value]) for output in spmd.outputs
            if output.value in record}


# ---------------------------------------------------------------- comparing


@dataclass
class _Mismatch:
    output: str
    error: float  # the largest, relative to the reference's scale
    shape: tuple[int, ...]
    device: int | None = None  # the device whose block is worst (None: whole arrays compared)
    coords: dict[str, int] | None = None
    where: tuple[slice, ...] | None = None
    element: tuple[int, ...] | None = None  # the worst element, in the whole array
    expected: float | None = None
    got: float | None = None
    wrong_devices: tuple[int, ...] = ()
    problem: str = ""  # instead of numbers: a missing output, a wrong shape


def _device_blocks(output: _Output, layout: Layout, shape, mesh) -> list[tuple[int, tuple, np.ndarray]]:
    """(device, index into the whole array, that device's block less its padding), partial
    blocks combined over their group (a device's summand alone says nothing)."""
    if output.blocks is None:
        whole_layout = layout.without_partial(tuple(axis for axis, _ in layout.partial))
        return [(device, block_slices(whole_layout, shape, mesh, device),
                 output.whole[block_slices(whole_layout, shape, mesh, device)])
                for device in range(mesh.num_devices)]
    blocks, whole_layout = combine_partials(output.blocks, layout, mesh)
    found = []
    for device in range(mesh.num_devices):
        where = block_slices(whole_layout, shape, mesh, device)
        found.append((device, where, real_part(blocks[device], where)))
    return found


def _mismatch(name: str, reference: np.ndarray, output: _Output | None, spmd,
              bound: float, band: np.ndarray | None = None) -> _Mismatch | None:
    shape = tuple(np.shape(reference))
    if output is None:
        return _Mismatch(name, float("inf"), shape, problem="the backend returned no such output")
    spmd_output = next((o for o in spmd.outputs if o.name == name), None)
    if output.whole is not None and tuple(output.whole.shape) != shape:
        return _Mismatch(name, float("inf"), shape,
                         problem=f"shape {tuple(output.whole.shape)}, expected {shape}")
    if spmd_output is None or spmd.pipeline is not None:  # one stage's mesh: whole arrays
        blocks = [(None, tuple(slice(0, size) for size in shape), output.whole)]
    else:
        blocks = _device_blocks(output, spmd_output.layout, shape, spmd.mesh)
    wide = np.asarray(reference).astype(np.float64)  # once, not once per device
    scale = _scale(wide)
    errors = []
    for device, where, block in blocks:
        expected_shape = wide[where].shape
        if np.shape(block) != expected_shape:
            return _Mismatch(name, float("inf"), shape, device,
                             None if device is None else device_coords(spmd.mesh, device), where,
                             problem=f"the block has shape {tuple(np.shape(block))}, "
                                     f"expected {expected_shape}")
        # tolerance.compare_blocks' measure, block by block: at the whole reference's scale
        errors.append(_largest_difference(wide[where], np.asarray(block).astype(np.float64),
                                          _allowed(band, where)) / scale)
    worst = int(np.argmax(errors)) if errors else 0
    if not errors or errors[worst] <= bound:
        return None
    device, where, block = blocks[worst]
    element, expected_value, got_value = _worst_element(reference[where], np.asarray(block))
    offset = tuple(part.start or 0 for part in where)
    return _Mismatch(
        name, errors[worst], shape, device,
        None if device is None else device_coords(spmd.mesh, device), where,
        tuple(start + k for start, k in zip(offset, element)), expected_value, got_value,
        tuple(blocks[k][0] for k, error in enumerate(errors) if error > bound and blocks[k][0] is not None))


def _worst_element(expected: np.ndarray, got: np.ndarray) -> tuple[tuple[int, ...], float, float]:
    wide_expected = np.asarray(expected).astype(np.float64)
    wide_got = np.asarray(got).astype(np.float64)
    if wide_expected.size == 0:
        return (), 0.0, 0.0
    difference = np.abs(wide_expected - wide_got)
    same = (np.isnan(wide_expected) & np.isnan(wide_got)) | (wide_expected == wide_got)
    difference = np.where(same, 0.0, np.where(np.isnan(difference), np.inf, difference))
    index = np.unravel_index(int(np.argmax(difference)), difference.shape)
    return tuple(int(k) for k in index), float(wide_expected[index]), float(wide_got[index])


# ---------------------------------------------------------------- the report


def _range(where: tuple[slice, ...], shape) -> str:
    return "[" + ", ".join(f"{part.start or 0}:{size if part.stop is None else part.stop}"
                           for part, size in zip(where, shape)) + "]"


def _report(mismatch: _Mismatch, backend: str, program: Program, relayout: dict,
            text: str | None, bound: float, seed: int | None) -> str:
    """The failure as a reader needs it; `seed` None: the caller gave the inputs."""
    name = mismatch.output
    lines = [f"output '{name}' differs from the reference on the {_BACKEND_NAMES[backend]} backend"]
    if mismatch.problem:
        lines.append(f"  {mismatch.problem}")
    else:
        lines.append(f"  largest error {mismatch.error:.3g} (relative to the reference's largest "
                     f"magnitude, at least 1), tolerance {bound:.3g}")
    if mismatch.device is not None:
        coords = ", ".join(f"{axis}={k}" for axis, k in mismatch.coords.items())
        lines.append(f"  worst block: device {mismatch.device} ({coords or 'the only device'}) "
                     f"holds {name}{_range(mismatch.where, mismatch.shape)}")
        if len(mismatch.wrong_devices) > 1:
            shown = ", ".join(map(str, mismatch.wrong_devices[:16]))
            more = ", ..." if len(mismatch.wrong_devices) > 16 else ""
            lines.append(f"  wrong on {len(mismatch.wrong_devices)} of "
                         f"{program.mesh.num_devices} devices: {shown}{more}")
    if mismatch.element is not None:
        at = ", ".join(map(str, mismatch.element))
        lines.append(f"  at {name}[{at}]: expected {mismatch.expected:.6g}, got {mismatch.got:.6g}")
    lines.append(f"  layouts: {format_relayout(relayout)}")
    source = text if text is not None else program_text(program)
    how = "--inputs FILE.npz (the inputs given, saved with numpy.savez)" if seed is None \
        else f"--seed {seed}"
    lines.append(f"reproduce: save the program below as FILE.ein, then "
                 f"`einpar run FILE.ein --backend {backend} {how}`")
    lines.append("---- program " + "-" * 40)
    lines.append(source.rstrip("\n"))
    lines.append("-" * 53)
    return "\n".join(lines)
