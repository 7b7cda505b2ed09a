"""Input validation shared by the Python kernels (reference fallback and Triton launchers).

The C++ kernels perform the same checks natively (``csrc/``) with the same messages, so
that bad input gives the same clear error whichever backend runs. Every message names the
offending argument. Value problems raise ``ValueError``, dtype problems ``TypeError``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _args
from . import knobs as _knobs
from ._numbers import finite32
from ._numbers import number as number  # re-exported: the front doors call _checks.number

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOSS_DTYPES = (torch.float32, torch.float64)


def _dtype(name: str, t: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = "/".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")


def _shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _same_device(named: dict[str, object]) -> None:
    """Every tensor among ``named`` (e.g. a function's ``locals()`` at its top) on one device."""
    devices = {n: t.device for n, t in named.items() if isinstance(t, Tensor)}
    first_name, first = next(iter(devices.items()))
    for n, d in devices.items():
        if d != first:
            raise ValueError(
                f"all tensors must be on one device: {first_name} is on {first}, {n} is on {d}"
            )


class Flags:
    """Data-dependent checks collected as device booleans and read back with one host sync.

    ``add(bad, message)`` records a 0-d bool tensor (True = the check failed) and its error;
    ``raise_first()`` reads every flag at once (a single host sync on CUDA, however many
    checks) and raises ``ValueError`` with the message of the first failed check, so errors
    come in the order the checks were written.
    """

    def __init__(self) -> None:
        self.items: list[tuple[Tensor, str]] = []

    def add(self, bad: Tensor, message: str) -> None:
        self.items.append((bad.reshape(()), message))

    def raise_first(self) -> None:
        if not self.items:
            return
        failed = torch.stack([bad for bad, _ in self.items]).tolist()
        self.items, items = [], self.items
        for bad, (_, message) in zip(failed, items, strict=True):
            if bad:
                raise ValueError(message)


def _finite(flags: Flags, name: str, t: Tensor) -> None:
    if t.numel():
        flags.add(~torch.isfinite(t).all(), f"{name} contains NaN or inf")


def _finite_where(flags: Flags, name: str, t: Tensor, live: Tensor) -> None:
    """Finite wherever ``live`` (tokens with mask != 0); masked tokens may hold anything."""
    if t.numel():
        flags.add(
            (live & ~torch.isfinite(t)).any(),
            f"{name} contains NaN or inf at a token with mask != 0",
        )


def check_mask_values(mask: Tensor, flags: Flags | None = None) -> None:
    """A float mask is finite and in [0, 1] (a bool mask always is)."""
    if mask.dtype == torch.bool or not mask.numel():
        return
    own = flags is None
    flags = Flags() if own else flags
    flags.add(~torch.isfinite(mask).all(), "mask contains NaN or inf")
    flags.add(((mask < 0) | (mask > 1)).any(), "mask values must be in [0, 1]")
    if own:
        flags.raise_first()


def check_fused_correct(
    advantages: Tensor,
    seq_advantages: Tensor,
    group_ids: Tensor,
    call_seq: Tensor,
    call_start: Tensor,
    call_end: Tensor,
    call_tool: Tensor,
    call_key: Tensor,
    call_params: Tensor,
    tool_sim_kind: Tensor,
    theta: float,
    alpha_min: float,
    beta: float,
    *_switches: bool,
    **_named_switches: bool,
) -> None:
    """Validate every argument of ``tapo::fused_correct``; raise a clear error on the first
    problem (the switches ``batch_scope`` and ``coverage`` need no check)."""
    _same_device(locals())
    if advantages.dim() != 2:
        raise ValueError(f"advantages must be 2-D (B, T), got shape {tuple(advantages.shape)}")
    B, T = advantages.shape
    if B == 0:
        raise ValueError("advantages has no rows: the batch is empty")
    _dtype("advantages", advantages, (torch.float32,))
    _dtype("seq_advantages", seq_advantages, (torch.float32,))
    _shape("seq_advantages", seq_advantages, (B,))
    _dtype("group_ids", group_ids, (torch.int64,))
    _shape("group_ids", group_ids, (B,))
    if call_seq.dim() != 1:
        raise ValueError(f"call_seq must be 1-D (N,), got shape {tuple(call_seq.shape)}")
    N = call_seq.shape[0]
    for name, t in (
        ("call_seq", call_seq),
        ("call_start", call_start),
        ("call_end", call_end),
        ("call_tool", call_tool),
        ("call_key", call_key),
    ):
        _dtype(name, t, (torch.int64,))
        _shape(name, t, (N,))
    if call_params.dim() != 2 or call_params.shape[0] != N:
        raise ValueError(f"call_params must have shape (N={N}, D), got {tuple(call_params.shape)}")
    _dtype("call_params", call_params, _PARAM_DTYPES)
    if tool_sim_kind.dim() != 1:
        raise ValueError(
            f"tool_sim_kind must be 1-D (num_tools,), got shape {tuple(tool_sim_kind.shape)}"
        )
    _dtype("tool_sim_kind", tool_sim_kind, (torch.int64,))
    if not (math.isfinite(theta) and 0.0 <= theta <= 1.0):
        raise ValueError(f"theta must be in [0, 1], got {theta}")
    if not (math.isfinite(alpha_min) and 0.0 <= alpha_min <= 1.0):  # a confidence: in [0, 1]
        raise ValueError(f"alpha_min must be in [0, 1], got {alpha_min}")
    if not (finite32(beta) and beta >= 0.0):
        raise ValueError(f"beta must be finite and >= 0, got {beta}")

    # data-dependent checks: device flags, read back with one host sync (Flags)
    flags = Flags()
    if tool_sim_kind.numel():
        flags.add(
            ((tool_sim_kind != 0) & (tool_sim_kind != 1)).any(),
            "tool_sim_kind entries must be 0 (cosine) or 1 (iou)",
        )
    _finite(flags, "advantages", advantages)
    _finite(flags, "seq_advantages", seq_advantages)
    if N == 0:
        flags.raise_first()
        return
    _finite(flags, "call_params", call_params)
    flags.add(
        ((call_seq < 0) | (call_seq >= B)).any(),
        f"call_seq out of range: every entry must be in [0, B={B})",
    )
    flags.add(
        (call_start < 0).any() | (call_end > T).any(),
        f"call span out of range: need 0 <= call_start and call_end <= T={T}",
    )
    flags.add((call_start > call_end).any(), "call span with call_start > call_end")
    flags.add(
        (call_tool >= tool_sim_kind.numel()).any(),
        f"call_tool out of range: valid tool ids are [0, {tool_sim_kind.numel()}), "
        "< 0 marks an invalid call",
    )
    if call_params.shape[1] == 0:
        flags.add((call_tool >= 0).any(), "call_params must have D >= 1")
    if call_params.shape[1] < 4 and tool_sim_kind.numel():
        is_iou = (tool_sim_kind == 1)[call_tool.clamp(0, tool_sim_kind.numel() - 1)]
        flags.add(
            (is_iou & (call_tool >= 0)).any(),
            f"call_params needs D >= 4 for iou tools (a box is 4 numbers), "
            f"got D={call_params.shape[1]}",
        )
    # overlapping spans: sort the spans by (row, start) (empty spans last in their row, so
    # they never sit between two others) and compare neighbours
    nonempty = call_end > call_start
    key = call_seq.clamp(0, B) * (T + 2) + torch.where(nonempty, call_start.clamp(0, T), T + 1)
    order = torch.argsort(key)
    seq, start, end, live = call_seq[order], call_start[order], call_end[order], nonempty[order]
    overlap = (seq[1:] == seq[:-1]) & (start[1:] < end[:-1]) & live[1:] & live[:-1]
    flags.add(overlap.any(), "")
    try:
        flags.raise_first()
    except ValueError as err:
        if str(err):
            raise
        i = int(overlap.nonzero()[0, 0])  # the error path may sync again to name the spans
        raise ValueError(
            f"call_start/call_end: overlapping call spans in row {int(seq[i])} "
            f"([{int(start[i])}, {int(end[i])}) and [{int(start[i + 1])}, {int(end[i + 1])})): "
            "each token may belong to at most one call"
        ) from None


def tensors(**named: object) -> None:
    """Every argument a ``Tensor`` (``None`` allowed: optional arguments pass ``None``)."""
    for name, value in named.items():
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def op_tensors(op: str, named: dict[str, object]) -> None:
    """``tensors`` for the tensor arguments of ``tapo::<op>`` among ``named`` (e.g. a front
    door's ``locals()``, names as in the schema); a required one may not be ``None``."""
    for name, optional in _args.tensor_arguments(op):
        value = named.get(name)
        if value is None and not optional:
            raise TypeError(f"{name} must be a torch.Tensor, got NoneType")
        tensors(**{name: value})


def check_policy_loss(
    logp: Tensor | None,
    loss_tensors: tuple[Tensor | None, ...],
    knobs: dict[str, object],
    *,
    check_values: bool = True,
    logp_shape: tuple[int, int] | None = None,
    flags: Flags | None = None,
) -> None:
    """Validate every argument of ``tapo::policy_loss``; raise a clear error on the first problem.

    ``loss_tensors``: ``old_logp, advantages, mask, ref_logp, call_map, call_delta,
    importance_weight`` (schema order); ``knobs``: every loss setting by name. ``logp=None`` with ``logp_shape=(B, T)``:
    the arguments of a loss whose float32 log-probabilities are computed later (the logits
    and hidden-state front ends). With ``flags``, the data-dependent checks are added there
    for the caller to raise.
    """
    _knobs.check(knobs)
    old_logp, advantages, mask, ref_logp, call_map, call_delta, importance_weight = loss_tensors
    _same_device(locals())
    like = logp if logp is not None else torch.empty(logp_shape, dtype=torch.float32, device="meta")
    if like.dim() != 2:
        raise ValueError(f"logp must be 2-D (B, T), got shape {tuple(like.shape)}")
    B, T = like.shape
    _dtype("logp", like, _LOSS_DTYPES)
    for name, t in (
        ("old_logp", old_logp),
        ("ref_logp", ref_logp),
        ("importance_weight", importance_weight),
    ):
        if t is not None:
            _shape(name, t, (B, T))
            _dtype(name, t, (like.dtype,))
    if tuple(advantages.shape) not in ((B,), (B, T)):
        raise ValueError(
            f"advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}"
        )
    _dtype("advantages", advantages, (like.dtype,))
    _shape("mask", mask, (B, T))
    _dtype("mask", mask, (torch.bool, like.dtype))
    if (call_map is None) != (call_delta is None):
        raise ValueError("call_map and call_delta must be given together")
    if call_map is not None:
        _shape("call_map", call_map, (B, T))
        _dtype("call_map", call_map, (torch.int32,))
        if call_delta.dim() != 1:
            raise ValueError(f"call_delta must be 1-D (N,), got shape {tuple(call_delta.shape)}")
        _dtype("call_delta", call_delta, (like.dtype,))
    if knobs["kl_coef"] != 0.0 and ref_logp is None:
        raise ValueError("kl_coef != 0 needs ref_logp")
    if not check_values:
        return
    own = flags is None
    flags = Flags() if own else flags
    check_mask_values(mask, flags)
    live = mask != 0
    if logp is not None:  # None: the log-probabilities are computed by the caller
        _finite_where(flags, "logp", logp, live)
    _finite_where(flags, "old_logp", old_logp, live)
    _finite_where(flags, "advantages", advantages, live if advantages.dim() == 2 else live.any(1))
    if ref_logp is not None:
        _finite_where(flags, "ref_logp", ref_logp, live)
    if importance_weight is not None:
        _finite_where(flags, "importance_weight", importance_weight, live)
        flags.add(
            ((importance_weight < 0) & live).any(),
            "importance_weight must be >= 0 at every token with mask != 0",
        )
    if call_map is not None:
        _finite(flags, "call_delta", call_delta)
        n = call_delta.numel()
        if call_map.numel():
            flags.add(
                ((call_map < -1) | (call_map >= n)).any(),
                f"call_map out of range: entries must be -1 or in [0, N={n})",
            )
    if own:
        flags.raise_first()


# --------------------------------------------------------------------------------------
# fused front ends: policy loss from logits or from hidden states
# --------------------------------------------------------------------------------------

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def _check_labels(
    labels: Tensor, mask: Tensor, B: int, T: int, V: int, check_values: bool, flags: Flags
) -> None:
    """``labels`` is ``(B, T)`` int64 in ``[0, V)``, negative (ignored) only where ``mask == 0``."""
    _shape("labels", labels, (B, T))
    _dtype("labels", labels, (torch.int64,))
    if not check_values or labels.numel() == 0:
        return
    flags.add(
        (labels >= V).any(),
        f"labels out of range: entries must be < V={V} (negative marks an ignored token)",
    )
    if tuple(mask.shape) == (B, T):
        flags.add(
            ((labels < 0) & (mask != 0)).any(),
            "labels must be >= 0 wherever mask != 0 (a negative label marks an ignored token)",
        )


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}")


