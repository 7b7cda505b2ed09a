"""Run outputs: ``metrics.jsonl`` (one line per step, fsynced), TensorBoard events, PNG plots,
and the metrics of one RL step (``step_metrics``: every rank's sums reduced by name).

Only rank 0 writes. On resume, lines of steps after the checkpoint are dropped (they are
recomputed), so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import loss
from .checkpoint import write_atomic
from .credit import TAPO_COUNTS, Credit, truth_rates
from .distributed import DistContext
from .rollout import Batch, Episode

# plot panels: title -> metric keys (missing keys are skipped)
PANELS: dict[str, list[str]] = {
    "reward": ["train/reward", "train/accuracy", "train/f1"],
    "heldout_accuracy": ["eval/pass@1", "eval/pass@k"],
    "tool_use": ["train/tool_call_rate", "train/calls_per_episode", "train/invalid_call_rate"],
    "tapo": ["tapo/call_correction_rate", "tapo/trajectory_correction_rate", "tapo/mean_lift"],
    "ground_truth": [
        "truth/failing_traj_with_good_call",
        "truth/failing_call_good_rate",
        "truth/lift_precision",
        "truth/lift_recall",
    ],
    "lift_by_truth": ["truth/mean_lift_good", "truth/mean_lift_bad"],
    "policy": ["actor/clip_frac", "actor/mean_kl", "actor/entropy", "actor/lifted_frac"],
    "loss": ["actor/loss", "actor/grad_norm"],
    "throughput": ["perf/tokens_per_s", "perf/step_time_s"],
    "tapo_cost": ["perf/tapo_share", "perf/fused_correct_share"],
    "warmup": ["warmup/loss"],
    "axpo": ["axpo/all_wrong_rate", "axpo/recovery_rate", "axpo/extra_token_share"],
    "tarl": ["tarl/turn_pos_rate", "tarl/turn_neg_rate", "tarl/turn_zero_rate"],
    "tasks": ["task/main/accuracy", "task/arithmetic/accuracy"],
}


class MetricsLogger:
    """Append-only JSONL + TensorBoard on the main rank; a no-op elsewhere."""

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        """Logs to ``run_dir/metrics.jsonl`` (and ``run_dir/tensorboard``); ``resume_step``:
        the global step a resumed run restarts after (later lines are dropped)."""
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self.truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(run_dir / "tensorboard"),
                purge_step=None if resume_step is None else resume_step + 1,
            )

    def truncate_after(self, step: int) -> None:
        """Keep only the lines logged at or before ``step`` (global step)."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if row.get("step", math.inf) <= step:
                kept.append(json.dumps(row))
        write_atomic(self.path, "".join(k + "\n" for k in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep the fact that it happened
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# the 2 x 3 overview.png
OVERVIEW = ("reward", "heldout_accuracy", "tool_use", "tapo", "ground_truth", "lift_by_truth")


def _draw(ax, title: str, keys: list[str], series: dict[str, list[tuple[int, float]]]) -> bool:
    present = [k for k in keys if series.get(k)]
    for key in present:
        xs, ys = zip(*series[key], strict=True)
        if len(xs) < 20:
            ax.plot(xs, ys, marker="o", markersize=3, label=key)
            continue
        # noisy per-step curves: faint raw values plus a 10-step moving average
        (line,) = ax.plot(xs, ys, alpha=0.25, linewidth=1)
        window = [
            sum(ys[max(0, i - 9) : i + 1]) / len(ys[max(0, i - 9) : i + 1]) for i in range(len(ys))
        ]
        ax.plot(xs, window, color=line.get_color(), label=f"{key} (10-step mean)")
    ax.set_xlabel("step (warm-up steps first, then RL steps)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if present:
        ax.legend(fontsize=7)
    return bool(present)


def make_plots(run_path: Path) -> list[Path]:
    """One PNG per panel of ``PANELS`` plus a 2 x 3 ``overview.png`` under ``<run>/plots``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_path / "metrics.jsonl")
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series[key].append((row["step"], float(value)))
    out_dir = run_path / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for title, keys in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        if _draw(ax, title, keys, series):
            fig.tight_layout()
            path = out_dir / f"{title}.png"
            fig.savefig(path, dpi=90)
            written.append(path)
        plt.close(fig)
    fig, axes = plt.subplots(2, 3, figsize=(16, 6.6))
    drawn = [
        _draw(ax, title, PANELS[title], series)
        for ax, title in zip(axes.flat, OVERVIEW, strict=True)
    ]
    if any(drawn):
        fig.suptitle(run_path.name)
        fig.tight_layout()
        path = out_dir / "overview.png"
        fig.savefig(path, dpi=80)
        written.append(path)
    plt.close(fig)
    return written


def step_metrics(
    episodes: Sequence[Episode],
    batch: Batch,
    update: dict[str, float],
    credit: Credit,
    truth: dict[str, float],
    ctx: DistContext,
    *,
    grad_norm: float,
    skipped: float,
    lr: float,
    lifts: bool,
    t_rollout: float,
    step_time: float,
    extra_sums: dict[str, float] | None = None,
    extra_rates: Callable[[dict[str, float]], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The ``train/``, ``actor/``, ``tapo/``, ``truth/`` and ``perf/`` metrics of one RL step.

    ``update`` holds the loss sums of this rank's updates (``loss.UPDATE_SUMS``), ``truth``
    the ground-truth counts of ``credit.truth_counts``; every count is summed over ranks
    before the rates are taken, so the metrics are those of the global batch. ``extra_sums``
    are reduced with them and ``extra_rates`` turns the reduced sums into more metrics
    (AXPO, TARL, per-task).
    """
    calls = [c for ep in episodes for c in ep.calls]
    s = loss.reduce_metrics(
        {
            "n": len(episodes),
            "reward": sum(ep.reward for ep in episodes),
            "em": sum(ep.em for ep in episodes),
            "f1": sum(ep.f1 for ep in episodes),
            "used": sum(bool(ep.calls) for ep in episodes),
            "calls": len(calls),
            "invalid": sum(not c.valid for c in calls),
            "answered": sum(ep.answer is not None for ep in episodes),
            "policy_tokens": sum(ep.num_policy_tokens for ep in episodes),
            "all_tokens": float(batch.attention_mask.sum()),
            "turns": sum(ep.turns for ep in episodes),
            **update,
            **{k: credit.counts.get(k, 0.0) for k in TAPO_COUNTS},
            **truth,
            **(extra_sums or {}),
        },
        ctx,
    )
    n = s["n"]
    t_encode, t_correct = credit.seconds.get("encode", 0.0), credit.seconds.get("correct", 0.0)
    step_time = max(step_time, 1e-9)
    return {
        "train/reward": s["reward"] / n,
        "train/accuracy": s["em"] / n,
        "train/f1": s["f1"] / n,
        "train/tool_call_rate": s["used"] / n,
        "train/calls_per_episode": s["calls"] / n,
        "train/invalid_call_rate": s["invalid"] / max(s["calls"], 1.0),
        "train/answer_rate": s["answered"] / n,
        "train/turns": s["turns"] / n,
        "train/response_tokens": s["policy_tokens"] / n,
        **loss.actor_metrics(s, ctx.world),
        "actor/grad_norm": grad_norm,
        "actor/skipped_steps": skipped,
        "actor/lr": lr,
        **loss.tapo_metrics(s),
        **truth_rates(s, lifts=lifts),
        "perf/step_time_s": step_time,
        "perf/rollout_time_s": t_rollout,
        "perf/rollout_tokens_per_s": s["policy_tokens"] / max(t_rollout, 1e-9),
        "perf/tokens_per_s": s["all_tokens"] / step_time,
        "perf/tapo_encode_s": t_encode,
        "perf/fused_correct_s": t_correct,
        "perf/fused_correct_share": t_correct / step_time,
        "perf/tapo_share": (t_encode + t_correct) / step_time,
        **(extra_rates(s) if extra_rates else {}),
    }


def run_summary(
    run_path: Path, rl_steps: int, evals: dict[str, dict[str, float]], wall_time_s: float
) -> dict[str, Any]:
    """The run's ``summary.json`` content (held-out accuracies by evaluation tag)."""
    return {
        "run": str(run_path),
        "rl_steps": rl_steps,
        "wall_time_s": wall_time_s,
        "heldout_pass@1": {k: v["eval/pass@1"] for k, v in evals.items()},
        "heldout_pass@k": {k: v["eval/pass@k"] for k, v in evals.items()},
    }


def print_summary(summary: dict[str, Any], evals: dict[str, dict[str, float]]) -> None:
    """Held-out accuracy before and after RL, and where the outputs are."""
    shown = [k for k in ("initial", "after_warmup", "final") if k in evals]
    print(
        "\nheld-out accuracy (greedy pass@1): "
        + " | ".join(f"{k} {evals[k]['eval/pass@1']:.3f}" for k in shown)
    )
    before = evals.get("after_warmup", evals.get("initial"))
    after = evals.get("final")
    if before and after:
        b, a = before["eval/pass@1"], after["eval/pass@1"]
        print(f"RL changed held-out accuracy by {a - b:+.3f} ({b:.3f} before RL -> {a:.3f} after)")
    run = Path(summary["run"])
    print(
        f"metrics: {run / 'metrics.jsonl'}   plots: {run / 'plots'}   "
        f"wall time {summary['wall_time_s']:.0f} s",
        flush=True,
    )


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stdout, or None when disabled or there is nothing to count."""
    if not enabled or total == 0:
        return None
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stdout)
