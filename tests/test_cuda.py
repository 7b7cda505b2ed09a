"""CUDA correctness suite: the compiled Triton kernels through the dispatcher, against the reference.

Run once on a GPU with compiled Triton::

    TRITON_INTERPRET=0 python -m pytest -q -m cuda tests/test_cuda.py

Every test is marked ``cuda`` and skipped without a CUDA device, and when ``TRITON_INTERPRET=1``
(``conftest.py`` sets it by default; the compiled kernels are what is tested here).
``TAPO_TEST_DEVICE=cpu`` runs the same bodies on the CPU (the ops then dispatch to the C++ /
reference kernels) with the large shapes shrunk, to catch API mistakes without a GPU.

Sections:

1. ``tapo::fused_correct``: quantized batches equal the reference bit for bit; realistic
   batches (up to B=512, T=8192, N=4096, D=256) match within 1e-5, on poisoned memory;
2. ``tapo::policy_loss`` (+ autograd), ``policy_loss_backward``, ``policy_loss_with_grad``:
   one knob at a time from a baseline, and the algo x agg grid, up to B=512, T=2048 and
   B=64, T=16384 (logp is fp32 or fp64: the op rejects bf16, checked in section 6); NaN / inf
   at masked tokens change nothing;
3. ``policy_loss_from_logits``: V in {1000, 32768, 151936}, fp32 / bf16, temperature,
   in-place backward, 8192 x 151936 bf16, one row of 65,536 tokens;
4. ``policy_loss_from_hidden``: fp32 / bf16, bias, chunk sizes, up to M=8192, H=4096, V=131072;
5. ``torch.library.opcheck`` of every op, ``torch.compile(fullgraph=True)`` against eager;
6. bad input gives a clear error and leaves the device usable.

Errors are relative: ``||out - ref|| / ||ref||`` in float64 against an oracle (float64 where
affordable), passing when within the case's tolerance or within twice the error of the
reference computed in the kernel's own precision (the tolerance rule of the other tests).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import tapo_kernels
from tapo_kernels import _library, reference
from tapo_kernels.reference import AGGS, ALGOS, KL_TYPES, METRIC_NAMES
from tapo_kernels.testing import correct_batch, loss_batch, seed_of

try:
    from benchmarks.bench_fused_correct import make_batch
except ImportError:  # pytest started outside the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.bench_fused_correct import make_batch

DEVICE = os.environ.get("TAPO_TEST_DEVICE", "cuda")
ON_CPU = DEVICE == "cpu"
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not ON_CPU and not torch.cuda.is_available(),
        reason="needs a CUDA device (TAPO_TEST_DEVICE=cpu runs the bodies on the CPU)",
    ),
    pytest.mark.skipif(
        not ON_CPU and torch.cuda.is_available() and _INTERPRETED,
        reason="tests the compiled kernels: run with TRITON_INTERPRET=0",
    ),
]

F32_TOL = 1e-5
F64_TOL = 1e-10
BF16_TOL = 1e-2
_CHUNK = 1 << 26  # elements per float64 chunk of the error norms


def big(full: Any, small: Any) -> Any:
    """``full`` on the device, ``small`` when the bodies run on the CPU."""
    return small if ON_CPU else full


def dev(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(DEVICE)


def free() -> None:
    if torch.cuda.is_available() and not ON_CPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def poison(numel: int) -> None:
    """Leave ``numel`` fp32 NaNs in the caching allocator, so uninitialised outputs show up."""
    if not ON_CPU:
        junk = torch.full((max(numel, 1),), float("nan"), device=DEVICE)
        del junk


@pytest.fixture(autouse=True)
def _release_device_memory():
    yield
    free()


def rel_err(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 over the entries where ``ref`` is finite.

    ``inf`` when ``out`` is NaN or inf where ``ref`` is finite (NaN never passes); the
    absolute norm when ``ref`` is zero.
    """
    o = out.detach().reshape(-1)
    r = ref.detach().reshape(-1).to(o.device)
    num = torch.zeros((), dtype=torch.float64, device=o.device)
    den = torch.zeros_like(num)
    bad = torch.zeros((), dtype=torch.bool, device=o.device)
    for s in range(0, o.numel(), _CHUNK):
        oc, rc = o[s : s + _CHUNK].double(), r[s : s + _CHUNK].double()
        finite = torch.isfinite(rc)
        bad |= (finite & ~torch.isfinite(oc)).any()
        d = torch.where(finite, oc - rc, 0.0)
        rc = torch.where(finite, rc, 0.0)
        num += (d * d).sum()
        den += (rc * rc).sum()
    if bool(bad):
        return math.inf
    n, d = math.sqrt(float(num)), math.sqrt(float(den))
    return n / d if d > 0 else n


def assert_rel(
    what: str,
    out: Tensor,
    ref: Tensor,
    tol: float,
    ref_own: Tensor | None = None,
    atol: float = 0.0,
) -> None:
    """Relative error within ``tol``, or within 2x the own-precision reference's error
    (or ``||out - ref|| <= atol``, for scalars that cancel to near 0)."""
    assert tuple(out.shape) == tuple(ref.shape), (
        f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    )
    err = rel_err(out, ref)
    own = rel_err(ref_own, ref) if ref_own is not None else 0.0
    bound = max(tol, 2 * own)
    print(f"{what}: rel err {err:.3e} (own-precision reference {own:.3e}, bound {bound:.1e})")
    if err <= bound:
        return
    ref_norm = float(ref.detach().double().norm()) if ref.numel() < _CHUNK else math.inf
    abs_err = err * ref_norm if ref_norm > 0 else err  # rel_err is absolute when ref is 0
    assert abs_err <= atol, f"{what}: rel err {err:.3e} > {bound:.1e}"


