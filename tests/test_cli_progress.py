"""Progress in logs (issue 27): off a terminal every long command prints plain periodic lines on stderr (rich's
bar would stay silent until the end); in a terminal it is rich's bar."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from vtprune import progress


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_when_not_a_terminal(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    stream = io.StringIO()
    bar = progress.Progress(stream=stream, interval=10)
    assert isinstance(bar, progress.PlainProgress)
    with bar:
        task = bar.add_task("compare", total=4)
        for i in range(4):
            clock.t += 6  # a line at most every 10 s, and always the last one
            bar.update(task, advance=1, description=f"compare: cell {i}")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "compare: 0/4 (0%), 0 s elapsed"
    assert lines[1].startswith("compare: cell 1: 2/4 (50%), 12 s elapsed, ~12 s left")
    assert lines[-1].startswith("compare: cell 3: 4/4 (100%), 24 s elapsed")
    assert len(lines) == 3  # start, t = 12, t = 24 (finished); t = 6 and t = 18 fell inside the interval


def test_rich_columns_and_fields_are_accepted_and_shown():
    from rich.progress import BarColumn, TextColumn

    stream = io.StringIO()
    bar = progress.Progress(TextColumn("x"), BarColumn(), stream=stream, interval=0, transient=True)
    bar.start()
    task = bar.add_task("train", total=2, completed=0, info="")
    bar.update(task, completed=1, info="loss 0.5")
    bar.advance(task, 1)
    bar.stop()
    text = stream.getvalue()
    assert "train: 1/2 (50%), loss 0.5" in text and "train: 2/2 (100%)" in text


def test_rich_bar_in_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "is_terminal", lambda stream=None: True)
    from rich.progress import Progress as RichProgress

    assert isinstance(progress.Progress(stream=io.StringIO()), RichProgress)


def test_track_yields_every_item():
    stream = io.StringIO()
    assert list(progress.track(range(3), "scoring", stream=stream)) == [0, 1, 2]
    assert "scoring: 3/3 (100%)" in stream.getvalue()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from vtprune.testbed import build_processor
    from vtprune.testbed.model import TINY, build_model

    path = tmp_path_factory.mktemp("tiny-progress")
    build_model(TINY, seed=0).save_pretrained(path)
    build_processor().save_pretrained(path)
    return path


def test_eval_logs_progress_lines_when_piped(tiny_dir):
    """A real `vtprune eval` with stdout and stderr piped (as in a log): stderr has the scoring lines."""
    env = {**os.environ, "VTPRUNE_PROGRESS_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vtprune.cli", "eval", "--model", str(tiny_dir), "--method", "pool", "--budget",
           "64", "--n", "1", "--batch", "2", "--rounds", "1", "--format", "csv"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("scoring:")]
    assert lines[0] == "scoring: 0/3 (0%), 0 s elapsed" and lines[-1].startswith("scoring: 3/3 (100%)")
    assert len(lines) == 4  # one per batch of 2 (6 questions) plus the start line
    assert proc.stdout.splitlines()[0].startswith("method,budget,accuracy")  # stdout: only the result
