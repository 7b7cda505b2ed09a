"""Parity of ``tapo::policy_loss`` with the public loss formulas of verl and TRL, on every backend.

The peers' formulas are written out here (not imported): verl's ``agg_loss`` and vanilla PPO
loss with dual clip, TRL's ``GRPOTrainer._compute_loss`` with token or sequence importance
weights. Each backend (``policy_loss_impl``, ``tests/conftest.py``) must give the peer's loss
and gradient in float64, and verl's clip fractions.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import tapo_kernels
from tapo_kernels.reference import AGGS, METRIC_NAMES
from tapo_kernels.testing import assert_close_to_oracle, loss_batch, run_policy_loss, seed_of


def verl_agg_loss(
    loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, loss_scale_factor: float | None = None
) -> Tensor:
    """verl ``agg_loss`` (single rank, no global sizes), seq-mean over non-empty rows.

    Older verl releases divided ``seq-mean-token-sum-norm`` by ``loss_scale_factor`` only
    (a sum over rows, no seq-mean) and averaged seq-mean modes over all rows; the form here
    is the current one. The parity batch has no empty row, where the forms agree except
    for the row count of ``-sum-norm``.
    """
    if loss_agg_mode == "token-mean":
        return (loss_mat * loss_mask).sum() / loss_mask.sum()
    if loss_agg_mode == "token-sum":
        return (loss_mat * loss_mask).sum()
    token_counts = loss_mask.sum(-1)
    seq_mask = (token_counts > 0).to(loss_mat.dtype)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_losses = (loss_mat * loss_mask).sum(-1) / (token_counts + 1e-8)
    elif loss_agg_mode == "seq-mean-token-sum":
        seq_losses = (loss_mat * loss_mask).sum(-1)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        scale = loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        seq_losses = (loss_mat * loss_mask).sum(-1) / scale
    else:
        raise ValueError(loss_agg_mode)
    return (seq_losses * seq_mask).sum() / seq_mask.sum()


def verl_compute_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    cliprange_low: float,
    cliprange_high: float,
    clip_ratio_c: float,
    loss_agg_mode: str,
    rollout_is_weights: Tensor | None = None,
):
    """verl vanilla PPO loss with dual clip: (pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl).

    ``rollout_is_weights``: verl's truncated importance sampling multiplies the per-token
    policy-gradient losses by them before aggregation."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    masked_mean = lambda x: (x * response_mask).sum() / response_mask.sum()
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).to(ratio.dtype))
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(
        (torch.gt(clip_pg_losses1, pg_losses3) & (advantages < 0)).to(ratio.dtype)
    )
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode)
    ppo_kl = masked_mean(-negative_approx_kl)
    return pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl


def peer_batch(*tag: object, spread: float, per_token: bool, with_ref: bool):
    """The float64 (5, 10) batch of a parity case: no TAPO calls, no empty row."""
    return loss_batch(
        B=5,
        T=10,
        dtype=torch.float64,
        spread=spread,
        per_token=per_token,
        with_ref=with_ref,
        with_calls=False,
        empty_row=False,
        seed=seed_of(*tag),
    )


