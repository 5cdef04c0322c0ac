"""Checkpoints are read without unpickling code: a file planted in ray_results cannot run anything.

The DeepSpeed check runs a real engine (ZeRO-2, gloo, one process) in a subprocess, so its process
group does not outlive the test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from flexi_workflows.training.engines import UnsafeCheckpointError, load_weights_only
from tests.conftest import REPO_ROOT, free_port


class Planted:
    """What an attacker would write: unpickling it runs a command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(2)}, "step": Planted(str(marker))}, tmp_path / "ddp_state.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"ddp_state\.pt holds objects beyond tensors \(posix\.system"):
        load_weights_only(tmp_path / "ddp_state.pt", map_location="cpu")
    assert not marker.exists()


def test_the_training_state_the_project_writes_loads(tmp_path):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "step": 3}
    torch.save(state, tmp_path / "ddp_state.pt")  # as DDPEngine.save writes it
    loaded = load_weights_only(tmp_path / "ddp_state.pt", map_location="cpu")
    assert loaded["step"] == 3 and torch.equal(loaded["optimizer"]["state"][0]["exp_avg"],
                                               optimizer.state_dict()["state"][0]["exp_avg"])


DEEPSPEED_SCRIPT = textwrap.dedent("""
    import os, sys, torch, deepspeed
    sys.path.insert(0, os.getcwd())
    from tests.training.test_checkpoint_safety import Planted
    from flexi_workflows.training.engines import UnsafeCheckpointError, one_op_build, weights_only_checkpoints
    with one_op_build():
        deepspeed.init_distributed(dist_backend="gloo")
    ckpt, marker = sys.argv[1], sys.argv[2]

    def engine():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                  "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
        eng, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        weights_only_checkpoints(eng)
        return eng

    eng = engine()
    loss = eng(torch.ones(2, 8, dtype=torch.bfloat16)).float().sum()
    eng.backward(loss)
    eng.step()
    eng.save_checkpoint(ckpt, tag="state", client_state={"step": 1})
    _, client = engine().load_checkpoint(ckpt, tag="state")  # what DeepSpeed wrote loads
    assert client["step"] == 1, client
    optim = [f for f in os.listdir(os.path.join(ckpt, "state")) if "optim_states" in f][0]
    torch.save({"optimizer_state_dict": Planted(marker)}, os.path.join(ckpt, "state", optim))
    try:
        engine().load_checkpoint(ckpt, tag="state")
    except UnsafeCheckpointError as exc:
        print("REFUSED", exc)
""")


@pytest.mark.slow
def test_deepspeed_loads_its_own_checkpoint_and_refuses_a_planted_one(tmp_path):
    marker = tmp_path / "pwned"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, str(tmp_path / "ckpt"), str(marker)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REFUSED" in done.stdout and "optim_states.pt holds objects beyond tensors (posix.system" in done.stdout
    assert not marker.exists()
