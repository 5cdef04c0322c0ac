"""The Python part of bench/gpu_check.sh: bf16 DeepSpeed ZeRO-2 and ZeRO-3 steps of a LLaMA-3.2-1B-shaped model
with random weights and mixed Flexi ranks through Ray Train, their peak GPU memory against `flexi plan`'s
estimate, and Ray Data generation with the trained adapter on a GPU actor.

It drives the project's own pieces: the model is a local folder (config.json from the shipped LLaMA-3.2-1B
config with `--layers` layers, random bf16 weights in safetensors, a word-level tokenizer over the whole
vocabulary so any generated id decodes); training is `training.loop.train_loop_per_worker` in a
TorchTrainer exactly as stages/train.py builds it, fed rows that carry their rank (a quarter at 8, the rest
at 2) instead of a router's — the route stage needs a scored, trained base model, which random weights are
not; generation is `stages.evaluate.generate_with_method`, the evaluation stage's Ray Data actor pool.

    python bench/gpu_check.py --out result.json           # on a GPU (bench/gpu_check.sh sets it up)
    python bench/gpu_check.py --cpu --out result.json     # a tiny model on CPU: checks that nothing crashes

Each part's figures are written to --out as soon as the part ends, so a part cut off by the shell's time
limit leaves the others' figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_1B = ROOT / "flexi_workflows" / "assets" / "model_configs" / "llama-3.2-1b-instruct.json"


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer with one token per id: whatever a random model generates decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i for i in range(len(specials), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def make_model(folder: Path, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flexi_workflows.models.tiny import save_model_folder

    if args.cpu:  # tiny, same architecture
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True)
    else:
        data = json.loads(LLAMA_1B.read_text())
        data.pop("model_type")
        config = LlamaConfig(**{**data, "num_hidden_layers": args.layers})
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    torch.manual_seed(0)
    with torch.device("cuda" if not args.cpu else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    save_model_folder(model, word_tokenizer(config.vocab_size), folder)
    n = sum(p.numel() for p in model.parameters())
    del model
    if not args.cpu:
        torch.cuda.empty_cache()
    return {"params": n, "layers": config.num_hidden_layers, "hidden": config.hidden_size, "vocab": config.vocab_size}


def recipe_for(folder: Path, args, zero_stage: int):
    from flexi_workflows.recipes import Recipe
    from flexi_workflows.recipes.loader import build

    half = args.seq // 2
    return build(Recipe, {
        "name": "gpu-check",
        "output_dir": str(args.work / "out"),
        "model": {"name_or_path": str(folder), "dtype": "bfloat16"},
        "task": {"name": "arith", "max_prompt_tokens": half, "max_target_tokens": args.seq - half},
        "method": {"name": "flexi", "ranks": [2, 8], "dropout": 0.0, "targets": TARGETS},
        "training": {"epochs": 1, "max_steps": args.steps, "lr": 1e-4, "schedule": "constant", "warmup_ratio": 0.0,
                     "micro_batch_size": args.batch, "log_every": args.log_every},
        "distribution": {"num_workers": 1, "cpus_per_worker": args.cpus, "gpus_per_worker": 0 if args.cpu else 1,
                         "strategy": "deepspeed", "zero_stage": zero_stage, "precision": args.precision},
        "evaluation": {"batch_size": args.gen_batch, "max_new_tokens": args.new_tokens, "num_actors": 1,
                       "cpus_per_actor": args.cpus, "gpus_per_actor": 0 if args.cpu else 1},
        "tracking": {"enabled": False},
    }, source="gpu check")


def train(folder: Path, args, zero_stage: int, vocab: int) -> tuple[dict, Path]:
    """One TorchTrainer run of the project's worker loop; returns its figures and the exported adapter."""
    import numpy as np
    import ray
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from flexi_workflows.memory import plan_recipe
    from flexi_workflows.stages.train import worker_config
    from flexi_workflows.training.loop import EXPORT_DIR, train_loop_per_worker

    recipe = recipe_for(folder, args, zero_stage)
    rng = np.random.default_rng(zero_stage)
    rows = args.steps * args.batch
    half = args.seq // 2
    examples = []
    for i in range(rows):
        ids = rng.integers(4, vocab, size=args.seq).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * half + ids[half:], "rank": 8 if i % 4 == 0 else 2})
    dataset = ray.data.from_items(examples).materialize()
    started = time.perf_counter()
    trainer = TorchTrainer(
        train_loop_per_worker,
        # the train stage's own worker inputs (stages.train.worker_config), so the check cannot drift from it
        train_loop_config=worker_config(recipe, recipe.method, total_steps=args.steps, steps_per_epoch=args.steps,
                                        pad_token_id=0, tracking_uri=None, run_id=None, validation=False),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=not args.cpu,
                                     resources_per_worker={"CPU": args.cpus, **({} if args.cpu else {"GPU": 1})}),
        run_config=RunConfig(name=f"zero{zero_stage}", storage_path=str(args.work / "ray_results"),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
        datasets={"train_0": dataset},
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    wall = time.perf_counter() - started
    m = dict(result.metrics or {})
    windows = m.get("throughput") or []
    steady = windows[1:] or windows  # the first window carries the warm-up (kernels, allocator)
    plan = plan_recipe(recipe).methods[0]
    peak = m.get("peak_gpu_memory_bytes")
    out = {
        "steps": m.get("step"), "fit_wall_s": round(wall, 1),
        "s_per_step": round(statistics.median(w[1] for w in steady), 4) if steady else None,
        "tokens_per_s": round(statistics.median(w[2] for w in steady)) if steady else None,
        "first_window_s_per_step": round(windows[0][1], 4) if windows else None,
        "loss_first_last": [m["loss_curve"][0][1], m["loss_curve"][-1][1]] if m.get("loss_curve") else None,
        "precision": m.get("precision"), "trainable_params": m.get("trainable_params"),
        "peak_gpu_memory_gib": round(peak / 2**30, 3) if peak is not None else None,
        "setup_peak_gpu_memory_gib": (round(m["setup_peak_gpu_memory_bytes"] / 2**30, 3)
                                      if m.get("setup_peak_gpu_memory_bytes") is not None else None),
        "plan_gib": {"model_states": round(plan.states.total / 2**30, 3),
                     "deepspeed_buffers": round(sum(plan.buffers.values()) / 2**30, 3),
                     "activations": round(plan.activations / 2**30, 3), "total": round(plan.total / 2**30, 3)},
        "reduce_bucket_elements": m.get("reduce_bucket_elements"),
        "peak_over_plan": round(peak / plan.total, 3) if peak is not None else None,
    }
    artifact = args.work / f"artifact-zero{zero_stage}"
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / EXPORT_DIR, artifact)
    return out, artifact


