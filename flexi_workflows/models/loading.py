"""Resolve a model reference (config.json, local folder, hub name) into a config or a model.

Hub names work for users with internet; here only local paths do, so every failure to resolve a
name says which of the three forms was tried. Weights load through safetensors only and
`trust_remote_code` stays off unless the caller asks for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from flexi_workflows.errors import ModelNotFoundError
from flexi_workflows.storage import child, fetch, is_remote, remote_digest

_SPEECH_SEQ2SEQ = {"whisper"}


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.endswith(".json") or ref.count("/") > 1 or Path(ref).exists()


def local_ref(ref: str | Path) -> str:
    """A model folder in the run's storage (s3://...) downloaded once to this node; any other reference as is."""
    if not is_remote(str(ref)):
        return str(ref)
    try:
        return str(fetch(str(ref)))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"model {ref}: {exc}") from None


def load_config(ref: str | Path, *, trust_remote_code: bool = False) -> PretrainedConfig:
    """A transformers config from a `config.json` file, a local model folder, a folder in remote storage or a hub name."""
    if is_remote(str(ref)):  # only its config.json, not the weights
        ref = local_ref(child(str(ref), "config.json"))
    ref_str = str(ref)
    path = Path(ref_str).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ModelNotFoundError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        model_type = data.get("model_type")
        if model_type is None:
            raise ModelNotFoundError(f"{path}: config has no 'model_type'")
        return AutoConfig.for_model(**data)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path}: folder has no config.json")
        try:
            json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise ModelNotFoundError(f"{path / 'config.json'}: not valid JSON ({where})") from None
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if _looks_like_path(ref_str):
        raise ModelNotFoundError(f"model {ref_str!r}: no such file or folder")
    try:
        return AutoConfig.from_pretrained(ref_str, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"model {ref_str!r}: not a local config.json or folder, and the Hugging Face hub could not "
            f"provide it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None


def model_class(config: PretrainedConfig) -> type:
    """The model class named in config.architectures, else the Auto class for the model type."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if config.model_type in _SPEECH_SEQ2SEQ:
        return transformers.AutoModelForSpeechSeq2Seq
    return transformers.AutoModelForCausalLM


def build_on_meta(config: PretrainedConfig) -> nn.Module:
    """The model's modules with shapes but no storage: parameter accounting for 1B-70B models on a laptop."""
    cls = model_class(config)
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            return cls.from_config(config)
        return cls(config)


def load_model(
    ref: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """Pretrained weights (safetensors only) for a local folder or hub name."""
    ref = local_ref(ref)
    config = load_config(ref, trust_remote_code=trust_remote_code)
    cls = model_class(config)
    return cls.from_pretrained(
        str(ref), config=config, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def load_tokenizer(ref: str | Path, *, trust_remote_code: bool = False, padding_side: str = "left"):
    """The model's tokenizer, set up for batched generation (left padding, a pad token)."""
    from transformers import AutoTokenizer

    ref = local_ref(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ref), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"tokenizer for {str(ref)!r} could not be loaded: {str(exc).splitlines()[0][:200]}") from None
    tokenizer.padding_side = padding_side
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_fingerprint(ref: str | Path) -> dict:
    """What identifies a model for stage caching: a local folder's contents, or the hub name."""
    from flexi_workflows.fsutil import path_digest

    if is_remote(str(ref)):
        return {"remote": remote_digest(str(ref))}  # by listing (names, sizes, times): no download
    path = Path(str(ref)).expanduser()
    if path.exists():
        return {"digest": path_digest(path)}  # by content: moving the cache folder keeps every stage valid
    return {"hub": str(ref)}


def load_processor(ref: str | Path, *, trust_remote_code: bool = False):
    """A speech model's processor (feature extractor + tokenizer), e.g. Whisper's; its tokenizer gets a pad token."""
    from transformers import AutoProcessor

    ref = local_ref(ref)
    try:
        processor = AutoProcessor.from_pretrained(str(ref), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"processor for {str(ref)!r} could not be loaded: {str(exc).splitlines()[0][:200]}") from None
    if not hasattr(processor, "feature_extractor") or not hasattr(processor, "tokenizer"):
        raise ModelNotFoundError(f"{str(ref)!r}: its processor ({type(processor).__name__}) has no feature extractor "
                                 f"and tokenizer; the speech task needs a speech model such as Whisper")
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor
