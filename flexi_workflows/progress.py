"""One console line per progress event for work the driver waits on (scoring, evaluation).

Ray Data draws a progress bar on a terminal, but anywhere else (CI logs, `nohup`, `ray job logs`) it writes
a block of eight log lines per update. Stages that iterate a Ray Data result in the driver turn Ray Data's
progress off and report through here instead: a line at each quarter of the rows, and at least every
`every_s` seconds while rows arrive, with the rate so far and the time left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def format_eta(seconds: float) -> str:
    """0:42, 12:05, 1:02:09."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def with_progress(items: Iterable[T], total: int, label: str, *, unit: str = "rows", every_s: float = 15.0,
                  out: TextIO | None = None, clock: Callable[[], float] = time.perf_counter) -> Iterator[T]:
    """`items`, unchanged, with progress lines on `out` (stdout) as they are consumed.

    The time left comes from the rate since the first item arrived, not since the start: what comes before
    it (actors starting, the model loading) is paid once, and counted in it the first lines said hours for
    a minute's work. Items come a batch at a time: those that came with the first (within 50 ms) are its
    batch, and the rate counts the items after it. Until items have come for a second there is no rate to
    tell, and no ETA."""
    out = out or sys.stdout
    start = last = clock()
    first, burst = None, 0
    next_quarter = 1
    done = 0
    for item in items:
        yield item
        done += 1
        now = clock()
        first = now if first is None else first
        if now - first < 0.05:
            burst = done
        quarter = total and done * 4 >= next_quarter * total
        if quarter or now - last >= every_s or done == total:
            while total and done * 4 >= next_quarter * total:
                next_quarter += 1
            elapsed = now - start
            share = f" ({100 * done / total:.0f} %)" if total else ""
            known = total and done < total and now - first >= 1.0  # then done > burst: items after the first batch
            eta = f"  ETA {format_eta((total - done) * (now - first) / (done - burst))}" if known else ""
            print(f"   {label}: {done}/{total} {unit}{share}  {elapsed:.0f} s{eta}", file=out, flush=True)
            last = now


class DropNotices:
    """A logging filter (assets/ray_data_logging.yaml) for Ray Data's console warnings that only describe
    what the project chose: it turns Ray Data's progress bars off and reports here instead."""

    NOTICES = ("Progress bars disabled",)

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.NOTICES)
