"""The pipeline's summary rows (pipeline.summary_rows) on recorded eval results, without running stages."""

from __future__ import annotations

import json

from flexi_workflows.pipeline import dataset_notes, print_table, summary_rows
from flexi_workflows.stages.base import StageResult
from flexi_workflows.stages.plan import plan_pipeline
from flexi_workflows.storage import Storage
from tests.conftest import SHARED
from tests.helpers import small_recipe

MATH = SHARED / "data" / "math"


def _recorded(stage, folder, datasets: dict[str, int]) -> StageResult:
    folder.mkdir(parents=True)
    metrics = {"method": stage.label, "ranks": [], "params": {"base_params": 1000, "lora8_params": 100},
               "datasets": {name: {"accuracy": 0.5, "count": count, "mean_active_params": 10}
                            for name, count in datasets.items()}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return StageResult(stage.kind, stage.label, stage.fingerprint, Storage(folder.parent), folder.name, {"metrics": {}},
                       cached=True)


def test_summary_rows_carry_the_note_of_a_set_that_is_not_the_papers_split(tmp_path, tiny_model_dir, capsys):
    evals = [{"name": "mini", "path": str(tmp_path / "eval.jsonl")},
             {"name": "multiarith", "path": str(MATH / "multiarith_test.json")},
             {"name": "mawps", "path": str(MATH / "mawps_test.json"), "note": "our own remark"}]
    recipe = small_recipe(tmp_path, tiny_model_dir, method={"name": "lora", "rank": 4}, task={"eval": evals})
    plan = plan_pipeline(recipe)
    counts = {"mini": 12, "multiarith": 600, "mawps": 238}
    results = {s.name: _recorded(s, tmp_path / "rec" / s.name.replace(":", "_"), counts)
               for s in (plan.base_eval, plan.methods[0].eval)}
    rows, metric = summary_rows(plan, results)
    notes = {(r["method"], r["dataset"]): r["note"] for r in rows}
    assert notes[("lora-4", "multiarith")] == "MultiArith (LLM-Adapters copy, 600 items; not the paper's 180-item split)"
    assert notes[("base", "mawps")] == "our own remark"
    assert notes[("lora-4", "mini")] is None
    assert dataset_notes(rows) == {"multiarith": notes[("lora-4", "multiarith")], "mawps": "our own remark"}
    print_table(rows, metric, None)
    assert "multiarith: MultiArith (LLM-Adapters copy, 600 items" in capsys.readouterr().out
