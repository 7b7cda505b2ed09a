"""What only the native C++ CPU kernels (``tapo_kernels._C``) have, against the reference.

The contracts of every backend (the native kernels among them) are in
``test_fused_correct.py`` and ``test_policy_loss.py``; here: the blocked similarity kernel,
streaming stores and SIMD finite checks on large batches, the AVX2 and generic instruction
set builds, thread counts, the backward's range check, and ``policy_loss_with_grad`` with the
C++ autograd of ``policy_loss`` (AutogradCPU). Float outputs follow the tolerance rule of
``tapo_kernels.testing.assert_close_to_oracle``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import Tensor

import tapo_kernels
from tapo_kernels import _library, reference, testing
from tapo_kernels.reference import METRIC_NAMES
from tapo_kernels.testing import assert_close_to_oracle, assert_exact

NATIVE_OPS = ("fused_correct", "policy_loss", "policy_loss_backward", "policy_loss_with_grad")
_missing = [op for op in NATIVE_OPS if tapo_kernels.CPU_BACKEND.get(op) != "native"]
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"native CPU kernels not loaded for {_missing} ({tapo_kernels.NATIVE_ERROR or 'no C++ kernel registered'})",
)


# --------------------------------------------------------------------------------------
# fused_correct
# --------------------------------------------------------------------------------------


def _quantize_advantages(batch: testing.CorrectBatch) -> testing.CorrectBatch:
    """Row advantages on a 1/64 grid, so every sum of them is exact in fp32 in any order.

    With ``quantized=True`` the similarities are already exact; with this the support sums
    are too, and the native kernel must then equal the reference bit for bit.
    """
    batch.seq_advantages = torch.round(batch.seq_advantages * 64) / 64
    batch.advantages = batch.seq_advantages[:, None] * batch.mask
    return batch


def _run_both(
    batch: testing.CorrectBatch, knobs: tuple
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    args = batch.op_args()
    before = [t.clone() for t in args]
    native = torch.ops.tapo.fused_correct(*args, *knobs)
    for t, t0 in zip(args, before, strict=True):
        assert torch.equal(t, t0), "fused_correct modified an input"
    ref = _library.fused_correct_reference_kernel(*args, *knobs)
    return native, ref


@pytest.mark.parametrize("batch_scope", [False, True])
def test_fused_correct_large_batch(batch_scope: bool) -> None:
    """A batch with many failing calls per scope (exercises the blocked similarity kernel)."""
    few = dict(num_tools=2, num_keys=1, num_queries=5)  # few tools, keys, queries: calls match
    batch = testing.correct_batch(
        B=64, T=40, group_size=16, calls_per_row=12, D=70, quantized=False, seed=7, **few
    )
    knobs = (0.5, 0.1, 0.8, batch_scope)
    native, ref32 = _run_both(batch, knobs)
    ref64 = reference.fused_correct(
        batch.advantages.double(),
        batch.seq_advantages.double(),
        *batch.op_args()[2:8],
        batch.call_params.double(),
        batch.tool_sim_kind,
        *knobs,
    )
    assert int((native[1] > 0).sum()) > 0
    assert_exact(native[3], ref32[3], "witness")
    for name, x, r64, r32 in zip(
        ("corrected", "delta", "confidence"), native[:3], ref64[:3], ref32[:3], strict=True
    ):
        assert_close_to_oracle(x, r64, r32, what=name, per_element=True)


def test_fused_correct_long_rows() -> None:
    """A (B, T) batch of at least 4 MiB: the pass writing `corrected` streams its stores."""
    batch = _quantize_advantages(
        testing.correct_batch(B=16, T=65_600, group_size=8, calls_per_row=6, seed=12)
    )
    assert batch.advantages.numel() * 4 >= 4 << 20
    native, ref = _run_both(batch, (0.2, 0.05, 1.0, False))
    assert int((native[1] > 0).sum()) > 0
    for x, y in zip(native, ref, strict=True):
        assert torch.equal(x, y)


def test_fused_correct_large_batch_finds_non_finite_values_everywhere() -> None:
    """>= 4 MiB with an odd T: rows start at every 4-byte offset modulo 32, rows copied before
    and after the similarities; a NaN or inf at the start, inside or at the end of a row is
    found, and a finite batch equals the reference exactly."""
    T = 8069
    batch = _quantize_advantages(
        testing.correct_batch(B=130, T=T, group_size=10, calls_per_row=4, seed=21)
    )
    assert batch.advantages.numel() * 4 >= 4 << 20
    native, ref = _run_both(batch, (0.2, 0.05, 1.0, False))
    for x, y in zip(native, ref, strict=True):
        assert torch.equal(x, y)
    args = list(batch.op_args())
    failing = (batch.seq_advantages < 0).nonzero().flatten().tolist()
    succeeding = (batch.seq_advantages > 0).nonzero().flatten().tolist()
    rows = sorted(set(range(8)) | {failing[-1], succeeding[-1]})
    values = (float("nan"), float("inf"), float("-inf"))
    for i, (row, pos) in enumerate(
        (r, p) for r in rows for p in (0, 1, 5, 7, 8, 15, 16, 100, T - 17, T - 9, T - 1)
    ):
        bad = args[0].clone()
        bad[row, pos] = values[i % 3]
        with pytest.raises(ValueError, match="advantages contains NaN or inf"):
            torch.ops.tapo.fused_correct(bad, *args[1:], 0.2, 0.05, 1.0, False)


def _run_python(script: str, *args: str, **env: str) -> str:
    """The standard output of ``python -c script *args`` in a fresh process, ``env`` added to
    the environment."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


