"""AXPO: explorative resampling of prompt groups in which every tool-using rollout failed.

Such a group teaches GRPO nothing (every advantage is zero). AXPO re-explores it from the
point where the trajectories committed to a tool call:

1. **all-wrong groups**: no rollout of the group succeeded (exact match 0) and at least one
   made a tool call;
2. **prefixes**: each rollout of such a group with a tool call is cut at its first call, just
   after the opening tool-call tag (the prompt and the turn up to ``<tool_call>``; the first
   call always lies in the first assistant turn, since a turn without a call ends the
   episode). A call without an opening tag cannot be cut and is skipped;
3. **ranking**: prefixes are ranked by the policy's confidence in their call, the mean
   probability ``exp(logp)`` of the call's tokens, least confident first;
4. **budget**: ``max(1, floor(budget * G))`` prefixes per group (``G`` rollouts per group)
   are resampled, ``k`` continuations each, with the same rollout engine;
5. **advantages**: the ``k`` continuations of a prefix form their own advantage group (GRPO
   normalisation over the ``k``; their prefix tokens are masked out, they train only what
   they generated). Each resampled source gets the recovery reward
   ``1[any continuation succeeded]``; inside the original group the rewards become those
   recovery rewards (0 for the rollouts not resampled) and are normalised as GRPO does; a
   source's prefix tokens get its normalised recovery advantage and its own failed
   continuation is masked out. The rollouts of the group that were not resampled keep their
   own advantage.

The rows AXPO adds or rewrites are flagged, so the loss can clip them with their own
``eps_low`` / ``eps_high`` (0.2 / 0.28 by default). Ranks add different numbers of rows;
``pad_rows`` evens them out with rows that train nothing.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tapo_kernels.reference import group_advantages

from .config import AxpoConfig
from .rollout import Episode, RolloutEngine
from .rollout.engine import PromptFormatter

# per-step sums (summed over ranks; rates in ``rates``)
SUM_KEYS = (
    "axpo_groups",
    "axpo_all_wrong",
    "axpo_prefixes",
    "axpo_recovered",
    "axpo_extra_tokens",
    "axpo_seconds",
)


def succeeded(ep: Episode) -> bool:
    return ep.em > 0


def all_wrong_groups(episodes: Sequence[Episode]) -> dict[int, list[int]]:
    """``group -> episode indices`` of the groups where no rollout succeeded and at least one
    made a tool call."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ep in enumerate(episodes):
        groups[ep.group].append(i)
    return {
        g: idx
        for g, idx in groups.items()
        if not any(succeeded(episodes[i]) for i in idx) and any(episodes[i].calls for i in idx)
    }


def _turn_start(ep: Episode, position: int) -> int:
    """First token of the assistant turn holding token ``position``."""
    return next((s for s, e in ep.turn_spans if s <= position < e), ep.prompt_len)


def prefix_length(ep: Episode, fmt: PromptFormatter) -> int | None:
    """Tokens of ``ep`` up to and including the opening tag of its first call (None when it
    has no call or the call has no opening tag)."""
    if not ep.calls:
        return None
    call = ep.calls[0]
    turn_start = _turn_start(ep, call.start)
    tag = fmt.tags.tool_open
    for n in range(call.start + 1, call.end + 1):
        if tag in fmt.decode(ep.token_ids[turn_start:n]):
            return n
    return None


def call_confidence(ep: Episode) -> float:
    """Mean probability of the first call's policy tokens under the sampling policy."""
    call = ep.calls[0]
    probs = [
        math.exp(ep.logp[t]) for t in range(call.start, min(call.end, len(ep.mask))) if ep.mask[t]
    ]
    return sum(probs) / len(probs) if probs else 1.0


def budget_per_group(budget: float, group_size: int) -> int:
    """Prefixes resampled per all-wrong group: ``max(1, floor(budget * G))``."""
    return max(1, math.floor(budget * group_size + 1e-9))


@dataclass
class Choice:
    source: int  # index of the source episode
    cut: int  # prefix length in tokens
    confidence: float


def choose_prefixes(
    episodes: Sequence[Episode], fmt: PromptFormatter, budget: float, group_size: int
) -> list[Choice]:
    """The prefixes to resample: per all-wrong group, the least confident calls first, within
    the budget (ties broken by episode order)."""
    chosen = []
    per_group = budget_per_group(budget, group_size)
    for idx in all_wrong_groups(episodes).values():
        candidates = []
        for i in idx:
            cut = prefix_length(episodes[i], fmt)
            if cut is not None:
                candidates.append(Choice(i, cut, call_confidence(episodes[i])))
        candidates.sort(key=lambda c: (c.confidence, c.source))
        chosen.extend(candidates[:per_group])
    return chosen


def prefix_episode(src: Episode, cut: int, group: int) -> Episode:
    """A copy of ``src`` cut at ``cut`` tokens, ready to be continued inside its open turn;
    the prefix is masked out (only the continuation is trained in this row)."""
    turn_start = _turn_start(src, cut - 1)
    return Episode(
        src.example,
        group,
        src.prompt_len,
        list(src.token_ids[:cut]),
        [0] * cut,
        [0.0] * cut,
        turn_spans=[span for span in src.turn_spans if span[1] <= turn_start],
        turns=sum(1 for span in src.turn_spans if span[1] <= turn_start),
        open_turn=cut - turn_start,
    )