def _check_lm_head(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[int, int, int]:
    """``hidden`` ``(B, T, H)``, ``weight`` ``(V, H)``, ``bias`` ``(V,)`` or None; ``(B, T, V)``."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D (B, T, H), got shape {tuple(hidden.shape)}")
    B, T, H = hidden.shape
    _dtype("hidden", hidden, _LOGIT_DTYPES)
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"weight must have shape (V, H={H}), got {tuple(weight.shape)}")
    _dtype("weight", weight, (hidden.dtype,))
    V = weight.shape[0]
    if bias is not None:
        _shape("bias", bias, (V,))
        _dtype("bias", bias, (hidden.dtype,))
    return B, T, V


def _check_logits(logits: Tensor) -> tuple[int, int, int]:
    """``logits`` ``(B, T, V)`` with ``V > 0`` in a floating dtype; ``(B, T, V)``."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D (B, T, V), got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    if V == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    _dtype("logits", logits, _LOGIT_DTYPES)
    return B, T, V


def check_policy_loss_from_logits(call: dict[str, object], *, check_values: bool = True) -> None:
    """Validate every argument of ``tapo::policy_loss_from_logits`` (``call``: the bound
    arguments, ``_args.bind``).

    The loss tensors must be float32 (the log-probabilities are). The logits themselves are
    not scanned for NaN (that would cost a full read of them); a non-finite log-probability
    is reported after the forward computes it.
    """
    _same_device(call)
    B, T, V = _check_logits(call["logits"])
    _check_temperature(call["temperature"])
    _check_front_values(B, T, V, call, check_values)


def check_policy_loss_from_hidden(call: dict[str, object], *, check_values: bool = True) -> None:
    """Validate every argument of ``tapo::policy_loss_from_hidden`` (see the logits check)."""
    _same_device(call)
    B, T, V = _check_lm_head(call["hidden"], call["weight"], call["bias"])
    if V == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    _check_temperature(call["temperature"])
    _check_chunk_size(call["chunk_size"])
    _check_front_values(B, T, V, call, check_values)


def _check_front_values(
    B: int, T: int, V: int, call: dict[str, object], check_values: bool
) -> None:
    """The loss arguments and the labels of a front-end call; their value checks with one
    host sync."""
    flags = Flags()
    loss_tensors, knobs = _args.loss_tensors(call), _args.loss_knobs(call)
    check_policy_loss(
        None, loss_tensors, knobs, check_values=check_values, logp_shape=(B, T), flags=flags
    )
    _check_labels(call["labels"], call["mask"], B, T, V, check_values, flags)
    flags.raise_first()


def _check_grad_logp(grad_logp: Tensor, logp: Tensor, labels: Tensor, B: int, T: int) -> None:
    for name, t in (("grad_logp", grad_logp), ("logp", logp)):
        _shape(name, t, (B, T))
        _dtype(name, t, (torch.float32,))
    _shape("labels", labels, (B, T))
    _dtype("labels", labels, (torch.int64,))


def check_selective_log_softmax_backward(
    grad_logp: Tensor, logits: Tensor, labels: Tensor, logp: Tensor, temperature: float
) -> None:
    """Shapes, dtypes and devices of ``tapo::selective_log_softmax_backward(_inplace)``."""
    _same_device(locals())
    if logits.dim() != 3:
        raise ValueError(f"logits must be 3-D (B, T, V), got shape {tuple(logits.shape)}")
    B, T, _ = logits.shape
    _dtype("logits", logits, _LOGIT_DTYPES)
    _check_grad_logp(grad_logp, logp, labels, B, T)
    _check_temperature(temperature)


def check_selective_log_softmax_from_hidden_backward(
    grad_logp: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    logp: Tensor,
    temperature: float,
    chunk_size: int | None,
    **_switches: bool,
) -> None:
    """Shapes, dtypes and devices of ``tapo::selective_log_softmax_from_hidden_backward``
    (the switches ``weight_grad`` and ``bias_grad`` need no check)."""
    _same_device(locals())
    B, T, _ = _check_lm_head(hidden, weight, bias)
    _check_grad_logp(grad_logp, logp, labels, B, T)
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)


