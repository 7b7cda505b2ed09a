"""The verl and TRL adapters (``tapo_kernels.integrations``) against the installed libraries.

verl and TRL live in their own environment (``make peers-env``; ``make test-peers`` runs
this file there); without them their tests are skipped. Parity is with the libraries' own
code on fresh random inputs in float64: verl's registered ``vanilla`` / ``gspo`` / ``sapo``
policy losses (with its ``agg_loss``, global batch sizes, rollout weights and actor KL
loss) and TRL's ``GRPOTrainer._compute_loss`` (every mapped ``loss_type`` and option), on
the loss, its gradient with respect to the log-probabilities and the metrics. The TAPO
cases compare the fused lift with the library's loss on ``fused_correct(...).corrected``.
The call-span tests need only ``transformers`` (a character tokenizer built in the test).
"""

from __future__ import annotations

import collections
import json
import random
import tempfile
from pathlib import Path

import pytest
import torch

import tapo_kernels
from tapo_kernels.integrations.calls import (
    CallSpan,
    TapoSettings,
    call_map_from_rows,
    correct_advantages,
    find_call_spans,
    lift_tensors,
    record_spans,
    tool_calls,
)
from tapo_kernels.reference import apply_lift

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6
N_CONFIGS = 36
SPECIALS = ["<pad>", "<eos>", "<tool_call>", "</tool_call>"]
# the largest differences seen, per check (printed by test_zz_report with -s)
MAX_ERR: dict[str, float] = {}
SEEN: collections.Counter = collections.Counter()  # configurations exercising each feature


def _track(name: str, ours, theirs) -> float:
    ours, theirs = (
        torch.as_tensor(ours, dtype=torch.float64),
        torch.as_tensor(theirs, dtype=torch.float64),
    )
    err = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    MAX_ERR[name] = max(MAX_ERR.get(name, 0.0), err)
    return err


def _close(name: str, ours, theirs, tol: float = TOL) -> None:
    err = _track(name, ours, theirs)
    assert err <= tol, f"{name}: max |ours - theirs| = {err:.3e} > {tol}"


@pytest.fixture(scope="module")
def char_tokenizer():
    """A character-level fast tokenizer; the call tags are single added tokens."""
    pytest.importorskip("transformers")
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {s: i for i, s in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=SPECIALS[2:],
    )


def _call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


# --------------------------------------------------------------------------------------
# call spans (no framework)
# --------------------------------------------------------------------------------------


def test_find_call_spans(char_tokenizer):
    tok = char_tokenizer
    text = "think " + _call("search", q="tapo") + " <result> " + _call("zoom", bbox=[0, 0, 1, 1])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    spans = find_call_spans(ids, tok)
    assert [s.name for s in spans] == ["search", "zoom"]
    assert spans[0].arguments == '{"q": "tapo"}'
    for s in spans:
        assert tok.decode(ids[s.start : s.end]).startswith("<tool_call>")
        assert tok.decode(ids[s.start : s.end]).endswith("</tool_call>")
    # the same calls with multi-character tags: spans cover every character of both tags
    plain = text.replace("<tool_call>", "[CALL]").replace("</tool_call>", "[/CALL]")
    pids = tok(plain, add_special_tokens=False)["input_ids"]
    pspans = find_call_spans(pids, tok, start_tag="[CALL]", end_tag="[/CALL]")
    assert [tok.decode(pids[s.start : s.end]) for s in pspans] == [
        plain[plain.index("[CALL]") : plain.index("[/CALL]") + 7],
        plain[plain.rindex("[CALL]") :],
    ]
    # a call on a masked token (tool output) is dropped; a truncated call is not a call
    mask = [1] * len(ids)
    mask[spans[1].start + 3] = 0
    assert [s.name for s in find_call_spans(ids, tok, mask=mask)] == ["search"]
    cut = tok("a " + _call("search", q="x")[:-5], add_special_tokens=False)["input_ids"]
    assert find_call_spans(cut, tok) == []
    # a malformed call keeps its span with no name
    bad = tok("<tool_call>not json</tool_call>", add_special_tokens=False)["input_ids"]
    assert find_call_spans(bad, tok) == [CallSpan(0, len(bad), "", "not json")]


