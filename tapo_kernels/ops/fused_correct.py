# Triton kernel of ``tapo::fused_correct`` (docs/math.md, section 2): TAPO credit correction.
#
# Design trade-off: the candidate search is a segmented problem (failing call k only looks at
# successful calls with the same scope group, tool id and key). Instead of the reference's
# dense (F, C) similarity matrix, the launcher sorts the calls once on the device (three
# stable sorts, no host sync) so that every (scope, tool, key) pool is a contiguous range of
# the sorted array, and the kernel runs one program per call: a failing call scans only its
# own range, in tiles of BLOCK_C candidates x BLOCK_D features; every other program writes
# its neutral outputs and exits. Work is O(sum over failing calls of |range| * D) instead of
# O(F * C * D), and the span rewrite happens in the same launch (spans never overlap).
#
# Tuned for RL batches: N ~ 10^2..10^4 calls, D = 256 (encode_text) or D >= 4 (encode_box),
# ranges of tens to a few hundred candidates, spans of tens of tokens. At these sizes the
# launch should be latency bound (GPU time not yet measured: written and tested under the
# Triton interpreter; the kernel compiles for sm_90). The only host synchronisation is the
# validation in _checks.py. On a GPU the compiler may fuse the IoU's multiply-adds (FMA), so
# IoUs of non-dyadic boxes can differ from torch's by an ulp; ties between equal boxes stay
# exact (same inputs, same instructions). Assumes what _checks.check_fused_correct enforces:
# finite inputs, in-range call_seq / spans / tools, non-overlapping spans in a row.
"""Triton implementation of ``tapo::fused_correct`` (the CUDA kernel of the op)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _args, _checks, reference

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Role of a call in the sort: candidates (valid calls of successful rows) come first inside
# each (scope, tool, key) segment, then the failing calls that search that segment, then
# calls that play no part (invalid tool or zero-advantage row).
_ROLE_CANDIDATE, _ROLE_FAILING, _ROLE_NONE = 0, 1, 2

# The span rewrite walks a call's tokens in tiles of this many positions.
_BLOCK_T = 128

if _INTERPRET:
    # One config: the interpreter runs every program in Python, so tiny tiles are fastest and
    # autotuning would multiply the test time.
    _CONFIGS = [triton.Config({"BLOCK_C": 16}, num_warps=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_C": 16}, num_warps=2),
        triton.Config({"BLOCK_C": 32}, num_warps=4),
        triton.Config({"BLOCK_C": 64}, num_warps=4),
    ]


@triton.autotune(configs=_CONFIGS, key=["D"], restore_value=["corrected_ptr"])
@triton.jit
def _fused_correct_kernel(
    corrected_ptr,  # [B, T] fp32, contiguous; a copy of advantages, rewritten in place
    delta_ptr,  # [N] fp32 out
    confidence_ptr,  # [N] fp32 out
    witness_ptr,  # [N] int64 out
    seq_adv_ptr,  # [B] fp32
    pool_size_ptr,  # [B] int64: successful rows in the scope group of each row
    call_seq_ptr,  # [N] int64
    call_start_ptr,  # [N] int64
    call_end_ptr,  # [N] int64
    call_tool_ptr,  # [N] int64
    call_kind_ptr,  # [N] int64: similarity kind of the call's tool (0 cosine, 1 iou)
    range_lo_ptr,  # [N] int64: first candidate of the call's segment (sorted positions)
    range_hi_ptr,  # [N] int64: one past its last candidate
    sorted_call_ptr,  # [N] int64: original call index at each sorted position
    sorted_seq_ptr,  # [N] int64: its row
    params_ptr,  # [N, D] fp32 / fp16 / bf16
    stride_pn,
    stride_pd,
    T,
    D,
    theta,
    alpha_min,
    beta,
    COVERAGE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program per call ``k`` (1-D grid of N programs, no grid-dimension limit).

    A failing valid call scans its candidates ``[lo, hi)`` (sorted by row, then index):

        sim_c  = min(1, max(0, <p_k, p_c>))  or  IoU(p_k[:4], p_c[:4])     (fp32)
        s_k    = max_c sim_c,  w_k = min{ c : sim_c = s_k }              (original indices)
        T_k    = { j : max_{c in j} sim_c >= theta }
               = { j : some candidate c of row j has sim_c >= theta }    (no per-row max needed)
        cov_k  = |T_k| / pool,  Abar_k = sum_{T_k} A_j / |T_k|
        conf_k = s_k * cov_k   (s_k when COVERAGE is off: the ablation without support)
        d_k    = [s_k >= theta and conf_k >= alpha_min] * beta * conf_k * Abar_k

    ``theta`` here is the comparison threshold ``fp32(theta) - SIM_TOL`` (``_threshold``).
    A row j is counted at its first candidate reaching theta: rows are contiguous after the
    sort, so "first" means no earlier hit of the same row in this tile and j differs from
    the row of the last hit of the previous tiles. Rows are visited in ascending order, as
    in the reference; inside a tile the A_j are added as a tree, so with three or more
    supporting rows the sum may differ from torch's reduction order by an ulp (both are fp32).
    Divisions use ``div_rn`` (IEEE, as torch), so s, cov and conf are bit-exact whenever the
    similarities are. Then ``A'[i, t] = min(0, A[i, t] + d_k)`` where ``A[i, t] < 0`` on the
    call's span. Every other call gets ``delta = confidence = 0`` and ``witness = -1``.
    """
    k = tl.program_id(0).to(tl.int64)  # int64 so that k * stride_pn cannot overflow
    row = tl.load(call_seq_ptr + k)
    tool = tl.load(call_tool_ptr + k)
    row_adv = tl.load(seq_adv_ptr + row)
    failing = (tool >= 0) & (row_adv < 0.0)
    lo = tl.load(range_lo_ptr + k)
    hi = tl.load(range_hi_ptr + k)
    hi = tl.where(failing, hi, lo)  # non-failing calls scan nothing
    is_iou = tl.load(call_kind_ptr + k) == 1
    pool = tl.load(pool_size_ptr + row)

    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    p_row = params_ptr + k * stride_pn

    no_call = tl.full((), 9223372036854775807, tl.int64)  # above every call index
    best_sim = tl.full((), -1.0, tl.float32)  # every real similarity is >= 0
    best_call = no_call
    n_support = tl.full((), 0, tl.int32)
    a_support = tl.full((), 0.0, tl.float32)
    last_hit_row = tl.full((), -1, tl.int64)  # row of the last candidate reaching theta

    for c0 in range(lo, hi, BLOCK_C):
        pos = c0 + offs_c
        in_range = pos < hi
        cand = tl.load(sorted_call_ptr + pos, mask=in_range, other=0)
        cand_row = tl.load(sorted_seq_ptr + pos, mask=in_range, other=-1)
        c_row = params_ptr + cand * stride_pn  # [BLOCK_C] row pointers (cand is int64)
        if is_iou:
            # Same operation order as reference.pairwise_similarity, so ties are bit-exact.
            a0 = tl.load(p_row).to(tl.float32)
            a1 = tl.load(p_row + stride_pd).to(tl.float32)
            a2 = tl.load(p_row + 2 * stride_pd).to(tl.float32)
            a3 = tl.load(p_row + 3 * stride_pd).to(tl.float32)
            b0 = tl.load(c_row, mask=in_range, other=0.0).to(tl.float32)
            b1 = tl.load(c_row + stride_pd, mask=in_range, other=0.0).to(tl.float32)
            b2 = tl.load(c_row + 2 * stride_pd, mask=in_range, other=0.0).to(tl.float32)
            b3 = tl.load(c_row + 3 * stride_pd, mask=in_range, other=0.0).to(tl.float32)
            iw = tl.maximum(tl.minimum(a2, b2) - tl.maximum(a0, b0), 0.0)
            ih = tl.maximum(tl.minimum(a3, b3) - tl.maximum(a1, b1), 0.0)
            inter = iw * ih
            area_a = tl.maximum(a2 - a0, 0.0) * tl.maximum(a3 - a1, 0.0)
            area_b = tl.maximum(b2 - b0, 0.0) * tl.maximum(b3 - b1, 0.0)
            union = area_a + area_b - inter
            # div_rn: IEEE division, as torch; the guard keeps 0/0 out of the masked lanes
            sim = tl.where(union > 0.0, tl.div_rn(inter, tl.where(union > 0.0, union, 1.0)), 0.0)
        else:
            dot = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + offs_d
                d_ok = d < D
                p = tl.load(p_row + d * stride_pd, mask=d_ok, other=0.0).to(tl.float32)
                q = tl.load(
                    c_row[:, None] + d[None, :] * stride_pd,
                    mask=in_range[:, None] & d_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                dot += tl.sum(q * p[None, :], axis=1)  # fp32 accumulation whatever the input
            # cosine clamped to [0, 1]; NaN (an fp32 overflow) counts as 0
            sim = tl.where(dot > 0.0, tl.minimum(dot, 1.0), 0.0)
        sim = tl.where(in_range, sim, -1.0)

        # best similarity; ties go to the lowest original index (the tile is in row order)
        tile_best = tl.max(sim, axis=0)
        tile_call = tl.min(tl.where(in_range & (sim == tile_best), cand, no_call), axis=0)
        better = tile_best > best_sim
        best_call = tl.where(
            better,
            tile_call,
            tl.where(tile_best == best_sim, tl.minimum(best_call, tile_call), best_call),
        )
        best_sim = tl.maximum(best_sim, tile_best)

        # coverage: count each row once, at its first candidate with sim >= theta
        hit = in_range & (sim >= theta)
        earlier_same_row = (
            (cand_row[None, :] == cand_row[:, None])
            & hit[None, :]
            & (offs_c[None, :] < offs_c[:, None])
        )
        first = hit & (tl.max(earlier_same_row.to(tl.int32), axis=1) == 0)
        first = first & (cand_row != last_hit_row)
        cand_adv = tl.load(seq_adv_ptr + cand_row, mask=first, other=0.0)
        n_support += tl.sum(first.to(tl.int32), axis=0)
        a_support += tl.sum(cand_adv, axis=0)
        last_hit_row = tl.maximum(last_hit_row, tl.max(tl.where(hit, cand_row, -1), axis=0))

    has_cand = hi > lo
    s = tl.where(has_cand, best_sim, 0.0)
    witness = tl.where(has_cand, best_call, -1)
    n_f = n_support.to(tl.float32)
    cov = tl.where(pool > 0, tl.div_rn(n_f, tl.maximum(pool, 1).to(tl.float32)), 0.0)
    a_bar = tl.where(n_support > 0, tl.div_rn(a_support, tl.maximum(n_f, 1.0)), 0.0)
    if COVERAGE:
        conf = s * cov
    else:
        conf = s
    gate = (s >= theta) & (conf >= alpha_min)
    lift = tl.where(gate, beta * conf * a_bar, 0.0)
    tl.store(delta_ptr + k, lift)
    tl.store(confidence_ptr + k, conf)
    tl.store(witness_ptr + k, witness)

    # Rewrite the call's span; a zero lift leaves it unchanged, so skip the traffic.
    start = tl.load(call_start_ptr + k)
    end = tl.load(call_end_ptr + k)
    end = tl.where(lift > 0.0, end, start)
    a_row = corrected_ptr + row * T
    offs_t = tl.arange(0, BLOCK_T)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < end
        a = tl.load(a_row + t, mask=t_ok, other=0.0)
        a = tl.where(a < 0.0, tl.minimum(a + lift, 0.0), a)
        tl.store(a_row + t, a, mask=t_ok)


def _threshold(theta: float) -> float:
    """``fp32(theta) - SIM_TOL`` in fp32: the comparison threshold of every backend."""
    return float(torch.tensor(theta, dtype=torch.float32) - reference.SIM_TOL)


def _alloc_outputs(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """delta, confidence, witness for ``n`` calls; the kernel writes every entry."""
    return (
        torch.empty(n, dtype=torch.float32, device=device),
        torch.empty(n, dtype=torch.float32, device=device),
        torch.empty(n, dtype=torch.int64, device=device),
    )


def _scope_rank(group_ids: Tensor, batch_scope: bool) -> Tensor:
    """Dense rank in ``[0, B)`` of each row's scope group (all 0 with ``batch_scope``)."""
    if batch_scope:
        return torch.zeros_like(group_ids)
    sorted_ids, perm = torch.sort(group_ids, stable=True)
    new_group = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_group[1:] = sorted_ids[1:] != sorted_ids[:-1]
    rank = torch.empty_like(perm)
    rank[perm] = torch.cumsum(new_group, 0) - 1
    return rank


def _candidate_ranges(
    seq_advantages: Tensor,
    call_seq: Tensor,
    call_tool: Tensor,
    call_key: Tensor,
    scope_rank: Tensor,
    num_tools: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort the calls so that each candidate pool is contiguous; no host synchronisation.

    Sorted order: (scope, tool, key, role, row, call index), where role puts the candidates
    (valid calls of successful rows) before the failing calls of the same segment. Returns
    ``(lo, hi, sorted_call, sorted_seq)``: for call ``k`` (original order) its candidates are
    the sorted positions ``[lo[k], hi[k])``.
    """
    B = seq_advantages.shape[0]
    n = call_seq.shape[0]
    row_adv = seq_advantages[call_seq]
    valid = call_tool >= 0
    role = torch.full_like(call_seq, _ROLE_NONE)
    role = torch.where(valid & (row_adv > 0), _ROLE_CANDIDATE, role)
    role = torch.where(valid & (row_adv < 0), _ROLE_FAILING, role)
    tool = call_tool.clamp(min=-1)  # every invalid id sorts as -1, so keys cannot collide
    scope = scope_rank[call_seq]

    # Least significant key first; stable sorts keep the earlier keys (and the call index).
    order = torch.argsort(role * B + call_seq, stable=True)
    order = order[torch.argsort(call_key[order], stable=True)]
    order = order[torch.argsort((scope * (num_tools + 1) + tool + 1)[order], stable=True)]

    s_scope, s_tool, s_key, s_role = scope[order], tool[order], call_key[order], role[order]
    position = torch.arange(n, device=call_seq.device)
    new_segment = torch.ones(n, dtype=torch.bool, device=call_seq.device)
    new_segment[1:] = (
        (s_scope[1:] != s_scope[:-1]) | (s_tool[1:] != s_tool[:-1]) | (s_key[1:] != s_key[:-1])
    )
    segment_start = torch.cummax(torch.where(new_segment, position, 0), 0).values
    # one past the last candidate at or before each position; if that candidate lies in an
    # earlier segment the range below comes out empty, as it should
    candidates_end = torch.cummax(torch.where(s_role == _ROLE_CANDIDATE, position + 1, 0), 0).values
    lo = torch.empty_like(order)
    hi = torch.empty_like(order)
    lo[order] = segment_start
    hi[order] = torch.maximum(segment_start, candidates_end)
    return lo, hi, order, call_seq[order]


def fused_correct_triton(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tapo::fused_correct`` with a Triton kernel; same results as ``reference.fused_correct``.

    Returns ``(corrected, delta, confidence, witness)``. Validation (``_checks``) is the only
    host synchronisation; with no failing call the kernel still runs (every program exits
    early) rather than paying a sync to find out.
    """
    a = SimpleNamespace(**_args.bind("fused_correct", args, kwargs))
    _checks.check_fused_correct(**vars(a))
    B, T = a.advantages.shape
    n = a.call_seq.shape[0]
    device = a.advantages.device
    corrected = a.advantages.clone(memory_format=torch.contiguous_format)
    if n == 0:
        delta, confidence, witness = _alloc_outputs(0, device)
        return corrected, delta, confidence, witness.fill_(-1)

    num_tools = a.tool_sim_kind.shape[0]
    scope_rank = _scope_rank(a.group_ids, a.batch_scope)
    pool_size = torch.zeros(B, dtype=torch.int64, device=device).index_add_(
        0, scope_rank, (a.seq_advantages > 0).to(torch.int64)
    )[scope_rank]
    lo, hi, sorted_call, sorted_seq = _candidate_ranges(
        a.seq_advantages, a.call_seq, a.call_tool, a.call_key, scope_rank, num_tools
    )
    if num_tools:
        call_kind = a.tool_sim_kind[a.call_tool.clamp(0, num_tools - 1)]
    else:  # no tool ids: every call is invalid and scans nothing
        call_kind = torch.zeros_like(a.call_tool)
    delta, confidence, witness = _alloc_outputs(n, device)
    D = a.call_params.shape[1]
    block_d = min(triton.next_power_of_2(max(D, 1)), 128)
    _fused_correct_kernel[(n,)](
        corrected,
        delta,
        confidence,
        witness,
        a.seq_advantages.contiguous(),
        pool_size,
        a.call_seq.contiguous(),
        a.call_start.contiguous(),
        a.call_end.contiguous(),
        a.call_tool.contiguous(),
        call_kind,
        lo,
        hi,
        sorted_call,
        sorted_seq,
        a.call_params,
        a.call_params.stride(0),
        a.call_params.stride(1),
        T,
        D,
        _threshold(a.theta),
        float(a.alpha_min),
        float(a.beta),
        COVERAGE=bool(a.coverage),
        BLOCK_D=block_d,
        BLOCK_T=_BLOCK_T,
    )
    return corrected, delta, confidence, witness
