"""The training loop in one process: outputs, fault tolerance, checkpoints, metrics, CLI."""

import json
import math
import threading
import time

import pytest
import torch

from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.cli import main, run
from trainer.config import ModelConfig, load_config
from trainer.distributed import DistContext
from trainer.metrics import MetricsLogger, read_metrics
from trainer.modeling import TAGS, format_call, tiny_model
from trainer.testing import TINY_RUN_OVERRIDES, ScriptedLM
from trainer.train import Trainer

# a model and task small enough that a whole run takes seconds on one core
MICRO = [
    *TINY_RUN_OVERRIDES,
    "warmup.steps=4",
    "rollout.max_new_tokens_per_turn=48",
    "rollout.max_total_tokens=160",
    "rl.steps=2",
    "eval.num_questions=4",
    "eval.k=2",
    "checkpoint.every=1",
    "dist.threads_per_rank=1",
    "algo.num_minibatches=2",
]


def micro_config(tmp_path, *extra):
    return load_config(None, [*MICRO, f"logging.run_dir={tmp_path}", *extra])


def _always_search(trainer):
    """Sample from a scripted policy that searches once, then gives the reference answer."""
    scripts = {
        ex.question: [
            format_call("search", {"query": ex.query}),
            f"{TAGS.answer_open}{ex.answers[0]}{TAGS.answer_close}",
        ]
        for ex in trainer.task.train
    }
    trainer.engine.model = ScriptedLM(trainer.tokenizer, scripts)


