"""Correct a synthetic batch of search-agent rollouts and show what TAPO did.

Run: ``python -m tapo_kernels.demo`` (or ``tapo-demo``). Two prompts, four rollouts each;
every rollout issues text-search calls. Failing rollouts that issued the same (or a nearly
identical) query as a successful sibling get their call's negative credit lifted.
"""

from __future__ import annotations

import argparse

import torch

import tapo_kernels as tk

ROLLOUTS = [
    # (prompt group, success, queries issued)
    (0, True, ["capital of Australia", "population of Canberra"]),
    (0, False, ["Capital of  australia", "largest city in Australia"]),  # good first call
    (0, True, ["capital city of Australia"]),
    (0, False, ["kangaroo facts"]),  # nothing a successful sibling did
    (1, True, ["who wrote Dune", "Frank Herbert birth year"]),
    (1, False, ["who wrote dune", "Dune movie cast"]),  # good first call
    (1, False, ["Dune sequel"]),
    (1, False, ["Frank Herbert birth year"]),  # same query as the success
]
SEARCH = 0  # tool id; the demo has one cosine tool


def build(tokens_per_call: int = 12, pad: int = 8):
    """Token-level tensors for ROLLOUTS: each call is a span, answers are 8 more tokens."""
    B = len(ROLLOUTS)
    T = max(len(q) for _, _, q in ROLLOUTS) * (tokens_per_call + pad) + pad
    rewards = torch.tensor([1.0 if ok else 0.0 for _, ok, _ in ROLLOUTS])
    groups = torch.tensor([g for g, _, _ in ROLLOUTS])
    seq_adv = tk.reference.group_advantages(rewards, groups)
    mask = torch.zeros(B, T)
    seq, start, end, texts = [], [], [], []
    for i, (_, _, queries) in enumerate(ROLLOUTS):
        t = 0
        for q in queries:
            seq.append(i)
            start.append(t)
            end.append(t + tokens_per_call)
            texts.append(q)
            mask[i, t : t + tokens_per_call] = 1.0  # the call's tokens (policy)
            t += tokens_per_call + pad // 2  # the observation (mask 0) follows
        mask[i, t : t + pad] = 1.0  # the final answer
    calls = tk.ToolCalls.from_lists(seq, start, end, [SEARCH] * len(seq), tk.encode_text(texts))
    return seq_adv[:, None] * mask, seq_adv, groups, calls, texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--theta", type=float, default=0.7)
    parser.add_argument("--alpha-min", type=float, default=0.3)
    parser.add_argument("--beta", type=float, default=0.8)
    parser.add_argument("--batch-scope", action="store_true")
    args = parser.parse_args(argv)

    advantages, seq_adv, groups, calls, texts = build()
    result = tk.fused_correct(
        advantages,
        seq_adv,
        groups,
        calls,
        torch.tensor([0]),  # tool 0 compares by cosine
        theta=args.theta,
        alpha_min=args.alpha_min,
        beta=args.beta,
        batch_scope=args.batch_scope,
    )
    backend = tk.CPU_BACKEND["fused_correct"]
    print(f"tapo_kernels {tk.__version__}: fused_correct on cpu ({backend} kernel)\n")
    print(
        f"{'row':>3} {'A_i':>7}  {'query':<28} {'conf':>5} {'lift':>6}  {'A on call':>9} -> {'A_new':>7}  witness"
    )
    for k, text in enumerate(texts):
        i = int(calls.seq[k])
        s = int(calls.start[k])
        w = int(result.witness[k])
        lifted = float(result.delta[k]) > 0
        witness = f"row {int(calls.seq[w])}: {texts[w]!r}" if lifted else "-"
        print(
            f"{i:>3} {float(seq_adv[i]):>7.3f}  {text!r:<28} {float(result.confidence[k]):>5.2f} "
            f"{float(result.delta[k]):>6.3f}  {float(advantages[i, s]):>9.3f} -> "
            f"{float(result.corrected[i, s]):>7.3f}  {witness}"
        )
    print()
    print(result.stats())


if __name__ == "__main__":
    main()
