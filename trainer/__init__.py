"""Lean RL trainer for multi-turn tool-use agents (GRPO / GSPO / SAPO with TAPO credit correction).

Built only on the public API of ``tapo_kernels``. Launch with::

    python -m trainer.train --config trainer/configs/tiny_grpo_tapo.yaml
    torchrun --nproc_per_node 2 -m trainer.train --config trainer/configs/tiny_grpo_tapo.yaml

Layout: ``config`` (dataclasses + YAML), ``tools`` (registry, parser, BM25 search),
``tasks`` (JSONL loader, synthetic search task), ``modeling`` (tiny model + tokenizer or a
local checkpoint), ``rollout`` (multi-turn generation into ``Episode`` records), ``train``
(the loop).
"""
