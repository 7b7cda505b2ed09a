"""What only the Triton kernels of ``tapo::policy_loss`` and its backward have.

The kernels run on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``, set in
``conftest.py``), on tiny shapes. The contract of every backend (Triton among them) is in
``test_policy_loss.py``; here: tiles of several row and column blocks, exact ties and clamp
bounds on values whose ``exp`` the interpreter (numpy) and torch agree on, and the compiled
kernels on CUDA. float64 results must match the float64 reference within the float64
tolerance of ``tapo_kernels.testing.assert_close_to_oracle``; float32 results follow its rule
with a slack relative above 1 (ratios reach e^20 = 4.9e8, where one fp32 ulp is 32).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from tapo_kernels import _library
from tapo_kernels.ops import policy_loss as pl_ops
from tapo_kernels.reference import AGGS, ALGOS, METRIC_NAMES
from tapo_kernels.testing import LossBatch, assert_close_to_oracle, loss_batch

forward_ref = _library.policy_loss_reference_kernel
backward_ref = _library.policy_loss_backward_reference_kernel
forward_triton = pl_ops.policy_loss_triton
backward_triton = pl_ops.policy_loss_backward_triton

F32_TOL = (1e-6, 1e-6)  # (rtol, atol): 1e-6 absolute, relative above 1
METRICS_TOL = (2.4e-7, 1e-6)  # float32 metrics of float64 values: both sides round, 2 ulps


def _to64(args: tuple) -> tuple:
    return tuple(t.double() if t is not None and t.is_floating_point() else t for t in args)


def check_against_reference(args: tuple, grad_loss: float, **knobs) -> tuple[Tensor, ...]:
    """Run forward and backward of both implementations and compare; return the kernel's."""
    dtype = args[0].dtype
    g = torch.tensor(grad_loss, dtype=dtype)
    loss, metrics = forward_triton(*args, **knobs)
    grad = backward_triton(g, *args, **knobs)
    assert loss.dtype == dtype and loss.shape == ()
    assert metrics.dtype == torch.float32 and metrics.shape == (len(METRIC_NAMES),)
    assert grad.dtype == dtype and grad.shape == args[0].shape
    if dtype == torch.float64:
        ref_loss, ref_metrics = forward_ref(*args, **knobs)
        ref_grad = backward_ref(g, *args, **knobs)
        assert_close_to_oracle(loss, ref_loss, what="loss")
        assert_close_to_oracle(metrics, ref_metrics, what="metrics", tol=METRICS_TOL)
        assert_close_to_oracle(grad, ref_grad, what="grad_logp")
    else:
        args64 = _to64(args)
        ref64 = forward_ref(*args64, **knobs)
        ref32 = forward_ref(*args, **knobs)
        grad64 = backward_ref(g.double(), *args64, **knobs)
        grad32 = backward_ref(g, *args, **knobs)
        assert_close_to_oracle(loss, ref64[0], ref32[0], what="loss", tol=F32_TOL)
        assert_close_to_oracle(metrics, ref64[1], ref32[1], what="metrics", tol=F32_TOL)
        assert_close_to_oracle(grad, grad64, grad32, what="grad_logp", tol=F32_TOL)
    return loss, metrics, grad


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
    assert_close_to_oracle(grad, expected, what="grad", tol=(1e-6, 1e-7))


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
            assert_close_to_oracle(loss, ref_loss, what="loss", tol=(1e-10, 1e-12))
            assert_close_to_oracle(metrics, ref_metrics, what="metrics", tol=METRICS_TOL)
            assert_close_to_oracle(logp.grad, ref_grad, what="grad", tol=(1e-10, 1e-12))
