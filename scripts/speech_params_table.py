"""The Whisper share table of docs/speech-params.md: size × LoRA target set, both share conventions.

    .venv/bin/python scripts/speech_params_table.py > /tmp/table.md

Every number comes from `param_report`, the function behind `flexi params`, on the configs in
flexi_workflows/assets/model_configs built on the meta device. "of base" = adapter / base params;
"of all" = adapter / (base + adapter at r_max), PEFT's trainable%. Flexi (2,8) min = every input at
rank 2, the least mean active share (2,8) can have. Rows whose LoRA-4 and LoRA-8 shares both round to
the paper's 0.29 / 0.58 (Table 4) are marked.
"""

from __future__ import annotations

from pathlib import Path

from flexi_workflows.adapters.accounting import param_report
from flexi_workflows.models.loading import build_on_meta, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "flexi_workflows" / "assets" / "model_configs"
SIZES = ["tiny", "base", "small", "medium", "large-v2", "large-v3", "large-v3-turbo"]
QKVO = ["q_proj", "k_proj", "v_proj", "out_proj"]
PAPER = {4: 0.29, 8: 0.58}


def target_sets(n_enc: int, n_dec: int) -> dict[str, list[str]]:
    """Named target sets as `flexi params --targets` lists (suffixes of module names)."""

    def enc(ps):
        return [f"encoder.layers.{i}.self_attn.{p}" for i in range(n_enc) for p in ps]

    def dec(ps):
        return [f"decoder.layers.{i}.{a}.{p}" for i in range(n_dec) for a in ("self_attn", "encoder_attn") for p in ps]

    return {
        "q,k,v,o — all attention (default)": QKVO,
        "q,v — all attention": ["q_proj", "v_proj"],
        "q,k,v — all attention": ["q_proj", "k_proj", "v_proj"],
        "q,k,v,o — self-attention only (no cross)": [f"self_attn.{p}" for p in QKVO],
        "q,v — self-attention only (no cross)": ["self_attn.q_proj", "self_attn.v_proj"],
        "q,k,v,o — encoder only": enc(QKVO),
        "q,v — encoder only": enc(["q_proj", "v_proj"]),
        "q,k,v,o — decoder only (self + cross)": dec(QKVO),
        "q,v — decoder only (self + cross)": dec(["q_proj", "v_proj"]),
        "q,k,v,o + fc1,fc2 — all layers": QKVO + ["fc1", "fc2"],
    }


def shares(model, targets: list[str]) -> dict[str, float]:
    out = {}
    for r in (4, 8):
        rep = param_report(model, targets, r)
        out[f"base{r}"] = rep.lora_pct_of_base
        out[f"all{r}"] = rep.trainable_pct_of_total
    flexi = param_report(model, targets, 8, ranks=[2, 8], mix=[1.0, 0.0])  # every input at rank 2
    out["base2"] = flexi.to_dict()["mean_active_pct_of_base"]
    out["all2"] = flexi.to_dict()["mean_active_pct_of_total"]
    return out


def matches(s: dict[str, float], conv: str) -> bool:
    return all(round(s[f"{conv}{r}"], 2) == PAPER[r] for r in (4, 8))


def main() -> None:
    print("| size | LoRA targets | LoRA-4 % of base | LoRA-8 % of base | Flexi (2,8) min % of base "
          "| LoRA-4 % of all | LoRA-8 % of all | Flexi (2,8) min % of all | paper's 0.29 / 0.58 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in SIZES:
        config = load_config(CONFIGS / f"whisper-{size}.json")
        model = build_on_meta(config)
        for name, targets in target_sets(config.encoder_layers, config.decoder_layers).items():
            s = shares(model, targets)
            hit = [f"of {c}" for c in ("base", "all") if matches(s, c)]
            mark = f"**yes** ({', '.join(hit)})" if hit else ""
            print(f"| {size} | {name} | {s['base4']:.4f} | {s['base8']:.4f} | {s['base2']:.4f} "
                  f"| {s['all4']:.4f} | {s['all8']:.4f} | {s['all2']:.4f} | {mark} |")


if __name__ == "__main__":
    main()
