"""The per-token importance weight of the policy losses (truncated importance sampling).

``importance_weight`` multiplies each token's policy-gradient term, after the TAPO lift and
before the KL term is added, on every backend and through the logits / hidden-state front
ends; plus the helpers that compute it (``truncated_importance_weight``) and measure the
rollout / trainer mismatch (``rollout_mismatch``).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor

import tapo_kernels
from tapo_kernels import reference
from tapo_kernels.reference import ALGOS, METRIC_NAMES
from tapo_kernels.testing import assert_close_to_oracle, loss_batch, run_policy_loss, seed_of

LIFTED_FRAC = METRIC_NAMES.index("lifted_frac")
WEIGHT = 7  # position of importance_weight among op_args() (after logp)


def f64(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def run_reference(args, knobs):
    logp = args[0].detach().clone().requires_grad_(True)
    loss, metrics = reference.policy_loss(logp, *args[1:], **knobs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), metrics, grad


# --------------------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------------------


def test_weight_golden(policy_loss_impl):
    """Token 1: r = 1, a = 2, w = 0.5 -> pg = -1; token 2: r = 2, a = -1, eps 0.2, dual clip 3:
    max(2, 1.2) = 2 < 3 -> pg = 2, w = 1.5 -> 3; token 3 masked (weight NaN). k1 KL with
    ref = logp - 0.5 adds 0.1 * 0.5 to each live token, unweighted. Token mean over 2 tokens:
    (-1 + 0.05 + 3 + 0.05) / 2 = 1.05. Gradients: (-a w r + 0.1) / 2 = -0.45 and
    (-a w r + 0.1) / 2 = (3 + 0.1) / 2 = 1.55."""
    logp = f64([[-1.0, -0.5, -2.0]])
    old = logp - f64([[0.0, math.log(2.0), 0.0]])
    adv = f64([[2.0, -1.0, 5.0]])
    mask = f64([[1.0, 1.0, 0.0]])
    ref = logp - 0.5
    weight = f64([[0.5, 1.5, float("nan")]])
    args = (logp, old, adv, mask, ref, None, None, weight)
    knobs = dict(algo="grpo", eps_low=0.2, eps_high=0.2, dual_clip_c=3.0, kl_coef=0.1, kl_type="k1")
    loss, metrics, grad = run_policy_loss(policy_loss_impl, args, knobs)
    assert_close_to_oracle(loss, f64(1.05), what="loss", tol=(1e-12, 1e-12))
    assert_close_to_oracle(grad, f64([[-0.45, 1.55, 0.0]]), what="grad", tol=(1e-12, 1e-12))
    # neither token is clipped (a < 0 with r = 2 keeps the unclipped term, below the dual clip)
    assert float(metrics[0]) == 0.0


def test_lift_acts_before_the_weight(policy_loss_impl):
    """a = -1 inside a call with delta 0.6, w = 0.5, r = 1: the lift gives a' = -0.4, the
    weight -0.2, so the loss is 0.2 (lifting the weighted advantage would give 0)."""
    logp = f64([[-1.0]])
    args = (
        logp,
        logp.clone(),
        f64([[-1.0]]),
        f64([[1.0]]),
        None,
        torch.zeros(1, 1, dtype=torch.int32),
        f64([0.6]),
        f64([[0.5]]),
    )
    loss, metrics, grad = run_policy_loss(policy_loss_impl, args, {"algo": "grpo"})
    assert_close_to_oracle(loss, f64(0.2), what="loss", tol=(1e-12, 1e-12))
    assert_close_to_oracle(grad, f64([[0.2]]), what="grad", tol=(1e-12, 1e-12))
    assert float(metrics[LIFTED_FRAC]) == 1.0


@pytest.mark.parametrize("algo", ALGOS)
def test_unit_weight_is_no_weight(policy_loss_impl, algo):
    """w = 1 multiplies each advantage by exactly 1: bit-equal loss, metrics and gradient."""
    b = loss_batch(B=4, T=13, dtype=torch.float32, seed=seed_of("unit-weight", algo))
    knobs = dict(algo=algo, kl_coef=0.1)
    plain = run_policy_loss(policy_loss_impl, b.op_args(), knobs)
    b.importance_weight = torch.ones_like(b.logp)
    weighted = run_policy_loss(policy_loss_impl, b.op_args(), knobs)
    for x, y, what in zip(plain, weighted, ("loss", "metrics", "grad"), strict=True):
        assert torch.equal(x, y), what


@pytest.mark.parametrize("algo", ALGOS)
def test_weight_scales_only_the_policy_gradient_term(policy_loss_impl, algo):
    """With every token's weight c: loss(c) = c * loss_pg + loss_kl, the KL term unscaled."""
    b = loss_batch(B=4, T=11, dtype=torch.float64, seed=seed_of("scale", algo))
    pg_knobs, kl_knobs = dict(algo=algo), dict(algo=algo, kl_coef=0.2)
    loss_pg, _, grad_pg = run_reference(b.op_args(), pg_knobs)
    loss_all, _, grad_all = run_reference(b.op_args(), kl_knobs)
    b.importance_weight = torch.full_like(b.logp, 0.25)
    loss, _, grad = run_policy_loss(policy_loss_impl, b.op_args(), kl_knobs)
    expected = 0.25 * loss_pg + (loss_all - loss_pg)
    assert_close_to_oracle(loss, expected, what="loss", tol=(1e-12, 1e-14))
    expected_grad = 0.25 * grad_pg + (grad_all - grad_pg)
    assert_close_to_oracle(grad, expected_grad, what="grad", tol=(1e-12, 1e-14))


