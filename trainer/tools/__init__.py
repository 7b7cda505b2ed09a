"""Tools the agent can call: registry, parser, BM25 search, calculator, fault injectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .base import SIM_KINDS, WITNESS_KINDS, Tool, ToolArgumentError, ToolContext, ToolResult
from .calculator import CalculatorTool
from .faults import FailingTool, SlowTool
from .parser import INVALID_TOOL, ParsedCall, parse_tool_call
from .registry import ISOLATION, WITNESS_MODES, ToolOutcome, ToolRegistry
from .text_search import BM25Index, TextSearchTool

AVAILABLE_TOOLS = ("search", "calculator", "failing", "slow")


def build_registry(
    enabled: Sequence[str],
    corpora: Mapping[int, Sequence[str]],
    *,
    search_top_k: int = 1,
    timeout_s: float = 5.0,
    isolation: str = "process",
    workers: int = 2,
) -> ToolRegistry:
    """A registry with the named tools, in the given order (their ids)."""
    tools: list[Tool] = []
    for name in enabled:
        if name == "search":
            tools.append(TextSearchTool(corpora, top_k=search_top_k))
        elif name == "calculator":
            tools.append(CalculatorTool())
        elif name == "failing":
            tools.append(FailingTool())
        elif name == "slow":
            tools.append(SlowTool(seconds=max(30.0, 10 * timeout_s)))
        else:
            raise ValueError(f"unknown tool {name!r}; available: {list(AVAILABLE_TOOLS)}")
    return ToolRegistry(tools, timeout_s=timeout_s, isolation=isolation, workers=workers)


def registry_from_config(cfg, corpora: Mapping[int, Sequence[str]]) -> ToolRegistry:
    """``build_registry`` with the settings of a ``ToolsConfig``; errors name the config key."""
    from ..config import ConfigError

    try:
        return build_registry(
            cfg.enabled,
            corpora,
            search_top_k=cfg.search_top_k,
            timeout_s=cfg.timeout_s,
            isolation=cfg.isolation,
            workers=cfg.workers,
        )
    except ValueError as exc:
        raise ConfigError(f"tools: {exc}") from exc


__all__ = [
    "AVAILABLE_TOOLS",
    "BM25Index",
    "CalculatorTool",
    "FailingTool",
    "INVALID_TOOL",
    "ParsedCall",
    "SIM_KINDS",
    "SlowTool",
    "TextSearchTool",
    "Tool",
    "ToolArgumentError",
    "ToolContext",
    "ISOLATION",
    "ToolOutcome",
    "ToolRegistry",
    "ToolResult",
    "WITNESS_KINDS",
    "WITNESS_MODES",
    "build_registry",
    "registry_from_config",
    "parse_tool_call",
]
