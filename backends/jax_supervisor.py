"""Supervise one process of a multi-process JAX run, so that it fails with a clear error.

When a peer of a `jax.distributed` run dies, or the coordinator never
answers, JAX's coordination client aborts the whole process with a C++ log
and stack trace. So `einpar run ... --coordinator` does its JAX work in a
child process (the same command, marked as the worker) and watches it:

- the child's standard output passes through (the child sends what JAX's
  C++ code prints there to standard error), and its standard error is kept
  until it exits, then shown without JAX's and gloo's log lines
  (EINPAR_DEBUG=1 shows everything);
- if the child aborts, the log says why, and the user sees E401 (it never
  joined the mesh) or E402 (a peer was lost during the run);
- if the child outlives the run's time limit it is killed, with E401 if it
  had not joined the mesh by then, else E402;
- the child dies with the supervisor: a SIGTERM, SIGHUP or SIGINT to the
  supervisor kills it first, and should the supervisor die anyway (SIGKILL),
  the child sees its standard input, a pipe only the supervisor holds, close
  and exits (a worker left behind would hold its devices and keep its peers
  waiting for their whole timeout).

This module does not import JAX.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

from einpar.errors import Diagnostic

WORKER_ENV = "EINPAR_JAX_WORKER"
# The worker writes this line to its standard error once it has joined the mesh.
JOINED = "einpar-worker: joined the mesh"

# Lines written by JAX's C++ runtime (absl logging) or by gloo, not by einpar. Gloo's
# threads write pieces of lines at once, so a piece is recognized by its words too.
_RUNTIME_LOG = re.compile(r"^([EWFI]\d{4} \d\d:\d\d:\d\d|\*\*\* |    @ )|\[Gloo\]|connected peer ranks")


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def exit_with_supervisor() -> None:
    """In the worker: exit as soon as the supervisor is gone, however it went (its end of
    the standard input pipe closes)."""
    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(1)

    threading.Thread(target=watch, name="einpar-supervisor-watch", daemon=True).start()


class _Stopped(Exception):
    """The supervisor was asked to stop by a signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise _Stopped(signum)


def keep_runtime_output_apart() -> None:
    """In the worker: what C++ code writes to standard output (gloo's log) goes to standard
    error, which the supervisor filters; Python's own output keeps the real standard output."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(real_stdout, "w", buffering=1, encoding="utf-8", closefd=True)


def supervise(argv: list[str], coordinator: str, process_id: int, num_processes: int,
              timeout_s: float) -> tuple[int, list[Diagnostic]]:
    """Run `einpar *argv` as the worker; returns (exit code, diagnostics to show)."""
    env = dict(os.environ, **{WORKER_ENV: "1", "PYTHONUNBUFFERED": "1"})
    # A signal that stops the supervisor stops the worker first (signal handlers can only
    # be set from the main thread; elsewhere the closing pipe still ends the worker).
    stopping = (signal.SIGTERM, signal.SIGHUP) if hasattr(signal, "SIGHUP") else (signal.SIGTERM,)
    main_thread = threading.current_thread() is threading.main_thread()
    previous: dict = {}
    child = None
    try:
        if main_thread:  # inside the try: a signal right after this is handled like any other
            for signum in stopping:
                previous[signum] = signal.signal(signum, _raise_stopped)
        child = subprocess.Popen([sys.executable, "-m", "einpar", *argv], stdin=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=env, text=True, errors="replace")
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(child.stderr), daemon=True)
        reader.start()
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            code = None
    except (KeyboardInterrupt, _Stopped) as stop:
        # A second signal (schedulers send several) must not cut the clean-up short.
        ignored = {signum: signal.signal(signum, signal.SIG_IGN)
                   for signum in (*stopping, signal.SIGINT)} if main_thread else {}
        if child is not None:
            child.kill()
            child.wait()
        for signum, handler in ignored.items():
            if signum not in previous:  # the finally clause puts back the others
                signal.signal(signum, handler)
        return 128 + getattr(stop, "signum", signal.SIGINT), []
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child is not None and child.stdin is not None:
            child.stdin.close()
    debug = bool(os.environ.get("EINPAR_DEBUG"))
    who = f"process {process_id} of {num_processes}"
    reader.join(timeout=5)
    log = "".join(lines)
    if debug:
        sys.stderr.write(log)
    elif code is not None and code >= 0:
        sys.stderr.write("".join(line for line in lines
                                 if not _RUNTIME_LOG.search(line) and line.strip() != JOINED))
    sys.stderr.flush()
    joined = any(line.strip() == JOINED for line in lines)
    if code is None and not joined:
        return 1, [cannot_join(who, coordinator, timeout_s)]
    if code is None:
        return 1, [Diagnostic("E402", f"{who} did not finish within {timeout_s:g} s",
                              hint="another process may have died or stopped answering; "
                                   "--timeout sets the limit")]
    if code >= 0:
        return code, []
    return 1, [_explain_abort(log, who, coordinator, timeout_s)]  # killed by a signal: an abort


def _explain_abort(log: str, who: str, coordinator: str, timeout_s: float) -> Diagnostic:
    if JOINED not in log:
        return cannot_join(who, coordinator, timeout_s)
    if "unhealthy" in log or "heartbeat" in log or "PollForError" in log:
        return Diagnostic("E402", f"{who} stopped: another process of the run died",
                          hint="see that process's output for why; EINPAR_DEBUG=1 shows JAX's log")
    return Diagnostic("E402", f"{who} ended abnormally in JAX's runtime",
                      hint="EINPAR_DEBUG=1 shows JAX's log")


def cannot_join(who: str, coordinator: str, timeout_s: float) -> Diagnostic:
    return Diagnostic("E401", f"{who} could not join the mesh through the coordinator at "
                              f"{coordinator} within {timeout_s:g} s",
                      hint="is every process running with the same --coordinator and "
                           "--num-processes, and is process 0's port reachable?")
