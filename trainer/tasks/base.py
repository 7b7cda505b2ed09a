"""Task records: questions with accepted answers, their corpora, and train / held-out splits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One question. ``query`` (optional) is a search query that finds the evidence; it
    drives the warm-up demonstrations. ``corpus_id`` selects the corpus the tools search."""

    uid: str
    question: str
    answers: tuple[str, ...]
    corpus_id: int = 0
    query: str | None = None


@dataclass
class TaskData:
    """Splits of a task and the corpora its questions refer to (``corpus_id`` -> documents)."""

    train: list[Example]
    heldout: list[Example]
    demos: list[Example] = field(default_factory=list)
    corpora: dict[int, list[str]] = field(default_factory=dict)

    def texts(self) -> Iterator[str]:
        """Every question, answer, query and document (tokenizer training text)."""
        for split in (self.train, self.heldout, self.demos):
            for ex in split:
                yield ex.question
                yield from ex.answers
                if ex.query:
                    yield ex.query
        for docs in self.corpora.values():
            yield from docs

    def summary(self) -> str:
        docs = sum(len(d) for d in self.corpora.values())
        return (f"{len(self.train)} train / {len(self.heldout)} held-out questions, "
                f"{len(self.demos)} demonstrations, {docs} documents in {len(self.corpora)} corpora")
