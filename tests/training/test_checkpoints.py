"""Checkpoint manifests: a folder is whole when every worker's part is there as written; a rerun resumes
from the newest whole folder, even one Ray Train never registered; anything else is refused unread."""

from __future__ import annotations

import json

import pytest

from flexi_workflows.storage import Storage
from flexi_workflows.training.checkpoints import (
    CheckpointMismatch,
    latest_whole,
    verify_folder,
    write_manifest,
)


def _checkpoint(folder, step: int, world: int = 2):
    """A checkpoint as `world` workers leave it: each writes its own files into its part, then its manifest."""
    folder.mkdir(parents=True)
    for rank in range(world):
        part = folder.parent / f".part-{folder.name}-{rank}"
        (part / "deepspeed" / "state").mkdir(parents=True)
        (part / "deepspeed" / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(b"x" * (100 + rank))
        if rank == 0:
            (part / "trainer_state.json").write_text(json.dumps({"step": step}))
        write_manifest(part, rank=rank, world=world, step=step)
        for file in part.rglob("*"):  # Ray Train uploads every worker's part into the one folder
            if file.is_file():
                target = folder / file.relative_to(part)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(file.read_bytes())
    return folder


def test_a_whole_folder_verifies_and_anything_else_is_refused(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint_a", 8)
    assert verify_folder(folder) == 8

    (folder / "deepspeed" / "state" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"x" * 10)  # cut short
    with pytest.raises(CheckpointMismatch, match=r"zero_pp_rank_1_optim_states\.pt is 10 bytes, its worker wrote 101"):
        verify_folder(folder)

    folder = _checkpoint(tmp_path / "checkpoint_b", 8)
    (folder / "deepspeed" / "state" / "planted.pt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointMismatch, match=r"planted\.pt was not written by the training workers"):
        verify_folder(folder)

    folder = _checkpoint(tmp_path / "checkpoint_c", 8)
    (folder / "manifest-rank1.json").unlink()  # worker 1 had not finished uploading
    with pytest.raises(CheckpointMismatch, match="the part of worker 1 is missing"):
        verify_folder(folder)

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "ddp_state.pt").write_bytes(b"x")
    assert verify_folder(legacy) is None  # from before manifests: loaded weights-only, as before


def test_the_newest_whole_folder_is_where_a_rerun_resumes(tmp_path):
    run = tmp_path / "ray_results" / "lora-4-abc"
    _checkpoint(run / "checkpoint_2026-11-30_01-00-00.000001", 4)
    _checkpoint(run / "checkpoint_2026-11-30_01-00-05.000001", 8)  # whole, though Ray may not have registered it
    partial = _checkpoint(run / "checkpoint_2026-11-30_01-00-09.000001", 12)
    (partial / "manifest-rank1.json").unlink()
    assert latest_whole(Storage(tmp_path), "ray_results/lora-4-abc") == (
        "ray_results/lora-4-abc/checkpoint_2026-11-30_01-00-05.000001", 8)
    assert latest_whole(Storage(tmp_path), "ray_results/none-yet") is None
