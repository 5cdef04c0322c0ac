"""What Ray Train costs per training step: a plain PyTorch loop vs the project's Ray Train paths.

Same model (the quickstart's `builtin:arith-tiny` LLaMA, LoRA-8 on every linear layer), same tokenized
arithmetic rows, same micro-batch (64), same torch thread count, timed three ways:

    plain       one process: the project's model + method + AdamW + scheduler, batches collated in the
                loop (no Ray, no DDP, no DeepSpeed) — the reference
    ray_ddp     the train stage itself (stages/train.py → training/loop.py) with strategy ddp, 1 worker
    deepspeed   the same stage with DeepSpeed ZeRO-2, 1 worker

Only steady-state steps count: the worker times every optimizer step itself (`throughput` in the
stage's train_report.json, with log_every 1), and the first `--skip` steps of every run (iterator and
allocator warm-up) are left out on every side; a step's time runs from the end of the previous step to
the end of this one, so it includes waiting for the batch. Rounds repeat plain → ddp → deepspeed
(`--repeat`) so drift and other users' load hit each side alike; figures are medians over all timed
steps of all rounds. Start-up (Ray, worker group, model load, DeepSpeed init) is reported apart.

    python bench/train_overhead.py --quick      # 1 round of 16 steps each: ~3 minutes on 2 CPU cores
    python bench/train_overhead.py              # 3 rounds of 40 steps each

The last line printed is one JSON object: `ray_train_step_ratio` and `deepspeed_step_ratio` (median
s/step against the plain loop's; 1.0 = no overhead), each side's s/step, and `p10_ratios` (the same
ratios from each side's fastest tenth of steps, the steps least disturbed by other load).

Reading the figures on a small shared machine: with `--threads 2` on 2 cores every side wants every
core, so anything else that runs — Ray's own processes (Train controller polling, Ray Data's helper
actors, the dashboard agent: ~0.1 core measured), the worker's data thread, other users — stalls one
of torch's two threads and with it the step; the ratio then measures CPU contention as much as Ray.
`--threads 1` leaves a core free and isolates what Ray Train adds to the step itself. Compare figures
only at similar load (the JSON records the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from flexi_workflows.recipes import Recipe  # noqa: E402
from flexi_workflows.recipes.loader import build  # noqa: E402

ADAPTER = {"alpha": 16, "dropout": 0.0,
           "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def make_recipe(out: Path, args, strategy: str) -> Recipe:
    from flexi_workflows.pipeline import resolve_model

    rows = args.batch_size * (args.steps + 1)
    return resolve_model(build(Recipe, {
        "name": "train-overhead", "output_dir": str(out / strategy), "seed": 0,
        "model": {"name_or_path": "builtin:arith-tiny"},
        "task": {"name": "arith", "train": {"name": "arith", "split": "train", "limit": rows},
                 "max_prompt_tokens": 96, "max_target_tokens": 48},
        "method": {"name": "lora", "rank": 8, **ADAPTER},
        "training": {"epochs": 1, "max_steps": args.steps, "lr": 0.005, "micro_batch_size": args.batch_size,
                     "warmup_ratio": 0.05, "log_every": 1},
        "distribution": {"num_workers": 1, "cpus_per_worker": args.cpus_per_worker, "strategy": strategy,
                         "zero_stage": 2, "torch_threads": args.threads},
        "tracking": {"enabled": False},
        "ray": {"num_cpus": 2},
    }))


def plain_loop(recipe: Recipe, steps: int) -> tuple[list[float], float]:
    """(seconds per step, start-up seconds): what one process does with no Ray, DDP or DeepSpeed."""
    import torch

    from flexi_workflows.data.causal_lm import collate
    from flexi_workflows.methods import get_method
    from flexi_workflows.models.loading import load_model
    from flexi_workflows.stages.train import training_examples
    from flexi_workflows.training.loop import lr_lambda

    started = time.perf_counter()
    method = get_method(recipe.method)
    examples, info = training_examples(recipe, method, None)
    torch.set_num_threads(recipe.distribution.torch_threads)
    torch.manual_seed(recipe.seed)
    trainable = method.build(load_model(recipe.model.name_or_path, dtype=torch.float32), seed=recipe.seed,
                             total_steps=steps)
    model = trainable.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.training.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(steps, recipe.training.warmup_ratio,
                                                                       recipe.training.schedule))
    bs, pad = recipe.training.micro_batch_size, info["pad_token_id"]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    model.train()
    setup = time.perf_counter() - started
    times = []
    last = time.perf_counter()
    for step in range(steps):
        batch = collate([examples[i] for i in order[step * bs:(step + 1) * bs]], pad)
        loss = model(**trainable.forward_kwargs(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.training.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times, setup


def ray_train(recipe: Recipe) -> tuple[list[float], float]:
    """(seconds per step as the rank-0 worker timed them, wall seconds of the whole stage)."""
    from flexi_workflows.stages.train import REPORT, run_train

    started = time.perf_counter()
    result = run_train(recipe, recipe.method, force=True)
    wall = time.perf_counter() - started
    report = json.loads((Path(result.folder) / REPORT).read_text())
    curve = report["throughput"]  # [step, seconds per step, tokens/s] per log window
    if len(curve) != report["steps"]:
        raise RuntimeError(f"expected one timing per step (log_every 1), got {len(curve)} for {report['steps']}")
    return [w[1] for w in curve], wall


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 16 steps")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 40; quick 16)")
    parser.add_argument("--skip", type=int, default=3, help="first steps of each run left out (warm-up)")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 3; quick 1)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on every side (the quickstart's 2)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--only", default="plain,ddp,deepspeed", help="comma-separated sides to run")
    args = parser.parse_args(argv)
    args.steps = args.steps or (16 if args.quick else 40)
    args.repeat = args.repeat or (1 if args.quick else 3)
    sides = args.only.split(",")

    from flexi_workflows.ray_cluster import ensure_ray

    times: dict[str, list[float]] = {s: [] for s in sides}
    setup: dict[str, list[float]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        recipes = {"plain": make_recipe(out, args, "ddp"), "ddp": make_recipe(out, args, "ddp"),
                   "deepspeed": make_recipe(out, args, "deepspeed")}
        started = time.perf_counter()
        ensure_ray(recipes["ddp"].ray)
        ray_start = time.perf_counter() - started
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        for r in range(args.repeat):
            for side in sides:
                if side == "plain":
                    t, s = plain_loop(recipes["plain"], args.steps)
                else:
                    t, s = ray_train(recipes[side])
                times[side] += t[args.skip:]
                setup[side].append(s)
                print(f"round {r + 1} {side:>9}: median {statistics.median(t[args.skip:]):.3f} s/step over "
                      f"{len(t) - args.skip} steps; {'start-up' if side == 'plain' else 'stage wall'} {s:.1f} s",
                      flush=True)
        ray.shutdown()

    med = {s: statistics.median(v) for s, v in times.items()}
    # the fastest tenth of steps: the steps other processes disturbed least (a steadier figure under load)
    p10 = {s: (statistics.quantiles(v, n=10)[0] if len(v) > 1 else v[0]) for s, v in times.items()}
    load = os.getloadavg()
    print(f"micro-batch {args.batch_size}, LoRA-8 on every linear layer of builtin:arith-tiny, {args.threads} torch "
          f"thread(s), {args.steps} steps per run (first {args.skip} left out), {args.repeat} round(s); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'side':>10}{'median s/step':>15}{'p10':>8}{'p90':>8}{'ratio':>8}")
    for s, v in times.items():
        q = statistics.quantiles(v, n=10) if len(v) > 1 else [v[0]] * 9
        ratio = med[s] / med["plain"] if "plain" in med else float("nan")
        print(f"{s:>10}{med[s]:>15.4f}{q[0]:>8.3f}{q[-1]:>8.3f}{ratio:>8.3f}")
    summary = {
        "ray_train_step_ratio": round(med["ddp"] / med["plain"], 3) if {"ddp", "plain"} <= med.keys() else None,
        "deepspeed_step_ratio": round(med["deepspeed"] / med["plain"], 3) if {"deepspeed", "plain"} <= med.keys() else None,
        **{f"{s}_s_per_step": round(m, 4) for s, m in med.items()},
        "p10_ratios": {s: round(p10[s] / p10["plain"], 3) for s in p10 if s != "plain" and "plain" in p10},
        "steps_timed": {s: len(v) for s, v in times.items()},
        "stage_wall_s" : {s: [round(x, 1) for x in v] for s, v in setup.items() if s != "plain"},
        "ray_init_s": round(ray_start, 1), "batch_size": args.batch_size, "threads": args.threads,
        "load_average": [round(x, 2) for x in load],
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
