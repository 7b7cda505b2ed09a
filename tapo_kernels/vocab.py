"""The vocabulary passes of the logits and hidden-state losses, in chunked torch ops.

Four passes, the kernels of the internal ops ``tapo::_logprob_rows``, ``_dlogits_rows``,
``_logprob_from_hidden`` and ``_logprob_from_hidden_backward`` on the CPU when the C++ build
(``csrc/logprob.cpp``) is absent (``_library.py`` registers them); any layout of the logits.
The chunk loops are shared with the Triton kernels (``ops/logprob_loss.py``), which pass
their own per-chunk kernels. The backward recovers the log-sum-exp from the saved
log-probability, ``lse = x[label] - logp``, so nothing ``(B, T, V)``-sized is saved and only
the logits are read again. The math: docs/math.md, section 5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

# Elements of one chunk of fp32 logits on the CPU (32 MiB per temporary). Measured on a shared
# 2-core x86 CPU (AVX512) at 4k tokens x V = 32k: the chunk GEMMs run about as fast as one full
# GEMM (22-42 GFLOP/s from 128 to 4096 rows at H = 128), while the row reductions slow down on
# short chunks (forward + backward 2.9 s at 128 rows per chunk, 2.1 s at 256, 1.8 s at 1024):
# 256 rows at V = 32k keeps most of the speed with small temporaries. CUDA chunks are larger
# because the GEMMs need tall inputs to fill the device (128k vocab: 512 tokens).
CPU_CHUNK_ELEMENTS = 1 << 23
CUDA_CHUNK_ELEMENTS = 1 << 26

# ``(logits (n, V), labels (n,), temperature, logp_out (n,), entropy_out (n,) or None,
# scratch)``: writes the fp32 log-probabilities (and entropies) of ``n`` rows of logits;
# ``scratch=True`` means the logits buffer belongs to the caller's loop and may be overwritten.
LogprobChunkFn = Callable[[Tensor, Tensor, float, Tensor, Tensor | None, bool], None]
# ``(grad_logp (n,), logits (n, V), labels (n,), logp (n,), temperature, scratch) -> dlogits``:
# with ``scratch=True`` the result may be the logits buffer itself, overwritten.
DlogitsChunkFn = Callable[[Tensor, Tensor, Tensor, Tensor, float, bool], Tensor]


def default_chunk_tokens(V: int, device: torch.device) -> int:
    """Tokens per chunk when ``chunk_size`` is not given: a fixed logits budget over ``V``."""
    budget = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, budget // max(V, 1))


def _row_blocks(chunk: int, *tensors: Tensor) -> Iterator[tuple[int, list[Tensor]]]:
    """``(first flat row, [(n, V) views])`` blocks of at most ``chunk`` rows of ``(B, T, V)`` tensors.

    Views only (never a copy), so writes into a block land in the tensor: a sliced tensor
    such as ``logits[:, :-1]`` that cannot be flattened is walked one batch row at a time
    (all tensors alike, so their blocks always line up).
    """
    B, T, V = tensors[0].shape
    try:
        flats = [t.view(B * T, V) for t in tensors]
    except RuntimeError:
        for b in range(B):
            for t0 in range(0, T, chunk):
                yield b * T + t0, [t[b, t0 : t0 + chunk] for t in tensors]
        return
    for start in range(0, B * T, chunk):
        yield start, [f[start : start + chunk] for f in flats]


# --------------------------------------------------------------------------------------
# per-chunk math in torch ops
# --------------------------------------------------------------------------------------


def _scaled_fp32(logits: Tensor, temperature: float, scratch: bool) -> tuple[Tensor, bool]:
    """``(logits.float() / temperature, owned)``, as the reference computes it.

    ``owned`` says whether the result may be overwritten: a new tensor, or the logits
    themselves when they are an fp32 scratch buffer (then divided in place).
    """
    if logits.dtype == torch.float32 and scratch:
        return (logits.div_(temperature) if temperature != 1.0 else logits), True
    if temperature != 1.0:
        return logits.float() / temperature, True
    if logits.dtype == torch.float32:
        return logits, False
    return logits.float(), True


def logprob_chunk_torch(
    logits: Tensor,
    labels: Tensor,
    temperature: float,
    logp_out: Tensor,
    entropy_out: Tensor | None,
    scratch: bool = False,
) -> None:
    """Selective log-softmax of ``n`` rows of logits, in fp32, written into the outputs.

    ``lse = m + log sum exp(x - m)`` with ``m`` the row max (as ``torch.logsumexp``), and the
    entropy ``log sum(e) - sum(e * (x - m)) / sum(e)`` with ``e = exp(x - m)``; a ``-inf`` logit
    contributes nothing to the entropy (rather than ``0 * -inf = NaN``).
    """
    x, owned = _scaled_fp32(logits, temperature, scratch)
    valid = labels >= 0
    picked = x.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    row_max = x.amax(-1, keepdim=True)
    # a row of -inf only: keep exp() away from (-inf) - (-inf)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    # without the entropy x is not needed after this: reuse its buffer when it is ours
    reuse = owned and entropy_out is None
    e = (x.sub_(row_max) if reuse else x - row_max).exp_()
    denom = e.sum(-1)
    lse = denom.log() + row_max.squeeze(-1)
    logp_out.copy_(torch.where(valid, picked - lse, torch.zeros_like(lse)))
    if entropy_out is not None:
        # on shifted logits: H = log sum e - sum(e * (x - m)) / sum e (no cancellation of m)
        mean_xs = (
            e.mul_(x - row_max)
            .nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
            .sum(-1)
        )
        entropy = denom.log() - mean_xs / denom
        entropy_out.copy_(torch.where(valid, entropy, torch.zeros_like(entropy)))


def dlogits_chunk_torch(
    grad_logp: Tensor,
    logits: Tensor,
    labels: Tensor,
    logp: Tensor,
    temperature: float,
    scratch: bool = False,
    grad_entropy: Tensor | None = None,
    entropy: Tensor | None = None,
) -> Tensor:
    """fp32 ``d loss / d logits = g (onehot(label) - softmax(x)) / temperature`` for ``n`` rows
    (with ``grad_entropy`` and ``entropy``: ``dlogits_entropy_chunk_torch``).

    ``softmax(x) = exp(x - lse)`` with ``lse = x[label] - logp`` recovered from the forward's
    log-probability. Rows with a negative label or ``g = 0`` get exactly zero, whatever their
    logits. Three passes over the chunk: subtract, exp, scale.
    """
    if grad_entropy is not None:
        return dlogits_entropy_chunk_torch(
            grad_logp, logits, labels, logp, temperature, scratch, grad_entropy, entropy
        )
    x, owned = _scaled_fp32(logits, temperature, scratch)
    # rows with g = 0 (masked tokens, ignored labels) get exact zeros whatever their logits
    valid = (labels >= 0) & (grad_logp != 0)
    index = labels.clamp(min=0)[:, None]
    g = torch.where(valid, grad_logp, torch.zeros_like(grad_logp))
    lse = x.gather(-1, index).squeeze(-1) - logp
    # exp(x - inf) = 0 on ignored rows, so no inf * 0 can appear there
    lse = torch.where(valid, lse, torch.full_like(lse, float("inf")))[:, None]
    d = (x.sub_(lse) if owned else x - lse).exp_().mul_(-g[:, None])  # -g * softmax
    if not bool(valid.all()):  # NaN or inf logits in a row with g = 0 must not leak
        d.masked_fill_(~valid[:, None], 0.0)
    d.scatter_add_(-1, index, g[:, None])
    if temperature != 1.0:
        d.div_(temperature)
    return d


def dlogits_entropy_chunk_torch(
    grad_logp: Tensor,
    logits: Tensor,
    labels: Tensor,
    logp: Tensor,
    temperature: float,
    scratch: bool,
    grad_entropy: Tensor,
    entropy: Tensor,
) -> Tensor:
    """fp32 ``d / d logits`` of ``sum g logp + sum h H`` for ``n`` rows (``h`` = ``grad_entropy``).

    With ``x = logits / temperature``, ``log p = x - lse`` and ``H = -sum p log p``:
    ``d logp / d x = onehot(label) - p`` and ``d H / d x = -p (log p + H)``, so
    ``d = g onehot - p (g + h (log p + H))``, divided by the temperature. ``lse`` comes from
    the forward's log-probability, ``H`` is the forward's entropy. Rows with a negative label,
    or with ``g = h = 0``, get exactly zero; a ``-inf`` logit (``p = 0``) gets zero.
    """
    x, owned = _scaled_fp32(logits, temperature, scratch)
    valid = labels >= 0
    g = torch.where(valid, grad_logp, torch.zeros_like(grad_logp))
    h = torch.where(valid, grad_entropy, torch.zeros_like(grad_entropy))
    live = valid & ((g != 0) | (h != 0))
    index = labels.clamp(min=0)[:, None]
    lse = x.gather(-1, index).squeeze(-1) - logp
    lse = torch.where(live, lse, torch.full_like(lse, float("inf")))[:, None]
    log_p = x.sub_(lse) if owned else x - lse
    p = log_p.exp()
    coef = log_p.add_(torch.where(live, entropy, torch.zeros_like(entropy))[:, None]).mul_(
        h[:, None]
    )
    d = coef.add_(g[:, None]).mul_(p).neg_()
    d = torch.where(p > 0, d, torch.zeros_like(d))  # p = 0: a -inf logit or an ignored row
    d.scatter_add_(-1, index, g[:, None])
    if temperature != 1.0:
        d.div_(temperature)
    return d


# --------------------------------------------------------------------------------------
# chunk loops (shared with the Triton launchers, which pass their own chunk kernels)
# --------------------------------------------------------------------------------------


def selective_log_softmax_chunked(
    logits: Tensor,  # [B, T, V]
    labels: Tensor,  # [B, T]
    temperature: float,
    with_entropy: bool,
    chunk_fn: LogprobChunkFn = logprob_chunk_torch,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """fp32 ``(B, T)`` log-probabilities and entropies (empty without ``with_entropy``)."""
    B, T, V = logits.shape
    logp = torch.full((B * T,), float("nan"), dtype=torch.float32, device=logits.device)
    entropy = torch.full_like(logp, float("nan")) if with_entropy else logp.new_empty((0,))
    flat_labels = labels.reshape(B * T)
    chunk = chunk_size or default_chunk_tokens(V, logits.device)
    for start, (rows,) in _row_blocks(chunk, logits):
        stop = start + rows.shape[0]
        chunk_fn(
            rows,
            flat_labels[start:stop],
            temperature,
            logp[start:stop],
            entropy[start:stop] if with_entropy else None,
            False,
        )
    return logp.view(B, T), entropy.view(B, T) if with_entropy else entropy


def selective_log_softmax_backward_chunked(
    grad_logp: Tensor,  # [B, T] fp32
    logits: Tensor,  # [B, T, V]
    labels: Tensor,
    logp: Tensor,
    temperature: float,
    out: Tensor,  # [B, T, V]: a new tensor, or ``logits`` itself to overwrite it
    chunk_fn: DlogitsChunkFn = dlogits_chunk_torch,
    chunk_size: int | None = None,
    extra: tuple[Tensor, ...] = (),
) -> None:
    """Write ``d loss / d logits`` into ``out`` chunk by chunk (``out`` may be ``logits``).

    ``extra``: more ``(B, T)`` tensors whose rows of the chunk are passed to ``chunk_fn``
    after its usual arguments (the entropy pass: ``grad_entropy``, ``entropy``)."""
    B, T, V = logits.shape
    g, lab, lp = grad_logp.reshape(B * T), labels.reshape(B * T), logp.reshape(B * T)
    flat_extra = [t.reshape(B * T) for t in extra]
    chunk = chunk_size or default_chunk_tokens(V, logits.device)
    for start, (rows, out_rows) in _row_blocks(chunk, logits, out):
        stop = start + rows.shape[0]
        d = chunk_fn(
            g[start:stop],
            rows,
            lab[start:stop],
            lp[start:stop],
            temperature,
            False,
            *(t[start:stop] for t in flat_extra),
        )
        if d.data_ptr() != out_rows.data_ptr():
            out_rows.copy_(d)


def _hidden_rows(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    B, T, H = hidden.shape
    return hidden.reshape(B * T, H), labels.reshape(B * T)


def selective_log_softmax_from_hidden_chunked(
    hidden: Tensor,  # [B, T, H]
    weight: Tensor,  # [V, H]
    bias: Tensor | None,  # [V]
    labels: Tensor,  # [B, T]
    temperature: float,
    with_entropy: bool,
    chunk_size: int | None,
    chunk_fn: LogprobChunkFn = logprob_chunk_torch,
) -> tuple[Tensor, Tensor]:
    """Log-probabilities (and entropies) of ``linear(hidden, weight, bias)`` one chunk at a time.

    Each chunk's logits are ``linear(h_chunk, weight, bias)`` in the input dtype, exactly the
    rows of the full logits the plain composition would build.
    """
    B, T, _ = hidden.shape
    V = weight.shape[0]
    h, lab = _hidden_rows(hidden, labels)
    logp = torch.full((B * T,), float("nan"), dtype=torch.float32, device=hidden.device)
    entropy = torch.full_like(logp, float("nan")) if with_entropy else logp.new_empty((0,))
    chunk = chunk_size or default_chunk_tokens(V, hidden.device)
    for start in range(0, B * T, chunk):
        stop = min(start + chunk, B * T)
        logits = torch.nn.functional.linear(h[start:stop], weight, bias)  # [n, V]
        chunk_fn(
            logits,
            lab[start:stop],
            temperature,
            logp[start:stop],
            entropy[start:stop] if with_entropy else None,
            True,  # the chunk's logits exist for this call only
        )
        del logits
    return logp.view(B, T), entropy.view(B, T) if with_entropy else entropy


def _addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with fp32 accumulation whatever the dtype of ``a`` and ``b``."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:  # cuBLAS accumulates low-precision inputs straight into fp32
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # pragma: no cover - torch without out_dtype
            pass
    acc.addmm_(a.float(), b.float())


def selective_log_softmax_from_hidden_backward_chunked(
    grad_logp: Tensor,  # [B, T] fp32: d loss / d logp
    hidden: Tensor,  # [B, T, H]
    weight: Tensor,  # [V, H]
    bias: Tensor | None,
    labels: Tensor,
    logp: Tensor,  # [B, T] fp32 from the forward
    temperature: float,
    chunk_size: int | None,
    weight_grad: bool,
    bias_grad: bool,
    chunk_fn: DlogitsChunkFn = dlogits_chunk_torch,
    extra: tuple[Tensor, ...] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dhidden, dweight, dbias)``; ``dweight`` / ``dbias`` are empty when not asked for.
    ``extra``: as ``selective_log_softmax_backward_chunked``.

    Per chunk: recompute the logits, ``dlogits = chunk_fn(...)``, then
    ``dhidden[chunk] = dlogits @ weight`` and ``dweight += dlogits^T @ hidden[chunk]``,
    ``dbias += sum dlogits`` in fp32 accumulators cast to the parameter dtype at the end.
    """
    B, T, H = hidden.shape
    V = weight.shape[0]
    h, lab = _hidden_rows(hidden, labels)
    g, lp = grad_logp.reshape(B * T), logp.reshape(B * T)
    flat_extra = [t.reshape(B * T) for t in extra]
    dhidden = torch.full_like(h, float("nan"))
    dweight32 = (
        torch.zeros((V, H), dtype=torch.float32, device=hidden.device) if weight_grad else None
    )
    want_bias = bias is not None and bias_grad
    dbias32 = torch.zeros((V,), dtype=torch.float32, device=hidden.device) if want_bias else None
    weights_by_dtype = {weight.dtype: weight}  # weight cast to the dlogits dtype, made once
    chunk = chunk_size or default_chunk_tokens(V, hidden.device)
    for start in range(0, B * T, chunk):
        stop = min(start + chunk, B * T)
        h_chunk = h[start:stop]
        logits = torch.nn.functional.linear(h_chunk, weight, bias)
        d = chunk_fn(
            g[start:stop],
            logits,
            lab[start:stop],
            lp[start:stop],
            temperature,
            True,
            *(t[start:stop] for t in flat_extra),
        )
        if d.dtype not in weights_by_dtype:
            weights_by_dtype[d.dtype] = weight.to(d.dtype)
        dhidden[start:stop] = d @ weights_by_dtype[d.dtype]
        if dweight32 is not None:
            _addmm_fp32_(dweight32, d.T, h_chunk if d.dtype == h.dtype else h_chunk.to(d.dtype))
        if dbias32 is not None:
            dbias32 += d.sum(0, dtype=torch.float32)
        del logits, d
    dweight = dweight32.to(weight.dtype) if dweight32 is not None else weight.new_empty((0,))
    dbias = dbias32.to(bias.dtype) if dbias32 is not None else hidden.new_empty((0,))
    return dhidden.view(B, T, H), dweight, dbias


