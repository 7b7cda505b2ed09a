"""Answer rewards: SQuAD-style normalised exact match and token F1 (max over accepted answers)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_EDGE_PUNCT = ".,;:!?\"'()[]{}"


def _word(word: str) -> str:
    """One word: a number keeps its sign and decimals, written canonically ("+9.0" -> "9",
    "-9" stays "-9"); any other word loses its punctuation."""
    core = word.strip(_EDGE_PUNCT)
    if _NUMBER.fullmatch(core):
        value = float(core)
        return str(int(value)) if value.is_integer() else repr(value)
    return word.translate(_PUNCT)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, fold whitespace; numbers keep their sign
    and decimal point, so "9" never matches "-9", nor "35" "3.5"."""
    text = " ".join(_word(w) for w in text.lower().split())
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str | None, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised accepted answer (None -> 0)."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def f1_score(prediction: str | None, answers: Sequence[str]) -> float:
    """Best token-level F1 between the prediction and an accepted answer (None -> 0)."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def reward(prediction: str | None, answers: Sequence[str], kind: str = "em") -> float:
    """The training reward: ``em`` (exact match) or ``f1``."""
    if kind == "em":
        return exact_match(prediction, answers)
    if kind == "f1":
        return f1_score(prediction, answers)
    raise ValueError(f"unknown reward {kind!r}; expected 'em' or 'f1'")


def score_episodes(episodes, kind: str = "em") -> None:
    """Set each episode's ``em``, ``f1`` and training ``reward`` from its answer."""
    if kind not in ("em", "f1"):
        raise ValueError(f"unknown reward {kind!r}; expected 'em' or 'f1'")
    for ep in episodes:
        ep.em = exact_match(ep.answer, ep.example.answers)
        ep.f1 = f1_score(ep.answer, ep.example.answers)
        ep.reward = ep.em if kind == "em" else ep.f1
