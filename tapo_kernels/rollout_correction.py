"""Correction for a rollout engine whose log-probabilities differ from the trainer's.

A separate inference engine (vLLM, or another dtype or kernel set) samples from
``pi_rollout``, while the loss is computed against ``pi_old``, the trainer's own forward pass
over the same tokens. Truncated importance sampling reweights each token's policy-gradient
term by ``w = min(pi_old / pi_rollout, C)``; pass it as ``importance_weight`` to
``policy_loss`` and the logits / hidden-state front ends. The weight is a constant: no
gradient flows into it.
"""

from __future__ import annotations

import torch
from torch import Tensor

# log-ratios are clamped before exp, as the policy losses clamp theirs
_LOG_RATIO_BOUND = 20.0


def truncated_importance_weight(
    old_logp: Tensor, rollout_logp: Tensor, cap: float = 2.0, mask: Tensor | None = None
) -> Tensor:
    """``min(exp(clamp(old_logp - rollout_logp, -20, 20)), cap)`` per token, detached.

    Args:
        old_logp: ``(B, T)`` log-probabilities of the sampled tokens under the trainer's
            forward pass of the rollout policy.
        rollout_logp: ``(B, T)`` the engine's log-probabilities of the same tokens.
        cap: the truncation ``C > 0`` (verl's ``tis_imp_ratio_cap``; 2 is its default).
        mask: optional ``(B, T)``; the weight is 0 where ``mask == 0`` (those tokens never
            enter the loss, and whatever they hold is ignored).
    """
    if old_logp.shape != rollout_logp.shape:
        raise ValueError(
            f"rollout_logp must have the shape of old_logp {tuple(old_logp.shape)}, got "
            f"{tuple(rollout_logp.shape)}"
        )
    if not (cap > 0 and cap < float("inf")):
        raise ValueError(f"cap must be finite and > 0, got {cap}")
    log_ratio = (old_logp.detach() - rollout_logp.detach()).clamp(
        -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND
    )
    weight = log_ratio.exp().clamp(max=cap)
    if mask is not None:
        weight = torch.where(mask != 0, weight, torch.zeros_like(weight))
    return weight


def rollout_mismatch(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float | None = None
) -> dict[str, Tensor]:
    """How far the engine's log-probabilities are from the trainer's, over ``mask != 0``.

    Returns 0-d tensors (read them with one host sync):

    * ``abs_logp_diff``: mean ``|old_logp - rollout_logp|``;
    * ``max_abs_logp_diff``: its maximum;
    * ``kl_k3``: the k3 estimate of ``KL(pi_rollout || pi_old)`` from the rollout's samples,
      mean ``r - 1 - log r`` with ``r = pi_old / pi_rollout`` (>= 0, 0 when they agree);
    * ``truncated_frac`` (with ``cap``): the share of tokens whose ratio exceeds ``cap``.
    """
    live = mask != 0
    n = live.sum().clamp(min=1).to(torch.float64)
    d = torch.where(live, (old_logp.detach() - rollout_logp.detach()).double(), 0.0)
    d = d.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    k3 = torch.where(live, d.exp() - d - 1.0, 0.0)
    out = {
        "abs_logp_diff": d.abs().sum() / n,
        "max_abs_logp_diff": d.abs().max() if d.numel() else d.new_zeros(()),
        "kl_k3": k3.sum() / n,
    }
    if cap is not None:
        out["truncated_frac"] = (live & (d.exp() > cap)).sum() / n
    return out
