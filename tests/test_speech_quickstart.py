"""The README's speech quickstart command, verbatim: the built-in spoken corpus and tiny Whisper (built on
first use), then score → route → train → evaluate, with the WER table printed and recorded."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_speech_quickstart_command_runs_and_fine_tuning_teaches_the_other_part():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "RAY_ADDRESS")}  # as a newcomer's shell
    done = subprocess.run([".venv/bin/flexi", "run", "jobs/speech-quickstart.yaml"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wer clean  wer other   wer all" in done.stdout
    summary = json.loads((REPO_ROOT / "outputs" / "speech-quickstart" / "summary.json").read_text())
    base_eval = summary["base_model_eval"]  # recorded when the tiny Whisper was built: competent on clean only
    assert base_eval["wer_clean"] < 0.2 < 0.5 < base_eval["wer_other"]
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"base", "lora-8", "flexi-2-8"}
    assert rows["base"]["wer_other"] == pytest.approx(base_eval["wer_other"], abs=5e-5)  # the pipeline reproduces the record (4 decimals)
    for method in ("lora-8", "flexi-2-8"):
        assert rows[method]["wer_other"] < rows["base"]["wer_other"] - 0.1, method
        assert rows[method]["acc_all"] == pytest.approx(1 - rows[method]["wer_all"])
    flexi = rows["flexi-2-8"]
    assert flexi["high_rank_rate_other"] > 0.9 > 0.2 > flexi["high_rank_rate_clean"]  # other speech → rank 8
    assert flexi["mean_active_params"] < rows["lora-8"]["mean_active_params"]
