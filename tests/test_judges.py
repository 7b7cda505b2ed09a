"""Turn-level judges: the ground-truth rule judge on hand-built episodes, the TARL reward, and
the HTTP judge against a local stub of a chat-completions endpoint (retries, timeouts,
malformed replies, cache, concurrency bound)."""

import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trainer.judges import (
    DEFAULT_PROMPT,
    HttpJudge,
    RuleJudge,
    TurnVerdicts,
    build_judge,
    keep_first_penalty,
    parse_verdict,
    tarl_reward,
    verdict_counts,
)
from trainer.rewards import exact_match
from trainer.rollout import CallRecord, Episode
from trainer.tasks import Example

# ----------------------------------------------------------------------------- episodes

WORDS: list[str] = []


def encode(text: str) -> list[int]:
    ids = []
    for word in text.split():
        if word not in WORDS:
            WORDS.append(word)
        ids.append(WORDS.index(word))
    return ids


def decode(ids: list[int]) -> str:
    return " ".join(WORDS[i] for i in ids)


DOC_GOOD = "Zorvex Quill lives in Marlow."
DOC_OTHER = "Aster Vale lives in Pell, not far from Marlowe."
EX = Example(
    "q1",
    "Where does Zorvex Quill live?",
    ("Marlow",),
    query="Zorvex Quill home",
    evidence=((DOC_GOOD,),),
)

GOOD = ("search", {"query": "zorvex quill"}, DOC_GOOD, True)
OTHER = ("search", {"query": "aster vale"}, DOC_OTHER, True)
MALFORMED = (None, {}, "error: could not parse the call", False)


def make_episode(turns, answer=None, example=EX):
    """``turns``: (text, call or None); a call is (name, arguments, observation, valid), spans
    the turn's tokens after its first word, and is followed by its observation tokens."""
    ids = encode("system: answer the question")
    ep = Episode(example, 0, len(ids), ids, [0] * len(ids), [0.0] * len(ids))
    for text, call in turns:
        start = len(ep.token_ids)
        ep.append(encode(text), policy=True)
        end = len(ep.token_ids)
        ep.turn_spans.append((start, end))
        ep.turns += 1
        if call is not None:
            name, args, obs, valid = call
            good = example.is_good_observation(obs) if valid else False
            record = CallRecord(
                start + 1,
                end,
                0 if valid else -1,
                0,
                name,
                dict(args),
                str(args.get("query", "")),
                valid,
                None if valid else "malformed",
                obs,
                good=good,
            )
            ep.calls.append(record)
            ep.append(encode(obs), policy=False)
    ep.answer = answer
    ep.em = exact_match(answer, example.answers)
    return ep


def rule_scores(ep):
    (v,) = RuleJudge().judge([ep], decode)
    assert v.failed == 0
    return v.scores


# ----------------------------------------------------------------------------- rule judge


def test_rule_judge_on_hand_built_episodes():
    # explicit spans: a 4-token prompt, a 3-token call turn and its 5-token observation
    ep = make_episode([("call: search zorvex", GOOD), ("answer: Pell", None)], answer="Pell")
    assert ep.prompt_len == 4 and ep.turn_spans == [(4, 7), (12, 14)]
    assert (ep.calls[0].start, ep.calls[0].end, ep.calls[0].good) == (5, 7, True)
    # good call +1; the answer contradicts the evidence in hand (Marlow was observed) -1
    assert rule_scores(ep) == [1, -1]
    # the correct answer (normalised) scores 0
    assert rule_scores(make_episode([("call: s", GOOD), ("ans: x", None)], "marlow.")) == [1, 0]
    # a wrong answer without the evidence in hand is 0 ("Marlowe" is not "Marlow")
    assert rule_scores(make_episode([("call: s", OTHER), ("ans: x", None)], "Pell")) == [0, 0]
    # malformed call -1; a turn without a call 0; a call of unknown value (good None) 0
    plain = Example("p", "Where?", ("Marlow",))
    ep = make_episode([("call: s", MALFORMED), ("hmm, thinking", None), ("call: s", GOOD)])
    assert rule_scores(ep) == [-1, 0, 1]
    assert rule_scores(make_episode([("call: s", GOOD)], example=plain)) == [0]
    # a repeated identical call -1 (even when it retrieves gold evidence again)
    assert rule_scores(make_episode([("call: s", OTHER), ("call: s", OTHER)])) == [0, -1]
    assert rule_scores(make_episode([("call: s", GOOD), ("call: s", GOOD)])) == [1, -1]
    # not a repeat: other arguments, or another tool with the same arguments
    again = ("search", {"query": "zorvex quill", "k": 3}, DOC_GOOD, True)
    lookup = ("lookup", {"query": "zorvex quill"}, DOC_GOOD, True)
    assert rule_scores(make_episode([("c: s", GOOD), ("c: s", again), ("c: s", lookup)])) == [
        1,
        1,
        1,
    ]
    # no turns, no scores
    assert rule_scores(make_episode([])) == []


