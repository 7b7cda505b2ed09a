"""The native C++ CPU kernels (``tapo_kernels._C``) against the pure-torch reference.

Every comparison runs the reference on the same fresh random inputs. Float outputs follow
the tolerance rule of STYLE.md: the kernel's error against the fp64 reference is at most
twice the error of the reference run in the kernel's own dtype, plus a tiny epsilon.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_fused_correct import ARG_NAMES, assert_witnesses  # noqa: E402  (tests/ is on sys.path)
from torch import Tensor

import tapo_kernels
from tapo_kernels import _library, reference, testing

NATIVE_OPS = ("fused_correct", "policy_loss", "policy_loss_backward", "policy_loss_with_grad")
_missing = [op for op in NATIVE_OPS if tapo_kernels.CPU_BACKEND.get(op) != "native"]
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"native CPU kernels not loaded for {_missing} ({tapo_kernels.NATIVE_ERROR or 'no C++ kernel registered'})",
)


def assert_close_by_rule(
    out: Tensor, ref64: Tensor, ref_own: Tensor, eps: float, what: str
) -> None:
    """``|out - ref64| <= 2 |ref_own - ref64| + eps`` in the max norm (STYLE.md practice 3)."""
    assert not torch.isnan(out).any(), f"{what}: NaN in the kernel output"
    err = (out.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_own.double() - ref64.double()).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * ref_err + eps, (
        f"{what}: error {err:.3e} > 2 x reference error {ref_err:.3e} + {eps:.0e}"
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


# (theta, alpha_min, beta): defaults, permissive gates (many corrections), strict gates, and
# dyadic gates that quantized similarities (multiples of 1/64) and confidences hit exactly
_KNOB_SETS = (
    (0.7, 0.3, 0.8),
    (0.2, 0.05, 1.0),
    (0.5, 0.25, 0.8),
    (0.4, 0.15, 0.5),
    (0.95, 0.6, 0.8),
    (0.25, 0.125, 1.0),
)


def _batch_config(seed: int) -> dict:
    """Sizes and dtypes spread over the seeds: prime B, D off the 16-lane width, fp16/bf16."""
    return dict(
        B=(13, 31, 7, 29)[seed % 4],
        T=(97, 1, 33, 64)[seed % 4],
        group_size=(4, 3, 8, 1)[seed % 4],
        D=(16, 37, 4, 40)[seed % 4],
        calls_per_row=(3, 5, 2, 4)[seed % 4],
        num_tools=(3, 2, 1, 3)[seed % 4],
        num_keys=(2, 1, 3, 2)[seed % 4],
        num_queries=(6, 4, 3, 8)[seed % 4],
        param_dtype=(torch.float32, torch.float16, torch.bfloat16)[seed % 3],
    )


@pytest.mark.parametrize("batch_scope", [False, True])
@pytest.mark.parametrize("seed", range(24))
def test_fused_correct_quantized_equals_reference_exactly(seed: int, batch_scope: bool) -> None:
    theta, alpha_min, beta = _KNOB_SETS[seed % len(_KNOB_SETS)]
    batch = _quantize_advantages(
        testing.correct_batch(seed=seed, quantized=True, **_batch_config(seed))
    )
    knobs = (theta, alpha_min, beta, batch_scope)
    native, ref = _run_both(batch, knobs)
    for name, x, y in zip(
        ("corrected", "delta", "confidence", "witness"), native, ref, strict=True
    ):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name} differs: {(x != y).sum().item()} entries"


@pytest.mark.parametrize("batch_scope", [False, True])
@pytest.mark.parametrize("seed", range(100, 124))
def test_fused_correct_float_matches_reference_by_rule(seed: int, batch_scope: bool) -> None:
    theta, alpha_min, beta = _KNOB_SETS[seed % len(_KNOB_SETS)]
    batch = testing.correct_batch(seed=seed, quantized=False, **_batch_config(seed))
    knobs = (theta, alpha_min, beta, batch_scope)
    native, ref32 = _run_both(batch, knobs)
    ref64 = reference.fused_correct(
        batch.advantages.double(),
        batch.seq_advantages.double(),
        *batch.op_args()[2:8],
        batch.call_params.double(),
        batch.tool_sim_kind,
        *knobs,
    )
    # witnesses: equal, or another candidate of a tie the reference's matmul broke by rounding
    assert_witnesses(native[3], ref32[3], dict(zip(ARG_NAMES, batch.op_args())),
                     dict(theta=theta, alpha_min=alpha_min, beta=beta, batch_scope=batch_scope))
    for name, x, r64, r32 in zip(
        ("corrected", "delta", "confidence"), native[:3], ref64[:3], ref32[:3], strict=True
    ):
        assert x.dtype == torch.float32
        assert_close_by_rule(x, r64, r32, 1e-6, name)


def test_fused_correct_corrects_calls_with_permissive_gates() -> None:
    """The comparisons above must include real corrections, not only zero deltas."""
    corrected_calls = 0
    for seed in range(8):
        batch = _quantize_advantages(
            testing.correct_batch(seed=seed, B=16, group_size=8, calls_per_row=6)
        )
        native, ref = _run_both(batch, (0.2, 0.05, 1.0, False))
        assert torch.equal(native[1], ref[1])
        corrected_calls += int((native[1] > 0).sum())
        assert bool((native[0] >= batch.advantages).all())  # A' >= A
    assert corrected_calls >= 10


@pytest.mark.parametrize("batch_scope", [False, True])
def test_fused_correct_large_batch(batch_scope: bool) -> None:
    """A batch with many failing calls per scope (exercises the blocked similarity kernel)."""
    batch = testing.correct_batch(
        B=64,
        T=40,
        group_size=16,
        calls_per_row=12,
        D=70,
        num_tools=2,
        num_keys=1,
        num_queries=5,
        quantized=False,
        seed=7,
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
    assert torch.equal(native[3], ref32[3])
    for name, x, r64, r32 in zip(
        ("corrected", "delta", "confidence"), native[:3], ref64[:3], ref32[:3], strict=True
    ):
        assert_close_by_rule(x, r64, r32, 1e-6, name)


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
        env = dict(os.environ, TAPO_NATIVE_ISA=isa)
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, check=True)
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


def test_fused_correct_without_calls_returns_a_copy() -> None:
    batch = testing.correct_batch(B=5, T=9, calls_per_row=0, seed=3)
    assert batch.call_seq.numel() == 0
    corrected, delta, confidence, witness = torch.ops.tapo.fused_correct(
        *batch.op_args(), 0.7, 0.3, 0.8, False
    )
    assert torch.equal(corrected, batch.advantages)
    assert corrected.data_ptr() != batch.advantages.data_ptr()
    assert delta.shape == confidence.shape == witness.shape == (0,)
    assert witness.dtype == torch.int64


def test_fused_correct_all_invalid_calls() -> None:
    batch = testing.correct_batch(B=11, T=20, seed=5)
    batch.call_tool = torch.full_like(batch.call_tool, -1)
    native, ref = _run_both(batch, (0.2, 0.05, 1.0, False))
    for x, y in zip(native, ref, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(native[0], batch.advantages)
    assert bool((native[3] == -1).all())


def test_fused_correct_without_pool() -> None:
    """No successful row: nothing is corrected (docs/math.md, section 2.7), every witness is -1.

    Expected values by hand: with no candidate, s_k = 0, so conf_k = 0 and d_k = 0.
    """
    batch = testing.correct_batch(B=9, T=30, seed=2)
    batch.seq_advantages = -batch.seq_advantages.abs() - 0.5  # every row fails
    batch.advantages = batch.seq_advantages[:, None] * batch.mask
    corrected, delta, confidence, witness = torch.ops.tapo.fused_correct(
        *batch.op_args(), 0.1, 0.0, 1.0, True
    )
    assert torch.equal(corrected, batch.advantages)
    assert not delta.any() and not confidence.any()
    assert bool((witness == -1).all())


def test_fused_correct_non_contiguous_advantages() -> None:
    batch = _quantize_advantages(testing.correct_batch(B=13, T=40, seed=11, calls_per_row=5))
    contiguous = torch.ops.tapo.fused_correct(*batch.op_args(), 0.2, 0.05, 1.0, False)
    strided = batch.advantages.T.contiguous().T  # same values, column-major strides
    assert not strided.is_contiguous()
    args = (strided,) + batch.op_args()[1:]
    out = torch.ops.tapo.fused_correct(*args, 0.2, 0.05, 1.0, False)
    for x, y in zip(out, contiguous, strict=True):
        assert torch.equal(x, y)
    assert out[0].is_contiguous()


def _bad_fused_correct_cases():
    """(name, mutate(args list, knobs list), exception type, text the message must contain)."""

    def put(i, fn):
        def mutate(args, knobs):
            args[i] = fn(args[i])

        return mutate

    def knob(i, v):
        def mutate(args, knobs):
            knobs[i] = v

        return mutate

    def nan_at(i, value):
        def fn(t):
            t = t.clone()
            t.view(-1)[0] = value
            return t

        return put(i, fn)

    def overlap(args, knobs):
        seq, start, end = args[3].clone(), args[4].clone(), args[5].clone()
        seq[:2], start[:2], end[:2] = 0, torch.tensor([0, 2]), torch.tensor([4, 6])
        args[3], args[4], args[5] = seq, start, end

    def iou_without_box(args, knobs):
        args[8] = args[8][:, :3].contiguous()

    def no_width(args, knobs):
        args[8] = args[8][:, :0].contiguous()
        args[9] = torch.zeros_like(args[9])

    def nan_adv_and_bad_seq(args, knobs):  # two problems: the advantages one is reported first
        nan_at(0, float("nan"))(args, knobs)
        put(3, lambda t: t + 100)(args, knobs)

    return [
        ("advantages 1-D", put(0, lambda t: t[0]), ValueError, "advantages must be 2-D"),
        ("empty batch", put(0, lambda t: t[:0]), ValueError, "batch is empty"),
        ("advantages dtype", put(0, lambda t: t.double()), TypeError, "advantages must have dtype"),
        (
            "seq_advantages shape",
            put(1, lambda t: t[:-1]),
            ValueError,
            "seq_advantages must have shape",
        ),
        (
            "seq_advantages dtype",
            put(1, lambda t: t.half()),
            TypeError,
            "seq_advantages must have dtype",
        ),
        ("group_ids dtype", put(2, lambda t: t.int()), TypeError, "group_ids must have dtype"),
        ("call_seq 2-D", put(3, lambda t: t[None]), ValueError, "call_seq must be 1-D"),
        ("call_start length", put(4, lambda t: t[:-1]), ValueError, "call_start must have shape"),
        ("call_end dtype", put(5, lambda t: t.int()), TypeError, "call_end must have dtype"),
        ("call_tool length", put(6, lambda t: t[1:]), ValueError, "call_tool must have shape"),
        ("call_key dtype", put(7, lambda t: t.float()), TypeError, "call_key must have dtype"),
        ("call_params rows", put(8, lambda t: t[1:]), ValueError, "call_params must have shape"),
        (
            "call_params dtype",
            put(8, lambda t: t.double()),
            TypeError,
            "call_params must have dtype",
        ),
        ("tool_sim_kind 2-D", put(9, lambda t: t[None]), ValueError, "tool_sim_kind must be 1-D"),
        (
            "tool_sim_kind dtype",
            put(9, lambda t: t.int()),
            TypeError,
            "tool_sim_kind must have dtype",
        ),
        ("tool_sim_kind entry", put(9, lambda t: t + 2), ValueError, "tool_sim_kind entries"),
        ("theta > 1", knob(0, 1.5), ValueError, "theta must be in [0, 1]"),
        ("theta < 0", knob(0, -0.1), ValueError, "theta must be in [0, 1]"),
        ("theta nan", knob(0, float("nan")), ValueError, "theta must be in [0, 1]"),
        ("alpha_min < 0", knob(1, -1e-3), ValueError, "alpha_min must be"),
        ("beta < 0", knob(2, -0.5), ValueError, "beta must be"),
        ("beta inf", knob(2, float("inf")), ValueError, "beta must be"),
        ("advantages nan", nan_at(0, float("nan")), ValueError, "advantages contains NaN or inf"),
        ("advantages inf", nan_at(0, float("-inf")), ValueError, "advantages contains NaN or inf"),
        (
            "seq_advantages nan",
            nan_at(1, float("nan")),
            ValueError,
            "seq_advantages contains NaN or inf",
        ),
        ("call_params inf", nan_at(8, float("inf")), ValueError, "call_params contains NaN or inf"),
        ("call_seq out of range", put(3, lambda t: t + 100), ValueError, "call_seq out of range"),
        ("call_seq negative", put(3, lambda t: t - 100), ValueError, "call_seq out of range"),
        ("span past T", put(5, lambda t: t + 1000), ValueError, "call span out of range"),
        ("span before 0", put(4, lambda t: t - 1000), ValueError, "call span out of range"),
        (
            "start > end",
            lambda a, k: a.__setitem__(4, a[5] + 1),
            ValueError,
            "call_start > call_end",
        ),
        ("overlapping spans", overlap, ValueError, "overlapping call spans"),
        ("call_tool >= num_tools", put(6, lambda t: t + 10), ValueError, "call_tool out of range"),
        ("iou tool with D < 4", iou_without_box, ValueError, "D >= 4"),
        ("D = 0", no_width, ValueError, "D >= 1"),
        ("error order", nan_adv_and_bad_seq, ValueError, "advantages contains NaN or inf"),
    ]


@pytest.mark.parametrize("case", _bad_fused_correct_cases(), ids=lambda c: c[0])
def test_fused_correct_bad_input(case) -> None:
    _, mutate, exc_type, text = case
    batch = testing.correct_batch(B=6, T=12, calls_per_row=3, num_tools=2, seed=4)
    batch.call_tool = batch.call_tool.clamp(min=0)  # every call valid (iou tool 1 included)
    args, knobs = list(batch.op_args()), [0.7, 0.3, 0.8, False]
    mutate(args, knobs)
    with pytest.raises(exc_type) as native_error:
        torch.ops.tapo.fused_correct(*args, *knobs)
    with pytest.raises(exc_type) as reference_error:
        _library.fused_correct_reference_kernel(*args, *knobs)
    assert str(native_error.value) == str(reference_error.value)
    assert text in str(native_error.value)


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


def _check_against_reference(args: list, knobs: dict, dtype: torch.dtype, what: str) -> None:
    native = _loss_and_grad(torch.ops.tapo.policy_loss, args, knobs)
    ref64 = _loss_and_grad(reference.policy_loss, args, knobs, torch.float64)
    ref_own = _loss_and_grad(reference.policy_loss, args, knobs, dtype)
    assert (
        native[0].dtype == dtype and native[2].dtype == dtype and native[1].dtype == torch.float32
    )
    for name, x, r64, r_own in zip(
        ("loss", "metrics", "grad"), native, ref64, ref_own, strict=True
    ):
        scale = max(1.0, r64.abs().max().item())
        if dtype == torch.float64 and name != "metrics":
            eps = 1e-12 * scale  # fp64 kernel vs fp64 reference: rounding only
        else:
            eps = 1e-6 * scale
        assert_close_by_rule(x, r64, r_own, eps, f"{what} {name}")


@pytest.mark.parametrize("kl_type", reference.KL_TYPES)
@pytest.mark.parametrize("agg", reference.AGGS)
@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_matches_reference(algo: str, agg: str, kl_type: str) -> None:
    variants = itertools.product((True, False), (True, False), (torch.float32, torch.float64))
    for i, (per_token, with_calls, dtype) in enumerate(variants):
        batch = testing.loss_batch(
            B=(7, 13)[i % 2],
            T=(33, 97)[i % 2],
            dtype=dtype,
            per_token=per_token,
            with_calls=with_calls,
            spread=0.5,
            seed=i,
        )
        knobs = dict(
            algo=algo,
            agg=agg,
            kl_type=kl_type,
            kl_coef=0.05,
            eps_low=0.2,
            eps_high=0.28,
            dual_clip_c=(3.0, 0.0)[i % 2],
        )
        if algo == "gspo":
            knobs.update(eps_low=0.03, eps_high=0.04)  # GSPO ratios are row means: near 1
        if i % 4 == 1:
            knobs.update(norm_const=50.0, global_count=40.0)
        if i % 4 == 2:
            knobs.update(global_count=(123.0 if agg == "token-mean" else 5.0))
        _check_against_reference(
            list(batch.op_args()), knobs, dtype, f"{algo}/{agg}/{kl_type} variant {i}"
        )


@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_without_reference_policy(algo: str) -> None:
    for dtype in (torch.float32, torch.float64):
        batch = testing.loss_batch(B=5, T=50, dtype=dtype, with_ref=False, seed=21)
        _check_against_reference(list(batch.op_args()), dict(algo=algo), dtype, f"{algo} no ref")


def test_policy_loss_bool_mask_equals_float_mask() -> None:
    batch = testing.loss_batch(B=6, T=41, dtype=torch.float64, seed=8)
    args = list(batch.op_args())
    for algo in reference.ALGOS:
        knobs = dict(algo=algo, kl_coef=0.1, agg="seq-mean-token-mean")
        as_float = _loss_and_grad(torch.ops.tapo.policy_loss, args, knobs)
        as_bool = _loss_and_grad(
            torch.ops.tapo.policy_loss, args[:3] + [args[3] > 0] + args[4:], knobs
        )
        for x, y in zip(as_float, as_bool, strict=True):
            assert torch.equal(x, y)
        _check_against_reference(
            args[:3] + [args[3] > 0] + args[4:], knobs, torch.float64, f"{algo} bool mask"
        )


def test_policy_loss_non_contiguous_inputs() -> None:
    batch = testing.loss_batch(B=9, T=30, dtype=torch.float32, seed=9)
    args = list(batch.op_args())
    strided = [t.T.contiguous().T if t is not None and t.dim() == 2 else t for t in args]
    assert not strided[0].is_contiguous()
    knobs = dict(algo="grpo", kl_coef=0.1)
    for x, y in zip(
        _loss_and_grad(torch.ops.tapo.policy_loss, args, knobs),
        _loss_and_grad(torch.ops.tapo.policy_loss, strided, knobs),
        strict=True,
    ):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shape", [(3, 0), (0, 5)])
def test_policy_loss_empty_shapes(shape: tuple[int, int]) -> None:
    B, T = shape
    args = [torch.zeros(B, T), torch.zeros(B, T), torch.ones(B), torch.ones(B, T), None, None, None]
    for agg in reference.AGGS:
        knobs = dict(algo="gspo", agg=agg)
        native = _loss_and_grad(torch.ops.tapo.policy_loss, args, knobs)
        ref = _loss_and_grad(reference.policy_loss, args, knobs)
        for x, y in zip(native, ref, strict=True):
            assert x.shape == y.shape and torch.equal(x, y)


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


@pytest.mark.parametrize("agg", reference.AGGS)
def test_policy_loss_all_masked_batch(agg: str) -> None:
    """Fully masked rows give 0; all masked: loss 0, zero gradient (docs/math.md, section 4)."""
    for dtype, global_count in itertools.product((torch.float32, torch.float64), (None, 10.0)):
        batch = testing.loss_batch(B=4, T=16, dtype=dtype, seed=1)
        args = list(batch.op_args())
        args[3] = torch.zeros_like(args[3])
        for algo in reference.ALGOS:
            knobs = dict(algo=algo, agg=agg, kl_coef=0.1, global_count=global_count)
            loss, metrics, grad = _loss_and_grad(torch.ops.tapo.policy_loss, args, knobs)
            assert loss.item() == 0.0 and not torch.isnan(loss)
            assert torch.equal(metrics, torch.zeros(4))
            assert torch.equal(grad, torch.zeros_like(grad))


def test_policy_loss_masked_tokens_get_no_gradient() -> None:
    batch = testing.loss_batch(B=6, T=40, dtype=torch.float32, seed=13)
    args = list(batch.op_args())
    for algo in reference.ALGOS:
        _, _, grad = _loss_and_grad(torch.ops.tapo.policy_loss, args, dict(algo=algo, kl_coef=0.1))
        assert torch.equal(grad[args[3] == 0], torch.zeros_like(grad[args[3] == 0]))
        assert grad[args[3] != 0].abs().sum() > 0


def test_policy_loss_tie_at_both_clip_bounds() -> None:
    """logp == old_logp gives r = 1 exactly; eps_low = eps_high = 0 puts both clip bounds there.

    By hand, one row, token-mean over 2 tokens, a = (-1, 2): l1 = l2 = -a (a tie in maximum,
    0.5 of the gradient each), the clamp passes its gradient at the bounds (inclusive), so
    d loss / d logp_t = (0.5 * (-a) + 0.5 * (-a) * 1) * r / 2 = (0.5, -1).
    """
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 2.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    args = [logp, logp.clone(), adv, mask, None, None, None]
    knobs = dict(algo="grpo", eps_low=0.0, eps_high=0.0, dual_clip_c=0.0)
    _, metrics, grad = _loss_and_grad(torch.ops.tapo.policy_loss, args, knobs)
    assert torch.equal(grad, torch.tensor([[0.5, -1.0]], dtype=torch.float64))
    assert metrics[0].item() == 0.0  # a tie is not a clip
    _check_against_reference(args, knobs, torch.float64, "clip-bound tie")


def test_policy_loss_tie_with_dual_clip() -> None:
    """lr = 20 (the log-ratio clamp's bound, inclusive) and c = e^20: -a r == -a c, a tie.

    By hand, one token, a = -1: r = e^20 > 1 + eps_high, so max(l1, l2) = l1 = r; the tie
    in minimum(l1, l3) passes half the gradient: d loss / d logp = 0.5 * (-a) * r = 0.5 e^20.
    """
    if torch.exp(torch.tensor(20.0, dtype=torch.float64)).item() != math.exp(20.0):
        pytest.skip("torch's exp(20) differs from the C library's here; no exact tie to build")
    logp = torch.tensor([[0.0]], dtype=torch.float64)
    args = [
        logp,
        logp - 20.0,
        torch.tensor([-1.0], dtype=torch.float64),
        torch.ones(1, 1, dtype=torch.float64),
        None,
        None,
        None,
    ]
    knobs = dict(algo="grpo", dual_clip_c=math.exp(20.0))
    _, _, grad = _loss_and_grad(torch.ops.tapo.policy_loss, args, knobs)
    assert grad.item() == 0.5 * math.exp(20.0)
    _check_against_reference(args, knobs, torch.float64, "dual-clip tie")


def test_policy_loss_clamp_bounds_are_inclusive() -> None:
    """lr clamp [-20, 20] and GSPO clamp(max=10): gradient at the bound, zero beyond it.

    By hand (grpo, a = -1, no dual clip, one token): loss = r, d loss / d logp = r at lr = 20,
    0 at lr = 20.5. GSPO with one mask token per row: log s = lr, so d loss / d logp = s at
    log s = 10 and 0 at log s = 10.5.
    """
    ones = torch.ones(2, 1, dtype=torch.float64)
    logp = torch.zeros(2, 1, dtype=torch.float64)
    for algo, bound in (("grpo", 20.0), ("gspo", 10.0)):
        old = torch.tensor([[-bound], [-bound - 0.5]], dtype=torch.float64)
        args = [logp, old, -ones[:, 0], ones, None, None, None]
        knobs = dict(algo=algo, dual_clip_c=0.0, agg="seq-mean-token-sum")
        _, _, grad = _loss_and_grad(torch.ops.tapo.policy_loss, args, knobs)
        # seq-mean-token-sum over 2 rows: d loss / d L = 1/2
        assert torch.allclose(
            grad[0], torch.tensor([0.5 * math.exp(bound)], dtype=torch.float64), rtol=1e-14
        )
        assert grad[1].item() == 0.0
        _check_against_reference(args, knobs, torch.float64, f"{algo} clamp bound")


def test_policy_loss_backward_op_matches_reference_kernel() -> None:
    batch = testing.loss_batch(B=5, T=23, dtype=torch.float64, seed=17)
    args = list(batch.op_args())
    knobs = dict(
        algo="sapo", kl_coef=0.2, kl_type="k2", agg="seq-mean-token-sum-norm", norm_const=12.0
    )
    grad_loss = torch.tensor(0.37, dtype=torch.float64)
    native = torch.ops.tapo.policy_loss_backward(grad_loss, *args, **knobs)
    ref = _library.policy_loss_backward_reference_kernel(grad_loss, *args, **knobs)
    torch.testing.assert_close(native, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_opcheck(algo: str) -> None:
    """Schema, fake kernel, autograd registration and AOT dispatch with the native kernels."""
    batch = testing.loss_batch(B=4, T=9, dtype=torch.float64, seed=1)
    args = list(batch.op_args())
    args[0] = args[0].clone().requires_grad_(True)
    knobs = dict(algo=algo, kl_coef=0.1)
    torch.library.opcheck(torch.ops.tapo.policy_loss.default, tuple(args), knobs)
    grad_loss = torch.tensor(1.0, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.tapo.policy_loss_backward.default, (grad_loss, *batch.op_args()), knobs
    )


def _bad_policy_loss_cases():
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
        ("algo", knob(algo="ppo"), ValueError, "unknown algo 'ppo'"),
        ("agg", knob(agg="mean"), ValueError, "unknown agg 'mean'"),
        ("kl_type", knob(kl_type="k4"), ValueError, "unknown kl_type 'k4'"),
        ("logp 1-D", put(0, lambda t: t[0]), ValueError, "logp must be 2-D"),
        ("logp dtype", put(0, lambda t: t.half()), TypeError, "logp must have dtype"),
        ("old_logp shape", put(1, lambda t: t[:, 1:]), ValueError, "old_logp must have shape"),
        ("old_logp dtype", put(1, lambda t: t.double()), TypeError, "old_logp must have dtype"),
        ("ref_logp dtype", put(4, lambda t: t.double()), TypeError, "ref_logp must have dtype"),
        ("advantages shape", put(2, lambda t: t[:, :3]), ValueError, "advantages must have shape"),
        ("advantages dtype", put(2, lambda t: t.double()), TypeError, "advantages must have dtype"),
        ("mask shape", put(3, lambda t: t[1:]), ValueError, "mask must have shape"),
        ("mask dtype", put(3, lambda t: t.long()), TypeError, "mask must have dtype"),
        ("call_map alone", put(6, lambda t: None), ValueError, "call_map and call_delta"),
        ("call_map dtype", put(5, lambda t: t.long()), TypeError, "call_map must have dtype"),
        ("call_map shape", put(5, lambda t: t[:, 1:]), ValueError, "call_map must have shape"),
        ("call_delta 2-D", put(6, lambda t: t[None]), ValueError, "call_delta must be 1-D"),
        ("call_delta dtype", put(6, lambda t: t.double()), TypeError, "call_delta must have dtype"),
        ("eps_low < 0", knob(eps_low=-0.1), ValueError, "eps_low must be finite"),
        ("eps_high nan", knob(eps_high=float("nan")), ValueError, "eps_high must be finite"),
        ("eps_low >= 1", knob(eps_low=1.0), ValueError, "eps_low must be < 1"),
        ("dual_clip_c in (0, 1]", knob(dual_clip_c=0.5), ValueError, "dual_clip_c must be 0"),
        ("tau_pos 0", knob(tau_pos=0.0), ValueError, "tau_pos must be"),
        ("tau_neg inf", knob(tau_neg=float("inf")), ValueError, "tau_neg must be"),
        ("kl_coef nan", knob(kl_coef=float("nan")), ValueError, "kl_coef must be finite"),
        (
            "kl without ref",
            lambda a, k: (a.__setitem__(4, None), k.update(kl_coef=0.1)),
            ValueError,
            "kl_coef != 0 needs ref_logp",
        ),
        ("norm_const 0", knob(norm_const=0.0), ValueError, "norm_const must be"),
        ("global_count < 0", knob(global_count=-3.0), ValueError, "global_count must be"),
        ("logp nan", poison(0, float("nan")), ValueError, "logp contains NaN or inf"),
        ("old_logp inf", poison(1, float("inf")), ValueError, "old_logp contains NaN or inf"),
        ("advantages nan", poison(2, float("nan")), ValueError, "advantages contains NaN or inf"),
        (
            "row advantages nan",
            put(2, lambda t: torch.where(torch.arange(t.shape[0]) == 1, float("nan"), t[:, 0])),
            ValueError,
            "advantages contains NaN or inf",
        ),
        ("ref_logp nan", poison(4, float("nan")), ValueError, "ref_logp contains NaN or inf"),
        ("call_delta inf", poison(6, float("-inf")), ValueError, "call_delta contains NaN or inf"),
        (
            "call_map too high",
            put(5, lambda t: t.clamp(min=0) + 1000),
            ValueError,
            "call_map out of range",
        ),
        ("call_map below -1", put(5, lambda t: t - 5), ValueError, "call_map out of range"),
        ("mask nan", put(3, lambda t: torch.where(t > 0.5, float("nan"), t)), ValueError,
         "mask contains NaN or inf"),
        ("mask > 1", put(3, lambda t: t * 2.0), ValueError, "mask values must be in [0, 1]"),
        ("mask < 0", put(3, lambda t: -t), ValueError, "mask values must be in [0, 1]"),
        (
            "error order",
            lambda a, k: (poison(2, float("nan"))(a, k), poison(4, float("nan"))(a, k)),
            ValueError,
            "advantages contains NaN or inf",
        ),
    ]


@pytest.mark.parametrize("case", _bad_policy_loss_cases(), ids=lambda c: c[0])
def test_policy_loss_bad_input(case) -> None:
    _, mutate, exc_type, text = case
    batch = testing.loss_batch(B=4, T=10, dtype=torch.float32, seed=2)
    args, knobs = list(batch.op_args()), dict(algo="grpo", kl_coef=0.0)
    mutate(args, knobs)
    with pytest.raises(exc_type) as native_error:
        torch.ops.tapo.policy_loss(*args, **knobs)
    with pytest.raises(exc_type) as reference_error:
        _library.policy_loss_reference_kernel(*args, **knobs)
    assert str(native_error.value) == str(reference_error.value)
    assert text in str(native_error.value)


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


def _with_grad_knobs(algo: str, agg: str, kl_type: str, i: int) -> dict:
    knobs = dict(algo=algo, agg=agg, kl_type=kl_type, kl_coef=0.05, eps_low=0.2, eps_high=0.28,
                 dual_clip_c=(3.0, 0.0)[i % 2])
    if algo == "gspo":
        knobs.update(eps_low=0.03, eps_high=0.04)
    if i % 3 == 1:
        knobs.update(norm_const=50.0, global_count=40.0)
    return knobs


@pytest.mark.parametrize("kl_type", reference.KL_TYPES)
@pytest.mark.parametrize("agg", reference.AGGS)
@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_with_grad_matches_reference(algo: str, agg: str, kl_type: str) -> None:
    """(loss, metrics, d loss / d logp) of both kernels vs the fp64 reference and autograd;
    the last row of every batch is fully masked (zero gradient)."""
    variants = itertools.product((True, False), (torch.float32, torch.float64))
    for i, (with_calls, dtype) in enumerate(variants):
        batch = testing.loss_batch(B=(6, 11)[i % 2], T=(37, 90)[i % 2], dtype=dtype,
                                   per_token=i % 3 != 2, with_calls=with_calls, empty_row=True,
                                   spread=0.5, seed=100 + i)
        args = list(batch.op_args())
        assert not args[3][-1].any()
        knobs = _with_grad_knobs(algo, agg, kl_type, i)
        what = f"{algo}/{agg}/{kl_type} calls={with_calls} {dtype}"
        ref64 = _loss_and_grad(reference.policy_loss, args, knobs, torch.float64)
        ref_own = _loss_and_grad(reference.policy_loss, args, knobs, dtype)
        for name, fn in WITH_GRAD_KERNELS.items():
            out = _poisoned_call(fn, args, knobs)
            assert len(out) == 3
            loss, metrics, grad = out
            assert loss.shape == () and loss.dtype == dtype and not loss.requires_grad
            assert metrics.shape == (4,) and metrics.dtype == torch.float32
            assert grad.shape == args[0].shape and grad.dtype == dtype and grad.is_contiguous()
            assert torch.equal(grad[-1], torch.zeros_like(grad[-1])), f"{name} {what}"
            assert torch.equal(grad[args[3] == 0], torch.zeros_like(grad[args[3] == 0]))
            for part, x, r64, r_own in zip(("loss", "metrics", "grad"), out, ref64, ref_own,
                                           strict=True):
                scale = max(1.0, r64.abs().max().item())
                eps = (1e-12 if dtype == torch.float64 and part != "metrics" else 1e-6) * scale
                assert_close_by_rule(x, r64, r_own, eps, f"{name} {what} {part}")
            if name == "reference":  # the reference forward and autograd, exactly
                for x, y in zip(out, ref_own, strict=True):
                    assert torch.equal(x, y), f"{name} {what}"


@pytest.mark.parametrize("algo", reference.ALGOS)
def test_policy_loss_with_grad_equals_forward_and_backward_ops(algo: str) -> None:
    """The single pass gives the forward's loss and metrics and the backward's gradient for
    grad_loss = 1, bit for bit (same token math, same summation orders)."""
    for i, (dtype, agg) in enumerate(itertools.product((torch.float32, torch.float64),
                                                       reference.AGGS)):
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
        scale = x64.grad.abs().max().item()
        eps = (1e-12 if dtype == torch.float64 else 1e-6) * scale
        assert_close_by_rule(x.grad, x64.grad, xo.grad, eps, f"{algo} {dtype} 3.7 * loss")
        # a second backward accumulates into .grad
        first = x.grad.clone()
        loss, _ = torch.ops.tapo.policy_loss(x, *args[1:], **knobs)
        (-0.5 * loss).backward()
        torch.testing.assert_close(x.grad, first * (3.2 / 3.7), rtol=1e-5, atol=1e-12)


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
    knobs = dict(algo=algo, kl_coef=0.1, kl_type="k3", agg="token-mean", eps_low=0.2,
                 eps_high=0.28)
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
    old_grad = torch.ops.tapo.policy_loss(args[0], args[1].clone().requires_grad_(True),
                                          *args[2:], **knobs)
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
    """The single pass validates like the forward: same errors, same messages, also through
    autograd (logp requires grad)."""
    _, mutate, exc_type, text = case
    batch = testing.loss_batch(B=4, T=10, dtype=torch.float32, seed=2)
    args, knobs = list(batch.op_args()), dict(algo="grpo", kl_coef=0.0)
    mutate(args, knobs)
    with pytest.raises(exc_type) as reference_error:
        _library.policy_loss_reference_kernel(*args, **knobs)
    with pytest.raises(exc_type) as with_grad_error:
        torch.ops.tapo.policy_loss_with_grad(*args, **knobs)
    if args[0].dim() == 2:
        args[0] = args[0].clone().requires_grad_(True)
    with pytest.raises(exc_type) as autograd_error:
        torch.ops.tapo.policy_loss(*args, **knobs)
    assert str(with_grad_error.value) == str(reference_error.value)
    assert str(autograd_error.value) == str(reference_error.value)
    assert text in str(reference_error.value)


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
    env = dict(os.environ, TAPO_DISABLE_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["native_error"] and result["backend"] == "reference"
    assert result["autograd_cpu"] is False
    assert all(result[k] for k in ("loss", "metrics", "grad", "grad_nonzero", "autograd")), result
