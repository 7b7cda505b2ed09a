"""Triton kernels, one op per file. Importing this package imports Triton."""

from .fused_correct import fused_correct_triton
from .policy_loss import policy_loss_backward_triton, policy_loss_triton

__all__ = ["fused_correct_triton", "policy_loss_triton", "policy_loss_backward_triton"]