# --------------------------------------------------------------------------------------
# standalone log-probabilities (and entropies) from logits or hidden states
# --------------------------------------------------------------------------------------


def _check_label_range(labels: Tensor, B: int, T: int, V: int) -> None:
    """``labels`` ``(B, T)`` int64, each ``< V``; negative entries mark ignored tokens."""
    _shape("labels", labels, (B, T))
    _dtype("labels", labels, (torch.int64,))
    if labels.numel():
        flags = Flags()
        flags.add(
            (labels >= V).any(),
            f"labels out of range: entries must be < V={V} (negative marks an ignored token)",
        )
        flags.raise_first()


def check_logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float) -> None:
    """Arguments of ``tapo::logprobs_from_logits``."""
    _same_device(locals())
    B, T, V = _check_logits(logits)
    _check_temperature(temperature)
    _check_label_range(labels, B, T, V)


def check_logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    temperature: float,
    chunk_size: int | None,
) -> None:
    """Arguments of ``tapo::logprobs_from_hidden``."""
    _same_device(locals())
    B, T, V = _check_lm_head(hidden, weight, bias)
    if V == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    _check_temperature(temperature)
    _check_chunk_size(chunk_size)
    _check_label_range(labels, B, T, V)


def check_entropy_grad(grad_entropy: Tensor, entropy: Tensor, B: int, T: int) -> None:
    """``grad_entropy`` and ``entropy`` of the entropy-aware backward ops: ``(B, T)`` float32."""
    for name, t in (("grad_entropy", grad_entropy), ("entropy", entropy)):
        _shape(name, t, (B, T))
        _dtype(name, t, (torch.float32,))
