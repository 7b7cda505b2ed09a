"""The benchmark table renderer: ratio files, pytest-benchmark JSON, two runs compared."""

import json
from pathlib import Path

from benchmarks import render


def _bench_json(path: Path, medians: dict[tuple[str, str], float], commit: str) -> Path:
    benchmarks = [
        {
            "stats": {"median": t},
            "extra_info": {"case": c, "provider": p, "device": "cpu", "commit": commit},
        }
        for (c, p), t in medians.items()
    ]
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return path


def test_render_reports_speedup_and_floor(tmp_path):
    path = _bench_json(
        tmp_path / "a.json",
        {("loss", "reference"): 4e-3, ("loss", "op"): 1e-3, ("loss", "floor"): 5e-4},
        "abc",
    )
    table = render.render(*render.load(path))
    assert "| loss | op | 1.000 | 4.00x | 2.00 |" in table
    assert "commit abc" in table


def test_compare_lists_common_providers_with_their_ratio(tmp_path):
    before = _bench_json(
        tmp_path / "before.json", {("loss", "op"): 2e-3, ("loss", "only_before"): 1e-3}, "old"
    )
    after = _bench_json(tmp_path / "after.json", {("loss", "op"): 3e-3, ("fc", "op"): 1e-3}, "new")
    table = render.compare(before, after)
    assert "| loss | op | 2.000 | 3.000 | 1.500 |" in table
    assert "only_before" not in table and "| fc |" not in table
    assert "over 1 providers: median 1.500" in table
    assert "commit old" in table and "commit new" in table
