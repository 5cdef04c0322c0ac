"""Task metrics, as the paper's benchmarks define them; every score is a float in [0, 1].

- QA: SQuAD / MRQA official F1 and exact match. Answers are normalised (lower-case, punctuation and the
  articles a/an/the removed, whitespace collapsed) and the best score over the gold answers counts.
  F1 is 0 without a shared token, even when both strings normalise to nothing (`qa_f1("the the the",
  ["the"]) == 0.0`, as mrqa_official_eval.py computes it); exact match compares the normalised strings.
  (The paper authors' earlier code compared stripped strings without normalisation; we follow the
  official definition.)
- Math: the number a completion ends on, compared as a number with a relative tolerance of 1e-4.
  `extract_number` prefers GSM8K's "#### N", then "The answer is N", then the last number.
- Own data (tasks/custom.py), `numeric`: the last number of the completion against the last number of
  the reference, with the same tolerance.
- Speech: word / character error rate as jiwer defines them (edit distance over reference length).
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD / MRQA normalisation."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _f1_one(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        # as the MRQA / SQuAD v1.1 official script: no shared token is F1 0, also when normalisation
        # empties both strings ("the" vs "a"); exact match still counts those as equal (SQuAD v2's
        # both-empty = 1 rule is for unanswerable questions, which MRQA does not have)
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _golds(gold_answers: str | Sequence[str]) -> list[str]:
    golds = [gold_answers] if isinstance(gold_answers, str) else list(gold_answers)
    if not golds:
        raise ValueError("gold_answers is empty")
    return golds


def qa_f1(prediction: str, gold_answers: str | Sequence[str]) -> float:
    return max(_f1_one(prediction, g) for g in _golds(gold_answers))


def qa_exact_match(prediction: str, gold_answers: str | Sequence[str]) -> float:
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(g) for g in _golds(gold_answers)))


_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+"
_HASH_ANSWER = re.compile(r"####\s*(" + _NUMBER + ")")
_THE_ANSWER = re.compile(r"answer is\s*:?\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def parse_number(token: str) -> float | None:
    """A number written as in a word problem ("$1,000.", "-3", ".5"), or None."""
    cleaned = token.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if cleaned in ("", "-", "."):
        return None
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    """The answer number of a completion: GSM8K `#### N`, else "The answer is N", else the last number.

    Thousands separators, a `$` sign and a sentence-final `.` are handled: "$1,000." → 1000.0.
    """
    if not text:
        return None
    for pattern in (_HASH_ANSWER, _THE_ANSWER):
        match = pattern.search(text)
        if match:
            value = parse_number(match.group(1))
            if value is not None:
                return value
    for token in reversed(_ANY_NUMBER.findall(text)):
        value = parse_number(token)
        if value is not None:
            return value
    return None


def math_correct(prediction_text: str, gold: float | int | str, rel_tol: float = 1e-4) -> bool:
    """Whether the completion's answer equals `gold` (a number or numeric string) within rel_tol."""
    gold_value = gold if isinstance(gold, (int, float)) else parse_number(str(gold).strip())
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    predicted = extract_number(prediction_text)
    if predicted is None:
        return False
    return math.isclose(predicted, float(gold_value), rel_tol=rel_tol, abs_tol=1e-9)



def last_number(text: str) -> float | None:
    """The last number written in `text` ("$1,000." → 1000.0), or None."""
    for token in reversed(_ANY_NUMBER.findall(text or "")):
        value = parse_number(token)
        if value is not None:
            return value
    return None


def last_number_match(prediction: str, reference: str, rel_tol: float = 1e-4) -> float:
    """1.0 when the prediction's last number equals the reference's (within rel_tol), else 0.0."""
    gold = last_number(reference)
    if gold is None:
        raise ValueError(f"reference {reference[:60]!r} has no number")
    predicted = last_number(prediction)
    return float(predicted is not None and math.isclose(predicted, gold, rel_tol=rel_tol, abs_tol=1e-9))

def _edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1]


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: (substitutions + deletions + insertions) / reference words (may exceed 1)."""
    ref = reference.split()
    if not ref:
        raise ValueError("wer: the reference is empty")
    return _edit_distance(ref, hypothesis.split()) / len(ref)


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate over the reference's characters (spaces included, as jiwer counts them)."""
    ref = " ".join(reference.split())
    if not ref:
        raise ValueError("cer: the reference is empty")
    return _edit_distance(list(ref), list(" ".join(hypothesis.split()))) / len(ref)


def lower_is_better(metric: str) -> bool:
    """Error rates (wer, cer and their per-group columns, e.g. wer_all) are minimised; the rest maximised."""
    return metric.split("_")[0] in ("wer", "cer")
