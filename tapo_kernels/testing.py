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

The tests' comparisons live here too, so that no test module imports another:
``assert_close_to_oracle`` (the one tolerance rule of the suite) and ``assert_exact``;
``assert_witnesses`` (witnesses against the reference, ties broken by rounding allowed);
``run_policy_loss`` (loss, metrics and gradient of one backend) and ``seed_of``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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
        return (
            self.advantages,
            self.seq_advantages,
            self.group_ids,
            self.call_seq,
            self.call_start,
            self.call_end,
            self.call_tool,
            self.call_key,
            self.call_params,
            self.tool_sim_kind,
        )

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
        mask[i, lo : max(hi, lo)] = 1.0
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
                    v = torch.nn.functional.normalize(
                        v + 0.05 * torch.randn(D, generator=gen), dim=0
                    )
            params.append(v)
    n = len(seq)
    ints = lambda xs: torch.tensor(xs, dtype=torch.int64).reshape(n)
    call_params = torch.stack(params) if n else torch.zeros(0, D)
    kinds = torch.zeros(num_tools, dtype=torch.int64)
    if num_tools > 1:
        kinds[1] = 1
    batch = CorrectBatch(
        adv,
        seq_adv,
        group_ids,
        ints(seq),
        ints(start),
        ints(end),
        ints(tool),
        ints(key),
        call_params.to(param_dtype),
        kinds,
        mask,
    )
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
    importance_weight: Tensor | None = None  # [B, T]

    def op_args(self) -> tuple[Tensor | None, ...]:
        """The eight tensor arguments of ``tapo::policy_loss``, in schema order."""
        return (
            self.logp,
            self.old_logp,
            self.advantages,
            self.mask,
            self.ref_logp,
            self.call_map,
            self.call_delta,
            self.importance_weight,
        )


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
    with_weight: bool = False,
) -> LossBatch:
    """A random ``policy_loss`` batch; ``spread`` is the std of ``logp - old_logp``.

    ``with_weight``: an importance weight ``min(exp(N(0, 0.5)), 2)`` with some exact zeros and
    NaN at masked tokens (which must read as 0).
    """
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 4
    old = logp + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64) if with_ref else None
    mask = (torch.rand(B, T, generator=gen) < 0.8).to(torch.float64)
    mask[:, : max(T // 8, 1)] = 0.0  # prompt tokens
    if empty_row and B > 1:
        mask[B - 1] = 0.0
    seq_adv = torch.randn(B, generator=gen, dtype=torch.float64)
    adv = (
        seq_adv[:, None] * mask + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64) * mask
        if per_token
        else seq_adv
    )
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
    weight = None
    if with_weight:
        weight = torch.exp(0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(
            max=2.0
        )
        weight[torch.rand(B, T, generator=gen) < 0.05] = 0.0
        weight[mask == 0] = float("nan")

    def cast(t):
        return None if t is None else t.to(dtype).to(device)

    return LossBatch(
        cast(logp),
        cast(old),
        cast(adv),
        cast(mask),
        cast(ref),
        None if call_map is None else call_map.to(device),
        cast(call_delta),
        cast(weight),
    )


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


# --------------------------------------------------------------------------------------
# comparisons: the tolerance rule and exact equality
# --------------------------------------------------------------------------------------

#: ``(rtol, atol)`` of the rule per precision: the slack an element may have beyond twice the
#: error of the reference computed at the kernel's own precision. Below float64 it is the
#: absolute 1e-6 the suite has always used (the own-precision term carries the rounding).
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (0.0, 1e-6),
    torch.bfloat16: (0.0, 1e-6),
    torch.float16: (0.0, 1e-6),
}


def assert_close_to_oracle(
    out: Tensor,
    oracle: Tensor,
    own: Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    what: str = "output",
    tol: tuple[float, float] | None = None,
    per_element: bool = False,
) -> None:
    """The tolerance rule of the tests, evaluated in float64 on every element ``i``::

        |out_i - oracle_i| <= 2 * own_err + max(atol, rtol * |oracle_i|)

    ``oracle`` is the reference in float64 (or the value computed by hand); ``own`` is the
    reference computed at the kernel's own precision, and ``own_err`` its error against the
    oracle: ``max_j |own_j - oracle_j|`` (the max norm), or ``|own_i - oracle_i|`` with
    ``per_element`` (outputs that are not reductions, whose every element must be as good as
    the reference's). Without ``own`` the bound is the tolerance alone. ``(rtol, atol)`` is
    ``tol``, else ``TOLERANCE[dtype]``; ``dtype`` defaults to ``out.dtype``.

    NaN never passes: ``out`` must be finite wherever the oracle is, and equal to it where
    the oracle is infinite; shapes must be equal.
    """
    assert tuple(out.shape) == tuple(oracle.shape), (
        f"{what}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    )
    rtol, atol = tol if tol is not None else TOLERANCE[dtype or out.dtype]
    x = out.detach().double().cpu()
    ref = oracle.detach().double().cpu()
    assert not bool(torch.isnan(x).any()), f"{what}: NaN in the output"
    finite = torch.isfinite(ref)
    assert bool(torch.isfinite(x[finite]).all()), f"{what}: inf where the oracle is finite"
    assert torch.equal(x[~finite], ref[~finite]), f"{what}: differs where the oracle is infinite"
    if not bool(finite.any()):
        return
    x, ref = x[finite], ref[finite]
    err = (x - ref).abs()
    own_err = torch.zeros_like(err)
    if own is not None:
        own_err = (own.detach().double().cpu()[finite] - ref).abs()
        if not per_element:
            own_err = own_err.max().expand_as(err)
    bound = 2 * own_err + torch.clamp(rtol * ref.abs(), min=atol)
    bad = err > bound
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {err.numel()} entries off; max error "
        f"{float(err.max()):.3e}, own-precision error {float(own_err.max()):.3e}, "
        f"(rtol, atol) = ({rtol:.1e}, {atol:.1e})"
    )


def assert_exact(out: Tensor, expected: Tensor, what: str = "output") -> None:
    """Bit-exact agreement: same shape, same dtype, equal entries (NaN never equals)."""
    assert out.dtype == expected.dtype, f"{what}: dtype {out.dtype} != {expected.dtype}"
    assert tuple(out.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    )
    if not torch.equal(out, expected):
        differ = out != expected
        raise AssertionError(f"{what}: {int(differ.sum())} of {out.numel()} entries differ")


# --------------------------------------------------------------------------------------
# shared pieces of the op tests
# --------------------------------------------------------------------------------------

#: The ten tensor arguments of ``tapo::fused_correct``, in schema order.
CORRECT_ARG_NAMES = (
    "advantages",
    "seq_advantages",
    "group_ids",
    "call_seq",
    "call_start",
    "call_end",
    "call_tool",
    "call_key",
    "call_params",
    "tool_sim_kind",
)


def seed_of(*parts: object) -> int:
    """A stable seed per parametrisation, so that every case sees its own random batch."""
    return zlib.crc32(repr(parts).encode()) % (2**31)


def assert_witnesses(out_w: Tensor, ref_w: Tensor, args: dict[str, Tensor], knobs: dict) -> None:
    """Witnesses equal the reference's, except where the reference broke a tie by rounding.

    The reference computes similarities with one matmul, whose outputs for identical
    vector pairs can differ in the last bit depending on their position in the product; a
    kernel then legitimately picks another candidate of the tie. Where the witnesses differ,
    the kernel's must be a candidate of the call within 1e-6 of the best similarity, each
    pair's similarity computed on its own (identical pairs give identical values), and when
    those similarities tie exactly, the lowest call index (docs/math.md, section 2.3).
    ``args`` maps ``CORRECT_ARG_NAMES`` to the op's tensors, ``knobs`` holds ``batch_scope``.
    """
    from . import reference

    out_w, ref_w = out_w.cpu(), ref_w.cpu()
    assert torch.equal(out_w == -1, ref_w == -1), (out_w, ref_w)
    args = {name: t.cpu() for name, t in args.items()}
    seq_adv, gid = args["seq_advantages"], args["group_ids"]
    seq, tool, key = args["call_seq"], args["call_tool"], args["call_key"]
    params, kinds = args["call_params"].float(), args["tool_sim_kind"]
    for k in (out_w != ref_w).nonzero().flatten().tolist():
        cands = [
            c
            for c in range(seq.numel())
            if tool[c] >= 0
            and tool[c] == tool[k]
            and key[c] == key[k]
            and seq_adv[seq[c]] > 0
            and (knobs["batch_scope"] or gid[seq[c]] == gid[seq[k]])
        ]
        sims = {
            c: float(
                reference.pairwise_similarity(
                    params[k : k + 1], params[c : c + 1], kinds[tool[k]].reshape(1)
                )[0, 0]
            )
            for c in cands
        }
        best = max(sims.values())
        near = [c for c in cands if sims[c] >= best - 1e-6]
        w = int(out_w[k])
        assert w in near, f"call {k}: witness {w} is not a best candidate {near} ({sims})"
        if len({sims[c] for c in near}) == 1:
            assert w == min(near), f"call {k}: exact tie {near} must pick the lowest index"


def run_policy_loss(
    impl: tuple[Callable[..., Any], Callable[..., Any]],
    args: tuple[Tensor | None, ...],
    knobs: dict[str, Any],
    grad_loss: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, metrics, d loss / d logp) of one backend: a ``(forward, backward)`` pair with the
    schemas of ``tapo::policy_loss`` and ``tapo::policy_loss_backward``."""
    forward, backward = impl
    loss, metrics = forward(*args, **knobs)
    grad = backward(torch.full((), grad_loss, dtype=args[0].dtype), *args, **knobs)
    return loss, metrics, grad
