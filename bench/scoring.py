"""Ray Data scoring stage vs a plain single-process loop: same model, rows, batch size, generation.

Both sides run `BatchGenerator` (the class the score stage maps over its actor pool) with the same
number of torch threads; the Ray side is the stage's own `score_rows` with one actor, so it pays
Ray Data's fixed costs (pipeline start, actor start, model load in the actor) on top of generation.
Both timings include loading the model once. The table shows where the fixed cost is amortised;
the last line is one JSON object with rows_per_s_ray, rows_per_s_plain and ratio (Ray / plain) at
the largest size, plus every size's figures and `amortised_at` (the first size with ratio ≥ 0.9).

    python bench/scoring.py --quick     # under two minutes on 2 CPU cores
    python bench/scoring.py             # sizes up to the whole GSM8K train set (7,473 rows)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

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
    gen = BatchGenerator(recipe.model.name_or_path, recipe.task.name, max_new_tokens=recipe.scoring.max_new_tokens,
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=None, help="comma-separated row counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on both sides (the actor has 1 CPU)")
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
        ray.init(address="local", num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
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
    summary = {"rows_per_s_ray": last["rows_per_s_ray"], "rows_per_s_plain": last["rows_per_s_plain"],
               "ratio": last["ratio"], "rows": last["rows"], "amortised_at": amortised, "sizes": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
