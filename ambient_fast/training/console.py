"""What a person sees of long work, and what a run keeps of it.

- `WorkProgress`: the progress of one piece of work (training steps, images sampled or restored). On a
  terminal, a live bar; where output is not a terminal (a file, a pipe, a job's log), plain lines as
  the work goes, one every `PLAIN_INTERVAL` seconds and the last at the end, at full width: nothing
  is held back until the end, nothing cut at 80 columns.
- `RunLog`: a run's log.txt, everything the console showed (stdout and stderr) from the command's
  start, appended on resume (as EDM keeps one). While a live bar shows, the log gets the bar's plain lines instead of its
  terminal drawing, and lines printed meanwhile still reach both.
- `print_rows`: a short labelled table, aligned, never wrapped where output is not a terminal.

Nothing here imports torch: the commands' light side may use it.
"""
from __future__ import annotations

import io
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, TextIO, Tuple

__all__ = ["WorkProgress", "RunLog", "print_rows", "log_only", "duration", "PLAIN_INTERVAL"]

PLAIN_INTERVAL = 10.0  # seconds between plain progress lines (output that is not a terminal)
_WIDE = 100_000  # the width of a console that is not a terminal: as wide as what it prints

_active_log: Optional["RunLog"] = None  # the RunLog of this process while it is open


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _console(file: Optional[TextIO] = None):
    """A rich Console on `file` (sys.stdout by default): a terminal's own width, else unbounded."""
    from rich.console import Console

    file = file or sys.stdout
    terminal = file.isatty()
    return Console(file=file, width=None if terminal else _WIDE, highlight=False, soft_wrap=not terminal)


def print_rows(rows: Sequence[Tuple[str, str]]) -> None:
    """Print (label, value) rows as two aligned columns on stdout: values wrapped to a terminal's
    width, never wrapped elsewhere, no trailing blanks."""
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for label, value in rows:
        table.add_row(label, value)
    console = _console()
    with console.capture() as captured:
        console.print(table)
    print("\n".join(line.rstrip() for line in captured.get().splitlines()), flush=True)


def log_only(text: str) -> None:
    """Write `text` (a line, newline added) to the open RunLog only, not to the console: detail that
    belongs in the run's record. Nothing when no RunLog is open (e.g. on other ranks)."""
    if _active_log is not None:
        _active_log.write(text.rstrip("\n") + "\n")


class _Tee(io.TextIOBase):
    """A stream that writes to the console stream it replaced and to the run's log file. While a
    live bar shows, console text goes through the bar's console (`route`), so it lands above the bar."""

    def __init__(self, stream: TextIO, log: Optional[TextIO]):
        self.stream, self.log = stream, log  # log None: the console only
        self._target: TextIO = stream

    def route(self, target: Optional[TextIO]) -> None:
        self.flush()
        self._target = target if target is not None else self.stream

    def write(self, text: str) -> int:
        if self.log is not None:
            self.log.write(text)
            if "\n" in text:
                self.log.flush()
        self._target.write(text)
        return len(text)

    def flush(self) -> None:
        if self.log is not None:
            self.log.flush()
        self._target.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


class RunLog:
    """Everything written to stdout and stderr from `open()` to `close()`, kept for a run's log.txt:
    held in memory until `attach(path)` names the file (a run's folder is claimed only once its
    trainer is built, and what was printed meanwhile belongs in its log too), then appended there
    (a resumed run continues its log), each session starting with a line that says when and what
    ran. One per process; `write` adds to the log alone."""

    def __init__(self):
        self.file: Optional[TextIO] = io.StringIO()
        self.path: Optional[Path] = None
        self._saved: Optional[Tuple[TextIO, TextIO]] = None

    def open(self) -> "RunLog":
        global _active_log
        if _active_log is not None:
            raise RuntimeError("a run log is open already")
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)
        _active_log = self
        return self

    def attach(self, path) -> None:
        """Append what was written so far, and all that follows, to `path`; None: keep no log (a
        rank other than the main one), only the console."""
        held = self.file.getvalue()
        self.file = None if path is None else open(path, "a", encoding="utf-8")
        self.path = None if path is None else Path(path)
        if self.file is not None:
            command = " ".join(shlex.join(sys.orig_argv).splitlines())  # one line, whatever the arguments
            self.file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n{held}")
            self.file.flush()
        for tee in self.tees():
            tee.log = self.file

    def close(self) -> None:
        global _active_log
        if self._saved is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = self._saved
        self._saved = None
        if self.file is not None:
            self.file.close()
        self.file = None
        _active_log = None

    def write(self, text: str) -> None:
        if self.file is not None:
            self.file.write(text)
            self.file.flush()

    def tees(self) -> "list[_Tee]":
        return [stream for stream in (sys.stdout, sys.stderr) if isinstance(stream, _Tee)]


