"""Tools, tool-call parser, BM25 search, tasks, rewards and config of the trainer."""

import json

import pytest
import torch

from trainer.config import Config, ConfigError, load_config, parse_overrides
from trainer.rewards import exact_match, f1_score, normalize_answer
from trainer.tasks import TaskFileError, load_jsonl_task, synthetic_task
from trainer.tools import INVALID_TOOL, ToolContext, build_registry
from trainer.tools.calculator import evaluate
from trainer.tools.text_search import BM25Index

DOCS = [
    "The home city of Zorvex Quill is Marlow.",
    "The pet of Zorvex Quill is heron.",
    "The home city of Amra Tel is Dunmore.",
    "The pet of Amra Tel is otter.",
]


def call(name, **arguments):
    return json.dumps({"name": name, "arguments": arguments})


@pytest.fixture
def registry():
    return build_registry(["search", "calculator", "failing", "slow"], {0: DOCS, 7: ["Only one doc."]},
                          timeout_s=0.3)


# ----------------------------------------------------------------------------- parser


def test_parser_accepts_a_well_formed_call(registry):
    parsed = registry.parse(call("search", query="Zorvex Quill home city"))
    assert parsed.valid and parsed.tool_id == 0 and parsed.name == "search"
    assert parsed.arguments == {"query": "Zorvex Quill home city"}


@pytest.mark.parametrize("body, closed, fragment", [
    ('{"name": "search", "arguments": {"query": "x"', True, "not valid JSON"),
    ("[1, 2]", True, "JSON object"),
    ('{"arguments": {"query": "x"}}', True, "string 'name'"),
    (call("browse", url="x"), True, "unknown tool 'browse'"),
    (call("search"), True, "needs the argument 'query'"),
    (call("search", query=3), True, "must be str"),
    (call("search", query="x", page=2), True, "no argument 'page'"),
    (call("search", query="   "), True, "non-empty"),
    (call("search", query="x", top_k=99), True, "top_k"),
    ('{"name": "search", "arguments": [1]}', True, "JSON object"),
    ('{"name": "search", "arguments": {"query": "x"}, "extra": 1}', True, "unexpected keys"),
    (call("search", query="x"), False, "not closed"),
    ("", True, "not valid JSON"),
    ("[" * 5000, True, "not valid JSON"),
])
def test_malformed_calls_become_invalid_records_never_exceptions(registry, body, closed, fragment):
    parsed = registry.parse(body, closed=closed)
    assert not parsed.valid and parsed.tool_id == INVALID_TOOL
    assert fragment in parsed.error
    (outcome,) = registry.execute([(parsed, ToolContext(0))])
    assert not outcome.ok and outcome.observation.startswith("error: ")
    # an invalid call has an all-zero parameter vector: it can never be a TAPO witness
    assert torch.count_nonzero(registry.param_vector(parsed)) == 0


def test_tool_exceptions_and_timeouts_become_error_observations(registry):
    calls = [registry.parse(call("failing", query="x")), registry.parse(call("slow", query="x")),
             registry.parse(call("calculator", expression="2 * (3 + 4)")),
             registry.parse(call("calculator", expression="__import__('os')")),
             registry.parse(call("search", query="Zorvex Quill pet"))]
    outcomes = registry.execute([(c, ToolContext(0)) for c in calls])
    assert [o.ok for o in outcomes] == [False, False, True, False, True]
    assert "RuntimeError" in outcomes[0].observation
    assert "timed out after 0.3 s" in outcomes[1].observation
    assert outcomes[1].seconds < 2.0  # the hung tool was abandoned, not waited for
    assert outcomes[2].observation == "14"  # 2 * 7
    assert outcomes[4].observation == "The pet of Zorvex Quill is heron."


def test_calculator_rejects_names_and_huge_powers():
    assert evaluate("-(7 - 10) ** 2") == -9  # unary minus binds looser than **: -(9)
    for bad in ("open('x')", "a + 1", "2 ** 1000", "[1]"):
        with pytest.raises(ValueError):
            evaluate(bad)


