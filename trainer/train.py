"""The training loop: warm-up, then rollout -> reward -> advantage -> TAPO -> loss -> step.

Launch::

    python -m trainer.train --config trainer/configs/tiny_grpo_tapo.yaml        # one process
    torchrun --nproc_per_node 2 -m trainer.train --config trainer/configs/tiny_grpo_tapo.yaml
    python -m trainer.train --config ... --resume rl.steps=60                    # continue a run

One RL step, per rank:

1. sample ``rl.prompts_per_step / world`` training questions, ``G = rollout.group_size``
   rollouts each (multi-turn, tools executed, observations masked);
2. reward (exact match or F1) and GRPO group advantages ``A_i``;
3. TAPO: the calls' parameter vectors (``ToolRegistry.encode_calls``: the documents a
   search retrieved, by default) and ``tapo_kernels.fused_correct`` give a per-call lift
   ``d_k`` (``trainer/credit.py``, with its ablations and ground-truth statistics);
4. the policy loss (``trainer/loss.py``) with ``call_map`` / ``call_delta``, so the lift is
   applied inside the loss, optional KL to the frozen post-warm-up model;
5. backward (FSDP2 reduce-scatter), gradient clipping, AdamW step; a step whose loss or
   gradient norm is not finite is skipped and logged;
6. metrics to ``runs/<name>/metrics.jsonl`` + TensorBoard, periodic atomic DCP checkpoints.

Every random draw of step ``s`` is seeded from ``(seed, s, rank)``, so a run killed and
resumed from a checkpoint reproduces the metrics of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from tapo_kernels.reference import group_advantages

from . import loss
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    write_atomic,
)
from .config import RUN_MARKER, Config, ConfigError, load_config
from .credit import TAPO_COUNTS, Credit, correct_credit, truth_counts, truth_rates
from .distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    copy_full_weights,
    init_distributed,
    shard_model,
)
from .evaluate import evaluate
from .loss import hidden_batch_loss, micro_batch_loss  # noqa: F401  (tests import them here)
from .metrics import MetricsLogger, make_plots
from .modeling import (
    count_parameters,
    format_call,
    load_pretrained,
    load_tokenizer,
    tiny_model,
    train_tokenizer,
)
from .rewards import exact_match, f1_score, reward
from .rollout import Batch, Episode, RolloutEngine, collate, demonstration
from .tasks import TaskData, TaskFileError, load_task
from .tools import build_registry


def step_seed(*parts: Any) -> int:
    """A 31-bit seed from any labels (CRC32: identical on every machine and process)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def rank_print(ctx: DistContext, *args: Any) -> None:
    if ctx.is_main:
        print(*args, flush=True)


