"""What `train` reports as it goes: `ProgressReport`, the `ProgressSink` protocol any display
implements, and `StreamProgress`, the plain-text display on a stream."""

import dataclasses
import time
from typing import Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class ProgressReport:
    """One update of a training run.

    - `step` of `total` steps; `phase`: "simulation-free" or "likelihood";
    - `loss`: the batch-mean loss of the last logged interval (or of this step in the
      likelihood phase); `terms`: its named terms (diffusion, reconstruction, curvature; empty
      between logged intervals);
    - `steps_per_sec`: measured from the end of the phase's first step, which waits for its
      compilation; `seconds_left`: until `phase_end`, the step where the current phase (or
      this call) ends, at that rate (None before it is known);
    - `final`: the last update of the call.
    """

    step: int
    total: int
    phase: str
    loss: float
    terms: dict[str, float]
    steps_per_sec: float
    seconds_left: float | None
    phase_end: int
    final: bool = False

    def status(self, terms: tuple[str, ...] | None = None) -> str:
        """`loss 0.1234  <term> 0.5678  12.3 steps/s  ETA 0m05s (phase)`: the loss, the named
        `terms` present (default: all), the rate and the time left ("(phase)" when the current
        phase ends before the run)."""
        names = tuple(self.terms) if terms is None else terms
        text = f"loss {self.loss:.4f}"
        text += "".join(f"  {n} {self.terms[n]:.4f}" for n in names if n in self.terms)
        text += f"  {self.steps_per_sec:.1f} steps/s"
        if self.seconds_left is not None:
            text += f"  ETA {format_seconds(self.seconds_left)}"
            text += " (phase)" if self.phase_end < self.total else ""
        return text


@runtime_checkable
class ProgressSink(Protocol):
    """A display of `train`'s progress: `update` is called often (throttle inside), `close` once."""

    def update(self, report: ProgressReport, /) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class TextStream(Protocol):
    """Where `StreamProgress` writes: `sys.stderr`, a file, an `io.StringIO`."""

    def write(self, text: str, /) -> int: ...

    def flush(self) -> None: ...

    def isatty(self) -> bool: ...


def format_seconds(seconds: float) -> str:
    """`1m05s`-style durations for progress displays."""
    whole = int(seconds)
    return f"{whole // 60}m{whole % 60:02d}s"


class StreamProgress:
    """A one-line bar on a terminal stream, rewritten in place (at most 5 times a second); on
    any other stream a plain line every 10 seconds and at the end."""

    def __init__(self, stream: TextStream):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0

    def update(self, report: ProgressReport) -> None:
        now = time.monotonic()
        if not report.final and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        frac = report.step / report.total
        bar = "#" * int(25 * frac) + "." * (25 - int(25 * frac))
        text = f"[{bar}] {report.step}/{report.total}  {report.status(('curvature',))}"
        self.stream.write(("\r" + text) if self.tty else (text + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
