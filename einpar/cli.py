"""The `einpar` command: a thin shell over einpar.api.

    einpar check FILE [--set D=4096 tp=8] [--ignore W101,W102] [--json]
    einpar run FILE --backend reference|numpy|jax [--inputs in.npz] [--seed N] [--save out.npz]
               [--devices N] [--platform cpu|gpu|tpu] [--repeat N] [--twin]
               [--precision highest|default]
               [--coordinator HOST:PORT --num-processes N --process-id I] [--timeout S]
    einpar compile FILE [--emit ast|ir|layouts|spmd|jax [--precision highest|default]]
                   [--ignore CODES] [--json] [--svg OUT.svg] [--html OUT.html]
    einpar explain FILE [--statement N|NAME[,...]] [--device D] [--values [--seed N]]
                   [--cluster NAME|FILE] [--svg OUT.svg] [--html OUT.html] [--width COLUMNS]
                   [--force] [--json]
    einpar cost FILE --cluster NAME|FILE [--overlap] [--precision highest|default] [--json]
                [--trace OUT.json] [--force]
    einpar calibrate [--out CLUSTER.json] [--devices N] [--quick] [--force]

`main(argv) -> int` so tests call it in-process. Exit codes: 0 success, 1 a
problem in the user's program or inputs, 2 bad usage, 3 an internal error
(a bug in einpar; EINPAR_DEBUG=1 shows its traceback). Warnings (`check`,
`compile`) never change the exit code. With --json every error prints as a
JSON diagnostic on stdout, bad usage too (E303); only an internal error is text.
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

from . import api, lint
from .errors import Diagnostic, EinparError, SourceMap, render_json, render_text
from .flops import program_flops
from .ir import Program, format_program, walk_ops
from .layout import DTYPE_BYTES, format_dims
from .lexer import highlight
from .precision import DEFAULT_PRECISION, PRECISIONS
from .spmd import bytes_per_device, format_spmd, to_json
from .tolerance import compare, program_tolerance
from .units import format_bytes, format_count, format_seconds


SOURCE_LINE = re.compile(r"^ *[0-9]+ \| ")  # a source line quoted in a diagnostic


class _UsageError(Exception):
    def __init__(self, message: str, usage: str = ""):
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would exit; the caller decides the exit code
        raise _UsageError(f"{self.prog}: error: {message}", self.format_usage().rstrip())


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="einpar", description="Compile, check, run and price sharded einsum programs.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def precision(sub, what: str):
        sub.add_argument("--precision", choices=PRECISIONS, default=None,
                         help=f"{what} float32 contractions: highest (true float32, the default: "
                              "what the reference computes) or default (the accelerator's fast "
                              "mode: TF32 on GPUs, one bfloat16 pass on TPUs); see docs/cost.md")

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
    run.add_argument("--backend", choices=["reference", "numpy", "jax"], default="reference",
                     help="reference: unsharded NumPy evaluation (the oracle); numpy: every device "
                          "simulated with NumPy; jax: the per-device program under jax.shard_map "
                          "on real devices. numpy and jax are checked against the reference")
    run.add_argument("--inputs", metavar="IN.npz", help="arrays keyed by tensor name (else random)")
    run.add_argument("--seed", type=int, default=0, help="seed for random inputs (default 0)")
    run.add_argument("--save", metavar="OUT.npz", help="write the outputs to an .npz file")
    run.add_argument("--force", action="store_true", help="let --save overwrite an existing file")
    jax = run.add_argument_group("jax backend")
    jax.add_argument("--devices", type=_positive, metavar="N",
                     help="CPU devices to start per process (default: as many as the mesh needs)")
    jax.add_argument("--platform", choices=["cpu", "gpu", "tpu"],
                     help="run on this platform only (default: accelerators if JAX finds any, else CPU)")
    jax.add_argument("--repeat", type=_positive, default=10, metavar="N",
                     help="timed steps after the warm-up (default 10); the median is reported")
    jax.add_argument("--warmup", type=_count, default=2, metavar="N",
                     help="untimed steps first (default 2)")
    precision(jax, "run")
    jax.add_argument("--twin", action="store_true",
                     help="run the GSPMD twin instead: the whole-array program under jax.jit with "
                          "the same input and output layouts, partitioned by XLA")
    jax.add_argument("--coordinator", metavar="HOST:PORT",
                     help="join a run of several processes through jax.distributed; process 0 "
                          "serves at this address (or set JAX_COORDINATOR_ADDRESS)")
    jax.add_argument("--num-processes", type=_positive, metavar="N",
                     help="processes in the run (or JAX_NUM_PROCESSES)")
    jax.add_argument("--process-id", type=_count, metavar="I",
                     help="this process's number, 0 to N-1 (or JAX_PROCESS_ID)")
    jax.add_argument("--timeout", type=_seconds, default=120.0, metavar="SECONDS",
                     help="a run of several processes ends with an error after this long (default 120)")

    comp = commands.add_parser("compile", help="print a stage of the compiler")
    common(comp)
    comp.add_argument("--emit", choices=["ast", "ir", "layouts", "spmd", "jax"], default="spmd",
                      help="which stage to print (default: the per-device program); jax: a "
                           "standalone Python module running it under jax.shard_map")
    precision(comp, "with --emit jax: the module runs its")
    warnings(comp)

    def slides(sub):
        sub.add_argument("--svg", metavar="OUT.svg", help="also save the view as an SVG slide")
        sub.add_argument("--html", metavar="OUT.html", help="also save the view as an HTML page")
        sub.add_argument("--width", type=_positive, metavar="COLUMNS",
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
    explain.add_argument("--device", type=_count, metavar="D",
                         help="highlight device D (with --values, only its numbers)")
    explain.add_argument("--values", action="store_true",
                         help="the numbers each device holds before and after each statement, "
                              "from the NumPy device simulator (random inputs)")
    explain.add_argument("--seed", type=int, default=0, help="seed for --values' inputs (default 0)")
    explain.add_argument("--cluster", metavar="NAME|FILE",
                         help="time each collective on a modeled cluster (see einpar cost)")
    slides(explain)

    cost = commands.add_parser("cost", help="price the program on a modeled cluster: time, "
                                             "where it goes, memory")
    common(cost)
    cost.add_argument("--cluster", required=True, metavar="NAME|FILE",
                      help="a preset (h100x8, h100x8:64, a100x8:128, tpu-v5e:16x16, tpu-v5p:8x8x8, "
                           "...) or a cluster file (.toml or .json, see docs/cost.md)")
    cost.add_argument("--overlap", action="store_true",
                      help="let collectives run beside compute that does not need their result")
    precision(cost, "price")
    cost.add_argument("--trace", metavar="OUT.json",
                      help="write the timeline as a Chrome/Perfetto trace (ui.perfetto.dev)")
    cost.add_argument("--force", action="store_true", help="let --trace overwrite an existing file")

    calibrate = commands.add_parser("calibrate", help="measure this host (JAX CPU devices) into a "
                                                       "cluster file for `einpar cost`")
    calibrate.add_argument("--out", default="local-cpu.json", metavar="CLUSTER.json",
                           help="the cluster file to write (default local-cpu.json)")
    calibrate.add_argument("--devices", type=_positive, default=8, metavar="N",
                           help="CPU devices to measure, as `einpar run --devices` starts (default 8)")
    calibrate.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    calibrate.add_argument("--force", action="store_true", help="let --out overwrite an existing file")
    return parser


def _writable(path_text: str, force: bool, command: str) -> Path:
    """A path the user asked einpar to write: never over their file unless --force."""
    path = Path(path_text)
    if path.exists() and not force:
        raise _UsageError(f"einpar {command}: error: {path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise _UsageError(f"einpar {command}: error: cannot write {path}: folder {path.parent} "
                          "does not exist")
    return path


def _cost(args, program: Program, out: Console, sources: SourceMap) -> int:
    from .cost_model.cluster import load_cluster
    from .cost_model.estimate import estimate
    from .cost_model.report import print_estimate
    from .cost_model.trace import write_trace

    trace = _writable(args.trace, args.force, "cost") if args.trace else None
    cluster = load_cluster(args.cluster, sources)
    result = estimate(program, api.compile_spmd(program), cluster, overlap=args.overlap,
                      precision=args.precision or DEFAULT_PRECISION)
    if trace is not None:
        write_trace(result, trace)
    if args.json:
        out.print(json.dumps(result.to_json(), indent=2), markup=False)
    else:
        print_estimate(result, out)
        if trace is not None:
            out.print(f"trace written to {trace} (open it in ui.perfetto.dev)")
    return 0


def _calibrate(args, out: Console, err: Console) -> int:
    from .cost_model.calibrate import ProgressBar, calibrate, measurement_count, write_cluster_file

    target = _writable(args.out, args.force, "calibrate")
    with ProgressBar(err, measurement_count(args.quick)) as progress:
        document = calibrate(args.devices, quick=args.quick, progress=progress)
    write_cluster_file(document, target)
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


def _save_slides(console: Console, targets, title: str, out: Console) -> None:
    for kind, path in targets:
        if kind == "svg":
            path.write_text(console.export_svg(title=title, clear=False), encoding="utf-8")
        else:
            path.write_text(console.export_html(clear=False), encoding="utf-8")
    for kind, path in targets:
        out.print(f"{kind.upper()} written to {path}", markup=False, style="dim")


def _explain(args, program: Program, text: str, out: Console, sources: SourceMap) -> int:
    from .explain import explain
    from .explain_view import explanation_json, print_explanation

    targets = args.slides
    if args.values and args.json:
        raise _UsageError("einpar explain: error: --values shows the numbers in the view; it "
                          "does not go with --json")
    cluster = None
    if args.cluster:
        from .cost_model.cluster import check_fits, load_cluster

        cluster = load_cluster(args.cluster, sources)
        check_fits(cluster, program.mesh.num_devices, str(program.mesh))
    spmd = api.compile_spmd(program)
    explanation = explain(spmd, text, cluster)
    numbers = None
    if args.statement is not None:
        names = {s.name: s.number for s in explanation.statements}
        numbers = []
        for item in args.statement.split(","):
            item = item.strip()
            if item.isdigit() and 1 <= int(item) <= len(explanation.statements):
                numbers.append(int(item))
            elif item in names:
                numbers.append(names[item])
            else:
                listing = ", ".join(f"{s.number} {s.name}" for s in explanation.statements)
                raise _UsageError(f"einpar explain: error: no statement {item!r}; "
                                  f"the program's statements are: {listing}")
    if args.device is not None and args.device >= program.mesh.num_devices:
        raise _UsageError(f"einpar explain: error: no device {args.device}; the mesh has "
                          f"{program.mesh.num_devices} devices, 0 to {program.mesh.num_devices - 1}")
    values = None
    if args.values:
        from .backends.numpy_sim import run_spmd

        values = {}
        run_spmd(spmd, api.random_inputs(program, args.seed), record=values)
    if args.json:
        document = explanation_json(explanation, numbers)
        out.print(json.dumps(document, indent=2), markup=False)
        return 0
    console = _view_console(args, out)
    print_explanation(explanation, console, statements=numbers, device=args.device, values=values)
    _save_slides(console, targets, f"einpar explain {args.file}", out)
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
    return {"file": program.file, "mesh": dict(program.mesh.axes), "devices": program.mesh.num_devices,
            "dims": dict(program.dims), "dtype": program.dtype, "tensors": tensors,
            "outputs": [o.name for o in program.outputs], "ops": counts,
            "flops": program_flops(program)}


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


def _compile(args, program: Program, out: Console, warnings=()) -> int:
    if args.emit == "jax":
        command = f"einpar compile {args.file} --emit jax" + "".join(
            f" --set {item}" for group in args.set for item in group)
        if args.precision:
            command += f" --precision {args.precision}"
        text = api.emit_jax(program, command, args.precision or DEFAULT_PRECISION)
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
    targets = args.slides
    spmd = api.compile_spmd(program)
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
    _save_slides(console, targets, f"einpar compile {args.file}", out)
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
        table.add_row(value.name, value.tensor, value.format(), "[" + ",".join(map(str, local)) + "]",
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


def _run(args, program: Program, out: Console, err: Console) -> int:
    import numpy as np

    from .backends.reference import evaluate

    save = None
    if args.save:
        # NumPy adds .npz to a name without it; check the file it will really write.
        save = Path(args.save if args.save.endswith(".npz") else args.save + ".npz")
        if save.exists() and not args.force:
            raise _UsageError(f"einpar run: error: {save} exists; pass --force to overwrite it")
        if not save.parent.is_dir():
            raise _UsageError(f"einpar run: error: cannot save to {save}: folder {save.parent} "
                              "does not exist")
    if args.backend == "jax":
        code = _supervised(args, save)
        if code is not None:
            return code
    if args.inputs:
        arrays = api.load_inputs(program, args.inputs)
    else:
        arrays = api.random_inputs(program, args.seed)
    outputs = evaluate(program, arrays)
    if args.backend == "numpy":
        return _run_simulated(args, program, arrays, outputs, out, save)
    if args.backend == "jax":
        return _run_jax(args, program, arrays, outputs, out, save)
    if args.json:
        out.print(json.dumps({"backend": args.backend, "outputs": {
            name: {"dtype": str(a.dtype), "shape": list(a.shape),
                   "mean": float(np.mean(a.astype(np.float64))) if a.size else None}
            for name, a in outputs.items()}}, indent=2), markup=False)
    else:
        source = args.inputs or f"random inputs, seed {args.seed}"
        out.print(f"{program.file} on backend {args.backend} ({source})", markup=False)
        _print_outputs(outputs, out)
    if save is not None:
        try:
            np.savez(save, **outputs)
        except OSError as error:
            raise _UsageError(f"einpar run: error: cannot save to {save}: {error.strerror}") from None
        if not args.json:
            out.print(f"saved {', '.join(outputs)} to {save}")
    return 0


def _comparisons_json(results) -> dict:
    return {r.name: {"error": r.error, "tolerance": r.tolerance, "ok": r.ok} for r in results}


def _print_comparisons(results, out: Console, then: str = "") -> None:
    """Each output's error against the reference, and the largest (followed by `then`)."""
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("output", "error vs reference", "tolerance", ""):
        table.add_column(column, justify="left" if column == "output" else "right")
    for r in results:
        table.add_row(r.name, f"{r.error:.3g}", f"{r.tolerance:g}",
                      Text("ok", style="green") if r.ok else Text("MISMATCH", style="bold red"))
    out.print(table)
    out.print(f"largest error {max((r.error for r in results), default=0.0):.3g}{then}")


