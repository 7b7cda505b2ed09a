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


def test_config_reference_lists_every_key():
    """Every trainer config key (dataclass leaf) has a row in the README's config reference."""
    import dataclasses

    from trainer.config import Config

    def leaves(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from leaves(value, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    text = README.read_text()
    section = text.split("### Config reference", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for row in re.findall(r"^\| (`[^|]+) \|", section, flags=re.M):
        names = [n.strip().strip("`") for n in row.split(",")]
        head = names[0]
        documented.add(head)
        prefix = head.rsplit(".", 1)[0] + "." if "." in head else ""
        documented.update(prefix + n for n in names[1:])
    missing = sorted(set(leaves(Config())) - documented)
    assert not missing, f"config keys missing from the README: {missing}"
    stale = sorted(documented - set(leaves(Config())))
    assert not stale, f"README documents keys that do not exist: {stale}"
