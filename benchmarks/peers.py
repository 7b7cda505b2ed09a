"""Side by side with verl's and TRL's own loss and log-probability code, in one process.

Cases (forward + backward, the default CPU shapes; ``--small`` for a quick run):

* ``policy_loss``: verl 0.9.1's ``compute_policy_loss_vanilla`` (PPO clip-higher, dual clip,
  ``token-mean``) against ``tapo_kernels.policy_loss`` with the same knobs, B x T = 64 x 1024.
* ``logprobs_from_logits``: log-probabilities and entropies with gradients through both, from
  (4, 1024, 32768) fp32 logits: verl's ``logprobs_from_logits`` + ``entropy_from_logits``,
  TRL's ``selective_log_softmax`` + ``entropy_from_logits``, and ``tk.logprobs_from_logits``.
* ``logprobs_from_hidden``: the same from hidden states (16, 1024, 128) and a (32768, 128) LM
  head: the peers build the logits with ``F.linear`` first; ``tk.logprobs_from_hidden`` never
  materialises them.

Every provider's values and gradients are checked against ours in the same run (max abs
difference, recorded); times are medians of interleaved repetitions; the peak extra memory of
one step is the growth of the peak RSS (``VmHWM``, reset after the inputs are made) in a
fresh process per provider. Needs verl and TRL
(``make peers-env``; run with ``.venv-peers/bin/python -m benchmarks.peers``); writes
``benchmarks/results/peers-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import tapo_kernels as tk

from .common import RESULTS_DIR, environment

KNOBS = dict(algo="grpo", eps_low=0.2, eps_high=0.28, dual_clip_c=3.0, agg="token-mean")


def shapes(small: bool) -> dict:
    if small:
        return dict(loss=(8, 128), logits=(2, 64, 1024), hidden=(2, 64, 32, 1024))
    return dict(loss=(64, 1024), logits=(4, 1024, 32768), hidden=(16, 1024, 128, 32768))


# --------------------------------------------------------------------------------------
# inputs and providers; each provider returns (values, gradients) of one fwd + bwd step
# --------------------------------------------------------------------------------------


def loss_inputs(B: int, T: int) -> dict:
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(B, T, generator=g) * 4
    return dict(
        logp=logp,
        old=logp + 0.3 * torch.randn(B, T, generator=g),
        adv=torch.randn(B, T, generator=g),
        mask=(torch.rand(B, T, generator=g) < 0.9).float(),
    )


def verl_loss(inp: dict):
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
    from verl.workers.config import ActorConfig

    cfg = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=KNOBS["eps_low"],
        clip_ratio_high=KNOBS["eps_high"],
        clip_ratio_c=KNOBS["dual_clip_c"],
        loss_agg_mode=KNOBS["agg"],
    )
    x = inp["logp"].clone().requires_grad_(True)
    loss, _ = compute_policy_loss_vanilla(
        inp["old"], x, inp["adv"], inp["mask"], loss_agg_mode=KNOBS["agg"], config=cfg
    )
    loss.backward()
    return (loss.detach(),), (x.grad,)


def ours_loss(inp: dict):
    x = inp["logp"].clone().requires_grad_(True)
    out = tk.policy_loss(x, inp["old"], inp["adv"], inp["mask"], **KNOBS)
    out.loss.backward()
    return (out.loss.detach(),), (x.grad,)


def logits_inputs(B: int, T: int, V: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(
        logits=3 * torch.randn(B, T, V, generator=g),
        labels=torch.randint(0, V, (B, T), generator=g),
        g_logp=torch.randn(B, T, generator=g),
        g_entropy=0.01 * torch.randn(B, T, generator=g),
    )


def _backward(logp, entropy, inp, leaves):
    ((logp * inp["g_logp"]).sum() + (entropy * inp["g_entropy"]).sum()).backward()
    return (logp.detach(), entropy.detach()), tuple(t.grad for t in leaves)


def verl_logits(inp: dict, logits: torch.Tensor | None = None, leaves=None):
    from verl.utils.torch_functional import entropy_from_logits, logprobs_from_logits

    x = inp["logits"].clone().requires_grad_(True) if logits is None else logits
    logp = logprobs_from_logits(x, inp["labels"], inplace_backward=False)
    return _backward(logp, entropy_from_logits(x), inp, leaves or [x])


def trl_logits(inp: dict, logits: torch.Tensor | None = None, leaves=None):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    x = inp["logits"].clone().requires_grad_(True) if logits is None else logits
    return _backward(
        selective_log_softmax(x, inp["labels"]), entropy_from_logits(x), inp, leaves or [x]
    )


def ours_logits(inp: dict):
    x = inp["logits"].clone().requires_grad_(True)
    logp, entropy = tk.logprobs_from_logits(x, inp["labels"])
    return _backward(logp, entropy, inp, [x])


def hidden_inputs(B: int, T: int, H: int, V: int) -> dict:
    g = torch.Generator().manual_seed(2)
    inp = logits_inputs(B, T, 1)  # labels and output gradients, replaced below
    inp.pop("logits")
    inp.update(
        hidden=torch.randn(B, T, H, generator=g),
        weight=torch.randn(V, H, generator=g) / H**0.5,
        labels=torch.randint(0, V, (B, T), generator=g),
    )
    return inp


def _hidden_leaves(inp: dict):
    return inp["hidden"].clone().requires_grad_(True), inp["weight"].clone().requires_grad_(True)


def verl_hidden(inp: dict):
    h, w = _hidden_leaves(inp)
    return verl_logits(inp, F.linear(h, w), [h, w])


def trl_hidden(inp: dict):
    h, w = _hidden_leaves(inp)
    return trl_logits(inp, F.linear(h, w), [h, w])


def ours_hidden(inp: dict):
    h, w = _hidden_leaves(inp)
    logp, entropy = tk.logprobs_from_hidden(h, w, inp["labels"])
    return _backward(logp, entropy, inp, [h, w])


CASES: dict[str, tuple[Callable, dict[str, Callable]]] = {
    "policy_loss": (lambda s: loss_inputs(*s["loss"]), {"verl": verl_loss, "ours": ours_loss}),
    "logprobs_from_logits": (
        lambda s: logits_inputs(*s["logits"]),
        {"verl": verl_logits, "trl": trl_logits, "ours": ours_logits},
    ),
    "logprobs_from_hidden": (
        lambda s: hidden_inputs(*s["hidden"]),
        {"verl": verl_hidden, "trl": trl_hidden, "ours": ours_hidden},
    ),
}


# --------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------


def max_diff(a: tuple, b: tuple) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True))


def _rss_field(name: str) -> float:
    """A memory field of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{name} not in /proc/self/status")


