"""The `einpar` command: a thin shell over einpar.api.

    einpar check FILE [--set D=4096 tp=8] [--ignore W101,W102] [--json]
    einpar run FILE --backend reference|numpy|jax [--inputs in.npz] [--seed N] [--save out.npz]
               [--max-memory SIZE] [--max-time DURATION]
               [--devices N] [--platform cpu|gpu|tpu] [--repeat N] [--twin]
               [--precision highest|default]
               [--coordinator HOST:PORT --num-processes N --process-id I] [--timeout S]
    einpar compile FILE [--emit ast|ir|grad|layouts|spmd|jax [--precision highest|default]]
                   [--ignore CODES] [--json] [--svg OUT.svg] [--html OUT.html]
    einpar explain FILE [--statement N|NAME[,...]] [--device D] [--values [--seed N]]
                   [--cluster NAME|FILE] [--gantt OUT.svg] [--svg OUT.svg] [--html OUT.html]
                   [--width COLUMNS]
                   [--force] [--json] [--max-memory SIZE] [--max-time DURATION]
    einpar cost FILE --cluster NAME|FILE [--overlap] [--collective-matmul]
                [--overlap-grad-reduce] [--precision highest|default] [--json]
                [--fusion auto|no_flash|none] [--trace OUT.json] [--force]
    einpar calibrate [--out CLUSTER.json] [--devices N] [--quick] [--force]
    einpar calibrate --nccl-tests FILE [FILE ...] [--gpus-per-node N] --out CLUSTER.json [--force]

`main(argv) -> int` so tests call it in-process. Exit codes: 0 success, 1 a
problem in the user's program or inputs, 2 bad usage, 3 an internal error
(a bug in einpar; EINPAR_DEBUG=1 shows its traceback), 130 interrupted (Ctrl-C).
Warnings (`check`, `compile`) never change the exit code. With --json every error prints
as a JSON diagnostic on stdout, bad usage too (E303); only an internal error is text.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import api, lint, resources
from .errors import Diagnostic, EinparError, SourceMap, render_json, render_text
from .flops import program_flops
from .ir import Program, format_program, walk_ops
from .layout import DTYPE_BYTES, format_dims, format_local
from .inputs import save_outputs
from .lexer import highlight
from .objective import DEFAULT_OBJECTIVE, OBJECTIVES
from .precision import DEFAULT_PRECISION, PRECISIONS
from .progress import ProgressBar
from .spmd import bytes_per_device, format_spmd, to_json
from .tolerance import compare_outputs
from .units import format_bytes, format_count, format_seconds


SOURCE_LINE = re.compile(r"^ *[0-9]+ \| ")  # a source line quoted in a diagnostic


class _UsageError(Exception):
    def __init__(self, message: str, usage: str = ""):
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # Options are spelled out: `--js` is not `--json`, so main can tell from argv alone
        # whether a usage error must print as JSON.
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):  # argparse would exit; the caller decides the exit code
        raise _UsageError(f"{self.prog}: error: {message}", self.format_usage().rstrip())


# Bounds on command-line numbers: far beyond any real use, and small enough that nothing
# downstream (JAX's device count, rich's layout, NumPy's seed, a timer) overflows.
MAX_DEVICES = 4096  # CPU devices or processes of one run
MAX_STEPS = 10**6  # --repeat and --warmup
MAX_WIDTH = 1000  # columns of a view
MAX_SEED = 2**32 - 1  # the seeds NumPy's and every other common generator take
MAX_TIMEOUT_S = 10**6  # about 11 days


def _whole(low: int, high: int):
    """An argparse type: a whole number from `low` to `high`, in ASCII digits only
    (Python's int() also reads '٣' and other scripts' digits)."""
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high:,}, "
                                             f"got {text!r}")
        return int(text)
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text) if text.isascii() else -1.0
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_TIMEOUT_S:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds up to "
                                         f"{MAX_TIMEOUT_S:,}, got {text!r}")
    return value


def _size(text: str) -> int:
    try:
        return resources.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _duration(text: str) -> float:
    try:
        return resources.parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_seed = _whole(0, MAX_SEED)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="einpar", description="Compile, check, run and price sharded einsum programs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def precision(sub, what: str):
        sub.add_argument("--precision", choices=PRECISIONS, default=None,
                         help=f"{what} float32 contractions: highest (true float32, the default: "
                              "what the reference computes) or default (the accelerator's fast "
                              "mode: TF32 on GPUs, one bfloat16 pass on TPUs); see docs/cost.md")

    def planning(sub, cluster: bool = True):
        if cluster:
            sub.add_argument("--cluster", metavar="NAME|FILE",
                             help="plan (and time collectives) for this cluster: a preset (h100x8, "
                                  "h100x8:64, tpu-v5p:8x8x8, ...) or a cluster file (default: "
                                  "one node of H100s sized to the mesh; see docs/compile.md)")
        sub.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                         help="what the partitioner minimizes: time (default: the cost model's "
                              "time on the cluster) or bytes sent per device (then FLOPs)")

    def limits(sub):
        sub.add_argument("--max-memory", type=_size, metavar="SIZE",
                         help="refuse to start if the run would need more memory than this, e.g. "
                              "512MiB or 64GiB (default: the memory this machine has available)")
        sub.add_argument("--max-time", type=_duration, metavar="DURATION",
                         help="refuse to start if the run could not finish within this, e.g. 90s, "
                              "30min or 12h (default 1h)")

    def common(sub):
        sub.add_argument("file", help="the .ein program")
        sub.add_argument("--set", action="append", nargs="+", metavar="NAME=VALUE", default=[],
                         help="override dims and mesh axis sizes, e.g. --set D=4096 tp=8")
        sub.add_argument("--json", action="store_true", help="machine-readable output")

    def warnings(sub):
        sub.add_argument("--ignore", action="append", default=[], metavar="CODES",
                         help="silence these warnings: codes or prefixes, comma-separated "
                              "(W101,W102; W silences all); see docs/language.md")

    check = commands.add_parser("check", help="check a program; print its tensors, shapes, layouts, FLOPs")
    common(check)
    warnings(check)

    run = commands.add_parser("run", help="run a program on a backend")
    common(run)
    planning(run)
    run.add_argument("--backend", choices=["reference", "numpy", "jax"], default="reference",
                     help="reference: unsharded NumPy evaluation (the oracle); numpy: every device "
                          "simulated with NumPy; jax: the per-device program under jax.shard_map "
                          "on real devices. numpy and jax are checked against the reference")
    run.add_argument("--inputs", metavar="IN.npz", help="arrays keyed by tensor name (else random)")
    run.add_argument("--seed", type=_seed, default=0,
                     help=f"seed for random inputs, 0 to {MAX_SEED} (default 0)")
    run.add_argument("--save", metavar="OUT.npz", help="write the outputs to an .npz file")
    run.add_argument("--force", action="store_true", help="let --save overwrite an existing file")
    limits(run)
    jax = run.add_argument_group("jax backend")
    jax.add_argument("--devices", type=_whole(1, MAX_DEVICES), metavar="N",
                     help="CPU devices to start per process (default: as many as the mesh needs)")
    jax.add_argument("--platform", choices=["cpu", "gpu", "tpu"],
                     help="run on this platform only (default: accelerators if JAX finds any, else CPU)")
    jax.add_argument("--repeat", type=_whole(1, MAX_STEPS), default=10, metavar="N",
                     help="timed steps after the warm-up (default 10); the median is reported")
    jax.add_argument("--warmup", type=_whole(0, MAX_STEPS), default=2, metavar="N",
                     help="untimed steps first (default 2)")
    precision(jax, "run")
    jax.add_argument("--twin", action="store_true",
                     help="run the GSPMD twin instead: the whole-array program under jax.jit with "
                          "the same input and output layouts, partitioned by XLA")
    jax.add_argument("--coordinator", metavar="HOST:PORT",
                     help="join a run of several processes through jax.distributed; process 0 "
                          "serves at this address (or set JAX_COORDINATOR_ADDRESS)")
    jax.add_argument("--num-processes", type=_whole(1, MAX_DEVICES), metavar="N",
                     help="processes in the run (or JAX_NUM_PROCESSES)")
    jax.add_argument("--process-id", type=_whole(0, MAX_DEVICES - 1), metavar="I",
                     help="this process's number, 0 to N-1 (or JAX_PROCESS_ID)")
    jax.add_argument("--timeout", type=_seconds, default=120.0, metavar="SECONDS",
                     help="a run of several processes ends with an error after this long (default 120)")

    comp = commands.add_parser("compile", help="print a stage of the compiler")
    common(comp)
    comp.add_argument("--emit", choices=["ast", "ir", "grad", "layouts", "spmd", "jax"],
                      default="spmd",
                      help="which stage to print (default: the per-device program); grad: the "
                           "backward program a loss derives, as .ein text; jax: a "
                           "standalone Python module running it under jax.shard_map")
    precision(comp, "with --emit jax: the module runs its")
    planning(comp)
    warnings(comp)

    def slides(sub):
        sub.add_argument("--svg", metavar="OUT.svg", help="also save the view as an SVG slide")
        sub.add_argument("--html", metavar="OUT.html", help="also save the view as an HTML page")
        sub.add_argument("--width", type=_whole(1, MAX_WIDTH), metavar="COLUMNS",
                         help="lay the view out this many columns wide (default: the terminal's "
                              "width; 100 when the output is not a terminal; for --svg/--html at "
                              "least 100, or wider if the view's lines are)")
        sub.add_argument("--force", action="store_true", help="let --svg/--html overwrite a file")

    slides(comp)
    explain = commands.add_parser("explain", help="show, statement by statement, what every device "
                                  "holds, which collectives that costs and why")
    common(explain)
    explain.add_argument("--statement", metavar="N|NAME[,...]",
                         help="only statement N (counting from 1) or the statement defining NAME; "
                              "several separated by commas")
    explain.add_argument("--device", type=_whole(0, 10**9), metavar="D",
                         help="highlight device D (with --values, only its numbers)")
    explain.add_argument("--values", action="store_true",
                         help="the numbers each device holds before and after each statement, "
                              "from the NumPy device simulator (random inputs)")
    explain.add_argument("--seed", type=_seed, default=0,
                         help=f"seed for --values' inputs, 0 to {MAX_SEED} (default 0)")
    explain.add_argument("--gantt", metavar="OUT.svg",
                         help="for a pipelined program, also save its schedule as a Gantt chart "
                              "(SVG: stages by time, each slot numbered with its micro-batch)")
    limits(explain)
    planning(explain)
    slides(explain)

    cost = commands.add_parser("cost", help="price the program on a modeled cluster: time, "
                                             "where it goes, memory")
    common(cost)
    cost.add_argument("--cluster", required=True, metavar="NAME|FILE",
                      help="a preset (h100x8, h100x8:64, a100x8:128, tpu-v5e:16x16, tpu-v5p:8x8x8, "
                           "...) or a cluster file (.toml or .json, see docs/cost.md)")
    cost.add_argument("--overlap", action="store_true",
                      help="let collectives run beside compute that does not need their result")
    cost.add_argument("--collective-matmul", action="store_true",
                      help="--overlap, and an all-gather and the matmul reading it, or a matmul "
                           "and the reduce-scatter of its result, run in chunks that overlap "
                           "(Megatron-LM's --tp-comm-overlap, XLA's collective matmul)")
    cost.add_argument("--overlap-grad-reduce", action="store_true",
                      help="--overlap, and a training step's gradient reductions run beside its "
                           "last backward pass, layer by layer (Megatron-LM's "
                           "--overlap-grad-reduce, PyTorch DDP's buckets)")
    precision(cost, "price")
    planning(cost, cluster=False)
    cost.add_argument("--fusion", choices=("auto", "no_flash", "none"), default="auto",
                      help="auto (default): price fused regions and flash attention as one kernel "
                           "each; no_flash: fused regions, attention's scores in HBM (before "
                           "FlashAttention); none: every step alone, its operands and result in HBM")
    cost.add_argument("--trace", metavar="OUT.json",
                      help="write the timeline as a Chrome/Perfetto trace (ui.perfetto.dev)")
    cost.add_argument("--force", action="store_true", help="let --trace overwrite an existing file")

    calibrate = commands.add_parser("calibrate", help="measure this host (JAX CPU devices), or fit "
                                                       "a GPU cluster's nccl-tests output, into a "
                                                       "cluster file for `einpar cost`")
    calibrate.add_argument("--out", default="local-cpu.json", metavar="CLUSTER.json",
                           help="the cluster file to write (default local-cpu.json)")
    calibrate.add_argument("--devices", type=_whole(1, MAX_DEVICES), default=8, metavar="N",
                           help="CPU devices to measure, as `einpar run --devices` starts (default 8)")
    calibrate.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    calibrate.add_argument("--nccl-tests", nargs="+", metavar="FILE",
                           help="fit the collective constants to these nccl-tests outputs "
                                "(all_reduce_perf, ... stdout) instead of measuring this host")
    calibrate.add_argument("--gpus-per-node", type=_whole(1, MAX_DEVICES), metavar="N",
                           help="GPUs per node of the nccl-tests runs (default: ranks per host "
                                "in their headers)")
    calibrate.add_argument("--collective", choices=("all_reduce", "all_gather", "reduce_scatter",
                                                    "all_to_all"),
                           help="the collective the nccl-tests files ran (default: from their "
                                "headers)")
    calibrate.add_argument("--accelerator", metavar="NAME",
                           help="the GPU preset to start from (default: from the headers' device "
                                "names, else h100)")
    calibrate.add_argument("--force", action="store_true", help="let --out overwrite an existing file")
    return parser


def _writable(path_text: str, force: bool, command: str) -> Path:
    """A path the user asked einpar to write, checked before any work is done. einpar never
    writes through a symbolic link (the file written would not be the one named), nor over
    anything but a regular file, and over one of those only with --force."""
    path = Path(path_text)
    problem = None
    if path.is_symlink():
        problem = "it is a symbolic link; name the file itself"
    elif path.is_dir():
        problem = "it is a folder"
    elif path.exists() and not path.is_file():
        problem = "it is not a regular file"
    elif path.exists() and not force:
        raise _UsageError(f"einpar {command}: error: {path} exists; pass --force to overwrite it")
    elif path.exists() and not os.access(path, os.W_OK):
        problem = "permission denied"
    elif not path.parent.is_dir():
        problem = f"folder {path.parent} does not exist"
    elif not path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        problem = f"permission denied in folder {path.parent}"
    if problem:
        raise _UsageError(f"einpar {command}: error: cannot write {path}: {problem}")
    return path


def _write(path: Path, command: str, write) -> None:
    """`write(path)`, with what the system refuses (a full disk, a folder removed meanwhile)
    reported as a usage error."""
    try:
        write(path)
    except OSError as error:
        raise _UsageError(f"einpar {command}: error: cannot write {path}: "
                          f"{error.strerror or error}") from None


def _cluster(args, program: Program, sources: SourceMap):
    """The cluster of --cluster (checked to hold the mesh), or None."""
    if not getattr(args, "cluster", None):
        return None
    from .cost_model.cluster import check_fits, load_cluster

    cluster = load_cluster(args.cluster, sources)
    check_fits(cluster, program.mesh.num_devices, str(program.mesh))
    return cluster


def _plan(args, program: Program, cluster):
    """The per-device program, planned for `cluster` (None: the default) by --objective."""
    return api.compile_spmd(program, cluster, args.objective)


def _cost(args, program: Program, out: Console, sources: SourceMap) -> int:
    from .cost_model.cluster import check_fits, load_cluster
    from .cost_model.estimate import estimate
    from .cost_model.report import print_estimate
    from .cost_model.trace import write_trace

    trace = _writable(args.trace, args.force, "cost") if args.trace else None
    cluster = load_cluster(args.cluster, sources)
    check_fits(cluster, program.mesh.num_devices, str(program.mesh))
    spmd = api.compile_spmd(program, cluster, args.objective)
    result = estimate(program, spmd, cluster,
                      overlap=args.overlap or args.collective_matmul or args.overlap_grad_reduce,
                      precision=args.precision or DEFAULT_PRECISION, fusion=args.fusion,
                      collective_matmul=args.collective_matmul,
                      overlap_grad_reduce=args.overlap_grad_reduce)
    if trace is not None:
        _write(trace, "cost", lambda path: write_trace(result, path))
    if args.json:
        out.print(json.dumps(result.to_json(), indent=2), markup=False)
    else:
        print_estimate(result, out)
        if trace is not None:
            out.print(f"trace written to {trace} (open it in ui.perfetto.dev)")
    return 0


def _calibrate(args, out: Console, err: Console, sources: SourceMap) -> int:
    from .cost_model.calibrate import (calibrate, calibrate_nccl_tests, measurement_count,
                                       write_cluster_file)

    target = _writable(args.out, args.force, "calibrate")
    if args.nccl_tests:
        if args.accelerator:
            from .cost_model.hardware import accelerator

            try:
                if accelerator(args.accelerator).family != "gpu":
                    raise KeyError(f"{args.accelerator} is not a GPU")
            except KeyError as error:
                raise _UsageError(f"einpar calibrate: error: --accelerator: {error.args[0]}") from None
        document = calibrate_nccl_tests(args.nccl_tests, args.gpus_per_node, args.collective,
                                        args.accelerator, sources)
        _write(target, "calibrate", lambda path: write_cluster_file(document, path))
        rows = len(document["measurements"]["rows"])
        tiers = " and ".join(key.replace("_", "-") for key in document["collectives"]
                             if key != "source")
        out.print(f"wrote {target}: {document['accelerator']['base']} {tiers} collective constants "
                  f"fitted to {rows} nccl-tests rows", markup=False)
        out.print(f"price a program on it: einpar cost FILE --cluster {target}", markup=False)
        return 0
    total = measurement_count(args.quick)
    with ProgressBar(err, total, "calibrating") as bar:
        begun = 0

        def measuring(label: str) -> None:  # called before each measurement
            nonlocal begun
            if begun:
                bar.tick()  # the one before has ended
            begun += 1
            if not bar.enabled:  # a log or a pipe: one line per measurement instead of a bar
                err.print(label, style="dim")

        try:
            document = calibrate(args.devices, quick=args.quick, progress=measuring)
        except KeyboardInterrupt:
            bar.stop()
            err.print(f"calibrate: interrupted after {bar.done} of {total} measurements; "
                      "nothing written")
            return 130
    _write(target, "calibrate", lambda path: write_cluster_file(document, path))
    chip = document["accelerator"]
    out.print(f"wrote {target}: {args.devices} CPU devices, "
              f"{chip['peak_flops']['f32'] / 1e9:.3g} GFLOP/s f32 and "
              f"{chip['hbm_bandwidth'] / 1e9:.3g} GB/s memory per device, collectives "
              f"{chip['scale_up_bandwidth'] / 1e9:.3g} GB/s with "
              f"{chip['scale_up_latency'] * 1e6:.3g} µs latency, "
              f"{document['step_overhead_s'] * 1e6:.3g} µs per step")
    out.print(f"price a program on it: einpar cost FILE --cluster {target}")
    return 0


def _consoles():
    # No rich markup: file names and the program's own text (`x[/].ein`, a layout `[b,s]`) are
    # printed as they are, never read as `[bold]` tags. Styles come from Text and style=.
    return (Console(highlight=False, markup=False, soft_wrap=True),
            Console(stderr=True, highlight=False, markup=False, soft_wrap=True))


SLIDE_WIDTH = 100  # columns: the views' grids fit, and text stays legible on a projector


def _view_console(args, out: Console, natural: int = 0) -> Console:
    """The console a view is drawn on: the terminal's, or a recording one for --svg/--html.
    `natural` is the width of the view's longest line, if it has one (slides do not wrap it)."""
    exporting = bool(args.slides)
    if exporting:
        width = args.width or max(SLIDE_WIDTH, natural, out.width if out.is_terminal else 0)
    else:
        width = args.width or (out.width if out.is_terminal else SLIDE_WIDTH)
    if not exporting and out.is_terminal and not args.width:
        return out
    # A recording keeps every style whatever the terminal shows, so slides are in full colour.
    return Console(highlight=False, markup=False, record=exporting, width=width, file=out.file,
                   force_terminal=out.is_terminal, color_system=out.color_system)


