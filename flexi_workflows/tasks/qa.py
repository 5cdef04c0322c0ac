"""Extractive QA in the MRQA format (paper §4: train on the six MRQA training sets, test on six
out-of-domain sets).

A local MRQA file is JSONL (or the official `.jsonl.gz`): a header line {"header": {"dataset", "split"}},
then one line per context: {"context": "...", "qas": [{"qid", "question", "answers": [...],
"detected_answers": [{"text", ...}]}]}. A `path` may also be a folder of such files (the six training
sets side by side). Each question becomes a row whose `subset` is its file's header dataset (else the
file name); every entry of `answers` is a gold answer (max over them), and the training target is the
first detected answer (the span as it occurs in the context).
Hub: mrqa-workshop/mrqa, filtered to one subset, or name `mrqa` for every subset of the split (the
train / validation splits hold the six training sets, test the six out-of-domain ones).

Several subsets with a `limit` are mixed, not cut: the source's default `selection: auto` gives each
subset an equal share, drawn with the source's seed (DataSource) — the hub's train split is ordered by
subset, so its first 60,000 rows would be SQuAD alone.
"""

from __future__ import annotations

from flexi_workflows.errors import DataError
from flexi_workflows.metrics import qa_exact_match, qa_f1
from flexi_workflows.tasks.base import DataSource, Row, Selected, Task, selected_indices
from flexi_workflows.tasks.io import dataset_files, iter_jsonl, require

MRQA_TRAIN_SETS = ("SQuAD", "NewsQA", "TriviaQA", "SearchQA", "HotpotQA", "NaturalQuestions")
MRQA_OOD_SETS = ("BioASQ", "DROP", "DuoRC", "RACE", "RelationExtraction", "TextbookQA")
MRQA_HUB = "mrqa-workshop/mrqa"


def _qa_row(context: str, qa: dict, where: str, label: str, index: int, subset: str) -> Row:
    question = require(qa, "question", where)
    answers = require(qa, "answers", where, list)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: 'answers' must be a non-empty list of strings")
    detected = qa.get("detected_answers") or []
    target = detected[0]["text"] if detected and isinstance(detected[0], dict) and "text" in detected[0] else answers[0]
    qid = qa.get("qid") or qa.get("id") or f"{index}"
    return {"id": f"{label}:{qid}", "question": question.strip(), "context": context, "answers": answers,
            "target": target, "source": label, "subset": subset}


def _hub_qa(obj: dict) -> dict:
    """A hub row's question in the local files' `qas` entry shape."""
    detected = obj.get("detected_answers") or {}
    texts = detected.get("text", []) if isinstance(detected, dict) else []
    return {"qid": obj.get("qid"), "question": obj["question"], "answers": list(obj["answers"]),
            "detected_answers": [{"text": t} for t in texts]}


def _select_hub_rows(records, subset: str | None, source: DataSource):
    """(row index, row) for the rows `source` keeps, chosen from the `subset` column alone, so only those
    rows are converted (the train split holds 516,819 rows with tokenised contexts); None when
    `records` is not a datasets.Dataset (then every row is read and Task.load selects)."""
    if not (hasattr(records, "select") and "subset" in getattr(records, "column_names", ())):
        return None
    names = [str(s) for s in records["subset"]]
    candidates = [i for i, s in enumerate(names) if subset is None or s == subset]
    picked = selected_indices([names[i] for i in candidates], [""] * len(candidates), source)
    indices = [candidates[j] for j in picked]
    return zip(indices, records.select(indices))


class QATask(Task):
    name = "qa"
    metric = "f1"
    plain_template = "Context: {context}\nQuestion: {question}"

    def _load(self, source: DataSource) -> list[Row]:
        label = source.label
        rows: list[Row] = []
        if source.path:
            for path in dataset_files(source.path, (".jsonl", ".jsonl.gz")):
                subset = path.name.removesuffix(".gz").removesuffix(".jsonl")
                for lineno, obj in iter_jsonl(path):
                    where = f"{path}:{lineno}"
                    if "header" in obj:
                        header = obj["header"]
                        if isinstance(header, dict) and isinstance(header.get("dataset"), str) and header["dataset"]:
                            subset = header["dataset"]
                        continue
                    context = require(obj, "context", where)
                    for qa in require(obj, "qas", where, list):
                        if not isinstance(qa, dict):
                            raise DataError(f"{where}: each entry of 'qas' must be an object")
                        rows.append(_qa_row(context, qa, where, label, len(rows), subset))
                    if source.stops_at_limit and len(rows) >= source.limit:
                        return rows
            return rows
        from flexi_workflows.tasks.hub import load_hub_dataset

        wanted = {s.lower(): s for s in (*MRQA_TRAIN_SETS, *MRQA_OOD_SETS)}
        subset = None if source.name.lower() == "mrqa" else wanted.get(source.name.lower())
        if subset is None and source.name.lower() != "mrqa":
            raise DataError(f"unknown MRQA subset {source.name!r}; one of {', '.join(wanted.values())}, "
                            f"'mrqa' (every subset of the split), or a local path")
        records = load_hub_dataset(MRQA_HUB, None, source.split)
        if subset is not None or not source.stops_at_limit:
            chosen = _select_hub_rows(records, subset, source)
            if chosen is not None:
                return Selected(_qa_row(obj["context"], _hub_qa(obj), f"{MRQA_HUB} row {i}", label, n, str(obj["subset"]))
                                for n, (i, obj) in enumerate(chosen))
        for i, obj in enumerate(records):
            if subset is not None and obj.get("subset") != subset:
                continue
            if source.subsets is not None and obj.get("subset") not in source.subsets:
                continue
            rows.append(_qa_row(obj["context"], _hub_qa(obj), f"{MRQA_HUB} row {i}", label, len(rows),
                                str(obj.get("subset") or "")))
            if source.stops_at_limit and len(rows) >= source.limit:
                break
        return rows

    def score(self, prediction: str, row: Row) -> float:
        return qa_f1(prediction, row["answers"])

    def metrics(self, prediction: str, row: Row) -> dict[str, float]:
        return {"f1": qa_f1(prediction, row["answers"]), "exact_match": qa_exact_match(prediction, row["answers"])}
