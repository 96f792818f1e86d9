"""Several processes form one mesh through jax.distributed (on 127.0.0.1, gloo CPU collectives).

Each test starts real `einpar run --backend jax --coordinator ...` processes:
two processes with four CPU devices each run an 8-device program, and each
checks its own blocks against the reference. A run whose peer dies (E402) or
whose coordinator never answers (E401) is tested in test_diagnostics.py. A
process stopped by a signal takes its JAX worker with it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import free_port, process_environment

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "examples/attention/tensor_parallel.ein")  # mesh dp=2 tp=4


def start(process_id: int, port: int, *extra: str) -> subprocess.Popen:
    """`einpar run` as one process of two, in a session of its own (with its JAX worker)."""
    command = [sys.executable, "-m", "einpar", "run", EXAMPLE, "--backend", "jax",
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
               "--process-id", str(process_id), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=process_environment(), start_new_session=True)


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
        env = dict(process_environment(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "einpar", "run", EXAMPLE, "--backend", "jax", "--repeat", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for i, process in enumerate(processes):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert f"on process {i} of 2, 4 of 8 cpu devices" in out.splitlines()[0]


# ---- a stopped run leaves no worker behind


def children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and alive(int(entry.name)):
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker through /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL],
                         ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_a_stopped_process_takes_its_jax_worker_with_it(signum):
    port = free_port()  # nobody serves it: the worker waits for the coordinator
    supervisor = start(1, port, "--timeout", "300")
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while not workers and time.monotonic() < deadline and supervisor.poll() is None:
        time.sleep(0.2)
        workers = children(supervisor.pid)
    assert len(workers) == 1, "the worker never started"
    worker = workers[0]
    time.sleep(3)  # well into its wait for the coordinator
    assert alive(worker)
    supervisor.send_signal(signum)  # to the supervisor alone, not its process group
    stopped = time.monotonic()
    try:
        supervisor.wait(timeout=30)
        while alive(worker) and time.monotonic() - stopped < 10:
            time.sleep(0.1)
        assert not alive(worker), "the worker outlived its supervisor"
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
        supervisor.communicate(timeout=30)
    expected = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 130, signal.SIGKILL: -signal.SIGKILL}
    assert supervisor.returncode == expected[signum]
