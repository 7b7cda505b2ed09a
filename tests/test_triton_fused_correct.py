"""The Triton kernel of ``tapo::fused_correct`` against the pure-torch reference.

Runs on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest.py)
on tiny shapes. Quantized batches (parameters in eighths, sequence advantages in 64ths) make
every similarity, sum and gate exact in fp32 in any summation order, so there the kernel
must equal the reference bit for bit. Other batches use the tolerance rule of STYLE.md
practice 3 against an fp64 reference.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does too)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tapo_kernels import _library, reference  # noqa: E402
from tapo_kernels.ops import fused_correct as fc_module  # noqa: E402
from tapo_kernels.testing import CorrectBatch, correct_batch  # noqa: E402
from test_fused_correct import ARG_NAMES, assert_witnesses  # noqa: E402  (tests/ is on sys.path)

OUTPUT_NAMES = ("corrected", "delta", "confidence", "witness")
# (theta, alpha_min, beta): the defaults, a permissive setting that corrects many calls,
# and thresholds on exact eighths so that similarities land exactly on them
KNOBS = [(0.7, 0.3, 0.8), (0.1, 0.0, 0.8), (0.5, 0.25, 1.0)]


def quantize_advantages(batch: CorrectBatch) -> CorrectBatch:
    """Sequence advantages in multiples of 1/64, so that sums of A_j are exact in fp32.

    The reference sums A_j with torch's CPU reduction, whose order is not sequential; on
    quantized advantages every order gives the same bits.
    """
    batch.seq_advantages = torch.round(batch.seq_advantages * 64) / 64
    batch.advantages = batch.seq_advantages[:, None] * batch.mask
    return batch


def has_failing_without_candidates(args: tuple[torch.Tensor, ...]) -> bool:
    seq_adv, call_seq, call_tool = args[1], args[3], args[6]
    valid = call_tool >= 0
    return bool((valid & (seq_adv[call_seq] < 0)).any()) and not bool(
        (valid & (seq_adv[call_seq] > 0)).any()
    )


def expected_outputs(args: tuple[torch.Tensor, ...], knobs: tuple, batch_scope: bool, dtype):
    """The reference in ``dtype`` (parameters converted too); documented math without witnesses.

    ``reference.fused_correct`` raises IndexError when failing calls exist but no candidate
    does (``min`` over an empty dimension); docs/math.md, section 2.3: every failing call then has
    ``s = 0``, ``w = -1``, ``d = 0`` and nothing changes.
    """
    if has_failing_without_candidates(args):
        n = args[3].numel()
        adv = args[0].to(dtype)
        return (
            adv.clone(),
            adv.new_zeros(n),
            adv.new_zeros(n),
            torch.full((n,), -1, dtype=torch.int64),
        )
    cast = [a.to(dtype) if a.is_floating_point() else a for a in args]
    return reference.fused_correct(*cast, *knobs, batch_scope)


def run_triton(args: tuple[torch.Tensor, ...], knobs: tuple, batch_scope: bool):
    return fc_module.fused_correct_triton(*args, *knobs, batch_scope)


def assert_close_by_rule(out: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor, name: str):
    """Kernel error vs fp64 at most 2x the fp32 reference's own error, plus 1e-6 absolute."""
    err_kernel = (out.double() - ref64).abs()
    err_torch32 = (ref32.double() - ref64).abs()
    bound = 2 * err_torch32 + 1e-6
    worst = (err_kernel - bound).max().item() if out.numel() else -1.0
    assert worst <= 0, (
        f"{name}: kernel error {err_kernel.max().item():.3g} exceeds the rule "
        f"(fp32 reference error {err_torch32.max().item():.3g})"
    )