def _run_simulated(args, program: Program, arrays, reference, out: Console, save) -> int:
    import numpy as np

    from .backends.numpy_sim import run_spmd

    spmd = api.compile_spmd(program)
    outputs, traffic = run_spmd(spmd, arrays)
    tolerance = program_tolerance(program)
    results = [compare(name, reference[name], outputs[name], tolerance) for name in reference]
    sent = max(traffic.sent) if traffic.sent else 0
    if args.json:
        out.print(json.dumps({"backend": "numpy", "devices": program.mesh.num_devices,
                              "bytes_sent_per_device": sent,
                              "outputs": _comparisons_json(results)}, indent=2), markup=False)
    else:
        source = args.inputs or f"random inputs, seed {args.seed}"
        out.print(f"{program.file} on {program.mesh.num_devices} simulated devices ({source})", markup=False)
        _print_comparisons(results, out, f"; each device sent {sent:,} bytes")
    if save is not None:
        np.savez(save, **outputs)
    return 0 if all(r.ok for r in results) else 1


def _distributed(args):
    """The multi-process settings from the flags, else from JAX's environment variables."""
    from .backends.jax_backend import Distributed

    given = [args.coordinator, args.num_processes, args.process_id]
    if all(value is None for value in given):
        found = Distributed.from_environment()
        return None if found is None else Distributed(found.coordinator, found.num_processes,
                                                      found.process_id, args.timeout)
    if any(value is None for value in given):
        raise _UsageError("einpar run: error: --coordinator, --num-processes and --process-id go "
                          "together")
    if args.process_id >= args.num_processes:
        raise EinparError(Diagnostic(
            "E401", f"process id {args.process_id} is not one of the {args.num_processes} processes "
                    f"(0 to {args.num_processes - 1})"), usage=True)
    return Distributed(args.coordinator, args.num_processes, args.process_id, args.timeout)


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


