"""Batched generation over task rows — the work of one Ray Data actor, or of a plain loop.

Text tasks give the model a prompt (a causal LM continues it); speech gives it an utterance's log-mel
features (Whisper transcribes them, seq2seq). Both go through `encode` then `generate`.

One class serves both so the Ray stage and its single-process reference (bench/scoring.py) run the
very same code: the model loads once per actor in __init__, and __call__ maps a batch of rows
(columns as numpy arrays, Ray Data's "numpy" batch format) to their prompts and predictions.

Greedy by default. With num_samples = k > 1 (difficulty from a pass rate, ScoringConfig) each prompt
gets k answers sampled with temperature / nucleus top_p, seeded from `seed` and the batch's row ids,
so the same rows in the same batch draw the same answers on any actor; they come back JSON-encoded
in a `samples` column (one string per row travels through Ray Data's numpy batches unchanged).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

from flexi_workflows.models.notices import quiet_generate_notices
from flexi_workflows.recipes.schema import TaskConfig
from flexi_workflows.tasks import get_task
from flexi_workflows.tasks.base import DEFAULT_DATE_STRING

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BatchGenerator:
    def __init__(
        self,
        model_ref: str,
        task_name: str | TaskConfig,
        *,
        max_new_tokens: int,
        max_prompt_tokens: int | None = 512,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device: str | None = None,
        num_threads: int | None = None,
        date_string: str = DEFAULT_DATE_STRING,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> None:
        from flexi_workflows.models.loading import load_model, load_tokenizer

        quiet_generate_notices()
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.task = get_task(task_name)
        self.speech = self.task.modality == "speech"
        if self.speech:  # audio → log-mel features; the processor's tokenizer decodes transcripts
            from flexi_workflows.models.loading import load_processor

            self.processor = load_processor(model_ref, trust_remote_code=trust_remote_code)
            self.tokenizer = self.processor.tokenizer
        else:
            self.tokenizer = load_tokenizer(model_ref, trust_remote_code=trust_remote_code)
        self.model = load_model(model_ref, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.date_string = date_string  # the date chat templates see (TaskConfig.date_string)
        self.num_samples, self.temperature, self.top_p, self.seed = num_samples, temperature, top_p, seed
        # a chat template already writes BOS; tokenizing with special tokens would add a second one
        self.add_special_tokens = not getattr(self.tokenizer, "chat_template", None)

    def prompts(self, batch: dict[str, np.ndarray]) -> list[str]:
        """What the model is given, as text for the record: the prompt, or for speech the utterance id."""
        n = len(batch["id"])
        if self.speech:
            return [str(i) for i in batch["id"]]
        contexts = batch.get("context", [""] * n)
        return [
            self.task.build_prompt({"question": str(q), "context": str(c)}, self.tokenizer, date_string=self.date_string)
            for q, c in zip(batch["question"], contexts)
        ]

    def encode(self, batch: dict[str, np.ndarray], prompts: list[str]) -> dict[str, torch.Tensor]:
        """The model inputs of a batch: token ids of the prompts, or log-mel features of the audio."""
        if self.speech:
            from flexi_workflows.data.speech import audio_features

            return {"input_features": audio_features(self.processor, batch["audio"], batch["id"]).to(
                self.device, dtype=self.model.dtype)}
        enc = self.tokenizer(
            prompts,
            return_tensors="pt",
            padding=True,
            truncation=self.max_prompt_tokens is not None,  # None: the whole prompt
            max_length=self.max_prompt_tokens,
            add_special_tokens=self.add_special_tokens,
        ).to(self.device)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor], num_samples: int = 1, *, model: torch.nn.Module | None = None,
                 **generate_kwargs: Any) -> list[str]:
        """Completions (or transcripts) of a batch's `inputs`: greedy, or with sampling settings in
        `generate_kwargs` `num_samples` per input (input i's answers at i*num_samples ... (i+1)*num_samples - 1).
        `model` stands in for self.model (merged inference: the base model with one rank merged in)."""
        model = model if model is not None else self.model
        extra = {}
        if self.speech and getattr(model.generation_config, "is_multilingual", False):
            extra = {"language": "en", "task": "transcribe"}  # English transcription, as LibriSpeech is
        out = model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            num_return_sequences=num_samples,
            **extra,
            **{"do_sample": False, **generate_kwargs},
        )
        if not self.speech:  # a causal LM returns the prompt too
            out = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() if self.speech else t for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def sample(self, inputs: dict[str, torch.Tensor], ids: list[str]) -> list[list[str]]:
        """`num_samples` sampled answers per input, seeded from `seed` and the batch's row ids."""
        key = f"{self.seed}\x1f" + "\x1f".join(ids)
        torch.manual_seed(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") % (2**63))
        k = self.num_samples
        texts = self.generate(inputs, num_samples=k, do_sample=True, temperature=self.temperature,
                              top_p=self.top_p, top_k=0)
        return [texts[i * k : (i + 1) * k] for i in range(len(ids))]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = self.prompts(batch)
        inputs = self.encode(batch, prompts)
        if self.num_samples > 1:
            samples = self.sample(inputs, [str(i) for i in batch["id"]])
            return {"id": np.asarray(batch["id"]), "prompt": np.asarray(prompts),
                    "prediction": np.asarray([s[0] for s in samples]),
                    "samples": np.asarray([json.dumps(s) for s in samples])}
        predictions = self.generate(inputs)
        return {"id": np.asarray(batch["id"]), "prompt": np.asarray(prompts), "prediction": np.asarray(predictions)}


class MethodGenerator(BatchGenerator):
    """Generation with a trained method: the evaluation stage's Ray Data actor.

    Same prompts, tokenization and greedy decoding as scoring, plus the trained artifact and the rank
    each input gets from the method (methods/): the router's rank carried in the batch's `rank`
    column (Flexi), the policy's fixed rank (LoRA-r, DyLoRA) or, for DyLoRA+, the rank at the batch's
    place (`stream_position`) in its eval stream (`eval_stream`), seeded by (seed, stream): the same
    seed and shard assignment give the same ranks whichever actor runs the batch.
    The ranks actually used come back as a column, so mean active parameters are measured, not assumed.

    With `merged` (evaluation.merged, nested-adapter methods) each batch is generated in one call on the
    base weights with its most common rank merged in and its other rows corrected (adapters/merged.py),
    restored after the batch; the actor keeps one RankMerger, so every batch merges into the same buffers.
    """

    def __init__(self, model_ref: str, task_name: str | TaskConfig, *, method: dict[str, Any], artifact_dir: str,
                 seed: int = 0, merged: bool = False, **kwargs: Any) -> None:
        from flexi_workflows.methods import get_method
        from flexi_workflows.recipes.loader import build
        from flexi_workflows.recipes.schema import MethodConfig

        super().__init__(model_ref, task_name, **kwargs)
        self.method = get_method(build(MethodConfig, method, source="method"))
        from flexi_workflows.storage import fetch

        # the trained artifact lives in the run's storage: read in place, or downloaded once to this actor's node
        self.model = self.method.load(self.model, fetch(artifact_dir), seed=seed).to(self.device).eval()
        self.merged = merged
        self._merger = None

    def generate_ranked(self, inputs: dict[str, torch.Tensor], ranks: np.ndarray) -> list[str]:
        if not self.merged:
            return self.generate(inputs, ranks=ranks.tolist())
        from flexi_workflows.adapters.merged import RankMerger, generate_merged

        if self._merger is None:  # one for the actor's lifetime: each batch's merge reuses its buffers
            self._merger = RankMerger(self.model)
        return generate_merged(self.model, ranks.tolist(), inputs, lambda base, batch: self.generate(batch, model=base),
                               merger=self._merger)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = self.prompts(batch)
        inputs = self.encode(batch, prompts)
        n = len(prompts)
        ranks = self.method.eval_ranks(self.model, batch, n)
        if ranks is None:
            predictions = self.generate(inputs)
            ranks = np.zeros(n, dtype=np.int64)
        else:
            predictions = self.generate_ranked(inputs, ranks)
        return {"id": np.asarray(batch["id"]), "prompt": np.asarray(prompts), "prediction": np.asarray(predictions),
                "rank": ranks}
