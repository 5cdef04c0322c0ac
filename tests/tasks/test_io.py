"""Data files that would parse wrongly or expensively are refused with file:line: bytes that are not
UTF-8, a line too long to be one example, and rows that share an id."""

from __future__ import annotations

import json

import pytest

from flexi_workflows.errors import DataError, FlexiError
from flexi_workflows.pipeline import check_unique_ids
from flexi_workflows.recipes.schema import DataSource
from flexi_workflows.tasks import get_task, io
from tests.conftest import REPO_ROOT


def test_bytes_that_are_not_utf8_name_the_line_and_column(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"question": "1+1?", "answer": "#### 2"}\n{"question": "caf\xe9?", "answer": "#### 3"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: not UTF-8 \(byte 0xe9 at column 18\); save the file as UTF-8"):
        list(io.iter_jsonl(path))
    listed = tmp_path / "test.json"
    listed.write_bytes(b'[\n  {"question": "1+1?"},\n  {"question": "\xff"}\n]\n')
    with pytest.raises(DataError, match=r"test\.json:3: not UTF-8 \(byte 0xff at column 17\)"):
        io.read_json_list(listed)


def test_a_line_too_long_to_be_one_example_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "MAX_LINE_BYTES", 64)
    path = tmp_path / "train.jsonl"
    short = json.dumps({"question": "1+1?", "answer": "#### 2"})
    path.write_text(short + "\n" + json.dumps({"question": "x" * 100, "answer": "#### 1"}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: a line longer than 0 MiB; one line is one example"):
        list(io.iter_jsonl(path))
    path.write_text((short + "\n") * 3)
    assert [n for n, _ in io.iter_jsonl(path)] == [1, 2, 3]


def test_rows_sharing_an_id_are_an_error_naming_it(tmp_path):
    line = (REPO_ROOT / "tests" / "assets" / "mrqa_tiny.jsonl").read_text().splitlines()[1]
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps({"header": {"dataset": "SQuAD"}}) + "\n" + line + "\n" + line + "\n")
    rows = get_task("qa").load(DataSource(path=str(path), split="test"))
    with pytest.raises(FlexiError, match=r"task\.eval\.0: rows 0 and \d+ have the same id 'dev:.+'; scores and predictions"):
        check_unique_ids(rows, "task.eval.0")
