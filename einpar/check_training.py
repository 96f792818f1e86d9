"""Check the declarations that make a program a training step (LANGUAGE.md, Training).

`loss l`, `optimizer adamw lr=... shard=dp`, `microbatches B=8`, `schedule 1f1b`
(of a pipelined `repeat L@pp`), the `remat`
modifier of statements and repeat blocks, and `output w.grad[...]` are checked
here, after the statements (they name values and dims the statements define),
into one `einpar.ir.Training`. The checker proper (einpar/check.py) collects
these items and hands them over; the training step itself is derived later, by
einpar/train.py.
"""

from __future__ import annotations

import difflib
import math

from .errors import Label, Span
from .ir import (FLOAT_DTYPES, Map, Optimizer, Pos, Program, Repeat, Training, scalar_nodes,
                 walk_ops)
from .schedule import SCHEDULES, schedule_problem
from .syntax import Directive, Name, OutputDecl, Setting

DIRECTIVES = ("loss", "optimizer", "microbatches", "schedule")
MODIFIERS = ("remat",)
OPTIMIZERS = ("sgd", "adamw")
# Each optimizer's settings and their defaults (PyTorch's SGD and AdamW). lr has no
# default in PyTorch's SGD; einpar asks for it in both, as the two differ.
SETTINGS = {
    "sgd": {"lr": None, "wd": 0.0, "shard": ()},
    "adamw": {"lr": None, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "wd": 0.01, "step": 1, "shard": ()},
}
# What each number must satisfy: (test, words for the hint).
_RANGES = {
    "lr": (lambda x: x > 0, "a learning rate above 0"),
    "b1": (lambda x: 0 <= x < 1, "a decay in [0, 1)"),
    "b2": (lambda x: 0 <= x < 1, "a decay in [0, 1)"),
    "eps": (lambda x: x > 0, "a number above 0"),
    "wd": (lambda x: x >= 0, "a weight decay of 0 or more"),
    "step": (lambda x: isinstance(x, int) and x >= 1, "a whole step number of 1 or more"),
}


def _closest(word: str, choices) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{found[0]}'?" if found else None

class _OptimizerChecking:
    """`optimizer KIND SETTING=VALUE ...`: the kind, each setting and its range."""

    def optimizer(self, item: Directive) -> Optimizer | None:
        if not item.args or not isinstance(item.args[0], Name):
            self.error("E252", "`optimizer` needs a kind", item.span,
                       hint="write `optimizer sgd lr=0.1` or `optimizer adamw lr=1e-3`")
            return None
        kind = item.args[0]
        if kind.text not in OPTIMIZERS:
            self.error("E252", f"unknown optimizer '{kind}'", kind.span,
                       hint=_closest(kind.text, OPTIMIZERS) or "einpar knows " + ", ".join(OPTIMIZERS))
            return None
        allowed = SETTINGS[kind.text]
        given: dict[str, object] = {}
        ok = True
        for arg in item.args[1:]:
            if not isinstance(arg, Setting):
                self.error("E252", f"'{arg}' is not a setting of the optimizer", arg.span,
                           hint="settings are written name=value, e.g. lr=1e-3")
                ok = False
                continue
            name = arg.name.text
            if name not in allowed:
                self.error("E252", f"{kind} has no setting '{name}'", arg.name.span,
                           hint=_closest(name, allowed) or
                           f"{kind} takes " + ", ".join(allowed))
                ok = False
            elif name in given:
                self.error("E233", f"setting '{name}' is given twice", arg.name.span)
                ok = False
            elif not self.setting_ok(arg):
                ok = False
            else:
                given[name] = arg.value
        if "lr" not in given and "lr" in allowed and ok:
            self.error("E252", f"{kind} needs a learning rate", item.span, hint=f"add lr=..., e.g. "
                       f"`optimizer {kind} lr={'1e-3' if kind.text == 'adamw' else '0.1'}`")
            return None
        if not ok:
            return None
        settings = {**allowed, **given}
        shard = tuple(name.text for name in settings.pop("shard"))
        return Optimizer(kind.text, **{key: (float(value) if key != "step" else value)
                                       for key, value in settings.items()},
                         shard=shard, span=item.span)

    def setting_ok(self, setting: Setting) -> bool:
        name, value = setting.name.text, setting.value
        if name == "shard":
            if not isinstance(value, tuple):
                self.error("E252", "shard= takes mesh axes", setting.span,
                           hint="write shard=dp or shard=(dp,fsdp)")
                return False
            seen: set[str] = set()
            for axis in value:
                if axis.text not in self.program.mesh.names:
                    self.error("E202", f"unknown mesh axis '{axis}'", axis.span,
                               hint=_closest(axis.text, self.program.mesh.names)
                               or "the mesh's axes are " + ", ".join(self.program.mesh.names))
                    return False
                if axis.text in seen:
                    self.error("E220", f"mesh axis '{axis}' appears twice in shard=", axis.span)
                    return False
                seen.add(axis.text)
            return True
        test, words = _RANGES[name]
        if isinstance(value, tuple) or not math.isfinite(value) or not test(value):
            shown = value[0] if isinstance(value, tuple) else self.written(setting) or value
            mantissa = str(shown).lower().partition("e")[0]
            rounded = " (it rounds to 0 as a float)" if not isinstance(value, tuple) and \
                value == 0 and any(digit in mantissa for digit in "123456789") else ""
            self.error("E252", f"{name}={shown} is not {words}{rounded}", setting.span)
            return False
        return True

    def written(self, setting: Setting) -> str | None:
        """A setting's value as the source writes it (`1e-400`, not the 0.0 it rounds to)."""
        span = setting.span
        lines = self.program.source.splitlines()
        if span.end_line != span.line or not 0 < span.line <= len(lines):
            return None
        text = lines[span.line - 1][span.col - 1:span.end_col - 1]
        return text.partition("=")[2].strip() or None


