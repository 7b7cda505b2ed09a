"""Render benchmark results as a Markdown table (for the README).

Usage: ``python benchmarks/render.py [benchmarks/results/ratios-cpu.json ...]``, or
``python benchmarks/render.py --compare BEFORE.json AFTER.json`` for two runs side by side
(e.g. two commits). Reads the ratio files written at the end of a benchmark session
(``conftest.py``) or a pytest-benchmark ``--benchmark-json`` file, and prints one table per
file with the median time of every provider, its speedup over the eager reference, its
multiple of the floor and, for the overhead case, its share of a training step.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> tuple[dict, dict[str, dict[str, float]]]:
    data = json.loads(path.read_text())
    if "cases" in data:  # ratios file: every case with the environment it was measured in
        envs = [c["environment"] for c in data["cases"].values()]
        env = dict(envs[0]) if envs else {}
        env["commit"] = ", ".join(sorted({e.get("commit") or "?" for e in envs}))
        return env, {case: c["median_seconds"] for case, c in data["cases"].items()}
    cases: dict[str, dict[str, float]] = defaultdict(dict)  # pytest-benchmark JSON
    env = {}
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        if "case" in info:
            cases[info["case"]][info["provider"]] = b["stats"]["median"]
            env = {k: info.get(k) for k in ("device", "torch", "triton", "commit")}
    return env, dict(cases)


def render(env: dict, cases: dict[str, dict[str, float]]) -> str:
    lines = [
        f"Device: {env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}, "
        f"commit {env.get('commit')}",
        "",
        "| case | provider | median ms | speedup vs reference | x floor | share of train step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for case, providers in sorted(cases.items()):
        ref, floor = providers.get("reference"), providers.get("floor")
        step = providers.get("train_step")
        for name, t in sorted(providers.items(), key=lambda kv: kv[1]):
            speed = f"{ref / t:.2f}x" if ref else ""
            fl = f"{t / floor:.2f}" if floor else ""
            share = f"{100 * t / step:.3f}%" if step else ""
            lines.append(f"| {case} | {name} | {t * 1e3:.3f} | {speed} | {fl} | {share} |")
    return "\n".join(lines)


def compare(before: Path, after: Path) -> str:
    """Every provider measured in both files: its two medians and ``after / before``."""
    (env_a, a), (env_b, b) = load(before), load(after)
    lines = [
        f"Before: {before.name} (commit {env_a.get('commit')}); after: {after.name} "
        f"(commit {env_b.get('commit')}); device {env_b.get('device')}",
        "",
        "| case | provider | before ms | after ms | after / before |",
        "|---|---|---:|---:|---:|",
    ]
    ratios = []
    for case in sorted(set(a) & set(b)):
        for name in sorted(set(a[case]) & set(b[case])):
            t0, t1 = a[case][name], b[case][name]
            ratios.append(t1 / t0)
            lines.append(f"| {case} | {name} | {t0 * 1e3:.3f} | {t1 * 1e3:.3f} | {t1 / t0:.3f} |")
    if ratios:
        ratios.sort()
        lines += [
            "",
            f"after / before over {len(ratios)} providers: median "
            f"{ratios[len(ratios) // 2]:.3f}, min {ratios[0]:.3f}, max {ratios[-1]:.3f}",
        ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--compare"]:
        if len(argv) != 3:
            sys.exit("usage: render.py --compare BEFORE.json AFTER.json")
        print(compare(Path(argv[1]), Path(argv[2])))
        return
    paths = [Path(p) for p in argv] or sorted(Path(__file__).parent.glob("results/ratios-*.json"))
    for path in paths:
        print(f"### {path.name}\n")
        print(render(*load(path)))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
