"""Drawing an `Explanation` with rich: the terminal view of `einpar explain`, its slides, and its JSON.

Each statement gets a header with its source (highlighted by the `.ein`
lexer), the layouts it reads and makes, the strategy and the collectives in
words, and a grid of the mesh: one cell per device, listing the block of
each tensor that device holds as index ranges. Meshes of more than two axes
get one grid per slice of their leading axes.
"""

from __future__ import annotations

import numpy as np
from rich.console import Console, Group
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .explain import Explanation, Held, Statement
from .layout import Mesh, device_at, device_coords, format_local
from .lexer import highlight
from .units import format_bytes, format_seconds

PARTIAL_MARK = {"sum": "Σ", "max": "max", "min": "min"}
MAX_GRID_DEVICES = 64  # a bigger mesh shows one device's blocks, not every cell
GRID_COLUMNS = 8  # a single mesh axis longer than this is drawn in rows of this many cells


def block_text(held: Held, mesh: Mesh, device: int) -> str:
    """`B 0:4 · H 2:4` for the dims split on `device`, `whole` if none; pending reductions after
    (`partial Σtp`: a partial sum over tp)."""
    parts = []
    for index, (start, stop), size in zip(held.indices, held.block(mesh, device), held.shape):
        if (start, stop) != (0, size):
            parts.append(f"{index} {start}:{stop}")
    parts += [f"partial {PARTIAL_MARK[kind]}{axis}" for axis, kind in held.layout.partial]
    return " · ".join(parts) or "whole"


def _cell(shown: list[tuple[str, Held, Held | None]], mesh: Mesh, device: int,
          highlight_device: int | None, where: bool = False) -> Text:
    """Device `device`'s blocks: each tensor as held, and `→` the block it is moved to;
    `where` adds the device's mesh coordinates to its title."""
    title = f"d{device}"
    if where and len(mesh.axes) > 1:
        title += " " + ",".join(f"{a}={k}" for a, k in device_coords(mesh, device).items())
    text = Text(title, style="bold reverse" if device == highlight_device else "bold")
    width = max(len(name) for name, _, _ in shown)
    for name, held, moved in shown:
        text.append("\n")
        text.append(name.ljust(width), "bold")
        text.append(" " + block_text(held, mesh, device))
        if moved is not None:
            text.append("\n" + " " * width + " → " + block_text(moved, mesh, device), "yellow")
    return text


def device_grids(shown: list[tuple[str, Held, Held | None]], mesh: Mesh, device: int | None = None,
                 width: int = 100) -> list:
    """Tables of the mesh, one per slice of the axes before the last two."""
    if device is not None and mesh.num_devices > MAX_GRID_DEVICES:
        where = ", ".join(f"{axis}={k}" for axis, k in device_coords(mesh, device).items())
        return [Text(f"(device {device} of {mesh.num_devices}, at {where})", style="dim"),
                _cell(shown, mesh, device, None)]
    if mesh.num_devices > MAX_GRID_DEVICES:
        return [Text(f"({mesh.num_devices} devices: too many cells to draw; pick one with --device)",
                     style="dim")]
    axes = list(mesh.axes)
    cells = {d: _cell(shown, mesh, d, device) for d in range(mesh.num_devices)}
    widest = max(line.cell_len for cell in cells.values() for line in cell.split())
    columns = axes[-1][1] if axes else 1
    label = len(f"{axes[-2][0]}={axes[-2][1] - 1}") + 3 if len(axes) >= 2 else 0  # row labels
    if columns * (widest + 3) + label + 1 > width:  # the mesh's own grid would not fit
        return [_folded(shown, mesh, device, width)]
    rows_axis = axes[-2] if len(axes) >= 2 else None
    cols_axis = axes[-1] if axes else None
    leading = axes[:-2]
    slices = [{}]
    for name, size in leading:
        slices = [dict(s, **{name: k}) for s in slices for k in range(size)]
    grids = []
    for fixed in slices:
        title = ", ".join(f"{name}={k}" for name, k in fixed.items())
        table = Table(show_header=cols_axis is not None, show_lines=True, title=title or None,
                      title_justify="left", header_style="bold", pad_edge=True)
        if rows_axis is not None:
            table.add_column("", no_wrap=True)
        for k in range(cols_axis[1] if cols_axis else 1):
            table.add_column(f"{cols_axis[0]}={k}" if cols_axis else "", no_wrap=True)
        for r in range(rows_axis[1] if rows_axis else 1):
            row = []
            for c in range(cols_axis[1] if cols_axis else 1):
                coords = dict(fixed)
                if rows_axis:
                    coords[rows_axis[0]] = r
                if cols_axis:
                    coords[cols_axis[0]] = c
                row.append(cells[device_at(mesh, coords)])
            if rows_axis is not None:
                row.insert(0, Text(f"{rows_axis[0]}={r}", style="bold"))
            table.add_row(*row)
        grids.append(table)
    return grids


