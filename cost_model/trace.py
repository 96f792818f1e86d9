"""The estimate's timeline as a Chrome trace-event file (opens in ui.perfetto.dev and chrome://tracing).

One process (a device: every device runs the same program), two threads:
compute and communication. Each run of each step the estimate laid out is a
complete event ("ph": "X") with its start and duration in microseconds, as
the Trace Event Format specifies; its args carry FLOPs, bytes and the bound.
A fused region is one event; its args list the steps it runs.
A repeat of many trips shows the first few (the process's name and
otherData.notes say so). A pipeline adds one process per stage: its slots in
the schedule's timeline, and what it sends to other stages.
"""

from __future__ import annotations

import json

from .estimate import Estimate

COMPUTE_TRACK, COMM_TRACK = 1, 2


def pipeline_events(estimate: Estimate) -> list:
    """A pipeline's timeline: one process per stage, its slots on a `compute` thread (a
    micro-batch's forward or backward through a chunk, named F3 or B3.1 as in the schedule)
    and what it sends to another stage on a `to other stages` thread."""
    figures = estimate.pipeline
    laid, start = figures.timeline, figures.start_s
    events = []
    for stage, placed in enumerate(laid.stages):
        pid = stage + 1
        events += [
            {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": f"stage {stage}"}},
            {"ph": "M", "pid": pid, "tid": COMPUTE_TRACK, "name": "thread_name", "args": {"name": "compute"}},
            {"ph": "M", "pid": pid, "tid": COMM_TRACK, "name": "thread_name",
             "args": {"name": "to other stages"}}]
        for item in placed:
            slot = item.slot
            events.append({"ph": "X", "pid": pid, "tid": COMPUTE_TRACK, "name": str(slot),
                           "cat": "forward" if slot.kind == "F" else "backward",
                           "ts": (start + item.start) * 1e6, "dur": (item.end - item.start) * 1e6,
                           "args": {"microbatch": slot.microbatch, "chunk": slot.chunk}})
        last = start + (placed[-1].end if placed else 0.0)
        if figures.stage_end_s[stage] > last:
            events.append({"ph": "X", "pid": pid, "tid": COMPUTE_TRACK, "name": "after the last slot",
                           "cat": "update", "ts": last * 1e6,
                           "dur": (figures.stage_end_s[stage] - last) * 1e6, "args": {}})
    for source, target, begin, end in laid.transfers:
        events.append({"ph": "X", "pid": source + 1, "tid": COMM_TRACK, "name": f"to stage {target}",
                       "cat": "communication", "ts": (start + begin) * 1e6,
                       "dur": (end - begin) * 1e6, "args": {}})
    return events


def trace_events(estimate: Estimate) -> dict:
    # A repeat of many trips is laid out for its first few (estimate.py): the trace shows
    # those, so its size does not grow with the trip count, and says so.
    partial = any(len(op.starts) < op.trips for op in estimate.ops)
    shown = "; a long repeat shows its first trips only (see otherData.notes)" if partial else ""
    events = [
        {"ph": "M", "pid": 0, "name": "process_name",
         "args": {"name": f"{estimate.file} on {estimate.cluster.name}: one device of "
                          f"{estimate.devices} (all run the same program){shown}"}},
        {"ph": "M", "pid": 0, "tid": COMPUTE_TRACK, "name": "thread_name", "args": {"name": "compute"}},
        {"ph": "M", "pid": 0, "tid": COMM_TRACK, "name": "thread_name",
         "args": {"name": "communication"}},
    ]
    for op in estimate.ops:
        compute = op.stream == "compute"
        duration = op.compute_s if compute else op.comm_s
        args = {"bound": op.bound, "detail": op.detail}
        if op.region:  # a fused region: one slice, its steps listed
            args.update(region=op.region, members=list(op.members))
            if op.recomputed:
                args.update(recomputed=list(op.recomputed))
        args.update({"flops": op.flops, "hbm_bytes": op.hbm_bytes} if compute else
                    {"bytes_per_device": op.comm_bytes})
        for trip, start in enumerate(op.starts):
            events.append({
                "ph": "X", "pid": 0, "tid": COMPUTE_TRACK if compute else COMM_TRACK,
                "name": f"{op.name} = {op.what}", "cat": "compute" if compute else "communication",
                "ts": start * 1e6, "dur": duration * 1e6,
                "args": dict(args, trip=trip) if op.trips > 1 else args})
    if estimate.pipeline is not None:
        events[0]["args"]["name"] = (f"{estimate.file} on {estimate.cluster.name}: the steps of "
                                     f"stage {estimate.pipeline.critical}, the stage that ends "
                                     f"last, each piece from its own start{shown}")
        events += pipeline_events(estimate)
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"step_time_s": estimate.step_time_s, "cluster": estimate.cluster.name,
                          "notes": estimate.notes}}


def write_trace(estimate: Estimate, path) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump(trace_events(estimate), out)
