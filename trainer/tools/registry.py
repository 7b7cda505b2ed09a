"""The tool registry: ids, TAPO similarity kinds, parsing and guarded execution.

Execution never raises: a tool exception or a call that runs past ``timeout_s`` becomes an
error observation and the call is marked failed (tool id -1 for TAPO: never a witness,
never corrected). Calls of one batch run concurrently on daemon threads, so a hung tool
cannot block the trainer or its exit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tapo_kernels import encode_results, encode_text

from .base import SIM_KINDS, Tool, ToolContext, ToolResult
from .parser import ParsedCall, parse_tool_call

# how the trainer turns calls into TAPO parameter vectors (config key tapo.witness)
WITNESS_MODES = ("tool", "arguments", "neural")


@dataclass
class ToolOutcome:
    """The observation of one call and whether the call counts as valid."""

    observation: str
    ok: bool
    error: str | None = None
    seconds: float = 0.0
    refs: tuple[str, ...] = ()  # what the observation was built from (ToolResult.refs)


class ToolRegistry:
    """Tools by id (their order of registration) and name."""

    def __init__(self, tools: Sequence[Tool], timeout_s: float = 5.0) -> None:
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        self.tools = list(tools)
        self.by_name = {t.name: (i, t) for i, t in enumerate(self.tools)}
        self.timeout_s = timeout_s

    def __len__(self) -> int:
        return len(self.tools)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tools]

    def sim_kind_tensor(self, device: torch.device | str = "cpu") -> Tensor:
        """``(num_tools,) int64`` similarity kind of each tool id (``tool_sim_kind``)."""
        return torch.tensor([SIM_KINDS[t.sim_kind] for t in self.tools], dtype=torch.int64,
                            device=device)

    def parse(self, body: str, closed: bool = True) -> ParsedCall:
        return parse_tool_call(body, self.by_name, closed)

    def encode_calls(self, tool_ids: Sequence[int], param_texts: Sequence[str],
                     refs: Sequence[Sequence[str]], mode: str = "tool",
                     neural=None) -> Tensor:
        """``(N, D)`` float32 TAPO parameter vectors of ``N`` calls, encoded as one batch.

        ``mode="tool"``: each tool's declared ``witness`` (``arguments``: ``encode_text`` of
        its parameter text; ``results``: ``encode_results`` of the references it
        retrieved); ``"arguments"``: ``encode_text`` for every tool; ``"neural"``: the
        sentence encoder ``neural`` (a ``tapo_kernels.params.NeuralTextEncoder``) on the
        parameter text. Invalid calls (tool id < 0) get zero rows: they match nothing.
        """
        if mode not in WITNESS_MODES:
            raise ValueError(f"unknown witness mode {mode!r}; expected one of {WITNESS_MODES}")
        n = len(tool_ids)
        if not len(param_texts) == len(refs) == n:
            raise ValueError("tool_ids, param_texts and refs must have one entry per call")
        if mode == "neural":
            if neural is None:
                raise ValueError("witness mode 'neural' needs a NeuralTextEncoder")
            texts = [t if i >= 0 else "" for i, t in zip(tool_ids, param_texts, strict=True)]
            return neural(texts)
        by_results = [i >= 0 and mode == "tool" and self.tools[i].witness == "results"
                      for i in tool_ids]
        texts = [t if i >= 0 and not r else ""
                 for i, t, r in zip(tool_ids, param_texts, by_results, strict=True)]
        out = encode_text(texts)
        rows = [k for k, r in enumerate(by_results) if r]
        if rows:
            out[rows] = encode_results([refs[k] for k in rows], dim=out.shape[1])
        return out

    def execute(self, calls: Sequence[tuple[ParsedCall, ToolContext]]) -> list[ToolOutcome]:
        """Run the valid calls concurrently; each gets ``timeout_s`` from the common start."""
        outcomes: list[ToolOutcome | None] = [None] * len(calls)
        threads: list[tuple[int, threading.Thread, list]] = []
        start = time.perf_counter()
        for i, (call, context) in enumerate(calls):
            if not call.valid:
                outcomes[i] = ToolOutcome(f"error: {call.error}", ok=False, error=call.error)
                continue
            box: list = []
            tool = self.tools[call.tool_id]

            def target(tool=tool, call=call, context=context, box=box) -> None:
                try:
                    box.append(("ok", tool.run(call.arguments, context)))
                except Exception as exc:  # a tool bug must not stop training
                    box.append(("error", f"{type(exc).__name__}: {exc}"))

            thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
            thread.start()
            threads.append((i, thread, box))
        for i, thread, box in threads:
            thread.join(max(0.0, start + self.timeout_s - time.perf_counter()))
            elapsed = time.perf_counter() - start
            if not box:  # still running: abandon the daemon thread
                msg = f"tool '{calls[i][0].name}' timed out after {self.timeout_s:g} s"
                outcomes[i] = ToolOutcome(f"error: {msg}", ok=False, error=msg, seconds=elapsed)
                continue
            status, text = box[0]
            if status == "ok" and isinstance(text, ToolResult) and isinstance(text.text, str):
                outcomes[i] = ToolOutcome(text.text, ok=True, seconds=elapsed,
                                          refs=tuple(str(r) for r in text.refs))
            elif status == "ok" and isinstance(text, str):
                outcomes[i] = ToolOutcome(text, ok=True, seconds=elapsed)
            else:
                msg = text if status == "error" else f"tool returned {type(text).__name__}, not str"
                outcomes[i] = ToolOutcome(f"error: {msg}", ok=False, error=msg, seconds=elapsed)
        return [o for o in outcomes if o is not None]
