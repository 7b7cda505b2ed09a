"""Triton kernels, one op per file. Importing this package imports Triton."""

from .fused_correct import fused_correct_triton
from .logprob_loss import (
    policy_loss_from_hidden_triton,
    policy_loss_from_logits_triton,
    selective_log_softmax_backward_inplace_triton,
    selective_log_softmax_backward_triton,
    selective_log_softmax_from_hidden_backward_triton,
    selective_log_softmax_triton,
)
from .policy_loss import policy_loss_backward_triton, policy_loss_triton

__all__ = ["fused_correct_triton", "policy_loss_triton", "policy_loss_backward_triton"]
__all__ += [
    "policy_loss_from_logits_triton",
    "policy_loss_from_hidden_triton",
    "selective_log_softmax_triton",
    "selective_log_softmax_backward_triton",
    "selective_log_softmax_backward_inplace_triton",
    "selective_log_softmax_from_hidden_backward_triton",
]
