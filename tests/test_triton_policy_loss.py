"""Triton kernels of ``tapo::policy_loss`` and its backward against the pure-torch reference.

The kernels run on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``, set in
``conftest.py``), on tiny shapes. float64 results must match the float64 reference tightly;
float32 results follow the tolerance rule: the kernel's error against the float64 reference
is at most twice the float32 reference's own error, plus 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from tapo_kernels import _library
from tapo_kernels.ops import policy_loss as pl_ops
from tapo_kernels.reference import AGGS, ALGOS
from tapo_kernels.testing import LossBatch, loss_batch

forward_ref = _library.policy_loss_reference_kernel
backward_ref = _library.policy_loss_backward_reference_kernel
forward_triton = pl_ops.policy_loss_triton
backward_triton = pl_ops.policy_loss_backward_triton

RULE_EPS = 1e-6  # slack of the tolerance rule, relative to the values' scale when above 1
F64_RTOL, F64_ATOL = 1e-10, 1e-12


def _to64(args: tuple) -> tuple:
    return tuple(t.double() if t is not None and t.is_floating_point() else t for t in args)


def assert_close_by_rule(out: Tensor, ref64: Tensor, ref32: Tensor, what: str) -> None:
    """Kernel error vs the fp64 reference <= 2x the fp32 reference's error + a tiny slack.

    The slack is ``RULE_EPS`` absolute, or relative for values above 1 (ratios reach
    e^20 = 4.9e8, where one fp32 ulp is 32 and summation order alone moves the last bit).
    """
    assert torch.isfinite(out).all(), f"{what}: non-finite values {out}"
    if out.numel() == 0:
        return
    err = (out.double() - ref64.double()).abs().max().item()
    ref_err = (ref32.double() - ref64.double()).abs().max().item()
    slack = RULE_EPS * max(1.0, ref64.double().abs().max().item())
    print(f"{what}: kernel err {err:.3e}, fp32 reference err {ref_err:.3e}")
    assert err <= 2 * ref_err + slack, (
        f"{what}: kernel err {err:.3e} > 2 x {ref_err:.3e} + {slack:.1e}"
    )


def check_against_reference(args: tuple, grad_loss: float, **knobs) -> tuple[Tensor, ...]:
    """Run forward and backward of both implementations and compare; return the kernel's."""
    dtype = args[0].dtype
    g = torch.tensor(grad_loss, dtype=dtype)
    loss, metrics = forward_triton(*args, **knobs)
    grad = backward_triton(g, *args, **knobs)
    assert loss.dtype == dtype and loss.shape == ()
    assert metrics.dtype == torch.float32 and metrics.shape == (4,)
    assert grad.dtype == dtype and grad.shape == args[0].shape
    if dtype == torch.float64:
        ref_loss, ref_metrics = forward_ref(*args, **knobs)
        ref_grad = backward_ref(g, *args, **knobs)
        torch.testing.assert_close(loss, ref_loss, rtol=F64_RTOL, atol=F64_ATOL)
        # metrics are float32: both sides round an fp64 value, so allow 2 fp32 ulps
        torch.testing.assert_close(metrics, ref_metrics, rtol=2.4e-7, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=F64_RTOL, atol=F64_ATOL)
    else:
        args64 = _to64(args)
        ref64 = forward_ref(*args64, **knobs)
        ref32 = forward_ref(*args, **knobs)
        grad64 = backward_ref(g.double(), *args64, **knobs)
        grad32 = backward_ref(g, *args, **knobs)
        assert_close_by_rule(loss, ref64[0], ref32[0], "loss")
        assert_close_by_rule(metrics, ref64[1], ref32[1], "metrics")
        assert_close_by_rule(grad, grad64, grad32, "grad_logp")
    return loss, metrics, grad