def test_record_spans_batch(char_tokenizer):
    tok = char_tokenizer
    rows = [_call("a", x=1) + "ok", "no calls", _call("b", y=2) + _call("a", x=1)]
    enc = tok(rows, add_special_tokens=False, padding=True, return_tensors="pt")
    spans = record_spans(enc["input_ids"], tok, mask=enc["attention_mask"])
    assert [[s.name for s in r] for r in spans] == [["a"], [], ["b", "a"]]
    assert spans[2][0].end == spans[2][1].start  # adjacent calls, no overlap


def test_tool_calls_and_lift_roundtrip():
    rows = [
        [
            CallSpan(1, 4, "search", '{"q": "cat"}'),
            CallSpan(5, 7, "zoom", '{"bbox": [0, 0, 0.5, 0.5]}'),
        ],
        [{"start": 0, "end": 3, "name": "search", "arguments": {"q": "cat"}}],
        [CallSpan(2, 9, "zoom", '{"bbox": [2, 0, 3, 1]}'), CallSpan(9, 12, "", "junk")],
        None,
    ]
    settings = TapoSettings(theta=0.5, alpha_min=0.0, iou_tools=("zoom",))
    calls, kinds = tool_calls(rows, T=10, settings=settings)
    assert calls.tool.tolist() == [0, 1, 0, -1, -1]  # search=0, zoom=1; bad box / no name
    assert kinds.tolist() == [0, 1]
    assert calls.end.tolist() == [4, 7, 3, 9, 10]  # clipped to T
    assert calls.params[1, :4].tolist() == [0, 0, 0.5, 0.5]
    adv = torch.tensor([-1.0, 1.0, -0.5, 0.5])
    mask = torch.ones(4, 10)
    result = correct_advantages(
        adv, mask, torch.zeros(4, dtype=torch.int64), rows, settings=settings
    )
    assert float(result.delta[0]) > 0  # the failing search matches the successful one
    spans, delta = lift_tensors(result, 4)
    call_map, call_delta = call_map_from_rows(spans, delta, 10)
    lifted = apply_lift(adv[:, None] * mask, call_map, call_delta)
    torch.testing.assert_close(lifted, result.corrected)


# --------------------------------------------------------------------------------------
# random batches
# --------------------------------------------------------------------------------------


def _batch(rng: random.Random, B: int, T: int, token_adv: bool = True):
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05
    logp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * rng.choice(
        [0.05, 0.3, 0.8, 1.2]
    )
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv = (
        adv[:, None].expand(B, T).clone()
        if not token_adv
        else torch.randn(B, T, generator=g, dtype=torch.float64)
    )
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if rng.random() < 0.3:
        lengths[rng.randrange(B)] = 0  # an empty row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) * 1.8 + 0.2
    return logp, old, adv, mask, ref, weights


