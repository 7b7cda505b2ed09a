"""TAPO in the training step: encoders, ablations, the random-lift control, ground-truth
statistics, and a smoke run of the study command."""

import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tapo_kernels
from tapo_kernels import reference
from trainer.config import TapoConfig
from trainer.credit import correct_credit, random_lift, truth_counts, truth_rates
from trainer.rollout import CallRecord, Episode, collate
from trainer.tasks import Example
from trainer.tools import build_registry

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dim,n", [(256, 3), (7, 1), (64, 2), (300, 4)])
def test_encode_text_equals_its_definition_on_random_texts(dim, n):
    rng = random.Random(dim * 10 + n)
    alphabet = string.ascii_letters + string.digits + "  \t\n.,'\"-éßÄİ漢字🙂"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    texts += ["", " \t ", "a", "ab", "İstanbul", "Zorvex Quill home city", "ZORVEX  quill"]
    assert torch.equal(
        tapo_kernels.encode_text(texts, dim, n), reference.encode_text(texts, dim, n)
    )
    # the cached n-gram hashes give the same answer the second time
    assert torch.equal(
        tapo_kernels.encode_text(texts, dim, n), reference.encode_text(texts, dim, n)
    )


def test_encode_results_compares_retrieved_sets():
    r = tapo_kernels.encode_results([["d1"], ["d1"], ["d2"], ["d1", "d2"], [], ["d2", "d1", "d1"]])
    assert r.shape == (6, 256) and r.dtype == torch.float32
    sim = r @ r.T
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-6)  # same documents, same vector
    assert abs(float(sim[0, 2])) < 0.35  # different documents: near-orthogonal
    assert float(sim[0, 3]) == pytest.approx(2**-0.5, abs=0.05)  # half of the set shared
    assert sim[3, 5] == pytest.approx(1.0, abs=1e-6)  # order and repeats do not matter
    assert torch.count_nonzero(r[4]) == 0  # nothing retrieved: matches nothing
    # deterministic across processes (seeded by a hash of the reference, not Python's hash())
    code = "import tapo_kernels; print(tapo_kernels.encode_results([['d1']])[0, :3].tolist())"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    ).stdout
    assert other.strip() == str(r[0, :3].tolist())
    with pytest.raises(TypeError):
        tapo_kernels.encode_results(["d1"])
    with pytest.raises(TypeError):
        tapo_kernels.encode_results([[1]])


# ----------------------------------------------------------------------------- episodes

DOCS = ["The pet of A B is heron.", "The home city of A B is Marlow.", "The pet of C D is otter."]
EX = Example(
    "q",
    "What are the pet and the home city of A B?",
    ("heron and Marlow",),
    queries=("A B pet", "A B home city"),
    evidence=((DOCS[0],), (DOCS[1],)),
    kind="two_fact",
)


def episode(group: int, reward: float, calls: list[tuple[str, bool]]) -> Episode:
    """An episode with one policy token per call span, each call observing a document."""
    ep = Episode(EX, group, 1, [0], [0], [0.0])
    for doc, valid in calls:
        start = len(ep.token_ids)
        ep.append([1, 2], policy=True)
        good = EX.is_good_observation(doc) if valid else False
        ep.calls.append(
            CallRecord(
                start,
                start + 2,
                0 if valid else -1,
                0,
                "search",
                {},
                doc,
                valid,
                None if valid else "bad",
                doc,
                refs=(doc,) if valid else (),
                good=good,
            )
        )
    ep.reward = reward
    return ep


