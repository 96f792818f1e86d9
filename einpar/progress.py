"""A progress bar for work that takes a while, on stderr.

The work calls `tick()` once per unit (an op, a step, a repeat trip); a
background thread draws the count with rich. Nothing is drawn for work that
ends within DELAY_S, nor when stderr is not a terminal, and the bar vanishes
when the work ends, so pipes, logs and `--json` output stay as they were.
`tick` only adds one to a counter, so the evaluators' loops barely notice it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

DELAY_S = 1.5  # shorter work shows no bar: it would only flicker
REFRESH_S = 0.1


class ProgressBar:
    """`with ProgressBar(console, total, "running") as bar: work(tick=bar.tick)`."""

    def __init__(self, console: Console, total: int, description: str, enabled: bool = True):
        self.total = max(1, total)
        self.done = 0
        self.enabled = enabled and console.is_terminal
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            console=console, transient=True, auto_refresh=False,
            redirect_stdout=False, redirect_stderr=False)  # other output goes where it goes
        self._task = self._progress.add_task(description, total=self.total)
        self._shown = False
        self._lock = threading.Lock()  # the bar is drawn or hidden by one thread at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        self.done += 1

    def _draw(self) -> None:
        if self._stop.wait(DELAY_S):
            return
        while True:
            with self._lock:
                if self._stop.is_set():
                    break
                if not self._shown:
                    self._progress.start()
                    self._shown = True
                self._progress.update(self._task, completed=min(self.done, self.total))
                self._progress.refresh()
            if self._stop.wait(REFRESH_S):
                break

    def _hide(self) -> None:
        if self._shown:
            self._progress.stop()
            self._shown = False

    @contextmanager
    def paused(self):
        """Hide the bar while something else is printed to the terminal; it comes back after."""
        with self._lock:
            self._hide()
            yield

    def stop(self) -> None:
        """The work is done: the bar goes, and does not come back."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            self._hide()

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            self._thread = threading.Thread(target=self._draw, name="einpar-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