def _run_jax(args, program: Program, arrays, reference, out: Console, save) -> int:
    import numpy as np

    from .backends.jax_backend import shutdown
    from .tolerance import compare_blocks

    distributed = _distributed(args)
    what = "the GSPMD twin" if args.twin else "einpar's per-device program"

    def started(devices) -> None:  # at once: compiling takes a while, and peers may be waiting
        where = f"{len(devices.devices)} {devices.platform} devices"
        if devices.num_processes > 1:
            where = (f"process {devices.process_id} of {devices.num_processes}, "
                     f"{devices.local_count} of {len(devices.devices)} {devices.platform} devices")
        if not args.json:
            source = args.inputs or f"random inputs, seed {args.seed}"
            out.print(f"{program.file}: {what} on {where} ({source})", markup=False)

    precision = args.precision or DEFAULT_PRECISION
    result = api.run_jax(program, arrays, cpu_devices=args.devices, platform=args.platform,
                         distributed=distributed, twin=args.twin, warmup=args.warmup,
                         repeat=args.repeat, started=started, precision=precision)
    tolerance = program_tolerance(program, precision)
    if result.outputs is not None:
        results = [compare(name, reference[name], result.outputs[name], tolerance) for name in reference]
    else:
        results = [compare_blocks(name, reference[name], result.local_blocks[name], tolerance)
                   for name in reference]
    planned = None if args.twin else bytes_per_device(result.spmd.steps)
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
    if save is not None:
        np.savez(save, **result.outputs)
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
            return _calibrate(args, out, err)
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
                code = _compile(args, program, out, warnings)
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
            return _explain(args, program, text, out, sources)
        return _run(args, program, out, err)
    except EinparError as error:
        _print_diagnostics(error.diagnostics, sources, getattr(args, "json", False), out, err)
        return 2 if error.usage else 1
    except _UsageError as error:
        if getattr(args, "json", False):
            out.print(_usage_json(error), markup=False)
        else:
            err.print(str(error), markup=False)
        return 2
    except KeyboardInterrupt:
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
