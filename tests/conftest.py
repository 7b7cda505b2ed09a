"""Shared fixtures: every backend of every op, callable with the op's arguments.

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
