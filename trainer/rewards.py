"""Answer rewards: SQuAD-style normalised exact match and token F1 (max over accepted answers)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, fold whitespace. A bare number keeps its
    sign and is written canonically ("-9", "+9.0" -> "9"), so "9" never matches "-9"."""
    if _NUMBER.fullmatch(text.strip()):
        value = float(text.strip())
        return str(int(value)) if value.is_integer() else repr(value)
    text = text.lower().translate(_PUNCT)
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
    for ep in episodes:
        ep.em = exact_match(ep.answer, ep.example.answers)
        ep.f1 = f1_score(ep.answer, ep.example.answers)
        ep.reward = reward(ep.answer, ep.example.answers, kind)
