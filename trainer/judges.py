"""Turn-level judges: a score ``s_t`` in {-1, 0, +1} for every assistant turn of a trajectory.

A judge reads finished episodes and returns one ``TurnVerdicts`` per episode: one score per
entry of ``Episode.turn_spans`` and the number of verdicts it could not obtain (counted as 0).
Every judge keeps at most one -1 per trajectory: the first, later ones become 0.

* ``RuleJudge`` scores from the ground truth of the bundled tasks (no model involved).
* ``HttpJudge`` asks an OpenAI-compatible chat-completions endpoint, one request per distinct
  turn prompt, with retries, a concurrency bound and an in-memory cache.

``tarl_reward`` folds the scores and the outcome into a trajectory reward, and
``verdict_counts`` summarises verdicts for the step metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Any

from .rewards import exact_match, normalize_answer
from .rollout.episode import CallRecord, Episode

Decode = Callable[[list[int]], str]


@dataclass
class TurnVerdicts:
    """The verdicts on one episode: ``scores[t]`` for turn ``t``; ``failed`` of them were
    not obtained and count as 0."""

    scores: list[int] = field(default_factory=list)
    failed: int = 0


def keep_first_penalty(scores: Sequence[int]) -> list[int]:
    """``scores`` with every -1 after the first turned into 0."""
    out, seen = [], False
    for s in scores:
        if s == -1:
            out.append(0 if seen else -1)
            seen = True
        else:
            out.append(int(s))
    return out


class Judge(ABC):
    """Scores the assistant turns of episodes."""

    @abstractmethod
    def judge(self, episodes: Sequence[Episode], decode: Decode) -> list[TurnVerdicts]:
        """One ``TurnVerdicts`` per episode, ``len(scores) == len(ep.turn_spans)``."""

    def close(self) -> None:
        """Release resources (nothing by default)."""
        return None


def _turn_of(span: tuple[int, int], turn_spans: Sequence[tuple[int, int]]) -> int | None:
    """The index of the turn whose span holds ``span`` (None when none does)."""
    for t, (a, b) in enumerate(turn_spans):
        if a <= span[0] and span[1] <= b:
            return t
    return None


def _mentions(text: str, answer: str) -> bool:
    """Whether the normalised ``answer`` occurs as whole words in the normalised ``text``."""
    needle = normalize_answer(answer)
    return bool(needle) and f" {needle} " in f" {normalize_answer(text)} "


class RuleJudge(Judge):
    """Ground-truth judge for tasks with evidence and accepted answers.

    Each call belongs to the turn whose span contains its span. Turn ``t`` scores:

    * -1 when a call of the turn is malformed or failed (``not call.valid``);
    * -1 when a call of the turn repeats an earlier call of the episode: the same ``name``
      and the same ``arguments`` (compared as canonical JSON);
    * -1 when ``t`` is the answer turn (the last turn, when ``episode.answer is not None``),
      the answer is not an exact match of the accepted answers, and an observation of a call
      in an earlier turn contains an accepted answer (normalised with ``normalize_answer``,
      matched on whole words): the evidence was in hand and the answer disagrees;
    * otherwise +1 when a call of the turn retrieved gold evidence (``call.good is True``);
    * otherwise 0 (a turn without a call, a correct answer, a call of unknown value).

    A -1 takes precedence over a +1 in the same turn; only the episode's first -1 is kept.
    """

    def judge(
        self, episodes: Sequence[Episode], decode: Decode | None = None
    ) -> list[TurnVerdicts]:
        return [TurnVerdicts(self.scores(ep)) for ep in episodes]

    def scores(self, ep: Episode) -> list[int]:
        n = len(ep.turn_spans)
        bad, good = [False] * n, [False] * n
        seen: set[tuple[str | None, str]] = set()
        calls_by_turn: list[list[CallRecord]] = [[] for _ in range(n)]
        for call in ep.calls:
            t = _turn_of((call.start, call.end), ep.turn_spans)
            signature = (call.name, json.dumps(call.arguments, sort_keys=True, default=str))
            repeated = signature in seen
            seen.add(signature)
            if t is None:
                continue
            calls_by_turn[t].append(call)
            bad[t] |= (not call.valid) or repeated
            good[t] |= call.good is True
        if n and ep.answer is not None and not exact_match(ep.answer, ep.example.answers):
            in_hand = any(
                _mentions(call.observation, a)
                for turn in calls_by_turn[:-1]
                for call in turn
                for a in ep.example.answers
            )
            bad[-1] |= in_hand
        raw = [-1 if b else (1 if g else 0) for b, g in zip(bad, good, strict=True)]
        return keep_first_penalty(raw)


DEFAULT_PROMPT = """You are grading one step of an AI agent that answers a question by calling \
tools (such as a search engine) and then giving a final answer.

Question: {question}

Trajectory so far (earlier steps and tool results):
{history}

Step to grade:
{turn}

