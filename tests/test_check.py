"""`flexi check`: every check `flexi run` makes before work starts, run alone; it writes nothing."""

from __future__ import annotations

import os
import subprocess

import yaml

from flexi_workflows.cli import main
from tests.conftest import REPO_ROOT
from tests.helpers import small_recipe_data


def test_check_passes_a_good_recipe_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(small_recipe_data(tmp_path, tiny_model_dir)))
    assert main(["check", str(path), "tracking.enabled=true"]) == 0
    out = capsys.readouterr().out
    assert "r.yaml: OK — 5 stages; to run: score, route, eval:base, train:flexi-2-8, eval:flexi-2-8\n" in out
    assert not (tmp_path / "out").exists()


def test_check_names_the_bad_key_and_stage_commands_run_the_same_checks(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(small_recipe_data(tmp_path, tiny_model_dir)))
    for command in ("check", "score", "train"):
        assert main([command, str(path), "method.targets=[foo_proj]"]) == 2
        err = capsys.readouterr().err
        assert f"flexi {command}: error: method flexi-2-8: targets: target modules ['foo_proj']" in err, err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_readme_check_command_runs_verbatim():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "RAY_ADDRESS")}  # a newcomer's shell
    done = subprocess.run([".venv/bin/flexi", "check", "jobs/quickstart.yaml"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "jobs/quickstart.yaml: OK — " in done.stdout
