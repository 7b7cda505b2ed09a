"""Python front door of ``torch.ops.tapo.policy_loss``: presets and named metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _checks, _library  # noqa: F401  (_library registers the ops)
from . import knobs as _knobs
from .knobs import PRESETS  # noqa: F401  (public: tapo_kernels.PRESETS)
from .reference import METRIC_NAMES


@dataclass
class PolicyLossOutput:
    """The scalar loss (differentiable w.r.t. ``logp``) and its detached metrics."""

    loss: Tensor
    metrics: Tensor  # [6] float32, ordered as METRIC_NAMES

    def metrics_dict(self, prefix: str = "actor/") -> dict[str, float]:
        """Metrics as Python floats (one host sync)."""
        return {
            f"{prefix}{n}": float(v)
            for n, v in zip(METRIC_NAMES, self.metrics.tolist(), strict=True)
        }


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    call_map: Tensor | None = None,
    call_delta: Tensor | None = None,
    importance_weight: Tensor | None = None,
    preset: str | None = None,
    **knobs: Any,
) -> PolicyLossOutput:
    """GRPO / GSPO-token / SAPO policy loss with optional KL and the TAPO lift fused in.

    Args:
        logp: ``(B, T)`` log-probabilities of the sampled tokens under the current policy.
        old_logp: ``(B, T)`` log-probabilities under the rollout policy.
        advantages: ``(B,)`` per-row or ``(B, T)`` per-token advantages.
        mask: ``(B, T)`` 1 on policy-generated tokens (never on prompt, padding, tool output).
        ref_logp: ``(B, T)`` reference-policy log-probabilities (needed when ``kl_coef != 0``).
        call_map, call_delta: ``ToolCalls.call_map(B, T)`` and ``TapoResult.delta``: applies
            the TAPO lift ``a' = min(0, a + delta)`` to negative advantages inside call spans.
        importance_weight: ``(B, T)`` per-token weights ``>= 0`` on the policy-gradient term
            (not the KL term), e.g. the truncated importance ratio
            ``min(exp(old_logp - rollout_logp), C)`` that corrects for a rollout engine whose
            log-probabilities differ from the trainer's (``tapo_kernels.truncated_is_weight``).
            Applied after the TAPO lift; no gradient flows into it.
        preset: one of ``PRESETS`` (``grpo``, ``dapo``, ``dr_grpo``, ``gspo``, ``sapo``).
        **knobs: ``algo``, ``eps_low``, ``eps_high``, ``dual_clip_c``, ``tau_pos``, ``tau_neg``,
            ``kl_coef``, ``kl_type``, ``agg``, ``norm_const``, ``global_count``; they override
            the preset.
    """
    merged = _knobs.resolve(preset, knobs)
    _checks.op_tensors("policy_loss", locals())
    loss, metrics = torch.ops.tapo.policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        ref_logp,
        call_map,
        call_delta,
        importance_weight,
        **merged,
    )
    return PolicyLossOutput(loss, metrics)
