"""The JAX backend: run a program's per-device code on the devices JAX sees.

The program is written out as a JAX module (`jax_codegen`) and that very
text is executed: `per_device` under `jax.shard_map` on a mesh of real
devices, or `global_program` under `jax.jit` for the GSPMD twin. Devices:

- with no accelerator, JAX is asked for as many CPU devices as the mesh
  needs (or `cpu_devices`), which must happen before JAX starts its backends;
- on GPUs or TPUs the real devices are used, and a mesh larger than what is
  there is an E400 diagnostic (`platform="cpu"` runs on CPU devices instead);
- with `Distributed`, several processes (hosts) form one mesh through
  `jax.distributed`; each process feeds its own blocks of the inputs and
  checks its own blocks of the outputs. A watchdog bounds the whole run, and
  from the command line a supervising process (`jax_supervisor`) turns JAX's
  abort on a lost peer or an unreachable coordinator into E401/E402.

Every JAX import of einpar is in this package (`einpar check` never starts JAX).
"""

from __future__ import annotations

import linecache
import os
import re
import sys
import threading
import time
import types
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np

from einpar.errors import Diagnostic, EinparError
from einpar.inputs import check_ids
from einpar.ir import Program
from einpar.precision import DEFAULT_PRECISION
from einpar.spmd import SpmdProgram

from .jax_codegen import literal_text, write_module
from .jax_supervisor import JOINED, cannot_join, is_worker


@dataclass(frozen=True)
class Distributed:
    """One process of a run of several, which form one mesh through jax.distributed."""

    coordinator: str  # HOST:PORT of process 0, which serves the coordination service
    num_processes: int
    process_id: int
    timeout_s: float = 120.0  # the whole run, from start-up to shutdown

    @staticmethod
    def from_environment() -> "Distributed | None":
        """The JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables, if set."""
        address = os.environ.get("JAX_COORDINATOR_ADDRESS")
        if not address:
            return None
        try:
            return Distributed(address, int(os.environ.get("JAX_NUM_PROCESSES", "")),
                               int(os.environ.get("JAX_PROCESS_ID", "")))
        except ValueError:
            raise EinparError(Diagnostic(
                "E401", "JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES or JAX_PROCESS_ID "
                        "is not a number", hint="set all three, or pass --coordinator, "
                                                "--num-processes and --process-id"), usage=True) from None


@dataclass
class Devices:
    """The devices a run uses, as JAX reported them."""

    platform: str  # cpu, gpu, tpu
    devices: list  # the mesh's devices, in mesh order (global across processes)
    process_id: int = 0
    num_processes: int = 1

    @property
    def local_count(self) -> int:
        return sum(1 for d in self.devices if d.process_index == self.process_id)


def _jax():
    import jax

    return jax


