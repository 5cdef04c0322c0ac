"""Which rows a data source's `limit` keeps: a multi-subset set (MRQA's six training sets) is mixed,
never cut after its first subset, and the mix is recorded."""

from __future__ import annotations

from collections import Counter

import pytest

from flexi_workflows.errors import ConfigError, DataError
from flexi_workflows.recipes.loader import build
from flexi_workflows.recipes.schema import DataSource, Recipe
from flexi_workflows.tasks import get_task, subset_counts
from flexi_workflows.tasks.base import select_rows, subset_quotas
from tests.conftest import REPO_ROOT

SIX = REPO_ROOT / "tests" / "assets" / "mrqa_six"  # 10 questions each, NaturalQuestions 3; HotpotQA gzipped
SIX_SETS = ("HotpotQA", "NaturalQuestions", "NewsQA", "SQuAD", "SearchQA", "TriviaQA")


def _load(**kw):
    return get_task("qa").load(DataSource(path=str(SIX), **kw))


def test_a_folder_of_mrqa_files_loads_every_subset_including_gzipped_ones():
    rows = _load()
    assert subset_counts(rows) == {"HotpotQA": 10, "NaturalQuestions": 3, "NewsQA": 10, "SQuAD": 10,
                                   "SearchQA": 10, "TriviaQA": 10}
    assert len({r["id"] for r in rows}) == len(rows) == 53
    assert {r["source"] for r in rows} == {"mrqa_six"}
    hotpot = next(r for r in rows if r["subset"] == "HotpotQA")
    assert hotpot["target"] in hotpot["context"]


def test_limit_gives_every_subset_its_share():
    rows = _load(limit=30)  # default selection: auto → per_subset, since the rows come from six subsets
    counts = subset_counts(rows)
    assert sorted(counts) == sorted(SIX_SETS)
    assert counts["NaturalQuestions"] == 3, "a subset smaller than its share gives all it has"
    others = [counts[s] for s in SIX_SETS if s != "NaturalQuestions"]
    assert sum(others) == 27 and max(others) - min(others) <= 1, counts
    assert len(rows) == 30
    # interleaved, not blocks: training reads rows in this order
    first_half = {r["subset"] for r in rows[:15]}
    assert len(first_half) >= 4


def test_even_shares_when_every_subset_is_large_enough():
    counts = subset_counts(_load(limit=12, subsets=[s for s in SIX_SETS if s != "NaturalQuestions"]))
    assert counts == {"HotpotQA": 2, "NewsQA": 2, "SQuAD": 2, "SearchQA": 3, "TriviaQA": 3}
    counts = subset_counts(_load(limit=18))
    assert set(counts.values()) == {3}


def test_the_draw_is_seeded():
    ids = [r["id"] for r in _load(limit=20)]
    assert ids == [r["id"] for r in _load(limit=20)], "same seed, same rows in the same order"
    assert ids != [r["id"] for r in _load(limit=20, seed=1)]


def test_first_keeps_file_order_and_shuffle_mixes():
    first = _load(limit=12, selection="first")
    assert [r["subset"] for r in first] == ["HotpotQA"] * 10 + ["NaturalQuestions"] * 2, \
        "selection: first is the old behaviour — the first rows of the first files only"
    shuffled = _load(limit=20, selection="shuffle")
    assert len(shuffled) == 20 and len(subset_counts(shuffled)) > 2


def test_subsets_filter_and_a_missing_subset_is_named():
    rows = _load(subsets=["SQuAD", "NewsQA"])
    assert subset_counts(rows) == {"NewsQA": 10, "SQuAD": 10}
    with pytest.raises(DataError, match=r"subsets \['BioASQ'\] have no rows here .*SQuAD"):
        _load(subsets=["SQuAD", "BioASQ"])


def test_hub_mrqa_split_ordered_by_subset_is_mixed_under_limit(monkeypatch):
    """The recipes' `{name: mrqa, split: train, limit: N}`: the hub split lists SQuAD first."""
    hub_rows = [
        {"subset": subset, "qid": f"{subset}-{i}", "question": f"q{i}?", "context": "a b c", "answers": ["b"],
         "detected_answers": {"text": ["b"]}}
        for subset in ("SQuAD", "NewsQA", "TriviaQA", "SearchQA", "HotpotQA", "NaturalQuestions") for i in range(40)
    ]
    from flexi_workflows.tasks import hub

    monkeypatch.setattr(hub, "load_hub_dataset", lambda name, config, split: iter(hub_rows))
    rows = get_task("qa").load(DataSource(name="mrqa", split="train", limit=60))
    assert subset_counts(rows) == {s: 10 for s in SIX_SETS}
    first = get_task("qa").load(DataSource(name="mrqa", split="train", limit=60, selection="first"))
    assert subset_counts(first) == {"NewsQA": 20, "SQuAD": 40}