def _slide_targets(args) -> list[tuple[str, Path]]:
    """The files --svg/--html will write, checked before any work is done."""
    if not (getattr(args, "svg", None) or getattr(args, "html", None)):
        return []
    if args.json:
        raise _UsageError(f"einpar {args.command}: error: --svg and --html save the view as "
                          "printed; they do not go with --json")
    if args.command == "compile" and args.emit not in ("spmd", "layouts"):
        raise _UsageError(f"einpar compile: error: --svg and --html save the spmd or layouts "
                          f"view, not --emit {args.emit}")
    targets = []
    for kind in ("svg", "html"):
        path = getattr(args, kind, None)
        if path:
            targets.append((kind, _writable(path, args.force, args.command)))
    return targets


def _save_slides(console: Console, targets, title: str, out: Console, command: str) -> None:
    for kind, path in targets:
        text = (console.export_svg(title=title, clear=False) if kind == "svg"
                else console.export_html(clear=False))
        _write(path, command, lambda target: target.write_text(text, encoding="utf-8"))
    for kind, path in targets:
        out.print(f"{kind.upper()} written to {path}", markup=False, style="dim")


def _explain(args, program: Program, text: str, out: Console, err: Console,
             sources: SourceMap) -> int:
    from .explain import explain
    from .explain_view import explanation_json, print_explanation

    targets = args.slides
    from .pipeline import staged_repeat

    gantt = _writable(args.gantt, args.force, "explain") if args.gantt else None
    if gantt is not None and staged_repeat(program) is None:
        raise _UsageError("einpar explain: error: --gantt draws a pipeline's schedule; this "
                          "program has no `repeat` over a mesh axis of more than one device")
    if args.values and staged_repeat(program) is not None:
        raise _UsageError("einpar explain: error: --values shows every device's numbers, which "
                          "a pipeline's stages hold per micro-batch; run it with `einpar run` instead")
    if args.values and args.json:
        raise _UsageError("einpar explain: error: --values shows the numbers in the view; it "
                          "does not go with --json")
    cluster = _cluster(args, program, sources)
    spmd = _plan(args, program, cluster)
    explanation = explain(spmd, text, cluster)
    if gantt is not None:
        from .gantt import gantt_svg

        _write(gantt, "explain", lambda target: target.write_text(
            gantt_svg(explanation.pipeline.timeline), encoding="utf-8"))
    numbers = None
    if args.statement is not None:
        names = {s.name: s.number for s in explanation.statements}
        numbers = []
        for item in args.statement.split(","):
            item = item.strip()
            if item.isascii() and item.isdigit() and 1 <= int(item) <= len(explanation.statements):
                numbers.append(int(item))
            elif item in names:
                numbers.append(names[item])
            else:
                listing = ", ".join(f"{s.number} {s.name}" for s in explanation.statements)
                raise _UsageError(f"einpar explain: error: no statement {item!r}; "
                                  f"the program's statements are: {listing}")
    shown = explanation.mesh  # one stage's devices for a pipeline
    if args.device is not None and args.device >= shown.num_devices:
        whose = "each stage has" if explanation.pipeline is not None else "the mesh has"
        raise _UsageError(f"einpar explain: error: no device {args.device}; {whose} "
                          f"{shown.num_devices} devices, 0 to {shown.num_devices - 1}")
    values = None
    if args.values:
        from .backends.numpy_sim import run_spmd

        work = resources.estimate_values(program, spmd)
        resources.require_fits(work, args.max_memory, args.max_time)  # before allocating anything
        values = {}
        with ProgressBar(err, resources.simulator_steps(spmd.steps),
                         f"{Path(program.file).name} on numpy") as bar:
            run_spmd(spmd, api.random_inputs(program, args.seed), record=values, tick=bar.tick)
    if args.json:
        document = explanation_json(explanation, numbers)
        out.print(json.dumps(document, indent=2), markup=False)
        return 0
    console = _view_console(args, out)
    print_explanation(explanation, console, statements=numbers, device=args.device, values=values)
    _save_slides(console, targets, f"einpar explain {args.file}", out, "explain")
    return 0


