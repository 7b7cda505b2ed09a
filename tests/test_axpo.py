"""AXPO: all-wrong groups, prefix cuts, confidence ranking, budget, advantages, masking."""

import math

import pytest
import torch

from trainer import axpo
from trainer.config import AxpoConfig, Config, RolloutConfig
from trainer.distributed import DistContext
from trainer.loss import Losses, new_update_sums
from trainer.modeling import TAGS, format_call, train_tokenizer
from trainer.rollout import Batch, CallRecord, Episode, RolloutEngine
from trainer.tasks import Example, synthetic_task
from trainer.testing import ScriptedLM
from trainer.tools import build_registry


class Fmt:
    """A formatter over a fixed vocabulary (token id -> text)."""

    def __init__(self, vocab):
        self.vocab = vocab
        self.tags = TAGS

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


VOCAB = {0: "Q", 1: "?", 2: "<tool_call>", 3: "{x}", 4: "</tool_call>", 5: "<obs>", 6: "</obs>"}
VOCAB.update({7: "<answer>", 8: "a", 9: "</answer>", 10: "<tool", 11: "_call>", 12: "hm "})


def episode(group, em, calls=True, logp=(-0.1, -0.2, -0.3), uid="q", tokens=None):
    """prompt [0, 1], turn 1 = [12, 2, 3, 4] (a call at tokens 3..5), observation, answer."""
    ex = Example(uid, "Q?", ("a",))
    ids = tokens or [0, 1, 12, 2, 3, 4, 5, 6, 7, 8, 9]
    ep = Episode(ex, group, 2, list(ids), [0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1], [0.0] * len(ids))
    ep.turn_spans = [(2, 6), (8, 11)]
    if calls:
        ep.logp[3], ep.logp[4], ep.logp[5] = logp
        ep.calls = [CallRecord(3, 6, 0, 0, "search", {}, "x", True, None)]
    ep.em = float(em)
    return ep


def test_all_wrong_groups_needs_no_success_and_a_call():
    eps = [
        episode(0, 0),
        episode(0, 0, calls=False),  # group 0: all failed, one used a tool -> all-wrong
        episode(1, 0),
        episode(1, 1),  # group 1: one success -> not all-wrong
        episode(2, 0, calls=False),
        episode(2, 0, calls=False),  # group 2: failed without any tool call -> not AXPO's
    ]
    assert axpo.all_wrong_groups(eps) == {0: [0, 1]}


def test_prefix_cut_is_token_exact_for_single_and_multi_token_tags():
    fmt = Fmt(VOCAB)
    ep = episode(0, 0)
    assert axpo.prefix_length(ep, fmt) == 4  # [0, 1, 12, 2]: up to and including <tool_call>
    # the opening tag split over two tokens: the cut includes both
    split = [0, 1, 12, 10, 11, 3, 4, 5, 6, 7, 8, 9][:11]
    ep2 = episode(0, 0, tokens=split)
    ep2.calls = [CallRecord(3, 7, 0, 0, "search", {}, "x", True, None)]
    assert axpo.prefix_length(ep2, fmt) == 5
    # a call without an opening tag (a closing tag alone) cannot be cut
    ep3 = episode(0, 0, tokens=[0, 1, 12, 3, 3, 4, 5, 6, 7, 8, 9])
    ep3.calls = [CallRecord(2, 6, -1, 0, None, {}, "", False, "no opening tag")]
    assert axpo.prefix_length(ep3, fmt) is None
    assert axpo.prefix_length(episode(0, 0, calls=False), fmt) is None


def test_confidence_is_the_mean_probability_of_the_call_tokens():
    ep = episode(0, 0, logp=(math.log(0.5), math.log(0.25), math.log(0.75)))
    assert axpo.call_confidence(ep) == pytest.approx((0.5 + 0.25 + 0.75) / 3)