def assert_metrics(
    metrics: Tensor, ref: Tensor, mask: Tensor, own: Tensor | None = None, tol: float = F32_TOL
) -> None:
    """Each metric within ``tol`` (relative) or 2x the own-precision reference's error;
    the clip fractions also within 2 flipped tokens (a ratio on a clip bound)."""
    assert metrics.dtype == torch.float32 and metrics.shape == (len(METRIC_NAMES),)
    m, r = metrics.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.isfinite(m).all(), f"metrics: non-finite {m}"
    n = len(METRIC_NAMES)
    own_err = (own.detach().cpu().double() - r).abs() if own is not None else torch.zeros(n)
    bound = torch.maximum(tol * r.abs(), 2 * own_err) + 1e-6
    flips = 2.0 / max(float((mask != 0).sum()), 1.0) + 1e-6
    for name in ("clip_frac", "dual_clip_frac"):  # a ratio on a clip bound may flip
        k = METRIC_NAMES.index(name)
        bound[k] = max(float(bound[k]), flips)
    assert bool(((m - r).abs() <= bound).all()), f"metrics {m.tolist()} vs {r.tolist()}"


def front_door_tensors(tensors: tuple) -> tuple[tuple, dict[str, Tensor | None]]:
    """The op's loss tensors ``(old_logp, advantages, mask, ref_logp, call_map, call_delta,
    importance_weight)`` as the front doors take them: three positional arguments, and the
    rest as keywords."""
    old, adv, mask, ref, call_map, call_delta, *rest = tensors
    weight = rest[0] if rest else None
    return (old, adv, mask), dict(
        ref_logp=ref, call_map=call_map, call_delta=call_delta, importance_weight=weight
    )


def as_dtype(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.bool else t
        for t in args
    )


# ======================================================================================
# 1. fused_correct
# ======================================================================================

OUTPUTS = ("corrected", "delta", "confidence", "witness")

# id -> (correct_batch arguments, (theta, alpha_min, beta), batch_scope, coverage)
QUANTIZED_CASES = {
    "default": (dict(seed=1), (0.7, 0.3, 0.8), False, True),
    "prime-B-batch-scope": (dict(seed=37, B=13, T=29), (0.7, 0.3, 0.8), True, True),
    "T1": (dict(seed=6, B=5, T=1, D=4), (0.7, 0.3, 0.8), False, True),
    "bf16-no-coverage": (
        dict(seed=2, B=24, T=200, param_dtype=torch.bfloat16, num_keys=1, num_queries=3),
        (0.5, 0.25, 1.0),
        False,
        False,
    ),
    "fp16-many-calls-batch": (
        dict(
            seed=5,
            B=64,
            T=1000,
            D=64,
            calls_per_row=8,
            param_dtype=torch.float16,
            group_size=8,
            num_keys=1,
            num_queries=4,
        ),
        (0.1, 0.0, 0.8),
        True,
        True,
    ),
}


def run_fused_correct(args_cpu: tuple, knobs: tuple) -> tuple[tuple, tuple, tuple]:
    """(device outputs, reference outputs on the CPU copies, device inputs)."""
    args = tuple(dev(t) for t in args_cpu)
    before = [t.clone() for t in args]
    B, T = args[0].shape
    poison(2 * B * T + 4 * args[3].numel())
    out = torch.ops.tapo.fused_correct(*args, *knobs)
    for a, b in zip(args, before, strict=True):
        assert torch.equal(a, b), "the kernel modified an input"
    ref = _library.fused_correct_reference_kernel(*args_cpu, *knobs)
    for name, o, r in zip(OUTPUTS, out, ref, strict=True):
        assert o.device.type == torch.device(DEVICE).type, name
        assert o.shape == r.shape and o.dtype == r.dtype, name
        if o.is_floating_point():
            assert not torch.isnan(o).any(), f"{name} contains NaN"
            assert torch.isfinite(o).all(), f"{name} is not finite"
    return out, ref, args


@pytest.mark.parametrize("case", sorted(QUANTIZED_CASES))
def test_fused_correct_quantized_matches_reference_exactly(case):
    gen_kw, (theta, alpha_min, beta), scope, coverage = QUANTIZED_CASES[case]
    batch = correct_batch(quantized=True, **gen_kw)
    out, ref, _ = run_fused_correct(batch.op_args(), (theta, alpha_min, beta, scope, coverage))
    for name, o, r in zip(OUTPUTS, out, ref, strict=True):
        assert torch.equal(o.cpu(), r), f"{name} differs from the reference"