def _print_diagnostics(diagnostics, sources: SourceMap, as_json: bool, out: Console,
                       err: Console) -> None:
    """Errors or warnings: as JSON on stdout, or rendered on stderr (errors red, warnings yellow)."""
    if as_json:
        out.print(render_json(diagnostics), markup=False)
        return
    for diagnostic in diagnostics:
        colour = "yellow" if diagnostic.severity == "warning" else "red"
        for number, line in enumerate(render_text(diagnostic, sources).splitlines()):
            if number == 0:
                err.print(Text(line, style=f"bold {colour}"))
            elif set(line.split("|")[-1].strip()) <= {"^", "-"} and "|" in line and line.strip("| "):
                err.print(Text(line, style=colour))
            elif line.lstrip().startswith("= hint"):
                err.print(Text(line, style="cyan"))
            elif SOURCE_LINE.match(line):  # `12 | x[B] = ...`: the program's own text
                gutter, code = line.split(" | ", 1)
                err.print(Text(gutter + " | ") + highlight(code))
            else:
                err.print(Text(line))
    errors = sum(d.severity == "error" for d in diagnostics)
    if errors > 1:
        err.print(Text(f"{errors} errors", style="bold red"))
    elif len(diagnostics) - errors > 1:
        err.print(Text(f"{len(diagnostics) - errors} warnings", style="bold yellow"))


