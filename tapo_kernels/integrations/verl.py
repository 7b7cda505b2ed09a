"""verl adapter: TAPO policy losses and the TAPO advantage estimator in verl's registries.

``register()`` (idempotent) adds to ``verl.trainer.ppo.core_algos``:

* policy losses ``tapo_grpo``, ``tapo_gspo``, ``tapo_sapo`` (``actor.policy_loss.loss_mode``),
  verl's ``vanilla`` (PPO clip with dual clip), ``gspo`` and ``sapo`` losses computed by the
  fused ``tapo_kernels.policy_loss``: same loss, gradient and metrics
  (``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``), the same actor
  keys (``clip_ratio``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``,
  ``tau_pos``, ``tau_neg``, ``loss_agg_mode``, ``loss_scale_factor``) and global batch sizes;
* the advantage estimator ``tapo_grpo`` (``algorithm.adv_estimator``): verl's GRPO outcome
  advantages, then the TAPO lift (``fused_correct``) of the failing trajectories' tool calls
  that a successful sibling repeated. Its settings are the section ``algorithm.tapo``
  (``TapoSettings``: ``theta``, ``alpha_min``, ``beta``, ``batch_scope``, ``coverage``,
  ``param_dim``, ``iou_tools``, ``box_arg``);
* and wraps ``verl.trainer.ppo.ray_trainer.compute_advantage`` so that, for ``tapo_grpo``,
  the estimator receives the batch's tool-call records: ``data.non_tensor_batch
  ["tapo_tool_calls"]``, one list of calls per row (``CallSpan`` fields: response-token
  span ``[start, end)``, tool ``name``, ``arguments``), which the agent loop
  ``tapo_kernels.integrations.verl_agent_loop.TapoToolAgentLoop`` records in its output's
  ``extra_fields``. Without records the estimator is GRPO. The records reach
  ``compute_advantage`` with the legacy trainer (``trainer.use_v1=false``); verl 0.9.1's v1
  trainer fetches a fixed set of fields for its advantage step, without them.

The KL and entropy terms stay verl's (the actor adds them to the policy loss). Import
``tapo_kernels.integrations.verl_plugin`` in every verl process to register (the actor's
``model.external_lib`` setting, or ``VERL_USE_EXTERNAL_MODULES``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

import tapo_kernels
from tapo_kernels.reference import METRIC_NAMES

from .calls import TapoSettings, correct_advantages

logger = logging.getLogger(__name__)

LOSSES = {"tapo_grpo": "grpo", "tapo_gspo": "gspo", "tapo_sapo": "sapo"}
ADV_ESTIMATOR = "tapo_grpo"
RECORDS_KEY = "tapo_tool_calls"  # non_tensor_batch / agent loop extra_fields key
SETTINGS_KEY = "tapo"  # algorithm.tapo

_METRIC = {name: i for i, name in enumerate(METRIC_NAMES)}


def _number(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, Tensor) else value)


def aggregation(
    loss_agg_mode: str, global_batch_info: Mapping[str, Any] | None, T: int
) -> dict[str, Any]:
    """Our ``agg`` / ``global_count`` / ``norm_const`` for verl's ``agg_loss`` arguments.

    verl scales every mode by the data-parallel size ``dp_size`` (gradients are averaged
    over ranks): ``token-mean`` divides by ``batch_num_tokens / dp_size``, the seq-mean modes
    by ``global_batch_size / dp_size`` rows, ``token-sum`` multiplies by ``dp_size``;
    ``seq-mean-token-sum-norm`` further divides by ``loss_scale_factor`` (default: ``T``).
    """
    info = dict(global_batch_info or {})
    dp = int(info.get("dp_size") or 1)
    tokens = _number(info.get("batch_num_tokens"))
    rows = _number(info.get("global_batch_size"))
    scale = _number(info.get("loss_scale_factor"))
    if loss_agg_mode == "token-mean":
        if tokens is None and dp > 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        return dict(agg="token-mean", global_count=None if tokens is None else tokens / dp)
    if loss_agg_mode == "token-sum":
        return dict(agg="token-sum", global_count=None if dp == 1 else 1.0 / dp)
    if loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        if rows is None and dp > 1:
            raise ValueError("global_batch_size is required when dp_size > 1")
        out = dict(agg=loss_agg_mode, global_count=None if rows is None else rows / dp)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            out["norm_const"] = float(T) if scale is None else scale
        return out
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


def loss_knobs(algo: str, config: Any, loss_agg_mode: str, T: int) -> dict[str, Any]:
    """``tapo_kernels.policy_loss`` knobs for a verl actor config (``ActorConfig`` or its
    ``DictConfig``): the loss verl's ``vanilla`` / ``gspo`` / ``sapo`` compute."""
    if config is None:
        raise ValueError("the TAPO policy losses need the actor config")
    clip = config.get("clip_ratio", 0.2)
    low = config.get("clip_ratio_low")
    high = config.get("clip_ratio_high")
    low = clip if low is None else low
    high = clip if high is None else high
    info = config.get("global_batch_info") or {}
    if algo == "grpo":
        c = float(config.get("clip_ratio_c", 3.0))
        if not c > 1.0:
            raise ValueError(f"clip_ratio_c (the dual clip) must be > 1, got {c}")
        knobs = dict(algo="grpo", eps_low=float(low), eps_high=float(high), dual_clip_c=c)
    elif algo == "gspo":
        knobs = dict(algo="gspo", eps_low=float(low), eps_high=float(high), dual_clip_c=0.0)
    elif algo == "sapo":
        knobs = dict(
            algo="sapo", tau_pos=float(config.get("tau_pos")), tau_neg=float(config.get("tau_neg"))
        )
        loss_agg_mode = "seq-mean-token-mean"  # verl's SAPO aggregates per sequence, always
    else:
        raise ValueError(f"unknown algo {algo!r}")
    knobs.update(aggregation(loss_agg_mode, info, T))
    return knobs


