"""Tool calls in worker processes, so that a timeout really stops a call.

A Python thread cannot be stopped: a tool that hangs keeps its thread (and whatever it
holds) until the process exits. ``ToolWorkers`` runs calls in a few long-lived worker
processes (``worker_main`` in a fresh interpreter, each holding its own copy of the tools),
hands each call to the next free worker, and kills a worker whose call runs past the
timeout; a replacement starts when it is needed. Nothing of a killed call survives, and no thread is
left behind.

Protocol: the parent writes the pickled tool list (its own objects) as the first line,
base64-encoded; the worker answers ``ready`` once it has loaded them. Then one JSON request per line (``[tool index, arguments, corpus id, views]``);
the worker answers each with one JSON line ``[status, text, refs, image]`` (``image``: a
base64 PNG or null). Replies are JSON, so
nothing a tool returns is ever unpickled. A tool that prints writes to stderr, never into
the protocol. Tools must be importable by the worker (defined in a module, not in
``__main__``); otherwise use ``isolation="thread"``.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

# (status, observation text, references, PNG image or None); status: ok | error
Reply = tuple[str, str, tuple[str, ...], bytes | None]


def reply_of(result: Any) -> list:
    """``[status, text, refs, image]`` of what ``Tool.run`` returned (a ``ToolResult`` or
    text); the image is base64 text, so the reply is JSON."""
    from .base import ToolResult

    if isinstance(result, ToolResult) and isinstance(result.text, str):
        image = result.image
        if image is not None and not isinstance(image, bytes):
            return ["error", f"tool returned an image of type {type(image).__name__}", [], None]
        encoded = base64.b64encode(image).decode() if image is not None else None
        return ["ok", result.text, [str(r) for r in result.refs], encoded]
    if isinstance(result, str):
        return ["ok", result, [], None]
    return ["error", f"tool returned {type(result).__name__}, not str", [], None]


def decode_reply(reply: Sequence[Any]) -> Reply:
    """A reply of ``reply_of`` as typed values (the PNG bytes decoded from base64)."""
    status, text, refs, image = reply
    return (
        str(status),
        str(text),
        tuple(str(r) for r in refs),
        base64.b64decode(image) if image is not None else None,
    )


def worker_main() -> None:  # pragma: no cover - runs in the child process
    """The worker loop: read requests from stdin, answer on the original stdout."""
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # anything a tool prints goes to stderr
    from .base import ToolContext

    tools = pickle.loads(base64.b64decode(sys.stdin.readline()))
    protocol.write("ready\n")
    protocol.flush()
    for line in sys.stdin:
        try:
            tool_index, arguments, corpus_id, views = json.loads(line)
            context = ToolContext(corpus_id, tuple(tuple(v) for v in views))
            reply = reply_of(tools[tool_index].run(arguments, context))
        except Exception as exc:  # a tool bug must not stop training
            reply = ["error", f"{type(exc).__name__}: {exc}", [], None]
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


class _Worker:
    def __init__(self, payload: bytes) -> None:
        # the worker imports what this process can import (the tools' own modules included)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding `trainer`
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([root, *filter(None, sys.path)]))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from trainer.tools.workers import worker_main; worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        self.process.stdin.write(base64.b64encode(payload).decode() + "\n")
        self.process.stdin.flush()
        self.ready = False

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def stream(self):
        return self.process.stdout

    def send(self, request: Sequence[Any]) -> None:
        self.process.stdin.write(json.dumps(list(request)) + "\n")
        self.process.stdin.flush()

    def receive(self) -> Reply:
        line = self.process.stdout.readline()
        if not line:
            raise EOFError("the worker exited")
        return decode_reply(json.loads(line))

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass


class ToolWorkers:
    """A pool of ``size`` tool processes; ``run`` executes a batch of calls, each stopped
    ``timeout_s`` after it started on a worker (worker start-up time is not counted)."""

    STARTUP_S = 60.0  # longest wait for a new worker to load its tools

    def __init__(self, tools: Sequence[Any], size: int = 4) -> None:
        self._payload = pickle.dumps(list(tools))
        self._size = max(1, size)
        self._workers: list[_Worker] = []
        self.killed = 0  # workers killed at a deadline, over the pool's life

    def _ready_workers(self) -> list[_Worker]:
        """Start missing workers and wait until every worker has loaded its tools."""
        self._workers = [w for w in self._workers if w.alive]
        while len(self._workers) < self._size:
            self._workers.append(_Worker(self._payload))
        deadline = time.perf_counter() + self.STARTUP_S
        starting = {w.stream: w for w in self._workers if not w.ready}
        while starting and time.perf_counter() < deadline:
            for stream in wait(list(starting), timeout=deadline - time.perf_counter()):
                worker = starting.pop(stream)
                worker.ready = worker.process.stdout.readline().strip() == "ready"
                if not worker.ready:
                    worker.kill()
        for worker in starting.values():
            worker.kill()
        self._workers = [w for w in self._workers if w.ready and w.alive]
        return list(self._workers)

    def run(
        self, calls: Sequence[tuple[int, dict, int, Sequence]], timeout_s: float
    ) -> list[tuple[Reply | None, float]]:
        """``calls``: ``(tool index, arguments, corpus id, views)``. Returns per call its reply
        (``None`` if it ran past ``timeout_s``: its worker was killed) and its seconds."""
        out: list[tuple[Reply | None, float]] = [(None, 0.0)] * len(calls)
        if not calls:
            return out
        pending = deque(range(len(calls)))
        busy: dict[Any, tuple[_Worker, int, float]] = {}  # stream -> (worker, call, started)
        idle = self._ready_workers()
        restarts = 0
        while pending or busy:
            while pending and idle:
                worker, i = idle.pop(), pending.popleft()
                try:
                    worker.send(calls[i])
                    busy[worker.stream] = (worker, i, time.perf_counter())
                except TypeError as exc:  # arguments that are not JSON
                    out[i] = (("error", f"arguments are not JSON: {exc}", (), None), 0.0)
                    idle.append(worker)
                except (OSError, ValueError):  # a worker that died between batches
                    pending.appendleft(i)
                    worker.kill()
            if not busy:
                if pending and restarts < 2:  # every worker died: start new ones for the rest
                    restarts += 1
                    idle = self._ready_workers()
                    continue
                for i in pending:
                    out[i] = (("error", "no tool worker process could be started", (), None), 0.0)
                break
            now = time.perf_counter()
            first_deadline = min(started for _, _, started in busy.values()) + timeout_s
            for stream in wait(list(busy), timeout=max(0.0, first_deadline - now)):
                worker, i, started = busy.pop(stream)
                try:
                    out[i] = (worker.receive(), time.perf_counter() - started)
                    idle.append(worker)
                except (EOFError, OSError, ValueError):  # the worker died on this call
                    out[i] = (
                        ("error", "the tool's worker process died", (), None),
                        time.perf_counter() - started,
                    )
                    worker.kill()
            now = time.perf_counter()
            for stream, (worker, i, started) in list(busy.items()):
                if now - started >= timeout_s:  # past its deadline: stop the call for real
                    del busy[stream]
                    out[i] = (None, now - started)
                    worker.kill()
                    self.killed += 1
            if pending and not idle and not busy:
                idle = self._ready_workers()  # replace the killed workers for the rest
        self._workers = [w for w in self._workers if w.alive]
        return out

    def close(self) -> None:
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass
