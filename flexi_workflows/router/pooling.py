"""Masked mean pooling of the base model's input token embeddings — the router's only view of an input.

pooled = Σ_t mask_t · E[x_t] / Σ_t mask_t: padding never counts, so a sample's pooled vector is the
same whatever it is batched with and however it is padded (left or right).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from flexi_workflows.errors import ConfigError


def masked_mean_pool(embeddings: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, dim), (batch, seq) → (batch, dim), in fp32."""
    embeddings = embeddings.float()
    if attention_mask is None:
        return embeddings.mean(dim=1)
    mask = attention_mask.to(embeddings.dtype).unsqueeze(-1)
    return (embeddings * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


@torch.no_grad()
def pool_texts(
    texts: Sequence[str], tokenizer, embedding: nn.Module, *, max_length: int | None = 512, batch_size: int = 256
) -> torch.Tensor:
    """Pooled embeddings (len(texts), dim) for raw texts, tokenized as the model would see them."""
    device = next(embedding.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            return_tensors="pt", padding=True, truncation=max_length is not None, max_length=max_length,
        ).to(device)
        out.append(masked_mean_pool(embedding(enc["input_ids"]), enc["attention_mask"]).cpu())
    return torch.cat(out) if out else torch.empty(0, embedding.weight.shape[1])


def load_input_embeddings(ref: str | Path, *, trust_remote_code: bool = False) -> nn.Embedding:
    """The base model's input embedding table alone.

    From a local safetensors folder only that one tensor is read (a 1B model's 1 GB table, not its
    5 GB of weights); otherwise the model is loaded and its table kept.
    """
    import json

    from safetensors import safe_open

    from flexi_workflows.models.loading import local_ref, build_on_meta, load_config, load_model

    config = load_config(ref, trust_remote_code=trust_remote_code)
    meta = build_on_meta(config)
    table = meta.get_input_embeddings().weight
    names = [n for n, p in meta.named_parameters(remove_duplicate=False) if p is table]
    folder = Path(local_ref(ref)).expanduser()
    if folder.is_dir():
        index = folder / "model.safetensors.index.json"
        files = {}
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {n: folder / weight_map[n] for n in names if n in weight_map}
        elif (folder / "model.safetensors").is_file():
            files = {n: folder / "model.safetensors" for n in names}
        for name, file in files.items():
            with safe_open(str(file), framework="pt") as handle:
                if name in handle.keys():
                    weight = handle.get_tensor(name)
                    return nn.Embedding.from_pretrained(weight.float(), freeze=True)
    model = load_model(ref, trust_remote_code=trust_remote_code)
    weight = model.get_input_embeddings().weight.detach().float()
    if weight.shape != table.shape:
        raise ConfigError(f"{ref}: input embeddings {tuple(weight.shape)} do not match its config {tuple(table.shape)}")
    return nn.Embedding.from_pretrained(weight, freeze=True)
