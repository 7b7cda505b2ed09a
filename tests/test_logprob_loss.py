"""Contract tests of ``tapo::policy_loss_from_logits`` and ``tapo::policy_loss_from_hidden``.

Layout, in order:

1. every backend (the CPU kernel through the op and autograd, with its C++ vocabulary passes
   and with the chunked torch ones, the same with ``inplace_backward``, the Triton launchers
   under the interpreter) against the reference
   composition on fresh random inputs: loss, metrics, logp, entropy and every gradient, for
   every algorithm and for fp32 / bf16 (and one fp16) inputs, tolerance by rule;
2. the traps of ANCHORS.md: peaked logits with ``V`` not a multiple of the block, ties,
   fully masked rows and batches, a long row spanning several chunks (``T = 65,536`` on
   CUDA only), observation tokens without gradient, fp32 log-probabilities from bf16
   logits, fp32 accumulation (large ``V``, many chunks);
3. the in-place backward and non-contiguous logits;
4. memory: the hidden path's peak stays flat as ``T`` grows 4x while the reference grows;
5. bad input gives clear errors; ``opcheck``; ``torch.compile(fullgraph=True)``; front doors.

The fp64 oracle is the reference composition evaluated in float64 (``reference.py``
hard-wires fp32 for the log-softmax, so its two lines are restated here in float64).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

import tapo_kernels
from tapo_kernels import reference
from tapo_kernels.reference import ALGOS, METRIC_NAMES
from tapo_kernels.testing import assert_close_to_oracle, assert_exact, loss_batch, seed_of
from tapo_kernels.testing import chunked_torch_passes as chunked_torch

ops = pytest.importorskip("tapo_kernels.ops")  # Triton (interpreted on the CPU)

OP_LOGITS = torch.ops.tapo.policy_loss_from_logits
OP_HIDDEN = torch.ops.tapo.policy_loss_from_hidden

KNOBS_BY_ALGO: dict[str, dict[str, Any]] = {
    "grpo": dict(algo="grpo", eps_high=0.28, kl_coef=0.1, kl_type="k3", agg="token-mean"),
    "gspo": dict(algo="gspo", eps_low=0.1, eps_high=0.15, agg="seq-mean-token-mean", kl_coef=0.05),
    "gspo-seq": dict(
        algo="gspo-seq", eps_low=0.1, eps_high=0.15, agg="seq-mean-token-mean", kl_coef=0.05
    ),
    "sapo": dict(algo="sapo", kl_coef=0.05, kl_type="k2", agg="seq-mean-token-sum-norm"),
}


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    """Labels, fp32 loss tensors and knobs of one random batch (inputs built separately)."""

    labels: Tensor  # [B, T] int64, -100 at some mask-0 tokens
    loss_tensors: tuple[
        Tensor | None, ...
    ]  # old_logp, advantages, mask, ref_logp, call_map, call_delta
    knobs: dict[str, Any]
    temperature: float = 1.0
    with_entropy: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mask(self) -> Tensor:
        return self.loss_tensors[2]


def oracle_logp64(logits64: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``reference.selective_log_softmax`` in float64 (logp, entropy)."""
    x = logits64 / temperature
    lse = torch.logsumexp(x, dim=-1)
    valid = labels >= 0
    logp = x.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) - lse
    entropy = lse - (torch.softmax(x, dim=-1) * x).sum(-1)
    zero = torch.zeros_like(logp)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero).detach()


def make_case(
    logits_like: Tensor,
    seed: int,
    knobs: dict[str, Any],
    *,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    temperature: float = 1.0,
    per_token: bool = True,
    with_calls: bool = True,
) -> Case:
    """A batch whose old/ref log-probs sit near the true ones (ratios inside and outside the clip).

    ``mask`` and ``labels`` default to ``loss_batch``'s mask (prompt tokens, a fully masked
    row) and random labels with ``-100`` at half of the mask-0 tokens.
    """
    B, T, V = logits_like.shape
    gen = torch.Generator().manual_seed(seed)
    b = loss_batch(B, T, dtype=torch.float32, per_token=per_token, with_calls=with_calls, seed=seed)
    advantages = b.advantages
    if mask is None:
        mask = b.mask
    elif per_token:
        advantages = torch.randn(B, T, generator=gen) * mask
    if labels is None:
        labels = torch.randint(0, V, (B, T), generator=gen)
        labels[(mask == 0) & (torch.rand(B, T, generator=gen) < 0.5)] = -100
    with torch.no_grad():
        true_logp, _ = oracle_logp64(logits_like.double(), labels, temperature)
    old = (true_logp + 0.25 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    ref = (true_logp + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    loss_tensors = (old, advantages, mask, ref, b.call_map, b.call_delta)
    return Case(labels, loss_tensors, dict(knobs), temperature)


def random_logits(
    B: int, T: int, V: int, dtype: torch.dtype, seed: int, scale: float = 3.0
) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, T, V, generator=gen)).to(dtype)


# --------------------------------------------------------------------------------------
# backends: (loss, metrics, logp, entropy, grads) for one case
# --------------------------------------------------------------------------------------

Result = tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, ...]]


def logits_op(logits: Tensor, case: Case, inplace: bool = False) -> Result:
    leaf = logits.clone().requires_grad_(True)
    # the in-place backward overwrites its input, so hand it an intermediate, as a model would
    x = leaf * 1.0 if inplace else leaf
    loss, metrics, logp, entropy = OP_LOGITS(
        x,
        case.labels,
        *case.loss_tensors,
        temperature=case.temperature,
        with_entropy=case.with_entropy,
        inplace_backward=inplace,
        **case.knobs,
    )
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss, metrics, logp, entropy, (grad,)


def logits_op_torch(logits: Tensor, case: Case, inplace: bool = False) -> Result:
    with chunked_torch():
        return logits_op(logits, case, inplace)


