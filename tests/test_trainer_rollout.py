"""Rollout engine: call spans, masks, malformed calls, log-probs, batching, demonstrations."""

import copy
import json

import pytest
import torch

import tapo_kernels
from trainer.config import ModelConfig, RolloutConfig
from trainer.credit import encode_calls
from trainer.modeling import TAGS, format_call, tiny_model, train_tokenizer
from trainer.rollout import PromptFormatter, RolloutEngine, collate, demonstration, token_logprobs
from trainer.tasks import Example, synthetic_task
from trainer.testing import ScriptedLM
from trainer.tools import build_registry


@pytest.fixture(scope="module")
def task():
    return synthetic_task(num_entities=12, attributes=["home city", "pet"], seed=5)


@pytest.fixture(scope="module")
def tokenizer(task):
    texts = list(task.texts()) + [format_call("search", {"query": e.query}) for e in task.train]
    return train_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def registry(task):
    return build_registry(["search", "failing", "slow"], task.corpora, timeout_s=0.2)


def call_text(query, name="search"):
    return format_call(name, {"query": query})


def engine_for(model, tokenizer, registry, **overrides):
    cfg = RolloutConfig(
        **{"max_turns": 3, "max_new_tokens_per_turn": 64, "max_total_tokens": 256, **overrides}
    )
    return RolloutEngine(model, tokenizer, registry, cfg, max_obs_tokens=32)


def test_scripted_episode_spans_masks_and_answer(task, tokenizer, registry):
    ex = task.train[0]
    script = {
        ex.question: [
            "Let me look. " + call_text(ex.query),
            f"{TAGS.answer_open}{ex.answers[0]}{TAGS.answer_close}",
        ]
    }
    engine = engine_for(ScriptedLM(tokenizer, script), tokenizer, registry)
    (ep,) = engine.rollout([ex], [0], seed=0)
    assert ep.finish == "answer" and ep.turns == 2 and ep.answer == ex.answers[0]
    (c,) = ep.calls
    assert c.valid and c.tool_id == 0 and c.key == 0 and c.param_text == ex.query
    # the span decodes back to exactly the call text, tag to tag
    assert engine.fmt.decode(ep.token_ids[c.start : c.end]) == call_text(ex.query)
    assert c.observation.endswith(f" is {ex.answers[0]}.")
    obs_ids = engine.fmt.observation_ids(c.observation)
    # observation tokens follow the call immediately and carry mask 0; policy tokens mask 1
    assert ep.token_ids[c.end : c.end + len(obs_ids)] == obs_ids
    assert ep.mask[c.end : c.end + len(obs_ids)] == [0] * len(obs_ids)
    assert ep.mask[: ep.prompt_len] == [0] * ep.prompt_len
    policy = [t for t, m in zip(ep.token_ids, ep.mask, strict=False) if m]
    expected = engine.fmt.encode(script[ex.question][0]) + engine.fmt.encode(script[ex.question][1])
    assert policy == expected
    assert len(ep.token_ids) == len(ep.mask) == len(ep.logp)
    assert all(lp == 0.0 for lp, m in zip(ep.logp, ep.mask, strict=False) if not m)
    assert all(-1e-6 < lp <= 0.0 for lp, m in zip(ep.logp, ep.mask, strict=False) if m)


@pytest.mark.parametrize(
    "turn_text, error",
    [
        (
            TAGS.tool_open + '{"name": "search", "arguments": {"query": "x"' + TAGS.tool_close,
            "not valid JSON",
        ),
        (
            TAGS.tool_open + json.dumps({"name": "browse", "arguments": {}}) + TAGS.tool_close,
            "unknown tool",
        ),
        (
            TAGS.tool_open
            + json.dumps({"name": "search", "arguments": {"q": "x"}})
            + TAGS.tool_close,
            "needs the argument 'query'",
        ),
        (
            json.dumps({"name": "search", "arguments": {"query": "x"}}) + TAGS.tool_close,
            "no opening",
        ),
        (call_text("x", name="failing"), "RuntimeError"),
        (call_text("x", name="slow"), "timed out"),
    ],
)
def test_bad_calls_give_error_observations_and_the_episode_goes_on(
    task, tokenizer, registry, turn_text, error
):
    ex = task.train[1]
    answer = f"{TAGS.answer_open}{ex.answers[0]}{TAGS.answer_close}"
    engine = engine_for(
        ScriptedLM(tokenizer, {ex.question: [turn_text, answer]}), tokenizer, registry
    )
    (ep,) = engine.rollout([ex], [0], seed=0)
    (c,) = ep.calls
    assert not c.valid and c.tool_id == -1 and error in c.error
    assert c.observation.startswith("error: ") and error in c.observation
    assert ep.finish == "answer" and ep.answer == ex.answers[0]  # the next turn still ran
    # a failed call is never a witness: zero parameters, no references, never good
    params = registry.encode_calls([c.tool_id], [c.param_text], [c.refs])
    assert torch.count_nonzero(params) == 0 and c.refs == () and c.good is False
    decoded = engine.fmt.decode(ep.token_ids[c.start : c.end])
    assert decoded.endswith(TAGS.tool_close) and decoded in turn_text


