"""Pipeline schedules: the order in which each stage runs its micro-batches' work.

A schedule is data, not code: for each stage (a coordinate of the pipeline
axis), the ordered list of its slots, each a micro-batch's forward (F) or
backward (B) pass through one chunk of the layers the stage holds. The
backends run the slots in this order, and `timeline` lays the same list out
in time, so the bubble and the activations in flight come from one source.

The L trips of a `repeat L@pp` are cut into p·v chunks of L/(p·v) trips
("virtual stages"): chunk j runs on stage j mod p, as its local chunk j div p.
With v = 1 stage k holds trips k·L/p ... (k+1)·L/p − 1; interleaved (v > 1),
stage k holds v chunks that are not adjacent.

- gpipe (Huang et al., "GPipe", NeurIPS 2019): every forward, then every
  backward; each stage keeps all m micro-batches' activations.
- 1f1b (PipeDream-Flush; Narayanan et al., "Memory-Efficient Pipeline-Parallel
  DNN Training", ICML 2021): stage k runs p − k − 1 forwards, then one forward
  and one backward in turn, then the backwards left; at most p − k
  micro-batches in flight. Its bubble is GPipe's: (p − 1)/(m + p − 1) of the
  step with uniform stages.
- interleaved (Narayanan et al., "Efficient Large-Scale Language Model
  Training on GPU Clusters Using Megatron-LM", SC 2021, section 2.2.2): v
  chunks per stage, forwards in groups of p micro-batches per chunk; the
  bubble shrinks to (p − 1)/(v·m + p − 1) at the price of v times as many
  stage-to-stage transfers and more activations in flight. Like Megatron-LM
  it needs m to be a multiple of p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b", "interleaved")
FORWARD, BACKWARD = "F", "B"


class ScheduleError(ValueError):
    """A schedule that cannot be built for these stages and micro-batches (the message says
    why, in words the checker puts in a diagnostic)."""


class Slot(NamedTuple):
    """One unit of a stage's work: micro-batch `microbatch`'s forward or backward pass
    through the stage's local chunk `chunk` (0 unless interleaved). A tuple: a schedule of
    many stages and micro-batches has ~10^5 of them."""

    microbatch: int
    kind: str  # FORWARD or BACKWARD
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


@dataclass(frozen=True)
class Schedule:
    name: str
    stages: int  # p
    microbatches: int  # m
    chunks: int  # v: chunks of layers per stage
    slots: tuple[tuple[Slot, ...], ...]  # per stage, in the order it runs them


def schedule_problem(name: str, stages: int, microbatches: int, chunks: int = 1) -> str | None:
    """Why the schedule `name` cannot be built for p = `stages`, m = `microbatches` and
    v = `chunks`, in words a diagnostic quotes; None if it can. Arithmetic only: a checker
    asks this of any sizes, before anything the size of m·v·p is built."""
    p, m, v = stages, microbatches, chunks
    if p < 1 or m < 1 or v < 1:
        return "stages, micro-batches and chunks must be at least 1"
    if name not in SCHEDULES:
        return f"unknown schedule '{name}' (one of {', '.join(SCHEDULES)})"
    if name != "interleaved" and v != 1:
        return f"only the interleaved schedule has several chunks per stage (v={v} with {name})"
    if name == "1f1b" and m < p:
        return (f"1f1b needs at least as many micro-batches as stages "
                f"({_count(m, 'micro-batch')} for {p} stages)")
    if name == "interleaved" and m % p:
        return (f"the interleaved schedule needs a multiple of the {p} stages as micro-batches "
                f"({_count(m, 'micro-batch')})")
    return None


def make_schedule(name: str, stages: int, microbatches: int, chunks: int = 1) -> Schedule:
    """The schedule `name` ("gpipe", "1f1b" or "interleaved") for p = `stages`, m =
    `microbatches` and v = `chunks` (interleaved only): 2·m·v slots on each of p stages."""
    problem = schedule_problem(name, stages, microbatches, chunks)
    if problem is not None:
        raise ScheduleError(problem)
    p, m, v = stages, microbatches, chunks
    if name == "gpipe":
        slots = [tuple(Slot(i, FORWARD) for i in range(m)) + tuple(Slot(i, BACKWARD) for i in range(m))
                 for _ in range(p)]
    elif name == "1f1b":
        slots = [_one_forward_one_backward([Slot(i, FORWARD) for i in range(m)],
                                           [Slot(i, BACKWARD) for i in range(m)], p - k - 1)
                 for k in range(p)]
    else:
        slots = [_interleaved(p, m, v, k) for k in range(p)]
    return Schedule(name, p, m, v, tuple(slots))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("ch") else f"{n} {noun}s"


def _one_forward_one_backward(forwards: list[Slot], backwards: list[Slot], warmup: int) -> tuple:
    """`warmup` forwards, then a forward and a backward in turn, then the backwards left."""
    warmup = min(warmup, len(forwards))
    order = forwards[:warmup]
    for k in range(len(forwards) - warmup):
        order += [forwards[warmup + k], backwards[k]]
    return tuple(order + backwards[len(forwards) - warmup:])


def _interleaved(p: int, m: int, v: int, stage: int) -> tuple[Slot, ...]:
    """Megatron-LM's interleaved 1F1B order for one stage: its k-th forward is micro-batch
    (k div p·v)·p + k mod p through chunk (k div p) mod v; its backwards go through the
    chunks in reverse. Warm-up: 2·(p − stage − 1) + (v − 1)·p forwards (all of them when
    m = p)."""
    total = m * v

    def work(k: int, kind: str) -> Slot:
        group = k // p % v
        chunk = group if kind == FORWARD else v - 1 - group
        return Slot(k // (p * v) * p + k % p, kind, chunk)

    warmup = total if m == p else min(2 * (p - stage - 1) + (v - 1) * p, total)
    return _one_forward_one_backward([work(k, FORWARD) for k in range(total)],
                                     [work(k, BACKWARD) for k in range(total)], warmup)


# ---- the timeline

class Placed(NamedTuple):  # a tuple: a timeline of 16,384 devices places ~10^5 of them
    slot: Slot
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    schedule: Schedule
    stages: tuple[tuple[Placed, ...], ...]  # per stage, its slots in time
    transfers: tuple[tuple[int, int, float, float], ...]  # (from stage, to stage, start, end)
    makespan: float
    busy: tuple[float, ...]  # per stage, the time it computes

    @property
    def bubble(self) -> float:
        """The fraction of the stages' time spent idle before the last slot ends."""
        if self.makespan <= 0:
            return 0.0
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)

    def in_flight(self) -> tuple[int, ...]:
        """Per stage, the most chunk-activations it holds at once (a forward keeps its
        activations until its backward has run)."""
        peaks = []
        for placed in self.stages:
            held = peak = 0
            for item in placed:
                held += 1 if item.slot.kind == FORWARD else -1
                peak = max(peak, held)
            peaks.append(peak)
        return tuple(peaks)


