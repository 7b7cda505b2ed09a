"""TAPO in the training step: encode the calls, correct the credit, measure it against truth.

``correct_credit`` runs the whole TAPO path of one step - the calls' parameter vectors
(``ToolRegistry.encode_calls``), ``tapo_kernels.fused_correct`` with the configured
ablations, and the optional random-lift control - and times it. ``truth_counts`` compares the
lifts with the ground truth of the task: a call is *good* when its observation holds a gold
evidence document of its question (``Example.evidence``).

Definitions (every count is over the trajectories TAPO can act on, those with a negative
advantage, ``A_i < 0``, called *failing*):

* misassignment: share of failing trajectories with at least one good call, and share of
  the calls of failing trajectories that are good (GRPO punishes all of them);
* lift precision: share of lifted calls (``delta > 0``) that are good; lift recall: share of
  the good calls of failing trajectories that were lifted;
* mean lift on good / on bad calls: mean ``delta`` over the valid calls of failing
  trajectories that are good / not good (zeros included).

Ablations (``TapoConfig``): ``coverage=False`` sets ``confidence = s`` (no support factor);
``gate=False`` drops the confidence gate (``alpha_min = 0``, so a call is lifted whenever
``s >= theta``); ``random_lift=True`` is the control that gives the same lift values to as
many failing calls chosen at random, which separates correct credit from a softer penalty.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

import tapo_kernels
from tapo_kernels.reference import apply_lift

from .config import TapoConfig
from .rollout import Episode
from .tools import ToolRegistry


@dataclass
class Credit:
    """What TAPO gives the loss for one step, and what it cost."""

    advantages: Tensor  # [B, T] rewritten advantages (unchanged when the lift is fused)
    call_map: Tensor | None  # [B, T] int32 for the fused lift (None: no lift in the loss)
    call_delta: Tensor | None  # [N] lift per call
    delta: Tensor  # [N] lift per call as applied (zeros when TAPO is off)
    counts: dict[str, float] = field(default_factory=dict)  # TapoStats as sums over calls
    seconds: dict[str, float] = field(default_factory=dict)  # encode / correct


TAPO_COUNTS = (
    "tapo_failing_calls",
    "tapo_corrected_calls",
    "tapo_failing_trajectories",
    "tapo_corrected_trajectories",
    "tapo_lift_sum",
)


def encode_calls(
    registry: ToolRegistry, episodes: Sequence[Episode], mode: str, neural=None
) -> Tensor:
    """``(N, D)`` parameter vectors of every call of the episodes, in batch order."""
    calls = [c for ep in episodes for c in ep.calls]
    return registry.encode_calls(
        [c.tool_id for c in calls],
        [c.param_text for c in calls],
        [c.refs for c in calls],
        mode=mode,
        neural=neural,
    )


def random_lift(delta: Tensor, failing: Tensor, seed: int) -> Tensor:
    """The control arm: the positive lifts of ``delta`` moved onto as many failing calls
    chosen uniformly at random (``failing``: ``(N,)`` bool of the valid calls of failing
    trajectories). Same count, same values, random calls."""
    lifted = (delta > 0).nonzero().squeeze(1)
    out = torch.zeros_like(delta)
    if lifted.numel() == 0:
        return out
    rng = random.Random(seed)
    candidates = failing.nonzero().squeeze(1).tolist()
    chosen = rng.sample(candidates, lifted.numel())  # lifted calls are failing calls
    values = delta[lifted].tolist()
    rng.shuffle(values)
    out[torch.tensor(chosen, dtype=torch.int64, device=delta.device)] = torch.tensor(
        values, dtype=delta.dtype, device=delta.device
    )
    return out


def correct_credit(
    cfg: TapoConfig,
    registry: ToolRegistry,
    sim_kind: Tensor,
    episodes: Sequence[Episode],
    batch,
    advantages: Tensor,
    seq_adv: Tensor,
    seed: int,
    neural=None,
) -> Credit:
    """Run TAPO on a collated batch (``batch.calls`` gets the encoded parameters)."""
    B, T = advantages.shape
    n = len(batch.calls)
    zero = torch.zeros(n, dtype=torch.float32, device=advantages.device)
    if not cfg.enabled:
        return Credit(advantages, None, None, zero)
    device = advantages.device
    t0 = time.perf_counter()
    batch.calls.params = encode_calls(registry, episodes, cfg.witness, neural).to(device)
    t1 = time.perf_counter()
    result = tapo_kernels.fused_correct(
        advantages,
        seq_adv,
        batch.group_ids,
        batch.calls,
        sim_kind,
        theta=cfg.theta,
        alpha_min=cfg.alpha_min if cfg.gate else 0.0,
        beta=cfg.beta,
        batch_scope=cfg.batch_scope,
        coverage=cfg.coverage,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    delta = result.delta
    if cfg.random_lift:
        failing = (batch.calls.tool >= 0) & (seq_adv[batch.calls.seq] < 0)
        delta = random_lift(delta, failing, seed)
        result = tapo_kernels.TapoResult(
            result.corrected, delta, result.confidence, result.witness, seq_adv, batch.calls
        )
    stats = result.stats()
    counts = {
        "tapo_failing_calls": stats.failing_calls,
        "tapo_corrected_calls": stats.corrected_calls,
        "tapo_failing_trajectories": stats.failing_trajectories,
        "tapo_corrected_trajectories": stats.corrected_trajectories,
        "tapo_lift_sum": stats.mean_lift * stats.corrected_calls,
    }
    seconds = {"encode": t1 - t0, "correct": t2 - t1}
    if cfg.fused:
        return Credit(advantages, batch.calls.call_map(B, T), delta, delta, counts, seconds)
    corrected = (
        apply_lift(advantages, batch.calls.call_map(B, T), delta)
        if cfg.random_lift
        else result.corrected
    )
    return Credit(corrected, None, None, delta, counts, seconds)


TRUTH_COUNTS = (
    "failing_traj",
    "failing_traj_with_good",
    "failing_calls",
    "failing_good_calls",
    "failing_valid_bad_calls",
    "lifted_calls",
    "lifted_good_calls",
    "lift_sum_good",
    "lift_sum_bad",
    # the same for region calls (zoom_in: compared by IoU)
    "region_failing_calls",
    "region_failing_good_calls",
    "region_lifted_calls",
    "region_lifted_good_calls",
)
REGION_TOOLS = ("zoom_in",)


def truth_counts(
    episodes: Sequence[Episode], seq_adv: Sequence[float], delta: Sequence[float]
) -> dict[str, float]:
    """Sums over one step's episodes (all-reduce them, then ``truth_rates``).

    Only episodes whose question has ground truth count (``CallRecord.good`` is not None).
    ``delta`` is the applied lift of every call in batch order.
    """
    out = dict.fromkeys(TRUTH_COUNTS, 0.0)
    k = 0
    for ep, adv in zip(episodes, seq_adv, strict=True):
        calls = ep.calls
        known = bool(ep.example.evidence or ep.example.gold_box)
        if known and adv < 0:
            out["failing_traj"] += 1
            out["failing_traj_with_good"] += any(c.good for c in calls)
            for j, c in enumerate(calls):
                d = float(delta[k + j])
                region = c.name in REGION_TOOLS
                out["failing_calls"] += 1
                out["region_failing_calls"] += region
                if c.good:
                    out["failing_good_calls"] += 1
                    out["region_failing_good_calls"] += region
                    out["lift_sum_good"] += d
                elif c.valid:
                    out["failing_valid_bad_calls"] += 1
                    out["lift_sum_bad"] += d
                if d > 0:
                    out["lifted_calls"] += 1
                    out["lifted_good_calls"] += bool(c.good)
                    out["region_lifted_calls"] += region
                    out["region_lifted_good_calls"] += region and bool(c.good)
        k += len(calls)
    return out


def truth_rates(sums: dict[str, float], lifts: bool = True) -> dict[str, float]:
    """The ``truth/*`` metrics from summed counts (a rate with an empty denominator is left
    out; without ``lifts``, as when TAPO is off, only the misassignment statistics)."""
    rates = {}

    def ratio(key: str, num: str, den: str) -> None:
        if sums[den] > 0:
            rates[key] = sums[num] / sums[den]

    ratio("truth/failing_traj_with_good_call", "failing_traj_with_good", "failing_traj")
    ratio("truth/failing_call_good_rate", "failing_good_calls", "failing_calls")
    rates["truth/failing_trajectories"] = sums["failing_traj"]
    if not lifts:
        return rates
    ratio("truth/lift_precision", "lifted_good_calls", "lifted_calls")
    ratio("truth/lift_recall", "lifted_good_calls", "failing_good_calls")
    ratio("truth/mean_lift_good", "lift_sum_good", "failing_good_calls")
    ratio("truth/mean_lift_bad", "lift_sum_bad", "failing_valid_bad_calls")
    rates["truth/lifted_calls"] = sums["lifted_calls"]
    ratio("truth/zoom_lift_rate", "region_lifted_calls", "region_failing_calls")
    ratio("truth/zoom_lift_precision", "region_lifted_good_calls", "region_lifted_calls")
    ratio("truth/zoom_lift_recall", "region_lifted_good_calls", "region_failing_good_calls")
    return rates


def neural_encoder(cfg: TapoConfig):
    """The sentence encoder of ``tapo.witness=neural`` (None for the other witnesses)."""
    if not (cfg.enabled and cfg.witness == "neural"):
        return None
    from tapo_kernels.params import NeuralTextEncoder

    return NeuralTextEncoder()
