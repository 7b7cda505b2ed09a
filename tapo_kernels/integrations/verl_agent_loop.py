"""verl's tool agent loop, recording the response-token span of every tool call for TAPO.

``TapoToolAgentLoop`` is verl's ``ToolAgentLoop`` (registered as ``tapo_tool_agent``; or
listed in ``actor_rollout_ref.rollout.agent.agent_loop_config_path``) that, after each
assistant turn which makes tool calls, finds the calls' tokens in the turn by the tool
parser's tags (``tool_call_start_token`` / ``tool_call_end_token``, Hermes'
``<tool_call>`` / ``</tool_call>`` by default) and records one ``CallSpan`` per executed
call: its span ``[start, end)`` in the response tokens, its tool name and arguments (verl's
parsed call when the parser returned one per span, else the JSON between the tags). The
records land in the output's ``extra_fields["tapo_tool_calls"]``, hence in
``non_tensor_batch["tapo_tool_calls"]``, where the ``tapo_grpo`` advantage estimator reads
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.tool_agent_loop import AgentData, AgentState, ToolAgentLoop

from .calls import END_TAG, START_TAG, CallSpan, canonical_json, find_call_spans
from .verl import RECORDS_KEY

_CALLS_ATTR = "_tapo_calls"


def _arguments(text: str) -> str:
    import json

    try:
        return canonical_json(json.loads(text))
    except ValueError:
        return text


def record_turn(
    records: list[CallSpan],
    response_ids: Sequence[int],
    response_mask: Sequence[int],
    before: int,
    tokenizer: Any,
    parsed_calls: Sequence[Any] = (),
    *,
    start_tag: str = START_TAG,
    end_tag: str = END_TAG,
    limit: int | None = None,
) -> None:
    """Append to ``records`` the calls of the assistant turn ``response_ids[before:]``.

    ``parsed_calls``: the turn's calls as the tool parser returned them (``name``,
    ``arguments`` JSON text); used for the names and arguments when there is one per span.
    ``limit``: at most this many calls (the ones the loop executes).
    """
    turn = list(response_ids[before:])
    spans = find_call_spans(
        turn, tokenizer, start_tag=start_tag, end_tag=end_tag, mask=list(response_mask[before:])
    )
    if limit:
        spans = spans[:limit]
        parsed_calls = list(parsed_calls)[:limit]
    paired = len(parsed_calls) == len(spans)
    for i, span in enumerate(spans):
        name, arguments = span.name, span.arguments
        if paired:
            name, arguments = parsed_calls[i].name, _arguments(parsed_calls[i].arguments)
        records.append(CallSpan(span.start + before, span.end + before, name, arguments, span.key))


def finish(records: Sequence[CallSpan], response_length: int) -> list[dict[str, Any]]:
    """The records of a finished trajectory, clipped to the kept ``response_length`` tokens."""
    out = []
    for c in records:
        if c.start < response_length:
            out.append(CallSpan(c.start, min(c.end, response_length), c.name, c.arguments, c.key))
    return [c.to_dict() for c in out]


@register("tapo_tool_agent")
class TapoToolAgentLoop(ToolAgentLoop):
    """``ToolAgentLoop`` that records each tool call's response-token span (module doc)."""

    def _tags(self) -> tuple[str, str]:
        parser = self.tool_parser
        return (
            getattr(parser, "tool_call_start_token", None) or START_TAG,
            getattr(parser, "tool_call_end_token", None) or END_TAG,
        )

    def _finish(self, agent_data: AgentData) -> None:
        calls = getattr(agent_data, _CALLS_ATTR, [])
        agent_data.extra_fields[RECORDS_KEY] = finish(calls, self.response_length)

    async def _handle_generating_state(
        self,
        agent_data: AgentData,
        sampling_params: dict[str, Any],
        ignore_termination: bool = False,
    ) -> AgentState:
        before = len(agent_data.response_mask)
        state = await super()._handle_generating_state(
            agent_data, sampling_params, ignore_termination=ignore_termination
        )
        if state == AgentState.PROCESSING_TOOLS:
            n = len(agent_data.response_mask)
            response_ids = agent_data.prompt_ids[len(agent_data.prompt_ids) - n :]
            start_tag, end_tag = self._tags()
            if not hasattr(agent_data, _CALLS_ATTR):
                setattr(agent_data, _CALLS_ATTR, [])
            record_turn(
                getattr(agent_data, _CALLS_ATTR),
                response_ids,
                agent_data.response_mask,
                before,
                self.tokenizer,
                agent_data.tool_calls,
                start_tag=start_tag,
                end_tag=end_tag,
                limit=self.max_parallel_calls,
            )
        elif state == AgentState.TERMINATED:
            self._finish(agent_data)
        return state

    async def _handle_processing_tools_state(self, agent_data: AgentData) -> AgentState:
        state = await super()._handle_processing_tools_state(agent_data)
        if state == AgentState.TERMINATED:
            self._finish(agent_data)
        return state


__all__ = ["TapoToolAgentLoop", "finish", "record_turn"]