def _tapo_scenario(rng: random.Random, B: int, T: int, G: int):
    """Group advantages, tool-call records with repeated arguments, and their correction."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    rewards = torch.randint(0, 2, (B,), generator=g).double()
    groups = torch.arange(B) // G
    seq_adv = tapo_kernels.reference.group_advantages(rewards, groups)
    rows = []
    for _ in range(B):
        calls, pos = [], 0
        for _ in range(rng.randrange(0, 3)):
            start = pos + rng.randrange(0, 2)
            end = min(start + rng.randrange(2, 5), T)
            if end <= start:
                break
            name = rng.choice(["search", "lookup"])
            calls.append(CallSpan(start, end, name, json.dumps({"q": rng.choice(["a b", "c d"])})))
            pos = end
        rows.append(calls)
    mask = torch.ones(B, T, dtype=torch.bool)
    settings = TapoSettings(theta=0.5, alpha_min=0.0, beta=0.9)
    result = correct_advantages(seq_adv, mask, groups, rows, settings=settings)
    return seq_adv, groups, rows, result


# --------------------------------------------------------------------------------------
# verl
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verl_env():
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import ActorConfig

    from tapo_kernels.integrations import verl as tapo_verl

    tapo_verl.register(advantage_hook=False)
    tapo_verl.register(advantage_hook=False)  # idempotent
    return core_algos, ActorConfig, tapo_verl


VERL_PEERS = {
    "grpo": ("vanilla", "tapo_grpo"),
    "gspo": ("gspo", "tapo_gspo"),
    "sapo": ("sapo", "tapo_sapo"),
}
VERL_AGGS = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def _verl_config(ActorConfig, rng: random.Random, algo: str, agg: str, mask):
    low, high = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.5)
    cfg = ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=rng.uniform(0.1, 0.3),
        clip_ratio_low=low if rng.random() < 0.8 else None,
        clip_ratio_high=high if rng.random() < 0.8 else None,
        clip_ratio_c=rng.uniform(1.1, 2.5),
        tau_pos=rng.uniform(0.5, 2.0),
        tau_neg=rng.uniform(0.5, 2.0),
        loss_agg_mode=agg,
        loss_scale_factor=rng.choice([None, 7, 64]),
    )
    dp = rng.choice([1, 1, 2, 4])
    info = {"dp_size": dp}
    if dp > 1 or rng.random() < 0.5:
        info["batch_num_tokens"] = int(mask.sum()) * dp + rng.randrange(0, 5)
        info["global_batch_size"] = mask.shape[0] * dp + rng.randrange(0, 3)
    info["loss_scale_factor"] = cfg.loss_scale_factor
    cfg.global_batch_info.update(info)
    return cfg


def _run_verl(core_algos, name, logp, old, adv, mask, cfg, weights):
    x = logp.clone().requires_grad_()
    loss, metrics = core_algos.get_policy_loss_fn(name)(
        old_log_prob=old,
        log_prob=x,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=cfg.loss_agg_mode,
        config=cfg,
        rollout_is_weights=weights,
    )
    loss.backward()
    return loss.detach(), x.grad, metrics


def test_verl_registered(verl_env):
    core_algos, _, tapo_verl = verl_env
    for name, fn in tapo_verl.POLICY_LOSSES.items():
        assert core_algos.get_policy_loss_fn(name) is fn
    assert core_algos.get_adv_estimator_fn("tapo_grpo") is tapo_verl.compute_tapo_grpo_advantage


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_verl_loss_parity(verl_env, seed):
    """``tapo_{grpo,gspo,sapo}`` == verl's ``vanilla`` / ``gspo`` / ``sapo``: loss, gradient,
    metrics, over aggregation modes, clip ranges, dual clip, global batch sizes, weights."""
    core_algos, ActorConfig, _ = verl_env
    rng = random.Random(1000 + seed)
    algo = ("grpo", "gspo", "sapo")[seed % 3]
    agg = VERL_AGGS[(seed // 3) % len(VERL_AGGS)]
    B, T = rng.randrange(2, 9), rng.randrange(3, 17)
    logp, old, adv, mask, _, weights = _batch(rng, B, T, token_adv=rng.random() < 0.5)
    cfg = _verl_config(ActorConfig, rng, algo, agg, mask)
    w = weights if rng.random() < 0.5 else None
    theirs, ours = (
        _run_verl(core_algos, name, logp, old, adv, mask, cfg, w) for name in VERL_PEERS[algo]
    )
    _close("verl loss", ours[0], theirs[0])
    _close("verl grad", ours[1], theirs[1])
    assert set(ours[2]) == set(theirs[2])
    for key in theirs[2]:
        _close(f"verl {key}", ours[2][key], theirs[2][key])
    SEEN["verl configs with the dual clip active"] += theirs[2]["actor/pg_clipfrac_lower"] > 0
    SEEN["verl configs with the PPO clip active"] += theirs[2]["actor/pg_clipfrac"] > 0


@pytest.mark.parametrize("seed", range(12))
def test_verl_fused_kl_parity(verl_env, seed):
    """The op with ``kl_knobs`` == verl's policy loss + ``kl_loss_coef * agg_loss(kl)``."""
    core_algos, ActorConfig, tapo_verl = verl_env
    rng = random.Random(2000 + seed)
    algo = ("grpo", "gspo")[seed % 2]
    agg = VERL_AGGS[(seed // 2) % len(VERL_AGGS)]
    B, T = rng.randrange(2, 8), rng.randrange(3, 12)
    logp, old, adv, mask, ref, weights = _batch(rng, B, T)
    cfg = _verl_config(ActorConfig, rng, algo, agg, mask)
    kl_type = rng.choice(["low_var_kl", "k3", "kl", "k1", "mse", "k2"])
    coef = rng.uniform(0.001, 0.5)
    x = logp.clone().requires_grad_()
    pg, _ = core_algos.get_policy_loss_fn(VERL_PEERS[algo][0])(old, x, adv, mask, agg, cfg, weights)
    kl = core_algos.agg_loss(
        core_algos.kl_penalty(x, ref, kl_type), mask, agg, **cfg.global_batch_info
    )
    (pg + coef * kl).backward()
    kcfg = {"use_kl_loss": True, "kl_loss_coef": coef, "kl_loss_type": kl_type}
    y = logp.clone().requires_grad_()
    out = tapo_kernels.policy_loss(
        y,
        old,
        adv,
        mask,
        ref_logp=ref,
        importance_weight=weights,
        **tapo_verl.loss_knobs(algo, cfg, agg, T),
        **tapo_verl.kl_knobs(kcfg),
    )
    out.loss.backward()
    _close("verl+kl loss", out.loss.detach(), (pg + coef * kl).detach())
    _close("verl+kl grad", y.grad, x.grad)


@pytest.mark.parametrize("seed", range(9))
def test_verl_tapo_lift(verl_env, seed):
    """The fused lift (``call_map`` / ``call_delta``) == verl's loss on the corrected advantages."""
    core_algos, ActorConfig, tapo_verl = verl_env
    rng = random.Random(3000 + seed)
    algo = ("grpo", "gspo", "sapo")[seed % 3]
    agg = VERL_AGGS[seed % len(VERL_AGGS)]
    B, T = 8, rng.randrange(8, 14)
    seq_adv, _, _, result = _tapo_scenario(rng, B, T, G=4)
    logp, old, _, _, _, weights = _batch(rng, B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    cfg = _verl_config(ActorConfig, rng, algo, agg, mask)
    theirs = _run_verl(
        core_algos, VERL_PEERS[algo][0], logp, old, result.corrected.double(), mask, cfg, weights
    )
    y = logp.clone().requires_grad_()
    out = tapo_kernels.policy_loss(
        y,
        old,
        seq_adv.double(),
        mask,
        call_map=result.calls.call_map(B, T),
        call_delta=result.delta.double(),
        importance_weight=weights,
        **tapo_verl.loss_knobs(algo, cfg, agg, T),
    )
    out.loss.backward()
    _close("verl tapo loss", out.loss.detach(), theirs[0])
    _close("verl tapo grad", y.grad, theirs[1])


def test_verl_tapo_advantage(verl_env):
    """verl's ``compute_advantage`` with ``tapo_grpo``: verl's GRPO advantages, then the lift
    of ``fused_correct`` on the records of ``non_tensor_batch["tapo_tool_calls"]``."""
    core_algos, _, tapo_verl = verl_env
    pytest.importorskip("verl.trainer.ppo.ray_trainer")
    import numpy as np
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo import ray_trainer

    tapo_verl.install_advantage_hook()
    tapo_verl.install_advantage_hook()
    assert ray_trainer.compute_advantage._tapo_original is not None
    rng = random.Random(4)
    B, T, G = 12, 14, 4
    _, _, rows, _ = _tapo_scenario(rng, B, T, G)
    lengths = torch.tensor([rng.randrange(T // 2, T + 1) for _ in range(B)])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    scores = torch.tensor([float(rng.random() < 0.5) for _ in range(B)])
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores
    uid = np.array([f"prompt-{i // G}" for i in range(B)], dtype=object)
    records = np.empty(B, dtype=object)
    records[:] = [[c.to_dict() for c in r] for r in rows]
    config = OmegaConf.create(
        {"norm_adv_by_std_in_grpo": True, "tapo": {"theta": 0.5, "alpha_min": 0.0, "beta": 0.9}}
    )

    def run(non_tensors):
        data = DataProto.from_dict(
            tensors={"token_level_rewards": rewards.clone(), "response_mask": mask.clone()},
            non_tensors={"uid": uid, **non_tensors},
        )
        return ray_trainer.compute_advantage(data, "tapo_grpo", config=config).batch["advantages"]

    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uid)
    expected = correct_advantages(
        grpo, mask, torch.arange(B) // G, rows, settings=tapo_verl.tapo_settings(config)
    )
    assert float(expected.delta.max()) > 0, "the scenario must lift some call"
    got = run({"tapo_tool_calls": records})
    torch.testing.assert_close(got, expected.corrected, rtol=0, atol=0)
    assert not torch.equal(got, grpo)
    extra = np.empty(B, dtype=object)
    extra[:] = [{"tapo_tool_calls": r} for r in records]
    torch.testing.assert_close(run({"extra_fields": extra}), expected.corrected, rtol=0, atol=0)
    torch.testing.assert_close(run({}), grpo, rtol=0, atol=0)  # no records: GRPO


def test_verl_plugin_module(verl_env):
    """``VERL_USE_EXTERNAL_MODULES=tapo_kernels.integrations.verl_plugin`` registers everything
    while verl itself is being imported (verl's external-module hook)."""
    import os
    import subprocess
    import sys

    code = (
        "import verl.trainer.ppo.core_algos as c, verl.trainer.ppo.ray_trainer as r;"
        "assert {'tapo_grpo', 'tapo_gspo', 'tapo_sapo'} <= set(c.POLICY_LOSS_REGISTRY);"
        "assert 'tapo_grpo' in c.ADV_ESTIMATOR_REGISTRY;"
        "assert hasattr(r.compute_advantage, '_tapo_original')"
    )
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="tapo_kernels.integrations.verl_plugin")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_verl_example_config(verl_env):
    """``examples/verl/tapo_grpo.yaml`` composes with verl's trainer config, and its actor and
    algorithm sections drive the TAPO loss and estimator."""
    _, _, tapo_verl = verl_env
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from verl.utils.config import omega_conf_to_dataclass

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "examples" / "verl"), version_base=None):
        cfg = compose(config_name="tapo_grpo")
    GlobalHydra.instance().clear()
    assert cfg.algorithm.adv_estimator == "tapo_grpo"
    actor = cfg.actor_rollout_ref.actor
    assert actor.policy_loss.loss_mode in tapo_verl.POLICY_LOSSES
    assert cfg.actor_rollout_ref.model.external_lib == "tapo_kernels.integrations.verl_plugin"
    settings = tapo_verl.tapo_settings(cfg.algorithm)
    assert settings.theta == cfg.algorithm.tapo.theta
    actor_cfg = omega_conf_to_dataclass(actor)
    rng = random.Random(5)
    logp, old, adv, mask, _, _ = _batch(rng, 4, 6)
    ours = _run_verl(
        verl_env[0], actor.policy_loss.loss_mode, logp, old, adv, mask, actor_cfg, None
    )
    theirs = _run_verl(verl_env[0], "vanilla", logp, old, adv, mask, actor_cfg, None)
    _close("verl example loss", ours[0], theirs[0])


def test_verl_agent_loop_records(verl_env, char_tokenizer):
    pytest.importorskip("verl.experimental.agent_loop.tool_agent_loop")
    from verl.experimental.agent_loop import agent_loop
    from verl.experimental.agent_loop.tool_parser import FunctionCall

    from tapo_kernels.integrations import verl_agent_loop

    assert "tapo_tool_agent" in agent_loop._agent_loop_registry
    tok = char_tokenizer
    first = tok("ok " + _call("search", q="a"), add_special_tokens=False)["input_ids"]
    tool_out = tok("<result " + _call("fake", q="b") + ">", add_special_tokens=False)["input_ids"]
    second = tok(_call("search", q="c") + _call("lookup", k=1), add_special_tokens=False)[
        "input_ids"
    ]
    records: list = []
    ids, mask = list(first), [1] * len(first)
    verl_agent_loop.record_turn(
        records, ids, mask, 0, tok, [FunctionCall(name="search", arguments='{"q":"a"}')]
    )
    before = len(ids) + len(tool_out)
    ids += tool_out + second
    mask += [0] * len(tool_out) + [1] * len(second)
    verl_agent_loop.record_turn(records, ids, mask, len(first), tok, [], limit=1)
    assert [(r.name, r.arguments) for r in records] == [
        ("search", '{"q": "a"}'),
        ("search", '{"q": "c"}'),
    ]
    assert records[1].start == before
    assert tok.decode(ids[records[1].start : records[1].end]) == _call("search", q="c")
    done = verl_agent_loop.finish(records, response_length=before + 3)
    assert [d["end"] for d in done] == [records[0].end, before + 3]


# --------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------

TRL_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo")


@pytest.fixture(scope="module")
def trl_env(char_tokenizer):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOTrainer

    from tapo_kernels.integrations.trl import TapoGRPOConfig, TapoGRPOTrainer

    tok = char_tokenizer
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    tmp = tempfile.mkdtemp()

    def build(cls, config_cls, reward=None, rollout_func=None, **kw):
        args = config_cls(
            output_dir=tmp,
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=48,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            max_steps=1,
            logging_steps=1,
            **kw,
        )
        extra = {} if rollout_func is None else {"rollout_func": rollout_func}
        return cls(
            model=model,
            reward_funcs=[
                reward or (lambda completions, **_: [float(len(c) % 2) for c in completions])
            ],
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["abc", "xyz"] * 4}),
            processing_class=tok,
            **extra,
        )

    return GRPOTrainer, TapoGRPOTrainer, TapoGRPOConfig, build