def check_witnesses(w: Tensor, ref_w: Tensor, args: tuple, batch_scope: bool) -> None:
    """Witnesses equal, or (a last-bit tie of the reference's matmul) another valid candidate
    whose similarity is within 1e-5 of the reference witness's."""
    seq_adv, gid, seq, _, _, tool, key, params, kinds = args[1:10]
    assert torch.equal(w == -1, ref_w == -1)
    k = (w != ref_w).nonzero().flatten()
    if k.numel() == 0:
        return
    print(f"{k.numel()} witnesses differ from the reference (ties)")
    assert k.numel() <= max(2, w.numel() // 100), f"{k.numel()} witnesses differ"
    a, b = w[k], ref_w[k]
    assert (tool[a] == tool[k]).all() and (key[a] == key[k]).all()
    assert (seq_adv[seq[a]] > 0).all()
    if not batch_scope:
        assert (gid[seq[a]] == gid[seq[k]]).all()
    p = params.double()
    sims = [reference.pairwise_similarity(p[k], p[c], kinds[tool[k]]).diagonal() for c in (a, b)]
    assert float((sims[0] - sims[1]).abs().max()) <= 1e-5


# id -> (B, T, N, D) on the device (shrunk on the CPU), scope, coverage, param dtype
REALISTIC_CASES = {
    "64x1024-group-coverage-fp32": ((64, 1024, 512, 256), "group", True, torch.float32),
    "64x1024-batch-coverage-fp32": ((64, 1024, 512, 256), "batch", True, torch.float32),
    "64x1024-group-nocoverage-fp32": ((64, 1024, 512, 256), "group", False, torch.float32),
    "64x1024-batch-nocoverage-bf16": ((64, 1024, 512, 256), "batch", False, torch.bfloat16),
    "256x4096-group-coverage-bf16": ((256, 4096, 2048, 256), "group", True, torch.bfloat16),
    "512x8192-group-coverage-fp32": ((512, 8192, 4096, 256), "group", True, torch.float32),
    "512x8192-batch-nocoverage-bf16": ((512, 8192, 4096, 256), "batch", False, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(REALISTIC_CASES))
def test_fused_correct_realistic_shapes(case):
    size, scope, coverage, param_dtype = REALISTIC_CASES[case]
    B, T, N, D = big(size, (32, 256, 128, 64) if size[0] < 512 else (64, 512, 256, 128))
    args = list(make_batch(B, T, N, D, seed=seed_of(case), device="cpu"))
    args[8] = args[8].to(param_dtype)
    # noisy paraphrases of a query have cosine ~0.6: theta 0.5 lets them match; in batch
    # scope the support is one group of a batch-wide pool (coverage ~0.1): alpha_min 0
    knobs = (0.5, 0.2 if scope == "group" else 0.0, 0.8, scope == "batch", coverage)
    out, ref, dev_args = run_fused_correct(tuple(args), knobs)
    print(f"{int((ref[1] > 0).sum())} of {N} calls lifted")
    assert int((ref[1] > 0).sum()) > 0, "weak case: the reference lifts no call"
    for i in range(3):
        assert_rel(OUTPUTS[i], out[i], ref[i], F32_TOL)
        torch.testing.assert_close(out[i].cpu(), ref[i], rtol=1e-5, atol=1e-5)
    check_witnesses(out[3].cpu(), ref[3], tuple(args), scope == "batch")
    del out, ref, dev_args
    free()


# ======================================================================================
# 2. policy_loss, policy_loss_backward, policy_loss_with_grad
# ======================================================================================

# the baseline batch: fp32 with a float mask, and every optional input (per-token
# advantages, reference log-probs, TAPO calls)
LOSS_BASE: dict[str, Any] = dict(B=32, T=1024, dtype=torch.float32, bool_mask=False)
LOSS_BASE.update(per_token=True, with_ref=True, with_calls=True)
KNOBS_BASE: dict[str, Any] = dict(algo="grpo", agg="token-mean", kl_type="k3", kl_coef=0.1)

# id -> (batch overrides, knob overrides): one knob at a time from the baseline
LOSS_VARIANTS: dict[str, tuple[dict, dict]] = {
    "tiny-7x33": (dict(B=7, T=33), {}),
    "T2-one-policy-token-per-row": (dict(B=5, T=2), {}),  # token 0 is the prompt
    "kl-k1": ({}, dict(kl_type="k1")),
    "kl-k2": ({}, dict(kl_type="k2")),
    "no-ref": (dict(with_ref=False), dict(kl_coef=0.0)),
    "no-tapo-lift": (dict(with_calls=False), {}),
    "per-row-advantages": (dict(per_token=False), {}),
    "fp64": (dict(dtype=torch.float64), {}),
    "bool-mask": (dict(bool_mask=True), {}),
    "no-dual-clip": ({}, dict(dual_clip_c=0.0, eps_high=0.28)),
    "global-count": ({}, dict(global_count=20000.0)),
    "norm-const": ({}, dict(agg="seq-mean-token-sum-norm", norm_const=4096.0)),
    "large-512x2048": (dict(B=big(512, 16), T=big(2048, 512)), {}),
    "long-rows-64x16384": (dict(B=big(64, 4), T=big(16384, 4096)), dict(agg="seq-mean-token-mean")),
    "long-rows-64x16384-gspo": (
        dict(B=big(64, 4), T=big(16384, 4096)),
        dict(algo="gspo", agg="seq-mean-token-mean"),
    ),
    "long-rows-64x16384-gspo-seq": (
        dict(B=big(64, 4), T=big(16384, 4096)),
        dict(algo="gspo-seq", agg="seq-mean-token-mean"),
    ),
}


def loss_knobs(**extra: Any) -> dict[str, Any]:
    knobs = {**KNOBS_BASE, **extra}
    if knobs["algo"] in ("gspo", "gspo-seq"):
        knobs.update(eps_low=3e-4, eps_high=4e-4)
    return knobs


def check_policy_loss(batch_kw: dict[str, Any], knobs: dict[str, Any], seed: int) -> None:
    kw = {**LOSS_BASE, **batch_kw}
    dtype, bool_mask = kw.pop("dtype"), kw.pop("bool_mask")
    batch = loss_batch(dtype=dtype, spread=0.5, seed=seed, **kw)
    if bool_mask:
        batch.mask = batch.mask > 0
    args_cpu = batch.op_args()
    args = tuple(dev(t) for t in args_cpu)
    g = 1.7

    # the reference in float64 (oracle) and in the inputs' dtype, d loss = 1
    refs = {}
    for dt in {torch.float64, dtype}:
        a = as_dtype(args_cpu, dt)
        loss, metrics = _library.policy_loss_reference_kernel(*a, **knobs)
        grad = _library.policy_loss_backward_reference_kernel(
            torch.tensor(1.0, dtype=dt), *a, **knobs
        )
        refs[dt] = (loss, metrics, grad)
    loss64, metrics64, grad64 = refs[torch.float64]
    own = refs[dtype]
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    assert float(grad64.abs().max()) > 0, "weak case: zero gradient"

    # forward + autograd through the dispatcher
    logp = args[0].clone().requires_grad_(True)
    poison(2 * logp.numel())
    loss, metrics = torch.ops.tapo.policy_loss(logp, *args[1:], **knobs)
    assert loss.dtype == dtype and loss.shape == () and loss.device == logp.device
    (g * loss).backward()
    assert logp.grad.dtype == dtype and logp.grad.shape == logp.shape
    assert_rel("loss", loss, loss64, tol, own[0], atol=1e-7)
    assert_metrics(metrics, metrics64, batch.mask, own[1], tol)
    assert_rel("autograd grad", logp.grad, g * grad64, tol, g * own[2])
    masked = args[3] == 0
    assert (logp.grad[masked] == 0).all(), "masked tokens got gradient"

    # the backward op on its own
    poison(2 * logp.numel())
    grad = torch.ops.tapo.policy_loss_backward(
        torch.tensor(g, dtype=dtype, device=DEVICE), *args, **knobs
    )
    assert grad.dtype == dtype and grad.shape == logp.shape
    assert_rel("policy_loss_backward", grad, g * grad64, tol, g * own[2])

    # value and gradient in one call
    poison(2 * logp.numel())
    wg_loss, wg_metrics, wg_grad = torch.ops.tapo.policy_loss_with_grad(*args, **knobs)
    assert not wg_grad.requires_grad and wg_grad.is_contiguous()
    assert_rel("with_grad loss", wg_loss, loss64, tol, own[0], atol=1e-7)
    assert_metrics(wg_metrics, metrics64, batch.mask, own[1], tol)
    assert_rel("with_grad grad", wg_grad, grad64, tol, own[2])
    del logp, loss, grad, wg_grad, args
    free()


@pytest.mark.parametrize("variant", list(LOSS_VARIANTS))
def test_policy_loss_one_knob_at_a_time(variant):
    batch_kw, knob_kw = LOSS_VARIANTS[variant]
    check_policy_loss(batch_kw, loss_knobs(**knob_kw), seed_of("loss", variant))


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("algo", ALGOS)
def test_policy_loss_algo_agg_grid(algo, agg):
    kl_type = KL_TYPES[(ALGOS.index(algo) + AGGS.index(agg)) % len(KL_TYPES)]
    # T = 1500: two column blocks of 1024 per row, the second partial
    check_policy_loss(
        dict(B=16, T=1500),
        loss_knobs(algo=algo, agg=agg, kl_type=kl_type),
        seed_of("grid", algo, agg),
    )


@pytest.mark.parametrize("case", ["policy_loss-nan", "policy_loss-inf", "logits-nan"])
def test_garbage_at_masked_tokens_changes_nothing(case):
    """NaN / inf at every mask-0 token of the (B, T) float inputs (or of the logits): the
    same loss, metrics and gradient, bit for bit, as zeros there, and zero gradient there."""
    B, T = big((64, 2048), (8, 128))
    batch = loss_batch(B=B, T=T, seed=seed_of("garbage", case))
    masked = batch.mask == 0
    value = math.inf if case.endswith("inf") else math.nan
    if case.startswith("policy_loss"):

        def run(v):
            args = [
                dev(torch.where(masked, torch.full_like(t, v), t))
                if t is not None and t.dim() == 2 and t.is_floating_point() and i != 3
                else dev(t)
                for i, t in enumerate(batch.op_args())
            ]
            return torch.ops.tapo.policy_loss_with_grad(
                *args, kl_coef=0.1, kl_type="k2", agg="seq-mean-token-mean"
            )
    else:
        V = 1000
        gen = torch.Generator().manual_seed(seed_of("garbage-logits"))
        logits = torch.randn(B, T, V, generator=gen).to(torch.bfloat16)
        labels = dev(torch.randint(0, V, (B, T), generator=gen))
        tensors = tuple(dev(t) for t in batch.op_args()[1:])

        def run(v):
            x = dev(torch.where(masked[..., None], torch.full_like(logits, v), logits))
            x.requires_grad_(True)
            loss, metrics, _, _ = torch.ops.tapo.policy_loss_from_logits(
                x, labels, *tensors, kl_coef=0.1
            )
            loss.backward()
            return loss.detach(), metrics, x.grad

    clean, dirty = run(0.0), run(value)
    assert torch.isfinite(dirty[0]) and torch.isfinite(dirty[1]).all()
    for a, b in zip(clean, dirty, strict=True):
        assert torch.equal(a, b)
    assert (dirty[2][dev(masked)] == 0).all() and float(dirty[2].abs().max()) > 0


# ======================================================================================
# 3. policy_loss_from_logits
# ======================================================================================

LOGPROB_KNOBS: dict[str, dict[str, Any]] = {
    "grpo": dict(algo="grpo", eps_high=0.28, kl_coef=0.1, kl_type="k3", agg="token-mean"),
    "gspo": dict(algo="gspo", eps_low=0.1, eps_high=0.15, agg="seq-mean-token-mean", kl_coef=0.05),
    "gspo-seq": dict(
        algo="gspo-seq", eps_low=0.1, eps_high=0.15, agg="seq-mean-token-mean", kl_coef=0.05
    ),
    "sapo": dict(algo="sapo", kl_coef=0.05, kl_type="k2", agg="seq-mean-token-sum-norm"),
}


def logprob_inputs(logits: Tensor, algo: str, temperature: float, seed: int):
    """``(labels, (old_logp, advantages, mask, ref_logp, call_map, call_delta))`` on the device,
    fp32: labels ``-100`` at half of the mask-0 tokens; old and reference log-probs near the
    true ones (ratios inside and outside the clip range)."""
    B, T, V = logits.shape
    b = loss_batch(
        B,
        T,
        dtype=torch.float32,
        per_token=algo != "gspo",
        with_ref=True,
        with_calls=True,
        seed=seed,
    )
    mask = dev(b.mask)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=gen, device=DEVICE)
    ignored = (mask == 0) & (torch.rand(B, T, generator=gen, device=DEVICE) < 0.5)
    labels = labels.masked_fill(ignored, -100)
    with torch.no_grad():
        true_logp, _ = reference.selective_log_softmax(logits, labels, temperature)
    noise = torch.randn(2, B, T, generator=gen, device=DEVICE)
    old, ref = true_logp + 0.25 * noise[0], true_logp + 0.5 * noise[1]
    return labels, (old, dev(b.advantages), mask, ref, dev(b.call_map), dev(b.call_delta))


def oracle_loss(logits, labels, tensors, temperature, knobs, dtype=torch.float64):
    """``reference.policy_loss_from_logits`` with the log-softmax in float64: (loss, metrics,
    logp, entropy), differentiable through ``logits``."""
    x = logits.to(dtype) / temperature
    lse = torch.logsumexp(x, dim=-1)
    valid = labels >= 0
    logp = x.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) - lse
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    with torch.no_grad():
        entropy = lse - (torch.softmax(x, dim=-1) * x).sum(-1)
        entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    loss, metrics = reference.policy_loss(logp, *as_dtype(tensors, dtype), **knobs)
    return loss, metrics, logp.detach(), entropy