# verl's kl_loss_type -> our kl_type (the forward estimates of verl's kl_penalty)
KL_TYPES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "k2+": "k2"}
KL_TYPES.update({"low_var_kl": "k3", "k3": "k3"})


def kl_knobs(config: Any) -> dict[str, Any]:
    """``kl_coef`` / ``kl_type`` of verl's actor KL loss (``use_kl_loss``, ``kl_loss_coef``,
    ``kl_loss_type``), for fusing it into ``policy_loss``; ``{}`` without a KL loss.

    verl adds ``kl_loss_coef * agg_loss(kl, loss_agg_mode)`` to the policy loss; the fused
    op aggregates both terms alike, so this is that sum whenever the policy loss uses
    ``loss_agg_mode`` (not verl's SAPO, which always aggregates per sequence).
    """
    if not config.get("use_kl_loss", False):
        return {}
    kind = str(config.get("kl_loss_type", "low_var_kl"))
    if kind not in KL_TYPES:
        raise NotImplementedError(
            f"kl_loss_type {kind!r} has no fused form; supported: {sorted(KL_TYPES)}"
        )
    return dict(kl_coef=float(config.get("kl_loss_coef", 0.001)), kl_type=KL_TYPES[kind])


def _policy_loss_fn(algo: str):
    def loss_fn(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        if log_prob.dtype not in (torch.float32, torch.float64):
            log_prob = log_prob.float()  # the op's dtypes; the gradient flows back through
        dtype = log_prob.dtype
        knobs = loss_knobs(algo, config, loss_agg_mode, log_prob.shape[-1])
        mask = response_mask if response_mask.dtype == torch.bool else response_mask != 0
        weight = None
        if rollout_is_weights is not None:
            weight = rollout_is_weights.detach().to(dtype).expand_as(log_prob).contiguous()
        out = tapo_kernels.policy_loss(
            log_prob,
            old_log_prob.detach().to(dtype),
            advantages.detach().to(dtype),
            mask,
            importance_weight=weight,
            **knobs,
        )
        values = out.metrics.tolist()
        metrics = {
            "actor/pg_clipfrac": values[_METRIC["clip_frac"]],
            "actor/ppo_kl": values[_METRIC["ppo_kl"]],
            "actor/pg_clipfrac_lower": values[_METRIC["dual_clip_frac"]],
        }
        return out.loss, metrics

    loss_fn.__name__ = f"compute_policy_loss_tapo_{algo}"
    loss_fn.__qualname__ = loss_fn.__name__
    loss_fn.__doc__ = (
        f"verl policy loss ``tapo_{algo}``: verl's "
        f"``{'vanilla' if algo == 'grpo' else algo}`` loss by ``tapo_kernels.policy_loss``."
    )
    return loss_fn


POLICY_LOSSES = {name: _policy_loss_fn(algo) for name, algo in LOSSES.items()}


def tapo_settings(config: Any) -> TapoSettings:
    """``TapoSettings`` from an algorithm config's ``tapo`` section (defaults without one)."""
    section = None if config is None else config.get(SETTINGS_KEY)
    return TapoSettings.from_mapping(section)


def group_ids(index: Any) -> Tensor:
    """``(B,)`` int64 group ids from verl's per-row prompt uids."""
    _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    return torch.as_tensor(inverse.reshape(-1), dtype=torch.int64)


_warned_no_records = False


def compute_tapo_grpo_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool | None = None,
    config: Any = None,
    tool_calls: Any = None,
    **unused: Any,
) -> tuple[Tensor, Tensor]:
    """verl advantage estimator ``tapo_grpo``: GRPO outcome advantages with the TAPO lift.

    ``tool_calls``: per row, its tool-call records (see ``calls.CallSpan``; ``None`` or an
    empty list for a row without calls). ``norm_adv_by_std_in_grpo`` defaults to the
    config's (else ``True``). Returns ``(advantages, returns)``, both the corrected
    ``(B, T)`` advantages, as verl's GRPO.
    """
    from verl.trainer.ppo import core_algos

    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = (
            True if config is None else config.get("norm_adv_by_std_in_grpo", True)
        )
    grpo = core_algos.get_adv_estimator_fn("grpo")
    advantages, _ = grpo(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
        config=config,
    )
    if tool_calls is None:
        global _warned_no_records
        if not _warned_no_records:
            logger.warning(
                "tapo_grpo: the batch has no %r records; the advantages are GRPO's", RECORDS_KEY
            )
            _warned_no_records = True
        return advantages, advantages
    rows = list(tool_calls)
    settings = tapo_settings(config)
    result = correct_advantages(
        advantages,
        response_mask,
        group_ids(index).to(advantages.device),
        rows,
        settings=settings,
    )
    corrected = result.corrected.to(advantages.dtype)
    return corrected, corrected


