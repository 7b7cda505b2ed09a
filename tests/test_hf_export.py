"""The trained policy as a Hugging Face directory: ``checkpoint.export_hf`` at the end of a
run, ``tapo-train --export`` from a checkpoint (one and two processes), atomic replacement,
and the errors that leave the run directory unchanged."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer.checkpoint import RUN_OUTPUT_DIRS, latest_checkpoint, load_checkpoint, prepare_run_dir
from trainer.cli import main
from trainer.config import Config, ConfigError, LoggingConfig, ModelConfig, load_config
from trainer.distributed import DistContext, cleanup
from trainer.export import HF_DIR, OLD_DIR, PARTIAL_DIR, export_hf, image_processor_of
from trainer.modeling import build_policy, tiny_model
from trainer.testing import TINY_RUN_OVERRIDES
from trainer.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
NAME = "exported"
# warm-up and one RL step of the smallest model: a policy whose weights moved from the init
MICRO = [
    *TINY_RUN_OVERRIDES,
    "warmup.steps=2",
    "rollout.max_new_tokens_per_turn=24",
    "rollout.max_total_tokens=128",
    "rl.steps=1",
    "eval.num_questions=2",
    "eval.k=0",
    "eval.at_start=false",
    "dist.threads_per_rank=1",
    "logging.tensorboard=false",
    "logging.plots=false",
    f"logging.name={NAME}",
]
SINGLE = DistContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"), fsdp=False)
TEXT = "<tool_call>Question: who owns the cat?</tool_call><answer>x</answer>"


def _overrides(run_dir: Path, *extra: str) -> list[str]:
    return [*MICRO, f"logging.run_dir={run_dir}", *extra]


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _tree(path: Path) -> dict[str, str]:
    """Every file and directory under ``path`` with the SHA-256 of its content."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(path.rglob("*"))
    }


