"""A tiny real Whisper built offline: a byte-level BPE trained on transcripts, wrapped as transformers'
own WhisperTokenizer with Whisper's special tokens, a WhisperFeatureExtractor with a short window,
and a small WhisperForConditionalGeneration. Saved as an ordinary model folder, it loads through
AutoProcessor / AutoModelForSpeechSeq2Seq exactly as openai/whisper-* does.

    window: 4 s (64,000 samples) → 400 log-mel frames → 200 encoder positions (max_source_positions)

The window is the one CPU saving: transformers' Whisper encoder takes a shorter input when
`max_source_positions` and the feature extractor's `chunk_length` agree (2 × 200 frames = 4 s).
It is English-only like whisper-tiny.en: the decoder prefix is <|startoftranscript|><|notimestamps|>.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>",
            "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]


def train_whisper_tokenizer(texts: Iterable[str], vocab_size: int = 320):
    """WhisperTokenizer over a byte-level BPE trained on `texts` (lower-case transcripts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" " + t.strip() for t in texts], trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        tok.model.save(tmp)
        vocab = json.loads((Path(tmp) / "vocab.json").read_text())
        merges = [tuple(line.split()) for line in (Path(tmp) / "merges.txt").read_text().splitlines()
                  if line and not line.startswith("#")]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.set_prefix_tokens(predict_timestamps=False)
    return tokenizer


def tiny_whisper(tokenizer, *, d_model: int = 128, layers: int = 2, heads: int = 4, ffn: int = 512,
                 window_seconds: int = 4, max_target_positions: int = 64, seed: int = 0):
    """(model, processor): a WhisperForConditionalGeneration and its WhisperProcessor for a `window_seconds` window."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    frames = window_seconds * 100  # hop 160 at 16 kHz
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        max_source_positions=frames // 2, max_target_positions=max_target_positions,
        decoder_start_token_id=sot, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        suppress_tokens=[], begin_suppress_tokens=[],
    )
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
        no_timestamps_token_id=ids["<|notimestamps|>"], is_multilingual=False,
    )
    features = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, n_fft=400,
                                       chunk_length=window_seconds)
    return model, WhisperProcessor(feature_extractor=features, tokenizer=tokenizer)
