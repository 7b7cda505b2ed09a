"""The cost of TAPO inside a training step of the tiny embedded model, on this machine.

A single-process ``trainer.train.Trainer`` on the embedded default (tiny Qwen2-style model,
bundled search task) is warmed up on demonstrations so that its rollouts call the search
tool, then timed at a realistic batch: 8 groups of 8 trajectories, up to 4 tool calls each.
Side by side in one run:

- ``train_step``: one whole RL step (rollout, rewards, TAPO, two policy updates, weight sync);
- ``update``: the policy-update part of the step alone (forward, loss, backward, optimizer);
- ``encode``: the calls' parameter vectors as the trainer builds them (``tapo.witness=tool``:
  the documents each search retrieved); ``encode[arguments]``: hashed 3-grams of the queries;
- ``fused_correct[rollout]``: ``tapo_kernels.fused_correct`` on a real rollout batch's calls;
- ``tapo[encode+correct]``: both, as one step of the trainer runs them
  (``trainer.credit.correct_credit``);
- ``fused_correct[4 calls]``: the op on a synthetic batch of the same shape with exactly 4
  valid calls per trajectory and D=256 parameter vectors;
- ``loss+lift`` / ``loss``: ``policy_loss`` forward+backward with and without the fused TAPO
  lift (the difference is the TAPO part of the loss).

The terminal summary prints every provider as a share of ``train_step``, and the whole TAPO
path of a step, ``tapo[whole path]`` = ``tapo[encode+correct]`` + (``loss+lift`` - ``loss``),
derived from those medians of the same run. Run:
``pytest benchmarks/bench_overhead.py --benchmark-only``.
"""

from __future__ import annotations

import random

import pytest
import torch

import tapo_kernels
from tapo_kernels.reference import group_advantages
from tapo_kernels.testing import correct_batch

from .common import median_s, record

CASE = "TAPO overhead in a tiny-model RL step (8 groups x 8)"
GROUPS, GROUP_SIZE, MAX_CALLS = 8, 8, 4
WARMUP_STEPS = 150  # enough supervised steps for the policy to emit tool calls


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from trainer.config import load_config
    from trainer.credit import encode_calls
    from trainer.distributed import cleanup
    from trainer.rollout import collate
    from trainer.train import Trainer

    run_dir = tmp_path_factory.mktemp("overhead")
    cfg = load_config(
        None,
        [
            f"logging.run_dir={run_dir}",
            "logging.name=overhead",
            "logging.progress=false",
            "logging.tensorboard=false",
            "logging.plots=false",
            f"warmup.steps={WARMUP_STEPS}",
            f"rl.prompts_per_step={GROUPS}",
            f"rollout.group_size={GROUP_SIZE}",
            f"rollout.max_turns={MAX_CALLS + 1}",
            "checkpoint.every=0",
            "eval.at_start=false",
            "eval.every=0",
        ],
    )
    trainer = Trainer(cfg)
    trainer.warmup()
    # one real rollout batch for the fused_correct provider
    rng = random.Random(0)
    examples = [
        trainer.task.train[i]
        for i in rng.sample(range(len(trainer.task.train)), GROUPS)
        for _ in range(GROUP_SIZE)
    ]
    groups = [j for j in range(GROUPS) for _ in range(GROUP_SIZE)]
    episodes = trainer.engine.rollout(examples, groups, seed=1234)
    for ep in episodes:
        ep.reward = float(rng.random() < 0.5)  # a mix of successes and failures in every group
    batch = collate(episodes, trainer.tokenizer.pad_token_id)
    batch.calls.params = encode_calls(trainer.registry, episodes, "tool")
    yield trainer, batch, episodes
    cleanup(trainer.ctx)


def _correct_args(trainer, batch):
    seq_adv = group_advantages(batch.rewards, batch.group_ids)
    adv = seq_adv[:, None] * batch.mask
    return adv, seq_adv, batch.group_ids, batch.calls, trainer.sim_kind