def _folded(shown, mesh: Mesh, device: int | None, width: int) -> Table:
    """Every device in order, as many to a row as fit (a divisor of the device count if one
    fills at least half a row), each cell titled with its coordinates."""
    cells = [_cell(shown, mesh, d, device, where=True) for d in range(mesh.num_devices)]
    widest = max(line.cell_len for cell in cells for line in cell.split())
    fit = max(1, (width - 1) // (widest + 3))  # a cell takes its text, padding and a border
    per_row = max(d for d in range(1, fit + 1) if mesh.num_devices % d == 0)
    if 2 * per_row <= fit:
        per_row = fit
    order = " × ".join(f"{a}={n}" for a, n in mesh.axes)
    table = Table(show_header=False, show_lines=True, pad_edge=True, title_justify="left",
                  title=f"devices in row-major order of {order}")
    for _ in range(per_row):
        table.add_column(no_wrap=True)
    for start in range(0, len(cells), per_row):
        row = cells[start:start + per_row]
        table.add_row(*row, *[""] * (per_row - len(row)))
    return table


def _groups_text(groups, limit: int = 4) -> str:
    shown = " ".join("{" + ",".join(map(str, g)) + "}" for g in groups[:limit])
    more = f" and {len(groups) - limit} more" if len(groups) > limit else ""
    return f"{len(groups)} group{'s' if len(groups) > 1 else ''} of {len(groups[0])}: {shown}{more}"


def _labelled(label: str, body) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold cyan", width=9, no_wrap=True)
    grid.add_column()
    grid.add_row(label, body)
    return grid


def shown_values(statement: Statement) -> list[tuple[str, Held, Held | None]]:
    """What a statement's grid lists, by name: each operand as held before it and, if moved,
    as read; then its result as made and, if the program asks for another layout, as delivered.
    A result that redefines an operand's name (`x = x + ...`) goes by its value's (`x#2`)."""
    shown = []
    for held in statement.reads:
        read_as = next((h for h in statement.operands if h.tensor == held.tensor), held)
        shown.append((held.tensor, held, None if read_as.layout == held.layout else read_as))
    if statement.result is not None:
        made = statement.made_as or statement.result
        name = made.tensor
        if any(h.tensor == name for h in statement.reads):
            name = made.name.split("~")[0]
        shown.append((name, made, None if made.layout == statement.result.layout else statement.result))
    return shown


def statement_view(statement: Statement, mesh: Mesh, device: int | None = None,
                   values: dict | None = None, width: int = 100):
    parts = []
    head = Text(f"{statement.number}. ", style="bold")
    if statement.line:
        head.append(f"line {statement.line}  ", style="dim")
    head.append_text(highlight(statement.source))
    if statement.trips > 1:
        head.append(f"  (runs {statement.trips} times)", style="dim")
    if statement.stages is not None:
        head.append(f"  (on stage {', '.join(map(str, statement.stages))} only)", style="dim")
    parts.append(Rule(style="cyan"))
    parts.append(head)

    rows = []  # (name, style, cells): columns aligned by hand, so a narrow page wraps, not crops
    for held in statement.reads:
        read_as = next((h for h in statement.operands if h.tensor == held.tensor), held)
        arrow = "" if read_as.layout == held.layout else f"→ {read_as.text()}"
        rows.append((held.tensor, "bold", [held.text(), arrow, ""]))
    if statement.result is not None:
        result = statement.result
        name = shown_values(statement)[-1][0]
        local = "local " + format_local(result.layout, result.shape, mesh)
        if statement.made_as is not None and statement.made_as.layout != result.layout:
            rows.append((name, "bold green", [statement.made_as.text(), f"→ {result.text()}", local]))
        else:
            rows.append((name, "bold green", [result.text(), local, ""]))
    widths = [max(len(row[0]) for row in rows)] + \
        [max(len(row[2][k]) for row in rows) for k in range(3)]
    layouts = Text()
    for number, (name, style, cells) in enumerate(rows):
        if number:
            layouts.append("\n")
        layouts.append(name.ljust(widths[0]), style)
        layouts.append("  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths[1:])).rstrip())
    parts.append(_labelled("layouts", layouts))
    if statement.rules:
        parts.append(_labelled("rule", Text("\n".join("• " + r for r in statement.rules))))
    if statement.choices:
        parts.append(_labelled("choice", Text("\n".join("• " + c for c in statement.choices))))
    if statement.fused:
        parts.append(_labelled("fused", Text("\n".join("• " + f for f in statement.fused))))
    if statement.movements:
        moves = []
        for movement in statement.movements:
            line = Text(movement.call, style="bold yellow")
            line.append(f"  {format_bytes(movement.bytes_per_device)}/device")
            if movement.bytes_per_device >= 1024:
                line.append(f" ({movement.bytes_per_device:,} B)")
            if movement.time_s is not None:
                line.append(f"  {format_seconds(movement.time_s)} ({movement.how})")
            moves.append(line)
            moves.append(Text(_groups_text(movement.groups), style="dim"))
            moves.append(Padding(Text(movement.sentence), (0, 0, 0, 2)))
        parts.append(_labelled("moves", Group(*moves)))
    else:
        parts.append(_labelled("moves", Text("none: every operand is already where this "
                                             "statement needs it", style="dim")))
    shown = shown_values(statement)
    if shown:  # the grid gets the whole width
        parts.append(Text("devices", style="bold cyan"))
        parts.extend(device_grids(shown, mesh, device, width))
    if values is not None:
        parts.append(_labelled("values", values_view(statement, mesh, values, device)))
    return Group(*parts)


def values_view(statement: Statement, mesh: Mesh, values: dict, device: int | None):
    """The numbers each device holds before the statement (its operands) and after (its result)."""
    table = Table(show_lines=True, header_style="bold", pad_edge=True)
    table.add_column("device")
    before = list(statement.reads)
    after = [statement.result] if statement.result is not None else list(statement.operands)
    for held in before:
        table.add_column(f"{held.tensor} before")
    for held in after:
        table.add_column(f"{held.tensor} after")
    devices = range(mesh.num_devices) if device is None else [device]
    with np.printoptions(precision=3, suppress=True, threshold=32, edgeitems=2, linewidth=60):
        for d in devices:
            cells = [str(values[h.name][d]) for h in before + after]
            table.add_row(f"d{d}", *cells)
    return table


def explanation_view(explanation: Explanation, statements: list[int] | None = None,
                     device: int | None = None, values: dict | None = None, width: int = 100):
    mesh = explanation.mesh
    parts = []
    head = Text(f"{explanation.file}: ", style="bold")
    if explanation.pipeline is not None:
        whole = explanation.pipeline.mesh
        head.append(f"one stage of {whole} ({mesh.num_devices} of its {whole.num_devices} devices)")
    else:
        head.append(f"{mesh} ({mesh.num_devices} devices)" if mesh.axes else "one device")
    if explanation.cluster:
        head.append(f", times on {explanation.cluster}")
    if explanation.objective:
        head.append(f"; plan minimizes {explanation.objective}")
    if device is not None:
        head.append(f", device {device} highlighted")
    parts.append(head)
    if explanation.pipeline is not None:
        parts.append(pipeline_view(explanation.pipeline, mesh, width))
    inputs = Table.grid(padding=(0, 2))
    for _ in range(3):
        inputs.add_column(no_wrap=True)
    for held in explanation.inputs:
        inputs.add_row(Text(held.tensor, style="bold"), held.text(),
                       f"local {format_local(held.layout, held.shape, mesh)}")
    parts.append(_labelled("inputs", inputs))
    for s in explanation.statements:
        if statements is None or s.number in statements:
            parts.append(statement_view(s, mesh, device, values, width))
    total = sum(s.bytes_per_device * s.trips for s in explanation.statements)
    moved = sum(len(s.movements) for s in explanation.statements)
    if statements is None:
        parts.append(Rule(style="cyan"))
        parts.append(Text(f"{moved} move{'' if moved == 1 else 's'}, {format_bytes(total)} sent per device "
                          f"({total:,} bytes)", style="bold"))
    return Group(*parts)


def pipeline_view(view, mesh: Mesh, width: int):
    """Which trips each stage holds, and the schedule as a chart (gantt.gantt_text)."""
    from .gantt import gantt_text
    from .spmd import _ranges

    line = view.timeline
    schedule = line.schedule
    text = Text()
    text.append(f"pipelined over {view.axis}: ", style="bold")
    text.append(f"{schedule.stages} stages of {mesh.num_devices} devices each (the devices below "
                f"are one stage's; every stage runs the layers on its own trips)\n")
    for stage, trips in enumerate(view.stage_trips):
        text.append(f"  stage {stage}: trips {_ranges(trips)}\n")
    text.append("the schedule, a forward taking 1 unit of time and a backward 2 "
                "(`einpar cost --trace` prices it):\n", style="bold")
    text.append(gantt_text(line, width=max(40, min(width, 120) - 4)).rstrip("\n"))
    return Padding(text, (1, 0, 0, 0))


def print_explanation(explanation: Explanation, console: Console, **options) -> None:
    console.print(explanation_view(explanation, width=console.width, **options))


def explanation_json(explanation, numbers: list[int] | None) -> dict:
    """`einpar explain --json`: each statement's layouts, rule and collectives, and its blocks."""
    mesh = explanation.mesh
    statements = []
    for s in explanation.statements:
        if numbers is not None and s.number not in numbers:
            continue
        statements.append({
            "number": s.number, "name": s.name, "line": s.line, "source": s.source, "trips": s.trips,
            "reads": {h.tensor: h.text() for h in s.reads},
            "operands": {h.tensor: h.text() for h in s.operands},
            "result": s.result.text() if s.result else None,
            "rules": s.rules,
            "choices": s.choices,
            "fused": s.fused,
            "collectives": [{"call": m.call, "kind": m.kind, "axes": list(m.axes),
                             "groups": [list(g) for g in m.groups],
                             "bytes_per_device": m.bytes_per_device, "time_s": m.time_s,
                             "why": m.sentence} for m in s.movements],
            "devices": [{name: block_text(held, mesh, d) if moved is None else
                         f"{block_text(held, mesh, d)} -> {block_text(moved, mesh, d)}"
                         for name, held, moved in shown_values(s)} for d in range(mesh.num_devices)],
        })
    document = {"file": explanation.file, "mesh": dict(mesh.axes), "cluster": explanation.cluster,
                "objective": explanation.objective, "statements": statements}
    view = explanation.pipeline
    if view is not None:
        line = view.timeline
        document["pipeline"] = {
            "axis": view.axis, "mesh": dict(view.mesh.axes),
            "stage_trips": [list(trips) for trips in view.stage_trips],
            "schedule": line.schedule.name, "microbatches": line.schedule.microbatches,
            "chunks": line.schedule.chunks, "bubble": line.bubble,
            "slots": [[{"slot": str(item.slot), "start": item.start, "end": item.end}
                       for item in placed] for placed in line.stages]}
        for entry, statement in zip(statements, [s for s in explanation.statements
                                                 if numbers is None or s.number in numbers]):
            entry["stages"] = list(statement.stages) if statement.stages is not None else None
    return document
