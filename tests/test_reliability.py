"""Reliability promises, each held by a test (``make test-reliability`` runs this file).

1. No code runs from a checkpoint: crafted DCP metadata or non-tensor entries are refused.
2. No run loses its outputs: run names stay inside ``run_dir``; nothing is deleted that the
   trainer did not create; ``--resume`` without a valid checkpoint changes nothing.
3. No op returns garbage: a ``meta`` tensor among real ones is an error naming it.
4. No tool call blocks a step (see also ``test_trainer_tools.py``): results are bounded
   before they are computed, hung calls are killed.
5. Config errors surface at load time, naming the key.
6. Resume falls back past truncated, missing, corrupted or malformed checkpoints.
7. Masked tokens contribute exactly 0 whatever they hold; the similarity is bounded.
8. Python types are checked; ``theta = 1`` is one boundary on every backend; task files
   give errors with their line.

Then a hypothesis sweep of bad inputs over every op (each must return finite outputs of the
right shape or raise ``ValueError``/``TypeError``), and kill -9 at random moments of a run and
inside a checkpoint save, with a bit-exact resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tapo_kernels
from tapo_kernels import _library, testing
from trainer.checkpoint import (
    MANIFEST,
    CheckpointError,
    _SafePlanner,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    write_manifest,
)
from trainer.config import ConfigError, ModelConfig, load_config
from trainer.distributed import DistContext
from trainer.modeling import tiny_model
from trainer.tasks import TaskFileError, load_jsonl_task
from trainer.testing import TINY_RUN_OVERRIDES
from trainer.tools import build_registry

ROOT = Path(__file__).resolve().parents[1]
VL_CONFIG = ROOT / "trainer" / "configs" / "tiny_vl_grpo_tapo.yaml"
CTX = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"), fsdp=False)
MICRO = [
    *TINY_RUN_OVERRIDES,
    "warmup.steps=2",
    "rollout.max_new_tokens_per_turn=24",
    "rollout.max_total_tokens=128",
    "eval.num_questions=2",
    "eval.k=0",
    "eval.at_start=false",
    "logging.tensorboard=false",
    "logging.plots=false",
    "dist.threads_per_rank=1",
    "checkpoint.every=1",
    "checkpoint.keep=3",
]
TIMING_KEYS = ("perf/", "eval/time_s")


def _tiny_model(seed: int = 0):
    layers = dict(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    cfg = ModelConfig(vocab_size=61, max_position_embeddings=32, **layers)
    return tiny_model(cfg, 61, pad_id=0, eos_id=1, seed=seed)


def _checkpoints(tmp_path: Path, steps=(1, 2)) -> tuple:
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=torch.randint(0, 61, (2, 5))).logits.sum().backward()
    opt.step()
    state = {"phase": "rl", "rl_step": 0, "global_step": 0, "evals": {}}
    for step in steps:
        save_checkpoint(tmp_path, step, model, opt, {**state, "global_step": step}, CTX, keep=5)
    return model, opt


class _Evil:
    """Unpickling it would write a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- 1. no code


