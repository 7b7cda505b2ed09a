# Triton CUDA kernels of tapo::policy_loss_from_logits / _from_hidden (docs/math.md, section 5).
#
# Design trade-off. The selective log-softmax is a pure streaming pass over the logits: per token
# one read of V logits for the forward, one read and one write for the backward, everything
# else is (B, T)-sized. So the kernels are row loops over the vocabulary in BLOCK_V slices with an
# online log-sum-exp in fp32 (no second pass, no fp32 copy of the logits), on a persistent 1-D
# grid (a bounded number of programs, each looping over rows), so any number of tokens works
# (one program per token on a 2-D grid breaks at T >= 65,536 on CUDA's y limit). Sized for
# RL vocabularies V = 32k..256k: BLOCK_V = 8192 with 8 warps (32 contiguous elements per
# thread), 8 programs per SM. Chosen by `python -m benchmarks.gpu.tune` on an H200 (Triton 3.6,
# 8192 tokens x 151,936 bf16, 36 combinations of BLOCK_V 2048/4096/8192, 4/8/16 warps, 2/4/8
# programs per SM, side by side): forward 0.666 ms against 0.756 ms for the former 4096 / 8 / 8
# (the floor, one read of the logits at 4.3 TB/s, is 0.58 ms); the backward's best three
# (1.25-1.27 ms) were within the sweep's noise of each other, this one among them.
# A temperature other than 1 divides with div_rn,
# as torch does, so logp matches the reference bit for bit in the interpreter.
# Out-of-range vocabulary columns are loaded as -inf (0 would inflate the log-sum-exp), and the
# backward recovers the log-sum-exp as x[label] - logp from the forward's fp32 log-probability,
# so nothing (B, T, V)-sized is saved. Rows whose gradient is 0 (every token outside the mask)
# are written as zeros without reading their logits.
# The hidden-state path keeps cuBLAS for the two GEMMs and runs these kernels on one chunk of
# logits at a time; the backward writes dlogits into the chunk's own buffer before the GEMMs.

