"""Compile every Triton kernel of the package for a GPU target, on a machine without a GPU.

The Triton kernels run on the CPU only through the interpreter, which accepts programs the
compiler rejects (and never runs the compiled-only branches, such as libdevice math). This
module compiles them for real, all the way to a CUDA binary (Triton's bundled ``ptxas``), for
a chosen architecture, with no GPU and no CUDA driver:

* a stand-in Triton driver reports the target (``sm_90`` by default) and one device;
* every kernel launch compiles its specialization and skips the launch (so outputs are
  uninitialised memory: nothing after a launch is checked, only that each launch compiles);
* autotuned kernels compile every one of their configurations;
* the launchers are driven through the specialization space the ops use: every algorithm,
  aggregation, KL type and optional input of the policy loss, every input dtype, temperature
  and entropy switch of the log-softmax passes, both scopes and the coverage switch of the
  TAPO correction.

Run ``python -m tapo_kernels.compile_check [--arch 90] [--json FILE]``; the exit status is 1
when any specialization fails to compile. It must run in a fresh process: it replaces the
active Triton driver and imports ``tapo_kernels.ops`` with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Report:
    arch: int
    compiled: list[dict] = field(default_factory=list)  # one per specialization
    failures: list[dict] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # inputs the launcher refused (validation)
    cases: int = 0

    def as_dict(self) -> dict:
        kernels = sorted({c["kernel"] for c in self.compiled})
        return {
            "arch": self.arch,
            "cases": self.cases,
            "specializations": len(self.compiled),
            "kernels": kernels,
            "failures": self.failures,
            "rejected": self.rejected,
            "compiled": self.compiled,
        }


class _CompileFailed(Exception):
    """Raised out of a launch whose kernel did not compile (already recorded)."""


def _install_driver(arch: int) -> None:
    """Make Triton compile for ``cuda:arch`` without a GPU (no launch ever happens)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class CompileOnlyDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            def bench(fn, quantiles=None, **kwargs):  # the autotuner compiles each config
                fn()
                return [1.0] * len(quantiles) if quantiles else 1.0

            return bench

        def is_active(self):
            return True

    driver.set_active(CompileOnlyDriver())


@contextlib.contextmanager
def _compile_only(report: Report) -> Iterator[None]:
    """Every ``kernel[grid](...)`` compiles (recording the result) and does not launch."""
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        name = self.fn.__name__
        t0 = time.perf_counter()
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - every compiler error is a finding
            report.failures.append(
                {
                    "kernel": name,
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(limit=8),
                }
            )
            raise _CompileFailed(name) from err
        meta = getattr(kernel, "metadata", None)
        report.compiled.append(
            {
                "kernel": name,
                "seconds": round(time.perf_counter() - t0, 3),
                "num_warps": getattr(meta, "num_warps", None),
                "shared": getattr(meta, "shared", None),
                "n_regs": getattr(kernel, "n_regs", None),
                "n_spills": getattr(kernel, "n_spills", None),
            }
        )
        return kernel

    JITFunction.run = compile_only
    try:
        yield
    finally:
        JITFunction.run = run