def test_rule_judge_keeps_only_the_first_penalty():
    turns = [
        ("call: s", GOOD),  # +1
        ("call: s", MALFORMED),  # -1 (kept)
        ("call: s", GOOD),  # repeated: -1 -> 0
        ("no call here", None),  # 0
        ("answer: Pell", None),  # contradicts the evidence: -1 -> 0
    ]
    assert rule_scores(make_episode(turns, answer="Pell")) == [1, -1, 0, 0, 0]
    assert keep_first_penalty([0, -1, 1, -1, -1]) == [0, -1, 1, 0, 0]
    assert keep_first_penalty([]) == []


# ----------------------------------------------------------------------------- reward, metrics


def test_tarl_reward_hand_computed():
    assert tarl_reward(1.0, [1, 0, 1, 0]) == pytest.approx(12.5)  # 10 + 5/4 * 2
    assert tarl_reward(0.0, [-1, 1, 1]) == pytest.approx(-5 + 10 / 3)
    assert tarl_reward(1.0, [1, 1, 1]) == pytest.approx(15.0)  # the bonus reaches its cap
    assert tarl_reward(0.0, [1, 1, 1, 1], bonus_cap=2.0) == pytest.approx(2.0)
    assert tarl_reward(1.0, []) == 10.0  # no turns: no bonus term
    assert tarl_reward(0.0, [0, 0]) == 0.0
    assert tarl_reward(0.5, [-1, 1], success_weight=2.0, penalty=1.0, bonus_cap=4.0) == 2.0


def test_verdict_counts_and_build_judge():
    counts = verdict_counts([TurnVerdicts([1, 0, -1], 1), TurnVerdicts([1, 1], 0)])
    assert counts == {"pos": 3.0, "zero": 1.0, "neg": 1.0, "failed": 1.0, "turns": 5.0}
    assert verdict_counts([]) == {"pos": 0.0, "zero": 0.0, "neg": 0.0, "failed": 0.0, "turns": 0.0}
    assert isinstance(build_judge("rule"), RuleJudge)
    judge = build_judge("http", base_url="http://127.0.0.1:1/v1/", model="m", timeout_s=1.0)
    assert isinstance(judge, HttpJudge) and judge.url == "http://127.0.0.1:1/v1/chat/completions"
    with pytest.raises(ValueError, match="unknown judge 'llm'"):
        build_judge("llm")
    judge.close()


@pytest.mark.parametrize(
    "content,score",
    [
        ('{"score": 1}', 1),
        ('{"score": -1, "reason": "repeat"}', -1),
        ('Verdict:\n```json\n{"score": 0}\n```\n', 0),
        ('I think {"score": -1} fits. {"score": 1}', -1),
        ('{"reason": "a {brace}", "score": 1}', 1),
        ('{"score": 7}', None),
        ('{"score": 1.0}', None),
        ('{"score": "1"}', None),
        ('{"score": true}', None),
        ('{"verdict": 1}', None),
        ("the step is good", None),
        ("{not json}", None),
        (None, None),
        (1, None),
    ],
)
def test_parse_verdict(content, score):
    assert parse_verdict(content) == score


# ----------------------------------------------------------------------------- stub endpoint

MARK = re.compile(r"\[\[([\w,]+)\]\]")
CONTENTS = {
    "pos": '{"score": 1}',
    "zero": '{"score": 0}',
    "neg": '{"score": -1}',
    "fenced": 'My verdict:\n```json\n{"score": -1}\n```',
    "text": 'The call is useful, so {"score": 1}. Done.',
    "seven": '{"score": 7}',
    "prose": "The step looks fine to me.",
}


