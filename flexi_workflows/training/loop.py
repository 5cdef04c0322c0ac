"""The Ray Train worker loop: one recipe, any method, DeepSpeed ZeRO 0-3 or DDP, CPU or GPU.

Each worker:
  1. loads the base model — under ZeRO-3 already partitioned, each worker holding only its share — and
     applies the method (methods/);
  2. wraps it in a DeepSpeed engine (torch AdamW, the DeepSpeed config the driver built from the recipe and
     distribution.deepspeed_config, bf16 on GPU) or DDP (training/engines.py);
  3. restores adapter, optimizer, scheduler and step from Ray Train's checkpoint if there is one
     (a restarted worker group after a failure, or `training.resume`);
  4. trains on its own deterministic shard, the loss on answer tokens only, Flexi ranks arriving
     with each batch; DyLoRA / DyLoRA+ told the global optimizer step before every micro-batch, so one
     rank serves every worker and micro-batch of a step; logs loss / lr / tokens-per-second to MLflow
     from rank 0 and records the rank each micro-batch used (RANKS_FILE, in every checkpoint);
  5. with training.validation_rows, measures the held-out loss (`val_loss`) after each epoch, every
     `eval_every` steps if set, and at the last step;
  6. checkpoints through Ray Train at each epoch's end, every `checkpoint_every` steps if set, and at
     the end, where rank 0 also exports the trained artifact (adapter or weights) inside the checkpoint;
     with `final_artifact: best`, every checkpoint with a fresh `val_loss` exports it too and carries it
     as `val_score` (the others +inf), which Ray Train keeps the best checkpoints by;
  7. the first worker of each node samples the node's CPU / memory / disk / network (and GPU) use into
     the MLflow run as `system/*` metrics (tracking.system_metrics_interval).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FAIL_HOOK_ENV = "FLEXI_TEST_FAIL_AT_STEP"  # "k:/path/marker" — test-only fault injection, fires once
EXPORT_DIR = "export"
STATE_FILE = "trainer_state.json"
RANKS_FILE = "ranks_used.json"  # per worker and micro-batch: the optimizer step, micro-batch index and rank used


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


def enable_gradient_checkpointing(model) -> None:
    """transformers' activation checkpointing, non-reentrant: it needs no input that requires grad, so a
    frozen base under LoRA checkpoints as it is; the KV cache is off (it is for generation only)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def rank_record(worker: int, step: int, micro_batch: int, ranks: torch.Tensor) -> dict[str, Any]:
    """One micro-batch's entry: its optimizer step (0-based) and index in it, the rank shared by the
    micro-batch (None when its rows used several, as Flexi's may) and rows per rank."""
    values, counts = torch.unique(ranks.detach().cpu(), return_counts=True)
    return {"worker": worker, "step": step, "micro_batch": micro_batch,
            "rank": int(values[0]) if len(values) == 1 else None,
            "rows": {str(int(v)): int(c) for v, c in zip(values, counts)}}