def _cases() -> Iterator[tuple[str, Callable[[], object]]]:
    """``(label, launch)`` pairs covering the specializations the ops compile."""
    import torch

    from . import ops
    from .reference import AGGS, ALGOS, KL_TYPES
    from .testing import correct_batch, loss_batch

    for dtype, scope, coverage in itertools.product(
        (torch.float32, torch.bfloat16, torch.float16), (False, True), (True, False)
    ):
        b = correct_batch(B=16, T=64, D=256 if scope else 32, param_dtype=dtype, quantized=False)
        label = f"fused_correct params={dtype} batch_scope={scope} coverage={coverage}"
        yield (
            label,
            lambda b=b, s=scope, c=coverage: ops.fused_correct_triton(
                *b.op_args(), 0.7, 0.3, 0.8, s, c
            ),
        )

    def loss_case(
        dtype=torch.float32,
        per_token=True,
        with_ref=True,
        with_calls=True,
        bool_mask=False,
        shape=(5, 40),
        **knobs,
    ):
        b = loss_batch(
            B=shape[0],
            T=shape[1],
            dtype=dtype,
            per_token=per_token,
            with_ref=with_ref,
            with_calls=with_calls,
        )
        args = list(b.op_args())
        if bool_mask:
            args[3] = args[3] > 0
        knobs = {"kl_coef": 0.1 if with_ref else 0.0, **knobs}
        one = torch.ones((), dtype=args[0].dtype)

        def launch():
            ops.policy_loss_triton(*args, **knobs)
            ops.policy_loss_backward_triton(one, *args, **knobs)

        label = (
            f"policy_loss {shape} dtype={dtype} per_token={per_token} ref={with_ref} "
            f"calls={with_calls} bool_mask={bool_mask} {knobs}"
        )
        return label, launch

    for algo, agg in itertools.product(ALGOS, AGGS):
        yield loss_case(algo=algo, agg=agg)
    # the tile shape (BLOCK_B x BLOCK_T) follows (B, T): short rows, two column blocks, long rows
    for shape, algo in itertools.product(((16, 1500), (512, 2048), (2, 16384)), ALGOS):
        yield loss_case(shape=shape, algo=algo)
    for kl_type in KL_TYPES:
        yield loss_case(kl_type=kl_type)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        for algo in ALGOS:
            yield loss_case(dtype=dtype, algo=algo)
    yield loss_case(per_token=False)
    yield loss_case(with_ref=False)
    yield loss_case(with_calls=False)
    yield loss_case(bool_mask=True)
    yield loss_case(dual_clip_c=0.0)
    yield loss_case(per_token=False, with_ref=False, with_calls=False, algo="gspo")

    gen = torch.Generator().manual_seed(0)
    for dtype, V, temperature, entropy in itertools.product(
        (torch.float32, torch.bfloat16, torch.float16), (1000, 40000), (1.0, 0.7), (False, True)
    ):
        logits = torch.randn(2, 3, V, generator=gen).to(dtype)
        labels = torch.randint(0, V, (2, 3), generator=gen)

        def launch(x=logits, y=labels, t=temperature, e=entropy):
            logp, ent = ops.selective_log_softmax_triton(x, y, t, e)
            grad = torch.ones_like(logp)
            ops.selective_log_softmax_backward_triton(grad, x, y, logp, t)
            ops.selective_log_softmax_backward_inplace_triton(grad, x.clone(), y, logp, t)
            if e:  # the backward with an entropy gradient
                passes = ops.logprob_loss.TRITON
                passes.dlogits_rows(grad, x, y, logp, t, torch.empty_like(x), grad, ent)

        yield f"log_softmax dtype={dtype} V={V} temperature={temperature} entropy={entropy}", launch

    for dtype, bias in itertools.product((torch.float32, torch.bfloat16), (False, True)):
        hidden = torch.randn(2, 3, 16, generator=gen).to(dtype)
        weight = torch.randn(500, 16, generator=gen).to(dtype)
        b = torch.randn(500, generator=gen).to(dtype) if bias else None
        labels = torch.randint(0, 500, (2, 3), generator=gen)
        loss = loss_batch(B=2, T=3, with_ref=False, with_calls=False, empty_row=False)

        def launch(h=hidden, w=weight, bb=b, y=labels, lb=loss):
            args = (lb.old_logp, lb.advantages, lb.mask)
            ops.policy_loss_from_hidden_triton(h, w, bb, y, *args, chunk_size=4)
            logp = torch.zeros(2, 3)
            ops.selective_log_softmax_from_hidden_backward_triton(
                torch.ones(2, 3), h, w, bb, y, logp, 1.0, 4
            )

        yield f"from_hidden dtype={dtype} bias={bias}", launch


def check(arch: int = 90, log: Callable[[str], None] = print) -> Report:
    """Compile every case for ``sm_<arch>``; returns the report (failures included)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset or 0 (it compiles)")
    _install_driver(arch)
    from . import fused

    report = Report(arch=arch)
    # outputs are uninitialised (nothing launches): the finiteness checks after a launch
    # would reject them, so they are switched off here
    saved = fused.check_logp_finite
    fused.check_logp_finite = lambda *a, **k: None
    try:
        with _compile_only(report):
            for label, launch in _cases():
                report.cases += 1
                before = len(report.compiled)
                try:
                    launch()
                except _CompileFailed as err:
                    log(f"FAIL {label}: kernel {err} did not compile")
                    continue
                except (ValueError, TypeError) as err:  # validation before any launch
                    if len(report.compiled) == before:
                        report.rejected.append(f"{label}: {err}")
                        log(f"rejected {label}: {err}")
                        continue
                except Exception:  # noqa: BLE001 - garbage outputs after a compiled launch
                    pass
                log(f"ok   {label}: {len(report.compiled) - before} launches")
    finally:
        fused.check_logp_finite = saved
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "0")
    t0 = time.perf_counter()
    report = check(args.arch, log=(lambda s: None) if args.quiet else print)
    summary = report.as_dict()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    print(
        f"sm_{args.arch}: {summary['specializations']} specializations of "
        f"{len(summary['kernels'])} kernels compiled over {report.cases} cases in "
        f"{summary['seconds']} s; {len(report.failures)} failures, "
        f"{len(report.rejected)} inputs rejected by validation"
    )
    for f in report.failures:
        print(f"\n{f['kernel']}: {f['error']}\n{f['traceback']}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
