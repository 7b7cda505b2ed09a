"""Tools, tool-call parser, BM25 search, tasks, rewards and config of the trainer."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch

import tapo_kernels
from trainer.config import Config, ConfigError, load_config, parse_overrides
from trainer.rewards import exact_match, f1_score, normalize_answer
from trainer.study import load_study
from trainer.tasks import TaskFileError, load_jsonl_task, synthetic_task
from trainer.tools import INVALID_TOOL, Tool, ToolContext, ToolRegistry, build_registry
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
    return build_registry(
        ["search", "calculator", "failing", "slow"], {0: DOCS, 7: ["Only one doc."]}, timeout_s=0.3
    )


# ----------------------------------------------------------------------------- parser


def test_parser_accepts_a_well_formed_call(registry):
    parsed = registry.parse(call("search", query="Zorvex Quill home city"))
    assert parsed.valid and parsed.tool_id == 0 and parsed.name == "search"
    assert parsed.arguments == {"query": "Zorvex Quill home city"}


@pytest.mark.parametrize(
    "body, closed, fragment",
    [
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
    ],
)
def test_malformed_calls_become_invalid_records_never_exceptions(registry, body, closed, fragment):
    parsed = registry.parse(body, closed=closed)
    assert not parsed.valid and parsed.tool_id == INVALID_TOOL
    assert fragment in parsed.error
    (outcome,) = registry.execute([(parsed, ToolContext(0))])
    assert not outcome.ok and outcome.observation.startswith("error: ")
    # an invalid call has an all-zero parameter vector: it can never be a TAPO witness
    params = registry.encode_calls([parsed.tool_id], [""], [outcome.refs])
    assert params.shape == (1, 256) and torch.count_nonzero(params) == 0


def test_tool_exceptions_and_timeouts_become_error_observations(registry):
    calls = [
        registry.parse(call("failing", query="x")),
        registry.parse(call("slow", query="x")),
        registry.parse(call("calculator", expression="2 * (3 + 4)")),
        registry.parse(call("calculator", expression="__import__('os')")),
        registry.parse(call("search", query="Zorvex Quill pet")),
    ]
    outcomes = registry.execute([(c, ToolContext(0)) for c in calls])
    assert [o.ok for o in outcomes] == [False, False, True, False, True]
    assert "RuntimeError" in outcomes[0].observation
    assert "timed out after 0.3 s" in outcomes[1].observation
    assert outcomes[1].seconds < 2.0  # the hung tool was abandoned, not waited for
    assert outcomes[2].observation == "14"  # 2 * 7
    assert outcomes[4].observation == "The pet of Zorvex Quill is heron."


class _SleepThenWrite(Tool):
    """Sleeps, then leaves a file behind: proof of whether a timed-out call was stopped."""

    name = "sleepy"
    required = {"path": str}

    def run(self, arguments, context):
        time.sleep(1.5)
        Path(arguments["path"]).write_text("still running")
        return "done"


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_timeouts_stop_the_call_in_process_isolation(tmp_path, isolation):
    registry = ToolRegistry(
        [_SleepThenWrite(), *build_registry(["search"], {0: DOCS}).tools],
        timeout_s=0.3,
        isolation=isolation,
        workers=2,
    )
    threads = threading.active_count()
    try:
        for rep in range(3):
            marker = tmp_path / f"written-{rep}"
            calls = [
                registry.parse(call("sleepy", path=str(marker))),
                registry.parse(call("search", query="Amra Tel pet")),
            ]
            slow, fast = registry.execute([(c, ToolContext(0)) for c in calls])
            assert not slow.ok and "timed out after 0.3 s" in slow.error
            assert fast.ok and fast.observation == DOCS[3]
        time.sleep(2.0)  # long enough for every abandoned call to finish its sleep
        written = sorted(p.name for p in tmp_path.iterdir())
        if isolation == "process":
            # the calls were killed with their workers: nothing ran on, nothing is left
            assert written == [] and threading.active_count() == threads
            assert registry._workers.killed == 3
            alive = [w for w in registry._workers._workers if w.alive]
            assert len(alive) <= 2
        else:  # threads cannot be stopped: the abandoned calls finished in the background
            assert written == ["written-0", "written-1", "written-2"]
    finally:
        registry.close()


def test_calculator_rejects_names_and_huge_powers():
    assert evaluate("-(7 - 10) ** 2") == -9  # unary minus binds looser than **: -(9)
    assert evaluate("2 ** 1000") == 2**1000 and evaluate("9**64*9**64") == 9**128
    for bad in (
        "open('x')",
        "a + 1",
        "2 ** 5000",
        "[1]",
        "1/0",
        "(-8) ** 0.5",
        "2.0 ** 5000",
        "(" * 150 + "1" + ")" * 49,
        "1 +",
    ):
        with pytest.raises(ValueError):
            evaluate(bad)


@pytest.mark.parametrize(
    "expression",
    [
        "(((9**64)**64)**64)**64",
        "((((9**64)**64)**64)**64)**64",
        "9**9**9**9",
        "(9**4096)*(9**4096)",
        "-(9**99)**(9**9)",
    ],
)
def test_calculator_bounds_results_before_computing_them(expression):
    # each of these ran for tens of seconds or more when only the exponent was bounded; now
    # the size of every integer is checked before it is computed (a hang guard, not a benchmark)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="too large"):
        evaluate(expression)
    assert time.perf_counter() - t0 < 1.0


def test_sim_kinds_and_parameter_vectors(registry):
    assert registry.sim_kind_tensor().tolist() == [0, 0, 0, 0]
    queries = [
        "Zorvex Quill home city",
        "zorvex  quill HOME city",
        "home city Zorvex",
        "Zorvex Quill",
        "Amra Tel pet",
    ]
    outcomes = registry.execute(
        [(registry.parse(call("search", query=q)), ToolContext(0)) for q in queries]
    )
    assert [o.refs for o in outcomes[:3]] == [(DOCS[0],)] * 3  # the same document
    assert outcomes[3].refs == (DOCS[1],) and outcomes[4].refs == (DOCS[3],)
    ids, refs = [0] * len(queries), [o.refs for o in outcomes]
    # default ("tool"): search declares witness = "results", so calls compare what they
    # retrieved: differently worded queries that found the same fact are identical, the
    # bare name (which found another fact) is not, however similar its text
    by_results = registry.encode_calls(ids, queries, refs)
    sim = by_results @ by_results.T
    assert by_results.shape == (5, 256)
    torch.testing.assert_close(by_results.norm(dim=1), torch.ones(5))
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-6) and sim[0, 2] == pytest.approx(1.0, abs=1e-6)
    assert sim[0, 3] < 0.35 and sim[0, 4] < 0.35
    # "arguments": hashed character 3-grams of the query text for every tool
    by_text = registry.encode_calls(ids, queries, refs, mode="arguments")
    torch.testing.assert_close(by_text, tapo_kernels.encode_text(queries))
    text_sim = by_text @ by_text.T
    assert text_sim[0, 1] == pytest.approx(1.0, abs=1e-6)  # case and spacing folded
    assert text_sim[0, 3] > 0.7  # the bare name looks like the careful query ...
    assert text_sim[0, 4] < 0.5
    # tools declaring "arguments" (the calculator) compare their argument text in every mode
    calc = registry.encode_calls([1], ["2 * 3"], [()])
    torch.testing.assert_close(calc, tapo_kernels.encode_text(["2 * 3"]))
    with pytest.raises(ValueError, match="witness mode"):
        registry.encode_calls(ids, queries, refs, mode="bogus")
    with pytest.raises(ValueError, match="NeuralTextEncoder"):
        registry.encode_calls(ids, queries, refs, mode="neural")
    with pytest.raises(ValueError, match="one entry per call"):
        registry.encode_calls(ids, queries[:2], refs)


# ----------------------------------------------------------------------------- search


def test_bm25_search_is_deterministic_and_ranks_the_fact_first():
    index = BM25Index(DOCS)
    hits = index.search("Zorvex Quill home city", top_k=4)
    assert hits[0][0] == 0 and hits[0][1] > hits[1][1]
    assert index.search("Zorvex Quill home city", 4) == BM25Index(list(DOCS)).search(
        "Zorvex Quill home city", 4
    )
    assert index.search("xylophone", 3) == []  # no shared term: no results, not random docs
    # equal scores keep document order: docs 0 and 2 tie on "home city"
    tie = index.search("home city", 2)
    assert [i for i, _ in tie] == [0, 2] and tie[0][1] == tie[1][1]


def test_search_tool_uses_the_questions_corpus(registry):
    parsed = registry.parse(call("search", query="only doc"))
    assert registry.execute([(parsed, ToolContext(7))])[0].observation == "Only one doc."
    missing = registry.execute([(registry.parse(call("search", query="x")), ToolContext(99))])[0]
    assert not missing.ok and "no corpus with id 99" in missing.observation
    none = registry.execute([(registry.parse(call("search", query="xylophone")), ToolContext(0))])[
        0
    ]
    assert none.ok and none.observation == "no results"


# ----------------------------------------------------------------------------- tasks


def test_synthetic_task_is_reproducible_and_needs_search():
    a, b = synthetic_task(num_entities=20, seed=3), synthetic_task(num_entities=20, seed=3)
    assert a.train == b.train and a.heldout == b.heldout and a.corpora == b.corpora
    assert synthetic_task(num_entities=20, seed=4).train != a.train
    # single questions only (the default): one per (entity, attribute), split by entity
    assert len(a.train) + len(a.heldout) == 20 * 5 == len(a.corpora[0])
    assert {e.uid for e in a.train}.isdisjoint({e.uid for e in a.heldout})
    heldout_names = {e.question.split(" of ", 1)[1] for e in a.heldout}
    assert len(heldout_names) == 5 and not any(
        e.question.split(" of ", 1)[1] in heldout_names for e in a.train
    )
    assert set(a.demos) <= set(a.train)  # default: demonstrations of training questions
    registry = build_registry(["search"], a.corpora)
    for ex in a.train + a.heldout:
        # the question never contains its answer; the demo query retrieves exactly its fact,
        # which is the question's ground-truth evidence
        assert ex.answers[0].lower() not in ex.question.lower()
        obs = registry.execute([(registry.parse(call("search", query=ex.query)), ToolContext(0))])[
            0
        ]
        assert obs.observation.endswith(f" is {ex.answers[0]}.")
        assert ex.question.split(" of ", 1)[1].rstrip("?") in obs.observation
        assert ex.evidence == ((obs.observation,),) and ex.is_good_observation(obs.observation)


def test_jsonl_questions_carry_queries_and_evidence(tmp_path):
    rows = [
        {"question": "q1?", "answer": "a", "corpus": ["d1 a", "d2"], "evidence": ["d1 a"]},
        {
            "question": "q2?",
            "answer": "b",
            "corpus": ["d1 a", "d2"],
            "queries": ["x", "y"],
            "evidence": [["d1 a"], ["d2"]],
        },
        {"question": "q3?", "answer": "c", "corpus": ["d3"]},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_jsonl_task(path, eval_path=path)
    q1, q2, q3 = task.heldout
    assert q1.evidence == (("d1 a",),) and q1.is_good_observation("found: d1 a") is True
    assert q1.is_good_observation("d2") is False
    assert q2.queries == ("x", "y") and q2.evidence == (("d1 a",), ("d2",))
    assert q2.demo_queries() == ("x", "y") and q2.is_good_observation("d2")
    assert q3.evidence == () and q3.is_good_observation("d3") is None  # no ground truth
    for bad, message in (
        ({"evidence": "d1"}, "'evidence'"),
        ({"evidence": [[]]}, "'evidence'"),
        ({"queries": ["", "x"]}, "'queries'"),
    ):
        path.write_text(json.dumps({"question": "q?", "answer": "a", "corpus": ["d"], **bad}))
        with pytest.raises(TaskFileError, match=f"t.jsonl:1: {message}"):
            load_jsonl_task(path)


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
    cfg = load_config(
        None,
        [
            "rollout.group_size=4",
            "algo.loss=gspo",
            "tools.enabled=[search, calculator]",
            "optim.lr=3e-4",
            "model.path=null",
            "algo.loss_overrides={eps_high: 0.3}",
        ],
    )
    assert cfg.rollout.group_size == 4 and cfg.algo.loss == "gspo" and cfg.optim.lr == 3e-4
    assert cfg.tools.enabled == ["search", "calculator"] and cfg.algo.loss_overrides == {
        "eps_high": 0.3
    }
    assert load_config(None).to_dict() == Config().to_dict()
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)  # ints widen to floats


@pytest.mark.parametrize(
    "override, message",
    [
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
        ("rollout.engine=sglang", "rollout.engine: must be one of"),
        ("rollout.vllm_kv_cache_mb=0", "rollout.vllm_kv_cache_mb: must be > 0"),
        ("rollout.vllm_dtype=int8", "rollout.vllm_dtype: must be one of"),
        ("rollout.vllm_gpu_memory_utilization=0", "rollout.vllm_gpu_memory_utilization: must"),
        ("rollout.vllm_gpu_memory_utilization=1.5", "rollout.vllm_gpu_memory_utilization: must"),
        ("algo.tis_cap=2.0", "algo.tis_cap: needs rollout.recompute_logp"),
        ("algo.tis_cap=-1", "algo.tis_cap: must be > 0"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_bundled_yaml_configs_load():
    from pathlib import Path

    configs = sorted(Path("trainer/configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {
        "tiny_grpo_tapo.yaml",
        "tiny_gspo_tapo.yaml",
        "tiny_sapo_tapo.yaml",
    }
    # the embedded default: running without --config is the tiny GRPO + TAPO run
    assert load_config("trainer/configs/tiny_grpo_tapo.yaml").to_dict() == Config().to_dict()
    for path in configs:
        header = path.read_text().splitlines()[0]
        if path.name.startswith("study_"):  # study configs: every arm is a valid run config
            assert header == f"# python -m trainer.study --config trainer/configs/{path.name}"
            load_study(path)
            continue
        assert header.startswith("# ") and ("trainer.train" in header or "tapo-train" in header), (
            path
        )
        if "real" in path.name:
            continue  # names a checkpoint path that exists only on the user's machine
        load_config(path)
