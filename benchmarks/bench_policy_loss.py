"""Benchmarks of ``tapo::policy_loss``: fused loss vs the torch composition it replaces.

Providers: the op on this device (C++ on CPU, Triton on CUDA), the eager reference (plain
torch autograd), the reference under ``torch.compile``, and the floor: one pass that reads every input once and
writes a ``(B, T)`` gradient (``logp.clone()`` plus a read of the other inputs).
Modes: ``fwd`` (loss and metrics), ``bwd`` (gradient only), ``full`` (both).
(Liger's GRPO loss takes logits, not log-probabilities; it is compared in the
logits front-end benchmark.) Every case runs GRPO with per-token advantages, k3 KL and the TAPO lift, token-mean.

Run: ``pytest benchmarks/bench_policy_loss.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

import tapo_kernels
from tapo_kernels import reference
from tapo_kernels.testing import loss_batch

from .common import DEVICE, median_s, record, sync

# (B, T): 4k, 64k and 256k tokens
SIZES = [(8, 512), (64, 1024), (128, 2048)]
KNOBS = dict(
    algo="grpo",
    eps_low=0.2,
    eps_high=0.28,
    dual_clip_c=3.0,
    tau_pos=1.0,
    tau_neg=1.05,
    kl_coef=0.01,
    kl_type="k3",
    agg="token-mean",
    norm_const=None,
    global_count=None,
)


# the batch of every case: per-token advantages, reference log-probs and TAPO calls
BATCH = dict(dtype=torch.float32, per_token=True, with_ref=True, with_calls=True, empty_row=False)


def _inputs(B: int, T: int):
    return loss_batch(B, T, device=DEVICE, **BATCH).op_args()


def _callables(provider: str, args):
    logp, *rest = args
    if provider == "op":
        x = logp.clone().requires_grad_(True)

        def fwd():
            return torch.ops.tapo.policy_loss(x, *rest, **KNOBS)

        def bwd(one=torch.ones((), device=DEVICE)):
            return torch.ops.tapo.policy_loss_backward(one, logp, *rest, **KNOBS)

        def full():
            loss, _ = torch.ops.tapo.policy_loss(x, *rest, **KNOBS)
            return torch.autograd.grad(loss, x)

        return fwd, bwd, full
    if provider in ("reference", "reference_compile"):
        fn = reference.policy_loss
        if provider == "reference_compile":
            fn = torch.compile(reference.policy_loss, dynamic=False)
        x = logp.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return fn(x, *rest, **KNOBS)

        def full():
            loss, _ = fn(x, *rest, **KNOBS)
            return torch.autograd.grad(loss, x)

        def bwd():
            # the forward graph is rebuilt each time; subtract fwd to isolate the backward
            return full()

        return fwd, bwd, full
    if provider == "floor":

        def floor():
            g = logp.clone()
            for t in rest:
                if t is not None:
                    t.sum()
            return g

        return floor, floor, floor
    raise ValueError(provider)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"B{s[0]}xT{s[1]}")
@pytest.mark.parametrize("provider", ["op", "reference", "reference_compile", "floor"])
def test_policy_loss(benchmark, provider, size, mode):
    B, T = size
    args = _inputs(B, T)
    if provider == "reference" and mode == "bwd":
        pytest.skip("eager autograd cannot run a backward without its forward; see mode=full")
    if provider == "reference_compile" and mode == "bwd":
        pytest.skip("compiled autograd backward is measured in mode=full")
    fwd, bwd, full = _callables(provider, args)
    fn = {"fwd": fwd, "bwd": bwd, "full": full}[mode]

    def run():
        out = fn()
        sync()
        return out

    run()  # warm-up (and compilation for reference_compile)
    benchmark(run)
    name = provider
    if provider == "op":
        name = f"op[{'triton' if DEVICE == 'cuda' else tapo_kernels.CPU_BACKEND['policy_loss']}]"
    tokens = B * T
    record(
        benchmark,
        f"policy_loss {mode} B={B} T={T} ({tokens // 1024}k tokens)",
        name,
        B=B,
        T=T,
        mode=mode,
        tokens=tokens,
        Mtokens_per_s=tokens / median_s(benchmark) / 1e6,
    )
