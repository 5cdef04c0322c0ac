"""A remote checkpoint whose shared per-node download disappears under a waiting worker is fetched again.

Ray's `Checkpoint.as_directory()` lets the workers of one node share one download (a file lock on a
folder in /tmp; the last reader deletes it). The race is staged with Ray's own lock: another process
holds it while it deletes the folder, so this worker waits, then finds the folder gone.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pyarrow.fs
import pytest
from ray.air._internal.filelock import TempFileLock
from ray.train import Checkpoint

from flexi_workflows.training.loop import checkpoint_folder


def _remote_checkpoint(tmp_path) -> Checkpoint:
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "state.json").write_text('{"step": 4}')
    # not a LocalFileSystem, so Ray treats it as remote and downloads it to a shared temporary folder
    return Checkpoint(str(source), filesystem=pyarrow.fs.SubTreeFileSystem("/", pyarrow.fs.LocalFileSystem()))


def _stage_the_race(checkpoint: Checkpoint) -> threading.Thread:
    """Another worker holds the download's lock and deletes the folder before it lets go."""
    folder = checkpoint._get_temporary_checkpoint_dir()
    held = threading.Event()

    def other_worker():
        with TempFileLock(folder, timeout=-1):
            held.set()
            time.sleep(0.5)
            shutil.rmtree(folder, ignore_errors=True)

    thread = threading.Thread(target=other_worker)
    thread.start()
    held.wait()
    return thread


def test_ray_alone_fails_and_checkpoint_folder_downloads_again(tmp_path):
    checkpoint = _remote_checkpoint(tmp_path)
    thread = _stage_the_race(checkpoint)
    with pytest.raises(RuntimeError, match="should have been created by another process"), checkpoint.as_directory():
        pass
    thread.join()

    thread = _stage_the_race(checkpoint)
    with checkpoint_folder(checkpoint, wait_s=0.1) as folder:
        assert (tmp_path / "ckpt").as_posix() != folder
        assert Path(folder, "state.json").read_text() == '{"step": 4}'
    thread.join()


def test_other_errors_and_the_last_attempt_are_raised(tmp_path):
    class Broken:
        path = "x"

        def __init__(self, message):
            self.message, self.calls = message, 0

        def as_directory(self):
            self.calls += 1
            raise RuntimeError(self.message)

    other = Broken("disk full")
    with pytest.raises(RuntimeError, match="disk full"), checkpoint_folder(other, wait_s=0):
        pass
    assert other.calls == 1
    racing = Broken("Checkpoint directory /tmp/x does not exist, even though it should have been created by "
                    "another process.")
    with pytest.raises(RuntimeError, match="another process"), checkpoint_folder(racing, attempts=3, wait_s=0):
        pass
    assert racing.calls == 3
