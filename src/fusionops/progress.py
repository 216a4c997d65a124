"""Progress bars (rich) with a rate column, on stderr so stdout stays for results.

On a terminal they are bars. Elsewhere (a DVC stage, a Prefect run's log, a pipe) a bar repainted would be noise,
so the same progress is logged as a line every LOG_EVERY seconds and once at the end: the flow's log shows how far
the features stage is.
"""

from __future__ import annotations

import logging
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger(__name__)
LOG_EVERY = 10.0  # seconds between progress lines off a terminal


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:7.1f} {self.unit}/s" if speed else f"      ? {self.unit}/s")


class LoggedProgress(Progress):
    """A Progress that draws nothing and logs each task's columns (all but the bar) as a line instead: every
    LOG_EVERY seconds while it moves, when it finishes, and when the progress ends (if anything changed since)."""

    def __init__(self, *columns, **kwargs):
        super().__init__(*columns, **kwargs)
        self._said: dict[TaskID, tuple[float, str]] = {}  # task -> (when, state) last logged

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._say(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def stop(self) -> None:
        for task in self.tasks:
            self._say(task.id, now=True)
        super().stop()

    def _text(self, task: Task, *, times: bool = True) -> str:
        skip = (BarColumn,) if times else (BarColumn, TimeElapsedColumn, TimeRemainingColumn)
        shown = (c.render(task).plain.strip() for c in self.columns
                 if isinstance(c, ProgressColumn) and not isinstance(c, skip))
        return "  ".join(filter(None, shown))

    def _say(self, task_id: TaskID, *, now: bool = False) -> None:
        task = next(t for t in self.tasks if t.id == task_id)
        state = self._text(task, times=False)
        when, said = self._said.setdefault(task_id, (time.monotonic(), ""))
        if state != said and (now or task.finished or time.monotonic() - when >= LOG_EVERY):
            log.info("%s", self._text(task))
            self._said[task_id] = (time.monotonic(), state)


def progress_bar(*extra: ProgressColumn, unit: str | None = "items", disable: bool = False) -> Progress:
    """A bar with done/total, the rate in `unit`/s, elapsed and remaining time, plus any extra columns.

    Drawn only on a terminal; elsewhere (under DVC or Prefect the output is a log) the same columns are logged as a
    line now and then (LoggedProgress). `disable`: neither.
    """
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        *([RateColumn(unit)] if unit else []),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    if disable or console.is_terminal:
        return Progress(*columns, console=console, disable=disable)
    return LoggedProgress(*columns, console=console, disable=True)
