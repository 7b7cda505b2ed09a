"""The reward stage: ``Scorer`` (outcome reward, TARL turn judging and its counts) and the
per-task and TARL step metrics of ``trainer/scoring.py``, on hand-built episodes."""

import pytest

from trainer.config import load_config
from trainer.rollout.episode import CallRecord, Episode
from trainer.scoring import Scorer, step_extras, tarl_rates, task_rates, task_sums
from trainer.tasks import Example


def decode(ids):
    return " ".join(map(str, ids))


def _example(uid, question, answer, query, evidence, **task):
    """An ``Example`` with one reference ``answer`` and one ``evidence`` passage."""
    return Example(uid, question, (answer,), query=query, evidence=((evidence,),), **task)


PARIS = _example("q-paris", "Where does Ada live?", "Paris", "Ada", "Ada lives in Paris.")

OBS_GOOD = "Ada lives in Paris."
OBS_OTHER = "Bob lives in Rome."
OBS_ERROR = "error: the call is not valid JSON"


def call(start, end, valid=True, good=None, observation="", query="Ada"):
    return CallRecord(
        start=start,
        end=end,
        tool_id=0 if valid else -1,
        key=0,
        name="search" if valid else None,
        arguments={"query": query} if valid else {},
        param_text=query,
        valid=valid,
        error=None if valid else "malformed",
        observation=observation,
        good=good,
    )


def episode(example, turns, answer, group=0):
    """An episode from ``turns``: a list of (policy tokens, observation tokens, call kwargs or
    None); the prompt is 3 tokens. Token ids are running integers from 100."""
    prompt = [1, 2, 3]
    ep = Episode(example, group, len(prompt), list(prompt), [0] * 3, [0.0] * 3)
    next_id = 100
    for n_policy, n_obs, call_kw in turns:
        start = len(ep.token_ids)
        ep.append(list(range(next_id, next_id + n_policy)), policy=True, logp=[-0.5] * n_policy)
        next_id += n_policy
        ep.turn_spans.append((start, len(ep.token_ids)))
        if call_kw is not None:
            ep.calls.append(call(start, len(ep.token_ids), **call_kw))
        if n_obs:
            ep.append(list(range(next_id, next_id + n_obs)), policy=False)
            next_id += n_obs
    ep.answer = answer
    ep.turns = len(turns)
    ep.finish = "answer" if answer is not None else "max_turns"
    return ep


def success_one_good_call():
    """Turn 1: a valid call that retrieved the evidence (+1); turn 2: the right answer (0)."""
    return episode(
        PARIS,
        [(4, 3, dict(good=True, observation=OBS_GOOD)), (2, 0, None)],
        answer="Paris",
    )


def failure_malformed_call():
    """Turn 1: a malformed call (-1); turn 2: a wrong answer, no evidence in hand (0)."""
    return episode(
        PARIS,
        [(4, 3, dict(valid=False, observation=OBS_ERROR)), (2, 0, None)],
        answer="London",
    )


def failure_repeat_and_contradiction():
    """Turn 1: good call (+1); turn 2: the same call again (-1); turn 3: a wrong answer with
    the evidence in hand (-1, dropped: only the first -1 is kept -> 0)."""
    return episode(
        PARIS,
        [
            (4, 3, dict(good=True, observation=OBS_GOOD)),
            (4, 3, dict(good=True, observation=OBS_GOOD)),
            (2, 0, None),
        ],
        answer="Rome",
    )


def success_two_good_calls():
    """Two good calls with different queries (+1, +1), then the right answer (0)."""
    return episode(
        PARIS,
        [
            (4, 3, dict(good=True, observation=OBS_GOOD, query="Ada")),
            (4, 3, dict(good=True, observation=OBS_GOOD, query="Ada home")),
            (2, 0, None),
        ],
        answer="the Paris",
    )


def test_hand_built_episodes_are_consistent():
    ep = success_one_good_call()
    # prompt 3 + call 4 + obs 3 + answer 2
    assert len(ep.token_ids) == len(ep.mask) == len(ep.logp) == 12
    assert ep.turn_spans == [(3, 7), (10, 12)]
    assert ep.num_policy_tokens == 6
    (c,) = ep.calls
    assert (c.start, c.end) == (3, 7)


