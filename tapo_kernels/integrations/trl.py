"""TRL adapter: ``TapoGRPOTrainer``, TRL's ``GRPOTrainer`` with our fused loss and TAPO.

``TapoGRPOTrainer`` (with ``TapoGRPOConfig``, ``GRPOConfig`` plus the ``tapo_*`` settings):

* computes the loss of ``GRPOTrainer._compute_loss`` with ``tapo_kernels.policy_loss``, the
  same value and gradient for the loss types and options it maps (table below), and raises
  ``NotImplementedError`` for the others rather than computing something else;
* after each generation, finds the tool calls of every completion by their tags in the
  token ids (``tapo_call_start_tag`` / ``tapo_call_end_tag``, ``<tool_call>`` /
  ``</tool_call>`` by default; calls inside tool output, ``tool_mask == 0``, are skipped),
  the span recording TRL's tool loop does not do, runs ``fused_correct`` over each prompt's
  group and hands the lift to the loss as ``tapo_call_spans`` ``(B, K, 2)`` /
  ``tapo_call_delta`` ``(B, K)`` (per-row tensors, so TRL's shuffling and splitting of the
  generation batch keep them aligned). The loss applies it fused
  (``call_map`` / ``call_delta``): the same as TRL's loss on ``fused_correct(...).corrected``.

TRL settings and their knobs:

==============================  ====================================================
TRL (``GRPOConfig``)            ``tapo_kernels.policy_loss``
==============================  ====================================================
loss_type grpo / sapo           agg ``seq-mean-token-mean`` over all ``B`` rows
loss_type bnpo                  agg ``token-mean``
loss_type dr_grpo               agg ``seq-mean-token-sum-norm``, norm_const
                                ``max_completion_length``, ``B`` rows
loss_type dapo                  masked token sum / TRL's ``num_items_in_batch`` normaliser
loss_type luspo                 agg ``seq-mean-token-sum`` over ``B`` rows
importance_sampling_level       ``token``: algo ``grpo``; ``sequence``: algo ``gspo-seq``
epsilon, epsilon_high           eps_low, eps_high
delta (> 1 + epsilon_high)      dual_clip_c (token level only)
beta                            kl_coef, kl_type ``k3`` (needs ``ref_per_token_logps``)
sapo_temperature_pos / _neg     tau_pos, tau_neg (algo ``sapo``, token level)
top_entropy_quantile,           importance_weight (their product with the vLLM
off_policy_mask_threshold,      importance ratio: weights of the policy-gradient term)
vllm_importance_sampling_*
==============================  ====================================================

At the sequence level, per-token factors (the TAPO lift, ``top_entropy_quantile < 1``,
token-level vLLM importance sampling) reach every token of the row through the sequence
ratio, as TRL computes it: ``gspo-seq`` differentiates through the row's mean log-ratio.

Not supported (``NotImplementedError``): ``loss_type`` ``cispo`` / ``vespo``, ``sapo`` with
sequence-level importance sampling, ``delta`` with sequence-level importance sampling or
``delta <= 1 + epsilon_high`` (there TRL's ratio cap is not a dual clip),
``use_bias_correction_kl``, the entropy bonus (``entropy_coef`` / adaptive entropy) and MoE
router auxiliary losses. Gradient-accumulation scaling is TRL's.

TAPO witnesses come from the rows this process holds: with several processes, a prompt
group split across processes is corrected within each part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

import tapo_kernels
from tapo_kernels.reference import METRIC_NAMES

from .calls import (
    END_TAG,
    START_TAG,
    TapoSettings,
    call_map_from_rows,
    correct_advantages,
    lift_tensors,
    record_spans,
)

SPANS_KEY = "tapo_call_spans"
DELTA_KEY = "tapo_call_delta"
# model inputs of GRPOTrainer._get_per_token_logps_and_entropies besides the token ids
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
_METRIC = {name: i for i, name in enumerate(METRIC_NAMES)}
_CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


@dataclass
class TapoGRPOConfig(GRPOConfig):
    """``GRPOConfig`` with the TAPO settings of ``TapoGRPOTrainer``."""

    tapo: bool = field(
        default=True,
        metadata={"help": "Find the tool calls of each completion and apply the TAPO lift."},
    )
    tapo_theta: float = field(default=0.7, metadata={"help": "Similarity a witness must reach."})
    tapo_alpha_min: float = field(
        default=0.3, metadata={"help": "Minimum confidence to lift a failing call."}
    )
    tapo_beta: float = field(default=0.8, metadata={"help": "Strength of the lift (0: off)."})
    tapo_batch_scope: bool = field(
        default=False, metadata={"help": "Witnesses from the whole batch, not the prompt group."}
    )
    tapo_coverage: bool = field(
        default=True, metadata={"help": "Weight the confidence by the witnesses' support."}
    )
    tapo_param_dim: int = field(default=256, metadata={"help": "Width of the call encodings."})
    tapo_iou_tools: list[str] = field(
        default_factory=list, metadata={"help": "Tools compared by the IoU of a box argument."}
    )
    tapo_box_arg: str = field(
        default="bbox", metadata={"help": "Argument holding the box (x1, y1, x2, y2) in [0, 1]."}
    )
    tapo_call_start_tag: str = field(default=START_TAG, metadata={"help": "Opening call tag."})
    tapo_call_end_tag: str = field(default=END_TAG, metadata={"help": "Closing call tag."})


def tapo_settings(args: Any) -> TapoSettings:
    """``TapoSettings`` from a ``TapoGRPOConfig`` (defaults for a plain ``GRPOConfig``)."""
    d = TapoSettings()
    return TapoSettings(
        theta=getattr(args, "tapo_theta", d.theta),
        alpha_min=getattr(args, "tapo_alpha_min", d.alpha_min),
        beta=getattr(args, "tapo_beta", d.beta),
        batch_scope=getattr(args, "tapo_batch_scope", d.batch_scope),
        coverage=getattr(args, "tapo_coverage", d.coverage),
        param_dim=getattr(args, "tapo_param_dim", d.param_dim),
        iou_tools=tuple(getattr(args, "tapo_iou_tools", ()) or ()),
        box_arg=getattr(args, "tapo_box_arg", d.box_arg),
    )


def loss_knobs(trainer: GRPOTrainer) -> dict[str, Any]:
    """The ``policy_loss`` knobs (aggregation aside) of a ``GRPOTrainer``'s loss settings;
    ``NotImplementedError`` for the settings that have none."""
    args = trainer.args
    loss_type, level = trainer.loss_type, trainer.importance_sampling_level
    if level not in ("token", "sequence"):
        raise ValueError(f"Unknown importance sampling level: {level}")
    if loss_type in ("cispo", "vespo"):
        raise NotImplementedError(f"TapoGRPOTrainer: loss_type={loss_type!r} is not supported")
    if trainer._entropy_bonus_enabled:
        raise NotImplementedError("TapoGRPOTrainer: the entropy bonus is not supported")
    if trainer.aux_loss_enabled:
        raise NotImplementedError("TapoGRPOTrainer: router auxiliary losses are not supported")
    if loss_type == "sapo":
        if level != "token":
            raise NotImplementedError(
                "TapoGRPOTrainer: loss_type='sapo' needs importance_sampling_level='token'"
            )
        knobs = dict(
            algo="sapo",
            tau_pos=float(args.sapo_temperature_pos),
            tau_neg=float(args.sapo_temperature_neg),
        )
    elif loss_type in _CLIPPED_TYPES:
        eps_low, eps_high = float(trainer.epsilon_low), float(trainer.epsilon_high)
        # sequence level: TRL's ratio is the row's, differentiated through every token of the
        # row (gspo-seq), which matters once per-token factors such as the TAPO lift appear
        algo = "grpo" if level == "token" else "gspo-seq"
        knobs = dict(algo=algo, eps_low=eps_low, eps_high=eps_high, dual_clip_c=0.0)
        if args.delta is not None:
            delta = float(args.delta)
            if algo != "grpo":
                raise NotImplementedError(
                    "TapoGRPOTrainer: delta needs importance_sampling_level='token'"
                )
            if not (delta > 1.0 and delta > 1.0 + eps_high):
                raise NotImplementedError(
                    f"TapoGRPOTrainer: delta={delta} <= 1 + epsilon_high caps the ratio below "
                    "the clip range; only delta > 1 + epsilon_high (a dual clip) is supported"
                )
            knobs["dual_clip_c"] = delta
    else:
        raise ValueError(f"Unknown loss type: {loss_type}")
    if trainer.beta != 0.0:
        if args.use_bias_correction_kl:
            raise NotImplementedError("TapoGRPOTrainer: use_bias_correction_kl is not supported")
        knobs.update(kl_coef=float(trainer.beta), kl_type="k3")
    return knobs


def aggregation(trainer: GRPOTrainer, inputs: dict[str, Any], B: int) -> tuple[dict, Any]:
    """``(agg knobs, divisor)``: the loss is ``policy_loss(..., **agg) / divisor``, TRL's
    normalisation of its ``loss_type`` (gradient accumulation included)."""
    train = trainer.model.training
    accum = trainer.current_gradient_accumulation_steps if train else 1.0
    loss_type = trainer.loss_type
    if loss_type in ("grpo", "sapo"):
        return dict(agg="seq-mean-token-mean", global_count=float(B)), accum
    if loss_type == "bnpo":
        return dict(agg="token-mean"), accum
    if loss_type == "dr_grpo":
        norm = float(trainer.max_completion_length)
        return dict(agg="seq-mean-token-sum-norm", norm_const=norm, global_count=float(B)), accum
    if loss_type == "luspo":
        return dict(agg="seq-mean-token-sum", global_count=float(B)), accum
    if loss_type == "dapo":
        divisor = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if train:
            divisor = (
                divisor
                * trainer.current_gradient_accumulation_steps
                / trainer.args.steps_per_generation
            )
        return dict(agg="token-mean", global_count=1.0), divisor  # the masked token sum
    raise ValueError(f"Unknown loss type: {loss_type}")


def _times(weight: Tensor | None, factor: Tensor) -> Tensor:
    return factor if weight is None else weight * factor


class TapoGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is ``tapo_kernels.policy_loss``, with the TAPO lift on the
    tool calls of its completions (module doc)."""

    @property
    def tapo_settings(self) -> TapoSettings:
        return tapo_settings(self.args)

    def _tapo_enabled(self) -> bool:
        return bool(getattr(self.args, "tapo", True))

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self._tapo_enabled():
            return output
        ids = output["completion_ids"]
        mask = output["completion_mask"]
        if output.get("tool_mask") is not None:
            mask = mask * output["tool_mask"]
        rows = record_spans(
            ids,
            self._tokenizer,
            start_tag=getattr(self.args, "tapo_call_start_tag", START_TAG),
            end_tag=getattr(self.args, "tapo_call_end_tag", END_TAG),
            mask=mask,
        )
        B = ids.shape[0]
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        first = self.accelerator.process_index * B  # rows of this process in the gathered batch
        groups = (torch.arange(B, device=ids.device) + first) // G
        result = correct_advantages(
            output["advantages"], mask, groups, rows, settings=self.tapo_settings
        )
        spans, delta = lift_tensors(result, B)
        output[SPANS_KEY], output[DELTA_KEY] = spans.to(ids.device), delta.to(ids.device)
        for name, value in result.stats().as_dict().items():
            self._metrics[mode][name].append(float(value))
        return output

    def _compute_loss(self, model, inputs):
        knobs = loss_knobs(self)
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        B, T = completion_ids.shape
        mask = (
            completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        )
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            T,
            compute_entropy=True,
            compute_aux_loss=False,
            **{k: inputs.get(k) for k in _FORWARD_KEYS},
        )
        if logps.dtype not in (torch.float32, torch.float64):
            logps = logps.float()
        dtype = logps.dtype
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old.to(dtype)
        advantages = inputs["advantages"]

        weight = None  # weights of the policy-gradient term, as TRL multiplies them in
        if self.top_entropy_quantile < 1.0:
            weight = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
        if self.off_policy_mask_threshold is not None:
            keep = self.get_off_policy_mask(
                advantages=advantages if advantages.dim() == 2 else advantages[:, None],
                per_token_logps=logps,
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            )
            weight = _times(weight, keep)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weight = _times(weight, inputs["importance_sampling_ratio"])
        if weight is not None:
            weight = weight.detach().to(dtype).expand(B, T).contiguous()

        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        call_map = call_delta = None
        if SPANS_KEY in inputs:
            call_map, call_delta = call_map_from_rows(inputs[SPANS_KEY], inputs[DELTA_KEY], T)
            call_delta = call_delta.to(dtype)
        agg, divisor = aggregation(self, inputs, B)
        out = tapo_kernels.policy_loss(
            logps,
            old,
            advantages.to(dtype),
            mask != 0,
            ref_logp=None if ref is None else ref.to(dtype),
            call_map=call_map,
            call_delta=call_delta,
            importance_weight=weight,
            **knobs,
            **agg,
        )
        self._tapo_log(out.metrics, mask, entropies, lifted=call_map is not None)
        return out.loss / divisor

    def _tapo_log(self, metrics: Tensor, mask: Tensor, entropies: Tensor, lifted: bool) -> None:
        """Token-weighted means over every process (one reduction, one host sync)."""
        mode = "train" if self.model.training else "eval"
        m = mask.to(torch.float32)
        count = m.sum()
        stats = torch.cat(
            [
                metrics.to(count.device) * count,
                (entropies.detach().float() * m).sum()[None],
                count[None],
            ]
        )
        totals = self.accelerator.reduce(stats, reduction="sum")
        values = (totals[:-1] / totals[-1].clamp(min=1.0)).tolist()
        named = dict(zip((*METRIC_NAMES, "entropy"), values, strict=True))
        self._metrics[mode]["entropy"].append(named["entropy"])
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(named["mean_kl"])
        if self.loss_type in _CLIPPED_TYPES:
            self._metrics[mode]["clip_ratio/region_mean"].append(named["clip_frac"])
            if self.args.delta is not None:
                self._metrics[mode]["clip_ratio/dual_mean"].append(named["dual_clip_frac"])
        if lifted:
            self._metrics[mode]["tapo/lifted_frac"].append(named["lifted_frac"])


__all__ = [
    "DELTA_KEY",
    "SPANS_KEY",
    "TapoGRPOConfig",
    "TapoGRPOTrainer",
    "aggregation",
    "loss_knobs",
    "record_spans",
    "tapo_settings",
]