def start_devices(needed: int, *, cpu_devices: int | None = None, platform: str | None = None,
                  distributed: Distributed | None = None) -> Devices:
    """Start JAX with the devices a mesh of `needed` devices asks for."""
    jax = _jax()
    processes = distributed.num_processes if distributed else 1
    if distributed is not None and not 0 <= distributed.process_id < processes:
        raise EinparError(Diagnostic(
            "E401", f"process id {distributed.process_id} is not one of the {processes} processes "
                    f"(0 to {processes - 1})"), usage=True)
    share = -(-needed // processes)  # each process's devices
    if cpu_devices is not None and cpu_devices < share:
        raise EinparError(Diagnostic(
            "E400", f"the mesh needs {needed} devices; --devices {cpu_devices} gives "
                    f"{cpu_devices * processes}", hint=f"pass --devices {share} or more"))
    per_process = share if cpu_devices is None else cpu_devices
    # One process may start more CPU devices than its mesh needs (it may run another program
    # later); each of several processes starts exactly its share, so the mesh spans them all.
    if distributed is not None or _cpu_devices_asked(jax) < per_process:
        _configure(jax, "jax_num_cpu_devices", per_process)
    if platform is not None:
        _configure(jax, "jax_platforms", platform)
    if distributed is not None:
        _initialize_distributed(jax, distributed)
        if is_worker():
            sys.stderr.write(JOINED + "\n")
            sys.stderr.flush()
    try:
        devices = jax.devices()
    except RuntimeError as error:  # e.g. a platform asked for that is not installed
        raise EinparError(Diagnostic("E400", f"JAX found no {platform or 'usable'} devices: "
                                             f"{str(error).splitlines()[0]}")) from None
    kind = devices[0].platform
    if len(devices) < needed:
        if kind == "cpu":
            hint = (f"JAX had started before einpar could ask for {needed} CPU devices; start it "
                    f"with XLA_FLAGS=--xla_force_host_platform_device_count={needed}")
        else:
            hint = f"pass --platform cpu to run on {needed} CPU devices instead"
        raise EinparError(Diagnostic(
            "E400", f"the mesh needs {needed} devices, but JAX sees {len(devices)} {kind} "
                    f"device{'s' if len(devices) != 1 else ''}"
                    + (f" across {processes} processes" if processes > 1 else ""), hint=hint))
    return Devices(kind, devices[:needed], jax.process_index(), jax.process_count())


def _cpu_devices_asked(jax) -> int:
    """CPU devices JAX will start (or has started) with, as far as its settings say."""
    asked = jax.config.values.get("jax_num_cpu_devices", -1)
    if asked > 0:
        return asked
    flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(flag.group(1)) if flag else 1


def _configure(jax, option: str, value) -> None:
    """Set a JAX option that only counts before its backends start; once they have started
    it stays as it was, and `start_devices` reports what the devices then lack."""
    if jax.config.values.get(option) == value:
        return
    try:
        jax.config.update(option, value)
    except RuntimeError:
        pass  # JAX has started already


def _initialize_distributed(jax, distributed: Distributed) -> None:
    timeout = max(1, int(distributed.timeout_s))
    try:
        jax.distributed.initialize(
            coordinator_address=distributed.coordinator,
            num_processes=distributed.num_processes,
            process_id=distributed.process_id,
            initialization_timeout=timeout,
            # A peer that stops answering is noticed within this time; the watchdog
            # bounds the rest of the run.
            heartbeat_timeout_seconds=max(3, min(30, timeout // 4)),
            shutdown_timeout_seconds=max(3, min(30, timeout // 4)))
    except Exception:  # a malformed address raises; an unanswered one aborts the process instead
        who = f"process {distributed.process_id} of {distributed.num_processes}"
        raise EinparError(cannot_join(who, distributed.coordinator, distributed.timeout_s)) from None


class Watchdog:
    """Ends this process with E402 if a run of several processes outlasts its time.

    A collective waits for every peer; if one died, it would wait forever. The
    message is written straight to stderr because the main thread may be stuck.
    """

    def __init__(self, distributed: Distributed | None):
        self.timer = None
        if distributed is not None:
            # A little past the limit, so that a start-up that fails on its own (E401) says so first.
            self.timer = threading.Timer(distributed.timeout_s + 5, self._expire, (distributed,))
            self.timer.daemon = True
            self.timer.start()

    @staticmethod
    def _expire(distributed: Distributed) -> None:
        sys.stderr.write(
            f"error[E402]: process {distributed.process_id} of {distributed.num_processes} did not "
            f"finish within {distributed.timeout_s:g} s\n"
            f"  = hint: another process may have died or never started, or the coordinator at "
            f"{distributed.coordinator} is unreachable; --timeout sets the limit\n")
        sys.stderr.flush()
        os._exit(1)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


# ---- loading the written module


def load_module(program: Program, spmd: SpmdProgram, command: str = "",
                precision: str = DEFAULT_PRECISION) -> types.ModuleType:
    """Execute the JAX module for `program`; its functions can then be called."""
    source = write_module(program, spmd, command, precision)
    filename = f"<einpar-jax {literal_text(program.file)}>"  # compile() refuses a NUL in it
    # Registered with linecache so that tracebacks into the module show its lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    module = types.ModuleType("einpar_jax_program")
    module.__file__ = filename
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


# ---- running


@dataclass
class JaxRun:
    """What one run produced: outputs, timings, and where it ran."""

    devices: Devices
    spmd: SpmdProgram  # what ran (or, for the twin, what einpar would have run)
    compile_s: float
    step_times_s: list[float]
    # Whole outputs when this process can see every block; else None.
    outputs: dict[str, np.ndarray] | None
    # This process's blocks of each output: (index into the global array, block).
    local_blocks: dict[str, list[tuple[tuple[slice, ...], np.ndarray]]] = field(default_factory=dict)

    @property
    def step_s(self) -> float:
        """The median step time."""
        times = sorted(self.step_times_s)
        return times[len(times) // 2] if times else float("nan")


def _x64(jax, on: bool):
    return jax.enable_x64(True) if on else nullcontext()


@dataclass
class Compiled:
    """A program compiled for a mesh, with its inputs placed: call `step()` to run it once."""

    executable: object  # jax's Compiled
    args: list
    compile_s: float  # trace, lower and XLA compile
    x64: bool  # the program computes in float64: JAX's 64-bit mode is on while it runs
    # Outputs that come out padded (their axes do not divide a dimension) -> their real shape.
    cut: dict = field(default_factory=dict)

    def step(self):
        jax = _jax()
        if not self.x64:  # the common case, kept free of a context switch: this is what is timed
            return jax.block_until_ready(self.executable(*self.args))
        with _x64(jax, True):
            return jax.block_until_ready(self.executable(*self.args))

    def hlo(self) -> str:
        """The optimized HLO XLA compiled."""
        return self.executable.as_text()


def compile_program(program: Program, spmd: SpmdProgram, inputs: dict[str, np.ndarray],
                    devices: Devices, *, twin: bool = False,
                    precision: str = DEFAULT_PRECISION) -> Compiled:
    """Compile einpar's per-device program (or with `twin`, the GSPMD twin) for `devices`,
    and place `inputs` (whole arrays; each process places only its devices' blocks).
    Float32 contractions run at `precision` (einpar.precision)."""
    check_ids(program, inputs)  # on the host: a device's lookup fills instead of failing
    jax = _jax()
    module = load_module(program, spmd, precision=precision)
    cut = getattr(module, "CUT", {})
    if twin and getattr(module, "PADDED", {}):
        raise EinparError(Diagnostic(
            "E400", f"the GSPMD twin of {program.file} cannot run: jax.jit places only arrays its "
                    "shardings divide, and this program's axes do not divide an input's dimension",
            hint="run without --twin, or pick sizes the axes divide (use --set to change them)"))
    with _x64(jax, module.X64):
        # Explicit axes for shard_map; Auto axes for the twin, so XLA chooses every layout
        # the program leaves open.
        axis_type = jax.sharding.AxisType.Auto if twin else jax.sharding.AxisType.Explicit
        mesh = module.make_mesh(devices.devices, axis_types=axis_type)
        step = module.gspmd_step(mesh) if twin else module.spmd_step(mesh)
        # A pipelined module's place puts the stacks in stage order for shard_map, not for the twin.
        args = module.place(inputs, mesh, stages=False) if twin and hasattr(module, "STAGED") else \
            module.place(inputs, mesh)
        start = time.perf_counter()
        executable = step.lower(*args).compile()
        return Compiled(executable, args, time.perf_counter() - start, module.X64, cut)


def run(program: Program, spmd: SpmdProgram, inputs: dict[str, np.ndarray], devices: Devices, *,
        twin: bool = False, warmup: int = 2, repeat: int = 10, tick=None,
        precision: str = DEFAULT_PRECISION) -> JaxRun:
    """Run einpar's per-device program (or with `twin`, the GSPMD twin) on `devices`:
    compile, then `repeat` timed steps after `warmup` untimed ones, each waited for.
    `tick`, if given, is called after compiling and after each step, for a progress bar."""
    tick = tick or (lambda: None)
    compiled = compile_program(program, spmd, inputs, devices, twin=twin, precision=precision)
    tick()
    outputs = None
    for _ in range(warmup):
        outputs = compiled.step()
        tick()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        outputs = compiled.step()
        times.append(time.perf_counter() - start)
        tick()
    if outputs is None:
        outputs = compiled.step()
    whole = None
    cut = compiled.cut
    if all(array.is_fully_addressable for array in outputs.values()):
        whole = {name: np.asarray(array)[tuple(slice(0, n) for n in cut[name])] if name in cut
                 else np.asarray(array) for name, array in outputs.items()}
    blocks = {name: [_real_block(shard.index, np.asarray(shard.data), cut.get(name))
                     for shard in array.addressable_shards]
              for name, array in outputs.items()}
    return JaxRun(devices, spmd, compiled.compile_s, times, whole, blocks)


def _real_block(index: tuple[slice, ...], block: np.ndarray, shape) -> tuple:
    """A block of a padded output without its padding: (index into the real array, block)."""
    if shape is None:
        return index, block
    real = []
    for where, n, size in zip(index, shape, block.shape):
        start = min(where.start or 0, n)
        real.append(slice(start, min(start + size, n)))
    return tuple(real), block[tuple(slice(0, s.stop - s.start) for s in real)]


def shutdown(distributed: Distributed | None) -> None:
    if distributed is not None:
        _jax().distributed.shutdown()
