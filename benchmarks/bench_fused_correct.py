"""Benchmarks of ``tapo::fused_correct``: is the TAPO correction negligible next to a copy?

Providers: the op on this device (C++ on CPU, Triton on CUDA), the eager pure-torch
reference, the reference under ``torch.compile``, and ``advantages.clone()`` as the floor
(the op must read and write the advantages at least once). Sizes run from small to
``B=512, T=8192, N=4096, D=256`` with groups of 8, in group scope and batch scope.

Run: ``pytest benchmarks/bench_fused_correct.py --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

import tapo_kernels
from tapo_kernels import _library, reference

from .common import DEVICE, median_s, record, sync

# (B, T, N, D): N calls spread evenly over the rows, groups of 8 rollouts per prompt
SIZES = [(64, 1024, 512, 256), (256, 4096, 2048, 256), (512, 8192, 4096, 256)]
GROUP = 8


def make_batch(B: int, T: int, N: int, D: int, seed: int = 0, device: str = DEVICE):
    """A realistic batch: each prompt group has its own few queries, reused by its rollouts.

    About half of the rollouts succeed; calls draw one of 4 group queries (plus small noise,
    as paraphrases would), one of 2 tools, and cover ~1/4 of the tokens in total.
    """
    g = torch.Generator().manual_seed(seed)
    group_ids = torch.arange(B) // GROUP
    rewards = (torch.rand(B, generator=g) < 0.5).float()
    seq_adv = reference.group_advantages(rewards, group_ids)
    mask = torch.ones(B, T)
    advantages = seq_adv[:, None] * mask
    per_row = N // B
    span = max(T // (4 * per_row), 1)
    call_seq = torch.arange(N) // per_row
    slot = torch.arange(N) % per_row
    call_start = slot * (T // per_row)
    call_tool = torch.randint(0, 2, (N,), generator=g)
    call_key = torch.zeros(N, dtype=torch.int64)
    queries = torch.nn.functional.normalize(torch.randn(B // GROUP, 4, D, generator=g), dim=-1)
    q = queries[group_ids[call_seq], torch.randint(0, 4, (N,), generator=g)]
    params = torch.nn.functional.normalize(q + 0.05 * torch.randn(N, D, generator=g), dim=-1)
    kinds = torch.zeros(2, dtype=torch.int64)
    # the calls' tensors as ``ToolCalls`` holds them: seq, start, end, tool, key, params
    calls = (call_seq, call_start, call_start + span, call_tool, call_key, params)
    return tuple(t.to(device) for t in (advantages, seq_adv, group_ids, *calls, kinds))


def _providers():
    names = ["op", "reference", "reference_compile", "floor"]
    return names


@pytest.mark.parametrize("scope", ["group", "batch"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"B{s[0]}xT{s[1]}xN{s[2]}xD{s[3]}")
@pytest.mark.parametrize("provider", _providers())
def test_fused_correct(benchmark, provider, size, scope):
    B, T, N, D = size
    args = make_batch(B, T, N, D)
    knobs = (0.7, 0.3, 0.8, scope == "batch")
    if provider == "op":
        fn = lambda: torch.ops.tapo.fused_correct(*args, *knobs)
        name = f"op[{'triton' if DEVICE == 'cuda' else tapo_kernels.CPU_BACKEND['fused_correct']}]"
    elif provider == "reference":
        fn = lambda: _library.fused_correct_reference_kernel(*args, *knobs)
        name = "reference"
    elif provider == "reference_compile":
        compiled = torch.compile(reference.fused_correct, dynamic=False)
        fn = lambda: compiled(*args, *knobs)
        fn()  # compile outside the timed region
        name = "reference_compile"
    else:
        if scope == "batch":
            pytest.skip("the floor does not depend on the scope; measured once in group scope")
        fn = lambda: args[0].clone()
        name = "floor"

    def run():
        out = fn()
        sync()
        return out

    run()  # warm-up
    benchmark(run)
    rewrite_bytes = 2 * B * T * args[0].element_size()
    mean = median_s(benchmark)
    case = f"fused_correct B={B} T={T} N={N} D={D}"
    info = dict(B=B, T=T, N=N, D=D) | ({} if provider == "floor" else {"scope": scope})
    info["rewrite_GBps"] = rewrite_bytes / mean / 1e9
    # the floor does not depend on the scope: one measurement serves both cases
    for s in ("group", "batch") if provider == "floor" else (scope,):
        record(benchmark, f"{case} scope={s}", name, **info)
