"""Save, load and export Flexi-LoRA adapters.

A saved adapter is a folder with `adapter_model.safetensors` (A, B and learned γ per target module)
and `flexi_config.json` (the FlexiLoraConfig plus the rank policy). Folders are written to a temp
path and renamed, so an interrupted save never leaves a half-written adapter.

`export_peft` writes a rank-r slice as a plain PEFT LoRA adapter folder: anyone can then serve that
rank with `peft.PeftModel.from_pretrained`, no flexi-workflows needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexi_workflows.adapters.config import FlexiLoraConfig
from flexi_workflows.adapters.model import FlexiLoraModel
from flexi_workflows.adapters.policies import RankPolicy, policy_from_dict
from flexi_workflows.errors import ConfigError, RankError
from flexi_workflows.fsutil import atomic_dir

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "flexi_config.json"
FORMAT_VERSION = 1


def save_adapter(model: FlexiLoraModel, path: str | Path) -> Path:
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.adapter_state_dict().items()}
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "flexi-lora", "version": str(FORMAT_VERSION)})
        meta = {
            "format_version": FORMAT_VERSION,
            "adapter": model.adapter_config.to_dict(),
            "policy": model.policy.to_dict(),
            "target_modules": model.target_names,
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(path)


def read_adapter_config(path: str | Path) -> tuple[FlexiLoraConfig, dict]:
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise ConfigError(f"{path}: not a Flexi-LoRA adapter folder (no {CONFIG_NAME})")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    return FlexiLoraConfig.from_dict(meta["adapter"], source=str(cfg_path)), meta


def load_adapter(
    base_model: nn.Module, path: str | Path, policy: RankPolicy | None = None, *, assign: bool = False
) -> FlexiLoraModel:
    """Inject a saved adapter into `base_model`; the saved policy is used unless one is given.

    `assign=True` makes the loaded tensors the adapter's parameters instead of copying into them: for a
    base built on the meta device (no weights), which is all a PEFT export needs."""
    config, meta = read_adapter_config(path)
    if policy is None:
        policy = policy_from_dict(meta["policy"]) if meta.get("policy", {}).get("name") != "flexi" else None
    model = FlexiLoraModel(base_model, config, policy)
    state = load_file(str(Path(path) / WEIGHTS_NAME))
    own = model.adapter_state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"{path}: adapter does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for key, param in own.items():
            if state[key].shape != param.shape:
                raise ConfigError(
                    f"{path}: {key} has shape {tuple(state[key].shape)}, the model needs {tuple(param.shape)}"
                )
            if assign:
                owner, _, leaf = key.rpartition(".")
                loaded = nn.Parameter(state[key].to(param.dtype), requires_grad=param.requires_grad)
                setattr(model.base_model.get_submodule(owner), leaf, loaded)
            else:
                param.copy_(state[key])
    return model


def export_peft(model: FlexiLoraModel, path: str | Path, rank: int) -> Path:
    """Write rank `rank` of the adapter as a PEFT LoRA folder (adapter_config.json + safetensors).

    Fixed scalings map onto PEFT's own: α/r → lora_alpha=α, α/√r → use_rslora, the constant α/r_max →
    lora_alpha=α·r/r_max. A learned γ differs per layer, so it is folded into B and PEFT's scaling is
    set to 1 (lora_alpha = r).
    """
    from peft import LoraConfig

    cfg = model.adapter_config
    if not 1 <= rank <= cfg.r_max:
        raise RankError(f"export rank must be in [1, {cfg.r_max}], got {rank}")
    learned = cfg.scaling == "learned"
    base = model.base_model
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=rank if learned else (cfg.gamma(rank) * rank if cfg.scaling == "constant" else cfg.alpha),
        use_rslora=cfg.scaling == "alpha_over_sqrt_r",
        lora_dropout=cfg.dropout,
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in model.target_names}),
        base_model_name_or_path=getattr(getattr(base, "config", None), "_name_or_path", None) or None,
        task_type=_peft_task_type(base),
        bias="none",
    )
    state = {}
    for name, layer in model.flexi_layers():
        a = layer.lora_A[:rank].detach().float()
        b = layer.lora_B[:, :rank].detach().float()
        if learned:
            b = b * layer.gamma(rank).detach().float()
        state[f"base_model.model.{name}.lora_A.weight"] = a.contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = b.contiguous().cpu()
    with atomic_dir(path) as tmp:
        peft_config.save_pretrained(str(tmp))
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(path)


def _peft_task_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if getattr(config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM"
