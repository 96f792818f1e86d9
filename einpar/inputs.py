"""Input arrays for running a program: from an `.npz` file, or random from a seed.

Inputs are keyed by tensor name, in global (unsharded) shape; a param
declared inside `repeat L` is stacked, with L as an extra leading dimension.
A missing, extra or mis-shaped array is an E300 diagnostic naming the file.
Optimizer state (inputs of kind "state": `w.m`, `w.v`, `w.master`) may be
left out: it starts as zeros, and a master copy as its param in float32.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from einpar.backends.reference import numpy_dtype
from .errors import Diagnostic, EinparError
from .ir import FLOAT_DTYPES, Einsum, Program, ScatterAdd, Take, Value, walk_ops
from .microbatch import merged_shape, split_microbatches
from .optimizer import MASTER, param_of_state
from .layout import DTYPE_BYTES


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(size) for size in shape) + "]"


def random_inputs(program: Program, seed: int = 0) -> dict[str, np.ndarray]:
    """Unit-scale activations and fan-in-scaled weights, reproducible from `seed`.

    A param is divided by the square root of its fan-in (the size of the
    indices the first contraction reading it sums over), so activations keep
    unit scale through contractions and softmaxes do not saturate.
    """
    rng = np.random.default_rng(seed)
    fan_in = fan_in_of(program)
    arrays: dict[str, np.ndarray] = {}
    for value in program.inputs:
        if value.kind == "state":
            continue  # drawn from nothing: the same seed gives a training step its forward's inputs
        shape = value.type.shape
        dtype = value.type.dtype
        # Drawn in the input's own dtype (half precision in float32, which NumPy draws and
        # rounds), never in float64 and cast: a run's inputs take the memory they are declared in.
        if dtype in FLOAT_DTYPES:
            array = rng.standard_normal(shape, dtype=np.float64 if dtype == "f64" else np.float32)
            if value.kind == "param":
                array *= array.dtype.type(1 / np.sqrt(fan_in.get(value.name, 1)))
        elif dtype == "i32":
            # Ids a take reads are drawn among its table's rows; other integers in [0, 10).
            high = min((size for size, _ in id_readers(program).get(value.name, ())), default=10)
            array = rng.integers(0, high, size=shape, dtype=np.int32)
        else:
            array = rng.integers(0, 2, size=shape, dtype=np.uint8).view(np.bool_)
        arrays[value.name] = array.astype(numpy_dtype(dtype), copy=False)
    return with_default_state(program, arrays)


def default_state(value: Value, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The array a state input starts as: zeros for `w.m` and `w.v`, and the param `w`
    itself in the state's dtype for its master copy `w.master` (einpar.optimizer)."""
    dtype = numpy_dtype(value.type.dtype)
    named = param_of_state(value.name)
    if named is not None and named[1] == MASTER and named[0] in arrays:
        return np.asarray(arrays[named[0]]).astype(dtype)
    return np.zeros(value.type.shape, dtype)


