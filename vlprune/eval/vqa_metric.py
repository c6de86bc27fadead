"""VQA accuracy (the VQAv2 definition), exact match, and caption metrics (BLEU, CIDEr).

VQA accuracy
------------
This follows the evaluation script of the VQA API (``vqaEval.py``, the version distributed
with VQAv2), re-implemented here:

* **Prediction normalisation** (:func:`normalize_answer`): newlines and tabs become spaces,
  the text is stripped, then :func:`process_punctuation` and :func:`process_digit_article`.
* :func:`process_punctuation`: each character of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
  is deleted when the *original* text has it next to a space (``"p "`` or ``" p"``) or when
  the original text contains a digit-comma-digit group (``"1,000"``); otherwise it is replaced
  by a space. Then every ``.`` that is not followed by a digit is deleted (``"dog."`` ->
  ``"dog"``, ``"3.5"`` stays). The official period pattern is written ``(?!<=\\d)(\\.)(?!\\d)``:
  its first group is a look-ahead, not a look-behind, so it never stops a match; the
  behaviour is therefore "delete a period unless a digit follows", reproduced as such.
  The official call also passes ``re.UNICODE`` where ``re.sub`` expects ``count``, which
  limits the deletion to the first 32 periods; that is reproduced too. ``:`` and ``'`` are
  not in the list and stay.
* :func:`process_digit_article`: lower-case, split on whitespace, map the number words
  ``none, zero, one, ..., ten`` to ``0, 0, 1, ..., 10``, drop the articles ``a, an, the``,
  restore apostrophes of common contractions (``dont`` -> ``don't``), join with one space.
* **Ground-truth answers**, with ``answer_processing="official"`` (the default): exactly as
  the official script, they get :func:`process_punctuation` only, and only when the
  annotators disagree (more than one distinct answer); no lower-casing, no number words or
  articles. VQAv2 annotation files hold answers already normalised this way, so this is the
  setting that reproduces published VQAv2 numbers. With ``answer_processing="full"`` the
  ground-truth answers go through the same :func:`normalize_answer` as the prediction, which
  is what hand-written answer files (``"Two"``, ``"the dog"``) need.
* **Score of one question** with ``n`` ground-truth answers: for each answer ``i``, count the
  *other* ``n - 1`` answers equal to the normalised prediction and take
  ``min(1, matches / 3)``; the question's accuracy is the mean of these ``n`` values. For
  the 10 VQAv2 answers, ``k`` matching answers give 0, 0.3, 0.6, 0.9 and then 1.0 for
  ``k = 0, 1, 2, 3, >= 4``.
* **Other numbers of answers** (not part of the official definition): the same leave-one-out
  mean over however many answers there are, with the threshold of 3 agreeing annotators
  lowered to ``n - 1`` when there are fewer than 4 answers, so that unanimous answers always
  score 1. One answer (GQA, most hand-written sets) is plain exact match, 0 or 1.

Caption metrics
---------------
:func:`caption_scores` uses the BLEU and CIDEr-D scorers of ``pycocoevalcap`` (the COCO
caption evaluation code), which are pure Python. Its reference tokenizer (Stanford
PTBTokenizer) runs Java; it is replaced here by :func:`caption_tokenize`, which follows the
same rules for ordinary captions (same tokens, hence the same scores), but is not guaranteed
identical on unusual text (see its docstring).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "ANSWER_PROCESSING",
    "normalize_answer",
    "process_punctuation",
    "process_digit_article",
    "vqa_accuracy",
    "exact_match",
    "score_predictions",
    "caption_tokenize",
    "caption_scores",
    "coco_scorers",
]

#: Accepted values of ``answer_processing`` (how ground-truth answers are normalised).
ANSWER_PROCESSING = ("official", "full")

# Punctuation handled by process_punctuation, in the official order ('.' is handled apart).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!")
# A digit, a comma, a digit ("1,000"): when present, punctuation is deleted, not spaced.
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit (see the module docstring for the official pattern).
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# The official script passes re.UNICODE (== 32) as re.sub's ``count``.
_PERIOD_COUNT = 32

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Contractions written without apostrophe -> with. Keys that start with a capital letter in
# the official table (Id've, I'dve, Im, Ive) can never match after lower-casing and are left
# out; a few entries that map a word to itself are left out too.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def process_punctuation(text: str) -> str:
    """Delete or space out punctuation as the VQA evaluation script does (no lower-casing).

    Each punctuation character is deleted when the input has it next to a space, or when the
    input contains a digit-comma-digit group; otherwise it becomes a space. Periods not
    followed by a digit are deleted. Spaces are not collapsed here.
    """
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if has_number_comma or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lower-case, number words to digits, drop articles, restore contractions, join words."""
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise an answer as the VQA evaluation script normalises a prediction.

    >>> normalize_answer("The two dogs.")
    '2 dogs'
    """
    if not isinstance(text, str):
        raise TypeError(f"an answer must be a str, got {type(text).__name__}: {text!r}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _check_processing(answer_processing: str) -> None:
    if answer_processing not in ANSWER_PROCESSING:
        raise ValueError(
            f"answer_processing must be one of {list(ANSWER_PROCESSING)}, "
            f"got {answer_processing!r}"
        )


def _check_answers(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str):
        raise TypeError(
            f"answers must be a list of str (the ground-truth answers), not one str: {answers!r}"
        )
    answers = list(answers)
    if not answers:
        raise ValueError("answers is empty: a question needs at least one ground-truth answer")
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"each answer must be a str, got {type(a).__name__}: {a!r}")
    return answers


def _processed_answers(answers: list[str], answer_processing: str) -> list[str]:
    if answer_processing == "full":
        return [normalize_answer(a) for a in answers]
    # Official: punctuation only, and only when the annotators disagree.
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return answers


def vqa_accuracy(pred: str, answers: Sequence[str], *,
                 answer_processing: str = "official") -> float:
    """VQA accuracy of one prediction against its ground-truth answers, in [0, 1].

    The mean over the ``n`` answers of ``min(1, matches among the other n - 1 / t)`` with
    ``t = 3`` (``t = n - 1`` when ``n < 4``); a single answer is exact match. See the module
    docstring for the normalisation and for ``answer_processing`` (``"official"`` or
    ``"full"``).
    """
    _check_processing(answer_processing)
    answers = _check_answers(answers)
    target = normalize_answer(pred)
    gts = _processed_answers(answers, answer_processing)
    hits = [g == target for g in gts]
    n = len(gts)
    if n == 1:
        return float(hits[0])
    threshold = min(3, n - 1)
    total = sum(hits)
    return sum(min(1.0, (total - hit) / threshold) for hit in hits) / n


def exact_match(pred: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the most common normalised answer, else 0.0.

    Both sides go through :func:`normalize_answer`. A tie for the most common answer goes to
    the one that comes first in ``answers``.
    """
    answers = _check_answers(answers)
    counts = Counter(normalize_answer(a) for a in answers)
    top = counts.most_common(1)[0][0]  # ties: first inserted wins
    return float(normalize_answer(pred) == top)