def selective_log_softmax_cpu(logits: Tensor, labels: Tensor, backend: str):
    """fp32 (logp, entropy) of the CPU kernel's vocabulary pass: "op" (C++ when built) or "op-torch"."""
    from tapo_kernels import _library, vocab

    if backend == "op" and _library.NATIVE_LOGPROB:
        return torch.ops.tapo._logprob_rows(logits, labels, 1.0, True)
    return vocab.selective_log_softmax_chunked(logits, labels, 1.0, True)


def logits_triton(logits: Tensor, case: Case, block_v: int | None = 16) -> Result:
    lp_ops = ops.logprob_loss
    logp, entropy = lp_ops.selective_log_softmax_triton(
        logits, case.labels, case.temperature, case.with_entropy, block_v=block_v
    )
    loss, metrics = ops.policy_loss_triton(logp, *case.loss_tensors, **case.knobs)
    g = ops.policy_loss_backward_triton(torch.ones(()), logp, *case.loss_tensors, **case.knobs)
    grad = lp_ops.selective_log_softmax_backward_triton(
        g, logits, case.labels, logp, case.temperature, block_v=block_v
    )
    return loss, metrics, logp, entropy, (grad,)


def logits_reference(logits: Tensor, case: Case) -> Result:
    leaf = logits.clone().requires_grad_(True)
    loss, metrics, logp, entropy = reference.policy_loss_from_logits(
        leaf, case.labels, *case.loss_tensors, **_front_kwargs(case)
    )
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss, metrics, logp, entropy, (grad,)


def logits_oracle64(logits: Tensor, case: Case) -> Result:
    leaf = logits.double().requires_grad_(True)
    logp, entropy = oracle_logp64(leaf, case.labels, case.temperature)
    tensors64 = tuple(
        t.double() if t is not None and t.is_floating_point() else t for t in case.loss_tensors
    )
    loss, metrics = reference.policy_loss(logp, *tensors64, **case.knobs)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss, metrics, logp.detach(), entropy, (grad,)


LOGITS_BACKENDS: dict[str, Callable[[Tensor, Case], Result]] = {
    "op": logits_op,
    "op-inplace": lambda logits, case: logits_op(logits, case, inplace=True),
    "op-torch": logits_op_torch,
    "op-torch-inplace": lambda logits, case: logits_op_torch(logits, case, inplace=True),
    "triton": logits_triton,
}