def _trl_configure(trainer, rng: random.Random, loss_type: str) -> None:
    trainer.loss_type = loss_type
    level = "token"
    if loss_type != "sapo" and rng.random() < 0.4:
        level = "sequence"
    trainer.importance_sampling_level = level
    trainer.epsilon_low = rng.uniform(0.05, 0.35)
    trainer.epsilon_high = rng.uniform(0.05, 0.5)
    trainer.args.delta = None
    if level == "token" and loss_type != "sapo" and rng.random() < 0.8:
        trainer.args.delta = 1.0 + trainer.epsilon_high + rng.uniform(0.02, 0.6)
    trainer.beta = rng.choice([0.0, 0.0, rng.uniform(0.01, 0.3)])
    trainer.args.use_bias_correction_kl = False
    trainer.args.sapo_temperature_pos = rng.uniform(0.5, 2.0)
    trainer.args.sapo_temperature_neg = rng.uniform(0.5, 2.0)
    trainer.top_entropy_quantile = rng.choice([1.0, 1.0, 0.5])
    trainer.off_policy_mask_threshold = rng.choice([None, None, 0.05])
    trainer.current_gradient_accumulation_steps = rng.choice([1, 2, 4])
    trainer.args.steps_per_generation = rng.choice([1, 2])
    trainer.max_completion_length = rng.randrange(16, 40)
    trainer.model.train(rng.random() < 0.8)


