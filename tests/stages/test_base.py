"""The stage runner: two processes that need the same stage compute it once, and a failed stage
leaves no folder behind."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from flexi_workflows.stages.base import Stage, StageOutput, run_stage


class SlowStage(Stage):
    kind = "slow"
    files = ["out.txt"]

    def __init__(self, root: Path, value: int, log: Path) -> None:
        super().__init__(root)
        self.value, self.log = value, log

    def inputs(self) -> dict:
        return {"value": self.value}

    def run(self, tmp, upstream, context) -> StageOutput:
        with open(self.log, "a") as f:
            f.write("computed\n")
        time.sleep(1.0)
        if self.value < 0:
            raise RuntimeError("bad value")
        (tmp / "out.txt").write_text(str(self.value))
        return StageOutput(metrics={"value": self.value})


def _run(root: str, log: str, queue) -> None:
    result = run_stage(SlowStage(Path(root), 7, Path(log)))
    queue.put((str(result.folder), result.cached))


def test_concurrent_processes_compute_a_shared_stage_once(tmp_path):
    log = tmp_path / "log.txt"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(str(tmp_path / "out"), str(log), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    results = [queue.get(timeout=5) for _ in procs]
    assert log.read_text().count("computed") == 1
    assert len({folder for folder, _ in results}) == 1
    assert sorted(cached for _, cached in results) == [False, True, True]
    assert (Path(results[0][0]) / "out.txt").read_text() == "7"


def test_a_failing_stage_leaves_no_folder(tmp_path):
    stage = SlowStage(tmp_path / "out", -1, tmp_path / "log.txt")
    with pytest.raises(RuntimeError, match="bad value"):
        run_stage(stage)
    assert not stage.folder.exists()
    assert stage.finished() is None
    assert not [p for p in stage.folder.parent.iterdir() if not p.name.endswith(".lock")]


def test_a_damaged_file_in_a_finished_stage_is_computed_again(tmp_path, caplog):
    log = tmp_path / "log.txt"
    stage = SlowStage(tmp_path / "out", 12345, log)
    first = run_stage(stage)
    assert first.manifest["sizes"] == {"out.txt": 5}
    assert run_stage(stage).cached
    (stage.folder / "out.txt").write_text("12")  # cut short, e.g. by a full disk or a partial copy
    again = run_stage(stage)
    assert not again.cached and (stage.folder / "out.txt").read_text() == "12345"
    assert log.read_text().count("computed") == 2
    assert "out.txt is not as the stage wrote it (2 bytes, recorded 5); computing the stage again" in caplog.text


def test_run_stages_prints_a_banner_per_stage_and_what_each_did(tmp_path, capsys):
    from flexi_workflows.pipeline import run_stages

    stage = SlowStage(tmp_path / "out", 3, tmp_path / "log.txt")
    run_stages([stage], banners=True)
    run_stages([stage], banners=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("── [1/1] slow") and lines[1].startswith("   slow: done in ")
    assert lines[1].endswith(f"→ {stage.location}")
    assert lines[2].startswith("── [1/1] slow") and lines[3] == f"   slow: reused {stage.location}"
