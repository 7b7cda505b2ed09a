"""Tool-parameter encoders at the trainer's batch size: 512 search queries per call.

``encode_text`` (hashed character 3-grams, one ``bincount`` over the batch, n-gram hashes
cached) against its definition written one n-gram at a time (``reference.encode_text``:
a tensor element update per n-gram), and ``encode_results`` (result-aware vectors of the
documents each call retrieved). Target: ``encode_text`` <= 20 us per call at 512 calls.
Run: ``pytest benchmarks/bench_params.py --benchmark-only``.
"""

from __future__ import annotations

import random

import pytest

import tapo_kernels
from tapo_kernels import reference
from trainer.tasks.synthetic import ATTRIBUTES, entity_names, fact_sentence

from .common import median_s, record

CALLS = 512


def _queries(n: int) -> tuple[list[str], list[list[str]]]:
    """Realistic queries (careful and sloppy) and the document each one retrieved."""
    rng = random.Random(0)
    names = entity_names(96, seed=0)
    queries, results = [], []
    for _ in range(n):
        name, attribute = rng.choice(names), rng.choice(list(ATTRIBUTES))
        queries.append(name if rng.random() < 0.3 else f"{name} {attribute}")
        results.append([fact_sentence(attribute, name, rng.choice(ATTRIBUTES[attribute]))])
    return queries, results


@pytest.mark.parametrize("provider", ["ours", "reference"])
def test_encode_text(benchmark, provider):
    queries, _ = _queries(CALLS)
    fn = tapo_kernels.encode_text if provider == "ours" else reference.encode_text
    out = benchmark(lambda: fn(queries))
    assert out.shape == (CALLS, 256)
    record(
        benchmark,
        f"encode_text {CALLS} queries",
        provider,
        calls=CALLS,
        us_per_call=median_s(benchmark) * 1e6 / CALLS,
    )


def test_encode_results(benchmark):
    _, results = _queries(CALLS)
    benchmark(lambda: tapo_kernels.encode_results(results))
    record(
        benchmark,
        f"encode_results {CALLS} calls",
        "ours",
        calls=CALLS,
        us_per_call=median_s(benchmark) * 1e6 / CALLS,
    )
