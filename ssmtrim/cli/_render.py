"""Rendering helpers: Rich tables for people, plain JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def key_value_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, str(value))
    return table


class ProgressRenderer:
    """Turns the library's ``progress(stage, done, total)`` callbacks into Rich progress bars (one per stage)."""

    def __init__(self, quiet: bool = False) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.quiet = quiet
        self._progress = Progress(TextColumn("{task.description:28s}"), BarColumn(), MofNCompleteColumn(),
                                  TimeRemainingColumn(), console=Console(stderr=True), transient=False,
                                  disable=quiet)
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> ProgressRenderer:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)


def epoch_printer(show: bool) -> Callable[[dict[str, Any]], None]:
    """A training ``log`` callback that prints each epoch's held-out top-1 when ``show`` (else it prints nothing)."""

    def log(record: dict[str, Any]) -> None:
        if show and "eval_top1" in record:
            console.print(f"epoch {record['epoch']}: eval top-1 {record['eval_top1']:.2f}% ({record['wall_s']:.0f} s)")

    return log