class Trainer:
    """Holds the model, optimizer, rollout engine and run outputs of one training run."""

    def __init__(self, cfg: Config, resume: bool = False) -> None:
        self.cfg = cfg
        self.ctx = init_distributed(cfg)
        try:
            self._setup(resume)
        except BaseException:
            cleanup(self.ctx)  # no process group is left behind by a run that cannot start
            raise

    def _setup(self, resume: bool) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.run_path = cfg.run_path
        self.t_begin = time.perf_counter()
        if cfg.rl.prompts_per_step % ctx.world:
            raise ConfigError(
                f"rl.prompts_per_step ({cfg.rl.prompts_per_step}) must be divisible "
                f"by the number of processes ({ctx.world})"
            )
        if cfg.warmup.steps and cfg.warmup.batch_size % ctx.world:
            raise ConfigError(
                f"warmup.batch_size ({cfg.warmup.batch_size}) must be divisible by "
                f"the number of processes ({ctx.world})"
            )
        self.config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self.checkpoint = self._resume_point() if resume else None
        if ctx.is_main:
            if self.checkpoint is None:
                self._fresh_run_dir()
            else:
                self._mark_run_dir()
            # the resolved config of this launch (a resume may override keys)
            write_atomic(self.run_path / "config.yaml", self.config_text)
        barrier(ctx)
        self.task: TaskData = load_task(cfg.task)
        try:
            self.registry = build_registry(
                cfg.tools.enabled,
                self.task.corpora,
                search_top_k=cfg.tools.search_top_k,
                timeout_s=cfg.tools.timeout_s,
                isolation=cfg.tools.isolation,
                workers=cfg.tools.workers,
            )
        except ValueError as exc:
            raise ConfigError(f"tools: {exc}") from exc
        self.sim_kind = self.registry.sim_kind_tensor(ctx.device)
        self.neural = None
        if cfg.tapo.enabled and cfg.tapo.witness == "neural":
            from tapo_kernels.params import NeuralTextEncoder

            self.neural = NeuralTextEncoder()
        self._build_model()
        self.state: dict[str, Any] = {"phase": "start", "rl_step": 0, "global_step": 0, "evals": {}}
        self.optimizer = self._rl_optimizer()
        if self.checkpoint is not None:
            self.state = load_checkpoint(
                self.checkpoint, self.model, self.optimizer, ctx, self.ref_model
            )
            self._sync_rollout_model()
            rank_print(ctx, f"resumed from {self.checkpoint} (RL step {self.state['rl_step']})")
        self.logger = MetricsLogger(
            self.run_path,
            ctx.is_main,
            cfg.logging.tensorboard,
            resume_step=self.state["global_step"] if self.checkpoint else None,
        )

    # ------------------------------------------------------------------ setup

    def _resume_point(self) -> Path:
        """The newest verified checkpoint (rank 0 decides, every rank gets the same path)."""
        found = None
        if self.ctx.is_main:
            path, skipped = resume_checkpoint(self.run_path)
            for note in skipped:
                print(f"--resume: skipping checkpoint {note}", flush=True)
            found = None if path is None else str(path)
        found = broadcast_object(found, self.ctx)
        if found is None:
            raise CheckpointError(
                f"--resume: no checkpoint under {self.run_path / 'checkpoints'} verifies; nothing "
                "was changed (run without --resume to start afresh, which replaces the run's "
                "outputs)"
            )
        return Path(found)

    @staticmethod
    def _kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die without any cleanup

    def _mark_run_dir(self) -> None:
        (self.run_path / RUN_MARKER).touch()

    def _fresh_run_dir(self) -> None:
        """Start the run directory afresh: the outputs of an earlier run of the same name are
        replaced. Only a directory this trainer created (its marker file, or a run config) is
        ever cleared, and only the trainer's own outputs inside it."""
        path = self.run_path
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"logging: {path} exists and is not a directory")
            own = (path / RUN_MARKER).is_file() or (path / "config.yaml").is_file()
            if not own and any(path.iterdir()):
                raise ConfigError(
                    f"logging: {path} is not empty and was not created by "
                    "tapo-train; choose another logging.name or logging.run_dir"
                )
        path.mkdir(parents=True, exist_ok=True)
        self._mark_run_dir()
        for name in ("metrics.jsonl", "summary.json"):
            (path / name).unlink(missing_ok=True)
        for name in ("tensorboard", "checkpoints", "plots", "tokenizer"):
            if (path / name).is_dir() and not (path / name).is_symlink():
                shutil.rmtree(path / name)
            elif (path / name).is_symlink():
                (path / name).unlink()

    def _tokenizer_texts(self) -> list[str]:
        texts = list(self.task.texts())
        for ex in self.task.train + self.task.heldout + self.task.demos:
            texts.append(self.cfg.rollout.prompt_template.format(question=ex.question))
            texts.extend(format_call("search", {"query": q}) for q in ex.demo_queries())
        return texts

    def _build_model(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        if cfg.model.path is not None:
            model, tokenizer = load_pretrained(cfg.model)
        else:
            tok_dir = self.run_path / "tokenizer"
            if ctx.is_main and not (tok_dir / "tokenizer.json").exists():
                train_tokenizer(self._tokenizer_texts(), cfg.model.vocab_size).save_pretrained(
                    tok_dir
                )
            barrier(ctx)
            tokenizer = load_tokenizer(tok_dir)  # every rank reads the same file
            model = tiny_model(
                cfg.model,
                len(tokenizer),
                tokenizer.pad_token_id,
                tokenizer.eos_token_id,
                seed=cfg.seed,
            )
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.to(ctx.device)
        self.losses = loss.Losses(cfg, ctx, model)  # before sharding: may attach hidden_loss
        self.loss_input = self.losses.loss_input
        self.tokenizer = tokenizer
        self.num_params = count_parameters(model)
        # the frozen reference (KL) and, under FSDP, a full replica for generation: rollouts
        # then need no collectives, so ranks can generate different numbers of tokens
        # on GPUs with mixed precision the frozen copies compute in the same low precision
        low = (
            (torch.bfloat16 if cfg.dist.mixed_precision == "bf16" else torch.float16)
            if ctx.device.type == "cuda" and cfg.dist.mixed_precision != "off"
            else None
        )
        self.ref_model = self._frozen_copy(model, low) if cfg.algo.kl_coef > 0 else None
        if ctx.fsdp:
            self.rollout_model = self._frozen_copy(model, low)
            self.model = shard_model(model, ctx, cfg.dist.mixed_precision)
        else:
            self.rollout_model = model
            self.model = model
        self.engine = RolloutEngine(
            self.rollout_model,
            tokenizer,
            self.registry,
            cfg.rollout,
            max_obs_tokens=cfg.tools.max_obs_tokens,
            malformed_call_rate=cfg.debug.malformed_call_rate,
            fault_tool_rate=cfg.debug.fault_tool_rate,
        )
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for eos in [gen_eos] if isinstance(gen_eos, int) else (gen_eos or []):
            self.engine.stop_ids.setdefault(int(eos), "eos")  # e.g. <|im_end|> of chat models

    @staticmethod
    def _frozen_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        clone = copy.deepcopy(model)
        if dtype is not None:
            clone.to(dtype)
        clone.requires_grad_(False)
        clone.eval()
        return clone

    def _sync_rollout_model(self) -> None:
        if self.rollout_model is not self.model:
            copy_full_weights(self.model, self.rollout_model)

    def _rl_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
        )

    def _clip_and_step(self, optimizer: torch.optim.Optimizer, loss_ok: bool) -> tuple[float, bool]:
        """Clip, then step unless the loss or gradient norm is not finite (all ranks agree)."""
        max_norm = self.cfg.optim.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm_value = float(norm)
        bad = all_reduce_sum([0.0 if (loss_ok and math.isfinite(norm_value)) else 1.0], self.ctx)
        ok = bad.item() == 0
        if ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm_value, ok

    # ------------------------------------------------------------------ warm-up

    def warmup(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        demos = [demonstration(self.engine.fmt, self.registry, ex) for ex in self.task.demos]
        if not demos or cfg.warmup.steps == 0:
            return
        w = cfg.warmup
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=w.lr, weight_decay=w.weight_decay, betas=(0.9, 0.99)
        )
        self.model.train()
        bar = self._progress(w.steps, "warm-up")
        for step in range(1, w.steps + 1):
            if w.schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = w.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / w.steps))
            rng = random.Random(step_seed("warmup", cfg.seed, step))
            picks = [rng.randrange(len(demos)) for _ in range(w.batch_size)][ctx.rank :: ctx.world]
            batch = collate([demos[i] for i in picks], self.tokenizer.pad_token_id).to(ctx.device)
            loss_sum = self.losses.warmup_backward(self.model, batch)
            norm, ok = self._clip_and_step(optimizer, math.isfinite(loss_sum))
            mean_loss = all_reduce_sum([loss_sum], ctx)[0].item() / ctx.world
            self.state["global_step"] = step
            if step % 10 == 0 or step == w.steps:
                self.logger.log(
                    step,
                    {
                        "phase": "warmup",
                        "warmup/loss": mean_loss,
                        "warmup/grad_norm": norm,
                        "warmup/skipped": int(not ok),
                    },
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.3f}")
        if bar is not None:
            bar.close()
        del optimizer
        self._sync_rollout_model()

    # ------------------------------------------------------------------ RL

    def _lr_at(self, rl_step: int) -> float:
        o = self.cfg.optim
        return o.lr * min(1.0, rl_step / o.warmup_steps) if o.warmup_steps else o.lr

    def rl_step(self, rl_step: int) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        t_step = time.perf_counter()
        # 1. prompts and rollouts
        rng = random.Random(step_seed("prompts", cfg.seed, rl_step))
        train = self.task.train
        prompts = rng.sample(range(len(train)), min(cfg.rl.prompts_per_step, len(train)))
        while len(prompts) < cfg.rl.prompts_per_step:  # tiny tasks: repeat questions
            prompts.append(rng.randrange(len(train)))
        mine = prompts[ctx.rank :: ctx.world]
        G = cfg.rollout.group_size
        examples = [train[i] for i in mine for _ in range(G)]
        groups = [j for j in range(len(mine)) for _ in range(G)]
        t0 = time.perf_counter()
        episodes = self.engine.rollout(
            examples, groups, seed=step_seed("rollout", cfg.seed, rl_step, ctx.rank)
        )
        t_rollout = time.perf_counter() - t0
        # 2. rewards and advantages
        for ep in episodes:
            ep.em = exact_match(ep.answer, ep.example.answers)
            ep.f1 = f1_score(ep.answer, ep.example.answers)
            ep.reward = reward(ep.answer, ep.example.answers, cfg.algo.reward)
        if cfg.debug.kill_at_step == rl_step:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die mid-step, no cleanup
        batch = collate(episodes, self.tokenizer.pad_token_id).to(ctx.device)
        if cfg.rollout.recompute_logp:
            batch.old_logp = self.losses.frozen_logp(self.model, batch)
        ref_logp = (
            None if self.ref_model is None else self.losses.frozen_logp(self.ref_model, batch)
        )
        seq_adv = group_advantages(
            batch.rewards, batch.group_ids, scale_by_std=cfg.algo.scale_by_std
        ).to(ctx.device)  # [B]
        advantages = seq_adv[:, None] * batch.mask  # [B, T]
        # 3. TAPO (encoding + fused_correct, timed), then its ground-truth statistics
        credit = correct_credit(
            cfg.tapo,
            self.registry,
            self.sim_kind,
            episodes,
            batch,
            advantages,
            seq_adv,
            step_seed("random_lift", cfg.seed, rl_step, ctx.rank),
            self.neural,
        )
        truth = truth_counts(episodes, seq_adv.tolist(), credit.delta.tolist())
        # 4-5. policy update
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_at(rl_step)
        sums, grad_norm, skipped = self._update(
            batch, credit.advantages, ref_logp, credit.call_map, credit.call_delta, rl_step
        )
        self._sync_rollout_model()
        step_time = time.perf_counter() - t_step
        return self._step_metrics(
            episodes, batch, sums, grad_norm, skipped, credit, truth, t_rollout, step_time
        )

    def _update(
        self,
        batch: Batch,
        advantages: Tensor,
        ref_logp: Tensor | None,
        call_map: Tensor | None,
        call_delta: Tensor | None,
        rl_step: int,
    ) -> tuple[dict[str, float], float, float]:
        """``algo.num_minibatches`` optimizer steps on the batch: this rank's
        ``loss.UPDATE_SUMS``, the largest gradient norm and the number of skipped steps."""
        B = batch.shape[0]
        per_mb = math.ceil(B / self.cfg.algo.num_minibatches)
        sums, norms, skipped = loss.new_update_sums(), [], 0
        self.model.train()
        for start in range(0, B, per_mb):
            rows = slice(start, min(start + per_mb, B))
            finite = self.losses.backward(
                self.model,
                batch,
                rows,
                advantages,
                ref_logp,
                call_map,
                call_delta,
                sums,
                nan=rl_step in self.cfg.debug.nan_loss_steps,
            )
            norm, ok = self._clip_and_step(self.optimizer, finite)
            norms.append(norm)
            skipped += int(not ok)
        sums["upd_loss"] /= max(len(norms), 1)  # mean over the mini-batch updates
        return sums, max(norms, default=0.0), float(skipped)

    def _step_metrics(
        self,
        episodes: Sequence[Episode],
        batch: Batch,
        upd: dict[str, float],
        grad_norm: float,
        skipped: float,
        credit: Credit,
        truth: dict[str, float],
        t_rollout: float,
        step_time: float,
    ) -> dict[str, Any]:
        calls = [c for ep in episodes for c in ep.calls]
        s = loss.reduce_metrics(
            {
                "n": len(episodes),
                "reward": sum(ep.reward for ep in episodes),
                "em": sum(ep.em for ep in episodes),
                "f1": sum(ep.f1 for ep in episodes),
                "used": sum(bool(ep.calls) for ep in episodes),
                "calls": len(calls),
                "invalid": sum(not c.valid for c in calls),
                "answered": sum(ep.answer is not None for ep in episodes),
                "policy_tokens": sum(ep.num_policy_tokens for ep in episodes),
                "all_tokens": float(batch.attention_mask.sum()),
                "turns": sum(ep.turns for ep in episodes),
                **upd,
                **{k: credit.counts.get(k, 0.0) for k in TAPO_COUNTS},
                **truth,
            },
            self.ctx,
        )
        n = s["n"]
        t_encode, t_correct = credit.seconds.get("encode", 0.0), credit.seconds.get("correct", 0.0)
        return {
            "train/reward": s["reward"] / n,
            "train/accuracy": s["em"] / n,
            "train/f1": s["f1"] / n,
            "train/tool_call_rate": s["used"] / n,
            "train/calls_per_episode": s["calls"] / n,
            "train/invalid_call_rate": s["invalid"] / max(s["calls"], 1.0),
            "train/answer_rate": s["answered"] / n,
            "train/turns": s["turns"] / n,
            "train/response_tokens": s["policy_tokens"] / n,
            **loss.actor_metrics(s, self.ctx.world),
            "actor/grad_norm": grad_norm,
            "actor/skipped_steps": skipped,
            "actor/lr": self.optimizer.param_groups[0]["lr"],
            **loss.tapo_metrics(s),
            **truth_rates(s, lifts=self.cfg.tapo.enabled),
            "perf/step_time_s": step_time,
            "perf/rollout_time_s": t_rollout,
            "perf/rollout_tokens_per_s": s["policy_tokens"] / max(t_rollout, 1e-9),
            "perf/tokens_per_s": s["all_tokens"] / max(step_time, 1e-9),
            "perf/tapo_encode_s": t_encode,
            "perf/fused_correct_s": t_correct,
            "perf/fused_correct_share": t_correct / max(step_time, 1e-9),
            "perf/tapo_share": (t_encode + t_correct) / max(step_time, 1e-9),
        }

    # ------------------------------------------------------------------ run

    def _progress(self, total: int, desc: str):
        if not (self.ctx.is_main and self.cfg.logging.progress) or total == 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stdout)

    def _evaluate(self, tag: str) -> dict[str, float]:
        cfg = self.cfg
        heldout = self.task.heldout[: cfg.eval.num_questions or None]
        t0 = time.perf_counter()
        result = evaluate(
            self.engine,
            heldout,
            self.ctx,
            k=cfg.eval.k,
            temperature=cfg.eval.temperature,
            seed=step_seed("eval", cfg.seed, tag),
        )
        result["eval/time_s"] = time.perf_counter() - t0
        self.state["evals"][tag] = result
        self.logger.log(self.state["global_step"], {"phase": "eval", "eval/tag": tag, **result})
        pass_k = f"pass@{cfg.eval.k} {result['eval/pass@k']:.3f}  " if cfg.eval.k else ""
        rank_print(
            self.ctx,
            f"[eval {tag}] held-out pass@1 {result['eval/pass@1']:.3f}  {pass_k}"
            f"tool-call rate {result['eval/tool_call_rate']:.2f}  "
            f"({int(result['eval/questions'])} questions, {result['eval/time_s']:.1f} s)",
        )
        return result

    def _save(self) -> None:
        save_checkpoint(
            self.run_path,
            self.state["global_step"],
            self.model,
            self.optimizer,
            self.state,
            self.ctx,
            keep=self.cfg.checkpoint.keep,
            ref_model=self.ref_model,
            config_sha256=hashlib.sha256(self.config_text.encode()).hexdigest(),
            before_commit=self._kill
            if self.cfg.debug.kill_in_save_step == self.state["global_step"]
            else None,
        )

    def fit(self) -> dict[str, Any]:
        cfg, ctx, state = self.cfg, self.ctx, self.state
        rank_print(
            ctx,
            f"run {self.run_path}: {self.task.summary()}; model "
            f"{self.num_params / 1e6:.2f}M parameters, vocabulary {len(self.tokenizer)}; "
            f"{ctx.world} process(es) on {ctx.device.type}"
            f"{' with FSDP2' if ctx.fsdp else ''}; loss {cfg.algo.loss}, TAPO "
            f"{'on' if cfg.tapo.enabled else 'off'}",
        )
        if state["phase"] == "start":
            if cfg.eval.at_start:
                self._evaluate("initial")
            if cfg.warmup.steps and self.task.demos:
                self.warmup()
                self._evaluate("after_warmup")
            if self.ref_model is not None:
                copy_full_weights(self.model, self.ref_model)  # KL anchors to the warm-up policy
            state["phase"] = "rl"
            self._save()
        warm = state["global_step"] - state["rl_step"]
        bar = self._progress(cfg.rl.steps, "RL")
        if bar is not None:
            bar.update(min(state["rl_step"], cfg.rl.steps))
        while state["rl_step"] < cfg.rl.steps:
            rl_step = state["rl_step"] + 1
            metrics = self.rl_step(rl_step)
            state["rl_step"], state["global_step"] = rl_step, warm + rl_step
            self.logger.log(state["global_step"], {"phase": "rl", "rl_step": rl_step, **metrics})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    acc=f"{metrics['train/accuracy']:.2f}",
                    tools=f"{metrics['train/tool_call_rate']:.2f}",
                    tapo=f"{metrics['tapo/call_correction_rate']:.2f}",
                )
            if cfg.eval.every and rl_step % cfg.eval.every == 0 and rl_step < cfg.rl.steps:
                self._evaluate(f"rl_step_{rl_step}")
            if (
                cfg.checkpoint.every
                and rl_step % cfg.checkpoint.every == 0
                and rl_step < cfg.rl.steps
            ):
                self._save()
        if bar is not None:
            bar.close()
        if "final" not in state["evals"] or state.get("final_step") != state["rl_step"]:
            self._evaluate("final")
            state["final_step"] = state["rl_step"]
            self._save()
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        evals = self.state["evals"]
        summary = {
            "run": str(self.run_path),
            "rl_steps": self.state["rl_step"],
            "wall_time_s": time.perf_counter() - self.t_begin,
            "heldout_pass@1": {k: v["eval/pass@1"] for k, v in evals.items()},
            "heldout_pass@k": {k: v["eval/pass@k"] for k, v in evals.items()},
        }
        if self.ctx.is_main:
            plots = make_plots(self.run_path) if self.cfg.logging.plots else []
            summary["plots"] = [str(p) for p in plots]
            write_atomic(self.run_path / "summary.json", json.dumps(summary, indent=1))
            before = evals.get("after_warmup", evals.get("initial"))
            after = evals.get("final")
            print(
                "\nheld-out accuracy (greedy pass@1): "
                + " | ".join(
                    f"{k} {v['eval/pass@1']:.3f}"
                    for k, v in evals.items()
                    if k in ("initial", "after_warmup", "final")
                )
            )
            if before and after:
                print(
                    f"RL changed held-out accuracy by {after['eval/pass@1'] - before['eval/pass@1']:+.3f} "
                    f"({before['eval/pass@1']:.3f} before RL -> {after['eval/pass@1']:.3f} after)"
                )
            print(
                f"metrics: {self.run_path / 'metrics.jsonl'}   plots: {self.run_path / 'plots'}   "
                f"wall time {summary['wall_time_s']:.0f} s",
                flush=True,
            )
        self.logger.close()
        return summary


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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's latest checkpoint (otherwise the run "
        "directory is started afresh)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def run(cfg: Config, resume: bool = False) -> dict[str, Any]:
    """Train with a resolved config; returns the summary (held-out accuracies, wall time)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        trainer.registry.close()
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
        run(cfg, resume=args.resume)
    except (ConfigError, CheckpointError, TaskFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