def _trl_inputs(rng: random.Random, B: int, T: int, beta: float, keep_old: bool = False):
    logp, old, _, mask, ref, _ = _batch(rng, B, T)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": torch.randn(B, generator=g, dtype=torch.float64),
        "num_items_in_batch": torch.tensor(float(mask.sum()) * rng.choice([1, 2, 3])),
    }
    if keep_old or rng.random() < 0.7:
        inputs["old_per_token_logps"] = old
    if rng.random() < 0.3:
        inputs["tool_mask"] = (torch.rand(B, T, generator=g) > 0.2).long()
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    entropies = torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    return logp, entropies, inputs


def _run_trl(trainer, compute_loss, logp, entropies, inputs):
    x = logp.clone().requires_grad_()
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (x, entropies, None)
    try:
        loss = compute_loss(trainer, None, dict(inputs))
    finally:
        del trainer._get_per_token_logps_and_entropies
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("seed", range(N_CONFIGS))
def test_trl_loss_parity(trl_env, seed):
    """``TapoGRPOTrainer._compute_loss`` == ``GRPOTrainer._compute_loss`` (loss and gradient)."""
    GRPOTrainer, TapoGRPOTrainer, TapoGRPOConfig, build = trl_env
    trainer = _trl_trainer(trl_env)
    rng = random.Random(5000 + seed)
    _trl_configure(trainer, rng, TRL_TYPES[seed % len(TRL_TYPES)])
    B, T = rng.randrange(2, 9), rng.randrange(3, 17)
    logp, entropies, inputs = _trl_inputs(rng, B, T, trainer.beta, trainer.args.delta is not None)
    if trainer.args.delta is not None:
        ratio = (logp - inputs["old_per_token_logps"]).exp()
        negative = (inputs["advantages"][:, None] < 0) & (inputs["completion_mask"] != 0)
        SEEN["trl configs with the delta cap active"] += bool(
            ((ratio > trainer.args.delta) & negative).any()
        )
    theirs = _run_trl(trainer, GRPOTrainer._compute_loss, logp, entropies, inputs)
    ours = _run_trl(trainer, TapoGRPOTrainer._compute_loss, logp, entropies, inputs)
    _close("trl loss", ours[0], theirs[0])
    _close("trl grad", ours[1], theirs[1])


