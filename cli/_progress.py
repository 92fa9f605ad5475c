"""The CLI's progress displays, one style for `train`, `sample` and `nll`: rich bars (and a
spinner for a single solve) when stderr is a terminal, plain lines otherwise."""

import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


def interactive() -> bool:
    return sys.stderr.isatty()


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


class RichTrainProgress:
    """`train`'s progress (an `nfdm_de.ProgressSink`): the phase, steps done, the loss and its
    terms, steps/s measured after compilation and the time left in the phase. `log` prints
    messages above the bar."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = _bar(self.console)
        self.task = None

    def log(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def update(self, report) -> None:
        status = report.status()
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(
                report.phase, total=report.total, completed=report.step, status=status
            )
        else:
            self.progress.update(
                self.task, completed=report.step, description=report.phase, status=status
            )

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


class ExamplesProgress:
    """Examples done out of `total` for `nll`: a bar with examples/s and the time left on a
    terminal, else a line per update."""

    def __init__(self, label: str, total: int, console: Console | None = None):
        self.label, self.total, self.done = label, total, 0
        self.console = console or Console(stderr=True)
        self.started = time.perf_counter()
        self.progress = _bar(self.console) if self.console.is_terminal else None
        self.task = None

    def __enter__(self) -> "ExamplesProgress":
        if self.progress is not None:
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total, status="")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, count: int) -> None:
        from nfdm_de._train._progress import format_seconds  # (JAX is loaded by now)

        self.done += count
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        status = f"{rate:,.0f} examples/s  ETA {format_seconds((self.total - self.done) / rate)}"
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=self.done, status=status)
        else:
            self.console.print(
                f"{self.label}: {self.done}/{self.total} examples, {status}",
                markup=False,
                highlight=False,
            )


@contextmanager
def working(message: str):
    """A spinner with `message` while one solve runs (a line first when not on a terminal)."""
    console = Console(stderr=True)
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        console.print(message, markup=False, highlight=False)
        yield
