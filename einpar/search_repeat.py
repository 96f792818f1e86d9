"""The search's part for `repeat`: the layouts a loop's carried, stacked and saved values
may take, each choice priced by solving the body once (a mixin of einpar/search.py's
Search, which says how the whole search goes)."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from .errors import EinparError
from .ir import Map, Repeat
from .layout import Layout
from .solve import Choice

if TYPE_CHECKING:
    from .search import _Level


class RepeatSearch:

    def repeat_choices(self, op: Repeat, level: _Level) -> list:
        """One choice per layout the carried values may cross the loop in, the stacked
        views of values made before it may be sliced in and the saved values may be kept
        in, each priced by solving the body once (all trips). A choice's label is (carried
        layouts, per-trip layouts of the stacked views (None for an input's), per-trip
        layouts of the saved values (None: as the body holds them, made whole)).

        Each candidate is a solve of the body, so those cheaper only at tiny,
        latency-bound sizes (one move of a whole stack before the loop against a move
        per trip) are tried only where the others cannot run: carried values that are
        all pinned cross in their pins (any other layout is a move away at the start of
        the next trip), stacked views made before the loop are sliced in the layouts
        they are made in, and saved values that all have a layout asked of them are
        kept in it (a partial sum is reduce-scattered straight into it, where whole it
        would be all-reduced and sliced)."""
        carried, carried_first = self.carried_candidates(op, level)
        saved = self.saved_candidates(op, level)
        saved_first = saved[:1] if saved and all(t is not None for t in saved[0]) else saved
        stacked, stacked_first = self.stacked_candidates(op, level)
        first = list(itertools.product(carried_first, stacked_first, saved_first))
        choices = self.loop_choices(op, level, first)
        if not choices:
            rest = [c for c in itertools.product(carried, stacked, saved) if c not in first]
            choices = self.loop_choices(op, level, rest)
        if not choices:
            if id(op) in self._body_errors:
                raise self._body_errors[id(op)]
            self.no_strategy(op)
        return choices

    def loop_choices(self, op: Repeat, level: _Level, candidates) -> list:
        choices = []
        for layouts, views, targets in candidates:
            body = self.body_plan(op, layouts, views, targets, level)
            if body is None:
                continue
            plan, outer, _, saved = body
            needs = tuple((c.value, self.key(layout)) for c, layout in zip(op.carried, layouts)) + \
                tuple((value, self.key(layout)) for value, layout in outer.items())
            stacks = tuple((s.result.name, self.key(_stacked(layout))) for s, layout in zip(op.saved, saved))
            makes = tuple((c.result.name, self.key(layout))
                          for c, layout in zip(op.carried, layouts)) + stacks
            memory = sum(self.layout_bytes(name, layout) for name, layout in stacks)
            choices.append(((layouts, views, targets),
                             Choice(plan.price * op.count + self.stage_transfers(op, layouts),
                                    needs, makes, memory)))
        return choices

    def stage_transfers(self, op: Repeat, layouts) -> float:
        """What a pipelined loop's carried values cost to send between stages: once per
        chunk a stage runs (one stage's program is partitioned, einpar/pipeline.py; the
        objective prices on the whole mesh, where the stage axis has its size)."""
        axis = op.stage_axis
        if axis is None or axis not in self.objective.mesh.names or self.objective.mesh.size(axis) == 1:
            return 0.0
        training = (self.program.forward or self.program).training
        chunks = training.schedule[1] if training is not None and training.schedule else 1
        sent = sum(self.layout_bytes(c.value, layout) for c, layout in zip(op.carried, layouts))
        return chunks * self.objective.transfer(axis, sent)

    def carried_candidates(self, op: Repeat, level: _Level) -> tuple[list, list]:
        """The layouts a loop's carried values may have: the pin of the body's last
        statement for it, else the layout it enters in if that is fixed (an input), made
        whole; and all whole. Then those tried first: only the pins where every carried
        value has one."""
        body_pins = {inner.result.name: inner.result.layout for inner in op.body
                     if not isinstance(inner, Repeat)}
        preferred = []
        for carried in op.carried:
            rank = self.vtype(carried.value).rank
            pin = body_pins.get(carried.body_result)
            if pin is not None:  # a partial pin crosses partial (a sum accumulated by trips)
                preferred.append(Layout(pin.dims, pin.partial))
            elif carried.value in level.fixed:
                preferred.append(Layout(level.fixed[carried.value].dims))
            else:
                preferred.append(Layout.replicated(rank))
        whole = tuple(Layout.replicated(self.vtype(c.value).rank) for c in op.carried)
        candidates = list(dict.fromkeys([tuple(preferred), whole] + self.mirrored(op, level)))
        pinned = all(body_pins.get(c.body_result) is not None for c in op.carried)
        return candidates, candidates[:1] if pinned else candidates

    def mirrored(self, op: Repeat, level: _Level) -> list[tuple]:
        """For a backward loop, the layouts its forward loop's carried values are first
        tried in (a gradient crosses trips as its activation does: split over the batch, it
        crosses stages and trips in a micro-batch's share)."""
        if not op.reverse:
            return []
        for forward in level.ops:
            if not isinstance(forward, Repeat) or forward.reverse or forward.dim != op.dim or \
                    len(forward.carried) != len(op.carried) or any(
                        self.vtype(mine.value).shape != self.vtype(theirs.value).shape
                        for mine, theirs in zip(op.carried, forward.carried)):
                continue
            preferred = self.carried_candidates(forward, level)[0][0]
            return [tuple(Layout(layout.dims) for layout in preferred)]
        return []

    def stacked_candidates(self, op: Repeat, level: _Level) -> tuple[list, list]:
        """The per-trip layouts a loop's stacked views may have: None for an input's (it is
        sliced where it lives); for a value made before the loop, each layout its maker may
        make it in whose stacked dims are whole (the i-th of every view together), and all
        whole. Then those tried first: the layouts they are made in, where every view has
        one (a slice read whole is moved inside the body instead, a trip at a time)."""
        options, first = [], []
        for view in op.stacked:
            if self.values[view.name].kind != "def":
                options.append([None])
                first.append([None])
                continue
            depth = self.vtype(view.name).rank - view.type.rank
            made = [Layout(layout.dims[depth:]) for layout in self.made_layouts(view.name, level)
                    if not layout.partial and not any(layout.dims[:depth])]
            options.append(list(dict.fromkeys(made + [Layout.replicated(view.type.rank)])))
            first.append(made)
        def together(per_view):
            count = max((len(layouts) for layouts in per_view), default=1)
            return list(dict.fromkeys(tuple(layouts[min(i, len(layouts) - 1)] for layouts in per_view)
                                      for i in range(count)))
        every = together(options)
        return every, (together(first) if all(first) else every)

    def saved_candidates(self, op: Repeat, level: _Level) -> list[tuple]:
        """The per-trip layouts a loop's saved values may be kept in: as the body holds them
        at the end of a trip (None: made whole where partial), and the layout asked of the
        stack at this level (an output's; a param's gradient in the param's layout), the
        repeat dim whole, for a value a statement of the body makes (so that a partial sum
        is reduce-scattered into it each trip)."""
        made = {inner.result.name for inner in op.body if not isinstance(inner, Repeat)}
        made -= {c.body_result for c in op.carried}
        asked = []
        for saved in op.saved:
            want = level.required.get(saved.result.name)
            usable = want is not None and not want.partial and not want.dims[0] \
                and saved.body_value in made
            if usable:
                asked.append(Layout(want.dims[1:]))
            else:
                asked.append(self.accumulated_in(saved, level) if saved.body_value in made else None)
        return list(dict.fromkeys([tuple(asked), (None,) * len(op.saved)]))

    def accumulated_in(self, saved, level: _Level) -> Layout | None:
        """The per-trip layout of a stack that an elementwise statement adds into a value
        pinned partial (a micro-batch accumulator of a stacked param's gradient): that pin,
        so each trip leaves its slice a partial sum, reduced once after the last
        micro-batch, not every trip."""
        reader = level.first_reader(saved.result.name)
        if reader is None:
            return None
        pin = self.pin(reader) if reader.result.layout is not None else None
        if pin is None or not pin.partial or pin.dims[0] or not isinstance(reader, Map) or \
                any(o.indices != reader.result.type.indices for o in reader.operands):
            return None
        return Layout(pin.dims[1:], pin.partial)

    def made_layouts(self, value: str, level: _Level) -> list[Layout]:
        """The layouts `value` may be made in at `level`: where it is fixed, its layout;
        a statement's pin; a repeat's saved result, as each of the loop's choices makes it."""
        if value in level.fixed:
            return [level.fixed[value]]
        for op in level.ops:
            if isinstance(op, Repeat):
                if value in _repeat_results(op):
                    return [layout for _, choice in self.repeat_choices(op, level)
                            for name, layout in choice.makes if name == value]
            elif op.result.name == value:
                return [self.pin(op)] if op.result.layout is not None else []
        return []

    def body_plan(self, op: Repeat, layouts: tuple[Layout, ...], views: tuple, targets: tuple,
                  parent: _Level):
        """(the body's plan, outer values it reads and the layout it reads them in, the body
        level, the per-trip layout of each saved value), or None where the body cannot run
        with these carried layouts, stacked views and saved layouts."""
        key = (id(op), layouts, views, targets)
        if key in self._bodies:
            return self._bodies[key]
        fixed: dict[str, Layout] = {}
        types = dict(self.types)
        for carried, layout in zip(op.carried, layouts):
            fixed[carried.value] = layout
        outer: dict[str, Layout] = {}
        for view, layout in zip(op.stacked, views):
            depth = self.vtype(view.name).rank - view.type.rank
            if layout is None:
                # An input (or an enclosing block's slice of it) is sliced where it lives.
                source = self.values[view.name]
                full = parent.fixed.get(view.name) or source.layout or \
                    Layout.replicated(self.vtype(view.name).rank)
                fixed[view.name] = Layout(full.dims[depth:])
            else:
                # A value made before the loop is moved, if need be, into this layout first.
                fixed[view.name] = layout
                outer[view.name] = Layout(((),) * depth + layout.dims)
            types[view.name] = view.type
        defined = _defined(op.body)
        for value in _read(op.body):
            if value in fixed or value in defined:
                continue
            source = self.values[value]
            # An input is read where it lives; a value made outside the loop is read whole.
            # (An outer block's param is its trip's slice, as the enclosing level holds it.)
            if source.kind == "def":
                layout = Layout.replicated(self.vtype(value).rank)
            elif value in parent.fixed:
                layout = parent.fixed[value]
            else:
                layout = source.layout or Layout.replicated(source.type.rank)
            fixed[value] = layout
            if source.kind == "def":
                outer[value] = layout
        required: dict[str, Layout | None] = {c.body_result: layout
                                              for c, layout in zip(op.carried, layouts)}
        for saved, target in zip(op.saved, targets):  # None: whole where the body leaves it partial
            required.setdefault(saved.body_value, target)
        level = self.level(op.body, fixed, required, types)
        try:
            plan = self.solve_level(level)
        except EinparError as error:
            # The body's own error, said if no candidate runs (repeat_choices): the one of
            # the candidate with everything whole, which asks least of the body.
            if all(layout.is_replicated for layout in layouts) and \
                    all(view is None or view.is_replicated for view in views) and \
                    not any(targets):
                self._body_errors[id(op)] = error
            self._bodies[key] = None
            return None
        held = dict(fixed)
        for node, pick in zip(plan.nodes, plan.picks):
            held.update(node[pick][1].makes)
        held.update((c.body_result, layout) for c, layout in zip(op.carried, layouts))
        saved = tuple(target or Layout(held[s.body_value].dims) for s, target in zip(op.saved, targets))
        self._bodies[key] = (plan, outer, level, saved)
        return self._bodies[key]


def _repeat_results(op: Repeat) -> list[str]:
    """The values a repeat makes: its carried results and its saved stacks."""
    return [c.result.name for c in op.carried] + [s.result.name for s in op.saved]


def _read(ops) -> list[str]:
    """Values the ops read (nested bodies included), in order of first reading."""
    seen: dict[str, None] = {}
    for op in ops:
        if isinstance(op, Repeat):
            for carried in op.carried:
                seen.setdefault(carried.value)
            for view in op.stacked:
                seen.setdefault(view.name)
            for value in _read(op.body):
                seen.setdefault(value)
        else:
            for operand in op.operands:
                seen.setdefault(operand.value)
    return list(seen)


def _stacked(layout: Layout) -> Layout:
    """A saved value's layout from its per-trip layout: the repeat dim whole in front."""
    return Layout(((),) + layout.dims, layout.partial)


def _defined(ops) -> set[str]:
    """Values the ops make (nested bodies included); a nested loop's stacked views are reads
    of what they slice."""
    names: set[str] = set()
    for op in ops:
        if isinstance(op, Repeat):
            names |= _defined(op.body)
            names |= set(_repeat_results(op))
        else:
            names.add(op.result.name)
    return names
