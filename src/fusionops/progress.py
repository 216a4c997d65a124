"""Progress bars (rich) with a rate column, on stderr so stdout stays for results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:7.1f} {self.unit}/s" if speed else f"      ? {self.unit}/s")


def progress_bar(*extra: ProgressColumn, unit: str | None = "items", disable: bool = False) -> Progress:
    """A bar with done/total, the rate in `unit`/s, elapsed and remaining time, plus any extra columns.

    Drawn only on a terminal: under DVC or Prefect the output is a log, and the stages log their own summary.
    """
    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        *([RateColumn(unit)] if unit else []),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable or not console.is_terminal,
    )
