"""How right are TAPO's witnesses? Lift precision and recall of each witness test on real rollouts.

Launch::

    python -m trainer.witnesses --config trainer/configs/tiny_grpo_tapo.yaml \
        --run runs/study/tapo/warmup_seed0 --steps 10 --out docs/witness_quality.md

The policy of the run's latest checkpoint (loaded from a copy of the run directory, which is
left untouched) samples ``--steps`` batches of training questions exactly as RL steps do.
On those same rollouts, each witness test - ``tapo.witness`` mode (``tool``: search calls
compare the documents they retrieved; ``arguments``: hashed character 3-grams of the query;
``neural``: sentence embeddings of the query, when the optional encoder is installed) and
``theta`` - runs ``fused_correct`` with the config's ``alpha_min`` and ``beta`` and is
scored against the ground truth (``trainer/credit.py``): a lifted call should be good (its
observation holds gold evidence), and every good call of a failing trajectory should be
lifted.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import tapo_kernels
from tapo_kernels.reference import group_advantages

from .config import ConfigError, load_config
from .credit import encode_calls, truth_counts, truth_rates
from .rewards import exact_match, f1_score, reward
from .rollout import collate

GRID = {"tool": (0.5, 0.7, 0.9), "arguments": (0.5, 0.7, 0.8, 0.9, 0.95), "neural": (0.7, 0.8, 0.9)}


def measure(
    config: str | None, run: Path, steps: int, overrides: Sequence[str], modes: Sequence[str]
) -> tuple[list[dict], dict]:
    """Rows ``{mode, theta, truth/...}`` and the rollout summary of ``steps`` batches."""
    from .train import Trainer, step_seed

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(
            run, Path(tmp) / run.name, ignore=shutil.ignore_patterns("tensorboard", "plots")
        )
        cfg = load_config(
            config,
            [
                *overrides,
                f"logging.run_dir={tmp}",
                f"logging.name={run.name}",
                "logging.progress=false",
                "logging.tensorboard=false",
            ],
        )
        trainer = Trainer(cfg, resume=True)
        if trainer.checkpoint is None:
            raise ConfigError(f"{run} has no checkpoint to load")
        batches = []
        train, G = trainer.task.train, cfg.rollout.group_size
        for step in range(1, steps + 1):
            rng = random.Random(step_seed("witnesses", cfg.seed, step))
            picks = rng.sample(range(len(train)), min(cfg.rl.prompts_per_step, len(train)))
            examples = [train[i] for i in picks for _ in range(G)]
            groups = [j for j in range(len(picks)) for _ in range(G)]
            episodes = trainer.engine.rollout(
                examples, groups, seed=step_seed("witnesses-rollout", cfg.seed, step)
            )
            for ep in episodes:
                ep.em = exact_match(ep.answer, ep.example.answers)
                ep.f1 = f1_score(ep.answer, ep.example.answers)
                ep.reward = reward(ep.answer, ep.example.answers, cfg.algo.reward)
            batches.append(episodes)
        registry, sim_kind, tp = trainer.registry, trainer.sim_kind, cfg.tapo
        neural = None
        rows = []
        for mode in modes:
            if mode == "neural":
                try:
                    from tapo_kernels.params import NeuralTextEncoder

                    neural = NeuralTextEncoder()
                except ImportError as exc:
                    print(f"skipping the neural witness: {exc}", file=sys.stderr)
                    continue
            for theta in GRID[mode]:
                sums: Counter = Counter()
                for episodes in batches:
                    batch = collate(
                        episodes, trainer.tokenizer.pad_token_id, image_pad_id=trainer.image_pad_id
                    )
                    batch.calls.params = encode_calls(registry, episodes, mode, neural)
                    seq_adv = group_advantages(
                        batch.rewards, batch.group_ids, scale_by_std=cfg.algo.scale_by_std
                    )
                    result = tapo_kernels.fused_correct(
                        seq_adv[:, None] * batch.mask,
                        seq_adv,
                        batch.group_ids,
                        batch.calls,
                        sim_kind,
                        theta=theta,
                        alpha_min=tp.alpha_min,
                        beta=tp.beta,
                        batch_scope=tp.batch_scope,
                        coverage=tp.coverage,
                    )
                    sums.update(truth_counts(episodes, seq_adv.tolist(), result.delta.tolist()))
                rows.append({"mode": mode, "theta": theta, **truth_rates(dict(sums))})
        episodes = [ep for b in batches for ep in b]
        kinds = Counter(ep.example.kind for ep in episodes)
        solved = Counter(ep.example.kind for ep in episodes if ep.em > 0)
        summary = {
            "episodes": len(episodes),
            "steps": steps,
            "accuracy": {k: solved[k] / n for k, n in sorted(kinds.items())},
            "checkpoint": trainer.checkpoint.name,
        }
        return rows, summary


def table(rows: list[dict], summary: dict, run: Path, alpha_min: float, beta: float) -> str:
    first = rows[0] if rows else {}
    acc = ", ".join(f"{k} {v:.2f}" for k, v in summary["accuracy"].items())
    lines = [
        f"Rollouts: {summary['episodes']} trajectories ({summary['steps']} batches) of the "
        f"policy in `{run}` ({summary['checkpoint']}); training accuracy by kind: {acc}. "
        f"Failing trajectories with at least one good call: "
        f"{100 * first.get('truth/failing_traj_with_good_call', float('nan')):.0f}%; failing "
        f"calls that are good: {100 * first.get('truth/failing_call_good_rate', float('nan')):.0f}%. "
        f"alpha_min = {alpha_min:g}, beta = {beta:g}.",
        "",
        "| witness (`tapo.witness`) | theta | lifted calls | lift precision | lift recall "
        "| mean lift good / bad |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def pct(key: str, r=r) -> str:
            return f"{100 * r[key]:.1f}%" if key in r else "n/a"

        lift = (
            f"{r['truth/mean_lift_good']:.3f} / {r['truth/mean_lift_bad']:.3f}"
            if "truth/mean_lift_good" in r and "truth/mean_lift_bad" in r
            else "n/a"
        )
        lines.append(
            f"| `{r['mode']}` | {r['theta']:g} | {int(r['truth/lifted_calls'])} | "
            f"{pct('truth/lift_precision')} | {pct('truth/lift_recall')} | {lift} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.witnesses", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", default=None, help="the run's config (default: embedded)")
    parser.add_argument("--run", required=True, type=Path, help="a run directory with a checkpoint")
    parser.add_argument("--steps", type=int, default=10, help="batches of rollouts (default 10)")
    parser.add_argument("--modes", default="tool,arguments,neural")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in GRID]
    if unknown or args.steps < 1 or not args.run.is_dir():
        print(
            f"error: modes must be among {list(GRID)}, --steps >= 1 and --run an existing "
            f"directory (got {modes}, {args.steps}, {args.run})",
            file=sys.stderr,
        )
        return 2
    try:
        rows, summary = measure(args.config, args.run, args.steps, args.overrides, modes)
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    text = table(rows, summary, args.run, cfg.tapo.alpha_min, cfg.tapo.beta)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(
            ["python -m trainer.witnesses", *(argv if argv is not None else sys.argv[1:])]
        )
        header = (
            '# Witness quality\n\nWhich test of "a successful sibling made the same '
            'call" lifts the right calls? Each witness test runs `fused_correct` on the '
            "same rollouts and is scored against the ground truth (a call is good when "
            "its observation holds a gold evidence document of its question; failing = "
            f"negative advantage).\n\nCommand: `{command}`\n\n"
        )
        args.out.write_text(header + text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
