"""Trajectory records and their batching into training tensors.

An ``Episode`` is one rollout: its token ids (prompt, policy turns, tool observations),
a mask that is 1 only on policy-generated tokens, the sampling log-probability of each
policy token, the tool calls it made (token span, tool id, context key, parameters,
validity, what it retrieved) and its final answer. ``collate`` right-pads a list of episodes
into the tensors the loss and ``tapo_kernels.fused_correct`` take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tapo_kernels import ToolCalls

from ..tasks import Example
from ..vision import VisionBatch, vision_batch


@dataclass
class CallRecord:
    """One tool call: tokens ``[start, end)`` of the trajectory, from opening to closing tag."""

    start: int
    end: int
    tool_id: int  # < 0: malformed, failed or timed out (never a TAPO witness, never corrected)
    key: int  # context key: calls against different corpora never match
    name: str | None
    arguments: dict[str, Any]
    param_text: str  # the argument text TAPO may compare (the search query)
    valid: bool
    error: str | None
    observation: str = ""
    refs: tuple[str, ...] = ()  # what the tool retrieved (TAPO's result-aware witness)
    good: bool | None = None  # ground truth: the observation holds gold evidence (None: unknown)


@dataclass
class Episode:
    """One trajectory of the policy on one question."""

    example: Example
    group: int  # prompt group id (the G rollouts of one question share it)
    prompt_len: int
    token_ids: list[int]
    mask: list[int]  # 1 on policy-generated tokens only
    logp: list[float]  # sampling log-prob of each policy token (0.0 elsewhere)
    calls: list[CallRecord] = field(default_factory=list)
    answer: str | None = None
    turns: int = 0
    # token span [start, end) of each assistant turn, in order (policy tokens only)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    open_turn: int = 0  # trailing tokens of an assistant turn still to be continued
    finish: str = ""  # answer | eos | max_turns | max_tokens | truncated
    # the images in the context, in order (vision-language policies), and the region of the
    # question's scene each one shows (normalised x1, y1, x2, y2; image 0: the whole scene)
    images: list[Any] = field(default_factory=list)
    views: list[tuple[float, float, float, float]] = field(default_factory=list)
    reward: float = 0.0
    em: float = 0.0
    f1: float = 0.0

    @property
    def done(self) -> bool:
        return bool(self.finish)

    def append(self, ids: Sequence[int], policy: bool, logp: Sequence[float] | None = None) -> None:
        self.token_ids.extend(int(i) for i in ids)
        self.mask.extend([1 if policy else 0] * len(ids))
        self.logp.extend([float(x) for x in logp] if logp is not None else [0.0] * len(ids))

    @property
    def num_policy_tokens(self) -> int:
        return sum(self.mask)


@dataclass
class Batch:
    """Right-padded tensors of ``B`` episodes, ``T`` tokens each (``# [B, T]``)."""

    input_ids: Tensor  # [B, T] int64
    attention_mask: Tensor  # [B, T] int64, 1 on real tokens
    mask: Tensor  # [B, T] float32, 1 on policy tokens
    old_logp: Tensor  # [B, T] float32
    group_ids: Tensor  # [B] int64
    rewards: Tensor  # [B] float32
    calls: ToolCalls
    vision: VisionBatch | None = None  # the rows' images (vision-language policies)
    # [B, T] float32, the truncated importance weight of the rollout engine's samples
    # (set by the trainer when it recomputes old_logp with algo.tis_cap; None otherwise)
    importance_weight: Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.mask.to(device),
            self.old_logp.to(device),
            self.group_ids.to(device),
            self.rewards.to(device),
            self.calls.to(device),
            self.vision.to(device) if self.vision is not None else None,
            None if self.importance_weight is None else self.importance_weight.to(device),
        )

    def model_inputs(self, rows: slice) -> dict[str, Tensor]:
        """The model's image keyword arguments for rows ``rows`` (empty without images)."""
        return self.vision.rows(rows) if self.vision is not None else {}


def collate(
    episodes: Sequence[Episode],
    pad_id: int,
    length: int | None = None,
    params: Tensor | None = None,
    param_dim: int = 256,
    image_pad_id: int | None = None,
) -> Batch:
    """Pad to ``length`` (default: the longest episode) and gather the calls as ``ToolCalls``.

    ``params`` holds the ``(N, D)`` parameter vectors of the episodes' calls in order
    (``ToolRegistry.encode_calls``); without it the calls get zero vectors, which match
    nothing (enough for the warm-up, which never corrects). ``image_pad_id``: the image pad
    token of a vision-language policy, for the rows' images and 3-D rotary positions.
    """
    T = max(len(ep.token_ids) for ep in episodes) if length is None else length
    B = len(episodes)
    input_ids = torch.full((B, T), pad_id, dtype=torch.int64)
    attention = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=torch.float32)
    old_logp = torch.zeros(B, T, dtype=torch.float32)
    seq, start, end, tool, key = [], [], [], [], []
    for i, ep in enumerate(episodes):
        n = len(ep.token_ids)
        if n > T:
            raise ValueError(f"episode {i} has {n} tokens, more than the batch length {T}")
        input_ids[i, :n] = torch.tensor(ep.token_ids)
        attention[i, :n] = 1
        mask[i, :n] = torch.tensor(ep.mask, dtype=torch.float32)
        old_logp[i, :n] = torch.tensor(ep.logp, dtype=torch.float32)
        for c in ep.calls:
            seq.append(i)
            start.append(c.start)
            end.append(c.end)
            tool.append(c.tool_id)
            key.append(c.key)
    if params is None:
        params = torch.zeros(len(seq), param_dim, dtype=torch.float32)
    if params.dim() != 2 or params.shape[0] != len(seq):
        raise ValueError(
            f"params must have shape ({len(seq)}, D), one row per call, got {tuple(params.shape)}"
        )
    if seq:
        calls = ToolCalls.from_lists(seq, start, end, tool, params, key=key)
    else:
        calls = ToolCalls.empty(params.shape[1])
    groups = torch.tensor([ep.group for ep in episodes], dtype=torch.int64)
    rewards = torch.tensor([ep.reward for ep in episodes], dtype=torch.float32)
    vision = None
    if image_pad_id is not None:
        rows = [(ep.token_ids, ep.images) for ep in episodes]
        vision = vision_batch(rows, image_pad_id, T)
    return Batch(input_ids, attention, mask, old_logp, groups, rewards, calls, vision)
