"""The difficulty router as a serving artifact: request text → rank, with no recipe, run folder or Ray.

A serving stack that holds one LoRA adapter per rank (multi-LoRA serving) asks the router which
adapter each request goes to. The pipeline routes with three things besides the router's weights —
the base model's tokenizer (right padding, left truncation at the task's prompt budget), its input
embedding table, and the task's plain user-text template (`Question: {question}` for math) — so the
artifact records all three; leaving out any one of them would route the same request differently
than training and evaluation did, silently.

    <folder>/router.safetensors, router.json   the trained RankRouter, as the route stage saved it
             tokenizer/                        the base model's tokenizer files
             embeddings.safetensors            the input embedding table (only with copy_embeddings;
                                               otherwise read from `base_model` on load: one tensor)
             serving.json                      classes, class → rank, template, max_length, base model

    router = load_router(folder)
    router.route(["What is 3 plus 4?"])   # → [2]: send it to the rank-2 adapter
"""

from __future__ import annotations

import json
import shutil
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexi_workflows.errors import ConfigError
from flexi_workflows.fsutil import atomic_dir
from flexi_workflows.router.assign import RankAssigner
from flexi_workflows.router.model import CONFIG, POOLING, WEIGHTS, RankRouter
from flexi_workflows.router.model import load_router as load_rank_router
from flexi_workflows.router.pooling import pool_texts

SERVING_CONFIG = "serving.json"
EMBEDDINGS = "embeddings.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = "flexi-router"
FORMAT_VERSION = 1


