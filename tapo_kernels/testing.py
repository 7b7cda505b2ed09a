"""Random batches for tests and benchmarks (one generator for every backend).

``correct_batch`` builds inputs of ``tapo::fused_correct`` that exercise the hard cases:
prompt groups with successes, failures and zero advantages, an all-padding row, spans at
both ends of a row, rows without calls, invalid calls, several tools and keys, repeated
queries (real matches) and exact ties. With ``quantized=True`` every parameter is a
multiple of 1/8 (boxes of 1/16) and every trajectory advantage a multiple of 1/64, so dot
products, IoUs and sums of advantages are exact in fp32 in any summation order and every backend must agree bit for bit on ties and gates.

``loss_batch`` builds inputs of ``tapo::policy_loss`` with ratios spread across the clip
range, a fully masked row, prompt and observation tokens at mask 0, optional reference
log-probs and TAPO call maps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CorrectBatch:
    advantages: Tensor  # [B, T] float32
    seq_advantages: Tensor  # [B]
    group_ids: Tensor  # [B] int64
    call_seq: Tensor  # [N] int64
    call_start: Tensor
    call_end: Tensor
    call_tool: Tensor
    call_key: Tensor
    call_params: Tensor  # [N, D]
    tool_sim_kind: Tensor  # [num_tools]
    mask: Tensor  # [B, T] float32

    def op_args(self) -> tuple[Tensor, ...]:
        """The ten tensor arguments of ``tapo::fused_correct``, in schema order."""
        return (self.advantages, self.seq_advantages, self.group_ids, self.call_seq,
                self.call_start, self.call_end, self.call_tool, self.call_key,
                self.call_params, self.tool_sim_kind)

    def to(self, device) -> CorrectBatch:
        return CorrectBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def _spans(gen: torch.Generator, T: int, k: int) -> list[tuple[int, int]]:
    """``k`` non-overlapping spans in ``[0, T)``; the first may start at 0, the last end at T."""
    if k == 0 or T == 0:
        return []
    cuts = sorted(torch.randint(0, T + 1, (2 * k,), generator=gen).tolist())
    spans = [(cuts[2 * i], cuts[2 * i + 1]) for i in range(k)]
    if torch.rand((), generator=gen) < 0.5:
        spans[0] = (0, spans[0][1])
    if torch.rand((), generator=gen) < 0.5:
        spans[-1] = (spans[-1][0], T)
    return spans


def correct_batch(
    B: int = 13,
    T: int = 97,
    group_size: int = 4,
    calls_per_row: int = 3,
    D: int = 16,
    num_tools: int = 3,
    num_keys: int = 2,
    num_queries: int = 6,
    invalid_prob: float = 0.1,
    param_dtype: torch.dtype = torch.float32,
    quantized: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> CorrectBatch:
    """A random ``fused_correct`` batch (see the module docstring). Tool 1 is an IoU tool."""
    gen = torch.Generator().manual_seed(seed)
    group_ids = torch.arange(B, dtype=torch.int64) // group_size + 100  # arbitrary ids
    seq_adv = torch.randn(B, generator=gen)
    seq_adv[torch.rand(B, generator=gen) < 0.1] = 0.0  # zero-advantage rows
    if quantized:  # multiples of 1/64: sums of A_j are exact in any order
        seq_adv = torch.round(seq_adv * 64) / 64
    mask = torch.zeros(B, T)
    for i in range(B):
        lo = int(torch.randint(0, max(T // 4, 1), (), generator=gen))
        hi = T - int(torch.randint(0, max(T // 4, 1), (), generator=gen))
        mask[i, lo:max(hi, lo)] = 1.0
    if B > 2:
        mask[B // 2] = 0.0  # an all-padding row
    adv = seq_adv[:, None] * mask

    # a pool of "queries": calls drawing the same query id are matches (ties when quantized)
    if quantized:
        pool = torch.randint(-4, 9, (num_queries, D), generator=gen).float() / 8.0
        pool = pool / pool.norm(dim=1, keepdim=True).clamp(min=1e-6)
        pool = torch.round(pool * 8) / 8  # keep exact eighths (approximately unit norm)
        box_lo = torch.randint(0, 8, (num_queries, 2), generator=gen).float() / 16
        box_hi = box_lo + torch.randint(1, 9, (num_queries, 2), generator=gen).float() / 16
    else:
        pool = torch.nn.functional.normalize(torch.randn(num_queries, D, generator=gen), dim=1)
        box_lo = torch.rand(num_queries, 2, generator=gen) * 0.5
        box_hi = box_lo + torch.rand(num_queries, 2, generator=gen) * 0.5
    boxes = torch.cat([box_lo, box_hi], dim=1)

    seq, start, end, tool, key, params = [], [], [], [], [], []
    for i in range(B):
        k = int(torch.randint(0, calls_per_row + 1, (), generator=gen)) if i % 5 else calls_per_row
        for s, e in _spans(gen, T, k):
            q = int(torch.randint(0, num_queries, (), generator=gen))
            t = int(torch.randint(0, num_tools, (), generator=gen))
            if torch.rand((), generator=gen) < invalid_prob:
                t = -1
            seq.append(i)
            start.append(s)
            end.append(e)
            tool.append(t)
            key.append(int(torch.randint(0, num_keys, (), generator=gen)))
            if t == 1:
                v = torch.zeros(D)
                v[:4] = boxes[q]
            else:
                v = pool[q].clone()
                if not quantized:
                    v = torch.nn.functional.normalize(v + 0.05 * torch.randn(D, generator=gen), dim=0)
            params.append(v)
    n = len(seq)
    ints = lambda xs: torch.tensor(xs, dtype=torch.int64).reshape(n)
    call_params = torch.stack(params) if n else torch.zeros(0, D)
    kinds = torch.zeros(num_tools, dtype=torch.int64)
    if num_tools > 1:
        kinds[1] = 1
    batch = CorrectBatch(adv, seq_adv, group_ids, ints(seq), ints(start), ints(end), ints(tool),
                         ints(key), call_params.to(param_dtype), kinds, mask)
    return batch.to(device)


@dataclass
class LossBatch:
    logp: Tensor  # [B, T]
    old_logp: Tensor
    advantages: Tensor  # [B] or [B, T]
    mask: Tensor  # [B, T]
    ref_logp: Tensor | None
    call_map: Tensor | None  # [B, T] int32
    call_delta: Tensor | None  # [N]

    def op_args(self) -> tuple[Tensor | None, ...]:
        """The seven tensor arguments of ``tapo::policy_loss``, in schema order."""
        return (self.logp, self.old_logp, self.advantages, self.mask, self.ref_logp,
                self.call_map, self.call_delta)


def loss_batch(
    B: int = 7,
    T: int = 33,
    dtype: torch.dtype = torch.float32,
    per_token: bool = True,
    with_ref: bool = True,
    with_calls: bool = True,
    empty_row: bool = True,
    spread: float = 0.3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> LossBatch:
    """A random ``policy_loss`` batch; ``spread`` is the std of ``logp - old_logp``."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 4
    old = logp + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64) if with_ref else None
    mask = (torch.rand(B, T, generator=gen) < 0.8).to(torch.float64)
    mask[:, : max(T // 8, 1)] = 0.0  # prompt tokens
    if empty_row and B > 1:
        mask[B - 1] = 0.0
    seq_adv = torch.randn(B, generator=gen, dtype=torch.float64)
    adv = seq_adv[:, None] * mask + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64) * mask if per_token else seq_adv
    call_map = call_delta = None
    if with_calls:
        call_map = torch.full((B, T), -1, dtype=torch.int32)
        n = 0
        deltas = []
        for i in range(B):
            for s, e in _spans(gen, T, 2):
                call_map[i, s:e] = n
                deltas.append(float(torch.rand((), generator=gen)) * 1.5)
                n += 1
        call_delta = torch.tensor(deltas, dtype=torch.float64).reshape(n)

    def cast(t):
        return None if t is None else t.to(dtype).to(device)

    return LossBatch(cast(logp), cast(old), cast(adv), cast(mask), cast(ref),
                     None if call_map is None else call_map.to(device), cast(call_delta))


@contextmanager
def chunked_torch_passes() -> Iterator[None]:
    """Inside: the CPU kernels of the internal vocabulary ops (``tapo::_logprob_rows`` & co.)
    are the chunked torch passes of ``vocab.py`` instead of C++ (the fallback without the
    native build). A temporary registration over the C++ one, removed on exit."""
    import warnings

    from . import vocab

    lib = torch.library.Library("tapo", "IMPL")  # noqa: TOR901 (destroyed below)
    try:
        with warnings.catch_warnings():  # "overriding a previously registered kernel"
            warnings.simplefilter("ignore")
            for op, kernel in vocab.PASSES.items():
                lib.impl(op, kernel, "CPU")
        yield
    finally:
        lib._destroy()
