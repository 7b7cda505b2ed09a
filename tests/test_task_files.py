"""Task files: JSONL and Parquet, in the question/answer layout or verl's RL layout."""

import json
import sys

import pytest

from trainer.config import ConfigError, load_config
from trainer.tasks import TaskFileError, load_jsonl_task, load_task, read_corpus

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture
def pq():
    """``pyarrow.parquet`` (the Parquet tests need pyarrow)."""
    return pytest.importorskip("pyarrow.parquet")


def write_parquet(pq, path, rows):
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def verl_row(question, truth, index, messages_before=(SYSTEM,), **extra_info):
    return {
        "data_source": "toy/qa",
        "prompt": [*messages_before, {"role": "user", "content": question}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {"split": "train", "index": index, "question": question, **extra_info},
    }


def test_verl_layout_parquet(tmp_path, pq):
    rows = [
        verl_row("Where does Ada Lorn live?", "Kestrel", 0, answer="She lives in Kestrel"),
        verl_row("Where does Bo Tarn live?", "Marlow", 1, answer="Marlow"),
        # a multi-turn prompt: the question is the content of the last user message
        verl_row(
            "And where does Cy Venn live?",
            "Dunmore",
            2,
            messages_before=(
                SYSTEM,
                {"role": "user", "content": "Where does Ada Lorn live?"},
                {"role": "assistant", "content": "Kestrel."},
            ),
            answer="Dunmore",
        ),
    ]
    path = write_parquet(pq, tmp_path / "train.parquet", rows)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Ada Lorn lives in Kestrel.\nBo Tarn lives in Marlow.\n")
    task = load_jsonl_task(path, eval_path=path, corpus_path=corpus)
    got = [(ex.uid, ex.question, ex.answers, ex.corpus_id) for ex in task.heldout]
    assert got == [
        ("train-0", "Where does Ada Lorn live?", ("Kestrel",), 0),
        ("train-1", "Where does Bo Tarn live?", ("Marlow",), 0),
        ("train-2", "And where does Cy Venn live?", ("Dunmore",), 0),
    ]
    assert task.corpora == {0: ["Ada Lorn lives in Kestrel.", "Bo Tarn lives in Marlow."]}


def test_verl_layout_jsonl_with_row_corpora_and_list_answers(tmp_path):
    rows = [
        # a per-row corpus and a demonstration query in extra_info; a list of answers
        verl_row("q1?", ["Kestrel", "kestrel town"], 0, corpus=["d1 Kestrel", "d2"], query="d1"),
        # Search-R1 writes {"target": [...]}; a top-level key wins over extra_info's
        {
            **verl_row("q2?", {"target": ["Marlow"]}, 1, corpus=["ignored"]),
            "corpus": ["d3 Marlow"],
            "id": "second",
        },
        # no system message; a corpus identical to row 0's is shared
        verl_row("q3?", "Dunmore", 2, messages_before=(), corpus=["d1 Kestrel", "d2"]),
    ]
    path = write_jsonl(tmp_path / "verl.jsonl", rows)
    demos = load_jsonl_task(
        path, eval_path=path, demos_path=write_jsonl(tmp_path / "d.jsonl", rows[:1])
    )
    q1, q2, q3 = demos.heldout
    assert (q1.uid, q1.question, q1.answers, q1.query) == (
        "verl-1",
        "q1?",
        ("Kestrel", "kestrel town"),
        "d1",
    )
    assert (q2.uid, q2.answers, q3.uid, q3.answers) == (
        "second",
        ("Marlow",),
        "verl-3",
        ("Dunmore",),
    )
    assert demos.corpora[q1.corpus_id] == ["d1 Kestrel", "d2"]
    assert demos.corpora[q2.corpus_id] == ["d3 Marlow"]
    assert q3.corpus_id == q1.corpus_id != q2.corpus_id and 0 not in demos.corpora
    assert [d.query for d in demos.demos] == ["d1"]


def test_question_answer_layout_in_parquet_matches_jsonl(tmp_path, pq):
    rows = [
        {"question": "q1?", "answer": ["a", "b"], "corpus": ["d1 a", "d2"], "evidence": ["d1 a"]},
        {"question": "q2?", "answer": ["c"], "corpus": None, "evidence": None},  # shared corpus
        {"question": "q3?", "answer": ["d"], "corpus": ["d3 d"], "evidence": None},
    ]
    path = write_parquet(pq, tmp_path / "qa.parquet", rows)
    shared = write_parquet(pq, tmp_path / "corpus.parquet", [{"text": "s1"}, {"text": "s2 c"}])
    assert read_corpus(shared) == ["s1", "s2 c"]
    task = load_jsonl_task(path, eval_path=path, corpus_path=shared)
    q1, q2, q3 = task.heldout
    assert [ex.uid for ex in task.heldout] == ["qa-0", "qa-1", "qa-2"]
    assert q1.answers == ("a", "b") and q1.evidence == (("d1 a",),)
    assert task.corpora[q1.corpus_id] == ["d1 a", "d2"] and task.corpora[q3.corpus_id] == ["d3 d"]
    assert q2.corpus_id == 0 and task.corpora[0] == ["s1", "s2 c"] and q2.evidence == ()
    # the same rows as JSONL (a null is written as an absent key) load the same questions
    lines = [{k: v for k, v in r.items() if v is not None} for r in rows]
    (tmp_path / "corpus.txt").write_text("s1\ns2 c\n")
    same = load_jsonl_task(
        write_jsonl(tmp_path / "qa.jsonl", lines),
        eval_path=tmp_path / "qa.jsonl",
        corpus_path=tmp_path / "corpus.txt",
    )
    strip = lambda exs: [ex.__dict__ | {"uid": None} for ex in exs]
    assert strip(same.heldout) == strip(task.heldout)


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"reward_model": {"style": "rule"}},
            "'reward_model.ground_truth' is missing",
        ),
        (
            {"reward_model": {"style": "rule", "ground_truth": 42}},
            "'reward_model.ground_truth' must be a string",
        ),
        ({"reward_model": "Marlow"}, "'reward_model' must be a mapping"),
        ({"prompt": []}, "'prompt' must be a non-empty list"),
        ({"prompt": "Where?"}, "'prompt' must be a non-empty list"),
        ({"prompt": [SYSTEM]}, "'prompt' has no message with role 'user'"),
        ({"prompt": [{"role": "user", "content": 7}]}, "the last user message .* string 'content'"),
        (
            {"prompt": [{"role": "user", "content": "  "}]},
            "the last user message .* string 'content'",
        ),
        ({"prompt": [SYSTEM, "Where?"]}, r"'prompt\[1\]' must be a chat message"),
        ({"prompt": None}, "a verl row needs a 'prompt'"),
    ],
)
def test_malformed_verl_rows_name_the_row(tmp_path, bad, message):
    good = verl_row("q1?", "a", 0, corpus=["d"])
    row = {k: v for k, v in {**good, **bad}.items() if v is not None}
    path = write_jsonl(tmp_path / "t.jsonl", [good, row])
    with pytest.raises(TaskFileError, match=f"t.jsonl:2: {message}"):
        load_jsonl_task(path)


