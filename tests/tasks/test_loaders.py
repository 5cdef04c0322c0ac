"""Loaders on the real offline data in ../shared/data and on MRQA-format fixtures."""

from __future__ import annotations

import json

import pytest

from flexi_workflows.errors import ConfigError, DataError
from flexi_workflows.tasks import DataSource, get_task
from tests.conftest import REPO_ROOT, SHARED

MATH = SHARED / "data" / "math"
COUNTS = {
    "gsm8k_train.jsonl": 7473,
    "gsm8k_test.jsonl": 1319,
    "svamp_test.json": 1000,
    "multiarith_test.json": 600,
    "mawps_test.json": 238,
}
MRQA_FIXTURE = REPO_ROOT / "tests" / "assets" / "mrqa_tiny.jsonl"


@pytest.mark.parametrize("name,count", sorted(COUNTS.items()))
def test_every_shared_math_file_loads_with_its_row_count(name, count):
    rows = get_task("math").load(DataSource(path=str(MATH / name)))
    assert len(rows) == count
    assert len({r["id"] for r in rows}) == count
    for row in rows:
        assert len(row["answers"]) == 1 and float(row["answers"][0]) == float(row["answers"][0])


def test_gsm8k_gold_is_after_hashes_and_calculator_notes_are_dropped():
    rows = get_task("math").load(DataSource(path=str(MATH / "gsm8k_train.jsonl"), limit=3))
    first = json.loads((MATH / "gsm8k_train.jsonl").read_text().splitlines()[0])
    assert rows[0]["answers"] == [first["answer"].split("####")[-1].strip().replace(",", "")]
    assert "<<" not in rows[0]["target"] and rows[0]["target"].endswith(f"#### {rows[0]['answers'][0]}")
    assert len(rows) == 3


def test_llm_adapters_output_field_is_never_gold():
    raw = json.loads((MATH / "svamp_test.json").read_text())
    rows = get_task("math").load(DataSource(path=str(MATH / "svamp_test.json")))
    differs = 0
    for item, row in zip(raw, rows):
        assert float(row["answers"][0]) == pytest.approx(float(item["answer"]))
        assert item["output"] not in row["target"] or not item["output"]
        differs += item["output"].strip() != item["answer"].strip()
    assert differs > 0  # the fixture really has outputs that are not the gold
    mawps = get_task("math").load(DataSource(path=str(MATH / "mawps_test.json")))
    assert all(r["answers"][0] for r in mawps)  # MAWPS `output` is empty: gold comes from `answer`


def test_math_record_shapes_and_formats(tmp_path):
    records = [
        {"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
        {"instruction": "Half of 3?", "answer": "1.5", "output": "The answer is 7"},
        {"query": "3 times 3?", "response": "3*3=9. The answer is: 9", "type": "GSM_AnsAug"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "m.json").write_text(json.dumps(records))
    for name in ("m.jsonl", "m.json"):
        rows = get_task("math").load(DataSource(path=str(tmp_path / name)))
        assert [r["answers"][0] for r in rows] == ["4", "1.5", "9"]
        assert rows[0]["target"] == "2+2=4\n#### 4"


def test_mrqa_fixture_rows_and_scoring():
    task = get_task("qa")
    rows = task.load(DataSource(path=str(MRQA_FIXTURE)))
    assert [r["id"] for r in rows] == ["mrqa_tiny:q1", "mrqa_tiny:q2", "mrqa_tiny:q3"]
    assert rows[0]["answers"] == ["Paris", "in Paris"] and rows[0]["target"] == "Paris"
    assert rows[2]["target"] == "Nobel Prize"
    assert task.metrics("the Nobel prize", rows[2]) == {"f1": 1.0, "exact_match": 1.0}
    assert task.score("in the city of Paris", rows[0]) == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert "Context: The Eiffel Tower" in task.build_prompt(rows[0])


def test_prompt_uses_chat_template_when_the_tokenizer_has_one():
    class ChatTok:
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize, **template_kwargs):
            assert add_generation_prompt and not tokenize
            assert template_kwargs["date_string"] == "26 Jul 2024"
            return f"<user>{messages[0]['content']}</user><assistant>"

    row = {"question": "2+2?", "context": ""}
    task = get_task("math")
    assert task.build_prompt(row, ChatTok()) == "<user>Question: 2+2?</user><assistant>"
    assert task.build_prompt(row, None) == "Question: 2+2?\nAnswer:"


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b", "answer": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: malformed JSON"):
        get_task("math").load(DataSource(path=str(path)))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b"}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:2: missing field 'answer'"):
        get_task("math").load(DataSource(path=str(path)))
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"header": {}}\n{"context": "c", "qas": [{"qid": "1", "question": "q"}]}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:2: missing field 'answers'"):
        get_task("qa").load(DataSource(path=str(qa)))


def test_empty_dataset_and_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        get_task("math").load(DataSource(path=str(tmp_path / "e.jsonl")))
    (tmp_path / "h.jsonl").write_text('{"header": {"dataset": "x"}}\n')
    with pytest.raises(DataError, match="empty"):
        get_task("qa").load(DataSource(path=str(tmp_path / "h.jsonl")))
    with pytest.raises(DataError, match="no such file"):
        get_task("math").load(DataSource(path=str(tmp_path / "nope.jsonl")))


def test_unknown_task_and_offline_hub_name():
    with pytest.raises(ConfigError, match="registered tasks: arith, custom, math, qa, speech"):
        get_task("translation")
    with pytest.raises(DataError, match="give a local `path`"):
        get_task("math").load(DataSource(name="gsm8k", split="test"))


def test_arith_dev_split_shares_no_question_with_test_train_or_pretraining():
    """Design decisions are made on `dev`; it must not contain an evaluation or a training item."""
    from flexi_workflows.tasks import get_task
    from flexi_workflows.tasks.arith import generate
    from flexi_workflows.tasks.base import DataSource

    dev = {r["question"] for r in get_task("arith").load(DataSource(name="arith", split="dev"))}
    assert len(dev) == 400
    test = {r["question"] for r in generate("test")}
    assert not dev & test
    assert not dev & {r["question"] for r in generate("train", None, test)}
    assert not dev & {r["question"] for r in generate("pretrain", None, test)}
