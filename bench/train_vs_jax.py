"""einpar's training steps against JAX's own autodiff under GSPMD, in bytes and step time.

    .venv/bin/python bench/train_vs_jax.py [FILE ...] [--programs NAME,...] [--rounds 20]
                                           [--host-cluster calibrate|same|FILE] [--platform cpu]
                                           [--byte-plan]

The programs: the training examples (examples/training/*.ein), or those
`--programs` names (`mlp_fsdp,megatron_selective`), or the FILEs given. One
that does not load (yet) is skipped with the reason. For each, in one
process on the same devices:

- einpar's training step (forward, the derived backward pass and the
  optimizer's update, `einpar.train`) planned for `--host-cluster` and run
  as its per-device program under `jax.shard_map`;
- its twin: `jax.value_and_grad` of the forward program's whole-array
  function (the `global_program` backends/jax_codegen.py writes for the
  program as written, `step.forward`; with micro-batches, the mean over
  them in a `lax.scan`; what the program recomputes, `remat` statements and
  `repeat L remat` bodies, under `jax.checkpoint`), then the same optimizer update written in
  jax.numpy (PyTorch's SGD and AdamW as einpar/optimizer.py states them,
  on the float32 master copy of a half-precision param), all under one
  `jax.jit` whose input and output shardings are the layouts einpar's step
  takes and gives its inputs and outputs (ZeRO's split state included), so
  that XLA's partitioner (GSPMD) partitions the forward, backward and update
  by itself.

Printed per program: the seconds einpar took to plan its step, its planned
bytes per device, the bytes per device of the collectives in the optimized
HLO of its byte-minimal plan (`--objective bytes`) where that was run, of
its time plan and of the twin (einpar's byte convention,
backends/hlo_collectives.py), the matmul MFLOP per device each HLO runs,
the median step time of each program run, in alternation after a warm-up,
their ratio, and the largest difference between the two steps' outputs
(loss, gradients the step outputs, updated params and optimizer state),
relative to the dtype tolerance (einpar.tolerance; `ok` when within it).

Which plan is compared: the time plan (the default, `--objective time` on
the host cluster) is what a user runs, so it is the one timed against the
twin. It may send more bytes than GSPMD where the host's model prices that
faster: on 8 CPU devices sharing a few cores an elementwise update is slow
next to a collective, so a data-parallel AdamW step reduce-scatters each
gradient, updates a 1/n shard of the param and its state, and all-gathers
the three (4·(n-1)/n of the gradient's bytes per device, where one
all-reduce and a replicated update send 2·(n-1)/n). Where the time plan's
HLO sends more than GSPMD's, the byte-minimal plan is compiled, run and
timed too (`--byte-plan`: on every program), the byte goal is checked on
its HLO, and a line under the row shows its collectives, both plans' step
times by the host's cost model (the partitioner's reason) and as measured
here (whether the reason held); the summary names such programs, and
those whose time plan measured slower than their byte-minimal plan.

Goals: einpar's bytes <= GSPMD's on every program, both read from their HLO
(the time plan's, or where it sends more because it is priced faster, the
byte-minimal plan's; the compiler may change what a program sends, both
programs' alike: on CPU devices XLA moves half-precision collectives in
float32, so a bf16 program's HLO shows twice its planned bytes, and it
merges identical collectives, such as FSDP's second gather of a weight for
the backward pass into the forward's); median time ratio (the time plan's
over GSPMD's) <= 1.05.
With no accelerator JAX gets 8 CPU devices, which share the host's cores:
times are noisy, compare the ratios of one run, not times across runs.
Planning a step takes most of the run on a small host (the training step of
megatron_full is the slowest); `--programs` picks fewer.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from vs_gspmd import add_run_arguments, described, load_clusters, time_each  # noqa: E402 - its sibling

EXAMPLES = ROOT / "examples" / "training"


def training_paths(files: list[str], programs: str | None) -> list[Path]:
    """The FILEs, else the training examples `programs` names (comma-separated), else all."""
    if files:
        return [Path(file) for file in files]
    if programs:
        return [EXAMPLES / f"{name.strip().removesuffix('.ein')}.ein" for name in programs.split(",")
                if name.strip()]
    return sorted(EXAMPLES.glob("*.ein"))


def shown(path: Path) -> str:
    return path.stem if path.resolve().parent == EXAMPLES else str(path)


# ---- the twin: JAX's autodiff of the forward program, and the update in jax.numpy


def forward_of(step):
    """The forward program the step was derived from, its outputs its loss (first) and its other
    outputs; with micro-batches, one micro-batch's program. It keeps its `training`, from which
    the written module names what it recomputes."""
    from einpar.ir import Output
    from einpar.microbatch import one_microbatch
    from einpar.train import forward_program

    forward = step.forward
    training = forward.training
    micro = training.microbatches
    program = forward_program(forward)
    loss = next((o for o in program.outputs if o.name == training.loss), None)
    loss = loss or Output(training.loss, training.loss)
    others = tuple(o for o in program.outputs if o.name != training.loss)
    program = replace(program, forward=None, outputs=(loss,) + others)
    return program if micro is None else one_microbatch(program, *micro)


def update(optimizer, param, weight, grad, state: dict) -> dict:
    """The outputs of `optimizer`'s update of `param` (an einpar Value), as einpar/optimizer.py
    states it: `weight` is the param (or its float32 master copy), `grad` its gradient,
    `state` its `m` and `v` arrays. Returns {output name: array}."""
    import jax.numpy as jnp

    from einpar.backends.reference import numpy_dtype
    from einpar.optimizer import MASTER, needs_master, state_dtype

    work = jnp.float64 if state_dtype(param) == "f64" else jnp.float32
    w, g = weight.astype(work), grad.astype(work)
    out = {}
    if optimizer.kind == "sgd":  # torch.optim.SGD without momentum
        new = w - optimizer.lr * (g + optimizer.wd * w) if optimizer.wd else w - optimizer.lr * g
    else:  # torch.optim.AdamW, the single-tensor path
        t = optimizer.step
        m = state["m"] * optimizer.b1 + (1 - optimizer.b1) * g
        v = state["v"] * optimizer.b2 + (1 - optimizer.b2) * (g * g)
        step_size = optimizer.lr / (1 - optimizer.b1 ** t)
        correction2_sqrt = (1 - optimizer.b2 ** t) ** 0.5
        decayed = w * (1 - optimizer.lr * optimizer.wd) if optimizer.wd else w
        new = decayed - step_size * (m / (jnp.sqrt(v) / correction2_sqrt + optimizer.eps))
        out[f"{param.name}.m"], out[f"{param.name}.v"] = m, v
    if needs_master(param):
        out[f"{param.name}.{MASTER}"] = new
    out[param.name] = new.astype(numpy_dtype(param.type.dtype))  # rounded to its dtype on storing
    return out


def twin_function(step, spmd, forward_module, mesh):
    """The whole step on whole arrays: inputs in the order of einpar's step (`spmd.inputs`),
    outputs by the step's output names."""
    import jax
    import jax.numpy as jnp

    training = step.forward.training
    forward = forward_of(step)
    loss_name = forward.outputs[0].name
    forward_inputs = list(forward_module.INPUTS)
    params = list(step.params)
    param_names = [value.name for value in params]
    micro = training.microbatches
    count = micro[1] if micro else 1

    def loss_of(weights, data):
        args = dict(data)
        args.update(zip(param_names, weights))
        outputs = forward_module.global_program(*(args[name] for name in forward_inputs), mesh=mesh)
        return outputs[loss_name], {k: v for k, v in outputs.items() if k != loss_name}

    remat = getattr(forward_module, "REMAT", ())
    if remat:  # the `remat` statements' values recomputed in the backward pass, as einpar's step does
        policy = jax.checkpoint_policies.save_anything_except_these_names(*remat)
        loss_of = jax.checkpoint(loss_of, policy=policy)
    value_and_grad = jax.value_and_grad(loss_of, has_aux=True)

    def run(*arrays):
        named = dict(zip(spmd.inputs, arrays))
        weights = tuple(named[name] for name in param_names)
        data = {name: named[name] for name in forward_inputs if name not in param_names}
        if micro is None:
            (loss, aux), grads = value_and_grad(weights, data)
        else:  # the mean over micro-batches, accumulated in float32 as einpar.microbatch does
            stacked = {name: array for name, array in data.items() if step.values[name].stacked_by}
            fixed = {name: array for name, array in data.items() if name not in stacked}

            def wide(dtype):
                return jnp.float64 if dtype == jnp.float64 else jnp.float32

            def trip(total, batch):
                found = value_and_grad(weights, {**fixed, **batch})
                found = (found[0][0], found[0][1], found[1])
                return jax.tree.map(lambda a, x: a + x.astype(a.dtype), total, found), None

            shapes = jax.eval_shape(lambda: value_and_grad(weights, {
                **fixed, **{n: a[0] for n, a in stacked.items()}}))
            (loss_s, aux_s), grads_s = shapes
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, wide(s.dtype)), (loss_s, aux_s, grads_s))
            total, _ = jax.lax.scan(trip, zeros, stacked)
            loss, aux, grads = jax.tree.map(lambda x, s: (x / count).astype(s.dtype), total,
                                            (loss_s, aux_s, grads_s))
        out = {loss_name: loss, **aux}
        for param, grad in zip(params, grads):
            out[f"{param.name}.grad"] = grad
            if training.optimizer is not None:
                kinds = {kind: named[f"{param.name}.{kind}"] for kind in ("m", "v")
                         if f"{param.name}.{kind}" in named}
                weight = named.get(f"{param.name}.master", named[param.name])
                out.update(update(training.optimizer, param, weight, grad, kinds))
        return {output.name: out[output.name] for output in spmd.outputs}

    return run


