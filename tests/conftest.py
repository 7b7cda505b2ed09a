"""Shared fixtures: every backend of every op, callable with the op's arguments, and the
knobs of the policy-loss grids (``grid_knobs``).

Triton kernels run on the CPU through the interpreter; ``TRITON_INTERPRET`` must be set
before Triton is imported, so it is set here, first.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import tapo_kernels  # noqa: E402
from tapo_kernels import _library  # noqa: E402


def _triton(name):
    def call(*args, **kwargs):
        from tapo_kernels import ops

        return getattr(ops, name)(*args, **kwargs)

    return call


def fused_correct_backends() -> dict:
    """name -> callable with the schema of ``tapo::fused_correct`` (CPU tensors)."""
    backends = {"reference": _library.fused_correct_reference_kernel}
    if tapo_kernels.CPU_BACKEND["fused_correct"] == "native":
        backends["native"] = torch.ops.tapo.fused_correct
    backends["triton"] = _triton("fused_correct_triton")
    return backends


def policy_loss_backends() -> dict:
    """name -> (forward, backward) callables with the schemas of ``tapo::policy_loss(_backward)``."""
    backends = {
        "reference": (
            _library.policy_loss_reference_kernel,
            _library.policy_loss_backward_reference_kernel,
        )
    }
    if tapo_kernels.CPU_BACKEND["policy_loss"] == "native":
        backends["native"] = (torch.ops.tapo.policy_loss, torch.ops.tapo.policy_loss_backward)
    backends["triton"] = (_triton("policy_loss_triton"), _triton("policy_loss_backward_triton"))
    return backends


@pytest.fixture(params=sorted(fused_correct_backends()))
def fused_correct_impl(request):
    return fused_correct_backends()[request.param]


@pytest.fixture(params=sorted(policy_loss_backends()))
def policy_loss_impl(request):
    return policy_loss_backends()[request.param]


def _grid_knobs(
    algo: str, agg: str, kl_type: str, dual_clip_c: float, **normalisers: float
) -> dict:
    """Knobs of the algo x agg x kl_type grids of the policy-loss tests: clip-higher, the dual
    clip at ``dual_clip_c`` (0: off), a small KL term, and ``normalisers`` (``norm_const``,
    ``global_count``). GSPO's ratios are row means, near 1: its clip range is narrow."""
    knobs = dict(algo=algo, agg=agg, kl_type=kl_type, kl_coef=0.05, eps_low=0.2, eps_high=0.28)
    knobs.update(dual_clip_c=dual_clip_c, **normalisers)
    if algo in ("gspo", "gspo-seq"):
        knobs.update(eps_low=0.03, eps_high=0.04)
    return knobs


@pytest.fixture
def grid_knobs():
    """``grid_knobs(algo, agg, kl_type, dual_clip_c, **normalisers)``: knobs of a grid case."""
    return _grid_knobs
