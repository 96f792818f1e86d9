"""The per-device program of a pipelined SpmdProgram (`repeat L@pp`), as JAX text.

The module runs under `jax.shard_map` over the WHOLE mesh (the stage axis at
its real size). Every device runs the stage program (einpar/pipeline.py: one
stage's SpmdProgram, L/p trips, collectives over the other axes only) on its
own blocks; a stack over the pipelined index is split over the stage axis so
that stage k holds its own trips (`pipeline.stage_trips`, put in stage order
on the host for the interleaved schedule: STAGED).

The schedule runs in lockstep ticks. `einpar.schedule.timeline` with unit
times places every slot of every stage at an integer start: the SCHEDULE
table, tick by tick, what each stage does (a micro-batch's forward or
backward through one of its chunks, or nothing). At every tick all stages run
the same code (SPMD, no collective under a branch): one forward and one
backward chunk on the micro-batch and chunk the table gives them, each kept
only where the table says the stage runs it (`jnp.where`), and the chunks'
carried values cross to the next stage (forward) and the one before
(backward) by `lax.ppermute` over the stage axis, into an inbox per
(micro-batch, chunk) where the table says a slot waits for them. Saved
activations are kept per micro-batch at their trips. The steps outside the
layers run on every stage and count where `pipeline.placement` puts them: a
micro-batch's steps before its layers (the embedding) are recomputed by each
slot that reads them; the steps between the forward and the backward (the
loss) run with the forward chunk and are kept per micro-batch; the
accumulation of each micro-batch's gradients runs after the ticks in
micro-batch order, as the reference's micro-batch loop adds them. An output
is taken from the first stage that makes it; a stack over the pipelined index
is gathered from every stage's trips.
"""

from __future__ import annotations

from einpar.pipeline import Body, made_by, read_by, split_step
from einpar.schedule import BACKWARD, FORWARD, timeline
from einpar.spmd import RepeatStep, SpmdProgram

from .jax_codegen import JNP_DTYPES, Names, _pack, _SpmdWriter, partition_spec

KINDS = {FORWARD: 1, BACKWARD: 2}  # the SCHEDULE table's first field (0: idle)

# The names a pipelined module defines and its functions use besides the program's values.
RESERVED = {"SCHEDULE", "STAGED", "chunk_of", "update", "stage", "before", "forward", "backward",
            "tick", "micro_batch", "inbox_f", "inbox_b", "saved_f", "saved_b", "kept", "grads",
            "mb", "chunk", "received", "first", "last", "saved", "state", "slots", "kind", "virtual",
            "is_f", "is_b", "sent", "made", "got", "kind_s", "mb_s", "chunk_s", "virtual_s"}

HELPERS = '''
def chunk_of(stack, chunk, size):
    """A stage's chunk `chunk` of a stack over its trips: `size` trips from chunk·size."""
    return lax.dynamic_slice_in_dim(stack, chunk * size, size, axis=0)


def update(buffer, index, value, write):
    """`buffer` with `value` written at the leading position `index` where `write` is true
    (a slot this stage runs at this tick), else unchanged."""
    index = tuple(index) + (0,) * (buffer.ndim - len(index))
    value = value.reshape((1,) * (buffer.ndim - value.ndim) + value.shape).astype(buffer.dtype)
    return jnp.where(write, lax.dynamic_update_slice(buffer, value, index), buffer)
'''


def _made(steps) -> list[str]:
    """The values a list of steps leaves defined (a loop: its carried and saved results)."""
    out = []
    for step in steps:
        if isinstance(step, RepeatStep):
            out.extend(after for _, _, _, after in step.carried)
            out.extend(after for _, after in step.saved)
        else:
            out.append(made_by(step))
    return out


def _reads(steps) -> set[str]:
    """Every value any of the steps reads, loops' bodies included (an over-count is harmless:
    value names are unique)."""
    out: set[str] = set()
    for step in steps:
        if isinstance(step, RepeatStep):
            out.update(before for before, _, _, _ in step.carried)
            out.update(stacked for stacked, _ in step.stacked)
            out |= _reads(step.body)
        else:
            out.update(read_by(step))
    return out


