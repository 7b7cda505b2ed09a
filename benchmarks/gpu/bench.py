"""Every benchmark case on one GPU, its providers side by side in ONE process.

Run from the repository root::

    python -m benchmarks.gpu.bench --out DIR [--quick] [--only SECTION ...]
                                   [--budget SECONDS] [--compile | --no-compile]

It writes ``DIR/ratios-<slug>.json`` (the format of ``benchmarks/conftest.py``: ``{"device",
"cases": {case: {"environment", "median_seconds": {provider: s}, "info", "errors"}}}``; the
``info`` key holds per-provider peak memory, GB/s, Mtokens/s and TFLOP/s, the computed floors
and the targets with whether they were met; ``render.py`` ignores it) and ``DIR/<slug>.md``
(the ``render.py`` table, then the targets and errors), where ``<slug>`` is the device name,
e.g. ``nvidia-h200``. Both are rewritten after every case, so a timeout keeps what was
measured. A failing provider is recorded in the case's ``errors`` and the run goes on. With
``--only`` the cases of earlier runs in ``DIR`` are kept (merged as ``conftest.py`` does).

Timing: one untimed warm-up call (compilation, autotuning), then
``triton.testing.do_bench(..., return_mode="median")`` (L2 flushed between calls); steps over
20 ms, and steps that overwrite their input (``op_inplace``, Liger's in-place backward: their
input is restored untimed before each call), are timed call by call with CUDA events
(median). Host-side providers (the encoders) use ``time.perf_counter``. Peak memory is the
growth of the CUDA allocator's peak over one step (as ``bench_logprob_loss.measure_peak_here``).
Without CUDA the script runs the ``--quick`` shapes on the CPU (``perf_counter`` medians,
``torch.compile`` providers skipped unless ``--compile``): a dry run of the plumbing.

Sections (``--only`` names), providers, floors and targets (``op`` is ``op[triton]`` on CUDA):

``fused_correct``: ``tapo::fused_correct`` at B=512 T=8192 N=4096 D=256 and B=64 T=1024
    N=512 D=256, scope group and batch. Providers ``op``, ``reference``
    (``_library.fused_correct_reference_kernel``), ``reference_compile``, ``floor`` =
    ``advantages.clone()`` (measured once per size, in group scope). Target: op <= 2x floor.
``policy_loss``: ``tapo::policy_loss`` at 1M tokens (B=512, T=2048) and 64k (B=64, T=1024),
    modes fwd and full (fwd + autograd backward). Providers ``op``, ``reference``,
    ``reference_compile``, ``floor`` (``bench_policy_loss``: read every input once, write a
    (B, T) gradient). Computed ``bandwidth_floor_s`` in info: the inputs' bytes (plus the
    gradient's in full) / 4.3 TB/s. Target: full <= 1.5x floor.
``logits``: ``policy_loss_from_logits`` at B=8 T=1024 V=151936 bf16, fwd and full. Providers
    ``op``, ``op_inplace`` (full), ``reference``, ``reference_compile``, ``liger``
    (``triton_grpo_loss`` as ``bench_logprob_loss._liger_logits_loss`` calls it, but on
    logits padded to T + 1 once outside the timing), ``trl`` (TRL's
    ``selective_log_softmax`` then ``reference.policy_loss``), and ``floor[bw]``: COMPUTED,
    not measured: bytes / 4.3 TB/s with one read of the logits (fwd), or two reads plus one
    gradient write (full). Targets: fwd <= 0.80 ms; full <= 1.3x floor[bw].
``hidden``: ``policy_loss_from_hidden`` at M=8192 (B=8, T=1024) H=4096 V=131072 bf16, fwd and
    full. Providers ``op``, ``reference`` (eager, materialises fp32 logits),
    ``reference_compile``, ``liger`` (``LigerFusedLinearGRPOLoss``), and ``floor[flops]``:
    COMPUTED GEMM time at 790 TFLOP/s, 2*M*H*V FLOP per GEMM: fwd 1 GEMM (logits), full 3
    GEMMs (logits, d hidden, d weight: the minimum; an implementation that recomputes the
    logits in the backward, as the op does, runs 4, also in info). Targets: full <= 65 ms
    (stretch 50 ms), peak extra memory <= 1.5 GiB.
``overhead``: TAPO's whole path against a policy update of a Qwen2-0.5B-class model (hidden
    896, 24 layers, vocabulary 151936, tied embeddings, bf16, SDPA, fused AdamW; FSDP2
    ``fully_shard`` on a one-process group when it works) on a 64 x 1024 batch in micro-batches
    of 16 rows, the loss ``tapo_kernels.policy_loss_from_hidden`` on the final hidden states
    and the (tied) LM head. Providers ``train_step`` (the policy update only: rollout
    generation excluded, which can only lower the share), ``encode`` (``encode_text`` of the
    256 calls' queries), ``encode[results]`` (``encode_results`` of what they retrieved),
    ``fused_correct[4 calls]`` (``tapo_kernels.fused_correct``, 4 calls per trajectory),
    ``call_map``, ``loss+lift`` / ``loss`` (``policy_loss`` fwd+bwd with and without the
    lift), and COMPUTED ``tapo[whole path]`` = max(encode, encode[results]) + fused_correct +
    call_map + max(0, loss+lift - loss). Target: tapo[whole path] <= 0.05% of train_step.

The providers that compile (``reference_compile``, and Liger's hidden-state loss, which
``torch.compile``s its chunks) run after all sections, the published shapes first, each only
while the ``--budget`` left (default 210 s from the start of ``main``) covers the slowest
compile seen so far (at least 25 s); the others are recorded in ``info["skipped"]``.
Everything else runs first, so the targets are always measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch

import tapo_kernels
from tapo_kernels import _library, reference

from .. import bench_logprob_loss as blp
from ..bench_fused_correct import make_batch
from ..bench_policy_loss import _callables as policy_loss_callables
from ..bench_policy_loss import _inputs as policy_loss_inputs
from ..common import DEVICE, device_name, environment, sync
from ..render import load, render

CUDA = DEVICE == "cuda"
BANDWIDTH = 4.3e12  # bytes/s: measured H200 copy bandwidth (the bandwidth floors)
GEMM_FLOPS = 790e12  # FLOP/s: achievable dense bf16 GEMM rate on an H200 (the FLOP floor)
SLOW_S = 0.020  # steps slower than this are timed call by call with events
SECTIONS = ("fused_correct", "policy_loss", "logits", "hidden", "overhead")
COMPILE_S = 25  # a pessimistic cold torch.compile of one case (forward + backward graphs)

# full shapes, then the --quick ones (8-64x fewer elements); the CPU always runs --quick
FUSED_SIZES = {
    False: [(512, 8192, 4096, 256), (64, 1024, 512, 256)],
    True: [(64, 1024, 512, 256), (16, 256, 64, 256)],
}
LOSS_SIZES = {False: [(512, 2048), (64, 1024)], True: [(64, 256), (8, 512)]}
LOGITS_SIZE = {False: (8, 1024, 151936), True: (4, 256, 18992)}
HIDDEN_SIZE = {False: (8, 1024, 4096, 131072), True: (2, 256, 256, 16384)}
# Qwen2Config sizes of the overhead section's policy: (hidden, MLP, layers, heads, KV heads, vocab)
QWEN_KEYS = (
    "hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
    "vocab_size"
).split()
QWEN_05B = dict(zip(QWEN_KEYS, (896, 4864, 24, 14, 2, 151936), strict=True))
QWEN_TINY = dict(zip(QWEN_KEYS, (128, 512, 2, 2, 1, 151936 // 16), strict=True))
# the rest of the policy's config (also recorded in the case's info)
POLICY_CONFIG = dict(tie_word_embeddings=True, attn_implementation="sdpa")
# (B, T, micro-batch rows): the RL batch of the overhead section
OVERHEAD_BATCH = {False: (64, 1024, 16), True: (8, 128, 4)}
CALLS_PER_ROW, GROUP = 4, 8
# policy_loss_from_logits by mode: (the logits' bytes moved, in logits sizes; what that is)
LOGITS_TRAFFIC = {
    "fwd": (1, "logits read once"),
    "full": (3, "logits read twice + gradient written once"),
}
# what a provider's step does -> (its rate in the provider's info, unit, decimals)
RATES = {
    "bytes_moved": ("GBps", 1e9, 2),
    "tokens": ("Mtokens_per_s", 1e6, 3),
    "flops": ("TFLOPs", 1e12, 2),
}


# --------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------


def _event_seconds(fn: Callable, reset: Callable | None) -> float:
    """One call timed with CUDA events (``reset`` runs before, untimed)."""
    if reset is not None:
        reset()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _wall_median(
    fn: Callable, reset: Callable | None, budget_s: float, min_runs: int = 3, max_runs: int = 200
) -> float:
    """Median of ``perf_counter`` timings: at least ``min_runs``, then until ``budget_s``."""
    times: list[float] = []
    while len(times) < min_runs or (sum(times) < budget_s and len(times) < max_runs):
        if reset is not None:
            reset()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _peak_mib(fn: Callable, reset: Callable | None) -> float | None:
    """Peak memory growth of one call (CUDA allocator; on the CPU the peak RSS, if readable)."""
    if reset is not None:
        reset()
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / 2**20
    try:
        before = blp._rss_field("VmRSS:")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        out = fn()
        peak = blp._rss_field("VmHWM:") - before
        del out
        return peak
    except OSError:
        return None


def _free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _op_name(op: str, prefix: str = "op") -> str:
    return f"{prefix}[{'triton' if CUDA else tapo_kernels.CPU_BACKEND[op]}]"


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines() if out.returncode == 0 else []
    return lines[0] if lines else None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --------------------------------------------------------------------------------------
# cases and the runner
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    section: str
    floor: str | None = None  # the provider the progress lines divide by
    times: dict[str, float] = field(default_factory=dict)  # median seconds, by provider
    providers: dict[str, dict] = field(default_factory=dict)  # per-provider info
    info: dict = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    targets: list[dict] = field(default_factory=list)

    def ratio(self, provider: str, base: str) -> float | None:
        t, b = self.times.get(provider), self.times.get(base)
        return t / b if t is not None and b else None

    def to_json(self, env: dict) -> dict:
        info = {
            "section": self.section,
            **self.info,
            "providers": self.providers,
            "targets": self.targets,
        }
        if self.skipped:
            info["skipped"] = self.skipped
        out = {"environment": env, "median_seconds": dict(self.times), "info": info}
        if self.errors:
            out["errors"] = self.errors
        return out


class Runner:
    def __init__(
        self, out_dir: Path, quick: bool, budget_s: float, compile_: bool, merge: bool
    ) -> None:
        self.t0 = time.perf_counter()
        self.out_dir, self.quick, self.budget_s = out_dir, quick, budget_s
        self.compile, self.merge = compile_, merge
        self.rep_ms, self.warmup_ms = (50, 10) if quick else (150, 25)
        self.host_s = 0.2 if quick else 0.3  # perf_counter budget per provider
        self.env = {**environment(), "driver": _driver(), "cuda": torch.version.cuda}
        self.device = device_name()
        self.cases: dict[str, Case] = {}
        self.deferred: list[tuple[int, int, Case, str, dict]] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = out_dir / f"ratios-{slug(self.device)}.json"
        self.md_path = out_dir / f"{slug(self.device)}.md"

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def case(self, name: str, section: str, floor: str | None = None, **info) -> Case:
        case = Case(name, section, floor, info=dict(info))
        self.cases[name] = case
        self.log(f"{name}")
        return case

    # --- providers ---------------------------------------------------------------------

    def measure(self, fn: Callable, reset: Callable | None, host: bool) -> tuple[float, str]:
        if not CUDA or host:
            return _wall_median(fn, reset, self.host_s, min_runs=5 if host else 3), "perf_counter"
        first = _event_seconds(fn, reset)
        if reset is not None or first > SLOW_S:
            if first > SLOW_S:
                n = 3 if first > 0.25 else 5
            else:
                n = int(min(30, max(5, self.rep_ms / 1e3 / first)))
            runs = [first] + [_event_seconds(fn, reset) for _ in range(n - 1)]
            return statistics.median(runs), f"events x{n}"
        from triton.testing import do_bench

        ms = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        return ms / 1e3, "do_bench"

    def provider(
        self,
        case: Case,
        name: str,
        fn: Callable | None = None,
        *,
        make: Callable | None = None,
        host: bool = False,
        peak: bool = True,
        warm: bool = False,
        **work: float | None,
    ) -> float | None:
        """Warm up, time and measure one provider; a failure is recorded, never raised.

        ``make()`` (run inside the guard) returns the step, or ``(step, reset)`` where
        ``reset`` restores an input that the step overwrites (run untimed before each call).
        ``warm``: the step has run already (no warm-up call). ``work``: what one step does,
        by the keys of ``RATES`` (``bytes_moved``, ``tokens``, ``flops``), for its rates.
        """
        if set(work) - set(RATES):
            raise TypeError(f"unknown work {sorted(set(work) - set(RATES))}")
        t_start = time.perf_counter()
        reset = None
        failed = False
        try:
            if make is not None:
                made = make()
                fn, reset = made if isinstance(made, tuple) else (made, None)
            if not warm:
                if reset is not None:
                    reset()
                fn()  # warm-up: compilation, autotuning
                sync()
            warm_s = time.perf_counter() - t_start
            secs, method = self.measure(fn, reset, host)
            peak_mib = _peak_mib(fn, reset) if peak else None
        except Exception as err:  # noqa: BLE001 - one provider never stops the run
            msg = f"{type(err).__name__}: {err}".strip()
            case.errors[name] = msg[:2000]
            tb = traceback.format_exc(limit=-3).strip().splitlines()
            self.log(f"  {name:<24} ERROR {msg.splitlines()[0][:160] if msg else ''}")
            print("      " + "\n      ".join(tb[-6:]), flush=True)
            failed = True
        fn = reset = None  # drop the step (and what it holds) before freeing memory
        if failed:
            _free()
            return None
        case.times[name] = secs
        info: dict = {"timing": method, "warmup_s": round(warm_s, 3)}
        if peak_mib is not None:
            info["peak_mib"] = round(peak_mib, 2)
        for key, (rate, scale, digits) in RATES.items():
            if work.get(key):
                info[rate] = round(work[key] / secs / scale, digits)
        for key, ratio in (
            ("bandwidth_floor_s", "x_bandwidth_floor"),
            ("flop_floor_s", "x_flop_floor"),
        ):
            if case.info.get(key):
                info[ratio] = round(secs / case.info[key], 3)
        case.providers[name] = info
        extra = []
        if case.floor and name != case.floor and case.times.get(case.floor):
            extra.append(f"{secs / case.times[case.floor]:.2f}x {case.floor}")
        for key, unit in (("GBps", "GB/s"), ("TFLOPs", "TFLOP/s"), ("peak_mib", "MiB peak")):
            if key in info:
                extra.append(f"{info[key]:.1f} {unit}")
        self.log(
            f"  {name:<24} {secs * 1e3:10.3f} ms  {'; '.join(extra)}"
            f"  [{method}, warm-up {warm_s:.1f}s]"
        )
        return secs

    def computed(self, case: Case, name: str, seconds: float, **info) -> None:
        """A pseudo-provider computed from a model (a floor, a sum), not measured."""
        case.times[name] = seconds
        case.providers[name] = {"computed": True, **info}
        self.log(f"  {name:<24} {seconds * 1e3:10.3f} ms  (computed)")

    def run_plan(self, case: Case, plan: list[Step], **work: float) -> None:
        """The providers of ``plan`` in order, each measured now or deferred."""
        for step in plan:
            if step.needs_cuda and _needs_cuda(self, case, step.name, step.needs_cuda):
                continue
            if step.priority is None:
                self.provider(case, step.name, make=step.make, **work)
            else:
                self.defer(case, step.name, step.priority, make=step.make, **work)

    def skip(self, case: Case, name: str, reason: str) -> None:
        case.skipped[name] = reason
        self.log(f"  {name:<24} skipped: {reason}")

    def defer(self, case: Case, name: str, priority: int, **kwargs) -> None:
        """A provider that compiles (``reference_compile``, Liger's compiled chunked loss):
        run after every section, in ``priority`` order, while the time budget lasts."""
        if not self.compile:
            self.skip(case, name, "torch.compile providers off (CPU dry run or --no-compile)")
            return
        self.deferred.append((priority, len(self.deferred), case, name, kwargs))
        self.log(f"  {name:<24} deferred (compiles; priority {priority})")

    def run_deferred(self) -> None:
        """The deferred providers, each while the budget left covers the slowest warm-up
        (compile) seen so far, and at least ``COMPILE_S``."""
        need = COMPILE_S
        for _, _, case, name, kwargs in sorted(self.deferred, key=lambda d: d[:2]):
            left = self.budget_s - self.elapsed()
            if left < need:
                self.skip(
                    case,
                    name,
                    f"time budget: {left:.0f}s of {self.budget_s:.0f}s left, "
                    f"a compile may take {need:.0f}s",
                )
            else:
                self.log(f"{case.name}")
                self.provider(case, name, **kwargs)
                need = max(need, case.providers.get(name, {}).get("warmup_s", 0.0))
            self.save()
        self.deferred.clear()
        _free()

    def target(
        self, case: Case, what: str, value: float | None, limit: float, unit: str = ""
    ) -> None:
        met = None if value is None else bool(value <= limit)
        case.targets.append(
            {
                "target": f"{what} <= {limit:g}{unit}",
                "value": None if value is None else round(value, 6),
                "limit": limit,
                "met": met,
            }
        )

    # --- output ------------------------------------------------------------------------

    def save(self) -> None:
        """Write the JSON (merged with earlier cases when ``--only`` is given) and Markdown."""
        cases = {}
        if self.merge and self.json_path.exists():
            try:
                cases = json.loads(self.json_path.read_text()).get("cases", {})
            except (json.JSONDecodeError, AttributeError):
                cases = {}
        for name, case in self.cases.items():
            cases[name] = case.to_json(self.env)
        data = {"device": self.device, "cases": dict(sorted(cases.items()))}
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(self.json_path)
        self.md_path.write_text(self.markdown(data))

    def markdown(self, data: dict) -> str:
        lines = [
            f"# Benchmarks on {data['device']}",
            "",
            f"`python -m benchmarks.gpu.bench{' --quick' if self.quick else ''}`: every "
            "case's providers side by side in one process (medians). `floor` is measured "
            "(a copy / one pass over the inputs); `floor[bw]` (bytes / 4.3 TB/s) and "
            "`floor[flops]` (GEMM FLOP / 790 TFLOP/s) are computed, as is "
            "`tapo[whole path]`. Driver "
            f"{self.env.get('driver')}, CUDA {self.env.get('cuda')}, "
            f"Python {self.env.get('python')}.",
            "",
            render(*load(self.json_path)),
            "",
            "## Targets",
            "",
        ]
        for name, case in data["cases"].items():
            for t in case.get("info", {}).get("targets", []):
                mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
                lines.append(f"- {mark}: {name}: {t['target']} (value {t['value']})")
        errors = [
            (n, p, m) for n, c in data["cases"].items() for p, m in c.get("errors", {}).items()
        ]
        if errors:
            lines += ["", "## Errors", ""]
            lines += [f"- {n} / {p}: {m.splitlines()[0][:300] if m else ''}" for n, p, m in errors]
        return "\n".join(lines) + "\n"

    def summary(self) -> None:
        print("\n" + "=" * 100, flush=True)
        if not self.json_path.exists():
            print("nothing measured")
            return
        print(render(*load(self.json_path)))
        note = "" if CUDA and not self.quick else " (full-shape H200 targets: indicative only)"
        print(f"\ntargets{note}:")
        for name, case in self.cases.items():
            for t in case.targets:
                mark = {True: "met   ", False: "MISSED", None: "n/a   "}[t["met"]]
                print(f"  {mark} {name}: {t['target']} (value {t['value']})")
            for p, m in case.errors.items():
                print(f"  ERROR  {name} / {p}: {m.splitlines()[0][:160] if m else ''}")
        print(f"\nwritten {self.json_path} and {self.md_path} in {self.elapsed():.1f}s", flush=True)


# --------------------------------------------------------------------------------------
# 1. fused_correct
# --------------------------------------------------------------------------------------


def section_fused_correct(r: Runner) -> None:
    op = _op_name("fused_correct")
    kernels = {
        op: torch.ops.tapo.fused_correct,
        "reference": _library.fused_correct_reference_kernel,
    }
    for i, (B, T, N, D) in enumerate(FUSED_SIZES[r.quick]):
        args = make_batch(B, T, N, D)
        rewrite = 2 * _nbytes(args[0])  # read and write the (B, T) advantages once
        compiled = torch.compile(reference.fused_correct, dynamic=False)  # compiles when run
        floor_s = None
        for scope in ("group", "batch"):
            name = f"fused_correct B={B} T={T} N={N} D={D} scope={scope}"
            info = dict(B=B, T=T, N=N, D=D, scope=scope, rewrite_bytes=rewrite)
            case = r.case(name, "fused_correct", "floor", **info)
            knobs = (0.7, 0.3, 0.8, scope == "batch")
            if floor_s is None:
                floor_s = r.provider(case, "floor", args[0].clone, bytes_moved=rewrite)
            else:  # the floor does not depend on the scope
                case.times["floor"] = floor_s
                case.providers["floor"] = {"note": "measured once, in scope=group"}
            for provider, fn in kernels.items():
                r.provider(case, provider, partial(fn, *args, *knobs), bytes_moved=rewrite)
            priority = 40 + 20 * i + (scope == "batch")
            step = partial(compiled, *args, *knobs)
            r.defer(case, "reference_compile", priority, fn=step, bytes_moved=rewrite)
            r.target(case, f"{op} / floor", case.ratio(op, "floor"), 2.0, "x")
            r.save()
        del args, compiled
        _free()


# --------------------------------------------------------------------------------------
# 2. policy_loss
# --------------------------------------------------------------------------------------


def section_policy_loss(r: Runner) -> None:
    op = _op_name("policy_loss")
    for i, (B, T) in enumerate(LOSS_SIZES[r.quick]):
        args = policy_loss_inputs(B, T)
        tokens = B * T
        inputs_bytes = _nbytes(*args)
        # reference_compile: one compiled function for both modes (compiles when run)
        steps = {
            p: policy_loss_callables(p, args)
            for p in ("op", "reference", "floor", "reference_compile")
        }
        for mode in ("fwd", "full"):
            k = 0 if mode == "fwd" else 2  # _callables returns (fwd, bwd, full)
            moved = inputs_bytes + (_nbytes(args[0]) if mode == "full" else 0)
            name = f"policy_loss {mode} B={B} T={T} ({tokens // 1024}k tokens)"
            info = dict(
                B=B, T=T, mode=mode, tokens=tokens, bytes=moved, bandwidth_floor_s=moved / BANDWIDTH
            )
            written = " + the (B, T) gradient written once" if mode == "full" else ""
            note = f"computed: every input read once{written} at 4.3 TB/s"
            case = r.case(name, "policy_loss", "floor", **info, bandwidth_floor_note=note)
            work = dict(bytes_moved=moved, tokens=tokens)
            for provider, p in (("floor", "floor"), (op, "op"), ("reference", "reference")):
                r.provider(case, provider, steps[p][k], **work)
            priority = 30 + 20 * i + (mode == "full")
            step = steps["reference_compile"][k]
            r.defer(case, "reference_compile", priority, fn=step, **work)
            if mode == "full":
                r.target(case, f"{op} full / floor", case.ratio(op, "floor"), 1.5, "x")
            r.save()
        del args, steps
        _free()


# --------------------------------------------------------------------------------------
# 3. policy_loss_from_logits
# --------------------------------------------------------------------------------------


def _logits_inputs(B: int, T: int, V: int) -> dict[str, torch.Tensor]:
    """``bench_logprob_loss.logits_inputs``; on CUDA the logits (same distribution) are drawn
    on the device: drawing 1.2e9 normals on the CPU takes seconds of the device budget."""
    if not CUDA:
        return blp.logits_inputs(B, T, V)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    logits = torch.randn(B, T, V, generator=gen, device=DEVICE, dtype=blp.DTYPE).mul_(3)
    return dict(logits=logits, **blp._loss_inputs(B, T, V))


def _blp_step(kind: str, provider: str, inp: dict, backward: bool):
    """A ``bench_logprob_loss`` step as ``(fn, reset)`` (reset only for ``op_inplace``)."""
    step = (blp.logits_step if kind == "logits" else blp.hidden_step)(provider, inp)
    return partial(step, backward), (step.reset if provider == "op_inplace" else None)


def _blp_makers(kind: str, inp: dict, backward: bool) -> Callable[[str], Callable]:
    """``make(provider)``: the ``Runner.provider`` ``make`` of a ``_blp_step``."""
    return lambda provider: partial(_blp_step, kind, provider, inp, backward)


class Step(NamedTuple):
    """One provider of ``Runner.run_plan``: measured now, or deferred (it compiles) with
    ``priority``; ``needs_cuda``: a module skipped off CUDA (``_needs_cuda``)."""

    name: str
    make: Callable  # as ``Runner.provider``'s: the step, or (step, reset)
    priority: int | None = None
    needs_cuda: str | None = None


def _liger_logits_step(inp: dict, backward: bool):
    """Liger's ``triton_grpo_loss`` with the arguments of ``_liger_logits_loss``, on logits
    padded to T + 1 rows once here (that helper pads inside, a 2 x 2.5 GB copy per call that
    is not Liger's cost). ``inplace=True`` writes the gradient into the buffer, so full mode
    restores it (untimed) before each call."""
    import liger_kernel.transformers.grpo_loss  # noqa: F401 - a missing Liger fails here

    x = inp["logits"]
    padded = torch.cat([x, x[:, -1:]], dim=1)

    def step():
        buf = padded.detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            loss = blp.liger_padded_loss(buf, inp)
            if backward:
                return torch.autograd.grad(loss, buf)
        return loss

    def reset() -> None:
        with torch.no_grad():
            padded[:, :-1].copy_(x)
            padded[:, -1:].copy_(x[:, -1:])

    return step, (reset if backward else None)


def _trl_logits_step(inp: dict, backward: bool):
    """TRL's ``selective_log_softmax`` (row by row for bf16), then ``reference.policy_loss``."""
    from trl.trainer.utils import selective_log_softmax

    def step():
        x = inp["logits"].detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            logp = selective_log_softmax(x, inp["labels"]).float()
            loss, _ = reference.policy_loss(
                logp, inp["old_logp"], inp["advantages"], inp["mask"], **blp.KNOBS
            )
            if backward:
                return torch.autograd.grad(loss, x)
        return loss

    return step


def _needs_cuda(r: Runner, case: Case, name: str, module: str) -> bool:
    """True when ``module`` imports but this is no CUDA machine (skipped); an import error is
    left to the provider, which records it."""
    if CUDA:
        return False
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - recorded when the provider imports it
        return False
    r.skip(case, name, f"{module} needs CUDA")
    return True


def section_logits(r: Runner) -> None:
    B, T, V = LOGITS_SIZE[r.quick]
    inp = _logits_inputs(B, T, V)
    dtype = str(inp["logits"].dtype).removeprefix("torch.")
    logits_bytes = _nbytes(inp["logits"])
    tokens = B * T
    op, op_inplace = (_op_name("policy_loss_from_logits", p) for p in ("op", "op_inplace"))
    for mode, (reads, what) in LOGITS_TRAFFIC.items():
        backward = mode == "full"
        moved = logits_bytes * reads
        floor_s = moved / BANDWIDTH
        name = f"policy_loss_from_logits {mode} {B}x{T}x{V} {dtype}"
        info = dict(B=B, T=T, V=V, dtype=dtype, mode=mode, tokens=tokens, bytes=moved)
        case = r.case(name, "logits", "floor[bw]", **info, bandwidth_floor_s=floor_s)
        note = f"computed, not measured: {what} at 4.3 TB/s"
        r.computed(case, "floor[bw]", floor_s, bytes=moved, note=note)
        make = _blp_makers("logits", inp, backward)
        plan = [
            Step(op, make("op")),
            *([Step(op_inplace, make("op_inplace"))] if backward else []),
            Step("reference", make("reference")),
            Step("liger", partial(_liger_logits_step, inp, backward), None, "liger_kernel"),
            Step("trl", partial(_trl_logits_step, inp, backward)),
            Step("reference_compile", make("reference_compile"), 10 + backward),
        ]
        r.run_plan(case, plan, bytes_moved=moved, tokens=tokens)
        if backward:
            for provider in (op, op_inplace):
                ratio = case.ratio(provider, "floor[bw]")
                r.target(case, f"{provider} full / floor[bw]", ratio, 1.3, "x")
        else:
            t = case.times.get(op)
            r.target(case, f"{op} fwd (ms)", None if t is None else t * 1e3, 0.80, " ms")
        r.save()
    del inp
    _free()


# --------------------------------------------------------------------------------------
# 4. policy_loss_from_hidden
# --------------------------------------------------------------------------------------


def _hidden_inputs(B: int, T: int, H: int, V: int) -> dict[str, torch.Tensor]:
    """``bench_logprob_loss.hidden_inputs``, drawn on the device on CUDA."""
    if not CUDA:
        return blp.hidden_inputs(B, T, H, V)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    hidden = torch.randn(B, T, H, generator=gen, device=DEVICE, dtype=blp.DTYPE)
    weight = torch.randn(V, H, generator=gen, device=DEVICE, dtype=blp.DTYPE).div_(H**0.5)
    return dict(hidden=hidden, weight=weight, **blp._loss_inputs(B, T, V))


def section_hidden(r: Runner) -> None:
    B, T, H, V = HIDDEN_SIZE[r.quick]
    inp = _hidden_inputs(B, T, H, V)
    dtype = str(inp["hidden"].dtype).removeprefix("torch.")
    M, tokens = B * T, B * T
    gemm = 2 * M * H * V
    op = _op_name("policy_loss_from_hidden")
    # FLOP floor: fwd = 1 GEMM (the logits); full = 3 GEMMs (logits, d hidden = dlogits @ W,
    # d weight = dlogits^T @ hidden), the minimum. Recomputing the logits in the backward
    # (the op, to never hold them) makes 4: flop_floor_recompute_s.
    for mode, n_gemm, n_recompute in (("fwd", 1, 1), ("full", 3, 4)):
        backward = mode == "full"
        flops = n_gemm * gemm
        floor_s = flops / GEMM_FLOPS
        name = f"policy_loss_from_hidden {mode} {B}x{T}x{H}x{V} {dtype}"
        info = dict(B=B, T=T, H=H, V=V, M=M, dtype=dtype, mode=mode, tokens=tokens, gemm_flop=gemm)
        info.update(flop_floor_s=floor_s, flop_floor_recompute_s=n_recompute * gemm / GEMM_FLOPS)
        case = r.case(name, "hidden", "floor[flops]", **info)
        note = f"computed, not measured: {n_gemm} GEMM(s) of 2*M*H*V FLOP at 790 TFLOP/s"
        r.computed(case, "floor[flops]", floor_s, gemms=n_gemm, flop=flops, note=note)
        make = _blp_makers("hidden", inp, backward)
        plan = [
            Step(op, make("op")),
            Step("reference", make("reference")),
            # LigerFusedLinearGRPOLoss torch.compiles its chunk function (compiled=True)
            Step("liger", make("liger"), 6 - backward, "liger_kernel"),
            Step("reference_compile", make("reference_compile"), 20 + backward),
        ]
        r.run_plan(case, plan, tokens=tokens, flops=flops)
        if backward:
            t = case.times.get(op)
            ms = None if t is None else t * 1e3
            r.target(case, f"{op} full (ms)", ms, 65.0, " ms")
            r.target(case, f"{op} full, stretch (ms)", ms, 50.0, " ms")
        peak = case.providers.get(op, {}).get("peak_mib")
        r.target(case, f"{op} {mode} peak extra memory (MiB)", peak, 1536.0, " MiB")
        r.save()
    del inp
    _free()


# --------------------------------------------------------------------------------------
# 5. overhead: TAPO's whole path against a 0.5B-class policy update
# --------------------------------------------------------------------------------------


def _call_texts(B: int, calls_per_row: int) -> tuple[list[str], list[list[str]]]:
    """Each prompt group asks about 4 (attribute, city) questions, in careful or sloppy words;
    the results name the documents each search retrieved."""
    rng = random.Random(0)
    attrs = ("population", "mayor", "area", "founding year", "elevation", "country")
    queries, results = [], []
    for row in range(B):
        g = row // GROUP
        for _ in range(calls_per_row):
            k = rng.randrange(4)
            city, attr = 4 * g + k, attrs[(g + k) % len(attrs)]
            queries.append(
                f"{attr} of city {city}" if rng.random() < 0.7 else f"City {city}  {attr.upper()}?"
            )
            results.append([f"city-{city}/{attr}", f"city-{city}/overview"])
    return queries, results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fully_shard(model) -> None:
    """FSDP2 on a one-process group: each decoder layer, then the root (tied embeddings)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if CUDA:
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if CUDA else "gloo", timeout=timedelta(seconds=120))
    mesh = init_device_mesh(DEVICE, (1,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _build_policy(cfg: dict, fsdp: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**cfg, **POLICY_CONFIG, use_cache=False)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(config)
    model.to(torch.bfloat16 if CUDA else torch.float32).train()
    if fsdp:
        _fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    captured: dict[str, torch.Tensor] = {}
    model.model.norm.register_forward_hook(lambda mod, args, out: captured.__setitem__("h", out))
    return model, opt, captured


def _make_update(model, opt, captured, batch: dict, micro: int) -> Callable[[], None]:
    """One policy update: per micro-batch the forward (the LM head only on the last position:
    the loss reads the final hidden states and the tied head weight itself), the fused loss
    with the TAPO lift, backward; then the AdamW step. ``global_count`` makes the micro-batch
    losses sum to the token mean of the whole batch."""
    B = batch["ids"].shape[0]
    total = float(batch["mask"].sum())

    def update() -> None:
        opt.zero_grad(set_to_none=True)
        for lo in range(0, B, micro):
            sl = slice(lo, lo + micro)
            model(input_ids=batch["ids"][sl], logits_to_keep=1)
            hidden = captured.pop("h")
            rows = (batch[k][sl] for k in ("labels", "old_logp", "advantages", "mask"))
            out = tapo_kernels.policy_loss_from_hidden(
                hidden,
                model.lm_head.weight,
                *rows,
                call_map=batch["call_map"][sl],
                call_delta=batch["call_delta"],
                global_count=total,
                **blp.KNOBS,
            )
            out.loss.backward()
        opt.step()

    return update


def section_overhead(r: Runner) -> None:
    B, T, micro = OVERHEAD_BATCH[r.quick]
    cfg = QWEN_TINY if r.quick else QWEN_05B
    N, D = B * CALLS_PER_ROW, tapo_kernels.params.TEXT_DIM
    name = (
        f"TAPO overhead in a Qwen2-0.5B-class policy update ({B}x{T} tokens)"
        if not r.quick
        else f"TAPO overhead in a tiny Qwen2 policy update ({B}x{T} tokens)"
    )
    model_info = dict(cfg, **POLICY_CONFIG, dtype="bfloat16" if CUDA else "float32")
    info = dict(B=B, T=T, micro_batch_rows=micro, calls=N, D=D, model=model_info)
    note = (
        "the policy update only (forward, loss, backward, optimizer step); rollout generation "
        "is excluded, which can only lower TAPO's share"
    )
    case = r.case(name, "overhead", **info, optimizer="AdamW(fused=True)", train_step_note=note)
    queries, results = _call_texts(B, CALLS_PER_ROW)
    # (advantages, seq_adv, group_ids, call_seq, start, end, tool, key, params, kinds):
    # exactly 4 calls per trajectory, groups of 8; the parameters are the encoded queries
    adv, seq_adv, gid, cseq, cstart, cend, ctool, ckey, _, kinds = make_batch(B, T, N, D)
    calls = tapo_kernels.ToolCalls(
        cseq, cstart, cend, ctool, ckey, tapo_kernels.encode_text(queries).to(DEVICE)
    )

    def encode() -> torch.Tensor:
        return tapo_kernels.encode_text(queries).to(DEVICE)

    def encode_results() -> torch.Tensor:
        return tapo_kernels.encode_results(results).to(DEVICE)

    r.provider(case, "encode", encode, host=True, peak=False)
    r.provider(case, "encode[results]", encode_results, host=True, peak=False)
    correct = partial(tapo_kernels.fused_correct, adv, seq_adv, gid, calls, kinds)
    r.provider(case, "fused_correct[4 calls]", correct, peak=False)
    r.provider(case, "call_map", partial(calls.call_map, B, T), peak=False)
    result = correct()
    call_map, delta = calls.call_map(B, T), result.delta
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(B, T)
    mask[:, : T // 4] = 0.0  # prompt tokens
    mask[:, -1] = 0.0  # the last position has no next token
    mask = mask.to(DEVICE)
    old_logp = (-torch.rand(B, T, generator=gen) * 4).to(DEVICE)
    logp = (old_logp + 0.05 * torch.randn(B, T, generator=gen).to(DEVICE)).requires_grad_(True)
    tok_adv = seq_adv[:, None] * mask

    def loss_step(lift: bool):
        extra = dict(call_map=call_map, call_delta=delta) if lift else {}
        out = tapo_kernels.policy_loss(logp, old_logp, tok_adv, mask, preset="grpo", **extra)
        return torch.autograd.grad(out.loss, logp)

    r.provider(case, "loss+lift", partial(loss_step, True), peak=False)
    r.provider(case, "loss", partial(loss_step, False), peak=False)
    r.save()

    # the policy update
    ids = torch.randint(0, cfg["vocab_size"], (B, T), generator=gen).to(DEVICE)
    v = cfg["vocab_size"]
    batch = dict(
        ids=ids,
        labels=torch.roll(ids, -1, dims=1),
        mask=mask,
        old_logp=(-torch.log(torch.tensor(float(v))) + 0.05 * torch.randn(B, T, generator=gen)).to(
            DEVICE
        ),
        advantages=seq_adv,
        call_map=call_map,
        call_delta=delta,
    )
    fsdp_error = None
    try:
        model, opt, captured = _build_policy(cfg, fsdp=True)
        update = _make_update(model, opt, captured, batch, micro)
        update()  # FSDP trial (and warm-up)
        sync()
        fsdp = True
    except Exception as err:  # noqa: BLE001 - fall back to the plain model
        fsdp_error = f"{type(err).__name__}: {err}"[:1000]
        r.log(f"  FSDP2 unavailable, plain model: {fsdp_error.splitlines()[0][:160]}")
        fsdp = False
    if not fsdp:
        model = opt = captured = update = None
        _free()
    case.info["fsdp"] = fsdp
    if fsdp_error:
        case.info["fsdp_error"] = fsdp_error
    n_params = None
    try:
        if not fsdp:
            model, opt, captured = _build_policy(cfg, fsdp=False)
            update = _make_update(model, opt, captured, batch, micro)
        n_params = sum(p.numel() for p in model.parameters())
        case.info["parameters"] = n_params
    except Exception as err:  # noqa: BLE001
        case.errors["train_step"] = f"{type(err).__name__}: {err}"[:2000]
        r.log(f"  train_step ERROR {case.errors['train_step'].splitlines()[0][:160]}")
    if update is not None:
        r.provider(case, "train_step", update, tokens=B * T, warm=fsdp)
    del model, opt, captured, update
    _teardown_dist()
    _free()

    parts = ("encode", "encode[results]", "fused_correct[4 calls]", "call_map", "loss+lift", "loss")
    t = case.times
    if all(p in t for p in parts):
        enc = max(t["encode"], t["encode[results]"])
        whole = (
            enc + t["fused_correct[4 calls]"] + t["call_map"] + max(0.0, t["loss+lift"] - t["loss"])
        )
        r.computed(
            case,
            "tapo[whole path]",
            whole,
            note="computed: max(encode, encode[results]) + fused_correct[4 calls] + "
            "call_map + max(0, loss+lift - loss)",
            encoder="encode" if t["encode"] >= t["encode[results]"] else "encode[results]",
            lift_s=max(0.0, t["loss+lift"] - t["loss"]),
        )
        if "train_step" in t:
            share = 100 * whole / t["train_step"]
            case.info["share_percent"] = share
            r.log(f"  TAPO share of the update: {share:.4f}%")
    share = case.info.get("share_percent")
    r.target(case, "tapo[whole path] / train_step (%)", share, 0.05, "%")
    r.save()


def _teardown_dist() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at the end of the section
        pass


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------

RUNNERS = {
    "fused_correct": section_fused_correct,
    "policy_loss": section_policy_loss,
    "logits": section_logits,
    "hidden": section_hidden,
    "overhead": section_overhead,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes (8-64x smaller), for a dry run; forced without CUDA",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"sections to run, of {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=210.0,
        help="seconds; compiling providers are skipped when they would not fit (default 210)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the torch.compile providers (default: on CUDA only)",
    )
    args = parser.parse_args(argv)
    quick = args.quick or not CUDA
    sections = [s for s in SECTIONS if not args.only or s in args.only]
    compile_ = CUDA if args.compile is None else args.compile
    if compile_:
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = max(inductor_config.compile_threads, os.cpu_count() or 1)
        # the reference's data-dependent steps break graphs: keep their warnings out of the log
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        for knob in ("cache_size_limit", "recompile_limit"):  # one entry per shape and mode
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 64))
    r = Runner(args.out, quick, args.budget, compile_, merge=bool(args.only))
    r.log(
        f"{r.device}: sections {', '.join(sections)}; quick={quick} compile={compile_} "
        f"budget={args.budget:.0f}s; torch {torch.__version__}, driver {r.env['driver']}"
    )
    torch.manual_seed(0)
    for section in sections:
        r.log(f"== {section}")
        try:
            RUNNERS[section](r)
        except Exception as err:  # noqa: BLE001 - a broken section never stops the others
            msg = f"{type(err).__name__}: {err}"[:2000]
            r.log(f"section {section} failed: {msg.splitlines()[0][:160] if msg else ''}")
            traceback.print_exc()
            # recorded in the section's last case (a placeholder case if it had none yet)
            cases = [c for c in r.cases.values() if c.section == section]
            case = cases[-1] if cases else r.case(f"{section} (failed)", section)
            case.errors["section"] = msg
            _free()
        r.save()
    if r.deferred:
        r.log(f"== compiling providers, by priority ({len(r.deferred)})")
        r.run_deferred()
    r.summary()
    return 0


if __name__ == "__main__":
    sys.exit(main())