@pytest.mark.parametrize("forge_manifest", [False, True])
def test_crafted_checkpoint_metadata_never_runs_code(tmp_path, forge_manifest):
    _checkpoints(tmp_path)
    marker = tmp_path / "marker"
    step = tmp_path / "checkpoints" / "step_000002"
    (step / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    if forge_manifest:  # an attacker who can write the run directory rewrites the manifest too
        write_manifest(step, 2, "")
        path, skipped = resume_checkpoint(tmp_path)
        assert path == step and skipped == []  # it verifies ...
        with pytest.raises(CheckpointError, match="holds objects a checkpoint never holds"):
            load_checkpoint(step, _tiny_model(), None, CTX)  # ... but is refused, not run
    else:
        path, skipped = resume_checkpoint(tmp_path)
        assert path.name == "step_000001"  # the newest checkpoint that verifies
        assert len(skipped) == 1 and ".metadata" in skipped[0]
    assert not marker.exists()


def test_non_tensor_checkpoint_entries_are_read_weights_only(tmp_path):
    marker = tmp_path / "marker"
    planner = _SafePlanner()
    planner.state_dict, planner.flatten_state_dict = {}, False

    class Item:
        class dest_index:
            fqn = "x"

    with pytest.raises(pickle.UnpicklingError):
        buf = io.BytesIO()
        torch.save(_Evil(marker), buf, _use_new_zipfile_serialization=True)
        buf.seek(0)
        planner.load_bytes(Item(), buf)
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. no loss


@pytest.mark.parametrize(
    "override",
    [
        "logging.name=..",
        "logging.name=.",
        "logging.name=a/b",
        "logging.name=",
        "logging.run_dir=../runs",
        "logging.run_dir=runs/../../x",
    ],
)
def test_run_directories_stay_inside_run_dir(override):
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_a_fresh_run_never_clears_a_directory_it_did_not_create(tmp_path):
    from trainer.cli import main

    foreign = tmp_path / "mine"
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "metrics.jsonl").write_text("precious\n")
    (foreign / "checkpoints" / "notes.txt").write_text("precious\n")
    before = _tree_digest(foreign)
    rc = main([*MICRO, f"logging.run_dir={tmp_path}", "logging.name=mine", "rl.steps=1"])
    assert rc == 2 and _tree_digest(foreign) == before


def test_resume_without_a_valid_checkpoint_changes_nothing(tmp_path, capsys):
    from trainer.cli import main

    args = [*MICRO, f"logging.run_dir={tmp_path}", "logging.name=run", "rl.steps=1"]
    assert main(args) == 0
    run = tmp_path / "run"
    for ckpt in (run / "checkpoints").glob("step_*"):  # every checkpoint damaged
        (ckpt / "trainer_state.json").write_text("{broken")
    before = _tree_digest(run)
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "nothing was changed" in err
    assert _tree_digest(run) == before


# ----------------------------------------------------------------------------- 3. meta


def _op_calls():
    lb = testing.loss_batch(B=3, T=6, seed=1)
    cb = testing.correct_batch(seed=1, B=3, T=6)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    hidden, weight = torch.randn(3, 6, 5), torch.randn(11, 5)
    loss_rest = (lb.advantages, lb.mask)
    return {
        "fused_correct": (
            torch.ops.tapo.fused_correct,
            list(cb.op_args()) + [0.7, 0.3, 0.8, False],
        ),
        "policy_loss": (torch.ops.tapo.policy_loss, list(lb.op_args())),
        "policy_loss_with_grad": (torch.ops.tapo.policy_loss_with_grad, list(lb.op_args())),
        "policy_loss_backward": (
            torch.ops.tapo.policy_loss_backward,
            [torch.tensor(1.0), *lb.op_args()],
        ),
        "policy_loss_from_logits": (
            torch.ops.tapo.policy_loss_from_logits,
            [logits, labels, lb.old_logp, *loss_rest],
        ),
        "policy_loss_from_hidden": (
            torch.ops.tapo.policy_loss_from_hidden,
            [hidden, weight, None, labels, lb.old_logp, *loss_rest],
        ),
    }


@pytest.mark.parametrize("op", sorted(_op_calls()))
def test_a_meta_tensor_among_real_ones_is_an_error_naming_it(op):
    fn, args = _op_calls()[op]
    schema = getattr(torch.ops.tapo, op).default._schema
    names = [a.name for a in schema.arguments]
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor) or i == 0:
            continue
        bad = list(args)
        bad[i] = a.to("meta")
        with pytest.raises(ValueError, match=f"{names[i]} is on meta"):
            fn(*bad)


