"""`flexi export`: PEFT adapters per rank and merged weights that reload with the project's logits, a
router that reproduces the pipeline's ranks, and the README's command on a finished tiny run."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from flexi_workflows.cli import main
from flexi_workflows.export import export_merged, export_peft_ranks
from flexi_workflows.methods import get_method
from flexi_workflows.models.loading import load_model, load_tokenizer
from flexi_workflows.recipes.loader import build
from flexi_workflows.recipes.schema import MethodConfig
from tests.conftest import REPO_ROOT, randomize_lora
from tests.helpers import record_scores, small_recipe

PROMPTS = ["Question: What is 3 plus 4?", "Question: The zebra has 9 plus 8?\nAnswer:", "1+1="]


def _batch(model_dir: Path) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(str(model_dir))
    return dict(tokenizer(PROMPTS, return_tensors="pt", padding=True))


def _project_logits(model_dir: Path, method, artifact: Path, rank: int, batch) -> torch.Tensor:
    """The project's own model at `rank`: what evaluation loads (method.load) and runs with ranks=."""
    model = method.load(load_model(str(model_dir)), artifact)
    with torch.no_grad():
        return model(**batch, ranks=rank).logits


def _trained_artifact(tmp_path: Path, model_dir: Path, scaling: str):
    """A Flexi (2,8) adapter with non-zero B (and, for `learned`, γ moved off its initial α/r), saved the way
    the train stage saves it."""
    method = get_method(build(MethodConfig, {"name": "flexi", "ranks": [2, 8], "alpha": 12, "scaling": scaling,
                                             "dropout": 0.0}))
    model = method.build(load_model(str(model_dir)), seed=0, total_steps=1).model
    randomize_lora(model, seed=3, std=0.2)
    if scaling == "learned":
        with torch.no_grad():
            for _, layer in model.flexi_layers():
                layer.lora_gamma.mul_(torch.linspace(0.5, 1.5, layer.lora_gamma.numel()))
    method.export(model, tmp_path / "artifact")
    return method, tmp_path / "artifact"


@pytest.mark.parametrize("scaling", ["alpha_over_r", "alpha_over_sqrt_r", "learned", "constant"])
def test_peft_export_reloads_with_the_project_logits_at_every_rank(tmp_path, tiny_model_dir, scaling):
    from peft import PeftModel

    method, artifact = _trained_artifact(tmp_path, tiny_model_dir, scaling)
    folders = export_peft_ranks(str(tiny_model_dir), artifact / "adapter", [2, 8], tmp_path / "peft")
    batch = _batch(tiny_model_dir)
    base_logits = load_model(str(tiny_model_dir))(**batch).logits.detach()
    for rank, folder in folders.items():
        ours = _project_logits(tiny_model_dir, method, artifact, rank, batch)
        peft_model = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(folder)).eval()
        with torch.no_grad():
            theirs = peft_model(**batch).logits
        assert (ours - base_logits).abs().max() > 1e-3, "the adapter must change the output for the check to mean anything"
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == rank and config["base_model_name_or_path"] == str(tiny_model_dir)


@pytest.mark.parametrize("scaling", ["alpha_over_r", "learned"])
def test_merged_export_reloads_in_transformers_with_the_project_logits(tmp_path, tiny_model_dir, scaling):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method, artifact = _trained_artifact(tmp_path, tiny_model_dir, scaling)
    batch = _batch(tiny_model_dir)
    for rank in (2, 8):
        folder = export_merged(str(tiny_model_dir), artifact / "adapter", rank, tmp_path / f"merged-{rank}")
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        merged = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            theirs = merged(**batch).logits
        torch.testing.assert_close(theirs, _project_logits(tiny_model_dir, method, artifact, rank, batch),
                                   rtol=1e-5, atol=1e-5)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))  # the base's own tokenizer travels with the weights
        assert tokenizer("1+1=")["input_ids"] == AutoTokenizer.from_pretrained(str(tiny_model_dir))("1+1=")["input_ids"]