# Shapes and options cycled per case: (B, T, per-token advantages, TAPO calls, reference
# log-probs, kl_type, bool mask, norm_const, global_count, grad_loss).
CASES = [
    (1, 33, True, True, True, "k1", False, None, None, 1.0),
    (3, 5, False, False, True, "k2", True, 4.0, None, -0.75),
    (7, 33, True, True, True, "k3", False, None, None, 1.7),
    (7, 33, False, True, False, "k3", True, 16.0, 50.0, 0.5),
    (3, 1, True, True, True, "k3", False, None, 3.0, 1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("algo", ALGOS)
def test_matches_reference(algo: str, agg: str, dtype: torch.dtype) -> None:
    for i, (B, T, per_token, calls, ref, kl_type, bool_mask, norm, count, g) in enumerate(CASES):
        seed = 1000 * ALGOS.index(algo) + 100 * AGGS.index(agg) + i
        batch = loss_batch(
            B=B,
            T=T,
            dtype=dtype,
            per_token=per_token,
            with_ref=ref,
            with_calls=calls,
            spread=0.3 if i % 2 else 1.0,
            seed=seed,
        )
        if bool_mask:
            batch.mask = batch.mask > 0
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
        check_against_reference(batch.op_args(), g, **knobs)


def test_tiling_across_row_and_column_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny tiles force several row blocks and column blocks (partials, row-stats loop)."""
    monkeypatch.setattr(pl_ops, "_TILE_TOKENS", 16)
    monkeypatch.setattr(pl_ops, "_MAX_BLOCK_T", 8)
    assert pl_ops._tiles(7, 33)[:3] == (2, 8, 5)  # 4 row blocks x 5 column blocks
    for algo in ALGOS:
        batch = loss_batch(B=7, T=33, dtype=torch.float64, seed=7 + ALGOS.index(algo))
        check_against_reference(
            batch.op_args(), 1.3, algo=algo, agg="seq-mean-token-mean", kl_coef=0.1
        )


def test_non_contiguous_inputs() -> None:
    batch = loss_batch(B=5, T=9, dtype=torch.float64, seed=3)
    strided = tuple(None if t is None else t.t().contiguous().t() for t in batch.op_args())
    assert not strided[0].is_contiguous()
    check_against_reference(strided, 1.0, algo="grpo", agg="token-mean", kl_coef=0.1)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("algo", ALGOS)
def test_all_masked_batch_gives_zero(algo: str, agg: str) -> None:
    batch = loss_batch(B=3, T=5, dtype=torch.float32, seed=11)
    batch.mask = torch.zeros_like(batch.mask)
    loss, metrics, grad = check_against_reference(
        batch.op_args(), 1.0, algo=algo, agg=agg, kl_coef=0.1
    )
    assert loss.item() == 0.0
    assert torch.isfinite(metrics).all()
    assert (grad == 0).all()


@pytest.mark.parametrize("algo", ALGOS)
def test_observation_tokens_get_exactly_zero_gradient(algo: str) -> None:
    batch = loss_batch(B=7, T=33, dtype=torch.float32, seed=21, spread=0.8)
    observation = torch.zeros_like(batch.mask, dtype=torch.bool)
    observation[:, 10:16] = True  # a tool-output span inside every row
    batch.mask[observation] = 0.0
    grad = backward_triton(
        torch.tensor(1.0), *batch.op_args(), algo=algo, kl_coef=0.1, agg="seq-mean-token-mean"
    )
    masked = batch.mask == 0
    assert (grad[masked] == 0).all()
    assert (grad[~masked] != 0).any()  # the test is not vacuous: policy tokens get gradient


def _exp_agrees(values: list[float], dtype: torch.dtype) -> list[float]:
    """Values whose exp is bit-identical in torch and numpy (the interpreter's exp)."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    out = []
    for v in values:
        t = torch.exp(torch.tensor(v, dtype=dtype)).item()
        n = float(np.exp(np.asarray(v, dtype=np_dtype)))
        if t == n:
            out.append(float(torch.tensor(v, dtype=dtype)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_ties_and_clamp_bounds(dtype: torch.dtype) -> None:
    """Exact ties split the gradient 1/2 : 1/2; clamps pass it on their closed range.

    Token 0: ratio 1 inside the clip range, so -a r == -a clip(r) (tie, both branches
    carry -a). Token 1: a < 0 and r == dual_clip_c, so min(-a r, -a c) ties and only half
    of -a r reaches logp: grad = 0.5 * 0.9 * r * weight. Token 2: r == 1 + eps_high exactly,
    a tie in the max whose clipped branch sits on the clamp bound and still passes.
    """
    lrs = _exp_agrees([0.5, 0.375, 0.625, 0.75], dtype)
    hi = _exp_agrees([0.25, 0.125, 0.1875], dtype)
    assert lrs and hi, "no value with identical exp in torch and numpy"
    lr_dual, lr_hi = lrs[0], hi[0]
    r_dual = torch.exp(torch.tensor(lr_dual, dtype=dtype)).item()
    r_hi = torch.exp(torch.tensor(lr_hi, dtype=dtype)).item()
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=dtype)
    logp = old + torch.tensor([[0.0, lr_dual, lr_hi, 0.0]], dtype=dtype)
    assert (logp - old)[0, 1].item() == lr_dual and (logp - old)[0, 2].item() == lr_hi
    adv = torch.tensor([[0.7, -0.9, 0.4, -0.3]], dtype=dtype)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=dtype)
    knobs = dict(
        algo="grpo", eps_low=0.2, eps_high=r_hi - 1.0, dual_clip_c=r_dual, agg="token-mean"
    )
    args = (logp, old, adv, mask, None, None, None)
    _, _, grad = check_against_reference(args, 1.0, **knobs)
    # hand values, token-mean over 3 tokens: -a/3, 0.5 * 0.9 * r_dual / 3, -0.4 * r_hi / 3
    expected = torch.tensor(
        [[-0.7 / 3, 0.5 * 0.9 * r_dual / 3, -0.4 * r_hi / 3, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(grad.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_log_ratio_clamps_are_inclusive(dtype: torch.dtype) -> None:
    """lr = +-20 exactly keeps its gradient, +-20.5 loses it; GSPO log s = 10 keeps it, 10.5 not."""
    old = torch.tensor([[-21.0, -21.5, 19.0, 19.5]], dtype=dtype)
    logp = torch.full_like(old, -1.0)  # lr = 20, 20.5, -20, -20.5 exactly
    adv = torch.tensor([[-0.5, -0.5, 0.5, 0.5]], dtype=dtype)
    mask = torch.ones_like(old)
    args = (logp, old, adv, mask, None, None, None)
    _, _, grad = check_against_reference(args, 1.0, algo="grpo", dual_clip_c=0.0)
    assert grad[0, 0] != 0 and grad[0, 1] == 0 and grad[0, 2] != 0 and grad[0, 3] == 0

    old = torch.tensor([[-11.0, -11.0], [-11.5, -11.5]], dtype=dtype)  # log s = 10, 10.5
    logp = torch.full_like(old, -1.0)
    adv = torch.full_like(old, -0.5)
    args = (logp, old, adv, torch.ones_like(old), None, None, None)
    _, _, grad = check_against_reference(args, 1.0, algo="gspo", eps_low=3e-4, eps_high=4e-4)
    assert (grad[0] != 0).all() and (grad[1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
def test_kl_far_from_reference_policy(kl_type: str, dtype: torch.dtype) -> None:
    """d = ref - logp across both k3 clamps: |d| > 20, k3 > 10 (d > 2.53 or d < -11), inside."""
    d = torch.tensor(
        [[-25.0, -20.0, -12.0, -5.0, -0.5, 0.0, 1.0, 2.0, 3.0, 5.0, 20.0, 25.0]],
        dtype=torch.float64,
    )
    logp = -torch.linspace(0.5, 3.0, d.shape[1], dtype=torch.float64)[None]
    old = logp + 0.1
    ref = logp + d
    adv = torch.full_like(logp, 0.3)
    mask = torch.ones_like(logp)
    args = tuple(t.to(dtype) for t in (logp, old, adv, mask, ref)) + (None, None)
    _, _, grad = check_against_reference(args, 1.0, algo="grpo", kl_type=kl_type, kl_coef=0.5)
    if kl_type == "k3":
        # k3 is clamped to 10 beyond the clamps, so those tokens keep only the PPO gradient
        ppo_only = backward_triton(torch.tensor(1.0, dtype=dtype), *args[:4], algo="grpo")
        clamped = ((d > 2.6) | (d < -11.1))[0]  # e^2.6 - 3.6 = 9.9, e^-11.1 + 10.1 = 10.1
        assert (grad[0, clamped] == ppo_only[0, clamped]).all()
        assert (grad[0, ~clamped] != ppo_only[0, ~clamped]).any()


def _bad_inputs() -> tuple[list[tuple[str, dict, dict]], LossBatch]:
    """(name, tensor overrides, knob overrides) of invalid calls, and the valid batch."""
    b = loss_batch(B=3, T=5, dtype=torch.float32, seed=5)
    bad_map = b.call_map.clone()
    bad_map[0, 0] = b.call_delta.numel()
    nan_logp = b.logp.clone()
    nan_logp[1, 2] = float("nan")
    return [
        ("algo", {}, dict(algo="ppo")),
        ("agg", {}, dict(agg="mean")),
        ("kl_type", {}, dict(kl_type="k4")),
        ("logp 1-D", dict(logp=b.logp[0], old_logp=b.old_logp[0]), {}),
        ("logp fp16", dict(logp=b.logp.half()), {}),
        ("old_logp dtype", dict(old_logp=b.old_logp.double()), {}),
        ("advantages shape", dict(advantages=b.advantages[:, :2]), {}),
        ("mask dtype", dict(mask=b.mask.long()), {}),
        ("call_map alone", dict(call_delta=None), {}),
        ("call_map dtype", dict(call_map=b.call_map.long()), {}),
        ("call_map range", dict(call_map=bad_map), {}),
        ("nan logp", dict(logp=nan_logp), {}),
        ("eps_low", {}, dict(eps_low=1.0)),
        ("dual_clip_c", {}, dict(dual_clip_c=0.5)),
        ("tau_neg", {}, dict(tau_neg=0.0)),
        ("kl without ref", dict(ref_logp=None), dict(kl_coef=0.1)),
        ("norm_const", {}, dict(norm_const=0.0)),
        ("global_count", {}, dict(global_count=float("inf"))),
    ], b


def _call_error(fn, *args, **kwargs) -> tuple[type, str]:
    with pytest.raises((ValueError, TypeError)) as info:
        fn(*args, **kwargs)
    return type(info.value), str(info.value)


def test_bad_inputs_raise_like_reference() -> None:
    cases, batch = _bad_inputs()
    names = ("logp", "old_logp", "advantages", "mask", "ref_logp", "call_map", "call_delta")
    for name, tensors, knobs in cases:
        args = dict(zip(names, batch.op_args(), strict=True))
        args.update(tensors)
        args = tuple(args[n] for n in names)
        expected = _call_error(forward_ref, *args, **knobs)
        assert _call_error(forward_triton, *args, **knobs) == expected, name
        if name not in ("call_map range", "nan logp"):  # value checks run in the forward only
            g = torch.tensor(1.0)
            assert _call_error(backward_triton, g, *args, **knobs) == expected, name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_op_and_autograd_match_reference() -> None:  # pragma: no cover - GPU only
    """Through the dispatcher on CUDA (compiled kernels), against the CPU reference."""
    for algo in ALGOS:
        for agg in AGGS:
            batch = loss_batch(B=13, T=1025, dtype=torch.float64, seed=31)
            cuda = LossBatch(*(None if t is None else t.cuda() for t in batch.op_args()))
            logp = cuda.logp.clone().requires_grad_(True)
            knobs = dict(algo=algo, agg=agg, kl_coef=0.1)
            loss, metrics = torch.ops.tapo.policy_loss(logp, *cuda.op_args()[1:], **knobs)
            loss.backward()
            ref_loss, ref_metrics = forward_ref(*batch.op_args(), **knobs)
            ref_grad = backward_ref(
                torch.tensor(1.0, dtype=torch.float64), *batch.op_args(), **knobs
            )
            torch.testing.assert_close(loss.cpu(), ref_loss, rtol=F64_RTOL, atol=F64_ATOL)
            torch.testing.assert_close(metrics.cpu(), ref_metrics, rtol=2.4e-7, atol=1e-6)
            torch.testing.assert_close(logp.grad.cpu(), ref_grad, rtol=F64_RTOL, atol=F64_ATOL)