# ----------------------------------------------------------------------------- 5. config


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("optim.weight_decay=.inf", "optim.weight_decay"),
        ("tapo.beta=.inf", "tapo.beta"),
        ("rollout.temperature=.inf", "rollout.temperature"),
        ("tools.timeout_s=.inf", "tools.timeout_s"),
        ("tapo.theta=.nan", "tapo.theta"),
        ("algo.loss_overrides={eps_low: abc}", "eps_low"),
        ("algo.loss_overrides={dual_clip_c: 0.5}", "dual_clip_c"),
        ("algo.loss_overrides={agg: mean}", "agg"),
        ("algo.loss_overrides={tau_pos: -1}", "tau_pos"),
        ("tools.isolation=fork", "tools.isolation"),
        ("tapo.witness=exact", "tapo.witness"),
        ("debug.fault_tool_rate=0.5", "debug.fault_tool_rate"),
        ("tools.enabled=[zoom_in]", r"tools.enabled\[0\]"),
        ("task.name=visual", "task.name"),  # without model.vision
        ("model.max_pixels=100", "model.max_pixels"),
    ],
)
def test_bad_configs_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override,key",
    [
        ("task.mix_fraction=0.25", "task.mix_fraction"),
        ("axpo.enabled=true", "axpo.enabled"),
        ("task.sloppy_demo_fraction=2", "task.sloppy_demo_fraction"),
        ("model.vision_hidden_size=65", "model.vision_hidden_size"),
        ("task.scene_kinds={zoom: 1, chart: 1}", "task.scene_kinds.chart"),
    ],
)
def test_bad_visual_configs_fail_at_load_naming_the_key(override, key):
    """The visual task's own checks, on top of its config."""
    extra = ["tools.enabled=[zoom_in, calculator]"] if "mix" in override else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(VL_CONFIG, [override, *extra])


def test_duplicate_yaml_keys_and_bad_yaml_are_errors(tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("optim:\n  lr: 1.0e-3\n  weight_decay: 0\n  lr: 2.0e-3\n")
    with pytest.raises(
        ConfigError, match=r"dup.yaml:4: duplicate key 'lr' \(first written on line 2\)"
    ):
        load_config(dup)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"optim: {lr: \xff}\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


# ----------------------------------------------------------------------------- 6. resume


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage,why",
    [
        (
            lambda p: (p / "__0_0.distcp").write_bytes((p / "__0_0.distcp").read_bytes()[:100]),
            "bytes",
        ),
        (lambda p: (p / "__0_0.distcp").unlink(), "missing"),
        (lambda p: (p / ".metadata").write_bytes(b""), "bytes"),
        (lambda p: (p / "trainer_state.json").write_text("[1, 2"), "trainer_state.json"),
        (lambda p: _flip_bit(p / "__0_0.distcp"), "SHA-256"),
        (lambda p: (p / MANIFEST).unlink(), "manifest"),
        (lambda p: (p / MANIFEST).write_text("{}"), "manifest"),
    ],
)
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, damage, why):
    model, opt = _checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step_000002"
    damage(newest)
    path, skipped = resume_checkpoint(tmp_path)
    assert path is not None and path.name == "step_000001"
    assert len(skipped) == 1 and skipped[0].startswith("step_000002") and why in skipped[0]
    fresh = _tiny_model(seed=5)
    load_checkpoint(path, fresh, None, CTX)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )


def test_a_state_file_with_wrong_fields_does_not_verify(tmp_path):
    _checkpoints(tmp_path, steps=(1,))
    step = tmp_path / "checkpoints" / "step_000001"
    (step / "trainer_state.json").write_text(json.dumps({"phase": "rl", "rl_step": "3"}))
    write_manifest(step, 1, "")  # even with a manifest that matches the bad file
    assert resume_checkpoint(tmp_path)[0] is None


# ----------------------------------------------------------------------------- 7. NaN


def _poison_masked(batch, value):
    """A copy of the batch with ``value`` at every masked token of every float input."""
    out = []
    masked = batch.mask == 0
    for i, t in enumerate(batch.op_args()):
        if t is None or i in (3, 5, 6) or not t.is_floating_point():
            out.append(t)
        elif t.dim() == 2:
            out.append(torch.where(masked, torch.full_like(t, value), t))
        else:
            out.append(t)
    return out


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30])
@pytest.mark.parametrize(
    "algo,kl_type", [("grpo", "k3"), ("grpo", "k2"), ("gspo", "k1"), ("sapo", "k2")]
)
def test_masked_tokens_contribute_exactly_zero_whatever_they_hold(
    policy_loss_impl, value, algo, kl_type
):
    forward, backward = policy_loss_impl
    batch = testing.loss_batch(B=4, T=9, seed=3)
    knobs = dict(algo=algo, kl_coef=0.1, kl_type=kl_type, agg="seq-mean-token-mean")
    clean = _poison_masked(batch, 0.0)
    dirty = _poison_masked(batch, value)
    loss_c, metrics_c = forward(*clean, **knobs)
    loss_d, metrics_d = forward(*dirty, **knobs)
    assert torch.isfinite(loss_d) and torch.equal(loss_c, loss_d)
    assert torch.equal(metrics_c, metrics_d)
    grad_c = backward(torch.tensor(1.0), *clean, **knobs)
    grad_d = backward(torch.tensor(1.0), *dirty, **knobs)
    assert torch.equal(grad_c, grad_d) and bool((grad_d[batch.mask == 0] == 0).all())


