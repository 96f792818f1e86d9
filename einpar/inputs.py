"""Input arrays for running a program: from an `.npz` file, or random from a seed.

Inputs are keyed by tensor name, in global (unsharded) shape; a param
declared inside `repeat L` is stacked, with L as an extra leading dimension.
A missing, extra or mis-shaped array is an E300 diagnostic naming the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from einpar.backends.reference import numpy_dtype
from .errors import Diagnostic, EinparError
from .ir import FLOAT_DTYPES, Einsum, Program, Value, walk_ops


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
        shape = value.type.shape
        dtype = value.type.dtype
        if dtype in FLOAT_DTYPES:
            array = rng.standard_normal(shape)
            if value.kind == "param":
                array = array / np.sqrt(fan_in.get(value.name, 1))
        elif dtype == "i32":
            array = rng.integers(0, 10, size=shape)
        else:
            array = rng.random(shape) < 0.5
        arrays[value.name] = array.astype(numpy_dtype(dtype))
    return arrays


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
        if name not in arrays:
            problems.append(Diagnostic("E300", f"{source} has no array '{name}'",
                                       hint=_expected_hint(value)))
            continue
        array = np.asarray(arrays[name])
        if tuple(array.shape) != value.type.shape:
            problems.append(Diagnostic(
                "E300", f"'{name}' in {source} has shape {_shape_text(array.shape)}, "
                        f"but {program.file} declares {_shape_text(value.type.shape)}",
                hint=_expected_hint(value)))
            continue
        if array.dtype.kind in "cOUSM":
            problems.append(Diagnostic("E300", f"'{name}' in {source} has dtype {array.dtype}, "
                                               f"which does not convert to {value.type.dtype}"))
            continue
        if array.dtype.kind == "V" and array.dtype.itemsize == 2 and value.type.dtype == "bf16":
            array = array.view(numpy_dtype("bf16"))  # bf16 saved raw by np.savez
        try:
            converted[name] = array.astype(numpy_dtype(value.type.dtype))
        except (TypeError, ValueError):
            problems.append(Diagnostic("E300", f"'{name}' in {source} has dtype {array.dtype}, "
                                               f"which does not convert to {value.type.dtype}"))
    for name in sorted(set(arrays) - set(expected)):
        problems.append(Diagnostic("E300", f"{source} has an array '{name}' that {program.file} "
                                           "does not declare",
                                   hint="inputs and params are: " + ", ".join(expected)))
    if problems:
        raise EinparError(problems)
    return converted


def _expected_hint(value: Value) -> str:
    stacked = f" (stacked by {','.join(value.stacked_by)})" if value.stacked_by else ""
    return f"'{value.name}' is {value.type.dtype}{_shape_text(value.type.shape)}{stacked}"


def load_inputs(program: Program, path: str) -> dict[str, np.ndarray]:
    hint = "write it with numpy.savez(path, name=array, ...)"
    if not Path(path).exists():
        raise EinparError(Diagnostic("E300", f"inputs file {path} does not exist")) from None
    if not zipfile.is_zipfile(path):
        raise EinparError(Diagnostic("E300", f"cannot read inputs file {path}: it is not an .npz "
                                             "archive", hint=hint))
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise EinparError(Diagnostic("E300", f"cannot read inputs file {path}: {error}",
                                     hint=hint)) from None
    return check_inputs(program, arrays, path)
