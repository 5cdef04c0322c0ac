"""MetaMathQA: the paper trains math on its GSM8K subset (types GSM_AnsAug, GSM_Rephrased, GSM_SV,
GSM_FOBAR), with the gold answer after the response's final "The answer is:"."""

from __future__ import annotations

import json

import pytest

from flexi_workflows.errors import DataError
from flexi_workflows.recipes.schema import DataSource
from flexi_workflows.tasks import get_task, subset_counts
from flexi_workflows.tasks.math import METAMATH_GSM_TYPES, metamath_answer
from tests.conftest import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "assets" / "metamathqa_tiny.json"  # 6 GSM rows (4 types) + 2 MATH rows


def _load(**kw):
    return get_task("math").load(DataSource(name="metamathqa", path=str(FIXTURE), **kw))


def test_a_local_copy_keeps_the_gsm8k_types_only():
    rows = _load()
    assert subset_counts(rows) == {"GSM_AnsAug": 2, "GSM_FOBAR": 1, "GSM_Rephrased": 2, "GSM_SV": 1}
    assert set(METAMATH_GSM_TYPES) == {"GSM_AnsAug", "GSM_Rephrased", "GSM_SV", "GSM_FOBAR"}
    assert all(r["source"] == "metamathqa" for r in rows)


def test_gold_is_the_number_after_the_final_the_answer_is():
    rows = _load(selection="first")
    assert [r["answers"][0] for r in rows] == ["72", "10", "5", "6000", "2", "10.5"]
    first = rows[0]
    assert first["target"].endswith("72 clips altogether in April and May.\n#### 72"), first["target"]
    assert first["target"].count("####") == 1, "a repeated GSM8K '#### N' line is not kept twice"
    assert "The answer is" not in first["target"]
    # the earlier "The answer is the sum…" sentence is reasoning, not the answer
    assert "The answer is the sum over workers." in rows[3]["target"] and rows[3]["target"].endswith("#### 6000")
    assert get_task("math").score("... so the total is #### 6000", rows[3]) == 1.0


def test_metamath_answer_split():
    assert metamath_answer("a\nb\nThe answer is: 18") == ("a\nb", "18")
    assert metamath_answer("The answer is 3. Check: The answer is: 4") == ("The answer is 3. Check:", "4")
    assert metamath_answer("no final line") is None


def test_other_types_by_name_and_a_non_numeric_answer_is_an_error_naming_the_item():
    rows = _load(subsets=["MATH_Rephrased"])
    assert [r["answers"][0] for r in rows] == ["4"]
    with pytest.raises(DataError, match=r"metamathqa_tiny\.json item 6: MetaMathQA answer '\\\\frac\{5\}\{6\}' is not a number"):
        _load(subsets=["MATH_AnsAug"])


def test_limit_shares_rows_among_the_types():
    counts = subset_counts(_load(limit=4))
    assert counts == {t: 1 for t in METAMATH_GSM_TYPES}


def test_hub_name_filters_the_same_way(monkeypatch):
    records = json.loads(FIXTURE.read_text())
    seen = {}

    def fake(name, config, split):
        seen.update(name=name, split=split)
        return iter(records)

    from flexi_workflows.tasks import hub

    monkeypatch.setattr(hub, "load_hub_dataset", fake)
    rows = get_task("math").load(DataSource(name="metamathqa", split="train"))
    assert seen == {"name": "meta-math/MetaMathQA", "split": "train"}
    assert subset_counts(rows) == {"GSM_AnsAug": 2, "GSM_FOBAR": 1, "GSM_Rephrased": 2, "GSM_SV": 1}
