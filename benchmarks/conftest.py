"""Prints the side-by-side ratio tables of ``common.py`` at the end of a benchmark session.

The tables are also merged into ``benchmarks/results/ratios-<device>.json``: the cases of this
session replace the same cases of earlier sessions (each case keeps the environment it was
measured in), so the suites can be run one at a time.
"""

from __future__ import annotations

import json

from .common import _CASES, DEVICE, RESULTS_DIR, device_name, environment, ratio_tables

SHARE_BASE = "train_step"  # cases with this provider print shares of it instead of ratios


def _line(case: str, providers: dict[str, float]) -> str:
    ref = providers.get("reference")
    floor = providers.get("floor")
    base = providers.get(SHARE_BASE)
    parts = []
    for name, t in sorted(providers.items(), key=lambda kv: kv[1]):
        s = f"{name} {t * 1e3:.3f} ms"
        if ref and name != "reference":
            s += f" (speedup {ref / t:.2f}x vs reference)"
        if floor and name != "floor":
            s += f" [{t / floor:.2f}x floor]"
        if base and name != SHARE_BASE:
            s += f" [{100 * t / base:.3f}% of {SHARE_BASE}]"
        parts.append(s)
    return f"{case}: " + "; ".join(parts)


def _derive_whole_tapo_path() -> None:
    """``tapo[whole path]`` = encode + fused_correct + the lift's share of the loss, from the
    medians of this run (the lift part is ``loss+lift - loss``, floored at 0)."""
    for providers in _CASES.values():
        parts = ("tapo[encode+correct]", "loss+lift", "loss")
        if all(p in providers for p in parts):
            lift = max(0.0, providers["loss+lift"] - providers["loss"])
            providers["tapo[whole path]"] = providers["tapo[encode+correct]"] + lift


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _CASES:
        return
    _derive_whole_tapo_path()
    tr = terminalreporter
    tr.section(f"side-by-side ratios on {device_name()} (median time / reference; / floor)")
    for case, providers in sorted(_CASES.items()):
        tr.write_line(_line(case, providers))
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"ratios-{DEVICE}.json"
    cases = {}
    if out.exists():
        try:
            cases = json.loads(out.read_text()).get("cases", {})
        except (json.JSONDecodeError, AttributeError):
            cases = {}
    env = environment()
    for case, providers in ratio_tables().items():
        cases[case] = {"environment": env, "median_seconds": providers}
    out.write_text(
        json.dumps({"device": device_name(), "cases": dict(sorted(cases.items()))}, indent=2) + "\n"
    )
    tr.write_line(f"written {out}")
