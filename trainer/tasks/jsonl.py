"""Questions from JSONL files.

Each line: ``{"question": str, "answer": str | [str, ...], "corpus": [str, ...] (optional),
"query": str (optional), "queries": [str, ...] (optional, a multi-call demonstration),
"evidence": [str, ...] or [[str, ...], ...] (optional: the gold documents, per hop, that make
a call good in the ground-truth statistics), "id": str (optional)}``. A line's own ``corpus`` becomes a corpus of
its own (identical corpora are shared); lines without one search the shared corpus from
``corpus_path`` (a ``.txt`` file with one document per line, or JSONL with ``{"text": ...}``).
Demonstrations for the warm-up come from ``demos_path`` (same format, ``query`` required).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .base import Example, TaskData


class TaskFileError(ValueError):
    """A JSONL line that does not describe a question."""


def _read_jsonl(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TaskFileError(
                    f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TaskFileError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            except RecursionError as exc:
                raise TaskFileError(f"{path}:{lineno}: JSON nested too deeply") from exc
            if not isinstance(obj, dict):
                raise TaskFileError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append((lineno, obj))
    return rows


def read_corpus(path: str | Path) -> list[str]:
    """Documents from a ``.txt`` (one per line) or ``.jsonl`` (``{"text": ...}``) file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        docs = []
        for lineno, obj in _read_jsonl(path):
            if not isinstance(obj.get("text"), str):
                raise TaskFileError(f"{path}:{lineno}: a corpus line needs a string 'text'")
            docs.append(obj["text"])
        return docs
    docs = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise TaskFileError(
                    f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from exc
            if line:
                docs.append(line)
    return docs


class _Corpora:
    def __init__(self, shared: list[str] | None) -> None:
        self.corpora: dict[int, list[str]] = {0: shared} if shared else {}
        self._ids: dict[tuple[str, ...], int] = {}

    def id_for(self, docs: list[str]) -> int:
        key = tuple(docs)
        if key not in self._ids:
            self._ids[key] = len(self.corpora) + (0 if 0 in self.corpora else 1)
            self.corpora[self._ids[key]] = list(docs)
        return self._ids[key]


def _examples(path: str | Path, corpora: _Corpora, need_query: bool = False) -> list[Example]:
    out = []
    for lineno, obj in _read_jsonl(path):
        where = f"{path}:{lineno}"
        question, answer = obj.get("question"), obj.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise TaskFileError(f"{where}: 'question' must be a non-empty string")
        answers = [answer] if isinstance(answer, str) else answer
        if (
            not isinstance(answers, list)
            or not answers
            or not all(isinstance(a, str) for a in answers)
        ):
            raise TaskFileError(
                f"{where}: 'answer' must be a string or a non-empty list of strings"
            )
        corpus = obj.get("corpus")
        if corpus is not None:
            if (
                not isinstance(corpus, list)
                or not all(isinstance(d, str) for d in corpus)
                or not corpus
            ):
                raise TaskFileError(f"{where}: 'corpus' must be a non-empty list of strings")
            corpus_id = corpora.id_for(corpus)
        else:
            corpus_id = 0
        query = obj.get("query")
        if query is not None and not isinstance(query, str):
            raise TaskFileError(f"{where}: 'query' must be a string")
        queries = obj.get("queries", [])
        if not isinstance(queries, list) or not all(isinstance(q, str) and q for q in queries):
            raise TaskFileError(f"{where}: 'queries' must be a list of non-empty strings")
        if need_query and not (query or queries):
            raise TaskFileError(f"{where}: demonstrations need a 'query' or 'queries'")
        evidence = obj.get("evidence", [])
        if isinstance(evidence, list) and all(isinstance(e, str) for e in evidence):
            evidence = [evidence] if evidence else []  # one hop
        if not isinstance(evidence, list) or not all(
            isinstance(hop, list) and hop and all(isinstance(d, str) and d for d in hop)
            for hop in evidence
        ):
            raise TaskFileError(
                f"{where}: 'evidence' must be a list of documents or a list of "
                "non-empty lists of documents (one per hop)"
            )
        uid = str(obj.get("id", f"{Path(path).stem}-{lineno}"))
        out.append(
            Example(
                uid,
                question,
                tuple(answers),
                corpus_id,
                query or None,
                tuple(queries),
                tuple(tuple(hop) for hop in evidence),
                "jsonl",
            )
        )
    return out


def load_jsonl_task(
    train_path: str | Path,
    eval_path: str | Path | None = None,
    corpus_path: str | Path | None = None,
    demos_path: str | Path | None = None,
    heldout_fraction: float = 0.25,
    seed: int = 0,
) -> TaskData:
    """Load the splits; without ``eval_path`` a seeded ``heldout_fraction`` of train is held out."""
    corpora = _Corpora(read_corpus(corpus_path) if corpus_path else None)
    train = _examples(train_path, corpora)
    if not train:
        raise TaskFileError(f"{train_path}: no questions")
    if eval_path is not None:
        heldout = _examples(eval_path, corpora)
    else:
        order = list(range(len(train)))
        random.Random(f"split-{seed}").shuffle(order)
        n = max(1, round(heldout_fraction * len(train))) if len(train) > 1 else 0
        heldout = [train[i] for i in order[:n]]
        train = [train[i] for i in order[n:]]
    demos = _examples(demos_path, corpora, need_query=True) if demos_path else []
    if 0 not in corpora.corpora:
        for ex in train + heldout + demos:
            if ex.corpus_id == 0:
                raise TaskFileError(
                    f"question {ex.uid!r} has no 'corpus' and no corpus_path is set"
                )
    return TaskData(train=train, heldout=heldout, demos=demos, corpora=corpora.corpora)
