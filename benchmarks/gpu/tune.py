"""Block-size sweeps of the Triton launchers on a GPU, to choose the configs kept in the source.

Each launcher picks its tile from a few module constants; this script times the realistic
case under every combination (``triton.testing.do_bench`` medians, one process, side by side)
and writes them to ``DIR/tune.json`` with the fastest of each sweep first:

* ``logits``: the selective log-softmax forward and backward at 8192 tokens x 151,936 bf16;
  ``BLOCK_V`` (vocabulary slice), ``num_warps`` and programs per SM of the persistent grid.
* ``policy_loss``: the loss forward and backward at 1M tokens (B=512, T=2048) fp32;
  ``_TILE_TOKENS`` (tokens per program) and ``_MAX_BLOCK_T`` (longest column tile).
* ``fused_correct``: the configuration Triton's autotuner chose for D=256 (it is autotuned).

Run: ``python -m benchmarks.gpu.tune --out DIR`` (CUDA only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch


def _bench(fn) -> float:
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=20, rep=80, return_mode="median") * 1e-3


def sweep_logits(results: dict) -> None:
    import triton

    from tapo_kernels.ops import logprob_loss as lp

    B, T, V = 8, 1024, 151936
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(B, T, V, device="cuda", generator=gen)).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    grad = torch.randn(B, T, device="cuda", generator=gen)
    out = torch.empty_like(logits)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    saved = lp._launch_config
    rows = []
    try:
        for block, warps, per_sm in itertools.product((2048, 4096, 8192), (4, 8, 16), (2, 4, 8)):

            def config(n_rows, V_, device, block_v, block=block, warps=warps, per_sm=per_sm):
                b = block_v or min(triton.next_power_of_2(V_), block)
                return (max(1, min(n_rows, sms * per_sm)),), b, warps

            lp._launch_config = config
            try:
                logp, _ = lp.selective_log_softmax_triton(logits, labels)
                fwd = _bench(lambda: lp.selective_log_softmax_triton(logits, labels))
                bwd = _bench(
                    lambda logp=logp: lp._dlogits_into(grad, logits, labels, logp, 1.0, out, None)
                )
                rows.append(
                    {
                        "BLOCK_V": block,
                        "num_warps": warps,
                        "programs_per_sm": per_sm,
                        "fwd_ms": fwd * 1e3,
                        "bwd_ms": bwd * 1e3,
                    }
                )
                print(
                    f"logits BLOCK_V={block} warps={warps} per_sm={per_sm}: "
                    f"fwd {fwd * 1e3:.3f} ms, bwd {bwd * 1e3:.3f} ms",
                    flush=True,
                )
            except Exception as err:  # noqa: BLE001 - a config that fails is a finding
                rows.append(
                    {
                        "BLOCK_V": block,
                        "num_warps": warps,
                        "programs_per_sm": per_sm,
                        "error": f"{type(err).__name__}: {err}"[:300],
                    }
                )
    finally:
        lp._launch_config = saved
    logp, _ = lp.selective_log_softmax_triton(logits, labels)
    current = {
        "fwd_ms": _bench(lambda: lp.selective_log_softmax_triton(logits, labels)) * 1e3,
        "bwd_ms": _bench(lambda: lp._dlogits_into(grad, logits, labels, logp, 1.0, out, None))
        * 1e3,
    }
    ok = [r for r in rows if "error" not in r]
    results["logits"] = {
        "case": f"{B}x{T}x{V} bf16",
        "current": current,
        "best_fwd": min(ok, key=lambda r: r["fwd_ms"]) if ok else None,
        "best_bwd": min(ok, key=lambda r: r["bwd_ms"]) if ok else None,
        "rows": rows,
    }


def sweep_policy_loss(results: dict) -> None:
    from tapo_kernels.ops import policy_loss as pl
    from tapo_kernels.testing import loss_batch

    B, T = 512, 2048
    args = loss_batch(
        B, T, per_token=True, with_ref=True, with_calls=True, empty_row=False, device="cuda"
    ).op_args()
    knobs = dict(algo="grpo", eps_low=0.2, eps_high=0.28, kl_coef=0.01, agg="token-mean")
    one = torch.ones((), device="cuda")
    saved = pl._TILE_TOKENS, pl._MAX_BLOCK_T
    rows = []
    try:
        for tile, max_t in itertools.product((1024, 2048, 4096, 8192), (512, 1024, 2048)):
            pl._TILE_TOKENS, pl._MAX_BLOCK_T = tile, max_t
            try:
                fwd = _bench(lambda: pl.policy_loss_triton(*args, **knobs))
                bwd = _bench(lambda: pl.policy_loss_backward_triton(one, *args, **knobs))
                rows.append(
                    {
                        "TILE_TOKENS": tile,
                        "MAX_BLOCK_T": max_t,
                        "fwd_ms": fwd * 1e3,
                        "bwd_ms": bwd * 1e3,
                    }
                )
                print(
                    f"policy_loss TILE_TOKENS={tile} MAX_BLOCK_T={max_t}: "
                    f"fwd {fwd * 1e3:.3f} ms, bwd {bwd * 1e3:.3f} ms",
                    flush=True,
                )
            except Exception as err:  # noqa: BLE001
                rows.append(
                    {
                        "TILE_TOKENS": tile,
                        "MAX_BLOCK_T": max_t,
                        "error": f"{type(err).__name__}: {err}"[:300],
                    }
                )
    finally:
        pl._TILE_TOKENS, pl._MAX_BLOCK_T = saved
    ok = [r for r in rows if "error" not in r]
    results["policy_loss"] = {
        "case": f"B={B} T={T} fp32, k3 KL, TAPO lift",
        "current": {"TILE_TOKENS": saved[0], "MAX_BLOCK_T": saved[1]},
        "best_fwd": min(ok, key=lambda r: r["fwd_ms"]) if ok else None,
        "best_bwd": min(ok, key=lambda r: r["bwd_ms"]) if ok else None,
        "rows": rows,
    }


def autotuned_fused_correct(results: dict) -> None:
    from benchmarks.bench_fused_correct import make_batch
    from tapo_kernels.ops import fused_correct as fc

    args = make_batch(512, 8192, 4096, 256, device="cuda")
    torch.ops.tapo.fused_correct(*args, 0.7, 0.3, 0.8, False)
    torch.cuda.synchronize()
    kernel = fc._fused_correct_kernel
    results["fused_correct"] = {
        "case": "B=512 T=8192 N=4096 D=256 scope=group",
        "best_config": str(kernel.best_config),
        "timings_ms": {str(c): t for c, t in getattr(kernel, "configs_timings", {}).items()},
    }


def kernel_resources() -> list[dict]:
    """Registers, spills and shared memory of every kernel compiled in this process."""
    from triton.runtime.autotuner import Autotuner

    from tapo_kernels.ops import fused_correct, logprob_loss, policy_loss

    rows = []
    for module in (fused_correct, logprob_loss, policy_loss):
        for name, obj in vars(module).items():
            fn = obj.fn if isinstance(obj, Autotuner) else obj
            for cache in getattr(fn, "device_caches", {}).values():
                for kernel in cache[0].values():
                    try:
                        kernel._init_handles()
                    except Exception:  # noqa: BLE001
                        continue
                    rows.append(
                        {
                            "kernel": name,
                            "n_regs": kernel.n_regs,
                            "n_spills": kernel.n_spills,
                            "shared": kernel.metadata.shared,
                            "num_warps": kernel.metadata.num_warps,
                        }
                    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", default=["fused_correct", "policy_loss", "logits"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in (
        ("fused_correct", autotuned_fused_correct),
        ("policy_loss", sweep_policy_loss),
        ("logits", sweep_logits),
    ):
        if name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            fn(results)
        except Exception as err:  # noqa: BLE001 - keep the other sweeps
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"{name}: {time.perf_counter() - t0:.1f} s", flush=True)
        (out / "tune.json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        results["kernel_resources"] = kernel_resources()
    except Exception as err:  # noqa: BLE001
        results["kernel_resources"] = f"{type(err).__name__}: {err}"
    (out / "tune.json").write_text(json.dumps(results, indent=2) + "\n")
    spills = [r for r in results["kernel_resources"] if isinstance(r, dict) and r["n_spills"]]
    print("kernels with register spills:", spills or "none", flush=True)
    for name in ("policy_loss", "logits"):
        r = results.get(name, {})
        print(
            name,
            "current",
            r.get("current"),
            "best fwd",
            r.get("best_fwd"),
            "best bwd",
            r.get("best_bwd"),
        )


if __name__ == "__main__":
    main()
