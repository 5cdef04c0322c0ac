"""`flexi plan` (memory.py): its model-state figures against DeepSpeed's own estimators for LLaMA-3.2-1B and
3B (configs without weights), adapters against a hand count, and the command's table, warning and exit codes.

Tolerance against DeepSpeed, and why: under ZeRO-2 the byte counts are DeepSpeed's (2 P + 18 P / N), so the
figures agree to the byte (integer rounding). Under ZeRO-3 DeepSpeed's formula (18 P / N + 4 × largest layer)
leaves out each worker's own 16-bit parameter partition, 2 P / N, which memory.py counts: the difference
must be exactly that, i.e. at most 2/18 = 11.1 % of DeepSpeed's figure. With CPU offload the two agree
exactly again.
"""

from __future__ import annotations

import json
import logging

import pytest

from flexi_workflows.cli import main
from flexi_workflows.memory import (
    GPU_MEMORY_ENV,
    GiB,
    activation_bytes,
    find_config,
    model_dims,
    model_states,
    plan_recipe,
)
from flexi_workflows.recipes import load_recipe
from tests.conftest import MODEL_CONFIGS, make_tiny_llama
from tests.helpers import small_recipe

ONE_B, THREE_B = "llama-3.2-1b-instruct.json", "llama-3.2-3b-instruct.json"


@pytest.fixture(scope="module")
def dims():
    from flexi_workflows.models.loading import load_config

    return {name: model_dims(load_config(MODEL_CONFIGS / name)) for name in (ONE_B, THREE_B)}


def test_llama_dimensions_from_configs_without_weights(dims):
    one, three = dims[ONE_B], dims[THREE_B]
    assert (one.total_params, one.largest_layer_params) == (1_235_814_400, 128_256 * 2048)  # the tied embedding
    assert (three.total_params, three.largest_layer_params) == (3_212_749_824, 128_256 * 3072)
    assert (one.hidden_size, one.num_layers, one.ffn_size, one.kv_width, one.gated_mlp) == (2048, 16, 8192, 512, True)