def logits_reference(logits, labels, tensors, temperature, knobs, oracle: bool):
    """(loss, metrics, logp, entropy, dlogits): the float64 oracle, or the reference
    composition in the inputs' precision (fp32 log-softmax, gradient in the logits' dtype)."""
    leaf = logits.detach().requires_grad_(True)
    if oracle:
        loss, metrics, logp, entropy = oracle_loss(leaf, labels, tensors, temperature, knobs)
    else:
        loss, metrics, logp, entropy = reference.policy_loss_from_logits(
            leaf, labels, *tensors, temperature=temperature, with_entropy=True, **knobs
        )
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), metrics, logp.detach(), entropy, grad


_F32, _BF16 = torch.float32, torch.bfloat16
# id -> ((B, T) on the device, (B, T) on the CPU), V, dtype, temperature, inplace, entry, algo
LOGITS_CASES: dict[str, tuple] = {
    "V1000-fp32": ((4, 256), (2, 64), 1000, _F32, 1.0, False, "op", "grpo"),
    "V1000-bf16-t0.7": ((4, 256), (2, 64), 1000, _BF16, 0.7, False, "front", "sapo"),
    "V32768-bf16-inplace": ((2, 512), (2, 16), 32768, _BF16, 1.0, True, "op", "gspo"),
    "V32768-fp32-t0.7-inplace": ((2, 256), (1, 16), 32768, _F32, 0.7, True, "front", "grpo"),
    "V151936-bf16-t0.7": ((2, 256), (1, 8), 151936, _BF16, 0.7, False, "op", "grpo"),
    "V151936-fp32-inplace": ((1, 128), (1, 8), 151936, _F32, 1.0, True, "front", "sapo"),
    "long-row-T65536-V1000": ((1, 65536), (1, 4096), 1000, _BF16, 1.0, False, "op", "grpo"),
    "8192x151936-bf16": ((4, 2048), (1, 32), 151936, _BF16, 1.0, True, "op", "grpo"),
}
_ORACLE64_MAX = 1 << 28  # elements of logits up to which the float64 oracle runs