@pytest.mark.parametrize("seed", range(9))
def test_trl_tapo_lift(trl_env, seed):
    """Our loss with the recorded lift == TRL's loss on ``fused_correct(...).corrected``."""
    GRPOTrainer, TapoGRPOTrainer, _, _ = trl_env
    trainer = _trl_trainer(trl_env)
    rng = random.Random(6000 + seed)
    _trl_configure(trainer, rng, TRL_TYPES[seed % len(TRL_TYPES)])
    if seed % 2 and trainer.loss_type != "sapo":  # sequence level: the lift reaches the row
        trainer.importance_sampling_level = "sequence"
        trainer.args.delta = None
    B, T = 8, rng.randrange(8, 14)
    seq_adv, _, _, result = _tapo_scenario(rng, B, T, G=4)
    logp, entropies, inputs = _trl_inputs(rng, B, T, trainer.beta)
    inputs["completion_mask"] = torch.ones(B, T, dtype=torch.long)
    inputs.pop("tool_mask", None)
    spans, delta = lift_tensors(result, B)
    theirs_inputs = dict(inputs, advantages=result.corrected.double())
    ours_inputs = dict(
        inputs, advantages=seq_adv.double(), tapo_call_spans=spans, tapo_call_delta=delta
    )
    theirs = _run_trl(trainer, GRPOTrainer._compute_loss, logp, entropies, theirs_inputs)
    ours = _run_trl(trainer, TapoGRPOTrainer._compute_loss, logp, entropies, ours_inputs)
    _close("trl tapo loss", ours[0], theirs[0])
    _close("trl tapo grad", ours[1], theirs[1])


