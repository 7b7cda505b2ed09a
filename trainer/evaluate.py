"""Held-out evaluation: greedy pass@1 and sampled pass@k, sharded over ranks.

pass@k here is the fraction of questions with at least one exact-match answer among ``k``
samples at ``eval.temperature`` (with exactly ``k`` samples the unbiased estimator of
Chen et al. reduces to this).
"""

from __future__ import annotations

from collections.abc import Sequence

from .distributed import DistContext, all_reduce_sum
from .rewards import exact_match, f1_score
from .rollout import RolloutEngine
from .tasks import Example


def evaluate(
    engine: RolloutEngine,
    examples: Sequence[Example],
    ctx: DistContext,
    *,
    k: int,
    temperature: float,
    seed: int,
) -> dict[str, float]:
    """Metrics over ``examples`` (each rank takes every ``world``-th question)."""
    mine = list(examples[ctx.rank :: ctx.world])
    greedy = engine.rollout(mine, list(range(len(mine))), seed=seed, greedy=True) if mine else []
    em = sum(exact_match(ep.answer, ep.example.answers) for ep in greedy)
    f1 = sum(f1_score(ep.answer, ep.example.answers) for ep in greedy)
    used_tool = sum(bool(ep.calls) for ep in greedy)
    valid_calls = sum(c.valid for ep in greedy for c in ep.calls)
    calls = sum(len(ep.calls) for ep in greedy)
    answered = sum(ep.answer is not None for ep in greedy)
    solved_k = 0
    if k > 0 and mine:
        repeated = [ex for ex in mine for _ in range(k)]
        groups = [i for i in range(len(mine)) for _ in range(k)]
        sampled = engine.rollout(repeated, groups, seed=seed + 1, temperature=temperature)
        hits = [0] * len(mine)
        for ep in sampled:
            hits[ep.group] |= int(exact_match(ep.answer, ep.example.answers) > 0)
        solved_k = sum(hits)
    total = all_reduce_sum(
        [len(mine), em, f1, used_tool, valid_calls, calls, answered, solved_k], ctx
    )
    n = max(total[0].item(), 1.0)
    return {
        "eval/pass@1": total[1].item() / n,
        "eval/f1": total[2].item() / n,
        "eval/tool_call_rate": total[3].item() / n,
        "eval/valid_call_rate": total[4].item() / max(total[5].item(), 1.0),
        "eval/answer_rate": total[6].item() / n,
        "eval/pass@k": total[7].item() / n,
        "eval/k": float(k),
        "eval/questions": total[0].item(),
    }


def describe(tag: str, result: dict[str, float]) -> str:
    """One line for the console: held-out pass@1 (and pass@k), tool use, size and time."""
    k = int(result["eval/k"])
    pass_k = f"pass@{k} {result['eval/pass@k']:.3f}  " if k else ""
    return (
        f"[eval {tag}] held-out pass@1 {result['eval/pass@1']:.3f}  {pass_k}"
        f"tool-call rate {result['eval/tool_call_rate']:.2f}  "
        f"({int(result['eval/questions'])} questions, {result.get('eval/time_s', 0.0):.1f} s)"
    )
