"""Two processes with FSDP2 over gloo (torchrun): every loss with TAPO on and off, the AXPO /
TARL / mixed-task configs, kill + resume.

Run by pytest, this file launches ``torchrun``; launched by torchrun (``python -m
torch.distributed.run ... tests/test_trainer_fsdp.py smoke <dir>``) it is the worker that
trains the six variants one after another in the same two processes.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.testing import TINY_RUN_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]

MICRO = [
    *TINY_RUN_OVERRIDES,
    "warmup.steps=2",
    "rollout.max_new_tokens_per_turn=24",
    "rollout.max_total_tokens=128",
    "eval.num_questions=2",
    "eval.k=2",
    "eval.at_start=false",
    "logging.tensorboard=false",
    "logging.plots=false",
]
VARIANTS = [(loss, tapo) for loss in ("grpo", "gspo", "sapo") for tapo in ("true", "false")]
TIMING_KEYS = ("perf/", "eval/time_s")


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TAPO_DISABLE_NATIVE": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_loss_with_and_without_tapo_trains_under_fsdp2(tmp_path):
    proc = torchrun(str(Path(__file__).resolve()), "smoke", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for loss, tapo in VARIANTS:
        run_dir = tmp_path / f"{loss}_tapo_{tapo}"
        rl = [r for r in rows(run_dir / "metrics.jsonl") if r.get("phase") == "rl"]
        assert [r["rl_step"] for r in rl] == [1, 2], (loss, tapo)
        for r in rl:
            assert math.isfinite(r["actor/loss"]) and math.isfinite(r["actor/grad_norm"]), (
                loss,
                tapo,
                r,
            )
            assert r["actor/skipped_steps"] == 0
            assert r["train/turns"] > 0
        assert (run_dir / "checkpoints" / "latest").is_file()
    assert "2 process(es) on cpu with FSDP2" in proc.stdout


# config file -> metric prefixes its steps must log
EXPLORE = {
    "tiny_grpo_tapo_axpo": ("axpo/", "tapo/"),
    "tiny_grpo_tarl": ("tarl/",),
    "tiny_grpo_tapo_axpo_tarl": ("axpo/", "tarl/", "tapo/", "task/arithmetic/"),
}


def test_axpo_tarl_and_mixed_configs_run_on_two_processes(tmp_path):
    proc = torchrun(str(Path(__file__).resolve()), "explore", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, prefixes in EXPLORE.items():
        rl = [r for r in rows(tmp_path / name / "metrics.jsonl") if r.get("phase") == "rl"]
        assert [r["rl_step"] for r in rl] == [1, 2], name
        for r in rl:
            assert math.isfinite(r["actor/loss"]) and r["actor/skipped_steps"] == 0, (name, r)
            for prefix in prefixes:
                assert any(k.startswith(prefix) for k in r), (name, prefix)
            for k, v in r.items():
                if k.startswith(("axpo/", "tarl/", "task/")):
                    assert math.isfinite(v) and v >= 0 or k.endswith("/reward"), (name, k, v)
        if "tarl/" in prefixes:
            # the judged turns: every turn gets exactly one verdict
            r = rl[-1]
            total = r["tarl/turn_pos_rate"] + r["tarl/turn_zero_rate"] + r["tarl/turn_neg_rate"]
            assert total == pytest.approx(1.0)


def test_the_vision_language_config_trains_two_steps_on_two_processes(tmp_path):
    """The VL config end to end: warm-up on demonstrations with images, rollouts that zoom and
    search images, TAPO on the calls (IoU for zooms), the loss from hidden states with the
    images, FSDP2 over the vision and text blocks, a checkpoint."""
    proc = torchrun(
        "-m",
        "trainer.train",
        "--config",
        "trainer/configs/tiny_vl_grpo_tapo.yaml",
        "model.hidden_size=32",
        "model.intermediate_size=64",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.num_kv_heads=1",
        "model.vision_layers=1",
        "model.vision_hidden_size=32",
        "model.vision_heads=2",
        "task.num_scenes=16",
        "task.num_demos=8",
        "warmup.steps=2",
        "warmup.batch_size=4",
        "rollout.group_size=4",
        "rl.prompts_per_step=2",
        "rl.steps=2",
        "eval.num_questions=2",
        "eval.k=0",
        "checkpoint.every=2",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.plots=false",
        f"logging.run_dir={tmp_path}",
        "logging.name=vl",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu with FSDP2" in proc.stdout
    rl = [r for r in rows(tmp_path / "vl" / "metrics.jsonl") if r.get("phase") == "rl"]
    assert [r["rl_step"] for r in rl] == [1, 2]
    for r in rl:
        assert math.isfinite(r["actor/loss"]) and r["actor/skipped_steps"] == 0, r
        assert r["train/turns"] > 0 and "tapo/call_correction_rate" in r
    assert (tmp_path / "vl" / "checkpoints" / "latest").is_file()
    # the run directory is a complete processor: tokenizer and image processor
    assert (tmp_path / "vl" / "tokenizer" / "preprocessor_config.json").is_file()


def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = [
        "-m",
        "trainer.train",
        *MICRO,
        "rl.steps=4",
        "checkpoint.every=2",
        f"logging.run_dir={tmp_path}",
    ]
    full = torchrun(*common, "logging.name=full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = torchrun(*common, "logging.name=resumed", "debug.kill_at_step=3")
    assert killed.returncode != 0  # SIGKILL in the middle of RL step 3
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").glob("step_*"))
    assert ckpts[-1] == "step_000004"  # warm-up (2 steps) + RL step 2
    resumed = torchrun(*common, "logging.name=resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = rows(tmp_path / "full" / "metrics.jsonl"), rows(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert len([r for r in a if r.get("phase") == "rl"]) == 4
    for ra, rb in zip(a, b, strict=True):
        same = {k: v for k, v in ra.items() if not k.startswith(TIMING_KEYS)}
        assert same == {k: rb[k] for k in same}, ra["step"]


def _smoke_worker(out_dir: str) -> None:
    """Train the six variants in this torchrun process pair (one process group for all)."""
    sys.path.insert(0, str(ROOT))
    from trainer.config import load_config
    from trainer.distributed import cleanup
    from trainer.train import Trainer

    trainer = None
    for loss, tapo in VARIANTS:
        cfg = load_config(
            None,
            [
                *MICRO,
                "rl.steps=2",
                "checkpoint.every=0",
                f"algo.loss={loss}",
                f"tapo.enabled={tapo}",
                f"logging.run_dir={out_dir}",
                f"logging.name={loss}_tapo_{tapo}",
            ],
        )
        trainer = Trainer(cfg)
        trainer.fit()
    cleanup(trainer.ctx)


def _explore_worker(out_dir: str) -> None:
    """Train two RL steps of each AXPO / TARL / mixed-task config in this process pair."""
    sys.path.insert(0, str(ROOT))
    from trainer.config import load_config
    from trainer.distributed import cleanup
    from trainer.train import Trainer

    trainer = None
    for name in EXPLORE:
        cfg = load_config(
            str(ROOT / "trainer" / "configs" / f"{name}.yaml"),
            [
                *MICRO,
                "task.attributes=[pet, home city]",  # the file's question kinds need two
                "rl.steps=2",
                "checkpoint.every=0",
                f"logging.run_dir={out_dir}",
                f"logging.name={name}",
            ],
        )
        trainer = Trainer(cfg)
        trainer.fit()
        trainer.scorer.close()
        trainer.registry.close()
    cleanup(trainer.ctx)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "smoke":
        _smoke_worker(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "explore":
        _explore_worker(sys.argv[2])
    else:
        pytest.main([__file__, "-q"])
