"""Progress of long jobs: a tqdm bar on a terminal; in a log (stderr redirected, a batch
scheduler's output file) a plain line every LOG_EVERY_S seconds with the count, the rate
and the time left, which a bar's carriage returns would turn into one unreadable line."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

log = logging.getLogger("sdrpn.progress")
LOG_EVERY_S = 30.0


class LogProgress:
    """The part of tqdm's interface the jobs use (update, set_postfix, close, iteration),
    reporting through logging."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str,
        unit: str,
        initial: int = 0,
        every: float = LOG_EVERY_S,
    ):
        self.iterable = iterable
        self.total = total if total is not None else _length(iterable)
        self.desc, self.unit, self.every = desc, unit, every
        self.n = self.first = initial
        self.start = self.last = time.monotonic()
        self.postfix = ""

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        self._line(time.monotonic())

    def _line(self, now: float) -> None:
        rate = (self.n - self.first) / max(now - self.start, 1e-9)
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        left = ""
        if self.total and rate > 0:
            left = f", {_duration((self.total - self.n) / rate)} left"
        extra = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s %ss, %.2f %ss/s%s%s", self.desc, done, self.unit, rate, self.unit, left, extra)


def _length(iterable) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def show_progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str,
    initial: int = 0,
    disable: bool = False,
):
    """A tqdm bar when stderr is a terminal, else LogProgress; `disable` (other ranks of a
    distributed job) shows nothing."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)