# ---------------------------------------------------------------------------------------
# the outcome reward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["em", "f1"])
def test_without_tarl_the_reward_is_the_outcome(kind):
    cfg = load_config(None, [f"algo.reward={kind}"])
    scorer = Scorer(cfg, decode)
    assert scorer.judge is None and scorer.sums == {}
    right = success_one_good_call()  # "Paris"
    partial = episode(PARIS, [(2, 0, None)], answer="Paris France")
    articled = episode(PARIS, [(2, 0, None)], answer="The Paris!")
    none = episode(PARIS, [(2, 0, None)], answer=None)
    wrong = failure_malformed_call()  # "London"
    scorer([right, partial, articled, none, wrong])
    # em / f1 by hand: "paris france" vs "paris": precision 1/2, recall 1 -> f1 = 2/3
    expected = {
        id(right): (1.0, 1.0),
        id(partial): (0.0, 2 / 3),
        id(articled): (1.0, 1.0),
        id(none): (0.0, 0.0),
        id(wrong): (0.0, 0.0),
    }
    for ep in (right, partial, articled, none, wrong):
        em, f1 = expected[id(ep)]
        assert ep.em == em
        assert ep.f1 == pytest.approx(f1)
        assert ep.reward == pytest.approx(em if kind == "em" else f1)
    assert scorer.sums == {}
    scorer.reset()
    assert scorer.sums == {}
    scorer.close()


# ---------------------------------------------------------------------------------------
# TARL
# ---------------------------------------------------------------------------------------


def test_tarl_reward_and_verdict_counts():
    scorer = Scorer(load_config(None, ["tarl.enabled=true"]), decode)
    assert scorer.judge is not None
    keys = {"tarl_pos", "tarl_zero", "tarl_neg", "tarl_failed", "tarl_turns", "tarl_seconds"}
    assert set(scorer.sums) == keys and all(v == 0 for v in scorer.sums.values())

    eps = [
        success_one_good_call(),  # [+1, 0]: 10 + min(5, 5/2 * 1) = 12.5
        failure_malformed_call(),  # [-1, 0]: 0 - 5 + 0 = -5
        failure_repeat_and_contradiction(),  # [+1, -1, 0]: 0 - 5 + 5/3
        success_two_good_calls(),  # [+1, +1, 0]: 10 + 10/3
    ]
    scorer(eps)
    assert [ep.reward for ep in eps] == pytest.approx([12.5, -5.0, -5 + 5 / 3, 10 + 10 / 3])
    # the outcome scores stay those of the answers
    assert [ep.em for ep in eps] == [1.0, 0.0, 0.0, 1.0]
    s = scorer.sums
    assert (s["tarl_pos"], s["tarl_zero"], s["tarl_neg"]) == (4.0, 4.0, 2.0)
    assert s["tarl_turns"] == 10.0 and s["tarl_failed"] == 0.0
    assert s["tarl_seconds"] >= 0.0

    # the sums accumulate over calls until reset
    scorer([success_one_good_call()])
    assert (s["tarl_pos"], s["tarl_zero"], s["tarl_turns"]) == (5.0, 5.0, 12.0)
    scorer.reset()
    assert set(scorer.sums) == keys and all(v == 0 for v in scorer.sums.values())

    scorer([])  # nothing to score: the sums stay zero
    assert all(v == 0 for v in scorer.sums.values())
    scorer.close()


def test_tarl_bonus_is_capped_when_every_turn_is_useful():
    # two good calls and the answer in the same (last) turn: [+1, +1] -> 10 + min(5, 5/2*2)
    ep = episode(
        PARIS,
        [
            (4, 3, dict(good=True, observation=OBS_GOOD, query="Ada")),
            (4, 0, dict(good=True, observation=OBS_GOOD, query="Ada city")),
        ],
        answer="Paris",
    )
    Scorer(load_config(None, ["tarl.enabled=true"]), decode)([ep])
    assert ep.reward == pytest.approx(15.0)


def test_tarl_with_f1_uses_the_f1_as_success():
    # "Paris France": f1 2/3, not an exact match, and the evidence was in hand -> [+1, -1]
    ep = episode(
        PARIS, [(4, 3, dict(good=True, observation=OBS_GOOD)), (2, 0, None)], "Paris France"
    )
    scorer = Scorer(load_config(None, ["tarl.enabled=true", "algo.reward=f1"]), decode)
    scorer([ep])
    assert ep.reward == pytest.approx(10 * 2 / 3 - 5 + 2.5)
    assert scorer.sums["tarl_pos"] == 1.0 and scorer.sums["tarl_neg"] == 1.0


