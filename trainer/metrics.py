"""Run outputs: ``metrics.jsonl`` (one line per step, fsynced), TensorBoard events, optional
Weights & Biases logging, PNG plots, and the metrics of one RL step (``step_metrics``: every
rank's sums reduced by name).

Only rank 0 writes. On resume, lines of steps after the checkpoint are dropped (they are
recomputed), so the file always reads as one uninterrupted run.

W&B (``logging.wandb``): the run's files go under ``<run_dir>/wandb``; its id is kept in
``<run_dir>/wandb_run.json`` so that a resumed run goes on logging to the same W&B run. Every
metric is plotted against the trainer's global ``step`` (a W&B step metric), so the rows of the
steps a resume recomputes are logged again at their own step rather than dropped. A W&B
failure never costs a ``metrics.jsonl`` line: the line is written first, and a failing W&B
call turns W&B logging off for the rest of the run with one warning.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import string
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import loss
from .checkpoint import write_atomic
from .config import ConfigError
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


WANDB_ID_FILE = "wandb_run.json"  # {"id": ...}: the W&B run a resumed run goes on with
WANDB_MODES = ("online", "offline", "disabled")
_WANDB_ID = re.compile(r"[a-z0-9]{1,64}")


@dataclass
class WandbOptions:
    """A W&B run: its project, mode (``WANDB_MODES``), name and config."""

    project: str
    mode: str = "offline"
    name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)


def import_wandb() -> Any:
    """The ``wandb`` module, or a ``ConfigError`` saying how to install it."""
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(
            "logging.wandb: Weights & Biases logging needs the wandb package "
            "(pip install wandb), or set logging.wandb=false"
        ) from exc
    return wandb


def wandb_run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id of this run: on resume the one kept in ``run_dir/WANDB_ID_FILE``, else
    (or when that file is missing or unreadable) a new one, which is then kept there."""
    path = run_dir / WANDB_ID_FILE
    if resume and path.is_file():
        try:
            run_id = json.loads(path.read_text(encoding="utf-8")).get("id")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            run_id = None
        if isinstance(run_id, str) and _WANDB_ID.fullmatch(run_id):
            return run_id
        warnings.warn(f"{path}: no valid W&B run id; this run logs to a new W&B run", stacklevel=2)
    alphabet = string.ascii_lowercase + string.digits
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    write_atomic(path, json.dumps({"id": run_id}) + "\n")
    return run_id


class MetricsLogger:
    """Append-only JSONL + TensorBoard (+ W&B) on the main rank; a no-op elsewhere."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool = True,
        resume_step: int | None = None,
        wandb: WandbOptions | None = None,
    ) -> None:
        """Logs to ``run_dir/metrics.jsonl`` (and ``run_dir/tensorboard``, and a W&B run when
        ``wandb`` is given); ``resume_step``: the global step a resumed run restarts after
        (later lines are dropped)."""
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self.truncate_after(resume_step)
        if wandb is not None:
            self._wandb = _start_wandb(run_dir, wandb, resume=resume_step is not None)
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
        if self._wandb is not None:
            numbers = {
                k: v
                for k, v in row.items()
                if isinstance(v, (int, float)) and math.isfinite(v)  # the str 'phase', 'nan'
            }
            self._call_wandb(f"step {step}", lambda run: run.log(numbers))

    def _call_wandb(self, what: str, fn: Callable[[Any], Any]) -> None:
        """``fn(run)``; a failure warns once and turns W&B logging off."""
        try:
            fn(self._wandb)
        except Exception as exc:  # any W&B failure: the run goes on without W&B
            self._wandb = None
            warnings.warn(
                f"W&B logging failed at {what} ({type(exc).__name__}: {exc}); it is off for "
                "the rest of this run (metrics.jsonl and TensorBoard go on)",
                RuntimeWarning,
                stacklevel=3,
            )

    def close(self) -> None:
        """Finish the TensorBoard and W&B writers (a second call does nothing)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._call_wandb("close", lambda run: run.finish())
            self._wandb = None


def _start_wandb(run_dir: Path, options: WandbOptions, resume: bool) -> Any:
    """A W&B run writing under ``run_dir/wandb``, continuing the kept run id on resume."""
    if options.mode not in WANDB_MODES:
        raise ConfigError(
            f"logging.wandb_mode: must be one of {list(WANDB_MODES)}, got {options.mode!r}"
        )
    wandb = import_wandb()
    run_id = wandb_run_id(run_dir, resume)
    run = None
    try:
        run = wandb.init(
            project=options.project,
            name=options.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=options.mode,
            reinit="create_new",
        )
        # a resume may change keys of the config (rl.steps, ...)
        run.config.update(options.config, allow_val_change=True)
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
    except Exception as exc:
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # the error below is the one to report
                pass
        raise ConfigError(
            f"logging.wandb: could not start the W&B run ({type(exc).__name__}: {exc}); "
            "logging.wandb_mode=offline logs without a network or an account"
        ) from exc
    return run


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