@pytest.mark.parametrize(
    "mask_value,message",
    [
        (float("nan"), "mask contains NaN or inf"),
        (1.5, r"mask values must be in \[0, 1\]"),
        (-0.5, r"mask values must be in \[0, 1\]"),
    ],
)
def test_float_masks_are_validated(policy_loss_impl, mask_value, message):
    forward, backward = policy_loss_impl
    args = list(testing.loss_batch(B=3, T=5, seed=4).op_args())
    args[3] = args[3].clone()
    args[3][0, -1] = mask_value
    with pytest.raises(ValueError, match=message):
        forward(*args)
    with pytest.raises(ValueError, match=message):
        backward(torch.tensor(1.0), *args)


def test_nan_logits_at_padding_are_ignored_and_named_when_not():
    B, T, V = 3, 7, 13
    lb = testing.loss_batch(B=B, T=T, seed=2, with_calls=False)
    logits = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    dirty = logits.clone()
    dirty[lb.mask == 0] = float("nan")
    clean = logits.clone()
    clean[lb.mask == 0] = 0.0
    outs = []
    for x in (clean, dirty):
        x = x.clone().requires_grad_(True)
        out = tapo_kernels.policy_loss_from_logits(
            x, labels, lb.old_logp, lb.advantages, lb.mask, preset="grpo"
        )
        out.loss.backward()
        outs.append((out.loss.detach(), x.grad))
    assert torch.isfinite(outs[1][0]) and torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])  # zero dlogits at padding, no NaN leaks
    live = dirty.clone()
    live[0, -1] = float("nan")
    live_mask = lb.mask.clone()
    live_mask[0, -1] = 1.0
    with pytest.raises(ValueError, match="logits give a non-finite log-probability"):
        tapo_kernels.policy_loss_from_logits(live, labels, lb.old_logp, lb.advantages, live_mask)


def test_unnormalised_parameters_give_a_bounded_lift(fused_correct_impl):
    batch = testing.correct_batch(seed=7, B=6, T=12, num_keys=1, num_queries=2)
    args = list(batch.op_args())
    args[8] = args[8] * 1e20
    corrected, delta, confidence, _ = fused_correct_impl(*args, 0.7, 0.3, 0.8, False)
    for t in (corrected, delta, confidence):
        assert bool(torch.isfinite(t).all())
    assert bool((confidence <= 1).all()) and bool((delta <= 0.8 * args[1].abs().max()).all())


# ----------------------------------------------------------------------------- 8. gaps


def test_python_types_are_checked_naming_the_argument():
    calls = tapo_kernels.ToolCalls.from_lists([0], [0], [1], [0], tapo_kernels.encode_text(["a"]))
    args = (
        torch.zeros(1, 2),
        torch.zeros(1),
        torch.zeros(1, dtype=torch.long),
        calls,
        torch.zeros(1, dtype=torch.long),
    )
    for kw, name in (
        (dict(theta="0.5"), "theta"),
        (dict(theta=None), "theta"),
        (dict(beta=[0.8]), "beta"),
        (dict(batch_scope=1), "batch_scope"),
    ):
        with pytest.raises(TypeError, match=name):
            tapo_kernels.fused_correct(*args, **kw)
    with pytest.raises(TypeError, match="calls must be a ToolCalls"):
        tapo_kernels.fused_correct(*args[:3], [0], args[4])
    with pytest.raises(TypeError, match="logp must be a torch.Tensor"):
        tapo_kernels.policy_loss([[0.0]], torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1))
    with pytest.raises(TypeError, match="eps_low must be a number"):
        tapo_kernels.policy_loss(
            torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), eps_low="abc"
        )