_TRAINERS: dict = {}


def _trl_trainer(trl_env):
    if "plain" not in _TRAINERS:
        _, TapoGRPOTrainer, TapoGRPOConfig, build = trl_env
        _TRAINERS["plain"] = build(TapoGRPOTrainer, TapoGRPOConfig)
    return _TRAINERS["plain"]


def test_trl_unsupported(trl_env):
    from tapo_kernels.integrations.trl import loss_knobs

    trainer = _trl_trainer(trl_env)
    rng = random.Random(7)
    cases = [
        dict(loss_type="cispo"),
        dict(loss_type="vespo"),
        dict(loss_type="sapo", importance_sampling_level="sequence"),
        dict(loss_type="grpo", importance_sampling_level="sequence", delta=3.0),
        dict(loss_type="grpo", delta=1.1),
        dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=True),
    ]
    for case in cases:
        _trl_configure(trainer, rng, case.pop("loss_type"))
        trainer.importance_sampling_level = case.pop("importance_sampling_level", "token")
        trainer.epsilon_high = 0.2
        trainer.beta = case.pop("beta", 0.0)
        for k, v in case.items():
            setattr(trainer.args, k, v)
        with pytest.raises(NotImplementedError):
            loss_knobs(trainer)
        trainer.args.delta, trainer.args.use_bias_correction_kl = None, False
    trainer.importance_sampling_level, trainer.top_entropy_quantile = "token", 1.0