def test_serving_router_reproduces_the_pipelines_routing(tmp_path, tiny_model_dir):
    """The serving router (its own tokenizer copy, template, max_length) gives each question the class the
    pipeline's routing gives the row — with the embedding table read from the base or carried along."""
    from flexi_workflows.export import input_template
    from flexi_workflows.recipes.schema import DataSource
    from flexi_workflows.router.apply import route_rows, router_inputs
    from flexi_workflows.router.model import RankRouter, RouterSpec, save_router
    from flexi_workflows.router.serving import load_router, save_serving_router
    from flexi_workflows.tasks import get_task
    from tests.helpers import write_math_set

    rows = get_task("math").load(DataSource(path=str(write_math_set(tmp_path / "rows.jsonl", 40))))
    features, vocab = router_inputs("math", rows, str(tiny_model_dir), max_length=16)
    torch.manual_seed(0)
    router = RankRouter(RouterSpec(embed_dim=features.shape[1], vocab_size=vocab, class_names=["easy", "hard"],
                                   base_model=str(tiny_model_dir)))
    router.set_feature_stats(features)
    save_router(router, tmp_path / "router")
    expected_classes = route_rows("math", rows, tmp_path / "router", str(tiny_model_dir), max_length=16)
    assert 0 < expected_classes.mean() < 1, "a router that sends everything one way would prove nothing"
    expected = np.asarray([2, 8])[expected_classes].tolist()
    questions = [r["question"] for r in rows]
    for copy in (False, True):
        folder = save_serving_router(tmp_path / "router", tmp_path / f"serving-{copy}", class_ranks=[2, 8],
                                     base_model=str(tiny_model_dir), max_length=16,
                                     input_template=input_template("math"), copy_embeddings=copy)
        served = load_router(folder)
        assert served.route(questions) == expected
        assert served.route([{"question": q} for q in questions[:5]]) == expected[:5]
        assert served.ranks == [2, 8]
        assert (folder / "embeddings.safetensors").is_file() == copy


def _readme_section() -> str:
    return (REPO_ROOT / "README.md").read_text().split("## Export for serving", 1)[1].split("\n## ", 1)[0]


def _readme_export_command() -> str:
    section = _readme_section()
    commands = [line for line in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)[0].splitlines()
                if line.startswith(".venv/bin/flexi export")]
    assert len(commands) == 1, commands
    return commands[0].split("#")[0].strip()


@pytest.mark.slow
def test_readme_export_command_on_a_finished_tiny_run(tmp_path, tiny_model_dir, ray_local, monkeypatch, capsys):
    """One tiny pipeline (recorded scores, real route / train / eval), then the README's command verbatim, run
    where `outputs/quickstart` is that run: every exported piece reloads and agrees with the run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from flexi_workflows.pipeline import run_pipeline
    from flexi_workflows.router.serving import load_router
    from flexi_workflows.tasks import get_task

    recipe = small_recipe(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "outputs" / "quickstart"),
                          training={"max_steps": 2}, distribution={"strategy": "ddp"},
                          evaluation={"include_base": False})
    record_scores(recipe)
    summary = run_pipeline(recipe, quiet=True)
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(_readme_export_command())
    assert main(argv[1:]) == 0
    out = tmp_path / "outputs" / "quickstart" / "export"
    record = json.loads((out / "export.json").read_text())
    assert record["method"] == "flexi-2-8" and record["ranks"] == [2, 8]  # the Flexi method by default

    # the project's model at each rank vs the exported PEFT adapter and merged weights
    run = Path(recipe.output_dir)
    train = next((run / "train").glob("flexi-2-8-*"))
    method = get_method(recipe.method)
    batch = _batch(tiny_model_dir)
    for rank in (2, 8):
        ours = _project_logits(tiny_model_dir, method, train / "artifact", rank, batch)
        peft_model = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(out / "peft" / f"rank-{rank}")).eval()
        merged = AutoModelForCausalLM.from_pretrained(str(out / "merged" / f"rank-{rank}")).eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(**batch).logits, ours, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(merged(**batch).logits, ours, rtol=1e-5, atol=1e-5)

    # the exported router gives every eval row the rank the pipeline evaluated it at
    evaluated = pq.read_table(next((run / "eval").glob("flexi-2-8-*")) / "predictions" / "mini.parquet").to_pydict()
    rows = {r["id"]: r for r in get_task("math").load(recipe.task.eval[0])}
    questions = [rows[i]["question"] for i in evaluated["id"]]
    assert load_router(out / "router").route(questions) == evaluated["rank"]

    # the README's Python lines, as written: route a request, load its adapter and its merged weights
    snippet = re.findall(r"```python\n(.*?)```", _readme_section(), re.DOTALL)[0]
    scope: dict = {}
    exec(compile(snippet, "README.md (Export for serving)", "exec"), scope)  # noqa: S102 — the README is ours
    assert scope["ranks"][0] in (2, 8) and isinstance(scope["model"], PeftModel)

    card = (out / "README.md").read_text()
    flexi_row = next(r for r in summary["rows"] if r["method"] == "flexi-2-8")
    assert "| **flexi-2-8** | mini |" in card
    assert f"{flexi_row['mean_active_params']:,.1f}" in card or f"{int(flexi_row['mean_active_params']):,}" in card
    assert "## Recipe" in card and "name: flexi" in card

    # clear errors, exit status 2, nothing written
    capsys.readouterr()
    assert main(["export", "outputs/quickstart", "--rank", "5", "--out", "x"]) == 2
    assert "rank 5 is not one of flexi-2-8's ranks [2, 8]" in capsys.readouterr().err
    assert main(["export", "outputs/quickstart", "--all-ranks"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export", "outputs", "--all-ranks"]) == 2
    assert "no summary.json" in capsys.readouterr().err
    assert main(["export", "outputs/quickstart", "--method", "full", "--all-ranks", "--out", "x"]) == 2
    assert "is not in this run; it has: flexi-2-8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _fake_run(root: Path, methods: list[dict], model_dir: Path | None, summary_dir: Path | None = None) -> Path:
    """A run folder with only what `locate` reads: summary.json's stages, the stages' manifests, the adapter
    folder and (with `model_dir`) recipe.json naming the base model; `summary_dir` puts summary and recipe
    elsewhere, as a sweep trial's are."""
    stages = {}
    for i, config in enumerate(methods):
        method = get_method(build(MethodConfig, config))
        for kind, label in (("train", method.train_label), ("eval", method.label)):
            fp = f"{kind}{i:02d}"
            folder = root / kind / f"{label}-{fp}"
            (folder / "artifact" / "adapter").mkdir(parents=True, exist_ok=True)
            inputs = {"method": config, "model": {"digest": "x", "dtype": "float32"}, "task": {"name": "math"}}
            (folder / "manifest.json").write_text(json.dumps({"inputs": inputs}))
            stages[f"{kind}:{label}"] = {"fingerprint": fp, "folder": str(folder)}
    run = summary_dir or root
    run.mkdir(parents=True, exist_ok=True)
    (run / "summary.json").write_text(json.dumps({"stages": stages, "rows": []}))
    if model_dir is not None:
        (run / "recipe.json").write_text(json.dumps({"model": {"name_or_path": str(model_dir)}}))
    return run


