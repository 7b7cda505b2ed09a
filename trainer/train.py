"""The training loop: warm-up, then rollout -> reward -> advantage -> TAPO -> loss -> step.

Launch::

    python -m trainer.train --config trainer/configs/tiny_grpo_tapo.yaml        # one process
    torchrun --nproc_per_node 2 -m trainer.train --config trainer/configs/tiny_grpo_tapo.yaml
    python -m trainer.train --config ... --resume rl.steps=60                    # continue a run
    python -m trainer.train --config ... --export             # newest checkpoint -> hf_model/

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

With ``checkpoint.export_hf`` the policy is also written as a Hugging Face directory
(``runs/<name>/hf_model``, ``trainer/export.py``) after the final checkpoint.

Every random draw of step ``s`` is seeded from ``(seed, s, rank)``, so a run killed and
resumed from a checkpoint reproduces the metrics of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

import tapo_kernels
from tapo_kernels.reference import group_advantages

from . import axpo, loss
from .checkpoint import (
    find_resume_point,
    load_checkpoint,
    prepare_run_dir,
    save_checkpoint,
    write_atomic,
)
from .config import Config
from .credit import correct_credit, neural_encoder, truth_counts
from .distributed import (
    DistContext,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    cleanup,
    copy_full_weights,
    frozen_dtype,
    full_state_items,
    init_distributed,
    shard_model,
)
from .evaluate import describe, evaluate
from .export import export_hf, image_processor_of
from .metrics import (
    MetricsLogger,
    WandbOptions,
    make_plots,
    print_summary,
    progress_bar,
    run_summary,
    step_metrics,
)
from .modeling import DTYPES, build_policy, count_parameters, frozen_copy, tokenizer_texts
from .rollout import Batch, RolloutEngine, collate, demonstration
from .scoring import Scorer, step_extras
from .tasks import TaskData, draw_prompts, load_task
from .tools import registry_from_config
from .vision import ImageCodec, is_vision_model, load_image_processor, scene_images
from .warmup import supervised_warmup


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
            self.close()
            cleanup(self.ctx)  # no process group is left behind by a run that cannot start
            raise

    def _setup(self, resume: bool) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.run_path = cfg.run_path
        self.t_begin = time.perf_counter()
        self.config_text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        self.checkpoint = find_resume_point(self.run_path, ctx) if resume else None
        if ctx.is_main:
            prepare_run_dir(self.run_path, fresh=self.checkpoint is None)
            # the resolved config of this launch (a resume may override keys)
            write_atomic(self.run_path / "config.yaml", self.config_text)
        barrier(ctx)
        self.task: TaskData = load_task(cfg.task)
        self.registry = registry_from_config(
            cfg.tools, self.task.corpora, self.task.scenes, cfg.model.max_pixels
        )
        self.sim_kind = self.registry.sim_kind_tensor(ctx.device)
        self.neural = neural_encoder(cfg.tapo)
        self._build_model()
        self.scorer = Scorer(cfg, self.engine.fmt.decode)
        self.tasks = ["main"] + ([cfg.task.mix_task] if self.task.mix_train else [])
        self.axpo_clip = {"eps_low": cfg.axpo.eps_low, "eps_high": cfg.axpo.eps_high}
        self.state: dict[str, Any] = {"phase": "start", "rl_step": 0, "global_step": 0, "evals": {}}
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
        )
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
            wandb=WandbOptions(
                cfg.logging.wandb_project, cfg.logging.wandb_mode, cfg.logging.name, cfg.to_dict()
            )
            if cfg.logging.wandb
            else None,
        )

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _kill() -> None:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die without any cleanup

    def _build_model(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        model, tokenizer = build_policy(
            cfg.model,
            self.run_path / "tokenizer",
            lambda: tokenizer_texts(self.task, cfg.rollout.prompt_template),
            cfg.seed,
            ctx.is_main,
            lambda: barrier(ctx),
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
        low = frozen_dtype(cfg, ctx)
        self.ref_model = frozen_copy(model, low) if cfg.algo.kl_coef > 0 else None
        if cfg.rollout.engine == "vllm":
            # the engine holds its own copy of the weights: no replica here
            self.engine = self._vllm_engine(model, tokenizer)
            self.rollout_model = None
            self.model = shard_model(model, ctx, cfg.dist.mixed_precision) if ctx.fsdp else model
            self.engine.model = self.model  # its device and train/eval switch
            self.image_pad_id = None
            return
        if ctx.fsdp:
            self.rollout_model = frozen_copy(model, low)
            self.model = shard_model(model, ctx, cfg.dist.mixed_precision)
        else:
            self.rollout_model = model
            self.model = model
        images, question_images = None, None
        if is_vision_model(model):
            source = cfg.model.path or self.run_path / "tokenizer"
            images = ImageCodec(load_image_processor(source, cfg.model.max_pixels), tokenizer)
            if self.task.scenes is not None:
                question_images = scene_images(self.task.scenes, cfg.model.max_pixels)
        self.image_pad_id = images.pad_id if images is not None else None
        self.engine = RolloutEngine.from_config(
            self.rollout_model, tokenizer, self.registry, cfg, images, question_images
        )

    def _vllm_engine(self, model, tokenizer):
        """The vLLM engine, started from the checkpoint directory, or from the tiny model
        saved once (by the main rank) in the run directory."""
        from .rollout.vllm_engine import VllmEngine

        cfg, ctx = self.cfg, self.ctx
        model_dir = cfg.model.path
        if model_dir is None:
            model_dir = self.run_path / "rollout_model"
            if ctx.is_main:
                model.save_pretrained(model_dir)
                tokenizer.save_pretrained(model_dir)
            barrier(ctx)
        dtype = cfg.rollout.vllm_dtype or cfg.model.dtype
        return VllmEngine.create(model, tokenizer, self.registry, cfg, model_dir, dtype)

    def _sync_rollout_model(self) -> None:
        """The rollout side gets the trainer's current weights: the replica (``hf``), or the
        vLLM engine, fed the parameters gathered one at a time (no file)."""
        if self.rollout_model is None:
            dtype = DTYPES[self.cfg.rollout.vllm_dtype or self.cfg.model.dtype]
            self.engine.sync_weights(full_state_items(self.model, dtype))
        elif self.rollout_model is not self.model:
            copy_full_weights(self.model, self.rollout_model)

    def close(self) -> None:
        """Release the rollout engine (vLLM's process groups go before the trainer's) and
        finish the metrics logger (its TensorBoard and W&B runs)."""
        if hasattr(getattr(self, "engine", None), "close"):
            self.engine.close()
        if hasattr(getattr(self, "logger", None), "close"):
            self.logger.close()

    # ------------------------------------------------------------------ warm-up

    def warmup(self) -> None:
        cfg = self.cfg
        demos = [demonstration(self.engine.fmt, self.registry, ex) for ex in self.task.demos]
        if not demos or cfg.warmup.steps == 0:
            return
        bar = self._progress(cfg.warmup.steps, "warm-up")
        supervised_warmup(
            self.model,
            self.losses,
            demos,
            cfg.warmup,
            self.ctx,
            pad_id=self.tokenizer.pad_token_id,
            grad_clip=cfg.optim.grad_clip,
            seed_of=lambda step: step_seed("warmup", cfg.seed, step),
            logger=self.logger,
            bar=bar,
            image_pad_id=self.image_pad_id,
        )
        self.state["global_step"] = cfg.warmup.steps
        if bar is not None:
            bar.close()
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
        prompts = draw_prompts(self.task, cfg.rl.prompts_per_step, cfg.task.mix_fraction, rng)
        mine = prompts[ctx.rank :: ctx.world]
        G = cfg.rollout.group_size
        examples = [ex for ex in mine for _ in range(G)]
        groups = [j for j in range(len(mine)) for _ in range(G)]
        t0 = time.perf_counter()
        episodes = self.engine.rollout(
            examples, groups, seed=step_seed("rollout", cfg.seed, rl_step, ctx.rank)
        )
        t_rollout = time.perf_counter() - t0
        # 2. rewards (TARL: judged turns), AXPO's resampling, advantages
        self.scorer.reset()
        self.scorer(episodes)
        rollouts = episodes  # the step's own rollouts (train/* metrics), without AXPO's
        axpo_out = None
        if cfg.axpo.enabled:
            seed = step_seed("axpo", cfg.seed, rl_step, ctx.rank)
            axpo_out = axpo.resample(
                self.engine, episodes, cfg.axpo, G, seed, self.scorer, cfg.algo.scale_by_std
            )
            rows = int(all_reduce_max(len(rollouts) + len(axpo_out.continuations), ctx))
            episodes = axpo.pad_rows(rollouts + axpo_out.continuations, rows)
        if cfg.debug.kill_at_step == rl_step:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die mid-step, no cleanup
        batch = collate(episodes, self.tokenizer.pad_token_id, image_pad_id=self.image_pad_id)
        batch = batch.to(ctx.device)
        mismatch = None
        if cfg.rollout.recompute_logp:
            rollout_logp = batch.old_logp
            batch.old_logp = self.losses.frozen_logp(self.model, batch)
            mismatch = rollout_mismatch_sums(batch.old_logp, rollout_logp, batch.mask, cfg)
            if cfg.algo.tis_cap is not None:
                batch.importance_weight = tapo_kernels.truncated_importance_weight(
                    batch.old_logp, rollout_logp, cfg.algo.tis_cap, batch.mask
                )
        ref_logp = (
            None if self.ref_model is None else self.losses.frozen_logp(self.ref_model, batch)
        )
        seq_adv = group_advantages(
            batch.rewards, batch.group_ids, scale_by_std=cfg.algo.scale_by_std
        ).to(ctx.device)  # [B]
        if axpo_out is not None:
            seq_adv = axpo.apply_advantages(seq_adv, axpo_out)
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
        clip_rows = None if axpo_out is None else axpo_out.row_flags(len(episodes), ctx.device)
        sums, grad_norm, skipped = self._update(
            batch,
            credit.advantages,
            ref_logp,
            credit.call_map,
            credit.call_delta,
            rl_step,
            clip_rows,
        )
        self._sync_rollout_model()
        step_time = time.perf_counter() - t_step
        extra, extra_rates = step_extras(
            self.scorer, rollouts, self.tasks, axpo_out, ctx.world, step_time
        )
        metrics = self._rollout_metrics(mismatch)
        return metrics | step_metrics(
            rollouts,
            batch,
            sums,
            credit,
            truth,
            ctx,
            grad_norm=grad_norm,
            skipped=skipped,
            lr=self.optimizer.param_groups[0]["lr"],
            lifts=cfg.tapo.enabled,
            t_rollout=t_rollout,
            step_time=step_time,
            extra_sums=extra,
            extra_rates=extra_rates,
        )

    def _rollout_metrics(self, mismatch: list[float] | None) -> dict[str, float]:
        """``perf/weight_sync_s`` (vLLM engine) and, when old log-probs are recomputed, how
        far the rollout's log-probs are from the trainer's (``rollout/*``, global batch)."""
        out: dict[str, float] = {}
        if self.rollout_model is None:
            out["perf/weight_sync_s"] = float(self.engine.last_sync_s)
        if mismatch is not None:
            abs_sum, k3_sum, tokens, truncated = all_reduce_sum(mismatch[:4], self.ctx).tolist()
            n = max(tokens, 1.0)
            out["rollout/abs_logp_diff"] = abs_sum / n
            out["rollout/kl_k3"] = k3_sum / n
            out["rollout/max_abs_logp_diff"] = all_reduce_max(mismatch[4], self.ctx)
            if self.cfg.algo.tis_cap is not None:
                out["rollout/tis_truncated_frac"] = truncated / n
        return out

    def _update(
        self,
        batch: Batch,
        advantages: Tensor,
        ref_logp: Tensor | None,
        call_map: Tensor | None,
        call_delta: Tensor | None,
        rl_step: int,
        clip_rows: Tensor | None = None,
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
                clip_rows=clip_rows,
                clip=self.axpo_clip,
            )
            norm, ok = loss.clip_and_step(
                self.model, self.optimizer, self.cfg.optim.grad_clip, finite, self.ctx
            )
            norms.append(norm)
            skipped += int(not ok)
        sums["upd_loss"] /= max(len(norms), 1)  # mean over the mini-batch updates
        return sums, max(norms, default=0.0), float(skipped)

    # ------------------------------------------------------------------ run

    def _progress(self, total: int, desc: str):
        return progress_bar(total, desc, self.ctx.is_main and self.cfg.logging.progress)

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
        rank_print(self.ctx, describe(tag, result))
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
        exported = self.export_hf() if cfg.checkpoint.export_hf else None
        return self._finish(exported)

    def export_hf(self) -> Path:
        """Write the current policy as a Hugging Face directory (``<run_dir>/hf_model``,
        ``trainer/export.py``); collective. Returns its path."""
        return export_hf(
            self.run_path,
            self.model,
            self.tokenizer,
            self.ctx,
            DTYPES[self.cfg.model.dtype],
            image_processor_of(self.cfg, self.model),
        )

    def _finish(self, exported: Path | None = None) -> dict[str, Any]:
        evals = self.state["evals"]
        summary = run_summary(
            self.run_path, self.state["rl_step"], evals, time.perf_counter() - self.t_begin
        )
        if exported is not None:
            summary["hf_model"] = str(exported)
        if self.ctx.is_main:
            plots = make_plots(self.run_path) if self.cfg.logging.plots else []
            summary["plots"] = [str(p) for p in plots]
            write_atomic(self.run_path / "summary.json", json.dumps(summary, indent=1))
            print_summary(summary, evals)
            if exported is not None:
                print(f"Hugging Face model: {exported}", flush=True)
        self.logger.close()
        return summary


def rollout_mismatch_sums(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cfg: Config
) -> list[float]:
    """This rank's ``[sum |d|, sum k3, tokens, truncated tokens, max |d|]`` of the
    rollout / trainer log-prob mismatch ``d`` over the mask (``tapo_kernels.rollout_mismatch``)."""
    m = tapo_kernels.rollout_mismatch(old_logp, rollout_logp, mask, cfg.algo.tis_cap)
    n = (mask != 0).sum().to(m["kl_k3"].dtype)
    truncated = m.get("truncated_frac", torch.zeros_like(n))
    sums = [m["abs_logp_diff"] * n, m["kl_k3"] * n, n, truncated * n, m["max_abs_logp_diff"]]
    return torch.stack(sums).tolist()  # one host sync


if __name__ == "__main__":
    from .cli import main

    sys.exit(main())
