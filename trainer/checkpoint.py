"""Atomic distributed checkpoints (torch.distributed.checkpoint) with resume.

A checkpoint is a directory ``checkpoints/step_NNNNNN`` holding the DCP shards of the
model, the optimizer (and the frozen reference model when KL is on) plus
``trainer_state.json``. It is written to a hidden temporary directory and renamed into
place only when every rank has finished and the state file is on disk, so a kill at any
moment leaves either the previous checkpoint or the new one, never a partial one. The
``latest`` file names the newest complete checkpoint (it is only a hint: resume also scans
the directory). Older checkpoints beyond ``keep`` are deleted after the rename.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.optim import Optimizer

from .distributed import DistContext, barrier, broadcast_object

STATE_FILE = "trainer_state.json"


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _quiet_single_process(ctx: DistContext):
    """DCP warns that it assumes one process when no group exists; that is intended here."""
    with warnings.catch_warnings():
        if not ctx.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / STATE_FILE).is_file()


def checkpoint_dir(run_path: Path) -> Path:
    return run_path / "checkpoints"


def latest_checkpoint(run_path: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(run_path)
    if not root.is_dir():
        return None
    hint = root / "latest"
    if hint.is_file():
        candidate = root / hint.read_text().strip()
        if _complete(candidate):
            newer = [p for p in root.glob("step_*") if p.name > candidate.name and _complete(p)]
            if not newer:
                return candidate
    done = sorted(p for p in root.glob("step_*") if _complete(p))
    return done[-1] if done else None


def _app_state(model: nn.Module, optimizer: Optimizer | None,
               ref_model: nn.Module | None) -> dict[str, Any]:
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    if ref_model is not None:
        state["ref_model"] = get_model_state_dict(ref_model)
    return state


def save_checkpoint(run_path: Path, step: int, model: nn.Module, optimizer: Optimizer | None,
                    trainer_state: dict[str, Any], ctx: DistContext, keep: int = 2,
                    ref_model: nn.Module | None = None) -> Path:
    """Save atomically (collective: every rank calls it). Returns the final directory."""
    root = checkpoint_dir(run_path)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over by a run killed while saving
    barrier(ctx)
    with _quiet_single_process(ctx):
        dcp.save(_app_state(model, optimizer, ref_model), checkpoint_id=str(tmp),
                 no_dist=not ctx.distributed)
    barrier(ctx)
    if ctx.is_main:
        write_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=1, sort_keys=True))
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step after a resume: replace it
            old = root / f".old_step_{step:06d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        write_atomic(root / "latest", final.name)
        for stale in sorted(p for p in root.glob("step_*") if _complete(p))[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    barrier(ctx)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: Optimizer | None, ctx: DistContext,
                    ref_model: nn.Module | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; returns the saved trainer state."""
    state = _app_state(model, optimizer, ref_model)
    with _quiet_single_process(ctx):
        dcp.load(state, checkpoint_id=str(path), no_dist=not ctx.distributed)
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if ref_model is not None:
        set_model_state_dict(ref_model, state["ref_model"])
    trainer_state = None
    if ctx.is_main:
        trainer_state = json.loads((path / STATE_FILE).read_text())
    return broadcast_object(trainer_state, ctx)
