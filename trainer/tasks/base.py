"""Task records: questions with accepted answers, their corpora, and train / held-out splits."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field


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

    def demo_queries(self) -> tuple[str, ...]:
        """The queries a demonstration of this question issues, in order."""
        if self.queries:
            return self.queries
        return (self.query,) if self.query else ()

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


@dataclass
class TaskData:
    """Splits of a task and the corpora its questions refer to (``corpus_id`` -> documents)."""

    train: list[Example]
    heldout: list[Example]
    demos: list[Example] = field(default_factory=list)
    corpora: dict[int, list[str]] = field(default_factory=dict)
    mix_train: list[Example] = field(default_factory=list)  # a second task's training questions

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
