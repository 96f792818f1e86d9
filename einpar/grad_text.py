"""The derived training step as `.ein` text (`einpar compile --emit grad`)."""

from __future__ import annotations

import math

from .ir import (Arg, Cast, Const, Einsum, Map, Op, Operand, Pos, Program, Repeat, Scalar,
                 TensorType, apply_text, call_text, is_backward)


class _Text:
    """`.ein` text for IR values and ops: each value name as an identifier of its own
    (`h.grad` -> `h_grad`, `x#2` -> `x_2`)."""

    def __init__(self, program: Program):
        self.names: dict[str, str] = {}
        self.taken: set[str] = set(program.dim_sizes) | set(program.mesh.names)

    def __call__(self, name: str) -> str:
        if name not in self.names:
            base = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name) or "v"
            if base[0].isdigit():
                base = "v" + base
            ident, number = base, 1
            while ident in self.taken:
                number += 1
                ident = f"{base}_{number}"
            self.taken.add(ident)
            self.names[name] = ident
        return self.names[name]

    def spec(self, name: str, value_type: TensorType, layout=None) -> str:
        indices = []
        for position, index in enumerate(value_type.indices):
            axes = layout.dims[position] if layout is not None else ()
            split = "" if not axes else "@" + (axes[0] if len(axes) == 1 else f"({','.join(axes)})")
            indices.append(index + split)
        return f"{self(name)}[{', '.join(indices)}]"

    def operand(self, operand: Operand) -> str:
        return f"{self(operand.value)}[{','.join(operand.indices)}]"

    def scalar(self, expr: Scalar, operands: tuple[Operand, ...]) -> str:
        if isinstance(expr, Arg):
            return self.operand(operands[expr.index])
        if isinstance(expr, Const):
            if expr.label:
                return expr.label
            value = expr.value
            if isinstance(value, float) and math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return repr(value) if not isinstance(value, bool) else repr(int(value))
        if isinstance(expr, Pos):
            return f"pos({expr.index})"
        if isinstance(expr, Cast):  # the checker inserts casts where dtypes differ
            return self.scalar(expr.arg, operands)
        return apply_text(expr.fn, [self.scalar(a, operands) for a in expr.args])

    def op(self, op: Op, indent: str) -> list[str]:
        if isinstance(op, Repeat):
            return self.repeat(op, indent)
        result = op.result
        head = f"{indent}{self.spec(result.name, result.type, result.layout)}: {result.type.dtype} = "
        if isinstance(op, Einsum):
            product = " * ".join(self.operand(o) for o in op.operands)
            body = f"sum[{','.join(op.summed)}]({product})" if len(op.operands) == 1 and op.summed \
                else product
        elif isinstance(op, Map):
            body = self.scalar(op.expr, op.operands)
        else:
            body = call_text(op, self.operand)
        line = f"  # {op.stmt}, line {op.span.line}" if op.span else f"  # {op.stmt}"
        return [head + body + line]

    def repeat(self, op: Repeat, indent: str) -> list[str]:
        # .ein has no syntax for a reversed loop, stacked views of values or saved values:
        # they are shown as comments around the body.
        flags = " reverse" if op.reverse else ""
        staged = f"@{op.stage_axis}" if op.stage_axis else ""
        lines = [f"{indent}repeat {op.dim}{staged}{flags} {{"]
        inner = indent + "  "
        for view in op.stacked:
            lines.append(f"{inner}# stacked: {self(view.name)} is this trip's slice")
        for c in op.carried:
            lines.append(f"{inner}# carried: {self(c.value)} <- {self(c.body_result)}, "
                         f"after the loop {self(c.result.name)}")
        for inner_op in op.body:
            lines.extend(self.op(inner_op, inner))
        for s in op.saved:
            lines.append(f"{inner}# saved: {self(s.body_value)} of every trip as "
                         f"{self.spec(s.result.name, s.result.type)}")
        lines.append(f"{indent}}}")
        return lines


def format_grad(program: Program) -> str:
    """`program` (as `grad` returns it) as `.ein`-like text: valid `.ein` for programs without
    repeats; a repeat's stacked views, carried and saved values are comments, and the
    adjoint of take is written `scatter_add[V](...)`."""
    from .api import shown_path  # the file name with its line ends escaped: one comment line

    text = _Text(program)
    lines = [f"# {shown_path(program.file)} with its backward pass (einpar grad)"]
    if program.mesh.axes:
        lines.append("mesh " + " ".join(f"{a}={n}" for a, n in program.mesh.axes))
    if program.dims:  # `dim` with nothing after it is not .ein
        lines.append("dim  " + " ".join(f"{name}={size}" for name, size in program.dims))
    lines.append(f"dtype {program.dtype}")
    lines.append("")
    for value in program.inputs:
        kind = "param" if value.kind == "param" else "input"
        stacked = f"  # stacked by {','.join(value.stacked_by)}" if value.stacked_by else ""
        lines.append(f"{kind} {text.spec(value.name, value.type, value.layout)}: {value.type.dtype}"
                     f"{stacked}")
    lines.append("")
    first_backward = next((i for i, op in enumerate(program.ops)
                           if is_backward(op)), None)
    for position, op in enumerate(program.ops):
        if position == first_backward:
            lines.extend(["", "# the backward pass"])
        lines.extend(text.op(op, ""))
    lines.append("")
    values = program.values
    inputs = {value.name for value in program.inputs}
    for output in program.outputs:
        name = text(output.name)
        if output.name in inputs:  # an updated param or state: its own name is the input's
            shown = output.value
            lines.append(f"# the step's updated {output.name}")
            if output.layout is not None:
                lines.append(f"output {text.spec(shown, values[shown].type, output.layout)}")
            else:
                lines.append(f"output {text(shown)}")
            continue
        if text(output.value) != name:
            vtype = values[output.value].type
            lines.append(f"{text.spec(output.name, vtype, output.layout)}: {vtype.dtype} = "
                         f"{text.spec(output.value, vtype)}")
        if output.layout is not None:
            lines.append(f"output {text.spec(output.name, values[output.value].type, output.layout)}")
        else:
            lines.append(f"output {name}")
    return "\n".join(lines) + "\n"