class _ScheduleChecking:
    """`microbatches B=8` and `schedule NAME`: the index and count, what a step of
    micro-batches may output, and the schedule of a pipelined repeat."""

    def schedule_words(self, item: Directive) -> tuple[str, int] | None:
        """`schedule gpipe`, `schedule 1f1b`, `schedule interleaved v=2`: (name, chunks)."""
        words = [arg for arg in item.args if isinstance(arg, Name)]
        settings = [arg for arg in item.args if isinstance(arg, Setting)]
        if len(words) != 1:
            self.error("E257", "`schedule` takes one schedule's name", item.span,
                       hint="write `schedule 1f1b`, `schedule gpipe` or `schedule interleaved v=2`")
            return None
        name = words[0]
        if name.text not in SCHEDULES:
            self.error("E257", f"unknown schedule '{name}'", name.span,
                       hint=_closest(name.text, SCHEDULES) or f"the schedules are {', '.join(SCHEDULES)}")
            return None
        chunks = 1
        if len(settings) > 1:
            self.error("E257", f"'{settings[1].name}' is given twice" if settings[0].name.text ==
                       settings[1].name.text else "`schedule interleaved` takes one setting, v",
                       settings[1].span, hint="write `schedule interleaved v=2`")
            return None
        for setting in settings:
            if setting.name.text != "v" or name.text != "interleaved":
                self.error("E257", f"'{setting.name}' is not a setting of the {name} schedule",
                           setting.name.span,
                           hint="only `schedule interleaved v=N` takes a setting: N chunks per stage")
                return None
            if not isinstance(setting.value, int) or setting.value < 1:
                self.error("E257", "v is a whole number of chunks per stage, 1 or more", setting.span)
                return None
            chunks = setting.value
        if name.text == "interleaved" and not settings:
            self.error("E257", "the interleaved schedule needs its chunks per stage", item.span,
                       hint="write `schedule interleaved v=2`")
            return None
        return name.text, chunks

    def pipeline_schedule(self, declared, span: Span | None, microbatches, micro_span: Span | None):
        """The step's schedule, checked against its pipelined repeat and micro-batches (E257);
        None without a pipelined repeat."""
        staged = [op for op in self.program.ops if isinstance(op, Repeat) and op.stage_axis]
        if not staged:
            if span is not None:
                self.error("E257", "a schedule orders pipeline stages, and no repeat is pipelined",
                           span, hint="split a repeat's trips into stages with `repeat L@pp { ... }`")
            return None
        loop = staged[0]
        stages = self.program.mesh.size(loop.stage_axis)
        if declared is None:
            if span is not None:  # declared, but wrong: already reported
                return None
            declared = ("1f1b", 1) if microbatches is not None else ("gpipe", 1)
        elif microbatches is None:
            self.error("E257", f"the {declared[0]} schedule needs micro-batches", span,
                       hint="a schedule orders several micro-batches through the stages: add "
                            "`microbatches B=8` (B the batch index)")
            return None
        name, chunks = declared
        count = microbatches[1] if microbatches is not None else 1
        where = span or micro_span or loop.span
        if loop.count % (stages * chunks):
            self.error("E257", f"the {loop.count} trips of '{loop.dim}' do not split into "
                               f"{stages}×{chunks} chunks", where,
                       hint=f"with v={chunks} chunks per stage the trips must be a multiple of "
                            f"{stages * chunks}")
            return None
        problem = schedule_problem(name, stages, count, chunks)
        if problem is not None:
            hint = ("use more micro-batches, or `schedule gpipe`" if name == "1f1b"
                    else "use a multiple of the stages as micro-batches")
            self.error("E257", problem, where, hint=hint)
            return None
        return declared

    def microbatches(self, item: Directive) -> tuple[str, int] | None:
        if len(item.args) != 1 or not isinstance(item.args[0], Setting) or (
                isinstance(item.args[0].value, tuple) and len(item.args[0].value) != 1):
            self.error("E254", "`microbatches` takes one batch index and a count", item.span,
                       hint="write `microbatches B=8`")
            return None
        setting = item.args[0]
        index, count = setting.name.text, setting.value
        if isinstance(count, tuple):  # a dimension's size (`microbatches B=M`, `--set M=96`)
            (name,) = count
            if name.text not in self.dims:
                self.error("E203", f"unknown dimension '{name.text}'", name.span,
                           hint=_closest(name.text, self.dims) or
                           "the count is a whole number, or a dimension whose size it is")
                return None
            count = self.dims[name.text]
        if index not in self.dims:
            self.error("E203", f"unknown dimension '{index}'", setting.name.span,
                       hint=_closest(index, self.dims) or "name the batch index, declared with `dim`")
            return None
        if not isinstance(count, int) or count < 1:
            self.error("E254", f"{count} micro-batches: the count is a whole number of 1 or more",
                       setting.span)
            return None
        if self.dims[index] % count:
            self.error("E254", f"{index}={self.dims[index]} does not split into {count} micro-batches",
                       setting.span, hint=f"use a count that divides {self.dims[index]}")
            return None
        for value in self.program.inputs:
            if value.kind == "param" and index in value.type.indices:
                self.error("E254", f"{index} is not a batch index: param '{value.name}' has it",
                           setting.name.span,
                           hint="micro-batches split the inputs' batch index; params are whole")
                return None
        if not any(index in value.type.indices for value in self.program.inputs
                   if value.kind == "input"):
            self.error("E254", f"no input has the index {index}", setting.name.span,
                       hint="micro-batches split a batch index of the inputs")
            return None
        related = sorted({a for a, b in self.aliases.items() if b == index}
                         | ({self.aliases[index]} if index in self.aliases else set()))
        if related:
            self.error("E254", f"{index} shares its size with {', '.join(related)} (an alias): "
                               "micro-batches split one index alone", setting.name.span,
                       hint="give the other index its own size (`dim T=8`), or split another")
            return None
        if any(isinstance(node, Pos) and node.index == index
               for op in walk_ops(self.program.ops) if isinstance(op, Map)
               for node in scalar_nodes(op.expr)):
            self.error("E254", f"pos({index}) would count the rows of one micro-batch, not the "
                               "batch's", setting.name.span,
                       hint=f"micro-batch the step by another index, or compute without pos({index})")
            return None
        rows = self.dims[index] // count
        for value in self.program.values.values():
            if value.layout is None or index not in value.type.indices:
                continue
            axes = value.layout.dims[value.type.indices.index(index)]
            split = math.prod(self.program.mesh.size(axis) for axis in axes)
            if rows % split:
                self.error("E254", f"a micro-batch of {rows} rows of {index} does not split over "
                                   f"{', '.join(axes)} ({split} devices), as '{value.name}' asks",
                           setting.span, hint=f"use fewer micro-batches: {index}/{count} must be a "
                                              f"multiple of {split}")
                return None
        return index, count

    def microbatch_outputs(self, loss: str, optimizer: Optimizer | None) -> bool:
        """A step of micro-batches outputs what it accumulates: its loss and gradients."""
        for output in self.program.outputs:
            if output.value == loss or "." in output.name:
                continue
            value = self.values.get(output.value)
            if value is not None and value.kind == "param":
                if optimizer is not None:
                    return False  # outputs_beside said why
                what = "a param"
            else:
                what = "one micro-batch's"
            self.error("E254", f"output '{output.name}' is {what}: a step of micro-batches "
                               "outputs its loss, gradients and updated params",
                       output.span, hint="remove this output, or the micro-batches")
            return False
        return True


