"""The Python API: the pipeline's stages as plain functions.

    import einpar.api as ein
    program = ein.load("examples/attention/tensor_parallel.ein", overrides={"tp": 8})
    outputs = ein.run_reference(program, seed=0)

Every function raises `einpar.errors.EinparError` (with diagnostics) for a
problem in the user's program or inputs. Only `run_jax` starts JAX.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .check import check, parse_overrides
from .errors import Diagnostic, EinparError
from .inputs import check_inputs, load_inputs, random_inputs
from .ir import Program
from .precision import DEFAULT_PRECISION
from .syntax import Module, parse

__all__ = ["shown_path", "read_source", "parse_file", "compile_source", "load", "run_reference",
           "parse_overrides", "random_inputs", "load_inputs", "compile_spmd", "run_simulated",
           "emit_jax", "run_jax", "explain"]


def shown_path(path: str | Path) -> str:
    """A file name as einpar shows it: characters a terminal would act on or cannot show
    (line ends, escape sequences, the undecodable bytes of a name) written as escapes."""
    text = str(path)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


# Far beyond any real program (the largest example is a few KiB); bounds what a device
# such as /dev/zero, or a runaway generator, can make einpar read.
MAX_SOURCE_BYTES = 16 * 2**20


def read_source(path: str | Path) -> str:
    shown = shown_path(path)
    try:
        chunks, size = [], 0
        with open(path, "rb") as file:  # in pieces: read(n) would set aside n bytes at once
            while size <= MAX_SOURCE_BYTES and (chunk := file.read(2**16)):
                chunks.append(chunk)
                size += len(chunk)
        data = b"".join(chunks)
        if size > MAX_SOURCE_BYTES:
            raise EinparError(Diagnostic(
                "E302", f"{shown} is larger than {MAX_SOURCE_BYTES // 2**20} MiB, too large for a "
                        ".ein program", hint="is it the right file?"))
        return data.decode("utf-8-sig")  # a byte-order mark is not program text
    except FileNotFoundError:
        raise EinparError(Diagnostic("E302", f"{shown} does not exist"), usage=True) from None
    except IsADirectoryError:
        raise EinparError(Diagnostic("E302", f"{shown} is a directory, not a .ein file"),
                          usage=True) from None
    except UnicodeDecodeError as error:
        raise EinparError(Diagnostic("E302", f"{shown} is not UTF-8 text ({error.reason} at byte "
                                             f"{error.start})")) from None
    except OSError as error:
        raise EinparError(Diagnostic("E302", f"cannot read {shown}: {error.strerror}"),
                          usage=True) from None


def parse_file(path: str | Path) -> Module:
    return parse(read_source(path), str(path))


def compile_source(text: str, file: str = "<string>",
                   overrides: dict[str, int] | None = None) -> Program:
    """Parse and check `.ein` text into a Program."""
    return check(parse(text, file), overrides, source=text)


def load(path: str | Path, overrides: dict[str, int] | None = None) -> Program:
    """Parse and check a `.ein` file into a Program (named as `shown_path` shows it)."""
    return compile_source(read_source(path), shown_path(path), overrides)


def run_reference(program: Program, inputs: dict[str, np.ndarray] | None = None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Evaluate on whole arrays; random inputs from `seed` when none are given."""
    from .backends.reference import evaluate

    arrays = random_inputs(program, seed) if inputs is None else check_inputs(program, inputs, "inputs")
    return evaluate(program, arrays)


def compile_spmd(program: Program, cluster=None, objective: str = "time"):
    """Partition and lower `program` to the SpmdProgram every device runs. The plan minimizes
    `objective`: "time" on `cluster` (a cost_model Cluster, e.g. from
    `cost_model.cluster.load_cluster`; None: einpar.objective.default_cluster of the mesh),
    or "bytes" sent per device."""
    from .lower import compile_program
    from .objective import make_objective

    return compile_program(program, make_objective(program, objective, cluster))[1]


def run_simulated(program: Program, inputs: dict[str, np.ndarray] | None = None, seed: int = 0):
    """Run on simulated devices; returns (outputs by name as global arrays, bytes sent per device)."""
    from .backends.numpy_sim import run_spmd

    arrays = random_inputs(program, seed) if inputs is None else check_inputs(program, inputs, "inputs")
    outputs, traffic = run_spmd(compile_spmd(program), arrays)
    return outputs, traffic.sent


def explain(program: Program, source: str | None = None, cluster=None, fusion: str = "auto"):
    """What `einpar explain` shows, as data: an `einpar.explain.Explanation` of every statement
    (layouts, strategy, collectives, each device's blocks). `source` is the program's text
    (by default the text it was compiled from, `program.source`; a Program made without it
    reads `program.file`); `cluster` (`cost_model.cluster.load_cluster`) adds each
    collective's time; `fusion` "auto" says which steps run fused as one kernel (as
    `cost_model.estimate` prices them), "none" leaves that out."""
    from .explain import explain as build

    text = source if source is not None else program.source or read_source(program.file)
    return build(compile_spmd(program), text, cluster, fusion)


def emit_jax(program: Program, command: str = "", precision: str = DEFAULT_PRECISION,
             spmd=None) -> str:
    """The program as a standalone JAX module (shard_map program and GSPMD twin); imports no JAX.
    Its float32 contractions run at `precision`: "highest" (true float32) or "default" (the
    accelerator's fast mode); see einpar.precision. `spmd`: the compiled program if the caller
    has it (planned for a cluster of its choice)."""
    from .backends.jax_codegen import write_module

    return write_module(program, spmd or compile_spmd(program), command, precision)


def run_jax(program: Program, inputs: dict[str, np.ndarray] | None = None, seed: int = 0, *,
            cpu_devices: int | None = None, platform: str | None = None, distributed=None,
            twin: bool = False, warmup: int = 2, repeat: int = 10, started=None, spmd=None,
            tick=None, precision: str = DEFAULT_PRECISION):
    """Run on the devices JAX sees (CPU devices made to measure when there is no accelerator).

    Returns a `einpar.backends.jax_backend.JaxRun`: outputs, compile time and step times.
    With `twin`, runs the GSPMD twin (XLA partitions the whole-array program) instead.
    `distributed` is a `jax_backend.Distributed` for one process of several; `started`,
    if given, is called with the `Devices` once they are up (before compiling). `spmd` is
    the compiled program if the caller has it; `tick`, if given, is called after compiling
    and after each step. Float32 contractions run at `precision` (see `emit_jax`).
    """
    from .backends import jax_backend

    arrays = random_inputs(program, seed) if inputs is None else check_inputs(program, inputs, "inputs")
    watchdog = jax_backend.Watchdog(distributed)
    try:
        devices = jax_backend.start_devices(program.mesh.num_devices, cpu_devices=cpu_devices,
                                            platform=platform, distributed=distributed)
        if started is not None:
            started(devices)
        return jax_backend.run(program, spmd or compile_spmd(program), arrays, devices, twin=twin,
                               warmup=warmup, repeat=repeat, tick=tick, precision=precision)
    finally:
        watchdog.stop()
