"""Front doors of the policy loss from logits or from hidden states.

``policy_loss_from_logits`` computes the selective log-softmax
``logp = log softmax(logits / temperature)[label]`` (and optionally the entropy) in fp32 and
the policy loss on it; its backward writes ``dlogits`` into a fresh tensor, or into the
logits buffer itself with ``inplace_backward=True``.

``policy_loss_from_hidden`` does the same from hidden states and the LM head weight without
ever materialising the ``(B*T, V)`` logits: tokens are processed in chunks, the backward
recomputes each chunk's logits, turns them into ``dlogits`` and multiplies them into
``dhidden``, ``dweight`` (accumulated in fp32) and ``dbias``. Peak extra memory is one chunk
of logits plus weight-sized accumulators, independent of ``T``.

These functions check the argument types, merge the loss preset and call the ops
``torch.ops.tapo.policy_loss_from_logits`` / ``_from_hidden``, whose kernels live in
``fused.py`` (the composite) and ``vocab.py`` / ``csrc/logprob.cpp`` / ``ops/`` (the
vocabulary passes). The math: docs/math.md, section 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _checks, _library  # noqa: F401  (_library registers the ops)
from . import knobs as _knobs
from .loss import PolicyLossOutput


@dataclass
class LogprobLossOutput(PolicyLossOutput):
    """The scalar loss (differentiable), its detached metrics, log-probabilities and entropies."""

    logp: Tensor  # [B, T] float32, detached
    # [B, T] float32; empty unless with_entropy=True. Differentiable: an entropy bonus such as
    # ``loss - c * (entropy * mask).sum() / mask.sum()`` backpropagates through both terms.
    entropy: Tensor


def _as_fp32(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The loss operates on fp32 log-probabilities: cast floating loss inputs (as the reference)."""
    return tuple(
        t.float() if t is not None and t.is_floating_point() and t.dtype != torch.float32 else t
        for t in tensors
    )


def policy_loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    call_map: Tensor | None = None,
    call_delta: Tensor | None = None,
    importance_weight: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    inplace_backward: bool = False,
    preset: str | None = None,
    **knobs: Any,
) -> LogprobLossOutput:
    """Policy loss on the log-probabilities of ``labels`` under ``logits / temperature``.

    Args:
        logits: ``(B, T, V)`` float32/bfloat16/float16 (a non-contiguous view such as
            ``logits[:, :-1]`` is read in place, not copied).
        labels: ``(B, T)`` int64 sampled tokens; negative entries mark ignored tokens and are
            only allowed where ``mask == 0``.
        old_logp, advantages, mask, ref_logp, call_map, call_delta, importance_weight, preset,
            **knobs: as
            ``tapo_kernels.policy_loss`` (floating inputs are cast to float32).
        temperature: the sampling temperature (``logits / temperature`` is what was sampled).
        with_entropy: also return the per-token entropy (one more multiply-add per logit).
        inplace_backward: the backward overwrites ``logits`` with ``d loss / d logits`` and
            returns that buffer as the gradient (no second ``(B, T, V)`` tensor). Only for
            logits that nothing else reads afterwards.

    Returns:
        ``LogprobLossOutput``: ``loss`` (differentiable w.r.t. ``logits``), ``metrics``,
        ``logp`` (fp32, detached) and ``entropy`` (fp32, empty when not asked; differentiable
        w.r.t. ``logits``, for an entropy bonus; its gradient joins the backward's pass over
        the logits, and with ``inplace_backward`` it is built in a new tensor, then copied
        into the logits buffer).
    """
    merged = _knobs.resolve(preset, knobs)
    _checks.op_tensors("policy_loss_from_logits", locals())
    _checks.number("temperature", temperature)
    loss_tensors = _as_fp32(
        old_logp, advantages, mask, ref_logp, call_map, call_delta, importance_weight
    )
    loss, metrics, logp, entropy = torch.ops.tapo.policy_loss_from_logits(
        logits, labels, *loss_tensors, temperature, with_entropy, inplace_backward, **merged
    )
    return LogprobLossOutput(loss, metrics, logp, entropy)


def policy_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    ref_logp: Tensor | None = None,
    call_map: Tensor | None = None,
    call_delta: Tensor | None = None,
    importance_weight: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    preset: str | None = None,
    **knobs: Any,
) -> LogprobLossOutput:
    """Policy loss on the log-probabilities of ``labels`` under ``linear(hidden, weight, bias)``.

    The ``(B*T, V)`` logits never exist: ``chunk_size`` tokens at a time (default: about 4M
    logits per chunk on the CPU, 64M on CUDA) are projected, reduced to log-probabilities and
    dropped; the backward recomputes them. Differentiable w.r.t. ``hidden``, ``weight`` and
    ``bias``; the weight gradient is accumulated in fp32.

    Args:
        hidden: ``(B, T, H)`` final hidden states.
        weight: ``(V, H)`` LM head weight (same dtype as ``hidden``); ``bias``: ``(V,)``.
        labels ... **knobs: as ``policy_loss_from_logits``.
    """
    merged = _knobs.resolve(preset, knobs)
    _checks.op_tensors("policy_loss_from_hidden", locals())
    _checks.number("temperature", temperature)
    loss_tensors = _as_fp32(
        old_logp, advantages, mask, ref_logp, call_map, call_delta, importance_weight
    )
    loss, metrics, logp, entropy = torch.ops.tapo.policy_loss_from_hidden(
        hidden, weight, bias, labels, *loss_tensors, temperature, with_entropy, chunk_size, **merged
    )
    return LogprobLossOutput(loss, metrics, logp, entropy)


def logprobs_from_logits(
    logits: Tensor, labels: Tensor, *, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities and entropies, differentiable through both.

    ``logp = log softmax(logits / temperature)[label]`` and
    ``entropy = -sum p log p`` of ``softmax(logits / temperature)``, in fp32 whatever the
    logits' dtype, for frameworks that compute log-probabilities inside their model forward
    (verl's ``logprobs_from_logits`` / ``entropy_from_logits``, TRL's
    ``selective_log_softmax``). No ``(B, T, V)`` fp32 copy is made in the forward; the
    backward recomputes the softmax chunk by chunk and writes one gradient tensor.

    Args:
        logits: ``(B, T, V)`` float32/bfloat16/float16.
        labels: ``(B, T)`` int64; a negative entry marks an ignored token (logp and entropy 0,
            no gradient).
        temperature: the sampling temperature.
        with_entropy: also compute the entropy (else an empty tensor is returned).

    Returns:
        ``(logp, entropy)``: ``(B, T)`` float32 each.
    """
    _checks.tensors(logits=logits, labels=labels)
    _checks.number("temperature", temperature)
    return torch.ops.tapo.logprobs_from_logits(logits, labels, temperature, with_entropy)


def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``logprobs_from_logits`` of ``linear(hidden, weight, bias)`` without the ``(B*T, V)``
    logits: ``chunk_size`` tokens at a time in the forward and again in the backward.

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` through both outputs; the weight
    gradient is accumulated in fp32.
    """
    _checks.tensors(hidden=hidden, weight=weight, bias=bias, labels=labels)
    _checks.number("temperature", temperature)
    return torch.ops.tapo.logprobs_from_hidden(
        hidden, weight, bias, labels, temperature, with_entropy, chunk_size
    )