def test_sim_kinds_and_param_vectors(registry):
    assert registry.sim_kind_tensor().tolist() == [0, 0, 0, 0]
    a = registry.param_vector(registry.parse(call("search", query="Zorvex Quill home city")))
    b = registry.param_vector(registry.parse(call("search", query="zorvex  quill HOME city")))
    c = registry.param_vector(registry.parse(call("search", query="Amra Tel pet")))
    assert a.shape == (256,) and torch.allclose(a.norm(), torch.tensor(1.0))
    assert torch.dot(a, b) == pytest.approx(1.0, abs=1e-6)  # case and spacing folded
    assert torch.dot(a, c) < 0.5


# ----------------------------------------------------------------------------- search


def test_bm25_search_is_deterministic_and_ranks_the_fact_first():
    index = BM25Index(DOCS)
    hits = index.search("Zorvex Quill home city", top_k=4)
    assert hits[0][0] == 0 and hits[0][1] > hits[1][1]
    assert index.search("Zorvex Quill home city", 4) == BM25Index(list(DOCS)).search("Zorvex Quill home city", 4)
    assert index.search("xylophone", 3) == []  # no shared term: no results, not random docs
    # equal scores keep document order: docs 0 and 2 tie on "home city"
    tie = index.search("home city", 2)
    assert [i for i, _ in tie] == [0, 2] and tie[0][1] == tie[1][1]


def test_search_tool_uses_the_questions_corpus(registry):
    parsed = registry.parse(call("search", query="only doc"))
    assert registry.execute([(parsed, ToolContext(7))])[0].observation == "Only one doc."
    missing = registry.execute([(registry.parse(call("search", query="x")), ToolContext(99))])[0]
    assert not missing.ok and "no corpus with id 99" in missing.observation
    none = registry.execute([(registry.parse(call("search", query="xylophone")), ToolContext(0))])[0]
    assert none.ok and none.observation == "no results"


# ----------------------------------------------------------------------------- tasks


def test_synthetic_task_is_reproducible_and_needs_search():
    a, b = synthetic_task(num_entities=20, seed=3), synthetic_task(num_entities=20, seed=3)
    assert a.train == b.train and a.heldout == b.heldout and a.corpora == b.corpora
    assert synthetic_task(num_entities=20, seed=4).train != a.train
    assert len(a.train) + len(a.heldout) == 20 * 5 == len(a.corpora[0])
    assert {e.uid for e in a.train}.isdisjoint({e.uid for e in a.heldout})
    assert set(a.demos) <= set(a.train)  # default: demonstrations of training questions
    registry = build_registry(["search"], a.corpora)
    for ex in a.train + a.heldout:
        # the question never contains its answer; the demo query retrieves exactly its fact
        assert ex.answers[0].lower() not in ex.question.lower()
        obs = registry.execute([(registry.parse(call("search", query=ex.query)), ToolContext(0))])[0]
        assert obs.observation.endswith(f" is {ex.answers[0]}.")
        assert ex.question.split(" of ", 1)[1].rstrip("?") in obs.observation


@pytest.mark.parametrize("demos_from", ["train", "worlds"])
def test_demonstrations_are_successful_trajectories(demos_from):
    task = synthetic_task(num_entities=12, attributes=["home city", "pet", "profession"], num_demos=40,
                          seed=1, sloppy_demo_fraction=0.6, demos_from=demos_from)
    registry = build_registry(["search"], task.corpora)
    # worlds are drawn until 40 demonstrations succeed; train questions run out first (27)
    assert len(task.demos) == 40 if demos_from == "worlds" else 10 <= len(task.demos) < 27
    sloppy = 0
    for ex in task.demos:
        name = ex.question.split(" of ", 1)[1].rstrip("?")
        sloppy += ex.query == name
        obs = registry.execute([(registry.parse(call("search", query=ex.query)), ToolContext(ex.corpus_id))])[0]
        attribute = ex.question[len("What is the "):].split(" of ")[0]
        # the demonstrated search finds exactly the asked fact (sloppy ones were kept only if lucky)
        assert obs.observation == f"The {attribute} of {name} is {ex.answers[0]}."
    assert 0 < sloppy < len(task.demos)
    if demos_from == "worlds":
        # every demonstration lives in its own corpus of 3 entities x 3 attributes, apart from
        # the corpus the training and held-out questions search
        assert sorted(ex.corpus_id for ex in task.demos) == list(range(1, 41))
        assert all(len(task.corpora[ex.corpus_id]) == 3 * 3 for ex in task.demos)
    else:
        assert {ex.uid for ex in task.demos} <= {ex.uid for ex in task.train}


