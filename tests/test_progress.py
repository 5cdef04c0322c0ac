"""Progress lines for work the driver waits on: one line per quarter of the rows (and every `every_s`
seconds), with the time left; the items pass through unchanged."""

from __future__ import annotations

import io

from flexi_workflows.progress import format_eta, with_progress


class Clock:
    """A stand-in for time.perf_counter that the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _arriving(clock: Clock, n: int, *, start_up_s: float, every_s: float):
    """n items, the first after `start_up_s`, each later one `every_s` after the one before."""
    for i in range(n):
        clock.now += start_up_s if i == 0 else every_s
        yield i


def test_one_line_per_quarter_with_the_time_left():
    out, clock = io.StringIO(), Clock()
    items = _arriving(clock, 10, start_up_s=1.0, every_s=2.0)
    assert list(with_progress(items, 10, "score", out=out, every_s=3600, clock=clock)) == list(range(10))
    lines = out.getvalue().splitlines()
    assert [line.split(" rows")[0].strip() for line in lines] == ["score: 3/10", "score: 5/10", "score: 8/10",
                                                                  "score: 10/10"]
    assert "(30 %)" in lines[0] and "ETA " in lines[0]
    assert lines[-1].endswith(" s") and "ETA" not in lines[-1]  # done: the time taken, nothing left


def test_the_time_left_leaves_the_start_up_out():
    """Two minutes of actors starting, then a row a second: the time left is the rows left at that rate."""
    out, clock = io.StringIO(), Clock()
    list(with_progress(_arriving(clock, 400, start_up_s=120.0, every_s=1.0), 400, "eval", out=out, every_s=15,
                       clock=clock))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("   eval: 1/400 rows (0 %)  120 s") and "ETA" not in lines[0]  # no rate yet
    quarter = next(line for line in lines if "100/400" in line)
    assert quarter.endswith("ETA 5:00"), quarter  # 300 rows at 1 s each: not 300 × 219 s / 100 (10:57)


def test_eta_format():
    assert [format_eta(s) for s in (0, 42, 725, 3729, -5)] == ["0:00", "0:42", "12:05", "1:02:09", "0:00"]


def test_the_time_left_counts_the_rows_after_the_first_batch():
    """Rows come a batch at a time: 15 s of start-up, then a batch of 100 every 2 s. At row 200 one batch came
    in 2 s after the first, so 200 rows are left at 100 per 2 s: 4 s, not the 2 s that counting the first
    batch's rows as taking no time would say."""
    out, clock = io.StringIO(), Clock()

    def batches():
        for b in range(4):
            clock.now += 15.0 if b == 0 else 2.0
            yield from range(b * 100, (b + 1) * 100)

    list(with_progress(batches(), 400, "eval", out=out, every_s=3600, clock=clock))
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("   eval: 100/400 rows (25 %)  15 s") and "ETA" not in lines[0]
    assert lines[1].startswith("   eval: 200/400 rows (50 %)  17 s") and lines[1].endswith("ETA 0:04"), lines[1]