def _given(*tensors: Tensor | None) -> tuple[Tensor, ...]:
    """The optional ``grad_entropy`` and ``entropy`` of an internal op call: both or none."""
    return tuple(t for t in tensors if t is not None)


def dlogits_rows_torch(
    grad_logp, logits, labels, logp, temperature, out, grad_entropy=None, entropy=None
) -> None:
    """``tapo::_dlogits_rows`` in chunked torch ops (with an entropy gradient when given)."""
    selective_log_softmax_backward_chunked(
        grad_logp, logits, labels, logp, temperature, out, extra=_given(grad_entropy, entropy)
    )


def hidden_backward_pass(chunk_fn: DlogitsChunkFn) -> Callable:
    """The kernel of ``tapo::_logprob_from_hidden_backward`` on ``chunk_fn`` (which takes the
    optional entropy arguments): its ten leading arguments, then ``grad_entropy``, ``entropy``."""

    def run(*args):
        return selective_log_softmax_from_hidden_backward_chunked(
            *args[:10], chunk_fn=chunk_fn, extra=_given(*args[10:])
        )

    return run


logprob_from_hidden_backward_torch = hidden_backward_pass(dlogits_chunk_torch)


# the CPU fallback kernels of the internal ops tapo::_logprob_rows & co. (by their schemas)
PASSES = {
    "_logprob_rows": selective_log_softmax_chunked,
    "_dlogits_rows": dlogits_rows_torch,
    "_logprob_from_hidden": selective_log_softmax_from_hidden_chunked,
    "_logprob_from_hidden_backward": logprob_from_hidden_backward_torch,
}
