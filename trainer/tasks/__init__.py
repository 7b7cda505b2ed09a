"""Datasets: the bundled synthetic search task and a JSONL loader."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Example, TaskData
from .jsonl import TaskFileError, load_jsonl_task, read_corpus
from .synthetic import ATTRIBUTES, synthetic_task

if TYPE_CHECKING:
    from ..config import TaskConfig


def load_task(cfg: TaskConfig) -> TaskData:
    """The task a config names."""
    if cfg.name == "synthetic":
        return synthetic_task(
            cfg.num_entities,
            cfg.attributes,
            cfg.heldout_fraction,
            cfg.num_demos,
            cfg.seed,
            cfg.sloppy_demo_fraction,
            cfg.demos_from,
            kinds=cfg.kinds,
        )
    return load_jsonl_task(
        cfg.train_path,
        cfg.eval_path,
        cfg.corpus_path,
        cfg.demos_path,
        cfg.heldout_fraction,
        cfg.seed,
    )


__all__ = [
    "ATTRIBUTES",
    "Example",
    "TaskData",
    "TaskFileError",
    "load_jsonl_task",
    "load_task",
    "read_corpus",
    "synthetic_task",
]