class Stub:
    """What the endpoint saw. A turn containing ``[[a,b,c]]`` is answered with action ``a``
    on its first request, ``b`` on its second, then ``c`` (without a marker: ``pos``)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = Counter()
        self.total = 0
        self.inflight = 0
        self.max_inflight = 0
        self.paths, self.auth, self.bodies = [], [], []
        self.url = ""


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        stub = self.server.stub
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        match = MARK.search(body["messages"][-1]["content"])
        marker = match.group(1) if match else "pos"
        with stub.lock:
            n = stub.counts[marker]
            stub.counts[marker] += 1
            stub.total += 1
            stub.inflight += 1
            stub.max_inflight = max(stub.max_inflight, stub.inflight)
            stub.paths.append(self.path)
            stub.auth.append(self.headers.get("Authorization"))
            stub.bodies.append(body)
        try:
            actions = marker.split(",")
            status, payload = self.respond(actions[min(n, len(actions) - 1)])
        finally:
            with stub.lock:  # no longer in flight once the reply is ready
                stub.inflight -= 1
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (timeout)
            pass

    def respond(self, action):
        if action in ("e400", "e404", "e429", "e500", "e503"):
            return int(action[1:]), b'{"error": {"message": "no"}}'
        if action == "badjson":
            return 200, b'{"choices": [ not json'
        if action == "nochoices":
            return 200, b'{"id": "x", "object": "chat.completion"}'
        if action == "hang":
            time.sleep(0.6)
            action = "pos"
        if action == "slow":
            time.sleep(0.1)
            action = "zero"
        reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]}
        reply["choices"][0]["message"]["content"] = CONTENTS[action]
        return 200, json.dumps(reply).encode()


@pytest.fixture
def stub(monkeypatch):
    # the judge honours proxy settings; the stub is on loopback, never behind a proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False  # do not wait for replies a timed-out client dropped
    server.stub = Stub()
    server.stub.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    yield server.stub
    server.shutdown()
    server.server_close()
    thread.join(5)


TEMPLATE = "Question: {question}\nStep: {turn}"


def http_judge(stub, **options):
    kwargs = dict(prompt_template=TEMPLATE, timeout_s=2.0, max_retries=2, backoff_s=0.01)
    kwargs.update(options)
    return HttpJudge(stub.url, "judge-model", **kwargs)


def text_episode(*turns, answer=None):
    """An episode whose turns are the given texts (each followed by an observation)."""
    ep = make_episode([(t, ("search", {"query": t}, f"result of {t}", True)) for t in turns])
    ep.answer = answer
    return ep


# ----------------------------------------------------------------------------- HTTP judge


def test_http_judge_valid_fenced_and_embedded_verdicts(stub, monkeypatch):
    monkeypatch.delenv("TAPO_JUDGE_API_KEY", raising=False)
    judge = http_judge(stub)
    ep = text_episode("step [[pos]]", "step [[zero]]", "step [[fenced]]", "step [[text]]")
    (v,) = judge.judge([ep], decode)
    assert v == TurnVerdicts([1, 0, -1, 1], 0)
    assert judge.requests == stub.total == 4 and judge.failures == 0 and judge.cache_hits == 0
    assert set(stub.paths) == {"/v1/chat/completions"} and stub.auth == [None] * 4
    body = stub.bodies[0]
    assert body["model"] == "judge-model" and body["messages"][0]["role"] == "user"
    assert body["messages"][0]["content"].startswith("Question: Where does Zorvex Quill live?")


def test_http_judge_default_prompt_history_and_api_key(stub, monkeypatch):
    monkeypatch.setenv("TAPO_JUDGE_API_KEY", "from-env")
    assert {"{question}", "{history}", "{turn}"} <= set(re.findall(r"\{\w+\}", DEFAULT_PROMPT))
    judge = HttpJudge(stub.url + "/", "m", backoff_s=0.01)
    (v,) = judge.judge([text_episode("first look", "second look")], decode)
    assert v.scores == [1, 1] and judge.failures == 0
    assert stub.auth == ["Bearer from-env"] * 2
    prompts = sorted(b["messages"][0]["content"] for b in stub.bodies)
    second = next(p for p in prompts if "Step to grade:\nsecond look" in p)
    # the history holds the earlier turn and its observation, not the prompt tokens
    assert "first look result of first look" in second and "system:" not in second
    assert '{"score": 1}' in second  # the literal braces of the template survive format
    HttpJudge(stub.url, "m", api_key="explicit", backoff_s=0.01).judge([text_episode("x")], decode)
    assert stub.auth[-1] == "Bearer explicit"


def test_http_judge_retries_server_errors(stub):
    judge = http_judge(stub, max_retries=3)
    (v,) = judge.judge([text_episode("a [[e500,pos]]", "b [[e429,e503,neg]]")], decode)
    assert v == TurnVerdicts([1, -1], 0)
    assert stub.counts == {"e500,pos": 2, "e429,e503,neg": 3}
    assert judge.requests == 5 and judge.failures == 0
    # retries exhausted: 1 + max_retries requests, then a failed verdict counted as 0
    judge = http_judge(stub, max_retries=2)
    (v,) = judge.judge([text_episode("c [[e500]]")], decode)
    assert v == TurnVerdicts([0], 1) and stub.counts["e500"] == 3 and judge.failures == 1


def test_http_judge_does_not_retry_client_errors(stub):
    judge = http_judge(stub, max_retries=3)
    (v,) = judge.judge([text_episode("a [[e400,pos]]", "b [[e404,pos]]", "c [[neg]]")], decode)
    assert v == TurnVerdicts([0, 0, -1], 2)
    assert stub.counts == {"e400,pos": 1, "e404,pos": 1, "neg": 1} and judge.requests == 3


def test_http_judge_timeout_is_a_failed_verdict(stub):
    judge = http_judge(stub, timeout_s=0.2, max_retries=1)
    t0 = time.perf_counter()
    (v,) = judge.judge([text_episode("a [[hang]]", "b [[pos]]")], decode)
    assert time.perf_counter() - t0 < 2.0
    assert v == TurnVerdicts([0, 1], 1)
    assert stub.counts["hang"] == 2 and judge.failures == 1  # first try and one retry


def test_http_judge_malformed_replies_are_failed_verdicts(stub):
    judge = http_judge(stub, max_retries=3)
    turns = ["a [[badjson]]", "b [[seven]]", "c [[nochoices]]", "d [[prose]]", "e [[neg]]"]
    (v,) = judge.judge([text_episode(*turns)], decode)
    assert v == TurnVerdicts([0, 0, 0, 0, -1], 4)
    assert stub.total == 5  # a malformed reply is final, not retried
    assert judge.failures == 4 and verdict_counts([v])["failed"] == 4.0


def test_http_judge_unreachable_endpoint_never_raises():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    judge = HttpJudge(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff_s=0.01)
    verdicts = judge.judge([text_episode("a", "b"), text_episode()], decode)
    assert verdicts == [TurnVerdicts([0, 0], 2), TurnVerdicts([], 0)]
    assert judge.requests == 6 and judge.failures == 2
    bad = HttpJudge("not-a-url", "m", max_retries=2, backoff_s=0.01)
    assert bad.judge([text_episode("a")], decode) == [TurnVerdicts([0], 1)]


def test_http_judge_cache_asks_identical_turns_once(stub):
    judge = http_judge(stub)
    eps = [text_episode("same [[neg]]", "same [[neg]]"), text_episode("same [[neg]]", "other")]
    verdicts = judge.judge(eps, decode)
    # one -1 per trajectory: the second identical turn keeps its verdict but not its penalty
    assert [v.scores for v in verdicts] == [[-1, 0], [-1, 1]]
    assert stub.total == 2 and judge.requests == 2 and judge.cache_hits == 2
    assert judge.judge(eps, decode) == verdicts  # all cached now
    assert stub.total == 2 and judge.cache_hits == 6
    # a failed verdict is not cached: asked again next time
    failing = text_episode("x [[e400,pos]]")
    assert judge.judge([failing], decode) == [TurnVerdicts([0], 1)]
    assert judge.judge([failing], decode) == [TurnVerdicts([1], 0)]
    # another model is another cache key
    other = http_judge(stub, max_retries=0)
    other.cache = judge.cache
    other.model = "another-model"
    other.judge([eps[1]], decode)
    assert stub.total == 6


def test_http_judge_respects_the_concurrency_bound(stub):
    judge = http_judge(stub, max_concurrency=2)
    eps = [text_episode(*[f"t{i}{j} [[slow]]" for j in range(3)]) for i in range(3)]
    verdicts = judge.judge(eps, decode)
    assert [v.scores for v in verdicts] == [[0, 0, 0]] * 3
    assert stub.total == 9 and stub.max_inflight == 2


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("kind", ["rule", "http"])
def test_judge_contract(kind, stub):
    judge = RuleJudge() if kind == "rule" else http_judge(stub)
    eps = [
        make_episode(
            [
                ("call: [[neg]]", MALFORMED),
                ("call: [[neg]] again", MALFORMED),
                ("call: [[pos]]", GOOD),
                ("call: [[fenced]]", GOOD),
                ("answer: [[neg]] Pell", None),
            ],
            answer="Pell",
        ),
        make_episode([("think [[zero]]", None), ("answer: Marlow", None)], answer="Marlow"),
        make_episode([]),
        make_episode([("answer: [[text]] Pell", None)], answer="Pell"),
    ]
    verdicts = judge.judge(eps, decode)
    assert len(verdicts) == len(eps)
    for ep, v in zip(eps, verdicts, strict=True):
        assert isinstance(v, TurnVerdicts) and v.failed == 0
        assert len(v.scores) == len(ep.turn_spans)
        assert set(v.scores) <= {-1, 0, 1} and v.scores.count(-1) <= 1
    expected = {
        "rule": [[-1, 0, 1, 0, 0], [0, 0], [], [0]],
        "http": [[-1, 0, 1, 0, 0], [0, 1], [], [1]],
    }[kind]
    assert [v.scores for v in verdicts] == expected
    judge.close()