def _weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(hf_dir / "model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with ``checkpoint.export_hf: true`` under FSDP2 (a one-rank group): the run
    directory, the trained in-memory policy's logits on fixed ids, its tokenizer's ids."""
    run_dir = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, _overrides(run_dir, "checkpoint.export_hf=true", "dist.fsdp='on'"))
    trainer = Trainer(cfg)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            summary = trainer.fit()
        assert trainer.ctx.fsdp and hasattr(trainer.model.model.embed_tokens.weight, "full_tensor")
        ids = torch.randint(
            0, len(trainer.tokenizer), (3, 11), generator=torch.Generator().manual_seed(0)
        )
        logits = _logits(trainer.model, ids)
        text_ids = trainer.tokenizer.encode(TEXT, add_special_tokens=False)
        special = (trainer.tokenizer.pad_token_id, trainer.tokenizer.eos_token_id)
    finally:
        trainer.registry.close()
        trainer.scorer.close()
        trainer.close()
        cleanup(trainer.ctx)
    return SimpleNamespace(
        cfg=cfg,
        root=run_dir,
        run=run_dir / NAME,
        summary=summary,
        stdout=out.getvalue(),
        ids=ids,
        logits=logits,
        text_ids=text_ids,
        special=special,
    )


def test_the_exported_directory_loads_with_the_trained_policys_logits(trained):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    hf_dir = trained.run / HF_DIR
    loaded = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert loaded.dtype == torch.float32
    exported = _logits(loaded, trained.ids)
    torch.testing.assert_close(exported, trained.logits, atol=1e-5, rtol=0)
    # the same weights through the other route: the final checkpoint loaded into a plain model
    # (the tiny model's own byte-level BPE tokenizer: AutoTokenizer would build Qwen2's)
    tok = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    assert len(tok) == loaded.config.vocab_size
    plain = tiny_model(trained.cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, seed=123)
    load_checkpoint(latest_checkpoint(trained.run), plain, None, SINGLE)
    torch.testing.assert_close(exported, _logits(plain, trained.ids), atol=1e-5, rtol=0)
    # ... and not the untrained initialisation
    init = tiny_model(trained.cfg.model, len(tok), tok.pad_token_id, tok.eos_token_id, seed=0)
    assert (exported - _logits(init, trained.ids)).abs().max() > 1e-3
    # the tokenizer is the run's, the tied embedding is stored once
    assert tok.encode(TEXT, add_special_tokens=False) == trained.text_ids
    assert (tok.pad_token_id, tok.eos_token_id) == trained.special
    assert json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"] is True
    names = set(_weights(hf_dir))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    # complete, in place, reported
    assert not (trained.run / PARTIAL_DIR).exists() and not (trained.run / OLD_DIR).exists()
    assert trained.summary["hf_model"] == str(hf_dir)
    assert json.loads((trained.run / "summary.json").read_text())["hf_model"] == str(hf_dir)
    assert trained.stdout.rstrip().endswith(str(hf_dir))


def test_export_from_a_checkpoint_writes_the_same_weights(trained, tmp_path, capsys):
    shutil.copytree(trained.run, tmp_path / NAME)
    run = tmp_path / NAME
    before = _weights(run / HF_DIR)
    (run / HF_DIR / "stale.txt").write_text("from an older export")
    others = {k: v for k, v in _tree(run).items() if not k.startswith(HF_DIR)}
    # unsharded this time: the FSDP2 checkpoint loads into a plain model
    assert main(["--export", *_overrides(tmp_path, "dist.fsdp='off'")]) == 0
    after = _weights(run / HF_DIR)
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert not (run / HF_DIR / "stale.txt").exists()  # replaced as a whole
    assert not (run / PARTIAL_DIR).exists() and not (run / OLD_DIR).exists()
    assert {k: v for k, v in _tree(run).items() if not k.startswith(HF_DIR)} == others
    assert str(run / HF_DIR) in capsys.readouterr().out


def test_export_on_two_processes_gathers_the_shards(trained, tmp_path):
    shutil.copytree(trained.run, tmp_path / NAME)
    run = tmp_path / NAME
    shutil.rmtree(run / HF_DIR)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "trainer.train", "--export", *_overrides(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after, before = _weights(run / HF_DIR), _weights(trained.run / HF_DIR)
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert proc.stdout.count(f"Hugging Face model: {run / HF_DIR}") == 1  # rank 0 alone


def test_export_without_a_checkpoint_fails_and_changes_nothing(tmp_path, capsys):
    # no run directory at all: none is created
    assert main(["--export", *_overrides(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--export: no checkpoint under" in err and "nothing was changed" in err
    assert not (tmp_path / NAME).exists()
    # a run directory whose only checkpoint is unfinished (no manifest), with an older export
    run = tmp_path / NAME
    prepare_run_dir(run, fresh=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    (run / "checkpoints" / "step_000003").mkdir(parents=True)
    (run / "checkpoints" / "step_000003" / ".metadata").write_text("partial")
    (run / HF_DIR).mkdir()
    (run / HF_DIR / "model.safetensors").write_bytes(b"older export")
    before = _tree(run)
    assert main(["--export", *_overrides(tmp_path)]) == 2
    assert "--export: no checkpoint under" in capsys.readouterr().err
    assert _tree(run) == before


def test_export_without_the_runs_tokenizer_fails_and_changes_nothing(trained, tmp_path, capsys):
    shutil.copytree(trained.run, tmp_path / NAME)
    run = tmp_path / NAME
    shutil.rmtree(run / "tokenizer")
    before = _tree(run)
    assert main(["--export", *_overrides(tmp_path)]) == 2
    assert "--export: the run's tokenizer" in capsys.readouterr().err
    assert _tree(run) == before


class _Tokenizer:
    """Stands in for a tokenizer: ``save_pretrained`` writes one file, or fails."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, path) -> None:
        if self.fail:
            raise OSError("disk full")
        (Path(path) / "tokenizer.json").write_text("{}")


def test_an_unfinished_export_never_replaces_a_finished_one(tmp_path):
    cfg = ModelConfig(
        hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )
    first, second = (tiny_model(cfg, 40, 0, 1, seed=s) for s in (1, 2))
    path = export_hf(tmp_path, first, _Tokenizer(), SINGLE)
    assert path == tmp_path / HF_DIR and (path / "tokenizer.json").is_file()
    kept = _weights(path)
    assert torch.equal(kept["model.embed_tokens.weight"], first.model.embed_tokens.weight)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tmp_path, second, _Tokenizer(fail=True), SINGLE)
    assert (tmp_path / PARTIAL_DIR).is_dir()  # the unfinished one stays aside
    assert all(torch.equal(v, kept[k]) for k, v in _weights(path).items())
    export_hf(tmp_path, second, _Tokenizer(), SINGLE)
    assert not (tmp_path / PARTIAL_DIR).exists() and not (tmp_path / OLD_DIR).exists()
    got = _weights(path)["model.embed_tokens.weight"]
    assert torch.equal(got, second.model.embed_tokens.weight)
    # a fresh run of the same name replaces the export with the other outputs
    assert {HF_DIR, PARTIAL_DIR, OLD_DIR} <= set(RUN_OUTPUT_DIRS)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / PARTIAL_DIR).mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    prepare_run_dir(tmp_path, fresh=True)
    assert not (tmp_path / HF_DIR).exists() and not (tmp_path / PARTIAL_DIR).exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_vision_language_policy_exports_with_its_image_processor(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from trainer.vision import ImageCodec, mrope_positions

    model_cfg = ModelConfig(
        vision=True,
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        vision_layers=1,
        vision_hidden_size=32,
        vision_heads=2,
        max_pixels=56 * 56,
    )
    cfg = Config(model=model_cfg, logging=LoggingConfig(run_dir=str(tmp_path), name=NAME))
    texts = ["Question: what colour is the square?", "<answer>blue</answer>"] * 4
    model, tokenizer = build_policy(
        model_cfg, cfg.run_path / "tokenizer", lambda: texts, 0, True, lambda: None
    )
    path = export_hf(
        cfg.run_path, model, tokenizer, SINGLE, image_processor=image_processor_of(cfg, model)
    )
    loaded = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoImageProcessor.from_pretrained(path)
    image = Image.new("RGB", (300, 200), (10, 120, 240))
    codec = ImageCodec(processor, tokenizer)
    img = codec.encode(image)
    # the saved processor keeps the run's pixel budget: at most 56 x 56 pixels = 4 tokens
    assert img.num_tokens <= (56 // 28) ** 2
    ids = torch.tensor([codec.token_ids(img) + tokenizer.encode("Question: x")])
    kw = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=img.pixel_values,
        image_grid_thw=torch.tensor([img.grid]),
        position_ids=mrope_positions(ids[0].tolist(), codec.pad_id, [img])[:, None],
    )
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**kw).logits, model(**kw).logits, atol=1e-5, rtol=0)


def test_export_hf_is_a_checked_boolean_and_export_excludes_resume(capsys):
    assert load_config(None, []).checkpoint.export_hf is False
    assert load_config(None, ["checkpoint.export_hf=true"]).checkpoint.export_hf is True
    for bad in ("1", "'true'", "maybe"):
        with pytest.raises(ConfigError, match=r"checkpoint\.export_hf: expected true/false"):
            load_config(None, [f"checkpoint.export_hf={bad}"])
    assert main(["checkpoint.export_hf=1"]) == 2
    assert "checkpoint.export_hf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--export", "--resume"])
    assert "not allowed with argument" in capsys.readouterr().err
