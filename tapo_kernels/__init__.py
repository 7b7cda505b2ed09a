"""tapo-kernels: tool-aware credit correction (TAPO) and fused RL policy losses.

Importing this package registers ``torch.ops.tapo.fused_correct``,
``torch.ops.tapo.policy_loss``, ``torch.ops.tapo.policy_loss_backward`` and
``torch.ops.tapo.policy_loss_with_grad`` (among others). It does not
import Triton or initialise CUDA.
"""

from . import _library, reference  # noqa: F401  (_library registers the ops)
from ._library import CPU_BACKEND, NATIVE_ERROR
from .correction import TapoResult, TapoStats, ToolCalls, build_call_map, fused_correct
from .logprob import (
    LogprobLossOutput,
    logprobs_from_hidden,
    logprobs_from_logits,
    policy_loss_from_hidden,
    policy_loss_from_logits,
)
from .loss import PRESETS, PolicyLossOutput, policy_loss
from .params import encode_box, encode_results, encode_text
from .rollout_correction import rollout_mismatch, truncated_importance_weight

__version__ = "0.1.0"


def native_available() -> bool:
    """True when the C++ CPU kernels of ``tapo_kernels._C`` are loaded."""
    return NATIVE_ERROR is None


__all__ = [
    "CPU_BACKEND",
    "PRESETS",
    "PolicyLossOutput",
    "TapoResult",
    "TapoStats",
    "ToolCalls",
    "build_call_map",
    "encode_box",
    "encode_results",
    "encode_text",
    "fused_correct",
    "native_available",
    "policy_loss",
    "reference",
    "rollout_mismatch",
    "truncated_importance_weight",
]
__all__ += [
    "LogprobLossOutput",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "policy_loss_from_hidden",
    "policy_loss_from_logits",
]
