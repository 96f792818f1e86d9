"""`einpar cost` as a reader sees it: the per-op table, the totals and a breakdown bar."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from einpar.units import format_bytes, format_count, format_seconds, significant

from .estimate import Estimate


def breakdown_bar(estimate: Estimate, width: int = 48) -> Text:
    """Where the step goes: compute, exposed communication, fixed overhead."""
    total = estimate.step_time_s or 1.0
    parts = [("compute", min(estimate.compute_s, total), "green"),
             ("exposed comm", estimate.exposed_comm_s, "red"),
             ("overhead", estimate.cluster.step_overhead_s, "yellow")]
    bar = Text()
    used = 0
    for index, (_, seconds, style) in enumerate(parts):
        cells = round(width * seconds / total) if index < len(parts) - 1 else width - used
        cells = max(0, min(cells, width - used))
        bar.append("█" * cells, style=style)
        used += cells
    legend = "  ".join(f"{name} {100 * seconds / total:.0f}%" for name, seconds, _ in parts if seconds)
    return bar + Text("  " + legend)


def print_estimate(estimate: Estimate, out: Console) -> None:
    if not out.is_terminal and out.width < 132:  # a file or a pipe: room for the whole table
        out = Console(file=out.file, width=132, highlight=False, markup=False, soft_wrap=True,
                      color_system=out.color_system, force_terminal=False)
    cluster = estimate.cluster
    out.print(Text(f"{estimate.file} on {cluster.describe()}", style="bold"))
    mode = "communication overlaps independent compute" if estimate.overlap else "no overlap"
    if estimate.collective_matmul:
        mode += "; gathers and reduce-scatters overlap their matmuls (collective matmul)"
    if estimate.overlap_grad_reduce:
        mode += "; gradient reductions overlap the last backward pass"
    who = "one device" if estimate.devices == 1 else \
        f"{estimate.devices} devices; every device runs the same program"
    fused = "; no fusion" if estimate.fusion == "none" else ""
    out.print(f"{who} ({mode}; f32 matmuls at {estimate.precision} precision{fused})")
    repeats = any(op.trips > 1 for op in estimate.ops)
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    columns = ["#", "value", "op"] + (["×"] if repeats else []) + ["FLOPs", "bytes", "time", "bound",
                                                                   "how"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("#", "×", "FLOPs", "bytes", "time")
                         else "left", no_wrap=True, overflow="ellipsis",
                         max_width=36 if column == "op" else None)
    for op in estimate.ops:
        compute = op.stream == "compute"
        cells = [str(op.index), op.name, op.what] + ([str(op.trips)] if repeats else []) + [
            format_count(op.flops) if compute else "",
            format_bytes(op.hbm_bytes if compute else op.comm_bytes),
            format_seconds(op.compute_s if compute else op.comm_s), op.bound,
            "" if compute else op.detail]
        table.add_row(*(Text(cell) for cell in cells), style=None if compute else "cyan")
    out.print(table)
    out.print("bytes: HBM traffic of a local op; bytes each device sends for a collective", style="dim")
    if any(op.region for op in estimate.ops):
        out.print("fused(...), flash_attention(...): steps run as one kernel; bytes are what it "
                  "reads and writes, its intermediates stay on chip", style="dim")
    for op in estimate.ops:
        if op.recomputed:
            again = ", ".join(member.split(" = ")[0] for member in op.recomputed)
            out.print(f"{op.index}: the attention backward recomputes {again} from the forward's "
                      f"inputs and row statistics (flash attention keeps no S×T value); its "
                      f"FLOPs count them", style="dim")
    out.print()
    out.print(f"step time      {format_seconds(estimate.step_time_s)}")
    out.print(f"  compute      {format_seconds(estimate.compute_s)}")
    out.print(f"  comm         {format_seconds(estimate.comm_s)}, exposed "
              f"{format_seconds(estimate.exposed_comm_s)}")
    if cluster.step_overhead_s:
        out.print(f"  overhead     {format_seconds(cluster.step_overhead_s)} per step (calibrated)")
    out.print(breakdown_bar(estimate))
    out.print(f"FLOPs          {format_count(estimate.flops_per_device)} per device; "
              f"{format_count(estimate.model_flops)} in the unsharded program, "
              f"{format_count(estimate.flops_per_device * estimate.devices)} on all devices")
    out.print(f"achieved       {format_count(estimate.achieved_flops_per_s)}FLOP/s per device, "
              f"{significant(100 * estimate.fraction_of_peak, 2)}% of peak")
    out.print(f"sent           {format_bytes(estimate.bytes_per_device)} per device")
    capacity = cluster.chip.hbm_capacity.value
    fits = Text("fits", style="green") if estimate.fits else Text("DOES NOT FIT", style="bold red")
    out.print(Text(f"memory         {format_bytes(estimate.peak_memory_bytes)} peak per device "
                   f"({format_bytes(estimate.input_bytes)} inputs and params) of "
                   f"{format_bytes(capacity)}: ") + fits)
    print_memory_and_training(estimate, out)
    for note in estimate.notes:
        out.print(Text(f"note: {note}", style="yellow"))


KIND_NAMES = {"params": "params", "gradients": "gradients", "optimizer_state": "optimizer state",
              "master": "master copies", "inputs": "inputs", "activations": "activations",
              "temporaries": "temporaries"}


def print_memory_and_training(estimate: Estimate, out: Console) -> None:
    """Memory by kind at the peak, and a training step's parts, model FLOPs and MFU."""
    memory = estimate.memory
    if memory is not None:
        kinds = ", ".join(f"{KIND_NAMES[kind]} {format_bytes(size)}"
                          for kind, size in memory.by_kind.items() if size)
        part = f" ({memory.peak_part})" if estimate.training is not None else ""
        where = f"; at {memory.peak_value}{part}" if memory.peak_value else ""
        out.print(f"  at the peak  {kinds or 'nothing'}{where}", markup=False)
        if memory.saved_activations_bytes is not None:
            out.print(f"  saved activations {format_bytes(memory.saved_activations_bytes)} "
                      "live when the backward pass starts", markup=False)
    training = estimate.training
    if training is None:
        return
    parts = ", ".join(f"{part} {format_seconds(seconds)}" for part, seconds in training.time_s.items())
    out.print(f"training       {parts}", markup=False)
    tokens = "·".join(training.token_dims) or "1"
    out.print(f"model FLOPs    {format_count(training.model_flops)} (3 × the forward's "
              f"{format_count(training.forward_flops)} of contractions), MFU "
              f"{significant(100 * training.mfu, 2)}%; 6·N·tokens "
              f"{format_count(training.flops_6nt)} (N {format_count(training.params)} params, "
              f"{format_count(training.tokens)} tokens {tokens}), MFU "
              f"{significant(100 * training.mfu_6nt, 2)}%", markup=False)
