"""Ray Train + DeepSpeed on a real local Ray cluster: ZeRO-2/3 and DDP, every method, fault recovery (a failed
worker on two nodes: tests/test_multi_node.py)."""

from __future__ import annotations

import json

import pytest
import torch

from flexi_workflows.models.loading import load_model
from flexi_workflows.stages.evaluate import METRICS, run_eval
from flexi_workflows.stages.train import RANKS_USED, REPORT, run_train
from tests.helpers import score_and_route, small_recipe

pytestmark = pytest.mark.slow


def _losses(out):
    return [loss for _, loss in json.loads((out / REPORT).read_text())["loss_curve"]]


def _assert_learns(losses, steps_per_epoch=8):
    """Every epoch sees the same rows, so without learning the epoch means would be equal."""
    first = sum(losses[:steps_per_epoch]) / steps_per_epoch
    last = sum(losses[-steps_per_epoch:]) / steps_per_epoch
    assert last < first - 0.02, f"loss must go down: first epoch {first:.4f}, last {last:.4f}: {losses}"


def _train(tmp_path, model_dir, **sections):
    recipe = small_recipe(tmp_path, model_dir, **sections)
    if recipe.method.name == "flexi":
        score_and_route(recipe)
    return recipe, run_train(recipe, recipe.method).folder


TWO_WORKERS = {"num_workers": 2, "cpus_per_worker": 1}


@pytest.fixture(scope="module")
def zero2_flexi(tmp_path_factory, tiny_model_dir, ray_local):
    """Flexi under ZeRO-2 on two workers, 3 epochs at a constant learning rate: what ZeRO-3 must train to, and
    (its first 4 steps are those of a run of 4 steps) the reference for gradient checkpointing."""
    _, out = _train(tmp_path_factory.mktemp("zero2"), tiny_model_dir, distribution={**TWO_WORKERS, "zero_stage": 2},
                    training={"epochs": 3, "lr": 0.01})
    return out


