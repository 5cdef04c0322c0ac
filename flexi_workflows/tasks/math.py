"""Math word problems: GSM8K, MetaMathQA (GSM8K subset), SVAMP, MultiArith, MAWPS.

Local files in these record shapes, as JSONL or one JSON list, are recognised by their fields:

    {"question", "answer": "...reasoning... #### 72"}        GSM8K
    {"instruction", "answer": "8.0", "output": ...}          LLM-Adapters eval copies (SVAMP, ...)
    {"query", "response": "... The answer is: 18", "type"}   MetaMathQA
    {"question", "final_ans": "5"}                           ChilleD/MultiArith (and the like)
    {"question", "answer": 5}                                any set with a numeric answer field
    {"Body", "Question", "Answer"}                           SVAMP's original release

The LLM-Adapters `output` field is some model's generated text, often wrong: it is never read.
Hub names (for users with internet): openai/gsm8k, meta-math/MetaMathQA, `multiarith` (ChilleD/MultiArith,
whose `test` split has 180 items), or any hub dataset in one of the shapes above.

Splits: the shared MultiArith (600 items) and MAWPS (238) files are LLM-Adapters' copies, not the
paper's splits (its percentages imply 180 and 355 items). `dataset_note` labels such sets, and the
label travels into summary rows and report tables; another split is read by `path` or hub `name`.

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
from flexi_workflows.metrics import math_correct, parse_number
from flexi_workflows.tasks.base import DataSource, Row, Task
from flexi_workflows.tasks.io import iter_jsonl, read_json_list, require

_CALCULATOR = re.compile(r"<<[^>]*>>")
_METAMATH_ANSWER = re.compile(r"The answer is\s*:?\s*")
HUB_ALIASES = {"gsm8k": "openai/gsm8k", "metamathqa": "meta-math/MetaMathQA", "multiarith": "ChilleD/MultiArith"}
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


def _numeric_answer_row(obj: dict, where: str, rid: str, question: str, answer_field: str) -> Row:
    gold = _gold_string(require(obj, answer_field, where, (str, int, float)), where)
    return {"id": rid, "question": question.strip(), "context": "", "answers": [gold], "target": f"#### {gold}"}


def _plain_number(value: Any) -> bool:
    """A bare numeric answer (5, 2.5, "1,000") rather than GSM8K's reasoning + "#### N"."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, str) and "####" not in value and parse_number(value.strip()) is not None


def parse_math_record(obj: dict, where: str, rid: str) -> Row:
    if "query" in obj and "response" in obj:
        return _metamath_row(obj, where, rid)
    if "instruction" in obj:
        return _adapters_row(obj, where, rid)
    if "Body" in obj and "Question" in obj:  # SVAMP's own release: the question is Body + Question
        question = f"{require(obj, 'Body', where).strip()} {require(obj, 'Question', where).strip()}"
        return _numeric_answer_row(obj, where, rid, question, "Answer")
    if "question" in obj and "final_ans" in obj:
        return _numeric_answer_row(obj, where, rid, require(obj, "question", where), "final_ans")
    if "question" in obj and _plain_number(obj.get("answer")):
        return _numeric_answer_row(obj, where, rid, require(obj, "question", where), "answer")
    if "question" in obj:
        return _gsm8k_row(obj, where, rid)
    raise DataError(
        f"{where}: not a math record: expected fields question+answer (GSM8K), instruction+answer "
        f"(LLM-Adapters), query+response (MetaMathQA), question+final_ans or Body+Question+Answer (SVAMP); "
        f"got {', '.join(sorted(obj)) or 'nothing'}"
    )


# Evaluation sets whose usual copies differ from the paper's splits: dataset → (name, the paper's size,
# {size of a known copy: where that copy comes from}). The paper's MultiArith and MAWPS percentages are
# multiples of 1/180 and 1/355 (e.g. 92.22 % = 166/180, 79.71 % = 283/355).
PAPER_SPLITS = {
    "multiarith": ("MultiArith", 180, {600: "LLM-Adapters copy"}),
    "mawps": ("MAWPS", 355, {238: "LLM-Adapters copy"}),
}


def _identity(source: DataSource) -> str | None:
    """Which PAPER_SPLITS dataset a source is, from its name or any part of its path."""
    parts = [source.name or ""] + (list(Path(source.path).parts) if source.path else [])
    for part in parts:
        flat = re.sub(r"[^a-z0-9]", "", part.lower())
        for key in PAPER_SPLITS:
            if key in flat:
                return key
    return None


def dataset_note(source: DataSource, count: int | None) -> str | None:
    """The remark a report shows beside this dataset: the source's own `note`, else one for a known
    dataset whose size is not the paper's split, e.g. "MultiArith (LLM-Adapters copy, 600 items; not
    the paper's 180-item split)"; None for anything else."""
    if source.note:
        return source.note
    key = _identity(source)
    if key is None or count is None:
        return None
    name, paper_size, copies = PAPER_SPLITS[key]
    if count == paper_size:
        return None
    origin = copies.get(count)
    what = f"{origin}, {count} items" if origin else f"{count} items"
    return f"{name} ({what}; not the paper's {paper_size}-item split)"


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

    def note(self, source: DataSource, count: int | None) -> str | None:
        return dataset_note(source, count)

    def score(self, prediction: str, row: Row) -> float:
        return float(math_correct(prediction, row["answers"][0]))
