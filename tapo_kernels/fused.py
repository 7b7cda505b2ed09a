"""The fused loss kernels: the policy loss from logits or hidden states, on any device.

One composite per op: validate, run the vocabulary pass (log-probabilities, or ``dlogits`` in
the backward), run the policy loss. The vocabulary passes are the internal ops
``tapo::_logprob_rows``, ``_dlogits_rows``, ``_logprob_from_hidden`` and
``_logprob_from_hidden_backward``, whose kernel the dispatcher chooses: C++ on the CPU when
the native build is present (``csrc/logprob.cpp``), else chunked torch ops (``vocab.py``);
Triton on CUDA. The Triton launchers (``ops/logprob_loss.py``) run the same composites with
their kernels named directly (``Passes``), so the interpreter tests reach them on CPU tensors.
The math: docs/math.md, section 5.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _args, _checks, vocab


@dataclass(frozen=True)
class Passes:
    """The vocabulary passes and the loss a composite runs (signatures of the internal ops)."""

    logprob_rows: Callable
    dlogits_rows: Callable
    logprob_from_hidden: Callable
    logprob_from_hidden_backward: Callable
    # (logp, *loss tensors, **knobs) -> (loss, metrics), on arguments already validated
    loss: Callable


def _rows_contiguous(t: Tensor) -> bool:
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def _dispatched(op: str) -> Callable:
    """The internal op ``tapo::<op>`` (kernel chosen by the dispatcher); a tensor whose rows are
    strided along the vocabulary goes to the chunked torch pass, which takes any layout."""
    chunked = vocab.PASSES[op]

    def run(*args):
        if not all(_rows_contiguous(a) for a in args if isinstance(a, Tensor) and a.dim() == 3):
            return chunked(*args)
        return getattr(torch.ops.tapo, op)(*args)

    return run


def _dispatched_loss(logp: Tensor, *loss_tensors: Tensor | None, **knobs) -> tuple[Tensor, Tensor]:
    if logp.is_cuda:  # the front door validated the arguments: no second round of checks
        from .ops.policy_loss import policy_loss_triton

        return policy_loss_triton(logp, *loss_tensors, **knobs, validated=True)
    return torch.ops.tapo.policy_loss(logp, *loss_tensors, **knobs)


DISPATCHED = Passes(
    logprob_rows=_dispatched("_logprob_rows"),
    dlogits_rows=_dispatched("_dlogits_rows"),
    logprob_from_hidden=_dispatched("_logprob_from_hidden"),
    logprob_from_hidden_backward=_dispatched("_logprob_from_hidden_backward"),
    loss=_dispatched_loss,
)


def check_logp_finite(logp: Tensor, mask: Tensor) -> None:
    """Raise when a log-probability the loss reads is NaN or infinite."""
    if not logp.numel():
        return
    flags = _checks.Flags()
    flags.add(
        (~torch.isfinite(logp) & (mask != 0)).any(),
        "logits give a non-finite log-probability at a mask token "
        "(NaN or inf in the logits, or -inf at the label)",
    )
    flags.raise_first()


def _chunk(chunk_size: int | None, weight: Tensor) -> int:
    """Tokens per chunk of the LM-head passes: as asked, else the device's default."""
    return chunk_size or vocab.default_chunk_tokens(weight.shape[0], weight.device)


def _loss_on(logp: Tensor, call: dict, passes: Passes) -> tuple[Tensor, Tensor]:
    """The policy loss of a front-end call on its computed log-probabilities."""
    check_logp_finite(logp, call["mask"])
    return passes.loss(logp, *_args.loss_tensors(call), **_args.loss_knobs(call))


def policy_loss_from_logits_kernel(*args, passes: Passes = DISPATCHED, **kwargs):
    """``tapo::policy_loss_from_logits``: ``(loss, metrics, logp, entropy)``."""
    call = _args.bind("policy_loss_from_logits", args, kwargs)
    _checks.check_policy_loss_from_logits(call)
    logp, entropy = passes.logprob_rows(
        call["logits"], call["labels"], call["temperature"], call["with_entropy"]
    )
    return (*_loss_on(logp, call, passes), logp, entropy)


def policy_loss_from_hidden_kernel(*args, passes: Passes = DISPATCHED, **kwargs):
    """``tapo::policy_loss_from_hidden``: ``(loss, metrics, logp, entropy)``; the ``(B*T, V)``
    logits never exist (``chunk_size`` tokens at a time)."""
    call = _args.bind("policy_loss_from_hidden", args, kwargs)
    _checks.check_policy_loss_from_hidden(call)
    head = (call["hidden"], call["weight"], call["bias"], call["labels"])
    chunk = _chunk(call["chunk_size"], call["weight"])
    logp, entropy = passes.logprob_from_hidden(
        *head, call["temperature"], call["with_entropy"], chunk
    )
    return (*_loss_on(logp, call, passes), logp, entropy)


