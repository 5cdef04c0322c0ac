"""The two ways a worker drives its model: a DeepSpeed engine (ZeRO 0-3) or DDP.

Both offer the same four things the loop needs — `backward_step` (returns True at an optimizer
step), `save` / `load` (the full training state through a Ray Train checkpoint folder) and `export`
(the method's artifact, written by rank 0) — so the loop in loop.py never asks which one it has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flexi_workflows.methods import Method, Trainable


def deepspeed_config(*, micro_batch_size: int, accumulation: int, max_grad_norm: float, zero_stage: int,
                     bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": {"stage": zero_stage},
        # a torch AdamW: DeepSpeed's own CPU/fused Adam compile C++ ops at first use (minutes on CPU)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    def __init__(self, trainable: Trainable, optimizer, scheduler, config: dict[str, Any]) -> None:
        import deepspeed

        self.trainable = trainable
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=trainable.model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        self.model = self.engine

    def backward_step(self, loss: torch.Tensor, step: int) -> bool:
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and self.trainable.after_backward is not None:
            self.trainable.after_backward(step)  # before engine.step(), which clears the gradients
        self.engine.step()
        return boundary

    def save(self, path: Path, step: int, rank: int) -> None:
        # every rank writes its own ZeRO partition; Ray Train merges the workers' folders
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="state", client_state={"step": step},
                                    exclude_frozen_parameters=True)

    def load(self, path: Path) -> int:
        _, client = self.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        return int(client["step"])

    def export(self, path: Path, method: Method, rank: int) -> None:
        """Rank 0 writes the trained artifact; under ZeRO-3 every rank first joins the gather."""
        import deepspeed

        params = [p for p in self.trainable.model.parameters() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if rank == 0:
                method.export(self.trainable.model, path)


class DDPEngine:
    def __init__(self, trainable: Trainable, optimizer, scheduler, *, accumulation: int, max_grad_norm: float,
                 device: torch.device) -> None:
        import ray.train.torch

        self.trainable = trainable
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.params = [p for p in trainable.model.parameters() if p.requires_grad]
        self.model = ray.train.torch.prepare_model(trainable.model, move_to_device=device)
        self.micro = 0

    def backward_step(self, loss: torch.Tensor, step: int) -> bool:
        (loss / self.accumulation).backward()
        self.micro += 1
        if self.micro % self.accumulation:
            return False
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        if self.trainable.after_backward is not None:
            self.trainable.after_backward(step)  # AdaLoRA reads the gradients: before zero_grad
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def save(self, path: Path, step: int, rank: int) -> None:
        if rank != 0:
            return
        state = {n: p.detach().cpu() for n, p in self.trainable.model.named_parameters() if p.requires_grad}
        torch.save({"model": state, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "step": step}, path / "ddp_state.pt")

    def load(self, path: Path) -> int:
        state = torch.load(path / "ddp_state.pt", map_location="cpu", weights_only=False)
        named = dict(self.trainable.model.named_parameters())
        with torch.no_grad():
            for name, value in state["model"].items():
                named[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])

    def export(self, path: Path, method: Method, rank: int) -> None:
        if rank == 0:
            method.export(self.trainable.model, path)
