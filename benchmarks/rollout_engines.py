"""Rollout throughput of the two engines side by side, and the vLLM weight-sync time.

Run in the vLLM environment (``make vllm-env``)::

    .venv-vllm/bin/python benchmarks/rollout_engines.py [--out benchmarks/results/rollout-engines-cpu.json]

For each model (the embedded default, and a Qwen2-0.5B-sized body with the task's small
vocabulary, both random init, fp32), both engines run the same multi-turn episodes of the
synthetic search task with the search tool: greedy, so both generate exactly the same tokens
(checked), and sampled at temperature 1. Throughput is policy tokens per second of the whole
``rollout`` call (tool execution included), the median of ``--repeats`` runs after one
warm-up run. Weight sync: ``VllmEngine.sync_weights`` of the whole state dict, median.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainer.config import ModelConfig, RolloutConfig
from trainer.modeling import format_call, tiny_model, train_tokenizer
from trainer.rollout import RolloutEngine
from trainer.rollout.vllm_engine import VllmEngine, make_llm
from trainer.tasks import synthetic_task
from trainer.tools import build_registry

MODELS = {
    "tiny (embedded default, 0.4M)": ModelConfig(),
    "Qwen2-0.5B-sized body (24 x 896, random init)": ModelConfig(
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        max_position_embeddings=512,
    ),
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/rollout-engines-cpu.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import transformers
    import vllm

    task = synthetic_task(num_entities=24, attributes=["home city", "pet"], seed=0)
    texts = list(task.texts()) + [format_call("search", {"query": e.query}) for e in task.train]
    tok = train_tokenizer(texts, vocab_size=1024)
    registry = build_registry(["search"], task.corpora, timeout_s=5.0)
    results = []
    for name, mcfg in MODELS.items():
        small = mcfg.hidden_size > 256
        n_episodes, budget = (8, 16) if small else (64, 48)
        rcfg = RolloutConfig(
            max_turns=3,
            max_new_tokens_per_turn=budget,
            max_total_tokens=64 + 3 * (budget + 48),
            batch_size=n_episodes,
        )
        model = tiny_model(mcfg, len(tok), tok.pad_token_id, tok.eos_token_id, seed=0).eval()
        params = sum(p.numel() for p in model.parameters())
        examples = (task.train * 8)[:n_episodes]
        groups = list(range(n_episodes))
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            tok.save_pretrained(d)
            llm = make_llm(
                d, dtype="float32", max_model_len=rcfg.max_total_tokens + budget, kv_cache_mb=512
            )
            hf = RolloutEngine(model, tok, registry, rcfg, max_obs_tokens=32)
            vl = VllmEngine(model, tok, registry, rcfg, llm, max_obs_tokens=32)
            row = {"model": name, "parameters": params, "episodes": n_episodes}
            for mode, greedy in (("greedy", True), ("sampled", False)):
                outs = {}
                for label, eng in (("hf", hf), ("vllm", vl)):
                    run = functools.partial(eng.rollout, examples, groups, seed=0, greedy=greedy)
                    seconds, eps = timed(run, args.repeats)
                    tokens = sum(sum(e.mask) for e in eps)
                    outs[label] = eps
                    row[f"{mode}_{label}_tokens"] = tokens
                    row[f"{mode}_{label}_s"] = seconds
                    row[f"{mode}_{label}_tokens_per_s"] = tokens / seconds
                row[f"{mode}_vllm_over_hf"] = (
                    row[f"{mode}_vllm_tokens_per_s"] / row[f"{mode}_hf_tokens_per_s"]
                )
                if greedy:
                    row["greedy_identical"] = [e.token_ids for e in outs["hf"]] == [
                        e.token_ids for e in outs["vllm"]
                    ]
            state = model.state_dict()
            sync = functools.partial(vl.sync_weights, list(state.items()))
            sync_s, _ = timed(sync, args.repeats)
            row["weight_sync_s"] = sync_s
            vl.close()
        print(json.dumps(row))
        results.append(row)
    registry.close()
    out = {
        "device": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
