"""The C++ vocabulary passes of the logits / hidden-state front ends (``csrc/logprob.cpp``).

Each internal op is compared with the chunked torch implementation (itself compared with the
reference composition in ``test_logprob_loss.py``) on fresh random inputs: every dtype,
temperatures, vocabularies around the vector width and the 1,024-logit summation block,
``-inf`` columns, ignored labels, strided rows, outputs poisoned with NaN before the call.
Exact checks: the bf16 store rounds like torch, the AVX2 and baseline builds agree bit for
bit, rows with ``g = 0`` get exact zeros, non-finite rows give NaN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import tapo_kernels
from tapo_kernels import vocab
from tapo_kernels._library import NATIVE_LOGPROB
from tapo_kernels.testing import assert_close_to_oracle

pytestmark = pytest.mark.skipif(
    not NATIVE_LOGPROB, reason=f"native build absent: {tapo_kernels.NATIVE_ERROR}"
)

ROWS = torch.ops.tapo._logprob_rows if NATIVE_LOGPROB else None
DLOGITS = torch.ops.tapo._dlogits_rows if NATIVE_LOGPROB else None
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN = float("nan")


def _batch(B, T, V, dtype, seed, neg_inf_cols=0, ignored=True):
    gen = torch.Generator().manual_seed(seed)
    x = 4.0 * torch.randn(B, T, V, generator=gen)
    if neg_inf_cols:
        x[..., V - neg_inf_cols :] = float("-inf")  # padded vocabulary columns
    labels = torch.randint(0, V - neg_inf_cols, (B, T), generator=gen)
    if ignored:
        labels[torch.rand(B, T, generator=gen) < 0.2] = -100
    g = torch.randn(B, T, generator=gen)
    g[torch.rand(B, T, generator=gen) < 0.2] = 0.0  # masked tokens
    return x.to(dtype), labels, g


# (rtol, atol) of assert_close_to_oracle against the chunked torch passes:
# logp/entropy are fp32 for every input dtype: only the summation order differs
ROWS_TOL = (2e-5, 2e-5)


def _grad_tol(dtype):
    """dlogits are stored in the logits' dtype: one rounding of an fp32 value (2 ulp slack)."""
    return (2 * torch.finfo(dtype).eps + 2e-5, 1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("V", [1, 7, 8, 37, 1029, 2051])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_match_chunked_torch(dtype, V, temperature):
    x, labels, g = _batch(3, 5, V, dtype, seed=V + int(temperature * 10), neg_inf_cols=V // 4)
    logp, entropy = ROWS(x, labels, temperature, True)
    ref_logp, ref_entropy = vocab.selective_log_softmax_chunked(x, labels, temperature, True)
    assert logp.dtype == entropy.dtype == torch.float32
    assert_close_to_oracle(logp, ref_logp, what="logp", tol=ROWS_TOL)
    assert_close_to_oracle(entropy, ref_entropy, what="entropy", tol=ROWS_TOL)
    assert (logp[labels < 0] == 0).all() and (entropy[labels < 0] == 0).all()
    no_entropy_logp, none = ROWS(x, labels, temperature, False)
    assert none.numel() == 0 and torch.equal(no_entropy_logp, logp)

    ref = torch.empty_like(x)
    vocab.selective_log_softmax_backward_chunked(g, x, labels, ref_logp, temperature, ref)
    out = torch.full_like(x, NAN)  # poisoned: every element must be written
    DLOGITS(g, x, labels, logp, temperature, out)
    assert_close_to_oracle(out, ref, what="dlogits", tol=_grad_tol(dtype))
    assert (out[(g == 0) | (labels < 0)] == 0).all()
    inplace = x.clone()
    DLOGITS(g, inplace, labels, logp, temperature, inplace)
    assert torch.equal(inplace, out)  # in place = into a separate buffer, bit for bit


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_online_maximum_across_blocks(temperature):
    """Rows read in blocks of 1,024 logits: a maximum that grows in every block, one in the
    last block after an all -inf first block, one in the first block with an all -inf later
    block, a single finite logit; logp and entropy as the fp64 oracle."""
    V = 3 * 1024 + 5
    x = torch.empty(1, 5, V, dtype=torch.float64)
    x[0, 0] = torch.linspace(-60.0, 40.0, V)  # the maximum moves up in every block
    x[0, 1] = torch.randn(V, generator=torch.Generator().manual_seed(1)) * 5
    x[0, 1, :1024] = float("-inf")
    x[0, 1, -1] = 30.0
    x[0, 2] = torch.randn(V, generator=torch.Generator().manual_seed(2)) * 5
    x[0, 2, 7] = 25.0
    x[0, 2, 1024:2048] = float("-inf")
    x[0, 3] = float("-inf")
    x[0, 3, 2500] = 3.0  # one finite logit: logp 0 and entropy 0 at it
    x[0, 4] = torch.randn(V, generator=torch.Generator().manual_seed(4)) * 10
    labels = torch.tensor([[V - 1, V - 2, 7, 2500, 1500]])
    logp, entropy = ROWS(x.float(), labels, temperature, True)
    z = x / temperature
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    ref_logp = z.gather(-1, labels[..., None]).squeeze(-1) - lse
    ref_entropy = lse - torch.nan_to_num(p * z, nan=0.0).sum(-1)
    assert_close_to_oracle(logp, ref_logp, what="logp", tol=(1e-5, 1e-5))
    assert_close_to_oracle(entropy, ref_entropy, what="entropy", tol=(1e-5, 1e-5))
    assert float(logp[0, 3]) == 0.0 and abs(float(entropy[0, 3])) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_store_rounds_like_torch(dtype):
    """dlogits written in bf16/fp16 equal the kernel's own fp32 dlogits cast by torch."""
    x, labels, g = _batch(4, 6, 300, dtype, seed=3)
    g = g * 1000.0  # large gradients: many values away from zero, all rounding cases
    logp, _ = ROWS(x, labels, 1.0, False)
    low, f32 = torch.full_like(x, NAN), torch.full(x.shape, NAN)
    DLOGITS(g, x, labels, logp, 1.0, low)
    DLOGITS(g, x, labels, logp, 1.0, f32)
    assert torch.equal(low, f32.to(dtype))


def test_strided_rows_equal_contiguous_rows():
    full, labels, g = _batch(3, 9, 41, torch.float32, seed=5)
    sliced = full[:, 1:-1]  # rows 2 apart in T, not contiguous
    lab, gg = labels[:, 1:-1], g[:, 1:-1]
    a = ROWS(sliced, lab, 0.9, True)
    b = ROWS(sliced.contiguous(), lab.contiguous(), 0.9, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    out = torch.full((3, 9, 41), NAN)[:, 1:-1]  # a strided output too
    DLOGITS(gg, sliced, lab, a[0], 0.9, out)
    expected = torch.empty(3, 7, 41)
    DLOGITS(gg.contiguous(), sliced.contiguous(), lab.contiguous(), a[0], 0.9, expected)
    assert torch.equal(out, expected)


def test_non_finite_rows_give_nan_and_the_op_raises():
    x, labels, _ = _batch(1, 4, 19, torch.float32, seed=7, ignored=False)
    x[0, 0, 3] = NAN
    x[0, 1, 5] = float("inf")
    x[0, 2] = float("-inf")
    logp, entropy = ROWS(x, labels, 1.0, True)
    assert torch.isnan(logp[0, :3]).all() and torch.isnan(entropy[0, :3]).all()
    assert torch.isfinite(logp[0, 3]) and torch.isfinite(entropy[0, 3])
    old = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="non-finite log-probability"):
        torch.ops.tapo.policy_loss_from_logits(x, labels, old, torch.ones(1), torch.ones(1, 4))


def test_label_out_of_range_raises():
    x, labels, g = _batch(1, 3, 10, torch.float32, seed=9)
    labels[0, 1] = 10
    with pytest.raises(ValueError, match="labels must be < V = 10"):
        ROWS(x, labels, 1.0, False)
    with pytest.raises(ValueError, match="labels must be < V = 10"):
        DLOGITS(g, x, labels, torch.zeros(1, 3), 1.0, torch.empty_like(x))


def test_empty_batch():
    x = torch.empty(0, 4, 11)
    logp, entropy = ROWS(x, torch.empty(0, 4, dtype=torch.int64), 1.0, True)
    assert logp.shape == entropy.shape == (0, 4)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hidden_passes_match_chunked_torch(dtype, chunk, with_bias):
    gen = torch.Generator().manual_seed(chunk)
    B, T, H, V = 2, 9, 16, 45
    h = torch.randn(B, T, H, generator=gen).to(dtype)
    w = (0.5 * torch.randn(V, H, generator=gen)).to(dtype)
    bias = torch.randn(V, generator=gen).to(dtype) if with_bias else None
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :2] = -100
    g = torch.randn(B, T, generator=gen)
    logp, entropy = torch.ops.tapo._logprob_from_hidden(h, w, bias, labels, 1.1, True, chunk)
    ref = vocab.selective_log_softmax_from_hidden_chunked(h, w, bias, labels, 1.1, True, chunk)
    assert_close_to_oracle(logp, ref[0], what="logp", tol=ROWS_TOL)
    assert_close_to_oracle(entropy, ref[1], what="entropy", tol=ROWS_TOL)
    grads = torch.ops.tapo._logprob_from_hidden_backward(
        g, h, w, bias, labels, logp, 1.1, chunk, True, True
    )
    ref_grads = vocab.selective_log_softmax_from_hidden_backward_chunked(
        g, h, w, bias, labels, logp, 1.1, chunk, True, True
    )
    tol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    for name, a, b in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        assert_close_to_oracle(a, b, what=name, tol=tol)
    dh, dw, db = torch.ops.tapo._logprob_from_hidden_backward(
        g, h, w, bias, labels, logp, 1.1, chunk, False, False
    )
    assert dw.numel() == 0 and db.numel() == 0 and torch.equal(dh, grads[0])


_ISA_SCRIPT = """
import json, torch, tapo_kernels
gen = torch.Generator().manual_seed(11)
out = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    x = (4 * torch.randn(3, 7, 1043, generator=gen)).to(dtype)
    x[..., -5:] = float("-inf")
    labels = torch.randint(0, 1000, (3, 7), generator=gen)
    labels[0, 0] = -1
    g = torch.randn(3, 7, generator=gen)
    lp, ent = torch.ops.tapo._logprob_rows(x, labels, 0.8, True)
    d = torch.empty_like(x)
    torch.ops.tapo._dlogits_rows(g, x, labels, lp, 0.8, d)
    out[str(dtype)] = [lp.double().tolist(), ent.double().tolist(), d.double().sum(-1).tolist(),
                       d.float().view(torch.int32).sum().item()]
print(json.dumps(out))
"""


def test_avx2_and_baseline_builds_agree_bit_for_bit():
    runs = []
    for isa in ("", "generic"):
        env = dict(os.environ, TAPO_NATIVE_ISA=isa)
        res = subprocess.run(
            [sys.executable, "-c", _ISA_SCRIPT], env=env, check=True, capture_output=True, text=True
        )
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1]


