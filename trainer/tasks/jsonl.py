"""Questions from JSONL and Parquet files.

A file's format follows its suffix: ``.parquet`` is read with ``pyarrow`` (a table with one
row per question, as Hugging Face ``datasets`` writes it), anything else as JSONL (one JSON
object per line). Errors name the file and the line (JSONL, 1-based) or the row (Parquet,
0-based, as ``datasets`` and ``pyarrow`` index it). In a Parquet file a null cell counts as
an absent key.

Two row layouts are read; a file's first row decides its layout and every row must follow it.

The question/answer layout: ``{"question": str, "answer": str | [str, ...], "corpus": [str,
...] (optional), "query": str (optional), "queries": [str, ...] (optional, a multi-call
demonstration), "evidence": [str, ...] or [[str, ...], ...] (optional: the gold documents,
per hop, that make a call good in the ground-truth statistics), "id": str (optional)}``. A
row's own ``corpus`` becomes a corpus of its own (identical corpora are shared); rows without
one search the shared corpus from ``corpus_path`` (a ``.txt`` file with one document per line,
JSONL with ``{"text": ...}``, or Parquet with a ``text`` column).

verl's RL layout: ``{"data_source": str, "prompt": [{"role": str, "content": str}, ...],
"ability": str, "reward_model": {"style": "rule", "ground_truth": str | [str, ...]},
"extra_info": {...}}`` (recognised by a ``reward_model`` key, or a ``prompt`` key in a row
without ``question`` and ``answer``; a verl row may keep other columns). The question is
the ``content`` of the prompt's last ``user`` message: the trainer frames every question with
its own ``rollout.system_prompt`` and ``rollout.prompt_template``, so a system message and
earlier turns of the file's prompt are not used. The accepted answers are
``reward_model.ground_truth`` (a string, a list of strings, or ``{"target": [...]}`` as
Search-R1's data writes it). The optional keys of the question/answer layout (``corpus``,
``query``, ``queries``, ``evidence``, ``id``) are read from the row, or else from its
``extra_info``.

Demonstrations for the warm-up come from ``demos_path`` (either layout, ``query`` or
``queries`` required).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .base import Example, TaskData


class TaskFileError(ValueError):
    """A task file, or a line or row of one, that does not describe a question."""


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


def _is_parquet(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".parquet"


def _read_parquet(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a Parquet file as plain Python values (null cells dropped)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise TaskFileError(
            f"{path}: reading Parquet files needs pyarrow (pip install pyarrow)"
        ) from exc
    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise TaskFileError(f"{path}: not a readable Parquet file ({exc})") from exc
    return [{k: v for k, v in row.items() if v is not None} for row in table.to_pylist()]


def _read_rows(path: str | Path) -> list[tuple[str, int, dict[str, Any]]]:
    """``(where, number, row)`` of each row: ``where`` names the file and the line (JSONL,
    1-based) or row (Parquet, 0-based) for error messages."""
    if _is_parquet(path):
        return [(f"{path}: row {i}", i, row) for i, row in enumerate(_read_parquet(path))]
    return [(f"{path}:{lineno}", lineno, obj) for lineno, obj in _read_jsonl(path)]


def read_corpus(path: str | Path) -> list[str]:
    """Documents from a ``.txt`` (one per line), ``.jsonl`` (``{"text": ...}``) or
    ``.parquet`` (a ``text`` column) file."""
    path = Path(path)
    if path.suffix == ".jsonl":
        docs = []
        for lineno, obj in _read_jsonl(path):
            if not isinstance(obj.get("text"), str):
                raise TaskFileError(f"{path}:{lineno}: a corpus line needs a string 'text'")
            docs.append(obj["text"])
        return docs
    if _is_parquet(path):
        docs = []
        for where, _, obj in _read_rows(path):
            if not isinstance(obj.get("text"), str):
                raise TaskFileError(f"{where}: a corpus row needs a string 'text'")
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


QA_LAYOUT, VERL_LAYOUT = "question/answer", "verl"
# keys of the question/answer layout that a verl row may carry, itself or in its extra_info
OPTIONAL_KEYS = ("id", "corpus", "query", "queries", "evidence")


def row_layout(row: dict[str, Any]) -> str | None:
    """The layout a row is written in (``QA_LAYOUT`` or ``VERL_LAYOUT``), by its keys; ``None``
    when it has the keys of neither."""
    if "reward_model" in row:
        return VERL_LAYOUT
    if "question" in row or "answer" in row:
        return QA_LAYOUT
    if "prompt" in row:
        return VERL_LAYOUT
    return None


def _verl_question(where: str, prompt: Any) -> str:
    """The content of the last user message of a verl ``prompt``."""
    if not isinstance(prompt, list) or not prompt:
        raise TaskFileError(f"{where}: 'prompt' must be a non-empty list of chat messages")
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise TaskFileError(
                f"{where}: 'prompt[{i}]' must be a chat message {{'role': ..., 'content': ...}}"
            )
    users = [m for m in prompt if m["role"] == "user"]
    if not users:
        raise TaskFileError(f"{where}: 'prompt' has no message with role 'user'")
    content = users[-1].get("content")
    if not isinstance(content, str) or not content.strip():
        raise TaskFileError(
            f"{where}: the last user message of 'prompt' must have a non-empty string 'content'"
        )
    return content


def _verl_answers(where: str, reward_model: Any) -> Any:
    """``reward_model.ground_truth`` of a verl row (its ``target`` when a mapping)."""
    if not isinstance(reward_model, dict):
        raise TaskFileError(f"{where}: 'reward_model' must be a mapping with a 'ground_truth'")
    truth = reward_model.get("ground_truth")
    if truth is None:
        raise TaskFileError(f"{where}: 'reward_model.ground_truth' is missing")
    if isinstance(truth, dict) and "target" in truth:
        truth = truth["target"]
    answers = [truth] if isinstance(truth, str) else truth
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise TaskFileError(
            f"{where}: 'reward_model.ground_truth' must be a string, a non-empty list of "
            "strings, or {'target': [...]}"
        )
    return truth


def _from_verl(where: str, row: dict[str, Any]) -> dict[str, Any]:
    """A verl-layout row as a question/answer row."""
    if "prompt" not in row:
        raise TaskFileError(f"{where}: a verl row needs a 'prompt' (a list of chat messages)")
    if "reward_model" not in row:
        raise TaskFileError(f"{where}: a verl row needs a 'reward_model' with a 'ground_truth'")
    extra = row.get("extra_info")
    extra = extra if isinstance(extra, dict) else {}
    out = {k: extra[k] for k in OPTIONAL_KEYS if extra.get(k) is not None}
    out.update({k: row[k] for k in OPTIONAL_KEYS if k in row})
    out["question"] = _verl_question(where, row["prompt"])
    out["answer"] = _verl_answers(where, row["reward_model"])
    return out


def _examples(path: str | Path, corpora: _Corpora, need_query: bool = False) -> list[Example]:
    out = []
    layout = None
    for where, number, obj in _read_rows(path):
        this = row_layout(obj)
        if this is None:
            raise TaskFileError(
                f"{where}: the row fits no task layout: it needs 'question' and 'answer', or "
                f"verl's 'prompt' and 'reward_model' (its keys: {sorted(obj)})"
            )
        layout = layout or this
        if this != layout:
            raise TaskFileError(
                f"{where}: the row is in the {this} layout but the file's first row in the "
                f"{layout} layout (one layout per file)"
            )
        if layout == VERL_LAYOUT:
            obj = _from_verl(where, obj)
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
        uid = str(obj.get("id", f"{Path(path).stem}-{number}"))
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