class TrainingChecker(_OptimizerChecking, _ScheduleChecking):
    """Checks the training declarations of one module; `error(code, message, span, hint,
    labels)` records a diagnostic in the checker's list."""

    def __init__(self, error, program: Program, dims: dict[str, int],
                 aliases: dict[str, str] | None = None):
        self.error = error
        self.program = program
        self.dims = dims
        self.aliases = aliases or {}  # `T=S`: T -> S
        self.values = {value.name: value for value in program.inputs}
        self.top_level = {output.name: output for output in program.outputs}

    def check(self, directives: list[Directive], remat: list[tuple[Name, str]],
              remat_repeats: list[Span], grad_outputs: list[OutputDecl],
              top_values: dict[str, object]) -> Training | None:
        """`remat`: (modifier, statement name) of each statement written with a modifier;
        `remat_repeats`: the spans of `repeat L remat` blocks; `grad_outputs`: the
        `output w.grad` declarations; `top_values`: the program's names at the top level
        (name -> Value) after its last statement."""
        loss = optimizer = microbatches = schedule = None
        first: dict[str, Span] = {}
        for item in directives:
            word = item.word.text
            if word not in DIRECTIVES:
                self.error("E250", f"unknown declaration '{word}'", item.word.span,
                           hint=_closest(word, DIRECTIVES) or
                           "a line starting with two names declares a training step: "
                           + ", ".join(f"`{w} ...`" for w in DIRECTIVES))
                continue
            if word in first:
                self.error("E233", f"'{word}' is declared twice", item.word.span,
                           labels=(Label(first[word], "first declared here"),))
                continue
            first[word] = item.word.span
            if word == "loss":
                loss = self.loss(item, top_values)
            elif word == "optimizer":
                optimizer = self.optimizer(item)
            elif word == "schedule":
                schedule = self.schedule_words(item)
            else:
                microbatches = self.microbatches(item)
        for modifier, _ in remat:
            if modifier.text not in MODIFIERS:
                self.error("E250", f"unknown statement modifier '{modifier}'", modifier.span,
                           hint=_closest(modifier.text, MODIFIERS)
                           or "`remat p[...] = ...` recomputes p in the backward pass")
        without_loss = [(span, what) for span, what in
                        [(first.get("optimizer"), "an optimizer"),
                         (first.get("microbatches"), "micro-batches"),
                         (first.get("schedule"), "a pipeline schedule")]
                        + [(m.span, "remat") for m, _ in remat if m.text in MODIFIERS]
                        + [(span, "remat") for span in remat_repeats]
                        + [(o.suffix.span, "a gradient output") for o in grad_outputs]
                        if span is not None]
        if "loss" not in first:
            for span, what in without_loss:
                self.error("E253", f"{what} needs a loss", span,
                           hint="name the scalar to minimize with `loss l` (l[] = ...)")
            return None
        for output in grad_outputs:
            self.grad_output(output)
        self.trainable_params()
        if optimizer is not None:
            self.outputs_beside(optimizer)
        if loss is None:
            return None
        if microbatches is not None and not self.microbatch_outputs(loss, optimizer):
            return None
        names = frozenset(stmt for modifier, stmt in remat if modifier.text in MODIFIERS)
        pipeline = self.pipeline_schedule(schedule, first.get("schedule"), microbatches,
                                          first.get("microbatches"))
        return Training(loss, optimizer, microbatches, names, first["loss"], pipeline)

    def loss(self, item: Directive, top_values: dict) -> str | None:
        if len(item.args) != 1 or not isinstance(item.args[0], Name):
            self.error("E251", "`loss` takes one name", item.span, hint="write `loss l`, where l[] = ...")
            return None
        name = item.args[0]
        value = top_values.get(name.text)
        if name.text in top_values and value is None:
            return None  # its statement failed, and said why
        if value is None:
            self.error("E251", f"the loss '{name}' is not a value of the program", name.span,
                       hint=_closest(name.text, [n for n, v in top_values.items() if v]) or
                       "define it at the top level, e.g. `l[] = mean[B](square(y[B]))`")
            return None
        if value.type.rank != 0:
            self.error("E251", f"the loss '{name}' has dimensions [{', '.join(value.type.indices)}]; "
                               "a loss is a scalar", name.span,
                       hint=f"reduce it, e.g. `{name}_total[] = sum[{','.join(value.type.indices)}]"
                            f"({name}[{','.join(value.type.indices)}])`")
            return None
        if value.type.dtype not in FLOAT_DTYPES:
            self.error("E251", f"the loss '{name}' is {value.type.dtype}; a loss is a float",
                       name.span, hint=f"cast it: `{name}f[] : f32 = {name}[]`")
            return None
        if value.kind != "def":
            self.error("E251", f"the loss '{name}' is {'a' if value.kind == 'param' else 'an'} "
                               f"{value.kind}, not computed from the params", name.span)
            return None
        return value.name

    def trainable_params(self) -> None:
        """Every param of a step is trained, so each is a float: an integer has no gradient
        (as in PyTorch, where only a floating tensor can require one), and an update would
        decay and truncate it."""
        for value in self.program.inputs:
            if value.kind == "param" and value.type.dtype not in FLOAT_DTYPES:
                self.error("E255", f"param '{value.name}' is {value.type.dtype}: a training step "
                                   "trains every param, and only a float one has a gradient",
                           value.span, hint="declare it with `input`: a step reads its "
                                            "inputs and trains its params")

    def outputs_beside(self, optimizer: Optimizer) -> None:
        """The optimizer outputs each updated param under the param's name: an output of the
        param as written would be a second output of that name."""
        for output in self.program.outputs:
            if self.values.get(output.value) is not None \
                    and self.values[output.value].kind == "param":
                self.error("E233", f"output '{output.name}' is declared twice: the optimizer "
                                   f"outputs the updated '{output.name}'", output.span,
                           hint=f"remove `output {output.name}`: the step outputs "
                                f"{output.name} after its update",
                           labels=(Label(optimizer.span, "outputs the updated params"),))

    def grad_output(self, output: OutputDecl) -> None:
        if output.suffix.text != "grad":
            self.error("E250", f"'{output.name}.{output.suffix}' is not a value einpar derives",
                       output.suffix.span, hint=f"write `output {output.name}.grad` for a gradient")
            return
        value = self.values.get(output.name.text)
        if value is None or value.kind != "param":
            self.error("E255", f"'{output.name}' is not a param, so '{output.name}.grad' is not taken",
                       output.name.span,
                       hint="gradients are taken of params; declare it with `param`")

