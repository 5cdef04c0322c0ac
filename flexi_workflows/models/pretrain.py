"""Building the quickstart's base model: a tiny LLaMA trained from scratch on generated arithmetic.

The point is a base model that is *competent on part of the task* — it solves a real share of the
easy problems and few hard ones — so difficulty scoring finds both classes populated and the
fine-tuning comparison means something (hidden 192, 3 layers, 600 steps of batch 64 on one- and
two-step problems: it solves nearly all easy problems and about a quarter of the hard ones; the
build records the exact figures in base_eval.json).

The result is an ordinary model folder (config.json, model.safetensors, tokenizer), cached under a
fingerprint of the settings and of the task generator, so every later run loads it like any local model.

The build is deterministic: a fixed thread count, `torch.use_deterministic_algorithms`, seeded
initialisation and a seeded data order, so two builds on one machine give bit-identical weights and
machines of one kind give the same model (tests/models/test_pretrain.py checks the first). The folder
records the model's own accuracy on the held-out test split (`base_eval.json`), which `flexi run`
prints, so a user sees what the base can do before fine-tuning starts.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    rows: int = 20000
    seed: int = 0
    threads: int = 2  # fixed: float sums (and so the weights) depend on how work is split over threads
    eval_rows: int = 400  # the test split's first rows, whose accuracy the folder records


def _builtins() -> dict:
    from flexi_workflows.models.pretrain_speech import SpeechPretrainSpec

    # arith-tiny: the quickstart's tiny LLaMA; whisper-tiny-spoken: the speech quickstart's tiny Whisper
    return {"arith-tiny": PretrainSpec(), "whisper-tiny-spoken": SpeechPretrainSpec()}


BUILTINS = _builtins()


def builtin_spec(ref: str):
    if not ref.startswith(BUILTIN_PREFIX):
        return None
    name = ref[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        from flexi_workflows.errors import ConfigError

        raise ConfigError(f"model.name_or_path {ref!r}: unknown built-in model; known: "
                          + ", ".join(BUILTIN_PREFIX + k for k in BUILTINS))
    return BUILTINS[name]


BASE_EVAL = "base_eval.json"


@contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Fixed threads and deterministic kernels for the duration; the caller's settings come back after."""
    old_threads, old_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_deterministic)
        torch.set_num_threads(old_threads)


def pretrain_arith_model(path: Path, spec: PretrainSpec) -> Path:
    """Train the tiny base model into `path` (atomically, with its test accuracy); returns the folder."""
    from flexi_workflows.fsutil import atomic_dir

    started = time.time()
    with deterministic_torch(spec.threads):
        model, tokenizer = _train(spec)
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        with deterministic_torch(spec.threads):
            record = evaluate_base(tmp, spec.eval_rows)
        (tmp / BASE_EVAL).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "pretrain.json").write_text(json.dumps({"spec": asdict(spec), "task": task_fingerprint(),
                                                        "seconds": round(time.time() - started, 1)}))
    log.info("pretrained base model in %.0f s → %s", time.time() - started, path)
    return Path(path)


def _train(spec: PretrainSpec):
    from tqdm import tqdm

    from flexi_workflows.data.causal_lm import collate, encode_example
    from flexi_workflows.models.tiny import tiny_llama, train_tokenizer
    from flexi_workflows.tasks.arith import generate

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
    return model.eval(), tokenizer


def evaluate_base(folder: str | Path, rows: int) -> dict:
    """Greedy accuracy of the model in `folder` on the first `rows` test problems, overall and per group
    and level — the pipeline's base evaluation reproduces it (same prompts, left-padded batches of 200,
    greedy decoding, task grading; tests/models/test_pretrain.py compares the two)."""
    import numpy as np

    from flexi_workflows.models.loading import load_model, load_tokenizer
    from flexi_workflows.tasks import get_task
    from flexi_workflows.tasks.arith import generate

    task, test = get_task("arith"), generate("test", rows)
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder)).eval()
    correct = []
    for start in range(0, len(test), 200):
        chunk = test[start:start + 200]
        enc = tokenizer([task.build_prompt(r, tokenizer) for r in chunk], return_tensors="pt", padding=True,
                        truncation=True, max_length=96)
        with torch.no_grad():
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=36,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        predictions = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += [task.score(p, r) for p, r in zip(predictions, chunk)]
    correct = np.asarray(correct)

    def share(mask) -> float:
        return round(float(correct[mask].mean()), 4) if mask.any() else float("nan")

    groups = np.asarray([r["group"] for r in test])
    levels = np.asarray([r["level"] for r in test])
    return {"split": "test", "rows": len(test), "accuracy_all": share(np.ones(len(test), bool)),
            "accuracy_easy": share(groups == "easy"), "accuracy_hard": share(groups == "hard"),
            "accuracy_by_level": {str(level): share(levels == level) for level in sorted(set(levels.tolist()))}}