def _usage_json(error: "_UsageError") -> str:
    """A usage error as --json prints it: a diagnostic like the others (E303), with the usage."""
    message = re.sub(r"^einpar( [\w-]+)?: error: ", "", str(error))
    return render_json([Diagnostic("E303", message, hint=error.usage or None)])


def _ignored_codes(args) -> list[str]:
    """The codes of `--ignore W101,W102 ...`; one that names no warning is a usage error."""
    codes = [code.strip() for group in args.ignore for code in group.split(",") if code.strip()]
    unknown = lint.unknown_codes(codes)
    if unknown:
        raise _UsageError(f"einpar {args.command}: error: --ignore {unknown[0]}: no warning has "
                          f"that code; the codes are {', '.join(lint.WARNING_CODES)}")
    return codes


def _with_warnings(document: dict, warnings) -> dict:
    return {**document, "warnings": [warning.to_dict() for warning in warnings]}






def _summary(program: Program) -> dict:
    tensors = []
    for value in program.inputs:
        tensors.append({"name": value.name, "kind": value.kind, "dtype": value.type.dtype,
                        "indices": list(value.type.indices), "shape": list(value.type.shape),
                        "layout": format_dims(value.type.indices, value.layout),
                        "bytes": value.type.nbytes})
    for op in walk_ops(program.ops):
        if hasattr(op, "result") and op.result.name == op.stmt:
            value = op.result
            tensors.append({"name": value.name, "kind": "def", "dtype": value.type.dtype,
                            "indices": list(value.type.indices), "shape": list(value.type.shape),
                            "layout": format_dims(value.type.indices, value.layout),
                            "bytes": value.type.nbytes})
    counts: dict[str, int] = {}
    for op in walk_ops(program.ops):
        counts[type(op).__name__] = counts.get(type(op).__name__, 0) + 1
    summary = {"file": program.file, "mesh": dict(program.mesh.axes),
               "devices": program.mesh.num_devices, "dims": dict(program.dims),
               "dtype": program.dtype, "tensors": tensors,
               "outputs": [o.name for o in program.outputs], "ops": counts,
               "flops": program_flops(program)}
    pipeline = _pipeline_summary(program)
    if pipeline is not None:
        summary["pipeline"] = pipeline
    return summary