def global_shape(spmd: SpmdProgram, name: str) -> tuple[int, ...]:
    """A value's shape on the whole mesh: a stack over the pipelined index has all L trips."""
    value, pipeline = spmd.values[name], spmd.pipeline
    return tuple(pipeline.trips if index == pipeline.dim else size
                 for index, size in zip(value.type.indices, value.type.shape))


def input_spec(spmd: SpmdProgram, name: str) -> str:
    """An input's PartitionSpec on the whole mesh: a stack over the pipelined index split over
    the stage axis (stage k's block: its trips), the rest as the stage program lays it out."""
    value, pipeline = spmd.values[name], spmd.pipeline
    spec = partition_spec(value.layout)
    if pipeline.dim not in value.type.indices:
        return spec
    dims = [list(axes) for axes in value.layout.dims]
    dims[value.type.indices.index(pipeline.dim)].insert(0, pipeline.axis)
    parts = ["None" if not axes else repr(axes[0]) if len(axes) == 1 else repr(tuple(axes))
             for axes in dims]
    return "P(" + ", ".join(parts) + ")"


def staged_inputs(spmd: SpmdProgram) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Inputs reordered on the host so that a block split over the stage axis gives each stage
    its own trips in local order: name -> (axis, order). Empty unless interleaved (stage k's
    trips are then not adjacent)."""
    pipeline = spmd.pipeline
    order = tuple(trip for trips in pipeline.stage_trips for trip in trips)
    if order == tuple(range(pipeline.trips)):
        return {}
    return {name: (spmd.values[name].type.indices.index(pipeline.dim), order)
            for name in spmd.inputs if pipeline.dim in spmd.values[name].type.indices}


def schedule_table(spmd: SpmdProgram) -> list[tuple[tuple[int, int, int], ...]]:
    """Per tick, per stage: (kind, micro-batch, chunk); kind 0 idle, 1 forward, 2 backward."""
    pipeline = spmd.pipeline
    placed = timeline(pipeline.schedule, 1.0, 1.0)
    ticks = int(round(placed.makespan))
    table = [[(0, 0, 0)] * pipeline.stages for _ in range(ticks)]
    for stage, slots in enumerate(placed.stages):
        for item in slots:
            start = int(round(item.start))
            assert start == item.start and table[start][stage] == (0, 0, 0), (stage, item)
            table[start][stage] = (KINDS[item.slot.kind], item.slot.microbatch, item.slot.chunk)
    return [tuple(row) for row in table]


def _slot_text(entry) -> str:
    kind, mb, chunk = entry
    if kind == 0:
        return "--"
    return ("F" if kind == 1 else "B") + str(mb) + (f".{chunk}" if chunk else "")


def schedule_lines(spmd: SpmdProgram) -> list[str]:
    """The module's SCHEDULE constant with its picture: each stage's slots in order, and the
    table tick by tick."""
    pipeline, schedule = spmd.pipeline, spmd.pipeline.schedule
    table = schedule_table(spmd)
    lines = [f"# The schedule: {schedule.name}, {pipeline.stages} stages over {pipeline.axis!r}, "
             f"{schedule.microbatches} micro-batches, {schedule.chunks} chunk(s) per stage.",
             "# Each stage's slots in order (F3.1: micro-batch 3's forward through the stage's chunk 1):"]
    for stage, slots in enumerate(schedule.slots):
        trips = pipeline.stage_trips[stage]
        lines.append(f"#   stage {stage} (trips {', '.join(map(str, trips))}): "
                     + " ".join(str(slot) for slot in slots))
    lines.append("# Laid out in lockstep ticks (a slot starts once the work it needs is done; --: idle).")
    lines.append("# SCHEDULE[tick][stage] = (kind: 0 idle, 1 forward, 2 backward; micro-batch; chunk)")
    lines.append("SCHEDULE = (")
    for tick, row in enumerate(table):
        shown = "  ".join(f"{_slot_text(entry):>5}" for entry in row)
        lines.append(f"    {row!r},  # tick {tick:>3}: {shown}")
    lines.append(")")
    return lines


class PipelineWriter:
    """Writes `per_device`'s body for a pipelined SpmdProgram (module docstring)."""

    def __init__(self, spmd: SpmdProgram, names: Names):
        self.spmd = spmd
        self.pipeline = pipeline = spmd.pipeline
        self.names = names
        self.writer = _SpmdWriter(spmd, names)
        self.ops = self.writer.ops
        self.lines = self.writer.lines
        self.pre, body, self.post = split_step(spmd.steps, pipeline)
        self.body = Body(body, pipeline.dim)
        self.micro = next((step for step in spmd.steps if isinstance(step, RepeatStep)
                           and step.dim == pipeline.micro), None)
        p, v = pipeline.stages, pipeline.schedule.chunks
        self.per_chunk = pipeline.trips // (p * v)

    # ---- helpers of the text

    def add(self, line: str) -> None:
        self.lines.append(line)

    def zeros(self, name: str, lead: tuple) -> str:
        value = self.spmd.values[name]
        shape = tuple(lead) + tuple(value.local_shape(self.spmd.mesh))
        return f"jnp.zeros({shape!r}, {JNP_DTYPES[value.type.dtype]})"

    def unpack(self, indent: str, names: list[str], expr: str) -> None:
        if names:
            self.add(f"{indent}{_pack([self.names(n) for n in names])} = {expr}")

    def tuple_of(self, names: list[str]) -> str:
        return _pack([self.names(n) for n in names]) if names else "()"

    # ---- the parts

    def write(self) -> None:
        pipeline, body, spmd = self.pipeline, self.body, self.spmd
        p, v, m = pipeline.stages, pipeline.schedule.chunks, pipeline.schedule.microbatches
        forward, backward = body.forward, body.backward
        add = self.add
        add(f"    stage = lax.axis_index({pipeline.axis!r})  # this device's stage; every stage runs this code")
        if self.pre:
            add("    # before the micro-batch loop")
            self.writer.steps(self.pre, "    ")

        # What a micro-batch's backward and what comes after read of the values its forward
        # slots make: kept per micro-batch.
        later = _reads(body.after) | {o.value for o in spmd.outputs}
        if backward is not None:
            later |= _reads([backward])
        self.before_names = ([inside for _, inside in self.micro.stacked] if self.micro else []) \
            + _made(body.before)
        made_forward = [after for _, _, _, after in forward.carried] + _made(body.between)
        self.kept = [name for name in made_forward if name in later]
        self.saved_f = [after for _, after in forward.saved]
        self.carried_f = [before for before, _, _, _ in forward.carried]
        self.carried_b = [before for before, _, _, _ in backward.carried] if backward else []
        self.grads = ([after for _, _, _, after in backward.carried] if backward else [])
        self.saved_b = [after for _, after in backward.saved] if backward else []

        self.write_before()
        self.write_forward()
        if backward is not None:
            self.write_backward()
        self.write_ticks(p, v, m)
        self.write_after(m)
        self.write_outputs()

    def write_before(self) -> None:
        add = self.add
        add("")
        add("    def before(mb):  # micro-batch mb's steps before its layers (recomputed where read)")
        if self.micro is not None:
            for stacked, inside in self.micro.stacked:
                add(f"        {self.names(inside)} = {self.names(stacked)}[mb]")
        self.writer.steps(self.body.before, "        ")
        add(f"        return {self.tuple_of(self.before_names)}")

    def scan(self, loop: RepeatStep, start: str, indent: str) -> None:
        """The chunk's trips of a pipelined loop: lax.scan over the chunk of each stack."""
        fn = self.writer.loop_body(loop, indent)
        xs = ", ".join(f"chunk_of({self.names(stacked)}, chunk, {self.per_chunk})"
                       for stacked, _ in loop.stacked)
        xs = f"({xs},)" if loop.stacked else "None"
        length = "" if loop.stacked else f", length={self.per_chunk}"
        carried = self.tuple_of([after for _, _, _, after in loop.carried]) if loop.carried else "_"
        saved = self.tuple_of([after for _, after in loop.saved]) if loop.saved else "_"
        order = ", reverse=True" if loop.reverse else ""
        self.add(f"{indent}{carried}, {saved} = lax.scan({fn}, {start}, {xs}{length}{order})")

    def write_forward(self) -> None:
        add, loop, p, v = self.add, self.body.forward, self.pipeline.stages, self.pipeline.schedule.chunks
        add("")
        add("    def forward(mb, chunk, received):")
        add("        \"\"\"A forward slot: micro-batch mb through the stage's chunk `chunk`, its carried")
        add("        values received from the stage before (the first chunk of all: made here).\"\"\"")
        self.unpack("        ", self.before_names, "before(mb)")
        add(f"        first = chunk * {p} + stage == 0")
        start = [f"jnp.where(first, {self.names(before)}, received[{i}])"
                 for i, before in enumerate(self.carried_f)]
        self.scan(loop, "(" + "".join(s + ", " for s in start) + ")", "        ")
        if self.body.between:
            add(f"        # between the layers and their backward: what is kept counts from the last "
                f"chunk of all ({p * v - 1})")
            self.writer.steps(self.body.between, "        ")
        sent = self.tuple_of([after for _, _, _, after in loop.carried])
        add(f"        return {sent}, {self.tuple_of(self.saved_f)}, {self.tuple_of(self.kept)}")

    def write_backward(self) -> None:
        add, loop, p, v = self.add, self.body.backward, self.pipeline.stages, self.pipeline.schedule.chunks
        add("")
        add("    def backward(mb, chunk, received, kept, saved):")
        add("        \"\"\"A backward slot: micro-batch mb back through the stage's chunk `chunk`, its")
        add("        carried gradients received from the stage after (the last chunk of all: made by")
        add("        the steps between), with what its forward kept and saved.\"\"\"")
        self.unpack("        ", self.before_names, "before(mb)")
        self.unpack("        ", self.kept, "kept")
        self.unpack("        ", self.saved_f, "saved")
        add(f"        last = chunk * {p} + stage == {p * v - 1}")
        start = [f"jnp.where(last, {self.names(before)}, received[{i}])"
                 for i, before in enumerate(self.carried_b)]
        self.scan(loop, "(" + "".join(s + ", " for s in start) + ")", "        ")
        add(f"        return {self.tuple_of(self.grads)}, {self.tuple_of(self.saved_b)}")

    def write_ticks(self, p: int, v: int, m: int) -> None:
        add, axis, last = self.add, self.pipeline.axis, p * v - 1
        c = self.per_chunk
        buffers = {
            "inbox_f": [self.zeros(name, (m, v)) for name in self.carried_f],
            "saved_f": [self.zeros(name, (m,)) for name in self.saved_f],
            "kept": [self.zeros(name, (m,)) for name in self.kept],
        }
        if self.body.backward is not None:
            buffers.update({
                "inbox_b": [self.zeros(name, (m, v)) for name in self.carried_b],
                "grads": [self.zeros(name, (m,)) for name in self.grads],
                "saved_b": [self.zeros(name, (m,)) for name in self.saved_b],
            })
        add("")
        add("    # Per micro-batch: carried values received (inbox: [micro-batch, chunk]), saved")
        add("    # activations at the stage's trips, and what the backward and the steps after read.")
        for key, zeros in buffers.items():
            add(f"    {key} = ({''.join(z + ', ' for z in zeros)})")
        state = ", ".join(buffers)
        add("")
        add("    def tick(state, slots):")
        add("        \"\"\"One tick of SCHEDULE on every stage: the forward and the backward chunk run")
        add("        uniformly and count only where the table runs them; the carried values move one")
        add("        stage on.\"\"\"")
        add(f"        {state} = state")
        add("        kind, mb, chunk = slots[stage]")
        add(f"        virtual = chunk * {p} + stage  # this slot's chunk among all {p * v}")
        add("        # forward")
        add("        is_f = kind == 1")
        add("        sent, saved, made = forward(mb, chunk, tuple(b[mb, chunk] for b in inbox_f))")
        add(f"        saved_f = tuple(update(b, (mb, chunk * {c}), s, is_f) for b, s in zip(saved_f, saved))")
        add("        kept = tuple(update(b, (mb,), k, is_f) for b, k in zip(kept, made))")
        add(f"        sent = lax.ppermute(sent, {axis!r}, perm={[(k, (k + 1) % p) for k in range(p)]!r})")
        add(f"        kind_s, mb_s, chunk_s = slots[(stage - 1) % {p}]  # the stage that sent it")
        add(f"        virtual_s = chunk_s * {p} + (stage - 1) % {p}")
        add(f"        got = (kind_s == 1) & (virtual_s < {last})")
        add(f"        inbox_f = tuple(update(b, (mb_s, (virtual_s + 1) // {p}), x, got) "
            "for b, x in zip(inbox_f, sent))")
        if self.body.backward is not None:
            add("        # backward")
            add("        is_b = kind == 2")
            add("        sent, saved = backward(mb, chunk, tuple(b[mb, chunk] for b in inbox_b),")
            add("                               tuple(b[mb] for b in kept), tuple(b[mb] for b in saved_f))")
            add("        grads = tuple(update(b, (mb,), g, is_b & (virtual == 0)) "
                "for b, g in zip(grads, sent))")
            add(f"        saved_b = tuple(update(b, (mb, chunk * {c}), s, is_b) "
                "for b, s in zip(saved_b, saved))")
            add(f"        sent = lax.ppermute(sent, {axis!r}, perm={[(k, (k - 1) % p) for k in range(p)]!r})")
            add(f"        kind_s, mb_s, chunk_s = slots[(stage + 1) % {p}]")
            add(f"        virtual_s = chunk_s * {p} + (stage + 1) % {p}")
            add("        got = (kind_s == 2) & (virtual_s > 0)")
            add(f"        inbox_b = tuple(update(b, (mb_s, (virtual_s - 1) // {p}), x, got) "
                "for b, x in zip(inbox_b, sent))")
        add(f"        return ({state}), None")
        add("")
        add(f"    ({state}), _ = lax.scan(tick, ({state}), jnp.asarray(SCHEDULE, jnp.int32))")

    def write_after(self, m: int) -> None:
        add, micro, body = self.add, self.micro, self.body
        backward = body.backward is not None

        def bind(indent: str, mb: str) -> None:
            self.unpack(indent, self.before_names, f"before({mb})")
            self.unpack(indent, self.kept, f"tuple(b[{mb}] for b in kept)")
            self.unpack(indent, self.saved_f, f"tuple(b[{mb}] for b in saved_f)")
            if backward:
                self.unpack(indent, self.grads, f"tuple(b[{mb}] for b in grads)")
                self.unpack(indent, self.saved_b, f"tuple(b[{mb}] for b in saved_b)")

        add("")
        if micro is None:
            add("    # one micro-batch: the steps after its layers")
            bind("    ", "0")
            self.writer.steps(body.after, "    ")
            return
        if micro.saved:
            raise AssertionError("a micro-batch loop that saves values is not pipelined")
        add("    def micro_batch(carry, mb):  # the steps after a micro-batch's layers, in order")
        self.unpack("        ", [inside for _, inside, _, _ in micro.carried], "carry")
        bind("        ", "mb")
        self.writer.steps(body.after, "        ")
        add(f"        return {self.tuple_of([result for _, _, result, _ in micro.carried])}, None")
        start = self.tuple_of([before for before, _, _, _ in micro.carried])
        after = self.tuple_of([after for _, _, _, after in micro.carried])
        add(f"    {after}, _ = lax.scan(micro_batch, {start}, jnp.arange({m}))")
        if self.post:
            add("    # after the micro-batch loop")
            self.writer.steps(self.post, "    ")

    def write_outputs(self) -> None:
        pipeline, spmd = self.pipeline, self.spmd
        order = [trip for trips in pipeline.stage_trips for trip in trips]
        inverse = sorted(range(len(order)), key=order.__getitem__)
        # A pipelined loop's carried result is made on its end stage (the last for the
        # forward, the first for the backward); every other stage holds a stand-in.
        ends = {after: {pipeline.stages - 1} for _, _, _, after in self.body.forward.carried}
        if self.body.backward is not None:
            ends.update({after: {0} for _, _, _, after in self.body.backward.carried})
        done = set()
        for output in spmd.outputs:
            if output.value in done:
                continue
            done.add(output.value)
            value = spmd.values[output.value]
            name = self.names(output.value)
            if pipeline.dim in value.type.indices:
                dim = value.type.indices.index(pipeline.dim)
                text = f"lax.all_gather({name}, {pipeline.axis!r}, axis={dim}, tiled=True)"
                if order != list(range(len(order))):
                    text = f"jnp.take({text}, jnp.asarray({inverse!r}), axis={dim})"
                self.add(f"    {name} = {text}  # every stage's trips, in order")
                continue
            stages = pipeline.placement.get(output.value, ends.get(output.value))
            if stages is None or len(stages) == pipeline.stages:
                continue
            owner = min(stages)
            self.add(f"    {name} = lax.all_gather({name}, {pipeline.axis!r})[{owner}]  "
                     f"# made on stage {owner}")