def check_logprob_result(result, oracle, own, dtype, mask, grad_names) -> None:
    """Compare (loss, metrics, logp, entropy, grads) with the oracle; ``own`` is the reference
    in the inputs' precision (None when it is the oracle itself)."""
    loss, metrics, logp, entropy, grads = result
    tol = BF16_TOL if dtype == torch.bfloat16 else F32_TOL
    hidden_path = grad_names[0] == "dhidden"  # logits rounded to bf16 by the GEMM
    value_tol = tol if hidden_path else F32_TOL
    pick = (lambda i: None) if own is None else (lambda i: own[i])
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert logp.dtype == entropy.dtype == torch.float32
    assert not logp.requires_grad and not entropy.requires_grad
    assert_rel("loss", loss, oracle[0], value_tol, pick(0), atol=1e-7)
    assert_metrics(metrics, oracle[1], mask, pick(1), value_tol)
    assert_rel("logp", logp, oracle[2], value_tol, pick(2))
    assert_rel("entropy", entropy, oracle[3], value_tol, pick(3))
    for i, (name, g) in enumerate(zip(grad_names, grads, strict=False)):
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}"
        assert float(oracle[4][i].abs().max()) > 0, f"weak case: zero {name}"
        assert_rel(name, g, oracle[4][i], tol, None if own is None else own[4][i])


@pytest.mark.parametrize("case", list(LOGITS_CASES))
def test_policy_loss_from_logits(case):
    shape, small, V, dtype, temperature, inplace, entry, algo = LOGITS_CASES[case]
    B, T = big(shape, small)
    seed = seed_of("logits", case)
    knobs = LOGPROB_KNOBS[algo]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = torch.randn(B, T, V, generator=gen, device=DEVICE, dtype=dtype).mul_(3.0)
    labels, tensors = logprob_inputs(logits, algo, temperature, seed)

    # the kernel: the op, or the front door, through autograd
    leaf = logits.detach().requires_grad_(True)
    x = leaf * 1.0 if inplace else leaf  # the in-place backward overwrites an intermediate
    poison(2 * logits.numel())
    if entry == "op":
        loss, metrics, logp, entropy = torch.ops.tapo.policy_loss_from_logits(
            x,
            labels,
            *tensors,
            temperature=temperature,
            with_entropy=True,
            inplace_backward=inplace,
            **knobs,
        )
    else:
        positional, optional = front_door_tensors(tensors)
        out = tapo_kernels.policy_loss_from_logits(
            x,
            labels,
            *positional,
            temperature=temperature,
            with_entropy=True,
            inplace_backward=inplace,
            **optional,
            **knobs,
        )
        loss, metrics, logp, entropy = out.loss, out.metrics, out.logp, out.entropy
    (grad,) = torch.autograd.grad(loss, leaf)
    del x
    assert grad.shape == logits.shape
    assert (grad[labels < 0] == 0).all() and (grad[tensors[2] == 0] == 0).all()
    result = (loss.detach(), metrics, logp, entropy, (grad,))

    own = logits_reference(logits, labels, tensors, temperature, knobs, oracle=False)
    own = own[:4] + ((own[4],),)
    if logits.numel() <= _ORACLE64_MAX:
        oracle = logits_reference(logits, labels, tensors, temperature, knobs, oracle=True)
        oracle = oracle[:4] + ((oracle[4],),)
    else:  # 8192 x 151936: the fp32 reference is the oracle
        oracle, own = own, None
    check_logprob_result(result, oracle, own, dtype, tensors[2], ("dlogits",))
    del logits, leaf, grad, result, own, oracle, labels, tensors
    free()


