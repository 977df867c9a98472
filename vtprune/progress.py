"""Progress that works in a terminal and in a log.

In a terminal (stderr is a TTY) this is rich's live progress bar. Anywhere else (a pipe, a file, CI) rich
shows nothing until the end, so `Progress` prints plain lines instead: one when a task starts, then at most
one every `interval` seconds (default 10; environment variable `VTPRUNE_PROGRESS_INTERVAL`), and one when
it completes, e.g.

    compare: 3/12 (25%) pool @ 64, 41 s elapsed, ~2 min left

Progress goes to stderr, so stdout carries only results (`--format json | jq` works while it runs).
The class takes the subset of `rich.progress.Progress`'s interface that vtprune uses (columns, `add_task`,
`update`, `advance`, `start` / `stop`, the context manager; task fields such as `info=`), so a module
switches by changing its import.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

T = TypeVar("T")
DEFAULT_INTERVAL = 10.0


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("VTPRUNE_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def is_terminal(stream: IO | None = None) -> bool:
    """Whether progress written to `stream` (default stderr) is seen live by a person."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """41.3 -> '41 s'; 130 -> '2 min 10 s'; 7300 -> '2 h 02 min'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=lambda: time.monotonic())
    last_print: float = -1.0
    done_printed: bool = False


class PlainProgress:
    """Periodic plain-text progress lines (see the module docstring)."""

    def __init__(self, *columns: object, stream: IO | None = None, interval: float | None = None, **_: object):
        self.stream = stream
        self.interval = _interval() if interval is None else interval
        self.tasks: dict[int, _Task] = {}

    # rich-compatible API
    def start(self) -> None:
        pass

    def stop(self) -> None:
        for task in self.tasks.values():
            if not task.done_printed and task.completed > 0:
                self._print(task, force=True)

    def __enter__(self) -> PlainProgress:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0, **fields: Any) -> int:
        tid = len(self.tasks)
        self.tasks[tid] = _Task(description, total, float(completed), dict(fields))
        self._print(self.tasks[tid], force=True)
        return tid

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = float(completed)
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        task.fields.update(fields)
        finished = task.total is not None and task.completed >= task.total
        self._print(task, force=finished and not task.done_printed)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    # output
    def line(self, task: _Task) -> str:
        now = time.monotonic()
        elapsed = now - task.started
        if task.total is None and task.completed == 0:
            return f"{task.description}: started"
        parts = [f"{task.description}: {task.completed:g}"]
        if task.total:
            frac = min(1.0, task.completed / task.total)
            parts[0] += f"/{task.total:g} ({100 * frac:.0f}%)"
        info = " ".join(str(v) for v in task.fields.values() if v not in ("", None))
        if info:
            parts.append(info)
        parts.append(f"{duration(elapsed)} elapsed")
        if task.total and 0 < task.completed < task.total:
            parts.append(f"~{duration(elapsed * (task.total - task.completed) / task.completed)} left")
        return ", ".join(parts)

    def _print(self, task: _Task, force: bool = False) -> None:
        now = time.monotonic()
        if not force and task.last_print >= 0 and now - task.last_print < self.interval:
            return
        task.last_print = now
        if task.total is not None and task.completed >= task.total:
            task.done_printed = True
        stream = self.stream if self.stream is not None else sys.stderr
        print(self.line(task), file=stream, flush=True)


def Progress(*columns: object, stream: IO | None = None, **kwargs: Any):  # noqa: N802 - mirrors rich's class
    """rich's `Progress` (on stderr) in a terminal, `PlainProgress` lines elsewhere."""
    if not is_terminal(stream):
        return PlainProgress(*columns, stream=stream, interval=kwargs.pop("interval", None))
    from rich.console import Console
    from rich.progress import Progress as RichProgress

    kwargs.pop("interval", None)
    kwargs.setdefault("console", Console(file=stream if stream is not None else sys.stderr))
    return RichProgress(*columns, **kwargs)


def track(
    items: Iterable[T], description: str = "working", total: float | None = None, stream: IO | None = None
) -> Iterator[T]:
    """Iterate over `items` with progress (like `rich.progress.track`)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(stream=stream) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task, 1)
