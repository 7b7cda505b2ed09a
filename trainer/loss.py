"""The loss side of a training step: from a collated batch to gradients and named metrics.

``loss_knobs`` resolves a run's policy-loss settings through the package
(``tapo_kernels.knobs.resolve``: the ``algo.loss`` preset, then overrides). The policy
loss of a micro-batch applies the TAPO lift inside the loss (``call_map`` / ``call_delta``)
and starts from one of three loss inputs (``algo.loss_input``):

* ``hidden``: the decoder's last hidden states and the LM head (``hidden_batch_loss``,
  ``tapo_kernels.policy_loss_from_hidden``: the ``(b, T, V)`` logits are never built);
* ``logits``: the model's logits (``micro_batch_loss``, ``policy_loss_from_logits``);
* ``logp``: ``log_softmax`` + gather, then ``tapo_kernels.policy_loss``.

``loss_inputs`` slices one micro-batch out of a batch; ``Losses`` runs a run's model passes
micro-batch by micro-batch: the policy loss with its backward, the frozen policies'
log-probabilities and the warm-up's loss. Metrics travel as sums keyed by name:
``add_micro_batch`` accumulates an update's, ``reduce_metrics`` sums any such dict over
ranks in one all-reduce, ``actor_metrics`` / ``tapo_metrics`` turn reduced sums into the
logged values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.functional import pad

import tapo_kernels
from tapo_kernels.knobs import resolve as resolve_loss_knobs
from tapo_kernels.reference import METRIC_NAMES

from .config import Config
from .distributed import DistContext, all_reduce_sum
from .modeling import attach_hidden_loss, hidden_loss_unsupported
from .rollout import Batch

# sums of one step's policy update, summed over micro-batches and then over ranks: the loss
# (each update's), the loss metrics and the entropy weighted by tokens, and the token count
UPDATE_SUMS = tuple(f"upd_{k}" for k in ("loss", *METRIC_NAMES, "entropy", "tokens"))


def loss_knobs(cfg: Config) -> dict[str, Any]:
    """Every ``policy_loss`` knob of a run: the ``algo.loss`` preset, then
    ``algo.loss_overrides`` and ``algo.kl_coef`` / ``algo.kl_type`` as overrides
    (``global_count`` is left unset: the update sets it per mini-batch)."""
    a = cfg.algo
    overrides = {**a.loss_overrides, "kl_coef": a.kl_coef, "kl_type": a.kl_type}
    knobs = resolve_loss_knobs(a.loss, overrides)
    # The one default of the trainer's own: with agg=seq-mean-token-sum-norm and no
    # norm_const, the package divides each row by the batch's padded length T, which changes
    # from step to step; the trainer has always used a constant for the whole run (the
    # Dr. GRPO normaliser), the longest episode, rollout.max_total_tokens.
    if knobs["agg"] == "seq-mean-token-sum-norm" and "norm_const" not in overrides:
        overrides["norm_const"] = float(cfg.rollout.max_total_tokens)
        knobs = resolve_loss_knobs(a.loss, overrides)
    return knobs


def global_count(agg: str, row_tokens: Tensor, ctx: DistContext) -> float:
    """``global_count`` of one mini-batch (``row_tokens``: ``[b]`` policy tokens per row):
    its tokens (``token-mean``) or its non-empty rows (other aggregations), summed over ranks
    and divided by the world size, because FSDP then averages the gradients over ranks
    (``token-sum``: ``1 / world``, so the averaged gradient is that of the global sum)."""
    if agg == "token-sum":
        return 1.0 / ctx.world
    local = row_tokens.sum().item() if agg == "token-mean" else (row_tokens > 0).sum().item()
    return max(all_reduce_sum([local], ctx)[0].item(), 1.0) / ctx.world


# ---------------------------------------------------------------------- log-probabilities


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """``[b, T-1, V]`` fp32: token ``t`` of a row is predicted by ``logits[:, t - 1]``."""
    return torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)


def _pick(lp: Tensor, input_ids: Tensor) -> Tensor:
    """``[b, T]`` log-prob of each token from ``_log_softmax`` (column 0 is 0)."""
    return pad(lp.gather(2, input_ids[:, 1:, None]).squeeze(2), (1, 0))


def token_logp(logits: Tensor, input_ids: Tensor, temperature: float) -> Tensor:
    """``(b, T)`` fp32 log-prob of each token given its prefix (column 0 is 0)."""
    return _pick(_log_softmax(logits, temperature), input_ids)


def _shift(t: Tensor | None) -> Tensor | None:
    return None if t is None else t[:, 1:]


# ---------------------------------------------------------------------- the three loss inputs


class LossTensors(NamedTuple):
    """The policy loss's tensors besides the log-probabilities, in ``tapo_kernels.policy_loss``'s
    order; ``(b, T)`` in token positions."""

    old_logp: Tensor
    advantages: Tensor
    mask: Tensor
    ref_logp: Tensor | None = None
    call_map: Tensor | None = None  # [b, T] index into call_delta, -1 outside calls
    call_delta: Tensor | None = None  # [N] lift of every call of the whole batch
    importance_weight: Tensor | None = None  # [b, T] truncated IS weight of the rollout engine

    @classmethod
    def take(cls, args: Sequence[Tensor | None], kw: dict[str, Any]) -> LossTensors:
        """The fields from positional ``args``, then the later ones named in ``kw`` (taken
        out of it: the rest stays)."""
        named = {name: kw.pop(name) for name in cls._fields[len(args) :] if name in kw}
        return cls(*args, **named)

    def rows(self, rows: slice) -> LossTensors:
        """Rows ``rows`` of the ``(B, T)`` tensors (``call_delta`` is the whole batch's)."""
        return LossTensors(
            *(
                t if t is None or name == "call_delta" else t[rows]
                for name, t in zip(self._fields, self, strict=True)
            )
        )

    def shifted(self) -> LossTensors:
        """Without column 0: the positions that ``logits[:, :-1]`` predict."""
        return LossTensors(
            *(
                t if name == "call_delta" else _shift(t)
                for name, t in zip(self._fields, self, strict=True)
            )
        )

    def apply(self, loss_fn: Callable[..., Any], *head: Any, **kw: Any) -> Any:
        """``loss_fn(*head, old_logp, advantages, mask, ref_logp=, call_map=, call_delta=,
        importance_weight=, **kw)``: the package's loss signatures (the optional tensors keyword-only)."""
        optional = dict(zip(self._fields[3:], self[3:], strict=True))
        return loss_fn(*head, *self[:3], **optional, **kw)


def micro_batch_loss(
    logits: Tensor,
    input_ids: Tensor,
    *tensors: Tensor | None,
    temperature: float,
    from_logits: bool,
    **knobs: Any,
) -> tuple[Tensor, dict[str, float], Tensor]:
    """Policy loss of one micro-batch from the model's logits: ``(loss, metrics, entropy [b, T])``.

    ``tensors``: the ``LossTensors`` (``old_logp, advantages, mask, ref_logp, call_map,
    call_delta``), the optional ones also by name. Token ``t`` of a row is predicted by
    ``logits[:, t - 1]``; every ``(b, T)`` input is in token positions (column 0, the first
    prompt token, has mask 0). ``from_logits`` uses ``tapo_kernels.policy_loss_from_logits``
    (chunked fp32 selective log-softmax, entropy in the same pass, no ``(b, T, V)`` fp32
    copy); otherwise log-probs come from a plain ``log_softmax`` and go through
    ``tapo_kernels.policy_loss``. Both apply the TAPO lift through ``call_map`` /
    ``call_delta``.
    """
    x = LossTensors.take(tensors, knobs)
    if from_logits:
        out = x.shifted().apply(
            tapo_kernels.policy_loss_from_logits,
            logits[:, :-1],
            input_ids[:, 1:],
            temperature=temperature,
            with_entropy=True,
            **knobs,
        )
        return out.loss, out.metrics_dict(prefix=""), pad(out.entropy, (1, 0))
    lp = _log_softmax(logits, temperature)  # [b, T-1, V] fp32
    with torch.no_grad():
        entropy = pad(-(lp.exp() * lp).sum(-1), (1, 0))
    out = x.apply(tapo_kernels.policy_loss, _pick(lp, input_ids), **knobs)
    return out.loss, out.metrics_dict(prefix=""), entropy


def hidden_batch_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    input_ids: Tensor,
    temperature: float,
    **kw: Any,
) -> tuple[Tensor, dict[str, float], Tensor]:
    """Policy loss of one micro-batch from the decoder's last hidden states ``[b, T, H]``.

    ``tapo_kernels.policy_loss_from_hidden`` with the LM head ``weight [V, H]`` (and
    ``bias``): the head's ``(b, T, V)`` logits are never built, only one chunk at a time.
    ``kw``: the ``LossTensors`` by name, then the loss knobs. Same positions, outputs and TAPO
    lift as ``micro_batch_loss``. The trainer gives models a ``hidden_loss`` method that calls
    it (``modeling.attach_hidden_loss``).
    """
    x = LossTensors.take((), kw)
    out = x.shifted().apply(
        tapo_kernels.policy_loss_from_hidden,
        hidden[:, :-1],
        weight,
        input_ids[:, 1:],
        bias=bias,
        temperature=temperature,
        with_entropy=True,
        **kw,
    )
    return out.loss, out.metrics_dict(prefix=""), pad(out.entropy, (1, 0))