"""Triton kernels of the policy loss from logits and from hidden states.

Kernels:

* ``_logprob_fwd_kernel``: per token, ``lse = log sum_v exp(x_v)`` online over vocabulary
  blocks (``m' = max(m, max_blk x)``, ``d' = d e^{m - m'} + sum_blk e^{x - m'}``, and for the
  entropy ``s' = s e^{m - m'} + sum_blk x e^{x - m'}``), then ``logp = x[label] - lse`` and
  ``H = lse - s / d``; ``x = logits / temperature`` in fp32.
* ``_logprob_bwd_kernel``: per token, ``dx_v = g ([v = label] - e^{x_v - lse}) / temperature``
  with ``lse = x[label] - logp``, stored in the logits' dtype (optionally over the logits).

The launchers validate inputs, launch the kernels and hand the fp32 log-probabilities to the
Triton policy loss (``ops/policy_loss.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import fused, vocab
from .policy_loss import policy_loss_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_MAX_BLOCK_V = 8192
_PROGRAMS_PER_SM = 8  # resident rows per SM of the persistent grid
_INTERPRET_PROGRAMS = 3  # a few programs under the interpreter, so each loops over several rows
# the running max starts here, not at -inf: exp(-inf - floor) = 0, never exp(-inf + inf) = NaN
_M_FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _scaled(raw, temperature, HAS_TEMPERATURE: tl.constexpr):
    """``raw / temperature`` in fp32, correctly rounded (as torch divides)."""
    x = raw.to(tl.float32)
    if HAS_TEMPERATURE:
        x = tl.math.div_rn(x, temperature)
    return x


@triton.jit
def _store_grad(ptrs, dx, mask, ROUND_BF16_BY_BITS: tl.constexpr):
    """Store fp32 ``dx`` in the pointer's dtype, rounding to nearest even.

    The interpreter truncates fp32 -> bf16 casts, so there the rounding is done on the bits
    (``+0x7FFF + lsb``, then keep the high half); compiled, the cast is ``cvt.rn``.
    """
    if ROUND_BF16_BY_BITS:
        bits = dx.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(ptrs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, dx.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _row_offset(row, T, stride_b, stride_t):
    """``(row as int64, element offset of token row (row // T, row % T))`` of a (B, T, V)
    tensor with these batch and token strides."""
    row64 = tl.cast(row, tl.int64)
    b = row64 // T
    return row64, b * stride_b + (row64 - b * T) * stride_t


@triton.jit
def _logprob_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logp_ptr,
    entropy_ptr,
    n_rows,
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    temperature,
    HAS_TEMPERATURE: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Log-probability (and entropy) of each row of ``(B, T, V)`` logits, online over V.

    Program ``p`` handles rows ``p, p + P, p + 2P, ...``; row ``r`` is token ``(r // T, r % T)``
    (any batch and token strides, so a sliced ``logits[:, :-1]`` is read in place).
    """
    pid, n_programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_V)
    for row in range(pid, n_rows, n_programs):
        row64, offset = _row_offset(row, T, stride_b, stride_t)
        base = logits_ptr + offset
        m = tl.full((), _M_FLOOR, tl.float32)
        denom = tl.zeros((), tl.float32)
        sum_px = tl.zeros((), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            in_vocab = offs < V
            # -inf, not 0, for columns past V: they must vanish from the sum of exponentials
            raw = tl.load(base + offs.to(tl.int64) * stride_v, mask=in_vocab, other=float("-inf"))
            x = _scaled(raw, temperature, HAS_TEMPERATURE)
            m_new = tl.maximum(m, tl.max(x, 0))
            rescale = tl.exp(m - m_new)
            p = tl.exp(x - m_new)
            denom = denom * rescale + tl.sum(p, 0)
            if WITH_ENTROPY:
                # a -inf logit has p = 0 and contributes 0 (not 0 * -inf = NaN)
                finite_x = tl.where(x > float("-inf"), x, 0.0)
                sum_px = sum_px * rescale + tl.sum(p * finite_x, 0)
            m = m_new
        lse = m + tl.log(denom)
        label = tl.load(labels_ptr + row64)
        valid = label >= 0
        picked = _scaled(
            tl.load(base + tl.maximum(label, 0) * stride_v), temperature, HAS_TEMPERATURE
        )
        tl.store(logp_ptr + row64, tl.where(valid, picked - lse, 0.0))
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row64, tl.where(valid, lse - sum_px / denom, 0.0))


@triton.jit
def _logprob_bwd_kernel(
    grad_ptr,
    logits_ptr,
    labels_ptr,
    logp_ptr,
    grad_entropy_ptr,
    entropy_ptr,
    dlogits_ptr,
    n_rows,
    T,
    V,
    stride_b,
    stride_t,
    stride_v,
    dstride_b,
    dstride_t,
    dstride_v,
    temperature,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    ROUND_BF16_BY_BITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``dlogits = g (onehot(label) - softmax(x)) / temperature``, one row per loop step.

    With ``HAS_ENTROPY`` (``h`` = d loss / d entropy, ``H`` the forward's entropy) the row's
    gradient is that of ``g logp + h H``: ``(g onehot - p (g + h (log p + H))) / temperature``.

    ``dlogits_ptr`` may be ``logits_ptr`` (in place): each block is read before it is written
    and the label's logit is read before the loop. ``lse = x[label] - logp`` is recovered from
    the forward's output. Rows with ``g == 0`` or a negative label get zeros.
    """
    pid, n_programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_V)
    for row in range(pid, n_rows, n_programs):
        row64, offset = _row_offset(row, T, stride_b, stride_t)
        base = logits_ptr + offset
        dbase = dlogits_ptr + _row_offset(row, T, dstride_b, dstride_t)[1]
        g = tl.load(grad_ptr + row64)
        label = tl.load(labels_ptr + row64)
        h = 0.0
        entropy = 0.0
        if HAS_ENTROPY:
            h = tl.load(grad_entropy_ptr + row64)
            entropy = tl.load(entropy_ptr + row64)
        if (label >= 0) & ((g != 0.0) | (h != 0.0)):
            picked = _scaled(tl.load(base + label * stride_v), temperature, HAS_TEMPERATURE)
            lse = picked - tl.load(logp_ptr + row64)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + cols
                in_vocab = offs < V
                raw = tl.load(
                    base + offs.to(tl.int64) * stride_v, mask=in_vocab, other=float("-inf")
                )
                x = _scaled(raw, temperature, HAS_TEMPERATURE)
                if HAS_ENTROPY:
                    log_p = x - lse
                    p = tl.exp(log_p)
                    # p = 0 (a -inf logit, the padding lanes) contributes 0, not 0 * -inf
                    log_p = tl.where(p > 0.0, log_p, 0.0)
                    minus_gp = -(p * (g + h * (log_p + entropy)))
                else:
                    minus_gp = -g * tl.exp(x - lse)
                dx = tl.where(offs == label, g + minus_gp, minus_gp)
                if HAS_TEMPERATURE:
                    dx = tl.math.div_rn(dx, temperature)
                _store_grad(dbase + offs.to(tl.int64) * dstride_v, dx, in_vocab, ROUND_BF16_BY_BITS)
        else:
            zeros = tl.zeros((BLOCK_V,), dlogits_ptr.dtype.element_ty)
            for v0 in range(0, V, BLOCK_V):
                offs = v0 + cols
                tl.store(dbase + offs.to(tl.int64) * dstride_v, zeros, mask=offs < V)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------


def _launch_config(
    n_rows: int, V: int, device: torch.device, block_v: int | None
) -> tuple[tuple[int], int, int]:
    """``(grid, BLOCK_V, num_warps)`` of the persistent row loop."""
    block = block_v or min(triton.next_power_of_2(V), _MAX_BLOCK_V)
    num_warps = 8 if block >= 2048 else 4
    if _INTERPRET or device.type != "cuda":
        programs = _INTERPRET_PROGRAMS
    else:
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        programs = sm_count * _PROGRAMS_PER_SM
    return (max(1, min(n_rows, programs)),), block, num_warps


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def selective_log_softmax_triton(
    logits: Tensor,  # [B, T, V]
    labels: Tensor,  # [B, T] int64
    temperature: float = 1.0,
    with_entropy: bool = False,
    *,
    block_v: int | None = None,
) -> tuple[Tensor, Tensor]:
    """fp32 ``(B, T)`` log-probabilities and entropies (empty without ``with_entropy``).

    ``block_v`` overrides the vocabulary block (a power of two; tests use small blocks so
    that several blocks and a partial last one run under the interpreter).
    """
    B, T, V = logits.shape
    n_rows = B * T
    logp = torch.full((B, T), float("nan"), dtype=torch.float32, device=logits.device)
    entropy = torch.full_like(logp, float("nan")) if with_entropy else logp.new_empty((0,))
    if n_rows == 0:
        return logp, entropy
    flat_labels = labels.reshape(n_rows).contiguous()
    grid, block, num_warps = _launch_config(n_rows, V, logits.device, block_v)
    _logprob_fwd_kernel[grid](
        logits,
        flat_labels,
        logp,
        entropy if with_entropy else logp,
        n_rows,
        T,
        V,
        *_strides(logits),
        float(temperature),
        HAS_TEMPERATURE=temperature != 1.0,
        WITH_ENTROPY=with_entropy,
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return logp, entropy


def _dlogits_into(
    grad_logp: Tensor,
    logits: Tensor,
    labels: Tensor,
    logp: Tensor,
    temperature: float,
    out: Tensor,
    grad_entropy: Tensor | None = None,
    entropy: Tensor | None = None,
    *,
    block_v: int | None = None,
) -> None:
    """Launch the backward kernel writing ``dlogits`` of ``(B, T, V)`` logits into ``out``
    (with ``grad_entropy`` and ``entropy``: the gradient of ``g logp + h H``).

    In place (``out`` is ``logits``) the rows go in launches of at most one row per program.
    On an H200 (Triton 3.6), one in-place launch in which programs looped over several rows
    wrote wrong gradients for 4-7% of the rows after each program's first (8192 x 151,936,
    bf16 and fp32, BLOCK_V 1024 and 4096), while the same launch into a new tensor was
    exact; the rows of the first round were always right.
    """
    B, T, V = logits.shape
    n_rows = B * T
    if n_rows == 0:
        return
    grad = grad_logp.reshape(n_rows).contiguous()
    flat_labels = labels.reshape(n_rows).contiguous()
    flat_logp = logp.reshape(n_rows).contiguous()
    has_entropy = grad_entropy is not None
    if has_entropy:
        flat_h = grad_entropy.reshape(n_rows).contiguous()
        flat_entropy = entropy.reshape(n_rows).contiguous()
    grid, block, num_warps = _launch_config(n_rows, V, logits.device, block_v)
    if out.data_ptr() == logits.data_ptr() and n_rows > grid[0]:
        for rows, x in _row_chunks(logits, grid[0]):
            extra = (flat_h[rows], flat_entropy[rows]) if has_entropy else ()
            _dlogits_into(
                grad[rows],
                x,
                flat_labels[rows],
                flat_logp[rows],
                temperature,
                x,
                *extra,
                block_v=block_v,
            )
        return
    _logprob_bwd_kernel[grid](
        grad,
        logits,
        flat_labels,
        flat_logp,
        flat_h if has_entropy else grad,  # placeholders, never read without the entropy
        flat_entropy if has_entropy else grad,
        out,
        n_rows,
        T,
        V,
        *_strides(logits),
        *_strides(out),
        float(temperature),
        HAS_TEMPERATURE=temperature != 1.0,
        HAS_ENTROPY=has_entropy,
        ROUND_BF16_BY_BITS=_INTERPRET and out.dtype == torch.bfloat16,
        BLOCK_V=block,
        num_warps=num_warps,
    )


def _row_chunks(logits: Tensor, rows_per_chunk: int):
    """``(slice of flat rows, (1, n, V) view of those rows)`` covering ``logits`` in order."""
    B, T, V = logits.shape
    stride_b, stride_t, stride_v = _strides(logits)
    if B == 1 or stride_b == T * stride_t:  # the (b, t) rows are one strided sequence
        for r0 in range(0, B * T, rows_per_chunk):
            n = min(rows_per_chunk, B * T - r0)
            view = logits.as_strided(
                (1, n, V),
                (n * stride_t, stride_t, stride_v),
                logits.storage_offset() + r0 * stride_t,
            )
            yield slice(r0, r0 + n), view
        return
    for b in range(B):
        for t0 in range(0, T, rows_per_chunk):
            n = min(rows_per_chunk, T - t0)
            yield slice(b * T + t0, b * T + t0 + n), logits[b : b + 1, t0 : t0 + n]


def _with_block(block_v: int | None) -> fused.Passes:
    """The Triton passes with the backward's vocabulary block size fixed (None: automatic)."""

    return dataclasses.replace(
        TRITON, dlogits_rows=functools.partial(_dlogits_into, block_v=block_v)
    )


def selective_log_softmax_backward_triton(*args, block_v: int | None = None) -> Tensor:
    """``tapo::selective_log_softmax_backward``: a new ``dlogits`` in the logits' dtype."""
    return fused.selective_log_softmax_backward_kernel(*args, passes=_with_block(block_v))


def selective_log_softmax_backward_inplace_triton(*args, block_v: int | None = None) -> None:
    """``tapo::selective_log_softmax_backward_inplace``: overwrite ``logits`` with ``dlogits``."""
    fused.selective_log_softmax_backward_inplace_kernel(*args, passes=_with_block(block_v))


# --------------------------------------------------------------------------------------
# hidden-state path: cuBLAS GEMMs per chunk, the kernels above on each chunk of logits
# --------------------------------------------------------------------------------------


def _logprob_chunk_triton(
    logits: Tensor,
    labels: Tensor,
    temperature: float,
    logp_out: Tensor,
    entropy_out: Tensor | None,
    scratch: bool,
) -> None:
    logp, entropy = selective_log_softmax_triton(
        logits[None], labels[None], temperature, entropy_out is not None
    )
    logp_out.copy_(logp[0])
    if entropy_out is not None:
        entropy_out.copy_(entropy[0])


def _dlogits_chunk_triton(
    grad_logp: Tensor,
    logits: Tensor,
    labels: Tensor,
    logp: Tensor,
    temperature: float,
    scratch: bool,
    grad_entropy: Tensor | None = None,
    entropy: Tensor | None = None,
) -> Tensor:
    # a scratch chunk (recomputed logits) is overwritten with its own gradient
    out = logits if scratch else torch.empty_like(logits)
    extra = (grad_entropy[None], entropy[None]) if grad_entropy is not None else ()
    _dlogits_into(
        grad_logp[None], logits[None], labels[None], logp[None], temperature, out[None], *extra
    )
    return out


# the LM-head passes: the chunked loops of vocab.py with the Triton kernels on each chunk
_logprob_from_hidden_triton = functools.partial(
    vocab.selective_log_softmax_from_hidden_chunked, chunk_fn=_logprob_chunk_triton
)


_logprob_from_hidden_backward_triton = vocab.hidden_backward_pass(_dlogits_chunk_triton)


def _validated_loss(logp, *loss_tensors, **knobs):
    return policy_loss_triton(logp, *loss_tensors, **knobs, validated=True)


# the vocabulary passes and loss of the fused composites (fused.py), in Triton; also the CUDA
# kernels of the internal ops tapo::_logprob_rows & co.
TRITON = fused.Passes(
    logprob_rows=selective_log_softmax_triton,
    dlogits_rows=_dlogits_into,
    logprob_from_hidden=_logprob_from_hidden_triton,
    logprob_from_hidden_backward=_logprob_from_hidden_backward_triton,
    loss=_validated_loss,
)


def policy_loss_from_logits_triton(*args, **kwargs):
    """``tapo::policy_loss_from_logits`` with the Triton kernels (CUDA, or CPU tensors under
    ``TRITON_INTERPRET=1``): the composite of ``fused.py`` on these passes."""
    return fused.policy_loss_from_logits_kernel(*args, passes=TRITON, **kwargs)


def policy_loss_from_hidden_triton(*args, **kwargs):
    """``tapo::policy_loss_from_hidden``: cuBLAS GEMMs per chunk, the Triton passes on each
    chunk of logits (the backward writes dlogits into the chunk's own buffer)."""
    return fused.policy_loss_from_hidden_kernel(*args, passes=TRITON, **kwargs)


def selective_log_softmax_from_hidden_backward_triton(*args, **kwargs):
    """``tapo::selective_log_softmax_from_hidden_backward``: per chunk, recompute the logits
    (cuBLAS), overwrite them with ``dlogits`` (Triton), then ``dhidden = dlogits @ W`` and
    ``dW += dlogits^T @ h`` accumulated in fp32."""
    return fused.selective_log_softmax_from_hidden_backward_kernel(*args, passes=TRITON, **kwargs)
