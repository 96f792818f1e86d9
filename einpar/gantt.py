"""A pipeline timeline drawn as a Gantt chart: one row per stage, time across.

`gantt_svg` writes an SVG picture (forwards and backwards in two colours,
each slot numbered with its micro-batch, the idle time, the bubble, left
blank); `gantt_text` draws the same in characters for a terminal. Both read
only a `schedule.Timeline`, so what they show is what the cost model priced.
"""

from __future__ import annotations

from xml.sax.saxutils import escape

from .schedule import FORWARD, Timeline

ROW, GAP, LEFT, TOP, WIDTH = 30, 6, 70, 44, 960
COLOURS = {FORWARD: "#9ecae1", "B": "#fdae6b"}  # forward light blue, backward orange


def title_of(line: Timeline) -> str:
    schedule = line.schedule
    chunks = f", v={schedule.chunks}" if schedule.chunks > 1 else ""
    return (f"{schedule.name}: {schedule.stages} stages, {schedule.microbatches} micro-batches"
            f"{chunks}; bubble {line.bubble:.1%}")


def gantt_svg(line: Timeline, title: str | None = None) -> str:
    """The timeline as a standalone SVG document."""
    stages = len(line.stages)
    scale = (WIDTH - LEFT - 10) / line.makespan if line.makespan > 0 else 0.0
    height = TOP + stages * (ROW + GAP) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="{LEFT}" y="20" font-size="14">{escape(title or title_of(line))}</text>']
    for stage, placed in enumerate(line.stages):
        y = TOP + stage * (ROW + GAP)
        out.append(f'<text x="4" y="{y + ROW * 0.65:.1f}">stage {stage}</text>')
        out.append(f'<rect x="{LEFT}" y="{y}" width="{line.makespan * scale:.2f}" height="{ROW}" '
                   f'fill="#f0f0f0"/>')  # idle time shows through
        for item in placed:
            x, w = LEFT + item.start * scale, (item.end - item.start) * scale
            label = str(item.slot.microbatch) + (f".{item.slot.chunk}" if item.slot.chunk else "")
            out.append(f'<rect x="{x:.2f}" y="{y}" width="{w:.2f}" height="{ROW}" '
                       f'fill="{COLOURS[item.slot.kind]}" stroke="#555" stroke-width="0.5">'
                       f'<title>{item.slot.kind} micro-batch {label}: '
                       f'{item.start:.4g} to {item.end:.4g}</title></rect>')
            if w >= 7 * len(label):
                out.append(f'<text x="{x + w / 2:.2f}" y="{y + ROW * 0.65:.1f}" '
                           f'text-anchor="middle">{label}</text>')
    y = TOP + stages * (ROW + GAP) + 14
    legend = [("forward", COLOURS[FORWARD]), ("backward", COLOURS["B"]), ("idle", "#f0f0f0")]
    for k, (name, colour) in enumerate(legend):
        out.append(f'<rect x="{LEFT + 110 * k}" y="{y - 10}" width="12" height="12" fill="{colour}" '
                   f'stroke="#555" stroke-width="0.5"/>')
        out.append(f'<text x="{LEFT + 110 * k + 16}" y="{y}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def gantt_text(line: Timeline, width: int = 72) -> str:
    """The timeline in characters: a forward of micro-batch 3 reads `3───`, a backward
    `3═══`, idle time `·`; with several chunks per stage the chunk follows as a letter
    (`3b` is micro-batch 3 through the stage's second chunk)."""
    scale = width / line.makespan if line.makespan > 0 else 0.0
    rows = [title_of(line)]
    for stage, placed in enumerate(line.stages):
        cells = ["·"] * width
        for item in placed:
            start = min(round(item.start * scale), width - 1)
            end = min(max(round(item.end * scale), start + 1), width)
            label = str(item.slot.microbatch)
            if line.schedule.chunks > 1:
                label += "abcdefghijklmnopqrstuvwxyz"[item.slot.chunk % 26]
            fill = "─" if item.slot.kind == FORWARD else "═"
            text = (label + fill * width)[:end - start]
            cells[start:end] = list(text)
        rows.append(f"stage {stage:<3}│" + "".join(cells) + "│")
    return "\n".join(rows)