def _pipeline_summary(program: Program) -> dict | None:
    """The stages of a pipelined repeat: the trips each holds (first and last of each
    chunk), the schedule, and with stages of equal time its bubble and the activations
    each stage holds at its peak, from their closed forms (einpar/schedule.py; tested
    against the timeline), so a check costs nothing however many micro-batches."""
    from .ir import Repeat
    from .schedule import bubble_formula, in_flight_formula

    written = program.forward or program
    loop = next((op for op in written.ops if isinstance(op, Repeat) and op.stage_axis), None)
    if loop is None:
        return None
    training = written.training
    name, chunks = training.schedule if training is not None and training.schedule else ("gpipe", 1)
    microbatches = training.microbatches[1] if training is not None and training.microbatches else 1
    stages = program.mesh.size(loop.stage_axis)
    per = loop.count // (stages * chunks)
    trips = [[[(chunk * stages + stage) * per, (chunk * stages + stage + 1) * per - 1]
              for chunk in range(chunks)] for stage in range(stages)]
    forward_only = training is None  # the batch goes through the stages in turn
    return {"axis": loop.stage_axis, "dim": loop.dim, "stages": stages,
            "schedule": "forward" if forward_only else name, "chunks": chunks,
            "microbatches": microbatches, "trips": trips,
            "bubble": bubble_formula(name, stages, microbatches, chunks),
            "in_flight": None if forward_only else
            list(in_flight_formula(name, stages, microbatches, chunks))}