_ISA_SCRIPT = """
import sys, torch, tapo_kernels
from tapo_kernels import testing
torch.set_num_threads(1)
out = []
for seed in range(3):
    b = testing.correct_batch(B=24, T=50, group_size=6, calls_per_row=6, D=37, quantized=False, seed=seed)
    out += list(torch.ops.tapo.fused_correct(*b.op_args(), 0.3, 0.1, 0.8, seed == 1))
    for dtype in (torch.float32, torch.float64):
        lb = testing.loss_batch(B=5, T=45, dtype=dtype, seed=seed)
        for algo in ("grpo", "gspo", "sapo"):
            logp = lb.logp.clone().requires_grad_(True)
            loss, metrics = torch.ops.tapo.policy_loss(logp, *lb.op_args()[1:], algo=algo, kl_coef=0.1)
            out += [loss.detach(), metrics, torch.autograd.grad(loss, logp)[0]]
torch.save(out, sys.argv[1])
"""


def test_native_baseline_and_avx2_builds_agree(tmp_path) -> None:
    """Both instruction-set builds of the kernels give the same bits (no FMA contraction,
    fixed summation orders). TAPO_NATIVE_ISA=generic forces the baseline build."""
    outputs = []
    for isa in ("generic", "auto"):
        path = tmp_path / f"{isa}.pt"
        _run_python(_ISA_SCRIPT, str(path), TAPO_NATIVE_ISA=isa)
        outputs.append(torch.load(path))
    assert len(outputs[0]) == len(outputs[1]) > 0
    for x, y in zip(*outputs, strict=True):
        assert torch.equal(x, y)


