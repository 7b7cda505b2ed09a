"""Contract tests of ``torch.ops.tapo.fused_correct`` (docs/math.md, section 2) for every backend.

Every test that takes ``fused_correct_impl`` runs on each backend of ``tests/conftest.py``
(the pure-torch reference, the native C++ kernel when built, the Triton kernel under the
interpreter). Shapes stay tiny because the Triton interpreter is about 1000x slower than
torch.

1. Hand-computed golden cases (exact values, the arithmetic in a comment).
2. Hypothesis property tests of every invariant (docs/math.md, section 2.7) on random batches.
3. Every backend against the reference on fresh random batches (fp16/bf16 parameters,
   prime B, T = 1, non-contiguous inputs, all-invalid calls, N = 0).
4. Bad input: every check of ``_checks.check_fused_correct`` names the argument.
5. ``opcheck``, ``torch.compile(fullgraph=True)``, import hygiene, the reference fallback
   in a fresh process, and the front door ``tapo_kernels.fused_correct`` with its stats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import tapo_kernels
from tapo_kernels import reference
from tapo_kernels.testing import CORRECT_ARG_NAMES as ARG_NAMES
from tapo_kernels.testing import (
    CorrectBatch,
    assert_close_to_oracle,
    assert_exact,
    assert_witnesses,
    correct_batch,
)

REPO_ROOT = Path(tapo_kernels.__file__).resolve().parent.parent
OUTPUT_NAMES = ("corrected", "delta", "confidence", "witness")
DEFAULT_KNOBS = dict(theta=0.7, alpha_min=0.3, beta=0.8, batch_scope=False)

# unit parameter vectors: <E0, E0> = 1, <E0, E1> = 0, <E0, -E0> = -1 (cosine clamps it to 0)
E0 = [1.0, 0.0, 0.0, 0.0]
E1 = [0.0, 1.0, 0.0, 0.0]
NEG_E0 = [-1.0, 0.0, 0.0, 0.0]
F32_0_8 = float(torch.tensor(0.8, dtype=torch.float32))  # beta = 0.8 as the kernels hold it


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def make_args(
    token_adv: Sequence[Sequence[float]],
    seq_adv: Sequence[float],
    groups: Sequence[int],
    calls: Sequence[tuple[int, int, int, int, int, Sequence[float]]],
    kinds: Sequence[int] = (0,),
    dim: int = 4,
) -> dict[str, Tensor]:
    """The ten tensor arguments of the op from lists; ``calls`` rows are
    ``(seq, start, end, tool, key, params)``."""

    def ints(i: int) -> Tensor:
        return torch.tensor([c[i] for c in calls], dtype=torch.int64).reshape(len(calls))

    params = torch.zeros(len(calls), dim)
    for row, call in enumerate(calls):
        params[row, : len(call[5])] = torch.tensor(call[5])
    return dict(
        advantages=torch.tensor(token_adv, dtype=torch.float32),
        seq_advantages=torch.tensor(seq_adv, dtype=torch.float32),
        group_ids=torch.tensor(groups, dtype=torch.int64),
        call_seq=ints(0),
        call_start=ints(1),
        call_end=ints(2),
        call_tool=ints(3),
        call_key=ints(4),
        call_params=params,
        tool_sim_kind=torch.tensor(kinds, dtype=torch.int64),
    )


def batch_args(batch: CorrectBatch) -> dict[str, Tensor]:
    return dict(zip(ARG_NAMES, batch.op_args(), strict=True))


def run(impl: Callable, args: dict[str, Tensor], **knobs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Call a backend and check what holds for every call: inputs untouched, a fresh
    ``corrected`` tensor, output shapes and dtypes, no NaN or inf."""
    k = {**DEFAULT_KNOBS, **knobs}
    before = {name: t.clone() for name, t in args.items()}
    # the ``coverage`` switch is passed only when a test sets it: its default is tested too
    extra = (k["coverage"],) if "coverage" in k else ()
    out = impl(
        *(args[n] for n in ARG_NAMES),
        k["theta"],
        k["alpha_min"],
        k["beta"],
        k["batch_scope"],
        *extra,
    )
    corrected, delta, confidence, witness = out
    for name, t in args.items():
        assert torch.equal(t, before[name]), f"the op modified its input {name}"
    B, T = args["advantages"].shape
    N = args["call_seq"].shape[0]
    assert corrected.shape == (B, T) and corrected.dtype == torch.float32
    assert delta.shape == (N,) and delta.dtype == torch.float32
    assert confidence.shape == (N,) and confidence.dtype == torch.float32
    assert witness.shape == (N,) and witness.dtype == torch.int64
    for name, t in (("corrected", corrected), ("delta", delta), ("confidence", confidence)):
        assert bool(torch.isfinite(t).all()), f"{name} has NaN or inf: {t}"
    if corrected.numel():
        assert corrected.data_ptr() != args["advantages"].data_ptr(), "corrected aliases advantages"
    return corrected, delta, confidence, witness


def f32(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def i64(values) -> Tensor:
    return torch.tensor(values, dtype=torch.int64)


def assert_outputs(out, corrected, delta, confidence, witness, *, atol: float = 0.0) -> None:
    """Compare the four outputs with hand-computed values (exact unless ``atol``)."""
    got_corrected, got_delta, got_confidence, got_witness = out
    for name, got, want in (
        ("corrected", got_corrected, corrected),
        ("delta", got_delta, delta),
        ("confidence", got_confidence, confidence),
    ):
        want = f32(want).reshape(got.shape)
        if atol == 0.0:
            assert_exact(got, want, name)
        else:
            assert_close_to_oracle(got, want, what=name, tol=(0.0, atol))
    assert_exact(got_witness, i64(witness).reshape(got_witness.shape), "witness")


# --------------------------------------------------------------------------------------
# 1. hand-computed golden cases
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0.7, 1.0])  # s = 1 passes theta = 1 (the gate is >=)
def test_identical_query_in_success_and_failure(fused_correct_impl, theta):
    # row 0 succeeds (A = 1), row 1 fails (A = -1, token 2 masked, token 3 has a small
    # per-token advantage -0.125); both issue the same query E0.
    args = make_args(
        token_adv=[[0.0, 1.0, 1.0, 1.0, 1.0, 0.0], [-1.0, -1.0, 0.0, -0.125, -1.0, -1.0]],
        seq_adv=[1.0, -1.0],
        groups=[0, 0],
        calls=[(0, 1, 3, 0, 0, E0), (1, 1, 4, 0, 0, E0)],
    )
    out = run(fused_correct_impl, args, theta=theta)
    # s = <E0, E0> = 1; pool = {row 0}, T_k = {row 0}: cov = 1/1; conf = 1 * 1 = 1;
    # Abar = 1; gate: 1 >= theta and 1 >= 0.3; d = beta * 1 * 1 * A_success = 0.8.
    # Span [1, 4) of row 1: -1 -> min(0, -1 + 0.8) = -0.2; masked 0 stays 0 (not negative);
    # -0.125 -> min(0, -0.125 + 0.8) = 0. Tokens 0, 4, 5 are outside the span: unchanged.
    lifted = -1.0 + F32_0_8  # exact in fp32: (2^24 - fp32(0.8) * 2^24) fits in 24 bits
    assert_outputs(
        out,
        corrected=[[0.0, 1.0, 1.0, 1.0, 1.0, 0.0], [-1.0, lifted, 0.0, 0.0, -1.0, -1.0]],
        delta=[0.0, F32_0_8],
        confidence=[0.0, 1.0],
        witness=[-1, 0],
    )


