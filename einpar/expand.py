"""Expand library ops into primitive ones before partitioning (Program -> Program).

softmax, logsumexp, rmsnorm and layernorm become the reductions and maps
they are made of, and `mean` becomes a sum and a scale, so the partitioner
needs no rules of their own: a softmax over a split index becomes a local
max (a partial maximum, finished by an all-reduce of max), a local sum (a
partial sum) and maps. cumsum and route stay whole: they need their index
(cumsum) or their experts and tokens (route) on one device.

Intermediate values are named after the op they come from (`p.max`,
`p.exp`, ...) and computed in f32 when the result is half precision, as the
reference backend does.
"""

from __future__ import annotations

from dataclasses import replace

from .ir import (NORM_EPSILON, Apply, Arg, Const, Library, Map, Op, Operand, Program, Reduce,
                 Repeat, TensorType, Value, work_dtype)


class _Expander:
    def __init__(self, program: Program):
        self.sizes = program.dim_sizes

    def value(self, base: Value, suffix: str, indices: tuple[str, ...], dtype: str) -> Value:
        shape = tuple(self.sizes[i] for i in indices)
        return Value(f"{base.name}.{suffix}", TensorType(dtype, indices, shape))

    def ops(self, ops: tuple[Op, ...]) -> tuple[Op, ...]:
        out: list[Op] = []
        for op in ops:
            if isinstance(op, Repeat):
                out.append(replace(op, body=self.ops(op.body)))
            elif isinstance(op, Library) and op.kind != "cumsum":
                out.extend(self.library(op))
            elif isinstance(op, Reduce) and op.kind == "mean":
                out.extend(self.mean(op))
            else:
                out.append(op)
        return tuple(out)

    def mean(self, op: Reduce) -> list[Op]:
        count = 1
        for index in op.over:
            count *= self.sizes[index]
        total = replace(op.result, name=f"{op.result.name}.sum", layout=None)
        summed = Reduce(total, "sum", op.operand, op.over, op.stmt, op.span)
        scale = Map(op.result, (Operand(total.name, total.type.indices),),
                    Apply("div", (Arg(0), Const(count))), op.stmt, op.span)
        return [summed, scale]

    def library(self, op: Library) -> list[Op]:
        x, index, result = op.operand, op.index, op.result
        work = work_dtype(result.type.dtype)
        kept = tuple(i for i in x.indices if i != index)
        stmt, span = op.stmt, op.span
        if op.kind in ("softmax", "logsumexp"):
            peak = self.value(result, "max", kept, work)
            exp = self.value(result, "exp", x.indices, work)
            total = self.value(result, "sum", kept, work)
            ops: list[Op] = [
                # The max cancels (softmax = exp(x - m) / sum exp(x - m) for any m), so its
                # gradient is zero and the backward pass skips it, as JAX's softmax and
                # logsumexp do with stop_gradient: no all-reduce of a zero over a split index.
                Reduce(peak, "max", x, (index,), stmt, span, stop_gradient=True),
                Map(exp, (x, Operand(peak.name, kept)),
                    Apply("exp", (Apply("sub", (Arg(0), Arg(1))),)), stmt, span),
                Reduce(total, "sum", Operand(exp.name, x.indices), (index,), stmt, span),
            ]
            if op.kind == "softmax":
                ops.append(Map(result, (Operand(exp.name, x.indices), Operand(total.name, kept)),
                               Apply("div", (Arg(0), Arg(1))), stmt, span))
            else:
                ops.append(Map(result, (Operand(peak.name, kept), Operand(total.name, kept)),
                               Apply("add", (Arg(0), Apply("log", (Arg(1),)))), stmt, span))
            return ops
        count = self.sizes[index]
        ops = []
        if op.kind == "layernorm":
            mean = self.value(result, "mean", kept, work)
            centered = self.value(result, "centered", x.indices, work)
            mean_sum = self.value(result, "mean.sum", kept, work)
            ops += [Reduce(mean_sum, "sum", x, (index,), stmt, span),
                    Map(mean, (Operand(mean_sum.name, kept),), Apply("div", (Arg(0), Const(count))),
                        stmt, span),
                    Map(centered, (x, Operand(mean.name, kept)), Apply("sub", (Arg(0), Arg(1))),
                        stmt, span)]
            x = Operand(centered.name, x.indices)
        assert op.kind in ("rmsnorm", "layernorm")
        squares = self.value(result, "square", x.indices, work)
        total = self.value(result, "sumsq", kept, work)
        ops += [Map(squares, (x,), Apply("square", (Arg(0),)), stmt, span),
                Reduce(total, "sum", Operand(squares.name, x.indices), (index,), stmt, span),
                Map(result, (x, Operand(total.name, kept)),
                    Apply("mul", (Arg(0), Apply("rsqrt", (Apply("add", (
                        Apply("div", (Arg(1), Const(count))), Const(NORM_EPSILON))),)))),
                    stmt, span)]
        return ops


def expand_library(program: Program) -> Program:
    """The same program with softmax, logsumexp, rmsnorm, layernorm and mean in primitive ops."""
    return replace(program, ops=_Expander(program).ops(program.ops))