# ---- compiling both


@dataclass
class Both:
    """einpar's step and its twin, compiled for the same devices with the same inputs."""

    ours: object  # jax_backend.Compiled
    twin: object  # jax_backend.Compiled
    spmd: object  # einpar's SpmdProgram that ran


def compile_both(step, spmd, inputs, devices) -> Both:
    """einpar's step `step` (planned as `spmd`) and its twin, compiled on `devices` (a
    jax_backend.Devices with the mesh's devices) with `inputs` placed."""
    import jax
    from jax.sharding import AxisType, NamedSharding

    from einpar.api import compile_spmd
    from einpar.backends import jax_backend

    ours = jax_backend.compile_program(step, spmd, inputs, devices)
    step_module = jax_backend.load_module(step, spmd)
    forward = forward_of(step)
    forward_module = jax_backend.load_module(forward, compile_spmd(forward, objective="bytes"))
    x64 = step_module.X64
    with jax_backend._x64(jax, x64):
        mesh = step_module.make_mesh(devices.devices, axis_types=AxisType.Auto)
        shard = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
        function = jax.jit(twin_function(step, spmd, forward_module, mesh),
                           in_shardings=tuple(shard(spec) for _, _, spec, _ in step_module.INPUTS.values()),
                           out_shardings={name: shard(spec) for name, spec in step_module.OUTPUTS.items()})
        args = step_module.place(inputs, mesh)
        start = time.perf_counter()
        executable = function.lower(*args).compile()
        twin = jax_backend.Compiled(executable, args, time.perf_counter() - start, x64)
    return Both(ours, twin, spmd)


