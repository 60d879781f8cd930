"""Progress bars that suit where they are written: every progress report of pmf_jax (sampling steps, training
steps, ``pmf eval`` generation and scoring, dataset preparation) goes through :func:`bar`.

* On a terminal: a tqdm bar, redrawn in place.
* Anywhere else (a log file, a pipe, a job scheduler's output): one plain line at most every
  ``$PMF_PROGRESS_INTERVAL`` seconds (default :data:`DEFAULT_INTERVAL_S`; 0 = a line per update), and the final line
  when the bar closes, e.g. ``train: 400/1000 (40%), 61 s, 6.6 it/s, loss=0.4375, img_s=53.1``. A tqdm bar there
  would write every redraw into the file.

Whether a stream is a terminal: :func:`is_terminal` (``stream.isatty()``; bars write to stderr).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TextIO

from pmf_jax.errors import PMFInputError

INTERVAL_ENV = "PMF_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


def interval_s() -> float:
    """Seconds between two progress lines off a terminal: ``$PMF_PROGRESS_INTERVAL`` or :data:`DEFAULT_INTERVAL_S`."""
    value = os.environ.get(INTERVAL_ENV, "").strip()
    if not value:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also rejects nan
        raise PMFInputError(f"{INTERVAL_ENV}={value!r} must be a number of seconds >= 0")
    return seconds


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    """Whether ``stream`` (default stderr) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """The part of tqdm's interface pmf_jax uses (``update``, ``set_postfix``, ``close``, iteration, ``with``),
    written as plain lines at most every ``interval`` seconds plus a final line at :meth:`close`."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False, stream: Optional[TextIO] = None,
                 interval: Optional[float] = None):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.disable = disable
        self.stream = stream
        self.interval = interval_s() if interval is None else interval
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.shown = None  # the count the last line showed
        self.closed = False

    def line(self) -> str:
        """The current state as one line (no newline)."""
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        seconds = f"{elapsed:.1f}" if elapsed < 100 else f"{elapsed:.0f}"
        text = f"{self.desc}: {done} {self.unit}{percent}, {seconds} s, {rate:.3g} {self.unit}/s"
        return f"{text}, {self.postfix}" if self.postfix else text

    def write_line(self) -> None:
        if not self.disable:
            print(self.line(), file=self.stream or sys.stderr, flush=True)
        self.last_line, self.shown = time.monotonic(), self.n

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last_line >= self.interval:
            self.write_line()

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next line, as tqdm's ``set_postfix`` (they do not force a line)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.shown != self.n:  # the final count, unless the last line showed it
                self.write_line()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "", unit: str = "it",
        initial: int = 0, leave: bool = True, disable: bool = False, stream: Optional[TextIO] = None):
    """A progress bar over ``iterable`` or ``total`` updates: tqdm on a terminal, else a :class:`LineProgress`
    (module docstring). ``leave=False``: the terminal bar is erased when it closes (off a terminal the final line
    is always written). ``disable``: nothing is shown (e.g. on the processes other than 0)."""
    stream = sys.stderr if stream is None else stream
    if is_terminal(stream) and not disable:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, file=stream,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, stream=stream)


@contextlib.contextmanager
def tfds_bars(desc: str, stream: Optional[TextIO] = None) -> Iterator[None]:
    """Around a TFDS download/prepare: TFDS draws its own tqdm bars (redrawn every second, with cursor moves), so
    off a terminal they are switched off for the block (and back on after) and one line says when the block
    starts and ends instead."""
    stream = sys.stderr if stream is None else stream
    if is_terminal(stream):
        yield
        return
    import tensorflow_datasets as tfds

    start = time.monotonic()
    print(f"{desc} ...", file=stream, flush=True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(True)
    print(f"{desc}: done, {time.monotonic() - start:.0f} s", file=stream, flush=True)


__all__ = ["DEFAULT_INTERVAL_S", "INTERVAL_ENV", "LineProgress", "bar", "interval_s", "is_terminal", "tfds_bars"]
