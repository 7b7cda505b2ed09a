"""Deterministic BM25 text search over local corpora (``bm25s``).

Results depend only on the query and the corpus: ties in score are broken by document
index, a query that shares no term with the corpus returns "no results", and one index is
built per corpus on first use.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import bm25s
import numpy as np

from .base import Tool, ToolArgumentError, ToolContext, ToolResult


class BM25Index:
    """BM25 over one list of documents; ``search`` returns ``(doc index, score)`` pairs."""

    def __init__(self, documents: Sequence[str]) -> None:
        if not documents:
            raise ValueError("a search corpus needs at least one document")
        self.documents = list(documents)
        self._retriever = bm25s.BM25()
        tokens = bm25s.tokenize(self.documents, stopwords="en", show_progress=False)
        if not tokens.vocab:
            raise ValueError(
                "a search corpus needs at least one indexable word (stop words "
                f"and punctuation are not indexed); its first document: "
                f"{self.documents[0][:80]!r}"
            )
        self._retriever.index(tokens, show_progress=False)
        self._vocab = tokens.vocab

    def search(self, query: str, top_k: int) -> list[tuple[int, float]]:
        words = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        words = [w for w in words if w in self._vocab]
        if not words:
            return []
        scores = np.asarray(self._retriever.get_scores(words), dtype=np.float64)
        # stable sort on -score: equal scores keep document order, so results are reproducible
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [(int(i), float(scores[i])) for i in order if scores[i] > 0]


class TextSearchTool(Tool):
    """``search(query)``: the ``top_k`` best BM25 matches in the question's corpus.

    TAPO compares searches by what they retrieved (``witness = "results"``): two queries
    that return the same documents asked for the same information, however they were
    worded, and two similar-looking queries that return different documents did not (on the
    bundled task, "Zorvex Quill" and "Zorvex Quill pet" share most character 3-grams but
    only the second finds the pet).
    """

    name = "search"
    description = "Search the document collection; returns the best matching documents."
    sim_kind = "cosine"
    witness = "results"
    required = {"query": str}
    optional = {"top_k": int}
    argument_schemas = {
        "query": {"description": "What to look for, in words."},
        "top_k": {"description": "How many documents to return."},
    }

    def __init__(
        self, corpora: Mapping[int, Sequence[str]], top_k: int = 1, max_top_k: int = 5
    ) -> None:
        self._corpora = dict(corpora)
        for corpus_id, docs in self._corpora.items():  # fail now, not at every search
            if not docs:
                raise ValueError(f"search corpus {corpus_id} has no documents")
            words = bm25s.tokenize([" ".join(docs)], stopwords="en", show_progress=False).vocab
            if not words:
                raise ValueError(
                    f"search corpus {corpus_id} has no indexable word (stop words "
                    "and punctuation are not indexed)"
                )
        self._indexes: dict[int, BM25Index] = {}
        self._lock = threading.Lock()
        self.top_k = top_k
        self.max_top_k = max_top_k

    def __getstate__(self) -> dict[str, Any]:  # worker processes build their own indexes
        state = dict(self.__dict__)
        state["_indexes"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def index(self, corpus_id: int) -> BM25Index:
        with self._lock:
            if corpus_id not in self._indexes:
                if corpus_id not in self._corpora:
                    raise KeyError(f"no corpus with id {corpus_id}")
                self._indexes[corpus_id] = BM25Index(self._corpora[corpus_id])
            return self._indexes[corpus_id]

    def check_arguments(self, arguments: Any) -> dict[str, Any]:
        arguments = super().check_arguments(arguments)
        if not arguments["query"].strip():
            raise ToolArgumentError("search needs a non-empty 'query'")
        top_k = arguments.get("top_k", self.top_k)
        if not 1 <= top_k <= self.max_top_k:
            raise ToolArgumentError(f"top_k must be in [1, {self.max_top_k}], got {top_k}")
        return arguments

    def schema(self) -> dict[str, Any]:
        """The base schema, with ``top_k``'s bounds and default."""
        schema = super().schema()
        top_k = schema["function"]["parameters"]["properties"]["top_k"]
        top_k.update(minimum=1, maximum=self.max_top_k, default=self.top_k)
        return schema

    def run(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        index = self.index(context.corpus_id)
        hits = index.search(arguments["query"], int(arguments.get("top_k", self.top_k)))
        if not hits:
            return ToolResult("no results")
        docs = tuple(index.documents[i] for i, _ in hits)
        return ToolResult(" ".join(docs), refs=docs)

    def param_text(self, arguments: dict[str, Any]) -> str:
        return arguments["query"]