@pytest.mark.parametrize("agg", AGGS)
def test_parity_with_verl(policy_loss_impl, agg):
    b = peer_batch("verl", agg, spread=0.7, per_token=True, with_ref=False)
    # one token with A < 0 and r = e^2 > c = 3, so that the dual clip is active
    b.old_logp[0, -1] = b.logp[0, -1] - 2.0
    b.advantages[0, -1] = -1.0
    b.mask[0, -1] = 1.0
    x = b.logp.clone().requires_grad_(True)
    verl_loss, clipfrac, clipfrac_lower, ppo_kl = verl_compute_policy_loss(
        b.old_logp, x, b.advantages, b.mask, 0.2, 0.28, 3.0, agg
    )
    (verl_grad,) = torch.autograd.grad(verl_loss, x)
    assert float(clipfrac_lower) > 0  # the dual clip is active somewhere

    knobs = {"algo": "grpo", "eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 3.0, "agg": agg}
    loss, metrics, grad = run_policy_loss(policy_loss_impl, b.op_args(), knobs)
    # verl's seq-mean-token-mean divides by (count + 1e-8): relative difference <= 1e-8
    assert_close_to_oracle(loss, verl_loss.detach(), what="loss", tol=(1e-7, 1e-7))
    assert_close_to_oracle(grad, verl_grad, what="grad", tol=(1e-7, 1e-7))
    # the metrics under verl's names: pg_clipfrac, pg_clipfrac_lower, ppo_kl
    for name, expected in (
        ("clip_frac", clipfrac),
        ("dual_clip_frac", clipfrac_lower),
        ("ppo_kl", ppo_kl),
    ):
        got = metrics[METRIC_NAMES.index(name)]
        assert_close_to_oracle(got, expected.detach(), what=name, tol=(1e-5, 1e-7))


def trl_grpo_compute_loss(
    per_token_logps: Tensor,
    old_per_token_logps: Tensor,
    ref_per_token_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    loss_type: str,
    max_completion_length: int,
    num_items_in_batch: float,
    importance_sampling_level: str = "token",
    importance_sampling_ratio: Tensor | None = None,
) -> Tensor:
    """TRL ``GRPOTrainer._compute_loss`` (one process): token or sequence importance weights.

    ``importance_sampling_ratio``: TRL's vLLM importance-sampling correction, multiplied into
    the per-token loss before the KL term is added."""
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (
            (log_ratio * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)
        ).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    # TRL's advantages are per row; a (B, T) tensor (per-token advantages, e.g. after the TAPO
    # lift) enters the same products token by token
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
    per_token_loss1 = coef_1 * adv
    per_token_loss2 = coef_2 * adv
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if importance_sampling_ratio is not None:
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        d = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(d) - d - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return (
            (per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)
        ).mean()
    if loss_type == "bnpo":
        return (per_token_loss * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * completion_mask).sum() / (
            per_token_loss.size(0) * max_completion_length
        )
    if loss_type == "dapo":
        return (per_token_loss * completion_mask).sum() / num_items_in_batch
    raise ValueError(loss_type)


TRL_MAX_COMPLETION_LENGTH = 16
TRL_CASES = [
    # TRL loss_type -> our agg (+ normaliser); no row is fully masked in the batch
    pytest.param("grpo", "token", {"algo": "grpo", "agg": "seq-mean-token-mean"}, id="grpo"),
    pytest.param("bnpo", "token", {"algo": "grpo", "agg": "token-mean"}, id="bnpo"),
    pytest.param(
        "dr_grpo",
        "token",
        {
            "algo": "grpo",
            "agg": "seq-mean-token-sum-norm",
            "norm_const": float(TRL_MAX_COMPLETION_LENGTH),
        },
        id="dr_grpo",
    ),
    pytest.param("dapo", "token", {"algo": "grpo", "agg": "token-mean"}, id="dapo-global-count"),
    # GSPO: TRL's sequence-level importance weight == our GSPO-token with per-row advantages
    pytest.param(
        "grpo", "sequence", {"algo": "gspo", "agg": "seq-mean-token-mean"}, id="gspo-sequence"
    ),
]


@pytest.mark.parametrize("loss_type, level, ours", TRL_CASES)
def test_parity_with_trl(policy_loss_impl, loss_type, level, ours):
    eps_low, eps_high, beta = (0.2, 0.28, 0.04) if level == "token" else (0.05, 0.05, 0.04)
    spread = 0.5 if level == "token" else 0.15
    b = peer_batch("trl", loss_type, level, spread=spread, per_token=False, with_ref=True)
    num_items_in_batch = 2.0 * float(b.mask.sum())  # dapo: the global token count
    x = b.logp.clone().requires_grad_(True)
    trl_loss = trl_grpo_compute_loss(
        x,
        b.old_logp,
        b.ref_logp,
        b.advantages,
        b.mask,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        beta=beta,
        loss_type=loss_type,
        max_completion_length=TRL_MAX_COMPLETION_LENGTH,
        num_items_in_batch=num_items_in_batch,
        importance_sampling_level=level,
    )
    (trl_grad,) = torch.autograd.grad(trl_loss, x)
    assert float(trl_grad.abs().max()) > 0

    # TRL has no dual clip; its KL is k3 with coefficient beta
    knobs = {
        **ours,
        "eps_low": eps_low,
        "eps_high": eps_high,
        "dual_clip_c": 0.0,
        "kl_coef": beta,
        "kl_type": "k3",
    }
    if loss_type == "dapo":
        knobs["global_count"] = num_items_in_batch
    loss, _, grad = run_policy_loss(policy_loss_impl, b.op_args(), knobs)
    assert_close_to_oracle(loss, trl_loss.detach(), what="loss")
    assert_close_to_oracle(grad, trl_grad, what="grad")


def _tis_batch(tag: str, per_token: bool):
    b = peer_batch("tis", tag, spread=0.5, per_token=per_token, with_ref=True)
    # the engine's log-probabilities, off the trainer's by up to about 1 nat, truncated at 2
    gen = torch.Generator().manual_seed(seed_of("rollout", tag))
    rollout_logp = b.old_logp + 0.8 * torch.randn(
        b.old_logp.shape, generator=gen, dtype=b.old_logp.dtype
    )
    weight = tapo_kernels.truncated_importance_weight(b.old_logp, rollout_logp, cap=2.0)
    assert bool((weight == 2.0).any()) and bool((weight < 1.0).any())
    b.importance_weight = weight
    return b


@pytest.mark.parametrize("agg", AGGS)
def test_truncated_importance_sampling_parity_with_verl(policy_loss_impl, agg):
    b = _tis_batch(f"verl-{agg}", per_token=True)
    x = b.logp.clone().requires_grad_(True)
    verl_loss, *_ = verl_compute_policy_loss(
        b.old_logp, x, b.advantages, b.mask, 0.2, 0.28, 3.0, agg, b.importance_weight
    )
    (verl_grad,) = torch.autograd.grad(verl_loss, x)
    knobs = {"algo": "grpo", "eps_low": 0.2, "eps_high": 0.28, "dual_clip_c": 3.0, "agg": agg}
    args = list(b.op_args())
    args[4] = None  # verl's policy loss has no KL term inside
    loss, _, grad = run_policy_loss(policy_loss_impl, tuple(args), knobs)
    assert_close_to_oracle(loss, verl_loss.detach(), what="loss", tol=(1e-7, 1e-7))
    assert_close_to_oracle(grad, verl_grad, what="grad", tol=(1e-7, 1e-7))


def test_vllm_importance_sampling_parity_with_trl(policy_loss_impl):
    b = _tis_batch("trl", per_token=False)  # TRL's advantages are per sequence
    x = b.logp.clone().requires_grad_(True)
    trl_loss = trl_grpo_compute_loss(
        x,
        b.old_logp,
        b.ref_logp,
        b.advantages,
        b.mask,
        epsilon_low=0.2,
        epsilon_high=0.28,
        beta=0.04,
        loss_type="bnpo",
        max_completion_length=TRL_MAX_COMPLETION_LENGTH,
        num_items_in_batch=1.0,
        importance_sampling_ratio=b.importance_weight,
    )
    (trl_grad,) = torch.autograd.grad(trl_loss, x)
    knobs = {
        "algo": "grpo",
        "agg": "token-mean",
        "eps_low": 0.2,
        "eps_high": 0.28,
        "dual_clip_c": 0.0,
        "kl_coef": 0.04,
        "kl_type": "k3",
    }
    loss, _, grad = run_policy_loss(policy_loss_impl, b.op_args(), knobs)
    assert_close_to_oracle(loss, trl_loss.detach(), what="loss")
    assert_close_to_oracle(grad, trl_grad, what="grad")


@pytest.mark.parametrize(
    "loss_type, agg", [("grpo", "seq-mean-token-mean"), ("bnpo", "token-mean")]
)
def test_gspo_seq_is_trl_sequence_level_with_token_advantages(policy_loss_impl, loss_type, agg):
    """With per-token advantages GSPO-token and TRL's sequence-level weights differ (the
    gradient of s_i reaches every token of the row); ``algo="gspo-seq"`` is TRL's form."""
    b = peer_batch("trl-gspo-seq", loss_type, spread=0.15, per_token=True, with_ref=True)
    x = b.logp.clone().requires_grad_(True)
    trl_loss = trl_grpo_compute_loss(
        x,
        b.old_logp,
        b.ref_logp,
        b.advantages,
        b.mask,
        epsilon_low=0.05,
        epsilon_high=0.05,
        beta=0.04,
        loss_type=loss_type,
        max_completion_length=TRL_MAX_COMPLETION_LENGTH,
        num_items_in_batch=1.0,
        importance_sampling_level="sequence",
    )
    (trl_grad,) = torch.autograd.grad(trl_loss, x)
    knobs = {
        "algo": "gspo-seq",
        "agg": agg,
        "eps_low": 0.05,
        "eps_high": 0.05,
        "dual_clip_c": 0.0,
        "kl_coef": 0.04,
        "kl_type": "k3",
    }
    loss, _, grad = run_policy_loss(policy_loss_impl, b.op_args(), knobs)
    assert_close_to_oracle(loss, trl_loss.detach(), what="loss", tol=(1e-7, 1e-7))
    assert_close_to_oracle(grad, trl_grad, what="grad", tol=(1e-7, 1e-7))
    _, _, grad_token = run_policy_loss(policy_loss_impl, b.op_args(), {**knobs, "algo": "gspo"})
    assert float((grad_token - trl_grad).abs().max()) > 1e-4, "GSPO-token should differ here"