def with_default_state(program: Program, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arrays` with every state input it lacks at its default (after the params it copies)."""
    missing = [value for value in program.inputs if value.kind == "state" and value.name not in arrays]
    if not missing:
        return arrays
    arrays = dict(arrays)
    for value in missing:
        arrays[value.name] = default_state(value, arrays)
    return arrays


def id_readers(program: Program) -> dict[str, list[tuple[int, Take | ScatterAdd]]]:
    """The inputs read as ids by a take or scatter-add: name -> (the number of rows along
    the index they select, the op) for each op that reads it."""
    readers: dict[str, list[tuple[int, Take | ScatterAdd]]] = {}
    for op in walk_ops(program.ops):
        if isinstance(op, (Take, ScatterAdd)):
            readers.setdefault(op.ids.value, []).append((program.dim_sizes[op.index], op))
    return readers


def check_ids(program: Program, arrays: dict[str, np.ndarray], source: str = "inputs") -> None:
    """E310 for an input id outside the rows its take reads: checked on the host before a
    run (a lookup on a device would wrap, clamp or fill instead of failing)."""
    problems = []
    for name, readers in id_readers(program).items():
        if name not in arrays:
            continue
        ids = np.asarray(arrays[name])
        for size, op in readers:
            bad = (ids < 0) | (ids >= size)
            if bad.any():
                where = tuple(int(k) for k in np.argwhere(bad)[0])
                position = ",".join(map(str, where))
                problems.append(Diagnostic(
                    "E310", f"'{name}' in {source} holds {int(ids[where])} at [{position}], outside "
                            f"[0, {size}): take[{op.index}] in '{op.stmt}' reads it as ids", op.span,
                    hint=f"ids index the {size} rows along {op.index}: each must be at least 0 "
                         f"and less than {size}"))
                break
    if problems:
        raise EinparError(problems)


def fan_in_of(program: Program) -> dict[str, int]:
    sizes = program.dim_sizes
    fan_in: dict[str, int] = {}
    for op in walk_ops(program.ops):
        if isinstance(op, Einsum):
            for operand in op.operands:
                if operand.value not in fan_in:
                    summed = [i for i in operand.indices if i in op.summed]
                    fan_in[operand.value] = int(np.prod([sizes[i] for i in summed]))
    return fan_in


def check_inputs(program: Program, arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Every input present with its declared shape, converted to its dtype."""
    problems: list[Diagnostic] = []
    expected = {value.name: value for value in program.inputs}
    converted: dict[str, np.ndarray] = {}
    for name, value in expected.items():
        if name not in arrays and value.kind == "state":
            continue  # its default, below, once the param it may copy is converted
        if name not in arrays:
            problems.append(Diagnostic("E300", f"{source} has no array '{name}'",
                                       hint=_expected_hint(value)))
            continue
        array = np.asarray(arrays[name])
        if merged_shape(value) is not None and tuple(array.shape) == merged_shape(value):
            array = split_microbatches(value, array)  # given whole, taken in micro-batches
        if tuple(array.shape) != value.type.shape:
            problems.append(_wrong_shape(program, value, array.shape, source))
            continue
        if array.dtype.kind in "cOUSM":
            problems.append(Diagnostic("E300", f"'{name}' in {source} has dtype {array.dtype}, "
                                               f"which does not convert to {value.type.dtype}"))
            continue
        if array.dtype.kind == "V" and array.dtype.itemsize == DTYPE_BYTES[value.type.dtype] \
                and value.type.dtype in ("bf16", "f8e4m3", "f8e5m2"):
            array = array.view(numpy_dtype(value.type.dtype))  # ml_dtypes saved raw by np.savez
        try:
            converted[name] = array.astype(numpy_dtype(value.type.dtype))
        except (TypeError, ValueError):
            problems.append(Diagnostic("E300", f"'{name}' in {source} has dtype {array.dtype}, "
                                               f"which does not convert to {value.type.dtype}"))
    for name in sorted(set(arrays) - set(expected)):
        problems.append(Diagnostic("E300", f"{source} has an array '{name}' that {program.file} "
                                           "does not declare",
                                   hint="inputs and params are: " + ", ".join(expected)))
    problems.extend(_bad_state(program, converted, source))
    if problems:
        raise EinparError(problems)
    check_ids(program, converted, source)
    return with_default_state(program, converted)


def _bad_state(program: Program, arrays: dict[str, np.ndarray], source: str) -> list[Diagnostic]:
    """AdamW's second moment `w.v` is a running mean of squares: a negative or non-finite
    entry would make the update's square root NaN on every backend."""
    problems = []
    for value in program.inputs:
        state = param_of_state(value.name)
        if value.kind != "state" or state is None or state[1] != "v" or value.name not in arrays:
            continue
        array = np.asarray(arrays[value.name], dtype=np.float64)
        bad = ~np.isfinite(array) | (array < 0)
        if bad.any():
            where = ",".join(str(int(k)) for k in np.argwhere(bad)[0])
            problems.append(Diagnostic(
                "E300", f"'{value.name}' in {source} holds {array[tuple(np.argwhere(bad)[0])]} at "
                        f"[{where}]: AdamW's second moment is a mean of squares",
                hint=f"every entry of '{value.name}' is a finite number of 0 or more (leave it "
                     "out of the file to start from zeros)"))
    return problems


def _wrong_shape(program: Program, value: Value, shape, source: str) -> Diagnostic:
    declared = merged_shape(value) or value.type.shape  # a micro-batched input is given whole
    return Diagnostic("E300", f"'{value.name}' in {source} has shape {_shape_text(shape)}, "
                              f"but {program.file} declares {_shape_text(declared)}",
                      hint=_expected_hint(value))


def _expected_hint(value: Value) -> str:
    if merged_shape(value) is not None:
        return f"'{value.name}' is {value.type.dtype}{_shape_text(merged_shape(value))}"
    stacked = f" (stacked by {','.join(value.stacked_by)})" if value.stacked_by else ""
    return f"'{value.name}' is {value.type.dtype}{_shape_text(value.type.shape)}{stacked}"


def load_inputs(program: Program, path: str) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file, checked against the program before any is read: each
    member's `.npy` header (shape and dtype) is read from the archive first, so a file with
    a wrong, extra or enormous array is refused without decompressing it."""
    hint = "write it with numpy.savez(path, name=array, ...)"
    if not Path(path).exists():
        raise EinparError(Diagnostic("E300", f"inputs file {path} does not exist")) from None
    if not Path(path).is_file():  # a folder, /dev/zero, a pipe: nothing np.load can read
        raise EinparError(Diagnostic("E300", f"inputs file {path} is not a regular file", hint=hint))
    if not zipfile.is_zipfile(path):
        raise EinparError(Diagnostic("E300", f"cannot read inputs file {path}: it is not an .npz "
                                             "archive", hint=hint))
    expected = {value.name: value for value in program.inputs}
    arrays: dict[str, np.ndarray] = {}
    problems: list[Diagnostic] = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                if name == info.filename:
                    problems.append(Diagnostic("E300", f"{path} holds {info.filename!r}, which is "
                                                       "not an array (.npy)", hint=hint))
                    continue
                with archive.open(info) as member:
                    shape, dtype = _npy_header(member)
                if dtype.hasobject:
                    problems.append(Diagnostic("E300", f"'{name}' in {path} holds Python "
                                                       "objects, not numbers", hint=hint))
                elif (name in expected and shape in (expected[name].type.shape,
                                                     merged_shape(expected[name]))
                      and (dtype.kind in "biuf" or dtype.kind == "V" and dtype.itemsize
                           == DTYPE_BYTES[expected[name].type.dtype] <= 2)):
                    with archive.open(info) as member:
                        arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
                else:
                    # Unknown, or of the wrong shape or kind, so never read: a stand-in of
                    # its shape and dtype taking no memory, for check_inputs to report.
                    arrays[name] = np.broadcast_to(np.zeros((), dtype), shape)
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError,
            NotImplementedError) as error:  # zlib.error: a corrupt compressed member
        raise EinparError(Diagnostic("E300", f"cannot read inputs file {path}: {error}",
                                     hint=hint)) from None
    try:
        checked = check_inputs(program, arrays, path)
    except EinparError as error:
        problems.extend(error.diagnostics)
    if problems:
        raise EinparError(problems)
    return checked


def _npy_header(member) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of an `.npy` stream, reading nothing past it."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    return tuple(shape), dtype


def save_outputs(path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as an `.npz` file, each under its own name, as `np.load` reads them back.

    Not `np.savez(path, **arrays)`: that takes the names `file` and `allow_pickle` as its own
    arguments. The archive is written member by member the way `np.savez` does it.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
