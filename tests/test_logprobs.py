"""Log-probabilities and entropies with gradients through both.

``tapo_kernels.logprobs_from_logits`` / ``logprobs_from_hidden`` (the ops
``tapo::logprobs_from_logits`` / ``_from_hidden`` and their entropy-aware backward ops), and
the entropy output of the fused loss front ends, which an entropy bonus differentiates:

1. hand-computed values and gradients (``dH/dx = -p (log p + H)``);
2. fresh random batches against the float64 autograd of the plain formula, for fp32 and
   bf16 inputs, temperatures, ignored labels, chunk sizes, with and without bias, with only
   one of the two outputs differentiated;
3. a ``-inf`` logit: the same values and gradients as the vocabulary without that column;
4. the loss front ends: ``loss - c * mean(entropy)`` against the reference composition,
   the in-place backward included;
5. bad input, ``opcheck``, ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from torch import Tensor

import tapo_kernels as tk
from tapo_kernels import reference
from tapo_kernels.testing import assert_close_to_oracle, chunked_torch_passes, seed_of


@pytest.fixture(params=["native", "chunked-torch"])
def passes(request):
    """The vocabulary passes under test: the C++ kernels (when built) or the chunked torch ops
    (the fallback, and the CUDA path of the entropy backward)."""
    if request.param == "native" and not tk.native_available():
        pytest.skip("the C++ build is absent")
    if request.param == "native":
        yield
    else:
        with chunked_torch_passes():
            yield


# --------------------------------------------------------------------------------------
# the float64 oracle: the textbook formulas, differentiated by autograd
# --------------------------------------------------------------------------------------


def oracle(logits: Tensor, labels: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """float64 ``(logp, entropy)``; 0 at negative labels (autograd gives their gradients)."""
    x = logits.double() / temperature
    log_p = torch.log_softmax(x, -1)
    logp = log_p.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    ignored = labels < 0
    return logp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)


def _inputs(seed: str, B: int, T: int, V: int, dtype: torch.dtype, ignored: bool = True):
    g = torch.Generator().manual_seed(seed_of(seed))
    logits = (torch.randn(B, T, V, generator=g) * 2.5).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    if ignored:
        labels[0, -1] = -100
    grad_logp = torch.randn(B, T, generator=g)
    grad_entropy = torch.randn(B, T, generator=g)
    return logits, labels, grad_logp, grad_entropy


def _tol(dtype: torch.dtype) -> tuple[float, float]:
    # fp32 math on the (rounded) inputs: a few ulps of the per-row sums
    return (2e-5, 2e-5)


# --------------------------------------------------------------------------------------
# 1. hand-computed
# --------------------------------------------------------------------------------------


def test_two_token_vocabulary_by_hand(passes):
    # logits [0, log 3]: p = [1/4, 3/4]; logp of label 1 = log 3/4 = -0.2876821;
    # H = -(1/4 log 1/4 + 3/4 log 3/4) = 0.3465736 + 0.2157616 = 0.5623351.
    # dH/dx_j = -p_j (log p_j + H): x_0: -0.25 (-1.3862944 + 0.5623351) = 0.2059898,
    # x_1: -0.75 (-0.2876821 + 0.5623351) = -0.2059898.
    # d logp_1 / dx = onehot(1) - p = [-0.25, 0.25].
    logits = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    labels = torch.tensor([[1]])
    logp, entropy = tk.logprobs_from_logits(logits, labels)
    assert abs(float(logp.detach()) - math.log(0.75)) < 1e-6
    assert abs(float(entropy.detach()) - 0.5623351) < 1e-6
    (g_h,) = torch.autograd.grad(entropy.sum(), logits, retain_graph=True)
    assert torch.allclose(g_h, torch.tensor([[[0.2059898, -0.2059898]]]), atol=1e-6)
    (g_lp,) = torch.autograd.grad(logp.sum(), logits)
    assert torch.allclose(g_lp, torch.tensor([[[-0.25, 0.25]]]), atol=1e-6)


def test_uniform_logits_have_zero_entropy_gradient(passes):
    # every p = 1/V: log p + H = 0, so dH/dx = 0 exactly (the maximum of the entropy)
    logits = torch.zeros(1, 2, 5, requires_grad=True)
    logp, entropy = tk.logprobs_from_logits(logits, torch.tensor([[0, 4]]))
    assert torch.allclose(entropy, torch.full((1, 2), math.log(5.0)))
    (grad,) = torch.autograd.grad(entropy.sum(), logits)
    assert float(grad.abs().max()) < 1e-7


def test_temperature_divides_the_gradient():
    # at temperature t the logits enter as x / t: the gradient is the t = 1 gradient of the
    # scaled logits, divided by t
    logits, labels, gl, gh = _inputs("temperature", 2, 3, 7, torch.float32)
    t = 0.6
    x = logits.clone().requires_grad_(True)
    lp, h = tk.logprobs_from_logits(x, labels, temperature=t)
    (grad_t,) = torch.autograd.grad((lp * gl + h * gh).sum(), x)
    y = (logits / t).requires_grad_(True)
    lp1, h1 = tk.logprobs_from_logits(y, labels)
    (grad_1,) = torch.autograd.grad((lp1 * gl + h1 * gh).sum(), y)
    assert torch.allclose(grad_t, grad_1 / t, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# 2. random batches against the float64 oracle
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["both", "logp", "entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_match_oracle(passes, dtype, temperature, which):
    logits, labels, gl, gh = _inputs(f"logits-{dtype}-{temperature}-{which}", 3, 9, 37, dtype)
    x = logits.clone().requires_grad_(True)
    x64 = logits.double().requires_grad_(True)
    logp, entropy = tk.logprobs_from_logits(x, labels, temperature=temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    logp64, entropy64 = oracle(x64, labels, temperature)
    tol = _tol(dtype)
    assert_close_to_oracle(logp.detach(), logp64.detach(), what="logp", tol=tol)
    assert_close_to_oracle(entropy.detach(), entropy64.detach(), what="entropy", tol=tol)

    def objective(lp, h):
        terms = {"both": (lp * gl.to(lp.dtype)).sum() + (h * gh.to(h.dtype)).sum()}
        terms["logp"] = (lp * gl.to(lp.dtype)).sum()
        terms["entropy"] = (h * gh.to(h.dtype)).sum()
        return terms[which]

    (grad,) = torch.autograd.grad(objective(logp, entropy), x)
    (grad64,) = torch.autograd.grad(objective(logp64, entropy64), x64)
    assert grad.dtype == dtype and not torch.isnan(grad).any()
    assert (grad[0, -1] == 0).all(), "an ignored label gets no gradient"
    # the gradient is rounded to the logits' dtype once
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-5
    assert_close_to_oracle(grad.float(), grad64, what="dlogits", tol=(rtol, 2e-5))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("chunk_size", [4, None], ids=["chunk4", "default-chunk"])
def test_hidden_matches_oracle(passes, chunk_size, bias):
    g = torch.Generator().manual_seed(seed_of("hidden", chunk_size, bias))
    B, T, H, V = 2, 7, 12, 29
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 0] = -1
    gl, gh = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, *([b] if bias else []))]
    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, *([b] if bias else []))]
    logp, entropy = tk.logprobs_from_hidden(
        leaves[0],
        leaves[1],
        labels,
        bias=leaves[2] if bias else None,
        temperature=0.9,
        chunk_size=chunk_size,
    )
    logits64 = torch.nn.functional.linear(*leaves64)
    logp64, entropy64 = oracle(logits64, labels, 0.9)
    assert_close_to_oracle(logp.detach(), logp64.detach(), what="logp", tol=(2e-5, 2e-5))
    assert_close_to_oracle(entropy.detach(), entropy64.detach(), what="entropy", tol=(2e-5, 2e-5))
    grads = torch.autograd.grad((logp * gl).sum() + (entropy * gh).sum(), leaves)
    grads64 = torch.autograd.grad((logp64 * gl).sum() + (entropy64 * gh).sum(), leaves64)
    for name, got, want in zip(("dhidden", "dweight", "dbias"), grads, grads64, strict=False):
        assert got.dtype == torch.float32
        assert_close_to_oracle(got, want, what=name, tol=(1e-4, 1e-4))


def test_with_entropy_false_returns_empty_and_differentiates_logp():
    logits, labels, gl, _ = _inputs("no-entropy", 2, 4, 11, torch.float32)
    x = logits.clone().requires_grad_(True)
    logp, entropy = tk.logprobs_from_logits(x, labels, with_entropy=False)
    assert entropy.numel() == 0
    (grad,) = torch.autograd.grad((logp * gl).sum(), x)
    x64 = logits.double().requires_grad_(True)
    (grad64,) = torch.autograd.grad((oracle(x64, labels, 1.0)[0] * gl).sum(), x64)
    assert_close_to_oracle(grad, grad64, what="dlogits", tol=(2e-5, 2e-5))


# --------------------------------------------------------------------------------------
# 3. a -inf logit (a masked-out vocabulary entry)
# --------------------------------------------------------------------------------------


def test_minus_inf_logit_equals_the_smaller_vocabulary(passes):
    logits, labels, gl, gh = _inputs("minus-inf", 2, 5, 9, torch.float32, ignored=False)
    labels = labels.clamp(max=7)  # column 8 is the -inf column; never a label
    full = logits.clone()
    full[..., 8] = float("-inf")
    x = full.clone().requires_grad_(True)
    logp, entropy = tk.logprobs_from_logits(x, labels)
    (grad,) = torch.autograd.grad((logp * gl).sum() + (entropy * gh).sum(), x)
    y = logits[..., :8].clone().requires_grad_(True)  # the same distribution without it
    logp8, entropy8 = tk.logprobs_from_logits(y, labels)
    (grad8,) = torch.autograd.grad((logp8 * gl).sum() + (entropy8 * gh).sum(), y)
    assert torch.allclose(logp, logp8, atol=1e-6) and torch.allclose(entropy, entropy8, atol=1e-6)
    assert (grad[..., 8] == 0).all() and torch.isfinite(grad).all()
    assert torch.allclose(grad[..., :8], grad8, atol=1e-6)


# --------------------------------------------------------------------------------------
# 4. the entropy bonus through the fused loss front ends
# --------------------------------------------------------------------------------------


def _loss_inputs(B: int, T: int, seed: str):
    g = torch.Generator().manual_seed(seed_of(seed))
    old = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    return old, adv, mask


@pytest.mark.parametrize("inplace", [False, True], ids=["fresh-grad", "inplace"])
def test_logits_front_end_entropy_bonus(passes, inplace):
    B, T, V, coef = 3, 6, 19, 0.05
    logits, labels, _, _ = _inputs("front-logits", B, T, V, torch.float32, ignored=False)
    old, adv, mask = _loss_inputs(B, T, "front-logits")
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1.0 if inplace else leaf  # the in-place backward overwrites its input
    out = tk.policy_loss_from_logits(
        x, labels, old, adv, mask, with_entropy=True, inplace_backward=inplace, kl_coef=0.0
    )
    assert out.entropy.requires_grad and not out.logp.requires_grad
    bonus = (out.entropy * mask).sum() / mask.sum()
    (grad,) = torch.autograd.grad(out.loss - coef * bonus, leaf)

    leaf64 = logits.double().requires_grad_(True)
    logp64, entropy64 = oracle(leaf64, labels, 1.0)
    loss64, _ = reference.policy_loss(logp64, old.double(), adv.double(), mask.double())
    bonus64 = (entropy64 * mask).sum() / mask.sum()
    (grad64,) = torch.autograd.grad(loss64 - coef * bonus64, leaf64, retain_graph=True)
    (grad_loss_only,) = torch.autograd.grad(loss64, leaf64)
    assert float((grad64 - grad_loss_only).abs().max()) > 1e-4, "the bonus must matter"
    assert_close_to_oracle(grad, grad64, what="dlogits", tol=(2e-5, 2e-5))


def test_hidden_front_end_entropy_bonus_and_entropy_alone(passes):
    g = torch.Generator().manual_seed(seed_of("front-hidden"))
    B, T, H, V = 2, 5, 8, 23
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    old, adv, mask = _loss_inputs(B, T, "front-hidden")
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = tk.policy_loss_from_hidden(h, w, labels, old, adv, mask, with_entropy=True, chunk_size=3)
    grads = torch.autograd.grad(out.loss - 0.1 * out.entropy.mean(), (h, w), retain_graph=True)
    # the entropy alone (no loss gradient at all)
    grads_h = torch.autograd.grad(out.entropy.sum(), (h, w))

    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logp64, entropy64 = oracle(torch.nn.functional.linear(h64, w64), labels, 1.0)
    loss64, _ = reference.policy_loss(logp64, old.double(), adv.double(), mask.double())
    want = torch.autograd.grad(loss64 - 0.1 * entropy64.mean(), (h64, w64), retain_graph=True)
    want_h = torch.autograd.grad(entropy64.sum(), (h64, w64))
    for name, got, exp in zip(("dhidden", "dweight"), grads, want, strict=True):
        assert_close_to_oracle(got, exp, what=name, tol=(1e-4, 1e-4))
    for name, got, exp in zip(("dhidden", "dweight"), grads_h, want_h, strict=True):
        assert_close_to_oracle(got, exp, what=f"entropy-only {name}", tol=(1e-4, 1e-4))


# --------------------------------------------------------------------------------------
# 5. bad input, opcheck, torch.compile
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(labels=torch.full((2, 3), 11)), ValueError, "labels out of range"),
        (dict(labels=torch.zeros(2, 3, dtype=torch.int32)), (TypeError, ValueError), "labels"),
        (dict(labels=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "labels"),
        (dict(logits=torch.zeros(2, 3)), ValueError, "3-D"),
        (dict(logits=torch.zeros(2, 3, 0)), ValueError, "V = 0"),
        (dict(logits=torch.zeros(2, 3, 11, dtype=torch.int64)), (TypeError, ValueError), "logits"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(logits="not a tensor"), TypeError, "logits"),
    ],
)
def test_bad_input_errors(change, error, match):
    args = dict(logits=torch.zeros(2, 3, 11), labels=torch.zeros(2, 3, dtype=torch.int64))
    temperature = change.pop("temperature", 1.0)
    args.update(change)
    with pytest.raises(error, match=match):
        tk.logprobs_from_logits(args["logits"], args["labels"], temperature=temperature)


def test_hidden_bad_input_errors():
    hidden, weight = torch.zeros(2, 3, 4), torch.zeros(5, 4)
    labels = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="weight must have shape"):
        tk.logprobs_from_hidden(hidden, torch.zeros(5, 3), labels)
    with pytest.raises(ValueError, match="chunk_size"):
        tk.logprobs_from_hidden(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="labels out of range"):
        tk.logprobs_from_hidden(hidden, weight, torch.full((2, 3), 5))


def _opcheck_args():
    logits, labels, gl, gh = _inputs("opcheck", 2, 3, 7, torch.float32)
    logp, entropy = tk.logprobs_from_logits(logits, labels)
    hidden, weight, bias = torch.randn(2, 3, 5), torch.randn(7, 5), torch.randn(7)
    return logits, labels, gl, gh, logp, entropy, hidden, weight, bias


def test_opcheck():
    logits, labels, gl, gh, logp, entropy, hidden, weight, bias = _opcheck_args()
    ops = torch.ops.tapo
    torch.library.opcheck(ops.logprobs_from_logits.default, (logits.requires_grad_(), labels))
    torch.library.opcheck(
        ops.logprobs_from_hidden.default,
        (hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), labels),
        {"chunk_size": 2},
    )
    torch.library.opcheck(
        ops.logprobs_backward.default, (gl, gh, logits.detach(), labels, logp, entropy)
    )
    hp, he = tk.logprobs_from_hidden(hidden.detach(), weight.detach(), labels, bias=bias.detach())
    torch.library.opcheck(
        ops.logprobs_from_hidden_backward.default,
        (gl, gh, hidden.detach(), weight.detach(), bias.detach(), labels, hp, he),
    )


def test_compile_fullgraph():
    logits, labels, gl, gh, *_ = _opcheck_args()

    def step(x):
        lp, h = tk.logprobs_from_logits(x, labels, temperature=0.8)
        return (lp * gl).sum() + (h * gh).sum()

    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    eager = step(x1)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x2)
    (g1,) = torch.autograd.grad(eager, x1)
    (g2,) = torch.autograd.grad(compiled, x2)
    assert torch.equal(eager.detach(), compiled.detach()) and torch.equal(g1, g2)


def test_native_and_torch_entropy_backward_agree():
    """The C++ pass (one read of each row, fp32 lanes) and the chunked torch ops give the same
    gradient to fp32 rounding, bf16 logits and a temperature included."""
    if not tk.native_available():
        pytest.skip("the C++ build is absent")
    logits, labels, gl, gh = _inputs("native-vs-torch", 3, 11, 301, torch.bfloat16)
    grads = []
    for context in (contextlib.nullcontext, chunked_torch_passes):
        with context():
            x = logits.clone().requires_grad_(True)
            lp, h = tk.logprobs_from_logits(x, labels, temperature=0.8)
            grads.append(torch.autograd.grad((lp * gl).sum() + (h * gh).sum(), x)[0].float())
    scale = float(grads[1].abs().max())
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-2 * scale  # one bf16 rounding each


def test_internal_pass_needs_both_entropy_tensors():
    if not tk.native_available():
        pytest.skip("the C++ build is absent")
    logits, labels, gl, gh = _inputs("both", 2, 3, 7, torch.float32)
    logp, entropy = tk.logprobs_from_logits(logits, labels)
    out = torch.empty_like(logits)
    with pytest.raises(ValueError, match="given together"):
        torch.ops.tapo._dlogits_rows(gl, logits, labels, logp, 1.0, out, gh, None)
    with pytest.raises(ValueError, match="grad_entropy"):
        torch.ops.tapo._dlogits_rows(gl, logits, labels, logp, 1.0, out, gh[:, :2], entropy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
def test_triton_entropy_backward_matches_oracle(dtype, inplace):
    """The Triton vocabulary passes (the CUDA kernels, interpreted on the CPU) with an entropy
    gradient: logits (fresh and in place, vocabulary not a multiple of the block) and the
    LM-head path, against the float64 oracle."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interprets the Triton kernels: run with TRITON_INTERPRET=1")
    triton_passes = pytest.importorskip("tapo_kernels.ops.logprob_loss")
    logits, labels, gl, gh = _inputs(f"triton-{dtype}-{inplace}", 2, 5, 37, dtype)
    temperature = 0.8
    x64 = logits.double().requires_grad_(True)
    logp64, entropy64 = oracle(x64, labels, temperature)
    (want,) = torch.autograd.grad((logp64 * gl).sum() + (entropy64 * gh).sum(), x64)
    logp, entropy = logp64.float().detach(), entropy64.float().detach()
    out = logits.clone() if inplace else torch.full_like(logits, float("nan"))
    src = out if inplace else logits
    triton_passes._dlogits_into(gl, src, labels, logp, temperature, out, gh, entropy, block_v=16)
    rtol = 1e-2 if dtype == torch.bfloat16 else 2e-5
    assert not torch.isnan(out).any()
    assert_close_to_oracle(out.float(), want, what="dlogits", tol=(rtol, 2e-5))

    g = torch.Generator().manual_seed(seed_of("triton-hidden", dtype))
    hidden = torch.randn(2, 5, 8, generator=g).to(dtype)
    weight = torch.randn(37, 8, generator=g).to(dtype)
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logp64, entropy64 = oracle(torch.nn.functional.linear(h64, w64), labels, temperature)
    want_h, want_w = torch.autograd.grad((logp64 * gl).sum() + (entropy64 * gh).sum(), (h64, w64))
    lp, ent = logp64.float().detach(), entropy64.float().detach()
    args = (gl, hidden, weight, None, labels, lp, temperature, 3, True, False, gh, ent)
    dh, dw, _ = triton_passes.TRITON.logprob_from_hidden_backward(*args)
    if dtype == torch.float32:
        assert_close_to_oracle(dh, want_h, what="dhidden", tol=(1e-4, 1e-4))
        assert_close_to_oracle(dw, want_w, what="dweight", tol=(1e-4, 1e-4))
    else:  # bf16 chunk logits: the chunked torch pass rounds them the same way
        from tapo_kernels import vocab

        th, tw, _ = vocab.logprob_from_hidden_backward_torch(*args)
        for got, ref in ((dh, th), (dw, tw)):
            assert float((got.float() - ref.float()).abs().max()) <= 1e-2 * float(ref.abs().max())
