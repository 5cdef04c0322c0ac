"""Speech examples for a seq2seq model (Whisper): audio → log-mel features, transcript → decoder labels.

    input_features = log-mel(audio)                       (batch, mels, frames): the window, zero-padded
    labels         = [<|sot|> <|en|> <|transcribe|> <|notimestamps|>] transcript <|endoftext|>
                     minus the leading <|sot|> (the model prepends decoder_start_token_id itself),
                     right-padded with -100

The prefix is what `generate()` starts from (the tokenizer's prefix tokens: language and task for a
multilingual Whisper, none for an English-only one), so training teaches exactly what inference asks.
Audio stays encoded (a path or bytes) until a batch is collated on the worker that trains on it:
LibriSpeech's 960 hours never pass through the driver as features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from flexi_workflows.data.causal_lm import IGNORE_INDEX


def set_transcription_prefix(tokenizer: Any, generation_config: Any) -> None:
    """English transcription without timestamps, in the form the model's generation config expects."""
    if getattr(generation_config, "is_multilingual", False):
        tokenizer.set_prefix_tokens(language="english", task="transcribe", predict_timestamps=False)
    elif hasattr(tokenizer, "set_prefix_tokens"):
        tokenizer.set_prefix_tokens(predict_timestamps=False)


def encode_labels(text: str, tokenizer: Any, *, max_target_tokens: int | None, decoder_start_token_id: int) -> list[int]:
    """Decoder labels for one transcript: prefix, text, end of text; cut to max_target_tokens at the end."""
    ids = tokenizer(" " + text.strip()).input_ids
    if ids and ids[0] == decoder_start_token_id:
        ids = ids[1:]
    if max_target_tokens is not None and len(ids) > max_target_tokens:
        ids = ids[: max_target_tokens - 1] + [tokenizer.eos_token_id]
    return ids


def features_and_frames(processor: Any, audio: Sequence[Any], ids: Sequence[Any] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """((batch, mels, frames) log-mel features, (batch,) real frames) of encoded utterances, each decoded
    at 16 kHz and padded or cut to the feature extractor's window (Whisper: 30 s; the built-in tiny
    Whisper: 4 s); frames beyond an utterance's real frame count are the window's padding."""
    from flexi_workflows.audio.io import SAMPLE_RATE, read_audio

    names = [str(i) for i in ids] if ids is not None else [None] * len(audio)
    waves = [read_audio(a if isinstance(a, (bytes, str)) else str(a), where=f"utterance {n}" if n else None)
             for a, n in zip(audio, names)]
    out = processor.feature_extractor(waves, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True)
    return out["input_features"], out["attention_mask"].sum(1)


def audio_features(processor: Any, audio: Sequence[Any], ids: Sequence[Any] | None = None) -> torch.Tensor:
    """(batch, mels, frames) log-mel features of encoded utterances (see features_and_frames)."""
    return features_and_frames(processor, audio, ids)[0]


def collate_speech(batch: dict[str, Any] | Sequence[dict[str, Any]], processor: Any) -> dict[str, torch.Tensor]:
    """A training batch: features from the rows' audio, labels right-padded with -100, ranks if routed."""
    if isinstance(batch, dict):
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["labels"]))]
    else:
        rows = list(batch)
    features = audio_features(processor, [r["audio"] for r in rows], [r.get("id") for r in rows])
    longest = max(len(r["labels"]) for r in rows)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        # a copy: Ray Data hands the worker read-only arrays, which torch.from_numpy warns about on every run
        ids = torch.tensor(np.asarray(r["labels"], dtype=np.int64), dtype=torch.long)
        labels[i, : len(ids)] = ids
    out = {"input_features": features, "labels": labels}
    if "rank" in rows[0]:
        out["ranks"] = torch.tensor([int(r["rank"]) for r in rows], dtype=torch.long)
    return out
