# Triton CUDA kernels of tapo::policy_loss and policy_loss_backward (docs/math.md, sections 3-4).
#
# Design trade-off. The loss is elementwise per token plus per-row and global reductions,
# so it is memory bound (about 20-25 bytes read per token, 4 more written by the backward).
# Tokens are processed in 2-D tiles of BLOCK_B rows x BLOCK_T columns (about 2048 tokens per
# program), on a 1-D grid over (row block, column block): short rows pack several rows per
# program, long rows split over several programs, and the grid never meets CUDA's y/z limits
# at large T. Per-tile partial sums go to a (B, column blocks, 6) buffer reduced in torch, so
# results are deterministic (no atomics). Sized for RL batches of B = 8..4096 rows of
# T = 256..32768 tokens; the tile size is a fixed heuristic (not yet timed on a GPU) rather
# than autotuned, because T changes every step and autotuning would re-benchmark each shape.
# Masks: any bool or float mask is accepted and used as a weight (0 = prompt, padding or tool
# observation: such tokens contribute nothing and receive exactly zero gradient); a row with
# no mask token contributes 0 and never NaN. The backward recomputes every intermediate from
# the inputs (nothing is saved but the inputs), reading the same bytes as the forward.

"""Triton kernels of ``tapo::policy_loss`` (GRPO / GSPO-token / SAPO, KL, TAPO lift).

Kernels:

* ``_row_stats_kernel``: per row, the mask weight ``n_i = sum_t m`` and, for GSPO, the
  sequence log-ratio ``log s_i = sum_t(lr * m) / max(n_i, 1)``.
* ``_policy_loss_fwd_kernel``: per token, the loss term, clip / ratio / KL / lift flags;
  per (row, column block) the masked partial sums of those.
* ``_policy_loss_bwd_kernel``: per token, ``grad_loss * w_i * m * d loss_tok / d logp``
  with the aggregation weight ``w_i`` of the row.

The host functions validate inputs, launch the kernels and apply the aggregation to the
per-row sums with a few torch ops on ``(B,)`` tensors (no host synchronisation).
"""

from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from .. import _args, _checks
from ..reference import AGGS, ALGOS, KL_TYPES

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_USE_LIBDEVICE = tl.constexpr(not _INTERPRET)  # the interpreter has no libdevice


@triton.jit
def _exp(x):
    """``exp`` as accurate as torch's: libdevice when compiled, numpy's when interpreted.

    Compiled, ``tl.exp`` on fp32 is ex2.approx after a multiply by log2(e), about 10 ulp
    off near |lr| = 20; libdevice's expf costs nothing in a memory-bound kernel.
    """
    if _USE_LIBDEVICE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


ALGO_IDS = {name: i for i, name in enumerate(ALGOS)}  # grpo 0, gspo 1, sapo 2
KL_IDS = {name: i for i, name in enumerate(KL_TYPES)}  # k1 0, k2 1, k3 2
AGG_IDS = {name: i for i, name in enumerate(AGGS)}  # token-mean 0, seq-mean-token-mean 1, ...
# the same ids as compile-time constants visible inside the kernels
_SAPO = tl.constexpr(ALGO_IDS["sapo"])
_GSPO_SEQ = tl.constexpr(ALGO_IDS["gspo-seq"])
_K1 = tl.constexpr(KL_IDS["k1"])
_K2 = tl.constexpr(KL_IDS["k2"])
_TOKEN_MEAN = tl.constexpr(AGG_IDS["token-mean"])
_SEQ_MEAN_TOKEN_MEAN = tl.constexpr(AGG_IDS["seq-mean-token-mean"])
_SEQ_MEAN_TOKEN_SUM_NORM = tl.constexpr(AGG_IDS["seq-mean-token-sum-norm"])
_TOKEN_SUM = tl.constexpr(AGG_IDS["token-sum"])

# Per-(row, column block) partial sums written by the forward kernel, in this order:
# mask weight, loss, clipped, ratio, kl, lifted, dual-clipped, old_logp - logp (each summed
# over the tile's masked tokens). Columns 2: are the metrics in METRIC_NAMES order.
_N_PARTIALS = tl.constexpr(8)

_TILE_TOKENS = 2048  # tokens per program (compiled); interpreted shapes are tiny anyway
_MAX_BLOCK_T = 1024