def _paired(preds: Sequence[str], truth: Sequence[Sequence[str]], *, truth_name: str,
            each: str, pred_noun: str, truth_noun: str) -> tuple[list[str], list[Sequence[str]]]:
    """``preds`` and the ground truth ``truth`` (the argument ``truth_name``) as lists, checked
    to pair up one to one and not to be empty; the messages say one prediction is ``each``
    (``"per question"``) and call the items ``pred_noun`` and ``truth_noun``."""
    if isinstance(preds, str):
        raise TypeError(f"preds must be a list of str, one {each}, not one str")
    preds, truth = list(preds), list(truth)
    if len(preds) != len(truth):
        raise ValueError(f"got {len(preds)} {pred_noun}(s) but {len(truth)} {truth_noun}(s); "
                         "they must pair up one to one")
    if not preds:
        raise ValueError(f"no {pred_noun}s to score (preds and {truth_name} are empty)")
    return preds, truth


def score_predictions(preds: Sequence[str], answers_list: Sequence[Sequence[str]], *,
                      answer_processing: str = "official") -> dict[str, float | int]:
    """Mean VQA accuracy and exact match over a set of questions.

    ``preds[i]`` is the model's answer to question ``i`` and ``answers_list[i]`` its
    ground-truth answers. Returns ``{"vqa_accuracy": %, "exact_match": %, "n": count}`` with
    percentages in 0-100, not rounded.
    """
    _check_processing(answer_processing)
    preds, answers_list = _paired(preds, answers_list, truth_name="answers_list",
                                  each="per question", pred_noun="prediction",
                                  truth_noun="answer list")
    acc = em = 0.0
    for i, (pred, answers) in enumerate(zip(preds, answers_list)):
        try:
            acc += vqa_accuracy(pred, answers, answer_processing=answer_processing)
            em += exact_match(pred, answers)
        except (TypeError, ValueError) as e:
            raise type(e)(f"question {i}: {e}") from e
    n = len(preds)
    return {"vqa_accuracy": 100.0 * acc / n, "exact_match": 100.0 * em / n, "n": n}


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

