"""Benchmarks of ``tapo::policy_loss_from_logits`` and ``tapo::policy_loss_from_hidden``.

Providers: the op on this device (C++ vocabulary passes on CPU, Triton on CUDA), on the CPU
also the op with its chunked torch passes (``op_torch``, the fallback without the native
build), the eager reference composition (``reference.policy_loss_from_logits`` / ``_from_hidden``: full logits,
autograd), the reference under ``torch.compile``, and on CUDA Liger-Kernel when installed
(``triton_grpo_loss`` for logits, ``LigerFusedLinearGRPOLoss`` for hidden states; their GRPO
differs in details such as the aggregation, so they are timing peers, not oracles).
Modes: ``fwd`` (loss, metrics, logp) and ``full`` (forward and backward).
Every case runs GRPO with clip-higher, per-row advantages and token-mean.

Peak memory is recorded in ``extra_info["peak_mib"]``: the growth of the CUDA allocator's peak
over the inputs, or on the CPU the growth of the peak RSS of a fresh process running one step
(``python -m benchmarks.bench_logprob_loss peak ...``; tracemalloc does not see torch tensors).

Run: ``pytest benchmarks/bench_logprob_loss.py --benchmark-only``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import tapo_kernels
from tapo_kernels import _library, reference
from tapo_kernels.testing import chunked_torch_passes

from .common import DEVICE, median_s, record, sync

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# (B, T, V): CUDA is the published 8192 x 151936 bf16 case; CPU 4k tokens x 32k vocabulary
LOGITS_SIZES = [(8, 1024, 151936)] if DEVICE == "cuda" else [(4, 1024, 32768)]
# (B, T, H, V): CUDA M = 8192, H = 4096, V = 131072; CPU B*T = 16k tokens, V = 32k
HIDDEN_SIZES = [(8, 1024, 4096, 131072)] if DEVICE == "cuda" else [(16, 1024, 128, 32768)]
KNOBS = dict(algo="grpo", eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, agg="token-mean")
LIGER_BETA = 0.0  # no KL: the same loss terms as KNOBS (up to aggregation details)


def _loss_inputs(B: int, T: int, V: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        labels=torch.randint(0, V, (B, T), generator=gen).to(DEVICE),
        old_logp=(-torch.rand(B, T, generator=gen) * 4 - 8).to(DEVICE),
        advantages=torch.randn(B, generator=gen).to(DEVICE),
        mask=(torch.rand(B, T, generator=gen) < 0.9).float().to(DEVICE),
    )


def logits_inputs(B: int, T: int, V: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(B, T, V, generator=gen)).to(DTYPE).to(DEVICE)
    return dict(logits=logits, **_loss_inputs(B, T, V))


def hidden_inputs(B: int, T: int, H: int, V: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, H, generator=gen).to(DTYPE).to(DEVICE)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(DTYPE).to(DEVICE)
    return dict(hidden=hidden, weight=weight, **_loss_inputs(B, T, V))


def _liger_logits_loss(x, inp):
    # Liger reads logits for T + 1 positions and scores the first T
    return liger_padded_loss(torch.cat([x, x[:, -1:]], dim=1), inp)


def liger_padded_loss(padded, inp):
    """Liger's ``triton_grpo_loss`` (in place) on logits ``padded`` to T + 1 positions."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    out = triton_grpo_loss(
        padded,
        inp["old_logp"],
        None,
        inp["labels"],
        inp["advantages"],
        inp["mask"],
        temperature=1.0,
        beta=LIGER_BETA,
        eps_low=0.2,
        eps_high=0.28,
        inplace=True,
    )
    per_token = out[0] if isinstance(out, tuple) else out
    mask = inp["mask"]
    return per_token if per_token.dim() == 0 else (per_token * mask).sum() / mask.sum()


def _vocab_passes(provider: str):
    """``op_torch``: the op's CPU kernel with the chunked torch passes instead of C++."""
    return chunked_torch_passes() if provider == "op_torch" else contextlib.nullcontext()


def logits_step(provider: str, inp: dict[str, torch.Tensor]) -> Callable[[bool], object]:
    """``step(backward)``: one loss evaluation (and its backward) with ``provider``.

    ``op_inplace`` works on a buffer that its backward overwrites with the gradient; the
    step has a ``reset`` attribute that restores the logits (run untimed before each round).
    """
    loss_args = (inp["old_logp"], inp["advantages"], inp["mask"])
    if provider == "reference_compile":
        fn = torch.compile(reference.policy_loss_from_logits, dynamic=False)
    else:
        fn = reference.policy_loss_from_logits
    buffer = inp["logits"].clone().requires_grad_(True) if provider == "op_inplace" else None

    def step(backward: bool):
        x = buffer if buffer is not None else inp["logits"].detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward), _vocab_passes(provider):
            if provider in ("op", "op_torch"):
                loss = tapo_kernels.policy_loss_from_logits(
                    x, inp["labels"], *loss_args, **KNOBS
                ).loss
            elif provider == "op_inplace":  # the gradient returned is ``buffer`` itself
                loss = tapo_kernels.policy_loss_from_logits(
                    x, inp["labels"], *loss_args, inplace_backward=True, **KNOBS
                ).loss
            elif provider == "liger":
                loss = _liger_logits_loss(x, inp)
            else:
                loss = fn(x, inp["labels"], *loss_args, **KNOBS)[0]
            if backward:
                return torch.autograd.grad(loss, x)
        return loss

    def reset() -> None:
        if buffer is not None:
            with torch.no_grad():
                buffer.copy_(inp["logits"])

    step.reset = reset
    return step


