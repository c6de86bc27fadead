"""VQA accuracy, answer normalisation, exact match and caption metrics.

Expected values are worked out by hand from the VQA evaluation rules (see the comments), not
taken from the code's own output.
"""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlprune.eval.vqa_metric import (
    caption_scores,
    caption_tokenize,
    exact_match,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    score_predictions,
    vqa_accuracy,
)

# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),  # lower-cased, then the number word maps to its digit
        ("the dog.", "dog"),  # final period (no digit after it) deleted, article dropped
        ("dont", "don't"),  # contraction gets its apostrophe back
        ("Dont", "don't"),  # ... after lower-casing
        ("yes!", "yes"),  # '!' not next to a space -> becomes a space -> split away
        ("Yes.", "yes"),
        ("  yes\n", "yes"),  # newline -> space, stripped
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the map stops at ten
        ("an apple", "apple"),
        ("A Red Car", "red car"),
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("5.", "5"),
        ("u.s.a.", "usa"),  # every period is followed by a letter or the end: all deleted
        ("1,000", "1000"),  # digit-comma-digit present: punctuation deleted, not spaced
        ("red,blue", "red blue"),  # no digit-comma-digit, ',' not next to a space: spaced
        ("yes, it is", "yes it is"),  # ', ' in the text: ',' deleted
        ("t-shirt", "t shirt"),  # '-' spaced
        ("hot - dog", "hot dog"),  # ' -' in the text: '-' deleted, double space collapsed
        ("dog's", "dog's"),  # "'" is not in the punctuation list
        ("time: 5", "time: 5"),  # neither is ':'
        ("(two)", "2"),  # '(' and ')' become spaces, then 'two' -> '2'
        ("the the a an", ""),  # only articles: nothing left
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_process_punctuation_keeps_case_and_spaces() -> None:
    # ground-truth answers only get this step: no lower-casing, spaces not collapsed
    assert process_punctuation("Yes!") == "Yes "
    assert process_punctuation("a-b") == "a b"
    assert process_punctuation("The Dog.") == "The Dog"


def test_process_digit_article_only() -> None:
    # no punctuation handling here: 'dog.' keeps its period
    assert process_digit_article("The  Three dog.") == "3 dog."
    assert process_digit_article("youre") == "you're"


def test_period_strip_limited_to_32() -> None:
    # the official script passes re.UNICODE (32) as re.sub's count: 40 periods -> 8 remain
    assert normalize_answer("x" + "." * 40) == "x" + "." * 8


def test_normalize_answer_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        normalize_answer(2)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# VQA accuracy, 10 answers
# --------------------------------------------------------------------------------------------


def _ten(k: int, match: str = "2", other: str = "3") -> list[str]:
    return [match] * k + [other] * (10 - k)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (0, 0.0),
        # 1 match: leaving it out leaves 0 matches (0); each of the 9 others leaves 1 (1/3).
        # (0 + 9 * 1/3) / 10 = 0.3
        (1, 0.3),
        # 2 matches: leaving a match out leaves 1 (1/3, twice); the 8 others leave 2 (2/3).
        # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
        (2, 0.6),
        # 3 matches: leaving a match out leaves 2 (2/3, 3 times); the 7 others leave 3 (1).
        # (3 * 2/3 + 7 * 1) / 10 = 9 / 10 = 0.9  (not 1.0: the simplified min(k/3, 1) says 1)
        (3, 0.9),
        # 4 matches: every subset of 9 holds at least 3 of them. (10 * 1) / 10 = 1.0
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_ten_answers(k: int, expected: float) -> None:
    assert vqa_accuracy("2", _ten(k)) == pytest.approx(expected)
    # the prediction is normalised: "Two" and "two." are "2"
    assert vqa_accuracy("Two", _ten(k)) == pytest.approx(expected)
    assert vqa_accuracy("two.", _ten(k)) == pytest.approx(expected)


@given(st.integers(min_value=0, max_value=10))
def test_vqa_accuracy_closed_form(k: int) -> None:
    # The k matching answers each see k - 1 matches among the other 9, the 10 - k others see
    # k: mean = (k * min(1, (k-1)/3) + (10 - k) * min(1, k/3)) / 10.
    expected = (k * min(1.0, (k - 1) / 3) + (10 - k) * min(1.0, k / 3)) / 10
    assert vqa_accuracy("yes", _ten(k, "yes", "no")) == pytest.approx(expected)


def test_vqa_accuracy_answer_order_does_not_matter() -> None:
    answers = ["3", "2", "3", "3", "2", "3", "3", "3", "3", "3"]  # two '2's, anywhere
    assert vqa_accuracy("2", answers) == pytest.approx(0.6)


