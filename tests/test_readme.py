"""The README's usage example runs as written and does what its comments say."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_usage_example_runs_and_lifts_the_repeated_call(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)  # noqa: S102
    corrected = scope["res"].corrected
    # identical query (after lower-casing) in the success: s = 1, cov = 1/1, Abar = 1,
    # d = 0.8 * 1 * 1 = 0.8, so tokens 2..4 of row 1 go from -1 to min(0, -1 + 0.8) = -0.2
    expected = torch.full((8,), -1.0)
    expected[2:5] = -0.2
    torch.testing.assert_close(corrected[1], expected)
    assert torch.equal(corrected[0], torch.ones(8))
    assert scope["logp"].grad is not None and torch.isfinite(scope["logp"].grad).all()
    assert "corrected 1/1 failing calls" in capsys.readouterr().out


def test_readme_setup_commands_exist_in_makefile():
    makefile = (README.parent / "Makefile").read_text()
    for target in ("train", "test", "install", "bench"):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert "make test" in (README.parent / ".ci" / "run").read_text()