def test_the_backward_checks_values_too(policy_loss_impl):
    _, backward = policy_loss_impl
    args = list(testing.loss_batch(B=3, T=6, seed=5).op_args())
    args[0] = args[0].clone()
    live = (args[3] != 0).nonzero()[0]
    args[0][live[0], live[1]] = float("nan")
    with pytest.raises(ValueError, match="logp contains NaN or inf"):
        backward(torch.tensor(1.0), *args)


def test_theta_one_matches_identical_calls_on_every_backend(fused_correct_impl):
    rng = random.Random(0)
    texts = [
        "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(3, 30)))
        for _ in range(250)
    ]
    params = tapo_kernels.encode_text(texts)
    n = len(texts)
    # row 2k succeeds and row 2k+1 fails, both issuing query k: every failing call has an
    # identical witness, whose fp32 self-similarity is 1 +- 1 ulp
    args = [
        torch.tensor([[1.0] * 3, [-1.0] * 3] * n),
        torch.tensor([1.0, -1.0] * n),
        torch.arange(n).repeat_interleave(2),
        torch.arange(2 * n),
        torch.zeros(2 * n, dtype=torch.long),
        torch.full((2 * n,), 2),
        torch.zeros(2 * n, dtype=torch.long),
        torch.zeros(2 * n, dtype=torch.long),
        params.repeat_interleave(2, dim=0),
        torch.zeros(1, dtype=torch.long),
    ]
    _, delta, _, witness = fused_correct_impl(*args, 1.0, 0.3, 0.8, False)
    assert int((delta[1::2] > 0).sum()) == n  # all of them, not 1 ulp's worth of luck
    assert torch.equal(witness[1::2], torch.arange(0, 2 * n, 2))


def test_task_files_give_errors_with_their_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"question": "q?", "answer": "a", "corpus": ["d"]}\n{"question": "\xff"}\n')
    with pytest.raises(TaskFileError, match="t.jsonl:2: not UTF-8"):
        load_jsonl_task(path)
    path.write_text('{"question": "q?", "answer": "a", "corpus": ["d"]}\n' + "[" * 100_000 + "\n")
    with pytest.raises(TaskFileError, match="t.jsonl:2: "):
        load_jsonl_task(path)
    with pytest.raises(ValueError, match="no indexable word"):
        build_registry(["search"], {0: ["the of is", "...!"]})


def test_a_skipped_nan_step_logs_nan_loss(tmp_path):
    from trainer.cli import main
    from trainer.metrics import read_metrics

    args = [
        *MICRO,
        f"logging.run_dir={tmp_path}",
        "logging.name=nan",
        "rl.steps=2",
        "debug.nan_loss_steps=[2]",
    ]
    assert main(args) == 0
    rl = [r for r in read_metrics(tmp_path / "nan" / "metrics.jsonl") if r.get("phase") == "rl"]
    assert math.isfinite(rl[0]["actor/loss"]) and rl[1]["actor/loss"] == "nan"
    assert rl[1]["actor/skipped_steps"] > 0


# ----------------------------------------------------------------------------- sweep

SWEEP = {"cases": 0, "clear_errors": 0, "finite_results": 0}


def _mutations():
    nan, inf = float("nan"), float("inf")
    return st.one_of(
        st.tuples(st.just("nan"), st.integers(0, 9), st.sampled_from([nan, inf, -inf, 1e38])),
        st.tuples(st.just("shape"), st.integers(0, 9), st.integers(0, 3)),
        st.tuples(
            st.just("dtype"),
            st.integers(0, 9),
            st.sampled_from(
                [torch.float64, torch.float16, torch.int32, torch.int64, torch.bool, torch.int8]
            ),
        ),
        st.tuples(st.just("int"), st.integers(0, 9), st.integers(-(10**12), 10**12)),
        st.tuples(
            st.just("knob"),
            st.integers(0, 12),
            st.sampled_from([-1.0, 0.0, 1.0, 2.0, 1e300, nan, inf, -inf, "x", None, True]),
        ),
        st.tuples(st.just("meta"), st.integers(0, 9), st.just(None)),
        st.tuples(st.just("empty"), st.integers(0, 9), st.just(None)),
        st.tuples(st.just("noncontig"), st.integers(0, 9), st.just(None)),
    )


