"""Several processes form one mesh through jax.distributed (on 127.0.0.1, gloo CPU collectives).

Each test starts real `einpar run --backend jax --coordinator ...` processes:
two processes with four CPU devices each run an 8-device program, and each
checks its own blocks against the reference. A run whose peer dies (E402) or
whose coordinator never answers (E401) is tested in test_diagnostics.py.
"""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "examples/attention/tensor_parallel.ein")  # mesh dp=2 tp=4


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment() -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def start(process_id: int, port: int, *extra: str) -> subprocess.Popen:
    """`einpar run` as one process of two, in a session of its own (with its JAX worker)."""
    command = [sys.executable, "-m", "einpar", "run", EXAMPLE, "--backend", "jax",
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
               "--process-id", str(process_id), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment(), start_new_session=True)


def first_line(process: subprocess.Popen, timeout: float = 120) -> str:
    """The first line a process prints, waited for at most `timeout` seconds."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert line, f"no output within {timeout} s"
    return line[0]


def test_two_processes_of_four_cpu_devices_run_an_eight_device_program():
    port = free_port()
    processes = [start(i, port, "--json", "--repeat", "2") for i in range(2)]
    results = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, results):
        assert process.returncode == 0, err
        assert "[Gloo]" not in out and "[Gloo]" not in err
    documents = [json.loads(out) for out, _ in results]
    assert [d["process_id"] for d in documents] == [0, 1]
    for document in documents:
        assert (document["devices"], document["num_processes"], document["platform"]) == (8, 2, "cpu")
        assert document["outputs"]["y"]["ok"] is True
        assert document["outputs"]["y"]["error"] < 1e-5


def test_the_environment_variables_stand_for_the_flags():
    port = free_port()
    processes = []
    for i in range(2):
        env = dict(environment(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "einpar", "run", EXAMPLE, "--backend", "jax", "--repeat", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for i, process in enumerate(processes):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert f"on process {i} of 2, 4 of 8 cpu devices" in out.splitlines()[0]
