"""Math word problems: GSM8K, MetaMathQA (GSM subset), SVAMP, MultiArith, MAWPS.

Local files in any of three record shapes, as JSONL or one JSON list, are recognised by their fields:

    {"question", "answer": "...reasoning... #### 72"}        GSM8K
    {"instruction", "answer": "8.0", "output": ...}          LLM-Adapters eval copies (SVAMP, ...)
    {"query", "response": "... The answer is: 18", "type"}   MetaMathQA

The LLM-Adapters `output` field is some model's generated text, often wrong: it is never read.
Hub names (for users with internet): openai/gsm8k, meta-math/MetaMathQA (GSM types only).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flexi_workflows.errors import DataError
from flexi_workflows.metrics import extract_number, math_correct, parse_number
from flexi_workflows.tasks.base import DataSource, Row, Task
from flexi_workflows.tasks.io import iter_jsonl, read_json_list, require

_CALCULATOR = re.compile(r"<<[^>]*>>")
_METAMATH_ANSWER = re.compile(r"The answer is:?\s*(.+?)\s*$", re.DOTALL)
HUB_ALIASES = {"gsm8k": "openai/gsm8k", "metamathqa": "meta-math/MetaMathQA"}


def _gold_string(value: Any, where: str) -> str:
    number = value if isinstance(value, (int, float)) else parse_number(str(value).strip())
    if number is None:
        raise DataError(f"{where}: gold answer {value!r} is not a number")
    return repr(float(number)) if not float(number).is_integer() else str(int(number))


def _gsm8k_row(obj: dict, where: str, rid: str) -> Row:
    question = require(obj, "question", where)
    answer = require(obj, "answer", where)
    if "####" not in answer:
        raise DataError(f"{where}: GSM8K answer has no '#### N' line")
    reasoning, _, final = answer.rpartition("####")
    gold = _gold_string(final.strip(), where)
    target = _CALCULATOR.sub("", reasoning).strip()
    return {"id": rid, "question": question.strip(), "context": "", "answers": [gold],
            "target": f"{target}\n#### {gold}" if target else f"#### {gold}"}


def _adapters_row(obj: dict, where: str, rid: str) -> Row:
    question = require(obj, "instruction", where)
    gold = _gold_string(require(obj, "answer", where, (str, int, float)), where)
    return {"id": rid, "question": question.strip(), "context": "", "answers": [gold], "target": f"#### {gold}"}


def _metamath_row(obj: dict, where: str, rid: str) -> Row:
    query = require(obj, "query", where)
    response = require(obj, "response", where)
    match = _METAMATH_ANSWER.search(response)
    number = extract_number(match.group(1)) if match else None
    if number is None:
        raise DataError(f"{where}: MetaMathQA response has no 'The answer is: N'")
    gold = _gold_string(number, where)
    reasoning = response[: match.start()].strip()
    return {"id": rid, "question": query.strip(), "context": "", "answers": [gold],
            "target": f"{reasoning}\n#### {gold}" if reasoning else f"#### {gold}"}


def parse_math_record(obj: dict, where: str, rid: str) -> Row:
    if "query" in obj and "response" in obj:
        return _metamath_row(obj, where, rid)
    if "instruction" in obj:
        return _adapters_row(obj, where, rid)
    if "question" in obj:
        return _gsm8k_row(obj, where, rid)
    raise DataError(
        f"{where}: not a math record: expected fields question+answer (GSM8K), instruction+answer "
        f"(LLM-Adapters) or query+response (MetaMathQA); got {', '.join(sorted(obj)) or 'nothing'}"
    )


class MathTask(Task):
    name = "math"
    metric = "accuracy"
    plain_template = "Question: {question}"

    def _load(self, source: DataSource) -> list[Row]:
        label = source.label
        if source.path:
            path = Path(source.path)
            if path.suffix == ".jsonl":
                records = ((f"{path}:{n}", obj) for n, obj in iter_jsonl(path))
            else:
                records = ((f"{path} item {i}", obj) for i, obj in read_json_list(path))
            rows = []
            for i, (where, obj) in enumerate(records):
                row = parse_math_record(obj, where, f"{label}:{i}")
                rows.append({**row, "source": label})
                if source.stops_at_limit and len(rows) >= source.limit:
                    break
            return rows
        return self._load_hub(source, label)

    def _load_hub(self, source: DataSource, label: str) -> list[Row]:
        from flexi_workflows.tasks.hub import load_hub_dataset

        name = HUB_ALIASES.get(source.name.lower(), source.name)
        if name == "openai/gsm8k":
            records = load_hub_dataset(name, "main", source.split)
        elif name == "meta-math/MetaMathQA":
            records = (r for r in load_hub_dataset(name, None, source.split) if str(r.get("type", "")).startswith("GSM"))
        else:
            records = load_hub_dataset(name, None, source.split)
        rows = []
        for i, obj in enumerate(records):
            rows.append({**parse_math_record(dict(obj), f"{name}[{source.split}] row {i}", f"{label}:{i}"), "source": label})
            if source.stops_at_limit and len(rows) >= source.limit:
                break
        return rows

    def score(self, prediction: str, row: Row) -> float:
        return float(math_correct(prediction, row["answers"][0]))
