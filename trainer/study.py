"""Paired multi-seed studies: does an algorithm change beat its baseline beyond the seed spread?

Launch::

    python -m trainer.study --config trainer/configs/study_tapo.yaml
    python -m trainer.study --config trainer/configs/study_tapo.yaml seeds=[0] parallel=1 \
        rl.steps=2 warmup.steps=4                # study keys and run overrides mixed
    python -m trainer.study --config trainer/configs/study_tapo.yaml --report-only

A study config names a run config (``base``), overrides every run shares, the seeds and the
arms (each a list of run overrides). For every seed, one warm-up run (``rl.steps=0``) is
trained once; every arm of that seed starts from a copy of its checkpoint, so the arms of a
seed share the warm-up policy, the training questions and the rollout seeds of each step
(paired comparisons). Runs execute as ``python -m trainer.train`` subprocesses, ``parallel``
at a time, each writing ``train.log`` in its run directory. A finished run (its
``summary.json`` reports every RL step) is skipped, an interrupted one resumes from its last
checkpoint: run the command again to continue a study.

The report (``out_dir``: ``README.md``, ``results.json``, ``curves.png``,
``statistics.png``) gives per arm, over seeds: final held-out pass@1 (mean +- std), its
paired difference to the first arm, RL steps to reach ``threshold``, the area under the
held-out curve (mean pass@1 over the RL steps, trapezoid rule), and the ground-truth
statistics of ``trainer/credit.py`` averaged over the RL steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import RUN_MARKER, ConfigError, _build, load_config, parse_overrides

STUDY_KEYS = (
    "name",
    "base",
    "overrides",
    "seeds",
    "arms",
    "baselines",
    "threshold",
    "parallel",
    "out_dir",
    "run_dir",
)
STATISTICS = (
    "truth/failing_traj_with_good_call",
    "truth/failing_call_good_rate",
    "truth/lift_precision",
    "truth/lift_recall",
    "truth/mean_lift_good",
    "truth/mean_lift_bad",
)


@dataclass
class StudyConfig:
    """A study: ``arms`` maps an arm name to its run overrides. Each arm is compared with
    its ``baselines`` entry (seed by seed), by default the first arm."""

    name: str = "study"
    base: str = "tiny_grpo_tapo.yaml"  # run config, relative to the study file
    overrides: list[str] = field(default_factory=list)  # every run
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, Any] = field(default_factory=dict)  # arm -> the arm it is compared with
    threshold: float = 0.6  # held-out pass@1 for "steps to threshold"
    parallel: int = 2  # runs at once; each gets cores // parallel threads
    out_dir: str = "docs/study/study"
    run_dir: str = "runs/study"


def load_study(path: str | Path, cli: Sequence[str] = ()) -> tuple[StudyConfig, Path]:
    """The study config and the path of its run config; ``cli`` mixes study keys
    (``seeds=[0]``) and run overrides (``rl.steps=2``, appended to ``overrides``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config {str(path)!r} does not exist")
    tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    extra = []
    for item in cli:
        key = item.split("=", 1)[0].strip()
        if key in STUDY_KEYS:
            tree.update(parse_overrides([item]))
        else:
            extra.append(item)
    study = _build(StudyConfig, tree)
    study.overrides = list(study.overrides) + extra
    base = (path.parent / study.base).resolve()
    if not base.is_file():
        raise ConfigError(f"base: run config {str(base)!r} does not exist")
    if not study.arms:
        raise ConfigError("arms: a study needs at least one arm")
    if not study.seeds or len(set(study.seeds)) != len(study.seeds):
        raise ConfigError(f"seeds: need distinct seeds, got {study.seeds}")
    if study.parallel < 1:
        raise ConfigError(f"parallel: must be >= 1, got {study.parallel}")
    if not 0 < study.threshold <= 1:
        raise ConfigError(f"threshold: must be in (0, 1], got {study.threshold}")
    for arm, other in study.baselines.items():
        if arm not in study.arms or other not in study.arms:
            raise ConfigError(f"baselines.{arm}: both {arm!r} and {other!r} must be arms")
    for arm, items in study.arms.items():
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"arms.{arm}: must be a list of key=value overrides")
        if "/" in arm or arm.startswith("."):
            raise ConfigError(f"arms: {arm!r} is not a valid directory name")
        # every arm must be a valid run config: fail now, not after the warm-ups
        load_config(base, study.overrides + items + [f"seed={study.seeds[0]}"])
    return study, base


@dataclass
class Run:
    name: str  # directory under run_dir
    seed: int
    overrides: list[str]
    warmup: bool = False