# Caption tokens, close to what the COCO evaluation's PTB tokenizer (lower-cased) keeps:
_CAPTION_WORD = re.compile(
    r"""
      -[lr][rsc]b-                                # bracket tokens (see _BRACKETS)
    | (?:[^\W\d_]\.){2,}(?!\w)                    # abbreviations: u.s. e.g.
    | \w+(?:(?:['./\-]|(?<=\d)[,:](?=\d))\w+)*     # words, inner ' . / -, 1,000 3:30
    | [^\w\s'"`.,:;!?\-]                           # a symbol on its own: % $ & # + =
    """,
    re.VERBOSE,
)
# The PTB tokenizer writes brackets as -LRB- etc.; after lower-casing the COCO evaluation no
# longer recognises them as punctuation, so they stay as tokens.
_BRACKETS = str.maketrans({"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ",
                           "{": " -lcb- ", "}": " -rcb- ", "\u2019": "'"})
# English clitics that the PTB tokenizer splits off: "do|n't", "man|'s", "they|'re".
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def caption_tokenize(text: str) -> list[str]:
    """Tokenize a caption for BLEU / CIDEr without Java, close to the COCO PTB tokenizer.

    Rules: lower-case (a curly apostrophe counts as ``'``); words are runs of letters,
    digits and ``_``, and keep ``' . / -`` only *inside* them (``"t-shirt"``, ``"3.5"``,
    ``"dogs/cats"``) and ``, :`` only between digits (``"1,000"``, ``"3:30"``);
    abbreviations keep their periods (``"u.s."``); clitics are split off (``"don't"`` ->
    ``"do", "n't"``, ``"man's"`` -> ``"man", "'s"``); brackets become ``-lrb-``/``-rrb-``
    (``-lsb-``, ``-lcb-``, ...) tokens, as in the COCO pipeline; other symbols (``% $ & # +
    =`` ...) are tokens of their own; the punctuation ``' " ` . , : ; ! ? -`` separates words
    and is dropped, as the COCO evaluation drops punctuation tokens. Example:
    ``"A man's T-shirt, isn't it?"`` -> ``["a", "man", "'s", "t-shirt", "is", "n't", "it"]``.

    Known differences from the Java tokenizer, rare in captions: it also splits ``cannot``,
    ``gonna``, ``wanna``, keeps the period of titles (``"mr."``) and of a sentence's last
    single letter, keeps a leading apostrophe (``"'90s"``) and repeated ``!!``/``??``, and
    keeps some symbols inside words (``"a+b"``, ``"@home"``).
    """
    if not isinstance(text, str):
        raise TypeError(f"a caption must be a str, got {type(text).__name__}: {text!r}")
    tokens: list[str] = []
    for word in _CAPTION_WORD.findall(text.lower().translate(_BRACKETS)):
        clitics: list[str] = []
        while (m := _CLITIC.match(word)) is not None:  # "they'd've" -> they 'd 've
            word = m.group(1)
            clitics.insert(0, m.group(2))
        tokens.append(word)
        tokens.extend(clitics)
    return tokens


_CAPTION_INSTALL = (
    "caption metrics need the 'pycocoevalcap' package (its BLEU and CIDEr scorers are pure "
    "Python; Java is not needed for them here): pip install pycocoevalcap"
)


def coco_scorers() -> tuple[type, type]:
    """pycocoevalcap's ``Bleu`` and ``Cider`` classes; ImportError naming the package (and how
    to install it) when it is missing."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise ImportError(f"{_CAPTION_INSTALL} ({e})") from e
    return Bleu, Cider


def caption_scores(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, float | int]:
    """Corpus BLEU-1..4 and CIDEr-D of captions against reference captions.

    ``preds[i]`` is the caption generated for image ``i`` and ``refs[i]`` its reference
    captions (at least one). Text is tokenized by :func:`caption_tokenize`; the scores come
    from ``pycocoevalcap`` (BLEU with the "closest" reference length, CIDEr-D with its
    default sigma 6 and n = 4) and are returned x100 (``{"bleu_1", ..., "bleu_4", "cider",
    "n"}``), as papers report them. CIDEr-D weighs n-grams by their document frequency over
    all images' references, so it is a corpus score: score the whole set at once (with a
    single image it is 0).

    Raises ImportError naming the package when ``pycocoevalcap`` is not installed.
    """
    preds, refs = _paired(preds, refs, truth_name="refs", each="caption per image",
                          pred_noun="caption", truth_noun="reference list")
    res: dict[int, list[str]] = {}
    gts: dict[int, list[str]] = {}
    for i, (pred, image_refs) in enumerate(zip(preds, refs)):
        if isinstance(image_refs, str) or not image_refs:
            raise ValueError(
                f"image {i}: refs must be a non-empty list of reference captions, "
                f"got {image_refs!r}"
            )
        res[i] = [" ".join(caption_tokenize(pred))]
        gts[i] = [" ".join(caption_tokenize(r)) for r in image_refs]
    Bleu, Cider = coco_scorers()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out: dict[str, float | int] = {f"bleu_{k + 1}": 100.0 * float(b) for k, b in enumerate(bleu)}
    out["cider"] = 100.0 * float(cider)
    out["n"] = len(preds)
    return out