def test_locate_picks_the_flexi_method_and_names_what_is_wrong(tmp_path, tiny_model_dir):
    from flexi_workflows.errors import ConfigError
    from flexi_workflows.export import locate

    lora = {"name": "lora", "rank": 8}
    oracle = {"name": "flexi", "ranks": [2, 8], "router": "oracle"}
    run = _fake_run(tmp_path / "a", [lora, oracle], tiny_model_dir)
    assert locate(run).label == "flexi-2-8-oracle"  # the only Flexi method, though it ships no router
    assert locate(run, "lora-8").export_ranks() == [8]
    run = _fake_run(tmp_path / "b", [{"name": "flexi", "ranks": [1, 8]}, {"name": "flexi", "ranks": [2, 8]}], tiny_model_dir)
    with pytest.raises(ConfigError, match=r"several Flexi-LoRA methods \(flexi-1-8, flexi-2-8\); name one with --method"):
        locate(run)
    run = _fake_run(tmp_path / "c", [lora, {"name": "full"}, {"name": "dylora", "r_min": 2, "r_max": 6}], tiny_model_dir)
    with pytest.raises(ConfigError, match=r"no trained Flexi-LoRA method in this run \(it has lora-8, full, dylora-2-6\)"):
        locate(run)
    with pytest.raises(ConfigError, match="full: only LoRA, DyLoRA, DyLoRA\\+ and Flexi-LoRA export .* already the whole model"):
        locate(run, "full")
    assert locate(run, "dylora-2-6").export_ranks() == [2, 3, 4, 5, 6]  # DyLoRA trains every rank of its range
    run = _fake_run(tmp_path / "d", [lora], None)
    with pytest.raises(ConfigError, match="does not record its base model .* --base-model"):
        locate(run, "lora-8")
    assert locate(run, "lora-8", base_model=str(tiny_model_dir)).base_model == str(tiny_model_dir)
    trial = _fake_run(tmp_path / "sweep", [oracle], tiny_model_dir, summary_dir=tmp_path / "sweep" / "trials" / "t0")
    found = locate(trial)  # a sweep trial: its summary in its own folder, its stages in the sweep's storage
    assert found.adapter_dir == tmp_path / "sweep" / "train" / "flexi-2-8-oracle-train00" / "artifact" / "adapter"