def _checkpoint_step(checkpoint) -> int:
    """The step a Ray Train checkpoint was saved at (rank 0's trainer state), -1 if it cannot be read."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{STATE_FILE}") as handle:
            return int(json.loads(handle.read())["step"])
    except (OSError, ValueError, KeyError):
        return -1


@contextlib.contextmanager
def checkpoint_folder(checkpoint, attempts: int = 3, wait_s: float = 0.5):
    """`checkpoint.as_directory()`, tried again when Ray's per-node download lost a race.

    Workers on one node share one download of a remote checkpoint (a file lock, then a folder in /tmp
    that the last reader deletes). A worker that waits on the lock while another deletes the folder
    finds it gone and Ray raises ("... does not exist, even though it should have been created by
    another process"): seen when restarted workers resumed from a checkpoint in S3. Entering again
    downloads it afresh.
    """
    for attempt in range(1, attempts + 1):
        with contextlib.ExitStack() as stack:
            try:
                folder = stack.enter_context(checkpoint.as_directory())
            except RuntimeError as error:
                if "should have been created by another process" not in str(error) or attempt == attempts:
                    raise
                logger.warning("checkpoint %s: its shared download went away; downloading again (%d/%d)",
                               checkpoint.path, attempt + 1, attempts)
                time.sleep(wait_s)
                continue
            yield folder  # leaving the stack deletes the download, as as_directory's own `with` would
            return


def _maybe_fail(step: int, rank: int) -> None:
    spec = os.environ.get(FAIL_HOOK_ENV)
    if not spec or rank != 0:
        return
    at, _, marker = spec.partition(":")
    if step == int(at) and marker and not Path(marker).exists():
        Path(marker).write_text(f"failed at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_HOOK_ENV})")


class _MlflowCurves:
    """Rank 0's per-step curves, batched into MLflow (plain client API: works under Ray Train V2).

    Tracking never costs a run: a tracking server that stops answering makes a flush fail after a few
    seconds (MLflow's retries bounded below), the curves are kept and tried again no sooner than
    RETRY_S later, and whatever is still unsent at the end is counted in the train report (the curves
    themselves are in it too)."""

    RETRY_S = 30.0
    MAX_PENDING = 100_000

    def __init__(self, uri: str | None, run_id: str | None) -> None:
        self.client = None
        if uri and run_id:
            import os

            # MLflow's defaults retry a dead server for minutes per call, on the training path
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(uri), run_id
        self.pending: list = []
        self.failed_at: float | None = None
        self.dropped = 0

    def log(self, step: int, **values: float) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in values.items()]
        if len(self.pending) > self.MAX_PENDING:  # a server away for very long: the oldest go first
            self.dropped += len(self.pending) - self.MAX_PENDING
            self.pending = self.pending[-self.MAX_PENDING:]
        if len(self.pending) >= 200:
            self.flush()

    def flush(self, final: bool = False) -> None:
        if self.client is None or not self.pending:
            return
        if not final and self.failed_at is not None and time.time() - self.failed_at < self.RETRY_S:
            return
        try:
            for start in range(0, len(self.pending), 1000):
                self.client.log_batch(self.run_id, metrics=self.pending[start:start + 1000])
        except Exception as exc:  # noqa: BLE001 — any failure of the tracking server: training goes on
            if self.failed_at is None:
                print(f"warning: MLflow is not answering ({type(exc).__name__}); training goes on, the curves are "
                      f"kept and sent when it answers again", flush=True)
            self.failed_at = time.time()
            return
        self.pending, self.failed_at = [], None

    @property
    def unsent(self) -> int:
        return len(self.pending) + self.dropped


class _SystemMetrics:
    """MLflow's SystemMetricsMonitor on a run given by id (the plain-client way this loop logs, which
    `mlflow.enable_system_metrics_logging` — tied to the fluent active run — cannot reach). The monitor
    publishes only after a full interval; a run shorter than that would log nothing, so whatever it
    sampled since its last publish is published when it stops."""

    def __init__(self, uri: str | None, run_id: str | None, interval: float, node_id: str | None) -> None:
        self.monitor = None
        if uri and run_id and interval > 0:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, node_id=node_id, tracking_uri=uri,
                                                resume_logging=True)  # a restarted worker group goes on from its step
            self.monitor.start()

    def stop(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return
        try:
            monitor.finish()
            if any(m.metrics for m in monitor.monitors):
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
        except Exception as exc:  # noqa: BLE001 — system metrics are a record, never a reason to fail a run
            print(f"warning: system metrics not sent to MLflow ({type(exc).__name__})", flush=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from contextlib import nullcontext

    import ray.train
    import torch.distributed as dist

    from flexi_workflows.data.causal_lm import IGNORE_INDEX, collate
    from flexi_workflows.methods import get_method
    from flexi_workflows.models.loading import load_model
    from flexi_workflows.progress import format_eta
    from flexi_workflows.recipes.loader import build
    from flexi_workflows.recipes.schema import MethodConfig, Recipe

    try:  # Ray Train logs every report at INFO under a logger named by its file, outside RunConfig's logging_config
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    from flexi_workflows.training.checkpoints import verify_folder, write_manifest
    from flexi_workflows.training.engines import DDPEngine, DeepSpeedEngine, param_elements, partitioned_build

    # -- setup: recipe, devices, model + method, optimizer, engine, resumed state ------------------
    recipe: Recipe = build(Recipe, config["recipe"], source="recipe (worker copy)")
    method = get_method(build(MethodConfig, config["method"], source="method (worker copy)"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(recipe.distribution.torch_threads or max(1, recipe.distribution.cpus_per_worker)))
    torch.manual_seed(recipe.seed)
    device = torch.device(f"cuda:{ctx.get_local_rank()}" if recipe.distribution.use_gpu else "cpu")
    total_steps, steps_per_epoch = config["total_steps"], config["steps_per_epoch"]
    train_cfg, dist_cfg = recipe.training, recipe.distribution
    accum = train_cfg.gradient_accumulation_steps

    if dist_cfg.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"distribution.precision resolves to bf16 but {torch.cuda.get_device_name(device)} has "
                           f"no bf16 support; set distribution.precision: fp32")
    # the DeepSpeed config, built and checked on the driver (training/engines.py deepspeed_config_for)
    ds_config = config["deepspeed_config"] if dist_cfg.strategy == "deepspeed" else None
    # ZeRO-3: the model is loaded already partitioned, no worker ever holds all of it (engines.partitioned_build)
    partitioned = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3
    with partitioned_build(ds_config) if partitioned else nullcontext():
        base = load_model(recipe.model.name_or_path, dtype=torch.float32,
                          trust_remote_code=recipe.model.trust_remote_code)
    held, total_elements = param_elements(base)  # this worker's share of the base model, right after the build
    held_by_worker = [held]
    if world > 1 and dist.is_initialized():
        held_by_worker = [None] * world
        dist.all_gather_object(held_by_worker, held)
    if train_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(base)
    # the same seed on every worker: a rank drawn per optimizer step (DyLoRA) must agree across workers
    trainable = method.build(base, seed=recipe.seed, total_steps=total_steps)
    params = [p for p in trainable.model.parameters() if p.requires_grad]
    n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in params)  # a ZeRO-3 partition's numel() is 0
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=train_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, train_cfg.warmup_ratio, train_cfg.schedule))
    if ds_config is not None:
        engine = DeepSpeedEngine(trainable, optimizer, scheduler, ds_config)
    else:
        engine = DDPEngine(trainable, optimizer, scheduler, accumulation=accum, max_grad_norm=train_cfg.max_grad_norm,
                           device=device)

    # GPU memory: the peak while the model is built and handed to the engine, then the training peak alone
    # (what `flexi plan` estimates; bench/gpu_check.sh compares them)
    setup_peak = None
    if device.type == "cuda":
        setup_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    step = 0
    loss_curve: list[list[float]] = []
    throughput: list[list[float]] = []  # per log window: [step, seconds per step, tokens per second (all workers)]
    val_curve: list[list[float]] = []
    ranks_used: list[dict] = []  # this worker's record: one entry per micro-batch
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("resume"):  # training.resume: a checkpoint of another run
        checkpoint = ray.train.Checkpoint(config["resume"])
    newer = config.get("latest_checkpoint")  # whole, and perhaps never registered by Ray (checkpoints.py)
    if newer and (checkpoint is None or _checkpoint_step(checkpoint) < newer[2]):
        from flexi_workflows.storage import Storage

        storage = Storage(newer[0])
        checkpoint = ray.train.Checkpoint(storage.path(newer[1]), filesystem=storage.fs)
    if checkpoint is not None:
        with checkpoint_folder(checkpoint) as ckpt_dir:
            verify_folder(ckpt_dir)  # what the workers wrote, nothing cut short or added, before any load
            step = engine.load(Path(ckpt_dir))
            state_file = Path(ckpt_dir) / STATE_FILE
            if state_file.is_file():
                state = json.loads(state_file.read_text())
                loss_curve = [p for p in state["loss_curve"] if p[0] <= step]
                val_curve = [p for p in state.get("val_loss_curve", []) if p[0] <= step]
            ranks_file = Path(ckpt_dir) / RANKS_FILE
            if ranks_file.is_file():
                ranks_used = [r for r in json.loads(ranks_file.read_text())
                              if r["worker"] == rank and r["step"] < step]
    resumed_from = step
    curves = _MlflowCurves(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else _MlflowCurves(None, None)
    keep_best = train_cfg.final_artifact == "best"
    system = _SystemMetrics(config.get("tracking_uri"), config.get("run_id"), recipe.tracking.system_metrics_interval,
                            None if rank == 0 else f"node{ctx.get_node_rank()}") \
        if ctx.get_local_rank() == 0 else _SystemMetrics(None, None, 0, None)

    def report(final: bool, epoch_end: bool = True) -> None:
        metrics = {"step": step, "epoch": step / max(1, steps_per_epoch), "loss_curve": loss_curve,
                   "trainable_params": n_trainable, "resumed_from_step": resumed_from,
                   "gradient_checkpointing": bool(getattr(base, "is_activation_checkpointing", False)),
                   "precision": "bf16" if dist_cfg.bf16 else "fp32",
                   "bf16_by": ("autocast" if dist_cfg.strategy == "ddp" else "deepspeed") if dist_cfg.bf16 else None,
                   "lr": engine.scheduler.get_last_lr()[0], "val_loss_curve": val_curve, "throughput": throughput,
                   "partitioned_build": partitioned, "param_elements_total": total_elements,
                   "param_elements_held_by_worker": held_by_worker, "mlflow_unsent_metrics": curves.unsent,
                   # the gradient bucket DeepSpeed's ZeRO optimizer allocated (engines.reduce_bucket_elements)
                   "reduce_bucket_elements": getattr(getattr(engine, "optimizer", None), "reduce_bucket_size", None)}
        if device.type == "cuda":
            metrics |= {"peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device),
                        "setup_peak_gpu_memory_bytes": setup_peak}
        fresh_val = bool(val_curve) and val_curve[-1][0] == step
        if fresh_val:
            metrics["val_loss"] = val_curve[-1][1]  # what a sweep's ASHA scheduler reads, once per epoch
        metrics["epoch_end"] = epoch_end
        if keep_best:  # Ray Train keeps checkpoints by it; one without a fresh measurement is never the best
            metrics["val_score"] = val_curve[-1][1] if fresh_val else float("inf")
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            engine.save(tmp_path, step, rank)
            if final or (keep_best and fresh_val):  # a candidate for the final artifact
                engine.export(tmp_path / EXPORT_DIR, method, rank)
            records = gather_records(ranks_used)
            if rank == 0:
                (tmp_path / STATE_FILE).write_text(json.dumps({"step": step, "loss_curve": loss_curve,
                                                               "val_loss_curve": val_curve}))
                (tmp_path / RANKS_FILE).write_text(json.dumps(records))
            write_manifest(tmp_path, rank=rank, world=world, step=step)  # last: what this worker wrote
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def gather_records(own: list[dict]) -> list[dict]:
        """Every worker's rank record, on every worker (all of them report together)."""
        if world == 1 or not dist.is_initialized():
            return list(own)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, own)
        return sorted((r for part in gathered for r in part), key=lambda r: (r["step"], r["worker"], r["micro_batch"]))

    def measure(why: str) -> None:
        """The held-out loss now, into the curve, MLflow and the console."""
        val_loss = validation_loss()
        val_curve.append([step, val_loss])
        curves.log(step, val_loss=val_loss)
        if rank == 0:
            print(f"[{method.label}] {why}  val_loss {val_loss:.4f}", flush=True)

    def validation_loss() -> float:
        """Mean loss over the held-out rows, every worker on its equal share (ZeRO-3 needs all ranks)."""
        engine.model.eval()
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in val_shard.iter_torch_batches(batch_size=train_cfg.micro_batch_size, collate_fn=collate_fn):
                batch = to_device(batch)
                n = len(batch["labels"])
                with autocast():
                    loss = engine.model(**trainable.forward_kwargs(batch)).loss
                total += torch.tensor([float(loss) * n, n],
                                      dtype=torch.float64)
        if world > 1:
            dist.all_reduce(total)
        engine.model.train()
        return float(total[0] / max(total[1], 1.0))

    # -- the loop: this worker's shard, epoch by epoch, skipping what a resumed run already did ----
    from ray.data.collate_fn import NumpyBatchCollateFn

    processor = None
    if config.get("modality") == "speech":  # audio is decoded into log-mel features as batches are collated
        from flexi_workflows.data.speech import collate_speech
        from flexi_workflows.models.loading import load_processor

        processor = load_processor(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)

    class Collate(NumpyBatchCollateFn):
        """A numpy batch of rows padded into tensors (Ray Data takes a callable class here since 2.47)."""

        def __call__(self, batch):
            return collate_speech(batch, processor) if processor is not None else collate(batch, pad)

    collate_fn = Collate()
    # precision: bf16 under DeepSpeed is its bf16 engine (bf16 weights, fp32 master copy; ZeRO-0 with bf16 is
    # refused at recipe load: recipes/schema.py); under DDP it is torch.autocast, bf16 matmuls over fp32
    # weights (on CPU too), so the setting always does what it says
    def autocast():
        if dist_cfg.strategy == "ddp" and dist_cfg.bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return nullcontext()

    # DeepSpeed's bf16 casts the weights, not the inputs: audio features must match the conv stem's dtype
    feature_dtype = torch.bfloat16 if dist_cfg.strategy == "deepspeed" and dist_cfg.bf16 else torch.float32

    def to_device(batch: dict) -> dict:
        moved = {k: v.to(device) for k, v in batch.items()}
        if "input_features" in moved:
            moved["input_features"] = moved["input_features"].to(feature_dtype)
        return moved

    shard = ray.train.get_dataset_shard(f"train_{rank}")
    val_shard = ray.train.get_dataset_shard(f"val_{rank}") if config.get("validation") else None
    pad = config["pad_token_id"]
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    run_start = window_start  # the ETA's clock: this run's own steps (a resumed run's earlier ones are not timed)
    every, eval_every = train_cfg.checkpoint_every, train_cfg.eval_every if val_shard is not None else 0
    engine.model.train()
    for epoch in range(step // max(1, steps_per_epoch), math.ceil(total_steps / max(1, steps_per_epoch))):
        skip = (step - epoch * steps_per_epoch) * accum  # micro-batches already done in this epoch
        micro = 0
        batches = shard.iter_torch_batches(
            batch_size=train_cfg.micro_batch_size, collate_fn=collate_fn, drop_last=True,
            local_shuffle_buffer_size=4 * train_cfg.micro_batch_size, local_shuffle_seed=recipe.seed * 1000 + epoch,
        )
        for batch in batches:
            if step >= total_steps or micro >= steps_per_epoch * accum:
                break
            micro += 1
            if micro <= skip:
                continue
            batch = to_device(batch)
            if trainable.set_step is not None:
                trainable.set_step(step)  # the global optimizer step this micro-batch's gradient goes into
            with autocast():
                loss = engine.model(**trainable.forward_kwargs(batch)).loss
            if trainable.ranks_used is not None:
                used = trainable.ranks_used()
                if used is not None:
                    ranks_used.append(rank_record(rank, step, (micro - 1) % accum, used))
            boundary = engine.backward_step(loss, step)
            window_loss += float(loss.detach()) / accum
            # text: prompt + target tokens; speech: transcript tokens (the audio is a fixed window)
            window_tokens += int(batch["attention_mask"].sum() if "attention_mask" in batch
                                 else (batch["labels"] != IGNORE_INDEX).sum())
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
                lr = engine.scheduler.get_last_lr()[0]
                loss_curve.append([step, mean_loss])
                tokens_per_s = float(stats[1]) / max(elapsed, 1e-9)
                throughput.append([step, elapsed / max(1, n_steps), tokens_per_s])
                curves.log(step, loss=mean_loss, lr=lr, tokens_per_s=tokens_per_s)
                if rank == 0:
                    done_here = step - resumed_from
                    eta = (total_steps - step) * (time.perf_counter() - run_start) / max(1, done_here)
                    print(f"[{method.label}] step {step}/{total_steps}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                          f"{tokens_per_s:,.0f} tokens/s  ETA {format_eta(eta)}", flush=True)
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            measured = bool(eval_every) and step % eval_every == 0 and step < total_steps  # the last: below
            if measured:
                measure(f"step {step}/{total_steps}")
            # a measured step's checkpoint is a candidate for the best (an epoch's last step: reported below)
            candidate = measured and keep_best and step % max(1, steps_per_epoch) != 0
            if step < total_steps and ((every and step % every == 0) or candidate):
                curves.flush()
                report(final=False, epoch_end=False)
        # the end of an epoch: its validation loss, and a checkpoint a restarted worker group resumes from
        if val_shard is not None and (not val_curve or val_curve[-1][0] != step):
            measure(f"epoch {epoch + 1}")
        if step >= total_steps:
            break
        if not every or step % every or val_shard is not None:  # the val_loss must reach a report
            curves.flush()
            report(final=False)
    curves.flush(final=True)
    report(final=True)
    system.stop()