def _print_check(program: Program, out: Console) -> None:
    summary = _summary(program)
    out.print(Text(f"{program.file}: ok", style="bold green"))
    devices = program.mesh.num_devices
    mesh = f"{program.mesh} ({devices} devices)" if program.mesh.axes else "no mesh (one device)"
    out.print(f"{mesh}, dtype {program.dtype}")
    out.print("dims " + " ".join(f"{k}={v}" for k, v in program.dims))
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("tensor", "kind", "shape", "layout", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for t in summary["tensors"]:
        shape = t["dtype"] + "[" + ",".join(map(str, t["shape"])) + "]"
        table.add_row(t["name"], t["kind"], shape, t["layout"], format_bytes(t["bytes"]))
    out.print(table)
    ops = ", ".join(f"{n} {kind.lower()}" for kind, n in summary["ops"].items())
    out.print(f"ops: {ops or 'none'}")
    out.print(f"outputs: {', '.join(summary['outputs']) or 'none'}")
    out.print(f"FLOPs: {format_count(summary['flops'])} ({summary['flops']:,})")
    pipeline = summary.get("pipeline")
    if pipeline is not None:
        held = "; ".join(f"stage {stage}: " + ", ".join(
            f"{first}–{last}" if last > first else f"{first}" for first, last in chunks)
            for stage, chunks in enumerate(pipeline["trips"]))
        chunks = f" v={pipeline['chunks']}" if pipeline["chunks"] > 1 else ""
        count = pipeline["microbatches"]
        out.print(f"pipeline: {pipeline['dim']} over {pipeline['axis']}={pipeline['stages']} "
                  f"stages, trips {held}")
        if pipeline["in_flight"] is None:
            out.print(f"forward only, one batch through the stages in turn: bubble "
                      f"{pipeline['bubble']:.1%} with stages of equal time")
            return
        unit = "micro-batches' activations" if not chunks else \
            f"chunks' activations (a chunk is 1/{pipeline['chunks']} of a stage's layers)"
        out.print(f"schedule {pipeline['schedule']}{chunks}, {count} micro-batch"
                  f"{'es' if count != 1 else ''}: bubble {pipeline['bubble']:.1%} with stages of "
                  f"equal time; held at the peak per stage: "
                  f"{', '.join(map(str, pipeline['in_flight']))} {unit}")


def _print_outputs(outputs: dict, out: Console) -> None:
    import numpy as np

    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("output", "shape", "mean", "std", "min", "max"):
        table.add_column(column, justify="left" if column in ("output", "shape") else "right")
    for name, array in outputs.items():
        wide = np.asarray(array).astype(np.float64)
        stats = [f"{f(wide):.6g}" if wide.size else "-" for f in (np.mean, np.std, np.min, np.max)]
        shape = f"{array.dtype}[" + ",".join(map(str, array.shape)) + "]"
        table.add_row(name, shape, *stats)
    out.print(table)


def _compile(args, program: Program, text: str, out: Console, warnings: list,
             ignore: list[str], sources: SourceMap) -> int:
    """Print the stage `--emit` asks for. Warnings found while compiling (W104, less the
    `ignore`d) are added to `warnings`, which the caller prints after the output."""
    if args.emit == "jax":
        command = f"einpar compile {args.file} --emit jax" + "".join(
            f" --set {item}" for group in args.set for item in group)
        if args.precision:
            command += f" --precision {args.precision}"
        if args.cluster:
            command += f" --cluster {args.cluster}"
        if args.objective != DEFAULT_OBJECTIVE:
            command += f" --objective {args.objective}"
        spmd = _plan(args, program, _cluster(args, program, sources))
        text = api.emit_jax(program, command, args.precision or DEFAULT_PRECISION, spmd)
        if args.json:
            out.print(json.dumps(_with_warnings({"jax": text}, warnings)), markup=False)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        return 0
    if args.emit == "ir":
        text = format_program(program)
        out.print(json.dumps(_with_warnings({"ir": text}, warnings)) if args.json else text,
                  markup=False)
        return 0
    if args.emit == "grad":
        if program.forward is None:
            raise EinparError(Diagnostic(
                "E303", f"{args.file} has no loss, so no backward program to print",
                hint="add `loss l` for a scalar l[] = ... to make it a training step"), usage=True)
        from .grad import format_grad

        text = format_grad(program)
        out.print(json.dumps(_with_warnings({"grad": text}, warnings)) if args.json else text,
                  markup=False)
        return 0
    targets = args.slides
    spmd = _plan(args, program, _cluster(args, program, sources))
    warnings.extend(lint.search_limits(spmd.search_limits, text, ignore))
    if args.json:
        document = to_json(spmd)
        if args.emit == "layouts":
            document = {key: document[key] for key in ("mesh", "devices", "values")}
        out.print(json.dumps(_with_warnings(document, warnings), indent=2), markup=False)
        return 0
    natural = max(len(line) for line in format_spmd(spmd).splitlines())
    console = _view_console(args, out, natural) if targets or args.width else out
    if args.emit == "layouts":
        _print_layouts(spmd, console)
    else:
        _print_spmd(spmd, console)
    _save_slides(console, targets, f"einpar compile {args.file}", out, "compile")
    return 0


def _print_layouts(spmd, out: Console) -> None:
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("value", "tensor", "global", "local shape", "bytes/device"):
        table.add_column(column, justify="right" if column == "bytes/device" else "left")
    for value in spmd.values.values():
        local = value.local_shape(spmd.mesh)
        nbytes = DTYPE_BYTES[value.type.dtype]
        for size in local:
            nbytes *= size
        table.add_row(value.name, value.tensor, value.format(),
                      format_local(value.layout, value.type.shape, spmd.mesh),
                      format_bytes(nbytes))
    out.print(table)


def _print_spmd(spmd, out: Console) -> None:
    for line in format_spmd(spmd).splitlines():
        if line.startswith("#"):
            out.print(Text(line, style="dim"))
        elif " B/device: " in line:
            code, _, note = line.partition("  # ")
            out.print(Text(code, style="bold yellow") + Text("  # " + note, style="yellow"))
        elif " = " in line and not line.startswith(("in ", "out ")):
            head, _, body = line.partition(" = ")
            out.print(Text(head + " = ") + highlight(body))  # the local op, in the program's terms
        else:
            out.print(Text(line))


def _run(args, program: Program, out: Console, err: Console, sources: SourceMap) -> int:
    import numpy as np

    from .backends.reference import evaluate

    save = None
    if args.save:
        # NumPy adds .npz to a name without it; so does einpar, to the file it writes.
        save = _writable(args.save if args.save.endswith(".npz") else args.save + ".npz",
                         args.force, "run")
    spmd = None if args.backend == "reference" else \
        _plan(args, program, _cluster(args, program, sources))
    distributed = _distributed(args) if args.backend == "jax" else None
    work = resources.estimate_run(program, args.backend, spmd, platform=args.platform,
                                  processes=distributed.num_processes if distributed else 1,
                                  warmup=args.warmup, repeat=args.repeat)
    resources.require_fits(work, args.max_memory, args.max_time)  # before allocating anything
    if args.backend == "jax":
        code = _supervised(args, save)
        if code is not None:
            return code
    # One bar for the whole run: the reference's ops, then the backend's steps.
    units = resources.reference_calls(program.ops)
    if args.backend == "numpy":
        units += resources.simulator_steps(spmd.steps)
    elif args.backend == "jax":
        units += 1 + args.warmup + args.repeat
    with ProgressBar(err, units, f"{Path(program.file).name} on {args.backend}",
                     enabled=not args.json) as bar:
        if args.inputs:
            arrays = api.load_inputs(program, args.inputs)
        else:
            arrays = api.random_inputs(program, args.seed)
        outputs = evaluate(program, arrays, tick=bar.tick)
        if args.backend == "numpy":
            return _run_simulated(args, program, spmd, arrays, outputs, out, save, bar)
        if args.backend == "jax":
            return _run_jax(args, program, spmd, arrays, outputs, out, save, bar)
    if args.json:
        out.print(json.dumps({"backend": args.backend, "outputs": {
            name: {"dtype": str(a.dtype), "shape": list(a.shape),
                   "mean": float(np.mean(a.astype(np.float64))) if a.size else None}
            for name, a in outputs.items()}}, indent=2), markup=False)
    else:
        source = args.inputs or f"random inputs, seed {args.seed}"
        out.print(f"{program.file} on backend {args.backend} ({source})", markup=False)
        _print_outputs(outputs, out)
    _save_outputs(save, outputs, args, out)
    return 0


def _save_outputs(save: Path | None, outputs: dict, args, out: Console) -> None:
    if save is None:
        return
    _write(save, "run", lambda path: save_outputs(path, outputs))
    if not args.json:
        out.print(f"saved {', '.join(outputs)} to {save}")


def _comparisons_json(results) -> dict:
    # `error` is beyond the rounding band where one was measured (einpar.rounding).
    return {r.name: {"error": r.error, "tolerance": r.tolerance, "ok": r.ok}
            | ({"beyond_rounding_band": True} if r.banded else {}) for r in results}


def _print_comparisons(results, out: Console, then: str = "") -> None:
    """Each output's error against the reference, and the largest (followed by `then`)."""
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("output", "error vs reference", "tolerance", ""):
        table.add_column(column, justify="left" if column == "output" else "right")
    for r in results:
        # An error past the rounding band: the band's runs were made (einpar.rounding).
        verdict = Text("ok", style="green") if r.ok else Text("MISMATCH", style="bold red")
        table.add_row(r.name, f"{r.error:.3g}" + (" beyond rounding" if r.banded else ""),
                      f"{r.tolerance:g}", verdict)
    out.print(table)
    out.print(f"largest error {max((r.error for r in results), default=0.0):.3g}{then}")


def _run_simulated(args, program: Program, spmd, arrays, reference, out: Console, save,
                   bar: ProgressBar) -> int:
    from .backends.numpy_sim import run_spmd

    outputs, traffic = run_spmd(spmd, arrays, tick=bar.tick)
    bar.stop()
    results = compare_outputs(program, arrays, reference, outputs)
    sent = max(traffic.sent) if traffic.sent else 0
    between = max(traffic.between_stages, default=0)  # a pipeline's, to other stages
    if args.json:
        found = {"backend": "numpy", "devices": program.mesh.num_devices,
                 "bytes_sent_per_device": sent}
        if spmd.pipeline is not None:
            found["bytes_between_stages_per_device"] = between
        out.print(json.dumps(found | {"outputs": _comparisons_json(results)}, indent=2), markup=False)
    else:
        source = args.inputs or f"random inputs, seed {args.seed}"
        out.print(f"{program.file} on {program.mesh.num_devices} simulated devices ({source})", markup=False)
        least = min(traffic.sent, default=0)
        said = f"; each device sent {sent:,} bytes" if least == sent else \
            f"; devices sent {least:,} to {sent:,} bytes"
        if spmd.pipeline is not None:
            said += f" ({between:,} at most to other stages)"
        _print_comparisons(results, out, said)
    _save_outputs(save, outputs, args, out)
    return 0 if all(r.ok for r in results) else 1


def _distributed(args):
    """The multi-process settings from the flags, else from JAX's environment variables."""
    from .backends.jax_backend import Distributed

    given = [args.coordinator, args.num_processes, args.process_id]
    if all(value is None for value in given):
        found = Distributed.from_environment()
        if found is None:
            return None
        _check_address(found.coordinator, "JAX_COORDINATOR_ADDRESS")
        if not (0 < found.num_processes <= MAX_DEVICES and 0 <= found.process_id < MAX_DEVICES):
            raise _UsageError(f"einpar run: error: JAX_NUM_PROCESSES must be 1 to {MAX_DEVICES:,} "
                              "and JAX_PROCESS_ID 0 to one less")
        return Distributed(found.coordinator, found.num_processes, found.process_id, args.timeout)
    if any(value is None for value in given):
        raise _UsageError("einpar run: error: --coordinator, --num-processes and --process-id go "
                          "together")
    _check_address(args.coordinator, "--coordinator")
    if args.process_id >= args.num_processes:
        raise EinparError(Diagnostic(
            "E401", f"process id {args.process_id} is not one of the {args.num_processes} processes "
                    f"(0 to {args.num_processes - 1})"), usage=True)
    return Distributed(args.coordinator, args.num_processes, args.process_id, args.timeout)


# HOST:PORT, the host a name, an IPv4 address or a bracketed IPv6 address.
ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):([0-9]{1,5})")


