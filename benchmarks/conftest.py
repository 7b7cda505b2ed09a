"""Prints the side-by-side ratio tables of ``common.py`` at the end of a benchmark session."""

from __future__ import annotations

import json

from .common import DEVICE, RESULTS_DIR, _CASES, device_name, environment, ratio_tables


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _CASES:
        return
    tr = terminalreporter
    tr.section(f"side-by-side ratios on {device_name()} (median time / reference; / floor)")
    for case, providers in sorted(_CASES.items()):
        ref = providers.get("reference")
        floor = providers.get("floor")
        parts = []
        for name, t in sorted(providers.items(), key=lambda kv: kv[1]):
            s = f"{name} {t * 1e3:.3f} ms"
            if ref and name != "reference":
                s += f" (speedup {ref / t:.2f}x vs reference)"
            if floor and name != "floor":
                s += f" [{t / floor:.2f}x floor]"
            parts.append(s)
        tr.write_line(f"{case}: " + "; ".join(parts))
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"ratios-{DEVICE}.json"
    out.write_text(json.dumps({"environment": environment(), "mean_seconds": ratio_tables()}, indent=2))
    tr.write_line(f"written {out}")