_KNOB_ARGS = [
    "clip_lo_bits",
    "clip_hi_bits",
    "dual_c_bits",
    "tau_pos_bits",
    "tau_neg_bits",
    "kl_coef_bits",
    "norm_bits",
]


def _f64_bits(value: float) -> int:
    """The IEEE-754 bits of ``value`` as a float64, as a signed 64-bit int.

    Triton passes Python floats to kernels as fp32; float knobs travel as the bits of the
    double instead, so that the float64 kernel sees the exact value torch uses and the
    float32 kernel sees it rounded once to fp32, as torch rounds a Python scalar.
    """
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


@triton.jit
def _knob(bits, COMPUTE: tl.constexpr):
    """Decode a float knob passed as the bits of a double, in the compute dtype."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(COMPUTE)


@triton.jit
def _tile_index(B, T, n_col_blocks, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    """Rows, columns, flat int64 offsets and bounds of this program's tile."""
    pid = tl.program_id(0).to(tl.int64)
    row_block = pid // n_col_blocks
    col_block = pid % n_col_blocks
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = col_block * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    row_ok = rows < B
    in_bounds = row_ok[:, None] & (cols < T)[None, :]
    offsets = rows[:, None] * T + cols[None, :]
    return rows, row_ok, col_block, offsets, in_bounds


@triton.jit
def _load_advantage(
    adv_ptr,
    cmap_ptr,
    delta_ptr,
    weight_ptr,
    rows,
    row_ok,
    offsets,
    in_bounds,
    n_calls,
    COMPUTE: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr,
    HAS_CALLS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Token advantages after the TAPO lift, times the importance weight, and where the lift
    changed them.

    ``a' = min(0, a + delta[call_map])`` where ``a < 0`` and a call covers the token, then
    ``w a'``. The caller zeroes masked tokens (whose weight may be anything).
    """
    if ADV_PER_TOKEN:
        adv = tl.load(adv_ptr + offsets, mask=in_bounds, other=0.0).to(COMPUTE)
    else:
        row_adv = tl.load(adv_ptr + rows, mask=row_ok, other=0.0).to(COMPUTE)
        adv = tl.broadcast_to(row_adv[:, None], [BLOCK_B, BLOCK_T])
    lifted = tl.zeros([BLOCK_B, BLOCK_T], tl.int1)
    if HAS_CALLS:
        call = tl.load(cmap_ptr + offsets, mask=in_bounds, other=-1).to(tl.int64)
        # the range test keeps a stray index (unvalidated backward input) from reading
        # out of bounds; validated input always satisfies it
        covered = (call >= 0) & (call < n_calls)
        lift = tl.load(delta_ptr + call, mask=in_bounds & covered, other=0.0).to(COMPUTE)
        lifted_adv = tl.where(covered & (adv < 0), tl.minimum(adv + lift, 0.0), adv)
        lifted = lifted_adv != adv
        adv = lifted_adv
    if HAS_WEIGHT:
        adv = adv * tl.load(weight_ptr + offsets, mask=in_bounds, other=0.0).to(COMPUTE)
    return adv, lifted


@triton.jit
def _row_stats_kernel(
    logp_ptr,
    old_ptr,
    mask_ptr,
    row_tokens_ptr,
    log_seq_ratio_ptr,
    B,
    T,
    GSPO: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per row: ``n_i = sum_t m`` and (GSPO) ``log s_i = sum_t(clamp(lr, -20, 20) m) / max(n_i, 1)``.

    One program per block of rows, looping over the columns, so the per-row results need
    no second reduction; the pass reads only the mask (and for GSPO logp and old_logp), so
    it stays cheap even when a few long rows leave most of the GPU idle.
    """
    row_block = tl.program_id(0).to(tl.int64)
    rows = row_block * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    # Tile-shaped accumulators, reduced once after the loop: a row reduction inside the loop
    # crashed Triton 3.6's TritonGPUOptimizeThreadLocality pass (GSPO), and this form also
    # keeps the cross-thread reduction out of the loop.
    count_acc = tl.zeros([BLOCK_B, BLOCK_T], COMPUTE)
    lr_acc = tl.zeros([BLOCK_B, BLOCK_T], COMPUTE)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T).to(tl.int64)
        in_bounds = row_ok[:, None] & (cols < T)[None, :]
        offsets = rows[:, None] * T + cols[None, :]
        m = tl.load(mask_ptr + offsets, mask=in_bounds, other=0).to(COMPUTE)
        count_acc += m
        if GSPO:  # masked tokens read as 0, whatever they hold
            x = tl.load(logp_ptr + offsets, mask=in_bounds & (m != 0.0), other=0.0).to(COMPUTE)
            x_old = tl.load(old_ptr + offsets, mask=in_bounds & (m != 0.0), other=0.0).to(COMPUTE)
            lr = tl.minimum(tl.maximum(x - x_old, -20.0), 20.0)
            lr_acc += lr * m
    count = tl.sum(count_acc, axis=1)
    lr_sum = tl.sum(lr_acc, axis=1)
    tl.store(row_tokens_ptr + rows, count, mask=row_ok)
    if GSPO:
        tl.store(log_seq_ratio_ptr + rows, lr_sum / tl.maximum(count, 1.0), mask=row_ok)


