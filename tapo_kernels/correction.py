"""Python front door of ``torch.ops.tapo.fused_correct``: ``ToolCalls``, ``TapoResult``, ``TapoStats``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _checks, _library  # noqa: F401  (_library registers the ops)
from .reference import build_call_map as _build_call_map

# Defaults of docs/math.md, section 2: beta is the paper's best; theta and alpha_min are sweepable.
DEFAULT_THETA = 0.7
DEFAULT_ALPHA_MIN = 0.3
DEFAULT_BETA = 0.8


@dataclass
class ToolCalls:
    """The tool calls of a batch, one entry per call (``N`` calls).

    ``seq``: trajectory (row) of each call; ``start``/``end``: its token span
    ``[start, end)`` from opening to closing tag; ``tool``: tool id (``< 0`` marks a
    malformed or failed call); ``key``: context key (calls with different keys never
    match, e.g. zoom-ins on different images); ``params``: ``(N, D)`` parameter vectors
    from ``encode_text`` / ``encode_box``.
    """

    seq: Tensor  # [N] int64
    start: Tensor  # [N] int64
    end: Tensor  # [N] int64
    tool: Tensor  # [N] int64
    key: Tensor  # [N] int64
    params: Tensor  # [N, D] float32 / bf16 / fp16

    @classmethod
    def from_lists(
        cls,
        seq: Sequence[int],
        start: Sequence[int],
        end: Sequence[int],
        tool: Sequence[int],
        params: Tensor,
        key: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> ToolCalls:
        """Build from Python lists; ``key`` defaults to 0 for every call."""
        device = params.device if device is None else torch.device(device)

        def ints(values: Sequence[int]) -> Tensor:
            return torch.as_tensor(list(values), dtype=torch.int64, device=device).reshape(-1)

        n = len(seq)
        return cls(
            ints(seq),
            ints(start),
            ints(end),
            ints(tool),
            ints([0] * n if key is None else key),
            params.to(device),
        )

    @classmethod
    def empty(cls, dim: int = 256, device: torch.device | str = "cpu") -> ToolCalls:
        """A batch without tool calls (``N = 0``)."""
        z = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(
            z,
            z.clone(),
            z.clone(),
            z.clone(),
            z.clone(),
            torch.zeros(0, dim, dtype=torch.float32, device=device),
        )

    def __len__(self) -> int:
        return int(self.seq.shape[0])

    def named(self) -> dict[str, Tensor]:
        """The fields by name, in the order ``tapo::fused_correct`` takes them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to(self, device: torch.device | str) -> ToolCalls:
        return ToolCalls(*(t.to(device) for t in self.named().values()))

    def call_map(self, B: int, T: int) -> Tensor:
        """``(B, T) int32`` index of the call covering each token (-1 elsewhere), for ``policy_loss``."""
        return _build_call_map(self.seq, self.start, self.end, B, T)


def build_call_map(calls: ToolCalls, B: int, T: int) -> Tensor:
    """``(B, T) int32`` index of the call covering each token, -1 elsewhere."""
    return calls.call_map(B, T)


@dataclass
class TapoStats:
    """What TAPO did to one batch (log it every step).

    ``failing_calls``: valid calls in failing trajectories; ``corrected_calls``: those with
    a positive lift; ``failing_trajectories``: failing trajectories with at least one valid
    call (the ones TAPO could correct); ``corrected_trajectories``: those with at least one
    corrected call; ``mean_lift``: mean ``d_k`` over corrected calls (0 when none).
    """

    failing_calls: int
    corrected_calls: int
    failing_trajectories: int
    corrected_trajectories: int
    mean_lift: float

    @property
    def call_correction_rate(self) -> float:
        return self.corrected_calls / max(self.failing_calls, 1)

    @property
    def trajectory_correction_rate(self) -> float:
        return self.corrected_trajectories / max(self.failing_trajectories, 1)

    def as_dict(self, prefix: str = "tapo/") -> dict[str, float]:
        return {
            f"{prefix}failing_calls": self.failing_calls,
            f"{prefix}corrected_calls": self.corrected_calls,
            f"{prefix}call_correction_rate": self.call_correction_rate,
            f"{prefix}trajectory_correction_rate": self.trajectory_correction_rate,
            f"{prefix}mean_lift": self.mean_lift,
        }

    def __str__(self) -> str:
        return (
            f"TapoStats(corrected {self.corrected_calls}/{self.failing_calls} failing calls "
            f"({self.call_correction_rate:.1%}), {self.corrected_trajectories}/"
            f"{self.failing_trajectories} failing trajectories ({self.trajectory_correction_rate:.1%}), "
            f"mean lift {self.mean_lift:.4f})"
        )


