"""Stage 3, train: fine-tune one method on Ray Train (TorchTrainer, DeepSpeed ZeRO or DDP).

    task rows ──► prompt + target, tokenized (loss on answer tokens only); speech: decoder labels of the
                  transcript, audio left encoded until a worker collates its batch into log-mel features
              ──► methods that route: a rank per row (stages/routing.py) — the rank travels with the batch
              ──► ray.data, materialized, split into one deterministic shard per worker
              ──► TorchTrainer(train_loop_per_worker) ──► final checkpoint/export
              ──► <output_dir>/train/<label>-<fingerprint>/ (artifact, train_report.json, ranks_used.json,
                  manifest.json)

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
import math
import os
import shutil
from pathlib import Path
from typing import Any

from flexi_workflows.errors import ConfigError
from flexi_workflows.methods import Method, get_method
from flexi_workflows.plots import loss_curve_plot
from flexi_workflows.recipes.schema import MethodConfig, Recipe
from flexi_workflows.stages.base import (
    Stage,
    StageContext,
    StageOutput,
    StageResult,
    recipe_storage,
    run_stage,
)
from flexi_workflows.stages.inputs import data_inputs, dataset_record, model_inputs, task_inputs
from flexi_workflows.tasks import get_task, metric_key, subset_counts

log = logging.getLogger(__name__)

REPORT = "train_report.json"
ARTIFACT = "artifact"
RANKS_USED = "ranks_used.json"  # methods on the nested adapter: the rank of every micro-batch on every worker
LOSS_PLOT = "loss_curve.png"
RAY_RESULTS = "ray_results"  # Ray Train's storage_path below the run's storage root
# result-neutral training keys (stages/inputs.py) plus those counted apart: lr (per method) and resume (by content)
NEUTRAL_TRAINING = ("log_every", "checkpoint_every", "max_failures", "resume", "lr", "gradient_checkpointing")


def effective_lr(recipe: Recipe, method: MethodConfig) -> float:
    """A method's own learning rate if it sets one (full fine-tuning usually does), else training.lr."""
    return method.lr if method.lr is not None else recipe.training.lr


def check_resources(recipe: Recipe) -> None:
    """Training workers or an actor pool that this machine (or the named cluster) cannot hold is an error
    before any work: Ray would otherwise wait for them forever (a GPU asked for on a CPU machine)."""
    import ray

    if ray.is_initialized() or recipe.ray.address or os.environ.get("RAY_ADDRESS"):
        if not ray.is_initialized():
            return  # resources are checked once connected (ensure_ray) — a cluster may autoscale
        have = ray.cluster_resources()  # the cluster this process is connected to, all its nodes
        have_cpu, have_gpu = have.get("CPU", 0), have.get("GPU", 0)
    else:
        import torch

        have_cpu = recipe.ray.num_cpus or os.cpu_count() or 1
        have_gpu = torch.cuda.device_count()
    dist, score, evaluation = recipe.distribution, recipe.scoring, recipe.evaluation
    groups = [
        ("distribution", "num_workers", dist.num_workers, "cpus_per_worker", dist.cpus_per_worker,
         "gpus_per_worker", dist.gpus_per_worker),
        ("scoring", "num_actors", score.num_actors, "cpus_per_actor", score.cpus_per_actor,
         "gpus_per_actor", score.gpus_per_actor),
        ("evaluation", "num_actors", evaluation.num_actors, "cpus_per_actor", evaluation.cpus_per_actor,
         "gpus_per_actor", evaluation.gpus_per_actor),
    ]
    for section, count_key, count, cpu_key, cpus, gpu_key, gpus in groups:
        if count * cpus > have_cpu:
            raise ConfigError(f"{section}.{count_key}={count} × {cpu_key}={cpus:g} needs {count * cpus:g} CPUs "
                              f"but only {have_cpu:g} are available")
        if count * gpus > have_gpu:
            raise ConfigError(f"{section}.{count_key}={count} × {gpu_key}={gpus:g} needs {count * gpus:g} GPUs "
                              f"but {have_gpu:g} are available")


