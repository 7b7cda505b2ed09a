"""The bundled synthetic task's question kinds, their ground truth and the demonstrations."""

import json
from collections import Counter

import pytest

from trainer.rewards import exact_match
from trainer.tasks import synthetic_task
from trainer.tasks.synthetic import RELATION, normalise_kinds
from trainer.tools import ToolContext, build_registry

MIX = {"single": 0.2, "two_fact": 0.4, "two_hop": 0.4}


def call(query: str) -> str:
    return json.dumps({"name": "search", "arguments": {"query": query}})


@pytest.fixture(scope="module")
def task():
    return synthetic_task(
        num_entities=24,
        attributes=["home city", "profession", "pet"],
        num_demos=60,
        seed=7,
        sloppy_demo_fraction=0.6,
        demos_from="worlds",
        kinds=MIX,
    )


def search(registry, corpus_id: int, query: str) -> str:
    (outcome,) = registry.execute([(registry.parse(call(query)), ToolContext(corpus_id))])
    assert outcome.ok
    return outcome.observation


def test_each_kind_is_answered_with_its_calls_and_not_without(task):
    registry = build_registry(["search"], task.corpora)
    kinds = Counter()
    for ex in task.train + task.heldout:
        kinds[ex.kind] += 1
        n_calls = {"single": 1, "two_fact": 2, "two_hop": 2}[ex.kind]
        assert len(ex.queries) == len(ex.evidence) == n_calls
        observations = [search(registry, ex.corpus_id, q) for q in ex.queries]
        # every careful query finds exactly its hop's gold document
        assert [(obs,) for obs in observations] == list(ex.evidence)
        assert all(ex.is_good_observation(obs) for obs in observations)
        # no answer value is in the question: it has to come from the observations
        values = ex.answers[0].split(" and ")
        assert not any(v.lower() in ex.question.lower() for v in values)
        if ex.kind == "two_fact":
            # each value is in its own hop's document only: one call is not enough
            assert values[0] in observations[0] and values[0] not in observations[1]
            assert values[1] in observations[1] and values[1] not in observations[0]
            assert exact_match(f"{values[1]} and {values[0]}", ex.answers) == 1.0
        elif ex.kind == "two_hop":
            # the second query names the mentor, who is found only by the first call
            mentor = " ".join(ex.queries[1].split()[:2])  # entity names are two words
            assert mentor not in ex.question and mentor in observations[0]
            assert f"The {RELATION} of" in observations[0]
            assert ex.answers[0] in observations[1] and ex.answers[0] not in observations[0]
        else:
            assert ex.answers[0] in observations[0]
        # the first hop alone never holds a multi-call answer
        if n_calls == 2:
            assert exact_match(observations[0], ex.answers) == 0.0
    assert set(kinds) == set(MIX)


def test_kinds_follow_their_weights_and_the_split_is_by_entity(task):
    counts = Counter(ex.kind for ex in task.train)
    total = sum(counts.values())
    for kind, weight in MIX.items():
        assert counts[kind] / total == pytest.approx(weight, abs=0.02)
    subject = {ex.uid.split("-")[2] for ex in task.train}
    assert subject.isdisjoint({ex.uid.split("-")[2] for ex in task.heldout})
    only_hop = synthetic_task(num_entities=8, kinds={"two_hop": 1.0})
    assert {ex.kind for ex in only_hop.train} == {"two_hop"}
    with pytest.raises(ValueError, match="unknown question kinds"):
        normalise_kinds({"three_hop": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        normalise_kinds({"single": 0.0})
    with pytest.raises(ValueError, match="two attributes"):
        synthetic_task(num_entities=8, attributes=["pet"], kinds={"two_fact": 1.0})


@pytest.mark.parametrize("demos_from", ["worlds", "train"])
def test_demonstrations_succeed_and_are_sloppy_call_by_call(demos_from):
    task = synthetic_task(
        num_entities=16,
        attributes=["home city", "profession", "pet"],
        num_demos=60,
        seed=3,
        sloppy_demo_fraction=0.6,
        demos_from=demos_from,
        kinds=MIX,
    )
    registry = build_registry(["search"], task.corpora)
    # worlds are drawn until 60 demonstrations succeed; each training question is tried once
    assert (
        len(task.demos) == 60 if demos_from == "worlds" else 10 < len(task.demos) < len(task.train)
    )
    sloppy_calls = careful_calls = mixed = 0
    for ex in task.demos:
        flags = []
        for query, hop in zip(ex.queries, ex.evidence, strict=True):
            obs = search(registry, ex.corpus_id, query)
            # every demonstrated call finds its fact (sloppy ones are kept only when lucky)
            assert (obs,) == hop
            flags.append(len(query.split()) == 2)  # the bare two-word name
        sloppy_calls += sum(flags)
        careful_calls += len(flags) - sum(flags)
        mixed += 0 < sum(flags) < len(flags)
    assert sloppy_calls > 0 and careful_calls > 0
    assert mixed > 0  # sloppiness is drawn per call, not per demonstration
    if demos_from == "worlds":
        assert sorted(ex.corpus_id for ex in task.demos) == list(range(1, 61))
    else:
        assert {ex.uid for ex in task.demos} <= {ex.uid for ex in task.train}
        assert all(ex.corpus_id == 0 for ex in task.demos)
