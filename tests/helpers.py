"""What several test files share: the examples, their golden files, the check that a
backend's outputs equal the reference's, the environment of a several-process run, and a
small training step."""

import os
import socket
from pathlib import Path

from einpar.api import run_reference
from einpar.tolerance import compare, program_tolerance

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("**/*.ein"))
GOLDENS = Path(__file__).resolve().parent / "goldens"


def golden_path(example: Path, suffix: str) -> Path:
    """tests/goldens/<folder>__<name><suffix> of an example (suffix ".spmd", ".explain", ...)."""
    relative = example.relative_to(ROOT / "examples").with_suffix(suffix)
    return GOLDENS / str(relative).replace("/", "__")


def assert_matches_reference(program, outputs, inputs) -> None:
    """Every output of `program` within its dtype's tolerance of the reference's."""
    reference = run_reference(program, inputs)
    for output in program.outputs:
        found = compare(output.name, reference[output.name], outputs[output.name],
                        program_tolerance(program))
        assert found.ok, (output.name, found.error, found.tolerance)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a jax.distributed coordinator)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_environment() -> dict:
    """The environment of an `einpar run --coordinator ...` process: CPU devices, and none of
    this process's XLA or jax.distributed settings."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_two_processes(args: list[str]) -> list[dict]:
    """`einpar run ARGS --json` as two processes of one jax.distributed run on this host
    (four CPU devices each); each one's JSON, after asserting it exited 0 on 8 devices."""
    import json
    import subprocess
    import sys

    command = [sys.executable, "-m", "einpar", "run", *args, "--json", "--repeat", "1",
               "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id"]
    processes = [subprocess.Popen(command + [str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=process_environment(), start_new_session=True)
                 for i in range(2)]
    documents = []
    for process, (out, err) in zip(processes, [p.communicate(timeout=600) for p in processes]):
        assert process.returncode == 0, err
        document = json.loads(out)
        assert (document["devices"], document["num_processes"]) == (8, 2)
        documents.append(document)
    return documents


MLP_STEP = """\
mesh dp={n}
dim  B={B} D={D} F={F}
dtype {dtype}
input x[B@dp, D]
input t[B@dp, D]
param w1[D{split}, F]
param w2[F, D]
h[B,F] = gelu(x[B,D] * w1[D,F])
y[B,D] = h[B,F] * w2[F,D]
l[] : f32 = mean[B,D](square(y[B,D] - t[B,D]))
loss l
{training}
"""


LOOP_STEP = """\
mesh dp=4
dim  B=16 D=8 E=16 L=3
input x[B@dp, D]
repeat L{remat} {{
  param w1[D, E]
  param w2[E, D]
  h[B,E]    = tanh(x[B,D] * w1[D,E])
  x[B@dp,D] = x[B,D] + h[B,E] * w2[E,D]
}}
l[] = mean[B,D](square(x[B,D]))
loss l
optimizer sgd lr=0.1
{training}"""


def loop_step(remat: str = "", training: str = "") -> str:
    """A stack of L=3 two-layer blocks in `repeat` (` remat` after the dim to recompute each
    trip), data parallel over 4 devices, trained with SGD; `training` more declarations."""
    return LOOP_STEP.format(remat=remat, training=training)


def mlp_step(training: str, *, B: int, D: int, F: int, n: int = 4, dtype: str = "f32",
             split: str = "") -> str:
    """The training step of examples/training/mlp_data_parallel.ein (a two-layer MLP, its batch
    split over `dp` of `n` devices) at other sizes: `training` its training declarations
    (`optimizer ...`, `microbatches ...`, `output w1.grad`), `split` w1's first dim's layout
    (`@dp` for FSDP), the loss in float32 whatever `dtype` the rest is."""
    return MLP_STEP.format(n=n, B=B, D=D, F=F, dtype=dtype, split=split, training=training)