def training_examples(recipe: Recipe, method: Method, routing_source: StageResult | None) -> tuple[list[dict[str, Any]], dict]:
    """Tokenized examples (with a `rank` column for methods that route) and routing statistics."""
    from flexi_workflows.data.causal_lm import encode_example
    from flexi_workflows.models.loading import load_tokenizer
    from flexi_workflows.stages.routing import assign_ranks

    task = get_task(recipe.task)
    rows = task.load(recipe.task.train)
    extra: dict[str, Any] = {}
    if task.modality == "speech":
        examples, tokenizer, rows, extra = speech_examples(recipe, rows)
    else:
        tokenizer = load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
        special = not getattr(tokenizer, "chat_template", None)
        examples = [
            encode_example(task.build_prompt(r, tokenizer, date_string=recipe.task.date_string), r["target"], tokenizer,
                           max_prompt_tokens=recipe.task.max_prompt_tokens,
                           max_target_tokens=recipe.task.max_target_tokens, add_special_tokens=special)
            for r in rows
        ]
    routing: dict = {}
    if method.routing is not None:
        ranks, routing = assign_ranks(recipe, method, rows, routing_source)
        for example, rank in zip(examples, ranks):
            example["rank"] = int(rank)
    return examples, {"routing": routing, "pad_token_id": tokenizer.pad_token_id, "rows": len(rows),
                      "subsets": subset_counts(rows), **extra}


def speech_examples(recipe: Recipe, rows: list[dict]) -> tuple[list[dict[str, Any]], Any, list[dict], dict]:
    """(examples, tokenizer, the rows kept, what was left out): decoder labels per utterance, the audio left
    encoded (workers make the features when they collate). Utterances longer than the model's window
    (Whisper: 30 s) are left out, as Whisper fine-tuning recipes do: the features would cut their audio
    while the transcript stays whole, teaching the model to invent the rest."""
    from flexi_workflows.data.speech import encode_labels, set_transcription_prefix
    from flexi_workflows.models.loading import load_config, load_processor, local_ref

    model = recipe.model
    processor = load_processor(model.name_or_path, trust_remote_code=model.trust_remote_code)
    config = load_config(model.name_or_path, trust_remote_code=model.trust_remote_code)
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(local_ref(model.name_or_path))
    except OSError:  # no generation_config.json: an English-only prefix
        generation = None
    window = float(processor.feature_extractor.chunk_length)
    too_long = [r["id"] for r in rows if (r.get("seconds") or 0.0) > window]
    if too_long:
        log.warning("train: %d of %d utterances are longer than the model's %g-second window and are left out "
                    "(e.g. %s)", len(too_long), len(rows), window, ", ".join(too_long[:3]))
        rows = [r for r in rows if (r.get("seconds") or 0.0) <= window]
    tokenizer = processor.tokenizer
    set_transcription_prefix(tokenizer, generation)
    start = config.decoder_start_token_id
    examples = [{"id": r["id"], "audio": r["audio"],
                 "labels": encode_labels(r["target"], tokenizer, max_target_tokens=recipe.task.max_target_tokens,
                                         decoder_start_token_id=start)} for r in rows]
    return examples, tokenizer, rows, {"left_out_over_window": len(too_long)}