def selective_log_softmax_backward_kernel(
    grad_logp, logits, labels, logp, temperature=1.0, *, passes: Passes = DISPATCHED
):
    """``tapo::selective_log_softmax_backward``: a new ``dlogits`` in the logits' dtype."""
    _checks.check_selective_log_softmax_backward(grad_logp, logits, labels, logp, temperature)
    out = torch.empty_like(logits)
    passes.dlogits_rows(grad_logp, logits, labels, logp, temperature, out)
    return out


def selective_log_softmax_backward_inplace_kernel(
    grad_logp, logits, labels, logp, temperature=1.0, *, passes: Passes = DISPATCHED
):
    """``tapo::selective_log_softmax_backward_inplace``: overwrite ``logits`` with ``dlogits``."""
    _checks.check_selective_log_softmax_backward(grad_logp, logits, labels, logp, temperature)
    passes.dlogits_rows(grad_logp, logits, labels, logp, temperature, logits)


def selective_log_softmax_from_hidden_backward_kernel(*args, passes: Passes = DISPATCHED, **kwargs):
    """``tapo::selective_log_softmax_from_hidden_backward``: ``(dhidden, dweight, dbias)``."""
    call = _args.bind("selective_log_softmax_from_hidden_backward", args, kwargs)
    _checks.check_selective_log_softmax_from_hidden_backward(**call)
    call["chunk_size"] = _chunk(call["chunk_size"], call["weight"])
    return passes.logprob_from_hidden_backward(*call.values())  # the same order


def logprobs_from_logits_kernel(logits, labels, temperature=1.0, with_entropy=True):
    """``tapo::logprobs_from_logits``: fp32 ``(logp, entropy)``, the vocabulary pass alone."""
    _checks.check_logprobs_from_logits(logits, labels, temperature)
    return DISPATCHED.logprob_rows(logits, labels, temperature, with_entropy)


def logprobs_from_hidden_kernel(
    hidden, weight, bias, labels, temperature=1.0, with_entropy=True, chunk_size=None
):
    """``tapo::logprobs_from_hidden``: fp32 ``(logp, entropy)`` of ``linear(hidden, weight,
    bias)``, ``chunk_size`` tokens at a time."""
    _checks.check_logprobs_from_hidden(hidden, weight, bias, labels, temperature, chunk_size)
    chunk = _chunk(chunk_size, weight)
    return DISPATCHED.logprob_from_hidden(
        hidden, weight, bias, labels, temperature, with_entropy, chunk
    )


def logprobs_backward_kernel(
    grad_logp, grad_entropy, logits, labels, logp, entropy, temperature=1.0
):
    """``tapo::logprobs_backward``: ``d / d logits`` of ``sum grad_logp * logp + sum
    grad_entropy * entropy``, a new tensor in the logits' dtype: the vocabulary pass with its
    entropy term (C++ or chunked torch ops on the CPU, Triton on CUDA)."""
    _checks.check_selective_log_softmax_backward(grad_logp, logits, labels, logp, temperature)
    _checks.check_entropy_grad(grad_entropy, entropy, *logits.shape[:2])
    out = torch.empty_like(logits)
    DISPATCHED.dlogits_rows(
        grad_logp, logits, labels, logp, temperature, out, grad_entropy, entropy
    )
    return out


def logprobs_from_hidden_backward_kernel(
    grad_logp,
    grad_entropy,
    hidden,
    weight,
    bias,
    labels,
    logp,
    entropy,
    temperature=1.0,
    chunk_size=None,
    weight_grad=True,
    bias_grad=True,
):
    """``tapo::logprobs_from_hidden_backward``: ``(dhidden, dweight, dbias)`` of the
    log-probability and entropy terms, the logits recomputed chunk by chunk."""
    _checks.check_selective_log_softmax_from_hidden_backward(
        grad_logp, hidden, weight, bias, labels, logp, temperature, chunk_size
    )
    _checks.check_entropy_grad(grad_entropy, entropy, *hidden.shape[:2])
    head = (grad_logp, hidden, weight, bias, labels, logp, temperature)
    switches = (_chunk(chunk_size, weight), weight_grad, bias_grad)
    return DISPATCHED.logprob_from_hidden_backward(*head, *switches, grad_entropy, entropy)


# the standalone log-probability ops and the entropy-aware backward ops: one Python kernel for
# every device (the forward's vocabulary pass is chosen by the dispatcher)
LOGPROBS_KERNELS = {
    "logprobs_from_logits": logprobs_from_logits_kernel,
    "logprobs_from_hidden": logprobs_from_hidden_kernel,
    "logprobs_backward": logprobs_backward_kernel,
    "logprobs_from_hidden_backward": logprobs_from_hidden_backward_kernel,
}

KERNELS = {
    "policy_loss_from_logits": policy_loss_from_logits_kernel,
    "policy_loss_from_hidden": policy_loss_from_hidden_kernel,
    "selective_log_softmax_backward": selective_log_softmax_backward_kernel,
    "selective_log_softmax_backward_inplace": selective_log_softmax_backward_inplace_kernel,
    "selective_log_softmax_from_hidden_backward": selective_log_softmax_from_hidden_backward_kernel,
}