@pytest.mark.parametrize("coverage", [True, False])
@pytest.mark.parametrize("alpha_min", [0.3, 0.6, 0.0, 1.0])
def test_coverage_and_gate_ablations(fused_correct_impl, coverage, alpha_min):
    # Rows 0 and 1 succeed (A = 1 and 0.5), row 2 fails (A = -1). Row 0 calls E0, row 1
    # calls E1, row 2 calls E0: s = 1 (witness call 0), pool = 2 rows, T_k = {row 0}:
    # cov = 1/2, Abar = 1. With coverage: conf = 1 * 1/2 = 0.5; without: conf = s = 1.
    # Gate: s >= 0.7 and conf >= alpha_min (alpha_min = 0 is "no confidence gate"; the top
    # of its range, alpha_min = 1, passes only conf = 1).
    args = make_args(
        token_adv=[[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [-1.0, -1.0, -1.0]],
        seq_adv=[1.0, 0.5, -1.0],
        groups=[0, 0, 0],
        calls=[(0, 0, 2, 0, 0, E0), (1, 0, 2, 0, 0, E1), (2, 1, 3, 0, 0, E0)],
    )
    out = run(fused_correct_impl, args, alpha_min=alpha_min, coverage=coverage)
    conf = 0.5 if coverage else 1.0
    d = F32_0_8 * conf if conf >= alpha_min else 0.0  # beta * conf * Abar, Abar = 1
    lifted = float(torch.tensor(-1.0) + torch.tensor(d))  # min(0, -1 + d) in fp32
    assert_outputs(
        out,
        corrected=[[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [-1.0, lifted, lifted]],
        delta=[0.0, 0.0, d],
        confidence=[0.0, 0.0, conf],
        witness=[-1, -1, 0],
    )


@pytest.mark.parametrize("knob", ["theta", "alpha_min"])
def test_thresholds_compare_in_fp32(fused_correct_impl, knob):
    # The similarity is an fp32 number and the thresholds are compared in fp32 (as torch
    # compares an fp32 tensor with a Python float): s = fp32(x) passes a threshold x even
    # though fp32(0.7) = 0.69999999 < 0.7 and fp32(0.3) = 0.30000001 > 0.3 in float64.
    x = 0.7 if knob == "theta" else 0.3
    s = float(torch.tensor(x, dtype=torch.float32))
    args = make_args(
        [[1.0, 1.0], [-1.0, -1.0]],
        [1.0, -1.0],
        [0, 0],
        [(0, 0, 2, 0, 0, E0), (1, 0, 2, 0, 0, [s, 0.0, 0.0, 0.0])],
    )
    knobs = dict(theta=0.7, alpha_min=0.0) if knob == "theta" else dict(theta=0.25, alpha_min=0.3)
    out = run(fused_correct_impl, args, beta=0.5, **knobs)
    # s = <E0, (s, 0, 0, 0)> = s; pool = {row 0}: cov = 1, conf = s, Abar = 1, gate open;
    # d = 0.5 * s * 1 (exact: halving); span [0, 2): -1 -> fp32(-1 + s / 2).
    lifted = float(torch.tensor(-1.0) + torch.tensor(s / 2))
    assert_outputs(out, [[1.0, 1.0], [lifted, lifted]], [0.0, s / 2], [0.0, s], [-1, 0])


def test_lift_scales_with_beta_and_success_advantage(fused_correct_impl):
    # same pair with A_success = 0.5, beta = 0.5: d = 0.5 * 1 * 1 * 0.5 = 0.25;
    # span tokens -1 -> -0.75.
    args = make_args(
        token_adv=[[0.5, 0.5, 0.5], [-1.0, -1.0, -1.0]],
        seq_adv=[0.5, -1.0],
        groups=[3, 3],
        calls=[(0, 0, 3, 0, 0, E0), (1, 0, 2, 0, 0, E0)],
    )
    out = run(fused_correct_impl, args, beta=0.5)
    assert_outputs(
        out,
        corrected=[[0.5, 0.5, 0.5], [-0.75, -0.75, -1.0]],
        delta=[0.0, 0.25],
        confidence=[0.0, 1.0],
        witness=[-1, 0],
    )


@pytest.mark.parametrize("other_adv", [-0.5, 0.0], ids=["both-failing", "zero-advantage"])
def test_no_success_in_group_leaves_everything_unchanged(fused_correct_impl, other_adv):
    # the would-be witness row is failing (A < 0) or has A = 0: neither is a success, so
    # the pool is empty: cov = 0, conf = 0, d = 0, no witness; nothing changes.
    adv = [[other_adv] * 4, [-1.0] * 4]
    args = make_args(adv, [other_adv, -1.0], [0, 0], [(0, 0, 2, 0, 0, E0), (1, 1, 3, 0, 0, E0)])
    assert_outputs(run(fused_correct_impl, args), adv, [0.0, 0.0], [0.0, 0.0], [-1, -1])


@pytest.mark.parametrize("field", ["tool", "key"])
def test_different_tool_or_key_never_matches(fused_correct_impl, field):
    # identical parameters, but the success's call uses tool 1 (or key 7): not a candidate,
    # so s = 0, no witness, no lift.
    tool, key = (1, 0) if field == "tool" else (0, 7)
    adv = [[1.0, 1.0], [-1.0, -1.0]]
    args = make_args(
        adv, [1.0, -1.0], [0, 0], [(0, 0, 2, tool, key, E0), (1, 0, 2, 0, 0, E0)], kinds=(0, 0)
    )
    out = run(fused_correct_impl, args, theta=0.0, alpha_min=0.0)
    assert_outputs(out, adv, [0.0, 0.0], [0.0, 0.0], [-1, -1])


@pytest.mark.parametrize("theta", [0.3, 0.35])
def test_iou_boxes(fused_correct_impl, theta):
    # failing box a = (0, 0, 0.5, 0.5), successful box b = (0.25, 0, 0.75, 0.5):
    # inter = (0.5 - 0.25) * (0.5 - 0) = 0.125; area a = area b = 0.25;
    # union = 0.25 + 0.25 - 0.125 = 0.375; IoU = 0.125 / 0.375 = 1/3.
    adv = [[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]
    args = make_args(
        adv,
        [1.0, -1.0],
        [0, 0],
        [(0, 0, 3, 0, 0, [0.25, 0.0, 0.75, 0.5]), (1, 1, 3, 0, 0, [0.0, 0.0, 0.5, 0.5])],
        kinds=(1,),
    )
    out = run(fused_correct_impl, args, theta=theta, alpha_min=0.3, beta=1.0)
    third = float(torch.tensor(1.0) / torch.tensor(3.0))  # fp32(1/3)
    if theta == 0.3:
        # s = 1/3 >= 0.3: T_k = {row 0}, cov = 1, conf = 1/3 >= 0.3, Abar = 1,
        # d = 1 * 1/3 * 1 = 1/3; span [1, 3): -1 -> -2/3.
        # atol: a kernel may round the IoU division or the add differently by one ulp.
        assert_outputs(
            out,
            [[1.0, 1.0, 1.0], [-1.0, -1.0 + third, -1.0 + third]],
            [0.0, third],
            [0.0, third],
            [-1, 0],
            atol=1e-6,
        )
    else:
        # s = 1/3 < 0.35: no supporting trajectory, cov = 0, conf = 0, no lift; the best
        # candidate is still reported as the witness.
        assert_outputs(out, adv, [0.0, 0.0], [0.0, 0.0], [-1, 0])


def test_tie_between_candidates_picks_the_lower_call_index(fused_correct_impl):
    # the failing call is call 0 (row 2); two identical candidates: call 1 in row 1 and
    # call 2 in row 0. The witness is the lower call index (1), not the lower row (0).
    # pool = {0, 1}, both support with s = 1: cov = 2/2 = 1, conf = 1, Abar = 0.5,
    # d = 0.5 * 1 * 0.5 = 0.25; row 2 span [0, 2): -1 -> -0.75.
    adv = [[0.5] * 4, [0.5] * 4, [-1.0] * 4]
    args = make_args(
        adv,
        [0.5, 0.5, -1.0],
        [0, 0, 0],
        [(2, 0, 2, 0, 0, E0), (1, 1, 3, 0, 0, E0), (0, 0, 4, 0, 0, E0)],
    )
    out = run(fused_correct_impl, args, beta=0.5)
    corrected = [[0.5] * 4, [0.5] * 4, [-0.75, -0.75, -1.0, -1.0]]
    assert_outputs(out, corrected, [0.25, 0.0, 0.0], [1.0, 0.0, 0.0], [1, -1, -1])


def test_two_supporting_trajectories_coverage_and_mean_advantage(fused_correct_impl):
    # pool = rows 0-3 (all succeed), row 4 fails with query E0.
    # row 0: E0 (sim 1); row 1: E0 twice (sim 1, counted once: coverage counts
    # trajectories); row 2: -E0 (cosine clamps -1 to 0); row 3: E1 (sim 0).
    # T_k = {0, 1}: cov = 2/|pool| = 2/4 = 0.5; s = 1; conf = 0.5 >= 0.3;
    # Abar = (0.5 + 1.0) / 2 = 0.75; beta = 1: d = 1 * 0.5 * 0.75 = 0.375;
    # witness: calls 0, 1 and 5 tie at s = 1 -> lowest index 0. Row 4 span [1, 3): -0.625.
    seq_adv = [0.5, 1.0, 0.25, 2.0, -1.0]
    adv = [[a] * 4 for a in seq_adv]
    calls = [
        (0, 0, 2, 0, 0, E0),
        (1, 0, 1, 0, 0, E0),
        (2, 0, 2, 0, 0, NEG_E0),
        (3, 0, 2, 0, 0, E1),
        (4, 1, 3, 0, 0, E0),
        (1, 2, 4, 0, 0, E0),
    ]
    out = run(fused_correct_impl, make_args(adv, seq_adv, [0] * 5, calls), beta=1.0)
    corrected = [row[:] for row in adv]
    corrected[4] = [-1.0, -0.625, -0.625, -1.0]
    assert_outputs(
        out, corrected, [0, 0, 0, 0, 0.375, 0], [0, 0, 0, 0, 0.5, 0], [-1, -1, -1, -1, 0, -1]
    )


@pytest.mark.parametrize("alpha_min", [0.3, 0.25])
def test_partial_coverage_gate_on_alpha_min(fused_correct_impl, alpha_min):
    # pool = rows 0-3 (A = 1), only row 0 repeats the query: cov = 1/4, s = 1,
    # conf = 0.25. alpha_min = 0.3: 0.25 < 0.3, gate closed, d = 0 (confidence and witness
    # still reported). alpha_min = 0.25: gate open (>=), d = 1 * 0.25 * 1 = 0.25: -1 -> -0.75.
    seq_adv = [1.0, 1.0, 1.0, 1.0, -1.0]
    adv = [[a] * 3 for a in seq_adv]
    calls = [(0, 0, 3, 0, 0, E0), (1, 0, 3, 0, 0, E1), (4, 0, 3, 0, 0, E0)]
    out = run(
        fused_correct_impl, make_args(adv, seq_adv, [0] * 5, calls), alpha_min=alpha_min, beta=1.0
    )
    lift = 0.25 if alpha_min == 0.25 else 0.0
    corrected = [row[:] for row in adv]
    corrected[4] = [-1.0 + lift] * 3
    assert_outputs(out, corrected, [0.0, 0.0, lift], [0.0, 0.0, 0.25], [-1, -1, 0])


TWO_SUPPORTERS_GOLDEN = [
    # theta, alpha_min, expected lift d, expected confidence
    (0.5, 0.3, 0.8, 1.0),
    (0.6, 0.3, 0.8, 1.0),  # sim 0.6 == theta: row 2 still supports (m_kj >= theta)
    (0.7, 0.3, 0.2, 0.5),
    (1.0, 0.5, 0.2, 0.5),  # s == theta and conf == alpha_min: the gate is open
    (1.0, 0.51, 0.0, 0.5),  # conf < alpha_min: gate closed, confidence still reported
]


@pytest.mark.parametrize("theta, alpha_min, lift, conf", TWO_SUPPORTERS_GOLDEN)
def test_two_supporters_of_different_similarity(fused_correct_impl, theta, alpha_min, lift, conf):
    """Row 0 fails (A = -1); rows 1 and 2 succeed (A = 0.5, 1.5); one prompt group.

    Cosine calls: p0 = e1 (row 0), p1 = e1 (row 1), p2 = (0.6, 0.8) (row 2): sim 1 and 0.6.
    theta <= 0.6: s = 1, w = 1, both rows support: cov = 2/2 = 1, Abar = (0.5 + 1.5)/2 = 1,
      conf = 1, d = 0.8 * 1 * 1 = 0.8, and A' = min(0, -1 + 0.8) = -0.2 on the span.
    0.6 < theta <= 1: only row 1 supports: cov = 1/2, Abar = 0.5, conf = 1 * 0.5 = 0.5,
      d = 0.8 * 0.5 * 0.5 = 0.2 when conf >= alpha_min, A' = -1 + 0.2 = -0.8.
    """
    adv = [[-1.0, -1.0, -1.0, 0.0], [0.5] * 4, [1.5] * 4]
    calls = [(0, 1, 3, 0, 0, [1.0, 0.0]), (1, 0, 2, 0, 0, [1.0, 0.0]), (2, 0, 2, 0, 0, [0.6, 0.8])]
    args = make_args(adv, [-1.0, 0.5, 1.5], [0, 0, 0], calls, dim=2)
    out = run(fused_correct_impl, args, theta=theta, alpha_min=alpha_min, beta=0.8)
    corrected = [row[:] for row in adv]
    corrected[0][1:3] = [-1.0 + lift] * 2
    assert_outputs(out, corrected, [lift, 0.0, 0.0], [conf, 0.0, 0.0], [1, -1, -1], atol=1e-6)


def test_beta_zero_changes_nothing(fused_correct_impl):
    # the identical-query pair with beta = 0: d = 0 * conf * Abar = 0, A' == A; the
    # confidence (1) and the witness (call 0) do not depend on beta.
    adv = [[1.0, 1.0], [-1.0, -1.0]]
    args = make_args(adv, [1.0, -1.0], [0, 0], [(0, 0, 2, 0, 0, E0), (1, 0, 2, 0, 0, E0)])
    out = run(fused_correct_impl, args, beta=0.0)
    assert_outputs(out, adv, [0.0, 0.0], [0.0, 1.0], [-1, 0])


def test_no_calls_returns_a_copy(fused_correct_impl):
    adv = [[1.0, 0.5, 0.0], [-1.0, -2.0, 0.0]]
    args = make_args(adv, [1.0, -1.0], [0, 0], [])
    out = run(fused_correct_impl, args)
    assert_outputs(out, adv, [], [], [])
    out[0][0, 0] = 42.0  # a copy: writing to it leaves the input alone
    assert args["advantages"][0, 0] == 1.0


@pytest.mark.parametrize("batch_scope", [False, True])
def test_batch_scope_widens_the_pool(fused_correct_impl, batch_scope):
    # group 10: row 0 fails (query E0), row 1 succeeds (A = 1, no calls);
    # group 11: row 2 succeeds (A = 0.5, query E0), rows 3, 4 succeed without calls.
    # Group scope: pool(row 0) = {1}, which has no candidate: s = 0, nothing changes.
    # Batch scope: pool = {1, 2, 3, 4}, T_k = {2}: cov = 1/4, s = 1, conf = 0.25 >= 0.25,
    # Abar = 0.5, d = 1 * 0.25 * 0.5 = 0.125; row 0 span [0, 2): -1 -> -0.875; witness 1.
    seq_adv = [-1.0, 1.0, 0.5, 0.25, 0.75]
    adv = [[a] * 3 for a in seq_adv]
    calls = [(0, 0, 2, 0, 0, E0), (2, 1, 3, 0, 0, E0)]
    args = make_args(adv, seq_adv, [10, 10, 11, 11, 11], calls)
    out = run(fused_correct_impl, args, alpha_min=0.25, beta=1.0, batch_scope=batch_scope)
    if batch_scope:
        corrected = [row[:] for row in adv]
        corrected[0] = [-0.875, -0.875, -1.0]
        assert_outputs(out, corrected, [0.125, 0.0], [0.25, 0.0], [1, -1])
    else:
        assert_outputs(out, adv, [0.0, 0.0], [0.0, 0.0], [-1, -1])


def test_invalid_calls_are_never_witnesses_nor_corrected(fused_correct_impl):
    # row 0 succeeds with an invalid call 0 (tool -1) and a valid call 1, both E0;
    # row 1 fails with an invalid call 2 and a valid call 3, both E0.
    # Call 2 (invalid): d = 0, conf = 0, witness -1, its span [0, 2) unchanged.
    # Call 3: the only candidate is call 1 (call 0 is invalid): pool = {0}, cov = 1,
    # conf = 1, Abar = 1, beta = 0.5: d = 0.5; span [2, 4): -1 -> -0.5.
    adv = [[1.0] * 4, [-1.0] * 4]
    calls = [(0, 0, 2, -1, 0, E0), (0, 2, 4, 0, 0, E0), (1, 0, 2, -1, 0, E0), (1, 2, 4, 0, 0, E0)]
    out = run(fused_correct_impl, make_args(adv, [1.0, -1.0], [0, 0], calls), beta=0.5)
    corrected = [[1.0] * 4, [-1.0, -1.0, -0.5, -0.5]]
    assert_outputs(out, corrected, [0, 0, 0, 0.5], [0, 0, 0, 1.0], [-1, -1, -1, 1])


def test_invalid_success_call_alone_gives_no_witness(fused_correct_impl):
    # the success's only call is invalid: the failing call has no candidate at all.
    adv = [[1.0, 1.0], [-1.0, -1.0]]
    args = make_args(adv, [1.0, -1.0], [0, 0], [(0, 0, 2, -1, 0, E0), (1, 0, 2, 0, 0, E0)])
    assert_outputs(run(fused_correct_impl, args), adv, [0, 0], [0, 0], [-1, -1])


def test_zero_advantage_rows_are_neither_corrected_nor_in_the_pool(fused_correct_impl):
    # row 0 has A = 0 (and zero tokens), row 1 succeeds (A = 1), row 2 fails; all query E0.
    # Row 0 is neither failing nor successful: unchanged, its call gets d = conf = 0, -1.
    # Pool(row 2) = {1} only (a zero row does not count): cov = 1/1 (not 1/2), conf = 1,
    # Abar = 1, beta = 0.5: d = 0.5; witness is call 1 (call 0 is not a success).
    adv = [[0.0] * 3, [1.0] * 3, [-1.0] * 3]
    calls = [(0, 0, 3, 0, 0, E0), (1, 0, 3, 0, 0, E0), (2, 0, 3, 0, 0, E0)]
    out = run(fused_correct_impl, make_args(adv, [0.0, 1.0, -1.0], [0, 0, 0], calls), beta=0.5)
    corrected = [[0.0] * 3, [1.0] * 3, [-0.5] * 3]
    assert_outputs(out, corrected, [0, 0, 0.5], [0, 0, 1.0], [-1, -1, 1])


# --------------------------------------------------------------------------------------
# 2. property tests (hypothesis)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class RandomCase:
    batch: CorrectBatch
    knobs: dict
    num_tools: int
    perturb: str  # which field of a witness the metamorphic check changes: "tool" or "key"


# dyadic advantages keep sums exact; the float draw covers everything else. (Hypothesis
# favours the first entries of sampled_from, so the lists below start with useful values.)
ADVANTAGES = st.one_of(
    st.sampled_from([-1.0, 0.5, -0.5, 1.0, 0.0, -2.0, 0.25, 1.5, -0.25]),
    st.floats(0.125, 3.0, width=32),
    st.floats(-3.0, -0.125, width=32),
)


@st.composite
def random_cases(draw) -> RandomCase:
    """Small random batches drawn element by element (so that Hypothesis can shrink them).

    A few queries shared by all calls, few tools and keys, and prompt groups of 1-4 make
    repeated queries (real matches) and exact ties common; rows get a masked prefix and
    suffix, 0-3 non-overlapping (possibly empty) spans each, and some invalid calls.
    """
    B = draw(st.sampled_from([5, 8, 3, 7, 2, 1]))
    T = draw(st.integers(1, 10))
    num_tools = draw(st.integers(1, 3))
    num_keys = draw(st.integers(1, 2))
    quantized = draw(st.booleans())
    group_size = draw(st.sampled_from([3, 4, 2, 3, 4, 2, 1]))  # singletons: rarely
    group_ids = torch.arange(B, dtype=torch.int64) // group_size + 100
    seq_adv = torch.tensor(draw(st.lists(ADVANTAGES, min_size=B, max_size=B)))
    mask = torch.zeros(B, T)
    for i in range(B):  # a masked prefix (prompt) and suffix (padding)
        prompt_len = draw(st.integers(0, T // 3))
        mask[i, prompt_len : T - draw(st.integers(0, T // 3))] = 1.0

    # the queries: cosine vectors (eighths when quantized) and boxes (sixteenths)
    num_queries = draw(st.integers(1, 3))
    D = draw(st.sampled_from([4, 5, 8]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if quantized:
        vectors = torch.randint(-2, 9, (num_queries, D), generator=gen).float() / 8
        lo = torch.randint(0, 8, (num_queries, 2), generator=gen).float() / 16
        boxes = torch.cat([lo, lo + torch.randint(0, 9, (num_queries, 2), generator=gen) / 16], 1)
    else:
        vectors = torch.nn.functional.normalize(torch.randn(num_queries, D, generator=gen), dim=1)
        lo = torch.rand(num_queries, 2, generator=gen) * 0.5
        boxes = torch.cat([lo, lo + torch.rand(num_queries, 2, generator=gen) * 0.5], 1)
    kinds = draw(st.lists(st.integers(0, 1), min_size=num_tools, max_size=num_tools))

    seq, start, end, tool, key, params = [], [], [], [], [], []
    for i in range(B):
        pos = 0  # spans follow each other: gap, then length (clipped to the row)
        for _ in range(draw(st.sampled_from([2, 1, 3, 0]))):
            s0 = min(pos + draw(st.sampled_from([0, 1, 2])), T)
            pos = min(s0 + draw(st.sampled_from([2, 1, 3, 0])), T)
            t = draw(st.sampled_from(list(range(num_tools)) * 3 + [-1]))  # -1: invalid call
            q = draw(st.integers(0, num_queries - 1))
            p = torch.zeros(D)
            if t >= 0 and kinds[t] == 1:
                p[:4] = boxes[q]
            else:
                p = vectors[q].clone()
            seq.append(i)
            start.append(s0)
            end.append(pos)
            tool.append(t)
            key.append(draw(st.integers(0, num_keys - 1)))
            params.append(p)
    # often a failing call repeats a successful sibling's call: the case TAPO exists for
    # (about a third of the examples then lift at least one call)
    likely = st.sampled_from([True, True, False])
    if draw(likely):
        for k, row in enumerate(seq):
            sources = [
                c
                for c, j in enumerate(seq)
                if seq_adv[j] > 0 and tool[c] >= 0 and group_ids[j] == group_ids[row]
            ]
            if seq_adv[row] < 0 and sources and draw(likely):
                c = draw(st.sampled_from(sources))
                tool[k], key[k], params[k] = tool[c], key[c], params[c]
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    batch = CorrectBatch(
        advantages=seq_adv[:, None] * mask,
        seq_advantages=seq_adv,
        group_ids=group_ids,
        call_seq=i64(seq).reshape(-1),
        call_start=i64(start).reshape(-1),
        call_end=i64(end).reshape(-1),
        call_tool=i64(tool).reshape(-1),
        call_key=i64(key).reshape(-1),
        call_params=(torch.stack(params) if params else torch.zeros(0, D)).to(dtype),
        tool_sim_kind=i64(kinds),
        mask=mask,
    )
    knobs = dict(
        theta=draw(st.sampled_from([0.7, 0.5, 0.0, 1.0])),
        alpha_min=draw(st.sampled_from([0.25, 0.0, 0.5])),
        beta=draw(st.sampled_from([0.8, 0.5, 2.0, 0.0])),
        batch_scope=draw(st.booleans()),
    )
    return RandomCase(batch, knobs, num_tools, draw(st.sampled_from(["tool", "key"])))


def check_invariants(case: RandomCase, out) -> None:
    """Every invariant of docs/math.md, section 2 that holds without recomputing similarities."""
    b, k = case.batch, case.knobs
    corrected, delta, confidence, witness = out
    adv, seq_adv = b.advantages, b.seq_advantages
    N = b.call_seq.numel()
    changed = corrected != adv

    assert bool((corrected >= adv).all()), "A' >= A"
    assert bool((corrected[changed] <= 0).all()), "A' <= 0 wherever A' != A"
    assert bool((adv[changed] < 0).all()), "only negative tokens change"
    assert not bool(changed[seq_adv >= 0].any()), "successful and zero-advantage rows unchanged"
    call_map = reference.build_call_map(b.call_seq, b.call_start, b.call_end, *adv.shape)
    assert not bool(changed[call_map < 0].any()), "tokens outside call spans unchanged"
    assert bool((corrected[b.mask == 0] == 0).all()), "masked tokens stay 0"
    if k["beta"] == 0.0:
        assert torch.equal(corrected, adv), "beta = 0 gives A' == A"
        assert bool((delta == 0).all())
    if not bool((seq_adv > 0).any()):
        assert torch.equal(corrected, adv), "no successful trajectory gives A' == A"
    # corrected is exactly the lift of delta on the negative tokens of each span
    covered = call_map >= 0
    lift = torch.where(covered, delta[call_map.long().clamp(min=0)], 0.0) if N else 0.0
    lifted = torch.minimum(adv + lift, torch.zeros_like(adv))
    assert torch.equal(corrected, torch.where(covered & (adv < 0), lifted, adv))

    if N == 0:
        return
    valid = b.call_tool >= 0
    failing = valid & (seq_adv[b.call_seq] < 0)
    assert bool((delta >= 0).all()), "delta >= 0"
    assert bool((confidence >= 0).all()), "confidence >= 0"
    assert bool((delta[~failing] == 0).all()) and bool((confidence[~failing] == 0).all())
    assert bool((witness[~failing] == -1).all()), "only failing valid calls have witnesses"
    gated = delta > 0
    assert bool((confidence[gated] >= k["alpha_min"] - 1e-6).all()), "lift only past alpha_min"
    assert bool((witness[gated] >= 0).all()), "a lifted call has a witness"
    # the lift is at most beta * conf * (largest success advantage in the batch)
    a_max = float(seq_adv.clamp(min=0).max())
    bound = k["beta"] * confidence * a_max
    assert bool((delta <= bound * (1 + 1e-5) + 1e-6).all()), "d <= beta * conf * max A_j"

    success = seq_adv > 0
    scope = torch.zeros_like(b.group_ids) if k["batch_scope"] else b.group_ids
    same_scope = scope[b.call_seq][:, None] == scope[b.call_seq][None, :]  # [N, N]
    candidate = (  # c is a candidate of k: valid call of a success, same tool, key, scope
        failing[:, None]
        & valid[None, :]
        & success[b.call_seq][None, :]
        & same_scope
        & (b.call_tool[:, None] == b.call_tool[None, :])
        & (b.call_key[:, None] == b.call_key[None, :])
    )
    assert torch.equal(witness >= 0, candidate.any(1)), "witness exists iff a candidate does"
    has = witness >= 0
    if bool(has.any()):
        ks = has.nonzero().squeeze(1)
        assert bool(candidate[ks, witness[ks]].all()), "the witness is a candidate"
    # an empty pool means no lift, no confidence
    pool = (success[None, :] & (scope[:, None] == scope[None, :])).sum(1)  # [B]
    no_pool = failing & (pool[b.call_seq] == 0)
    assert bool((delta[no_pool] == 0).all()) and bool((confidence[no_pool] == 0).all())


def perturb_witness(case: RandomCase, witness: Tensor) -> tuple[RandomCase, int, Tensor] | None:
    """Give one witness call another tool id or a fresh key; None if nothing to change."""
    ws = witness[witness >= 0]
    if ws.numel() == 0 or (case.perturb == "tool" and case.num_tools < 2):
        return None
    w = int(ws[0])
    b = case.batch
    tool, key = b.call_tool.clone(), b.call_key.clone()
    if case.perturb == "tool":
        tool[w] = (tool[w] + 1) % case.num_tools
    else:
        key[w] = int(key.max()) + 1  # a key no other call has
    batch = dataclasses.replace(b, call_tool=tool, call_key=key)
    return dataclasses.replace(case, batch=batch), w, witness == w


def test_invariants_on_random_batches(fused_correct_impl):
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=random_cases())
    def check(case: RandomCase) -> None:
        args = batch_args(case.batch)
        out = run(fused_correct_impl, args, **case.knobs)
        check_invariants(case, out)
        assert_matches_reference(out, args, case.knobs)
        # changing a witness's tool id or key removes the match
        changed = perturb_witness(case, out[3])
        if changed is not None:
            new_case, w, was_witnessed = changed
            new_out = run(fused_correct_impl, batch_args(new_case.batch), **new_case.knobs)
            check_invariants(new_case, new_out)
            assert not bool((new_out[3][was_witnessed] == w).any()), "the old match survived"
            if new_case.perturb == "key":
                assert not bool((new_out[3] == w).any()), "a call with a fresh key matched"

    check()


# --------------------------------------------------------------------------------------
# 3. every backend equals the reference
# --------------------------------------------------------------------------------------


def reference_outputs(args: dict[str, Tensor], knobs: dict, dtype: torch.dtype):
    """The reference in ``dtype`` (float64 for the oracle, float32 for the kernels' dtype)."""
    cast = {
        **args,
        "advantages": args["advantages"].to(dtype),
        "seq_advantages": args["seq_advantages"].to(dtype),
    }
    return reference.fused_correct(
        *(cast[n] for n in ARG_NAMES),
        knobs["theta"],
        knobs["alpha_min"],
        knobs["beta"],
        knobs["batch_scope"],
        knobs.get("coverage", True),
    )


def assert_matches_reference(out, args: dict[str, Tensor], knobs: dict) -> None:
    """Floating outputs by the tolerance rule against the fp64 reference, element by element
    (no output is a reduction: each must be as good as the fp32 reference's same entry);
    witnesses equal, up to ties the reference broke by rounding."""
    ref64 = reference_outputs(args, knobs, torch.float64)
    ref32 = reference_outputs(args, knobs, torch.float32)
    for i, name in enumerate(OUTPUT_NAMES[:3]):
        assert_close_to_oracle(out[i], ref64[i], ref32[i], what=name, per_element=True)
    assert_witnesses(out[3], ref32[3], args, knobs)


def assert_equals_reference(out, args: dict[str, Tensor], knobs: dict):
    """All four outputs equal the fp32 reference bit for bit; returns the reference."""
    ref32 = reference_outputs(args, knobs, torch.float32)
    for name, got, want in zip(OUTPUT_NAMES, out, ref32, strict=True):
        assert_exact(got, want, name)
    return ref32


def make_noncontiguous(args: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same values in strided views (every other column / element of a wider tensor)."""
    out = {}
    for name, t in args.items():
        if t.dim() == 2:
            wide = torch.full((t.shape[0], 2 * t.shape[1]), float("nan"), dtype=t.dtype)
            wide[:, ::2] = t
            out[name] = wide[:, ::2]
        else:
            wide = torch.zeros(2 * t.shape[0], dtype=t.dtype)
            wide[::2] = t
            out[name] = wide[::2]
        assert torch.equal(out[name], t) and (t.numel() < 2 or not out[name].is_contiguous())
    return out


Q3 = dict(num_keys=1, num_queries=3)  # one key, three queries: many matches and exact ties
REFERENCE_CASES = {  # id -> (correct_batch arguments, op knobs); seeds chosen to lift calls
    "prime-B-quantized": (dict(seed=37, B=13, T=29), DEFAULT_KNOBS),
    "fp16-batch-scope": (
        dict(seed=2, B=7, T=17, param_dtype=torch.float16, **Q3),
        {**DEFAULT_KNOBS, "batch_scope": True},
    ),
    "bf16-quantized": (
        dict(seed=2, B=5, T=11, param_dtype=torch.bfloat16, **Q3),
        {**DEFAULT_KNOBS, "theta": 0.5, "alpha_min": 0.25},
    ),
    "bf16-noisy": (
        dict(
            seed=4,
            B=5,
            T=33,
            param_dtype=torch.bfloat16,
            quantized=False,
            num_keys=1,
            num_queries=2,
            num_tools=2,
        ),
        {**DEFAULT_KNOBS, "theta": 0.5, "alpha_min": 0.0},
    ),
    "T1": (dict(seed=4, B=11, T=1, group_size=3, **Q3), DEFAULT_KNOBS),
    "all-invalid": (dict(seed=15, B=6, T=12, invalid_prob=1.0), DEFAULT_KNOBS),
    "all-invalid-batch-scope": (
        dict(seed=11, B=13, T=17, D=4, invalid_prob=1.0),
        dict(theta=0.1, alpha_min=0.0, beta=0.8, batch_scope=True),
    ),
    "no-calls": (dict(seed=16, B=4, T=8, calls_per_row=0), DEFAULT_KNOBS),
    "noisy-theta0": (
        dict(seed=15, B=3, T=9, D=7, quantized=False, **Q3),
        dict(theta=0.0, alpha_min=0.0, beta=2.0, batch_scope=True),
    ),
    "noncontiguous": (dict(seed=31, B=7, T=10, **Q3), DEFAULT_KNOBS),
    # the ablation without the support factor (confidence = s)
    "no-coverage": (dict(seed=37, B=13, T=29), {**DEFAULT_KNOBS, "coverage": False}),
    "no-coverage-bf16-batch-scope": (
        dict(seed=2, B=7, T=17, param_dtype=torch.bfloat16, **Q3),
        {**DEFAULT_KNOBS, "batch_scope": True, "coverage": False, "alpha_min": 0.9},
    ),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_backend_matches_reference(fused_correct_impl, case):
    gen_knobs, knobs = REFERENCE_CASES[case]
    batch = correct_batch(**gen_knobs)
    args = batch_args(batch)
    if case == "prime-B-quantized":  # the generator's hard cases are really in this batch
        rows_with_calls = set(batch.call_seq.tolist())
        assert bool((batch.call_start == 0).any()) and bool((batch.call_end == 29).any())
        assert len(rows_with_calls) < 13 and bool((batch.call_tool < 0).any())
        assert bool((batch.mask[6] == 0).all())  # the all-padding row
    if case == "noncontiguous":
        args = make_noncontiguous(args)
    out = run(fused_correct_impl, args, **knobs)
    ref32 = reference_outputs(args, knobs, torch.float32)
    # the case must exercise real lifts (or be one of the cases built to have none)
    if case.startswith("all-invalid"):  # no valid call: nothing changes, no witness
        assert_exact(out[0], args["advantages"], "corrected")
        assert bool((out[3] == -1).all())
    elif case != "no-calls":
        assert bool((ref32[1] > 0).any()), "the batch has no lifted call"
        assert bool((ref32[0] != args["advantages"]).any()), "the batch has no lifted token"
    assert_matches_reference(out, args, knobs)
    if gen_knobs.get("quantized", True):
        # quantized batches: similarities and sums of advantages are exact in any order, so
        # every backend agrees with the fp32 reference bit for bit (gates and ties included)
        assert_equals_reference(out, args, knobs)


# (theta, alpha_min, beta): defaults, permissive gates (many corrections), strict gates, and
# dyadic gates that quantized similarities (multiples of 1/64) and confidences hit exactly
GRID_KNOBS = (
    (0.7, 0.3, 0.8),
    (0.2, 0.05, 1.0),
    (0.5, 0.25, 0.8),
    (0.4, 0.15, 0.5),
    (0.95, 0.6, 0.8),
    (0.25, 0.125, 1.0),
)


def grid_batch(seed: int, quantized: bool) -> dict[str, Tensor]:
    """Sizes and dtypes spread over the seeds: prime B, D off the 16-lane width, fp16/bf16."""
    return batch_args(
        correct_batch(
            B=(13, 31, 7, 29)[seed % 4],
            T=(97, 1, 33, 64)[seed % 4],
            group_size=(4, 3, 8, 1)[seed % 4],
            D=(16, 37, 4, 40)[seed % 4],
            calls_per_row=(3, 5, 2, 4)[seed % 4],
            num_tools=(3, 2, 1, 3)[seed % 4],
            num_keys=(2, 1, 3, 2)[seed % 4],
            num_queries=(6, 4, 3, 8)[seed % 4],
            param_dtype=(torch.float32, torch.float16, torch.bfloat16)[seed % 3],
            quantized=quantized,
            seed=seed,
        )
    )


def grid_knobs(seed: int, batch_scope: bool) -> dict:
    theta, alpha_min, beta = GRID_KNOBS[seed % len(GRID_KNOBS)]
    return dict(theta=theta, alpha_min=alpha_min, beta=beta, batch_scope=batch_scope)


@pytest.mark.parametrize("batch_scope", [False, True])
@pytest.mark.parametrize("seed", range(24))
def test_quantized_grid_equals_reference_exactly(fused_correct_impl, seed, batch_scope):
    args = grid_batch(seed, quantized=True)
    knobs = grid_knobs(seed, batch_scope)
    assert_equals_reference(run(fused_correct_impl, args, **knobs), args, knobs)


@pytest.mark.parametrize("batch_scope", [False, True])
@pytest.mark.parametrize("seed", range(100, 124))
def test_float_grid_matches_reference_by_rule(fused_correct_impl, seed, batch_scope):
    args = grid_batch(seed, quantized=False)
    knobs = grid_knobs(seed, batch_scope)
    assert_matches_reference(run(fused_correct_impl, args, **knobs), args, knobs)


# (theta, alpha_min, beta): the defaults, a permissive setting that corrects many calls,
# and thresholds on exact eighths so that similarities land exactly on them
SHAPE_KNOBS = [(0.7, 0.3, 0.8), (0.1, 0.0, 0.8), (0.5, 0.25, 1.0)]
# B x T x D x param dtype x generator knobs; prime B, T = 1, a single row, large pools
SHAPES = [
    dict(B=1, T=17, D=4),
    dict(B=5, T=1, D=16),
    dict(B=5, T=97, D=4, param_dtype=torch.float16),
    dict(B=13, T=17, D=16),
    dict(B=13, T=97, D=16, param_dtype=torch.bfloat16),
    dict(B=13, T=97, D=4, group_size=13, calls_per_row=6, num_keys=1),
    dict(B=13, T=17, D=16, num_tools=1, num_queries=3),
    dict(B=31, T=97, D=16, group_size=8, param_dtype=torch.float16),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("batch_scope", [False, True])
def test_quantized_shapes_equal_reference_exactly(fused_correct_impl, shape, batch_scope):
    corrected_calls = 0
    for seed in range(2):
        args = batch_args(correct_batch(**shape, quantized=True, seed=seed))
        for theta, alpha_min, beta in SHAPE_KNOBS:
            knobs = dict(theta=theta, alpha_min=alpha_min, beta=beta, batch_scope=batch_scope)
            out = run(fused_correct_impl, args, **knobs)
            assert_equals_reference(out, args, knobs)
            corrected_calls += int((out[1] > 0).sum())
    if shape["B"] >= 13:  # enough rows for successes and failures in one group
        assert corrected_calls > 0, "no call was corrected: the case tests nothing"


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_scope", [False, True])
def test_float_shapes_match_reference_by_rule(fused_correct_impl, param_dtype, batch_scope):
    corrected_calls = 0
    for seed, (B, T, D) in enumerate([(13, 97, 16), (5, 17, 4), (31, 17, 16)]):
        args = batch_args(
            correct_batch(B=B, T=T, D=D, quantized=False, param_dtype=param_dtype, seed=100 + seed)
        )
        for theta, alpha_min, beta in SHAPE_KNOBS[:2]:
            knobs = dict(theta=theta, alpha_min=alpha_min, beta=beta, batch_scope=batch_scope)
            out = run(fused_correct_impl, args, **knobs)
            assert_matches_reference(out, args, knobs)
            corrected_calls += int((out[1] > 0).sum())
    assert corrected_calls > 0


def test_permissive_gates_correct_many_calls(fused_correct_impl):
    """The comparisons above include real corrections, not only zero deltas."""
    corrected_calls = 0
    knobs = dict(theta=0.2, alpha_min=0.05, beta=1.0, batch_scope=False)
    for seed in range(8):
        batch = correct_batch(seed=seed, B=16, group_size=8, calls_per_row=6)
        args = batch_args(batch)
        out = run(fused_correct_impl, args, **knobs)
        assert_equals_reference(out, args, knobs)
        corrected_calls += int((out[1] > 0).sum())
        assert bool((out[0] >= batch.advantages).all())  # A' >= A
    assert corrected_calls >= 10


def test_without_pool_nothing_is_corrected(fused_correct_impl):
    """No successful row: nothing is corrected (docs/math.md, section 2.7), every witness is -1.

    Expected values by hand: with no candidate, s_k = 0, so conf_k = 0 and d_k = 0.
    """
    batch = correct_batch(B=9, T=30, seed=2)
    batch.seq_advantages = -batch.seq_advantages.abs() - 0.5  # every row fails
    batch.advantages = batch.seq_advantages[:, None] * batch.mask
    corrected, delta, confidence, witness = run(
        fused_correct_impl,
        batch_args(batch),
        theta=0.1,
        alpha_min=0.0,
        beta=1.0,
        batch_scope=True,
    )
    assert_exact(corrected, batch.advantages, "corrected")
    assert not delta.any() and not confidence.any()
    assert bool((witness == -1).all())


@pytest.mark.parametrize(
    "seed, shape", [(11, dict(B=13, T=40, calls_per_row=5)), (5, dict(B=13, T=97, D=16))]
)
def test_strided_inputs_equal_contiguous_inputs(fused_correct_impl, seed, shape):
    """Column-major advantages, every other element of seq_advantages and of the parameter
    rows: the same bits as the contiguous inputs (and the reference), contiguous outputs."""
    args = batch_args(correct_batch(seed=seed, **shape))
    B, T = args["advantages"].shape
    N, D = args["call_params"].shape
    adv_t = torch.full((T, B), float("nan"))
    adv_t.copy_(args["advantages"].t())
    wide_seq_adv = torch.full((2 * B,), float("nan"))
    wide_seq_adv[::2] = args["seq_advantages"]
    wide_params = torch.full((N, 2 * D), float("nan"), dtype=args["call_params"].dtype)
    wide_params[:, ::2] = args["call_params"]
    strided = {
        **args,
        "advantages": adv_t.t(),
        "seq_advantages": wide_seq_adv[::2],
        "call_params": wide_params[:, ::2],
    }
    assert not any(strided[n].is_contiguous() for n in ("advantages", "seq_advantages"))
    assert not strided["call_params"].is_contiguous()
    for theta, alpha_min, beta in [(0.2, 0.05, 1.0), *SHAPE_KNOBS]:
        knobs = dict(theta=theta, alpha_min=alpha_min, beta=beta, batch_scope=False)
        out = run(fused_correct_impl, strided, **knobs)
        contiguous = run(fused_correct_impl, args, **knobs)
        for name, got, want in zip(OUTPUT_NAMES, out, contiguous, strict=True):
            assert_exact(got, want, name)
        assert out[0].is_contiguous()
        assert_equals_reference(out, args, knobs)


def test_batch_has_the_hard_cases_and_they_are_handled(fused_correct_impl):
    """Spans at both ends of a row, rows without calls, invalid calls, zero-advantage rows."""
    B, T = 13, 97
    batch = correct_batch(B=B, T=T, D=16, calls_per_row=4, seed=7)
    batch.seq_advantages[int(batch.call_seq[0])] = 0.0  # a zero-advantage row with calls
    batch.advantages = batch.seq_advantages[:, None] * batch.mask
    assert bool((batch.call_start == 0).any()) and bool((batch.call_end == T).any())
    assert len(set(range(B)) - set(batch.call_seq.tolist())) > 0, "no row without calls"
    assert bool((batch.call_tool < 0).any())
    args = batch_args(batch)
    knobs = dict(theta=0.1, alpha_min=0.0, beta=0.8, batch_scope=False)
    out = run(fused_correct_impl, args, **knobs)
    assert_equals_reference(out, args, knobs)
    changed = out[0] != batch.advantages
    assert changed.any(), "no token was lifted"
    # the invariants of docs/math.md, section 2.7: lifts only, never flips, only failing rows
    assert bool((out[0] >= batch.advantages).all())
    assert bool((out[0][changed] <= 0).all())
    assert not changed[batch.seq_advantages >= 0].any()


# --------------------------------------------------------------------------------------
# 4. bad input
# --------------------------------------------------------------------------------------


def _valid_args() -> dict:
    """Two rows, three calls (a cosine tool 0 and an IoU tool 1), all checks pass."""
    args = make_args(
        token_adv=[[1.0] * 6, [-1.0] * 6],
        seq_adv=[1.0, -1.0],
        groups=[0, 0],
        calls=[(0, 0, 2, 0, 0, E0), (0, 3, 5, 1, 0, [0.0, 0.0, 0.5, 0.5]), (1, 1, 4, 0, 0, E0)],
        kinds=(0, 1),
    )
    return {**args, **DEFAULT_KNOBS}


def _set(name: str, value) -> Callable[[dict], dict]:
    return lambda a: {**a, name: value(a) if callable(value) else value}


def _set_at(name: str, index: int, value) -> Callable[[dict], dict]:
    def mutate(a: dict) -> dict:
        t = a[name].clone()
        t[index] = value
        return {**a, name: t}

    return mutate


def _empty_batch(a: dict) -> dict:
    z = torch.zeros(0, dtype=torch.int64)
    return {
        **a,
        "advantages": torch.zeros(0, 6),
        "seq_advantages": torch.zeros(0),
        "group_ids": z,
        "call_seq": z,
        "call_start": z,
        "call_end": z,
        "call_tool": z,
        "call_key": z,
        "call_params": torch.zeros(0, 4),
    }


def _bad(name: str, value, exc: type[Exception] = ValueError, at=None) -> tuple:
    """A ``BAD_INPUTS`` entry: argument ``name`` set to ``value`` (with ``at``: only its
    element ``at``); ``exc`` expected, with a message that names ``name``."""
    return (_set(name, value) if at is None else _set_at(name, at, value)), exc, name


NAN = float("nan")
BAD_INPUTS = {  # id -> (mutation, exception type, argument the message must name)
    "advantages-1d": _bad("advantages", lambda a: a["advantages"][0]),
    "seq_advantages-length": _bad("seq_advantages", torch.zeros(3)),
    "group_ids-length": _bad("group_ids", torch.zeros(1, dtype=torch.int64)),
    "call_start-length": _bad("call_start", lambda a: a["call_start"][:2]),
    "call_key-length": _bad("call_key", lambda a: a["call_key"][:1]),
    "call_params-rows": _bad("call_params", lambda a: a["call_params"][:2]),
    "advantages-float64": _bad("advantages", lambda a: a["advantages"].double(), TypeError),
    "seq_advantages-float16": _bad(
        "seq_advantages", lambda a: a["seq_advantages"].half(), TypeError
    ),
    "group_ids-int32": _bad("group_ids", lambda a: a["group_ids"].int(), TypeError),
    "call_seq-int32": _bad("call_seq", lambda a: a["call_seq"].int(), TypeError),
    "call_tool-float": _bad("call_tool", lambda a: a["call_tool"].float(), TypeError),
    "call_params-float64": _bad("call_params", lambda a: a["call_params"].double(), TypeError),
    "tool_sim_kind-int32": _bad("tool_sim_kind", lambda a: a["tool_sim_kind"].int(), TypeError),
    "call_end-past-T": _bad("call_end", 7, at=2),
    "call_start-negative": _bad("call_start", -1, at=0),
    "start-after-end": (
        lambda a: _set_at("call_end", 2, 3)(_set_at("call_start", 2, 4)(a)),
        ValueError,
        "call_start",
    ),
    "overlapping-spans": (_set_at("call_start", 1, 1), ValueError, "call spans"),
    "call_seq-past-B": _bad("call_seq", 2, at=2),
    "call_seq-negative": _bad("call_seq", -1, at=0),
    "advantages-nan": _bad("advantages", NAN, at=(1, 2)),
    "advantages-inf": _bad("advantages", float("inf"), at=(0, 0)),
    "seq_advantages-nan": _bad("seq_advantages", NAN, at=0),
    "call_params-nan": _bad("call_params", NAN, at=(0, 1)),
    "theta-negative": _bad("theta", -0.1),
    "theta-above-1": _bad("theta", 1.5),
    "theta-nan": _bad("theta", NAN),
    "alpha_min-negative": _bad("alpha_min", -0.5),
    # alpha_min gates the confidence s_k * cov_k, which lies in [0, 1]
    "alpha_min-slightly-negative": _bad("alpha_min", -0.1),
    "alpha_min-above-1": _bad("alpha_min", 1.5),
    "alpha_min-nan": _bad("alpha_min", NAN),
    "alpha_min-inf": _bad("alpha_min", float("inf")),
    "beta-negative": _bad("beta", -0.1),
    "beta-inf": _bad("beta", float("inf")),
    "empty-batch": (_empty_batch, ValueError, "advantages"),
    "call_tool-past-num_tools": _bad("call_tool", 2, at=2),
    "tool_sim_kind-2": _bad("tool_sim_kind", 2, at=1),
    "tool_sim_kind-negative": _bad("tool_sim_kind", -1, at=0),
    "iou-params-D3": _bad("call_params", lambda a: a["call_params"][:, :3].contiguous()),
    "call_params-D0": (
        lambda a: {
            **a,
            "call_params": a["call_params"][:, :0].contiguous(),
            "tool_sim_kind": torch.zeros_like(a["tool_sim_kind"]),
        },
        ValueError,
        "call_params",
    ),
    "call_seq-2d": _bad("call_seq", lambda a: a["call_seq"][None]),
    "call_end-int32": _bad("call_end", lambda a: a["call_end"].int(), TypeError),
    "call_tool-length": _bad("call_tool", lambda a: a["call_tool"][1:]),
    "call_key-float": _bad("call_key", lambda a: a["call_key"].float(), TypeError),
    "call_key-int32": _bad("call_key", lambda a: a["call_key"].int(), TypeError),
    "tool_sim_kind-2d": _bad("tool_sim_kind", lambda a: a["tool_sim_kind"][None]),
    "advantages-neg-inf": _bad("advantages", float("-inf"), at=(1, 5)),
    "call_params-inf": _bad("call_params", float("inf"), at=(2, 0)),
    # two problems: the one of the earlier argument is reported
    "error-order": (
        lambda a: _set_at("call_seq", 0, 5)(_set_at("advantages", (0, 1), NAN)(a)),
        ValueError,
        "advantages",
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(fused_correct_impl, bad):
    mutate, exc_type, arg = BAD_INPUTS[bad]
    a = mutate(_valid_args())
    # the argument's name as a word: "advantages" must not be satisfied by "seq_advantages"
    pattern = rf"(?<![\w]){re.escape(arg)}(?![\w])"
    with pytest.raises(exc_type, match=pattern):
        fused_correct_impl(
            *(a[n] for n in ARG_NAMES), a["theta"], a["alpha_min"], a["beta"], a["batch_scope"]
        )


def test_valid_args_of_the_bad_input_table_pass(fused_correct_impl):
    # the table above starts from this input: it must be accepted as it is
    a = _valid_args()
    run(fused_correct_impl, {n: a[n] for n in ARG_NAMES})


@pytest.mark.parametrize("alpha_min", [0.0, 1.0])
def test_alpha_min_at_the_ends_of_its_range_passes(fused_correct_impl, alpha_min):
    # alpha_min must lie in [0, 1] (the range of the confidence it gates), both ends included
    a = _valid_args()
    run(fused_correct_impl, {n: a[n] for n in ARG_NAMES}, alpha_min=alpha_min)


def test_front_door_takes_the_alpha_min_range_of_the_op():
    a = _valid_args()
    fields = ("seq", "start", "end", "tool", "key", "params")
    calls = tapo_kernels.ToolCalls(*(a[f"call_{f}"] for f in fields))
    tensors = (a["advantages"], a["seq_advantages"], a["group_ids"], calls, a["tool_sim_kind"])
    for alpha_min in (0.0, 1.0):
        tapo_kernels.fused_correct(*tensors, alpha_min=alpha_min)
    for alpha_min in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha_min"):
            tapo_kernels.fused_correct(*tensors, alpha_min=alpha_min)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixing devices needs a CUDA device")
def test_tensors_on_two_devices_raise(fused_correct_impl):
    a = _valid_args()
    a["call_params"] = a["call_params"].cuda()
    with pytest.raises(ValueError, match="device"):
        fused_correct_impl(*(a[n] for n in ARG_NAMES), 0.7, 0.3, 0.8, False)


# --------------------------------------------------------------------------------------
# 5. dispatcher, compile, import hygiene, front door
# --------------------------------------------------------------------------------------


def _sample_inputs() -> list[tuple]:
    """opcheck samples: a random batch, fp16 params with batch scope, N = 0."""
    samples = []
    for gen_knobs, knobs in (
        (dict(seed=3, B=5, T=9), DEFAULT_KNOBS),
        (dict(seed=4, B=3, T=6, param_dtype=torch.float16), {**DEFAULT_KNOBS, "batch_scope": True}),
        (dict(seed=5, B=2, T=4, calls_per_row=0), DEFAULT_KNOBS),
    ):
        batch = correct_batch(**gen_knobs)
        samples.append(
            batch.op_args()
            + (knobs["theta"], knobs["alpha_min"], knobs["beta"], knobs["batch_scope"])
        )
    no_coverage = correct_batch(seed=6, B=4, T=7)  # the ablation switch set explicitly
    samples.append(no_coverage.op_args() + (0.7, 0.3, 0.8, False, False))
    return samples


@pytest.mark.parametrize("sample", range(4))
def test_opcheck(sample):
    torch.library.opcheck(torch.ops.tapo.fused_correct, _sample_inputs()[sample])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(backend):
    def step(advantages, *rest):
        # the op between ordinary (elementwise, so exactly reproducible) torch code;
        # ``rest``: the other nine tensor arguments, in schema order (see ARG_NAMES)
        corrected, delta, confidence, witness = torch.ops.tapo.fused_correct(
            advantages * 1.0, *rest, 0.7, 0.3, 0.8, False
        )
        return corrected, corrected - advantages, delta * 2, confidence, witness + 1

    batch = correct_batch(seed=4, B=6, T=11, **Q3)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    got = compiled(*batch.op_args())
    want = step(*batch.op_args())
    assert bool((want[2] > 0).any()), "the sample must lift something"
    for g, w in zip(got, want, strict=True):
        assert_exact(g, w)


def _python_json(code: str, **env: str | None) -> object:
    """Run ``code`` in a fresh interpreter that imports this checkout, with ``env`` over our
    environment (``None`` unsets a variable); return the JSON its last line of stdout holds."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
    )
    for key, value in env.items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = value
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=full_env, cwd=REPO_ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("native", ["default", "disabled"])
def test_import_initialises_no_cuda_and_no_triton(native):
    code = (
        "import json, sys, torch, tapo_kernels\n"
        "print(json.dumps({'cuda': torch.cuda.is_initialized(),"
        " 'triton': 'triton' in sys.modules,"
        " 'op': hasattr(torch.ops.tapo, 'fused_correct')}))\n"
    )
    flag = "1" if native == "disabled" else None  # None: the process decides (native if built)
    result = _python_json(code, TAPO_DISABLE_NATIVE=flag)
    assert result == {"cuda": False, "triton": False, "op": True}


def test_reference_fallback_in_a_fresh_process():
    # TAPO_DISABLE_NATIVE=1: the CPU kernel is the validated reference; the identical-query
    # golden case (see test_identical_query_in_success_and_failure) must come out the same.
    code = (
        "import json, torch, tapo_kernels\n"
        "f = lambda v, d=torch.float32: torch.tensor(v, dtype=d)\n"
        "e0 = [1.0, 0.0, 0.0, 0.0]\n"
        "out = torch.ops.tapo.fused_correct(\n"
        "    f([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]), f([1.0, -1.0]), f([0, 0], torch.int64),\n"
        "    f([0, 1], torch.int64), f([0, 0], torch.int64), f([3, 2], torch.int64),\n"
        "    f([0, 0], torch.int64), f([0, 0], torch.int64), f([e0, e0]), f([0], torch.int64),\n"
        "    0.7, 0.3, 0.5, False)\n"
        "print(json.dumps({'backend': tapo_kernels.CPU_BACKEND['fused_correct'],\n"
        "                  'out': [t.tolist() for t in out]}))\n"
    )
    result = _python_json(code, TAPO_DISABLE_NATIVE="1")
    assert result["backend"] == "reference"
    # beta = 0.5, s = 1, cov = 1, Abar = 1: d = 0.5; row 1 span [0, 2): -1 -> -0.5
    assert result["out"] == [[[1.0, 1.0, 1.0], [-0.5, -0.5, -1.0]], [0.0, 0.5], [0.0, 1.0], [-1, 0]]


def test_front_door_and_stats():
    # group of four: row 0 succeeds (A = 0.5) asking "eiffel tower height";
    # row 1 fails asking the same (lifted) and an unrelated pizza query (no success asks it);
    # row 2 fails with the pizza query only; row 3 fails with one invalid call (tool -1).
    queries = [
        "eiffel tower height",
        "eiffel tower height",
        "best pizza dough recipe",
        "best pizza dough recipe",
        "eiffel tower height",
    ]
    calls = tapo_kernels.ToolCalls.from_lists(
        seq=[0, 1, 1, 2, 3],
        start=[0, 0, 3, 1, 0],
        end=[2, 2, 5, 4, 2],
        tool=[0, 0, 0, 0, -1],
        params=tapo_kernels.encode_text(queries),
    )
    seq_adv = f32([0.5, -1.0, -1.0, -1.0])
    advantages = seq_adv[:, None].expand(4, 5).contiguous()
    result = tapo_kernels.fused_correct(
        advantages, seq_adv, i64([0, 0, 0, 0]), calls, i64([0]), beta=0.5
    )
    # call 1: s = <p, p> = 1 (up to fp32 rounding of a unit vector), pool = {0}, cov = 1,
    # conf = 1, Abar = 0.5, d = 0.5 * 1 * 1 * 0.5 = 0.25; row 1 span [0, 2): -1 -> -0.75.
    # calls 2, 3: best candidate is call 0 with a low n-gram overlap (< theta): no lift.
    # call 4 is invalid: not a failing call, no witness.
    assert_close_to_oracle(result.delta, f32([0.0, 0.25, 0.0, 0.0, 0.0]), what="delta")
    assert result.witness.tolist() == [-1, 0, 0, 0, -1]
    expected = advantages.clone()
    expected[1, :2] = -0.75
    assert_close_to_oracle(result.corrected, expected, what="corrected")
    stats = result.stats()
    # failing valid calls: 1, 2, 3 -> 3; corrected: call 1 -> 1; failing trajectories with a
    # valid call: rows 1, 2 -> 2 (row 3's only call is invalid); corrected: row 1 -> 1.
    assert (stats.failing_calls, stats.corrected_calls) == (3, 1)
    assert (stats.failing_trajectories, stats.corrected_trajectories) == (2, 1)
    assert math.isclose(stats.mean_lift, 0.25, abs_tol=1e-6)
    assert math.isclose(stats.call_correction_rate, 1 / 3)
    assert math.isclose(stats.trajectory_correction_rate, 1 / 2)
    assert set(stats.as_dict()) >= {"tapo/call_correction_rate", "tapo/mean_lift"}


def test_front_door_without_calls():
    seq_adv = f32([1.0, -1.0])
    advantages = seq_adv[:, None].expand(2, 3).contiguous()
    calls = tapo_kernels.ToolCalls.empty(dim=8)
    result = tapo_kernels.fused_correct(advantages, seq_adv, i64([0, 0]), calls, i64([0]))
    assert torch.equal(result.corrected, advantages)
    assert result.corrected.data_ptr() != advantages.data_ptr()
    stats = result.stats()
    assert (stats.failing_calls, stats.corrected_calls, stats.mean_lift) == (0, 0, 0.0)


def test_overlapping_spans_error_names_the_row_and_both_spans(fused_correct_impl):
    """Spans given out of order (row 2: [5, 8) listed before [3, 6)) are reported sorted."""
    B, T = 4, 10
    adv = torch.full((B, T), -1.0)
    seq_adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    gid = torch.zeros(B, dtype=torch.int64)
    ints = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    args = (
        adv,
        seq_adv,
        gid,
        ints([0, 2, 2]),
        ints([0, 5, 3]),
        ints([2, 8, 6]),
        ints([0, 0, 0]),
        ints([0, 0, 0]),
        torch.ones(3, 4),
        ints([0]),
    )
    with pytest.raises(ValueError, match="call_start") as info:
        fused_correct_impl(*args, 0.7, 0.3, 0.8, False)
    for piece in ("row 2", "[3, 6)", "[5, 8)"):
        assert piece in str(info.value), f"{piece!r} not in {info.value}"
    assert str(info.value).index("[3, 6)") < str(info.value).index("[5, 8)")
