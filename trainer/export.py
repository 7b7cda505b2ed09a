"""The trained policy as a Hugging Face directory: ``<run_dir>/hf_model/``.

``export_hf`` gathers the full weights from FSDP2 shards one tensor at a time (every rank
takes part; only the main rank keeps CPU copies and writes) and saves them with the model's
own ``save_pretrained`` (config, generation config, safetensors, tied weights stored once),
plus the tokenizer and, for a vision-language policy, its image processor with the pixel
budget the policy was trained with (``model.max_pixels``). A causal LM loads back with
``transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")``, a
vision-language one with ``AutoModelForImageTextToText``. A checkpoint's tokenizer loads with
``AutoTokenizer`` as before; the tiny model's own byte-level BPE tokenizer loads with
``PreTrainedTokenizerFast.from_pretrained`` (for a ``qwen2`` config, transformers 5's
``AutoTokenizer`` builds Qwen2's tokenizer class, whose fixed pre-tokenizer splits text
differently).

The directory is written as ``hf_model.partial/`` and renamed into place only once it is
complete, so an existing export is replaced only by a finished one; a run killed while
exporting leaves the previous export (or none) and a ``hf_model.partial/`` that the next
export removes.

Two ways in: ``checkpoint.export_hf: true`` exports at the end of a run (after its final
checkpoint), and ``tapo-train --config ... --export`` (``export_from_checkpoint``) exports
the newest verified checkpoint of the run without training. The latter reads the run
directory only until the checkpoint has loaded: without one it fails and changes nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, find_resume_point, load_checkpoint
from .config import Config
from .distributed import DistContext, barrier, broadcast_object, full_state_items

HF_DIR = "hf_model"
PARTIAL_DIR = f"{HF_DIR}.partial"
OLD_DIR = f"{HF_DIR}.old"


def export_hf(
    run_path: Path,
    model: nn.Module,
    tokenizer,
    ctx: DistContext,
    dtype: torch.dtype | None = None,
    image_processor=None,
) -> Path:
    """Write ``model`` (plain or FSDP2-sharded) to ``run_path / "hf_model"``; returns that path.

    Collective: every rank must call it. ``dtype``: the floating dtype of the saved weights
    (``None`` keeps the model's). ``tokenizer`` and ``image_processor`` are saved with their
    ``save_pretrained`` when they have one."""
    final, partial, old = run_path / HF_DIR, run_path / PARTIAL_DIR, run_path / OLD_DIR
    if ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # left over by a killed export
    aliases = tied_names(model)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in full_state_items(model, dtype):  # collective when sharded
        if not ctx.is_main:
            continue
        # a tied weight is kept once, shared, so save_pretrained stores it once
        first = aliases.get(name)
        state[name] = state[first] if first in state else tensor.to("cpu", copy=True)
    if ctx.is_main:
        model.save_pretrained(partial, state_dict=state)
        state.clear()
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(partial)
        if image_processor is not None and hasattr(image_processor, "save_pretrained"):
            image_processor.save_pretrained(partial)
        _fsync_tree(partial)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


def tied_names(model: nn.Module) -> dict[str, str]:
    """``name -> first name`` for every parameter or buffer that ``model`` holds under more
    than one name (tied weights, e.g. the LM head and the input embedding)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _fsync_tree(path: Path) -> None:
    """Flush every file of ``path`` and the directory itself to disk before it is renamed."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def image_processor_of(cfg: Config, model: nn.Module):
    """The image processor of a vision-language policy (``None`` for a text-only one), as
    the trainer uses it: from ``model.path``, or the tiny model's ``tokenizer/`` directory."""
    from .vision import is_vision_model, load_image_processor

    if not is_vision_model(model):
        return None
    source = cfg.model.path or cfg.run_path / "tokenizer"
    return load_image_processor(source, cfg.model.max_pixels)


def export_from_checkpoint(cfg: Config) -> Path:
    """``--export``: load the newest verified checkpoint of ``cfg``'s run into the policy and
    write ``hf_model/``; no training. Collective under ``torchrun``.

    Raises ``CheckpointError`` (the run directory unchanged) when the run has no checkpoint
    that verifies, or no saved tokenizer for the tiny model; the checkpoint must match the
    config's model (a mismatch fails to load, also before anything is written)."""
    from .distributed import cleanup, init_distributed, shard_model
    from .modeling import DTYPES, build_policy

    ctx = init_distributed(cfg)
    try:
        run_path = cfg.run_path
        checkpoint = find_resume_point(run_path, ctx, flag="--export")
        tokenizer_dir = run_path / "tokenizer"
        missing = None
        if (
            ctx.is_main
            and cfg.model.path is None
            and not (tokenizer_dir / "tokenizer.json").is_file()
        ):
            missing = (
                f"--export: the run's tokenizer ({tokenizer_dir}) is missing; nothing was changed"
            )
        missing = broadcast_object(missing, ctx)
        if missing is not None:
            raise CheckpointError(missing)

        def no_texts():  # the tokenizer exists: build_policy never trains (nor writes) one
            raise CheckpointError(f"--export: the run's tokenizer ({tokenizer_dir}) is missing")

        model, tokenizer = build_policy(
            cfg.model, tokenizer_dir, no_texts, cfg.seed, ctx.is_main, lambda: barrier(ctx)
        )
        model.to(ctx.device)
        if ctx.fsdp:
            model = shard_model(model, ctx, cfg.dist.mixed_precision)
        load_checkpoint(checkpoint, model, None, ctx)
        path = export_hf(
            run_path,
            model,
            tokenizer,
            ctx,
            DTYPES[cfg.model.dtype],
            image_processor_of(cfg, model),
        )
        if ctx.is_main:
            print(f"exported {checkpoint} as a Hugging Face model: {path}", flush=True)
        return path
    finally:
        cleanup(ctx)