@triton.jit(do_not_specialize=_KNOB_ARGS)
def _policy_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    ref_ptr,
    cmap_ptr,
    delta_ptr,
    weight_ptr,
    log_seq_ratio_ptr,
    partials_ptr,
    B,
    T,
    n_col_blocks,
    n_calls,
    clip_lo_bits,
    clip_hi_bits,
    dual_c_bits,
    tau_pos_bits,
    tau_neg_bits,
    kl_coef_bits,
    norm_bits,
    ALGO: tl.constexpr,
    USE_DUAL: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_TYPE: tl.constexpr,
    HAS_CALLS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr,
    COMPUTE: tl.constexpr,
    SEQ_RATIO: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Per-token loss and flags, summed over the tile's columns into per-row partials.

    ``r = exp(clamp(logp - old_logp, -20, 20))`` (GSPO: ``exp(min(log s_i, 10))``);
    PPO clip ``l = max(-a r, -a clamp(r, lo, hi))``, dual clip ``min(l, -a c)`` for
    ``a < 0``; SAPO ``l = -a sigmoid(tau (r - 1)) 4 / tau``; plus ``kl_coef * k``.
    """
    rows, row_ok, col_block, offsets, in_bounds = _tile_index(B, T, n_col_blocks, BLOCK_B, BLOCK_T)
    m = tl.load(mask_ptr + offsets, mask=in_bounds, other=0).to(COMPUTE)
    live = in_bounds & (m != 0.0)  # masked tokens read their inputs as 0, whatever they hold
    x = tl.load(logp_ptr + offsets, mask=live, other=0.0).to(COMPUTE)
    adv, lifted = _load_advantage(
        adv_ptr,
        cmap_ptr,
        delta_ptr,
        weight_ptr,
        rows,
        row_ok,
        offsets,
        in_bounds,
        n_calls,
        COMPUTE,
        ADV_PER_TOKEN,
        HAS_CALLS,
        HAS_WEIGHT,
        BLOCK_B,
        BLOCK_T,
    )
    adv = tl.where(live, adv, 0.0)

    x_old = tl.load(old_ptr + offsets, mask=live, other=0.0).to(COMPUTE)
    log_ratio = tl.minimum(tl.maximum(x - x_old, -20.0), 20.0)
    if SEQ_RATIO:  # GSPO, GSPO-seq: the row's ratio s_i
        log_seq = tl.load(log_seq_ratio_ptr + rows, mask=row_ok, other=0.0)
        ratio = tl.broadcast_to(_exp(tl.minimum(log_seq, 10.0))[:, None], [BLOCK_B, BLOCK_T])
    else:
        ratio = _exp(log_ratio)

    dual = tl.zeros([BLOCK_B, BLOCK_T], tl.int1)
    if ALGO == _SAPO:
        tau = tl.where(adv > 0, _knob(tau_pos_bits, COMPUTE), _knob(tau_neg_bits, COMPUTE))
        gate = 1.0 / (1.0 + _exp(-(tau * (ratio - 1.0))))
        loss_tok = -adv * gate * (4.0 / tau)
        clipped = tl.zeros([BLOCK_B, BLOCK_T], tl.int1)
    else:
        clip_lo = _knob(clip_lo_bits, COMPUTE)
        clip_hi = _knob(clip_hi_bits, COMPUTE)
        unclipped_loss = -adv * ratio
        clipped_loss = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
        loss_tok = tl.maximum(unclipped_loss, clipped_loss)
        clipped = clipped_loss > unclipped_loss
        if USE_DUAL:
            dual_loss = -adv * _knob(dual_c_bits, COMPUTE)
            negative = adv < 0
            dual = negative & (dual_loss < loss_tok)
            loss_tok = tl.where(negative, tl.minimum(loss_tok, dual_loss), loss_tok)

    kl = tl.zeros([BLOCK_B, BLOCK_T], COMPUTE)
    if HAS_REF:
        x_ref = tl.load(ref_ptr + offsets, mask=live, other=0.0).to(COMPUTE)
        d = x_ref - x
        if KL_TYPE == _K1:
            kl = -d
        elif KL_TYPE == _K2:
            kl = 0.5 * d * d
        else:
            d = tl.minimum(tl.maximum(d, -20.0), 20.0)
            kl = tl.minimum(tl.maximum(_exp(d) - d - 1.0, -10.0), 10.0)
        loss_tok = loss_tok + _knob(kl_coef_bits, COMPUTE) * kl

    out = partials_ptr + (rows * n_col_blocks + col_block) * _N_PARTIALS
    tl.store(out + 0, tl.sum(m, axis=1), mask=row_ok)
    tl.store(out + 1, tl.sum(loss_tok * m, axis=1), mask=row_ok)
    tl.store(out + 2, tl.sum(clipped.to(COMPUTE) * m, axis=1), mask=row_ok)
    tl.store(out + 3, tl.sum(ratio * m, axis=1), mask=row_ok)
    tl.store(out + 4, tl.sum(kl * m, axis=1), mask=row_ok)
    tl.store(out + 5, tl.sum(lifted.to(COMPUTE) * m, axis=1), mask=row_ok)
    tl.store(out + 6, tl.sum(dual.to(COMPUTE) * m, axis=1), mask=row_ok)
    tl.store(out + 7, tl.sum(-log_ratio * m, axis=1), mask=row_ok)


@triton.jit
def _tie_split(x, y):
    """d max(x, y) / dx as torch defines it: 1 if x > y, 1/2 on an exact tie, else 0."""
    return tl.where(x > y, 1.0, tl.where(x == y, 0.5, 0.0))


@triton.jit(do_not_specialize=_KNOB_ARGS)
def _policy_loss_bwd_kernel(
    grad_loss_ptr,
    logp_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    ref_ptr,
    cmap_ptr,
    delta_ptr,
    weight_ptr,
    row_tokens_ptr,
    log_seq_ratio_ptr,
    denom_ptr,
    seq_grad_ptr,
    grad_ptr,
    B,
    T,
    n_col_blocks,
    n_calls,
    clip_lo_bits,
    clip_hi_bits,
    dual_c_bits,
    tau_pos_bits,
    tau_neg_bits,
    kl_coef_bits,
    norm_bits,
    ALGO: tl.constexpr,
    USE_DUAL: tl.constexpr,
    HAS_REF: tl.constexpr,
    KL_TYPE: tl.constexpr,
    AGG: tl.constexpr,
    HAS_CALLS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr,
    COMPUTE: tl.constexpr,
    SEQ_RATIO: tl.constexpr,
    SEQ_PHASE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``grad_logp = grad_loss * w_i * m * d loss_tok / d logp``, torch autograd's rules.

    Row weight ``w_i`` (``D`` = token count or non-empty-row count, or the global count):
    token-mean ``1/D``; token-sum ``1/D`` (``D`` = the global count or 1); seq-mean-token-mean ``[n_i > 0] / (D max(n_i, 1))``;
    seq-mean-token-sum ``[n_i > 0] / D``; -norm ``[n_i > 0] / (D norm)``.

    Chain, with ``g = d loss / d loss_tok``:
    ``max(u, v)`` sends ``g`` to the larger operand, ``g/2`` to each on an exact tie;
    ``clamp`` passes the gradient on its closed range and zeroes it outside;
    ``d r / d logp = r [-20 <= logp - old <= 20]`` (GSPO: ``r [log s_i <= 10]``, the
    sequence ratio being detached); SAPO ``d l / d r = -a 4 s (1 - s)``; KL with
    ``d = ref - logp``: k1 ``+1``, k2 ``-d``, k3 ``-(e^d - 1)`` inside both clamps.
    """
    rows, row_ok, col_block, offsets, in_bounds = _tile_index(B, T, n_col_blocks, BLOCK_B, BLOCK_T)
    # row weight times the incoming gradient, in the order autograd applies them
    grad_loss = tl.load(grad_loss_ptr).to(COMPUTE)
    denom = tl.load(denom_ptr).to(COMPUTE)
    row_grad = tl.zeros([BLOCK_B], COMPUTE) + grad_loss / denom
    if AGG != _TOKEN_MEAN and AGG != _TOKEN_SUM:
        n = tl.load(row_tokens_ptr + rows, mask=row_ok, other=0.0)
        row_grad = tl.where(n > 0, row_grad, 0.0)
        if AGG == _SEQ_MEAN_TOKEN_MEAN:
            row_grad = row_grad / tl.maximum(n, 1.0)
        elif AGG == _SEQ_MEAN_TOKEN_SUM_NORM:
            row_grad = row_grad / _knob(norm_bits, COMPUTE)

    m = tl.load(mask_ptr + offsets, mask=in_bounds, other=0).to(COMPUTE)
    live = in_bounds & (m != 0.0)  # masked tokens read their inputs as 0, whatever they hold
    x = tl.load(logp_ptr + offsets, mask=live, other=0.0).to(COMPUTE)
    adv, _ = _load_advantage(
        adv_ptr,
        cmap_ptr,
        delta_ptr,
        weight_ptr,
        rows,
        row_ok,
        offsets,
        in_bounds,
        n_calls,
        COMPUTE,
        ADV_PER_TOKEN,
        HAS_CALLS,
        HAS_WEIGHT,
        BLOCK_B,
        BLOCK_T,
    )
    adv = tl.where(live, adv, 0.0)
    g = row_grad[:, None] * m  # d loss / d loss_tok

    if SEQ_RATIO:
        log_seq = tl.load(log_seq_ratio_ptr + rows, mask=row_ok, other=0.0)
        ratio = tl.broadcast_to(_exp(tl.minimum(log_seq, 10.0))[:, None], [BLOCK_B, BLOCK_T])
        ratio_passes = tl.broadcast_to((log_seq <= 10.0)[:, None], [BLOCK_B, BLOCK_T])
    else:
        x_old = tl.load(old_ptr + offsets, mask=live, other=0.0).to(COMPUTE)
        lr = x - x_old
        ratio = _exp(tl.minimum(tl.maximum(lr, -20.0), 20.0))
        ratio_passes = (lr >= -20.0) & (lr <= 20.0)

    if ALGO == _SAPO:
        tau = tl.where(adv > 0, _knob(tau_pos_bits, COMPUTE), _knob(tau_neg_bits, COMPUTE))
        gate = 1.0 / (1.0 + _exp(-(tau * (ratio - 1.0))))
        grad_gate = g * (4.0 / tau) * -adv
        grad_ratio = grad_gate * (1.0 - gate) * gate * tau
    else:
        clip_lo = _knob(clip_lo_bits, COMPUTE)
        clip_hi = _knob(clip_hi_bits, COMPUTE)
        unclipped_loss = -adv * ratio
        clipped_loss = -adv * tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
        loss_tok = tl.maximum(unclipped_loss, clipped_loss)
        grad_max = g
        if USE_DUAL:
            dual_loss = -adv * _knob(dual_c_bits, COMPUTE)
            # min(l, l3) is max's mirror: l keeps g when l < l3, g/2 on a tie
            grad_max = tl.where(adv < 0, g * _tie_split(dual_loss, loss_tok), g)
        grad_unclipped = grad_max * _tie_split(unclipped_loss, clipped_loss)
        grad_clipped = grad_max * _tie_split(clipped_loss, unclipped_loss)
        in_clip_range = (ratio >= clip_lo) & (ratio <= clip_hi)
        grad_ratio = grad_unclipped * -adv + tl.where(in_clip_range, grad_clipped * -adv, 0.0)

    if ALGO == _GSPO_SEQ:
        # log s_i = sum_t m_t clamp(lr_t, +-20) / n_i: every token of the row moves the ratio.
        # Phase 1 writes the tile's sum of d loss / d r (g included); phase 2 reads the row's
        # total S_i and writes S_i * dr/dlog s * m_t [|lr_t| <= 20] / n_i (plus the KL term).
        if SEQ_PHASE == 1:
            seq_partial = tl.sum(tl.where(live, grad_ratio, 0.0), axis=1)
            tl.store(seq_grad_ptr + rows * n_col_blocks + col_block, seq_partial, mask=row_ok)
        n_row = tl.maximum(tl.load(row_tokens_ptr + rows, mask=row_ok, other=1.0), 1.0)
        if SEQ_PHASE == 2:
            seq_total = tl.load(seq_grad_ptr + rows, mask=row_ok, other=0.0)
        else:
            seq_total = tl.zeros([BLOCK_B], COMPUTE)
        x_old = tl.load(old_ptr + offsets, mask=live, other=0.0).to(COMPUTE)
        lr = x - x_old
        lr_passes = (lr >= -20.0) & (lr <= 20.0)
        per_row = (seq_total / n_row)[:, None] * ratio
        grad_x = tl.where(ratio_passes & lr_passes, per_row * m, 0.0)
    else:
        grad_x = tl.where(ratio_passes, grad_ratio * ratio, 0.0)

    if HAS_REF:
        x_ref = tl.load(ref_ptr + offsets, mask=live, other=0.0).to(COMPUTE)
        d = x_ref - x
        grad_kl = g * _knob(kl_coef_bits, COMPUTE)
        if KL_TYPE == _K1:
            grad_x += grad_kl
        elif KL_TYPE == _K2:
            grad_x -= grad_kl * d
        else:
            d_clamped = tl.minimum(tl.maximum(d, -20.0), 20.0)
            exp_d = _exp(d_clamped)
            k3 = exp_d - d_clamped - 1.0
            k3_passes = (k3 >= -10.0) & (k3 <= 10.0) & (d >= -20.0) & (d <= 20.0)
            grad_x -= tl.where(k3_passes, grad_kl * exp_d - grad_kl, 0.0)

    grad_x = tl.where(live, grad_x, 0.0)  # exactly 0 at masked tokens, whatever grad_loss is
    if SEQ_PHASE != 1:
        tl.store(grad_ptr + offsets, grad_x.to(grad_ptr.dtype.element_ty), mask=in_bounds)


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------