def split_validation(examples: list[dict], rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out) examples: `rows` drawn with a seeded generator, the rest in their order."""
    if rows <= 0:
        return examples, []
    if rows >= len(examples):
        raise ConfigError(f"training.validation_rows={rows} leaves no training rows (the set has {len(examples)})")
    import numpy as np

    held = set(np.random.default_rng(seed).choice(len(examples), size=rows, replace=False).tolist())
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def best_checkpoint(kept: list[tuple[Any, dict]]) -> tuple[Any, dict]:
    """(checkpoint, metrics) of the kept checkpoint with the lowest `val_score`, the earliest of equals."""
    scored = [(c, m) for c, m in kept if math.isfinite(m.get("val_score", math.inf))]
    if not scored:
        raise RuntimeError("training.final_artifact: best, but Ray Train kept no checkpoint with a held-out loss")
    return min(scored, key=lambda cm: (cm[1]["val_score"], cm[1]["step"]))


def ranks_used_summary(records: list[dict]) -> dict[str, Any]:
    """What the workers' rank record says: rows per rank, the mean rank, and whether every optimizer step
    used one rank on every worker and micro-batch (what DyLoRA / DyLoRA+ must do; LoRA-r trivially does)."""
    rows: dict[int, int] = {}
    per_step: dict[int, set] = {}
    for r in records:
        for k, n in r["rows"].items():
            rows[int(k)] = rows.get(int(k), 0) + n
        per_step.setdefault(r["step"], set()).add(r["rank"])
    total = sum(rows.values())
    return {
        "micro_batches": len(records),
        "workers": sorted({r["worker"] for r in records}),
        "rows_by_rank": {str(k): rows[k] for k in sorted(rows)},
        "mean_rank": sum(k * n for k, n in rows.items()) / max(1, total),
        "one_rank_per_step": all(len(v) == 1 and None not in v for v in per_step.values()),
        "steps_by_rank": _steps_by_rank(per_step),
    }


def _steps_by_rank(per_step: dict[int, set]) -> dict[str, int]:
    counts: dict[int, int] = {}
    for ranks in per_step.values():
        if len(ranks) == 1 and None not in ranks:
            k = next(iter(ranks))
            counts[k] = counts.get(k, 0) + 1
    return {str(k): counts[k] for k in sorted(counts)}


def fit_stopping_on_ctrl_c(trainer):
    """`trainer.fit()`, where Ctrl-C aborts the training run as Ray Train does (its controller stops the
    workers) and then reaches the driver as KeyboardInterrupt, so the run ends the way every other stage does
    (MLflow runs KILLED, one line on what is kept, exit 130). Ray Train's own handler ends the driver with
    sys.exit(0) instead: a silent exit status 0 with the pipeline cut short."""
    import signal
    import threading

    import ray

    def register(controller) -> None:
        def on_sigint(signum, frame):
            try:
                ray.get(controller.abort.remote(), timeout=60)
            except Exception:  # noqa: BLE001 — the controller may already be gone; the driver stops anyway
                pass
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    if hasattr(trainer, "_register_sigint_handler"):
        trainer._register_sigint_handler = register
    try:
        return trainer.fit()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def worker_config(recipe: Recipe, method: MethodConfig, *, total_steps: int, steps_per_epoch: int, pad_token_id: int,
                  tracking_uri: str | None, run_id: str | None, validation: bool,
                  latest_checkpoint: list | None = None) -> dict[str, Any]:
    """Everything `train_loop_per_worker` reads, as plain data: a worker on another node gets it in the
    TorchTrainer's config and reads no file of the driver's. Shared with bench/gpu_check.py, so the GPU
    check runs the same worker loop with the same inputs as this stage."""
    from flexi_workflows.recipes.loader import to_dict
    from flexi_workflows.training.engines import deepspeed_config_for

    return {
        "recipe": to_dict(recipe),
        "method": to_dict(method),
        "lr": effective_lr(recipe, method),
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "pad_token_id": pad_token_id,
        "tracking_uri": tracking_uri,
        "run_id": run_id,
        "validation": validation,
        "modality": get_task(recipe.task).modality,
        # built here, where the recipe's files are: a worker on another node never reads them
        "deepspeed_config": deepspeed_config_for(recipe) if recipe.distribution.strategy == "deepspeed" else None,
        # training.resume: Ray Train V2 has no resume_from_checkpoint; the loop starts from this folder
        # (a path or a storage URI) when the run has no checkpoint of its own yet
        "resume": recipe.training.resume,
        # [storage URI, folder, step]: this run's newest whole checkpoint, which Ray Train may not have
        # registered (a driver stopped between the upload and the registration); training/checkpoints.py
        "latest_checkpoint": latest_checkpoint,
    }


class TrainStage(Stage):
    kind = "train"
    files = [ARTIFACT, REPORT]

    def __init__(self, recipe: Recipe, method: MethodConfig, route: Stage | None, score: Stage | None = None) -> None:
        """`route` (the learned router) or `score` (the oracle's scored classes) gives each row its rank."""
        self.method = get_method(method)
        self.route = {"learned": route, "oracle": score, None: None}[self.method.routing]
        if self.method.routing is not None and self.route is None:
            raise ConfigError(f"{self.method.label} routes by difficulty: it needs the "
                              f"{'route' if self.method.needs_router else 'score'} stage")
        super().__init__(recipe_storage(recipe), [self.route] if self.route is not None else [])
        self.recipe = recipe
        self.label = self.method.train_label

    def inputs(self) -> dict:
        recipe, dist = self.recipe, self.recipe.distribution
        inputs = {
            "method": self.method.train_inputs(),
            "lr": effective_lr(recipe, self.method.config),
            "model": model_inputs(recipe.model),
            "task": {**task_inputs(recipe), "max_target_tokens": recipe.task.max_target_tokens},
            "data": data_inputs(recipe.task.train),
            "training": {k: v for k, v in dataclasses.asdict(recipe.training).items() if k not in NEUTRAL_TRAINING},
            "distribution": {"num_workers": dist.num_workers, "strategy": dist.strategy, "zero_stage": dist.zero_stage,
                             "bf16": dist.bf16},
            "seed": recipe.seed,
        }
        if dist.deepspeed_config:  # by content, not by where the file lies: any key of it may change the result
            from flexi_workflows.training.engines import read_deepspeed_file

            inputs["distribution"]["deepspeed_config"] = read_deepspeed_file(dist.deepspeed_config)
        if recipe.training.resume and Path(recipe.training.resume).exists():
            from flexi_workflows.fsutil import path_digest

            inputs["resume"] = path_digest(recipe.training.resume)  # where training starts from changes the result
        return inputs

    def datasets(self) -> list[dict]:
        return [dataset_record(self.recipe.task.train, "training")]  # validation_rows are held out of it

    def check(self) -> None:
        from flexi_workflows.models.loading import load_config

        recipe = self.recipe
        if recipe.task.train is None:
            raise ConfigError("task.train is not set: the train stage needs a training set")
        load_config(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
        check_resources(recipe)
        if recipe.distribution.strategy == "deepspeed":  # the deepspeed_config file: readable, no conflicts
            from flexi_workflows.training.engines import deepspeed_config_for

            deepspeed_config_for(recipe)
        if recipe.training.resume and not Path(recipe.training.resume).is_dir():
            raise ConfigError(f"training.resume: {recipe.training.resume} is not a checkpoint folder")

    def run(self, tmp: Path, upstream: dict[str, StageResult], context: StageContext) -> StageOutput:
        import ray
        from ray.train import (
            CheckpointConfig,
            DataConfig,
            FailureConfig,
            RunConfig,
            ScalingConfig,
        )
        from ray.train import LoggingConfig as TrainLoggingConfig
        from ray.train.torch import TorchTrainer

        from flexi_workflows.ray_cluster import ensure_ray
        from flexi_workflows.training.checkpoints import latest_whole
        from flexi_workflows.training.loop import EXPORT_DIR, FAIL_HOOK_ENV, RANKS_FILE, train_loop_per_worker

        if context.report_to_tune:
            from ray.tune.integration.ray_train import TuneReportCallback

            class EpochReportCallback(TuneReportCallback):
                """Only the epoch-end reports, which carry val_loss: Tune's scheduler checks every result
                for its metric, and mid-epoch checkpoints (training.checkpoint_every, eval_every) are not
                the epochs its rungs count."""

                def after_report(self, run_context, metrics, checkpoint):
                    if metrics and "val_loss" in metrics[0] and metrics[0].get("epoch_end", True):
                        super().after_report(run_context, [{k: v for k, v in metrics[0].items()
                                                            if k in ("epoch", "step", "val_loss")}], None)

        recipe, label = self.recipe, self.label
        route = upstream[self.route.name] if self.route is not None else None
        examples, info = training_examples(recipe, self.method, route)
        log.info("train %s: %d rows, per subset %s", label, info["rows"], info["subsets"])
        dist, train = recipe.distribution, recipe.training
        examples, validation = split_validation(examples, train.validation_rows, recipe.seed)
        if validation and len(validation) < dist.num_workers:
            raise ConfigError(f"training.validation_rows={train.validation_rows} gives fewer rows than "
                              f"distribution.num_workers={dist.num_workers}")
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
        data_context = ray.data.DataContext.get_current()
        bars, data_context.enable_progress_bars = data_context.enable_progress_bars, False
        try:
            dataset = ray.data.from_items(examples).materialize()
            shards = {f"train_{i}": shard for i, shard in enumerate(dataset.split(dist.num_workers, equal=True))}
            if validation:
                held = ray.data.from_items(validation).materialize()
                shards |= {f"val_{i}": shard for i, shard in enumerate(held.split(dist.num_workers, equal=True))}
        finally:
            data_context.enable_progress_bars = bars
        # checkpoints in the run's storage: workers on any node write there, a restarted worker group reads there
        run_name = f"{label}-{self.fingerprint}"
        keep_best = train.final_artifact == "best"
        if context.fresh:  # --force: Ray Train would otherwise restore this run's last checkpoint
            self.storage.delete(f"{RAY_RESULTS}/{run_name}")
        latest = None if context.fresh else latest_whole(self.storage, f"{RAY_RESULTS}/{run_name}")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=worker_config(
                recipe, self.method.config, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                pad_token_id=info["pad_token_id"], tracking_uri=context.tracking_uri, run_id=context.run_id,
                validation=bool(validation),
                latest_checkpoint=[self.storage.uri, latest[0], latest[1]] if latest else None),
            scaling_config=ScalingConfig(
                num_workers=dist.num_workers,
                use_gpu=dist.use_gpu,
                resources_per_worker={"CPU": dist.cpus_per_worker, **({"GPU": dist.gpus_per_worker} if dist.use_gpu else {})},
            ),
            run_config=RunConfig(
                name=run_name,
                storage_path=self.storage.path(RAY_RESULTS),
                storage_filesystem=self.storage.fs if self.storage.remote else None,
                failure_config=FailureConfig(max_failures=train.max_failures),
                # Ray Train's routine INFO lines (resources requested, worker group started, every checkpoint
                # and report) stay in its log files; the console shows the loop's own progress lines
                logging_config=TrainLoggingConfig(log_level="WARNING"),
                # the latest checkpoint is always kept (a restart resumes from it); with final_artifact: best,
                # also the two with the lowest held-out loss (training/loop.py reports it as val_score)
                checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_score",
                                                   checkpoint_score_order="min") if keep_best
                else CheckpointConfig(num_to_keep=2),
                # the test-only fault hook must reach worker processes that Ray starts later
                worker_runtime_env={"env_vars": {FAIL_HOOK_ENV: os.environ[FAIL_HOOK_ENV]}} if FAIL_HOOK_ENV in os.environ else None,
                # inside a sweep trial, the per-epoch reports (val_loss) reach Tune's scheduler
                callbacks=[EpochReportCallback()] if context.report_to_tune else None,
            ),
            datasets=shards,
            dataset_config=DataConfig(datasets_to_split=[]),
        )
        result = fit_stopping_on_ctrl_c(trainer)
        metrics = dict(result.metrics or {})
        chosen, chosen_metrics = result.checkpoint, metrics
        if keep_best:
            chosen, chosen_metrics = best_checkpoint(result.best_checkpoints or [])
        report = {
            "method": label,
            "steps": metrics.get("step"),
            "gradient_checkpointing": metrics.get("gradient_checkpointing", False),
            "precision": metrics.get("precision"), "bf16_by": metrics.get("bf16_by"),
            # ZeRO-3 builds the model partitioned: the base model's elements each worker held right after loading
            "partitioned_build": metrics.get("partitioned_build", False),
            "param_elements_total": metrics.get("param_elements_total"),
            "param_elements_held_by_worker": metrics.get("param_elements_held_by_worker"),
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "rows": info["rows"],
            "subsets": info["subsets"],
            **({"left_out_over_window": info["left_out_over_window"]} if "left_out_over_window" in info else {}),
            "loss_curve": metrics.get("loss_curve", []),
            "val_loss_curve": metrics.get("val_loss_curve", []),
            # seconds per optimizer step per log window, timed in the rank-0 worker (the first window
            # includes the data iterator's start; bench/train_overhead.py reads the rest)
            "throughput": metrics.get("throughput", []),  # per log window: [step, s/step, tokens/s], timed by rank 0
            # curve points the tracking server did not take (it was away): they are in this report instead
            "mlflow_unsent_metrics": metrics.get("mlflow_unsent_metrics", 0),
            "validation_rows": len(validation),
            "trainable_params": metrics.get("trainable_params"),
            "lr": effective_lr(recipe, self.method.config),
            "final_lr": metrics.get("lr"),  # the optimizer's rate at the last step, as the worker's scheduler left it
            "resumed_from_step": metrics.get("resumed_from_step"),
            "routing": info["routing"],
            "eval_every": train.eval_every,
            # which step's weights the artifact holds: the last, or (final_artifact: best) the lowest val_loss
            "final_artifact": train.final_artifact,
            "artifact_step": chosen_metrics.get("step"),
            "artifact_val_loss": chosen_metrics.get("val_score") if keep_best else None,
            "checkpoint": chosen.path if chosen else None,
        }
        with chosen.as_directory() as ckpt:
            shutil.copytree(Path(ckpt) / EXPORT_DIR, tmp / ARTIFACT)
        with result.checkpoint.as_directory() as ckpt:  # the whole run's rank record is in the last one
            records = json.loads((Path(ckpt) / RANKS_FILE).read_text()) if (Path(ckpt) / RANKS_FILE).is_file() else []
        if records:
            report["ranks_used"] = ranks_used_summary(records)
            (tmp / RANKS_USED).write_text(json.dumps(records) + "\n")
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        curve = report["loss_curve"]
        if report["mlflow_unsent_metrics"]:
            log.warning("train %s: %d curve points did not reach MLflow (the server was away); they are in %s",
                        label, report["mlflow_unsent_metrics"], REPORT)
        log.info("train %s: %s steps, loss %s → %s", label, report["steps"],
                 f"{curve[0][1]:.3f}" if curve else "?", f"{curve[-1][1]:.3f}" if curve else "?")
        out_metrics = {"trainable_params": report["trainable_params"] or 0, "train_steps": report["steps"] or 0,
                       **{f"train_rank_share_{k}": v for k, v in info["routing"].get("rank_shares", {}).items()},
                       **{f"subset_rows.{metric_key(k)}": n for k, n in info["subsets"].items()}}
        if records:  # rows trained at each rank, as recorded by the workers (DyLoRA: its per-step draws)
            out_metrics |= {f"train_rank_rows_{k}": v for k, v in report["ranks_used"]["rows_by_rank"].items()}
            out_metrics["train_mean_rank"] = report["ranks_used"]["mean_rank"]
        if curve:
            out_metrics["final_loss"] = curve[-1][1]
        if report["val_loss_curve"]:
            out_metrics["final_val_loss"] = report["val_loss_curve"][-1][1]
            out_metrics["best_val_loss"] = min(v for _, v in report["val_loss_curve"])
        out_metrics["artifact_step"] = report["artifact_step"] or 0
        params = {**{f"method.{k}": v for k, v in dataclasses.asdict(self.method.config).items()},
                  "method.label": label, "lr": effective_lr(recipe, self.method.config)}
        artifacts = [REPORT, ARTIFACT] + ([RANKS_USED] if records else [])
        if loss_curve_plot(curve, tmp / LOSS_PLOT, title=label):
            artifacts.append(LOSS_PLOT)
        curves = {"loss": curve, **({"val_loss": report["val_loss_curve"]} if report["val_loss_curve"] else {})}
        return StageOutput(metrics=out_metrics, params=params, artifacts=artifacts, curves=curves)


def run_train(recipe: Recipe, method: MethodConfig, *, force: bool = False, context: StageContext | None = None) -> StageResult:
    """Train (or reuse) one method; for a routed method the route stage must be finished."""
    from flexi_workflows.stages.plan import plan_pipeline

    stage = plan_pipeline(recipe).train_stage(method)
    stage.check()
    return run_stage(stage, force=force, context=context)
