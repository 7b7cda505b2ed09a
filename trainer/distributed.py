"""Process group, device, FSDP2 sharding and small collective helpers.

``torchrun`` sets ``RANK``/``WORLD_SIZE``; without it the trainer runs as one process
without FSDP (``dist.fsdp=on`` still builds a one-rank group to exercise the FSDP path).
NCCL on GPUs, gloo on CPUs. Sharding follows torchtitan: ``fully_shard`` on every decoder
block, then on the root; ``MixedPrecisionPolicy`` (bf16 parameters, fp32 gradient
reduction) only on CUDA, since CPU runs keep fp32.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import Config, ConfigError
from .modeling import decoder_layers


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    fsdp: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: Config) -> DistContext:
    """Start the process group when launched by torchrun (or when ``dist.fsdp=on``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.rl.prompts_per_step % world:
        raise ConfigError(
            f"rl.prompts_per_step ({cfg.rl.prompts_per_step}) must be divisible "
            f"by the number of processes ({world})"
        )
    if cfg.warmup.steps and cfg.warmup.batch_size % world:
        raise ConfigError(
            f"warmup.batch_size ({cfg.warmup.batch_size}) must be divisible by "
            f"the number of processes ({world})"
        )
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was requested but no CUDA device is available")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    want_fsdp = cfg.dist.fsdp == "on" or (cfg.dist.fsdp == "auto" and world > 1)
    if world > 1 and cfg.dist.fsdp == "off":
        raise ConfigError("dist.fsdp: 'off' is only supported in a single process (use auto or on)")
    if want_fsdp and not dist.is_initialized():
        backend = (
            cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if use_cuda else "gloo")
        )
        if backend == "nccl" and not use_cuda:
            raise ConfigError("dist.backend: nccl needs CUDA devices; use gloo on CPU")
        if world == 1:  # a one-rank group, so the FSDP code path also runs without torchrun
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            device_id=device if backend == "nccl" else None,
        )
    threads = cfg.dist.threads_per_rank or max(
        1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))
    )
    if device.type == "cpu":
        torch.set_num_threads(threads)
    return DistContext(rank, world, local_rank, device, want_fsdp)


def frozen_dtype(cfg: Config, ctx: DistContext) -> torch.dtype | None:
    """The dtype of frozen model copies: on GPUs with mixed precision they compute in the
    same low precision as the trained model; otherwise they keep the model's dtype."""
    if ctx.device.type != "cuda" or cfg.dist.mixed_precision == "off":
        return None
    return torch.bfloat16 if cfg.dist.mixed_precision == "bf16" else torch.float16


def shard_model(
    model: nn.Module,
    ctx: DistContext,
    mixed_precision: str = "bf16",
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder block, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"reshard_after_forward": reshard_after_forward}
    if ctx.device.type == "cuda" and mixed_precision != "off":
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in decoder_layers(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    if hasattr(model, "hidden_loss"):  # modeling.attach_hidden_loss: a second forward method
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "hidden_loss")
    return model


@torch.no_grad()
def copy_full_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy (all-gathering FSDP2 shards if needed) every parameter of ``src`` into ``dst``.

    Collective when ``src`` is sharded: every rank must call it.
    """
    dst_params = dict(dst.named_parameters())
    for name, param in src.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        dst_params[name].copy_(full.to(dst_params[name].dtype))


def full_state_items(model: nn.Module, dtype: torch.dtype | None = None):
    """``(name, full tensor)`` of every entry of ``model.state_dict()`` (the checkpoint's
    names, tied weights under each of their names), gathered from FSDP2 shards one at a time;
    floating tensors cast to ``dtype``. Collective when sharded: every rank must consume it
    in full, in the same order."""
    for name, t in model.state_dict().items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        full = full.detach()
        yield name, full.to(dtype) if dtype is not None and full.is_floating_point() else full


def all_reduce_sum(values: list[float] | Tensor, ctx: DistContext) -> Tensor:
    """Element-wise sum over ranks (fp64 on the CPU for gloo, the device for NCCL)."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if ctx.distributed and ctx.world > 1:
        t = t.to(ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def all_reduce_max(value: float, ctx: DistContext) -> float:
    """The largest ``value`` over ranks."""
    t = torch.tensor([value], dtype=torch.float64)
    if ctx.distributed and ctx.world > 1:
        t = t.to(ctx.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj, ctx: DistContext):
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(ctx: DistContext) -> None:
    # (a vLLM rollout engine's shutdown may already have destroyed the default group)
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