def read_base_eval(folder: str | Path) -> dict | None:
    from flexi_workflows.storage import child, fetch, is_remote

    if is_remote(str(folder)):
        try:
            path = fetch(child(str(folder), BASE_EVAL))
        except FileNotFoundError:
            return None
        return json.loads(path.read_text())
    path = Path(folder) / BASE_EVAL
    return json.loads(path.read_text()) if path.is_file() else None


def task_fingerprint() -> dict:
    """What the generated pretraining data depends on: a change to the task's levels or mixes is a new model."""
    from flexi_workflows.tasks import arith

    return {"levels": {str(k): v for k, v in arith.LEVELS.items()},
            "splits": {name: arith.SPLITS[name] for name in ("pretrain", "test")}, "version": arith.GENERATOR_VERSION}


# Built-in models as built on this project's 2-core CPU machines, shipped so that a first run (and CI)
# skips the 3-6 minute build. A copy is used only when its folder name — the built-in's name and the
# fingerprint of its spec and data — matches the current code; otherwise the model is built as before.
# The base_eval.json record is not shipped: it is measured on first use, on the machine that runs it.
SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "builtin_models"
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "pretrain.json")


def builtin_folder_name(ref: str, cache_dir: str | Path) -> str:
    """`<name>-<fingerprint of spec and data>`: the cache folder and the shipped copy's name."""
    from flexi_workflows.fsutil import fingerprint
    from flexi_workflows.models.pretrain_speech import SpeechPretrainSpec, speech_fingerprint

    spec = builtin_spec(ref)
    speech = isinstance(spec, SpeechPretrainSpec)
    key = speech_fingerprint(spec, cache_dir) if speech else {"spec": asdict(spec), "task": task_fingerprint()}
    return f"{ref[len(BUILTIN_PREFIX):]}-{fingerprint(key)}"


def install_shipped(shipped: Path, folder: Path, spec, cache_dir: str | Path) -> Path:
    """Copy a shipped built-in into the cache (atomically) and record its test figures on this machine."""
    import shutil

    from flexi_workflows.fsutil import atomic_dir
    from flexi_workflows.models.pretrain_speech import SpeechPretrainSpec, evaluate_speech_base

    with atomic_dir(folder) as tmp:
        for name in SHIPPED_FILES:
            if (shipped / name).is_file():
                shutil.copy2(shipped / name, tmp / name)
        with deterministic_torch(spec.threads):
            if isinstance(spec, SpeechPretrainSpec):
                from flexi_workflows.audio.corpus import resolve_builtin_corpus

                corpus = resolve_builtin_corpus(spec.corpus, cache_dir)
                record = evaluate_speech_base(tmp, corpus, spec.eval_splits)
            else:
                record = evaluate_base(tmp, spec.eval_rows)
        (tmp / BASE_EVAL).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def resolve_builtin(ref: str, cache_dir: str | Path) -> str:
    """A built-in reference → its cached model folder (the shipped copy, else built on first use);
    other refs unchanged."""
    spec = builtin_spec(ref)
    if spec is None:
        return ref
    from flexi_workflows.models.pretrain_speech import SpeechPretrainSpec, pretrain_speech_model
    from flexi_workflows.storage import file_lock

    name = builtin_folder_name(ref, cache_dir)
    folder = Path(cache_dir).expanduser() / name
    if (folder / "model.safetensors").is_file():
        return str(folder)
    with file_lock(folder.parent / f".{name}.lock"):  # two first runs at once: one installs, the other waits
        if not (folder / "model.safetensors").is_file():
            if (SHIPPED / name / "model.safetensors").is_file():
                log.info("installing the shipped %s into %s (measuring its test figures here)", ref, folder)
                install_shipped(SHIPPED / name, folder, spec, cache_dir)
            else:
                log.info("building %s (first run only) into %s", ref, folder)
                if isinstance(spec, SpeechPretrainSpec):
                    pretrain_speech_model(folder, spec, cache_dir)
                else:
                    pretrain_arith_model(folder, spec)
    return str(folder)


def ship_builtins(cache_dir: str | Path = "~/.cache/flexi-workflows") -> list[Path]:
    """Copy every built-in (built in `cache_dir` when needed) into the package's shipped folder and drop
    stale copies: run `.venv/bin/python -m flexi_workflows.models.pretrain` after changing a spec or a generator,
    then commit flexi_workflows/assets/builtin_models."""
    import shutil

    from flexi_workflows.fsutil import atomic_dir

    names = []
    for key in BUILTINS:
        ref = BUILTIN_PREFIX + key
        name = builtin_folder_name(ref, cache_dir)
        names.append(name)
        if (SHIPPED / name / "model.safetensors").is_file():
            continue  # current
        built = Path(resolve_builtin(ref, cache_dir))  # no shipped copy of this name: built here
        with atomic_dir(SHIPPED / name) as tmp:
            for file in SHIPPED_FILES:
                if (built / file).is_file():
                    shutil.copy2(built / file, tmp / file)
    for old in SHIPPED.iterdir():
        if old.is_dir() and old.name not in names:
            shutil.rmtree(old)
    return [SHIPPED / n for n in names]


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    for shipped in ship_builtins():
        print(shipped)