def records_of(non_tensor_batch: Mapping[str, Any], B: int) -> list | None:
    """The tool-call records of a batch: ``non_tensor_batch["tapo_tool_calls"]``, else each
    row's ``extra_fields["tapo_tool_calls"]``; ``None`` when neither is there."""
    if RECORDS_KEY in non_tensor_batch:
        rows = list(non_tensor_batch[RECORDS_KEY])
    elif "extra_fields" in non_tensor_batch:
        fields = list(non_tensor_batch["extra_fields"])
        if not any(isinstance(f, Mapping) and RECORDS_KEY in f for f in fields):
            return None
        rows = [f.get(RECORDS_KEY) if isinstance(f, Mapping) else None for f in fields]
    else:
        return None
    if len(rows) != B:
        raise ValueError(f"{len(rows)} rows of {RECORDS_KEY!r} for a batch of {B}")
    return [list(r) if r is not None else [] for r in rows]


def _with_tapo(original):
    @functools.wraps(original)
    def compute_advantage(
        data,
        adv_estimator,
        gamma: float = 1.0,
        lam: float = 1.0,
        num_repeat: int = 1,
        norm_adv_by_std_in_grpo: bool = True,
        config=None,
    ):
        name = getattr(adv_estimator, "value", adv_estimator)
        if name != ADV_ESTIMATOR:
            return original(
                data,
                adv_estimator,
                gamma=gamma,
                lam=lam,
                num_repeat=num_repeat,
                norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
                config=config,
            )
        from verl.trainer.ppo.ray_trainer import compute_response_mask

        if "response_mask" not in data.batch.keys():
            data.batch["response_mask"] = compute_response_mask(data)
        mask = data.batch["response_mask"]
        advantages, returns = compute_tapo_grpo_advantage(
            token_level_rewards=data.batch["token_level_rewards"],
            response_mask=mask,
            index=data.non_tensor_batch["uid"],
            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
            config=config,
            tool_calls=records_of(data.non_tensor_batch, mask.shape[0]),
        )
        data.batch["advantages"] = advantages
        data.batch["returns"] = returns
        return data

    compute_advantage._tapo_original = original
    return compute_advantage


def install_advantage_hook() -> None:
    """Wrap verl's ``compute_advantage`` (``verl.trainer.ppo.ray_trainer`` and the modules
    that imported it by name) so that ``tapo_grpo`` gets the batch's tool-call records.
    Idempotent."""
    import sys

    from verl.trainer.ppo import ray_trainer

    current = ray_trainer.compute_advantage
    original = getattr(current, "_tapo_original", current)
    wrapped = current if hasattr(current, "_tapo_original") else _with_tapo(original)
    ray_trainer.compute_advantage = wrapped
    for name in ("verl.trainer.ppo.v1.utils",):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "compute_advantage", None) is original:
            module.compute_advantage = wrapped


def register(*, advantage_hook: bool = True) -> None:
    """Register the TAPO losses and the ``tapo_grpo`` advantage estimator with verl (and,
    with ``advantage_hook``, ``install_advantage_hook``). Idempotent."""
    from verl.trainer.ppo import core_algos

    for name, fn in POLICY_LOSSES.items():
        if core_algos.POLICY_LOSS_REGISTRY.get(name) is not fn:
            core_algos.register_policy_loss(name)(fn)
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ADV_ESTIMATOR) is not compute_tapo_grpo_advantage:
        core_algos.register_adv_est(ADV_ESTIMATOR)(compute_tapo_grpo_advantage)
    if advantage_hook:
        install_advantage_hook()


__all__ = [
    "ADV_ESTIMATOR",
    "LOSSES",
    "POLICY_LOSSES",
    "RECORDS_KEY",
    "aggregation",
    "compute_tapo_grpo_advantage",
    "install_advantage_hook",
    "kl_knobs",
    "loss_knobs",
    "records_of",
    "register",
    "tapo_settings",
]