def test_a_hub_dataset_is_selected_from_its_subset_column_with_the_same_rows(monkeypatch):
    """With a real datasets.Dataset only the chosen rows are converted — and they are the rows (in the
    order) that reading every row and selecting afterwards gives."""
    import datasets

    from flexi_workflows.tasks import hub

    hub_rows = [
        {"subset": subset, "qid": f"{subset}-{i}", "question": f"q{i}?", "context": f"{subset} {i}", "answers": ["b"],
         "detected_answers": {"text": ["b"]}}
        for subset in ("SQuAD", "NewsQA", "TriviaQA", "SearchQA", "HotpotQA", "NaturalQuestions") for i in range(7)
    ]
    table = datasets.Dataset.from_list(hub_rows)
    converted = []
    original_select = datasets.Dataset.select

    def counting_select(self, indices, *args, **kwargs):
        converted.extend(indices)
        return original_select(self, indices, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "select", counting_select)
    for kw in ({"limit": 20}, {"limit": 20, "selection": "shuffle", "seed": 3}, {"subsets": ["NewsQA", "SQuAD"]},
               {"limit": 5, "selection": "first"}):
        monkeypatch.setattr(hub, "load_hub_dataset", lambda name, config, split: table)
        converted.clear()
        fast = get_task("qa").load(DataSource(name="mrqa", split="train", **kw))
        monkeypatch.setattr(hub, "load_hub_dataset", lambda name, config, split: iter(hub_rows))
        slow = get_task("qa").load(DataSource(name="mrqa", split="train", **kw))
        assert [r["id"] for r in fast] == [r["id"] for r in slow], kw
        assert fast == slow
        if kw.get("selection") != "first":
            assert len(converted) == len(fast), "only the selected rows are read"
    monkeypatch.setattr(hub, "load_hub_dataset", lambda name, config, split: table)
    rows = get_task("qa").load(DataSource(name="NewsQA", split="train", limit=3))
    assert [r["id"] for r in rows] == ["NewsQA:NewsQA-0", "NewsQA:NewsQA-1", "NewsQA:NewsQA-2"]
    assert subset_counts(get_task("qa").load(DataSource(name="mrqa", split="train", limit=60))) == {s: 7 for s in SIX_SETS}


def test_single_subset_sources_keep_their_first_rows():
    rows = [{"id": str(i), "source": "gsm8k"} for i in range(10)]
    assert [r["id"] for r in select_rows(rows, DataSource(path="x.jsonl", limit=4))] == ["0", "1", "2", "3"]


def test_quotas():
    assert subset_quotas({"a": 100, "b": 100, "c": 100}, 10) == {"a": 3, "b": 3, "c": 4}
    assert subset_quotas({"a": 1, "b": 100, "c": 100}, 10) == {"a": 1, "b": 4, "c": 5}
    assert subset_quotas({"a": 2, "b": 3}, 10) == {"a": 2, "b": 3}
    assert sum(subset_quotas({str(i): 7 + i for i in range(6)}, 31).values()) == 31


def test_bad_selection_keys_are_config_errors_naming_the_key(tmp_path):
    def base():
        return {"task": {"name": "qa", "train": {"path": str(SIX)}}}

    with pytest.raises(ConfigError, match=r"task\.train\.selection must be one of"):
        build(Recipe, base(), overrides=["task.train.selection=random"])
    with pytest.raises(ConfigError, match=r"task\.train.*seed must be ≥ 0"):
        build(Recipe, base(), overrides=["task.train.seed=-1"])
    with pytest.raises(ConfigError, match=r"task\.train.*subsets must list distinct"):
        build(Recipe, base(), overrides=["task.train.subsets=[]"])


def test_score_and_train_stages_record_rows_per_subset(tmp_path, tiny_model_dir):
    from flexi_workflows.methods import get_method
    from flexi_workflows.recipes.schema import LoraConfig
    from flexi_workflows.stages.score import build_scored_table
    from flexi_workflows.stages.train import training_examples

    recipe = build(Recipe, {"output_dir": str(tmp_path / "out"), "model": {"name_or_path": str(tiny_model_dir)},
                            "task": {"name": "qa", "train": {"path": str(SIX), "limit": 18}}})
    rows = get_task("qa").load(recipe.task.train)
    outputs = {r["id"]: {"prompt": "p", "prediction": r["target"] if r["subset"] == "SQuAD" else "no"} for r in rows}
    table, stats = build_scored_table(rows, outputs, recipe)
    assert {k: v["rows"] for k, v in stats["subsets"].items()} == {s: 3 for s in SIX_SETS}
    assert stats["subsets"]["SQuAD"]["mean_score"] == 1.0 and stats["subsets"]["SQuAD"]["class_counts"] == [3, 0]
    assert stats["subsets"]["NewsQA"]["class_counts"] == [0, 3]
    assert Counter(table.column("subset").to_pylist()) == {s: 3 for s in SIX_SETS}
    _, info = training_examples(recipe, get_method(LoraConfig(rank=2)), None)
    assert info["subsets"] == {s: 3 for s in SIX_SETS}
