"""Mixed-task batches: the arithmetic task, ``draw_prompts``, ``load_task`` mixing, arithmetic
demonstrations with the calculator, and the ``task.mix_fraction`` config checks."""

import random

import pytest

from trainer.config import ConfigError, RolloutConfig, TaskConfig, load_config
from trainer.modeling import TAGS, format_call, train_tokenizer
from trainer.rewards import exact_match
from trainer.rollout import PromptFormatter, demonstration
from trainer.tasks import Example, TaskData, arithmetic_task, draw_prompts, load_task
from trainer.tools import build_registry

# a small synthetic main task (the default one takes seconds to build)
SMALL = dict(num_entities=12, attributes=["home city", "pet"], num_demos=40, seed=5)


def evaluate(expression: str) -> int:
    """The value of ``"a op b"`` (two non-negative integers, op in + - *), computed here."""
    a, op, b = expression.split(" ")
    x, y = int(a), int(b)
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    raise AssertionError(f"unexpected operator in {expression!r}")


def questions(examples):
    return [ex.question for ex in examples]


# ---------------------------------------------------------------------------------------
# the arithmetic task
# ---------------------------------------------------------------------------------------


def test_arithmetic_splits_have_the_asked_sizes_and_distinct_problems():
    d = arithmetic_task(num_train=40, num_heldout=10, num_demos=20, seed=1)
    assert (len(d.train), len(d.heldout), len(d.demos)) == (40, 10, 20)
    everything = questions(d.train) + questions(d.heldout) + questions(d.demos)
    assert len(set(everything)) == 70  # no problem twice, within or across splits
    assert not set(questions(d.train)) & set(questions(d.heldout))
    assert not set(questions(d.train)) & set(questions(d.demos))
    assert not set(questions(d.heldout)) & set(questions(d.demos))
    assert len({ex.uid for ex in d.train + d.heldout + d.demos}) == 70
    assert d.corpora == {} and d.mix_train == []


def test_arithmetic_is_deterministic_per_seed_and_differs_across_seeds():
    a = arithmetic_task(num_train=30, num_heldout=5, num_demos=5, seed=3)
    b = arithmetic_task(num_train=30, num_heldout=5, num_demos=5, seed=3)
    c = arithmetic_task(num_train=30, num_heldout=5, num_demos=5, seed=4)
    assert a.train == b.train and a.heldout == b.heldout and a.demos == b.demos
    assert questions(a.train) != questions(c.train)


def test_arithmetic_examples_carry_their_answer_tool_and_evidence():
    d = arithmetic_task(num_train=200, num_heldout=50, num_demos=50, seed=0, corpus_id=7)
    ops = set()
    for ex in d.train + d.heldout + d.demos:
        expression = ex.query
        assert ex.question == f"What is {expression}?"
        a, op, b = expression.split(" ")
        ops.add(op)
        assert 10 <= int(a) <= 999 and 10 <= int(b) <= 99
        assert ex.answers == (str(evaluate(expression)),)
        assert ex.task == "arithmetic" and ex.kind == "arithmetic"
        assert ex.tool == "calculator" and ex.tool_arg == "expression"
        assert ex.corpus_id == 7
        assert ex.demo_queries() == (expression,)
        assert ex.answers[0] in ex.evidence_docs()
        assert ex.is_good_observation(ex.answers[0]) is True
    assert ops == {"+", "-", "*"}  # 300 problems draw every operator


def test_a_wrong_sign_is_not_an_exact_match_for_a_negative_arithmetic_answer():
    d = arithmetic_task(seed=0)
    negative = [ex for ex in d.train + d.heldout + d.demos if evaluate(ex.query) < 0]
    assert negative, "the default arithmetic task has problems like '57 - 66'"
    ex = negative[0]
    assert exact_match(str(-evaluate(ex.query)), ex.answers) == 0.0


# ---------------------------------------------------------------------------------------
# draw_prompts
# ---------------------------------------------------------------------------------------


def _main(n: int) -> list[Example]:
    return [Example(f"m{i}", f"main question {i}?", (f"a{i}",)) for i in range(n)]


def _mixed(n_main: int, n_mix: int) -> TaskData:
    mix = arithmetic_task(num_train=n_mix, num_heldout=0, num_demos=0, seed=2).train
    return TaskData(train=_main(n_main), heldout=[], mix_train=mix)