def test_tarl_weights_come_from_the_config():
    cfg = load_config(
        None,
        [
            "tarl.enabled=true",
            "tarl.success_weight=2",
            "tarl.penalty=1.5",
            "tarl.bonus_cap=3",
        ],
    )
    eps = [
        success_one_good_call(),  # 2 + min(3, 3/2 * 1) = 3.5
        failure_malformed_call(),  # -1.5
        failure_repeat_and_contradiction(),  # -1.5 + 3/3 * 1 = -0.5
        success_two_good_calls(),  # 2 + 3/3 * 2 = 4
    ]
    Scorer(cfg, decode)(eps)
    assert [ep.reward for ep in eps] == pytest.approx([3.5, -1.5, -0.5, 4.0])


def test_tarl_rates_from_hand_made_sums():
    s = {
        "tarl_pos": 3.0,
        "tarl_zero": 5.0,
        "tarl_neg": 2.0,
        "tarl_failed": 1.0,
        "tarl_turns": 10.0,
        "tarl_seconds": 4.0,
    }
    assert tarl_rates(s, world=2) == pytest.approx(
        {
            "tarl/turn_pos_rate": 0.3,
            "tarl/turn_zero_rate": 0.5,
            "tarl/turn_neg_rate": 0.2,
            "tarl/failed_verdicts": 1.0,
            "tarl/judge_s": 2.0,
        }
    )
    zero = dict.fromkeys(s, 0.0)  # a step without turns: rates 0, no division by zero
    assert tarl_rates(zero, world=1) == {
        "tarl/turn_pos_rate": 0.0,
        "tarl/turn_zero_rate": 0.0,
        "tarl/turn_neg_rate": 0.0,
        "tarl/failed_verdicts": 0.0,
        "tarl/judge_s": 0.0,
    }
    assert tarl_rates({"task_main_n": 3.0}, world=1) == {}  # TARL off: no tarl/* metrics


# ---------------------------------------------------------------------------------------
# per-task metrics
# ---------------------------------------------------------------------------------------

ARITHMETIC = dict(kind="arithmetic", task="arithmetic", tool="calculator", tool_arg="expression")
SUM = _example("arith-0", "What is 12 + 30?", "42", "12 + 30", "42", **ARITHMETIC)


def _scored(example, reward, em):
    ep = episode(example, [(2, 0, None)], answer=None)
    ep.reward, ep.em = reward, em
    return ep


def test_task_sums_and_rates_per_task():
    eps = [
        _scored(PARIS, 1.0, 1.0),
        _scored(PARIS, 0.5, 0.0),
        _scored(SUM, 1.0, 1.0),
        _scored(PARIS, 0.0, 0.0),
        _scored(SUM, 0.25, 0.0),
        _scored(PARIS, 1.0, 1.0),
    ]
    tasks = ["main", "arithmetic", "other"]
    s = task_sums(eps, tasks)
    assert s == pytest.approx(
        {
            "task_main_n": 4,
            "task_main_reward": 2.5,
            "task_main_em": 2.0,
            "task_arithmetic_n": 2,
            "task_arithmetic_reward": 1.25,
            "task_arithmetic_em": 1.0,
            "task_other_n": 0,
            "task_other_reward": 0.0,
            "task_other_em": 0.0,
        }
    )
    rates = task_rates({**s, "n": 6.0}, tasks)
    assert rates == pytest.approx(
        {
            "task/main/reward": 2.5 / 4,
            "task/main/accuracy": 0.5,
            "task/main/share": 4 / 6,
            "task/arithmetic/reward": 0.625,
            "task/arithmetic/accuracy": 0.5,
            "task/arithmetic/share": 2 / 6,
            "task/other/reward": 0.0,
            "task/other/accuracy": 0.0,
            "task/other/share": 0.0,
        }
    )


def test_task_metrics_of_an_empty_step_are_zero():
    tasks = ["main", "arithmetic"]
    s = task_sums([], tasks)
    assert s == {
        "task_main_n": 0,
        "task_main_reward": 0,
        "task_main_em": 0,
        "task_arithmetic_n": 0,
        "task_arithmetic_reward": 0,
        "task_arithmetic_em": 0,
    }
    rates = task_rates({**s, "n": 0.0}, tasks)
    assert set(rates) == {f"task/{t}/{m}" for t in tasks for m in ("reward", "accuracy", "share")}
    assert all(v == 0.0 for v in rates.values())


