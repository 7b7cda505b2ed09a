"""The CUDA launchers read device values back to the host as little as possible.

Every read of a device value (``bool(t)``, ``t.item()``, ``t.tolist()``, ``nonzero``...) is a
host sync on CUDA: the CPU waits for the GPU, and the launch queue drains. The H200 run showed
such syncs dominating the ops' time at realistic sizes (``policy_loss`` at 64k tokens took
1.4 ms with eight syncs per call, against a 0.09 ms floor), so the data-dependent input checks
are collected as device flags and read back once (``_checks.Flags``). The Triton launchers run
here in the interpreter on CPU tensors; the syncing calls are counted with a torch function
mode, which sees them whatever the device.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tapo_kernels import _checks, knobs
from tapo_kernels.testing import correct_batch, loss_batch

ops = pytest.importorskip("tapo_kernels.ops")

_SYNCING = {
    torch.Tensor.__bool__,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.nonzero,
    torch.nonzero,
}
KNOBS = dict(algo="grpo", eps_low=0.2, eps_high=0.28, kl_coef=0.01, agg="token-mean")


class _CountSyncs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING:
            self.count += 1
        return func(*args, **(kwargs or {}))


def syncs(fn) -> int:
    with _CountSyncs() as counter:
        fn()
    return counter.count


def _logits_case(B=3, T=9, V=40):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(B, T, V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    b = loss_batch(B=B, T=T, empty_row=False)
    return logits, labels, (b.old_logp, b.advantages, b.mask, b.ref_logp, b.call_map, b.call_delta)


def test_policy_loss_forward_and_backward_sync_once_each():
    args = loss_batch(B=5, T=24, empty_row=False, with_weight=True).op_args()
    assert syncs(lambda: ops.policy_loss_triton(*args, **KNOBS)) == 1
    one = torch.ones(())
    assert syncs(lambda: ops.policy_loss_backward_triton(one, *args, **KNOBS)) == 1


def test_fused_correct_syncs_at_most_twice():
    b = correct_batch()
    assert syncs(lambda: ops.fused_correct_triton(*b.op_args(), 0.7, 0.3, 0.8, False)) <= 2


def test_logits_front_end_syncs_twice():
    """Once for every argument check, once for the finiteness of the computed logp."""
    logits, labels, loss = _logits_case()
    assert syncs(lambda: ops.policy_loss_from_logits_triton(logits, labels, *loss, **KNOBS)) == 2


def test_hidden_front_end_syncs_twice():
    logits, labels, loss = _logits_case()
    gen = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(3, 9, 8, generator=gen), torch.randn(40, 8, generator=gen)
    assert (
        syncs(
            lambda: ops.policy_loss_from_hidden_triton(
                hidden, weight, None, labels, *loss, chunk_size=10, **KNOBS
            )
        )
        == 2
    )


@pytest.mark.parametrize("bad", ["mask", "logp", "call_map", "labels"])
def test_batched_checks_still_name_the_first_bad_argument(bad):
    """One read-back, the same errors in the same order as one check at a time."""
    logits, labels, loss = _logits_case()
    old, adv, mask, ref, call_map, call_delta = (t.clone() for t in loss)
    logp = old.clone()
    if bad == "mask":
        mask[0, 3] = 2.0
    elif bad == "logp":
        logp[mask != 0] = float("nan")
        old[mask != 0] = float("inf")  # later in the order: logp is reported first
    elif bad == "call_map":
        call_map[1, 1] = 10_000
    else:
        labels[mask != 0] = -1
    expected = {
        "mask": "mask values must be in",
        "logp": "logp contains NaN",
        "call_map": "call_map out of range",
        "labels": "labels must be >= 0",
    }[bad]
    with pytest.raises(ValueError, match=expected):
        if bad == "labels":
            ops.policy_loss_from_logits_triton(
                logits, labels, old, adv, mask, ref, call_map, call_delta, **KNOBS
            )
        else:
            resolved = knobs.resolve(None, KNOBS)
            _checks.check_policy_loss(
                logp, (old, adv, mask, ref, call_map, call_delta, None), resolved
            )


def test_flags_raise_nothing_when_every_check_passes():
    flags = _checks.Flags()
    flags.add(torch.tensor(False), "never")
    flags.raise_first()
    flags.add(torch.tensor([False]), "first")
    flags.add(torch.tensor(True), "second")
    flags.add(torch.tensor(True), "third")
    with pytest.raises(ValueError, match="^second$"):
        flags.raise_first()