class WorkProgress:
    """Progress of one piece of work, in `unit`s out of `total`.

    `with WorkProgress("sampling", 64, "images") as progress: progress.update(advance=8)`; `info`
    (loss, rate, ...) is shown beside the count. The ETA comes from the pace since the start
    (`completed` at the start counts as done before: a resumed run's ETA is its own pace's). On a
    terminal a live bar; elsewhere a plain line every `interval` seconds (PLAIN_INTERVAL) and at the
    end; with a RunLog open, its log gets those plain lines in either case. `enabled=False` (other
    ranks) shows nothing.
    """

    def __init__(self, description: str, total: float, unit: str, completed: float = 0, enabled: bool = True,
                 interval: Optional[float] = None):
        self.description, self.total, self.unit, self.enabled = description, float(total), unit, enabled
        self.completed = self._start = float(completed)
        self.interval = PLAIN_INTERVAL if interval is None else interval
        self.info = ""
        self._bar = self._task = None
        self._started = self._last_line = 0.0
        self._shown: Optional[tuple] = None  # (completed, info) of the last plain line

    # -- what is shown ------------------------------------------------------------------------------

    def eta(self) -> str:
        elapsed, done = time.monotonic() - self._started, self.completed - self._start
        if self.completed >= self.total:
            return "0 s"
        if done <= 0 or elapsed <= 0:
            return "?"
        return duration((self.total - self.completed) * elapsed / done)

    def count(self) -> str:
        number = (lambda v: f"{v:.0f}" if v == int(v) else f"{v:.1f}")
        return f"{number(self.completed)}/{number(self.total)} {self.unit}"

    def line(self) -> str:
        """The plain line of the current state."""
        percent = 100 * self.completed / self.total if self.total else 100.0
        text = (f"{self.description}: {self.count()} ({percent:.0f}%), "
                f"{duration(time.monotonic() - self._started)} elapsed, ETA {self.eta()}")
        return f"{text} | {self.info}" if self.info else text

    # -- the display --------------------------------------------------------------------------------

    def __enter__(self) -> "WorkProgress":
        self._started = time.monotonic()
        if not self.enabled:
            return self
        if sys.stdout.isatty():
            self._start_bar()
        self._emit(force=True)
        return self

    def _start_bar(self) -> None:
        from rich.file_proxy import FileProxy
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        tees = _active_log.tees() if _active_log is not None else []
        console = _console(tees[0].stream if tees else sys.stdout)
        # Under a RunLog the tees route printed lines above the bar (and into the log); otherwise
        # rich redirects stdout and stderr itself.
        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                             TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[info]}"),
                             console=console, redirect_stdout=not tees, redirect_stderr=not tees)
        self._task = self._bar.add_task(self.description, total=self.total, completed=self.completed,
                                        count=self.count(), eta=self.eta(), info=self.info)
        self._bar.start()
        for tee in tees:
            tee.route(FileProxy(console, tee.stream))

    def update(self, completed: Optional[float] = None, advance: float = 0, info: Optional[str] = None) -> None:
        if completed is not None:
            self.completed = float(completed)
        self.completed = min(self.completed + advance, self.total)
        if info is not None:
            self.info = info
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, count=self.count(), eta=self.eta(), info=self.info)
        self._emit()

    def _emit(self, force: bool = False) -> None:
        """The plain line, every `interval` seconds: on stdout when there is no bar, else to the log."""
        now = time.monotonic()
        if not force and now - self._last_line < self.interval:
            return
        self._last_line, self._shown = now, (self.completed, self.info)
        line = self.line()
        if self._bar is not None:
            log_only(line)
        else:
            print(line, flush=True)

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, count=self.count(), eta=self.eta(), info=self.info)
            if _active_log is not None:
                for tee in _active_log.tees():
                    tee.route(None)
            self._bar.stop()
        if self._shown != (self.completed, self.info):  # the end state, unless its line was the last
            self._emit(force=True)
