"""Task records: questions with accepted answers, their corpora, and train / held-out splits."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One question.

    ``query`` (optional) is a search query that finds the evidence of a one-call question;
    ``queries`` lists the queries of a multi-call question in order (the warm-up
    demonstrations issue them); ``corpus_id`` selects the corpus the tools search.
    ``evidence`` (optional) is the ground truth of the question: per hop, the documents that
    answer it. A tool call is *good* when its observation contains one of them; the trainer
    logs how often failing trajectories hold good calls and whether TAPO lifted them.
    ``kind`` names the question kind (the synthetic task's ``single``, ``two_fact``,
    ``two_hop``; ``jsonl`` for loaded questions); ``task`` names the task it comes from
    (``main``, or the mixed-in task's name), for per-task metrics. ``tool`` / ``tool_arg``:
    the tool a demonstration calls with each of its queries, and the argument they fill.
    """

    uid: str
    question: str
    answers: tuple[str, ...]
    corpus_id: int = 0
    query: str | None = None
    queries: tuple[str, ...] = ()
    evidence: tuple[tuple[str, ...], ...] = ()
    kind: str = "single"
    task: str = "main"
    tool: str = "search"
    tool_arg: str = "query"
    images: int = 0  # images attached to the question (the visual task's scene: image 0)
    calls: tuple[str, ...] = ()  # demonstration calls as JSON {"name", "arguments"} (any tool)
    gold_box: tuple[float, float, float, float] | None = None  # the region that answers it

    def demo_calls(self) -> list[tuple[str, dict]]:
        """``(tool name, arguments)`` of each call a demonstration makes, in order: ``calls``
        when given, else one ``tool`` call per query filling ``tool_arg``."""
        if self.calls:
            out = []
            for text in self.calls:
                call = json.loads(text)
                out.append((call["name"], call["arguments"]))
            return out
        return [(self.tool, {self.tool_arg: q}) for q in self.demo_queries()]

    def demo_queries(self) -> tuple[str, ...]:
        """The queries a demonstration of this question issues, in order."""
        if self.queries:
            return self.queries
        return (self.query,) if self.query else ()

    def is_good_call(self, observation: str, box: Sequence[float] | None = None) -> bool | None:
        """Ground truth of one call: a region call (``box``: the region it showed) is good
        when it covers the question's ``gold_box`` with IoU >= 0.5; any other call when its
        observation holds gold evidence (``None`` without ground truth)."""
        if box is not None and self.gold_box is not None:
            return box_iou(box, self.gold_box) >= 0.5
        return self.is_good_observation(observation)

    def evidence_docs(self) -> tuple[str, ...]:
        """Every gold evidence document of the question (all hops)."""
        return tuple(doc for hop in self.evidence for doc in hop)

    def is_good_observation(self, observation: str) -> bool | None:
        """Whether an observation holds gold evidence (``None`` without ground truth): one of
        the documents, not as part of a longer word or number ("45" is not in "450" or
        "-45")."""
        if not self.evidence:
            return None
        return any(
            re.search(rf"(?<![\w.-]){re.escape(doc)}(?![\w]|\.\d)", observation)
            for doc in self.evidence_docs()
        )


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes ``(x1, y1, x2, y2)`` (0 when both are empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class TaskData:
    """Splits of a task and the corpora its questions refer to (``corpus_id`` -> documents)."""

    train: list[Example]
    heldout: list[Example]
    demos: list[Example] = field(default_factory=list)
    corpora: dict[int, list[str]] = field(default_factory=dict)
    mix_train: list[Example] = field(default_factory=list)  # a second task's training questions
    scenes: Any = None  # the visual task's SceneBook (renders the images its questions show)

    def texts(self) -> Iterator[str]:
        """Every question, answer, query and document (tokenizer training text)."""
        for split in (self.train, self.heldout, self.demos, self.mix_train):
            for ex in split:
                yield ex.question
                yield from ex.answers
                yield from ex.demo_queries()
        for docs in self.corpora.values():
            yield from docs

    def summary(self) -> str:
        docs = sum(len(d) for d in self.corpora.values())
        kinds = sorted({ex.kind for ex in self.train})
        mix = "" if kinds == ["single"] else f" ({', '.join(kinds)})"
        if self.mix_train:
            mix += f" + {len(self.mix_train)} {self.mix_train[0].task} questions mixed in"
        return (
            f"{len(self.train)} train / {len(self.heldout)} held-out questions{mix}, "
            f"{len(self.demos)} demonstrations, {docs} documents in {len(self.corpora)} corpora"
        )


def draw_prompts(task: TaskData, n: int, mix_fraction: float, rng: random.Random) -> list[Example]:
    """``n`` training questions of a step: ``round(n * mix_fraction)`` from the mixed-in
    task (when it has questions), the rest from the main task; each part without repeats
    unless it has fewer questions than asked."""
    n_mix = round(n * mix_fraction) if task.mix_train else 0

    def sample(pool: list[Example], k: int) -> list[Example]:
        picks = rng.sample(range(len(pool)), min(k, len(pool)))
        while len(picks) < k:  # tiny tasks: repeat questions
            picks.append(rng.randrange(len(pool)))
        return [pool[i] for i in picks]

    return sample(task.train, n - n_mix) + sample(task.mix_train, n_mix)