def _alloc(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype) -> Tensor:
    """Output buffer; NaN-filled when interpreting, so that tests catch unwritten entries."""
    if _INTERPRET:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _tiles(B: int, T: int) -> tuple[int, int, int, int]:
    """``(BLOCK_B, BLOCK_T, column blocks, num_warps)`` for a ``(B, T)`` batch."""
    block_t = min(triton.next_power_of_2(max(T, 1)), _MAX_BLOCK_T)
    block_b = min(triton.next_power_of_2(max(B, 1)), max(1, _TILE_TOKENS // block_t))
    num_warps = 8 if block_b * block_t >= 2048 else 4
    return block_b, block_t, triton.cdiv(T, block_t), num_warps


def _prepare(call: dict) -> tuple[Tensor, ...]:
    """Contiguous kernel operands of a bound call, in the order of its tensors; a bool mask is
    read as bytes, absent tensors as ``logp``."""
    logp = call["logp"]
    old_logp, advantages, mask, ref_logp, call_map, call_delta, weight = _args.loss_tensors(call)
    mask = mask.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    has_calls = call_map is not None and call_delta is not None and call_delta.numel() > 0
    return (
        logp.contiguous(),
        old_logp.contiguous(),
        advantages.contiguous(),
        mask,
        logp if ref_logp is None else ref_logp.contiguous(),  # placeholder, never read
        call_map.contiguous() if has_calls else logp,
        call_delta.contiguous() if has_calls else logp,
        logp if weight is None else weight.contiguous(),
    )


def _flags(call: dict) -> dict:
    """The compile-time switches shared by the forward and backward kernels."""
    logp, call_delta, algo = call["logp"], call["call_delta"], call["algo"]
    return dict(
        ALGO=ALGO_IDS[algo],
        USE_DUAL=algo == "grpo" and call["dual_clip_c"] > 1.0,
        HAS_REF=call["ref_logp"] is not None,
        KL_TYPE=KL_IDS[call["kl_type"]],
        HAS_CALLS=call["call_map"] is not None
        and call_delta is not None
        and call_delta.numel() > 0,
        HAS_WEIGHT=call["importance_weight"] is not None,
        ADV_PER_TOKEN=call["advantages"].dim() == 2,
        COMPUTE=tl.float64 if logp.dtype == torch.float64 else tl.float32,
        SEQ_RATIO=algo in ("gspo", "gspo-seq"),
    )


def _knob_bits(call: dict) -> dict:
    """The float knobs as the bits of doubles; the clip bounds are formed in double on the
    host, as the reference's Python does."""
    T, norm_const = call["logp"].shape[1], call["norm_const"]
    return dict(
        clip_lo_bits=_f64_bits(1.0 - call["eps_low"]),
        clip_hi_bits=_f64_bits(1.0 + call["eps_high"]),
        dual_c_bits=_f64_bits(call["dual_clip_c"]),
        tau_pos_bits=_f64_bits(call["tau_pos"]),
        tau_neg_bits=_f64_bits(call["tau_neg"]),
        kl_coef_bits=_f64_bits(call["kl_coef"]),
        norm_bits=_f64_bits(float(max(T, 1) if norm_const is None else norm_const)),
    )


def _row_stats(
    logp: Tensor, old_logp: Tensor, mask: Tensor, gspo: bool, compute: tl.dtype
) -> tuple[Tensor, Tensor]:
    """``(B,)`` mask weight per row and, for GSPO, the ``(B,)`` sequence log-ratio."""
    B, T = logp.shape
    row_tokens = _alloc((B,), logp, logp.dtype)
    log_seq_ratio = _alloc((B,), logp, logp.dtype) if gspo else row_tokens  # never written
    if B == 0:
        return row_tokens, log_seq_ratio
    block_t = min(triton.next_power_of_2(max(T, 1)), _MAX_BLOCK_T)
    block_b = min(triton.next_power_of_2(B), max(1, _TILE_TOKENS // block_t))
    _row_stats_kernel[(triton.cdiv(B, block_b),)](
        logp,
        old_logp,
        mask,
        row_tokens,
        log_seq_ratio,
        B,
        T,
        GSPO=gspo,
        COMPUTE=compute,
        BLOCK_B=block_b,
        BLOCK_T=block_t,
        num_warps=4,
    )
    return row_tokens, log_seq_ratio


def _loss_denominator(row_tokens: Tensor, agg: str, global_count: float | None) -> Tensor:
    """``(1,)`` device tensor: the denominator of the aggregation.

    The global count if given, else the total mask weight (token-mean), 1 (token-sum) or the
    number of non-empty rows (seq-mean modes), at least 1.
    """
    if global_count is not None:
        return torch.full((1,), global_count, dtype=row_tokens.dtype, device=row_tokens.device)
    if agg == "token-sum":
        return torch.ones((1,), dtype=row_tokens.dtype, device=row_tokens.device)
    if agg == "token-mean":
        return row_tokens.sum().clamp(min=1).reshape(1)
    return (row_tokens > 0).sum().clamp(min=1).to(row_tokens.dtype).reshape(1)


def _aggregate_rows(
    row_loss: Tensor, row_tokens: Tensor, denom: Tensor, T: int, agg: str, norm_const: float | None
) -> Tensor:
    """The reference's aggregation, applied to the per-row sums of ``L`` and of ``m``."""
    if agg in ("token-mean", "token-sum"):
        return row_loss.sum() / denom[0]
    nonempty = (row_tokens > 0).to(row_loss.dtype)
    if agg == "seq-mean-token-mean":
        rows = row_loss / row_tokens.clamp(min=1)
    elif agg == "seq-mean-token-sum":
        rows = row_loss
    else:
        rows = row_loss / (max(T, 1) if norm_const is None else norm_const)
    return (rows * nonempty).sum() / denom[0]


def _bind(args: tuple, kwargs: dict, validate: bool = True) -> dict:
    """The bound arguments of a ``tapo::policy_loss(_backward)`` call, validated."""
    call = _args.bind("policy_loss", args, kwargs)
    if validate:
        _checks.check_policy_loss(call["logp"], _args.loss_tensors(call), _args.loss_knobs(call))
    return call


def policy_loss_triton(*args, validated: bool = False, **kwargs) -> tuple[Tensor, Tensor]:
    """``tapo::policy_loss`` on CUDA (or on CPU tensors under ``TRITON_INTERPRET=1``).

    ``validated=True``: the caller has checked every argument (the fused front ends).

    Returns ``(loss, metrics)``: the scalar loss in ``logp``'s dtype and the ``(6,)``
    float32 metrics ordered as ``METRIC_NAMES``, equal to
    ``tapo_kernels.reference.policy_loss``.
    """
    call = _bind(args, kwargs, validate=not validated)
    logp, agg = call["logp"], call["agg"]
    B, T = logp.shape
    flags = _flags(call)
    operands = _prepare(call)
    x, x_old, _, m = operands[:4]
    block_b, block_t, n_col_blocks, num_warps = _tiles(B, T)

    if flags["SEQ_RATIO"]:
        _, log_seq_ratio = _row_stats(x, x_old, m, True, flags["COMPUTE"])
    else:
        log_seq_ratio = logp  # placeholder, never read
    partials = _alloc((B, n_col_blocks, _N_PARTIALS.value), logp, logp.dtype)
    grid = (triton.cdiv(B, block_b) * n_col_blocks,)
    if grid[0] > 0:
        _policy_loss_fwd_kernel[grid](
            *operands,
            log_seq_ratio,
            partials,
            B,
            T,
            n_col_blocks,
            call["call_delta"].numel() if flags["HAS_CALLS"] else 0,
            **_knob_bits(call),
            **flags,
            BLOCK_B=block_b,
            BLOCK_T=block_t,
            num_warps=num_warps,
        )
    row_sums = partials.sum(1)  # [B, 8]
    row_tokens, row_loss = row_sums[:, 0], row_sums[:, 1]
    denom = _loss_denominator(row_tokens, agg, call["global_count"])
    loss = _aggregate_rows(row_loss, row_tokens, denom, T, agg, call["norm_const"])
    metrics = (row_sums[:, 2:].sum(0) / row_tokens.sum().clamp(min=1)).to(torch.float32)
    return loss, metrics


def policy_loss_backward_triton(grad_loss: Tensor, *args, **kwargs) -> Tensor:
    """``tapo::policy_loss_backward``: ``grad_loss * d loss / d logp``, shape and dtype of ``logp``.

    Equal to torch autograd through ``tapo_kernels.reference.policy_loss`` (tie and clamp
    conventions included). Recomputes every intermediate from the inputs, and validates them
    as the forward does (a direct call of the backward gets the same errors).
    """
    call = _bind(args, kwargs)
    logp = call["logp"]
    B, T = logp.shape
    flags = _flags(call)
    operands = _prepare(call)
    x, x_old, _, m = operands[:4]
    block_b, block_t, n_col_blocks, num_warps = _tiles(B, T)

    grad_logp = _alloc((B, T), logp, logp.dtype)
    grid = (triton.cdiv(B, block_b) * n_col_blocks,)
    if grid[0] == 0:
        return grad_logp
    row_tokens, log_seq_ratio = _row_stats(x, x_old, m, flags["SEQ_RATIO"], flags["COMPUTE"])
    denom = _loss_denominator(row_tokens, call["agg"], call["global_count"])
    grad_loss = grad_loss.to(device=logp.device, dtype=logp.dtype).reshape(1)

    def launch(seq_grad: Tensor, phase: int) -> None:
        _policy_loss_bwd_kernel[grid](
            grad_loss,
            *operands,
            row_tokens,
            log_seq_ratio,
            denom,
            seq_grad,
            grad_logp,
            B,
            T,
            n_col_blocks,
            call["call_delta"].numel() if flags["HAS_CALLS"] else 0,
            **_knob_bits(call),
            **flags,
            AGG=AGG_IDS[call["agg"]],
            SEQ_PHASE=phase,
            BLOCK_B=block_b,
            BLOCK_T=block_t,
            num_warps=num_warps,
        )

    if call["algo"] == "gspo-seq":  # two launches: the rows' sums of d loss / d r, then the grad
        partials = _alloc((B, n_col_blocks), logp, logp.dtype)
        launch(partials, 1)
        launch(partials.sum(1), 2)
    else:
        launch(logp, 0)  # placeholder, never read
    return grad_logp