# --------------------------------------------------------------------------------------
# every backend against the reference on random batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_calls", [False, True], ids=["no-calls", "calls"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per-row-adv", "per-token-adv"])
@pytest.mark.parametrize("algo", ALGOS)
def test_matches_reference(policy_loss_impl, algo, per_token, with_calls):
    seed = seed_of("weight-random", algo, per_token, with_calls)
    kw = dict(per_token=per_token, with_calls=with_calls, with_weight=True, seed=seed)
    knobs = dict(algo=algo, kl_coef=0.05, agg="seq-mean-token-mean", eps_high=0.28)
    if algo in ("gspo", "gspo-seq"):
        knobs.update(eps_low=0.03, eps_high=0.04)
    b64 = loss_batch(B=5, T=19, dtype=torch.float64, **kw)
    b32 = loss_batch(B=5, T=19, dtype=torch.float32, **kw)
    assert bool(torch.isnan(b64.importance_weight).any()), "masked tokens carry NaN weights"
    assert bool((b64.importance_weight == 0).any()), "some live weights are exactly 0"
    ref64 = run_reference(b64.op_args(), knobs)
    ref32 = run_reference(b32.op_args(), knobs)
    unweighted = run_reference(b64.op_args()[:WEIGHT], knobs)
    assert not torch.allclose(ref64[2], unweighted[2]), "the weight must change the gradient"
    before = [None if t is None else t.clone() for t in b32.op_args()]
    loss, metrics, grad = run_policy_loss(policy_loss_impl, b32.op_args(), knobs)
    for t, t0 in zip(b32.op_args(), before, strict=True):
        assert t is None or torch.equal(t.nan_to_num(), t0.nan_to_num()), "an input was modified"
    assert_close_to_oracle(loss, ref64[0], ref32[0], what="loss")
    assert_close_to_oracle(grad, ref64[2], ref32[2], what="grad")
    assert_close_to_oracle(metrics, ref64[1], ref32[1], what="metrics")
    loss, metrics, grad = run_policy_loss(policy_loss_impl, b64.op_args(), knobs)
    assert_close_to_oracle(loss, ref64[0], what="loss", tol=(1e-12, 1e-14))
    assert_close_to_oracle(grad, ref64[2], what="grad", tol=(1e-12, 1e-14))


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------


def _bad(mutate) -> tuple:
    b = loss_batch(B=3, T=8, dtype=torch.float32, with_weight=True, seed=3)
    b.importance_weight = torch.nan_to_num(b.importance_weight, nan=1.0)
    mutate(b)
    return b.op_args()