def test_native_results_do_not_depend_on_thread_count() -> None:
    correct_batch = testing.correct_batch(
        B=40, T=300, group_size=8, calls_per_row=8, quantized=False, seed=1
    )
    loss_batch = testing.loss_batch(B=40, T=300, dtype=torch.float32, seed=1)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            fc = torch.ops.tapo.fused_correct(*correct_batch.op_args(), 0.3, 0.1, 0.8, True)
            pl = _loss_and_grad(
                torch.ops.tapo.policy_loss,
                list(loss_batch.op_args()),
                dict(algo="gspo", kl_coef=0.1, agg="seq-mean-token-mean"),
            )
            results.append(fc + pl)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_fused_correct_finds_a_non_finite_advantage_at_every_position(value) -> None:
    """T = 77: every lane of the 32-wide unrolled finite check, and the scalar tail."""
    batch = testing.correct_batch(B=3, T=77, calls_per_row=2, num_tools=1, seed=6)
    args, knobs = list(batch.op_args()), [0.7, 0.3, 0.8, False]
    torch.ops.tapo.fused_correct(*args, *knobs)  # finite: no error
    for pos in list(range(0, 77)) + [77 + 40, 2 * 77 + 76]:
        bad = args[0].clone()
        bad.view(-1)[pos] = value
        with pytest.raises(ValueError, match="advantages contains NaN or inf"):
            torch.ops.tapo.fused_correct(bad, *args[1:], *knobs)
    huge = args[0].clone()
    huge.view(-1)[5] = 3.4e38  # the largest finite magnitudes pass
    huge.view(-1)[6] = -3.4e38
    torch.ops.tapo.fused_correct(huge, *args[1:], *knobs)


# --------------------------------------------------------------------------------------
# policy_loss
# --------------------------------------------------------------------------------------


def _loss_and_grad(fn, args: list, knobs: dict, dtype: torch.dtype | None = None):
    """(loss, metrics, d loss / d logp) of ``fn`` (native op or reference), in ``dtype``."""
    if dtype is not None:
        args = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in args]
    logp = args[0].detach().clone().requires_grad_(True)
    loss, metrics = fn(logp, *args[1:], **knobs)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), metrics, grad


def _away_from_kinks(B: int, T: int, seed: int, per_token: bool) -> list:
    """float64 inputs whose ratios sit well inside or outside the clip range (and away from
    the dual clip c = 3 and the KL clamps), so finite differences see a smooth function."""
    gen = torch.Generator().manual_seed(seed)
    log_ratio_levels = torch.tensor([-0.5, -0.1, 0.05, 0.1, 0.4, 1.3], dtype=torch.float64)
    pick = torch.randint(0, len(log_ratio_levels), (B, T), generator=gen)
    log_ratio = log_ratio_levels[pick] + 0.01 * (
        torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.5
    )
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    old = logp - log_ratio
    ref = logp + 0.3 * torch.randn(
        B, T, generator=gen, dtype=torch.float64
    )  # |d| << 2.5: k3 below 10
    mask = (torch.rand(B, T, generator=gen) < 0.8).double()
    adv = torch.randn(B, T if per_token else 1, generator=gen, dtype=torch.float64)
    adv = adv + 0.3 * adv.sign()  # away from 0, where SAPO switches tau
    adv = adv if per_token else adv[:, 0]
    return [logp, old, adv, mask, ref]


@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_gradcheck(algo: str) -> None:
    # GSPO-token's gradient equals the derivative of its value only for per-row advantages
    # (then sequence-level GSPO, docs/math.md 3.5); its row ratios s_i = exp(mean log-ratio) are
    # checked against the clip bounds below.
    per_token = algo != "gspo"
    logp, old, adv, mask, ref = _away_from_kinks(4, 9, seed=3, per_token=per_token)
    knobs = dict(
        algo=algo, kl_coef=0.1, kl_type="k3", agg="seq-mean-token-mean", eps_low=0.2, eps_high=0.28
    )
    if algo == "gspo":
        row_log_ratio = ((logp - old) * mask).sum(1) / mask.sum(1).clamp(min=1)
        bounds = torch.tensor([math.log(0.8), math.log(1.28)], dtype=torch.float64)
        assert (row_log_ratio[:, None] - bounds).abs().min() > 1e-3
    call_map = torch.full(logp.shape, -1, dtype=torch.int32)
    call_map[:, 2:5] = torch.arange(logp.shape[0], dtype=torch.int32)[:, None]
    call_delta = torch.full((logp.shape[0],), 0.25, dtype=torch.float64)
    calls = (call_map, call_delta) if per_token else (None, None)

    def loss_of(x: Tensor) -> Tensor:
        return torch.ops.tapo.policy_loss(x, old, adv, mask, ref, *calls, **knobs)[0]

    assert torch.autograd.gradcheck(
        loss_of, (logp.clone().requires_grad_(True),), eps=1e-6, atol=1e-8
    )


