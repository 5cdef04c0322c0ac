"""Parameter accounting: the paper's numbers, mean active params, and the `flexi params` CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flexi_workflows.adapters import FlexiLoraConfig, inject_flexi_lora
from flexi_workflows.adapters.accounting import count_base_params, param_report, params_per_rank
from flexi_workflows.cli import main
from flexi_workflows.errors import ConfigError
from flexi_workflows.models.loading import build_on_meta, load_config
from tests.conftest import MODEL_CONFIGS, REPO_ROOT, SHARED, make_tiny_llama

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
PAPER = {  # Table 2/3 "#" column, LLaMA-3.2 with LoRA on q, k, v, o
    ("llama-3.2-1b-instruct.json", 4): 851_968,
    ("llama-3.2-1b-instruct.json", 8): 1_703_936,
    ("llama-3.2-3b-instruct.json", 4): 2_293_760,
    ("llama-3.2-3b-instruct.json", 8): 4_587_520,
}


@pytest.mark.parametrize("config_dir", [MODEL_CONFIGS, SHARED / "reference" / "model-configs"])
@pytest.mark.parametrize("name,rank", sorted(PAPER))
def test_paper_parameter_counts(config_dir, name, rank, capsys):
    path = config_dir / name
    if not path.exists():
        pytest.fail(f"{path} missing")
    assert main(["params", str(path), "--targets", ",".join(QKVO), "--rank", str(rank), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lora_params"] == PAPER[(name, rank)]
    assert out["params_per_rank"] * rank == PAPER[(name, rank)]


def test_base_params_of_llama_1b_on_meta():
    model = build_on_meta(load_config(MODEL_CONFIGS / "llama-3.2-1b-instruct.json"))
    assert next(model.parameters()).device.type == "meta"
    assert count_base_params(model) == 1_235_814_400  # tied embeddings counted once


def test_mean_active_params_for_a_mix(capsys):
    path = MODEL_CONFIGS / "llama-3.2-1b-instruct.json"
    assert main(["params", str(path), "--ranks", "2,8", "--mix", "0.94,0.06", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mean_rank"] == pytest.approx(2.36)
    assert out["mean_active_params"] == pytest.approx(212_992 * 2.36)
    assert out["lora_params"] == 1_703_936  # at the largest rank
    assert out["base_params"] == 1_235_814_400
    assert out["mean_active_pct_of_lora_max"] == pytest.approx(29.5)


def test_report_over_observed_ranks_matches_injected_model():
    model = make_tiny_llama()
    per = params_per_rank(model, QKVO)
    flexi = inject_flexi_lora(model, FlexiLoraConfig(r_max=8))
    trainable = sum(p.numel() for p in flexi.parameters() if p.requires_grad)
    report = param_report(flexi.base_model, QKVO, 8, ranks=[2, 2, 2, 8])
    assert report.params_per_rank == per
    assert report.trainable_params == trainable == per * 8
    assert report.mean_active_params == per * 3.5
    learned = inject_flexi_lora(make_tiny_llama(), FlexiLoraConfig(r_max=8, scaling="learned"))
    n_learned = sum(p.numel() for p in learned.parameters() if p.requires_grad)
    assert param_report(learned.base_model, QKVO, 8, learned_scaling=True).trainable_params == n_learned


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ranks", "2,8", "--mix", "0.9,0.2"], "sum to 1"),
        (["--ranks", "2,8", "--mix", "1.0"], "one share per rank"),
        (["--ranks", "8,2", "--mix", "0.5,0.5"], "strictly increasing"),
        (["--rank", "0"], "≥ 1"),
        (["--rank", "4", "--targets", "q,v"], "match no linear layer.*q_proj"),
    ],
)
def test_cli_rejects_bad_input(args, message, capsys):
    path = str(MODEL_CONFIGS / "llama-3.2-1b-instruct.json")
    assert main(["params", path, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err


def test_cli_unknown_model_path_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "flexi_workflows.cli", "params", "./no/such/model", "--rank", "4"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_hub_name_is_a_clear_error(capsys):
    # HF_HUB_OFFLINE=1 (conftest): the hub lookup fails at once, as it would for a typo online
    assert main(["params", "no-such-org/no-such-model", "--rank", "4"]) == 2
    assert "hub could not provide it" in capsys.readouterr().err


def test_local_model_folder(tmp_path, capsys):
    make_tiny_llama().save_pretrained(tmp_path / "m")
    assert main(["params", str(tmp_path / "m"), "--rank", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params_per_rank"] == params_per_rank(make_tiny_llama(), QKVO)
    with pytest.raises(ConfigError):
        param_report(make_tiny_llama(), QKVO, 8, ranks=[9])
