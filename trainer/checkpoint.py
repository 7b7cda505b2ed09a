"""Atomic, verified distributed checkpoints (torch.distributed.checkpoint) with resume.

A checkpoint is a directory ``checkpoints/step_NNNNNN`` holding the DCP shards of the
model, the optimizer (and the frozen reference model when KL is on), ``trainer_state.json``
and, written last, ``manifest.json``: the step, the SHA-256 of the resolved config and the
SHA-256 and size of every other file. It is written to a hidden temporary directory and
renamed into place only when every rank has finished, so a kill at any moment leaves either
the previous checkpoint or the new one, never a partial one. The ``latest`` file names the
newest checkpoint (only a hint: resume also scans the directory). Older checkpoints beyond
``keep`` are deleted after the rename.

Loading never runs code from the run directory: a checkpoint is used only after its
manifest verifies (every file present, same size and hash, a well-formed state file), and
even then DCP's pickled ``.metadata`` is read by an unpickler that admits only the
checkpoint metadata classes, and non-tensor entries are read with ``weights_only=True``.
``resume_checkpoint`` takes the newest checkpoint that verifies and reports every newer one
it skipped (a truncated shard, a flipped bit, a missing or bad file).

``prepare_run_dir`` starts or continues a run directory: a fresh run replaces only the
trainer's own outputs, and only in a directory the trainer created.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.optim import Optimizer

from .config import RUN_MARKER, ConfigError
from .distributed import DistContext, barrier, broadcast_object

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
STATE_KEYS = {"phase": str, "rl_step": int, "global_step": int, "evals": dict}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (unverified, incomplete, or none to resume from)."""


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
    """Written to the end (the manifest is the last file of a checkpoint)."""
    return (path / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(path: Path, step: int, config_sha256: str) -> None:
    """Hash every file of a finished checkpoint directory into ``manifest.json``."""
    files = {
        p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in sorted(path.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    write_atomic(
        path / MANIFEST,
        json.dumps(
            {"step": step, "config_sha256": config_sha256, "files": files}, indent=1, sort_keys=True
        ),
    )


def verify_checkpoint(path: Path) -> str | None:
    """``None`` when the checkpoint verifies, else why not (nothing is unpickled here)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or ".metadata" not in files or STATE_FILE not in files:
            return "the manifest does not list .metadata and the state file"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable manifest ({type(exc).__name__}: {exc})"
    for name, entry in files.items():
        if not isinstance(name, str) or "/" in name or name.startswith(".."):
            return f"the manifest names a file outside the checkpoint: {name!r}"
        file = path / name
        try:
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != entry["bytes"]:
                return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['bytes']}"
            if _sha256(file) != entry["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest (corrupted)"
        except (OSError, KeyError, TypeError) as exc:
            return f"{name} cannot be checked ({type(exc).__name__}: {exc})"
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{STATE_FILE} is not valid JSON ({exc})"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a mapping"
    for key, tp in STATE_KEYS.items():
        if not isinstance(state.get(key), tp) or isinstance(state.get(key), bool):
            return f"{STATE_FILE}: '{key}' must be {tp.__name__}"
    return None


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


def resume_checkpoint(run_path: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a note for every newer one that did not."""
    root = checkpoint_dir(run_path)
    if not root.is_dir():
        return None, []
    skipped = []
    for path in sorted(root.glob("step_*"), reverse=True):
        if not path.is_dir():
            continue
        why = verify_checkpoint(path)
        if why is None:
            return path, skipped
        skipped.append(f"{path.name}: {why}")
    return None, skipped


# DCP metadata is a pickle: admit only the classes a checkpoint's metadata is made of
_SAFE_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
} | {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata refers to {module}.{name}, which a "
            "checkpoint never holds: refusing to load it"
        )


class _SafeReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose metadata is unpickled with a class allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """Non-tensor entries (optimizer hyper-parameters) are read with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _app_state(
    model: nn.Module, optimizer: Optimizer | None, ref_model: nn.Module | None
) -> dict[str, Any]:
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    if ref_model is not None:
        state["ref_model"] = get_model_state_dict(ref_model)
    return state


def save_checkpoint(
    run_path: Path,
    step: int,
    model: nn.Module,
    optimizer: Optimizer | None,
    trainer_state: dict[str, Any],
    ctx: DistContext,
    keep: int = 2,
    ref_model: nn.Module | None = None,
    config_sha256: str = "",
    before_commit: Callable[[], None] | None = None,
) -> Path:
    """Save atomically (collective: every rank calls it). Returns the final directory.

    ``before_commit`` (fault injection) runs on the main rank once the temporary directory is
    complete, just before it is renamed into place."""
    root = checkpoint_dir(run_path)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over by a run killed while saving
    barrier(ctx)
    with _quiet_single_process(ctx):
        dcp.save(
            _app_state(model, optimizer, ref_model),
            checkpoint_id=str(tmp),
            no_dist=not ctx.distributed,
        )
    barrier(ctx)
    if ctx.is_main:
        write_atomic(tmp / STATE_FILE, json.dumps(trainer_state, indent=1, sort_keys=True))
        write_manifest(tmp, step, config_sha256)  # last: it marks the checkpoint complete
        _fsync_dir(tmp)
        if before_commit is not None:
            before_commit()
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


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: Optimizer | None,
    ctx: DistContext,
    ref_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; returns the saved trainer state.

    Verify the checkpoint first (``verify_checkpoint``); loading itself unpickles nothing
    beyond checkpoint metadata and plain values.
    """
    state = _app_state(model, optimizer, ref_model)
    try:
        with _quiet_single_process(ctx), warnings.catch_warnings():
            dcp.load(
                state,
                storage_reader=_SafeReader(str(path)),
                planner=_SafePlanner(),
                no_dist=not ctx.distributed,
            )
    except (Exception, CheckpointException) as exc:  # DCP wraps each rank's error (a BaseException)
        refused = "refusing to load it" in str(exc) or "Weights only load failed" in str(exc)
        why = "it holds objects a checkpoint never holds" if refused else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {why}") from exc
    if optimizer is not None:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
    else:
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if ref_model is not None:
        set_model_state_dict(ref_model, state["ref_model"])
    trainer_state = None
    if ctx.is_main:
        trainer_state = json.loads((path / STATE_FILE).read_text())
    return broadcast_object(trainer_state, ctx)


# ---------------------------------------------------------------------- run directory


def find_resume_point(run_path: Path, ctx: DistContext, flag: str = "--resume") -> Path:
    """The newest verified checkpoint of the run (rank 0 decides, every rank gets the path).

    ``flag`` names the option that asked for it in the messages (``--resume``, ``--export``).
    Only reads the run directory; without a checkpoint that verifies it raises
    ``CheckpointError``."""
    found = None
    if ctx.is_main:
        path, skipped = resume_checkpoint(run_path)
        for note in skipped:
            print(f"{flag}: skipping checkpoint {note}", flush=True)
        found = None if path is None else str(path)
    found = broadcast_object(found, ctx)
    if found is None:
        hint = (
            "run without --resume to start afresh, which replaces the run's outputs"
            if flag == "--resume"
            else "train the run first; checkpoint.export_hf: true exports at the end of a run"
        )
        raise CheckpointError(
            f"{flag}: no checkpoint under {checkpoint_dir(run_path)} verifies; nothing "
            f"was changed ({hint})"
        )
    return Path(found)


# what a fresh run replaces in its run directory (nothing else there is ever touched);
# hf_model* is the Hugging Face export (trainer/export.py) and its unfinished or replaced copies
RUN_OUTPUT_FILES = ("metrics.jsonl", "summary.json", "wandb_run.json")
RUN_OUTPUT_DIRS = (
    "tensorboard",
    "checkpoints",
    "plots",
    "tokenizer",
    "hf_model",
    "hf_model.partial",
    "hf_model.old",
    "wandb",
)


def prepare_run_dir(path: Path, fresh: bool) -> None:
    """Mark ``path`` as this trainer's run directory; when ``fresh``, replace the outputs of
    an earlier run of the same name. Only a directory this trainer created (its marker file,
    or a run config) is ever cleared, and only the trainer's own outputs inside it."""
    if fresh and path.exists():
        if not path.is_dir():
            raise ConfigError(f"logging: {path} exists and is not a directory")
        own = (path / RUN_MARKER).is_file() or (path / "config.yaml").is_file()
        if not own and any(path.iterdir()):
            raise ConfigError(
                f"logging: {path} is not empty and was not created by "
                "tapo-train; choose another logging.name or logging.run_dir"
            )
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).touch()
    if not fresh:
        return
    for name in RUN_OUTPUT_FILES:
        (path / name).unlink(missing_ok=True)
    for name in RUN_OUTPUT_DIRS:
        if (path / name).is_symlink():
            (path / name).unlink()
        elif (path / name).is_dir():
            shutil.rmtree(path / name)