def save_serving_router(router_dir: str | Path, out: str | Path, *, class_ranks: Sequence[int], base_model: str,
                        max_length: int | None, input_template: str | None, copy_embeddings: bool = False,
                        trust_remote_code: bool = False, extra: Mapping[str, Any] | None = None) -> Path:
    """Write a trained router folder (route stage) as a serving artifact at `out` (atomically).

    `input_template` is how the pipeline turned a row into the routed text (fields `question`,
    `context`); None when the task's text is not a plain template — then `route` takes that text as is."""
    from flexi_workflows.models.loading import load_config, load_tokenizer
    from flexi_workflows.router.pooling import load_input_embeddings

    router = load_rank_router(router_dir, load_config(base_model, trust_remote_code=trust_remote_code))
    if router.spec.pooling != POOLING:
        raise ConfigError(f"{router_dir}: a {router.spec.pooling} router (speech) pools audio, not text; "
                          f"only text routers are exported for serving")
    if len(class_ranks) != router.spec.num_classes:
        raise ConfigError(f"{len(class_ranks)} class ranks {list(class_ranks)} for a router with "
                          f"{router.spec.num_classes} classes {router.spec.class_names}")
    tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code, padding_side="right")
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "classes": list(router.spec.class_names),
        "class_ranks": {name: int(r) for name, r in zip(router.spec.class_names, class_ranks)},
        "ranks_by_class": [int(r) for r in class_ranks],
        "base_model": str(base_model),
        "embeddings": EMBEDDINGS if copy_embeddings else None,  # None: the base model's table, read on load
        "tokenizer": TOKENIZER_DIR,
        "max_length": None if max_length is None else int(max_length),
        "padding_side": "right", "truncation_side": tokenizer.truncation_side,
        "input_template": input_template,
        "pooling": router.spec.pooling,
        "trust_remote_code": bool(trust_remote_code),
        **(dict(extra) if extra else {}),
    }
    with atomic_dir(out) as tmp:
        for name in (WEIGHTS, CONFIG):
            shutil.copy2(Path(router_dir) / name, tmp / name)
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        if copy_embeddings:
            table = load_input_embeddings(base_model, trust_remote_code=trust_remote_code).weight
            save_file({"weight": table.detach().contiguous()}, str(tmp / EMBEDDINGS))
        (tmp / SERVING_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


class ServingRouter:
    """A loaded serving router; `route` gives each request its rank, `classify` its difficulty class."""

    def __init__(self, router: RankRouter, tokenizer: Any, embedding: nn.Module, config: dict[str, Any]) -> None:
        self.router = router
        self.tokenizer = tokenizer
        self.embedding = embedding
        self.config = config
        self.assigner = RankAssigner(config["ranks_by_class"])
        template = config.get("input_template")
        self.fields = [f for _, f, _, _ in string.Formatter().parse(template) if f] if template else []

    @property
    def ranks(self) -> list[int]:
        return sorted(set(self.config["ranks_by_class"]))

    def text(self, item: str | Mapping[str, Any]) -> str:
        """The text the router sees: a string fills the template's `question` (other fields empty), a
        mapping fills its fields by name; with no template a string is taken as is."""
        template = self.config.get("input_template")
        if template is None:
            if not isinstance(item, str):
                raise ConfigError("this router has no input template: pass the routed text itself as a string")
            return item
        values = {"question": item} if isinstance(item, str) else item
        return template.format(**{f: str(values.get(f, "") or "") for f in self.fields})

    def classify(self, inputs: Sequence[str | Mapping[str, Any]], *, batch_size: int = 256) -> list[int]:
        if isinstance(inputs, (str, Mapping)):
            raise ConfigError("route / classify take a list of requests, not one request")
        if not inputs:
            return []
        pooled = pool_texts([self.text(x) for x in inputs], self.tokenizer, self.embedding,
                            max_length=self.config["max_length"], batch_size=batch_size)
        return [int(c) for c in self.router.classify(pooled).tolist()]

    def route(self, inputs: Sequence[str | Mapping[str, Any]], *, batch_size: int = 256) -> list[int]:
        """The rank (= the adapter) for each request."""
        classes = self.classify(inputs, batch_size=batch_size)
        return [int(r) for r in self.assigner(torch.tensor(classes, dtype=torch.long)).tolist()] if classes else []


def load_router(path: str | Path, *, base_model: str | None = None) -> ServingRouter:
    """Load a serving router folder. `base_model` overrides where the embedding table is read from (the
    serving stack's own copy of the base model) when the folder does not carry the table itself."""
    from transformers import AutoTokenizer

    from flexi_workflows.models.loading import load_config
    from flexi_workflows.router.pooling import load_input_embeddings

    path = Path(path)
    if not (path / SERVING_CONFIG).is_file():
        raise ConfigError(f"{path}: not a serving router folder (no {SERVING_CONFIG}); `flexi export` writes one")
    try:
        config = json.loads((path / SERVING_CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path / SERVING_CONFIG}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if config.get("format") != FORMAT or int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError(f"{path / SERVING_CONFIG}: not a {FORMAT} v{FORMAT_VERSION} config")
    trust = bool(config.get("trust_remote_code", False))
    router = load_rank_router(path)
    if config.get("embeddings"):
        weight = load_file(str(path / config["embeddings"]))["weight"]
        embedding = nn.Embedding.from_pretrained(weight.float(), freeze=True)
    else:
        source = base_model or config["base_model"]
        from flexi_workflows.router.model import check_router_fits

        check_router_fits(router.spec, load_config(source, trust_remote_code=trust), source)
        embedding = load_input_embeddings(source, trust_remote_code=trust)
    if tuple(embedding.weight.shape) != (router.spec.vocab_size, router.spec.embed_dim):
        raise ConfigError(f"{path}: embedding table {tuple(embedding.weight.shape)} does not fit the router "
                          f"(vocabulary {router.spec.vocab_size}, dim {router.spec.embed_dim})")
    tokenizer = AutoTokenizer.from_pretrained(str(path / config["tokenizer"]), trust_remote_code=trust)
    tokenizer.padding_side = config.get("padding_side", "right")
    tokenizer.truncation_side = config.get("truncation_side", "left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ServingRouter(router, tokenizer, embedding, config)