def _bad_policy_loss_cases():
    """(name, mutate(args list, knobs dict), exception type, argument the message names)."""

    def put(i, fn):
        def mutate(args, knobs):
            args[i] = fn(args[i])

        return mutate

    def knob(**kw):
        def mutate(args, knobs):
            knobs.update(kw)

        return mutate

    def poison(i, value):
        """Put ``value`` at the last token with mask != 0 (masked tokens may hold anything)."""

        def mutate(a, k):
            t = a[i].clone()
            live = (a[3] != 0).reshape(-1).nonzero().flatten()
            if t.dim() == 1 and t.shape[0] == a[0].shape[0]:  # per-row advantages
                t[int(live[-1]) // a[0].shape[1]] = value
            elif t.shape == a[0].shape:
                t.view(-1)[int(live[-1])] = value
            else:
                t.view(-1)[-1] = value
            a[i] = t

        return mutate

    return [
        ("algo", knob(algo="ppo"), ValueError, "algo"),
        ("agg", knob(agg="mean"), ValueError, "agg"),
        ("kl_type", knob(kl_type="k4"), ValueError, "kl_type"),
        ("logp 1-D", put(0, lambda t: t[0]), ValueError, "logp"),
        ("logp dtype", put(0, lambda t: t.half()), TypeError, "logp"),
        ("old_logp shape", put(1, lambda t: t[:, 1:]), ValueError, "old_logp"),
        ("old_logp dtype", put(1, lambda t: t.double()), TypeError, "old_logp"),
        ("ref_logp dtype", put(4, lambda t: t.double()), TypeError, "ref_logp"),
        ("advantages shape", put(2, lambda t: t[:, :3]), ValueError, "advantages"),
        ("advantages dtype", put(2, lambda t: t.double()), TypeError, "advantages"),
        ("mask shape", put(3, lambda t: t[1:]), ValueError, "mask"),
        ("mask dtype", put(3, lambda t: t.long()), TypeError, "mask"),
        ("call_map alone", put(6, lambda t: None), ValueError, "call_delta"),
        ("call_map dtype", put(5, lambda t: t.long()), TypeError, "call_map"),
        ("call_map shape", put(5, lambda t: t[:, 1:]), ValueError, "call_map"),
        ("call_delta 2-D", put(6, lambda t: t[None]), ValueError, "call_delta"),
        ("call_delta dtype", put(6, lambda t: t.double()), TypeError, "call_delta"),
        ("eps_low < 0", knob(eps_low=-0.1), ValueError, "eps_low"),
        ("eps_high nan", knob(eps_high=float("nan")), ValueError, "eps_high"),
        ("eps_low >= 1", knob(eps_low=1.0), ValueError, "eps_low"),
        ("dual_clip_c in (0, 1]", knob(dual_clip_c=0.5), ValueError, "dual_clip_c"),
        ("tau_pos 0", knob(tau_pos=0.0), ValueError, "tau_pos"),
        ("tau_neg inf", knob(tau_neg=float("inf")), ValueError, "tau_neg"),
        ("kl_coef nan", knob(kl_coef=float("nan")), ValueError, "kl_coef"),
        (
            "kl without ref",
            lambda a, k: (a.__setitem__(4, None), k.update(kl_coef=0.1)),
            ValueError,
            "ref_logp",
        ),
        ("norm_const 0", knob(norm_const=0.0), ValueError, "norm_const"),
        ("global_count < 0", knob(global_count=-3.0), ValueError, "global_count"),
        ("logp nan", poison(0, float("nan")), ValueError, "logp"),
        ("old_logp inf", poison(1, float("inf")), ValueError, "old_logp"),
        ("advantages nan", poison(2, float("nan")), ValueError, "advantages"),
        (
            "row advantages nan",
            put(2, lambda t: torch.where(torch.arange(t.shape[0]) == 1, float("nan"), t[:, 0])),
            ValueError,
            "advantages",
        ),
        ("ref_logp nan", poison(4, float("nan")), ValueError, "ref_logp"),
        ("call_delta inf", poison(6, float("-inf")), ValueError, "call_delta"),
        (
            "call_map too high",
            put(5, lambda t: t.clamp(min=0) + 1000),
            ValueError,
            "call_map",
        ),
        ("call_map below -1", put(5, lambda t: t - 5), ValueError, "call_map"),
        ("mask nan", put(3, lambda t: torch.where(t > 0.5, float("nan"), t)), ValueError, "mask"),
        ("mask > 1", put(3, lambda t: t * 2.0), ValueError, "mask"),
        ("mask < 0", put(3, lambda t: -t), ValueError, "mask"),
        (
            "error order",
            lambda a, k: (poison(2, float("nan"))(a, k), poison(4, float("nan"))(a, k)),
            ValueError,
            "advantages",
        ),
    ]


def test_policy_loss_backward_rejects_out_of_range_call_map() -> None:
    """The backward skips the value checks but must never read outside call_delta."""
    batch = testing.loss_batch(B=3, T=8, dtype=torch.float64, seed=6)
    args = list(batch.op_args())
    args[5] = args[5].clamp(min=0) + 100
    with pytest.raises(ValueError, match="call_map out of range"):
        torch.ops.tapo.policy_loss_backward(torch.tensor(1.0, dtype=torch.float64), *args)


# --------------------------------------------------------------------------------------
# policy_loss_with_grad and the C++ autograd of policy_loss (AutogradCPU)
# --------------------------------------------------------------------------------------

WITH_GRAD_KERNELS = {
    "native": torch.ops.tapo.policy_loss_with_grad,
    "reference": _library.policy_loss_with_grad_reference_kernel,
}


def _poisoned_call(fn, args: list, knobs: dict):
    """``fn(*args, **knobs)`` right after freeing a NaN-filled tensor of the gradient's size,
    so an allocation the kernel forgets to fill likely reads back NaN."""
    poison = torch.full_like(args[0], float("nan"), memory_format=torch.contiguous_format)
    del poison
    return fn(*args, **knobs)


@pytest.mark.parametrize("kl_type", reference.KL_TYPES)
@pytest.mark.parametrize("agg", reference.AGGS)
@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_with_grad_matches_reference(
    grid_knobs, algo: str, agg: str, kl_type: str
) -> None:
    """(loss, metrics, d loss / d logp) of both kernels vs the fp64 reference and autograd;
    the last row of every batch is fully masked (zero gradient)."""
    variants = itertools.product((True, False), (torch.float32, torch.float64))
    for i, (with_calls, dtype) in enumerate(variants):
        batch = testing.loss_batch(
            B=(6, 11)[i % 2],
            T=(37, 90)[i % 2],
            dtype=dtype,
            per_token=i % 3 != 2,
            with_calls=with_calls,
            empty_row=True,
            spread=0.5,
            seed=100 + i,
        )
        args = list(batch.op_args())
        assert not args[3][-1].any()
        normalisers = ({}, dict(norm_const=50.0, global_count=40.0), {})[i % 3]
        knobs = grid_knobs(algo, agg, kl_type, (3.0, 0.0)[i % 2], **normalisers)
        what = f"{algo}/{agg}/{kl_type} calls={with_calls} {dtype}"
        ref64 = _loss_and_grad(reference.policy_loss, args, knobs, torch.float64)
        ref_own = _loss_and_grad(reference.policy_loss, args, knobs, dtype)
        for name, fn in WITH_GRAD_KERNELS.items():
            out = _poisoned_call(fn, args, knobs)
            assert len(out) == 3
            loss, metrics, grad = out
            assert loss.shape == () and loss.dtype == dtype and not loss.requires_grad
            assert metrics.shape == (len(METRIC_NAMES),) and metrics.dtype == torch.float32
            assert grad.shape == args[0].shape and grad.dtype == dtype and grad.is_contiguous()
            assert torch.equal(grad[-1], torch.zeros_like(grad[-1])), f"{name} {what}"
            assert torch.equal(grad[args[3] == 0], torch.zeros_like(grad[args[3] == 0]))
            for part, x, r64, r_own in zip(
                ("loss", "metrics", "grad"), out, ref64, ref_own, strict=True
            ):
                # float32 slack relative above 1; float64 the rule's own tolerance
                tol = None if dtype == torch.float64 and part != "metrics" else (1e-6, 1e-6)
                assert_close_to_oracle(x, r64, r_own, what=f"{name} {what} {part}", tol=tol)
            if name == "reference":  # the reference forward and autograd, exactly
                for part, x, y in zip(("loss", "metrics", "grad"), out, ref_own, strict=True):
                    assert_exact(x, y, f"{name} {what} {part}")


@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_with_grad_equals_forward_and_backward_ops(algo: str) -> None:
    """The single pass gives the forward's loss and metrics and the backward's gradient for
    grad_loss = 1, bit for bit (same token math, same summation orders)."""
    for i, (dtype, agg) in enumerate(
        itertools.product((torch.float32, torch.float64), reference.AGGS)
    ):
        batch = testing.loss_batch(B=9, T=(29, 64, 3, 130)[i % 4], dtype=dtype, seed=40 + i)
        args = list(batch.op_args())
        if i % 2:
            args[3] = args[3] > 0  # bool mask
        knobs = dict(algo=algo, agg=agg, kl_coef=0.1, kl_type=reference.KL_TYPES[i % 3])
        loss, metrics, grad = _poisoned_call(torch.ops.tapo.policy_loss_with_grad, args, knobs)
        fwd_loss, fwd_metrics = torch.ops.tapo.policy_loss(*args, **knobs)
        one = torch.ones((), dtype=dtype)
        bwd_grad = torch.ops.tapo.policy_loss_backward(one, *args, **knobs)
        assert torch.equal(loss, fwd_loss) and torch.equal(metrics, fwd_metrics)
        assert torch.equal(grad, bwd_grad)
        assert grad.abs().sum() > 0


@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_autograd_scales_by_upstream_gradient(algo: str) -> None:
    for dtype, agg in ((torch.float32, "token-mean"), (torch.float64, "seq-mean-token-sum")):
        batch = testing.loss_batch(B=8, T=45, dtype=dtype, spread=0.5, seed=61)
        args = list(batch.op_args())
        knobs = dict(algo=algo, agg=agg, kl_coef=0.1)
        if algo == "gspo":
            knobs.update(eps_low=0.03, eps_high=0.04)
        x = args[0].clone().requires_grad_(True)
        loss, metrics = torch.ops.tapo.policy_loss(x, *args[1:], **knobs)
        assert "PolicyLossFunction" in loss.grad_fn.name()  # the C++ autograd kernel
        assert not metrics.requires_grad
        (3.7 * loss).backward()
        x64 = args[0].double().clone().requires_grad_(True)
        rest64 = [t.double() if t is not None and t.is_floating_point() else t for t in args[1:]]
        (3.7 * reference.policy_loss(x64, *rest64, **knobs)[0]).backward()
        xo = args[0].clone().requires_grad_(True)
        (3.7 * reference.policy_loss(xo, *args[1:], **knobs)[0]).backward()
        rtol = 1e-12 if dtype == torch.float64 else 1e-6  # relative to the gradient's size
        assert_close_to_oracle(
            x.grad, x64.grad, xo.grad, what=f"{algo} {dtype} 3.7 * loss", tol=(rtol, 0.0)
        )
        # a second backward accumulates into .grad
        first = x.grad.clone()
        loss, _ = torch.ops.tapo.policy_loss(x, *args[1:], **knobs)
        (-0.5 * loss).backward()
        assert_close_to_oracle(x.grad, first * (3.2 / 3.7), what="accumulated", tol=(1e-5, 1e-12))


@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_cpp_autograd_gradcheck(algo: str) -> None:
    """gradcheck (fp64) through the AutogradCPU kernel, token-mean with the lift; and the
    metrics output is not differentiable."""
    per_token = algo != "gspo"  # see test_policy_loss_gradcheck
    logp, old, adv, mask, ref = _away_from_kinks(5, 11, seed=7, per_token=per_token)
    mask[2] = 0.0  # a fully masked row
    call_map = torch.full(logp.shape, -1, dtype=torch.int32)
    call_map[:, 1:4] = torch.arange(logp.shape[0], dtype=torch.int32)[:, None]
    calls = (call_map, torch.full((logp.shape[0],), 0.25, dtype=torch.float64))
    knobs = dict(algo=algo, kl_coef=0.1, kl_type="k3", agg="token-mean", eps_low=0.2, eps_high=0.28)
    if algo == "gspo":
        calls = (None, None)
        row_log_ratio = ((logp - old) * mask).sum(1) / mask.sum(1).clamp(min=1)
        bounds = torch.tensor([math.log(0.8), math.log(1.28)], dtype=torch.float64)
        assert (row_log_ratio[:, None] - bounds).abs().min() > 1e-3

    def loss_of(x: Tensor) -> Tensor:
        loss, metrics = torch.ops.tapo.policy_loss(x, old, adv, mask, ref, *calls, **knobs)
        assert "PolicyLossFunction" in loss.grad_fn.name() and metrics.grad_fn is None
        return loss

    x = logp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss_of, (x,), eps=1e-6, atol=1e-8)
    (grad,) = torch.autograd.grad(loss_of(x), x)
    assert torch.equal(grad[2], torch.zeros_like(grad[2])) and grad.abs().sum() > 0


