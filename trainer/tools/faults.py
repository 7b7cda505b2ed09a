"""Misbehaving tools for fault-injection tests: one raises, one hangs past its timeout."""

from __future__ import annotations

import time
from typing import Any

from .base import Tool, ToolContext


class FailingTool(Tool):
    """``failing(query)``: always raises (the registry must turn that into an observation)."""

    name = "failing"
    description = "A tool that always raises."
    required = {"query": str}
    argument_schemas = {"query": {"description": "Any text."}}

    def run(self, arguments: dict[str, Any], context: ToolContext) -> str:
        raise RuntimeError("the failing tool failed, as it always does")


class SlowTool(Tool):
    """``slow(query)``: sleeps ``seconds`` (longer than any sane timeout) before answering."""

    name = "slow"
    description = "A tool that takes too long."
    required = {"query": str}
    argument_schemas = {"query": {"description": "Any text."}}

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds = seconds

    def run(self, arguments: dict[str, Any], context: ToolContext) -> str:
        time.sleep(self.seconds)
        return "finally"
