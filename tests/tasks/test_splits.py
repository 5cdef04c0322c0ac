"""The shared MultiArith (600) and MAWPS (238) files are LLM-Adapters' copies, not the paper's splits
(180 and 355 items): they are labelled as such, and other splits are read by name or path."""

from __future__ import annotations

import json

import pytest

from flexi_workflows.recipes.schema import DataSource
from flexi_workflows.tasks import get_task
from flexi_workflows.tasks.math import dataset_note
from tests.conftest import SHARED

MATH = SHARED / "data" / "math"


def _note(source: DataSource) -> str | None:
    task = get_task("math")
    return task.note(source, len(task.load(source)))


def test_the_shared_copies_are_labelled_with_what_they_are():
    assert _note(DataSource(name="multiarith", path=str(MATH / "multiarith_test.json"))) == \
        "MultiArith (LLM-Adapters copy, 600 items; not the paper's 180-item split)"
    assert _note(DataSource(name="mawps", path=str(MATH / "mawps_test.json"))) == \
        "MAWPS (LLM-Adapters copy, 238 items; not the paper's 355-item split)"
    # recognised by path too (LLM-Adapters names its files dataset/MultiArith/test.json)
    assert dataset_note(DataSource(path="/data/LLM-Adapters/dataset/MultiArith/test.json"), 600).startswith("MultiArith")
    assert _note(DataSource(name="svamp", path=str(MATH / "svamp_test.json"))) is None
    assert get_task("qa").note(DataSource(name="mawps", path="x.jsonl"), 238) is None, "a math-only label"


def test_the_papers_split_sizes_need_no_label_and_other_sizes_say_so():
    assert dataset_note(DataSource(name="multiarith", path="m.json"), 180) is None
    assert dataset_note(DataSource(name="MAWPS", path="m.json"), 355) is None
    assert dataset_note(DataSource(name="multiarith", split="test"), 420) == \
        "MultiArith (420 items; not the paper's 180-item split)"
    assert dataset_note(DataSource(name="multiarith", path="m.json", note="my split"), 600) == "my split"


def test_other_splits_load_by_path_in_their_own_shapes(tmp_path):
    chilled = [{"question": f"Tom has {i} apples and buys 2. How many?", "final_ans": str(i + 2)} for i in range(180)]
    (tmp_path / "multiarith_180.json").write_text(json.dumps(chilled))
    source = DataSource(name="multiarith", path=str(tmp_path / "multiarith_180.json"))
    rows = get_task("math").load(source)
    assert len(rows) == 180 and rows[3]["answers"] == ["5"] and rows[3]["target"] == "#### 5"
    assert _note(source) is None
    svamp = [{"Body": "Ann has 3 pens.", "Question": "How many pens after buying 4?", "Answer": 7.0}]
    (tmp_path / "svamp.json").write_text(json.dumps(svamp))
    (row,) = get_task("math").load(DataSource(path=str(tmp_path / "svamp.json")))
    assert row["question"] == "Ann has 3 pens. How many pens after buying 4?" and row["answers"] == ["7"]
    plain = [{"question": "2+2?", "answer": 4}, {"question": "1,000+1?", "answer": "1,001"}]
    (tmp_path / "plain.jsonl").write_text("\n".join(json.dumps(r) for r in plain) + "\n")
    assert [r["answers"][0] for r in get_task("math").load(DataSource(path=str(tmp_path / "plain.jsonl")))] == ["4", "1001"]


def test_a_split_by_hub_name(monkeypatch):
    seen = {}

    def fake(name, config, split):
        seen.update(name=name, split=split)
        return iter([{"question": "3 and 4 more?", "final_ans": "7"}] * 180)

    from flexi_workflows.tasks import hub

    monkeypatch.setattr(hub, "load_hub_dataset", fake)
    source = DataSource(name="multiarith", split="test")
    assert len(get_task("math").load(source)) == 180 and seen == {"name": "ChilleD/MultiArith", "split": "test"}
    assert _note(source) is None


@pytest.mark.parametrize("name", ["gsm8k_test.jsonl", "svamp_test.json"])
def test_unrelated_sets_have_no_note(name):
    assert _note(DataSource(path=str(MATH / name))) is None
