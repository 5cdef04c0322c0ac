"""Math word problems: GSM8K, MetaMathQA (GSM8K subset), SVAMP, MultiArith, MAWPS.

Local files in any of three record shapes, as JSONL or one JSON list, are recognised by their fields:

    {"question", "answer": "...reasoning... #### 72"}        GSM8K
    {"instruction", "answer": "8.0", "output": ...}          LLM-Adapters eval copies (SVAMP, ...)
    {"query", "response": "... The answer is: 18", "type"}   MetaMathQA

The LLM-Adapters `output` field is some model's generated text, often wrong: it is never read.
Hub names (for users with internet): openai/gsm8k, meta-math/MetaMathQA.

MetaMathQA (paper §4: "we train on the GSM8K subset of the MetaMathQA dataset"): its `type` names the
source and the augmentation — GSM_AnsAug, GSM_Rephrased, GSM_SV, GSM_FOBAR come from GSM8K, the MATH_*
types from MATH. A row's `subset` is its type, and a source keeps the four GSM types unless its
`subsets` says otherwise — from the hub and from a local copy alike (MetaMathQA-395K.json holds both).
The gold answer is the number after the response's final "The answer is:"; the training target is
the response's reasoning followed by "#### N", the same answer line as GSM8K's.
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
_METAMATH_ANSWER = re.compile(r"The answer is\s*:?\s*")
HUB_ALIASES = {"gsm8k": "openai/gsm8k", "metamathqa": "meta-math/MetaMathQA"}
METAMATH_HUB = "meta-math/MetaMathQA"
_HASH_LINE = re.compile(r"\n?####[^\n]*\s*$")
# the GSM8K part of MetaMathQA: answer augmentation, rephrasing, self-verification, FOBAR
METAMATH_GSM_TYPES = ("GSM_AnsAug", "GSM_Rephrased", "GSM_SV", "GSM_FOBAR")


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


def metamath_answer(response: str) -> tuple[str, str] | None:
    """(reasoning, answer text) split at the response's last "The answer is:", or None without one."""
    matches = list(_METAMATH_ANSWER.finditer(response))
    if not matches:
        return None
    last = matches[-1]
    return response[: last.start()].strip(), response[last.end():].strip()


def _metamath_row(obj: dict, where: str, rid: str) -> Row:
    query = require(obj, "query", where)
    response = require(obj, "response", where)
    split = metamath_answer(response)
    if split is None:
        raise DataError(f"{where}: MetaMathQA response has no final 'The answer is: N'")
    reasoning, answer = split
    reasoning = _HASH_LINE.sub("", reasoning).strip()  # some responses repeat GSM8K's own "#### N" line
    number = parse_number(answer.removesuffix(".").removesuffix("%").strip())
    if number is None:
        raise DataError(f"{where}: MetaMathQA answer {answer[:60]!r} is not a number (the math task grades "
                        f"numeric answers; MATH_* types often have expressions — keep to the GSM types)")
    gold = _gold_string(number, where)
    row = {"id": rid, "question": query.strip(), "context": "", "answers": [gold],
           "target": f"{reasoning}\n#### {gold}" if reasoning else f"#### {gold}"}
    if isinstance(obj.get("type"), str) and obj["type"]:
        row["subset"] = obj["type"]
    return row


def wanted_metamath(obj: dict, source: DataSource) -> bool:
    """Whether a MetaMathQA record is in the source's subsets (default: the GSM8K types); other records pass."""
    if not ("query" in obj and "response" in obj and "type" in obj):
        return True
    return str(obj["type"]) in (source.subsets if source.subsets is not None else METAMATH_GSM_TYPES)


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
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                records = ((f"{path}:{n}", obj) for n, obj in iter_jsonl(path))
            else:
                records = ((f"{path} item {i}", obj) for i, obj in read_json_list(path))
            rows = []
            for i, (where, obj) in enumerate(records):
                if not wanted_metamath(obj, source):
                    continue
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
        else:
            records = load_hub_dataset(name, None, source.split)
        rows = []
        for i, obj in enumerate(records):
            obj = dict(obj)
            if not wanted_metamath(obj, source):
                continue
            rows.append({**parse_math_record(obj, f"{name}[{source.split}] row {i}", f"{label}:{i}"), "source": label})
            if source.stops_at_limit and len(rows) >= source.limit:
                break
        return rows

    def score(self, prediction: str, row: Row) -> float:
        return float(math_correct(prediction, row["answers"][0]))