def test_ground_truth_labels_and_counts_on_hand_built_episodes():
    eps = [
        episode(0, 1.0, [(DOCS[0], True), (DOCS[1], True)]),  # success
        episode(0, 0.0, [(DOCS[0], True), (DOCS[2], True)]),  # fails: a good, a bad call
        episode(0, 0.0, [(DOCS[2], True), ("x", False)]),  # fails: a bad and an invalid call
        episode(1, 0.0, [(DOCS[1], True)]),  # a group without success: advantage 0
    ]
    assert [c.good for c in eps[1].calls] == [True, False]  # oracle labels from the evidence
    seq_adv = [1.0, -0.5, -0.5, 0.0]
    delta = [0.0, 0.0, 0.4, 0.0, 0.1, 0.0, 0.0]  # one entry per call in batch order
    counts = truth_counts(eps, seq_adv, delta)
    assert counts == {
        "failing_traj": 2,
        "failing_traj_with_good": 1,  # rows 1 and 2 fail; row 1 has a good call
        "failing_calls": 4,
        "failing_good_calls": 1,
        "failing_valid_bad_calls": 2,
        "lifted_calls": 2,
        "lifted_good_calls": 1,  # the good call (0.4) and a bad one (0.1)
        "lift_sum_good": 0.4,
        "lift_sum_bad": 0.1,
        "region_failing_calls": 0,  # no zoom_in calls here (see test_vision_policy.py)
        "region_failing_good_calls": 0,
        "region_lifted_calls": 0,
        "region_lifted_good_calls": 0,
    }
    rates = truth_rates(counts)
    assert rates["truth/failing_traj_with_good_call"] == 0.5
    assert rates["truth/failing_call_good_rate"] == 0.25
    assert rates["truth/lift_precision"] == 0.5 and rates["truth/lift_recall"] == 1.0
    assert rates["truth/mean_lift_good"] == 0.4
    assert rates["truth/mean_lift_bad"] == pytest.approx(0.05)
    # without ground truth (no evidence) nothing is counted and no rate is reported
    plain = Episode(Example("p", "q?", ("a",)), 0, 1, [0], [0], [0.0])
    empty = truth_rates(truth_counts([plain], [-1.0], []))
    assert "truth/lift_precision" not in empty and empty["truth/failing_trajectories"] == 0


def test_random_lift_moves_the_same_lifts_onto_random_failing_calls():
    delta = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0])
    failing = torch.tensor([False, True, True, True, True, True, False, True])
    seen = set()
    for seed in range(40):
        out = random_lift(delta, failing, seed)
        assert int((out > 0).sum()) == 2  # the stated count: as many as TAPO lifted
        assert sorted(out[out > 0].tolist()) == [0.25, 0.5]  # the same values
        assert not bool((out[~failing] > 0).any())  # only failing calls
        seen.add(tuple((out > 0).nonzero().flatten().tolist()))
        assert torch.equal(out, random_lift(delta, failing, seed))  # seeded
    assert len(seen) > 5  # the chosen calls vary with the seed
    assert torch.equal(
        random_lift(torch.zeros(3), torch.ones(3, dtype=torch.bool), 0), torch.zeros(3)
    )