def _mutate(args: list, mutation) -> list:
    kind, i, value = mutation
    tensors = [k for k, a in enumerate(args) if isinstance(a, torch.Tensor)]
    scalars = [k for k, a in enumerate(args) if not isinstance(a, torch.Tensor) and a is not None]
    out = list(args)
    if kind == "knob":
        if scalars:
            out[scalars[i % len(scalars)]] = value
        return out
    k = tensors[i % len(tensors)]
    t = out[k]
    if kind == "nan" and t.is_floating_point() and t.numel():
        t = t.clone()
        t.view(-1)[random.Random(i).randrange(t.numel())] = value
    elif kind == "shape":
        t = t.reshape(-1)[: max(t.numel() - value, 0)] if value else t.unsqueeze(0)
    elif kind == "dtype":
        t = t.to(value)
    elif kind == "int" and not t.is_floating_point() and t.numel() and t.dtype != torch.bool:
        t = t.clone()
        info = torch.iinfo(t.dtype)
        t.view(-1)[random.Random(i).randrange(t.numel())] = max(info.min, min(info.max, value))
    elif kind == "meta":
        t = t.to("meta")
    elif kind == "empty":
        t = t.reshape(-1)[:0]
    elif kind == "noncontig" and t.dim() >= 1:
        t = torch.stack([t, t], dim=-1)[..., 0]
    out[k] = t
    return out


def _sweep_ops():
    lb = testing.loss_batch(B=3, T=6, seed=1)
    cb = testing.correct_batch(seed=1, B=3, T=6)
    logits, labels = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    knobs = ["grpo", 0.2, 0.2, 3.0, 1.0, 1.05, 0.0, "k3", "token-mean", None, None]
    return {
        "fused_correct": (
            torch.ops.tapo.fused_correct,
            _library.fused_correct_reference_kernel,
            list(cb.op_args()) + [0.7, 0.3, 0.8, False],
        ),
        "policy_loss": (
            torch.ops.tapo.policy_loss,
            _library.policy_loss_reference_kernel,
            list(lb.op_args()) + knobs,
        ),
        "policy_loss_backward": (
            torch.ops.tapo.policy_loss_backward,
            _library.policy_loss_backward_reference_kernel,
            [torch.tensor(1.0), *lb.op_args()] + knobs,
        ),
        "policy_loss_from_logits": (
            torch.ops.tapo.policy_loss_from_logits,
            None,
            [logits, labels, lb.old_logp, lb.advantages, lb.mask],
        ),
    }


def _extreme(mutations) -> bool:
    """Inputs of extreme magnitude: fp32 overflow to inf is correct arithmetic there."""
    return any(
        m[0] in ("nan", "knob") and isinstance(m[2], float) and abs(m[2]) >= 1e30 for m in mutations
    )