@pytest.mark.parametrize(
    "budget, G, expected", [(0.25, 8, 2), (0.25, 4, 1), (0.25, 2, 1), (1.0, 4, 4), (0.5, 6, 3)]
)
def test_budget_per_group(budget, G, expected):
    assert axpo.budget_per_group(budget, G) == expected


def test_choose_prefixes_least_confident_first_within_budget():
    fmt = Fmt(VOCAB)
    probs = [0.9, 0.2, 0.6, 0.4]  # per rollout of one group of 4 (all failed)
    eps = [episode(0, 0, logp=(math.log(p),) * 3) for p in probs]
    eps += [episode(1, 1), episode(1, 0), episode(1, 0), episode(1, 0)]  # not all-wrong
    chosen = axpo.choose_prefixes(eps, fmt, budget=0.5, group_size=4)  # 2 per group
    assert [c.source for c in chosen] == [1, 3]
    assert [c.cut for c in chosen] == [4, 4]
    assert chosen[0].confidence == pytest.approx(0.2)


def test_recovery_advantages_normalised_in_the_original_group():
    eps = [episode(0, 0) for _ in range(4)] + [episode(1, 0) for _ in range(2)]
    adv = axpo.recovery_advantages(eps, {0: True, 1: False, 4: False})
    # group 0 rewards [1, 0, 0, 0]: mean 0.25, unbiased std 0.5
    assert adv[0] == pytest.approx(0.75 / (0.5 + 1e-6))
    assert adv[1] == pytest.approx(-0.25 / (0.5 + 1e-6))
    # group 1 rewards [0, 0]: nothing recovered, advantage 0
    assert adv[4] == pytest.approx(0.0)
    assert set(adv) == {0, 1, 4}
    # Dr. GRPO: no division by the std
    assert axpo.recovery_advantages(eps, {0: True}, scale_by_std=False)[0] == pytest.approx(0.75)


class FakeEngine:
    """Continues each prefix with [3, 4] (the call's rest) and an answer: the correct one for
    continuations of questions whose uid starts with 'good', on every k-th when 'some'."""

    def __init__(self):
        self.fmt = Fmt(VOCAB)
        self.seen = []

    def continue_episodes(self, episodes, *, seed):
        for j, ep in enumerate(episodes):
            self.seen.append((list(ep.token_ids), ep.open_turn, ep.group))
            ep.append([3, 4], policy=True, logp=[-0.5, -0.5])
            ep.append([5, 6], policy=False)
            ep.append([7, 8, 9], policy=True, logp=[-0.1] * 3)
            ep.answer = "a" if ep.example.uid == "good" and j % 2 == 0 else "b"
        return episodes


def score(episodes):
    for ep in episodes:
        ep.em = float(ep.answer == ep.example.answers[0])


