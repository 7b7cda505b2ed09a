"""Python front door of ``torch.ops.tapo.policy_loss``: presets and named metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _checks, _library  # noqa: F401  (_library registers the ops)
from .reference import METRIC_NAMES

# Named presets matching the public recipes (SPEC section 3). Any knob can be overridden.
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(algo="grpo", eps_low=0.2, eps_high=0.2, dual_clip_c=3.0, kl_type="k3",
                 agg="seq-mean-token-mean"),
    "dapo": dict(algo="grpo", eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, agg="token-mean"),
    "dr_grpo": dict(algo="grpo", eps_low=0.2, eps_high=0.2, dual_clip_c=3.0,
                    agg="seq-mean-token-sum-norm"),
    "gspo": dict(algo="gspo", eps_low=3e-4, eps_high=4e-4, dual_clip_c=0.0,
                 agg="seq-mean-token-mean"),
    "sapo": dict(algo="sapo", tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean"),
}

_KNOBS = ("algo", "eps_low", "eps_high", "dual_clip_c", "tau_pos", "tau_neg", "kl_coef",
          "kl_type", "agg", "norm_const", "global_count")
# the op schema's defaults, used when neither a preset nor the caller sets a knob
DEFAULT_KNOBS: dict[str, Any] = dict(algo="grpo", eps_low=0.2, eps_high=0.2, dual_clip_c=3.0,
                                     tau_pos=1.0, tau_neg=1.05, kl_coef=0.0, kl_type="k3",
                                     agg="token-mean", norm_const=None, global_count=None)


def resolve_knobs(preset: str | None, knobs: dict[str, Any]) -> dict[str, Any]:
    """Every loss knob: schema defaults, then the preset, then ``knobs``; types and ranges
    checked with errors that name the knob (``TypeError`` / ``ValueError``)."""
    unknown = set(knobs) - set(_KNOBS)
    if unknown:
        raise TypeError(f"unknown policy loss arguments {sorted(unknown)}; expected {list(_KNOBS)}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    merged = {**DEFAULT_KNOBS, **(PRESETS[preset] if preset else {}), **knobs}
    _checks.check_loss_knobs(**merged)
    return merged


@dataclass
class PolicyLossOutput:
    """The scalar loss (differentiable w.r.t. ``logp``) and its detached metrics."""

    loss: Tensor
    metrics: Tensor  # [4] float32, ordered as METRIC_NAMES

    def metrics_dict(self, prefix: str = "actor/") -> dict[str, float]:
        """Metrics as Python floats (one host sync)."""
        return {f"{prefix}{n}": float(v) for n, v in zip(METRIC_NAMES, self.metrics.tolist(), strict=True)}


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    call_map: Tensor | None = None,
    call_delta: Tensor | None = None,
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
        preset: one of ``PRESETS`` (``grpo``, ``dapo``, ``dr_grpo``, ``gspo``, ``sapo``).
        **knobs: ``algo``, ``eps_low``, ``eps_high``, ``dual_clip_c``, ``tau_pos``, ``tau_neg``,
            ``kl_coef``, ``kl_type``, ``agg``, ``norm_const``, ``global_count``; they override
            the preset.
    """
    merged = resolve_knobs(preset, knobs)
    _checks.tensors(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask,
                    ref_logp=ref_logp, call_map=call_map, call_delta=call_delta)
    loss, metrics = torch.ops.tapo.policy_loss(
        logp, old_logp, advantages, mask, ref_logp, call_map, call_delta, **merged
    )
    return PolicyLossOutput(loss, metrics)
