"""Demonstrations for the supervised warm-up, built exactly like rollouts.

A demonstration is the ideal episode for a question with known calls: the prompt (after the
question's images), the policy's calls, each with the real observation of the registry's
tool, and the answer. Its tokens come from the same ``PromptFormatter`` the rollout uses, so the warm-up
teaches precisely the token sequences the sampler will produce.
"""

from __future__ import annotations

from ..modeling import format_call
from ..tasks import Example
from ..tools import ToolRegistry
from .engine import PromptFormatter
from .episode import Episode


def demonstration(fmt: PromptFormatter, registry: ToolRegistry, example: Example) -> Episode:
    """The episode ``prompt, (<tool_call>{call}</tool_call>, <obs>...</obs>)*, <answer>a</answer>``.

    One call per ``example.demo_calls()``, each followed by the real observation of the
    registry's tool (an image observation included), then the first accepted answer.
    """
    calls = example.demo_calls()
    if not calls:
        raise ValueError(f"example {example.uid!r} has no call to demonstrate")
    ep = fmt.start_episode(example)
    for name, arguments in calls:
        call_ids = fmt.encode(format_call(name, arguments, fmt.tags))
        start = len(ep.token_ids)
        ep.append(call_ids, policy=True)
        ep.turn_spans.append((start, len(ep.token_ids)))
        body = fmt.decode(call_ids)[len(fmt.tags.tool_open) : -len(fmt.tags.tool_close)]
        parsed = registry.parse(body)
        (outcome,) = registry.execute([(parsed, fmt.context(ep))])
        ep.calls.append(
            fmt.call_record(ep, start, start + len(call_ids), parsed, outcome, registry)
        )
        fmt.add_observation(ep, outcome)
    start = len(ep.token_ids)
    ep.append(
        fmt.encode(f"{fmt.tags.answer_open}{example.answers[0]}{fmt.tags.answer_close}"),
        policy=True,
    )
    ep.turn_spans.append((start, len(ep.token_ids)))
    ep.answer, ep.turns, ep.finish = example.answers[0], len(calls) + 1, "answer"
    return ep