def test_trl_tool_rollout_training_step(trl_env, char_tokenizer, monkeypatch):
    """A scripted tool-using rollout through the real trainer: the calls are found, the lift
    is recorded, and the loss of a real forward equals TRL's on the corrected advantages."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental
    GRPOTrainer, TapoGRPOTrainer, TapoGRPOConfig, build = trl_env
    tok = char_tokenizer
    good, bad = _call("search", q="capital of france"), _call("search", q="capital of france?")
    texts = [good + "<paris>", bad + "<rome>", good + "<lyon>", _call("lookup", k="x") + "<paris>"]
    result_tokens = tok("<obs>", add_special_tokens=False)["input_ids"]

    def rollout(prompts, trainer):
        prompt_ids, completion_ids, env_mask = [], [], []
        for i, p in enumerate(prompts):
            head, _, tail = texts[i % 4].partition("</tool_call>")
            head_ids = tok(head + "</tool_call>", add_special_tokens=False)["input_ids"]
            tail_ids = tok(tail, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            prompt_ids.append(tok(p, add_special_tokens=False)["input_ids"])
            completion_ids.append(head_ids + result_tokens + tail_ids)
            env_mask.append([1] * len(head_ids) + [0] * len(result_tokens) + [1] * len(tail_ids))
        return {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "logprobs": None,
            "env_mask": env_mask,
        }

    def reward(completions, **_):
        return [1.0 if "paris" in c else 0.0 for c in completions]

    trainer = build(
        TapoGRPOTrainer,
        TapoGRPOConfig,
        loss_type="grpo",
        tapo_theta=0.5,
        tapo_alpha_min=0.0,
        reward=reward,
        rollout_func=rollout,
    )
    trainer.model.train()
    batch = trainer._generate_and_score_completions([{"prompt": "q1"}] * 4)
    spans, delta = batch["tapo_call_spans"], batch["tapo_call_delta"]
    assert spans.shape[:2] == (4, 1) and float(delta[1, 0]) > 0 and float(delta[0, 0]) == 0
    assert trainer._metrics["train"]["tapo/corrected_calls"][-1] >= 1
    mask = batch["completion_mask"] * batch["tool_mask"]
    corrected = apply_lift(
        batch["advantages"][:, None] * mask, *call_map_from_rows(spans, delta, mask.shape[1])
    )
    trainer.current_gradient_accumulation_steps = 1
    losses, grads = [], []
    for cls, inputs in (
        (
            GRPOTrainer,
            {k: v for k, v in batch.items() if not k.startswith("tapo_")}
            | {"advantages": corrected},
        ),
        (TapoGRPOTrainer, batch),
    ):
        trainer.model.zero_grad()
        loss = cls._compute_loss(trainer, trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))
    _close("trl model loss", losses[1], losses[0], tol=1e-6)
    _close("trl model grad", grads[1], grads[0], tol=1e-6)
    assert float(losses[0]) != 0.0 and float(grads[0].abs().sum()) > 0.0
    trainer.train()  # one optimizer step through the whole trainer
    assert (
        any(k.startswith("tapo/") for k in trainer._metrics["train"])
        or trainer.state.global_step == 1
    )


def test_trl_example_runs(trl_env):
    """``examples/trl/train_tapo_grpo.py`` trains a step and logs the TAPO statistics."""
    import runpy

    module = runpy.run_path(str(ROOT / "examples" / "trl" / "train_tapo_grpo.py"))
    last = module["main"](["--steps", "1"])
    assert "loss" in last and "tapo/failing_calls" in last


def test_zz_report():
    """Prints the largest differences seen (run with -s)."""
    for name, err in sorted(MAX_ERR.items()):
        print(f"max |ours - theirs| {name}: {err:.3e}")
    for name, count in sorted(SEEN.items()):
        print(f"{name}: {count}")
