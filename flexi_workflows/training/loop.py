"""The Ray Train worker loop: one recipe, any method, DeepSpeed ZeRO 0-3 or DDP, CPU or GPU.

Each worker:
  1. loads the base model and applies the method (training/methods.py);
  2. wraps it in a DeepSpeed engine (torch AdamW, ZeRO stage from the recipe, bf16 on GPU) or DDP;
  3. restores adapter, optimizer, scheduler and step from Ray Train's checkpoint if there is one
     (a restarted worker group after a failure, or `training.resume`);
  4. trains on its own deterministic shard, the loss on answer tokens only, Flexi ranks arriving
     with each batch; logs loss / lr / tokens-per-second to MLflow from rank 0;
  5. checkpoints through Ray Train every `checkpoint_every` steps (0: each epoch) and at the end,
     where rank 0 also exports the trained artifact (adapter or weights) inside the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FAIL_HOOK_ENV = "FLEXI_TEST_FAIL_AT_STEP"  # "k:/path/marker" — test-only fault injection, fires once
EXPORT_DIR = "export"
STATE_FILE = "trainer_state.json"


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = int(round(warmup_ratio * total_steps))

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def deepspeed_config(recipe) -> dict[str, Any]:
    dist, train = recipe.distribution, recipe.training
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": {"stage": dist.zero_stage},
        # a torch AdamW: DeepSpeed's own CPU/fused Adam compile C++ ops at first use (minutes on CPU)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": dist.bf16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _maybe_fail(step: int, rank: int) -> None:
    spec = os.environ.get(FAIL_HOOK_ENV)
    if not spec or rank != 0:
        return
    at, _, marker = spec.partition(":")
    if step == int(at) and marker and not Path(marker).exists():
        Path(marker).write_text(f"failed at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_HOOK_ENV})")


class _MlflowCurves:
    """Rank 0's per-step curves, batched into MLflow (plain client API: works under Ray Train V2)."""

    def __init__(self, uri: str | None, run_id: str | None) -> None:
        self.client = None
        if uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(uri), run_id
        self.pending: list = []

    def log(self, step: int, **values: float) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items()]
        if len(self.pending) >= 200:
            self.flush()

    def flush(self) -> None:
        if self.client is not None and self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import torch.distributed as dist

    from flexi_workflows.models.loading import load_model
    from flexi_workflows.recipes.loader import build
    from flexi_workflows.recipes.schema import MethodConfig, Recipe
    from flexi_workflows.training.data import collate
    from flexi_workflows.training.methods import build_trainable

    recipe: Recipe = build(Recipe, config["recipe"], source="recipe (worker copy)")
    method: MethodConfig = build(MethodConfig, config["method"], source="method (worker copy)")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(recipe.distribution.torch_threads or max(1, recipe.distribution.cpus_per_worker)))
    torch.manual_seed(recipe.seed)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if recipe.distribution.use_gpu else "cpu")
    total_steps, steps_per_epoch = config["total_steps"], config["steps_per_epoch"]
    train_cfg = recipe.training
    accum = train_cfg.gradient_accumulation_steps

    base = load_model(recipe.model.name_or_path, dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code)
    trainable = build_trainable(base, method, seed=recipe.seed + rank, total_steps=total_steps)
    params = [p for p in trainable.model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, train_cfg.warmup_ratio, train_cfg.schedule))

    use_ds = recipe.distribution.strategy == "deepspeed"
    if use_ds:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=trainable.model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(recipe)
        )
        model = engine
    else:
        model = ray.train.torch.prepare_model(trainable.model, move_to_device=device)

    step = 0
    loss_curve: list[list[float]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            step = _load_state(Path(ckpt_dir), model, optimizer, scheduler, use_ds, trainable)
            state_file = Path(ckpt_dir) / STATE_FILE
            if state_file.is_file():
                loss_curve = [p for p in json.loads(state_file.read_text())["loss_curve"] if p[0] <= step]

    resumed_from = step
    curves = _MlflowCurves(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else _MlflowCurves(None, None)
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    pad = config["pad_token_id"]
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    every = train_cfg.checkpoint_every or steps_per_epoch

    def report(final: bool) -> None:
        metrics = {"step": step, "epoch": step / max(1, steps_per_epoch), "loss_curve": loss_curve,
                   "trainable_params": n_trainable, "resumed_from_step": resumed_from,
                   "lr": scheduler.get_last_lr()[0] if hasattr(scheduler, "get_last_lr") else train_cfg.lr}
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            _save_state(tmp_path, model, optimizer, scheduler, use_ds, trainable, step, rank)
            if final:
                _export(tmp_path / EXPORT_DIR, trainable, method, use_ds, rank)
            if rank == 0:
                (tmp_path / STATE_FILE).write_text(json.dumps({"step": step, "loss_curve": loss_curve}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    model.train()
    start_epoch = step // max(1, steps_per_epoch)
    for epoch in range(start_epoch, math.ceil(total_steps / max(1, steps_per_epoch))):
        skip = (step - epoch * steps_per_epoch) * accum  # micro-batches already done in this epoch
        micro = 0
        batches = shard.iter_torch_batches(
            batch_size=train_cfg.micro_batch_size, collate_fn=lambda b: collate(b, pad), drop_last=True,
            local_shuffle_buffer_size=4 * train_cfg.micro_batch_size, local_shuffle_seed=recipe.seed * 1000 + epoch,
        )
        for batch in batches:
            if step >= total_steps or micro >= steps_per_epoch * accum:
                break
            micro += 1
            if micro <= skip:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**trainable.forward_kwargs(batch))
            loss = out.loss
            if use_ds:
                engine.backward(loss)
                boundary = engine.is_gradient_accumulation_boundary()
                if boundary and trainable.after_backward is not None:
                    trainable.after_backward(step)
                engine.step()
            else:
                (loss / accum).backward()
                boundary = micro % accum == 0
                if boundary:
                    torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
                    optimizer.step()
                    if trainable.after_backward is not None:
                        trainable.after_backward(step)
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            window_loss += float(loss.detach()) / accum
            window_tokens += int(batch["attention_mask"].sum())
            if not boundary:
                continue
            step += 1
            _maybe_fail(step, rank)
            if step % train_cfg.log_every == 0 or step == total_steps:
                stats = torch.tensor([window_loss, float(window_tokens)], dtype=torch.float64)
                if world > 1:
                    dist.all_reduce(stats)
                n_steps = train_cfg.log_every if step % train_cfg.log_every == 0 else step % train_cfg.log_every
                mean_loss = float(stats[0]) / world / max(1, n_steps)
                elapsed = time.perf_counter() - window_start
                lr = scheduler.get_last_lr()[0]
                loss_curve.append([step, mean_loss])
                tokens_per_s = float(stats[1]) / max(elapsed, 1e-9)
                curves.log(step, loss=mean_loss, lr=lr, tokens_per_s=tokens_per_s)
                if rank == 0:
                    print(f"[{method.name}] step {step}/{total_steps}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                          f"{tokens_per_s:,.0f} tokens/s", flush=True)
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if step < total_steps and step % every == 0:
                curves.flush()
                report(final=False)
        if step >= total_steps:
            break
    curves.flush()
    report(final=True)


def _save_state(path: Path, model, optimizer, scheduler, use_ds: bool, trainable, step: int, rank: int) -> None:
    if use_ds:
        # every rank writes its own ZeRO partition; Ray Train merges the workers' folders
        model.save_checkpoint(str(path / "deepspeed"), tag="state", client_state={"step": step},
                              exclude_frozen_parameters=True)
    elif rank == 0:
        trainable_state = {n: p.detach().cpu() for n, p in trainable.model.named_parameters() if p.requires_grad}
        torch.save({"model": trainable_state, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step}, path / "ddp_state.pt")


def _load_state(path: Path, model, optimizer, scheduler, use_ds: bool, trainable) -> int:
    if use_ds:
        _, client = model.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        return int(client["step"])
    state = torch.load(path / "ddp_state.pt", map_location="cpu", weights_only=False)
    named = dict(trainable.model.named_parameters())
    with torch.no_grad():
        for name, value in state["model"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def _export(path: Path, trainable, method, use_ds: bool, rank: int) -> None:
    """Rank 0 writes the trained artifact; under ZeRO-3 every rank first joins the gather."""
    from flexi_workflows.training.methods import export_trained

    if use_ds:
        import deepspeed

        params = [p for p in trainable.model.parameters() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if rank == 0:
                export_trained(trainable.model, method, path)
        return
    if rank == 0:
        export_trained(trainable.model, method, path)