@pytest.mark.parametrize(
    "n, fraction, n_mix",
    [(8, 0.25, 2), (12, 0.5, 6), (3, 0.5, 2), (10, 0.1, 1), (8, 0.0, 0), (4, 0.75, 3)],
)
def test_draw_prompts_takes_round_n_times_fraction_from_the_mixed_task(n, fraction, n_mix):
    task = _mixed(40, 40)
    for seed in range(5):
        prompts = draw_prompts(task, n, fraction, random.Random(seed))
        assert len(prompts) == n
        mixed = [ex for ex in prompts if ex.task == "arithmetic"]
        main = [ex for ex in prompts if ex.task == "main"]
        assert len(mixed) == n_mix and len(main) == n - n_mix
        assert all(ex in task.mix_train for ex in mixed)
        assert all(ex in task.train for ex in main)
        # both pools are large enough: no question twice
        assert len({ex.uid for ex in prompts}) == n


def test_draw_prompts_without_mixed_questions_draws_only_main_ones():
    task = TaskData(train=_main(20), heldout=[])
    prompts = draw_prompts(task, 8, 0.5, random.Random(0))
    assert len(prompts) == 8 and all(ex.task == "main" for ex in prompts)
    assert len({ex.uid for ex in prompts}) == 8


def test_draw_prompts_repeats_only_a_pool_smaller_than_asked():
    # main pool of 3, 6 main questions asked (n=8, f=0.25): each of the 3 at least once
    task = _mixed(3, 40)
    prompts = draw_prompts(task, 8, 0.25, random.Random(1))
    main = [ex.uid for ex in prompts if ex.task == "main"]
    mixed = [ex.uid for ex in prompts if ex.task == "arithmetic"]
    assert len(main) == 6 and set(main) == {"m0", "m1", "m2"}
    assert len(mixed) == 2 and len(set(mixed)) == 2  # the large pool does not repeat

    # mixed pool of 1, 4 mixed questions asked (n=8, f=0.5): the same one 4 times
    task = _mixed(40, 1)
    prompts = draw_prompts(task, 8, 0.5, random.Random(1))
    main = [ex.uid for ex in prompts if ex.task == "main"]
    mixed = [ex.uid for ex in prompts if ex.task == "arithmetic"]
    assert len(main) == 4 and len(set(main)) == 4
    assert mixed == [task.mix_train[0].uid] * 4


@pytest.mark.parametrize("with_mix", [False, True])
@pytest.mark.parametrize("n, pool", [(8, 30), (5, 5), (12, 4)])
def test_fraction_zero_draws_what_the_trainer_drew_before_mixing(with_mix, n, pool):
    """The pre-mixing trainer: ``rng.sample(range(len(train)), min(n, len(train)))`` and,
    for tiny tasks, ``rng.randrange(len(train))`` until it had ``n``."""
    task = _mixed(pool, 10) if with_mix else TaskData(train=_main(pool), heldout=[])
    for seed in (0, 1, 123):
        rng = random.Random(seed)
        got = draw_prompts(task, n, 0.0, rng)
        old = random.Random(seed)
        picks = old.sample(range(len(task.train)), min(n, len(task.train)))
        while len(picks) < n:
            picks.append(old.randrange(len(task.train)))
        assert got == [task.train[i] for i in picks]
        assert rng.random() == old.random()  # and the generator is left in the same state


# ---------------------------------------------------------------------------------------
# load_task mixing
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain():
    return load_task(TaskConfig(**SMALL))


@pytest.fixture(scope="module")
def mixed():
    return load_task(TaskConfig(**SMALL, mix_fraction=0.5))


def test_load_task_without_mixing_leaves_mix_train_empty(plain):
    assert plain.mix_train == []
    assert len(plain.demos) == 40
    assert all(ex.task == "main" for ex in plain.train + plain.heldout + plain.demos)
    assert "arithmetic" not in plain.summary() and "mixed in" not in plain.summary()


def test_load_task_mixes_in_arithmetic_questions_and_demonstrations(plain, mixed):
    # the main task is unchanged
    assert mixed.train == plain.train and mixed.heldout == plain.heldout
    assert mixed.corpora == plain.corpora
    assert mixed.demos[:40] == plain.demos
    # arithmetic training questions
    assert len(mixed.mix_train) == 256  # arithmetic_task's default num_train
    assert all(ex.task == "arithmetic" and ex.tool == "calculator" for ex in mixed.mix_train)
    # demonstrations in proportion: max(16, round(40 * 0.5)) = 20
    extra = mixed.demos[40:]
    assert len(extra) == 20
    assert all(ex.task == "arithmetic" for ex in extra)
    assert not set(questions(extra)) & set(questions(mixed.mix_train))
    # the calls carry a context key of the task's corpora
    assert all(ex.corpus_id == min(mixed.corpora) for ex in mixed.mix_train + extra)
    summary = mixed.summary()
    assert "arithmetic" in summary and "256" in summary and "60 demonstrations" in summary