def check_against_reference(
    args: tuple[torch.Tensor, ...], knobs: tuple, batch_scope: bool, exact: bool
) -> tuple[torch.Tensor, ...]:
    inputs_before = [a.clone() for a in args]
    out = run_triton(args, knobs, batch_scope)
    for before, after in zip(inputs_before, args, strict=True):
        assert torch.equal(before, after), "the kernel modified an input"
    ref32 = expected_outputs(args, knobs, batch_scope, torch.float32)
    for name, o, r in zip(OUTPUT_NAMES, out, ref32, strict=True):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        if o.is_floating_point():
            assert not torch.isnan(o).any(), f"{name} contains NaN"
    # witnesses: equal, or another candidate of a tie the reference's matmul broke by rounding
    assert_witnesses(out[3].cpu(), ref32[3].cpu(), dict(zip(ARG_NAMES, (a.cpu() for a in args))),
                     dict(zip(("theta", "alpha_min", "beta"), knobs), batch_scope=batch_scope))
    if exact:
        for name, o, r in zip(OUTPUT_NAMES, out, ref32, strict=True):
            assert torch.equal(o, r), f"{name} differs from the reference"
    else:
        ref64 = expected_outputs(args, knobs, batch_scope, torch.float64)
        for i in range(3):
            assert_close_by_rule(out[i], ref64[i], ref32[i], OUTPUT_NAMES[i])
    return out


