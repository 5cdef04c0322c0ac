"""Stage 3, train: fine-tune one method on Ray Train (TorchTrainer, DeepSpeed ZeRO or DDP).

    task rows ──► prompt + target, tokenized (loss on answer tokens only)
              ──► flexi: router ranks per row (router/apply.py) — the rank travels with the batch
              ──► ray.data, materialized, split into one deterministic shard per worker
              ──► TorchTrainer(train_loop_per_worker) ──► final checkpoint/export
              ──► <output_dir>/train/<label>/ (artifact, train_report.json, manifest.json)

The data is materialized before the trainer starts: streaming a Ray Data pipeline straight into
the trainer can deadlock on a 2-CPU machine (the trainer and the pipeline hold both CPUs).
Ray Train keeps checkpoints under <output_dir>/ray_results/<label>-<fingerprint>/: a crashed worker
group restarts from the latest one (training.max_failures), and rerunning an interrupted stage with
the same inputs resumes from it instead of starting over.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError
from flexi_workflows.fsutil import fingerprint, path_digest
from flexi_workflows.recipes.schema import MethodConfig, Recipe
from flexi_workflows.stages.common import cached_output, manifest_fingerprint, publish_stage
from flexi_workflows.tasks import get_task

log = logging.getLogger(__name__)

REPORT = "train_report.json"
ARTIFACT = "artifact"


def stage_dir(recipe: Recipe, label: str) -> Path:
    return Path(recipe.output_dir) / "train" / label


def data_fingerprint(source) -> dict:
    data = {"source": dataclasses.asdict(source)}
    if source.path:
        data["digest"] = path_digest(source.path)
    return data


def train_fingerprint(recipe: Recipe, method: MethodConfig) -> dict:
    from flexi_workflows.models.loading import model_fingerprint
    from flexi_workflows.stages.route import stage_dir as route_dir

    inputs = {
        "stage": "train",
        "method": dataclasses.asdict(method),
        "model": {**dataclasses.asdict(recipe.model), **model_fingerprint(recipe.model.name_or_path)},
        "task": {"name": recipe.task.name, "max_prompt_tokens": recipe.task.max_prompt_tokens,
                 "max_target_tokens": recipe.task.max_target_tokens},
        "data": data_fingerprint(recipe.task.train),
        "training": {k: v for k, v in dataclasses.asdict(recipe.training).items() if k not in ("log_every", "resume")},
        "distribution": {k: v for k, v in dataclasses.asdict(recipe.distribution).items() if k != "torch_threads"},
        "seed": recipe.seed,
    }
    if method.name == "flexi":
        inputs["router"] = manifest_fingerprint(route_dir(recipe))
    return inputs


def check_resources(recipe: Recipe) -> None:
    """More workers than this machine (or the named cluster) can hold is an error before any work."""
    dist = recipe.distribution
    need_cpu = dist.num_workers * dist.cpus_per_worker
    need_gpu = dist.num_workers * dist.gpus_per_worker
    if recipe.ray.address or os.environ.get("RAY_ADDRESS"):
        import ray

        if not ray.is_initialized():
            return  # resources are checked once connected (ensure_ray) — a cluster may autoscale
        have = ray.cluster_resources()
        have_cpu, have_gpu = have.get("CPU", 0), have.get("GPU", 0)
    else:
        import torch

        have_cpu = recipe.ray.num_cpus or os.cpu_count() or 1
        have_gpu = torch.cuda.device_count()
    if need_cpu > have_cpu:
        raise ConfigError(
            f"distribution.num_workers={dist.num_workers} × cpus_per_worker={dist.cpus_per_worker} needs "
            f"{need_cpu:g} CPUs but only {have_cpu:g} are available"
        )
    if need_gpu > have_gpu:
        raise ConfigError(
            f"distribution.num_workers={dist.num_workers} × gpus_per_worker={dist.gpus_per_worker} needs "
            f"{need_gpu:g} GPUs but {have_gpu:g} are available"
        )


def validate_train_inputs(recipe: Recipe, method: MethodConfig) -> None:
    from flexi_workflows.models.loading import load_config
    from flexi_workflows.stages.route import ROUTER_DIR
    from flexi_workflows.stages.route import stage_dir as route_dir

    if recipe.task.train is None:
        raise ConfigError("task.train is not set: the train stage needs a training set")
    load_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    check_resources(recipe)
    if method.name == "flexi" and not (route_dir(recipe) / ROUTER_DIR).is_dir():
        raise ConfigError(f"{route_dir(recipe) / ROUTER_DIR}: no router; run `flexi route` with this recipe first")
    if recipe.training.resume and not Path(recipe.training.resume).is_dir():
        raise ConfigError(f"training.resume: {recipe.training.resume} is not a checkpoint folder")


def training_examples(recipe: Recipe, method: MethodConfig) -> tuple[list[dict[str, Any]], dict]:
    """Tokenized examples (with a `rank` column for flexi) and routing statistics."""
    import numpy as np

    from flexi_workflows.models.loading import load_tokenizer
    from flexi_workflows.training.data import encode_example

    task = get_task(recipe.task.name)
    rows = task.load(recipe.task.train)
    tokenizer = load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    special = not getattr(tokenizer, "chat_template", None)
    examples = [
        encode_example(task.build_prompt(r, tokenizer), r["target"], tokenizer,
                       max_prompt_tokens=recipe.task.max_prompt_tokens,
                       max_target_tokens=recipe.task.max_target_tokens, add_special_tokens=special)
        for r in rows
    ]
    routing: dict = {}
    if method.name == "flexi":
        from flexi_workflows.router.apply import route_texts
        from flexi_workflows.stages.route import ROUTER_DIR
        from flexi_workflows.stages.route import stage_dir as route_dir

        _, ranks = route_texts([task.user_text(r) for r in rows], route_dir(recipe) / ROUTER_DIR,
                               recipe.model.name_or_path, method.ranks, max_length=recipe.task.max_prompt_tokens,
                               trust_remote_code=recipe.model.trust_remote_code)
        for example, rank in zip(examples, ranks):
            example["rank"] = int(rank)
        routing = {"mean_rank": float(np.mean(ranks)),
                   "rank_shares": {str(r): float(np.mean(ranks == r)) for r in method.ranks}}
    return examples, {"routing": routing, "pad_token_id": tokenizer.pad_token_id, "rows": len(rows)}


def run_train(recipe: Recipe, method: MethodConfig, *, tracking: Any = None, force: bool = False) -> Path:
    """Run (or reuse) training of one method; returns the stage folder."""
    import ray
    from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flexi_workflows.ray_cluster import ensure_ray
    from flexi_workflows.recipes.loader import to_dict
    from flexi_workflows.training.loop import EXPORT_DIR, FAIL_HOOK_ENV, train_loop_per_worker
    from flexi_workflows.training.methods import method_label

    label = method_label(method)
    validate_train_inputs(recipe, method)
    out_dir = stage_dir(recipe, label)
    inputs = train_fingerprint(recipe, method)
    if not force and cached_output(out_dir, inputs) is not None:
        log.info("train %s: inputs unchanged, reusing %s", label, out_dir)
        return out_dir

    examples, info = training_examples(recipe, method)
    dist, train = recipe.distribution, recipe.training
    per_worker = len(examples) // dist.num_workers
    steps_per_epoch = per_worker // (train.micro_batch_size * train.gradient_accumulation_steps)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"{len(examples)} training rows over {dist.num_workers} workers do not fill one step of "
            f"training.micro_batch_size={train.micro_batch_size} × gradient_accumulation_steps="
            f"{train.gradient_accumulation_steps}"
        )
    total_steps = train.epochs * steps_per_epoch
    if train.max_steps is not None:
        total_steps = min(total_steps, train.max_steps)

    ensure_ray(recipe.ray)
    check_resources(recipe)
    # the shards carry the context they were made in: no per-epoch progress bars from the workers
    # (rank 0 logs steps, loss and throughput instead)
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        dataset = ray.data.from_items(examples).materialize()
        shards = dataset.split(dist.num_workers, equal=True)
    finally:
        context.enable_progress_bars = bars
    run_id = tracking.start_child(f"train:{label}", recipe, method) if tracking is not None else None
    storage = Path(recipe.output_dir).resolve() / "ray_results"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "recipe": to_dict(recipe),
            "method": dataclasses.asdict(method),
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "pad_token_id": info["pad_token_id"],
            "tracking_uri": tracking.uri if tracking is not None else None,
            "run_id": run_id,
        },
        scaling_config=ScalingConfig(
            num_workers=dist.num_workers,
            use_gpu=dist.use_gpu,
            resources_per_worker={"CPU": dist.cpus_per_worker, **({"GPU": dist.gpus_per_worker} if dist.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=f"{label}-{fingerprint(inputs)}",
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # the test-only fault hook must reach worker processes that Ray starts later
            worker_runtime_env={"env_vars": {FAIL_HOOK_ENV: os.environ[FAIL_HOOK_ENV]}} if FAIL_HOOK_ENV in os.environ else None,
        ),
        datasets={f"train_{i}": shard for i, shard in enumerate(shards)},
        dataset_config=DataConfig(datasets_to_split=[]),
        resume_from_checkpoint=Checkpoint.from_directory(train.resume) if train.resume else None,
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    report = {
        "method": label,
        "steps": metrics.get("step"),
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "rows": info["rows"],
        "loss_curve": metrics.get("loss_curve", []),
        "trainable_params": metrics.get("trainable_params"),
        "resumed_from_step": metrics.get("resumed_from_step"),
        "routing": info["routing"],
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
    }
    with publish_stage(out_dir, inputs, [ARTIFACT, REPORT]) as tmp:
        with result.checkpoint.as_directory() as ckpt:
            shutil.copytree(Path(ckpt) / EXPORT_DIR, tmp / ARTIFACT)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    if tracking is not None:
        tracking.finish_train(run_id, out_dir, report)
    curve = report["loss_curve"]
    log.info("train %s: %s steps, loss %s → %s", label, report["steps"],
             f"{curve[0][1]:.3f}" if curve else "?", f"{curve[-1][1]:.3f}" if curve else "?")
    return out_dir