def test_unclosed_call_at_eos_and_max_turns(task, tokenizer, registry):
    ex1, ex2 = task.train[2], task.train[3]
    unclosed = TAGS.tool_open + json.dumps({"name": "search", "arguments": {"query": ex1.query}})
    scripts = {ex1.question: [unclosed], ex2.question: [call_text(ex2.query)]}
    engine = engine_for(ScriptedLM(tokenizer, scripts), tokenizer, registry, max_turns=2)
    ep1, ep2 = engine.rollout([ex1, ex2], [0, 1], seed=0)
    # the script ends without the closing tag, so the model writes EOS inside the call
    assert ep1.finish == "eos" and ep1.answer is None
    (c,) = ep1.calls
    assert not c.valid and "not closed" in c.error
    assert engine.fmt.decode(ep1.token_ids[c.start : c.end]) == unclosed
    # the second model calls forever: two turns, two valid calls, then max_turns
    assert ep2.finish == "max_turns" and ep2.turns == 2 and len(ep2.calls) == 2
    assert all(c.valid for c in ep2.calls) and ep2.calls[0].end <= ep2.calls[1].start


def test_token_budgets_are_respected(task, tokenizer, registry):
    ex = task.train[4]
    long_text = "word " * 200
    engine = engine_for(
        ScriptedLM(tokenizer, {ex.question: [long_text]}),
        tokenizer,
        registry,
        max_new_tokens_per_turn=7,
        max_total_tokens=60,
    )
    (ep,) = engine.rollout([ex], [0], seed=0)
    assert ep.finish == "truncated" and sum(ep.mask) == 7
    engine = engine_for(
        ScriptedLM(tokenizer, {ex.question: [call_text(ex.query)]}),
        tokenizer,
        registry,
        max_total_tokens=50,
    )
    (ep,) = engine.rollout([ex], [0], seed=0)
    assert len(ep.token_ids) <= 50 and ep.finish == "max_tokens"


def test_malformed_call_injection(task, tokenizer, registry):
    ex = task.train[5]
    engine = engine_for(
        ScriptedLM(tokenizer, {ex.question: [call_text(ex.query), "<answer>x</answer>"]}),
        tokenizer,
        registry,
    )
    engine.malformed_call_rate = 1.0
    (ep,) = engine.rollout([ex], [0], seed=0)
    assert not ep.calls[0].valid and "injected" in ep.calls[0].error and ep.finish == "answer"


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = tiny_model(
        ModelConfig(
            hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
        ),
        len(tokenizer),
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        seed=0,
    )
    # a random model rarely writes tags; nudge it towards them so some turns contain calls
    with torch.no_grad():
        model.lm_head.weight[:8] *= 4.0
    return model


def test_old_logp_equals_a_fresh_forward_pass(task, tokenizer, registry, tiny):
    """Recorded (KV-cached, left-padded) log-probs vs a right-padded full forward.

    Tolerance by rule: both fp32 computations are compared with an fp64 forward; the
    rollout's error may be at most 2x the fresh fp32 forward's error plus 1e-6.
    """
    engine = engine_for(
        tiny, tokenizer, registry, max_new_tokens_per_turn=12, max_total_tokens=96, temperature=0.7
    )
    examples = task.train[:6]
    episodes = engine.rollout(examples * 2, list(range(12)), seed=3)
    assert len({len(e.token_ids) for e in episodes}) > 1  # ragged rows: padding is exercised
    batch = collate(episodes, tokenizer.pad_token_id)
    with torch.no_grad():
        fresh32 = token_logprobs(tiny, batch.input_ids, batch.attention_mask, temperature=0.7)
        ref64 = token_logprobs(
            copy.deepcopy(tiny).double(), batch.input_ids, batch.attention_mask, temperature=0.7
        )
    m = batch.mask.bool()
    err_rollout = (batch.old_logp.double() - ref64)[m].abs().max()
    err_fresh = (fresh32.double() - ref64)[m].abs().max()
    assert torch.isfinite(batch.old_logp).all()
    assert err_rollout <= 2 * err_fresh + 1e-6, (err_rollout, err_fresh)
    assert (batch.old_logp[~m] == 0).all()