def test_policy_loss_autograd_cpu_kernel_is_registered() -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tapo::policy_loss", "AutogradCPU")
    assert tapo_kernels.CPU_BACKEND["policy_loss_with_grad"] == "native"


def test_policy_loss_without_grad() -> None:
    """no_grad, inference mode, or logp without requires_grad: the plain forward, no graph."""
    batch = testing.loss_batch(B=5, T=20, dtype=torch.float32, seed=71)
    args = list(batch.op_args())
    knobs = dict(algo="sapo", kl_coef=0.1)
    expected = torch.ops.tapo.policy_loss_with_grad(*args, **knobs)[:2]
    x = args[0].clone().requires_grad_(True)
    with torch.no_grad():
        no_grad = torch.ops.tapo.policy_loss(x, *args[1:], **knobs)
    with torch.inference_mode():
        inference = torch.ops.tapo.policy_loss(x, *args[1:], **knobs)
    plain = torch.ops.tapo.policy_loss(*args, **knobs)
    old_grad = torch.ops.tapo.policy_loss(
        args[0], args[1].clone().requires_grad_(True), *args[2:], **knobs
    )
    for out in (no_grad, inference, plain, old_grad):
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])
    for out in (no_grad, inference, plain):
        assert out[0].grad_fn is None and not out[0].requires_grad
    with_grad = torch.ops.tapo.policy_loss(x, *args[1:], **knobs)
    assert with_grad[0].requires_grad and torch.equal(with_grad[0].detach(), expected[0])


