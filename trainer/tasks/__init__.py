"""Datasets: the bundled synthetic search task, the bundled visual task (scenes to zoom
into), a loader of JSONL and Parquet files (``task.name=jsonl``: the question/answer layout or
verl's RL layout, see ``jsonl.py``), and the arithmetic task that can be mixed into any of
them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .arithmetic import arithmetic_task
from .base import Example, TaskData, draw_prompts
from .jsonl import TaskFileError, load_jsonl_task, read_corpus
from .synthetic import ATTRIBUTES, synthetic_task

if TYPE_CHECKING:
    from ..config import TaskConfig


def load_task(cfg: TaskConfig) -> TaskData:
    """The task a config names, with ``cfg.mix_task`` mixed in when ``cfg.mix_fraction > 0``
    (its training questions, and demonstrations in proportion to the mixed share)."""
    task = _main_task(cfg)
    if cfg.mix_fraction > 0:
        n_demos = max(16, round(len(task.demos) * cfg.mix_fraction))
        key = min(task.corpora, default=0)
        mixed = arithmetic_task(num_demos=n_demos, seed=cfg.seed, corpus_id=key)
        task.mix_train = mixed.train
        task.demos = task.demos + mixed.demos
    return task


def _main_task(cfg: TaskConfig) -> TaskData:
    if cfg.name == "visual":
        from .visual import visual_task

        return visual_task(
            cfg.num_scenes,
            cfg.heldout_fraction,
            cfg.num_demos,
            cfg.seed,
            kinds=cfg.scene_kinds,
            sloppy_demo_fraction=cfg.sloppy_demo_fraction,
        )
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
    "arithmetic_task",
    "draw_prompts",
    "load_jsonl_task",
    "load_task",
    "read_corpus",
    "synthetic_task",
]