def test_counts_match_deepspeeds_model_to_params_on_a_real_model():
    """DeepSpeed's definitions (tied weights once; largest = most parameters one module holds directly)."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = make_tiny_llama()
    d = model_dims(model.config, model)
    assert (d.total_params, d.largest_layer_params) == model_to_params(model)


@pytest.mark.parametrize("config", [ONE_B, THREE_B])
@pytest.mark.parametrize("gpus", [1, 2, 8])
@pytest.mark.parametrize("stage", [2, 3])
def test_full_finetuning_agrees_with_deepspeeds_estimators(dims, config, gpus, stage):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    d = dims[config]
    P, L = d.total_params, d.largest_layer_params
    ours = model_states(P, P, L, num_gpus=gpus, zero_stage=stage, bf16=True).total
    if stage == 2:
        theirs = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False)[1]
        assert abs(ours - theirs) <= 1
    else:
        theirs = estimate_zero3_model_states_mem_needs(P, L, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False,
                                                       cpu_offload_params=False)[1]
        assert abs((ours - theirs) - 2 * P / gpus) <= 1  # the 16-bit parameter partition DeepSpeed leaves out
        assert 1.0 < ours / theirs <= 1 + 2 / 18
    # CPU offload: the same figures as DeepSpeed's offload estimates
    if stage == 2:
        off = model_states(P, P, L, num_gpus=gpus, zero_stage=2, offload_optimizer=True)
        assert abs(off.total - estimate_zero2_model_states_mem_needs(P, gpus, 1, cpu_offload=True)[1]) <= 1
        assert off.cpu_offload == pytest.approx(18 * P / gpus)
    else:
        for params in (False, True):
            off = model_states(P, P, L, num_gpus=gpus, zero_stage=3, offload_optimizer=True, offload_params=params)
            expected = estimate_zero3_model_states_mem_needs(P, L, gpus, 1, cpu_offload=True, cpu_offload_params=params)[1]
            assert abs(off.total - expected) <= 1


def test_adapters_by_hand(tmp_path, dims):
    """LoRA-8 on LLaMA-3.2-1B (attention targets, 1,703,936 params): the frozen base costs its bf16 weights only."""
    d = dims[ONE_B]
    P, L, T = d.total_params, d.largest_layer_params, 1_703_936
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name_or_path: {MODEL_CONFIGS / ONE_B}}}\nmethod: {{name: lora, rank: 8}}\n"
                    "compare: [{name: flexi, ranks: [2, 8], scaling: learned}]\n"
                    "task: {max_prompt_tokens: 100, max_target_tokens: 28}\n"
                    "training: {micro_batch_size: 2}\n"
                    "distribution: {num_workers: 2, gpus_per_worker: 1, zero_stage: 2, precision: bf16}\n")
    plan = plan_recipe(load_recipe(path, []))
    lora, flexi = plan.methods
    assert (lora.trainable_params, lora.total_params) == (T, P + T)
    s = lora.states  # ZeRO-2 over 2: bf16 weights replicated; 16-bit + fp32 grads, master + Adam halved
    assert s.params == 2 * (P + T)
    assert s.grads == (2 * T + 4 * T) / 2
    assert s.optimizer == (4 + 8) * T / 2
    assert flexi.trainable_params == T + 16 * 4 * 8  # learned γ: one per rank in each of 64 adapted layers
    # activations: 2 × 128 tokens × 16 layers × (10·2048 + 4·8192 + 2·512) × 2 bytes + logits 2 × 128 × V × 10 bytes
    assert lora.activations == 2 * 128 * 16 * (10 * 2048 + 4 * 8192 + 2 * 512) * 2 + 2 * 128 * 128_256 * 10

    z3 = plan_recipe(load_recipe(path, ["distribution.zero_stage=3", "distribution.num_workers=8"])).methods[0].states
    assert z3.params == 2 * (P + T) / 8 + 2 * L  # the frozen embedding gathered without a gradient
    assert z3.grads == 6 * T / 8 and z3.optimizer == 12 * T / 8
    ddp = plan_recipe(load_recipe(path, ["distribution.strategy=ddp", "distribution.precision=fp32"])).methods[0].states
    assert (ddp.params, ddp.grads, ddp.optimizer) == (4 * (P + T), 8 * T, 8 * T)  # fp32, DDP buckets, Adam
    # the recipe's offload keys reach the plan: the optimizer states leave the GPU
    off = plan_recipe(load_recipe(path, ["distribution.zero_stage=3", "distribution.num_workers=8",
                                         "distribution.offload_optimizer=cpu"]))
    assert off.offload_optimizer and not off.offload_params
    assert off.methods[0].states.optimizer == 0 < off.methods[0].states.cpu_offload


def test_deepspeed_buffers_count_the_reduce_bucket_and_zero3_resident_parameters(tmp_path, dims):
    """The bucket DeepSpeed allocates whole (capped at the trainable count by the worker), ZeRO-3's gathered
    parameters kept for reuse over several workers (none with one: DeepSpeed gathers nothing then); a
    deepspeed_config file's values are read."""
    d = dims[ONE_B]
    L, T = d.largest_layer_params, 1_703_936
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name_or_path: {MODEL_CONFIGS / ONE_B}}}\nmethod: {{name: lora, rank: 8}}\n"
                    "compare: [{name: full}]\n"
                    "task: {max_prompt_tokens: 100, max_target_tokens: 28}\n"
                    "training: {micro_batch_size: 2}\n"
                    "distribution: {num_workers: 2, gpus_per_worker: 1, zero_stage: 2, precision: bf16}\n")

    def buffers(*overrides, file=None):
        if file is not None:
            (tmp_path / "ds.json").write_text(json.dumps(file))
            overrides = (*overrides, f"distribution.deepspeed_config={tmp_path / 'ds.json'}")
        return [m.buffers for m in plan_recipe(load_recipe(path, list(overrides))).methods]

    lora, full = plan_recipe(load_recipe(path, [])).methods
    assert lora.buffers == {"reduce_bucket": 2 * T}  # bf16, one buffer (overlap_comm is off below ZeRO-3)
    assert full.buffers == {"reduce_bucket": 2 * 500_000_000}  # DeepSpeed's 5e8: fewer than P trainable elements
    assert lora.total == lora.states.total + 2 * T + lora.activations
    resident = 2 * (1_000_000_000 - L)  # stage3_max_reuse_distance, less the gathered layer the states count
    assert buffers("distribution.zero_stage=3") == [{"reduce_bucket": 2 * T, "resident_params": resident},
                                                    {"reduce_bucket": 2 * 500_000_000, "resident_params": resident}]
    one = ["distribution.zero_stage=3", "distribution.num_workers=1"]
    assert buffers(*one)[0] == {"reduce_bucket": 2 * T}  # one worker: the partition is the parameter
    assert buffers(*one, "distribution.offload_params=cpu")[0] == {"reduce_bucket": 2 * T, "resident_params": resident}
    assert buffers("distribution.zero_stage=1")[0] == {"reduce_bucket": 2 * T}  # bf16 under ZeRO-1 too
    assert buffers("distribution.precision=fp32")[0] == {"reduce_bucket": 4 * T}
    assert buffers(file={"zero_optimization": {"reduce_bucket_size": 1000, "overlap_comm": True}})[0] == {"reduce_bucket": 2 * 1000 * 2}
    assert buffers(file={"zero_optimization": {"reduce_bucket_size": 1000, "contiguous_gradients": False}})[0] == {}
    assert buffers("distribution.offload_optimizer=cpu", file={"zero_optimization": {"contiguous_gradients": False}})[0] == \
        {"reduce_bucket": 2 * T}  # CPU offload turns contiguous gradients back on
    assert buffers("distribution.zero_stage=3", file={"communication_data_type": "fp32",
                                                    "zero_optimization": {"max_reuse_distance": 3 * L}})[0] == \
        {"reduce_bucket": 4 * T, "resident_params": 2 * 2 * L}  # DeepSpeed takes the unprefixed name too
    ddp = plan_recipe(load_recipe(path, ["distribution.strategy=ddp", "distribution.precision=fp32"])).methods[0]
    assert ddp.buffers == {}