BAD_WEIGHTS = [
    pytest.param(
        lambda b: b.importance_weight.__setitem__((0, 5), -0.5),
        "importance_weight must be >= 0",
        id="negative",
    ),
    pytest.param(
        lambda b: (
            b.mask.__setitem__((0, 5), 1.0),
            b.importance_weight.__setitem__((0, 5), math.nan),
        ),
        "importance_weight contains NaN or inf",
        id="nan",
    ),
    pytest.param(
        lambda b: (
            b.mask.__setitem__((1, 6), 1.0),
            b.importance_weight.__setitem__((1, 6), math.inf),
        ),
        "importance_weight contains NaN or inf",
        id="inf",
    ),
    pytest.param(
        lambda b: setattr(b, "importance_weight", b.importance_weight[:, :-1]),
        "importance_weight",
        id="shape",
    ),
    pytest.param(
        lambda b: setattr(b, "importance_weight", b.importance_weight.double()),
        "importance_weight must have dtype float32",
        id="dtype",
    ),
]


@pytest.mark.parametrize("mutate, message", BAD_WEIGHTS)
def test_bad_weight_is_a_clear_error(policy_loss_impl, mutate, message):
    args = _bad(mutate)
    # a wrong dtype is a TypeError, as for every tensor argument; wrong values a ValueError
    error = TypeError if "dtype" in message else ValueError
    with pytest.raises(error, match=re.escape(message)):
        run_policy_loss(policy_loss_impl, args, {"algo": "grpo"})


def test_negative_weight_at_a_masked_token_is_ignored(policy_loss_impl):
    b = loss_batch(B=3, T=8, dtype=torch.float64, with_weight=True, seed=4)
    dead = (b.mask == 0).nonzero()[0].tolist()
    b.importance_weight[dead[0], dead[1]] = -3.0
    loss, _, grad = run_policy_loss(policy_loss_impl, b.op_args(), {"algo": "grpo"})
    expected = run_reference(b.op_args(), {"algo": "grpo"})
    assert_close_to_oracle(loss, expected[0], what="loss", tol=(1e-12, 1e-14))
    assert bool(torch.isfinite(grad).all())


# --------------------------------------------------------------------------------------
# front ends and the front door
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_front_ends_pass_the_weight(algo):
    B, T, V, H = 3, 6, 11, 5
    gen = torch.Generator().manual_seed(seed_of("front-weight", algo))
    b = loss_batch(B=B, T=T, dtype=torch.float32, with_weight=True, seed=seed_of("fw", algo))
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    knobs = dict(algo=algo, kl_coef=0.1)
    tensors = dict(
        ref_logp=b.ref_logp,
        call_map=b.call_map,
        call_delta=b.call_delta,
        importance_weight=b.importance_weight,
    )
    logits = (hidden @ weight.T).requires_grad_(True)
    ref_loss, ref_metrics, _, _ = reference.policy_loss_from_logits(
        logits, labels, b.old_logp, b.advantages, b.mask, *tensors.values(), **knobs
    )
    (ref_grad,) = torch.autograd.grad(ref_loss, logits)
    unweighted = reference.policy_loss_from_logits(
        logits, labels, b.old_logp, b.advantages, b.mask, *list(tensors.values())[:3], **knobs
    )[0]
    assert abs(float(unweighted.detach()) - float(ref_loss.detach())) > 1e-4, (
        "the weight must change the loss"
    )

    x = logits.detach().clone().requires_grad_(True)
    out = tapo_kernels.policy_loss_from_logits(
        x, labels, b.old_logp, b.advantages, b.mask, **tensors, **knobs
    )
    (grad,) = torch.autograd.grad(out.loss, x)
    assert_close_to_oracle(out.loss, ref_loss, what="logits loss", tol=(1e-5, 1e-6))
    assert_close_to_oracle(grad, ref_grad, what="logits grad", tol=(1e-5, 1e-7))
    assert_close_to_oracle(out.metrics, ref_metrics, what="metrics", tol=(1e-5, 1e-6))

    h = hidden.clone().requires_grad_(True)
    out = tapo_kernels.policy_loss_from_hidden(
        h, weight, labels, b.old_logp, b.advantages, b.mask, **tensors, **knobs
    )
    (grad_h,) = torch.autograd.grad(out.loss, h)
    h_ref = hidden.clone().requires_grad_(True)
    ref_loss_h = reference.policy_loss_from_hidden(
        h_ref,
        weight,
        None,
        labels,
        b.old_logp,
        b.advantages,
        b.mask,
        *tensors.values(),
        **knobs,
    )[0]
    (ref_grad_h,) = torch.autograd.grad(ref_loss_h, h_ref)
    assert_close_to_oracle(out.loss, ref_loss, what="hidden loss", tol=(1e-5, 1e-6))
    assert_close_to_oracle(grad_h, ref_grad_h, what="hidden grad", tol=(1e-5, 1e-7))