def peak_extra_mib(case: str, provider: str, small: bool) -> float:
    """Growth of the peak RSS over one step, in a fresh process (inputs made before)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--peak", case, provider]
        + (["--small"] if small else []),
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _peak_child(case: str, provider: str, small: bool) -> None:
    # the peers' modules are imported before the measurement, not inside it
    import trl.trainer.utils  # noqa: F401
    import verl.trainer.ppo.core_algos  # noqa: F401
    import verl.utils.torch_functional  # noqa: F401
    import verl.workers.config  # noqa: F401

    make, providers = CASES[case]
    inp = make(shapes(small))
    before = _rss_field("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, past the inputs' making
    providers[provider](inp)
    print(_rss_field("VmHWM:") - before)


def run(small: bool, repeats: int) -> dict:
    s = shapes(small)
    results = {}
    for case, (make, providers) in CASES.items():
        inp = make(s)
        ours_values, ours_grads = providers["ours"](inp)
        row: dict = {"shape": list(s[{"policy_loss": "loss"}.get(case, case.split("_")[-1])])}
        for name, fn in providers.items():
            values, grads = fn(inp)  # warm-up, and the equality check
            row[name] = {
                "max_abs_diff_values": max_diff(values, ours_values),
                "max_abs_diff_grads": max_diff(grads, ours_grads),
            }
        times: dict[str, list[float]] = {name: [] for name in providers}
        for _ in range(repeats):  # interleaved, so that machine noise hits every provider
            for name, fn in providers.items():
                t0 = time.perf_counter()
                fn(inp)
                times[name].append(time.perf_counter() - t0)
        for name in providers:
            row[name]["median_ms"] = 1e3 * statistics.median(times[name])
            row[name]["peak_extra_mib"] = peak_extra_mib(case, name, small)
        for name in providers:
            if name != "ours":
                row[name]["ours_speedup"] = row[name]["median_ms"] / row["ours"]["median_ms"]
        results[case] = row
        print(case, json.dumps(row, indent=1), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="small shapes (a quick check)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak", nargs=2, metavar=("CASE", "PROVIDER"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "peers-cpu.json")
    args = p.parse_args(argv)
    if args.peak:
        _peak_child(*args.peak, args.small)
        return 0
    import trl
    import verl

    results = run(args.small, args.repeats)
    record = {
        "environment": {**environment(), "verl": verl.__version__, "trl": trl.__version__},
        "knobs": KNOBS,
        "cases": results,
    }
    if not args.small:
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