def test_single_process_run_writes_every_output(tmp_path, capsys):
    cfg = micro_config(tmp_path, "logging.name=single")
    summary = run(cfg)
    run_dir = tmp_path / "single"
    rows = read_metrics(run_dir / "metrics.jsonl")
    rl = [r for r in rows if r.get("phase") == "rl"]
    assert [r["rl_step"] for r in rl] == [1, 2] and [r["step"] for r in rl] == [5, 6]
    for r in rl:
        for key in (
            "train/reward",
            "train/accuracy",
            "train/tool_call_rate",
            "actor/loss",
            "actor/clip_frac",
            "actor/mean_kl",
            "actor/entropy",
            "tapo/call_correction_rate",
            "tapo/trajectory_correction_rate",
            "perf/tokens_per_s",
            "perf/step_time_s",
            "perf/fused_correct_share",
            "perf/tapo_share",
            "perf/tapo_encode_s",
            "truth/failing_trajectories",
            "truth/lifted_calls",
        ):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), key
        assert 0 <= r["perf/fused_correct_share"] <= r["perf/tapo_share"] < 1
        # ground-truth rates are logged whenever their denominator is not empty
        if r["truth/failing_trajectories"] > 0:
            assert 0 <= r["truth/failing_traj_with_good_call"] <= 1
    evals = [r["eval/tag"] for r in rows if r.get("phase") == "eval"]
    assert evals == ["initial", "after_warmup", "final"]
    assert [r["step"] for r in rows if r.get("phase") == "warmup"] == [4]
    assert set(summary["heldout_pass@1"]) == {"initial", "after_warmup", "final"}
    for name in ("reward.png", "tapo.png", "heldout_accuracy.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert latest_checkpoint(run_dir).name == "step_000006"
    assert json.loads((run_dir / "summary.json").read_text())["rl_steps"] == 2
    out = capsys.readouterr().out
    assert "held-out accuracy (greedy pass@1)" in out and str(run_dir / "plots") in out


def test_tool_errors_timeouts_malformed_calls_and_nan_steps_do_not_stop_training(tmp_path):
    # the tool is patched in this process, so it runs on threads here (process isolation
    # with real fault tools: test_fault_tools_in_worker_processes_never_stop_a_run)
    cfg = micro_config(
        tmp_path,
        "logging.name=faults",
        "tools.timeout_s=0.2",
        "rl.steps=3",
        "debug.malformed_call_rate=0.3",
        "debug.nan_loss_steps=[2]",
        "warmup.steps=12",
        "eval.at_start=false",
        "tools.isolation=thread",
    )
    trainer = Trainer(cfg)
    search = trainer.registry.tools[0]
    real_run, calls = search.run, []

    def flaky(arguments, context):  # every third call raises, every third hangs past the timeout
        calls.append(1)
        if len(calls) % 3 == 0:
            raise RuntimeError("search backend down")
        if len(calls) % 3 == 1:
            time.sleep(1.0)
        return real_run(arguments, context)

    trainer.warmup()  # demonstrations use the real tool
    search.run = flaky
    # sample from a scripted policy that always searches (the micro model has not learned the
    # call format yet), train the real model on its episodes
    _always_search(trainer)
    m1 = trainer.rl_step(1)
    # 8 calls: a third hang (timeout), a third raise, and injected malformed calls on top
    assert m1["train/calls_per_episode"] == 1 and m1["train/invalid_call_rate"] >= 0.5
    assert math.isfinite(m1["actor/loss"]) and m1["actor/skipped_steps"] == 0

    def adam_steps():
        return {int(s["step"]) for s in trainer.optimizer.state.values()}

    assert adam_steps() == {2}  # two mini-batches, two optimizer steps
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    m2 = trainer.rl_step(2)  # the loss is NaN: both updates are skipped and logged
    assert m2["actor/skipped_steps"] == 2 and adam_steps() == {2}
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    m3 = trainer.rl_step(3)
    assert (
        m3["actor/skipped_steps"] == 0 and math.isfinite(m3["actor/loss"]) and adam_steps() == {4}
    )
    assert len(calls) >= 3  # the flaky tool really was hit, including a raise and a timeout
    trainer.state.update(phase="rl", rl_step=3, global_step=15)
    trainer._save()
    assert latest_checkpoint(tmp_path / "faults").name == "step_000015"


def test_fault_tools_in_worker_processes_never_stop_a_run(tmp_path):
    """Real fault tools, really called (debug.fault_tool_rate), in worker processes: calls that
    raise or hang become error observations, the run finishes, nothing is left running."""
    threads = {t.name for t in threading.enumerate()}
    cfg = micro_config(
        tmp_path,
        "logging.name=workers",
        "tools.enabled=[search, failing, slow]",
        "tools.timeout_s=0.3",
        "debug.fault_tool_rate=0.5",
        "rl.steps=2",
        "warmup.steps=2",
        "eval.at_start=false",
        "eval.k=0",
    )
    trainer = Trainer(cfg)
    _always_search(trainer)
    train = trainer.task.train
    episodes = trainer.engine.rollout(train * 4, list(range(4 * len(train))), seed=5)
    names = [c.name for ep in episodes for c in ep.calls]
    errors = [c.error for ep in episodes for c in ep.calls if not c.valid]
    assert {"failing", "slow", "search"} <= set(names)  # the fault tools really were called
    assert any("timed out" in e for e in errors) and any("RuntimeError" in e for e in errors)
    metrics = [trainer.rl_step(1), trainer.rl_step(2)]
    assert all(math.isfinite(m["actor/loss"]) and m["train/invalid_call_rate"] > 0 for m in metrics)
    assert trainer.registry._workers.killed >= 1  # hung calls were stopped, not abandoned
    trainer.registry.close()
    trainer.logger.close()  # TensorBoard's writer thread
    left = [t.name for t in threading.enumerate() if t.name not in threads]
    assert left in ([], ["tqdm_monitor"]), left  # tqdm's own monitor may have started


def _tiny(seed):
    return tiny_model(
        ModelConfig(
            hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1
        ),
        64,
        0,
        1,
        seed=seed,
    )


def test_checkpoints_are_atomic_and_restore_exactly(tmp_path):
    ctx = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"), fsdp=False)
    model = _tiny(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=torch.randint(0, 64, (2, 5))).logits.sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, model, opt, {"rl_step": 1}, ctx, keep=1)
    save_checkpoint(tmp_path, 2, model, opt, {"rl_step": 2}, ctx, keep=1)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002"]  # keep=1 pruned step 1
    # debris of a save killed midway: a temp dir and a final-looking dir without the state file
    (root / ".tmp_step_000003").mkdir()
    (root / "step_000004").mkdir()
    (root / "step_000004" / ".metadata").write_text("partial")
    assert latest_checkpoint(tmp_path).name == "step_000002"
    fresh = _tiny(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    assert any(
        not torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=False)
    )
    state = load_checkpoint(root / "step_000002", fresh, fresh_opt, ctx)
    assert state == {"rl_step": 2}
    for a, b in zip(model.parameters(), fresh.parameters(), strict=False):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=False):
        sa, sb = opt.state[a], fresh_opt.state[b]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(
            sa["exp_avg_sq"], sb["exp_avg_sq"]
        )
    save_checkpoint(tmp_path, 2, fresh, fresh_opt, {"rl_step": 2, "again": True}, ctx, keep=2)
    assert json.loads((root / "step_000002" / "trainer_state.json").read_text())["again"] is True


