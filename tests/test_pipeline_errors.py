"""Bad recipes fail with a clear error before Ray starts work (and leave no output behind)."""

from __future__ import annotations

import pytest

from flexi_workflows.cli import main
from flexi_workflows.errors import FlexiError
from flexi_workflows.pipeline import run_pipeline
from tests.helpers import small_recipe


@pytest.mark.parametrize(
    "override,message",
    [
        ("distribution.zero_stage=4", "zero_stage must be 0, 1, 2 or 3"),
        ("method.ranks=[8, 2]", "strictly increasing"),
        ("training.epochs=two", "training.epochs must be an integer"),
        ("distribution.num_workers=8", "needs 8 CPUs but only"),
        ("distribution.gpus_per_worker=1", "GPUs but 0 are available"),
        ("scoring.gpus_per_actor=1", "scoring.num_actors=1 × gpus_per_actor=1 needs 1 GPUs but 0 are available"),
        ("evaluation.num_actors=3", "evaluation.num_actors=3 × cpus_per_actor=1 needs 3 CPUs but only 2"),
        ("task.train.path=/no/such/train.jsonl", "no such file"),
        ("tracking.tracking_uri=http://127.0.0.1:9", "cannot be reached"),
        ("traning.epochs=2", "did you mean 'training'"),
        ("method.name=adalora", "AdaLoRA's update_and_allocate"),
        ("tracking.tracking_uri=sqlite:////proc/nope/x.db", "/proc is not writable .*, so the MLflow database cannot be created"),
        ("method.targets=[foo_proj]", r"method flexi-2-8: targets: target modules \['foo_proj'\] match no linear layer"),
    ],
)
def test_bad_recipe_fails_before_ray(tmp_path, tiny_model_dir, override, message):
    with pytest.raises(FlexiError, match=message):
        extra = ["method={name: adalora, rank: 4}"] if override == "method.name=adalora" else [override]
        recipe = small_recipe(tmp_path, tiny_model_dir, overrides=[*extra, "tracking.enabled=true"])
        run_pipeline(recipe)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_recipe_without_traceback(tmp_path, tiny_model_dir, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\ndistribution: {zero_stage: 5}\n")
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "r.yaml" in err and "zero_stage" in err and "Traceback" not in err
    good = tmp_path / "good.yaml"
    good.write_text(f"name: x\nmodel: {{name_or_path: {tiny_model_dir}}}\nmethod: {{name: lora, rank: 4}}\n")
    assert main(["train", str(good), "--method", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--method 'nope' is not in this recipe; it has: lora-4" in err


def test_a_second_run_on_one_output_dir_is_refused_naming_the_first(tmp_path, tiny_model_dir):
    from flexi_workflows.pipeline import prepare
    from flexi_workflows.stages.base import exclusive_run, recipe_storage

    recipe = small_recipe(tmp_path, tiny_model_dir)
    held = r"out is in use by `.*` \(pid \d+ on .+, since .+\); wait for that run"
    with exclusive_run(recipe_storage(prepare(recipe))), pytest.raises(FlexiError, match=held):
        run_pipeline(recipe)


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from flexi_workflows.stages.base import exclusive_run
    from flexi_workflows.storage import Storage
    from tests.conftest import REPO_ROOT

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from flexi_workflows.stages.base import exclusive_run; "
        "from flexi_workflows.storage import Storage\n"
        f"with exclusive_run(Storage({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(120)")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FlexiError, match="is in use by"), exclusive_run(Storage(tmp_path)):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 10
    with exclusive_run(Storage(tmp_path)):  # the kernel dropped the dead holder's lock
        assert time.time() < deadline


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"model\.safetensors is not a whole safetensors file \(its tensors need [\d,]+ bytes, the file has"),
    ("no-tokenizer", r"tokenizer for .* could not be loaded"),
])
def test_a_damaged_model_folder_is_named_before_ray(tmp_path, tiny_model_dir, damage, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    if damage == "truncate":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        for file in model.glob("tokenizer*"):
            file.unlink()
    with pytest.raises(FlexiError, match=message):
        run_pipeline(small_recipe(tmp_path, model))
    assert not (tmp_path / "out").exists()
