"""The reward stage of an RL step: outcome reward, then (with TARL) turn-level judging.

``Scorer`` sets each episode's ``em``, ``f1`` and training ``reward``. With ``tarl.enabled``
a judge (``trainer/judges.py``) scores every assistant turn in {-1, 0, +1} and the reward
becomes ``tarl_reward(outcome, scores)``; group normalisation then proceeds as for the
outcome reward. The scorer counts the verdicts of the step (``sums``) for the metrics, and
per task the episodes, rewards and successes (mixed-task batches).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from . import axpo
from .axpo import AxpoResult
from .config import Config
from .judges import build_judge, tarl_reward, verdict_counts
from .rewards import score_episodes
from .rollout import Episode

VERDICT_KEYS = ("pos", "zero", "neg", "failed", "turns")


class Scorer:
    """Scores episodes in place; ``sums`` accumulates the step's judge counts."""

    def __init__(self, cfg: Config, decode: Callable[[list[int]], str]) -> None:
        self.cfg = cfg
        self.decode = decode
        self.judge = None
        t = cfg.tarl
        if t.enabled:
            options = {}
            if t.judge == "http":
                options = dict(
                    base_url=t.base_url,
                    model=t.model,
                    timeout_s=t.timeout_s,
                    max_retries=t.max_retries,
                    max_concurrency=t.max_concurrency,
                )
            self.judge = build_judge(t.judge, **options)
        self.sums: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        keys = [f"tarl_{k}" for k in (*VERDICT_KEYS, "seconds")] if self.judge else []
        self.sums = dict.fromkeys(keys, 0.0)

    def __call__(self, episodes: Sequence[Episode]) -> None:
        score_episodes(episodes, self.cfg.algo.reward)
        if self.judge is None or not episodes:
            return
        t0 = time.perf_counter()
        verdicts = self.judge.judge(list(episodes), self.decode)
        t = self.cfg.tarl
        for ep, v in zip(episodes, verdicts, strict=True):
            ep.reward = tarl_reward(ep.reward, v.scores, t.success_weight, t.penalty, t.bonus_cap)
        for k, n in verdict_counts(verdicts).items():
            self.sums[f"tarl_{k}"] += n
        self.sums["tarl_seconds"] += time.perf_counter() - t0

    def close(self) -> None:
        if self.judge is not None:
            self.judge.close()


def tarl_rates(s: dict[str, float], world: int) -> dict[str, float]:
    """``tarl/*`` metrics from the step's summed verdict counts."""
    if "tarl_turns" not in s:
        return {}
    turns = max(s["tarl_turns"], 1.0)
    return {
        "tarl/turn_pos_rate": s["tarl_pos"] / turns,
        "tarl/turn_zero_rate": s["tarl_zero"] / turns,
        "tarl/turn_neg_rate": s["tarl_neg"] / turns,
        "tarl/failed_verdicts": s["tarl_failed"],
        "tarl/judge_s": s["tarl_seconds"] / world,
    }


def task_sums(episodes: Sequence[Episode], tasks: Sequence[str]) -> dict[str, float]:
    """Per task: episodes, reward and exact-match sums (every rank lists every task)."""
    out = {}
    for name in tasks:
        mine = [ep for ep in episodes if ep.example.task == name]
        out[f"task_{name}_n"] = len(mine)
        out[f"task_{name}_reward"] = sum(ep.reward for ep in mine)
        out[f"task_{name}_em"] = sum(ep.em for ep in mine)
    return out


def task_rates(s: dict[str, float], tasks: Sequence[str]) -> dict[str, float]:
    out = {}
    for name in tasks:
        n = max(s[f"task_{name}_n"], 1.0)
        out[f"task/{name}/reward"] = s[f"task_{name}_reward"] / n
        out[f"task/{name}/accuracy"] = s[f"task_{name}_em"] / n
        out[f"task/{name}/share"] = s[f"task_{name}_n"] / max(s["n"], 1.0)
    return out


def step_extras(
    scorer: Scorer,
    episodes: Sequence[Episode],
    tasks: Sequence[str],
    axpo_result: AxpoResult | None,
    world: int,
    step_time: float,
) -> tuple[dict[str, float], Callable[[dict[str, float]], dict[str, float]]]:
    """The step's TARL, per-task and AXPO sums, and the function that turns the sums reduced
    over ranks into their metrics (``metrics.step_metrics``'s ``extra_*``)."""
    sums = {**scorer.sums, **task_sums(episodes, tasks)}
    if axpo_result is not None:
        sums.update(axpo_result.sums)

    def rates(s: dict[str, float]) -> dict[str, float]:
        out = {**tarl_rates(s, world), **task_rates(s, tasks)}
        if axpo_result is not None:
            out.update(axpo.rates(s, step_time, world))
        return out

    return sums, rates