def test_gradient_checkpointing_keeps_block_inputs_only(dims):
    d = dims[ONE_B]
    full = activation_bytes(d, micro_batch=8, seq_len=512)
    ckpt = activation_bytes(d, micro_batch=8, seq_len=512, gradient_checkpointing=True)
    logits = 8 * 512 * 128_256 * 10
    per_layer = 8 * 512 * (10 * 2048 + 4 * 8192 + 2 * 512) * 2
    assert full == 16 * per_layer + logits
    assert ckpt == 16 * 8 * 512 * 2048 * 2 + per_layer + logits


def test_refused_offload_combinations():
    from flexi_workflows.errors import ConfigError

    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        model_states(10, 10, 1, num_gpus=1, zero_stage=2, offload_params=True)
    with pytest.raises(ConfigError, match="stage 1, 2 or 3"):
        model_states(10, 10, 1, num_gpus=1, zero_stage=0, offload_optimizer=True)


def test_hub_names_fall_back_to_shipped_configs():
    config, source = find_config("meta-llama/Llama-3.2-3B-Instruct")
    assert config.hidden_size == 3072 and "shipped config" in source


def _recipe_file(tmp_path, body: str = ""):
    path = tmp_path / "plan.yaml"
    path.write_text("model: {name_or_path: meta-llama/Llama-3.2-1B-Instruct, dtype: bfloat16}\n"
                    "method: {name: flexi, ranks: [2, 8]}\ncompare: [{name: full, lr: 2.0e-5}]\n"
                    "distribution: {num_workers: 2, gpus_per_worker: 1, zero_stage: 3, precision: bf16}\n"
                    "evaluation: {gpus_per_actor: 1}\n" + body)
    return path


def test_cli_prints_the_table_and_warns_when_too_small(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(GPU_MEMORY_ENV, raising=False)
    path = _recipe_file(tmp_path)
    assert main(["plan", str(path), "--gpu-memory-gib", "8"]) == 1
    out = capsys.readouterr().out
    for text in ("params (+ gathered layer)", "grads", "optimizer", "activations (rough)", "total per GPU",
                 "DeepSpeed's estimator", "training 2 × 1 GPU", "evaluation 1 × 1 GPU", "flexi-2-8", "full"):
        assert text in out, text
    assert "WARNING: full needs ~" in out and "8.00 GiB" in out

    assert main(["plan", str(path), "--gpu-memory-gib", "141"]) == 0
    out = capsys.readouterr().out
    assert "WARNING" not in out and "fits" in out

    assert main(["plan", str(path), "--method", "flexi-2-8", "--json", "training.micro_batch_size=1"]) in (0, 1)
    data = json.loads(capsys.readouterr().out)
    assert [m["label"] for m in data["methods"]] == ["flexi-2-8"] and data["micro_batch"] == 1

    monkeypatch.setenv(GPU_MEMORY_ENV, "141")
    assert main(["plan", str(path)]) == 0
    assert f"({GPU_MEMORY_ENV})" in capsys.readouterr().out


def test_cli_without_gpu_memory_says_it_cannot_check(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.delenv(GPU_MEMORY_ENV, raising=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: plan reads its memory")
    assert main(["plan", str(_recipe_file(tmp_path))]) == 0
    assert "cannot check the fit" in capsys.readouterr().out


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["plan", str(_recipe_file(tmp_path)), "distribution.zero_stage=7"]) == 2
    assert "zero_stage" in capsys.readouterr().err
    assert main(["plan", str(_recipe_file(tmp_path)), "--gpu-memory-gib", "-1"]) == 2
    assert main(["plan", str(_recipe_file(tmp_path)), "model.name_or_path=/no/such/model"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_run_warns_before_launch_only_when_gpu_memory_is_known(tmp_path, tiny_model_dir, caplog, monkeypatch):
    """prepare() (what `flexi run` calls before Ray starts) logs the plan's warning; no GPUs asked, no check."""
    from flexi_workflows.pipeline import prepare

    recipe = small_recipe(tmp_path, tiny_model_dir, overrides=["evaluation.gpus_per_actor=1"])
    monkeypatch.setenv(GPU_MEMORY_ENV, str(1024 / GiB))  # a 1 KiB "GPU": the tiny model's actor cannot fit
    # this machine has no GPU, which prepare() refuses for a GPU actor pool before it plans: as on a GPU machine
    monkeypatch.setattr("flexi_workflows.stages.train.check_resources", lambda recipe: None)
    with caplog.at_level(logging.WARNING, logger="flexi_workflows.memory"):
        prepare(recipe)
    assert any("evaluation needs ~" in r.getMessage() for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flexi_workflows.memory"):
        prepare(small_recipe(tmp_path / "cpu", tiny_model_dir))
    assert not caplog.records