def test_without_the_native_build_the_chunked_torch_passes_run():
    script = (
        "import json, tapo_kernels; from tapo_kernels import _library; "
        "print(json.dumps([_library.NATIVE_LOGPROB, "
        "tapo_kernels.CPU_BACKEND['policy_loss_from_hidden']]))"
    )
    env = dict(os.environ, TAPO_DISABLE_NATIVE="1")
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True
    )
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [False, "chunked-torch"]
    assert tapo_kernels.CPU_BACKEND["policy_loss_from_hidden"] == "native"


def _bad_internal_calls():
    """(name, call, exception type, message text) for the checks of the internal ops."""
    x, labels, g = _batch(2, 3, 10, torch.float32, seed=13)
    lp = torch.zeros(2, 3)
    h, w = torch.randn(2, 3, 4), torch.randn(10, 4)
    hb = torch.ops.tapo._logprob_from_hidden if NATIVE_LOGPROB else None
    return [
        ("logits 2-D", lambda: ROWS(x[0], labels, 1.0, False), ValueError, "must be 3-D"),
        (
            "vocab stride",
            lambda: ROWS(x.transpose(1, 2), labels, 1.0, False),
            ValueError,
            "unit stride along the vocabulary",
        ),
        (
            "logits fp64",
            lambda: ROWS(x.double(), labels, 1.0, False),
            TypeError,
            "logits must have dtype",
        ),
        (
            "temperature 0",
            lambda: ROWS(x, labels, 0.0, False),
            ValueError,
            "temperature must be finite and > 0",
        ),
        (
            "labels int32",
            lambda: ROWS(x, labels.int(), 1.0, False),
            TypeError,
            "labels must have dtype",
        ),
        (
            "out fp64",
            lambda: DLOGITS(g, x, labels, lp, 1.0, torch.empty_like(x).double()),
            TypeError,
            "out must have the dtype of logits or float32",
        ),
        (
            "out shape",
            lambda: DLOGITS(g, x, labels, lp, 1.0, torch.empty(2, 3, 9)),
            ValueError,
            "out must have shape",
        ),
        (
            "grad_logp shape",
            lambda: DLOGITS(g[:, :2], x, labels, lp, 1.0, torch.empty_like(x)),
            ValueError,
            "grad_logp must have shape",
        ),
        (
            "chunk 0",
            lambda: hb(h, w, None, labels, 1.0, False, 0),
            ValueError,
            "chunk_size must be > 0",
        ),
        (
            "weight shape",
            lambda: hb(h, w[:, :3], None, labels, 1.0, False, 4),
            ValueError,
            "weight must have shape",
        ),
        (
            "bias dtype",
            lambda: hb(h, w, torch.zeros(10).double(), labels, 1.0, False, 4),
            TypeError,
            "bias must have the dtype of hidden",
        ),
    ]


@pytest.mark.parametrize(
    "case", _bad_internal_calls() if NATIVE_LOGPROB else [], ids=lambda c: c[0]
)
def test_internal_ops_reject_bad_input(case):
    _, call, exc, text = case
    with pytest.raises(exc, match=text):
        call()