# --------------------------------------------------------------------------------------------
# Ground-truth processing: official vs full
# --------------------------------------------------------------------------------------------


def test_official_ground_truth_is_not_lowercased_or_mapped() -> None:
    # The official script leaves ground-truth answers as they are when all agree...
    assert vqa_accuracy("two", ["Two"] * 10) == 0.0  # "2" != "Two"
    # ... while the full mode normalises them like the prediction: all 10 are "2".
    assert vqa_accuracy("two", ["Two"] * 10, answer_processing="full") == 1.0


def test_official_ground_truth_punctuation_only_when_annotators_disagree() -> None:
    # Unanimous "yes.": not processed, so "yes" never equals "yes." -> 0.
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0
    # Disagreeing: punctuation processed, "yes." -> "yes"; 5 matches -> every subset of 9
    # holds >= 4 of them -> 1.0.
    assert vqa_accuracy("yes", ["yes."] * 5 + ["no"] * 5) == 1.0
    # Disagreeing but capitalised: punctuation processing does not lower-case -> 0.
    assert vqa_accuracy("yes", ["Yes"] * 5 + ["no"] * 5) == 0.0
    assert vqa_accuracy("yes", ["Yes"] * 5 + ["no"] * 5, answer_processing="full") == 1.0


def test_full_mode_articles_and_contractions() -> None:
    # all 10 normalise to "dog" / "don't"
    assert vqa_accuracy("dog", ["the dog"] * 10, answer_processing="full") == 1.0
    assert vqa_accuracy("don't", ["dont"] * 10, answer_processing="full") == 1.0


def test_bad_answer_processing() -> None:
    with pytest.raises(ValueError, match="official"):
        vqa_accuracy("yes", ["yes"], answer_processing="strict")


# --------------------------------------------------------------------------------------------
# Other numbers of answers
# --------------------------------------------------------------------------------------------


def test_single_answer_is_exact_match() -> None:
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("two", ["3"]) == 0.0


def test_two_answers() -> None:
    # threshold min(3, n - 1) = 1. Leaving "cat" out: "dog" left, 0 matches -> 0; leaving
    # "dog" out: "cat" left, 1 match -> min(1, 1/1) = 1. Mean 0.5.
    assert vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(0.5)
    assert vqa_accuracy("cat", ["cat", "cat"]) == 1.0


def test_three_answers() -> None:
    # threshold 2. All three match: each subset of 2 has 2 -> 1.0.
    assert vqa_accuracy("cat", ["cat"] * 3) == 1.0
    # One matches: leaving it out -> 0; leaving either other out -> 1/2. (0 + 1/2 + 1/2)/3.
    assert vqa_accuracy("cat", ["cat", "dog", "cow"]) == pytest.approx(1 / 3)


def test_five_answers() -> None:
    # threshold 3, 2 matches: the 2 matching see 1 (1/3), the 3 others see 2 (2/3).
    # (2 * 1/3 + 3 * 2/3) / 5 = (2/3 + 2) / 5 = 8/15
    assert vqa_accuracy("cat", ["cat", "cat", "dog", "dog", "dog"]) == pytest.approx(8 / 15)


def test_answers_errors() -> None:
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("yes", [])
    with pytest.raises(TypeError, match="list of str"):
        vqa_accuracy("yes", "yes")
    with pytest.raises(TypeError, match="must be a str"):
        vqa_accuracy("yes", ["yes", 2])  # type: ignore[list-item]


# --------------------------------------------------------------------------------------------
# Exact match and the aggregate
# --------------------------------------------------------------------------------------------


def test_exact_match_uses_most_common_answer() -> None:
    answers = ["2"] * 4 + ["three"] * 6  # most common, normalised: "3"
    assert exact_match("3", answers) == 1.0
    assert exact_match("Three.", answers) == 1.0
    assert exact_match("2", answers) == 0.0  # though its VQA accuracy is 1.0
    assert vqa_accuracy("2", answers) == 1.0


def test_exact_match_tie_goes_to_first() -> None:
    # "the dog" -> "dog", "cat": one each; the first one wins
    assert exact_match("dog", ["the dog", "cat"]) == 1.0
    assert exact_match("cat", ["the dog", "cat"]) == 0.0


def test_score_predictions() -> None:
    preds = ["yes", "2", "blue"]
    answers = [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["red"] * 10]
    out = score_predictions(preds, answers)
    # accuracy: (1.0 + 0.6 + 0.0) / 3 = 0.5333.. -> 53.33 %
    assert out["vqa_accuracy"] == pytest.approx(100 * 1.6 / 3)
    # exact: yes -> 1; "2" vs most common "3" -> 0; blue -> 0: 1/3 -> 33.33 %
    assert out["exact_match"] == pytest.approx(100 / 3)
    assert out["n"] == 3


