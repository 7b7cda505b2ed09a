"""Contract tests of ``torch.ops.tapo.policy_loss`` (docs/math.md, sections 3-4) on every backend.

Layout, in order:

1. hand-computed golden cases (GRPO clip / dual clip / clip-higher, SAPO, GSPO-token versus
   sequence-level GSPO, KL estimators and their clamps, aggregation modes, TAPO lift);
2. every backend against the pure-torch reference on fresh random batches (tolerance by rule);
3. ``gradcheck`` in float64 through the op;
4. the fused TAPO lift equals the loss on ``fused_correct``'s corrected advantages;
5. masking traps: fully masked rows and batches, observation tokens, the global count;
6. (parity with verl's and TRL's public loss formulas: ``tests/test_peers.py``);
7. bad input gives clear errors that name the argument;
8. ``opcheck``, ``torch.compile(fullgraph=True)``, presets and the front door.

Backends come from the ``policy_loss_impl`` fixture (``tests/conftest.py``): a
``(forward, backward)`` pair with the schemas of ``tapo::policy_loss`` and
``tapo::policy_loss_backward``. Shapes stay tiny because the Triton backend runs under the
interpreter here.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

import tapo_kernels
from tapo_kernels import PRESETS, ToolCalls, _args, _library, reference
from tapo_kernels.reference import AGGS, ALGOS, KL_TYPES, METRIC_NAMES
from tapo_kernels.testing import (
    LossBatch,
    assert_close_to_oracle,
    assert_exact,
    correct_batch,
    loss_batch,
    seed_of,
)
from tapo_kernels.testing import run_policy_loss as run_backend

OP = torch.ops.tapo.policy_loss
OP_BACKWARD = torch.ops.tapo.policy_loss_backward

Impl = tuple[Callable[..., Any], Callable[..., Any]]
Args = tuple[Tensor | None, ...]

LIFTED_FRAC = METRIC_NAMES.index("lifted_frac")
E = math.e

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def run_reference(args: Args, knobs: dict[str, Any]):
    """(loss, metrics, grad) of the pure-torch oracle, gradient by autograd."""
    logp = args[0].detach().clone().requires_grad_(True)
    loss, metrics = reference.policy_loss(logp, *args[1:], **knobs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), metrics, grad


def cast_args(args: Args, dtype: torch.dtype) -> Args:
    """Floating tensors to ``dtype``; integer/bool tensors and ``None`` unchanged."""
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in args)


def slice_rows(args: Args, rows: slice) -> Args:
    """The rows ``rows`` of a batch; ``call_delta`` (indexed by ``call_map``) stays whole."""
    return tuple(t if t is None or i == 6 else t[rows] for i, t in enumerate(args))


def assert_tight(name: str, out: Tensor, expected: Tensor) -> None:
    """float64 agreement up to summation order (the rule's float64 tolerance)."""
    assert out.dtype == torch.float64, f"{name}: dtype {out.dtype}"
    assert_close_to_oracle(out, expected, what=name)


def assert_metrics(metrics: Tensor, expected: dict[str, float], rel: float = 1e-6) -> None:
    """Compare named entries of the ``(6,)`` float32 metrics tensor with hand values."""
    assert metrics.shape == (len(METRIC_NAMES),) and metrics.dtype == torch.float32, (
        metrics.shape,
        metrics.dtype,
    )
    for name, value in expected.items():
        got = metrics[METRIC_NAMES.index(name)]
        want = torch.tensor(value, dtype=torch.float64)
        assert_close_to_oracle(got, want, what=name, tol=(rel, 1e-7))


def f64(values: float | list) -> Tensor:
    """A float64 tensor of hand-written values."""
    return torch.tensor(values, dtype=torch.float64)


def row_inputs(
    log_ratio: list[float], advantages: list[float]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One row (B=1): logp, old_logp with ``logp - old_logp = log_ratio``, advantages, mask 1."""
    T = len(log_ratio)
    logp = -0.5 - 0.25 * torch.arange(T, dtype=torch.float64)[None, :]
    old = logp - f64([log_ratio])
    old = torch.where(f64([log_ratio]) == 0, logp, old)  # exactly r = 1 where asked
    return logp, old, f64([advantages]), torch.ones(1, T, dtype=torch.float64)


def knobs_for(algo: str, **extra: Any) -> dict[str, Any]:
    """Per-algorithm knobs for random batches: clip ranges wide enough that both the clipped
    and the unclipped branch occur (GSPO's 3e-4 default would clip almost every row)."""
    knobs: dict[str, Any] = {"algo": algo}
    if algo == "grpo":
        knobs.update(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)
    elif algo in ("gspo", "gspo-seq"):
        knobs.update(eps_low=0.05, eps_high=0.05)
    else:
        knobs.update(tau_pos=1.0, tau_neg=1.05)
    knobs.update(extra)
    return knobs


SPREAD = {
    "grpo": 0.6,
    "gspo": 0.3,
    "sapo": 0.5,
    "gspo-seq": 0.3,
}  # std of logp - old_logp per algorithm


def algo_batch(algo: str, tag: str, *parts: object, B: int, T: int, **kw: Any) -> LossBatch:
    """A random batch with ``algo``'s log-ratio spread, seeded by ``(tag, algo, *parts)``
    (GSPO-seq draws GSPO-token's batches: the same inputs, checked to exercise each case)."""
    seed = seed_of(tag, "gspo" if algo == "gspo-seq" else algo, *parts)
    return loss_batch(B=B, T=T, spread=SPREAD[algo], seed=seed, **kw)


# --------------------------------------------------------------------------------------
# 1. hand-computed golden cases
# --------------------------------------------------------------------------------------

GRPO_GOLDEN = [
    # A > 0, log ratio 1: r = e = 2.71828 > 1.2, so l = max(-2e, -2 * 1.2) = -2.4 (clipped),
    # constant in logp: gradient 0; one token clipped of one.
    pytest.param([1.0], [2.0], {}, -2.4, [0.0], 1.0, id="pos-adv-ratio-e-clipped"),
    # A = 0.5 > 0, r = 1.1 and 0.9 inside [0.8, 1.2]: l = -0.5 r, token-mean over 2 tokens:
    # loss = -(0.55 + 0.45) / 2 = -0.5; dl/dlogp = -A r / 2 = [-0.275, -0.225].
    pytest.param(
        [math.log(1.1), math.log(0.9)],
        [0.5, 0.5],
        {},
        -0.5,
        [-0.275, -0.225],
        0.0,
        id="pos-adv-inside-range",
    ),
    # A = -1 < 0, r = e: l1 = -A r = e = 2.71828, l2 = -A * 1.2 = 1.2, max = e (unclipped
    # branch); dual clip c = 3 caps at -A * 3 = 3 > e, so inactive: loss e, gradient -A r = e.
    pytest.param(
        [1.0], [-1.0], {"dual_clip_c": 3.0}, E, [E], 0.0, id="neg-adv-ratio-e-below-dual-cap"
    ),
    # A = -1, r = e^2 = 7.389: unclipped branch 7.389; dual clip caps it at -A * 3 = 3,
    # a constant: loss 3, gradient 0, counted as clipped.
    # (clip_frac counts the PPO clip only; the dual clip has its own fraction, below)
    pytest.param([2.0], [-1.0], {"dual_clip_c": 3.0}, 3.0, [0.0], 0.0, id="neg-adv-dual-clip-caps"),
    # Same token with dual_clip_c = 0 (off): loss -A r = e^2 = 7.389, gradient e^2.
    pytest.param(
        [2.0], [-1.0], {"dual_clip_c": 0.0}, E**2, [E**2], 0.0, id="neg-adv-dual-clip-off"
    ),
    # A = -1, r = 0.5 < 0.8: l1 = 0.5, l2 = -A * 0.8 = 0.8, max = 0.8 (clipped): gradient 0.
    pytest.param([math.log(0.5)], [-1.0], {}, 0.8, [0.0], 1.0, id="neg-adv-low-ratio-clipped"),
    # Clip-higher: A = 1, r = 1.25 lies inside [0.8, 1.28]: loss -1.25, gradient -A r = -1.25.
    pytest.param(
        [math.log(1.25)], [1.0], {"eps_high": 0.28}, -1.25, [-1.25], 0.0, id="clip-higher-inside"
    ),
    # The same token with the symmetric default eps_high = 0.2 is clipped at 1.2: loss -1.2.
    pytest.param([math.log(1.25)], [1.0], {}, -1.2, [0.0], 1.0, id="clip-higher-default-clips"),
    # Clip-higher, r = e: clipped at 1 + 0.28: loss -1.28, gradient 0.
    pytest.param([1.0], [1.0], {"eps_high": 0.28}, -1.28, [0.0], 1.0, id="clip-higher-ratio-e"),
    # Log-ratio clamp: logp - old = 30 is clamped to 20, r = e^20 = 4.85e8; A = -1 without
    # dual clip: loss e^20, and the clamp cuts the gradient to 0.
    pytest.param(
        [30.0],
        [-1.0],
        {"dual_clip_c": 0.0},
        math.exp(20.0),
        [0.0],
        0.0,
        id="log-ratio-clamped-at-20",
    ),
]


@pytest.mark.parametrize(
    "log_ratio, adv, knobs, loss_expected, grad_expected, clip_frac", GRPO_GOLDEN
)
def test_grpo_golden(
    policy_loss_impl, log_ratio, adv, knobs, loss_expected, grad_expected, clip_frac, request
):
    logp, old, a, mask = row_inputs(log_ratio, adv)
    args = (logp, old, a, mask, None, None, None)
    loss, metrics, grad = run_backend(policy_loss_impl, args, {"algo": "grpo", **knobs})
    assert_tight("loss", loss, f64(loss_expected))
    assert_tight("grad", grad, f64([grad_expected]))
    mean_ratio = sum(math.exp(min(lr, 20.0)) for lr in log_ratio) / len(log_ratio)
    # ppo_kl: the mean of old_logp - logp, the log-ratio clamped to +-20
    ppo_kl = -sum(max(min(lr, 20.0), -20.0) for lr in log_ratio) / len(log_ratio)
    dual_frac = 1.0 if "dual-clip-caps" in request.node.name else 0.0  # the one dual-clip case
    assert_metrics(
        metrics,
        {
            "clip_frac": clip_frac,
            "mean_ratio": mean_ratio,
            "mean_kl": 0.0,
            "lifted_frac": 0.0,
            "dual_clip_frac": dual_frac,
            "ppo_kl": ppo_kl,
        },
    )


def test_grpo_golden_per_row_advantage(policy_loss_impl):
    # B=2, T=2, per-row advantages (B,): row 0 A = 1 with r = [1.1, e] -> l = [-1.1, -1.2]
    # (second clipped); row 1 A = -1 with r = [e^2, 0.9] -> l = [min(e^2, 3) = 3, 0.9].
    # token-mean over 4 tokens: (-1.1 - 1.2 + 3 + 0.9) / 4 = 1.6 / 4 = 0.4.
    # gradients / 4: row 0 [-1.1, 0], row 1 [0 (dual clip), -A r = 0.9] -> [-0.275, 0, 0, 0.225].
    lr = f64([[math.log(1.1), 1.0], [2.0, math.log(0.9)]])
    logp = f64([[-1.0, -2.0], [-0.5, -1.5]])
    args = (
        logp,
        logp - lr,
        f64([1.0, -1.0]),
        torch.ones(2, 2, dtype=torch.float64),
        None,
        None,
        None,
    )
    loss, metrics, grad = run_backend(policy_loss_impl, args, {"algo": "grpo"})
    assert_tight("loss", loss, f64(0.4))
    assert_tight("grad", grad, f64([[-0.275, 0.0], [0.0, 0.225]]))
    # token (0,1) held by the PPO clip, (1,0) by the dual clip: 1 / 4 each
    assert_metrics(
        metrics,
        {
            "clip_frac": 0.25,
            "dual_clip_frac": 0.25,
            "mean_ratio": (1.1 + E + E**2 + 0.9) / 4,
            "ppo_kl": -(math.log(1.1) + 1.0 + 2.0 + math.log(0.9)) / 4,
        },
    )


def test_gspo_seq_golden(policy_loss_impl):
    # One row, log ratios [0.2, 0.0]: log s = 0.1, s = e^0.1 = 1.1051709 for both tokens;
    # per-token advantages a = [2, -1] (as after a TAPO lift), token-mean over 2 tokens.
    s = math.exp(0.1)
    logp, old, _, mask = row_inputs([0.2, 0.0], [0.0, 0.0])
    adv = f64([[2.0, -1.0]])
    args = (logp, old, adv, mask, None, None, None)
    # eps 0.2: s inside [0.8, 1.2], l = -a s = [-2s, s]; loss (-2s + s) / 2 = -s / 2.
    # GSPO-seq: d loss / d s = -1/2, d s / d logp_t = s / 2 (the mean over 2 tokens):
    # both tokens -s / 4 = -0.2762927. (GSPO-token would give -a_t s / 2 = [-s, s / 2].)
    knobs = {"algo": "gspo-seq", "eps_low": 0.2, "eps_high": 0.2}
    loss, metrics, grad = run_backend(policy_loss_impl, args, knobs)
    assert_tight("loss", loss, f64(-s / 2))
    assert_tight("grad", grad, f64([[-s / 4, -s / 4]]))
    assert_metrics(metrics, {"clip_frac": 0.0, "mean_ratio": s, "ppo_kl": -0.1})
    _, _, grad_token = run_backend(policy_loss_impl, args, {**knobs, "algo": "gspo"})
    assert_tight("GSPO-token grad", grad_token, f64([[-s, s / 2]]))
    # eps_high 0.05: s > 1.05. Token 0 (a = 2): max(-2s, -2.1) = -2.1, clipped (constant);
    # token 1 (a = -1): max(s, 1.05) = s. loss (-2.1 + s) / 2; d loss / d s = 1/2, so each
    # token gets (1/2) (s / 2) = s / 4 = 0.2762927; half the tokens clipped.
    loss, metrics, grad = run_backend(policy_loss_impl, args, {**knobs, "eps_high": 0.05})
    assert_tight("loss", loss, f64((-2.1 + s) / 2))
    assert_tight("grad", grad, f64([[s / 4, s / 4]]))
    assert_metrics(metrics, {"clip_frac": 0.5, "mean_ratio": s})


def test_sapo_golden(policy_loss_impl):
    # r = 1 on both tokens (logp == old_logp); A = [1.5, -0.7] so tau = [tau_pos, tau_neg].
    # l = -A sigmoid(0) 4 / tau = -2 A / tau; seq-mean-token-sum over one row sums the tokens.
    # dl/dlogp = -A sigmoid'(0) tau r 4 / tau = -A * 0.25 * 4 * 1 = -A (weight 1), any tau.
    logp, old, a, mask = row_inputs([0.0, 0.0], [1.5, -0.7])
    args = (logp, old, a, mask, None, None, None)
    for tau_pos, tau_neg in ((1.0, 1.05), (2.0, 0.5)):
        knobs = {
            "algo": "sapo",
            "tau_pos": tau_pos,
            "tau_neg": tau_neg,
            "agg": "seq-mean-token-sum",
        }
        loss, metrics, grad = run_backend(policy_loss_impl, args, knobs)
        # (1.0, 1.05): -3 + 1.4 / 1.05 = -1.666667; (2.0, 0.5): -1.5 + 2.8 = 1.3
        assert_tight("loss", loss, f64(-2 * 1.5 / tau_pos + 2 * 0.7 / tau_neg))
        assert_tight("grad", grad, f64([[-1.5, 0.7]]))
        # SAPO has no hard clip: clip_frac is 0; mean ratio 1
        assert_metrics(metrics, {"clip_frac": 0.0, "mean_ratio": 1.0, "mean_kl": 0.0})


def test_sapo_golden_away_from_one(policy_loss_impl):
    # A = 1, r = e, tau = 1: x = e - 1 = 1.718282, sigmoid(x) = 1 / (1 + 0.179374) = 0.8479074;
    # l = -4 * 0.8479074 = -3.3916296;
    # dl/dlogp = -4 sigmoid(x)(1 - sigmoid(x)) r = -4 * 0.8479074 * 0.1520926 * e = -1.4022033.
    logp, old, a, mask = row_inputs([1.0], [1.0])
    loss, _, grad = run_backend(
        policy_loss_impl, (logp, old, a, mask, None, None, None), {"algo": "sapo"}
    )
    s = 1.0 / (1.0 + math.exp(-(E - 1.0)))
    assert_tight("loss", loss, f64(-4.0 * s))
    assert_tight("grad", grad, f64([[-4.0 * s * (1.0 - s) * E]]))
    assert abs(float(loss) + 3.3916296) < 1e-6 and abs(float(grad) + 1.4022033) < 1e-6


def sequence_level_gspo(
    logp: Tensor, old: Tensor, adv_row: Tensor, mask: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """Sequence-level GSPO (one ratio per row, gradient through the whole row), seq-mean-token-mean.

    ``s_i = exp(mean_{t in mask} (logp - old))``,
    ``loss_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high))``, mean over rows.
    """
    n = mask.sum(1)
    s = torch.exp(((logp - old) * mask).sum(1) / n)
    loss_rows = torch.maximum(-adv_row * s, -adv_row * s.clamp(1 - eps_low, 1 + eps_high))
    # seq-mean-token-mean of a per-row constant: sum_t loss_i m_it / n_i = loss_i
    return loss_rows.mean()


def test_gspo_token_equals_sequence_level_gspo(policy_loss_impl):
    # Row 0: mask [1,1,1,0], lr = [0.1, -0.05, 0.15, (2.0 masked)], mean 0.2/3 = 0.066667,
    #   s0 = 1.068939 inside [0.8, 1.2]; A0 = -0.7: loss_0 = 0.7 * 1.068939 = 0.748257.
    # Row 1: mask [0,1,1,1], lr = [(5.0 masked), 0.5, 0.4, 0.6], mean 0.5, s1 = 1.648721 > 1.2;
    #   A1 = 1.3: loss_1 = max(-2.143338, -1.3 * 1.2 = -1.56) = -1.56 (clipped, gradient 0).
    # loss = (0.748257 - 1.56) / 2 = -0.405871; grad on row 0 mask tokens = (1/2)(1/3)(0.7 s0)
    #   = 0.124710, zero elsewhere.
    lr = f64([[0.1, -0.05, 0.15, 2.0], [5.0, 0.5, 0.4, 0.6]])
    mask = f64([[1, 1, 1, 0], [0, 1, 1, 1]])
    logp = f64([[-1.0, -0.3, -2.0, -0.7], [-0.2, -1.1, -0.9, -3.0]])
    old = logp - lr
    adv_row = f64([-0.7, 1.3])
    knobs = {"algo": "gspo", "eps_low": 0.2, "eps_high": 0.2, "agg": "seq-mean-token-mean"}

    x = logp.clone().requires_grad_(True)
    expected_loss = sequence_level_gspo(x, old, adv_row, mask, 0.2, 0.2)
    (expected_grad,) = torch.autograd.grad(expected_loss, x)
    assert abs(float(expected_loss.detach()) + 0.4058713) < 1e-6
    assert abs(float(expected_grad[0, 0]) - 0.1247096) < 1e-6

    for adv in (adv_row, adv_row[:, None] * mask):  # per-row (B,) and per-token (B, T) forms
        args = (logp, old, adv, mask, None, None, None)
        loss, metrics, grad = run_backend(policy_loss_impl, args, knobs)
        assert_tight("loss", loss, expected_loss.detach())
        assert_tight("grad", grad, expected_grad)
        # ratio s_it = s_i on every mask token: mean over 6 tokens = (3 s0 + 3 s1) / 6;
        # row 1's three tokens are clipped: clip_frac = 3 / 6.
        s0, s1 = math.exp(0.2 / 3), math.exp(0.5)
        assert_metrics(metrics, {"clip_frac": 0.5, "mean_ratio": (s0 + s1) / 2})


def test_gspo_random_rows_equal_sequence_level(policy_loss_impl):
    # Random batch, per-row constant advantages, no empty row: GSPO-token == sequence GSPO.
    b = loss_batch(
        B=4,
        T=9,
        dtype=torch.float64,
        per_token=False,
        with_ref=False,
        with_calls=False,
        empty_row=False,
        spread=0.15,
        seed=11,
    )
    eps = 0.1
    x = b.logp.clone().requires_grad_(True)
    expected_loss = sequence_level_gspo(x, b.old_logp, b.advantages, b.mask, eps, eps)
    (expected_grad,) = torch.autograd.grad(expected_loss, x)
    assert bool((expected_grad != 0).any())  # some row is unclipped, the test can fail
    knobs = {"algo": "gspo", "eps_low": eps, "eps_high": eps, "agg": "seq-mean-token-mean"}
    loss, _, grad = run_backend(policy_loss_impl, b.op_args(), knobs)
    assert_tight("loss", loss, expected_loss.detach())
    assert_tight("grad", grad, expected_grad)


def test_gspo_log_ratio_clamped_at_10(policy_loss_impl):
    # One token, lr = 12: log s = 12 is clamped at 10, s = e^10 = 22026.47; A = -1, eps 0.2:
    # l = max(e^10, 1.2) = e^10; the clamp cuts the gradient: 0.
    logp, old, a, mask = row_inputs([12.0], [-1.0])
    knobs = {"algo": "gspo", "eps_low": 0.2, "eps_high": 0.2}
    loss, metrics, grad = run_backend(
        policy_loss_impl, (logp, old, a, mask, None, None, None), knobs
    )
    assert_tight("loss", loss, f64(math.exp(10.0)))
    assert_tight("grad", grad, f64([[0.0]]))
    assert_metrics(metrics, {"mean_ratio": math.exp(10.0)})


# d = ref_logp - logp on three tokens: [0.5, -0.3, 3.0]; policy term off (A = 0), kl_coef 1,
# seq-mean-token-sum over one row = sum of the per-token KL.
KL_D = [0.5, -0.3, 3.0]
KL_GOLDEN = [
    # k1 = -d = [-0.5, 0.3, -3.0], sum -3.2; dk1/dlogp = +1 each.
    pytest.param("k1", -3.2, [1.0, 1.0, 1.0], id="k1"),
    # k2 = d^2 / 2 = [0.125, 0.045, 4.5], sum 4.67; dk2/dlogp = -d = [-0.5, 0.3, -3.0].
    pytest.param("k2", 4.67, [-0.5, 0.3, -3.0], id="k2"),
    # k3 = e^d - d - 1 = [1.648721 - 1.5, 0.740818 + 0.3 - 1, e^3 - 4 = 16.0855 -> clamp 10]
    #    = [0.148721, 0.040818, 10], sum 10.189539; dk3/dlogp = -(e^d - 1) = [-0.648721,
    #    0.259182, 0 (clamped)].
    pytest.param(
        "k3",
        math.exp(0.5) - 1.5 + math.exp(-0.3) - 0.7 + 10.0,
        [-(math.exp(0.5) - 1.0), -(math.exp(-0.3) - 1.0), 0.0],
        id="k3-clamp-10",
    ),
]


@pytest.mark.parametrize("kl_type, loss_expected, grad_expected", KL_GOLDEN)
def test_kl_golden(policy_loss_impl, kl_type, loss_expected, grad_expected):
    logp, old, a, mask = row_inputs([0.2, -0.1, 0.3], [0.0, 0.0, 0.0])
    ref = logp + f64([KL_D])
    knobs = {"algo": "grpo", "kl_coef": 1.0, "kl_type": kl_type, "agg": "seq-mean-token-sum"}
    loss, metrics, grad = run_backend(
        policy_loss_impl, (logp, old, a, mask, ref, None, None), knobs
    )
    assert_tight("loss", loss, f64(loss_expected))
    assert_tight("grad", grad, f64([grad_expected]))
    assert_metrics(metrics, {"mean_kl": loss_expected / 3})
    # kl_coef scales the KL term linearly: 0.25 * loss
    knobs["kl_coef"] = 0.25
    loss, _, grad = run_backend(policy_loss_impl, (logp, old, a, mask, ref, None, None), knobs)
    assert_tight("loss x0.25", loss, f64(0.25 * loss_expected))
    assert_tight("grad x0.25", grad, 0.25 * f64([grad_expected]))


@pytest.mark.parametrize(
    "dtype, d",
    [
        (torch.float32, 100.0),
        (torch.float32, -100.0),
        (torch.float64, 1000.0),
        (torch.float64, -1000.0),
    ],
)
def test_kl_k3_difference_clamped_at_20(policy_loss_impl, dtype, d):
    # |d| is far beyond 20: d is clamped to +-20 before exp (e^100 overflows fp32, e^1000 fp64),
    # so k3 = min(e^20 - 21, 10) = 10 or min(e^-20 + 19, 10) = 10, finite, gradient exactly 0.
    logp, old, a, mask = (t.to(dtype) for t in row_inputs([0.1], [0.0]))
    ref = logp + d
    knobs = {"algo": "grpo", "kl_coef": 1.0, "kl_type": "k3"}
    loss, metrics, grad = run_backend(
        policy_loss_impl, (logp, old, a, mask, ref, None, None), knobs
    )
    assert float(loss) == 10.0
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) == 0.0
    assert_metrics(metrics, {"mean_kl": 10.0})


# 2x3 batch, r = 1 everywhere (logp == old_logp), grpo: l = -A (no clip active), dl/dlogp = -A.
# A = [[1, 2, 3], [4, 5, 6]], mask = [[1, 1, 1], [1, 0, 0]] -> L = [[-1, -2, -3], [-4, 0, 0]].
AGG_A = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
AGG_MASK = [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]


def _agg(agg: str, loss: float, divisors: tuple[float, float], **normalisers: float) -> tuple:
    """(knobs, loss, divisors) of an aggregation case: the gradient is -A m / d_i on row i."""
    return {"agg": agg, **normalisers}, loss, divisors


AGG_GOLDEN = {
    # token-mean: (-1 - 2 - 3 - 4) / 4 = -2.5; grad -A m / 4.
    "token-mean": _agg("token-mean", -2.5, (4, 4)),
    # token-mean with global_count 8: -10 / 8 = -1.25; grad -A m / 8.
    "token-mean-global-count": _agg("token-mean", -1.25, (8, 8), global_count=8.0),
    # seq-mean-token-mean: rows -6/3 = -2 and -4/1 = -4, mean -3;
    # grad row 0 -A/(3*2), row 1 -A/(1*2).
    "seq-mean-token-mean": _agg("seq-mean-token-mean", -3.0, (6, 2)),
    # ... with global_count 4 (rows): (-2 - 4) / 4 = -1.5; grad row 0 -A/(3*4), row 1 -A/4.
    "seq-mean-token-mean-global-count": _agg(
        "seq-mean-token-mean", -1.5, (12, 4), global_count=4.0
    ),
    # seq-mean-token-sum: rows -6 and -4, mean -5; grad -A m / 2.
    "seq-mean-token-sum": _agg("seq-mean-token-sum", -5.0, (2, 2)),
    # ... with global_count 5: -10 / 5 = -2; grad -A m / 5.
    "seq-mean-token-sum-global-count": _agg("seq-mean-token-sum", -2.0, (5, 5), global_count=5.0),
    # seq-mean-token-sum-norm, norm_const defaults to T = 3: -5 / 3; grad -A m / 6.
    "seq-mean-token-sum-norm-default-T": _agg("seq-mean-token-sum-norm", -5 / 3, (6, 6)),
    # ... norm_const 4: -5 / 4 = -1.25; grad -A m / 8.
    "seq-mean-token-sum-norm-const-4": _agg(
        "seq-mean-token-sum-norm", -1.25, (8, 8), norm_const=4.0
    ),
    # ... norm_const 4 and global_count 5 rows: -10 / 5 / 4 = -0.5; grad -A m / 20.
    "seq-mean-token-sum-norm-const-and-count": _agg(
        "seq-mean-token-sum-norm", -0.5, (20, 20), norm_const=4.0, global_count=5.0
    ),
    # token-sum: the plain masked sum -1 - 2 - 3 - 4 = -10; grad -A m.
    "token-sum": _agg("token-sum", -10.0, (1, 1)),
    # ... with global_count 0.5 (a trainer's 1 / world on 2 ranks): -10 / 0.5 = -20;
    # grad -A m * 2.
    "token-sum-global-count": _agg("token-sum", -20.0, (0.5, 0.5), global_count=0.5),
}


@pytest.mark.parametrize("case", list(AGG_GOLDEN))
def test_aggregation_golden(policy_loss_impl, case):
    knobs, loss_expected, divisors = AGG_GOLDEN[case]
    logp = f64([[-0.3, -1.2, -2.0], [-0.1, -0.4, -5.0]])
    args = (logp, logp.clone(), f64(AGG_A), f64(AGG_MASK), None, None, None)
    loss, metrics, grad = run_backend(policy_loss_impl, args, {"algo": "grpo", **knobs})
    assert_tight("loss", loss, f64(loss_expected))
    assert_tight("grad", grad, -f64(AGG_A) * f64(AGG_MASK) / f64(divisors)[:, None])
    assert_metrics(
        metrics,
        {"clip_frac": 0.0, "mean_ratio": 1.0, "mean_kl": 0.0, "lifted_frac": 0.0, "ppo_kl": 0.0},
    )


def test_tapo_lift_golden(policy_loss_impl):
    # A = [-1, -1, -1, 0.5, 0, -1], call_map = [0, 0, 1, 1, 1, -1], call_delta = [0.6, 2.0]:
    #   tokens 0,1: min(0, -1 + 0.6) = -0.4; token 2: min(0, -1 + 2) = 0 (lifted, never flipped);
    #   token 3 (A >= 0) and token 4 (A = 0) untouched; token 5 outside any call: -1.
    # r = 1, grpo: l = -A' = [0.4, 0.4, 0, -0.5, 0, 1]; token-mean: 1.3 / 6 = 0.216667;
    # grad -A'/6 = [0.066667, 0.066667, 0, -0.083333, 0, 0.166667]; lifted 3 of 6 tokens.
    logp, old, a, mask = row_inputs([0.0] * 6, [-1.0, -1.0, -1.0, 0.5, 0.0, -1.0])
    call_map = torch.tensor([[0, 0, 1, 1, 1, -1]], dtype=torch.int32)
    call_delta = f64([0.6, 2.0])
    loss, metrics, grad = run_backend(
        policy_loss_impl, (logp, old, a, mask, None, call_map, call_delta), {"algo": "grpo"}
    )
    assert_tight("loss", loss, f64(1.3 / 6))
    assert_tight("grad", grad, f64([[0.4 / 6, 0.4 / 6, 0.0, -0.5 / 6, 0.0, 1.0 / 6]]))
    assert_metrics(metrics, {"lifted_frac": 0.5, "clip_frac": 0.0, "mean_ratio": 1.0})

    # per-row advantage A = -1 (B,): every call token is lifted: [-0.4, -0.4, 0, 0, 0, -1];
    # l = [0.4, 0.4, 0, 0, 0, 1], token-mean 1.8 / 6 = 0.3; lifted 5 of 6.
    loss, metrics, grad = run_backend(
        policy_loss_impl,
        (logp, old, f64([-1.0]), mask, None, call_map, call_delta),
        {"algo": "grpo"},
    )
    assert_tight("loss per-row", loss, f64(0.3))
    assert_tight("grad per-row", grad, f64([[0.4 / 6, 0.4 / 6, 0.0, 0.0, 0.0, 1.0 / 6]]))
    assert_metrics(metrics, {"lifted_frac": 5 / 6})

    # lifted_frac counts mask tokens only: masking tokens 0 and 3 leaves 2 lifted of 4.
    mask2 = f64([[0, 1, 1, 0, 1, 1]])
    _, metrics, grad = run_backend(
        policy_loss_impl, (logp, old, a, mask2, None, call_map, call_delta), {"algo": "grpo"}
    )
    assert_metrics(metrics, {"lifted_frac": 0.5})
    assert float(grad[0, 0]) == 0.0 and float(grad[0, 3]) == 0.0


def check_float64_against_reference(impl: Impl, args: Args, knobs: dict[str, Any]):
    """A float64 call of one backend within the float64 tolerance of the reference."""
    ref = run_reference(args, knobs)
    out = run_backend(impl, args, knobs)
    assert_tight("loss", out[0], ref[0])
    assert_close_to_oracle(out[1], ref[1], what="metrics", tol=(2.4e-7, 1e-7))
    assert_tight("grad", out[2], ref[2])
    return out


def test_tie_at_both_clip_bounds(policy_loss_impl):
    """logp == old_logp gives r = 1 exactly; eps_low = eps_high = 0 puts both clip bounds there.

    By hand, one row, token-mean over 2 tokens, a = (-1, 2): l1 = l2 = -a (a tie in maximum,
    0.5 of the gradient each), the clamp passes its gradient at the bounds (inclusive), so
    d loss / d logp_t = (0.5 * (-a) + 0.5 * (-a) * 1) * r / 2 = (0.5, -1).
    """
    logp = f64([[-1.0, -2.0]])
    args = (
        logp,
        logp.clone(),
        f64([[-1.0, 2.0]]),
        torch.ones(1, 2, dtype=torch.float64),
        None,
        None,
        None,
    )
    knobs = dict(algo="grpo", eps_low=0.0, eps_high=0.0, dual_clip_c=0.0)
    _, metrics, grad = check_float64_against_reference(policy_loss_impl, args, knobs)
    assert_exact(grad, f64([[0.5, -1.0]]), "grad")
    assert metrics[0].item() == 0.0  # a tie is not a clip


def test_tie_with_dual_clip(policy_loss_impl):
    """lr = 20 (the log-ratio clamp's bound, inclusive) and c = e^20: -a r == -a c, a tie.

    By hand, one token, a = -1: r = e^20 > 1 + eps_high, so max(l1, l2) = l1 = r; the tie
    in minimum(l1, l3) passes half the gradient: d loss / d logp = 0.5 * (-a) * r = 0.5 e^20.
    """
    if torch.exp(torch.tensor(20.0, dtype=torch.float64)).item() != math.exp(20.0):
        pytest.skip("torch's exp(20) differs from the C library's here; no exact tie to build")
    logp = f64([[0.0]])
    args = (logp, logp - 20.0, f64([-1.0]), torch.ones(1, 1, dtype=torch.float64), None, None, None)
    knobs = dict(algo="grpo", dual_clip_c=math.exp(20.0))
    _, _, grad = check_float64_against_reference(policy_loss_impl, args, knobs)
    assert grad.item() == 0.5 * math.exp(20.0)


def test_clamp_bounds_are_inclusive(policy_loss_impl):
    """lr clamp [-20, 20] and GSPO clamp(max=10): gradient at the bound, zero beyond it.

    By hand (grpo, a = -1, no dual clip, one token): loss = r, d loss / d logp = r at lr = 20,
    0 at lr = 20.5. GSPO with one mask token per row: log s = lr, so d loss / d logp = s at
    log s = 10 and 0 at log s = 10.5.
    """
    ones = torch.ones(2, 1, dtype=torch.float64)
    logp = torch.zeros(2, 1, dtype=torch.float64)
    for algo, bound in (("grpo", 20.0), ("gspo", 10.0)):
        old = f64([[-bound], [-bound - 0.5]])
        args = (logp, old, -ones[:, 0], ones, None, None, None)
        knobs = dict(algo=algo, dual_clip_c=0.0, agg="seq-mean-token-sum")
        _, _, grad = check_float64_against_reference(policy_loss_impl, args, knobs)
        # seq-mean-token-sum over 2 rows: d loss / d L = 1/2
        assert_close_to_oracle(grad[0], f64([0.5 * math.exp(bound)]), tol=(1e-14, 0.0))
        assert grad[1].item() == 0.0


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_far_from_reference_policy(policy_loss_impl, kl_type):
    """d = ref - logp across both k3 clamps: |d| > 20, k3 > 10 (d > 2.53 or d < -11), inside."""
    d = f64([[-25.0, -20.0, -12.0, -5.0, -0.5, 0.0, 1.0, 2.0, 3.0, 5.0, 20.0, 25.0]])
    logp = -torch.linspace(0.5, 3.0, d.shape[1], dtype=torch.float64)[None]
    old = logp + 0.1
    ref = logp + d
    adv = torch.full_like(logp, 0.3)
    mask = torch.ones_like(logp)
    args32 = tuple(t.float() for t in (logp, old, adv, mask, ref)) + (None, None)
    knobs = dict(algo="grpo", kl_type=kl_type, kl_coef=0.5)
    # the float32 slack relative above 1, as the values reach e^20
    check_against_reference(policy_loss_impl, args32, knobs, tol32=(1e-6, 1e-6))
    if kl_type != "k3":
        return
    # k3 is clamped to 10 beyond the clamps, so those tokens keep only the PPO gradient
    clamped = ((d > 2.6) | (d < -11.1))[0]  # e^2.6 - 3.6 = 9.9, e^-11.1 + 10.1 = 10.1
    for dtype in (torch.float32, torch.float64):
        args = cast_args(args32, dtype)
        grad = run_backend(policy_loss_impl, args, knobs)[2]
        ppo_only = run_backend(policy_loss_impl, args[:4] + (None, None, None), {"algo": "grpo"})[2]
        assert (grad[0, clamped] == ppo_only[0, clamped]).all()
        assert (grad[0, ~clamped] != ppo_only[0, ~clamped]).any()


# --------------------------------------------------------------------------------------
# 2. every backend equals the reference on fresh random batches
# --------------------------------------------------------------------------------------


def check_against_reference(
    impl: Impl,
    args32: Args,
    knobs: dict[str, Any],
    grad_loss: float = 1.0,
    nonzero_grad: bool = True,
    tol32: tuple[float, float] | None = None,
) -> None:
    """float32 by the tolerance rule against a float64 reference (with the float32 reference
    as the own-precision one; ``tol32`` replaces the rule's float32 tolerance); float64 within
    the float64 tolerance; inputs never modified."""
    assert args32[0].dtype == torch.float32
    args64 = cast_args(args32, torch.float64)
    ref64 = run_reference(args64, knobs)
    ref32 = run_reference(args32, knobs)
    if nonzero_grad:
        assert bool((ref64[2] != 0).any()), "degenerate batch: the reference gradient is all zero"

    for args, dtype in ((args32, torch.float32), (args64, torch.float64)):
        before = [None if t is None else t.clone() for t in args]
        loss, metrics, grad = run_backend(impl, args, knobs, grad_loss)
        for t, t0 in zip(args, before, strict=True):
            assert t is None or torch.equal(t, t0), "the op modified one of its inputs"
        assert loss.shape == () and loss.dtype == dtype
        assert metrics.shape == (len(METRIC_NAMES),) and metrics.dtype == torch.float32
        assert grad.shape == args[0].shape and grad.dtype == dtype
        if dtype == torch.float32:
            assert_close_to_oracle(loss, ref64[0], ref32[0], what="loss", tol=tol32)
            assert_close_to_oracle(metrics, ref64[1], ref32[1], what="metrics", tol=tol32)
            assert_close_to_oracle(
                grad, grad_loss * ref64[2], grad_loss * ref32[2], what="grad", tol=tol32
            )
        else:
            assert_tight("loss", loss, ref64[0])
            # float32 metrics of float64 values: both sides round, so 2 ulps (2.4e-7)
            assert_close_to_oracle(metrics, ref64[1], what="metrics", tol=(2.4e-7, 1e-7))
            assert_tight("grad", grad, grad_loss * ref64[2])


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("algo", ALGOS)
def test_matches_reference_algo_agg(policy_loss_impl, algo, agg):
    b = algo_batch(algo, "algo-agg", agg, B=5, T=11)
    check_against_reference(policy_loss_impl, b.op_args(), knobs_for(algo, agg=agg, kl_coef=0.1))


@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("algo", ALGOS)
def test_matches_reference_kl_type(policy_loss_impl, algo, kl_type):
    b = algo_batch(algo, "kl", kl_type, B=4, T=9)
    # ref_logp far from logp on a few tokens exercises the k3 clamp at 10
    b.ref_logp[0, -3:] += torch.tensor([4.0, -14.0, 30.0])
    check_against_reference(
        policy_loss_impl,
        b.op_args(),
        knobs_for(algo, kl_type=kl_type, kl_coef=0.3, agg="seq-mean-token-mean"),
    )


@pytest.mark.parametrize("with_calls", [False, True], ids=["no-calls", "calls"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per-row-adv", "per-token-adv"])
@pytest.mark.parametrize("algo", ALGOS)
def test_matches_reference_inputs(policy_loss_impl, algo, per_token, with_calls):
    options = dict(per_token=per_token, with_calls=with_calls, with_ref=per_token)
    b = algo_batch(algo, "inputs", per_token, with_calls, B=5, T=10, **options)
    knobs = knobs_for(algo, kl_coef=0.05 if per_token else 0.0)
    check_against_reference(policy_loss_impl, b.op_args(), knobs)
    if with_calls:  # the batch exercises the lift, so the comparison covers it
        assert float(reference.policy_loss(*b.op_args(), **knobs)[1][LIFTED_FRAC]) > 0


@pytest.mark.parametrize(
    "agg, extra",
    [
        ("token-mean", {"global_count": 57.0}),
        ("seq-mean-token-mean", {"global_count": 9.0}),
        ("seq-mean-token-sum", {"global_count": 6.0}),
        ("seq-mean-token-sum-norm", {"norm_const": 40.0}),
        ("seq-mean-token-sum-norm", {"norm_const": 7.0, "global_count": 12.0}),
    ],
)
@pytest.mark.parametrize("algo", ALGOS)
def test_matches_reference_normalisers(policy_loss_impl, algo, agg, extra):
    b = algo_batch(algo, "norm", agg, extra, B=4, T=12)
    check_against_reference(
        policy_loss_impl, b.op_args(), knobs_for(algo, agg=agg, kl_coef=0.1, **extra)
    )


@pytest.mark.parametrize(
    "B, T, algo",
    [(1, 1, "grpo"), (3, 1, "gspo"), (7, 97, "sapo"), (2, 1025, "gspo"), (13, 37, "grpo")],
)
def test_matches_reference_odd_shapes(policy_loss_impl, B, T, algo):
    b = loss_batch(
        B=B, T=T, spread=SPREAD[algo], empty_row=B > 2, seed=seed_of("shape", B, T, algo)
    )
    if B * T == 1 or T == 1:
        b.mask[:] = 1.0  # prompt tokens would mask the single column away
    check_against_reference(policy_loss_impl, b.op_args(), knobs_for(algo, kl_coef=0.1))


def test_backward_scales_with_grad_loss(policy_loss_impl):
    # The backward must multiply by the incoming gradient (e.g. a loss scale of 2.5).
    b = loss_batch(B=3, T=8, spread=0.5, seed=5)
    check_against_reference(
        policy_loss_impl, b.op_args(), knobs_for("grpo", kl_coef=0.1), grad_loss=2.5
    )
    check_against_reference(policy_loss_impl, b.op_args(), knobs_for("sapo"), grad_loss=-0.75)


def test_backward_matches_reference_backward_kernel(policy_loss_impl):
    """float64, an upstream gradient of 0.37: the reference's backward kernel, to 1e-12."""
    b = loss_batch(B=5, T=23, dtype=torch.float64, seed=17)
    knobs = dict(
        algo="sapo", kl_coef=0.2, kl_type="k2", agg="seq-mean-token-sum-norm", norm_const=12.0
    )
    grad = run_backend(policy_loss_impl, b.op_args(), knobs, grad_loss=0.37)[2]
    ref = _library.policy_loss_backward_reference_kernel(
        torch.tensor(0.37, dtype=torch.float64), *b.op_args(), **knobs
    )
    assert_close_to_oracle(grad, ref, what="grad", tol=(1e-12, 1e-15))


@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("algo", ALGOS)
def test_matches_reference_grid(policy_loss_impl, grid_knobs, algo, agg, kl_type):
    """Every algo x agg x kl_type, per-token and per-row advantages, with and without calls,
    dual clip on and off, normalisers, larger shapes; each batch in float32 and float64.
    The float32 slack is relative above 1 (sums over up to 1,261 tokens reach ~30)."""
    variants = itertools.product((True, False), (True, False), range(2))
    for i, (per_token, with_calls, _) in enumerate(variants):
        b = loss_batch(
            B=(7, 13)[i % 2],
            T=(33, 97)[i % 2],
            dtype=torch.float32,
            per_token=per_token,
            with_calls=with_calls,
            spread=0.5,
            seed=i,
        )
        count = 123.0 if agg == "token-mean" else 5.0
        normalisers = ({}, dict(norm_const=50.0, global_count=40.0), dict(global_count=count), {})
        knobs = grid_knobs(algo, agg, kl_type, (3.0, 0.0)[i % 2], **normalisers[i % 4])
        check_against_reference(policy_loss_impl, b.op_args(), knobs, tol32=(1e-6, 1e-6))


# Shapes and options cycled per case: (B, T, per-token advantages, TAPO calls, reference
# log-probs, kl_type, bool mask, norm_const, global_count, grad_loss).
CASES = [
    (1, 33, True, True, True, "k1", False, None, None, 1.0),
    (3, 5, False, False, True, "k2", True, 4.0, None, -0.75),
    (7, 33, True, True, True, "k3", False, None, None, 1.7),
    (7, 33, False, True, False, "k3", True, 16.0, 50.0, 0.5),
    (3, 1, True, True, True, "k3", False, None, 3.0, 1.0),
]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("algo", ALGOS)
def test_matches_reference_cases(policy_loss_impl, algo, agg):
    """Bool masks, upstream gradients, GSPO's default clip range (nearly every row clipped),
    a single row and T = 1."""
    for i, (B, T, per_token, calls, ref, kl_type, bool_mask, norm, count, g) in enumerate(CASES):
        seed = 1000 * ALGOS.index(algo) + 100 * AGGS.index(agg) + i
        b = loss_batch(
            B=B,
            T=T,
            dtype=torch.float32,
            per_token=per_token,
            with_ref=ref,
            with_calls=calls,
            spread=0.3 if i % 2 else 1.0,
            seed=seed,
        )
        if bool_mask:
            b.mask = b.mask > 0
        knobs = dict(
            algo=algo,
            agg=agg,
            kl_type=kl_type,
            kl_coef=0.05 if ref else 0.0,
            norm_const=norm,
            global_count=count,
        )
        if algo == "gspo":
            knobs.update(eps_low=3e-4, eps_high=4e-4)
        if i == 2:
            knobs.update(eps_high=0.28, dual_clip_c=0.0, tau_pos=0.8, tau_neg=1.3)
        # token-sum is an unnormalised sum of up to 231 terms: fp32 summation order alone
        # moves it by a few ulps of the total, so its tolerance is relative
        tol32 = (1e-6, 1e-6) if agg == "token-sum" else None
        check_against_reference(
            policy_loss_impl, b.op_args(), knobs, grad_loss=g, nonzero_grad=False, tol32=tol32
        )


@pytest.mark.parametrize("algo", ALGOS)
def test_matches_reference_without_ref_logp(policy_loss_impl, algo):
    b = loss_batch(B=5, T=50, with_ref=False, seed=21)
    check_against_reference(policy_loss_impl, b.op_args(), dict(algo=algo))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("algo", ALGOS)
def test_bool_mask_equals_float_mask(policy_loss_impl, algo, dtype):
    b = loss_batch(B=4, T=9, dtype=dtype, spread=0.5, seed=6)
    knobs = knobs_for(algo, kl_coef=0.1, agg="seq-mean-token-mean")
    as_float = run_backend(policy_loss_impl, b.op_args(), knobs)
    args = list(b.op_args())
    args[3] = b.mask.bool()
    as_bool = run_backend(policy_loss_impl, tuple(args), knobs)
    for name, x, y in zip(("loss", "metrics", "grad"), as_float, as_bool, strict=True):
        assert_exact(x, y, name)
    if dtype == torch.float32:
        check_against_reference(policy_loss_impl, tuple(args), knobs)


@pytest.mark.parametrize("algo", ALGOS)
def test_non_contiguous_inputs(policy_loss_impl, algo):
    # Transposed (B, T) views: strides (1, B). Results must equal the contiguous ones exactly.
    b = loss_batch(B=5, T=8, spread=0.5, seed=7)
    knobs = knobs_for(algo, kl_coef=0.1, agg="seq-mean-token-sum")
    contiguous = run_backend(policy_loss_impl, b.op_args(), knobs)
    views = tuple(
        None if t is None else t.T.contiguous().T if t.dim() == 2 else torch.stack([t, t], 1)[:, 0]
        for t in b.op_args()
    )
    assert not any(v.is_contiguous() for v in views if v is not None and v.numel() > 1)
    strided = run_backend(policy_loss_impl, views, knobs)
    assert_exact(strided[0], contiguous[0], "loss")
    assert_exact(strided[2], contiguous[2], "grad")
    if policy_loss_impl[0] is _library.policy_loss_reference_kernel:
        # torch may reduce the strided metrics in another order: the last bit may differ
        assert_close_to_oracle(strided[1], contiguous[1], what="metrics", tol=(1e-6, 1e-7))
    else:
        assert_exact(strided[1], contiguous[1], "metrics")
    check_against_reference(policy_loss_impl, views, knobs)


@pytest.mark.parametrize("shape", [(3, 0), (0, 5)])
def test_empty_shapes_equal_reference(policy_loss_impl, shape):
    B, T = shape
    args = (torch.zeros(B, T), torch.zeros(B, T), torch.ones(B), torch.ones(B, T), None, None, None)
    for agg in AGGS:
        knobs = dict(algo="gspo", agg=agg)
        for name, x, y in zip(
            ("loss", "metrics", "grad"),
            run_backend(policy_loss_impl, args, knobs),
            run_reference(args, knobs),
            strict=True,
        ):
            assert_exact(x, y, name)


# --------------------------------------------------------------------------------------
# 3. gradcheck in float64 through the op
# --------------------------------------------------------------------------------------


def kink_margin(args: Args, knobs: dict[str, Any]) -> float:
    """Smallest distance of any mask token to a point where the loss is not differentiable:
    clip bounds and dual-clip bound (ratio units), the log-ratio clamp, the k3 clamps."""
    logp, old, adv, mask, ref, call_map, call_delta, _ = args
    a = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv
    if call_map is not None:
        a = reference.apply_lift(a, call_map, call_delta)
    on_mask = mask.bool()
    policy = on_mask & (a != 0)  # A = 0 has no policy term, hence no kink
    lr = logp - old
    if knobs["algo"] == "gspo":
        mf = mask.to(logp.dtype)
        lr = ((lr * mf).sum(1, keepdim=True) / mf.sum(1, keepdim=True).clamp(min=1)).expand_as(logp)
    r = lr.exp()
    dists = [((lr.abs() - 20).abs(), policy)]
    if knobs["algo"] != "sapo":
        dists += [
            ((r - (1 - knobs["eps_low"])).abs(), policy),
            ((r - (1 + knobs["eps_high"])).abs(), policy),
        ]
    if knobs["algo"] == "grpo" and knobs.get("dual_clip_c", 3.0) > 1:
        dists.append(((r - knobs.get("dual_clip_c", 3.0)).abs(), policy & (a < 0)))
    if ref is not None:
        d = ref - logp
        dists += [(((d.exp() - d - 1) - 10).abs(), on_mask), ((d.abs() - 20).abs(), on_mask)]
    return min(float(x[m].min()) for x, m in dists if bool(m.any()))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("algo", ALGOS)
def test_gradcheck(algo, agg):
    # GSPO-token's gradient is a stop-gradient surrogate (log s_it = logp - sg(logp) + sg(log s_i)):
    # it is the derivative of the loss value only when the advantage is constant along a row,
    # so GSPO is checked with per-row advantages and without the (per-token) TAPO lift.
    per_token = algo != "gspo"
    b = algo_batch(
        algo, "gc", agg, B=3, T=6, dtype=torch.float64, per_token=per_token, with_calls=per_token
    )
    knobs = knobs_for(algo, agg=agg, kl_coef=0.2, kl_type="k3")
    if algo == "gspo":
        knobs.update(eps_low=0.2, eps_high=0.2)
    args = b.op_args()
    assert kink_margin(args, knobs) > 1e-4
    logp = args[0].clone().requires_grad_(True)

    def loss_of(x: Tensor) -> Tensor:
        return OP(x, *args[1:], **knobs)[0]

    assert torch.autograd.gradcheck(loss_of, (logp,), eps=1e-6, atol=1e-8, rtol=1e-6)
    (g,) = torch.autograd.grad(loss_of(logp), logp)
    assert float(g.abs().max()) > 0  # not a flat (fully clipped) batch


# --------------------------------------------------------------------------------------
# 4. fused TAPO lift == loss on fused_correct's corrected advantages
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_fused_lift_equals_corrected_advantages(policy_loss_impl, algo):
    # few distinct queries and one key make repeated (matching) calls likely; seeds checked to
    # lift tokens with a nonzero advantage (asserted below)
    seed = {"grpo": 0, "gspo": 2, "sapo": 4, "gspo-seq": 2}[algo]
    cb = correct_batch(
        B=12, T=24, group_size=4, calls_per_row=3, num_queries=3, num_keys=1, seed=seed
    )
    calls = ToolCalls(
        cb.call_seq, cb.call_start, cb.call_end, cb.call_tool, cb.call_key, cb.call_params
    )
    result = tapo_kernels.fused_correct(
        cb.advantages,
        cb.seq_advantages,
        cb.group_ids,
        calls,
        cb.tool_sim_kind,
        theta=0.5,
        alpha_min=0.1,
    )
    assert bool((result.delta > 0).any()), "no call was corrected: the comparison would be vacuous"
    B, T = cb.advantages.shape
    call_map = calls.call_map(B, T)
    gen = torch.Generator().manual_seed(seed_of("tapo-logp", algo))
    logp = -4 * torch.rand(B, T, generator=gen)
    old = logp + SPREAD[algo] * torch.randn(B, T, generator=gen)
    knobs = knobs_for(algo)

    fused_args = (logp, old, cb.advantages, cb.mask, None, call_map, result.delta)
    corrected_args = (logp, old, result.corrected, cb.mask, None, None, None)
    fused = run_backend(policy_loss_impl, fused_args, knobs)
    corrected = run_backend(policy_loss_impl, corrected_args, knobs)

    # both equal the float64 loss on the (float32) corrected advantages, by rule
    ref64 = run_reference(cast_args(corrected_args, torch.float64), knobs)
    ref32 = run_reference(corrected_args, knobs)
    for got in (fused, corrected):
        assert_close_to_oracle(got[0], ref64[0], ref32[0], what="loss")
        assert_close_to_oracle(got[2], ref64[2], ref32[2], what="grad")
    assert_close_to_oracle(fused[0], corrected[0], what="fused loss", tol=(2e-6, 1e-6))
    assert_close_to_oracle(fused[2], corrected[2], what="fused grad", tol=(2e-6, 1e-6))
    # same metrics except lifted_frac, which only the fused path can see
    torch.testing.assert_close(fused[1][:LIFTED_FRAC], corrected[1][:LIFTED_FRAC])
    assert float(corrected[1][LIFTED_FRAC]) == 0.0
    lifted = ((result.corrected != cb.advantages) & cb.mask.bool()).sum() / cb.mask.sum()
    assert float(fused[1][LIFTED_FRAC]) == pytest.approx(float(lifted), rel=1e-6)
    assert float(lifted) > 0


# --------------------------------------------------------------------------------------
# 5. masking traps
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("algo", ALGOS)
def test_fully_masked_row_is_finite_with_zero_gradient(policy_loss_impl, algo, agg):
    b = algo_batch(algo, "empty-row", agg, B=3, T=6, dtype=torch.float64, empty_row=True)
    assert float(b.mask[-1].sum()) == 0
    loss, metrics, grad = run_backend(
        policy_loss_impl, b.op_args(), knobs_for(algo, agg=agg, kl_coef=0.1)
    )
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(metrics).all())
    assert bool(torch.isfinite(grad).all())
    assert float(grad[-1].abs().max()) == 0.0
    # the empty row does not count: dropping it leaves loss and gradient unchanged
    kept = slice_rows(b.op_args(), slice(0, 2))
    loss2, _, grad2 = run_backend(policy_loss_impl, kept, knobs_for(algo, agg=agg, kl_coef=0.1))
    assert_tight("loss without the empty row", loss, loss2)
    assert_tight("grad without the empty row", grad[:-1], grad2)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("algo", ALGOS)
def test_all_masked_batch_gives_zero(policy_loss_impl, algo, agg):
    # ANCHORS trap 8: verl's seq-mean modes divide 0 by 0 here and return NaN.
    b = algo_batch(algo, "all-masked", B=3, T=5, dtype=torch.float64)
    b.mask.zero_()
    # also with a global count: 0 / count, not 0 / 0
    for dtype, global_count in itertools.product((torch.float32, torch.float64), (None, 10.0)):
        args = cast_args(b.op_args(), dtype)
        knobs = knobs_for(algo, agg=agg, kl_coef=0.1, global_count=global_count)
        loss, metrics, grad = run_backend(policy_loss_impl, args, knobs)
        assert float(loss) == 0.0, f"{dtype}: loss {loss}"
        assert bool(torch.isfinite(metrics).all()) and float(metrics.abs().max()) == 0.0
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("algo", ALGOS)
def test_observation_tokens_never_get_gradient(policy_loss_impl, algo, dtype):
    # ANCHORS trap 4: tool-observation tokens (mask 0 between policy tokens) carry call spans,
    # large advantages, ratios and KL terms, yet get exactly zero gradient and leave the loss,
    # the gradient elsewhere and the metrics unchanged whatever their values are.
    b = algo_batch(algo, "obs", B=3, T=12, dtype=torch.float64)
    b.mask[:, :] = 1.0
    obs = torch.zeros_like(b.mask, dtype=torch.bool)
    obs[:, 4:8] = True  # observation span inside every row
    b.mask[obs] = 0.0
    b.call_map[:, 3:9] = 0  # a call span that straddles the observation
    knobs = knobs_for(algo, kl_coef=0.2)
    loss, metrics, grad = run_backend(policy_loss_impl, cast_args(b.op_args(), dtype), knobs)
    assert float(grad[obs].abs().max()) == 0.0
    assert float(grad[~obs].abs().max()) > 0.0

    gen = torch.Generator().manual_seed(1)
    noise = lambda: 3.0 * torch.randn(b.logp.shape, generator=gen, dtype=torch.float64) * obs
    args = list(b.op_args())
    args[0] = b.logp + noise()
    args[1] = b.old_logp + noise()
    args[2] = b.advantages + 10.0 * noise()
    args[4] = b.ref_logp + noise()
    loss2, metrics2, grad2 = run_backend(policy_loss_impl, cast_args(tuple(args), dtype), knobs)
    assert_close_to_oracle(loss2, loss, what="loss")
    assert_close_to_oracle(grad2, grad, what="grad")
    torch.testing.assert_close(metrics2, metrics)

    # the generator's scattered mask-0 tokens (prompt, padding, a fully masked row) too
    b = loss_batch(B=6, T=40, dtype=dtype, seed=13)
    grad = run_backend(policy_loss_impl, b.op_args(), knobs_for(algo, kl_coef=0.1))[2]
    assert_exact(grad[b.mask == 0], torch.zeros_like(grad[b.mask == 0]), "masked grad")
    assert float(grad[b.mask != 0].abs().sum()) > 0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("algo", ALGOS)
def test_global_count_micro_batches_sum_to_full_batch(policy_loss_impl, algo, agg):
    # ANCHORS trap 3: with the global count as normaliser, the sum of the micro-batch losses and
    # gradients equals the full-batch loss and gradient.
    b = algo_batch(algo, "micro", agg, B=5, T=8, dtype=torch.float64, empty_row=True)
    knobs = knobs_for(algo, agg=agg, kl_coef=0.1)
    full_loss, _, full_grad = run_backend(policy_loss_impl, b.op_args(), knobs)

    if agg == "token-mean":
        global_count = float(b.mask.sum())
    elif agg == "token-sum":
        global_count = 1.0  # a plain sum needs no shared normaliser
    else:
        global_count = float((b.mask.sum(1) > 0).sum())
    losses, grads = [], []
    for rows in (slice(0, 2), slice(2, 5)):
        part = slice_rows(b.op_args(), rows)
        loss, _, grad = run_backend(policy_loss_impl, part, {**knobs, "global_count": global_count})
        losses.append(loss)
        grads.append(grad)
    assert_tight("sum of micro-batch losses", losses[0] + losses[1], full_loss)
    assert_tight("micro-batch gradients", torch.cat(grads), full_grad)

    # the trap itself: local normalisers do not add up (this test could fail)
    local = [
        run_backend(policy_loss_impl, slice_rows(b.op_args(), rows), knobs)[0]
        for rows in (slice(0, 2), slice(2, 5))
    ]
    if agg == "token-sum":  # ... except for the plain sum, which is additive over rows
        assert_tight("sum of local token-sum losses", local[0] + local[1], full_loss)
    else:
        assert abs(float(local[0] + local[1] - full_loss)) > 1e-6


# --------------------------------------------------------------------------------------
# 7. bad input gives clear errors naming the argument
# --------------------------------------------------------------------------------------


def _bad(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Replace entries of the call's keyword dictionary (tensors and knobs alike)."""

    def apply(call: dict[str, Any]) -> dict[str, Any]:
        out = dict(call)
        for k, v in changes.items():
            out[k] = v(call) if callable(v) else v
        return out

    return apply


def _of(name: str, change: Callable[[Tensor], Tensor]) -> Callable[[dict[str, Any]], Tensor]:
    """``change`` applied to the call's argument ``name``."""
    return lambda call: change(call[name])


def _nan_at_mask_token(name: str, value: float = math.nan) -> Callable[[dict[str, Any]], Tensor]:
    def make(call: dict[str, Any]) -> Tensor:
        t = call[name].clone()
        i, j = (call["mask"] > 0).nonzero()[0].tolist()
        t[i, j] = value
        return t

    return make


def _error(
    id_: str, error: type[Exception], argument: str, in_backward: bool, **changes: Any
) -> Any:
    """A case of ``test_bad_input_raises_clear_error``: ``changes`` as ``_bad`` takes them, the
    exception type, the argument its message must name, and whether the backward checks it."""
    return pytest.param(_bad(**changes), error, argument, in_backward, id=id_)


# A tensor of the wrong layout, found without reading values (the backward checks it too):
# id -> (exception type, the tensor, which the message must name, the change of it).
_LAYOUT_ERRORS = {
    "logp-1d": (ValueError, "logp", lambda t: t[0]),
    "old_logp-shape": (ValueError, "old_logp", lambda t: t[:, :-1]),
    "old_logp-dtype": (TypeError, "old_logp", Tensor.double),
    "advantages-shape": (ValueError, "advantages", lambda t: t[:, :-1]),
    "advantages-dtype": (TypeError, "advantages", Tensor.double),
    "mask-shape": (ValueError, "mask", lambda t: t[:-1]),
    "mask-dtype": (TypeError, "mask", Tensor.long),
    "ref_logp-shape": (ValueError, "ref_logp", lambda t: t[:-1]),
    "ref_logp-dtype": (TypeError, "ref_logp", Tensor.double),
    "call_map-shape": (ValueError, "call_map", lambda t: t[:, :-1]),
    "call_map-dtype": (TypeError, "call_map", Tensor.long),
    "call_delta-2d": (ValueError, "call_delta", lambda t: t[None]),
    "call_delta-dtype": (TypeError, "call_delta", Tensor.double),
}
# Knob values out of range (ValueError naming the knob, in the backward too):
# knob -> {id suffix: value}; and names no knob knows.
_KNOB_ERRORS = {
    "dual_clip_c": {"0.5": 0.5, "1": 1.0, "negative": -2.0},
    "eps_low": {"1": 1.0, "1.5": 1.5, "negative": -0.1},
    "eps_high": {"negative": -0.1, "nan": math.nan},
    "tau_pos": {"0": 0.0},
    "tau_neg": {"0": 0.0, "inf": math.inf},
    "kl_coef": {"nan": math.nan},
    "norm_const": {"0": 0.0},
    "global_count": {"negative": -1.0, "inf": math.inf},
}
_UNKNOWN_NAMES = {"algo": "ppo", "agg": "sum", "kl_type": "k4"}
# Data-dependent problems (NaN/inf, call_map range) need a host sync to detect: the backward
# may skip them (in_backward False), since the forward of the same call validated the values.
# id -> (the argument, which the ValueError must name, its bad value made from the call).
_VALUE_ERRORS = {
    "nan-in-logp": ("logp", _nan_at_mask_token("logp")),
    "inf-in-old_logp": ("old_logp", _nan_at_mask_token("old_logp", math.inf)),
    "nan-in-advantages": ("advantages", _nan_at_mask_token("advantages")),
    "nan-in-ref_logp": ("ref_logp", _nan_at_mask_token("ref_logp")),
    "nan-in-row-advantages": (
        "advantages",
        _of("advantages", lambda t: torch.where(torch.arange(t.shape[0]) == 1, math.nan, t[:, 0])),
    ),
    "inf-in-call_delta": (
        "call_delta",
        _of("call_delta", lambda t: torch.cat([t[:-1], t.new_tensor([-math.inf])])),
    ),
    "call_map-index-too-large": (
        "call_map",
        lambda c: torch.where(c["call_map"] >= 0, c["call_delta"].numel(), -1).to(torch.int32),
    ),
    "call_map-index-below-minus-1": ("call_map", _of("call_map", lambda t: torch.full_like(t, -2))),
    "nan-in-mask": ("mask", _of("mask", lambda t: torch.where(t > 0.5, math.nan, t))),
    "mask-above-1": ("mask", _of("mask", lambda t: 2.0 * t)),
    "mask-below-0": ("mask", _of("mask", lambda t: -t)),
}

BAD_INPUTS = [
    *(
        _error(id_, error, name, True, **{name: _of(name, change)})
        for id_, (error, name, change) in _LAYOUT_ERRORS.items()
    ),
    _error(
        "logp-fp16",
        TypeError,
        "logp",
        True,
        mask=_of("mask", Tensor.bool),
        **{
            n: _of(n, Tensor.half)
            for n in ("logp", "old_logp", "advantages", "ref_logp", "call_delta")
        },
    ),
    *(
        _error(f"{knob}-{suffix}", ValueError, knob, True, **{knob: value})
        for knob, values in _KNOB_ERRORS.items()
        for suffix, value in values.items()
    ),
    *(
        _error(f"unknown-{knob}", ValueError, knob, True, **{knob: value})
        for knob, value in _UNKNOWN_NAMES.items()
    ),
    _error("call_map-without-call_delta", ValueError, "call_delta", True, call_delta=None),
    _error("call_delta-without-call_map", ValueError, "call_map", True, call_map=None),
    _error("kl_coef-without-ref_logp", ValueError, "ref_logp", True, ref_logp=None, kl_coef=0.1),
    *(
        _error(id_, ValueError, name, False, **{name: make})
        for id_, (name, make) in _VALUE_ERRORS.items()
    ),
    # two problems: the one of the earlier argument is reported
    _error(
        "error-order",
        ValueError,
        "advantages",
        False,
        advantages=_nan_at_mask_token("advantages"),
        ref_logp=_nan_at_mask_token("ref_logp"),
    ),
]

_TENSOR_NAMES = _args.names("policy_loss")[: 1 + len(_args.LOSS_TENSORS)]


@pytest.mark.parametrize("change, error, argument, in_backward", BAD_INPUTS)
def test_bad_input_raises_clear_error(policy_loss_impl, change, error, argument, in_backward):
    b = loss_batch(B=3, T=6, seed=3)
    good = dict(zip(_TENSOR_NAMES, b.op_args(), strict=True), algo="grpo", kl_coef=0.1)
    call = change(good)
    args = tuple(call.pop(n) for n in _TENSOR_NAMES)
    names_argument = re.compile(rf"(?<![A-Za-z_]){re.escape(argument)}(?![A-Za-z_])")
    forward, backward = policy_loss_impl
    with pytest.raises(error, match=names_argument):
        forward(*args, **call)
    if not in_backward:
        return
    with pytest.raises(error, match=names_argument):
        backward(torch.ones((), dtype=args[0].dtype), *args, **call)


def test_good_input_of_error_cases_runs(policy_loss_impl):
    # The unmodified call of the error cases is valid: each error comes from its one change.
    b = loss_batch(B=3, T=6, seed=3)
    loss, metrics, grad = run_backend(
        policy_loss_impl, b.op_args(), {"algo": "grpo", "kl_coef": 0.1}
    )
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(grad).all())


# --------------------------------------------------------------------------------------
# 8. opcheck, torch.compile, presets, front door
# --------------------------------------------------------------------------------------


def opcheck_samples() -> list[tuple[Args, dict[str, Any]]]:
    """A few (args, knobs) covering both dtypes, every algo, per-row/per-token, calls, KL."""
    samples = []
    for i, (algo, dtype, per_token, calls, agg, extra) in enumerate(
        [
            ("grpo", torch.float32, True, True, "token-mean", {"kl_coef": 0.1}),
            ("gspo", torch.float64, False, False, "seq-mean-token-mean", {}),
            ("sapo", torch.float32, True, False, "seq-mean-token-sum-norm", {"norm_const": 11.0}),
            (
                "grpo",
                torch.float64,
                False,
                True,
                "seq-mean-token-sum",
                {"global_count": 3.0, "kl_coef": 0.2, "kl_type": "k2"},
            ),
        ]
    ):
        b = loss_batch(B=3, T=7, dtype=dtype, per_token=per_token, with_calls=calls, seed=20 + i)
        samples.append((b.op_args(), {"algo": algo, "agg": agg, **extra}))
    for algo in ALGOS:  # every algo in float64 with calls and KL
        b = loss_batch(B=4, T=9, dtype=torch.float64, seed=1)
        samples.append((b.op_args(), {"algo": algo, "kl_coef": 0.1}))
    return samples


@pytest.mark.parametrize("index", range(7))
def test_opcheck_policy_loss(index):
    args, knobs = opcheck_samples()[index]
    logp = args[0].clone().requires_grad_(True)
    torch.library.opcheck(OP, (logp, *args[1:]), knobs)


@pytest.mark.parametrize("index", range(7))
def test_opcheck_policy_loss_backward(index):
    args, knobs = opcheck_samples()[index]
    grad_loss = torch.ones((), dtype=args[0].dtype)
    torch.library.opcheck(OP_BACKWARD, (grad_loss, *args), knobs)


def _training_step(*args: Tensor | None) -> tuple[Tensor, Tensor]:
    """A scaled loss of the op's seven tensors, with a few knobs set."""
    loss, metrics = OP(*args, algo="grpo", eps_high=0.28, kl_coef=0.1, agg="seq-mean-token-mean")
    return 2.0 * loss, metrics


def _front_door_step(logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    out = tapo_kernels.policy_loss(logp, old, adv, mask, preset="gspo", eps_low=0.05, eps_high=0.05)
    return out.loss, out.metrics


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    b = loss_batch(B=3, T=8, spread=0.5, seed=31)
    for step, args in ((_training_step, b.op_args()), (_front_door_step, b.op_args()[:4])):
        eager_logp = args[0].clone().requires_grad_(True)
        eager_loss, eager_metrics = step(eager_logp, *args[1:])
        eager_loss.backward()

        compiled = torch.compile(step, fullgraph=True, backend=backend)
        logp = args[0].clone().requires_grad_(True)
        loss, metrics = compiled(logp, *args[1:])
        loss.backward()
        torch.testing.assert_close(loss, eager_loss)
        torch.testing.assert_close(metrics, eager_metrics)
        torch.testing.assert_close(logp.grad, eager_logp.grad)
        assert float(logp.grad.abs().max()) > 0


# Preset knobs written out from docs/math.md, section 3.10 (not read from PRESETS).
DOC_PRESETS = {
    "grpo": {"algo": "grpo", "eps_low": 0.2, "eps_high": 0.2, "dual_clip_c": 3.0},
    "dapo": {
        "algo": "grpo",
        "eps_low": 0.2,
        "eps_high": 0.28,
        "dual_clip_c": 3.0,
        "agg": "token-mean",
    },
    "dr_grpo": {"algo": "grpo", "eps_low": 0.2, "eps_high": 0.2, "agg": "seq-mean-token-sum-norm"},
    "gspo": {"algo": "gspo", "eps_low": 3e-4, "eps_high": 4e-4},
    "sapo": {"algo": "sapo", "tau_pos": 1.0, "tau_neg": 1.05},
}


def front_door(b: LossBatch, logp: Tensor | None = None, **knobs: Any):
    """``tapo_kernels.policy_loss`` of a batch with every optional tensor (``logp`` replaces
    the batch's log-probs)."""
    return tapo_kernels.policy_loss(
        b.logp if logp is None else logp,
        b.old_logp,
        b.advantages,
        b.mask,
        ref_logp=b.ref_logp,
        call_map=b.call_map,
        call_delta=b.call_delta,
        **knobs,
    )


@pytest.mark.parametrize("preset", sorted(DOC_PRESETS))
def test_preset_knobs_follow_spec(preset):
    assert preset in PRESETS
    for knob, value in DOC_PRESETS[preset].items():
        assert PRESETS[preset][knob] == value, f"{preset}.{knob}"
    # the front door equals the reference called with the preset's knobs
    b = loss_batch(B=4, T=9, spread=0.3, seed=seed_of("preset", preset))
    out = front_door(b, preset=preset)
    expected = reference.policy_loss(*b.op_args(), **PRESETS[preset])
    torch.testing.assert_close(out.loss, expected[0])
    torch.testing.assert_close(out.metrics, expected[1])


def test_dapo_preset_uses_clip_higher():
    # A = 1, r = 1.25: dapo (eps_high 0.28) keeps the token unclipped: loss -1.25, grad -1.25;
    # overriding eps_high = 0.2 clips it at 1.2 with zero gradient.
    logp, old, a, mask = (t.float() for t in row_inputs([math.log(1.25)], [1.0]))
    x = logp.clone().requires_grad_(True)
    out = tapo_kernels.policy_loss(x, old, a, mask, preset="dapo")
    (g,) = torch.autograd.grad(out.loss, x)
    assert float(out.loss.detach()) == pytest.approx(-1.25, rel=1e-6)
    assert float(g) == pytest.approx(-1.25, rel=1e-6)
    x = logp.clone().requires_grad_(True)
    out = tapo_kernels.policy_loss(x, old, a, mask, preset="dapo", eps_high=0.2)
    (g,) = torch.autograd.grad(out.loss, x)
    assert float(out.loss.detach()) == pytest.approx(-1.2, rel=1e-6)
    assert float(g) == 0.0


def test_front_door_errors_and_metrics_dict():
    b = loss_batch(B=3, T=6, seed=4)
    with pytest.raises(ValueError, match="preset"):
        tapo_kernels.policy_loss(b.logp, b.old_logp, b.advantages, b.mask, preset="ppo-max")
    with pytest.raises(TypeError, match="eps_hgh"):
        tapo_kernels.policy_loss(b.logp, b.old_logp, b.advantages, b.mask, eps_hgh=0.28)

    x = b.logp.clone().requires_grad_(True)
    out = front_door(b, x, kl_coef=0.1)
    assert isinstance(out, tapo_kernels.PolicyLossOutput)
    metrics = out.metrics_dict()
    assert list(metrics) == [
        "actor/clip_frac",
        "actor/mean_ratio",
        "actor/mean_kl",
        "actor/lifted_frac",
        "actor/dual_clip_frac",
        "actor/ppo_kl",
    ]
    assert all(isinstance(v, float) for v in metrics.values())
    assert list(out.metrics_dict(prefix="")) == [
        "clip_frac",
        "mean_ratio",
        "mean_kl",
        "lifted_frac",
        "dual_clip_frac",
        "ppo_kl",
    ]
    assert [metrics[f"actor/{n}"] for n in METRIC_NAMES] == pytest.approx(out.metrics.tolist())
    out.loss.backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
