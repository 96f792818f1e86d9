"""docs/attention.md's closing table: every figure recomputed from einpar itself.

The table compares the parallelism schemes on one model size and one
cluster. This test prices each scheme's example again and compares the
table row by row, after checking that each row's bytes-per-device formula,
evaluated at the example's sizes, is the number einpar's program sends;
`--update-goldens` rewrites the table.
"""

import re
from pathlib import Path

from einpar.api import compile_spmd, load
from einpar.cost_model.cluster import preset
from einpar.cost_model.estimate import estimate
from einpar.spmd import collectives
from einpar.units import format_bytes, format_seconds

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "docs" / "attention.md"
BEGIN, END = "<!-- comparison table: tests/test_lecture_notes.py -->", "<!-- end of table -->"
CLUSTER = "h100x8"
SIZES = {"B": 8, "S": 4096, "D": 4096, "H": 32, "K": 128}
SCHEMES = [  # (scheme, example, the bytes per device as a formula, f32 = 4 bytes)
    ("data parallel", "attention/data_parallel.ein", "0"),
    ("Megatron tensor parallel", "attention/tensor_parallel.ein",
     "4(tp-1)/tp (B/dp·S·H/tp·K + H·K·D + B/dp·S·D)"),
    ("Megatron sequence parallel", "attention/sequence_parallel.ein",
     "2 · 4(tp-1)/tp · B/dp·S·D"),
    ("context parallel (gather K/V)", "attention/context_parallel.ein",
     "2 · 4(sp-1)/sp · B/dp·S·H·K"),
    ("Ulysses", "attention/ulysses.ein", "4 · 4(sp-1)/sp · B/dp·S/sp·H·K"),
    ("FSDP", "attention/fsdp.ein", "4 · 4(dp-1)/dp · D·H·K"),
]
MOE = ("expert parallel MoE", "moe/gshard.ein", "2 · 4(ep-1)/ep · E·G/ep·C·D",
       {"G": 8, "S": 4096, "D": 4096, "C": 2048, "F": 16384})


def evaluate(formula: str, sizes: dict) -> float:
    """A formula as the table writes it (`4(tp-1)/tp · B/dp·S·D`), at `sizes`."""
    python = formula.replace("·", "*")
    python = re.sub(r"([0-9A-Za-z)])\s*\(", r"\1*(", python)  # 4(...) and tp (...): products
    return eval(python, {"__builtins__": {}}, dict(sizes))


def row(scheme: str, example: str, formula: str, sizes: dict) -> str:
    program = load(ROOT / "examples" / example, overrides=sizes)
    spmd = compile_spmd(program)
    result = estimate(program, spmd, preset(CLUSTER))
    # The formula shown is the bytes einpar's program sends.
    assert round(evaluate(formula, {**dict(program.dims), **dict(program.mesh.axes)})) == \
        result.bytes_per_device, (scheme, formula)
    kinds: dict[str, int] = {}
    for step in collectives(spmd):
        kinds[step.kind] = kinds.get(step.kind, 0) + 1
    moves = ", ".join(f"{n} {kind.replace('_', '-')}" for kind, n in kinds.items()) or "none"
    mesh = " ".join(f"{a}={n}" for a, n in program.mesh.axes)
    return (f"| {scheme} | `{example}` | {mesh} | {moves} | {formula} | "
            f"{format_bytes(result.bytes_per_device)} | "
            f"{format_seconds(result.comm_s)} | {format_seconds(result.step_time_s)} | "
            f"{format_bytes(result.peak_memory_bytes)} |")


def table() -> str:
    lines = ["| scheme | example | mesh | collectives | bytes per device | einpar | comm | step | "
             "peak memory |", "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [row(scheme, example, formula, SIZES) for scheme, example, formula in SCHEMES]
    lines.append(row(*MOE))
    return "\n".join(lines)


def test_the_comparison_table_is_what_einpar_computes(update_goldens):
    text = NOTES.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    computed = "\n" + table() + "\n"
    if update_goldens:
        NOTES.write_text(text[:start] + computed + text[end:])
        return
    assert text[start:end] == computed
