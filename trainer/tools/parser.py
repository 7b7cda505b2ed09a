"""Parse the body of a ``<tool_call>...</tool_call>`` into a call, never raising.

The expected body is ``{"name": <tool>, "arguments": {...}}``. Anything else (invalid JSON,
a non-object, a missing or unknown name, arguments that do not fit the tool, a missing
closing tag) becomes a ``ParsedCall`` with ``tool_id = -1`` and an ``error`` message that the
rollout shows the model as the observation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import Tool, ToolArgumentError

INVALID_TOOL = -1


@dataclass
class ParsedCall:
    """One tool call as written by the model."""

    raw: str
    tool_id: int = INVALID_TOOL
    name: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None and self.tool_id >= 0


def parse_tool_call(
    body: str, tools: Mapping[str, tuple[int, Tool]], closed: bool = True
) -> ParsedCall:
    """``tools`` maps a tool name to ``(tool id, tool)``; ``closed`` = the closing tag was written."""
    call = ParsedCall(raw=body)
    if not closed:
        call.error = "the tool call was not closed with </tool_call>"
        return call
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError) as exc:
        call.error = f"the tool call is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})"
        return call
    if not isinstance(obj, dict):
        call.error = "the tool call must be a JSON object with 'name' and 'arguments'"
        return call
    name = obj.get("name")
    if not isinstance(name, str):
        call.error = "the tool call needs a string 'name'"
        return call
    call.name = name
    if name not in tools:
        call.error = f"unknown tool '{name}' (available: {sorted(tools)})"
        return call
    extra = set(obj) - {"name", "arguments"}
    if extra:
        call.error = f"unexpected keys in the tool call: {sorted(extra)}"
        return call
    tool_id, tool = tools[name]
    try:
        call.arguments = tool.check_arguments(obj.get("arguments", {}))
    except ToolArgumentError as exc:
        call.error = str(exc)
        return call
    call.tool_id = tool_id
    return call