def generate(folder: Path, args, artifact: Path) -> dict:
    """The evaluation stage's Ray Data generation with the trained Flexi adapter, mixed ranks per row."""
    from flexi_workflows.methods import get_method
    from flexi_workflows.recipes.schema import DataSource
    from flexi_workflows.stages.evaluate import generate_with_method
    from flexi_workflows.tasks import get_task

    recipe = recipe_for(folder, args, 2)
    rows = get_task("arith").load(DataSource(name="arith", split="test", limit=args.gen_rows))
    rows = [{**r, "rank": 8 if i % 4 == 0 else 2} for i, r in enumerate(rows)]
    started = time.perf_counter()
    outputs = generate_with_method(rows, recipe, get_method(recipe.method), artifact)
    wall = time.perf_counter() - started
    ranks = [o["rank"] for o in outputs.values()]
    return {"rows": len(outputs), "new_tokens": args.new_tokens, "batch_size": args.gen_batch,
            "gpus_per_actor": recipe.evaluation.gpus_per_actor, "wall_s": round(wall, 1),
            "rows_per_s_incl_actor_start": round(len(outputs) / wall, 2),
            "rows_by_rank": {str(r): ranks.count(r) for r in sorted(set(ranks))}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="a tiny model on CPU (fp32 unless --precision bf16)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file, rewritten as each part ends")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 16, LLaMA-3.2-1B's; CPU 2)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (half prompt, half target)")
    parser.add_argument("--batch", type=int, default=None, help="micro batch size")
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"])
    parser.add_argument("--cpus", type=int, default=None, help="CPUs per training worker / generation actor")
    parser.add_argument("--gen-rows", type=int, default=None)
    parser.add_argument("--gen-batch", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--parts", default="zero2,zero3,generation")
    args = parser.parse_args(argv)
    gpu_defaults = {"layers": 16, "steps": 24, "log_every": 4, "seq": 512, "batch": 8, "precision": "bf16", "cpus": 4,
                    "gen_rows": 256, "gen_batch": 64, "new_tokens": 64}
    cpu_defaults = {"layers": 2, "steps": 4, "log_every": 2, "seq": 32, "batch": 2, "precision": "bf16", "cpus": 1,
                    "gen_rows": 8, "gen_batch": 4, "new_tokens": 4}
    for key, value in (cpu_defaults if args.cpu else gpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    own_work = args.work is None
    args.work = Path(tempfile.mkdtemp(prefix="gpu-check-")) if own_work else args.work
    args.work.mkdir(parents=True, exist_ok=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]

    import torch

    result: dict = {"mode": "cpu" if args.cpu else "cuda", "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                    "errors": {}}
    if not args.cpu:
        if not torch.cuda.is_available():
            raise SystemExit(f"no usable CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none; "
                             f"if the driver runs an older CUDA (nvidia-smi's header), rerun with FLEXI_TORCH_VERSION "
                             f"or FLEXI_TORCH_PIP_ARGS naming a matching build; --cpu runs the tiny CPU check")
        props = torch.cuda.get_device_properties(0)
        result["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}

    def save() -> None:
        args.out.write_text(json.dumps(result) + "\n")

    def part(name: str, fn):
        started = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 — one failed part must not hide the others' figures
            traceback.print_exc()
            result["errors"][name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            value = None
        print(f"gpu check: {name} took {time.perf_counter() - started:.1f} s", flush=True)
        save()
        return value

    # the shell's `timeout` sends SIGTERM: exit through Python so Ray's local cluster is shut down with it
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    started = time.perf_counter()
    folder = args.work / "llama-random"
    result["model"] = part("model", lambda: make_model(folder, args))
    from flexi_workflows.ray_cluster import ensure_ray
    from flexi_workflows.recipes.schema import RayConfig

    ensure_ray(RayConfig(num_cpus=os.cpu_count() if not args.cpu else 2))
    artifacts = {}
    for stage in (2, 3):
        if f"zero{stage}" in parts and result["model"] is not None:
            got = part(f"zero{stage}", lambda stage=stage: train(folder, args, stage, result["model"]["vocab"]))
            if got is not None:
                result[f"zero{stage}"], artifacts[stage] = got
    if "generation" in parts and artifacts:
        result["generation"] = part("generation", lambda: generate(folder, args, next(iter(artifacts.values()))))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    save()
    if own_work:
        shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