# ======================================================================================
# 4. policy_loss_from_hidden
# ======================================================================================

# (B, T, H, V) on the device, and shrunk for the CPU
HIDDEN_SMALL = ((2, 256, 256, 4096), (2, 40, 32, 500))
HIDDEN_MEDIUM = ((4, 512, 1024, 32768), (2, 64, 64, 2048))
HIDDEN_LARGE = ((4, 2048, 4096, 131072), (2, 128, 128, 8192))  # M = 8192, H = 4096, V = 131072
# id -> (B, T, H, V) on the device, on the CPU, dtype, bias, chunk_size, temperature, algo
HIDDEN_CASES: dict[str, tuple] = {
    "fp32-bias-chunk100": (*HIDDEN_SMALL, torch.float32, True, 100, 1.0, "grpo"),
    "fp32-nobias-auto-t0.7": (*HIDDEN_SMALL, torch.float32, False, None, 0.7, "sapo"),
    "bf16-bias-auto": (*HIDDEN_MEDIUM, torch.bfloat16, True, None, 1.0, "grpo"),
    "bf16-nobias-chunk300": (*HIDDEN_MEDIUM, torch.bfloat16, False, 300, 1.0, "gspo"),
    "bf16-M8192-H4096-V131072": (*HIDDEN_LARGE, torch.bfloat16, False, None, 1.0, "grpo"),
}
HIDDEN_GRADS = ("dhidden", "dweight", "dbias")


def hidden_reference(params, labels, tensors, temperature, knobs, oracle: bool):
    """(loss, metrics, logp, entropy, grads w.r.t. hidden, weight[, bias]): the float64 oracle
    or ``reference.policy_loss_from_hidden`` in the inputs' precision."""
    leaves = [
        p.detach().to(torch.float64 if oracle else p.dtype).requires_grad_(True) for p in params
    ]
    bias = leaves[2] if len(leaves) == 3 else None
    if oracle:
        logits = torch.nn.functional.linear(leaves[0], leaves[1], bias)
        loss, metrics, logp, entropy = oracle_loss(logits, labels, tensors, temperature, knobs)
        del logits
    else:
        loss, metrics, logp, entropy = reference.policy_loss_from_hidden(
            leaves[0],
            leaves[1],
            bias,
            labels,
            *tensors,
            temperature=temperature,
            with_entropy=True,
            **knobs,
        )
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), metrics, logp.detach(), entropy, grads


@pytest.mark.parametrize("case", list(HIDDEN_CASES))
def test_policy_loss_from_hidden(case):
    shape, small, dtype, with_bias, chunk, temperature, algo = HIDDEN_CASES[case]
    B, T, H, V = big(shape, small)
    seed = seed_of("hidden", case)
    knobs = LOGPROB_KNOBS[algo]
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    h = torch.randn(B, T, H, generator=gen, device=DEVICE).to(dtype)
    w = (torch.randn(V, H, generator=gen, device=DEVICE) * (2.5 / math.sqrt(H))).to(dtype)
    params = (h, w)
    if with_bias:
        params += ((0.5 * torch.randn(V, generator=gen, device=DEVICE)).to(dtype),)
    with torch.no_grad():
        labels, tensors = logprob_inputs(
            torch.nn.functional.linear(*params), algo, temperature, seed
        )
    free()

    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    positional, optional = front_door_tensors(tensors)
    poison(4 * B * T * H)
    out = tapo_kernels.policy_loss_from_hidden(
        leaves[0],
        leaves[1],
        labels,
        *positional,
        bias=leaves[2] if with_bias else None,
        temperature=temperature,
        with_entropy=True,
        chunk_size=chunk,
        **optional,
        **knobs,
    )
    grads = torch.autograd.grad(out.loss, leaves)
    for name, g, leaf in zip(HIDDEN_GRADS, grads, leaves, strict=False):
        assert g.shape == leaf.shape, name
    result = (out.loss.detach(), out.metrics, out.logp, out.entropy, grads)
    del leaves, out
    free()

    own = hidden_reference(params, labels, tensors, temperature, knobs, oracle=False)
    free()
    if B * T * V <= _ORACLE64_MAX // 2:
        oracle = hidden_reference(params, labels, tensors, temperature, knobs, oracle=True)
    else:  # M=8192, V=131072: the reference composition in bf16 is the oracle
        oracle, own = own, None
    check_logprob_result(result, oracle, own, dtype, tensors[2], HIDDEN_GRADS)
    del result, own, oracle, params, h, w
    free()


# ======================================================================================
# 5. opcheck and torch.compile on the device
# ======================================================================================


def _small_loss_args(dtype=torch.float32, seed=20) -> tuple:
    return tuple(dev(t) for t in loss_batch(B=3, T=7, dtype=dtype, seed=seed).op_args())