def test_front_door_policy_loss_takes_the_weight():
    b = loss_batch(B=3, T=9, dtype=torch.float64, with_weight=True, seed=11)
    out = tapo_kernels.policy_loss(
        b.logp,
        b.old_logp,
        b.advantages,
        b.mask,
        ref_logp=b.ref_logp,
        call_map=b.call_map,
        call_delta=b.call_delta,
        importance_weight=b.importance_weight,
        preset="dapo",
        kl_coef=0.1,
    )
    knobs = tapo_kernels.knobs.resolve("dapo", {"kl_coef": 0.1})
    expected, _ = reference.policy_loss(*b.op_args(), **knobs)
    assert_close_to_oracle(out.loss, expected, what="loss", tol=(1e-12, 1e-14))


def test_opcheck_and_compile_with_weight():
    b = loss_batch(B=3, T=9, dtype=torch.float32, with_weight=True, seed=12)
    args = list(b.op_args())
    args[WEIGHT] = torch.nan_to_num(args[WEIGHT], nan=0.0)
    args[0] = args[0].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.tapo.policy_loss.default, tuple(args), {"algo": "grpo"})

    def f(*a):
        return torch.ops.tapo.policy_loss(*a, algo="sapo", kl_coef=0.1)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = f(*args)
    got = compiled(*args)
    assert_close_to_oracle(got, expected, what="compiled loss", tol=(1e-6, 1e-7))


# --------------------------------------------------------------------------------------
# the helpers
# --------------------------------------------------------------------------------------


def test_truncated_importance_weight_by_hand():
    old = f64([[-1.0, -1.0 + math.log(3.0), -2.0, 0.0]])
    rollout = f64([[-1.0, -1.0, -1.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    w = tapo_kernels.truncated_importance_weight(old, rollout, cap=2.0, mask=mask)
    assert_close_to_oracle(w, f64([[1.0, 2.0, math.exp(-1.0), 0.0]]), tol=(1e-15, 0))
    # without a mask: the ratio exp(-20) at the clamp, never 0 or NaN
    w = tapo_kernels.truncated_importance_weight(old, rollout, cap=2.0)
    assert_close_to_oracle(w[0, 3], f64(math.exp(-20.0)), tol=(1e-12, 0))
    assert not w.requires_grad


def test_truncated_importance_weight_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rollout_logp must have the shape"):
        tapo_kernels.truncated_importance_weight(x, torch.zeros(2, 4))
    for cap in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="cap must be finite and > 0"):
            tapo_kernels.truncated_importance_weight(x, x, cap=cap)


def test_rollout_mismatch_by_hand():
    """d = old - rollout = (0, ln 3, -1) on live tokens; a masked token holds 50."""
    old = f64([[0.0, math.log(3.0), -1.0, 50.0]])
    rollout = torch.zeros_like(old)
    mask = torch.tensor([[True, True, True, False]])
    m = tapo_kernels.rollout_mismatch(old, rollout, mask, cap=2.0)
    assert math.isclose(float(m["abs_logp_diff"]), (math.log(3.0) + 1.0) / 3, rel_tol=1e-12)
    assert math.isclose(float(m["max_abs_logp_diff"]), math.log(3.0), rel_tol=1e-12)
    k3 = (0.0 + (3.0 - 1.0 - math.log(3.0)) + (math.exp(-1.0) + 1.0 - 1.0)) / 3
    assert math.isclose(float(m["kl_k3"]), k3, rel_tol=1e-12)
    assert math.isclose(float(m["truncated_frac"]), 1.0 / 3, rel_tol=1e-12)
    same = tapo_kernels.rollout_mismatch(old, old, mask)
    assert float(same["kl_k3"]) == 0.0 and float(same["abs_logp_diff"]) == 0.0