def differences(step, ours: dict, twin: dict):
    """Each output's comparison (einpar.tolerance) of einpar's step with the twin's."""
    import numpy as np

    from einpar.tolerance import compare, program_tolerance

    tolerance = program_tolerance(step)
    return [compare(name, np.asarray(twin[name]), np.asarray(ours[name]), tolerance)
            for name in twin]


def agreement(comparisons) -> str:
    """`ok 0.03` (the worst error over the tolerance), or `NO: w1 4.2` naming the outputs off."""
    worst = max((c.error / c.tolerance if c.tolerance else (0.0 if c.error == 0 else float("inf"))
                 for c in comparisons), default=0.0)
    off = [c.name for c in comparisons if not c.ok]
    return f"ok {worst:.2g}" if not off else f"NO: {', '.join(off[:3])}{'...' if len(off) > 3 else ''} {worst:.2g}"


# ---- the run


@dataclass
class Plan:
    """One of einpar's plans of a step, compiled, read and run."""

    spmd: object  # einpar's SpmdProgram
    compiled: object  # jax_backend.Compiled
    planned: int  # bytes per device the plan sends (einpar.spmd.bytes_per_device)
    hlo: int  # bytes per device of the collectives in its optimized HLO
    collectives: str  # those collectives by kind and mesh axes: `2 all_reduce[dp]`
    matmul_flops: int  # matmul FLOPs per device its HLO runs
    same: list  # its outputs against the twin's (einpar.tolerance comparisons)
    modeled_s: float | None = None  # its step time on the host cluster by the cost model
    seconds: float = 0.0  # its median step time, measured