def _check_address(address: str, where: str) -> None:
    match = ADDRESS.fullmatch(address)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise _UsageError(f"einpar run: error: {where} must be HOST:PORT (e.g. 10.0.0.1:8476, "
                          f"a port from 1 to 65535), got {address!r}")


def _supervised(args, save) -> int | None:
    """For one process of several, run the JAX work in a watched worker (JAX aborts a
    process whose peer died); returns its exit code, or None in the worker itself."""
    from .backends import jax_supervisor

    distributed = _distributed(args)
    if distributed is None:
        return None
    if save is not None:
        raise _UsageError("einpar run: error: --save needs the whole outputs, which no one process "
                          "of several holds")
    if jax_supervisor.is_worker():
        jax_supervisor.exit_with_supervisor()
        jax_supervisor.keep_runtime_output_apart()
        return None
    code, diagnostics = jax_supervisor.supervise(args.argv, distributed.coordinator,
                                                 distributed.process_id, distributed.num_processes,
                                                 distributed.timeout_s)
    if diagnostics:
        raise EinparError(diagnostics)
    return code


def _run_jax(args, program: Program, spmd, arrays, reference, out: Console, save,
             bar: ProgressBar) -> int:
    from .backends.jax_backend import shutdown

    distributed = _distributed(args)
    what = "the GSPMD twin" if args.twin else "einpar's per-device program"

    def started(devices) -> None:  # at once: compiling takes a while, and peers may be waiting
        where = f"{len(devices.devices)} {devices.platform} devices"
        if devices.num_processes > 1:
            where = (f"process {devices.process_id} of {devices.num_processes}, "
                     f"{devices.local_count} of {len(devices.devices)} {devices.platform} devices")
        if not args.json:
            source = args.inputs or f"random inputs, seed {args.seed}"
            with bar.paused():
                out.print(f"{program.file}: {what} on {where} ({source})", markup=False)

    precision = args.precision or DEFAULT_PRECISION
    result = api.run_jax(program, arrays, cpu_devices=args.devices, platform=args.platform,
                         distributed=distributed, twin=args.twin, warmup=args.warmup,
                         repeat=args.repeat, started=started, spmd=spmd, tick=bar.tick,
                         precision=precision)
    bar.stop()
    results = compare_outputs(program, arrays, reference,
                              result.outputs if result.outputs is not None else result.local_blocks,
                              precision)
    # The plan's bytes; not for the twin (XLA's plan) nor a pipeline (one stage's plan: its
    # bytes per stage are `einpar cost`'s and the simulator's)
    planned = None if args.twin or result.spmd.pipeline is not None else \
        bytes_per_device(result.spmd.steps)
    devices = result.devices
    if args.json:
        out.print(json.dumps({
            "backend": "jax", "twin": args.twin, "platform": devices.platform,
            "devices": len(devices.devices), "process_id": devices.process_id,
            "num_processes": devices.num_processes, "compile_s": result.compile_s,
            "step_s": result.step_s, "step_times_s": result.step_times_s,
            "planned_bytes_per_device": planned, "outputs": _comparisons_json(results)},
            indent=2), markup=False)
    else:
        _print_comparisons(results, out, "" if planned is None else
                           f"; each device sends {planned:,} bytes per step")
        times = sorted(result.step_times_s)
        out.print(f"compile {format_seconds(result.compile_s)}; step {format_seconds(result.step_s)} "
                  f"(median of {len(times)} after {args.warmup} warm-up; "
                  f"{format_seconds(times[0])} to {format_seconds(times[-1])})")
    _save_outputs(save, result.outputs, args, out)
    shutdown(distributed)
    return 0 if all(r.ok for r in results) else 1