def test_resample_end_to_end_on_a_hand_made_batch():
    G = 4
    eps = [episode(0, 0, uid="good", logp=(math.log(p),) * 3) for p in (0.9, 0.1, 0.5, 0.8)]
    eps += [episode(1, 0, uid="bad", logp=(math.log(p),) * 3) for p in (0.3, 0.7, 0.6, 0.95)]
    eps += [episode(2, 1), episode(2, 0), episode(2, 0), episode(2, 0)]  # has a success
    masks_before = [list(ep.mask) for ep in eps]
    engine = FakeEngine()
    cfg = AxpoConfig(enabled=True, budget=0.25, k=4)
    out = axpo.resample(engine, eps, cfg, G, seed=0, score=score)
    # one prefix per all-wrong group (budget 0.25 * 4), the least confident: rollouts 1 and 4
    assert out.sums["axpo_all_wrong"] == 2 and out.sums["axpo_groups"] == 3
    assert out.sums["axpo_prefixes"] == 2
    assert len(out.continuations) == 8
    # each continuation started from the cut prefix [0, 1, 12, 2] inside its open turn
    for tokens, open_turn, _ in engine.seen:
        assert tokens == [0, 1, 12, 2] and open_turn == 2
    # continuation groups are new and one per prefix
    groups = [c.group for c in out.continuations]
    assert groups == [3] * 4 + [4] * 4
    # prefix tokens masked out of the continuation rows; their own tokens trained
    for c in out.continuations:
        assert c.mask[:4] == [0, 0, 0, 0] and c.mask[4:6] == [1, 1]
        assert c.logp[:4] == [0.0] * 4
    # the 'good' question recovered (continuations 0 and 2 answered correctly), 'bad' did not
    assert out.sums["axpo_recovered"] == 1
    assert out.sums["axpo_extra_tokens"] == 8 * 5
    # sources: prefix kept, own continuation masked; other rollouts untouched
    assert eps[1].mask == masks_before[1][:4] + [0] * 7
    assert eps[4].mask == masks_before[4][:4] + [0] * 7
    for i in (0, 2, 3, 5, 6, 7, 8, 9, 10, 11):
        assert eps[i].mask == masks_before[i]
    # recovery advantages: group 0 rewards [0, 1, 0, 0] -> source 1 gets 0.75 / 0.5
    assert out.source_advantage[1] == pytest.approx(0.75 / (0.5 + 1e-6))
    assert out.source_advantage[4] == pytest.approx(0.0)
    assert out.rows == [1, 4] + list(range(12, 20))
    flags = out.row_flags(20)
    assert flags.tolist() == [i in out.rows for i in range(20)]
    seq_adv = torch.zeros(20)
    patched = axpo.apply_advantages(seq_adv, out)
    assert patched[1] == pytest.approx(1.5, rel=1e-5) and patched[4] == 0
    assert seq_adv.abs().sum() == 0  # not modified in place


def test_no_all_wrong_group_means_no_resampling():
    eps = [episode(0, 1), episode(0, 0)]
    engine = FakeEngine()
    out = axpo.resample(engine, eps, AxpoConfig(enabled=True), 2, seed=0, score=score)
    assert out.continuations == [] and out.rows == [] and engine.seen == []
    assert out.sums["axpo_prefixes"] == 0 and out.sums["axpo_all_wrong"] == 0


def test_continuing_a_cut_prefix_reproduces_the_episode_token_for_token():
    """With a scripted policy, the rollout engine continues a prefix cut after <tool_call>
    inside its open turn: same tokens, same call span, same turn spans; prefix masked."""
    task = synthetic_task(num_entities=8, attributes=["pet"], seed=3)
    texts = list(task.texts()) + [format_call("search", {"query": e.query}) for e in task.train]
    tok = train_tokenizer(texts, vocab_size=300)
    registry = build_registry(["search"], task.corpora, isolation="thread")
    ex = task.train[0]
    script = {
        ex.question: [
            "hmm " + format_call("search", {"query": ex.query}),
            f"{TAGS.answer_open}{ex.answers[0]}{TAGS.answer_close}",
        ]
    }
    cfg = RolloutConfig(max_turns=3, max_new_tokens_per_turn=64, max_total_tokens=256)
    engine = RolloutEngine(ScriptedLM(tok, script), tok, registry, cfg, max_obs_tokens=32)
    (ep,) = engine.rollout([ex], [0], seed=0)
    assert ep.calls and ep.calls[0].valid
    cut = axpo.prefix_length(ep, engine.fmt)
    assert engine.fmt.decode(ep.token_ids[ep.prompt_len : cut]).endswith(TAGS.tool_open)
    assert not engine.fmt.decode(ep.token_ids[ep.prompt_len : cut - 1]).endswith(TAGS.tool_open)
    prefix = axpo.prefix_episode(ep, cut, group=7)
    engine.continue_episodes([prefix], seed=1)
    assert prefix.token_ids == ep.token_ids
    assert [(c.start, c.end, c.valid) for c in prefix.calls] == [
        (c.start, c.end, c.valid) for c in ep.calls
    ]
    assert prefix.turn_spans == ep.turn_spans and prefix.turns == ep.turns
    assert prefix.answer == ep.answer and prefix.group == 7
    assert prefix.mask[:cut] == [0] * cut and prefix.mask[cut:] == ep.mask[cut:]
    registry.close()