def _hidden_leaves(h: Tensor, w: Tensor, b: Tensor | None) -> tuple[list[Tensor], tuple]:
    """Leaf copies of ``(h, w[, b])`` and the leading arguments ``(h, w, b or None)``."""
    leaves = [t.clone().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    return leaves, (leaves[0], leaves[1], leaves[2] if b is not None else None)


def _front_kwargs(case: Case) -> dict:
    return dict(temperature=case.temperature, with_entropy=case.with_entropy, **case.knobs)


def hidden_op(h: Tensor, w: Tensor, b: Tensor | None, case: Case) -> Result:
    leaves, head = _hidden_leaves(h, w, b)
    chunk_size = case.extra.get("chunk_size", 4)
    loss, metrics, logp, entropy = OP_HIDDEN(
        *head, case.labels, *case.loss_tensors, chunk_size=chunk_size, **_front_kwargs(case)
    )
    grads = torch.autograd.grad(loss, leaves)
    return loss, metrics, logp, entropy, grads


def hidden_triton(h: Tensor, w: Tensor, b: Tensor | None, case: Case) -> Result:
    chunk = case.extra.get("chunk_size", 4)
    loss, metrics, logp, entropy = ops.policy_loss_from_hidden_triton(
        h,
        w,
        b,
        case.labels,
        *case.loss_tensors,
        temperature=case.temperature,
        with_entropy=case.with_entropy,
        chunk_size=chunk,
        **case.knobs,
    )
    g = ops.policy_loss_backward_triton(torch.ones(()), logp, *case.loss_tensors, **case.knobs)
    dh, dw, db = ops.selective_log_softmax_from_hidden_backward_triton(
        g, h, w, b, case.labels, logp, case.temperature, chunk
    )
    return loss, metrics, logp, entropy, (dh, dw) + ((db,) if b is not None else ())


def hidden_reference(h: Tensor, w: Tensor, b: Tensor | None, case: Case, dtype=None) -> Result:
    leaves, head = _hidden_leaves(h, w, b)
    loss, metrics, logp, entropy = reference.policy_loss_from_hidden(
        *head, case.labels, *case.loss_tensors, **_front_kwargs(case)
    )
    return loss, metrics, logp, entropy, torch.autograd.grad(loss, leaves)


def hidden_oracle64(h: Tensor, w: Tensor, b: Tensor | None, case: Case) -> Result:
    leaves = [t.double().requires_grad_(True) for t in (h, w) + ((b,) if b is not None else ())]
    bias = leaves[2] if b is not None else None
    logits = torch.nn.functional.linear(leaves[0], leaves[1], bias)
    logp, entropy = oracle_logp64(logits, case.labels, case.temperature)
    tensors64 = tuple(
        t.double() if t is not None and t.is_floating_point() else t for t in case.loss_tensors
    )
    loss, metrics = reference.policy_loss(logp, *tensors64, **case.knobs)
    return loss, metrics, logp.detach(), entropy, torch.autograd.grad(loss, leaves)


def hidden_op_torch(h: Tensor, w: Tensor, b: Tensor | None, case: Case) -> Result:
    with chunked_torch():
        return hidden_op(h, w, b, case)


HIDDEN_BACKENDS = {"op": hidden_op, "op-torch": hidden_op_torch, "triton": hidden_triton}
GRAD_NAMES = ("dhidden", "dweight", "dbias")


def compare(result: Result, oracle: Result, ref_own: Result, grad_names=("dlogits",)) -> None:
    loss, metrics, logp, entropy, grads = result
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert metrics.dtype == torch.float32 and metrics.shape == (len(METRIC_NAMES),)
    assert logp.dtype == torch.float32 and not logp.requires_grad
    # the entropy carries a gradient (tests/test_logprobs.py); its values are compared here
    assert entropy.dtype == torch.float32
    entropy = entropy.detach()
    assert_close_to_oracle(loss, oracle[0], ref_own[0], what="loss")
    assert_close_to_oracle(metrics, oracle[1], ref_own[1], what="metrics")
    assert_close_to_oracle(logp, oracle[2], ref_own[2], what="logp")
    if ref_own[3].numel() == 0:  # entropy not asked for
        assert entropy.numel() == 0
    else:
        assert_close_to_oracle(entropy, oracle[3], ref_own[3], what="entropy")
    for name, g, g64, g_own in zip(grad_names, grads, oracle[4], ref_own[4], strict=True):
        assert g.dtype == g_own.dtype, f"{name}: dtype {g.dtype} != {g_own.dtype}"
        assert float(g64.abs().max()) > 0, f"{name}: the oracle gradient is zero (weak case)"
        assert_close_to_oracle(g, g64, g_own, what=name)


# --------------------------------------------------------------------------------------
# 1. every backend against the reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("backend", sorted(LOGITS_BACKENDS))
def test_from_logits_matches_reference(backend, algo, dtype):
    seed = seed_of("logits", backend, algo, dtype)
    logits = random_logits(3, 9, 37, dtype, seed)  # V = 37: two full blocks of 16 and a partial
    case = make_case(
        logits,
        seed,
        KNOBS_BY_ALGO[algo],
        temperature=0.7 if algo != "gspo" else 1.0,
        per_token=algo != "gspo",
    )
    compare(
        LOGITS_BACKENDS[backend](logits, case),
        logits_oracle64(logits, case),
        logits_reference(logits, case),
    )


@pytest.mark.parametrize("backend", sorted(LOGITS_BACKENDS))
def test_from_logits_fp16_without_entropy(backend):
    seed = seed_of("fp16", backend)
    logits = random_logits(2, 7, 50, torch.float16, seed)
    case = make_case(logits, seed, KNOBS_BY_ALGO["grpo"], with_calls=False)
    case.with_entropy = False
    result = LOGITS_BACKENDS[backend](logits, case)
    assert result[3].numel() == 0
    compare(result, logits_oracle64(logits, case), logits_reference(logits, case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("backend", sorted(HIDDEN_BACKENDS))
def test_from_hidden_matches_reference(backend, algo, dtype):
    seed = seed_of("hidden", backend, algo, dtype)
    gen = torch.Generator().manual_seed(seed)
    B, T, H, V = 3, 7, 16, 37
    h = torch.randn(B, T, H, generator=gen).to(dtype)
    w = (0.5 * torch.randn(V, H, generator=gen)).to(dtype)
    bias = torch.randn(V, generator=gen).to(dtype)
    logits = torch.nn.functional.linear(h.double(), w.double(), bias.double())
    case = make_case(logits, seed, KNOBS_BY_ALGO[algo], temperature=1.3 if algo == "sapo" else 1.0)
    case.extra["chunk_size"] = 4  # 21 tokens: six chunks, the last one partial
    compare(
        HIDDEN_BACKENDS[backend](h, w, bias, case),
        hidden_oracle64(h, w, bias, case),
        hidden_reference(h, w, bias, case),
        GRAD_NAMES,
    )


@pytest.mark.parametrize("backend", sorted(HIDDEN_BACKENDS))
def test_from_hidden_without_bias_default_chunk(backend):
    seed = seed_of("nobias", backend)
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 5, 8, generator=gen)
    w = torch.randn(29, 8, generator=gen)
    case = make_case(torch.nn.functional.linear(h, w), seed, KNOBS_BY_ALGO["grpo"])
    case.extra["chunk_size"] = None
    compare(
        HIDDEN_BACKENDS[backend](h, w, None, case),
        hidden_oracle64(h, w, None, case),
        hidden_reference(h, w, None, case),
        GRAD_NAMES[:2],
    )


# --------------------------------------------------------------------------------------
# 2. ANCHORS traps
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_v", [16, None], ids=["block16", "default-block"])
@pytest.mark.parametrize("backend", ["op", "op-torch", "triton"])
def test_peaked_logits_vocab_not_multiple_of_block(backend, block_v):
    """x25 logits shifted so the top logit is 0 (V = 37: blocks of 16 or 64 end past V).

    A padded column read as 0 instead of -inf would add exp(0) = 1 per padded column to the
    sum of exponentials, i.e. lse + log(1 + #pad) and every logp off by about 3.
    """
    if backend != "triton" and block_v is not None:
        pytest.skip("the CPU kernels have no vocabulary block")
    logits = 25 * torch.randn(4, 5, 37, generator=torch.Generator().manual_seed(7))
    logits = logits - logits.amax(-1, keepdim=True)  # top logit 0, the rest very negative
    gen = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 37, (4, 5), generator=gen)
    peaked = torch.rand(4, 5, generator=gen) < 0.5
    labels = torch.where(peaked, logits.argmax(-1), labels)  # half the tokens: the peak
    case = make_case(logits, 7, KNOBS_BY_ALGO["grpo"], mask=torch.ones(4, 5), labels=labels)
    if backend != "triton":
        result = LOGITS_BACKENDS[backend](logits, case)
    else:
        result = logits_triton(logits, case, block_v=block_v)
    compare(result, logits_oracle64(logits, case), logits_reference(logits, case))


@pytest.mark.parametrize("backend", sorted(LOGITS_BACKENDS))
def test_ties_golden(backend):
    """All V = 8 logits equal (x = 1.5): logp = -log 8, entropy = log 8, and with
    g = d loss / d logp the gradient is g * (onehot - 1/8) / temperature."""
    B, T, V = 2, 4, 8
    logits = torch.full((B, T, V), 1.5)
    case = make_case(
        logits,
        11,
        dict(
            algo="grpo", agg="token-mean", kl_coef=0.0, eps_low=0.2, eps_high=0.2, dual_clip_c=0.0
        ),
    )
    mask = torch.ones(B, T)
    adv = torch.tensor([1.0, -1.0])
    old = torch.full((B, T), -math.log(8))  # ratio exactly 1: no clipping, loss = -mean(a)
    case.loss_tensors = (old, adv, mask, None, None, None)
    case.labels = torch.arange(B * T).reshape(B, T) % V
    loss, metrics, logp, entropy, (grad,) = LOGITS_BACKENDS[backend](logits, case)
    log8 = torch.tensor(math.log(8), dtype=torch.float64)
    assert_close_to_oracle(logp, -log8.expand(B, T), what="logp")  # -2.0794415
    assert_close_to_oracle(entropy, log8.expand(B, T), what="entropy")  # 2.0794415
    # token-mean over 8 tokens of -a * r, r = 1: loss = -(4 * 1 + 4 * (-1)) / 8 = 0,
    # d loss / d logp = -a / 8 per token (d r / d logp = r = 1)
    assert_close_to_oracle(loss, torch.tensor(0.0), what="loss")
    g = -adv[:, None].expand(B, T) / 8
    onehot = torch.nn.functional.one_hot(case.labels, V).float()
    assert_close_to_oracle(grad, g[..., None].double() * (onehot.double() - 1.0 / V), what="grad")


@pytest.mark.parametrize("backend", sorted(LOGITS_BACKENDS))
def test_ties_at_the_maximum_random(backend):
    """Integer-valued logits: many exact ties, including ties with the label's logit."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randint(-2, 3, (3, 6, 21), generator=gen).float()
    case = make_case(logits, 5, KNOBS_BY_ALGO["grpo"])
    compare(
        LOGITS_BACKENDS[backend](logits, case),
        logits_oracle64(logits, case),
        logits_reference(logits, case),
    )


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("backend", sorted(LOGITS_BACKENDS))
def test_fully_masked_rows_and_batch(backend, agg):
    logits = random_logits(3, 6, 19, torch.float32, 3)
    mask = (torch.rand(3, 6, generator=torch.Generator().manual_seed(3)) < 0.8).float()
    mask[1] = 0.0
    labels = torch.randint(0, 19, (3, 6), generator=torch.Generator().manual_seed(4))
    labels[1] = -100  # a padding row: every label ignored
    case = make_case(logits, 3, dict(algo="grpo", agg=agg), mask=mask, labels=labels)
    loss, metrics, logp, entropy, (grad,) = LOGITS_BACKENDS[backend](logits, case)
    assert torch.isfinite(loss) and torch.isfinite(metrics).all()
    assert (logp[1] == 0).all() and (entropy[1] == 0).all()
    assert (grad[1] == 0).all() and float(grad.abs().max()) > 0
    # the whole batch masked: loss 0, zero gradient, no NaN (trap 8)
    case.loss_tensors = (
        case.loss_tensors[0],
        case.loss_tensors[1],
        torch.zeros_like(mask),
    ) + case.loss_tensors[3:]
    loss, metrics, logp, entropy, (grad,) = LOGITS_BACKENDS[backend](logits, case)
    assert float(loss) == 0.0 and torch.isfinite(metrics).all()
    assert (grad == 0).all()


@pytest.mark.parametrize("backend", sorted(LOGITS_BACKENDS))
def test_observation_tokens_get_zero_gradient(backend):
    """Tool-observation tokens (mask 0 inside a row, valid labels) receive exactly 0 (trap 4)."""
    logits = random_logits(2, 12, 23, torch.bfloat16, 9)
    mask = torch.ones(2, 12)
    mask[:, 4:8] = 0.0  # an observation span in the middle of each row
    labels = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(9))
    case = make_case(logits, 9, KNOBS_BY_ALGO["grpo"], with_calls=False, mask=mask, labels=labels)
    grad = LOGITS_BACKENDS[backend](logits, case)[4][0]
    assert (grad[:, 4:8] == 0).all()
    assert (grad[:, :4].abs().amax(-1) > 0).all() and (grad[:, 8:].abs().amax(-1) > 0).all()


@pytest.mark.parametrize("backend", sorted(HIDDEN_BACKENDS))
def test_observation_tokens_get_zero_hidden_gradient(backend):
    gen = torch.Generator().manual_seed(13)
    h, w = torch.randn(2, 10, 8, generator=gen), torch.randn(31, 8, generator=gen)
    mask = torch.ones(2, 10)
    mask[:, 3:6] = 0.0
    labels = torch.randint(0, 31, (2, 10), generator=gen)
    case = make_case(
        torch.nn.functional.linear(h, w),
        13,
        KNOBS_BY_ALGO["sapo"],
        with_calls=False,
        mask=mask,
        labels=labels,
    )
    dh = HIDDEN_BACKENDS[backend](h, w, None, case)[4][0]
    assert (dh[:, 3:6] == 0).all() and (dh[:, :3].abs().amax(-1) > 0).all()


@pytest.mark.parametrize("backend", ["op", "op-torch"])
def test_long_row_spans_several_chunks(backend):
    """CPU: one row of T = 2600 tokens, V = 8192: three chunks of 1024 rows in the chunked kernel."""
    from tapo_kernels.vocab import default_chunk_tokens

    T, V = 2600, 8192
    assert default_chunk_tokens(V, torch.device("cpu")) * 2 < T
    logits = random_logits(1, T, V, torch.bfloat16, 17)
    case = make_case(logits, 17, KNOBS_BY_ALGO["grpo"])
    result = LOGITS_BACKENDS[backend](logits, case)
    compare(result, logits_oracle64(logits, case), logits_reference(logits, case))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (T = 65,536 on the device)")
def test_long_row_65536_tokens_cuda():
    """Trap 2: one row of T = 65,536 tokens (CUDA's grid-y limit is 65,535)."""
    T, V = 65536, 1000
    logits = random_logits(1, T, V, torch.bfloat16, 19).cuda()
    case = make_case(logits.cpu(), 19, KNOBS_BY_ALGO["grpo"], with_calls=False)
    case.labels = case.labels.cuda()
    case.loss_tensors = tuple(t.cuda() if t is not None else None for t in case.loss_tensors)
    x = logits.clone().requires_grad_(True)
    loss, _, logp, _ = OP_LOGITS(x, case.labels, *case.loss_tensors, **case.knobs)
    loss.backward()
    xr = logits.clone().requires_grad_(True)
    ref_loss, _, ref_logp, _ = reference.policy_loss_from_logits(
        xr, case.labels, *case.loss_tensors, **case.knobs
    )
    ref_loss.backward()
    assert_close_to_oracle(logp, ref_logp, what="logp", tol=(0.0, 2e-5))
    assert_close_to_oracle(loss, ref_loss, what="loss", tol=(1e-5, 1e-6))
    assert_close_to_oracle(x.grad, xr.grad, what="dlogits", tol=(1e-2, 1e-6))
    assert (logp[0, -1] != 0) or case.labels[0, -1] < 0  # the last token was computed


@pytest.mark.parametrize("backend", ["op", "op-torch", "triton"])
def test_logp_stays_fp32_from_bf16_logits(backend):
    """Trap 5: logp from bf16 logits is fp32-accurate (a bf16 logp near -8 would be off by ~0.03)."""
    logits = random_logits(2, 5, 64, torch.bfloat16, 23, scale=4.0)
    labels = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(23))
    if backend != "triton":
        logp, entropy = selective_log_softmax_cpu(logits, labels, backend)
    else:
        logp, entropy = ops.selective_log_softmax_triton(logits, labels, 1.0, True)
    logp64, entropy64 = oracle_logp64(logits.double(), labels, 1.0)
    assert logp.dtype == entropy.dtype == torch.float32
    assert float((logp.double() - logp64).abs().max()) < 1e-5
    assert float((entropy.double() - entropy64).abs().max()) < 1e-5


@pytest.mark.parametrize("backend", ["op", "op-torch", "triton"])
def test_large_vocab_accumulates_in_fp32(backend):
    """Trap 7: V = 300,007 bf16 logits; the sum of exponentials and the entropy stay fp32."""
    V = 300_007
    logits = random_logits(1, 3, V, torch.bfloat16, 29)
    labels = torch.tensor([[0, V - 1, 12345]])
    if backend != "triton":
        logp, entropy = selective_log_softmax_cpu(logits, labels, backend)
    else:
        logp, entropy = ops.selective_log_softmax_triton(logits, labels, 1.0, True)
    logp64, entropy64 = oracle_logp64(logits.double(), labels, 1.0)
    ref_logp, ref_entropy = reference.selective_log_softmax(logits, labels, 1.0, True)
    assert_close_to_oracle(logp, logp64, ref_logp, what="logp")
    assert_close_to_oracle(entropy, entropy64, ref_entropy, what="entropy")


@pytest.mark.parametrize("backend", sorted(HIDDEN_BACKENDS))
def test_weight_gradient_accumulates_in_fp32_over_chunks(backend):
    """Trap 7 for the LM head: bf16 inputs, 128 chunks of 2 tokens; dweight and dbias must be
    summed in fp32 (a bf16 running sum rounds once per chunk and swamps small terms).

    Inputs are chosen so the bf16 logits are exact (h in {-1, 0, 1}, weight and bias in
    eighths, H = 4: every logit is a multiple of 1/8 below 5 in magnitude) and every token
    has the same advantage with ratio 1, so d loss / d logits has one sign per column: the
    plain composition then only rounds dlogits and its one GEMM output, and a low-precision
    accumulator shows up as an error many times larger.
    """
    gen = torch.Generator().manual_seed(31)
    B, T, H, V = 2, 128, 4, 24
    h = torch.randint(-1, 2, (B, T, H), generator=gen).bfloat16()
    w = (torch.randint(-8, 9, (V, H), generator=gen) / 8).bfloat16()
    bias = (torch.randint(-8, 9, (V,), generator=gen) / 8).bfloat16()
    logits64 = torch.nn.functional.linear(h.double(), w.double(), bias.double())
    labels = torch.randint(0, V, (B, T), generator=gen)
    true_logp, _ = oracle_logp64(logits64, labels, 1.0)
    case = Case(
        labels,
        (true_logp.float(), torch.ones(B), torch.ones(B, T), None, None, None),
        dict(algo="grpo", agg="token-mean"),
        with_entropy=False,
    )
    case.extra["chunk_size"] = 2
    compare(
        HIDDEN_BACKENDS[backend](h, w, bias, case),
        hidden_oracle64(h, w, bias, case),
        hidden_reference(h, w, bias, case),
        GRAD_NAMES,
    )


# --------------------------------------------------------------------------------------
# 3. in-place backward, non-contiguous logits
# --------------------------------------------------------------------------------------


def test_inplace_backward_returns_the_logits_buffer():
    logits = random_logits(2, 5, 33, torch.bfloat16, 37)
    case = make_case(logits, 37, KNOBS_BY_ALGO["grpo"])
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0
    buffer = x.detach()  # shares storage with x
    before = buffer.clone()
    loss, *_ = OP_LOGITS(x, case.labels, *case.loss_tensors, inplace_backward=True, **case.knobs)
    assert torch.equal(buffer, before)  # the forward leaves the logits alone
    loss.backward()
    expected = logits_op(logits, case)[4][0]
    assert_exact(leaf.grad, expected, "grad")
    assert_exact(buffer, expected, "buffer")  # the buffer is the gradient


@pytest.mark.parametrize("backend", sorted(LOGITS_BACKENDS))
def test_sliced_logits_are_read_in_place(backend):
    """``logits[:, :-1]`` (the usual shift) is not contiguous; results equal the contiguous copy."""
    full = random_logits(3, 8, 27, torch.float32, 41)
    sliced = full[:, :-1]
    assert not sliced.is_contiguous()
    case = make_case(sliced.contiguous(), 41, KNOBS_BY_ALGO["grpo"])
    if backend == "triton":
        out = logits_triton(sliced, case)
        expected = logits_triton(sliced.contiguous(), case)
    else:
        torch_path, inplace = backend.startswith("op-torch"), backend.endswith("inplace")
        with chunked_torch() if torch_path else contextlib.nullcontext():
            leaf = full.clone().requires_grad_(True)
            x = leaf * 1.0 if inplace else leaf
            loss, metrics, logp, entropy = OP_LOGITS(
                x[:, :-1],
                case.labels,
                *case.loss_tensors,
                with_entropy=True,
                inplace_backward=inplace,
                **case.knobs,
            )
            (grad,) = torch.autograd.grad(loss, leaf)
            assert (grad[:, -1] == 0).all()
            out = (loss, metrics, logp, entropy, (grad[:, :-1],))
            expected = logits_op(sliced.contiguous(), case)
    for a, b in zip(out[:4] + out[4], expected[:4] + expected[4], strict=True):
        assert_exact(a, b)


# --------------------------------------------------------------------------------------
# 4. memory: the hidden path stays flat in T, the composition grows
# --------------------------------------------------------------------------------------

_PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    import tapo_kernels
    from tapo_kernels import reference

    impl, B, T, H, V = sys.argv[1], *map(int, sys.argv[2:])
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=gen, requires_grad=True)
    weight = (0.1 * torch.randn(V, H, generator=gen)).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=gen)
    old = -torch.rand(B, T, generator=gen) * 4 - 6
    adv, mask = torch.randn(B, generator=gen), torch.ones(B, T)

    def step(h, labels, old, mask):
        if impl == "fused":
            loss = tapo_kernels.policy_loss_from_hidden(h, weight, labels, old, adv, mask).loss
        else:
            loss = reference.policy_loss_from_hidden(h, weight, None, labels, old, adv, mask)[0]
        loss.backward()

    # load every code path at a tiny size first
    step(hidden[:, :8].detach().requires_grad_(True), labels[:, :8], old[:, :8], mask[:, :8])
    weight.grad = None

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return None

    before = rss("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        peak_of = lambda: rss("VmHWM:")
    except OSError:  # no reset: the peak since start (inputs are still alive, so it is close)
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(hidden, labels, old, mask)
    print((peak_of() - before) / 2**20)
""")


def peak_extra_mib(impl: str, B: int, T: int, H: int, V: int) -> float:
    """Peak RSS growth (MiB) of one forward + backward, measured in a fresh process."""
    env = dict(os.environ)
    # large blocks straight from mmap and back on free: RSS follows live tensors
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, impl, str(B), str(T), str(H), str(V)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_hidden_path_peak_memory_is_flat_in_T():
    B, H, V = 2, 64, 4096
    T = 1024  # 2k tokens, then 8k tokens; the default chunk is 2048 tokens at V = 4096
    fused = [peak_extra_mib("fused", B, t, H, V) for t in (T, 4 * T)]
    composed = [peak_extra_mib("reference", B, t, H, V) for t in (T, 4 * T)]
    print(f"peak extra MiB: fused {fused}, reference {composed}")
    # the O(T * H) gradient of hidden grows (2 MiB at 4T); everything else is one chunk
    hidden_grad_mib = B * 4 * T * H * 4 / 2**20
    assert fused[1] <= 1.25 * fused[0] + hidden_grad_mib + 4
    assert composed[1] >= 3.0 * composed[0]  # the full logits and their gradients: ~4x
    assert 4 * fused[1] <= composed[1]


# --------------------------------------------------------------------------------------
# 5. errors, opcheck, torch.compile, front doors
# --------------------------------------------------------------------------------------


def names(argument: str) -> str:
    """The exception's message names the argument (as a word: not ``old_logp`` for ``logp``)."""
    return rf"(?<![A-Za-z_]){re.escape(argument)}(?![A-Za-z_])"


def _error_case() -> tuple[Tensor, Case]:
    logits = random_logits(2, 4, 11, torch.float32, 43)
    return logits, make_case(logits, 43, KNOBS_BY_ALGO["grpo"])


def _bad_cases(table: dict[str, dict[str, type[Exception]]]) -> list[tuple]:
    """``(change, exception type, argument the message names)`` of a table of bad inputs."""
    return [
        (change, error, argument)
        for argument, changes in table.items()
        for change, error in changes.items()
    ]


# argument the message names -> {change: exception type}
BAD_LOGITS_INPUTS = {
    "labels": {
        "label_too_large": ValueError,
        "negative_label_in_mask": ValueError,
        "labels_int32": TypeError,
    },
    "temperature": {"temperature_zero": ValueError},
    "logits": {"logits_2d": ValueError, "logits_int": TypeError, "nan_logit": ValueError},
    "old_logp": {"old_logp_bf16": TypeError},
    "algo": {"bad_algo": ValueError},
}
BAD_HIDDEN_INPUTS = {
    "weight": {"weight_shape": ValueError, "weight_dtype": TypeError},
    "bias": {"bias_shape": ValueError},
    "chunk_size": {"chunk_zero": ValueError},
    "labels": {"label_too_large": ValueError},
}
BOTH_BACKENDS = pytest.mark.parametrize("backend", ["op", "triton"])


@BOTH_BACKENDS
@pytest.mark.parametrize("change, error, argument", _bad_cases(BAD_LOGITS_INPUTS))
def test_bad_logits_input_raises_clear_error(backend, change, error, argument):
    logits, case = _error_case()
    labels, temperature, tensors = case.labels.clone(), 1.0, list(case.loss_tensors)
    knobs = dict(case.knobs)
    if change == "label_too_large":
        labels[0, 0] = 11
    elif change == "negative_label_in_mask":
        i, j = (case.mask != 0).nonzero()[0].tolist()
        labels[i, j] = -100
    elif change == "labels_int32":
        labels = labels.int()
    elif change == "temperature_zero":
        temperature = 0.0
    elif change == "logits_2d":
        logits = logits[0]
    elif change == "logits_int":
        logits = logits.long()
    elif change == "old_logp_bf16":
        tensors[0] = tensors[0].bfloat16()
    elif change == "nan_logit":
        i, j = (case.mask != 0).nonzero()[0].tolist()
        logits = logits.clone()
        logits[i, j, 3] = math.nan
    elif change == "bad_algo":
        knobs["algo"] = "ppo"
    fn = OP_LOGITS if backend == "op" else ops.policy_loss_from_logits_triton
    with pytest.raises(error, match=names(argument)):
        fn(logits, labels, *tensors, temperature=temperature, **knobs)


@BOTH_BACKENDS
@pytest.mark.parametrize("change, error, argument", _bad_cases(BAD_HIDDEN_INPUTS))
def test_bad_hidden_input_raises_clear_error(backend, change, error, argument):
    gen = torch.Generator().manual_seed(47)
    h, w, bias = (
        torch.randn(2, 4, 8, generator=gen),
        torch.randn(13, 8, generator=gen),
        torch.zeros(13),
    )
    case = make_case(torch.nn.functional.linear(h, w), 47, KNOBS_BY_ALGO["grpo"])
    labels, chunk = case.labels.clone(), None
    if change == "weight_shape":
        w = w[:, :7]
    elif change == "weight_dtype":
        w = w.double()
    elif change == "bias_shape":
        bias = bias[:5]
    elif change == "chunk_zero":
        chunk = 0
    elif change == "label_too_large":
        labels[1, 2] = 13
    fn = OP_HIDDEN if backend == "op" else ops.policy_loss_from_hidden_triton
    with pytest.raises(error, match=names(argument)):
        fn(h, w, bias, labels, *case.loss_tensors, chunk_size=chunk, **case.knobs)


def _opcheck_logits_samples() -> list[tuple[tuple, dict]]:
    samples = []
    for i, (dtype, entropy, inplace, algo) in enumerate(
        [
            (torch.float32, True, False, "grpo"),
            (torch.bfloat16, False, False, "gspo"),
            (torch.float32, False, True, "sapo"),
        ]
    ):
        logits = random_logits(2, 5, 13, dtype, 50 + i)
        case = make_case(logits, 50 + i, KNOBS_BY_ALGO[algo], per_token=algo != "gspo")
        logits = logits.requires_grad_(True)
        samples.append(
            (
                (logits, case.labels, *case.loss_tensors),
                dict(temperature=0.9, with_entropy=entropy, inplace_backward=inplace, **case.knobs),
            )
        )
    return samples


@pytest.mark.parametrize("index", range(3))
def test_opcheck_policy_loss_from_logits(index):
    args, kwargs = _opcheck_logits_samples()[index]
    torch.library.opcheck(OP_LOGITS, args, kwargs)


@pytest.mark.parametrize("inplace", [False, True])
def test_opcheck_selective_log_softmax_backward(inplace):
    logits = random_logits(2, 5, 13, torch.bfloat16, 53)
    labels = torch.randint(0, 13, (2, 5), generator=torch.Generator().manual_seed(53))
    labels[0, 0] = -100
    logp, _ = reference.selective_log_softmax(logits, labels)
    grad = torch.randn(2, 5) * (labels >= 0)
    if inplace:
        torch.library.opcheck(
            torch.ops.tapo.selective_log_softmax_backward_inplace,
            (grad, logits.clone(), labels, logp, 0.8),
        )
    else:
        torch.library.opcheck(
            torch.ops.tapo.selective_log_softmax_backward, (grad, logits, labels, logp, 0.8)
        )


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck_policy_loss_from_hidden(with_bias):
    gen = torch.Generator().manual_seed(59)
    h = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    w = torch.randn(17, 8, generator=gen, requires_grad=True)
    bias = torch.randn(17, generator=gen, requires_grad=True) if with_bias else None
    case = make_case(torch.nn.functional.linear(h, w, bias).detach(), 59, KNOBS_BY_ALGO["grpo"])
    torch.library.opcheck(
        OP_HIDDEN,
        (h, w, bias, case.labels, *case.loss_tensors),
        dict(with_entropy=with_bias, chunk_size=3, **case.knobs),
    )
    grad = torch.randn(2, 5) * case.mask
    logp = OP_HIDDEN(h, w, bias, case.labels, *case.loss_tensors, **case.knobs)[2]
    torch.library.opcheck(
        torch.ops.tapo.selective_log_softmax_from_hidden_backward,
        (
            grad,
            h.detach(),
            w.detach(),
            bias.detach() if with_bias else None,
            case.labels,
            logp,
            1.0,
            3,
            True,
            with_bias,
        ),
    )


def _logits_step(
    logits: Tensor, labels: Tensor, old: Tensor, adv: Tensor, mask: Tensor, inplace: bool
) -> tuple[Tensor, Tensor]:
    x = logits * 2.0  # an intermediate, as the output of an LM head would be
    out = tapo_kernels.policy_loss_from_logits(
        x, labels, old, adv, mask, preset="dapo", with_entropy=True, inplace_backward=inplace
    )
    return out.loss + 0.01 * out.entropy.mean(), out.logp


def _hidden_step(
    h: Tensor, w: Tensor, labels: Tensor, old: Tensor, adv: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor]:
    out = tapo_kernels.policy_loss_from_hidden(
        h, w, labels, old, adv, mask, preset="grpo", chunk_size=4
    )
    return 3.0 * out.loss, out.logp


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    logits = random_logits(2, 6, 19, torch.float32, 61)
    case = make_case(2.0 * logits, 61, KNOBS_BY_ALGO["grpo"], with_calls=False)
    gen = torch.Generator().manual_seed(61)
    h, w = torch.randn(2, 6, 8, generator=gen), torch.randn(19, 8, generator=gen)
    hidden_case = make_case(
        torch.nn.functional.linear(h, w), 62, KNOBS_BY_ALGO["grpo"], with_calls=False
    )
    for step, inputs, rest in (
        (_logits_step, (logits,), (case.labels, *case.loss_tensors[:3], False)),
        (_logits_step, (logits,), (case.labels, *case.loss_tensors[:3], True)),
        (_hidden_step, (h, w), (hidden_case.labels, *hidden_case.loss_tensors[:3])),
    ):
        eager_in = [t.clone().requires_grad_(True) for t in inputs]
        eager_loss, eager_logp = step(*eager_in, *rest)
        eager_loss.backward()
        compiled = torch.compile(step, fullgraph=True, backend=backend)
        comp_in = [t.clone().requires_grad_(True) for t in inputs]
        loss, logp = compiled(*comp_in, *rest)
        loss.backward()
        torch.testing.assert_close(loss, eager_loss)
        torch.testing.assert_close(logp, eager_logp)
        for a, b in zip(comp_in, eager_in, strict=True):
            torch.testing.assert_close(a.grad, b.grad)
            assert float(a.grad.abs().max()) > 0


def test_front_doors_presets_casts_and_metrics():
    logits = random_logits(2, 5, 17, torch.float32, 67)
    case = make_case(logits, 67, KNOBS_BY_ALGO["grpo"], with_calls=False)
    old, adv, mask = case.loss_tensors[:3]
    out = tapo_kernels.policy_loss_from_logits(
        logits, case.labels, old.double(), adv.double(), mask, preset="gspo", eps_low=0.1
    )
    expected = reference.policy_loss_from_logits(
        logits, case.labels, old, adv, mask, **{**tapo_kernels.PRESETS["gspo"], "eps_low": 0.1}
    )
    torch.testing.assert_close(out.loss, expected[0])
    assert set(out.metrics_dict()) == {f"actor/{n}" for n in reference.METRIC_NAMES}
    assert out.entropy.numel() == 0
    with pytest.raises(TypeError, match="unknown policy loss arguments"):
        tapo_kernels.policy_loss_from_logits(logits, case.labels, old, adv, mask, clip=0.2)
    with pytest.raises(ValueError, match="unknown preset"):
        tapo_kernels.policy_loss_from_hidden(
            torch.randn(2, 5, 4), torch.randn(17, 4), case.labels, old, adv, mask, preset="ppo"
        )


@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_inplace_backward_equals_new_tensor_over_many_rows(layout, dtype):
    """The in-place backward launches at most one row per program (several launches when the
    rows outnumber the programs); it must write exactly what the new-tensor backward writes,
    for contiguous logits and for a sliced view whose rows are not one strided sequence."""
    lp_ops = ops.logprob_loss
    B, T, V = 3, 7, 50
    gen = torch.Generator().manual_seed(23)
    full = (3 * torch.randn(B, T + 1, V, generator=gen)).to(dtype)
    logits = full[:, :-1] if layout == "sliced" else full[:, :T].contiguous()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, 2] = -100
    grad = torch.randn(B, T, generator=gen)
    grad[1, 3] = 0.0
    logp, _ = lp_ops.selective_log_softmax_triton(logits, labels, 0.9, block_v=16)
    expected = lp_ops.selective_log_softmax_backward_triton(
        grad, logits, labels, logp, 0.9, block_v=16
    )
    assert B * T > lp_ops._INTERPRET_PROGRAMS  # several launches
    before = full.clone()
    lp_ops.selective_log_softmax_backward_inplace_triton(
        grad, logits, labels, logp, 0.9, block_v=16
    )
    assert torch.equal(logits, expected)
    if layout == "sliced":  # the column past the slice is untouched
        assert torch.equal(full[:, -1], before[:, -1])