def test_rollouts_are_reproducible_by_seed(task, tokenizer, registry, tiny):
    engine = engine_for(tiny, tokenizer, registry, max_new_tokens_per_turn=10, max_total_tokens=80)
    ex = task.train[:4]
    a = engine.rollout(ex, [0, 1, 2, 3], seed=11)
    b = engine.rollout(ex, [0, 1, 2, 3], seed=11)
    c = engine.rollout(ex, [0, 1, 2, 3], seed=12)
    assert [e.token_ids for e in a] == [e.token_ids for e in b]
    assert [e.token_ids for e in a] != [e.token_ids for e in c]
    g1 = engine.rollout(ex, [0, 1, 2, 3], seed=1, greedy=True)
    g2 = engine.rollout(ex, [0, 1, 2, 3], seed=2, greedy=True)
    assert [e.token_ids for e in g1] == [e.token_ids for e in g2]


def test_collate_feeds_fused_correct_and_policy_loss(task, tokenizer, registry):
    """Two rollouts of one question issue the same search; the successful one lifts the other."""
    ex = task.train[6]
    other = Example("other", ex.question.replace("What", "Which"), ex.answers, 0, ex.query)
    good = [call_text(ex.query), f"{TAGS.answer_open}{ex.answers[0]}{TAGS.answer_close}"]
    bad = [call_text(ex.query), f"{TAGS.answer_open}wrong{TAGS.answer_close}"]
    engine = engine_for(
        ScriptedLM(tokenizer, {ex.question: good, other.question: bad}), tokenizer, registry
    )
    episodes = engine.rollout([ex, other], [0, 0], seed=0)
    for ep in episodes:
        ep.reward = float(ep.answer == ex.answers[0])
    batch = collate(
        episodes, tokenizer.pad_token_id, params=encode_calls(registry, episodes, mode="tool")
    )
    B, T = batch.shape
    assert len(batch.calls) == 2 and batch.calls.seq.tolist() == [0, 1]
    assert episodes[0].calls[0].refs == episodes[1].calls[0].refs != ()
    call_map = batch.calls.call_map(B, T)
    for k, ep in enumerate(episodes):
        c = ep.calls[0]
        assert (call_map[k, c.start : c.end] == k).all() and (call_map[k, : c.start] == -1).all()
    seq_adv = tapo_kernels.reference.group_advantages(batch.rewards, batch.group_ids)
    # two rollouts, rewards 1 and 0: mean 0.5, unbiased std sqrt(0.5), A = +-0.5/0.7071 = +-0.7071
    assert seq_adv.tolist() == pytest.approx([0.70710, -0.70710], abs=1e-4)
    adv = seq_adv[:, None] * batch.mask
    res = tapo_kernels.fused_correct(
        adv, seq_adv, batch.group_ids, batch.calls, registry.sim_kind_tensor()
    )
    stats = res.stats()
    assert stats.failing_calls == 1 and stats.corrected_calls == 1
    # identical queries: s = 1, coverage 1/1, conf 1, lift = 0.8 * 1 * 0.7071
    assert res.delta[1].item() == pytest.approx(0.8 * 0.70710, abs=1e-4)
    c = episodes[1].calls[0]
    # lifted, never flipped: min(0, -0.7071 + 0.5657) = -0.1414 on the call span only
    lifted = res.corrected[1, c.start : c.end]
    assert lifted.tolist() == pytest.approx(
        [-0.70710 + 0.8 * 0.70710] * (c.end - c.start), abs=1e-4
    )
    outside = torch.ones(T, dtype=torch.bool)
    outside[c.start : c.end] = False
    assert torch.equal(res.corrected[1, outside], adv[1, outside])
    out = tapo_kernels.policy_loss(
        batch.old_logp.clone().requires_grad_(),
        batch.old_logp,
        adv,
        batch.mask,
        call_map=call_map,
        call_delta=res.delta,
        preset="grpo",
    )
    assert torch.isfinite(out.loss)