def test_policy_loss_with_grad_outputs_are_not_differentiable() -> None:
    batch = testing.loss_batch(B=3, T=12, dtype=torch.float64, seed=72)
    args = list(batch.op_args())
    x = args[0].clone().requires_grad_(True)
    for out in torch.ops.tapo.policy_loss_with_grad(x, *args[1:], kl_coef=0.1):
        assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_with_grad_opcheck(algo: str, requires_grad: bool) -> None:
    for i, dtype in enumerate((torch.float32, torch.float64)):
        batch = testing.loss_batch(B=4, T=9, dtype=dtype, per_token=i == 0, seed=3 + i)
        args = list(batch.op_args())
        args[0] = args[0].clone().requires_grad_(requires_grad)
        knobs = dict(algo=algo, kl_coef=0.1, agg=reference.AGGS[i + 1])
        torch.library.opcheck(torch.ops.tapo.policy_loss_with_grad.default, tuple(args), knobs)


@pytest.mark.parametrize("case", _bad_policy_loss_cases(), ids=lambda c: c[0])
def test_policy_loss_with_grad_bad_input(case) -> None:
    """The single pass validates like the forward (the reference kernels too): the same
    exception type, naming the argument, also through autograd (logp requires grad)."""
    _, mutate, exc_type, argument = case
    batch = testing.loss_batch(B=4, T=10, dtype=torch.float32, seed=2)
    args, knobs = list(batch.op_args()), dict(algo="grpo", kl_coef=0.0)
    mutate(args, knobs)
    names_argument = rf"(?<![A-Za-z_]){re.escape(argument)}(?![A-Za-z_])"
    for fn in (
        _library.policy_loss_reference_kernel,
        _library.policy_loss_with_grad_reference_kernel,
        torch.ops.tapo.policy_loss_with_grad,
    ):
        with pytest.raises(exc_type, match=names_argument):
            fn(*args, **knobs)
    if args[0].dim() == 2:
        args[0] = args[0].clone().requires_grad_(True)
    with pytest.raises(exc_type, match=names_argument):
        torch.ops.tapo.policy_loss(*args, **knobs)