@dataclass
class Row:
    """One program's measurements: einpar's time plan, its byte-minimal plan where that was
    run, and the GSPMD twin."""

    name: str
    plan_s: float  # seconds einpar took to plan its step for the host cluster
    ours: Plan  # the plan for the host cluster (`--objective time`), timed against the twin
    twin: Plan  # the GSPMD twin (its `spmd` and `planned` are einpar's time plan's)
    byte: Plan | None = None  # the byte-minimal plan (`--objective bytes`), where it was run
    byte_error: str = ""  # why there is no byte-minimal plan, if planning it failed

    @property
    def byte_goal(self) -> str:
        """Which of einpar's plans meets the byte goal (bytes in its HLO <= GSPMD's): "time"
        (the plan that ran against the twin), "bytes" (the time plan sends more, because the
        cost model prices it faster than the byte-minimal plan, and the byte-minimal plan
        does not), or "" (neither)."""
        if self.ours.hlo <= self.twin.hlo:
            return "time"
        if self.byte is not None and self.byte.hlo <= self.twin.hlo and \
                self.ours.modeled_s is not None and self.ours.modeled_s < self.byte.modeled_s:
            return "bytes"
        return ""


def measure(name: str, step, host, cluster, devices, rounds: int, byte_plan: bool = False) -> Row:
    """Plan `step` for `host`, compile it and its twin on `devices`, read both HLOs, compare
    their outputs and time them. The byte-minimal plan is run too with `byte_plan`, or where
    the time plan's HLO sends more bytes than GSPMD's: then the byte goal is the byte-minimal
    plan's, and both plans are priced on `host` to show why the time plan sends more.
    `cluster` only names GSPMD's collectives by mesh axes."""
    from einpar.api import compile_spmd, random_inputs
    from einpar.backends import jax_backend
    from einpar.backends.hlo_collectives import bytes_per_device as hlo_bytes
    from einpar.backends.hlo_collectives import hlo_collectives, hlo_dot_flops, price_collectives
    from einpar.cost_model.estimate import estimate
    from einpar.spmd import bytes_per_device

    n = step.mesh.num_devices
    start = time.perf_counter()
    spmd = compile_spmd(step, cluster=host)
    plan_s = time.perf_counter() - start
    inputs = random_inputs(step, 0)
    both = compile_both(step, spmd, inputs, devices)
    twin_outputs = both.twin.step()

    def read(spmd, compiled, outputs) -> Plan:
        text = compiled.hlo()
        found = hlo_collectives(text, n)
        return Plan(spmd, compiled, bytes_per_device(spmd.steps), hlo_bytes(found),
                    described(price_collectives(found, step.mesh, cluster), step.mesh),
                    hlo_dot_flops(text), differences(step, outputs, twin_outputs))

    row = Row(name, plan_s, read(spmd, both.ours, both.ours.step()),
              read(spmd, both.twin, twin_outputs))
    if byte_plan or row.ours.hlo > row.twin.hlo:
        try:
            byte_spmd = compile_spmd(step, objective="bytes")
        except Exception as error:  # noqa: BLE001 - shown in its column, the row goes on
            row.byte_error = type(error).__name__
        else:
            compiled = jax_backend.compile_program(step, byte_spmd, inputs, devices)
            row.byte = read(byte_spmd, compiled, compiled.step())
            if row.ours.hlo > row.twin.hlo:  # why the time plan sends more: its price and the other's
                row.ours.modeled_s = estimate(step, spmd, host).step_time_s
                row.byte.modeled_s = estimate(step, byte_spmd, host).step_time_s
    plans = [row.ours, row.twin] + ([row.byte] if row.byte else [])
    for plan, seconds in zip(plans, time_each([plan.compiled for plan in plans], rounds)):
        plan.seconds = seconds
    return row


