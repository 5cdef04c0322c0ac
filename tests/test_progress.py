"""Progress lines for work the driver waits on: one line per quarter of the rows (and every `every_s`
seconds), with the time left; the items pass through unchanged."""

from __future__ import annotations

import io

from flexi_workflows.progress import format_eta, with_progress


def test_one_line_per_quarter_with_the_time_left():
    out = io.StringIO()
    assert list(with_progress(range(10), 10, "score", out=out, every_s=3600)) == list(range(10))
    lines = out.getvalue().splitlines()
    assert [line.split(" rows")[0].strip() for line in lines] == ["score: 3/10", "score: 5/10", "score: 8/10",
                                                                  "score: 10/10"]
    assert "(30 %)" in lines[0] and "ETA " in lines[0]
    assert lines[-1].endswith(" s") and "ETA" not in lines[-1]  # done: the time taken, nothing left


def test_eta_format():
    assert [format_eta(s) for s in (0, 42, 725, 3729, -5)] == ["0:00", "0:42", "12:05", "1:02:09", "0:00"]
