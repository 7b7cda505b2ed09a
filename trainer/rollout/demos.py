"""Demonstrations for the supervised warm-up, built exactly like rollouts.

A demonstration is the ideal episode for a question with known search queries: the prompt,
the policy's search calls, each with the real observation of the registry's search tool,
and the answer. Its tokens come from the same ``PromptFormatter`` the rollout uses, so the warm-up
teaches precisely the token sequences the sampler will produce.
"""

from __future__ import annotations

from ..modeling import format_call
from ..tasks import Example
from ..tools import ToolContext, ToolRegistry
from .engine import PromptFormatter
from .episode import CallRecord, Episode


def demonstration(fmt: PromptFormatter, registry: ToolRegistry, example: Example) -> Episode:
    """The episode ``prompt, (<tool_call>{query}</tool_call>, <obs>...</obs>)*, <answer>a</answer>``.

    One call of ``example.tool`` per query of ``example.demo_queries()``, each followed by
    the real observation of the registry's tool, then the first accepted answer.
    """
    queries = example.demo_queries()
    if not queries:
        raise ValueError(f"example {example.uid!r} has no query to demonstrate")
    prompt = fmt.prompt_ids(example)
    ep = Episode(example, 0, len(prompt), list(prompt), [0] * len(prompt), [0.0] * len(prompt))
    for query in queries:
        call_ids = fmt.encode(format_call(example.tool, {example.tool_arg: query}, fmt.tags))
        start = len(ep.token_ids)
        ep.append(call_ids, policy=True)
        ep.turn_spans.append((start, len(ep.token_ids)))
        body = fmt.decode(call_ids)[len(fmt.tags.tool_open) : -len(fmt.tags.tool_close)]
        parsed = registry.parse(body)
        (outcome,) = registry.execute([(parsed, ToolContext(example.corpus_id))])
        ok = parsed.valid and outcome.ok
        ep.calls.append(
            CallRecord(
                start,
                start + len(call_ids),
                parsed.tool_id if ok else -1,
                example.corpus_id,
                parsed.name,
                parsed.arguments,
                query,
                ok,
                parsed.error or outcome.error,
                outcome.observation,
                refs=outcome.refs,
                good=example.is_good_observation(outcome.observation),
            )
        )
        ep.append(fmt.observation_ids(outcome.observation), policy=False)
    start = len(ep.token_ids)
    ep.append(
        fmt.encode(f"{fmt.tags.answer_open}{example.answers[0]}{fmt.tags.answer_close}"),
        policy=True,
    )
    ep.turn_spans.append((start, len(ep.token_ids)))
    ep.answer, ep.turns, ep.finish = example.answers[0], len(queries) + 1, "answer"
    return ep