@dataclass
class LossInputs:
    """One micro-batch's inputs to the policy loss; ``(b, T)`` tensors in token positions."""

    input_ids: Tensor
    attention_mask: Tensor
    tensors: LossTensors
    vision: dict[str, Tensor]  # image inputs of a vision-language policy (empty without)


def loss_inputs(batch: Batch, rows: slice, tensors: LossTensors) -> LossInputs:
    """The loss inputs of rows ``rows`` of a collated batch (``tensors``: the whole batch's,
    ``[B, T]``)."""
    return LossInputs(
        batch.input_ids[rows],
        batch.attention_mask[rows],
        tensors.rows(rows),
        batch.model_inputs(rows),
    )


class Losses:
    """A run's losses, micro-batch by micro-batch (``algo.micro_batch_size`` rows), each
    micro-batch's backward before the next one's forward. On one CUDA process with
    ``dist.mixed_precision=bf16`` the model runs under bf16 autocast (FSDP2 applies its own
    mixed precision); the losses from logits are computed outside it, in fp32."""

    def __init__(self, cfg: Config, ctx: DistContext, model: nn.Module) -> None:
        """``model``: the policy before FSDP sharding. With ``algo.loss_input=hidden`` it gets
        its ``hidden_loss`` method here, unless its head rescales the logits (then the loss
        starts from the logits)."""
        self.cfg, self.ctx = cfg, ctx
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if ctx.device.type == "cuda" and not ctx.fsdp and cfg.dist.mixed_precision == "bf16"
            else nullcontext()
        )
        self.temperature = cfg.rollout.temperature
        self.knobs = loss_knobs(cfg)
        self.loss_input = cfg.algo.loss_input
        if self.loss_input == "hidden":
            why = hidden_loss_unsupported(model)
            if why is None:
                attach_hidden_loss(model, hidden_batch_loss)
            else:
                if ctx.is_main:
                    print(
                        f"algo.loss_input=hidden: {why}; computing the loss from logits", flush=True
                    )
                self.loss_input = "logits"

    def micro_slices(self, start: int, stop: int) -> list[slice]:
        size = self.cfg.algo.micro_batch_size or (stop - start)
        return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]

    def logits(
        self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, vision: dict
    ) -> Tensor:
        """``[b, T, V]`` logits (``vision``: the rows' image inputs, may be empty)."""
        with self.autocast:
            return model(input_ids=input_ids, attention_mask=attention_mask, **vision).logits

    def token_logp(self, model: nn.Module, batch: Batch, rows: slice) -> Tensor:
        ids = batch.input_ids[rows]
        logits = self.logits(model, ids, batch.attention_mask[rows], batch.model_inputs(rows))
        return token_logp(logits, ids, self.temperature)

    @torch.no_grad()
    def frozen_logp(self, model: nn.Module, batch: Batch) -> Tensor:
        """``(B, T)`` log-probs of the batch's tokens under a frozen policy (the rollout
        policy recomputed, or the KL reference), 0 off the mask."""
        out = [self.token_logp(model, batch, rows) for rows in self.micro_slices(0, batch.shape[0])]
        return torch.cat(out) * batch.mask

    def warmup_backward(self, model: nn.Module, batch: Batch) -> float:
        """Backward of the warm-up loss, the NLL of a batch of demonstrations' policy tokens
        over their count on all ranks; returns this rank's share of the loss."""
        tokens = all_reduce_sum([batch.mask.sum().item()], self.ctx)[0].item()
        scale = max(tokens, 1.0) / self.ctx.world  # FSDP averages gradients over ranks
        loss_sum = 0.0
        for rows in self.micro_slices(0, batch.shape[0]):
            loss = -(self.token_logp(model, batch, rows) * batch.mask[rows]).sum() / scale
            loss.backward()
            loss_sum += loss.item()
        return loss_sum

    def policy_loss(
        self, model: nn.Module, x: LossInputs, global_count: float, clip: dict | None = None
    ) -> tuple[Tensor, dict[str, float], Tensor]:
        """``(loss, metrics, entropy [b, T])`` of one micro-batch through the loss input
        (``clip``: other ``eps_low`` / ``eps_high`` for these rows)."""
        knobs = {**self.knobs, **(clip or {}), "global_count": global_count}
        if self.loss_input == "hidden":
            tensors = x.tensors._asdict()
            with self.autocast:
                return model.hidden_loss(
                    x.input_ids,
                    x.attention_mask,
                    vision=x.vision,
                    temperature=self.temperature,
                    **tensors,
                    **knobs,
                )
        ids = x.input_ids
        logits = self.logits(model, ids, x.attention_mask, x.vision)
        from_logits = self.loss_input == "logits"
        return micro_batch_loss(
            logits, ids, *x.tensors, temperature=self.temperature, from_logits=from_logits, **knobs
        )

    def backward(
        self,
        model: nn.Module,
        batch: Batch,
        rows: slice,
        advantages: Tensor,
        ref_logp: Tensor | None,
        call_map: Tensor | None,
        call_delta: Tensor | None,
        sums: dict[str, float],
        nan: bool = False,
        clip_rows: Tensor | None = None,
        clip: dict[str, float] | None = None,
    ) -> bool:
        """Backward of the policy loss of the mini-batch ``rows`` of a batch (``[B, T]``
        ``advantages`` / ``ref_logp`` / ``call_map``), normalised by its ``global_count``;
        adds its metrics to ``sums``; whether every loss was finite. ``nan``: fault
        injection, a diverged step. Rows flagged in ``clip_rows`` (``[B]`` bool) use the
        ``eps_low`` / ``eps_high`` of ``clip``: the loss is a sum over rows once normalised by
        ``global_count``, so each micro-batch is a call of the same loss on the unflagged rows'
        tokens plus one on the flagged rows' (the mask split, the rows kept), in the
        micro-batches where a rank has flagged rows (so every rank runs the same passes under
        FSDP)."""
        count = global_count(self.knobs["agg"], batch.mask[rows].sum(1), self.ctx)
        whole = LossTensors(
            batch.old_logp,
            advantages,
            batch.mask,
            ref_logp,
            call_map,
            call_delta,
            batch.importance_weight,
        )
        finite = True
        micros = self.micro_slices(rows.start, rows.stop)
        split = self._split_micros(micros, clip_rows, clip)
        for micro, split_it in zip(micros, split, strict=True):
            parts = [(None, None)]
            if split_it:
                flags = clip_rows[micro].float()
                parts = [(1.0 - flags, None), (flags, clip)]
            for keep, part_clip in parts:
                x = loss_inputs(batch, micro, whole)
                if keep is not None:
                    x.tensors = x.tensors._replace(mask=x.tensors.mask * keep[:, None])
                loss, metrics, entropy = self.policy_loss(model, x, count, part_clip)
                if nan:
                    loss = loss * float("nan")
                loss.backward()
                finite &= add_micro_batch(sums, loss, metrics, entropy, x.tensors.mask)
        return finite

    def _split_micros(
        self, micros: list[slice], clip_rows: Tensor | None, clip: dict | None
    ) -> list[bool]:
        """Per micro-batch: whether any rank has rows flagged for another clip (one
        all-reduce; none when the clip equals the run's)."""
        if clip_rows is None or not clip or all(self.knobs[k] == v for k, v in clip.items()):
            return [False] * len(micros)
        local = [float(clip_rows[m].any()) for m in micros]
        return [v > 0 for v in all_reduce_sum(local, self.ctx).tolist()]


