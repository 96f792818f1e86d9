"""A step's parts and memory by kind: what `einpar cost` says about a training step.

A training step (einpar.train) is an ordinary program whose values follow a
naming contract: the gradient of param `w` is `w.grad` (partial contributions
`w.grad.1`, ...; an activation `h`'s is `h.grad`), the optimizer's state
inputs are `w.m`, `w.v` and `w.master` (Value.kind "state"), and the update
makes `w.new`, `w.m.new`, `w.v.new`, `w.master.new` (einpar.optimizer). The
program as written before the backward pass is `program.forward`. From
these alone this module says

- which part of the step each step of the per-device program belongs to
  (`step_part`): forward, backward or update;
- what kind of memory each local value is (`memory_kind`), and so the bytes
  of each kind at the peak, where the peak is, and the saved activations;
- the time of each part on the priced timeline, model FLOPs and MFU.

User names never contain dots, so none of this can mistake a user's value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from einpar.expand import expand_library
from einpar.ir import Einsum, Program, Repeat
from einpar.flops import op_flops
from einpar.spmd import CollectiveStep, LocalStep, RepeatStep

from .fusion import FusedStep

PARTS = ("forward", "backward", "update")
KINDS = ("params", "gradients", "optimizer_state", "master", "inputs", "activations",
         "temporaries")
_UPDATE = ("new", "m", "v", "master")  # the second name component of what the update makes


def program_value(local: str) -> str:
    """The program's value a local value holds: `x` for a moved copy `x~1`, a loop's `x~in`."""
    return local.split("~", 1)[0]


def forward_values(program: Program) -> frozenset[str] | None:
    """The names of the forward pass's values (its inputs, its statements' values and the
    temporaries of its library functions once expanded), or None for a forward program."""
    if program.forward is None:
        return None
    return frozenset(program.forward.values) | frozenset(expand_library(program.forward).values)


def _named(value: str, program: Program) -> tuple[str | None, list[str]]:
    """(the param a dotted name belongs to, the components after it): ("w", ["m", "new"])
    for `w.m.new`; (None, components) for any other name."""
    root, _, rest = value.partition(".")
    parts = rest.split(".") if rest else []
    params = {value.name for value in program.params}
    return (root if root in params else None), parts


def step_part(local: str, program: Program, forward: frozenset[str] | None,
              after_backward: bool) -> str:
    """The part of the step that makes the local value `local`.

    - update: what the optimizer makes (`w.new`, `w.m.new`, `w.v.new`, `w.master.new`, and
      their moved copies), by the naming contract above;
    - backward: any value with a `grad` component after its first (`w.grad`, `h.grad.2`,
      `p.exp.grad`), and every value made after the first backward step in the same or an
      enclosing order (`after_backward`) that is not the update's: recomputed activations
      (remat) are part of the backward pass;
    - forward: the forward program's values (`forward`), and everything when the program has
      no backward pass (`forward` None).
    """
    value = program_value(local)
    param, parts = _named(value, program)
    if param is not None and parts and parts[0] in _UPDATE:
        return "update"
    if "grad" in parts or after_backward:
        return "backward"
    if forward is None or value in forward:
        return "forward"
    return "backward"


def memory_kind(local: str, program: Program, forward: frozenset[str] | None,
                part: str | None) -> str:
    """The kind of memory the local value `local` of a per-device program takes.

    By the program's input kinds and the naming contract (module docstring):
    - params: a param's own block (an input of kind "param") and the updated param `w.new`
      (and its copies: the param delivered in its layout);
    - gradients: a param's gradient `w.grad` and its partial contributions `w.grad.1`...;
    - optimizer_state: `w.m`, `w.v` and their updates; master: `w.master` and its update;
    - inputs: the data inputs (kind "input");
    - activations: values of the forward pass (`forward`: the forward program's values;
      every value of a program without a backward pass) made in the forward part, a loop's
      stacks of them (`v.saved`: every trip's `v`, kept for the backward pass), and moved
      copies of data inputs;
    - temporaries: everything else: moved copies of params (a weight all-gathered for an
      op: only the param's own block counts as params), gradients of activations, values
      the backward pass recomputes (made in the `part` "backward") and what the backward
      and the update compute on the way.
    `part` is the part of the step that made `local` (None for an input).
    """
    value = program_value(local)
    copy = value != local
    declared = {v.name: v.kind for v in program.inputs}
    kind = declared.get(value)
    param, parts = _named(value, program)
    if kind == "param":
        return "temporaries" if copy else "params"
    if param is not None and parts:
        if parts[0] == "grad":
            return "gradients"
        if parts[0] in ("m", "v"):
            return "optimizer_state"
        if parts[0] == "master":
            return "master"
        if parts == ["new"]:
            return "params"
    if kind == "input":
        return "activations" if copy else "inputs"
    if kind is not None:  # state not named by the contract
        return "optimizer_state"
    if forward is not None and parts[-1:] == ["saved"] and value.removesuffix(".saved") in forward:
        return "activations"  # a loop's stack of a forward value, every trip's (einpar.grad)
    if "grad" in parts or part in ("backward", "update"):
        return "temporaries"
    if forward is None or value in forward:
        return "activations"
    return "temporaries"


# ---- walking the per-device program


def _step_names(step) -> tuple[str, ...]:
    if isinstance(step, LocalStep):
        return (step.op.result.name,)
    if isinstance(step, FusedStep):
        return step.writes or step.names  # a region whose values nobody reads writes none
    return (step.dst,)


def accumulates(local: str) -> bool:
    """Whether a local value is a micro-batch accumulator (`w.grad.acc`, `l.acc#2`, and its
    mean after the loop, `w.grad.mean`: einpar/microbatch.py): the zeros it starts from are
    made before the forward pass, so they do not start the backward pass."""
    last = program_value(local).split("#")[0].rpartition(".")[2]
    return last in ("acc", "mean")


def step_parts(steps, program: Program, forward, after_backward: bool = False,
               parts: dict | None = None) -> tuple[dict, bool]:
    """The part of every step (by id) and of every local value made, in program order; and
    whether a backward step was seen. A collective that moves an input or a forward value is
    in the part of the step it serves (the value's own when it is moved to be an output); one
    that moves a gradient is in the backward pass."""
    parts = {} if parts is None else parts
    inputs = {value.name for value in program.inputs}
    for step in steps:
        if isinstance(step, RepeatStep):
            _, seen = step_parts(step.body, program, forward, after_backward, parts)
            after_backward = after_backward or seen
            for _, inside, _, after in step.carried:
                parts.setdefault(inside, step_part(inside, program, forward, after_backward))
                parts.setdefault(after, step_part(after, program, forward, after_backward))
            continue
        names = _step_names(step)
        moved = isinstance(step, CollectiveStep)
        # A value moved to be delivered (an output; serves nothing) is in its own part.
        part = step_part(names[-1], program, forward,
                         after_backward and not (moved and not step.serves))
        if moved and step.serves and (
                part == "forward" or program_value(step.dst) in inputs):
            # An input or a forward value is moved for whichever op needs it (a weight
            # gathered again, or an activation, for the backward pass); a gradient's move
            # (its all-reduce or reduce-scatter) stays in the backward pass.
            part = step_part(step.serves, program, forward, after_backward)
        parts[id(step)] = part
        for name in names:
            parts[name] = part
        after_backward = after_backward or (part == "backward" and not accumulates(names[-1]))
    return parts, after_backward


@dataclass
class Memory:
    """Memory per device by kind: at the peak (they sum to it), and the saved activations."""

    peak_bytes: int
    by_kind: dict  # kind -> bytes at the peak
    peak_value: str | None  # the local value made when the peak is reached
    peak_part: str | None
    saved_activations_bytes: int | None  # forward values live when the backward pass starts

    def to_json(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "by_kind": dict(self.by_kind),
                "peak_at": None if self.peak_value is None else
                {"value": self.peak_value, "part": self.peak_part},
                "saved_activations_bytes": self.saved_activations_bytes}


class MemoryWatch:
    """Follows estimate.peak_memory's walk (its `observe`) and keeps what was live at the
    peak and when the backward pass started."""

    def __init__(self, program: Program, spmd, bytes_of):
        self.program, self.spmd, self.bytes_of = program, spmd, bytes_of
        self.forward = forward_values(program)
        self.parts, _ = step_parts(spmd.steps, program, self.forward)
        self.best = -1
        self.at_peak: dict[str, int] = {}
        self.peak_value: str | None = None
        self.saved: int | None = None

    def kind(self, local: str) -> str:
        return memory_kind(local, self.program, self.forward, self.parts.get(local))

    def observe(self, made: tuple[str, ...], live: dict[str, int]) -> None:
        if self.saved is None and self.forward is not None and \
                any(self.parts.get(name) == "backward" and not accumulates(name) for name in made):
            self.saved = sum(size for name, size in live.items() if name not in made
                             and self.kind(name) == "activations")
        total = sum(live.values())
        if total > self.best:
            self.best, self.at_peak = total, dict(live)
            self.peak_value = made[-1] if made else None

    def result(self, peak_bytes: int) -> Memory:
        by_kind = dict.fromkeys(KINDS, 0)
        for name in self.spmd.inputs:
            by_kind[self.kind(name)] += self.bytes_of(name)
        for name, size in self.at_peak.items():
            by_kind[self.kind(name)] += size
        saved = None if self.forward is None else self.saved or 0
        return Memory(peak_bytes, by_kind, self.peak_value,
                      self.parts.get(self.peak_value) if self.peak_value else None, saved)


# ---- time by part, model FLOPs, MFU


@dataclass
class TrainingFigures:
    """The training figures of `einpar cost` (docs/cost.md, "Training steps")."""

    time_s: dict  # part -> seconds; they sum to the step time less the fixed overhead
    model_flops: int  # 3 × the forward program's contraction FLOPs
    forward_flops: int
    params: int  # N: elements of every param
    tokens: int
    token_dims: tuple[str, ...]
    flops_6nt: int  # 6·N·tokens
    mfu: float
    mfu_6nt: float
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        bubble = {"bubble_s": self.time_s["bubble"]} if "bubble" in self.time_s else {}
        return {"forward_s": self.time_s["forward"], "backward_s": self.time_s["backward"],
                "update_s": self.time_s["update"], **bubble, "model_flops": self.model_flops,
                "forward_flops": self.forward_flops, "params": self.params,
                "tokens": self.tokens, "token_dims": list(self.token_dims),
                "flops_6nt": self.flops_6nt, "mfu": self.mfu, "mfu_6nt": self.mfu_6nt}


def contraction_flops(ops, sizes: dict[str, int]) -> int:
    """FLOPs of the einsums of two or more operands in `ops`, each repeat's once per trip."""
    total = 0
    for op in ops:
        if isinstance(op, Repeat):
            total += op.count * contraction_flops(op.body, sizes)
        elif isinstance(op, Einsum) and len(op.operands) >= 2:
            total += op_flops(op, sizes)
    return total


def token_dims(forward: Program) -> tuple[str, ...]:
    """The dims that index some data input of the forward program and no param: a
    language model's batch and sequence (`x[B,S,D]` with `w[D,F]`: B and S)."""
    in_params = {index for value in forward.params for index in value.type.indices}
    dims: list[str] = []
    for value in forward.inputs:
        if value.kind == "input":
            dims += [i for i in value.type.indices if i not in in_params and i not in dims]
    return tuple(dims)


def part_times(priced, parts: dict, end: float) -> dict:
    """Seconds of each part on the laid-out timeline, summing to `end`: each instant goes to
    the part of the compute step running then, or when none runs, of the collective running
    (exposed communication); the trips of a long repeat that were not laid out (the time
    beyond the last run laid out) go to the parts in proportion to their runs not laid out."""
    intervals = []  # (start, end, stream, part)
    unlaid = dict.fromkeys(PARTS, 0.0)

    def collect(items) -> None:
        for step, cost in items:
            if isinstance(step, RepeatStep):
                collect(cost)
                continue
            duration = cost.compute_s or cost.comm_s
            part = parts.get(id(step), "forward")
            intervals.extend((start, start + duration, cost.stream, part) for start in cost.starts)
            unlaid[part] += max(0, cost.trips - len(cost.starts)) * duration
    collect(priced)
    times = dict.fromkeys(PARTS, 0.0)
    bounds = sorted({t for start, stop, _, _ in intervals for t in (start, stop)})
    events: dict[float, list] = {}
    for index, (start, stop, _, _) in enumerate(intervals):
        events.setdefault(start, []).append((1, index))
        events.setdefault(stop, []).append((-1, index))
    active: set[int] = set()
    covered = 0.0
    for left, right in zip(bounds, bounds[1:]):
        for sign, index in events.get(left, ()):
            (active.add if sign > 0 else active.discard)(index)
        running = [intervals[i] for i in active if intervals[i][1] > left]
        ahead = [i for i in running if i[2] == "compute"] or running
        if not ahead:
            continue
        for interval in ahead:
            times[interval[3]] += (right - left) / len(ahead)
        covered += right - left
    rest = max(0.0, end - covered)
    weights = unlaid if sum(unlaid.values()) else times
    total = sum(weights.values())
    for part in PARTS:
        times[part] += rest * weights[part] / total if total else 0.0
    return times


def training_figures(program: Program, priced, parts: dict, end: float, step_time_s: float,
                     peak_flops_per_s: float, devices: int) -> TrainingFigures | None:
    """Time by part, model FLOPs and MFU of a training step (None for a forward program)."""
    forward = program.forward
    if forward is None:
        return None
    forward_flops = contraction_flops(forward.ops, forward.dim_sizes)
    params = sum(value.type.num_elements for value in forward.params)
    dims = token_dims(forward)
    tokens = math.prod(forward.dim_sizes[d] for d in dims)
    available = step_time_s * peak_flops_per_s * devices

    def utilization(flops: int) -> float:
        return flops / available if available else 0.0
    return TrainingFigures(part_times(priced, parts, end), 3 * forward_flops, forward_flops, params,
                    tokens, dims, 6 * params * tokens, utilization(3 * forward_flops),
                    utilization(6 * params * tokens))
