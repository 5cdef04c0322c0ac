"""Building the speech quickstart's base model: a tiny Whisper trained from scratch on the built-in
spoken corpus (audio/corpus.py), competent on part of the task.

It hears only the corpus's `pretrain-clean` split — the clean voices at ordinary rates, no noise —
so it transcribes clean test speech well and the `other` part (other voices, faster speech, noise)
badly: difficulty scoring on WER then finds both classes, and fine-tuning on train-clean +
train-other has something to teach. The folder records its WER on each test split
(`base_eval.json`), which `flexi run` prints.

Like the arithmetic base (models/pretrain.py) the build is deterministic (fixed threads,
deterministic kernels, seeded data order and initialisation) and cached under a fingerprint of the
spec and the corpus, so every later run loads an ordinary local model folder.
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


@dataclass
class SpeechPretrainSpec:
    corpus: str = "builtin:spoken-tiny"
    split: str = "pretrain-clean"
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 512
    window_seconds: int = 4
    vocab_size: int = 320
    steps: int = 800
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    threads: int = 2
    eval_splits: tuple[str, ...] = ("test-clean", "test-other")


def pretrain_speech_model(path: Path, spec: SpeechPretrainSpec, cache_dir: str | Path) -> Path:
    """Train the tiny Whisper into `path` (atomically, with its WER per test split); returns the folder."""
    from flexi_workflows.audio.corpus import resolve_builtin_corpus
    from flexi_workflows.fsutil import atomic_dir
    from flexi_workflows.models.pretrain import BASE_EVAL, deterministic_torch

    started = time.time()
    corpus = resolve_builtin_corpus(spec.corpus, cache_dir)
    with deterministic_torch(spec.threads):
        model, processor = _train(spec, corpus)
    with atomic_dir(path) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        processor.save_pretrained(str(tmp))
        with deterministic_torch(spec.threads):
            record = evaluate_speech_base(tmp, corpus, spec.eval_splits)
        (tmp / BASE_EVAL).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "pretrain.json").write_text(json.dumps({"spec": asdict(spec), "corpus": Path(corpus).name,
                                                        "seconds": round(time.time() - started, 1)}))
    log.info("pretrained the tiny Whisper in %.0f s → %s", time.time() - started, path)
    return Path(path)


def _rows(corpus: Path, split: str) -> list[dict]:
    from flexi_workflows.tasks.speech import librispeech_root, load_librispeech_split

    return load_librispeech_split(librispeech_root(Path(corpus), [split]), split, Path(corpus).name)


def _train(spec: SpeechPretrainSpec, corpus: Path):
    from tqdm import tqdm

    from flexi_workflows.data.speech import audio_features, encode_labels
    from flexi_workflows.models.tiny_whisper import tiny_whisper, train_whisper_tokenizer

    rows = _rows(corpus, spec.split)
    tokenizer = train_whisper_tokenizer([r["target"] for r in rows], vocab_size=spec.vocab_size)
    model, processor = tiny_whisper(tokenizer, d_model=spec.d_model, layers=spec.layers, heads=spec.heads,
                                    ffn=spec.ffn, window_seconds=spec.window_seconds, seed=spec.seed)
    start = model.config.decoder_start_token_id
    labels = [encode_labels(r["target"], tokenizer, max_target_tokens=60, decoder_start_token_id=start) for r in rows]
    features = torch.cat([audio_features(processor, [r["audio"] for r in rows[i:i + 256]]).half()
                          for i in range(0, len(rows), 256)])  # the whole split, once (fp16 halves its memory)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps))))
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    bar = tqdm(range(spec.steps), desc="pretraining the speech quickstart's tiny Whisper", unit="step")
    for step in bar:
        idx = torch.randint(0, len(rows), (spec.batch_size,), generator=gen).tolist()
        longest = max(len(labels[i]) for i in idx)
        target = torch.full((len(idx), longest), -100, dtype=torch.long)
        for j, i in enumerate(idx):
            target[j, : len(labels[i])] = torch.tensor(labels[i])
        loss = model(input_features=features[idx].float(), labels=target).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), processor


def evaluate_speech_base(folder: str | Path, corpus: Path, splits: tuple[str, ...]) -> dict:
    """Greedy corpus-level WER / CER of the model in `folder` on each split, as the pipeline's evaluation
    computes them (same features, greedy decoding, Whisper's normaliser)."""
    from flexi_workflows.data.speech import audio_features
    from flexi_workflows.models.loading import load_model, load_processor
    from flexi_workflows.models.notices import quiet_generate_notices
    from flexi_workflows.tasks.speech import SpeechTask

    quiet_generate_notices()  # transformers' notices about Whisper's own generate() calls, as in the pipeline
    task = SpeechTask()
    processor, model = load_processor(str(folder)), load_model(str(folder)).eval()
    record: dict = {"splits": list(splits), "rows": {}}
    everything = []
    for split in splits:
        rows = _rows(corpus, split)
        per_row = []
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            with torch.no_grad():
                out = model.generate(input_features=audio_features(processor, [r["audio"] for r in chunk]),
                                     max_new_tokens=48, do_sample=False)
            texts = processor.tokenizer.batch_decode(out, skip_special_tokens=True)
            per_row += [task.metrics(t.strip(), r) for t, r in zip(texts, chunk)]
        summary = task.aggregate(per_row)
        group = split.rsplit("-", 1)[-1]
        record.update({f"{m}_{group}": round(v, 4) for m, v in summary.items()})
        record["rows"][split] = len(rows)
        everything += per_row
    record.update({f"{m}_all": round(v, 4) for m, v in task.aggregate(everything).items()})
    return record


def speech_fingerprint(spec: SpeechPretrainSpec, cache_dir: str | Path) -> dict:
    """What the model depends on besides its spec: the corpus it hears (its cache folder names its spec)."""
    from flexi_workflows.audio.corpus import corpus_folder_name

    return {"spec": asdict(spec), "corpus": corpus_folder_name(spec.corpus)}