def test_task_sums_of_rank_shards_add_up_to_the_global_rates():
    """Sums of two ranks, added (the all-reduce), give the rates of the whole batch."""
    a = [_scored(PARIS, 1.0, 1.0), _scored(SUM, 0.0, 0.0)]
    b = [_scored(SUM, 1.0, 1.0), _scored(SUM, 1.0, 1.0)]
    tasks = ["main", "arithmetic"]
    sa, sb = task_sums(a, tasks), task_sums(b, tasks)
    total = {k: sa[k] + sb[k] for k in sa}
    total["n"] = 4.0
    rates = task_rates(total, tasks)
    assert rates["task/main/share"] == pytest.approx(0.25)
    assert rates["task/arithmetic/share"] == pytest.approx(0.75)
    assert rates["task/arithmetic/accuracy"] == pytest.approx(2 / 3)
    assert rates["task/main/accuracy"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------
# step_extras
# ---------------------------------------------------------------------------------------


def test_step_extras_with_tarl():
    scorer = Scorer(load_config(None, ["tarl.enabled=true"]), decode)
    arith = episode(
        SUM,
        [(4, 3, dict(good=True, observation="42", query="12 + 30")), (2, 0, None)],
        answer="42",
    )
    eps = [success_one_good_call(), failure_malformed_call(), arith]
    scorer(eps)
    assert arith.reward == pytest.approx(12.5)
    sums, rates = step_extras(scorer, eps, ["main", "arithmetic"], None, 1, 1.0)
    assert sums["tarl_pos"] == 2.0 and sums["tarl_neg"] == 1.0 and sums["tarl_turns"] == 6.0
    assert sums["task_main_n"] == 2 and sums["task_arithmetic_n"] == 1
    assert sums["task_main_reward"] == pytest.approx(12.5 - 5.0)
    assert sums["task_arithmetic_em"] == 1.0
    out = rates({**sums, "n": 3.0})
    assert out["tarl/turn_pos_rate"] == pytest.approx(2 / 6)
    assert out["tarl/turn_neg_rate"] == pytest.approx(1 / 6)
    assert out["task/main/reward"] == pytest.approx(3.75)
    assert out["task/main/accuracy"] == pytest.approx(0.5)
    assert out["task/arithmetic/share"] == pytest.approx(1 / 3)
    assert not any(k.startswith("axpo") for k in out)


def test_step_extras_without_tarl_has_only_task_metrics():
    scorer = Scorer(load_config(None, []), decode)
    eps = [success_one_good_call(), failure_malformed_call()]
    scorer(eps)
    sums, rates = step_extras(scorer, eps, ["main"], None, 1, 1.0)
    assert sums == {"task_main_n": 2, "task_main_reward": 1.0, "task_main_em": 1.0}
    assert rates({**sums, "n": 2.0}) == pytest.approx(
        {"task/main/reward": 0.5, "task/main/accuracy": 0.5, "task/main/share": 1.0}
    )


@pytest.mark.parametrize(
    "text, expected",
    [("-9", "-9"), ("+9.0", "9"), ("result -9.", "result -9"), ("3.5", "3.5")]
    + [("(1990)", "1990"), ("1,000", "1000"), ("The  Marlow!", "marlow"), ("don't", "dont")],
)
def test_numbers_keep_their_sign_and_decimals_when_normalised(text, expected):
    from trainer.rewards import normalize_answer

    assert normalize_answer(text) == expected


def test_rule_judge_sees_a_negative_answer_in_an_observation_with_words():
    """The evidence "result -9" is in hand, the answer "9" contradicts it: -1."""
    from trainer.judges import RuleJudge

    ex = Example("u", "What is 57 - 66?", ("-9",))
    ep = Episode(ex, 0, 2, list(range(10)), [0, 0] + [1] * 8, [0.0] * 10)
    ep.turn_spans = [(2, 6), (6, 10)]
    ep.calls = [
        CallRecord(3, 6, 1, 0, "calculator", {"e": "57-66"}, "57-66", True, None, "result -9")
    ]
    ep.answer = "9"
    assert RuleJudge().scores(ep) == [0, -1]
