"""Building the quickstart's base model: a tiny LLaMA trained from scratch on generated arithmetic.

The point is a base model that is *competent on part of the task* — it solves a real share of the
easy problems and few hard ones — so difficulty scoring finds both classes populated and the
fine-tuning comparison means something (shared/notes/quickstart-feasibility.md measured this:
hidden 192, 3 layers, ~570 steps of batch 64 → easy ≈ 75 %, hard ≈ 13 %).

The result is an ordinary model folder (config.json, model.safetensors, tokenizer), cached under a
fingerprint of the settings, so every later run loads it like any local model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
BUILTIN_PREFIX = "builtin:"


@dataclass
class PretrainSpec:
    hidden_size: int = 192
    layers: int = 3
    heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 128
    vocab_size: int = 512
    steps: int = 380
    batch_size: int = 64
    lr: float = 3e-3
    rows: int = 20000
    seed: int = 0


BUILTINS = {"arith-tiny": PretrainSpec()}


def builtin_spec(ref: str) -> PretrainSpec | None:
    if not ref.startswith(BUILTIN_PREFIX):
        return None
    name = ref[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        from flexi_workflows.errors import ConfigError

        raise ConfigError(f"model.name_or_path {ref!r}: unknown built-in model; known: "
                          + ", ".join(BUILTIN_PREFIX + k for k in BUILTINS))
    return BUILTINS[name]


def pretrain_arith_model(path: Path, spec: PretrainSpec, threads: int | None = None) -> Path:
    """Train the tiny base model into `path` (atomically); returns the folder."""
    from tqdm import tqdm

    from flexi_workflows.data.causal_lm import collate, encode_example
    from flexi_workflows.models.tiny import save_model_folder, tiny_llama, train_tokenizer
    from flexi_workflows.tasks.arith import generate

    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    exclude = {r["question"] for r in generate("test")}
    rows = generate("pretrain", spec.rows, exclude)
    texts = [f"Question: {r['question']}\nAnswer: {r['target']}" for r in rows]
    tokenizer = train_tokenizer(texts, vocab_size=spec.vocab_size)
    model = tiny_llama(tokenizer, hidden_size=spec.hidden_size, layers=spec.layers, heads=spec.heads,
                       kv_heads=spec.heads, intermediate_size=spec.intermediate_size,
                       max_positions=spec.max_positions, seed=spec.seed)
    examples = [encode_example(f"Question: {r['question']}\nAnswer:", r["target"], tokenizer,
                               max_prompt_tokens=96, max_target_tokens=48) for r in rows]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps))))
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    bar = tqdm(range(spec.steps), desc="pretraining the quickstart base model", unit="step")
    for step in bar:
        idx = torch.randint(0, len(examples), (spec.batch_size,), generator=gen).tolist()
        batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    save_model_folder(model, tokenizer, path)
    (path / "pretrain.json").write_text(json.dumps({"spec": asdict(spec), "seconds": round(time.time() - started, 1)}))
    log.info("pretrained base model in %.0f s → %s", time.time() - started, path)
    return path


def resolve_builtin(ref: str, cache_dir: str | Path) -> str:
    """A built-in reference → its cached model folder (built on first use); other refs unchanged."""
    spec = builtin_spec(ref)
    if spec is None:
        return ref
    from flexi_workflows.fsutil import fingerprint

    folder = Path(cache_dir).expanduser() / f"{ref[len(BUILTIN_PREFIX):]}-{fingerprint(asdict(spec))}"
    if not (folder / "model.safetensors").is_file():
        log.info("building %s (first run only) into %s", ref, folder)
        pretrain_arith_model(folder, spec)
    return str(folder)
