"""Progress of a training command: a tqdm bar on a terminal, plain lines anywhere else.

On a terminal the bar redraws in place. Where stderr is a file or a pipe (CI logs, ``nohup``,
``> log 2>&1``) a redrawn bar is noise, so :class:`LineProgress` prints a plain line every
``interval_s`` seconds or every ``fraction`` of the steps, whichever comes first::

    float32 vs float64: step 300/1200 (25 %), 41.2 steps/s, ETA 22 s

Both objects have ``update(n)``, ``write(text, file)`` (print a result line without tearing
the bar) and ``close()``.
"""

from __future__ import annotations

import math
import os
import sys
import time

from tqdm import tqdm

__all__ = ["LineProgress", "bar_columns", "format_duration", "progress", "terminal_columns"]

#: Below this width a bar plus its statistics does not fit; tqdm would cut the line short.
MIN_BAR_COLUMNS = 30


def terminal_columns(stream) -> int | None:
    """Width of the terminal behind ``stream``: ``$COLUMNS`` if a positive integer, else the
    terminal's own; None when unknown or reported as 0 (a fresh pty, some CI runners)."""
    env = os.environ.get("COLUMNS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    try:
        cols = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return None
    return cols if cols > 0 else None


def bar_columns(columns: int | None) -> int:
    """tqdm's ``ncols`` for a terminal ``columns`` wide.

    0 (tqdm's statistics without a bar, never trimmed) when the width is unknown or narrower
    than :data:`MIN_BAR_COLUMNS`; else ``columns - 1`` (the last column would wrap). tqdm's
    own rule gives ``ncols = -1`` on a 0-column terminal and trims the last character of every
    line, and a few columns show only the start of the description.
    """
    if columns is None or columns < MIN_BAR_COLUMNS:
        return 0
    return columns - 1


def format_duration(seconds: float) -> str:
    """``"22 s"``, ``"12 min 05 s"``, ``"2 h 03 min"``; ``"?"`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class LineProgress:
    """Plain progress lines for a stream that is not a terminal.

    Parameters
    ----------
    total : int
        The last step.
    desc : str
        Printed before each line.
    initial : int
        The step counting starts from (a resumed run); the rate counts this leg's steps only.
    stream : text stream, optional
        Default: ``sys.stderr`` at construction.
    interval_s : float
        At most this many seconds between lines.
    fraction : float
        A line whenever the step crosses a multiple of ``ceil(fraction · total)``.
    clock : callable
        Seconds, monotonic (a test passes its own).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        initial: int = 0,
        stream=None,
        interval_s: float = 10.0,
        fraction: float = 0.05,
        clock=time.monotonic,
    ):
        self.total, self.desc = int(total), desc
        self.n = self._start = self._last_n = int(initial)
        self.stream = sys.stderr if stream is None else stream
        self.interval_s = float(interval_s)
        self.every = max(1, math.ceil(fraction * self.total))
        self.clock = clock
        self._t0 = self._last_t = clock()
        self.closed = False

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        now = self.clock()
        crossed = self.n // self.every > before // self.every
        if crossed or now - self._last_t >= self.interval_s:
            self._emit(now)

    def line(self, now: float) -> str:
        """The progress line at time ``now``."""
        elapsed = now - self._t0
        done = self.n - self._start
        rate = done / elapsed if elapsed > 0 else math.nan
        pct = 100 * self.n // self.total if self.total > 0 else 100
        speed = f"{rate:.1f} steps/s" if math.isfinite(rate) else "- steps/s"
        if self.n >= self.total:
            tail = f"done in {format_duration(elapsed)}"
        else:
            tail = "ETA " + format_duration((self.total - self.n) / rate if rate > 0 else None)
        head = f"{self.desc}: " if self.desc else ""
        return f"{head}step {self.n}/{self.total} ({pct} %), {speed}, {tail}"

    def _emit(self, now: float) -> None:
        self.stream.write(self.line(now) + "\n")
        self.stream.flush()
        self._last_n, self._last_t = self.n, now

    def write(self, text: str, file=None) -> None:
        """Print a line of results (to ``file``, default stdout) and flush it."""
        f = sys.stdout if file is None else file
        f.write(text + "\n")
        f.flush()

    def close(self) -> None:
        """Print the last state unless it was just printed."""
        if not self.closed and self.n != self._last_n:
            self._emit(self.clock())
        self.closed = True


class _Bar:
    """A tqdm bar sized for the terminal, with the same interface as :class:`LineProgress`."""

    def __init__(self, total: int, desc: str, *, initial: int, stream):
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            file=stream,
            unit="step",
            ncols=bar_columns(terminal_columns(stream)),
        )

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def write(self, text: str, file=None) -> None:
        f = sys.stdout if file is None else file
        self._bar.write(text, file=f)  # clears the bar, prints, redraws it
        f.flush()

    def close(self) -> None:
        self._bar.close()


def progress(
    total: int,
    desc: str,
    *,
    quiet: bool = False,
    initial: int = 0,
    stream=None,
    interval_s: float = 10.0,
    fraction: float = 0.05,
):
    """A progress reporter on ``stream`` (default stderr), or None with ``quiet``.

    A terminal gets a tqdm bar; anything else plain lines (:class:`LineProgress`).
    """
    if quiet:
        return None
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return _Bar(total, desc, initial=initial, stream=stream)
    return LineProgress(
        total, desc, initial=initial, stream=stream, interval_s=interval_s, fraction=fraction
    )
