"""The ``tapo-train`` command line: a config, dotted overrides, ``--resume``, ``--export``.

    tapo-train --config trainer/configs/tiny_grpo_tapo.yaml rl.steps=20 tapo.enabled=false
    tapo-train --config trainer/configs/tiny_grpo_tapo.yaml --export   # checkpoint -> hf_model/
    torchrun --nproc_per_node 2 -m trainer.train --config ...     # several processes

Configuration, checkpoint and task-file errors are printed as one line and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from .checkpoint import CheckpointError
from .config import Config, ConfigError, load_config
from .tasks import TaskFileError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tapo-train",
        description="RL for tool-use agents with TAPO credit correction.",
        epilog="Overrides are dotted keys with YAML values, e.g. rl.steps=20 algo.loss=gspo "
        "tapo.enabled=false. Launch on several processes with "
        "torchrun --nproc_per_node N -m trainer.train ...",
    )
    parser.add_argument(
        "--config", default=None, help="YAML config (default: the embedded tiny run)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's latest checkpoint (otherwise the run "
        "directory is started afresh)",
    )
    mode.add_argument(
        "--export",
        action="store_true",
        help="write the run's newest verified checkpoint as a Hugging Face directory "
        "(<run_dir>/hf_model) and exit without training",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def run(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train with a resolved config; returns the summary (held-out accuracies, wall time)."""
    from .distributed import cleanup
    from .train import Trainer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        trainer.registry.close()
        trainer.scorer.close()
        trainer.close()
        cleanup(trainer.ctx)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``tapo-train``)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    try:
        if args.export:
            from .export import export_from_checkpoint

            export_from_checkpoint(cfg)
        else:
            run(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, TaskFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