def test_malformed_parquet_rows_name_the_row(tmp_path, pq):
    base = {"question": "q?", "answer": "a", "corpus": ["d"]}
    path = write_parquet(pq, tmp_path / "t.parquet", [base, {**base, "question": None}])
    with pytest.raises(TaskFileError, match="t.parquet: row 1: 'question' must be a non-empty"):
        load_jsonl_task(path)
    # a column of numbers: no row has a string question
    path = write_parquet(pq, tmp_path / "n.parquet", [{**base, "question": 5}])
    with pytest.raises(TaskFileError, match="n.parquet: row 0: 'question' must be a non-empty"):
        load_jsonl_task(path)
    good = verl_row("q?", "a", 0, corpus=["d"])
    rows = [good, {**good, "prompt": []}]
    path = write_parquet(pq, tmp_path / "v.parquet", rows)
    with pytest.raises(TaskFileError, match="v.parquet: row 1: 'prompt' must be a non-empty list"):
        load_jsonl_task(path)
    rows = [good, {**good, "reward_model": {"style": "rule", "ground_truth": None}}]
    path = write_parquet(pq, tmp_path / "g.parquet", rows)
    with pytest.raises(
        TaskFileError, match="g.parquet: row 1: 'reward_model.ground_truth' is missing"
    ):
        load_jsonl_task(path)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not a table")
    with pytest.raises(TaskFileError, match="junk.parquet: not a readable Parquet file"):
        load_jsonl_task(tmp_path / "junk.parquet")


def test_rows_of_no_layout_or_of_mixed_layouts(tmp_path):
    qa = {"question": "q?", "answer": "a", "corpus": ["d"]}
    path = write_jsonl(tmp_path / "t.jsonl", [qa, {"problem": "1+1?", "solution": "2"}])
    with pytest.raises(TaskFileError, match=r"t.jsonl:2: the row fits no task layout.*'problem'"):
        load_jsonl_task(path)
    path = write_jsonl(tmp_path / "t.jsonl", [qa, verl_row("q?", "a", 1)])
    with pytest.raises(TaskFileError, match="t.jsonl:2: the row is in the verl layout but the"):
        load_jsonl_task(path)
    path = write_jsonl(tmp_path / "t.jsonl", [verl_row("q?", "a", 0, corpus=["d"]), qa])
    with pytest.raises(TaskFileError, match="t.jsonl:2: the row is in the question/answer layout"):
        load_jsonl_task(path)
    # verl rows that keep their source columns (question, golden_answers, ...) are verl rows
    row = {**verl_row("Where?", "x", 0, corpus=["d"]), "question": "raw", "golden_answers": ["x"]}
    (ex,) = load_jsonl_task(
        write_jsonl(tmp_path / "t.jsonl", [row]), eval_path=tmp_path / "t.jsonl"
    ).heldout
    assert ex.question == "Where?" and ex.answers == ("x",)


def test_jsonl_task_name_loads_a_parquet_train_path(tmp_path, pq):
    rows = [verl_row(f"Where does person {i} live?", f"city{i}", i) for i in range(8)]
    train = write_parquet(pq, tmp_path / "train.parquet", rows)
    corpus = write_parquet(
        pq, tmp_path / "docs.parquet", [{"text": f"person {i} lives in city{i}"} for i in range(8)]
    )
    cfg = load_config(
        None,
        [
            "task.name=jsonl",
            f"task.train_path={train}",
            f"task.corpus_path={corpus}",
            "task.heldout_fraction=0.25",
        ],
    )
    task = load_task(cfg.task)
    assert len(task.train) == 6 and len(task.heldout) == 2
    questions = {ex.question: ex.answers for ex in task.train + task.heldout}
    assert questions == {f"Where does person {i} live?": (f"city{i}",) for i in range(8)}
    assert len(task.corpora[0]) == 8


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(
        ConfigError, match=r"task.train_path: .*needs pyarrow \(pip install pyarrow\)"
    ):
        load_config(None, ["task.name=jsonl", f"task.train_path={path}"])
    with pytest.raises(TaskFileError, match=r"train.parquet: reading Parquet files needs pyarrow"):
        load_jsonl_task(path)