@pytest.mark.parametrize(
    "front, name",
    [("logits", "logits"), ("logits", "labels"), ("logits", "ref_logp")]
    + [("hidden", "hidden"), ("hidden", "weight"), ("hidden", "bias"), ("hidden", "old_logp")],
)
def test_front_doors_name_a_non_tensor_argument(front, name):
    B, T, V, H = 2, 3, 5, 4
    args = dict(
        labels=torch.zeros(B, T, dtype=torch.int64),
        old_logp=torch.zeros(B, T),
        advantages=torch.zeros(B),
        mask=torch.ones(B, T),
    )
    if front == "logits":
        call, args = tapo_kernels.policy_loss_from_logits, dict(logits=torch.zeros(B, T, V), **args)
    else:
        call = tapo_kernels.policy_loss_from_hidden
        args = dict(hidden=torch.zeros(B, T, H), weight=torch.zeros(V, H), **args)
    args[name] = [0.0]  # a list, not a tensor
    with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor, got list"):
        call(**args)


def test_front_door_rejects_none_for_a_required_tensor():
    with pytest.raises(TypeError, match="^advantages must be a torch.Tensor, got NoneType"):
        tapo_kernels.policy_loss_from_logits(
            torch.zeros(1, 2, 3),
            torch.zeros(1, 2, dtype=torch.int64),
            torch.zeros(1, 2),
            None,
            torch.ones(1, 2),
        )