# ---------------------------------------------------------------------- metrics by name


def clip_and_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    loss_ok: bool,
    ctx: DistContext,
) -> tuple[float, bool]:
    """Clip the gradient norm to ``max_norm`` (0: no clipping), then step unless the loss or
    the norm is not finite on any rank (all ranks agree); returns ``(norm, stepped)``."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    norm_value = float(norm)
    bad = all_reduce_sum([0.0 if (loss_ok and math.isfinite(norm_value)) else 1.0], ctx)
    ok = bad.item() == 0
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm_value, ok


def new_update_sums() -> dict[str, float]:
    return dict.fromkeys(UPDATE_SUMS, 0.0)


def add_micro_batch(
    sums: dict[str, float], loss: Tensor, metrics: dict[str, float], entropy: Tensor, mask: Tensor
) -> bool:
    """Add one micro-batch to the ``UPDATE_SUMS`` in ``sums``; whether its loss is finite."""
    n = mask.sum().item()
    sums["upd_loss"] += loss.item()  # a NaN step logs NaN (and is skipped)
    for key in METRIC_NAMES:
        sums[f"upd_{key}"] += metrics[key] * n
    sums["upd_entropy"] += (entropy * mask).sum().item()
    sums["upd_tokens"] += n
    return bool(torch.isfinite(loss.detach()).item())


def reduce_metrics(local: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Sum named scalars over ranks in one all-reduce: stacked in sorted-name order (the same
    on every rank, whatever order the dict was built in), unstacked back by name."""
    names = sorted(local)
    total = all_reduce_sum([float(local[k]) for k in names], ctx)
    return dict(zip(names, total.tolist(), strict=True))


def actor_metrics(s: dict[str, float], world: int) -> dict[str, float]:
    """``actor/*`` loss metrics from reduced ``UPDATE_SUMS``: the loss is the mean over ranks
    of each rank's mean over its updates, the other metrics are means over tokens."""
    tokens = max(s["upd_tokens"], 1.0)
    return {
        "actor/loss": s["upd_loss"] / world,
        **{f"actor/{k}": s[f"upd_{k}"] / tokens for k in (*METRIC_NAMES, "entropy")},
    }


def tapo_metrics(s: dict[str, float]) -> dict[str, float]:
    """``tapo/*`` metrics from the reduced ``credit.TAPO_COUNTS``: a ``TapoStats`` of the
    whole step (its rates are the package's; the mean lift is over the corrected calls)."""
    corrected = s["tapo_corrected_calls"]
    stats = tapo_kernels.TapoStats(
        s["tapo_failing_calls"],
        corrected,
        s["tapo_failing_trajectories"],
        s["tapo_corrected_trajectories"],
        s["tapo_lift_sum"] / max(corrected, 1.0),
    )
    return stats.as_dict(prefix="tapo/")