_FALLBACK_SCRIPT = """
import json, torch, tapo_kernels
from tapo_kernels import _library, reference, testing
b = testing.loss_batch(B=4, T=11, dtype=torch.float64, seed=5)
args = list(b.op_args())
knobs = dict(algo="gspo", kl_coef=0.1, agg="seq-mean-token-mean")
loss, metrics, grad = torch.ops.tapo.policy_loss_with_grad(*args, **knobs)
x = args[0].clone().requires_grad_(True)
(2.5 * torch.ops.tapo.policy_loss(x, *args[1:], **knobs)[0]).backward()
xr = args[0].clone().requires_grad_(True)
ref_loss, ref_metrics = reference.policy_loss(xr, *args[1:], **knobs)
(ref_grad,) = torch.autograd.grad(ref_loss, xr)
print(json.dumps({
    "native_error": tapo_kernels.NATIVE_ERROR,
    "backend": tapo_kernels.CPU_BACKEND["policy_loss_with_grad"],
    "autograd_cpu": torch._C._dispatch_has_kernel_for_dispatch_key("tapo::policy_loss", "AutogradCPU"),
    "loss": torch.equal(loss, ref_loss.detach()), "metrics": torch.equal(metrics, ref_metrics),
    "grad": torch.equal(grad, ref_grad), "grad_nonzero": bool(grad.abs().sum() > 0),
    "autograd": bool(torch.allclose(x.grad, 2.5 * ref_grad, rtol=1e-12, atol=0)),
}))
"""


def test_policy_loss_with_grad_reference_fallback_in_a_fresh_process() -> None:
    """TAPO_DISABLE_NATIVE=1: the reference kernels and the Python autograd, no AutogradCPU."""
    out = _run_python(_FALLBACK_SCRIPT, TAPO_DISABLE_NATIVE="1")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["native_error"] and result["backend"] == "reference"
    assert result["autograd_cpu"] is False
    assert all(result[k] for k in ("loss", "metrics", "grad", "grad_nonzero", "autograd")), result