def hidden_step(provider: str, inp: dict[str, torch.Tensor]) -> Callable[[bool], object]:
    loss_args = (inp["old_logp"], inp["advantages"], inp["mask"])
    if provider == "reference_compile":
        fn = torch.compile(reference.policy_loss_from_hidden, dynamic=False)
    else:
        fn = reference.policy_loss_from_hidden
    liger = None
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(
            beta=LIGER_BETA, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28
        )

    def step(backward: bool):
        h = inp["hidden"].detach().requires_grad_(backward)
        w = inp["weight"].detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward), _vocab_passes(provider):
            if provider in ("op", "op_torch"):
                loss = tapo_kernels.policy_loss_from_hidden(
                    h, w, inp["labels"], *loss_args, **KNOBS
                ).loss
            elif provider == "liger":
                out = liger(
                    _input=h,
                    lin_weight=w,
                    selected_token_ids=inp["labels"],
                    attention_mask=inp["mask"],
                    advantages=inp["advantages"],
                    old_per_token_logps=inp["old_logp"],
                )
                loss = out[0] if isinstance(out, tuple) else out
            else:
                loss = fn(h, w, None, inp["labels"], *loss_args, **KNOBS)[0]
            if backward:
                return torch.autograd.grad(loss, (h, w))
        return loss

    step.reset = lambda: None
    return step


# --------------------------------------------------------------------------------------
# peak memory
# --------------------------------------------------------------------------------------


def _rss_field(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise OSError(f"{field} not in /proc/self/status")


def measure_peak_here(kind: str, provider: str, mode: str, size: tuple[int, ...]) -> float:
    """Peak memory growth (MiB) of one step in this process (CUDA allocator or CPU RSS)."""
    inp = logits_inputs(*size) if kind == "logits" else hidden_inputs(*size)
    step = (logits_step if kind == "logits" else hidden_step)(provider, inp)
    if DEVICE == "cuda":
        step(mode == "full")  # compile / autotune outside the measurement
        step.reset()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(mode == "full")
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    before = _rss_field("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step(mode == "full")
    return _rss_field("VmHWM:") - before


def peak_mib(kind: str, provider: str, mode: str, size: tuple[int, ...]) -> float | None:
    """Peak memory growth of one step: in a fresh process on the CPU (RSS), here on CUDA."""
    if DEVICE == "cuda":
        return measure_peak_here(kind, provider, mode, size)
    if not sys.platform.startswith("linux"):
        return None
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_logprob_loss",
        "peak",
        kind,
        provider,
        mode,
        *map(str, size),
    ]
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        cmd,
        cwd=root,
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=1800,
        check=False,
    )
    if out.returncode != 0:
        print(out.stderr[-2000:])
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


# --------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------

PROVIDERS = ["op", "op_torch", "reference", "reference_compile", "liger"]


def _skip_unavailable(provider: str) -> None:
    if provider == "op_torch" and (DEVICE != "cpu" or not _library.NATIVE_LOGPROB):
        pytest.skip("op_torch compares the CPU kernel's C++ and torch passes")
    if provider == "liger":
        if DEVICE != "cuda":
            pytest.skip("Liger's kernels need CUDA")
        pytest.importorskip("liger_kernel")


def _run_benchmark(benchmark, kind: str, provider: str, mode: str, size: tuple[int, ...]) -> None:
    _skip_unavailable(provider)
    inp = logits_inputs(*size) if kind == "logits" else hidden_inputs(*size)
    step = (logits_step if kind == "logits" else hidden_step)(provider, inp)

    def run():
        out = step(mode == "full")
        sync()
        return out

    def setup():
        step.reset()
        sync()

    setup()
    run()  # warm-up (compilation, autotuning)
    # large CPU cases take seconds per step: a few rounds are enough
    rounds = 3 if DEVICE == "cpu" else 20
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    name = provider
    if provider.startswith("op"):
        backend = (
            "triton" if DEVICE == "cuda" else tapo_kernels.CPU_BACKEND[f"policy_loss_from_{kind}"]
        )
        if provider == "op_torch":
            backend = "chunked-torch"
        name = f"{provider}[{backend}]"
    tokens = size[0] * size[1]
    shape = "x".join(map(str, size))
    record(
        benchmark,
        f"policy_loss_from_{kind} {mode} {shape} {str(DTYPE)[6:]}",
        name,
        kind=kind,
        mode=mode,
        size=list(size),
        dtype=str(DTYPE),
        tokens=tokens,
        peak_mib=peak_mib(kind, provider, mode, size),
        Mtokens_per_s=tokens / median_s(benchmark) / 1e6,
    )


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("size", LOGITS_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", ["op", "op_inplace", *PROVIDERS[1:]])
def test_policy_loss_from_logits(benchmark, provider, size, mode):
    if provider == "op_inplace" and mode == "fwd":
        pytest.skip("the in-place variant differs from op in the backward only")
    _run_benchmark(benchmark, "logits", provider, mode, size)


@pytest.mark.parametrize("mode", ["fwd", "full"])
@pytest.mark.parametrize("size", HIDDEN_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_policy_loss_from_hidden(benchmark, provider, size, mode):
    _run_benchmark(benchmark, "hidden", provider, mode, size)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "peak":
    # python -m benchmarks.bench_logprob_loss peak <logits|hidden> <provider> <mode> <size...>
    _, _, kind_arg, provider_arg, mode_arg, *size_args = sys.argv
    peak = measure_peak_here(kind_arg, provider_arg, mode_arg, tuple(map(int, size_args)))
    print(json.dumps({"peak_mib": peak}))
