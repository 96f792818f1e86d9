"""The checker's first pass and its layouts (part of einpar/check.py): the mesh, dims
and dtype declarations with `--set` overrides, layouts and pins checked against the mesh,
and the outputs a program declares, as a mixin of the checker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .check_expr import Abort, did_you_mean
from .errors import Diagnostic, EinparError, Label, Span
from .ir import DTYPES, Output, Value
from .layout import Layout, Mesh
from .syntax import DimDecl, DtypeDecl, IndexSpec, MeshDecl, OutputDecl, Pin

if TYPE_CHECKING:
    from .check import _Scope

# The reductions a value may be left pending over a mesh axis (Layout.partial).
PARTIAL_KINDS = ("sum", "max", "min")
# About ten times today's largest machines; larger meshes are mistakes (2^64 devices).
MAX_MESH_DEVICES = 2**20


class DeclarationChecking:
    def declarations(self) -> None:
        axis_names = {axis.name.text for item in self.module.items if isinstance(item, MeshDecl)
                      for axis in item.axes}
        dim_names = {binding.name.text for item in self.module.items if isinstance(item, DimDecl)
                     for binding in item.bindings}
        both = sorted(set(self.overrides) & axis_names & dim_names)
        if both:
            raise EinparError(Diagnostic(
                "E301", f"--set {both[0]} is ambiguous: {self.file} has a dim and a mesh axis of "
                        "that name", hint="rename one of them to set it from the command line"),
                usage=True)
        mesh_decl = dtype_decl = None
        axes: list[tuple[str, int]] = []
        pending_aliases: list = []
        for item in self.module.items:
            if isinstance(item, MeshDecl):
                if mesh_decl is not None:
                    self.error("E233", "a second mesh declaration", item.span,
                               hint="a program has one mesh; list all its axes on one line",
                               labels=(Label(mesh_decl.span, "first mesh here"),))
                    continue
                mesh_decl = item
                seen: dict[str, Span] = {}
                for axis in item.axes:
                    if axis.name.text in seen:
                        self.error("E233", f"mesh axis '{axis.name}' is declared twice", axis.name.span,
                                   labels=(Label(seen[axis.name.text], "first declared here"),))
                        continue
                    seen[axis.name.text] = axis.name.span
                    size = self.overrides.pop(axis.name.text, axis.size)
                    if size <= 0:
                        self.error("E222", f"mesh axis '{axis.name}' has size {size}", axis.span,
                                   hint="mesh axes need at least one device")
                        self.bad_axes.add(axis.name.text)
                        continue
                    axes.append((axis.name.text, size))
            elif isinstance(item, DimDecl):
                for binding in item.bindings:
                    name = binding.name.text
                    if name in self.dim_spans:
                        self.error("E233", f"dimension '{name}' is declared twice", binding.name.span,
                                   labels=(Label(self.dim_spans[name], "first declared here"),))
                        continue
                    self.dim_spans[name] = binding.name.span
                    if binding.size is not None:
                        if binding.size <= 0 and name not in self.overrides:
                            self.error("E222", f"dimension '{name}' has size {binding.size}", binding.span,
                                       hint="dimensions need a positive size")
                            continue
                        self.dims[name] = binding.size
                    else:
                        pending_aliases.append(binding)
            elif isinstance(item, DtypeDecl):
                if dtype_decl is not None:
                    self.error("E233", "a second dtype declaration", item.span,
                               labels=(Label(dtype_decl.span, "first dtype here"),))
                    continue
                dtype_decl = item
                if item.dtype.text not in DTYPES:
                    self.error("E205", f"unknown dtype '{item.dtype}'", item.dtype.span,
                               hint=f"dtypes are {', '.join(DTYPES)}")
                else:
                    self.dtype = item.dtype.text
        # Aliases (`T=S`) follow their target, overrides included, unless set themselves.
        for name, value in list(self.overrides.items()):
            if name in self.dims:
                self.dims[name] = self.overrides.pop(name)
        resolved = True
        while pending_aliases and resolved:
            resolved = False
            for binding in list(pending_aliases):
                target = binding.alias.text
                if target in self.dims:
                    self.dims[binding.name.text] = self.overrides.pop(binding.name.text, self.dims[target])
                    pending_aliases.remove(binding)
                    resolved = True
        for binding in pending_aliases:
            target = binding.alias.text
            if target in self.dim_spans:
                message = f"dimension '{binding.name}' is an alias in a cycle through '{target}'"
                hint = "give one dimension of the cycle a number"
            else:
                message = f"unknown dimension '{target}'"
                hint = did_you_mean(target, self.dim_spans) or "declare it with `dim`"
            self.error("E203", message, binding.alias.span, hint=hint)
        for name, size in self.dims.items():
            if size <= 0:
                self.error("E222", f"dimension '{name}' has size {size}", self.dim_spans[name],
                           hint="dimensions need a positive size")
        self.mesh = Mesh(tuple(axes))
        self.axis_names = frozenset(self.mesh.names)
        if self.mesh.num_devices > MAX_MESH_DEVICES:
            self.error("E223", f"the mesh has {self.mesh.num_devices:,} devices; einpar handles at "
                               f"most {MAX_MESH_DEVICES:,}", mesh_decl.span,
                       hint="shrink the mesh axes (--set AXIS=N)")
        self.dims = {name: self.dims[name] for name in self.dim_spans if name in self.dims}
        if self.overrides:
            unknown = ", ".join(sorted(self.overrides))
            known = sorted(set(self.dim_spans) | set(self.mesh.names))
            what = ("which is neither a dim nor a mesh axis" if len(self.overrides) == 1
                    else "which are neither dims nor mesh axes")
            raise EinparError(Diagnostic(
                "E301", f"--set names {unknown}, {what} of {self.file}",
                hint=f"this program's dims and mesh axes are: {', '.join(known) or '(none)'}"),
                usage=True)

    def dim_size(self, name) -> int:
        """The size of a dimension named in an index position; E200 if unknown."""
        if name.text not in self.dims:
            if name.text in self.dim_spans:
                raise Abort()  # its declaration already failed
            self.fail("E200", f"unknown index '{name}'", name.span,
                      hint=did_you_mean(name.text, self.dims) or "declare it with `dim`")
        return self.dims[name.text]

    def check_axis(self, axis) -> None:
        """E202 for a name that is not an axis of the mesh."""
        if axis.text in self.bad_axes:
            raise Abort()  # its declaration already failed
        if axis.text not in self.axis_names:
            if self.mesh.axes:
                hint = (did_you_mean(axis.text, self.mesh.names)
                        or f"the mesh has axes {', '.join(self.mesh.names)}")
            else:
                hint = f"declare the mesh first, e.g. `mesh {axis.text}=4`"
            self.fail("E202", f"unknown mesh axis '{axis}'", axis.span, hint=hint)

    def check_layout(self, specs: tuple[IndexSpec, ...], shape: tuple[int, ...], what: str,
                     pin: Pin | None = None) -> Layout | None:
        """Validate `D@tp`-style annotations: known axes, each once. A size the axes do not
        divide is padded (layout.py); each axis after a dimension's first must divide the
        block the ones before it leave, so that the padded blocks nest.

        None when nothing is asked: no `@` and no braces. Braces make the layout exact,
        `{}` a whole value and `{sum: tp}` one partial over tp (see _check_pin)."""
        if pin is None and not any(spec.axes for spec in specs):
            return None
        used: dict[str, Span] = {}
        dims = []
        for spec, size in zip(specs, shape):
            axes = []
            for axis in spec.axes:
                self.check_axis(axis)
                if axis.text in used:
                    self.fail("E220", f"mesh axis '{axis}' is used twice in the layout of {what}",
                              axis.span, hint="an axis can split only one dimension of a tensor",
                              labels=(Label(used[axis.text], "first used here"),))
                used[axis.text] = axis.span
                axes.append(axis.text)
            block = size
            for k, axis in enumerate(axes):
                if k and block % self.mesh.size(axis):
                    outer = "×".join(f"{a}={self.mesh.size(a)}" for a in axes[:k])
                    self.fail("E221", f"dimension {spec.name} of size {size} split by {outer} "
                                      f"leaves blocks of {block}, which {axis}={self.mesh.size(axis)} "
                                      f"does not divide",
                              spec.span, hint="padding may only end a dimension: split it by one "
                                              "axis, or pick sizes the inner axes divide (use --set "
                                              "to change them)")
                block = -(-block // self.mesh.size(axis))
            dims.append(tuple(axes))
        partial = self._check_pin(pin, used, what) if pin is not None else ()
        return Layout(tuple(dims), partial)

    def _check_pin(self, pin: Pin, used: dict[str, Span], what: str) -> tuple[tuple[str, str], ...]:
        """The (axis, kind) pairs of `{sum: tp; max: sp}`: known kinds (E224) over mesh axes
        (E202) that split no dimension and are listed once (E220)."""
        partial = []
        split = dict(used)
        for entry in pin.entries:
            kind = entry.kind.text
            if kind not in PARTIAL_KINDS:
                axes = entry.axes[0].text if len(entry.axes) == 1 else \
                    "(" + ",".join(axis.text for axis in entry.axes) + ")"
                if kind == "mean":
                    hint = f"a mean is a sum scaled by a constant: write {{sum: {axes}}}"
                else:
                    hint = did_you_mean(kind, PARTIAL_KINDS) or "a result can be partial as a sum, max or min"
                self.fail("E224", f"'{kind}' is not a kind of partial result", entry.kind.span, hint=hint)
            for axis in entry.axes:
                self.check_axis(axis)
                if axis.text in used:
                    hint = ("an axis either splits a dimension or leaves the value partial, not both"
                            if axis.text in split else "list each axis once in the braces")
                    self.fail("E220", f"mesh axis '{axis}' is used twice in the layout of {what}",
                              axis.span, hint=hint, labels=(Label(used[axis.text], "first used here"),))
                used[axis.text] = axis.span
                partial.append((axis.text, kind))
        return tuple(partial)

    def check_dtype(self, name) -> str | None:
        if name is None:
            return None
        if name.text not in DTYPES:
            self.fail("E205", f"unknown dtype '{name}'", name.span, hint=f"dtypes are {', '.join(DTYPES)}")
        return name.text

    def output(self, item: OutputDecl, scope: _Scope, seen: dict[str, Span]) -> None:
        name = item.name
        if item.suffix is not None:
            return self.derived_output(item, seen)
        if name.text in seen:
            self.fail("E233", f"'{name}' is declared as an output twice", name.span,
                      labels=(Label(seen[name.text], "first declared here"),))
        seen[name.text] = name.span
        binding = scope.lookup(name.text)
        if binding is None:
            if name.text in self.repeat_locals:
                self.fail("E234", f"output '{name}' is defined inside a repeat block", name.span,
                          labels=(Label(self.repeat_locals[name.text], "defined here"),),
                          hint="only names defined before the block and redefined in it leave it")
            self.fail("E232", f"output '{name}' is never defined", name.span,
                      hint=did_you_mean(name.text, self.all_definitions)
                      or "define it with a statement, e.g. " + f"{name}[...] = ...")
        if binding.value is None:
            raise Abort()
        value = binding.value
        if item.pin is not None:
            self.fail("E225", "braces on an output", item.pin.span,
                      hint=f"an output is delivered whole or split as its `@` say, never partial; "
                           f"a partial is pinned on the statement that defines '{name}'")
        layout = self.output_layout(item, value, str(name))
        self.outputs.append(Output(name.text, value.name, layout, item.span))

    def output_layout(self, item: OutputDecl, value: Value, name: str) -> Layout | None:
        """The layout an output's listed indices ask for (checked against `value`)."""
        if item.indices is None:
            return None
        if len(item.indices) != value.type.rank:
            self.fail("E210", f"output '{name}' has {value.type.rank} dimensions "
                              f"[{', '.join(value.type.indices)}] but {len(item.indices)} are given",
                      item.span, hint=f"write output {name}[{', '.join(value.type.indices)}]")
        for position, spec in enumerate(item.indices):
            size = self.dim_size(spec.name)
            if size != value.type.shape[position]:
                self.fail("E211", f"index {spec.name} has size {size} but dimension {position + 1} "
                                  f"of '{name}' ({value.type.indices[position]}) has size "
                                  f"{value.type.shape[position]}", spec.name.span)
        # Listed indices are a layout even without any `@`: a whole (replicated) output.
        return (self.check_layout(item.indices, value.type.shape, f"output '{name}'")
                or Layout.replicated(value.type.rank))

    def derived_output(self, item: OutputDecl, seen: dict[str, Span]) -> None:
        """`output w.grad[...]`: a gradient the training step derives, in the layout given
        (by default its param's). check_training.py says whether it is one."""
        name = f"{item.name}.{item.suffix}"
        if name in seen:
            self.fail("E233", f"'{name}' is declared as an output twice", item.name.span,
                      labels=(Label(seen[name], "first declared here"),))
        seen[name] = item.name.span
        self.grad_outputs.append(item)
        param = next((v for v in self.inputs if v.name == item.name.text), None)
        if item.suffix.text != "grad" or param is None or param.kind != "param":
            return  # check_training says why
        if item.pin is not None:
            self.fail("E225", "braces on an output", item.pin.span,
                      hint="an output is delivered whole or split as its `@` say, never partial")
        self.outputs.append(Output(name, name, self.output_layout(item, param, name), item.span))