def test_metrics_resume_drops_lines_after_the_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"x": float(step), "bad": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "x": ')  # a line cut by a kill
    resumed = MetricsLogger(tmp_path, enabled=True, tensorboard=False, resume_step=3)
    resumed.log(4, {"x": 40.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["x"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert rows[0]["bad"] == "nan"


def test_cli(tmp_path, capsys):
    assert main(["--print-config", "rl.steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out
    assert main(["rl.stepz=3"]) == 2
    assert "did you mean 'rl.steps'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])


def _both_loss_paths(preset):
    """``micro_batch_loss`` both ways, plus an fp64 oracle of the loss, gradient and entropy.

    Positions: token t is scored by logits[:, t-1]; mask 0 on column 0, a fully masked row,
    TAPO lifts on two call spans, temperature 0.7, off-policy old log-probs.
    """
    import tapo_kernels
    from trainer.loss import micro_batch_loss

    gen = torch.Generator().manual_seed(7)
    B, T, V, temp = 5, 11, 37, 0.7
    logits64 = torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 3
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = (torch.rand(B, T, generator=gen) < 0.75).float()
    mask[:, 0] = 0
    mask[2] = 0
    lp64 = torch.nn.functional.pad(
        torch.log_softmax(logits64[:, :-1] / temp, -1).gather(2, ids[:, 1:, None]).squeeze(2),
        (1, 0),
    )
    old = ((lp64 + 0.2 * torch.randn(B, T, generator=gen, dtype=torch.float64)) * mask).float()
    adv = torch.randn(B, 1, generator=gen) * mask
    call_map = torch.full((B, T), -1, dtype=torch.int32)
    call_map[1, 2:6], call_map[3, 4:8] = 0, 1
    delta = torch.tensor([0.3, 0.5])
    knobs = {"preset": preset, "global_count": 4.0}
    if preset == "grpo":
        knobs["agg"] = "token-mean"
    tensors = (ids, old, adv, mask, None, call_map, delta)  # ref_logp = None
    results = {}
    for from_logits in (True, False):
        logits = logits64.float().requires_grad_()
        loss, metrics, entropy = micro_batch_loss(
            logits, *tensors, temperature=temp, from_logits=from_logits, **knobs
        )
        loss.backward()
        results[from_logits] = (
            loss.detach().double(),
            logits.grad.double(),
            (entropy * mask).double(),
            metrics,
        )
    # fp64 oracle: the package's pure-torch reference on fp64 log-probs
    logits = logits64.clone().requires_grad_()
    lp = torch.nn.functional.pad(
        torch.log_softmax(logits[:, :-1] / temp, -1).gather(2, ids[:, 1:, None]).squeeze(2), (1, 0)
    )
    merged = {**tapo_kernels.PRESETS[preset], **{k: v for k, v in knobs.items() if k != "preset"}}
    loss64, _ = tapo_kernels.reference.policy_loss(
        lp, old.double(), adv.double(), mask.double(), None, call_map, delta.double(), **merged
    )
    loss64.backward()
    p64 = torch.softmax(logits64[:, :-1] / temp, -1)
    ent64 = torch.nn.functional.pad(-(p64 * p64.log()).sum(-1), (1, 0)) * mask
    return results[True], results[False], (loss64.detach(), logits.grad, ent64)


def _within_rule(got, base, ref):
    """Tolerance by rule: error vs fp64 at most 2x the plain fp32 path's error + 1e-6."""
    assert torch.isfinite(got).all()
    err, base_err = (got - ref).abs().max(), (base - ref).abs().max()
    assert err <= 2 * base_err + 1e-6, (err.item(), base_err.item())


@pytest.mark.parametrize("preset", ["grpo", "gspo", "sapo"])
def test_loss_from_logits_matches_the_log_softmax_path(preset):
    fused, plain, ref = _both_loss_paths(preset)
    _within_rule(fused[0], plain[0], ref[0])  # loss
    _within_rule(fused[1], plain[1], ref[1])  # d loss / d logits
    assert fused[3] == pytest.approx(plain[3], abs=1e-6)
    assert fused[3]["lifted_frac"] > 0  # the TAPO lift really was applied


def test_entropy_from_logits_is_as_accurate_as_torch():
    fused, plain, ref = _both_loss_paths("grpo")
    _within_rule(fused[2], plain[2], ref[2])


def test_jsonl_task_trains_end_to_end(tmp_path):
    """Questions with their own corpora, a shared corpus, and demonstrations from files."""
    rows = []
    for i, (name, city) in enumerate(
        [
            ("Ada Lorn", "Kestrel"),
            ("Bo Tarn", "Marlow"),
            ("Cy Venn", "Dunmore"),
            ("Di Rusk", "Ashford"),
        ]
    ):
        row = {"question": f"Where does {name} live?", "answer": [city, city.lower()]}
        if i % 2:
            row["corpus"] = [f"{name} lives in {city}.", "Unrelated text."]
        rows.append(row)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "corpus.txt").write_text("Ada Lorn lives in Kestrel.\nCy Venn lives in Dunmore.\n")
    demos = [{**rows[0], "query": "Ada Lorn"}, {**rows[1], "query": "Bo Tarn"}]
    (tmp_path / "demos.jsonl").write_text("\n".join(json.dumps(r) for r in demos) + "\n")
    cfg = micro_config(
        tmp_path,
        "logging.name=jsonl",
        "task.name=jsonl",
        f"task.train_path={tmp_path / 'train.jsonl'}",
        f"task.corpus_path={tmp_path / 'corpus.txt'}",
        f"task.demos_path={tmp_path / 'demos.jsonl'}",
        "task.heldout_fraction=0.25",
        "rl.steps=1",
        "eval.at_start=false",
    )
    summary = run(cfg)
    assert summary["rl_steps"] == 1
    rl = [r for r in read_metrics(tmp_path / "jsonl" / "metrics.jsonl") if r.get("phase") == "rl"]
    assert len(rl) == 1 and math.isfinite(rl[0]["actor/loss"])


def _tiny_policy(**extra):
    from trainer.loss import hidden_batch_loss
    from trainer.modeling import attach_hidden_loss, tiny_model

    layers = dict(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1)
    cfg = ModelConfig(vocab_size=61, max_position_embeddings=64, **layers, **extra)
    model = tiny_model(cfg, 61, pad_id=0, eos_id=1, seed=3)
    attach_hidden_loss(model, hidden_batch_loss)
    return model


@pytest.mark.parametrize("preset", ["grpo", "gspo", "sapo"])
def test_hidden_state_loss_matches_the_logits_paths(preset):
    """Loss, metrics, entropy and every parameter gradient agree across the three loss inputs."""
    from trainer.loss import micro_batch_loss

    model = _tiny_policy()
    gen = torch.Generator().manual_seed(11)
    B, T = 4, 19
    ids = torch.randint(2, 61, (B, T), generator=gen)
    attn = torch.ones(B, T, dtype=torch.long)
    mask = (torch.rand(B, T, generator=gen) < 0.8).float()
    mask[:, 0] = 0
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1] / 0.9, -1)
        old = torch.nn.functional.pad(lp.gather(2, ids[:, 1:, None]).squeeze(2), (1, 0))
    old = (old + 0.1 * torch.randn(B, T, generator=gen)) * mask
    adv = torch.randn(B, 1, generator=gen) * mask
    call_map = torch.full((B, T), -1, dtype=torch.int32)
    call_map[1, 3:7] = 0
    delta = torch.tensor([0.4])
    kw = dict(
        ref_logp=None,
        call_map=call_map,
        call_delta=delta,
        temperature=0.9,
        preset=preset,
        global_count=7.0,
    )
    results = {}
    for source in ("hidden", "logits", "logp"):
        model.zero_grad()
        if source == "hidden":
            loss, metrics, entropy = model.hidden_loss(
                ids, attn, old_logp=old, advantages=adv, mask=mask, **kw
            )
        else:
            logits = model(input_ids=ids, attention_mask=attn).logits
            loss, metrics, entropy = micro_batch_loss(
                logits, ids, old, adv, mask, from_logits=source == "logits", **kw
            )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[source] = (loss.detach(), metrics, entropy * mask, grads)
    base = results["logp"]
    assert base[1]["lifted_frac"] > 0
    for source in ("hidden", "logits"):
        got = results[source]
        torch.testing.assert_close(got[0], base[0], rtol=1e-5, atol=1e-6)
        assert got[1] == pytest.approx(base[1], rel=1e-5, abs=1e-6)
        torch.testing.assert_close(got[2], base[2], rtol=1e-4, atol=1e-5)
        assert got[3].keys() == base[3].keys() and len(base[3]) > 5
        for name, g in base[3].items():
            torch.testing.assert_close(got[3][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_heads_that_rescale_logits_fall_back_to_the_logits_path():
    from trainer.modeling import hidden_loss_unsupported

    model = _tiny_policy()
    assert hidden_loss_unsupported(model) is None
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in hidden_loss_unsupported(model)


def test_training_update_never_calls_the_lm_head(tmp_path, monkeypatch):
    """With the default loss input the update computes no logits (only rollouts do)."""
    trainer = Trainer(micro_config(tmp_path, "logging.name=nohead", "warmup.steps=0"))
    assert trainer.loss_input == "hidden"
    calls = []
    head = trainer.model.get_output_embeddings()
    monkeypatch.setattr(head, "forward", lambda *a, **k: calls.append(1) or 1 / 0)
    real_rollout = trainer.engine.rollout

    def rollout_with_head(*args, **kwargs):  # generation may use the head
        monkeypatch.undo()
        try:
            return real_rollout(*args, **kwargs)
        finally:
            monkeypatch.setattr(head, "forward", lambda *a, **k: calls.append(1) or 1 / 0)

    monkeypatch.setattr(trainer.engine, "rollout", rollout_with_head)
    metrics = trainer.rl_step(1)
    assert calls == [] and math.isfinite(metrics["actor/loss"])


def test_recomputed_logp_logs_the_rollout_gap_and_weights_the_loss(tmp_path, monkeypatch):
    """With rollout.recompute_logp and algo.tis_cap the loss receives the truncated importance
    weight of the rollout's log-probs, and the gap is logged; the hf engine's recorded
    log-probs equal the recomputed ones to fp32 rounding, so the weight is ~1."""
    import tapo_kernels as tk

    seen = []
    real = tk.truncated_importance_weight

    def spy(old_logp, rollout_logp, cap, mask):
        w = real(old_logp, rollout_logp, cap, mask)
        seen.append((cap, w, mask))
        return w

    monkeypatch.setattr(tk, "truncated_importance_weight", spy)
    cfg = micro_config(
        tmp_path, "logging.name=tis", "rollout.recompute_logp=true", "algo.tis_cap=1.5"
    )
    run(cfg)
    rl = [r for r in read_metrics(tmp_path / "tis" / "metrics.jsonl") if r.get("phase") == "rl"]
    assert len(rl) == 2 and len(seen) == 2
    for row in rl:
        assert 0 <= row["rollout/abs_logp_diff"] < 1e-4
        assert 0 <= row["rollout/max_abs_logp_diff"] < 1e-3
        assert 0 <= row["rollout/kl_k3"] < 1e-6
        assert row["rollout/tis_truncated_frac"] == 0.0
        assert "perf/weight_sync_s" not in row  # the hf engine has no separate weights
    for cap, w, mask in seen:
        assert cap == 1.5
        live = mask != 0
        assert bool(live.any())
        assert torch.allclose(w[live], torch.ones_like(w[live]), atol=1e-3)
        assert bool((w[~live] == 0).all())


def test_rollout_mismatch_sums_by_hand():
    # d = old - rollout = [0, 0.5, (masked)]: sum |d| = 0.5; k3 = e^0.5 - 0.5 - 1 = 0.1487213;
    # 2 live tokens; e^0.5 = 1.6487 > cap 1.5 on one of them; max |d| = 0.5
    from types import SimpleNamespace

    from trainer.train import rollout_mismatch_sums

    old = torch.tensor([[0.0, 1.0, 9.0]])
    rollout = torch.tensor([[0.0, 0.5, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    cfg = SimpleNamespace(algo=SimpleNamespace(tis_cap=1.5))
    got = rollout_mismatch_sums(old, rollout, mask, cfg)
    want = [0.5, math.exp(0.5) - 1.5, 2.0, 1.0, 0.5]
    assert all(abs(g - w) < 1e-6 for g, w in zip(got, want, strict=True)), got
    cfg.algo.tis_cap = None
    assert rollout_mismatch_sums(old, rollout, mask, cfg)[3] == 0.0
