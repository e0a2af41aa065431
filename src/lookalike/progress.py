"""Progress of long loops for people and for logs: a tqdm bar on a terminal, else a plain line every few seconds.

Library functions take a `Progress` callable, `progress(iterable, total) -> iterable`, and never print; the CLI builds
one with `ProgressReporter.track`, handing it the stream to write to (stderr), so a run under nohup, a scheduler or CI
leaves lines like `embedding: 12/40 batches (30%), 2.4 batches/s, 12 s left` in its log while it works.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from tqdm import tqdm

Progress = Callable[[Iterable, int], Iterable]

INTERVAL_ENV = "LOOKALIKE_PROGRESS_SECONDS"  # seconds between progress lines when the stream is not a terminal
DEFAULT_INTERVAL = 5.0


def interval_from_env(default: float = DEFAULT_INTERVAL) -> float:
    """The line interval of $LOOKALIKE_PROGRESS_SECONDS (a positive number), else `default`."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, default))
    except ValueError:
        return default
    return value if value > 0 else default


def _duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 07 min: short enough for a log line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def plural(unit: str) -> str:
    """batch -> batches, image -> images."""
    return unit if unit.endswith("s") else unit + ("es" if unit.endswith(("ch", "sh", "x")) else "s")


def progress_line(desc: str, done: int, total: int | None, elapsed: float, unit: str = "batch") -> str:
    """`desc: done/total units (pct%), rate units/s, ETA left` (no total: no percentage, no time left)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    units = plural(unit)
    if not total:
        return f"{desc}: {done} {units}, {rate:.1f} {units}/s, {_duration(elapsed)} elapsed"
    left = f"{_duration((total - done) / rate)} left" if rate > 0 else "time left unknown"
    return f"{desc}: {done}/{total} {units} ({100 * done / total:.0f}%), {rate:.1f} {units}/s, {left}"


@dataclass
class ProgressReporter:
    """Makes Progress callables writing to `stream`: tqdm bars on a terminal, else a line each `interval` seconds
    (plus one at the start and one at the end); `enabled=False` (-q) makes them silent pass-throughs."""

    stream: TextIO
    interval: float = DEFAULT_INTERVAL
    enabled: bool = True
    tty: bool | None = None  # None: ask the stream
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    @property
    def is_tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def track(self, desc: str, unit: str = "batch") -> Progress:
        """A Progress callable for one kind of loop, named `desc` in its bar or lines."""
        return lambda iterable, total: self.wrap(iterable, total, desc, unit)

    def wrap(self, iterable: Iterable, total: int | None, desc: str, unit: str = "batch") -> Iterable:
        """`iterable` unchanged, reporting how far it got."""
        if not self.enabled:
            return iterable
        if self.is_tty:
            return tqdm(iterable, total=total, desc=desc, unit=unit, file=self.stream)
        return self._lines(iterable, total, desc, unit)

    def _lines(self, iterable: Iterable, total: int | None, desc: str, unit: str) -> Iterator:
        """Yield the items; write a line at the start, every `interval` seconds and at the end, flushed at once."""
        start = last = self.clock()
        done = 0
        self._write(progress_line(desc, 0, total, 0.0, unit))
        for item in iterable:
            yield item
            done += 1
            now = self.clock()
            if now - last >= self.interval:
                last = now
                self._write(progress_line(desc, done, total, now - start, unit))
        elapsed = self.clock() - start
        self._write(f"{desc}: {done}{f'/{total}' if total else ''} {plural(unit)} done in {_duration(elapsed)}")

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class ImageMeter:
    """Counts embedded images through a Progress callable, so its lines show images/s and the time left."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.ticks = iter(progress(itertools.repeat(None, total), total)) if progress else None
        if self.ticks is not None:
            next(self.ticks, None)  # the start line; each later step counts one image

    def add(self, n: int) -> None:
        """`n` more images are done."""
        for _ in range(n if self.ticks is not None else 0):
            next(self.ticks, None)

    def close(self) -> None:
        """The final line (once every image is counted)."""
        if self.ticks is not None:
            for _ in self.ticks:
                pass