def _summary(run_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _launch(run: Run, study: StudyConfig, base: Path, threads: int) -> tuple[str, float, int]:
    """Train one run to completion (resuming it when it has a checkpoint)."""
    run_root = Path(study.run_dir)
    path = run_root / run.name
    args = [sys.executable, "-m", "trainer.train", "--config", str(base)]
    if (path / "checkpoints").is_dir():
        args.append("--resume")
    elif not run.warmup:
        warm = run_root / f"warmup_seed{run.seed}"
        shutil.copytree(
            warm,
            path,
            ignore=shutil.ignore_patterns("tensorboard", "plots", "train.log", "summary.json"),
        )
        args.append("--resume")
    args += [
        *study.overrides,
        *run.overrides,
        f"seed={run.seed}",
        f"logging.run_dir={run_root}",
        f"logging.name={run.name}",
        "logging.progress=false",
        f"dist.threads_per_rank={threads}",
    ]
    path.mkdir(parents=True, exist_ok=True)
    (path / RUN_MARKER).touch()  # the trainer's own run directory (it holds train.log)
    t0 = time.perf_counter()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(path / "train.log", "a", encoding="utf-8") as log:
        log.write("$ " + " ".join(args) + "\n")
        log.flush()
        rc = subprocess.call(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    return run.name, time.perf_counter() - t0, rc


def _done(path: Path, rl_steps: int) -> bool:
    summary = _summary(path)
    return summary is not None and summary.get("rl_steps") == rl_steps


def run_study(study: StudyConfig, base: Path, progress: bool = True) -> None:
    """Train every warm-up and arm run that is not finished yet."""
    rl_steps = load_config(base, study.overrides).rl.steps
    run_root = Path(study.run_dir)
    warmups = [
        Run(f"warmup_seed{s}", s, ["rl.steps=0", "eval.at_start=false"], warmup=True)
        for s in study.seeds
    ]
    arms = [
        Run(f"{arm}_seed{s}", s, list(items))
        for s in study.seeds
        for arm, items in study.arms.items()
    ]
    todo_w = [r for r in warmups if not _done(run_root / r.name, 0)]
    todo_a = [r for r in arms if not _done(run_root / r.name, rl_steps)]
    threads = max(1, (os.cpu_count() or 1) // study.parallel)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(todo_w) + len(todo_a),
            desc=f"study {study.name}",
            unit="run",
            dynamic_ncols=True,
            file=sys.stdout,
        )
    failed = []
    for batch in (todo_w, todo_a):
        with ThreadPoolExecutor(max_workers=study.parallel) as pool:
            for name, seconds, rc in pool.map(lambda r: _launch(r, study, base, threads), batch):
                summary = _summary(run_root / name) or {}
                final = summary.get("heldout_pass@1", {}).get("final")
                msg = f"{name}: {'failed (see train.log)' if rc else 'done'} in {seconds:.0f} s" + (
                    f", held-out pass@1 {final:.3f}" if final is not None and not rc else ""
                )
                if rc:
                    failed.append(name)
                if bar is not None:
                    bar.write(msg)
                    bar.update(1)
                else:
                    print(msg, flush=True)
        if failed:
            break  # an arm cannot start without its warm-up
    if bar is not None:
        bar.close()
    if failed:
        raise RuntimeError(
            f"runs failed: {failed}; their logs: "
            + ", ".join(str(run_root / f / "train.log") for f in failed)
        )


# ------------------------------------------------------------------------------- report


def _curve(run_path: Path) -> list[tuple[int, float]]:
    """Held-out pass@1 by RL step: 0 after the warm-up, every eval, the final one."""
    summary = _summary(run_path) or {}
    points = {}
    for tag, value in summary.get("heldout_pass@1", {}).items():
        if tag == "after_warmup":
            points[0] = value
        elif tag.startswith("rl_step_"):
            points[int(tag[len("rl_step_") :])] = value
    if "final" in summary.get("heldout_pass@1", {}):
        points[int(summary["rl_steps"])] = summary["heldout_pass@1"]["final"]
    return sorted(points.items())


def _rl_rows(run_path: Path) -> list[dict[str, Any]]:
    from .metrics import read_metrics

    return [r for r in read_metrics(run_path / "metrics.jsonl") if r.get("phase") == "rl"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _auc(curve: list[tuple[int, float]]) -> float:
    if len(curve) < 2:
        return curve[0][1] if curve else math.nan
    area = sum(
        (x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False)
    )
    return area / (curve[-1][0] - curve[0][0])


def collect(study: StudyConfig) -> dict[str, Any]:
    """Per arm and seed: the held-out curve, its summaries and the step statistics."""
    run_root = Path(study.run_dir)
    out: dict[str, Any] = {}
    for arm in study.arms:
        seeds = {}
        for s in study.seeds:
            path = run_root / f"{arm}_seed{s}"
            curve = _curve(path)
            if not curve:
                continue
            rows = _rl_rows(path)
            stats = {}
            lifted = sum(r.get("truth/lifted_calls", 0) or 0 for r in rows)
            for key in STATISTICS:
                values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
                if not lifted and ("lift" in key):  # an arm that lifts nothing (TAPO off)
                    values = []
                stats[key] = sum(values) / len(values) if values else math.nan
            reached = next((x for x, y in curve if y >= study.threshold), None)
            summary = _summary(path) or {}
            seeds[s] = {
                "curve": curve,
                "final": curve[-1][1],
                "auc": _auc(curve),
                "wall_time_s": summary.get("wall_time_s"),
                "steps_to_threshold": reached,
                "statistics": stats,
                "step_statistics": {k: [r.get(k) for r in rows] for k in STATISTICS},
            }
        out[arm] = seeds
    return out


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_report(study: StudyConfig, base: Path, results: dict[str, Any]) -> Path:
    """``README.md``, ``results.json``, ``curves.png``, ``statistics.png`` under ``out_dir``."""
    out = Path(study.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arms = list(study.arms)

    def baseline_of(arm: str) -> str:
        return study.baselines.get(arm, arms[0])

    walls = [
        r["wall_time_s"]
        for seeds in results.values()
        for r in seeds.values()
        if r.get("wall_time_s")
    ]
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or "unknown"
    )
    lines = [
        f"# Study `{study.name}`",
        "",
        f"Written {time.strftime('%Y-%m-%d')} from the runs under `{study.run_dir}` (report "
        f"written at commit {commit}); {len(walls)} RL runs of "
        f"{min(walls, default=0) / 60:.1f}-{max(walls, default=0) / 60:.1f} min each "
        f"(wall time, {study.parallel} at a time on this machine).",
        "",
        f"Command: `python -m trainer.study --config <this study's config>`; run config "
        f"`{base.name}` with `{' '.join(study.overrides)}`; seeds {study.seeds}; every arm of a "
        "seed starts from that seed's warm-up checkpoint (paired). Held-out pass@1 is greedy "
        "exact match on the fixed held-out questions; the statistics are means over the RL "
        "steps of the ground-truth metrics (failing = negative advantage; a call is good "
        "when its observation holds a gold evidence document).",
        "",
        "| arm | overrides | seeds | final held-out pass@1 | paired Δ vs its baseline | "
        f"steps to {study.threshold:g} | AUC of held-out curve | failing traj. with a good call "
        "| failing calls good | lift precision | lift recall | mean lift good / bad |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    summary_rows = {}
    for arm in arms:
        seeds = results.get(arm, {})
        finals = [r["final"] for r in seeds.values()]
        baseline = results.get(baseline_of(arm), {})
        diffs = [r["final"] - baseline[s]["final"] for s, r in seeds.items() if s in baseline]
        reached = [
            r["steps_to_threshold"] for r in seeds.values() if r["steps_to_threshold"] is not None
        ]
        aucs = [r["auc"] for r in seeds.values()]

        def stat(key: str, seeds=seeds) -> float:
            vals = [
                r["statistics"][key] for r in seeds.values() if not math.isnan(r["statistics"][key])
            ]
            return sum(vals) / len(vals) if vals else math.nan

        row = {
            "seeds": len(seeds),
            "final": _mean_std(finals),
            "diff": _mean_std(diffs),
            "reached": len(reached),
            "steps": _mean_std(reached),
            "auc": _mean_std(aucs),
            **{k: stat(k) for k in STATISTICS},
        }
        summary_rows[arm] = row
        steps = (
            f"{row['steps'][0]:.0f} ({len(reached)}/{len(seeds)} seeds)"
            if reached
            else f"not reached (0/{len(seeds)})"
        )

        def pct(key: str, row=row) -> str:
            return "n/a" if math.isnan(row[key]) else f"{100 * row[key]:.0f}%"

        lift = (
            "n/a"
            if math.isnan(row["truth/mean_lift_good"])
            else f"{row['truth/mean_lift_good']:.3f} / {row['truth/mean_lift_bad']:.3f}"
        )
        overrides = " ".join(f"`{o}`" for o in study.arms[arm]) or "(none)"
        lines.append(
            f"| `{arm}` | {overrides} | {len(seeds)} | {_fmt(*row['final'])} | "
            f"{'—' if baseline_of(arm) == arm else _fmt(*row['diff']) + f' (vs `{baseline_of(arm)}`)'}"
            f" | {steps} | {_fmt(*row['auc'])} | "
            f"{pct('truth/failing_traj_with_good_call')} | {pct('truth/failing_call_good_rate')} | "
            f"{pct('truth/lift_precision')} | {pct('truth/lift_recall')} | {lift} |"
        )
    lines += ["", "![held-out curves](curves.png)", "", "![statistics](statistics.png)", ""]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")
    payload = {
        "study": study.__dict__,
        "summary": {a: {k: v for k, v in r.items()} for a, r in summary_rows.items()},
        "runs": {
            a: {
                str(s): {k: v for k, v in r.items() if k != "step_statistics"}
                for s, r in seeds.items()
            }
            for a, seeds in results.items()
        },
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    _plot(study, results, out)
    return out


def _mean_std_band(ax, xs: list, stats: list[tuple[float, float]], color: str, label: str) -> None:
    """Means over seeds as a line with markers, and a band of one standard deviation."""
    means = [m for m, _ in stats]
    ax.plot(xs, means, marker="o", markersize=3, color=color, label=label)
    low, high = [m - sd for m, sd in stats], [m + sd for m, sd in stats]
    ax.fill_between(xs, low, high, color=color, alpha=0.12)


def _plot(study: StudyConfig, results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {arm: f"C{i}" for i, arm in enumerate(study.arms)}
    first = next(iter(study.arms))
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(13, 4.2))
    for arm, seeds in results.items():
        curves = {s: dict(r["curve"]) for s, r in seeds.items()}
        if not curves:
            continue
        xs = sorted(set.intersection(*(set(c) for c in curves.values())))
        stats = [_mean_std([c[x] for c in curves.values()]) for x in xs]
        _mean_std_band(ax, xs, stats, colors[arm], f"{arm} (n={len(curves)})")
        other = study.baselines.get(arm, first)
        baseline = results.get(other, {})
        paired = [s for s in curves if s in baseline]
        if arm == other or not paired:
            continue
        base = {s: dict(baseline[s]["curve"]) for s in paired}
        xs_d = [x for x in xs if all(x in base[s] for s in paired)]
        diff = [_mean_std([curves[s][x] - base[s][x] for s in paired]) for x in xs_d]
        _mean_std_band(ax_diff, xs_d, diff, colors[arm], f"{arm} - {other}")
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out pass@1 (mean ± std over seeds)")
    ax.set_title(f"study {study.name}: held-out accuracy")
    ax_diff.axhline(0.0, color="black", linewidth=0.8)
    ax_diff.set_xlabel("RL step")
    ax_diff.set_ylabel("pass@1 minus its baseline, same seed (mean ± std)")
    ax_diff.set_title("paired difference to the baseline")
    for a in (ax, ax_diff):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)

    titles = {
        "truth/failing_traj_with_good_call": "failing trajectories with a good call",
        "truth/lift_precision": "lift precision (lifted calls that are good)",
        "truth/lift_recall": "lift recall (good failing calls lifted)",
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for arm, seeds in results.items():
            if "lift" in key and all(math.isnan(r["statistics"][key]) for r in seeds.values()):
                continue  # an arm that lifts nothing
            series = [r["step_statistics"][key] for r in seeds.values()]
            if not series:
                continue
            steps = min(len(s) for s in series)
            mean = []
            for i in range(steps):
                vals = [s[i] for s in series if isinstance(s[i], (int, float))]
                mean.append(sum(vals) / len(vals) if vals else math.nan)
            smooth = []
            for i in range(steps):
                window = [v for v in mean[max(0, i - 9) : i + 1] if not math.isnan(v)]
                smooth.append(sum(window) / len(window) if window else math.nan)
            if any(not math.isnan(v) for v in smooth):
                ax.plot(range(1, steps + 1), smooth, label=arm, color=colors[arm])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step (10-step mean over seeds)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "statistics.png", dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.study", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="study YAML (trainer/configs/study_*.yaml)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the finished runs, train nothing",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help=f"study keys ({', '.join(STUDY_KEYS)}) or run overrides",
    )
    args = parser.parse_args(argv)
    try:
        study, base = load_study(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if not args.report_only:
        try:
            run_study(study, base)
        except RuntimeError as exc:
            print(f"study stopped: {exc}", file=sys.stderr)
            return 1
    out = write_report(study, base, collect(study))
    print((out / "README.md").read_text(encoding="utf-8"))
    print(f"report: {out}/README.md, results.json, curves.png, statistics.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