def test_train_step(benchmark, setup):
    trainer, _, _ = setup
    steps = iter(range(1, 1000))
    shares = []

    def step():
        metrics = trainer.rl_step(next(steps))
        shares.append((metrics["perf/fused_correct_share"], metrics["train/tool_call_rate"]))

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    record(
        benchmark,
        CASE,
        "train_step",
        groups=GROUPS,
        group_size=GROUP_SIZE,
        in_step_fused_correct_share=[s for s, _ in shares],
        tool_call_rate=[r for _, r in shares],
    )


def test_update(benchmark, setup):
    from trainer.loss import loss_knobs

    trainer, batch, _ = setup
    adv, seq_adv, *_ = _correct_args(trainer, batch)
    knobs = loss_knobs(trainer.cfg)

    def update():
        trainer._update(batch, adv, None, None, None, rl_step=1)

    benchmark.pedantic(update, rounds=5, iterations=1, warmup_rounds=1)
    record(benchmark, CASE, "update", B=batch.shape[0], T=batch.shape[1], knobs=str(knobs))


def test_fused_correct_rollout(benchmark, setup):
    trainer, batch, _ = setup
    adv, seq_adv, gid, calls, kinds = _correct_args(trainer, batch)
    result = benchmark(lambda: tapo_kernels.fused_correct(adv, seq_adv, gid, calls, kinds))
    stats = result.stats()
    record(
        benchmark,
        CASE,
        "fused_correct[rollout]",
        B=batch.shape[0],
        T=batch.shape[1],
        calls=len(calls),
        failing_calls=stats.failing_calls,
        corrected_calls=stats.corrected_calls,
        backend=tapo_kernels.CPU_BACKEND["fused_correct"],
    )


@pytest.mark.parametrize("mode", ["tool", "arguments"])
def test_encode(benchmark, setup, mode):
    from trainer.credit import encode_calls

    trainer, batch, episodes = setup
    benchmark(lambda: encode_calls(trainer.registry, episodes, mode))
    calls = len(batch.calls)
    provider = "encode" if mode == "tool" else f"encode[{mode}]"
    record(
        benchmark,
        CASE,
        provider,
        calls=calls,
        us_per_call=median_s(benchmark) * 1e6 / max(calls, 1),
    )


def test_tapo_encode_and_correct(benchmark, setup):
    from trainer.config import TapoConfig
    from trainer.credit import correct_credit

    trainer, batch, episodes = setup
    adv, seq_adv, *_ = _correct_args(trainer, batch)
    cfg = TapoConfig()
    benchmark(
        lambda: correct_credit(
            cfg, trainer.registry, trainer.sim_kind, episodes, batch, adv, seq_adv, seed=0
        )
    )
    record(benchmark, CASE, "tapo[encode+correct]", calls=len(batch.calls))


def test_fused_correct_four_calls(benchmark, setup):
    trainer, batch, _ = setup
    B, T = batch.shape
    b = correct_batch(
        B=B, T=T, group_size=GROUP_SIZE, calls_per_row=MAX_CALLS, D=256, invalid_prob=0.0
    )
    benchmark(
        lambda: torch.ops.tapo.fused_correct(
            *b.op_args(), theta=0.7, alpha_min=0.3, beta=0.8, batch_scope=False
        )
    )
    record(benchmark, CASE, "fused_correct[4 calls]", B=B, T=T, calls=B * MAX_CALLS, D=256)


@pytest.mark.parametrize("lift", [True, False], ids=["loss+lift", "loss"])
def test_loss_tapo_part(benchmark, setup, lift):
    trainer, batch, _ = setup
    adv, seq_adv, gid, calls, kinds = _correct_args(trainer, batch)
    B, T = batch.shape
    result = tapo_kernels.fused_correct(adv, seq_adv, gid, calls, kinds)
    extra = dict(call_map=calls.call_map(B, T), call_delta=result.delta) if lift else {}
    logp = (batch.old_logp + 0.05 * torch.randn(B, T)).requires_grad_(True)

    def full():
        out = tapo_kernels.policy_loss(
            logp, batch.old_logp, adv, batch.mask, preset="grpo", **extra
        )
        return torch.autograd.grad(out.loss, logp)

    benchmark(full)
    record(benchmark, CASE, "loss+lift" if lift else "loss", B=B, T=T)