def _credit_batch():
    """Two groups: group 0 has a success and two failures, group 1 one of each."""
    eps = [
        episode(0, 1.0, [(DOCS[0], True), (DOCS[1], True)]),
        episode(0, 0.0, [(DOCS[0], True), (DOCS[2], True)]),
        episode(0, 0.0, [(DOCS[1], True)]),
        episode(1, 1.0, [(DOCS[0], True)]),
        episode(1, 0.0, [(DOCS[0], True)]),
    ]
    batch = collate(eps, pad_id=0)
    seq_adv = reference.group_advantages(batch.rewards, batch.group_ids)
    return eps, batch, seq_adv, seq_adv[:, None] * batch.mask


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"coverage": False},
        {"gate": False, "alpha_min": 0.9},
        {"random_lift": True},
        {"witness": "arguments"},
    ],
)
def test_correct_credit_applies_the_configured_op_and_lift(fused, switches):
    registry = build_registry(["search"], {0: DOCS})
    cfg = TapoConfig(fused=fused, **switches)
    eps, batch, seq_adv, adv = _credit_batch()
    credit = correct_credit(
        cfg, registry, registry.sim_kind_tensor(), eps, batch, adv, seq_adv, seed=3
    )
    calls = batch.calls
    if cfg.witness == "tool":  # search: the retrieved documents
        want_params = tapo_kernels.encode_results([c.refs for ep in eps for c in ep.calls])
    else:
        want_params = tapo_kernels.encode_text([c.param_text for ep in eps for c in ep.calls])
    torch.testing.assert_close(calls.params, want_params)
    # the op with the same switches (no gate = alpha_min 0), then the control's permutation
    want = reference.fused_correct(
        adv,
        seq_adv,
        batch.group_ids,
        calls.seq,
        calls.start,
        calls.end,
        calls.tool,
        calls.key,
        want_params,
        registry.sim_kind_tensor(),
        cfg.theta,
        cfg.alpha_min if cfg.gate else 0.0,
        cfg.beta,
        cfg.batch_scope,
        cfg.coverage,
    )
    want_delta = want[1]
    assert bool((want_delta > 0).any())
    if cfg.random_lift:
        failing = (calls.tool >= 0) & (seq_adv[calls.seq] < 0)
        want_delta = random_lift(want[1], failing, 3)
    torch.testing.assert_close(credit.delta, want_delta)
    call_map = calls.call_map(*adv.shape)
    if fused:
        assert torch.equal(credit.call_map, call_map) and credit.advantages is adv
        torch.testing.assert_close(credit.call_delta, want_delta)
    else:
        assert credit.call_map is None and credit.call_delta is None
        torch.testing.assert_close(
            credit.advantages, reference.apply_lift(adv, call_map, want_delta)
        )
    assert credit.counts["tapo_corrected_calls"] == int((want_delta > 0).sum())
    assert set(credit.seconds) == {"encode", "correct"}


def test_correct_credit_off_lifts_nothing():
    registry = build_registry(["search"], {0: DOCS})
    eps, batch, seq_adv, adv = _credit_batch()
    credit = correct_credit(
        TapoConfig(enabled=False),
        registry,
        registry.sim_kind_tensor(),
        eps,
        batch,
        adv,
        seq_adv,
        seed=0,
    )
    assert credit.call_map is None and credit.advantages is adv
    assert not bool(credit.delta.any()) and credit.delta.shape == (len(batch.calls),)


# ----------------------------------------------------------------------------- study


@pytest.mark.slow
def test_study_command_smoke(tmp_path):
    """Two seeds x two arms, two RL steps each, then the report."""
    study = tmp_path / "study.yaml"
    study.write_text(
        "name: smoke\n"
        f"base: {REPO / 'trainer/configs/tiny_grpo_tapo.yaml'}\n"
        "seeds: [0, 1]\nparallel: 2\nthreshold: 0.5\n"
        f"out_dir: {tmp_path / 'out'}\nrun_dir: {tmp_path / 'runs'}\n"
        "overrides: [rl.steps=2, warmup.steps=3, eval.every=1, eval.num_questions=4, eval.k=0,\n"
        "            rl.prompts_per_step=2, rollout.group_size=2, task.num_entities=12,\n"
        "            task.num_demos=8, logging.tensorboard=false, logging.plots=false]\n"
        "arms:\n  grpo: [tapo.enabled=false]\n  tapo: []\n"
    )
    cmd = [sys.executable, "-m", "trainer.study", "--config", str(study)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = (tmp_path / "out" / "README.md").read_text()
    assert "| `grpo` |" in report and "| `tapo` |" in report
    for name in ("results.json", "curves.png", "statistics.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    for run in ("warmup_seed0", "grpo_seed0", "tapo_seed1"):
        assert (tmp_path / "runs" / run / "summary.json").is_file()
    # a second invocation finds every run finished and trains nothing
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "done in" not in again.stdout
    # arms of a seed share the warm-up checkpoint and the first rollouts (paired)
    import json

    first = [
        json.loads(line)
        for line in (tmp_path / "runs/grpo_seed0/metrics.jsonl").open()
        if '"rl_step": 1' in line
    ]
    other = [
        json.loads(line)
        for line in (tmp_path / "runs/tapo_seed0/metrics.jsonl").open()
        if '"rl_step": 1' in line
    ]
    assert first[0]["train/reward"] == other[0]["train/reward"]
    bad = subprocess.run(cmd + ["seeds=[]"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "seeds" in bad.stderr
