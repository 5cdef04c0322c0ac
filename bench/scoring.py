"""Ray Data scoring stage vs a plain single-process loop: same model, rows, batch size, generation.

Both sides run `BatchGenerator` (the class the score stage maps over its actor pool) with the same
number of torch threads; the Ray side is the stage's own `score_rows` with one actor, so it pays
Ray Data's fixed costs (pipeline start, actor start, model load in the actor) on top of generation.
Both timings include loading the model once. The table shows where the fixed cost is amortised;
the last line is one JSON object with rows_per_s_ray, rows_per_s_plain and ratio (Ray / plain) at
the largest size, plus every size's figures and `amortised_at` (the first size with ratio ≥ 0.9).

Scale-out and fixed cost, on the same rows (the largest size), `--repeat` times, interleaved:
  actors_speedup    the stage's own `score_rows` with 1 actor × 1 CPU over 2 actors × 1 CPU, end to end
                    (actor start-up and model load counted, as a user pays them); the goal on a 2-core
                    machine is ≥ 1.8. `actors_speedup_steady` leaves each side's fixed cost out (its time
                    minus a one-batch run's time, per batch beyond the first).
  ray_fixed_cost_s  Ray Data's start-up cost: a trivial pipeline of the same shape (batch-sized blocks,
                    map_batches over a 1-actor pool that returns its batch) over one block, minus the same
                    work in a plain loop (≈ 0); the median over repeats, the first pipeline of the session
                    (which also starts Ray Data's own helper actors) reported apart. Goal ≤ 3 s.
                    The same pipeline over all the rows gives `ray_trivial_pipeline_s`, and its excess over
                    the one-block run per further block `ray_per_block_ms`: Ray Data's cost per block,
                    which grows with the rows and so is not start-up.
  two_actors_cpu_percent  where the CPUs went during the last 2-actor run: each process's CPU time over
                    the run's wall time, in percent of one core, grouped (the scoring actors, this driver,
                    Ray's own processes by name, anything else): what the actors do not get.
Medians and best over repeats are printed; the machine's load average is in the JSON, since other
processes on 2 shared cores move every figure.

    python bench/scoring.py --quick     # under two minutes on 2 CPU cores
    python bench/scoring.py             # sizes up to the whole GSM8K train set (7,473 rows)
    python bench/scoring.py --quick --repeat 3 --sizes 512   # the scale-out figures only, repeated
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
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from flexi_workflows.recipes import Recipe  # noqa: E402
from flexi_workflows.recipes.loader import build  # noqa: E402
from flexi_workflows.tasks import DataSource, get_task  # noqa: E402

GSM8K = ROOT.parent / "shared" / "data" / "math" / "gsm8k_train.jsonl"


def build_model(folder: Path, rows, hidden: int, layers: int) -> None:
    from flexi_workflows.models.tiny import save_model_folder, tiny_llama, train_tokenizer

    texts = [r["question"] + " " + r["target"] for r in rows[:2000]]
    tokenizer = train_tokenizer(texts, vocab_size=512)
    model = tiny_llama(tokenizer, hidden_size=hidden, layers=layers, heads=max(1, hidden // 64), kv_heads=1,
                       max_positions=512)
    save_model_folder(model, tokenizer, folder)


def plain_loop(rows, recipe: Recipe, threads: int) -> tuple[float, dict]:
    from flexi_workflows.generation import BatchGenerator

    started = time.perf_counter()
    gen = BatchGenerator(recipe.model.name_or_path, recipe.task, max_new_tokens=recipe.scoring.max_new_tokens,
                         max_prompt_tokens=recipe.task.max_prompt_tokens, num_threads=threads,
                         date_string=recipe.task.date_string)
    out = {}
    bs = recipe.scoring.batch_size
    for start in range(0, len(rows), bs):
        chunk = rows[start : start + bs]
        batch = {"id": [r["id"] for r in chunk], "question": [r["question"] for r in chunk],
                 "context": [r["context"] for r in chunk]}
        result = gen(batch)
        out.update({str(i): str(p) for i, p in zip(result["id"], result["prediction"])})
    return time.perf_counter() - started, out


def ray_stage(rows, recipe: Recipe) -> tuple[float, dict]:
    from flexi_workflows.stages.score import score_rows

    started = time.perf_counter()
    out = score_rows(rows, recipe)
    return time.perf_counter() - started, {k: v["prediction"] for k, v in out.items()}


class _Identity:
    """The cheapest actor a pipeline can have: what is left is Ray Data's own cost."""

    def __call__(self, batch):
        return batch


