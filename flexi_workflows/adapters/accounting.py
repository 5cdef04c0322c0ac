"""Parameter accounting the way the paper reports it.

A LoRA of rank r on a linear layer (in → out) has r·(in + out) parameters, so a set of target layers
has `params_per_rank` = Σ(in + out) per unit of rank. Static methods report params at their rank;
input-adaptive ones (Flexi-LoRA, DyLoRA+) report the *mean active* params over the inputs they saw,
params_per_rank × mean rank (method-notes: Flexi (2,8) "504K" on LLaMA-3.2-1B ≈ mean rank 2.37).

Shares come in two conventions: of the base model (`*_pct_of_base`), and of every parameter the
adapted model holds, base + trainable (`*_pct_of_total`), which is what PEFT's
`print_trainable_parameters` prints as "trainable%". docs/speech-params.md shows the second one
reproducing the paper's Whisper shares (Table 4).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn

from flexi_workflows.adapters.model import find_target_linears
from flexi_workflows.errors import ConfigError


def count_base_params(model: nn.Module) -> int:
    """Every parameter of the base model, tied weights once (works on the meta device)."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if ".lora_" in name or name.startswith("lora_"):
            continue
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def params_per_rank(model: nn.Module, targets: Sequence[str]) -> int:
    return sum(m.in_features + m.out_features for m in find_target_linears(model, targets).values())


def mix_mean_rank(ranks: Sequence[int], mix: Sequence[float]) -> float:
    """Mean rank of a mix such as ranks (2, 8) at shares (0.94, 0.06); shares must sum to 1."""
    if len(ranks) != len(mix):
        raise ConfigError(f"--mix has {len(mix)} shares but --ranks has {len(ranks)} ranks; give one share per rank")
    if any(s < 0 for s in mix):
        raise ConfigError(f"--mix shares must be ≥ 0, got {list(mix)}")
    if abs(sum(mix) - 1.0) > 1e-6:
        raise ConfigError(f"--mix shares must sum to 1, got {list(mix)} (sum {sum(mix):.6g})")
    return float(sum(r * s for r, s in zip(ranks, mix)))


def mean_rank(ranks: Sequence[int] | torch.Tensor) -> float:
    ranks = torch.as_tensor(ranks, dtype=torch.float64)
    if ranks.numel() == 0:
        raise ConfigError("cannot average an empty set of ranks")
    return float(ranks.mean())


@dataclass
class ParamReport:
    base_params: int
    params_per_rank: int
    r_max: int
    lora_params: int  # at r_max
    scaling_params: int  # learned per-rank γ, 0 for fixed scaling
    trainable_params: int  # lora_params + scaling_params
    active_params: dict[int, int]  # rank -> params active at that rank
    mean_rank: float | None = None
    mean_active_params: float | None = None

    @property
    def total_params(self) -> int:
        """Base + trainable: every parameter of the adapted model (PEFT's "all params")."""
        return self.base_params + self.trainable_params

    @property
    def lora_pct_of_base(self) -> float:
        return 100.0 * self.lora_params / self.base_params

    @property
    def trainable_pct_of_total(self) -> float:
        """PEFT's "trainable%": trainable / (base + trainable)."""
        return 100.0 * self.trainable_params / self.total_params

    def active_pct_of_total(self, active: float) -> float:
        """Share of `active` adapter params in the adapted model (which holds the adapter at r_max)."""
        return 100.0 * active / self.total_params

    def to_dict(self) -> dict:
        d = asdict(self)
        d["active_params"] = {str(k): v for k, v in self.active_params.items()}
        d["lora_pct_of_base"] = self.lora_pct_of_base
        d["total_params"] = self.total_params
        d["trainable_pct_of_total"] = self.trainable_pct_of_total
        d["active_pct_of_total"] = {str(k): self.active_pct_of_total(v) for k, v in self.active_params.items()}
        if self.mean_active_params is not None:
            d["mean_active_pct_of_base"] = 100.0 * self.mean_active_params / self.base_params
            d["mean_active_pct_of_total"] = self.active_pct_of_total(self.mean_active_params)
            d["mean_active_pct_of_lora_max"] = 100.0 * self.mean_active_params / self.lora_params
        return d


def param_report(
    model: nn.Module,
    targets: Sequence[str],
    r_max: int,
    *,
    ranks: Sequence[int] | None = None,
    mix: Sequence[float] | None = None,
    learned_scaling: bool = False,
) -> ParamReport:
    """Counts for a (meta or real) base model with LoRA of up to r_max on `targets`.

    `ranks` alone lists observed per-sample ranks (mean over them); with `mix` it is a set of rank
    classes and their shares.
    """
    per_rank = params_per_rank(model, targets)
    n_layers = len(find_target_linears(model, targets))
    scaling = n_layers * r_max if learned_scaling else 0
    report = ParamReport(
        base_params=count_base_params(model),
        params_per_rank=per_rank,
        r_max=r_max,
        lora_params=per_rank * r_max,
        scaling_params=scaling,
        trainable_params=per_rank * r_max + scaling,
        active_params={r: per_rank * r for r in sorted(set(ranks or [r_max]))},
    )
    if ranks is not None:
        if any(not 1 <= r <= r_max for r in ranks):
            raise ConfigError(f"ranks {list(ranks)} must lie in [1, {r_max}]")
        report.mean_rank = mix_mean_rank(ranks, mix) if mix is not None else mean_rank(ranks)
        report.mean_active_params = per_rank * report.mean_rank
    return report
