"""The tool registry: ids, TAPO similarity kinds, parsing and guarded execution.

Execution never raises: a tool exception or a call that runs past ``timeout_s`` becomes an
error observation and the call is marked failed (tool id -1 for TAPO: never a witness,
never corrected). Calls of one batch run concurrently in worker processes
(``workers.py``); a call past the deadline is killed with its worker, so a hung tool can
block neither the trainer nor its exit, and leaves nothing running.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import SIM_KINDS, Tool, ToolContext
from .parser import ParsedCall, parse_tool_call
from .workers import ToolWorkers, decode_reply, reply_of

# how the trainer turns calls into TAPO parameter vectors (config key tapo.witness)
WITNESS_MODES = ("tool", "arguments", "neural")
ISOLATION = ("process", "thread")  # where tool calls run (config key tools.isolation)


@dataclass
class ToolOutcome:
    """The observation of one call and whether the call counts as valid."""

    observation: str
    ok: bool
    error: str | None = None
    seconds: float = 0.0
    refs: tuple[str, ...] = ()  # what the observation was built from (ToolResult.refs)
    image: bytes | None = None  # an image observation (PNG), e.g. a zoomed region


def box_of_refs(refs: Sequence[str]) -> tuple[float, float, float, float]:
    """The box ``(x1, y1, x2, y2)`` a region tool reports as its first reference."""
    if not refs:
        raise ValueError("a region tool's call has no box reference")
    parts = [float(v) for v in str(refs[0]).split(",")]
    if len(parts) != 4:
        raise ValueError(f"a box reference has 4 numbers, got {refs[0]!r}")
    return parts[0], parts[1], parts[2], parts[3]


class ToolRegistry:
    """Tools by id (their order of registration) and name."""

    def __init__(
        self,
        tools: Sequence[Tool],
        timeout_s: float = 5.0,
        isolation: str = "process",
        workers: int = 2,
    ) -> None:
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        if isolation not in ISOLATION:
            raise ValueError(f"isolation must be one of {ISOLATION}, got {isolation!r}")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s}")
        self.tools = list(tools)
        self.by_name = {t.name: (i, t) for i, t in enumerate(self.tools)}
        self.timeout_s = timeout_s
        self.isolation = isolation
        self.workers = workers
        self._workers: ToolWorkers | None = None

    def __len__(self) -> int:
        return len(self.tools)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tools]

    def schemas(self) -> list[dict]:
        """Each tool's function schema (``Tool.schema``), in id order: what a chat template's
        ``tools`` argument takes."""
        return [t.schema() for t in self.tools]

    def sim_kind_tensor(self, device: torch.device | str = "cpu") -> Tensor:
        """``(num_tools,) int64`` similarity kind of each tool id (``tool_sim_kind``)."""
        return torch.tensor(
            [SIM_KINDS[t.sim_kind] for t in self.tools], dtype=torch.int64, device=device
        )

    def parse(self, body: str, closed: bool = True) -> ParsedCall:
        return parse_tool_call(body, self.by_name, closed)

    def encode_calls(
        self,
        tool_ids: Sequence[int],
        param_texts: Sequence[str],
        refs: Sequence[Sequence[str]],
        mode: str = "tool",
        neural=None,
    ) -> Tensor:
        """``(N, D)`` float32 TAPO parameter vectors of ``N`` calls, encoded as one batch.

        ``mode="tool"``: each tool's declared ``witness`` (``arguments``: ``encode_text`` of
        its parameter text; ``results``: ``encode_results`` of the references it
        retrieved); ``"arguments"``: ``encode_text`` for every tool; ``"neural"``: the
        sentence encoder ``neural`` (a ``tapo_kernels.params.NeuralTextEncoder``) on the
        parameter text. Tools compared by IoU (``sim_kind = "iou"``, e.g. ``zoom_in``) get
        ``encode_box`` of the region in their first reference ``"x1,y1,x2,y2"`` in every mode.
        Invalid calls (tool id < 0) get zero rows: they match nothing.
        """
        from tapo_kernels import encode_box, encode_results, encode_text
        from tapo_kernels.params import TEXT_DIM

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
        boxes = [i >= 0 and self.tools[i].sim_kind == "iou" for i in tool_ids]
        by_results = [
            i >= 0 and not box and mode == "tool" and self.tools[i].witness == "results"
            for i, box in zip(tool_ids, boxes, strict=True)
        ]
        out = torch.zeros(n, TEXT_DIM, dtype=torch.float32)
        box_rows = [k for k, box in enumerate(boxes) if box]
        if box_rows:
            out[box_rows] = encode_box([box_of_refs(refs[k]) for k in box_rows], dim=TEXT_DIM)
        text_rows = [
            k
            for k, (i, r, box) in enumerate(zip(tool_ids, by_results, boxes, strict=True))
            if i >= 0 and not r and not box
        ]
        if text_rows:
            out[text_rows] = encode_text([param_texts[k] for k in text_rows])
        result_rows = [k for k, r in enumerate(by_results) if r]
        if result_rows:
            out[result_rows] = encode_results([refs[k] for k in result_rows], dim=TEXT_DIM)
        return out

    def execute(self, calls: Sequence[tuple[ParsedCall, ToolContext]]) -> list[ToolOutcome]:
        """Run the valid calls concurrently, each for at most ``timeout_s``.

        With ``isolation="process"`` (the default) calls run in worker processes, each
        stopped ``timeout_s`` after it started (its worker is killed); with ``"thread"`` they
        run on daemon threads from a common start, and a hung call is abandoned (its thread
        lives on until the process exits).
        """
        outcomes: list[ToolOutcome | None] = [None] * len(calls)
        start = time.perf_counter()
        jobs = []
        for i, (call, context) in enumerate(calls):
            if not call.valid:
                outcomes[i] = ToolOutcome(f"error: {call.error}", ok=False, error=call.error)
            else:
                jobs.append((i, call, context))
        if self.isolation == "process":
            if self._workers is None:
                self._workers = ToolWorkers(self.tools, self.workers)
            replies = self._workers.run(
                [(c.tool_id, c.arguments, ctx.corpus_id, ctx.views) for _, c, ctx in jobs],
                self.timeout_s,
            )
        else:
            replies = self._run_threads([(c, ctx) for _, c, ctx in jobs], start)
        for (i, call, _), (reply, elapsed) in zip(jobs, replies, strict=True):
            if reply is None:
                msg = f"tool '{call.name}' timed out after {self.timeout_s:g} s"
                outcomes[i] = ToolOutcome(f"error: {msg}", ok=False, error=msg, seconds=elapsed)
                continue
            status, text, refs, image = reply
            if status == "ok":
                outcomes[i] = ToolOutcome(text, ok=True, seconds=elapsed, refs=refs, image=image)
            else:
                outcomes[i] = ToolOutcome(f"error: {text}", ok=False, error=text, seconds=elapsed)
        return [o for o in outcomes if o is not None]

    def _run_threads(
        self, jobs: Sequence[tuple[ParsedCall, ToolContext]], start: float
    ) -> list[tuple[tuple[str, str, tuple[str, ...], bytes | None] | None, float]]:
        boxes: list[list] = []
        threads = []
        for call, context in jobs:
            box: list = []
            tool = self.tools[call.tool_id]

            def target(tool=tool, call=call, context=context, box=box) -> None:
                try:
                    box.append(decode_reply(reply_of(tool.run(call.arguments, context))))
                except Exception as exc:  # a tool bug must not stop training
                    box.append(("error", f"{type(exc).__name__}: {exc}", (), None))

            thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
            thread.start()
            threads.append(thread)
            boxes.append(box)
        out = []
        for thread, box in zip(threads, boxes, strict=True):
            thread.join(max(0.0, start + self.timeout_s - time.perf_counter()))
            out.append((box[0] if box else None, time.perf_counter() - start))
        return out

    def close(self) -> None:
        """Stop the worker processes (they also stop with this process)."""
        if self._workers is not None:
            self._workers.close()
            self._workers = None