def test_score_predictions_processing_is_passed_on() -> None:
    out = score_predictions(["two"], [["Two"] * 10], answer_processing="full")
    assert out["vqa_accuracy"] == 100.0
    assert score_predictions(["two"], [["Two"] * 10])["vqa_accuracy"] == 0.0


def test_score_predictions_errors() -> None:
    with pytest.raises(ValueError, match="pair up"):
        score_predictions(["yes", "no"], [["yes"]])
    with pytest.raises(ValueError, match="no predictions"):
        score_predictions([], [])
    with pytest.raises(ValueError, match="question 1"):
        score_predictions(["yes", "no"], [["yes"], []])
    with pytest.raises(TypeError, match="not one str"):
        score_predictions("yes", [["yes"]])


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        # lower-cased, ',' and '?' dropped, clitics split off as the PTB tokenizer does
        ("A man's T-shirt, isn't it?", ["a", "man", "'s", "t-shirt", "is", "n't", "it"]),
        # abbreviation keeps its periods, sentence period dropped, brackets -> -lrb-/-rrb-
        ("The U.S. flag (red).", ["the", "u.s.", "flag", "-lrb-", "red", "-rrb-"]),
        # digit groups and clock times stay one token
        ("1,000 dogs at 3:30", ["1,000", "dogs", "at", "3:30"]),
        # a symbol is a token of its own
        ("50% off", ["50", "%", "off"]),
        # clitics peel off one after the other; curly apostrophe counts as "'"
        ("they'd've", ["they", "'d", "'ve"]),
        ("it\u2019s", ["it", "'s"]),
        ('"quoted" -- ok...', ["quoted", "ok"]),
    ],
)
def test_caption_tokenize(text: str, tokens: list[str]) -> None:
    assert caption_tokenize(text) == tokens


def test_caption_scores_names_package_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("pycocoevalcap", "pycocoevalcap.bleu", "pycocoevalcap.bleu.bleu",
                 "pycocoevalcap.cider", "pycocoevalcap.cider.cider"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install pycocoevalcap"):
        caption_scores(["a cat"], [["a cat"]])


def test_caption_scores_input_errors() -> None:
    # checked before the scorers are needed
    with pytest.raises(ValueError, match="pair up"):
        caption_scores(["a cat", "a dog"], [["a cat"]])
    with pytest.raises(ValueError, match="non-empty list"):
        caption_scores(["a cat"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        caption_scores(["a cat"], ["a cat"])


def test_caption_scores_bleu_brevity() -> None:
    pytest.importorskip("pycocoevalcap.bleu.bleu")
    # "the cat" against "the cat sat": unigram and bigram precision 1, brevity penalty
    # exp(1 - 3/2) = exp(-0.5), so BLEU-1 = BLEU-2 = 100 * exp(-0.5) = 60.65.
    out = caption_scores(["The cat."], [["the cat sat"]])
    assert out["bleu_1"] == pytest.approx(100 * math.exp(-0.5), abs=1e-4)
    assert out["bleu_2"] == pytest.approx(100 * math.exp(-0.5), abs=1e-4)
    assert out["n"] == 1


def test_caption_scores_identical_captions() -> None:
    pytest.importorskip("pycocoevalcap.cider.cider")
    preds = ["A cat sleeps here.", "Two dogs run fast!"]
    refs = [["a cat sleeps here"], ["two dogs run fast"]]
    out = caption_scores(preds, refs)
    # identical after tokenization, 4 words: every n-gram precision (n <= 4) is 1 and there
    # is no brevity penalty -> BLEU-1..4 = 100
    for k in range(1, 5):
        assert out[f"bleu_{k}"] == pytest.approx(100.0, abs=1e-4)
    # CIDEr-D: each n-gram occurs in one of the 2 images, idf = log(2/1) > 0, and candidate
    # and reference vectors are equal, so the clipped cosine is 1 for n = 1..4 and the length
    # penalty exp(0) = 1. Mean over n = 1, times 10 (CIDEr-D's scale), times 100.
    assert out["cider"] == pytest.approx(1000.0, abs=1e-6)
    # 3-word captions have no 4-gram: cosine 0 for n = 4, mean 3/4 -> 750
    short = caption_scores(["a cat sleeps", "two dogs run"], [["a cat sleeps"], ["two dogs run"]])
    assert short["cider"] == pytest.approx(750.0, abs=1e-6)


def test_caption_scores_single_image_cider_is_zero() -> None:
    pytest.importorskip("pycocoevalcap.cider.cider")
    # one image: every n-gram has document frequency 1 of 1 -> idf log(1/1) = 0
    assert caption_scores(["a cat"], [["a cat"]])["cider"] == 0.0