def test_axpo_rows_clipped_separately_sum_to_one_loss():
    """The loss of a mini-batch split into unflagged and flagged rows (separate calls, same
    global_count) equals one call when the clip is the same, and the flagged rows follow
    their own clip when it differs."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.algo.loss_input = "logp"
    ctx = DistContext(0, 1, 0, torch.device("cpu"), False)

    class LogpModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(5, 9))

        def forward(self, input_ids, attention_mask=None):
            return type("O", (), {"logits": self.w[input_ids] * 1.0})()

    model = LogpModel()
    losses = Losses(cfg, ctx, model)
    B, T = 6, 7
    ids = torch.randint(0, 5, (B, T))
    mask = (torch.rand(B, T) > 0.3).float()
    mask[:, 0] = 0
    batch = Batch(
        ids,
        torch.ones(B, T, dtype=torch.int64),
        mask,
        torch.randn(B, T) * 0.5 - 2.0,  # old log-probs far off: ratios get clipped
        torch.zeros(B, dtype=torch.int64),
        torch.zeros(B),
        collate_calls_empty(),
    )
    adv = torch.randn(B, T) * mask
    flags = torch.tensor([False, True, False, True, True, False])

    def grads(clip_rows, clip):
        model.zero_grad()
        sums = new_update_sums()
        losses.backward(
            model, batch, slice(0, B), adv, None, None, None, sums, False, clip_rows, clip
        )
        return model.w.grad.clone(), sums["upd_loss"]

    g_one, l_one = grads(None, None)
    same = {"eps_low": losses.knobs["eps_low"], "eps_high": losses.knobs["eps_high"]}
    assert losses._split_micros([slice(0, B)], flags, same) == [False]  # same knobs: no split
    # forced split (a clip equal in fp32): the parts add up to the whole
    nudged = {"eps_low": same["eps_low"], "eps_high": same["eps_high"] + 1e-12}
    assert losses._split_micros([slice(0, 3), slice(3, B)], flags, nudged) == [True, True]
    none = torch.zeros(B, dtype=torch.bool)
    assert losses._split_micros([slice(0, B)], none, nudged) == [False]  # no flagged row
    g_split, l_split = grads(flags, nudged)
    torch.testing.assert_close(g_split, g_one, rtol=1e-5, atol=1e-6)
    assert l_split == pytest.approx(l_one, rel=1e-5, abs=1e-6)
    # a different clip on the flagged rows changes only what those rows contribute
    g_wide, _ = grads(flags, {"eps_low": 0.9, "eps_high": 5.0})
    assert not torch.allclose(g_wide, g_one)


def collate_calls_empty():
    from tapo_kernels import ToolCalls

    return ToolCalls.empty(4)


def test_pad_rows_adds_rows_that_train_nothing():
    eps = [episode(0, 0), episode(1, 0)]
    padded = axpo.pad_rows(list(eps), 5)
    assert len(padded) == 5 and padded[:2] == eps
    for i, p in enumerate(padded[2:]):
        assert p.mask == [0] and p.calls == [] and p.reward == 0.0 and len(p.token_ids) == 1
        assert p.group == 2 + i  # a group of its own: advantage 0
    assert axpo.pad_rows(list(eps), 2) == eps


@pytest.mark.parametrize(
    "override, key",
    [
        ("axpo.budget=0", "axpo.budget"),
        ("axpo.budget=1.5", "axpo.budget"),
        ("axpo.k=1", "axpo.k"),
        ("axpo.eps_low=1.5", "axpo.eps_low"),
        ("tarl.judge=oracle", "tarl.judge"),
        ("tarl.penalty=-1", "tarl.penalty"),
        ("tarl.max_concurrency=0", "tarl.max_concurrency"),
    ],
)
def test_config_rejects_bad_axpo_and_tarl_settings(override, key):
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])
