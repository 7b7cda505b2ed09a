"""The supervised warm-up: next-token NLL on demonstrations before RL.

Demonstrations are ideal episodes built exactly like rollouts (``rollout/demos.py``), so the
warm-up teaches the token sequences the sampler will produce: the call format, copying
names into queries and answers out of observations. Each step draws ``batch_size``
demonstrations (seeded by step, split over ranks), with its own AdamW and an optional
cosine schedule; non-finite steps are skipped and logged.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .config import WarmupConfig
from .distributed import DistContext, all_reduce_sum
from .loss import Losses, clip_and_step
from .metrics import MetricsLogger
from .rollout import Episode, collate


def supervised_warmup(
    model: nn.Module,
    losses: Losses,
    demos: Sequence[Episode],
    cfg: WarmupConfig,
    ctx: DistContext,
    *,
    pad_id: int,
    grad_clip: float,
    seed_of: Callable[[int], int],
    logger: MetricsLogger,
    bar=None,
    image_pad_id: int | None = None,
) -> None:
    """``cfg.steps`` optimizer steps; ``seed_of(step)`` seeds each step's draw of demos."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99)
    )
    model.train()
    for step in range(1, cfg.steps + 1):
        if cfg.schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / cfg.steps))
        rng = random.Random(seed_of(step))
        picks = [rng.randrange(len(demos)) for _ in range(cfg.batch_size)][ctx.rank :: ctx.world]
        batch = collate([demos[i] for i in picks], pad_id, image_pad_id=image_pad_id)
        batch = batch.to(ctx.device)
        loss_sum = losses.warmup_backward(model, batch)
        norm, ok = clip_and_step(model, optimizer, grad_clip, math.isfinite(loss_sum), ctx)
        mean_loss = all_reduce_sum([loss_sum], ctx)[0].item() / ctx.world
        if step % 10 == 0 or step == cfg.steps:
            logger.log(
                step,
                {
                    "phase": "warmup",
                    "warmup/loss": mean_loss,
                    "warmup/grad_norm": norm,
                    "warmup/skipped": int(not ok),
                },
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.3f}")