def test_zero2_and_zero3_train_flexi_identically_on_two_workers(tmp_path, tiny_model_dir, zero2_flexi):
    """ZeRO-3 builds the model partitioned and, here, also recomputes activations in the backward pass
    (training.gradient_checkpointing): it trains to ZeRO-2's losses without either. (Checkpointing alone, to a
    tighter tolerance: test_gradient_checkpointing_trains_flexi_to_the_same_losses below.)"""
    out2 = zero2_flexi
    _, out3 = _train(tmp_path / "z3", tiny_model_dir, distribution={**TWO_WORKERS, "zero_stage": 3},
                     training={"epochs": 3, "lr": 0.01, "gradient_checkpointing": True})
    z2, z3 = _losses(out2), _losses(out3)
    assert len(z2) == 24  # 64 rows / 2 workers / micro-batch 4 = 8 steps per epoch, 3 epochs
    _assert_learns(z2)
    assert z2 == pytest.approx(z3, rel=1e-4, abs=1e-4)
    # ZeRO-3 loads the model already partitioned: right after the build each worker holds half of the base
    # model (each parameter split in two, the odd element padding it); ZeRO-2 holds all of it on every worker
    r3 = json.loads((out3 / REPORT).read_text())
    total, held = r3["param_elements_total"], r3["param_elements_held_by_worker"]
    model = load_model(tiny_model_dir)
    n_params = len(list(model.parameters()))
    assert total == sum(p.numel() for p in model.parameters())
    assert r3["partitioned_build"] is True and len(held) == 2
    assert all(total / 2 <= h <= total / 2 + n_params for h in held), (held, total)
    assert r3["gradient_checkpointing"] is True
    r2 = json.loads((out2 / REPORT).read_text())
    assert r2["partitioned_build"] is False and r2["param_elements_held_by_worker"] == [total, total]
    assert r2["gradient_checkpointing"] is False
    report = r2
    assert report["routing"]["rank_shares"]["2"] > 0 and report["routing"]["rank_shares"]["8"] > 0
    assert (out2 / "artifact" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def ddp_fp32(tmp_path_factory, tiny_model_dir, ray_local):
    """Flexi under DDP on two workers in fp32 (the CPU default): checked to learn, and the reference the
    bf16 run is compared with."""
    _, out = _train(tmp_path_factory.mktemp("ddp-fp32"), tiny_model_dir,
                    distribution={"num_workers": 2, "strategy": "ddp"}, training={"epochs": 3, "lr": 0.01})
    return out


def test_ddp_trains_flexi_on_two_workers(ddp_fp32):
    _assert_learns(_losses(ddp_fp32))
    assert json.loads((ddp_fp32 / REPORT).read_text())["precision"] == "fp32"


@pytest.mark.parametrize(
    "method,strategy",
    [
        ({"name": "full", "lr": 2e-5}, "deepspeed"),
        ({"name": "adalora", "rank": 4}, "ddp"),
        ({"name": "dylora_plus", "r_min": 1, "r_max": 8}, "deepspeed"),
        # dylora: trained and evaluated in tests/stages/test_baselines.py (one rank per optimizer step);
        # lora and flexi with DeepSpeed: in tests/test_pipeline.py (rank 4; ranks 2 and 8), and in every
        # other test here
    ],
)
def test_every_method_trains_and_evaluates(tmp_path, tiny_model_dir, ray_local, method, strategy):
    recipe, out = _train(tmp_path, tiny_model_dir, method=method, distribution={"strategy": strategy},
                         training={"max_steps": 4})
    report = json.loads((out / REPORT).read_text())
    assert report["steps"] == 4 and report["trainable_params"] > 0
    metrics = run_eval(recipe, recipe.method).read_json(METRICS)
    mini = metrics["datasets"]["mini"]
    assert mini["count"] == 12 and 0.0 <= mini["accuracy"] <= 1.0
    if method["name"] == "dylora_plus":
        assert 1 <= mini["mean_rank"] <= 8
    if method["name"] == "full":
        assert mini["mean_active_params"] == metrics["params"]["base_params"]
        # its own learning rate, not training.lr (0.01), is what the optimizer stepped with
        assert report["lr"] == 2e-5 and report["final_lr"] == pytest.approx(2e-5, rel=1e-9)
        assert not (out / RANKS_USED).exists(), "full fine-tuning has no ranks to record"
    if method["name"] == "adalora":
        assert 0 < mini["mean_active_params"]


def test_gradient_checkpointing_trains_flexi_to_the_same_losses(tmp_path, tiny_model_dir, zero2_flexi):
    """Under Ray Train + ZeRO-2 on two workers, with per-row ranks held through the backward recomputation:
    the losses of the module's ZeRO-2 run without checkpointing (a constant learning rate: its first 4 steps
    are those of a run of these 4 steps)."""
    _, ckpt = _train(tmp_path, tiny_model_dir, distribution={**TWO_WORKERS, "zero_stage": 2},
                     training={"max_steps": 4, "lr": 0.01, "gradient_checkpointing": True})
    plain = _losses(zero2_flexi)[:4]
    assert len(_losses(ckpt)) == 4
    assert _losses(ckpt) == pytest.approx(plain, rel=1e-5, abs=1e-6)
    assert json.loads((ckpt / REPORT).read_text())["gradient_checkpointing"] is True
    assert json.loads((zero2_flexi / REPORT).read_text())["gradient_checkpointing"] is False


def test_bf16_under_ddp_is_autocast_not_silently_fp32(tmp_path, tiny_model_dir, ddp_fp32):
    """precision: bf16 with DDP runs the forward under bf16 autocast (on CPU too): the losses move off the
    fp32 run's by bf16 rounding, stay close to them, and the report says how bf16 was applied. (A constant
    learning rate: the fp32 run's first steps are those of a run of these 4 steps.)"""
    _, bf16 = _train(tmp_path, tiny_model_dir, training={"max_steps": 4, "lr": 0.01},
                     distribution={"num_workers": 2, "strategy": "ddp", "precision": "bf16"})
    a, b = _losses(ddp_fp32)[:4], _losses(bf16)
    assert len(b) == 4
    assert b != a  # bf16 matmuls round differently: a run that ignored the setting would match exactly
    assert b == pytest.approx(a, rel=0.05)
    report = json.loads((bf16 / REPORT).read_text())
    assert (report["precision"], report["bf16_by"]) == ("bf16", "autocast")


def test_zero3_partitioned_build_resumes_after_a_failure_and_exports_the_adapter(tmp_path, tiny_model_dir, ray_local,
                                                                                monkeypatch):
    """Checkpoints of a partitioned ZeRO-3 run (every worker's partition) restore a restarted worker group."""
    marker = tmp_path / "failed-once"
    monkeypatch.setenv("FLEXI_TEST_FAIL_AT_STEP", f"6:{marker}")
    recipe = small_recipe(tmp_path, tiny_model_dir, method={"name": "lora", "rank": 4},
                          distribution={"num_workers": 2, "zero_stage": 3},
                          training={"epochs": 1, "checkpoint_every": 4, "max_failures": 1})
    out = run_train(recipe, recipe.method).folder
    assert marker.is_file(), "the injected failure fired"
    report = json.loads((out / REPORT).read_text())
    assert report["partitioned_build"] is True
    assert report["steps"] == report["total_steps"] == 8 and report["resumed_from_step"] == 4
    assert [s for s, _ in report["loss_curve"]] == list(range(1, 9))
    # the restored partitions (adapter, optimizer, schedule) continue exactly where the uninterrupted run goes
    monkeypatch.delenv("FLEXI_TEST_FAIL_AT_STEP")
    _, straight = _train(tmp_path / "straight", tiny_model_dir, method={"name": "lora", "rank": 4},
                         distribution={"num_workers": 2, "zero_stage": 3}, training={"epochs": 1})
    assert _losses(out) == pytest.approx(_losses(straight), rel=1e-5, abs=1e-6)
    from flexi_workflows.adapters.checkpoint import load_adapter

    adapter = load_adapter(load_model(tiny_model_dir), out / "artifact" / "adapter")
    assert any(float(layer.lora_B.abs().sum()) > 0 for _, layer in adapter.flexi_layers()), "the adapter trained"


def test_zero3_full_fine_tuning_with_cpu_offload_trains_as_without_and_exports_the_whole_model(
        tmp_path, tiny_model_dir, ray_local):
    """Offload moves optimizer state and parameters to CPU memory, not the update: the same losses. The whole
    model is gathered module by module onto rank 0 for the export."""
    dist = {"num_workers": 2, "zero_stage": 3}
    method, training = {"name": "full", "lr": 1e-3}, {"max_steps": 3}
    _, plain = _train(tmp_path / "plain", tiny_model_dir, method=method, training=training, distribution=dist)
    _, offload = _train(tmp_path / "offload", tiny_model_dir, method=method, training=training,
                        distribution={**dist, "offload_optimizer": "cpu", "offload_params": "cpu"})
    assert len(_losses(plain)) == 3 and _losses(offload) == pytest.approx(_losses(plain), rel=1e-6, abs=1e-7)
    base = dict(load_model(tiny_model_dir).named_parameters())
    trained = dict(load_model(offload / "artifact" / "model").named_parameters())
    assert set(trained) == set(base)
    assert all(trained[n].shape == base[n].shape for n in base)
    assert any(not torch.equal(trained[n], base[n]) for n in base), "the exported weights are the trained ones"


def test_eval_every_logs_a_val_curve_and_keeps_the_best_checkpoint(tmp_path, tiny_model_dir, ray_local, mlflow_server):
    """A learning rate high enough that the held-out loss rises again after step 3: the artifact holds
    step 3's weights (the checkpoint Ray Train kept by val_loss), not the last step's."""
    from mlflow.tracking import MlflowClient

    from flexi_workflows.stages.base import StageContext
    from flexi_workflows.tracking import Tracker

    recipe = small_recipe(tmp_path, tiny_model_dir, method={"name": "lora", "rank": 4},
                          training={"max_steps": 4, "lr": 0.3, "validation_rows": 8, "eval_every": 1,
                                    "final_artifact": "best"})
    run_id = Tracker(mlflow_server, "eval-every").start_run("train:lora-4")
    result = run_train(recipe, recipe.method, context=StageContext(mlflow_server, run_id))
    out = result.folder
    report = json.loads((out / REPORT).read_text())
    curve = report["val_loss_curve"]
    assert [s for s, _ in curve] == [1, 2, 3, 4]
    best_step, best = min(curve, key=lambda p: (p[1], p[0]))
    assert best_step < 4, f"the held-out loss should rise again before the last step: {curve}"
    assert (report["final_artifact"], report["artifact_step"], report["artifact_val_loss"]) == ("best", best_step, best)
    assert result.metrics["best_val_loss"] == best and result.metrics["artifact_step"] == best_step
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "val_loss")  # the curve, logged by the worker
    assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(v)) for s, v in curve]
    # the kept checkpoints: the best ones by val_loss and the latest; the artifact is the best step's export
    kept = {json.loads((c / "trainer_state.json").read_text())["step"]: c / "export"
            for c in (tmp_path / "out" / "ray_results" / f"lora-4-{result.fingerprint}").glob("checkpoint_*") if c.is_dir()}
    assert {best_step, 4} <= set(kept)
    files = sorted(p.relative_to(out / "artifact") for p in (out / "artifact").rglob("*") if p.is_file())
    assert files and all((out / "artifact" / f).read_bytes() == (kept[best_step] / f).read_bytes() for f in files)
    assert any((out / "artifact" / f).read_bytes() != (kept[4] / f).read_bytes() for f in files)