def test_demonstration_matches_the_rollout_format(task, tokenizer, registry):
    fmt = PromptFormatter(tokenizer, RolloutConfig(), max_obs_tokens=32)
    ex = task.demos[0]
    ep = demonstration(fmt, registry, ex)
    (c,) = ep.calls
    assert c.valid and fmt.decode(ep.token_ids[c.start : c.end]) == call_text(ex.query)
    text = fmt.decode(ep.token_ids)
    assert text.startswith(f"Question: {ex.question}\n{TAGS.tool_open}")
    assert text.endswith(f"{TAGS.answer_open}{ex.answers[0]}{TAGS.answer_close}")
    obs = fmt.observation_ids(c.observation)
    assert (
        ep.token_ids[c.end : c.end + len(obs)] == obs
        and sum(ep.mask[c.end : c.end + len(obs)]) == 0
    )
    assert sum(ep.mask) == len(ep.token_ids) - ep.prompt_len - len(obs)


def test_multi_token_tags_are_found_by_text_and_stop_generation(task, tokenizer, registry):
    """Real checkpoints may spell tags as several tokens: spans come from character offsets."""
    from trainer.modeling import ChatTags
    from trainer.rollout import find_call

    tags = ChatTags(
        tool_open="[CALL]",
        tool_close="[/CALL]",
        obs_open="[OBS]",
        obs_close="[/OBS]",
        answer_open="[ANS]",
        answer_close="[/ANS]",
    )
    fmt = PromptFormatter(tokenizer, RolloutConfig(), tags, max_obs_tokens=32)
    assert len(fmt.encode(tags.tool_open)) > 1 and len(fmt.encode(tags.tool_close)) > 1
    body = json.dumps({"name": "search", "arguments": {"query": "Zorvex Quill pet"}})
    tokens = fmt.encode(f"I will search. [CALL]{body}[/CALL]")
    i0, i1, found, closed = find_call(fmt, tokens)
    assert closed and found == body and fmt.decode(tokens[i0:i1]) == f"[CALL]{body}[/CALL]"
    tokens = fmt.encode(f"ok [CALL]{body[:20]}")
    i0, i1, found, closed = find_call(fmt, tokens)
    assert not closed and found == body[:20] and fmt.decode(tokens[i0:i1]) == f"[CALL]{body[:20]}"
    assert find_call(fmt, fmt.encode("no call here")) is None
    # the engine stops a turn at a multi-token closing tag and still records the call
    ex = task.train[7]
    script = {
        ex.question: [
            f"[CALL]{format_call('search', {'query': ex.query})[len('<tool_call>') : -len('</tool_call>')]}"
            f"[/CALL] trailing text never generated",
            f"[ANS]{ex.answers[0]}[/ANS]",
        ]
    }
    engine = RolloutEngine(
        ScriptedLM(tokenizer, script),
        tokenizer,
        registry,
        RolloutConfig(max_new_tokens_per_turn=80, max_total_tokens=256),
        max_obs_tokens=32,
        tags=tags,
    )
    engine.model.obs_close = None  # the scripted model counts turns by the observation close tag
    engine.model.next_token = _turns_by_text(engine.model, "[/OBS]")
    (ep,) = engine.rollout([ex], [0], seed=0)
    (c,) = ep.calls
    assert c.valid and engine.fmt.decode(ep.token_ids[c.start : c.end]).endswith("[/CALL]")
    assert ep.finish == "answer" and ep.answer == ex.answers[0]
    assert "trailing" not in engine.fmt.decode(ep.token_ids)


def _turns_by_text(model, close_text):
    """A ``next_token`` for ScriptedLM that counts turns by a multi-token closing text."""

    def next_token(ctx):
        text = model.tok.decode(ctx, skip_special_tokens=False)
        question = text.split("Question: ", 1)[1].split("\n", 1)[0]
        turns = model.scripts[question]
        turn = text.count(close_text)
        prefix = text.rsplit(close_text, 1)[0] + close_text if turn else f"Question: {question}\n"
        written = len(ctx) - len(model.tok.encode(prefix, add_special_tokens=False))
        script = turns[min(turn, len(turns) - 1)]
        return script[written] if written < len(script) else model.tok.eos_token_id

    return next_token
