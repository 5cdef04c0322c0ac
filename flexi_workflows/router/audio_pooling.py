"""The router's view of an utterance: Whisper's convolutional stem, masked by the real length, mean-pooled.

    log-mel (mels, frames) ─ conv1 (k3, s1) ─ GELU ─ conv2 (k3, s2) ─ GELU ─► (d_model, frames/2)
        ─ mask: stem steps that cover real audio, not the window's zero padding ─► mean ─► (d_model)

Why the stem: for text the paper pools the *input token embeddings* — the model's own first,
context-free vectors for its input, read before any transformer layer, cheap enough to compute once
per row. Whisper has no token embedding for audio; its equivalent is the conv stem that turns
log-mel frames into d_model vectors ahead of the encoder layers (sinusoidal positions, like the
text router's missing positions, are left out). Masking by the utterance's real length matters: a
4-second utterance in Whisper's 30-second window is seven-eighths padding, which would otherwise
dominate every mean and make all utterances look alike. Only conv1 and conv2 are read from the
checkpoint (a few MB of a 1.5 GB large-v3), as the text router reads only the embedding table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexi_workflows.errors import ConfigError

POOLING = "masked_mean_conv_stem"
_PREFIXES = ("model.encoder.", "encoder.", "model.model.encoder.")


class ConvStem(nn.Module):
    """Whisper's encoder conv1 → GELU → conv2 → GELU (the weights are the base model's)."""

    def __init__(self, num_mel_bins: int, d_model: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(num_mel_bins, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.conv1(features))
        return nn.functional.gelu(self.conv2(x))  # (batch, d_model, ceil(frames / 2))


def load_conv_stem(ref: str | Path, *, trust_remote_code: bool = False) -> ConvStem:
    """The base model's conv stem alone: from a local safetensors folder only its four tensors are read;
    otherwise the model is loaded and its stem kept."""
    from safetensors import safe_open

    from flexi_workflows.models.loading import local_ref, load_config, load_model

    config = load_config(ref, trust_remote_code=trust_remote_code)
    if not hasattr(config, "num_mel_bins"):
        raise ConfigError(f"{ref}: not a speech model with a convolutional stem (config {type(config).__name__})")
    stem = ConvStem(config.num_mel_bins, config.d_model)
    folder = Path(local_ref(ref)).expanduser()
    names = [f"{c}.{p}" for c in ("conv1", "conv2") for p in ("weight", "bias")]
    if folder.is_dir():
        index = folder / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
        for prefix in _PREFIXES:
            state = {}
            for name in names:
                key = prefix + name
                file = folder / (weight_map.get(key, "") if weight_map else "model.safetensors")
                if not file.is_file():
                    break
                with safe_open(str(file), framework="pt") as handle:
                    if key not in handle.keys():
                        break
                    state[name] = handle.get_tensor(key).float()
            if len(state) == len(names):
                stem.load_state_dict(state)
                return stem.eval()
    model = load_model(ref, trust_remote_code=trust_remote_code)
    encoder = model.get_encoder()
    stem.load_state_dict({n: t.detach().float() for n, t in encoder.state_dict().items() if n in names})
    return stem.eval()


@torch.no_grad()
def pool_audio(audio: Sequence[Any], processor: Any, stem: ConvStem, *, ids: Sequence[Any] | None = None,
               batch_size: int = 32) -> torch.Tensor:
    """(len(audio), d_model) pooled stem outputs of encoded utterances (paths or bytes), in fp32."""
    from flexi_workflows.data.speech import features_and_frames

    names = list(ids) if ids is not None else None
    out = []
    for start in range(0, len(audio), batch_size):
        features, frames = features_and_frames(processor, audio[start:start + batch_size],
                                               names[start:start + batch_size] if names is not None else None)
        hidden = stem(features.float())  # (b, d, steps)
        steps = torch.clamp((frames + 1) // 2, min=1)  # conv2's stride 2
        mask = (torch.arange(hidden.shape[-1])[None, :] < steps[:, None]).float()
        out.append((hidden * mask[:, None, :]).sum(-1) / mask.sum(-1, keepdim=True))
    return torch.cat(out) if out else torch.empty(0, stem.conv2.out_channels)