def test_jsonl_loader(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [{"question": f"q{i}?", "answer": ["a", "b"] if i % 2 else "a"} for i in range(8)]
    rows[3]["corpus"] = ["own doc one", "own doc two"]
    rows[5]["corpus"] = ["own doc one", "own doc two"]
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("shared one\nshared two\n")
    task = load_jsonl_task(train, corpus_path=corpus, heldout_fraction=0.25, seed=1)
    assert len(task.train) == 6 and len(task.heldout) == 2
    assert task.corpora[0] == ["shared one", "shared two"] and task.corpora[1] == ["own doc one", "own doc two"]
    by_q = {e.question: e for e in task.train + task.heldout}
    assert by_q["q3?"].corpus_id == by_q["q5?"].corpus_id == 1 and by_q["q0?"].corpus_id == 0
    assert by_q["q1?"].answers == ("a", "b")
    bad = tmp_path / "bad.jsonl"
    for line, msg in [('{"question": "q"}', "'answer'"), ("not json", "invalid JSON"),
                      ('{"question": "", "answer": "a"}', "'question'")]:
        bad.write_text(line + "\n")
        with pytest.raises(TaskFileError, match=msg):
            load_jsonl_task(bad, corpus_path=corpus)
    bad.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(TaskFileError, match="no corpus_path"):
        load_jsonl_task(bad)


# ----------------------------------------------------------------------------- rewards


def test_rewards():
    assert normalize_answer("  The  Marlow! ") == "marlow"
    assert exact_match("the marlow", ["Marlow"]) == 1.0
    assert exact_match("Marlowe", ["Marlow"]) == 0.0 and exact_match(None, ["x"]) == 0.0
    # pred "new york city" vs gold "new york": common 2, precision 2/3, recall 1, F1 = 0.8
    assert f1_score("new york city", ["new york"]) == pytest.approx(0.8)
    assert f1_score("paris", ["london", "paris"]) == 1.0 and f1_score("", ["x"]) == 0.0


# ----------------------------------------------------------------------------- config


def test_config_files_overrides_and_defaults():
    cfg = load_config(None, ["rollout.group_size=4", "algo.loss=gspo", "tools.enabled=[search, calculator]",
                             "optim.lr=3e-4", "model.path=null", "algo.loss_overrides={eps_high: 0.3}"])
    assert cfg.rollout.group_size == 4 and cfg.algo.loss == "gspo" and cfg.optim.lr == 3e-4
    assert cfg.tools.enabled == ["search", "calculator"] and cfg.algo.loss_overrides == {"eps_high": 0.3}
    assert load_config(None).to_dict() == Config().to_dict()
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)  # ints widen to floats


@pytest.mark.parametrize("override, message", [
    ("rollout.gruop_size=4", "did you mean 'rollout.group_size'"),
    ("rollout.group_size=1", "rollout.group_size: must be >= 2"),
    ("rollout.group_size=abc", "expected an integer"),
    ("algo.loss=ppo", "algo.loss: must be one of"),
    ("tapo.theta=1.5", "tapo.theta: must be in [0, 1]"),
    ("tools.enabled=[search, browse]", "tools.enabled[1]"),
    ("tapo.enabled=maybe", "expected true/false"),
    ("rollout=3", "config section"),
    ("model.hidden_size=130", "divisible by model.num_heads"),
    ("model.path=/nonexistent/ckpt", "does not exist"),
    ("task.name=jsonl", "task.train_path: is required"),
    ("algo.loss_overrides={gamma: 1}", "algo.loss_overrides.gamma"),
    ("rollout.max_total_tokens=4096", "max_position_embeddings"),
    ("novalue", "key=value"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_bundled_yaml_configs_load():
    from pathlib import Path

    configs = sorted(Path("trainer/configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {"tiny_grpo_tapo.yaml", "tiny_gspo_tapo.yaml", "tiny_sapo_tapo.yaml"}
    # the embedded default: running without --config is the tiny GRPO + TAPO run
    assert load_config("trainer/configs/tiny_grpo_tapo.yaml").to_dict() == Config().to_dict()
    for path in configs:
        header = path.read_text().splitlines()[0]
        assert header.startswith("# ") and ("trainer.train" in header or "tapo-train" in header), path
        if "real" in path.name:
            continue  # names a checkpoint path that exists only on the user's machine
        load_config(path)