def test_load_task_adds_at_least_16_arithmetic_demonstrations():
    # round(40 * 0.25) = 10 < 16
    task = load_task(TaskConfig(**SMALL, mix_fraction=0.25))
    assert len(task.demos) == 40 + 16
    assert [ex.task for ex in task.demos[40:]] == ["arithmetic"] * 16
    assert len(task.mix_train) == 256


def test_mixed_questions_follow_the_task_seed():
    a = load_task(TaskConfig(**{**SMALL, "seed": 5}, mix_fraction=0.5))
    b = load_task(TaskConfig(**{**SMALL, "seed": 6}, mix_fraction=0.5))
    assert questions(a.mix_train) != questions(b.mix_train)


# ---------------------------------------------------------------------------------------
# demonstrations of arithmetic examples
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(mixed):
    texts = list(mixed.texts())
    texts += [format_call("search", {"query": ex.query}) for ex in mixed.train if ex.query]
    texts += [format_call("calculator", {"expression": ex.query}) for ex in mixed.demos[40:]]
    return train_tokenizer(texts, vocab_size=320)


@pytest.fixture(scope="module")
def registry(mixed):
    reg = build_registry(["search", "calculator"], mixed.corpora, isolation="thread")
    yield reg
    reg.close()


def test_demonstration_of_an_arithmetic_example_calls_the_calculator(mixed, tokenizer, registry):
    fmt = PromptFormatter(tokenizer, RolloutConfig(), max_obs_tokens=32)
    examples = mixed.demos[40:46]
    # and one with a negative answer
    examples += [next(ex for ex in mixed.mix_train if evaluate(ex.query) < 0)]
    for ex in examples:
        expression, answer = ex.query, str(evaluate(ex.query))
        ep = demonstration(fmt, registry, ex)
        (c,) = ep.calls
        assert c.name == "calculator" and c.arguments == {"expression": expression}
        assert c.param_text == expression
        assert c.valid is True and c.error is None
        assert c.tool_id == 1  # the calculator is the registry's second tool
        assert answer in c.observation
        assert c.good is True
        assert fmt.decode(ep.token_ids[c.start : c.end]) == format_call(
            "calculator", {"expression": expression}
        )
        assert ep.turn_spans[0] == (c.start, c.end)
        text = fmt.decode(ep.token_ids)
        assert text.startswith(f"Question: What is {expression}?\n")
        assert text.endswith(f"{TAGS.answer_open}{answer}{TAGS.answer_close}")
        assert ep.answer == answer and ep.turns == 2 and ep.finish == "answer"


# ---------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        ["task.mix_fraction=1.0", "tools.enabled=[search, calculator]"],
        ["task.mix_fraction=1.5", "tools.enabled=[search, calculator]"],
        ["task.mix_fraction=-0.1", "tools.enabled=[search, calculator]"],
        ["task.mix_fraction=0.25"],  # the default tools lack the calculator
        ["task.mix_fraction=0.25", "tools.enabled=[search]"],
    ],
)
def test_config_rejects_bad_mix_fractions(overrides):
    with pytest.raises(ConfigError, match=r"task\.mix_fraction"):
        load_config(None, overrides)


def test_config_names_the_calculator_when_it_is_missing():
    with pytest.raises(ConfigError, match="calculator"):
        load_config(None, ["task.mix_fraction=0.25"])


def test_config_rejects_an_unknown_mix_task():
    with pytest.raises(ConfigError, match=r"task\.mix_task"):
        load_config(None, ["task.mix_task=sudoku"])


def test_config_accepts_a_mix_with_the_calculator():
    cfg = load_config(None, ["task.mix_fraction=0.25", "tools.enabled=[search,calculator]"])
    assert cfg.task.mix_fraction == 0.25 and cfg.task.mix_task == "arithmetic"
    assert cfg.tools.enabled == ["search", "calculator"]
    assert load_config(None, []).task.mix_fraction == 0.0


@pytest.mark.parametrize(
    "observation, good",
    [("45", True), ("x 45.", True), ("[1] 45", True), ("450", False), ("-45", False)]
    + [("4.45", False), ("45.5", False), ("145", False)],
)
def test_a_calculator_result_is_good_only_when_it_is_the_answer(observation, good):
    ex = arithmetic_task(num_train=1, num_heldout=0, num_demos=0, seed=0).train[0]
    ex = type(ex)(**{**ex.__dict__, "answers": ("45",), "evidence": (("45",),)})
    assert ex.is_good_observation(observation) is good