@dataclass
class AxpoResult:
    """What AXPO did to one rank's batch."""

    continuations: list[Episode] = field(default_factory=list)
    # source index -> its recovery advantage (applied to its prefix tokens)
    source_advantage: dict[int, float] = field(default_factory=dict)
    rows: list[int] = field(default_factory=list)  # batch rows AXPO added or rewrote
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SUM_KEYS, 0.0))

    def row_flags(self, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
        """``[B]`` bool: the batch rows AXPO added or rewrote."""
        flags = torch.zeros(batch_size, dtype=torch.bool)
        flags[self.rows] = True
        return flags.to(device)


def resample(
    engine: RolloutEngine,
    episodes: list[Episode],
    cfg: AxpoConfig,
    group_size: int,
    seed: int,
    score: Callable[[Sequence[Episode]], None],
    scale_by_std: bool = True,
) -> AxpoResult:
    """Run AXPO on one rank's scored episodes (grouped by ``Episode.group``), in place:
    sources are masked after their prefix; the continuations (scored with ``score``) are
    returned to be appended to the batch, in rows ``len(episodes) ...``."""
    t0 = time.perf_counter()
    out = AxpoResult()
    out.sums["axpo_groups"] = len({ep.group for ep in episodes})
    out.sums["axpo_all_wrong"] = len(all_wrong_groups(episodes))
    chosen = choose_prefixes(episodes, engine.fmt, cfg.budget, group_size)
    if chosen:
        next_group = max(ep.group for ep in episodes) + 1
        prefixes = [
            prefix_episode(episodes[c.source], c.cut, next_group + j)
            for j, c in enumerate(chosen)
            for _ in range(cfg.k)
        ]
        engine.continue_episodes(prefixes, seed=seed)
        score(prefixes)
        out.continuations = prefixes
        recovered = {
            c.source: any(succeeded(p) for p in prefixes[j * cfg.k : (j + 1) * cfg.k])
            for j, c in enumerate(chosen)
        }
        out.source_advantage = recovery_advantages(episodes, recovered, scale_by_std)
        for c in chosen:  # the source trains its prefix only
            src = episodes[c.source]
            src.mask[c.cut :] = [0] * (len(src.mask) - c.cut)
        out.rows = [c.source for c in chosen] + [len(episodes) + i for i in range(len(prefixes))]
        out.sums["axpo_prefixes"] = len(chosen)
        out.sums["axpo_recovered"] = sum(recovered.values())
        out.sums["axpo_extra_tokens"] = sum(p.num_policy_tokens for p in prefixes)
    out.sums["axpo_seconds"] = time.perf_counter() - t0
    return out


def recovery_advantages(
    episodes: Sequence[Episode], recovered: dict[int, bool], scale_by_std: bool = True
) -> dict[int, float]:
    """Each resampled source's advantage: the recovery rewards of its original group (1 for
    a recovered source, 0 for every other rollout) normalised as GRPO does."""
    out = {}
    for g in {episodes[i].group for i in recovered}:
        idx = [i for i, ep in enumerate(episodes) if ep.group == g]
        rewards = torch.tensor([float(recovered.get(i, False)) for i in idx])
        zeros = torch.zeros(len(idx), dtype=torch.int64)
        adv = group_advantages(rewards, zeros, scale_by_std=scale_by_std)
        out.update({i: float(a) for i, a in zip(idx, adv.tolist(), strict=True) if i in recovered})
    return out


def apply_advantages(seq_adv: Tensor, result: AxpoResult) -> Tensor:
    """``seq_adv`` ([B], continuations included) with the sources' recovery advantages."""
    if not result.source_advantage:
        return seq_adv
    seq_adv = seq_adv.clone()
    for i, a in result.source_advantage.items():
        seq_adv[i] = a
    return seq_adv


def pad_rows(episodes: list[Episode], rows: int) -> list[Episode]:
    """``episodes`` padded to ``rows`` with one-token rows that train nothing (mask 0, no
    call, reward 0, a group of their own): under FSDP every rank must run the same number of
    forward and backward passes, and AXPO adds a different number of rows on each rank."""
    next_group = max((ep.group for ep in episodes), default=-1) + 1
    pad = [
        Episode(episodes[0].example, next_group + i, 1, [episodes[0].token_ids[0]], [0], [0.0])
        for i in range(rows - len(episodes))
    ]
    return episodes + pad


def rates(s: dict[str, float], step_time: float, world: int) -> dict:
    """``axpo/*`` metrics from the step's sums over ranks (``policy_tokens``: the step's own
    rollouts'; the extra tokens are a share of both together)."""
    return {
        "axpo/all_wrong_groups": s["axpo_all_wrong"],
        "axpo/all_wrong_rate": s["axpo_all_wrong"] / max(s["axpo_groups"], 1.0),
        "axpo/prefixes_resampled": s["axpo_prefixes"],
        "axpo/recovery_rate": s["axpo_recovered"] / max(s["axpo_prefixes"], 1.0),
        "axpo/extra_token_share": s["axpo_extra_tokens"]
        / max(s["policy_tokens"] + s["axpo_extra_tokens"], 1.0),
        "axpo/time_share": s["axpo_seconds"] / world / max(step_time, 1e-9),
    }