def main(argv: list[str] | None = None) -> int:
    out, err = _consoles()
    parser = _build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv
    except _UsageError as error:
        if "--json" in argv:
            out.print(_usage_json(error), markup=False)
            return 2
        err.print(error.usage, markup=False)
        err.print(str(error), markup=False)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    sources = SourceMap()
    try:
        if args.command == "calibrate":
            return _calibrate(args, out, err, sources)
        args.slides = _slide_targets(args) if args.command in ("compile", "explain") else []
        if args.command == "compile" and args.precision and args.emit != "jax":
            raise _UsageError(f"einpar compile: error: --precision sets how the JAX module computes; "
                              f"it goes with --emit jax, not --emit {args.emit}")
        assignments = [item for group in args.set for item in group]
        overrides = api.parse_overrides(assignments)
        ignore = _ignored_codes(args) if args.command in ("check", "compile") else []
        text = api.read_source(args.file)
        args.file = api.shown_path(args.file)  # what einpar prints and names the program by
        sources.texts[args.file] = text
        if args.command == "compile" and args.emit == "ast":
            from .syntax import format_ast, parse

            tree = format_ast(parse(text, args.file))
            out.print(json.dumps({"ast": tree}) if args.json else tree, markup=False)
            return 0
        program = api.compile_source(text, args.file, overrides)
        if args.command in ("check", "compile"):
            from .syntax import parse

            warnings = (lint.repeated_overrides(assignments, ignore)
                        + lint.lint(parse(text, args.file), text, ignore))
            if args.command == "compile":
                code = _compile(args, program, text, out, warnings, ignore, sources)
            elif args.json:
                out.print(json.dumps(_with_warnings(_summary(program), warnings), indent=2),
                          markup=False)
            else:
                _print_check(program, out)
            if not args.json:  # after the output, where the last lines of a terminal show them
                _print_diagnostics(warnings, sources, False, out, err)
            return code if args.command == "compile" else 0
        if args.command == "cost":
            return _cost(args, program, out, sources)
        if args.command == "explain":
            return _explain(args, program, text, out, err, sources)
        return _run(args, program, out, err, sources)
    except EinparError as error:
        _print_diagnostics(error.diagnostics, sources, getattr(args, "json", False), out, err)
        return 2 if error.usage else 1
    except _UsageError as error:
        if getattr(args, "json", False):
            out.print(_usage_json(error), markup=False)
        else:
            err.print(str(error), markup=False)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: stop, say so on one line, no traceback
        err.print("einpar: interrupted", markup=False)
        return 130
    except Exception as error:  # a bug in einpar, not in the user's program
        if os.environ.get("EINPAR_DEBUG"):
            raise
        err.print(Text(f"einpar: internal error: {type(error).__name__}: {error}", style="bold red"))
        err.print("This is a bug in einpar, not in your program. Rerun with EINPAR_DEBUG=1 for "
                  "the traceback and report it with the .ein file.", markup=False)
        return 3


if __name__ == "__main__":
    sys.exit(main())