def timeline(schedule: Schedule, forward: float, backward: float, transfer: float = 0.0,
             stage_times=None) -> Timeline:
    """The schedule laid out in time: each stage runs its slots in order, a slot starting
    once the stage is free and its input has arrived (a forward: the previous virtual
    stage's forward of the micro-batch, plus `transfer` when that ran on another stage; a
    backward: the next virtual stage's backward, or the micro-batch's own last forward).
    `forward` and `backward` are one chunk's times; `stage_times(stage, chunk)` may give
    (forward, backward) per chunk instead. ScheduleError if the order deadlocks."""
    p, v = schedule.stages, schedule.chunks
    last = p * v - 1

    def times(stage: int, chunk: int) -> tuple[float, float]:
        return stage_times(stage, chunk) if stage_times is not None else (forward, backward)

    # Each stage runs its slots in order; a stage whose next slot waits for work not run yet
    # sleeps until that work is done (so each slot is looked at about twice, whatever p).
    done: dict[tuple[int, str, int], tuple[float, int]] = {}  # (mb, kind, virtual) -> end, stage
    waiting: dict[tuple[int, str, int], int] = {}  # the work a sleeping stage waits for
    cursor = [0] * p
    free = [0.0] * p
    placed: list[list[Placed]] = [[] for _ in range(p)]
    transfers = []
    awake = list(range(p - 1, -1, -1))
    while awake:
        stage = awake.pop()
        slots = schedule.slots[stage]
        while cursor[stage] < len(slots):
            slot = slots[cursor[stage]]
            virtual = slot.chunk * p + stage
            if slot.kind == FORWARD:
                source = None if virtual == 0 else (slot.microbatch, FORWARD, virtual - 1)
            else:
                source = (slot.microbatch, FORWARD, virtual) if virtual == last else \
                    (slot.microbatch, BACKWARD, virtual + 1)
            ready = 0.0
            if source is not None:
                found = done.get(source)
                if found is None:
                    waiting[source] = stage
                    break
                ready, origin = found
                if origin != stage:
                    transfers.append((origin, stage, ready, ready + transfer))
                    ready += transfer
            start = max(free[stage], ready)
            free[stage] = start + times(stage, slot.chunk)[0 if slot.kind == FORWARD else 1]
            key = (slot.microbatch, slot.kind, virtual)
            done[key] = (free[stage], stage)
            placed[stage].append(Placed(slot, start, free[stage]))
            cursor[stage] += 1
            sleeper = waiting.pop(key, None)
            if sleeper is not None:
                awake.append(sleeper)
    if any(cursor[k] < len(schedule.slots[k]) for k in range(p)):
        stuck = ", ".join(f"stage {k}: {schedule.slots[k][cursor[k]]}" for k in range(p)
                          if cursor[k] < len(schedule.slots[k]))
        raise ScheduleError(f"the schedule deadlocks ({stuck} wait for work never run)")
    makespan = max(free, default=0.0)
    busy = tuple(sum(item.end - item.start for item in stage) for stage in placed)
    return Timeline(schedule, tuple(tuple(stage) for stage in placed), tuple(transfers),
                    makespan, busy)


def bubble_formula(name: str, stages: int, microbatches: int, chunks: int = 1) -> float:
    """The closed form of the bubble fraction with uniform stages and free transfers:
    (p − 1)/(m + p − 1) for gpipe and 1f1b, (p − 1)/(v·m + p − 1) interleaved
    (Narayanan et al. 2021, section 2.2)."""
    p, m, v = stages, microbatches, chunks if name == "interleaved" else 1
    return (p - 1) / (v * m + p - 1)


def in_flight_formula(name: str, stages: int, microbatches: int, chunks: int = 1) -> tuple[int, ...]:
    """Per stage, the chunk-activations each schedule holds at its peak: gpipe all m;
    1f1b p − k on stage k; interleaved its warm-up forwards plus one,
    2·(p − k − 1) + (v − 1)·p + 1 (all m·v when m = p)."""
    p, m, v = stages, microbatches, chunks
    if name == "gpipe":
        return (m,) * p
    if name == "1f1b":
        return tuple(min(p - k, m) for k in range(p))
    return tuple(m * v if m == p else min(2 * (p - k - 1) + (v - 1) * p + 1, m * v)
                 for k in range(p))


__all__ = ["SCHEDULES", "Schedule", "ScheduleError", "Slot", "Timeline", "Placed",
           "make_schedule", "schedule_problem", "timeline", "bubble_formula", "in_flight_formula"]
