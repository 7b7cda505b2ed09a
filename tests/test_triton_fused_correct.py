"""What only the Triton kernel of ``tapo::fused_correct`` has, against the reference.

Runs on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest.py)
on tiny shapes. The contract of every backend (Triton among them) is in
``test_fused_correct.py``; here: candidate ranges that cross the kernel's tiles, and output
buffers every entry of which the kernel must write. Quantized batches (parameters in eighths,
sequence advantages in 64ths) make every similarity, sum and gate exact in fp32 in any
summation order, so the kernel must equal the reference bit for bit.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does too)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from tapo_kernels import _library  # noqa: E402
from tapo_kernels.ops import fused_correct as fc_module  # noqa: E402
from tapo_kernels.testing import assert_exact, correct_batch  # noqa: E402

OUTPUT_NAMES = ("corrected", "delta", "confidence", "witness")
# (theta, alpha_min, beta): a permissive setting that corrects many calls
PERMISSIVE = (0.1, 0.0, 0.8)


def run_triton(args: tuple[torch.Tensor, ...], knobs: tuple, batch_scope: bool):
    return fc_module.fused_correct_triton(*args, *knobs, batch_scope)


def check_equals_reference(
    args: tuple[torch.Tensor, ...], knobs: tuple, batch_scope: bool
) -> tuple[torch.Tensor, ...]:
    """The kernel leaves its inputs alone and equals the fp32 reference bit for bit."""
    inputs_before = [a.clone() for a in args]
    out = run_triton(args, knobs, batch_scope)
    for before, after in zip(inputs_before, args, strict=True):
        assert torch.equal(before, after), "the kernel modified an input"
    ref32 = _library.fused_correct_reference_kernel(*args, *knobs, batch_scope)
    for name, o, r in zip(OUTPUT_NAMES, out, ref32, strict=True):
        assert_exact(o, r, name)
    return out


@pytest.mark.parametrize("kinds", ["cosine", "iou"])
def test_long_candidate_ranges_span_several_tiles(kinds):
    """One tool and key, 3 rows with up to 24 calls each: a row's candidates cross tiles.

    With one query vector every candidate ties, so the witness must be the lowest index
    across tiles; each successful row must be counted once although its hits span tiles.
    """
    one_key = dict(num_tools=1, num_keys=1, num_queries=2, invalid_prob=0.0)
    batch = correct_batch(B=3, T=97, D=8, group_size=3, calls_per_row=24, seed=3, **one_key)
    batch.seq_advantages = torch.tensor([-1.0, 0.5, 1.25])  # one failing row, two witnesses
    batch.advantages = batch.seq_advantages[:, None] * batch.mask
    if kinds == "iou":
        batch.tool_sim_kind = torch.ones(1, dtype=torch.int64)
    per_row = torch.bincount(batch.call_seq, minlength=3)
    assert int(per_row[1:].max()) > 16, "a row must have more candidates than one tile (16)"
    for batch_scope in (False, True):
        out = check_equals_reference(batch.op_args(), PERMISSIVE, batch_scope)
    assert bool((out[3] >= 0).any())


def test_outputs_are_fully_written(monkeypatch):
    """Poisoned output buffers: every entry must be written by the kernel."""

    def poisoned(n: int, device: torch.device):
        return (
            torch.full((n,), float("nan"), device=device),
            torch.full((n,), float("nan"), device=device),
            torch.full((n,), -7, dtype=torch.int64, device=device),
        )

    monkeypatch.setattr(fc_module, "_alloc_outputs", poisoned)
    batch = correct_batch(B=13, T=97, D=16, seed=2)  # quantized: exact in any order
    for batch_scope in (False, True):
        out = check_equals_reference(batch.op_args(), PERMISSIVE, batch_scope)
        assert not bool((out[3] == -7).any())