# B x T x D x param dtype x generator knobs; prime B, T = 1, a single row, large pools
CASES = [
    dict(B=1, T=17, D=4),
    dict(B=5, T=1, D=16),
    dict(B=5, T=97, D=4, param_dtype=torch.float16),
    dict(B=13, T=17, D=16),
    dict(B=13, T=97, D=16, param_dtype=torch.bfloat16),
    dict(B=13, T=97, D=4, group_size=13, calls_per_row=6, num_keys=1),
    dict(B=13, T=17, D=16, num_tools=1, num_queries=3),
    dict(B=31, T=97, D=16, group_size=8, param_dtype=torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("batch_scope", [False, True])
def test_quantized_batches_equal_reference(case, batch_scope):
    corrected_calls = 0
    for seed in range(2):
        batch = quantize_advantages(correct_batch(**case, quantized=True, seed=seed))
        for knobs in KNOBS:
            out = check_against_reference(batch.op_args(), knobs, batch_scope, exact=True)
            corrected_calls += int((out[1] > 0).sum())
    if case["B"] >= 13:  # enough rows for successes and failures in one group
        assert corrected_calls > 0, "no call was corrected: the case tests nothing"


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_scope", [False, True])
def test_float_batches_match_reference_by_rule(param_dtype, batch_scope):
    corrected_calls = 0
    for seed, (B, T, D) in enumerate([(13, 97, 16), (5, 17, 4), (31, 17, 16)]):
        batch = correct_batch(
            B=B, T=T, D=D, quantized=False, param_dtype=param_dtype, seed=100 + seed
        )
        for knobs in KNOBS[:2]:
            out = check_against_reference(batch.op_args(), knobs, batch_scope, exact=False)
            corrected_calls += int((out[1] > 0).sum())
    assert corrected_calls > 0


def test_batch_has_the_hard_cases_and_they_are_handled():
    """Spans at both ends of a row, rows without calls, invalid calls, zero-advantage rows."""
    B, T = 13, 97
    batch = correct_batch(B=B, T=T, D=16, calls_per_row=4, seed=7)
    batch.seq_advantages[int(batch.call_seq[0])] = 0.0  # a zero-advantage row with calls
    batch = quantize_advantages(batch)
    assert bool((batch.call_start == 0).any()) and bool((batch.call_end == T).any())
    assert len(set(range(B)) - set(batch.call_seq.tolist())) > 0, "no row without calls"
    assert bool((batch.call_tool < 0).any())
    args = batch.op_args()
    out = check_against_reference(args, (0.1, 0.0, 0.8), False, exact=True)
    changed = out[0] != batch.advantages
    assert changed.any(), "no token was lifted"
    # the invariants of docs/math.md, section 2.7: lifts only, never flips, only failing rows
    assert bool((out[0] >= batch.advantages).all())
    assert bool((out[0][changed] <= 0).all())
    assert not changed[batch.seq_advantages >= 0].any()


@pytest.mark.parametrize("kinds", ["cosine", "iou"])
def test_long_candidate_ranges_span_several_tiles(kinds):
    """One tool and key, 3 rows with up to 24 calls each: a row's candidates cross tiles.

    With one query vector every candidate ties, so the witness must be the lowest index
    across tiles; each successful row must be counted once although its hits span tiles.
    """
    batch = correct_batch(
        B=3,
        T=97,
        D=8,
        group_size=3,
        calls_per_row=24,
        num_tools=1,
        num_keys=1,
        num_queries=2,
        invalid_prob=0.0,
        seed=3,
    )
    batch.seq_advantages = torch.tensor([-1.0, 0.5, 1.25])  # one failing row, two witnesses
    batch.advantages = batch.seq_advantages[:, None] * batch.mask
    if kinds == "iou":
        batch.tool_sim_kind = torch.ones(1, dtype=torch.int64)
    per_row = torch.bincount(batch.call_seq, minlength=3)
    assert int(per_row[1:].max()) > 16, "a row must have more candidates than one tile (16)"
    for knobs in KNOBS[1:2]:
        for batch_scope in (False, True):
            out = check_against_reference(batch.op_args(), knobs, batch_scope, exact=True)
    assert bool((out[3] >= 0).any())


GOLDEN = [
    # theta, alpha_min, expected lift d, expected confidence
    (0.5, 0.3, 0.8, 1.0),
    (0.6, 0.3, 0.8, 1.0),  # sim 0.6 == theta: row 2 still supports (m_kj >= theta)
    (0.7, 0.3, 0.2, 0.5),
    (1.0, 0.5, 0.2, 0.5),  # s == theta and conf == alpha_min: the gate is open
    (1.0, 0.51, 0.0, 0.5),  # conf < alpha_min: gate closed, confidence still reported
]


@pytest.mark.parametrize("theta, alpha_min, lift, conf", GOLDEN)
def test_golden_hand_computed(theta, alpha_min, lift, conf):
    """Row 0 fails (A = -1); rows 1 and 2 succeed (A = 0.5, 1.5); one prompt group.

    Cosine calls: p0 = e1 (row 0), p1 = e1 (row 1), p2 = (0.6, 0.8) (row 2): sim 1 and 0.6.
    theta <= 0.6: s = 1, w = 1, both rows support: cov = 2/2 = 1, Abar = (0.5 + 1.5)/2 = 1,
      conf = 1, d = 0.8 * 1 * 1 = 0.8, and A' = min(0, -1 + 0.8) = -0.2 on the span.
    0.6 < theta <= 1: only row 1 supports: cov = 1/2, Abar = 0.5, conf = 1 * 0.5 = 0.5,
      d = 0.8 * 0.5 * 0.5 = 0.2 when conf >= alpha_min, A' = -1 + 0.2 = -0.8.
    """
    adv = torch.tensor([[-1.0, -1.0, -1.0, 0.0], [0.5] * 4, [1.5] * 4])
    seq_adv = torch.tensor([-1.0, 0.5, 1.5])
    group_ids = torch.zeros(3, dtype=torch.int64)
    ints = lambda *xs: torch.tensor(xs, dtype=torch.int64)
    params = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    args = (
        adv,
        seq_adv,
        group_ids,
        ints(0, 1, 2),
        ints(1, 0, 0),
        ints(3, 2, 2),
        ints(0, 0, 0),
        ints(0, 0, 0),
        params,
        ints(0),
    )
    corrected, delta, confidence, witness = run_triton(args, (theta, alpha_min, 0.8), False)
    expected = adv.clone()
    expected[0, 1:3] = -1.0 + lift
    torch.testing.assert_close(corrected, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(delta, torch.tensor([lift, 0.0, 0.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(confidence, torch.tensor([conf, 0.0, 0.0]), rtol=0, atol=1e-6)
    assert witness.tolist() == [1, -1, -1]


def test_all_invalid_calls_and_no_calls():
    batch = quantize_advantages(correct_batch(B=13, T=17, D=4, seed=11))
    batch.call_tool = torch.full_like(batch.call_tool, -1)
    out = check_against_reference(batch.op_args(), (0.1, 0.0, 0.8), True, exact=True)
    assert torch.equal(out[0], batch.advantages) and bool((out[3] == -1).all())

    empty = torch.zeros(0, dtype=torch.int64)
    args = (
        batch.advantages,
        batch.seq_advantages,
        batch.group_ids,
        empty,
        empty,
        empty,
        empty,
        empty,
        torch.zeros(0, 4),
        batch.tool_sim_kind,
    )
    out = check_against_reference(args, (0.7, 0.3, 0.8), False, exact=True)
    assert out[0].data_ptr() != batch.advantages.data_ptr(), "N = 0 must return a copy"


def test_non_contiguous_inputs():
    batch = quantize_advantages(correct_batch(B=13, T=97, D=16, seed=5))
    B, T = batch.advantages.shape
    N, D = batch.call_params.shape
    adv_t = torch.full((T, B), float("nan"))
    adv_t.copy_(batch.advantages.t())
    wide_params = torch.full((N, 2 * D), float("nan"))
    wide_params[:, ::2] = batch.call_params
    wide_seq_adv = torch.full((2 * B,), float("nan"))
    wide_seq_adv[::2] = batch.seq_advantages
    args = list(batch.op_args())
    args[0] = adv_t.t()  # (B, T) with strides (1, B)
    args[1] = wide_seq_adv[::2]
    args[8] = wide_params[:, ::2]  # stride 2 along D
    assert not (args[0].is_contiguous() or args[1].is_contiguous() or args[8].is_contiguous())
    for knobs in KNOBS:
        check_against_reference(tuple(args), knobs, False, exact=True)


def test_outputs_are_fully_written(monkeypatch):
    """Poisoned output buffers: every entry must be written by the kernel."""

    def poisoned(n: int, device: torch.device):
        return (
            torch.full((n,), float("nan"), device=device),
            torch.full((n,), float("nan"), device=device),
            torch.full((n,), -7, dtype=torch.int64, device=device),
        )

    monkeypatch.setattr(fc_module, "_alloc_outputs", poisoned)
    batch = quantize_advantages(correct_batch(B=13, T=97, D=16, seed=2))
    for batch_scope in (False, True):
        out = check_against_reference(batch.op_args(), (0.1, 0.0, 0.8), batch_scope, exact=True)
        assert not bool((out[3] == -7).any())


def _bad(name: str):
    batch = quantize_advantages(correct_batch(B=13, T=17, D=4, seed=1))
    args = list(batch.op_args())
    if name == "overlapping spans":
        i = int(torch.bincount(args[3]).argmax())  # a row with several calls
        calls = (args[3] == i).nonzero().squeeze(1)
        args[4], args[5] = args[4].clone(), args[5].clone()
        args[4][calls[:2]] = torch.tensor([0, 2])
        args[5][calls[:2]] = torch.tensor([5, 7])
    elif name == "call_seq out of range":
        args[3] = args[3].clone()
        args[3][0] = 13
    elif name == "NaN advantages":
        args[0] = args[0].clone()
        args[0][3, 4] = float("nan")
    elif name == "wrong dtype":
        args[7] = args[7].to(torch.int32)
    return tuple(args)


@pytest.mark.parametrize(
    "name", ["overlapping spans", "call_seq out of range", "NaN advantages", "wrong dtype"]
)
def test_bad_input_raises_like_reference(name):
    args = _bad(name)
    with pytest.raises((ValueError, TypeError)) as expected:
        _library.fused_correct_reference_kernel(*args, 0.7, 0.3, 0.8, False)
    with pytest.raises(expected.type) as got:
        run_triton(args, (0.7, 0.3, 0.8), False)
    assert str(got.value) == str(expected.value)