def byte_plan_note(row: Row, host_name: str) -> str:
    """The line under a row that ran its byte-minimal plan: that plan's bytes, collectives,
    time and outputs, and, where the time plan sends more than GSPMD, the prices that made
    the partitioner choose it."""
    byte, ours = row.byte, row.ours
    note = (f"  {'':<18} byte-minimal plan: {byte.hlo:,} B in its HLO ({byte.collectives}), "
            f"{byte.seconds * 1e3:.3f} ms, outputs {agreement(byte.same)}")
    if ours.modeled_s is not None:
        note += (f"; the time plan sends {ours.hlo / max(row.twin.hlo, 1):.2f}x GSPMD's bytes "
                 f"({ours.collectives}) for a step priced on {host_name} at "
                 f"{ours.modeled_s * 1e3:.4g} ms against the byte-minimal plan's "
                 f"{byte.modeled_s * 1e3:.4g} ms (measured here: {ours.seconds * 1e3:.3f} ms "
                 f"against {byte.seconds * 1e3:.3f} ms)")
    return note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="training programs to run (default: the examples)")
    parser.add_argument("--programs", metavar="NAME,...",
                        help="training examples to run by name (default: every one)")
    add_run_arguments(parser, rounds=20)
    parser.add_argument("--byte-plan", action="store_true",
                        help="run the byte-minimal plan (`--objective bytes`) on every program, "
                             "not only where the time plan sends more than GSPMD")
    args = parser.parse_args()
    paths = training_paths(args.files, args.programs)
    if not paths:
        parser.error("no programs to run")

    from einpar.api import load
    from einpar.backends import jax_backend
    from einpar.errors import EinparError

    cluster, host = load_clusters(parser, args)
    steps = []
    for path in paths:
        try:
            step = load(path)
        except (EinparError, OSError) as error:
            print(f"{shown(path)}: skipped, does not load: {str(error).splitlines()[0]}")
            continue
        if step.forward is None or step.forward.training is None:
            print(f"{shown(path)}: skipped, not a training step (no `loss`)")
            continue
        steps.append((shown(path), step))
    if not steps:
        return 1
    devices = jax_backend.start_devices(max(s.mesh.num_devices for _, s in steps),
                                        platform=args.platform)
    import jax

    print(f"# {len(devices.devices)} {devices.platform} devices ({jax.devices()[0].device_kind}); "
          f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"jax {jax.__version__}; {args.rounds} rounds; einpar's steps planned for {host.name}")
    print("# bytes per device; byte HLO: einpar's byte-minimal plan's, where run; matmul MFLOP "
          "per device from the HLO; step ms measured here; outputs: worst difference over the "
          "dtype tolerance")
    print(f"{'program':<20} {'plan s':>6} {'plan B':>10} {'byte HLO':>10} {'einpar HLO':>10} "
          f"{'GSPMD HLO':>10} "
          f"{'einpar MF':>9} {'GSPMD MF':>9} {'einpar ms':>9} {'GSPMD ms':>9} {'ratio':>6} "
          f"{'outputs':>8}  GSPMD's collectives")
    rows, failed = [], []
    for name, step in steps:
        n = step.mesh.num_devices
        try:
            row = measure(name, step, host, cluster,
                          jax_backend.Devices(devices.platform, devices.devices[:n]),
                          args.rounds, args.byte_plan)
        except Exception as error:  # noqa: BLE001 - one program's failure is reported, not fatal
            failed.append(name)
            print(f"{name:<20} failed: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        rows.append(row)
        ours, twin = row.ours, row.twin
        shown_bytes = row.byte_error or (f"{row.byte.hlo:,}" if row.byte else "-")
        print(f"{name:<20} {row.plan_s:>6.1f} {ours.planned:>10,} {shown_bytes:>10} {ours.hlo:>10,} "
              f"{twin.hlo:>10,} {ours.matmul_flops / 1e6:>9.2f} {twin.matmul_flops / 1e6:>9.2f} "
              f"{ours.seconds * 1e3:>9.3f} {twin.seconds * 1e3:>9.3f} "
              f"{ours.seconds / twin.seconds:>6.2f} {agreement(ours.same):>8}  {twin.collectives}")
        if row.byte:
            print(byte_plan_note(row, host.name))
    return summary(rows, failed, args.byte_plan)


def summary(rows: list[Row], failed: list[str], byte_plan: bool) -> int:
    """Print the goals' verdicts; the exit code (1 when a program failed or its outputs differ)."""
    ran = len(rows)
    by_bytes = [row.name for row in rows if row.byte_goal == "bytes"]
    above = [row.name for row in rows if not row.byte_goal]
    print()
    print(f"bytes in the HLO einpar <= GSPMD on {ran - len(above)} of {ran} (goal: every one)"
          + (f"; by the byte-minimal plan on {', '.join(by_bytes)}, whose time plan sends more "
             "and is priced faster (line below its row)" if by_bytes else "")
          + (f"; above on {', '.join(above)}" if above else ""))
    slower = [row.name for row in rows
              if row.byte and row.ours.modeled_s is not None and row.ours.seconds > row.byte.seconds]
    if slower:
        print(f"the time plan sends more bytes than GSPMD and measured slower than the byte-minimal "
              f"plan on {', '.join(slower)}")
    if byte_plan:
        above_plan = [row.name for row in rows if not row.byte or row.byte.hlo > row.twin.hlo]
        print(f"bytes of the byte-minimal plan's HLO <= GSPMD's on {ran - len(above_plan)} of {ran}"
              + (f"; above on {', '.join(above_plan)}" if above_plan else ""))
    not_planned = [f"{row.name}{suffix} ({plan.hlo:,} of {plan.planned:,})" for row in rows
                   for plan, suffix in ((row.ours, ""), (row.byte, "'s byte-minimal plan"))
                   if plan is not None and plan.hlo != plan.planned]
    as_planned = [row for row in rows
                  if all(plan.hlo == plan.planned for plan in (row.ours, row.byte) if plan)]
    print(f"einpar's HLO sends the bytes it planned on {len(as_planned)} of {ran}"
          + (f"; not on {', '.join(not_planned)}" if not_planned else ""))
    if rows:
        ratios = [(row.ours.seconds / row.twin.seconds, row.name) for row in rows]
        median = statistics.median(ratio for ratio, _ in ratios)
        worst, worst_name = max(ratios)
        print(f"step time einpar/GSPMD: median {median:.3f} (goal <= 1.05: "
              f"{'met' if median <= 1.05 else 'NOT met'}), max {worst:.3f} on {worst_name}")
    differ = [row.name for row in rows
              if not all(c.ok for plan in (row.ours, row.byte) if plan for c in plan.same)]
    print(f"same outputs (loss, gradients, updated params and state) on {ran - len(differ)} of {ran}"
          + (f"; differ on {', '.join(differ)}" if differ else ""))
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed or differ else 0


if __name__ == "__main__":
    sys.exit(main())
