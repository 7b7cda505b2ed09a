"""Weights & Biases logging next to metrics.jsonl: offline runs, resume, failures, no package."""

import json
import math
import sys
import time
import warnings

import pytest

from trainer.config import ConfigError, load_config
from trainer.metrics import WANDB_ID_FILE, MetricsLogger, WandbOptions, import_wandb, read_metrics


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """``wandb`` with every file it writes outside the run directory under ``tmp_path``."""
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_RESUME", raising=False)
    return wandb


def read_wandb_file(path):
    """The records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of chunks, each with a 7-byte header (CRC-32, little-endian length, type:
    1 whole record, 2 first, 3 middle, 4 last part) and a part of a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, parts, records = 32 * 1024, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's zero-padded tail
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def finished_records(path, timeout_s=30.0):
    """The records of a finished run's ``.wandb`` file: W&B's service may still be writing
    it when ``finish()`` returns, so wait for its exit record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_file(path) if path.stat().st_size > 7 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout_s} s")
        time.sleep(0.1)


def offline_history(run_dir, run_id):
    """``(run record, config, history rows)`` of each offline W&B run of ``run_id`` under
    ``run_dir/wandb``, oldest first."""
    out = []
    for log in (run_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"):
        run, config, rows = None, {}, []
        for record in finished_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                item_key = lambda i: i.key or "/".join(i.nested_key)
                rows.append({item_key(i): json.loads(i.value_json) for i in record.history.item})
        out.append((run, config, rows))
    return sorted(out, key=lambda r: r[0].start_time.ToNanoseconds())


def logger(run_dir, resume_step=None, **options):
    wandb = WandbOptions(**{"project": "tapo-test", "name": "myrun", "config": {}, **options})
    return MetricsLogger(
        run_dir, enabled=True, tensorboard=False, resume_step=resume_step, wandb=wandb
    )


def test_offline_run_holds_the_history_and_config(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    log = logger(run_dir, config={"rl": {"steps": 3}, "seed": 7})
    for step in (1, 2, 3):
        log.log(step, {"phase": "rl", "train/reward": step / 4, "actor/loss": math.nan})
    log.close()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
    run_id = json.loads((run_dir / WANDB_ID_FILE).read_text())["id"]
    ((run, config, rows),) = offline_history(run_dir, run_id)
    assert (run.run_id, run.display_name, run.project) == (run_id, "myrun", "tapo-test")
    assert {k: config.get(k) for k in ("rl", "seed")} == {"rl": {"steps": 3}, "seed": 7}
    logged = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    # strings ('phase') and non-finite numbers are left out, as in TensorBoard
    assert logged == [{"step": s, "train/reward": s / 4} for s in (1, 2, 3)]


def test_resume_goes_on_with_the_same_run(tmp_path, wandb_env):
    run_dir = tmp_path / "run"
    first = logger(run_dir)
    for step in (1, 2, 3):
        first.log(step, {"train/reward": float(step)})
    first.close()
    run_id = json.loads((run_dir / WANDB_ID_FILE).read_text())["id"]
    # resumed from the checkpoint of step 2: step 3 is recomputed and logged again
    again = logger(run_dir, resume_step=2)
    again.log(3, {"train/reward": 30.0})
    again.close()
    assert json.loads((run_dir / WANDB_ID_FILE).read_text())["id"] == run_id
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl")]
    assert [(r["step"], r["train/reward"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    runs = offline_history(run_dir, run_id)
    assert len(runs) == 2 and runs[1][0].run_id == run_id
    assert [(r["step"], r["train/reward"]) for r in runs[1][2]] == [(3, 30.0)]
    # a fresh run (no resume step) starts a new W&B run
    fresh = logger(run_dir)
    fresh.close()
    assert json.loads((run_dir / WANDB_ID_FILE).read_text())["id"] != run_id


def test_a_failing_wandb_never_loses_a_metrics_line(tmp_path):
    class Broken:
        finished = False

        def log(self, values):
            raise OSError("disk full")

        def finish(self):
            Broken.finished = True

    log = MetricsLogger(tmp_path, enabled=True, tensorboard=False)
    log._wandb = Broken()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in (1, 2, 3):
            log.log(step, {"train/reward": 0.5})
        log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "W&B logging failed at step 1 (OSError: disk full)" in messages[0]
    assert not Broken.finished  # W&B is off after the failure


def test_a_run_that_cannot_start_is_a_config_error(tmp_path, wandb_env, monkeypatch):
    def refuse(**kwargs):
        raise RuntimeError("api_key not configured")

    monkeypatch.setattr(wandb_env, "init", refuse)
    with pytest.raises(ConfigError, match="logging.wandb: could not start the W&B run .*api_key"):
        logger(tmp_path / "run", mode="online")


def test_a_missing_wandb_package_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"logging.wandb: .*\(pip install wandb\)"):
        load_config(None, ["logging.wandb=true"])
    load_config(None, ["logging.wandb=false"])  # not needed unless asked for
    with pytest.raises(ConfigError, match=r"pip install wandb"):
        import_wandb()
    with pytest.raises(ConfigError, match=r"logging.wandb: .*pip install wandb"):
        logger(tmp_path / "run")


def test_wandb_config_keys_are_checked():
    cfg = load_config(None, [])
    assert (cfg.logging.wandb, cfg.logging.wandb_project, cfg.logging.wandb_mode) == (
        False,
        "tapo",
        "offline",
    )
    with pytest.raises(ConfigError, match="logging.wandb_mode: must be one of"):
        load_config(None, ["logging.wandb_mode=cloud"])


def test_a_training_run_logs_its_metrics_and_config_to_wandb(tmp_path, wandb_env):
    from trainer.cli import run
    from trainer.testing import TINY_RUN_OVERRIDES

    overrides = [
        *TINY_RUN_OVERRIDES,
        "warmup.steps=1",
        "rl.steps=1",
        "eval.num_questions=2",
        "eval.k=0",
        "eval.at_start=false",
        "logging.plots=false",
        "logging.tensorboard=false",
        "logging.progress=false",
        "dist.threads_per_rank=1",
        f"logging.run_dir={tmp_path}",
        "logging.name=wb_run",
        "logging.wandb=true",
        "logging.wandb_project=tapo-e2e",
    ]
    run(load_config(None, overrides))
    run_dir = tmp_path / "wb_run"
    run_id = json.loads((run_dir / WANDB_ID_FILE).read_text())["id"]
    ((record, config, rows),) = offline_history(run_dir, run_id)
    assert (record.display_name, record.project) == ("wb_run", "tapo-e2e")
    assert config["logging"]["name"] == "wb_run" and config["rl"]["steps"] == 1
    (rl,) = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("phase") == "rl"]
    (logged,) = [r for r in rows if "train/reward" in r]
    assert logged["step"] == rl["step"]
    for key in ("train/reward", "actor/loss", "perf/step_time_s"):
        assert logged[key] == pytest.approx(rl[key])