def trivial_pipeline(rows, batch_size: int) -> float:
    import ray

    from flexi_workflows.stages.score import model_columns

    started = time.perf_counter()
    columns = [model_columns(r) for r in rows]
    ds = ray.data.from_items(columns, override_num_blocks=max(1, -(-len(columns) // batch_size)))
    ds = ds.map_batches(_Identity, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    n = sum(1 for _ in ds.iter_rows())
    assert n == len(rows)
    return time.perf_counter() - started


def trivial_plain(rows, batch_size: int) -> float:
    import numpy as np

    from flexi_workflows.stages.score import model_columns

    started = time.perf_counter()
    columns = [model_columns(r) for r in rows]
    f = _Identity()
    n = 0
    for start in range(0, len(columns), batch_size):
        chunk = columns[start:start + batch_size]
        n += len(f({k: np.asarray([c[k] for c in chunk]) for k in chunk[0]})["id"])
    assert n == len(rows)
    return time.perf_counter() - started


class CpuSplit:
    """Each process's CPU time while the `with` block runs, over its wall time (percent of one core),
    grouped: the scoring actors, this driver, Ray's processes by name, and everything else."""

    def __enter__(self) -> Self:
        self.started, self.before = time.perf_counter(), self._cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        after, wall = self._cpu_seconds(), time.perf_counter() - self.started
        shares: dict[str, float] = {}
        for pid, (group, seconds) in after.items():
            shares[group] = shares.get(group, 0.0) + (seconds - self.before.get(pid, (group, 0.0))[1]) / wall
        self.percent = {g: round(100 * v, 1) for g, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.001}

    @staticmethod
    def _group(proc) -> str:
        if proc.pid == os.getpid():
            return "driver (Ray Data's executor, this script)"
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::MapWorker"):
            return "scoring actors"
        if cmd.startswith("ray::"):
            return "ray " + cmd.split()[0][5:]
        if proc.info["name"] in ("raylet", "gcs_server"):
            return "ray " + proc.info["name"]
        script = next((Path(a).name for a in proc.info["cmdline"] or [] if "/ray/" in a and a.endswith(".py")), None)
        return f"ray {script}" if script else "other processes"

    @classmethod
    def _cpu_seconds(cls) -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for proc in psutil.process_iter(["name", "cmdline", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is not None:
                out[proc.pid] = (cls._group(proc), times.user + times.system)
        return out


def scale_out(all_rows, recipe: Recipe, n: int, repeat: int) -> dict:
    """1 actor vs 2 actors on the same rows, and Ray Data's fixed cost, interleaved `repeat` times."""
    import dataclasses

    def with_actors(k: int) -> Recipe:
        return dataclasses.replace(recipe, scoring=dataclasses.replace(recipe.scoring, num_actors=k, cpus_per_actor=1))

    rows, bs = all_rows[:n], recipe.scoring.batch_size
    first = trivial_pipeline(rows[:bs], bs) - trivial_plain(rows[:bs], bs)
    runs: dict[str, list[float]] = {"one": [], "two": [], "one_batch_1": [], "one_batch_2": [], "fixed": [],
                                    "trivial": []}
    for _ in range(repeat):
        # start-up: the trivial pipeline over one block; then over all n rows, whose excess is per block
        runs["fixed"].append(trivial_pipeline(rows[:bs], bs) - trivial_plain(rows[:bs], bs))
        runs["trivial"].append(trivial_pipeline(rows, bs) - trivial_plain(rows, bs))
        runs["one_batch_1"].append(ray_stage(rows[:bs], with_actors(1))[0])
        runs["one"].append(ray_stage(rows, with_actors(1))[0])
        with CpuSplit() as split:
            runs["two"].append(ray_stage(rows, with_actors(2))[0])
        runs["one_batch_2"].append(ray_stage(rows[:2 * bs], with_actors(2))[0])
        print(f"  scale-out round: 1 actor {runs['one'][-1]:.1f} s, 2 actors {runs['two'][-1]:.1f} s, "
              f"trivial pipeline {runs['fixed'][-1]:.2f} s on one block, {runs['trivial'][-1]:.2f} s on all rows",
              flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    batches = -(-n // bs)
    # each side's time beyond its one-batch-per-actor run: the steady part of the work
    steady_one = (med["one"] - med["one_batch_1"]) / max(1, batches - 1)
    steady_two = (med["two"] - med["one_batch_2"]) / max(1, batches - 2)
    return {
        "rows": n, "repeat": repeat,
        "one_actor_s": round(med["one"], 2), "two_actors_s": round(med["two"], 2),
        "one_actor_s_all": [round(x, 2) for x in runs["one"]], "two_actors_s_all": [round(x, 2) for x in runs["two"]],
        "actors_speedup": round(med["one"] / med["two"], 3),
        "actors_speedup_best": round(min(runs["one"]) / min(runs["two"]), 3),
        "actors_speedup_steady": round(steady_one / steady_two, 3) if steady_two > 0 else None,
        "ray_fixed_cost_s": round(med["fixed"], 2), "ray_fixed_cost_first_s": round(first, 2),
        "ray_fixed_cost_s_all": [round(x, 2) for x in runs["fixed"]],
        "ray_trivial_pipeline_s": round(med["trivial"], 2),
        "ray_per_block_ms": round(1000 * (med["trivial"] - med["fixed"]) / max(1, batches - 1), 2),
        "two_actors_cpu_percent": split.percent,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=None, help="comma-separated row counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (the actor has 1 CPU)")
    parser.add_argument("--repeat", type=int, default=None, help="rounds of the scale-out figures (default 3; quick 1)")
    parser.add_argument("--scale-rows", type=int, default=None, help="rows for the scale-out figures (default: the largest size)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("128,1024" if args.quick else "256,1024,4096,7473")).split(",")]

    import ray
    import torch

    torch.set_num_threads(args.threads)
    all_rows = get_task("math").load(DataSource(path=str(GSM8K)))
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_model(model_dir, all_rows, args.hidden, args.layers)
        recipe = build(Recipe, {
            "model": {"name_or_path": str(model_dir)},
            "task": {"name": "math", "max_prompt_tokens": 256},
            "scoring": {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "num_actors": 1,
                        "cpus_per_actor": args.threads},
        })
        started = time.perf_counter()
        ray.init(address="local", num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - started
        ray.data.DataContext.get_current().enable_progress_bars = False
        scale = scale_out(all_rows, recipe, args.scale_rows or sizes[-1], args.repeat or (1 if args.quick else 3))
        results = []
        for n in sizes:
            rows = all_rows[:n]
            t_plain, plain_out = plain_loop(rows, recipe, args.threads)
            t_ray, ray_out = ray_stage(rows, recipe)
            same = sum(plain_out[r["id"]] == ray_out[r["id"]] for r in rows) / n
            results.append({"rows": n, "plain_s": round(t_plain, 2), "ray_s": round(t_ray, 2),
                            "rows_per_s_plain": round(n / t_plain, 1), "rows_per_s_ray": round(n / t_ray, 1),
                            "ratio": round(t_plain / t_ray, 3), "identical_predictions": same})
        ray.shutdown()

    print(f"tiny LLaMA hidden {args.hidden} × {args.layers} layers on GSM8K train questions; batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens greedy; {args.threads} torch thread(s) each side; Ray: 1 actor")
    print(f"{'rows':>6}{'plain s':>9}{'ray s':>8}{'plain rows/s':>14}{'ray rows/s':>12}{'ratio':>7}{'same preds':>12}")
    for r in results:
        print(f"{r['rows']:>6}{r['plain_s']:>9.2f}{r['ray_s']:>8.2f}{r['rows_per_s_plain']:>14.1f}"
              f"{r['rows_per_s_ray']:>12.1f}{r['ratio']:>7.3f}{r['identical_predictions']:>12.2f}")
    amortised = next((r["rows"] for r in results if r["ratio"] >= 0.9), None)
    last = results[-1]
    print(f"scale-out on {scale['rows']} rows, {scale['repeat']} round(s): 1 actor × 1 CPU {scale['one_actor_s']} s, "
          f"2 actors × 1 CPU {scale['two_actors_s']} s → speedup {scale['actors_speedup']} (best {scale['actors_speedup_best']}, "
          f"steady part {scale['actors_speedup_steady']}); Ray Data fixed cost {scale['ray_fixed_cost_s']} s "
          f"(first pipeline {scale['ray_fixed_cost_first_s']} s; ray.init {ray_init_s:.1f} s); "
          f"{scale['ray_per_block_ms']} ms per further block")
    print("CPU during the last 2-actor run (% of one core): "
          + ", ".join(f"{g} {v}" for g, v in scale["two_actors_cpu_percent"].items()))
    load = os.getloadavg()
    summary = {"rows_per_s_ray": last["rows_per_s_ray"], "rows_per_s_plain": last["rows_per_s_plain"],
               "ratio": last["ratio"], "rows": last["rows"], "amortised_at": amortised, "sizes": results,
               "actors_speedup": scale["actors_speedup"], "ray_fixed_cost_s": scale["ray_fixed_cost_s"],
               "scale_out": scale, "ray_init_s": round(ray_init_s, 1), "load_average": [round(x, 2) for x in load]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
