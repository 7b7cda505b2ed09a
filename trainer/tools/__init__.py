"""Tools the agent can call: registry, parser, BM25 search, calculator, region zoom-in and
image search (the visual task), fault injectors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .base import SIM_KINDS, WITNESS_KINDS, Tool, ToolArgumentError, ToolContext, ToolResult
from .calculator import CalculatorTool
from .faults import FailingTool, SlowTool
from .parser import INVALID_TOOL, ParsedCall, parse_tool_call
from .registry import ISOLATION, WITNESS_MODES, ToolOutcome, ToolRegistry
from .text_search import BM25Index, TextSearchTool

AVAILABLE_TOOLS = ("search", "calculator", "zoom_in", "image_search", "failing", "slow")
VISION_TOOLS = ("zoom_in", "image_search")  # need the visual task's scenes


def build_registry(
    enabled: Sequence[str],
    corpora: Mapping[int, Sequence[str]],
    *,
    search_top_k: int = 1,
    timeout_s: float = 5.0,
    isolation: str = "process",
    workers: int = 2,
    scenes=None,
    max_pixels: int = 84 * 84,
) -> ToolRegistry:
    """A registry with the named tools, in the given order (their ids). ``scenes``: the
    visual task's ``SceneBook`` (needed by ``zoom_in`` and ``image_search``)."""
    tools: list[Tool] = []
    for name in enabled:
        if name in VISION_TOOLS:
            if scenes is None:
                raise ValueError(f"the tool {name!r} needs the visual task (task.name=visual)")
            from .vision import ImageSearchTool, ZoomInTool

            cls = ZoomInTool if name == "zoom_in" else ImageSearchTool
            tools.append(cls(scenes, max_pixels=max_pixels))
        elif name == "search":
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


def registry_from_config(
    cfg, corpora: Mapping[int, Sequence[str]], scenes=None, max_pixels: int = 84 * 84
) -> ToolRegistry:
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
            scenes=scenes,
            max_pixels=max_pixels,
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
    "VISION_TOOLS",
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