def _small_logits(seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logits = dev((3.0 * torch.randn(2, 5, 13, generator=gen)).to(dtype))
    b = loss_batch(B=2, T=5, seed=seed, empty_row=False)
    labels = torch.randint(0, 13, (2, 5), generator=gen)
    labels[(b.mask == 0) & (torch.rand(2, 5, generator=gen) < 0.5)] = -100
    return logits, dev(labels), tuple(dev(t) for t in b.op_args()[1:])


def _small_hidden(seed: int):
    gen = torch.Generator().manual_seed(seed)
    h, w, bias = (dev(torch.randn(*s, generator=gen)) for s in ((2, 5, 8), (17, 8), (17,)))
    b = loss_batch(B=2, T=5, seed=seed, empty_row=False)
    labels = dev(torch.randint(0, 17, (2, 5), generator=gen))
    return h, w, bias, labels, tuple(dev(t) for t in b.op_args()[1:])


def _opcheck_sample(op: str) -> tuple[tuple, dict]:
    knobs = dict(algo="grpo", kl_coef=0.1)
    if op == "fused_correct":
        args = tuple(dev(t) for t in correct_batch(seed=3, B=5, T=9).op_args())
        return args + (0.7, 0.3, 0.8, False, True), {}
    if op in ("policy_loss", "policy_loss_with_grad"):
        args = _small_loss_args()
        return (args[0].clone().requires_grad_(True), *args[1:]), knobs
    if op == "policy_loss_backward":
        args = _small_loss_args(torch.float64, seed=21)
        return (torch.ones((), dtype=torch.float64, device=DEVICE), *args), knobs
    if op == "policy_loss_from_logits":
        logits, labels, tensors = _small_logits(50, torch.bfloat16)
        return (logits.requires_grad_(True), labels, *tensors), dict(
            temperature=0.9, with_entropy=True, **knobs
        )
    if op == "policy_loss_from_hidden":
        h, w, bias, labels, tensors = _small_hidden(59)
        return (
            h.requires_grad_(True),
            w.requires_grad_(True),
            bias.requires_grad_(True),
            labels,
            *tensors,
        ), dict(with_entropy=True, chunk_size=3, **knobs)
    if op.startswith("selective_log_softmax_backward"):
        logits, labels, _ = _small_logits(53, torch.bfloat16)
        logp, _ = reference.selective_log_softmax(logits, labels)
        grad = torch.randn(2, 5, device=DEVICE) * (labels >= 0)
        return (grad, logits.clone(), labels, logp, 0.8), {}
    if op == "selective_log_softmax_from_hidden_backward":
        h, w, bias, labels, _ = _small_hidden(61)
        logp, _ = reference.selective_log_softmax(torch.nn.functional.linear(h, w, bias), labels)
        grad = torch.randn(2, 5, device=DEVICE)
        return (grad, h, w, bias, labels, logp, 1.0, 3, True, True), {}
    if op == "logprobs_from_logits":
        logits, labels, _ = _small_logits(67, torch.bfloat16)
        return (logits.requires_grad_(True), labels), dict(temperature=0.9)
    if op == "logprobs_from_hidden":
        h, w, bias, labels, _ = _small_hidden(71)
        leaves = (t.requires_grad_(True) for t in (h, w, bias))
        return (*leaves, labels), dict(chunk_size=3)
    gen = torch.Generator().manual_seed(seed_of("opcheck", op))
    grad_logp, grad_entropy = (dev(torch.randn(2, 5, generator=gen)) for _ in range(2))
    if op == "logprobs_backward":
        logits, labels, _ = _small_logits(73, torch.bfloat16)
        logp, entropy = reference.selective_log_softmax(logits, labels, 0.8, True)
        return (grad_logp, grad_entropy, logits, labels, logp, entropy, 0.8), {}
    if op == "logprobs_from_hidden_backward":
        h, w, bias, labels, _ = _small_hidden(79)
        logits = torch.nn.functional.linear(h, w, bias)
        logp, entropy = reference.selective_log_softmax(logits, labels, 1.0, True)
        head = (h, w, bias, labels, logp, entropy)
        return (grad_logp, grad_entropy, *head, 1.0, 3, True, True), {}
    raise AssertionError(f"no opcheck sample for {op}")


@pytest.mark.parametrize("op", _library.OPS + _library.LOGPROB_OPS + _library.LOGPROBS_OPS)
def test_opcheck_on_device(op):
    args, kwargs = _opcheck_sample(op)
    torch.library.opcheck(getattr(torch.ops.tapo, op).default, args, kwargs)


def _loss_step(logp, *tensors):
    positional, optional = front_door_tensors(tensors)
    out = tapo_kernels.policy_loss(logp, *positional, preset="grpo", kl_coef=0.1, **optional)
    return 2.0 * out.loss, out.metrics


def _correct_step(*args):
    corrected, delta, confidence, witness = torch.ops.tapo.fused_correct(
        *args, 0.7, 0.3, 0.8, False
    )
    return 2.0 * corrected, delta + 1.0, confidence, witness


def _logits_step(logits, labels, old, adv, mask):
    x = logits * 2.0  # an intermediate, as an LM head's output would be
    out = tapo_kernels.policy_loss_from_logits(
        x, labels, old, adv, mask, preset="dapo", with_entropy=True
    )
    return out.loss + 0.01 * out.entropy.mean(), out.logp


@pytest.mark.parametrize("fn", ["policy_loss", "fused_correct", "policy_loss_from_logits"])
def test_torch_compile_fullgraph_matches_eager(fn):
    torch._dynamo.reset()
    if fn == "policy_loss":
        step, args = _loss_step, _small_loss_args(seed=31)
        n_diff = 1
    elif fn == "fused_correct":
        step = _correct_step
        args = tuple(dev(t) for t in correct_batch(seed=4, B=24, T=64).op_args())
        n_diff = 0
    else:
        logits, labels, tensors = _small_logits(62)
        step, args, n_diff = _logits_step, (logits, labels, *tensors[:3]), 1
    eager_in = [a.clone().requires_grad_(True) for a in args[:n_diff]]
    compiled_in = [a.clone().requires_grad_(True) for a in args[:n_diff]]
    eager = step(*eager_in, *args[n_diff:])
    compiled = torch.compile(step, fullgraph=True)(*compiled_in, *args[n_diff:])
    for a, b in zip(compiled, eager, strict=True):
        assert a.device == b.device
        torch.testing.assert_close(a, b)
    if n_diff:
        eager[0].backward()
        compiled[0].backward()
        for a, b in zip(compiled_in, eager_in, strict=True):
            assert float(b.grad.abs().max()) > 0
            torch.testing.assert_close(a.grad, b.grad)
    torch._dynamo.reset()


# ======================================================================================
# 6. bad input on the device: a clear error, and the device still works
# ======================================================================================

OTHER_DEVICE = "meta" if ON_CPU else "cpu"  # the odd tensor out


def _bad_call(case: str):
    args = list(_small_loss_args(seed=40))
    if case == "policy_loss-mixed-devices":
        args[1] = args[1].to(OTHER_DEVICE)
        return lambda: torch.ops.tapo.policy_loss(*args, kl_coef=0.1), ValueError, "device"
    if case == "fused_correct-mixed-devices":
        c = [dev(t) for t in correct_batch(seed=41, B=5, T=9).op_args()]
        c[8] = c[8].to(OTHER_DEVICE)
        return lambda: torch.ops.tapo.fused_correct(*c, 0.7, 0.3, 0.8, False), ValueError, "device"
    if case == "nan-logp":
        live = (args[3] != 0).nonzero()[0]
        args[0] = args[0].clone()
        args[0][live[0], live[1]] = float("nan")
        return (
            lambda: torch.ops.tapo.policy_loss(*args, kl_coef=0.1),
            ValueError,
            "logp contains NaN or inf",
        )
    if case == "bf16-logp":
        args[0], args[1] = args[0].bfloat16(), args[1].bfloat16()
        return lambda: torch.ops.tapo.policy_loss(*args), TypeError, "logp must have dtype"
    if case == "label-out-of-range":
        logits, labels, tensors = _small_logits(42)
        labels = labels.clone()
        labels[0, 0] = 13
        return (
            lambda: torch.ops.tapo.policy_loss_from_logits(logits, labels, *tensors),
            ValueError,
            "labels out of range",
        )
    if case == "nan-logit-at-mask-token":
        logits, labels, tensors = _small_logits(43)
        i, j = (tensors[2] != 0).nonzero()[0].tolist()
        logits = logits.clone()
        logits[i, j, 3] = float("nan")
        return (
            lambda: torch.ops.tapo.policy_loss_from_logits(logits, labels, *tensors),
            ValueError,
            "non-finite log-probability",
        )
    if case == "call-span-out-of-range":
        c = [dev(t) for t in correct_batch(seed=44, B=5, T=9).op_args()]
        assert c[3].numel() > 0
        c[5] = c[5].clone()
        c[5][0] = 10  # call_end > T = 9
        return (
            lambda: torch.ops.tapo.fused_correct(*c, 0.7, 0.3, 0.8, False),
            ValueError,
            "call span out of range",
        )
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "policy_loss-mixed-devices",
        "fused_correct-mixed-devices",
        "nan-logp",
        "bf16-logp",
        "label-out-of-range",
        "nan-logit-at-mask-token",
        "call-span-out-of-range",
    ],
)
def test_bad_input_raises_clear_error(case):
    call, error, pattern = _bad_call(case)
    with pytest.raises(error, match=pattern):
        call()
    # not a crash: the device still runs the op
    args = _small_loss_args(seed=45)
    loss, _ = torch.ops.tapo.policy_loss(*args, kl_coef=0.1)
    assert torch.isfinite(loss).item()
    if not ON_CPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logprobs_with_entropy_gradient_on_device(dtype):
    """``tk.logprobs_from_logits`` / ``_from_hidden`` on the device: values and the gradient of
    ``sum g logp + sum h H`` against the float64 autograd of the plain formulas."""
    B, T, V, H = big((4, 512, 32000, 256), (2, 16, 257, 16))
    gen = torch.Generator().manual_seed(seed_of("device-logprobs", str(dtype)))
    logits = dev((3.0 * torch.randn(B, T, V, generator=gen)).to(dtype))
    labels = dev(torch.randint(0, V, (B, T), generator=gen))
    labels[0, :3] = -100
    g, h = (dev(torch.randn(B, T, generator=gen)) for _ in range(2))

    def oracle(x64):
        log_p = torch.log_softmax(x64 / 0.9, -1)
        lp = log_p.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        ent = -(log_p.exp() * log_p).sum(-1)
        keep = labels >= 0
        return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)

    x = logits.clone().requires_grad_(True)
    logp, entropy = tapo_kernels.logprobs_from_logits(x, labels, temperature=0.9)
    (grad,) = torch.autograd.grad((logp * g).sum() + (entropy * h).sum(), x)
    x64 = logits.double().requires_grad_(True)
    logp64, entropy64 = oracle(x64)
    (grad64,) = torch.autograd.grad((logp64 * g).sum() + (entropy64 * h).sum(), x64)
    logp, entropy, logp64, entropy64 = (t.detach() for t in (logp, entropy, logp64, entropy64))
    tol = 2e-5
    assert float((logp - logp64).abs().max()) < tol * max(1.0, float(logp64.abs().max()))
    assert float((entropy - entropy64).abs().max()) < tol * max(1.0, float(entropy64.abs().max()))
    grad_tol = BF16_TOL if dtype == torch.bfloat16 else F32_TOL
    assert float((grad.double() - grad64).abs().max()) <= grad_tol * float(grad64.abs().max())
    del x, x64, grad, grad64, logits
    free()

    hidden = dev(torch.randn(B, T, H, generator=gen)).to(dtype)
    weight = dev(torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    hl, wl = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = tapo_kernels.logprobs_from_hidden(hl, wl, labels, temperature=0.9)
    grads = torch.autograd.grad((logp * g).sum() + (entropy * h).sum(), (hl, wl))
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logp64, entropy64 = oracle(torch.nn.functional.linear(h64, w64))
    grads64 = torch.autograd.grad((logp64 * g).sum() + (entropy64 * h).sum(), (h64, w64))
    logp, logp64 = logp.detach(), logp64.detach()
    assert float((logp - logp64).abs().max()) < 1e-3 * max(1.0, float(logp64.abs().max()))
    for got, want in zip(grads, grads64, strict=True):
        bound = (5e-2 if dtype == torch.bfloat16 else 1e-4) * float(want.abs().max())
        assert float((got.double() - want).abs().max()) <= bound