Score the step: 1 if it clearly moves toward a correct answer (a useful, well-formed tool call \
or a correct, supported answer); -1 if it is harmful (a malformed or failed call, a repeat of \
an earlier call, or an answer that contradicts the evidence already retrieved); 0 otherwise.
Reply with a JSON object only: {{"score": -1}}, {{"score": 0}} or {{"score": 1}}."""

_FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_verdict(content: Any) -> int | None:
    """The integer ``score`` in {-1, 0, 1} of a reply: a JSON object, possibly in a fenced
    block or surrounded by text (the first decodable ``{...}``); None for anything else."""
    if not isinstance(content, str):
        return None
    texts = [m.group(1) for m in _FENCED.finditer(content)] + [content]
    decoder = json.JSONDecoder()
    for text in texts:
        for i, ch in enumerate(text):
            if ch != "{":
                continue
            try:
                obj, _ = decoder.raw_decode(text, i)
            except ValueError:
                continue
            if isinstance(obj, dict):
                score = obj.get("score")
                ok = isinstance(score, int) and not isinstance(score, bool) and score in (-1, 0, 1)
                return score if ok else None
    return None


class HttpJudge(Judge):
    """A judge behind an OpenAI-compatible ``POST {base_url}/chat/completions``.

    Each turn is asked with ``prompt_template.format(question=..., history=..., turn=...)``
    (``history``: the decoded trajectory after the prompt, up to the turn; ``turn``: the
    decoded turn). Connection errors, timeouts, HTTP 429 and 5xx are retried up to
    ``max_retries`` times, sleeping ``backoff_s``, then twice as long each retry; other
    replies are final. A verdict not obtained counts as 0 and in ``failed``; ``judge`` never
    raises for a bad endpoint. At most ``max_concurrency`` requests are in flight. Verdicts are
    cached by ``sha256(model, prompt)``, so identical turns are asked once (failures are not
    cached). Counters: ``requests`` (HTTP attempts, retries included), ``cache_hits`` (turns
    answered without a request of their own), ``failures`` (turn verdicts not obtained).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt_template: str = DEFAULT_PROMPT,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_concurrency: int = 8,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.prompt_template = prompt_template
        self.api_key = api_key if api_key is not None else os.environ.get("TAPO_JUDGE_API_KEY")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.cache: dict[str, int] = {}
        self.requests = 0
        self.cache_hits = 0
        self.failures = 0
        self._lock = threading.Lock()

    def prompt(self, ep: Episode, t: int, decode: Decode) -> str:
        start, end = ep.turn_spans[t]
        history = decode(ep.token_ids[ep.prompt_len : start]).strip() or "(nothing yet)"
        turn = decode(ep.token_ids[start:end])
        return self.prompt_template.format(question=ep.example.question, history=history, turn=turn)

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.model}\x00{prompt}".encode()).hexdigest()

    def judge(self, episodes: Sequence[Episode], decode: Decode) -> list[TurnVerdicts]:
        prompts: dict[str, str] = {}  # distinct uncached prompts of this call
        keys: list[list[str]] = []
        for ep in episodes:
            row = []
            for t in range(len(ep.turn_spans)):
                prompt = self.prompt(ep, t, decode)
                key = self._key(prompt)
                if key in self.cache or key in prompts:
                    self.cache_hits += 1
                else:
                    prompts[key] = prompt
                row.append(key)
            keys.append(row)
        if prompts:
            workers = min(self.max_concurrency, len(prompts))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = dict(zip(prompts, pool.map(self._ask, prompts.values()), strict=True))
            self.cache.update({k: s for k, s in results.items() if s is not None})
        out = []
        for row in keys:
            raw = [self.cache.get(key) for key in row]
            failed = sum(s is None for s in raw)
            self.failures += failed
            out.append(TurnVerdicts(keep_first_penalty([s or 0 for s in raw]), failed))
        return out

    def _ask(self, prompt: str) -> int | None:
        """The verdict on one prompt (None when it could not be obtained)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.0,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            with self._lock:
                self.requests += 1
            try:
                request = urllib.request.Request(self.url, body, headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    payload = resp.read()
            except urllib.error.HTTPError as err:
                err.close()
                if err.code == 429 or err.code >= 500:
                    continue
                return None
            except (OSError, HTTPException):  # connection errors and timeouts
                continue
            except Exception:  # e.g. an invalid URL: not retried, never raised
                return None
            try:
                content = json.loads(payload)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return None
            return parse_verdict(content)
        return None


def tarl_reward(
    success: float,
    scores: Sequence[int],
    success_weight: float = 10.0,
    penalty: float = 5.0,
    bonus_cap: float = 5.0,
) -> float:
    """The trajectory reward from the outcome and the turn scores:

    ``success_weight * success - penalty * [some s_t == -1]
    + min(bonus_cap, bonus_cap / T * #{t: s_t == +1})``, with ``T = len(scores)``; without
    turns (``T == 0``) there is no bonus term. The bonus reaches ``bonus_cap`` only when every
    turn scores +1, so it rewards the share of useful turns, not their number.
    """
    r = success_weight * float(success)
    if any(s == -1 for s in scores):
        r -= penalty
    if scores:
        r += min(bonus_cap, bonus_cap / len(scores) * sum(s == 1 for s in scores))
    return r


def build_judge(kind: str, **options: Any) -> Judge:
    """A judge by name: ``rule`` (``RuleJudge``) or ``http`` (``HttpJudge(**options)``)."""
    if kind == "rule":
        return RuleJudge(**options)
    if kind == "http":
        return HttpJudge(**options)
    raise ValueError(f"unknown judge {kind!r}; expected 'rule' or 'http'")


def verdict_counts(verdicts: Sequence[TurnVerdicts]) -> dict[str, float]:
    """Totals over the verdicts: turns scored +1 (``pos``), 0 (``zero``), -1 (``neg``),
    verdicts not obtained (``failed``, also counted in ``zero``) and all ``turns``."""
    scores = [s for v in verdicts for s in v.scores]
    return {
        "pos": float(sum(s == 1 for s in scores)),
        "zero": float(sum(s == 0 for s in scores)),
        "neg": float(sum(s == -1 for s in scores)),
        "failed": float(sum(v.failed for v in verdicts)),
        "turns": float(len(scores)),
    }
