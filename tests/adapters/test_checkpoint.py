"""Save / load round trip and PEFT export round trip."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from flexi_workflows.adapters import DyLoRAPlus, FlexiLoraConfig, inject_flexi_lora
from flexi_workflows.adapters.checkpoint import CONFIG_NAME, WEIGHTS_NAME, export_peft, load_adapter, save_adapter
from flexi_workflows.errors import ConfigError
from tests.conftest import make_tiny_llama, randomize_lora


@pytest.mark.parametrize("scaling", ["alpha_over_r", "learned"])
def test_save_load_round_trip(tmp_path, scaling):
    flexi = inject_flexi_lora(
        make_tiny_llama(), FlexiLoraConfig(r_max=8, alpha=12, scaling=scaling), DyLoRAPlus(1, 8, seed=4)
    )
    randomize_lora(flexi)
    if scaling == "learned":
        with torch.no_grad():
            for _, layer in flexi.flexi_layers():
                layer.lora_gamma.mul_(torch.linspace(0.5, 1.5, 8))
    save_adapter(flexi, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {WEIGHTS_NAME, CONFIG_NAME}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folders left"
    meta = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert meta["adapter"]["r_max"] == 8 and meta["policy"]["name"] == "dylora_plus"

    loaded = load_adapter(make_tiny_llama(), tmp_path / "adapter")
    assert loaded.adapter_config == flexi.adapter_config
    assert loaded.policy.to_dict() == flexi.policy.to_dict()
    ids = torch.randint(3, 96, (3, 7))
    with torch.no_grad():
        for ranks in ([1, 5, 8], 3):
            torch.testing.assert_close(
                loaded(input_ids=ids, ranks=ranks).logits, flexi(input_ids=ids, ranks=ranks).logits, atol=0, rtol=0
            )


@pytest.mark.parametrize("scaling,rank", [("alpha_over_r", 2), ("alpha_over_sqrt_r", 8), ("learned", 4), ("constant", 2)])
def test_peft_export_round_trip(tmp_path, scaling, rank):
    flexi = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=8, scaling=scaling))
    randomize_lora(flexi)
    if scaling == "learned":
        with torch.no_grad():
            for i, (_, layer) in enumerate(flexi.flexi_layers()):
                layer.lora_gamma.add_(0.3 * (i + 1))  # per-layer γ, so folding into B is really tested
    export_peft(flexi, tmp_path / "peft", rank)
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "peft")).eval()
    ids = torch.randint(3, 96, (2, 9))
    with torch.no_grad():
        expect = flexi(input_ids=ids, ranks=rank).logits
        got = peft_model(input_ids=ids).logits
        base = make_tiny_llama()(input_ids=ids).logits
    assert (expect - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=0)


def test_load_rejects_an_adapter_for_another_model(tmp_path):
    flexi = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=4))
    save_adapter(flexi, tmp_path / "a")
    with pytest.raises(ConfigError, match="shape"):
        load_adapter(make_tiny_llama(hidden_size=32), tmp_path / "a")
    with pytest.raises(ConfigError, match="not a Flexi-LoRA adapter folder"):
        load_adapter(make_tiny_llama(), tmp_path)


def test_failed_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    flexi = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=4))
    save_adapter(flexi, tmp_path / "a")
    before = (tmp_path / "a" / WEIGHTS_NAME).read_bytes()
    import flexi_workflows.adapters.checkpoint as ckpt

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        save_adapter(flexi, tmp_path / "a")
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