@pytest.mark.parametrize("op", sorted(_sweep_ops()))
@settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations=st.lists(_mutations(), min_size=1, max_size=3))
def test_bad_input_sweep(op, mutations):
    """Random bad inputs: a ValueError / TypeError naming the problem, or results of the right
    shapes without NaN (inf only from inputs of extreme magnitude) that agree between the
    native kernel and the reference."""
    native, ref, args = _sweep_ops()[op]
    bad = args
    for m in mutations:
        bad = _mutate(bad, m)
    # a NaN incoming gradient propagates into the gradient, as everywhere in autograd
    nan_grad = (
        op == "policy_loss_backward"
        and isinstance(bad[0], torch.Tensor)
        and bad[0].is_floating_point()
        and bad[0].device.type != "meta"
        and not bool(torch.isfinite(bad[0]).all())
    )
    # Python types are enforced by the dispatcher: the Python kernel called directly sees
    # only well-typed arguments
    typed = all(m[0] != "knob" or isinstance(m[2], float) for m in mutations)
    results = []
    for fn in (native, ref if typed else None):
        if fn is None:
            continue
        SWEEP["cases"] += 1
        try:
            out = fn(*bad)
        except (ValueError, TypeError) as exc:
            assert str(exc), "an error without a message"
            SWEEP["clear_errors"] += 1
            results.append(None)
            continue
        except (RuntimeError, NotImplementedError) as exc:  # the dispatcher's own checks
            text = str(exc)
            assert (
                "expected" in text
                or "Expected" in text
                or "argument" in text
                or "meta" in text
                or "dtype" in text
                or "Could not run" in text
            ), text
            SWEEP["clear_errors"] += 1
            results.append(None)
            continue
        outs = out if isinstance(out, tuple) else (out,)
        # the front end's logp / entropy outputs mirror the logits at masked tokens too
        checked = outs[:2] if op == "policy_loss_from_logits" else outs
        for o in checked:
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.device.type != "meta":
                if nan_grad:
                    continue
                assert not bool(torch.isnan(o).any()), (op, mutations)
                assert _extreme(mutations) or bool(torch.isfinite(o).all()), (op, mutations)
        SWEEP["finite_results"] += 1
        results.append(outs)
    if nan_grad:
        return  # inf * 0 is NaN in one evaluation order and 0 in another: nothing to compare
    if len(results) == 2 and None not in results:
        for a, b in zip(*results, strict=True):
            if isinstance(a, torch.Tensor) and a.device.type != "meta":
                torch.testing.assert_close(
                    a,
                    b,
                    rtol=1e-4,
                    atol=1e-5,
                    equal_nan=True,
                    msg=lambda m: f"{op} {mutations}: {m}",
                )
    else:  # both backends reject the same inputs
        assert len(results) < 2 or results[0] is None and results[1] is None, (op, mutations)


def test_sweep_counts():
    """Runs after the sweep in file order: prints the totals (zero crashes, zero hangs: the
    process survived every case; zero silently wrong: every result above was checked)."""
    if SWEEP["cases"]:
        print(f"\nbad-input sweep: {SWEEP}")
        assert SWEEP["cases"] == SWEEP["clear_errors"] + SWEEP["finite_results"]


# ----------------------------------------------------------------------------- kill -9


def _train(
    tmp_path: Path, name: str, *extra: str, resume: bool = False, kill_after: float | None = None
) -> int:
    cmd = [
        sys.executable,
        "-m",
        "trainer.train",
        *MICRO,
        "rl.steps=4",
        f"logging.run_dir={tmp_path}",
        f"logging.name={name}",
        *extra,
    ]
    if resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    if kill_after is None and proc.returncode != 0:
        raise AssertionError(err[-3000:])
    return proc.returncode


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_KEYS)} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The metrics of an uninterrupted run, and its wall time (the kills are timed from it)."""
    root = tmp_path_factory.mktemp("full")
    t0 = time.perf_counter()
    _train(root, "full")
    return _metrics(root / "full"), time.perf_counter() - t0


@pytest.mark.slow
def test_kill_inside_a_checkpoint_save_resumes_bit_exact(tmp_path, uninterrupted):
    # global step 4 = warm-up (2) + RL step 2: killed after its shards, state and manifest
    # are written, before the rename
    assert _train(tmp_path, "run", "debug.kill_in_save_step=4", kill_after=600) == -signal.SIGKILL
    root = tmp_path / "run" / "checkpoints"
    assert (root / ".tmp_step_000004").is_dir() and not (root / "step_000004").exists()
    _train(tmp_path, "run", resume=True)
    assert _metrics(tmp_path / "run") == uninterrupted[0]
    assert not (root / ".tmp_step_000004").exists()  # the run's own debris, cleared


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_at_a_random_moment_resumes_bit_exact(tmp_path, uninterrupted, seed):
    metrics, seconds = uninterrupted
    delay = random.Random(seed).uniform(0.3, 0.9) * seconds  # somewhere inside the run
    t0 = time.perf_counter()
    rc = _train(tmp_path, "run", kill_after=delay)
    if rc == 0:
        pytest.skip(f"the run finished before the kill at {delay:.1f} s")
    has_checkpoint = resume_checkpoint(tmp_path / "run")[0] is not None
    _train(tmp_path, "run", resume=has_checkpoint)  # no checkpoint yet: start afresh
    assert _metrics(tmp_path / "run") == metrics, f"killed after {time.perf_counter() - t0:.1f} s"