@dataclass
class TapoResult:
    """Outputs of ``fused_correct``: corrected ``(B, T)`` advantages and per-call ``(N,)`` results."""

    corrected: Tensor
    delta: Tensor
    confidence: Tensor
    witness: Tensor
    seq_advantages: Tensor
    calls: ToolCalls

    def stats(self) -> TapoStats:
        """Summary statistics (one host sync)."""
        calls = self.calls
        if len(calls) == 0:
            return TapoStats(0, 0, 0, 0, 0.0)
        failing = (calls.tool >= 0) & (self.seq_advantages[calls.seq] < 0)
        corrected = failing & (self.delta > 0)
        B = self.seq_advantages.shape[0]
        traj_fail = torch.zeros(B, dtype=torch.bool, device=calls.seq.device)
        traj_fail[calls.seq[failing]] = True
        traj_corr = torch.zeros_like(traj_fail)
        traj_corr[calls.seq[corrected]] = True
        n_corr = int(corrected.sum())
        lift = float(self.delta[corrected].sum()) / n_corr if n_corr else 0.0
        return TapoStats(
            int(failing.sum()), n_corr, int(traj_fail.sum()), int(traj_corr.sum()), lift
        )


def fused_correct(
    advantages: Tensor,
    seq_advantages: Tensor,
    group_ids: Tensor,
    calls: ToolCalls,
    tool_sim_kind: Tensor,
    *,
    theta: float = DEFAULT_THETA,
    alpha_min: float = DEFAULT_ALPHA_MIN,
    beta: float = DEFAULT_BETA,
    batch_scope: bool = False,
    coverage: bool = True,
) -> TapoResult:
    """Lift the negative credit of failing trajectories' tool calls that a successful sibling repeated.

    Args:
        advantages: ``(B, T)`` float32 token advantages (``A_i * mask``).
        seq_advantages: ``(B,)`` float32 trajectory advantages ``A_i``.
        group_ids: ``(B,)`` int64 prompt group of each trajectory.
        calls: the batch's tool calls.
        tool_sim_kind: ``(num_tools,)`` int64, 0 = cosine on ``params``, 1 = IoU of boxes.
        theta: similarity a match must reach (``[0, 1]``).
        alpha_min: minimum confidence ``s_k * coverage_k`` to correct a call.
        beta: strength of the lift (0 disables TAPO).
        batch_scope: witnesses from the whole batch instead of the same prompt group.
        coverage: weight the confidence by the support factor (``False`` is the ablation
            ``confidence = s_k``).

    Returns:
        ``TapoResult`` with the corrected advantages (a new tensor), per-call lift, confidence
        and witness index; ``.stats()`` summarises the batch.
    """
    if not isinstance(calls, ToolCalls):
        raise TypeError(f"calls must be a ToolCalls, got {type(calls).__name__}")
    named = dict(advantages=advantages, seq_advantages=seq_advantages, group_ids=group_ids)
    call_fields = calls.named()
    calls_named = {f"calls.{n}": t for n, t in call_fields.items()}
    _checks.tensors(**named, tool_sim_kind=tool_sim_kind, **calls_named)
    for name, value in (("theta", theta), ("alpha_min", alpha_min), ("beta", beta)):
        _checks.number(name, value)
    for name, value in (("batch_scope", batch_scope), ("coverage", coverage)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    tensors = (advantages, seq_advantages, group_ids, *call_fields.values(), tool_sim_kind)
    settings = (float(theta), float(alpha_min), float(beta), batch_scope, coverage)
    corrected, delta, confidence, witness = torch.ops.tapo.fused_correct(*tensors, *settings)
    return TapoResult(corrected, delta, confidence, witness, seq_advantages, calls)
