"""Metrics against hand-checked cases (SQuAD/MRQA normalisation, numeric extraction, WER/CER)."""

from __future__ import annotations

import pytest

from flexi_workflows.metrics import cer, extract_number, math_correct, normalize_answer, qa_exact_match, qa_f1, wer


@pytest.mark.parametrize(
    "text,expect",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear; THE end. ", "apple pear end"),
        ("theatre", "theatre"),  # articles only as whole words
        ("rock-n-roll", "rocknroll"),  # punctuation removed, not replaced by a space
        ("", ""),
    ],
)
def test_normalize_answer(text, expect):
    assert normalize_answer(text) == expect


def test_exact_match_cases():
    assert qa_exact_match("the Denver Broncos", ["Denver Broncos"]) == 1.0
    assert qa_exact_match("Denver Broncos.", ["Broncos", "Denver Broncos"]) == 1.0
    assert qa_exact_match("Broncos of Denver", ["Denver Broncos"]) == 0.0
    assert qa_exact_match("", ["Denver"]) == 0.0
    assert qa_exact_match("An Apple", "apple") == 1.0


def test_f1_cases():
    # precision 1/2, recall 1/1 → F1 2/3
    assert qa_f1("Denver Broncos", ["Broncos"]) == pytest.approx(2 / 3)
    # max over golds
    assert qa_f1("Denver Broncos", ["Carolina Panthers", "the Denver Broncos"]) == 1.0
    # token multiset overlap: pred "a b b", gold "b b c" → common 2, p=2/3, r=2/3
    assert qa_f1("x y y", ["y y z"]) == pytest.approx(2 / 3)
    assert qa_f1("", ["Denver"]) == 0.0
    assert qa_f1("Paris", ["London"]) == 0.0
    with pytest.raises(ValueError):
        qa_f1("x", [])


def test_f1_is_zero_when_normalisation_empties_both_strings_as_the_official_mrqa_script():
    # mrqa_official_eval.py: common = Counter(pred) & Counter(gold); num_same == 0 → return 0
    assert qa_f1("the the the", ["the"]) == 0.0
    assert qa_f1("the", ["a"]) == 0.0
    assert qa_f1("", [""]) == 0.0
    assert qa_f1("the", ["a", "an apple"]) == 0.0  # max over golds: still no shared token
    assert qa_f1("an apple", ["the", "apple"]) == 1.0
    # exact match compares the normalised strings, so there both-empty is a match (official EM)
    assert qa_exact_match("the the the", ["the"]) == 1.0


@pytest.mark.parametrize(
    "text,expect",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72.0),
        ("#### 1,000", 1000.0),
        ("It costs $5.50 in total.", 5.5),
        ("The temperature fell to -3", -3.0),
        ("The answer is 12.", 12.0),
        ("The answer is: 7", 7.0),
        ("She had 4+5=9 cards, then 9-2=7. So 7 cards.", 7.0),
        ("First 3 then 10, finally 1,250.", 1250.0),
        ("18 eggs, 3 eaten, #### 15 and later 99", 15.0),
        ("no number here", None),
        ("", None),
        ("about .5 of it", 0.5),
    ],
)
def test_extract_number(text, expect):
    assert extract_number(text) == expect


def test_math_correct():
    assert math_correct("... #### 18", "18")
    assert math_correct("The answer is 1.8333", "1.8333333333333335")
    assert not math_correct("The answer is 1.83", "1.8333333333333335")
    assert math_correct("so 8", 8.0)
    assert math_correct("Total: $1,000.", "1000")
    assert not math_correct("nothing", 3)
    with pytest.raises(ValueError):
        math_correct("3", "three")


def test_wer_cer():
    assert wer("the cat sat", "the cat sat") == 0.0
    assert wer("the cat sat", "the bat sat") == pytest.approx(1 / 3)
    assert wer("the cat sat", "the cat") == pytest.approx(1 / 3)
    assert wer("a b", "a x b y") == pytest.approx(1.0)  # two insertions over two words
    assert cer("abc", "abd") == pytest.approx(1 / 3)
    assert cer("ab cd", "ab  cd") == 0.0
    with pytest.raises(ValueError):
        wer("", "x")
