"""PPO with a critic for language models (Ziegler et al. 2019; InstructGPT's RL step).

One training *step* is:

1. ``rollout()``: take this process's share of a batch of prompts, sample responses with
   the policy (KV-cached ``generate`` at ``temperature``, no top-k/top-p), cut them at the
   first EOS / stop string, and compute under no-grad: the policy's log-probs (the "old"
   policy), the reference's log-probs, the critic's values and the reward (reward model,
   reward functions, or a weighted sum), all at the same temperature. The per-token reward
   is ``-kl_coef * KL`` plus the score on the last real token; GAE gives advantages and
   returns; advantages are whitened with statistics from every process.
2. ``ppo_update()``: ``num_ppo_epochs`` passes over the rollout batch, each shuffled into
   ``num_mini_batches`` minibatches of ``gradient_accumulation_steps`` micro-batches;
   every minibatch is exactly one optimizer step on the clipped policy loss plus
   ``vf_coef`` x the clipped value loss, gradients clipped per network.
3. KL controller update, scheduler step, logging (``log_history.jsonl``), sample tables
   (``samples.md``) and checkpoints (``checkpoints/checkpoint-N``).

The math lives in :mod:`align.ppo.core`; sampling and rewards in :mod:`align.ppo.rollout`;
the networks in :mod:`align.ppo.roles` (built by :mod:`align.ppo.layouts`). Runs under
``accelerate launch``: policy + critic are one DDP module, rollouts use the unwrapped module,
metrics are averaged over processes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from align import distributed, render, rundir
from align.divergence import diverged, nonfinite_value, nonfinite_weight
from align.errors import AlignError
from align.markdown import table
from align.ppo import core
from align.ppo.config import PPOConfig
from align.ppo.engine import make_engine
from align.ppo.roles import Roles
from align.ppo.rollout import Rewards, Rollout, Sampler, chunks, position_ids_from
from align.rundir import CHECKPOINTS, LOG_HISTORY, complete_checkpoints

SAMPLES_FILE = "samples.md"


def make_accelerator(config: PPOConfig, output_dir):
    """An Accelerator over every launched process, with the config's mixed precision and trackers.

    On a machine without CUDA the process state is rebuilt over gloo when it spans fewer
    processes than were launched (align.distributed). The AcceleratorState an earlier stage
    left is reset, as TrainingArguments do: its mixed precision would be kept, or a different
    one refused.
    """
    from accelerate import Accelerator
    from accelerate.tracking import TensorBoardTracker
    from accelerate.utils import GradientAccumulationPlugin
    from transformers.integrations.integration_utils import default_logdir

    distributed.reset_process_state()
    cpu = not torch.cuda.is_available() and not distributed.deepspeed_on_cpu()  # cpu=True turns DeepSpeed off
    # TensorBoard goes where transformers puts it for the other stages, whose output_dir is the
    # checkpoint folder: checkpoints/runs/<date>_<host>. accelerate would name the folder after
    # the project, which trackio and wandb need as their project.
    checkpoints = Path(output_dir) / CHECKPOINTS
    trackers = [TensorBoardTracker(default_logdir(), checkpoints) if name == "tensorboard" else name
                for name in config.trackers()]
    # PPO accumulates micro-batches itself (align.ppo.engine); only DeepSpeed's engine is told how many.
    accumulation = GradientAccumulationPlugin(
        num_steps=config.gradient_accumulation_steps if distributed.engine() == "deepspeed" else 1,
        sync_with_dataloader=False)
    return Accelerator(cpu=cpu, mixed_precision=config.mixed_precision, log_with=trackers, project_dir=checkpoints,
                       gradient_accumulation_plugin=accumulation)


class PPOTrainer:
    """PPO trainer: ``train()`` runs rollouts and updates until the step budget is spent.

    Args:
        config: the PPOConfig.
        roles: policy / reference / critic / reward, from ``align.ppo.layouts.load_roles``.
        tokenizer: the policy's tokenizer (with a pad token and, for chat prompts, a
            chat template).
        train_dataset: rows with a ``prompt`` column: text, or a list of chat messages.
        reward_funcs: ``{name: f}`` with TRL's signature ``f(prompts, completions, **kw)
            -> list[float]``; combined with the reward model by ``config.reward_weights``.
        output_dir: where logs, samples and checkpoints go.
        accelerator: an ``accelerate.Accelerator`` (one is made when omitted).
        log: called with progress lines on the main process.
        callbacks: objects with ``on_train_begin(trainer) -> record | None`` and
            ``on_step_end(trainer, batch, record)``, which may add keys to the step's record
            (``align.heldout.PPOHeldOut``: compute so far, held-out metrics).
    """

    def __init__(self, config: PPOConfig, roles: Roles, tokenizer, train_dataset, *, output_dir,
                 reward_funcs: dict | None = None, accelerator=None, log=print, seed: int = 42, callbacks=()):
        from transformers import get_scheduler, set_seed

        self.config = config
        self.roles = roles
        self.tokenizer = tokenizer
        self.dataset = train_dataset
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator or make_accelerator(config, self.output_dir)
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self._log = log
        self.bar = None  # the progress bar while train() runs (main process)
        self.seed = config.seed if config.seed is not None else seed

        # Step budget: one step = one global rollout batch.
        self.global_batch = config.per_device_train_batch_size * self.world_size
        if config.num_train_steps:
            self.total_steps = config.num_train_steps
        elif config.total_episodes:
            self.total_steps = math.ceil(config.total_episodes / self.global_batch)
        else:
            self.total_steps = max(1, math.ceil(config.num_train_epochs * len(train_dataset) / self.global_batch))

        # One optimizer, two parameter groups (policy, critic); scheduler stepped per rollout batch.
        # The scheduler is not `prepare`d: accelerate would step it once per process.
        actor_critic = roles.actor_critic
        actor_critic.train()  # dropout is already off; train mode only matters for checkpointing
        self.policy_params, self.critic_params = actor_critic.param_groups()
        if not self.policy_params or not self.critic_params:
            raise AlignError("model: nothing to train (no trainable policy or critic parameters)")
        groups = [{"params": self.policy_params, "lr": config.learning_rate},
                  {"params": self.critic_params, "lr": config.critic_learning_rate or config.learning_rate}]
        optimizer = torch.optim.AdamW(groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                      weight_decay=config.weight_decay)
        self.optimizer_steps = 0  # counts optimizer steps really applied (an fp16 overflow skips one)
        self.scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                                       num_training_steps=self.total_steps)
        # The engine (one process / DDP / DeepSpeed) wraps the pair and drives backward, clipping,
        # steps, generation under sharding and the checkpoint's weights (align.ppo.engine).
        self.engine = make_engine(self.accelerator, config)
        self.model, self.optimizer = self.engine.prepare(actor_critic, optimizer, self.policy_params,
                                                         self.critic_params)
        if not self.accelerator.sync_gradients:  # left over from an earlier stage's accumulation
            self.accelerator.gradient_state._set_sync_gradients(True)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        roles.to(self.accelerator.device)
        roles.ref_model, roles.reward_model = (m if m is None else self.engine.prepare_frozen(m)
                                               for m in (roles.ref_model, roles.reward_model))
        self.device = self.accelerator.device

        self.kl_ctl = (core.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
                       if config.adaptive_kl else core.FixedKLController(config.kl_coef))

        # Rollout helpers: sampling with stop rules, and the reward of each response.
        self.sampler = Sampler(config, tokenizer, self.unwrapped, self.device)
        self.rewards = Rewards(config, roles, tokenizer, reward_funcs or {}, self.accelerator)

        # Model initialisation (identical on every process) is done; sampling noise now differs
        # per process. A resumed run restores these generators from its checkpoint.
        set_seed(self.seed + self.rank)
        self.step = 0
        self.resumed_from_step = 0
        self.minibatch_stats: list[dict] = []  # per-minibatch stats of the latest update
        self._perms: dict[int, torch.Tensor] = {}
        self.checkpoint_dir = self.output_dir / CHECKPOINTS
        self.callbacks = list(callbacks)

    # ------------------------------------------------------------------ small utilities

    def log(self, message: str):
        if not self.is_main or self._log is None:
            return
        if self.bar is None:
            self._log(message)
        else:
            with self.bar.external_write_mode():  # clear the bar, print, redraw it below
                self._log(message)

    def _sum_all(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum") if self.world_size > 1 else t

    def _mean_over_processes(self, stats: dict[str, float | torch.Tensor]) -> dict[str, float]:
        keys = sorted(stats)
        values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        return {k: v for k, v in zip(keys, values.tolist())}

    # ------------------------------------------------------------------ data

    def prompts_for_step(self, step: int) -> list:
        """This process's prompts for `step`: a fixed function of (seed, step, rank), so a
        resumed run continues with exactly the prompts it would have seen."""
        n = len(self.dataset)
        first = step * self.global_batch + self.rank * self.config.per_device_train_batch_size
        rows = []
        for g in range(first, first + self.config.per_device_train_batch_size):
            epoch, pos = divmod(g, n)
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))}
            rows.append(self.dataset[int(self._perms[epoch][pos])]["prompt"])
        return rows

    # ------------------------------------------------------------------ rollout

    @torch.no_grad()
    def rollout(self, prompts: list) -> Rollout:
        cfg = self.config
        query, query_mask = self.sampler.encode(prompts)
        with self.engine.generation():
            raw = self.sampler.generate(query, query_mask)
        mask, has_stop = self.sampler.stop_mask(raw)
        response = core.truncate_after_stop(raw, mask, self.tokenizer.pad_token_id)
        input_ids = torch.cat([query, response], dim=1)
        attention_mask = torch.cat([query_mask, mask.long()], dim=1)
        position_ids = position_ids_from(attention_mask)
        T = response.shape[1]

        completions = [render.completion_text(self.tokenizer, row[m]) for row, m in zip(response, mask)]
        raw_scores, per_source = self.rewards(prompts, completions, response, mask, has_stop)

        # With one minibatch of one micro-batch, the update's first forward pass would see this
        # whole batch under these very weights: run it here with gradients and let the update
        # reuse it (one policy + critic pass saved per step; ratio 1 by construction). It runs
        # after the reward and reference passes, so its graph never coexists with them.
        slices = chunks(len(prompts), cfg.rollout_forward_batch_size)
        reuse = cfg.num_mini_batches == 1 and cfg.gradient_accumulation_steps == 1 and len(slices) == 1
        first_pass = None
        logprobs, ref_logprobs, values, entropy = [], [], [], []
        for s in slices:
            args = (input_ids[s], attention_mask[s], position_ids[s], T)
            with self.accelerator.autocast():
                ref_logits = self.roles.ref_logits(*args)
            ref_logprobs.append(core.logprobs_from_logits(ref_logits, response[s], cfg.temperature))
            del ref_logits
            with self.accelerator.autocast(), torch.set_grad_enabled(reuse):  # the wrapped (DDP) model trains
                logits, v = (self.model if reuse else self.unwrapped)(*args)
                lp = core.logprobs_from_logits(logits, response[s], cfg.temperature)
            if reuse:
                first_pass = (lp, v)
                logits, v, lp = logits.detach(), v.detach(), lp.detach()
            logprobs.append(lp)
            entropy.append(torch.cat([core.entropy_from_logits(row.unsqueeze(0).float() / cfg.temperature)
                                      for row in logits]))
            values.append(v)
            del logits
        logprobs, ref_logprobs = torch.cat(logprobs), torch.cat(ref_logprobs)
        values, entropy = torch.cat(values), torch.cat(entropy)

        scores = core.apply_missing_stop_penalty(raw_scores, has_stop, cfg.missing_eos_penalty)
        rewards, kl = core.token_rewards(scores, logprobs, ref_logprobs, mask, self.kl_ctl.value, cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = core.masked_whiten(rewards, mask, shift_mean=False, all_reduce=self._sum_all)
        advantages, returns = core.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask, all_reduce=self._sum_all)
        return Rollout(prompts=prompts, completions=completions, input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids, response=response, mask=mask, has_stop=has_stop,
                       logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores,
                       raw_scores=raw_scores, source_scores=per_source, rewards=rewards, kl=kl,
                       advantages=advantages, returns=returns, entropy=entropy, first_pass=first_pass)

    # ------------------------------------------------------------------ PPO update

    def ppo_update(self, batch: Rollout) -> dict[str, float]:
        """num_ppo_epochs x num_mini_batches optimizer steps on one rollout batch."""
        cfg = self.config
        B, T = batch.response.shape
        mb = B // cfg.num_mini_batches
        micro = mb // cfg.gradient_accumulation_steps
        self.minibatch_stats = []
        steps_before = self.optimizer_steps
        first_pass, batch.first_pass = batch.first_pass, None
        grad_norms = []
        for epoch in range(cfg.num_ppo_epochs):
            order = torch.randperm(B).to(self.device)
            for m in range(cfg.num_mini_batches):
                rows = order[m * mb:(m + 1) * mb]
                totals: dict[str, float] = {}
                for k in range(cfg.gradient_accumulation_steps):
                    idx = rows[k * micro:(k + 1) * micro]
                    last = k == cfg.gradient_accumulation_steps - 1
                    with self.engine.accumulating(last):
                        loss, stats = self._micro_batch_loss(batch, idx, T, first_pass)
                        first_pass = None
                        self.engine.backward(loss, last)
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + value / cfg.gradient_accumulation_steps
                grad_norms.append(self.engine.clip())
                self.optimizer_steps += int(self.engine.step())
                self.minibatch_stats.append({"epoch": epoch, "minibatch": m, **totals})

        def mean(key):
            return sum(s[key] for s in self.minibatch_stats) / len(self.minibatch_stats)

        first = self.minibatch_stats[0]
        return {
            "policy_loss": mean("policy_loss"), "value_loss": mean("value_loss"), "clipfrac": mean("clipfrac"),
            "value_clipfrac": mean("vf_clipfrac"), "approx_kl": mean("approx_kl"), "ratio": mean("ratio_mean"),
            "first_minibatch_ratio": first["ratio_mean"], "first_minibatch_approx_kl": first["approx_kl"],
            "last_minibatch_approx_kl": self.minibatch_stats[-1]["approx_kl"],
            "grad_norm_policy": sum(g[0] for g in grad_norms) / len(grad_norms),
            "grad_norm_critic": sum(g[1] for g in grad_norms) / len(grad_norms),
            "optimizer_steps": self.optimizer_steps - steps_before,
        }

    def _micro_batch_loss(self, batch: Rollout, idx: torch.Tensor, T: int, first_pass=None):
        cfg = self.config
        if first_pass is not None:  # the rollout's own forward pass over the whole batch
            logprobs, values = first_pass[0][idx], first_pass[1][idx]
        else:
            logits, values = self.model(batch.input_ids[idx], batch.attention_mask[idx], batch.position_ids[idx], T)
            logprobs = core.logprobs_from_logits(logits, batch.response[idx], cfg.temperature)
            del logits
        mask = batch.mask[idx]
        pg_loss, pg_stats = core.policy_loss(logprobs, batch.logprobs[idx], batch.advantages[idx], mask, cfg.cliprange)
        vf_loss, vf_stats = core.value_loss(values, batch.values[idx], batch.returns[idx], mask, cfg.cliprange_value)
        loss = pg_loss + cfg.vf_coef * vf_loss
        stats = {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
                 **{k: v.item() for k, v in {**pg_stats, **vf_stats}.items()}}
        return loss, stats

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        start = time.time()
        self.resume()
        cfg = self.config
        self.log(f"[ppo] {self.total_steps} steps x {self.global_batch} prompts ({self.world_size} process"
                 f"{'es' if self.world_size > 1 else ''}), {cfg.num_ppo_epochs} epochs x {cfg.num_mini_batches} "
                 f"minibatches per step" + (f"; resuming at step {self.step}" if self.step else ""))
        self._start_reporting()
        try:
            for callback in self.callbacks:  # a record before the first step (the held-out start point)
                if (first := callback.on_train_begin(self)) is not None:
                    self._write_log(first)
                    self.accelerator.log(_tracker_names(first), step=first["step"])
            while self.step < self.total_steps:
                t0 = time.time()
                batch = self.rollout(self.prompts_for_step(self.step))
                update = self.ppo_update(batch)
                stats = self.batch_stats(batch)
                self.kl_ctl.update(stats["kl"], self.global_batch)
                self.scheduler.step()
                self.step += 1
                record = {"step": self.step, "episodes": self.step * self.global_batch, **stats,
                          **self._mean_over_processes(update), "kl_coef_next": self.kl_ctl.value,
                          "lr": self.scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 3)}
                self._check_finite(record)
                for callback in self.callbacks:
                    callback.on_step_end(self, batch, record)
                self._write_log(record)
                self._report(record)
                if cfg.sample_generations_every and self.step % cfg.sample_generations_every == 0:
                    self._write_samples(batch)
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            self._stop_reporting()
        self._check_weights()  # before the stage saves the policy
        return self.summary(time.time() - start)

    def _check_finite(self, record: dict):
        """Stop at the first step whose losses, gradient norms or rewards are not finite (the
        record is averaged over processes, so every process stops together)."""
        bad = nonfinite_value({k: record.get(k) for k in ("policy_loss", "value_loss", "grad_norm_policy",
                                                           "grad_norm_critic", "reward", "kl")})
        if bad:
            raise diverged(self.step, bad, self.checkpoints())

    def _check_weights(self):
        bad = nonfinite_weight(self.unwrapped.named_parameters())
        if bad:
            raise diverged(self.step, f"weight {bad} is not finite", self.checkpoints())

    def batch_stats(self, batch: Rollout) -> dict[str, float]:
        """Rollout statistics, averaged over every process."""
        mask = batch.mask
        kl_sum = batch.kl.sum(1)
        non_score = (-self.kl_ctl.value * batch.kl).sum(1)
        local = {
            "kl": kl_sum.mean(), "kl_coef": self.kl_ctl.value, "non_score_reward": non_score.mean(),
            "rlhf_reward": (batch.scores + non_score).mean(), "score": batch.scores.mean(),
            "entropy": core.masked_mean(batch.entropy, mask), "response_length": mask.sum(1).float().mean(),
            "eos_rate": batch.has_stop.float().mean(), "value_mean": core.masked_mean(batch.values, mask),
            "returns_mean": core.masked_mean(batch.returns, mask),
            **{f"reward/{k}": v.mean() for k, v in batch.source_scores.items() if len(batch.source_scores) > 1},
        }
        stats = self._mean_over_processes(local)
        everyone = self.accelerator.gather(batch.raw_scores) if self.world_size > 1 else batch.raw_scores
        stats["reward"] = float(everyone.mean())
        stats["reward_std"] = float(everyone.std()) if everyone.numel() > 1 else 0.0
        return stats

    def summary(self, runtime: float) -> dict:
        history = [r for r in self.read_log() if "reward" in r]  # step records (not the held-out start point)
        if not history:
            return {"global_step": self.step, "resumed_from_step": self.resumed_from_step}
        window = history[-min(len(history), max(1, min(10, len(history) // 4))):]
        return {
            "reward_first": history[0]["reward"],
            "reward_last": history[-1]["reward"],
            "reward_mean": sum(r["reward"] for r in window) / len(window),
            "kl_mean": sum(r["kl"] for r in window) / len(window),
            "kl_coef": self.kl_ctl.value,
            "response_length": history[-1]["response_length"],
            "eos_rate": history[-1]["eos_rate"],
            "global_step": self.step,
            "episodes": self.step * self.global_batch,
            "optimizer_steps": self.optimizer_steps,
            "resumed_from_step": self.resumed_from_step,
            "world_size": self.world_size,
            "train_runtime": round(runtime, 2),
        }

    # ------------------------------------------------------------------ logs, trackers and samples

    def _start_reporting(self):
        """Trackers (`report_to`) and the progress bar, on the main process only: accelerate
        would start a trackio or wandb run on every process that asks."""
        if not self.is_main:
            return
        if self.accelerator.log_with:
            run_name = {"name": self.config.run_name}  # accelerate passes the project as trackio's and wandb's
            self.accelerator.init_trackers(self.config.project, config=_hparams(self.config),
                                           init_kwargs={"trackio": run_name, "wandb": run_name}
                                           if self.config.run_name else None)
        if not self.config.disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.step, desc="ppo", unit="step", dynamic_ncols=True)

    def _report(self, record: dict):
        """A step's record to the trackers, under the names transformers gives the other stages'
        metrics (`train/<key>`); the progress bar; a printed line every logging_steps steps."""
        self.accelerator.log(_tracker_names(record), step=self.step)
        if self.bar is not None:
            self.bar.set_postfix({"reward": f"{record['reward']:.4f}", "kl": f"{record['kl']:.4f}"}, refresh=False)
            self.bar.update()
        if self.step % self.config.logging_steps == 0 or self.step == self.total_steps:
            self.log(f"[ppo] step {self.step}/{self.total_steps}  reward {record['reward']:.4f}  "
                     f"kl {record['kl']:.4f}  entropy {record['entropy']:.3f}  "
                     f"pg {record['policy_loss']:.4f}  vf {record['value_loss']:.4f}  "
                     f"clipfrac {record['clipfrac']:.3f}  len {record['response_length']:.1f}  "
                     f"eos {record['eos_rate']:.2f}")

    def _stop_reporting(self):
        """Close the bar, then the trackers (which may print). Not accelerator.end_training():
        it also destroys the process group, which the final save and later stages still use."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()

    def _write_log(self, record: dict):
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / LOG_HISTORY, "a") as f:
                f.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        path = self.output_dir / LOG_HISTORY
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _write_samples(self, batch: Rollout):
        if not self.is_main:
            return

        n = min(self.config.num_sample_generations, len(batch.prompts))
        lines = [f"## step {self.step}", "", *table(["prompt", "response", "reward"], [
            [batch.prompts[i], batch.completions[i], f"{batch.scores[i].item():.4f}"] for i in range(n)])]
        text = "\n".join(lines) + "\n\n"
        with open(self.output_dir / SAMPLES_FILE, "a") as f:
            f.write(text)
        self.log(text.rstrip())

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self):
        """checkpoint-N: trainable weights (safetensors), optimizer, scheduler, KL controller, RNG
        states of every process, counters. Only finite weights are saved. Written into a temp
        folder and renamed (atomic); the newest `save_total_limit` are kept. The `.pt` files hold
        tensors and plain values only and are read back with `weights_only=True`."""
        self._check_weights()
        final = self.checkpoint_dir / f"checkpoint-{self.step}"
        tmp = self.checkpoint_dir / f"checkpoint-{self.step}.tmp"
        if self.is_main:
            rundir.remove(tmp, self.output_dir)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.engine.save_state(tmp, self.unwrapped, self.is_main)  # trainable weights + optimizer
        if self.is_main:
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / f"rng_state_{self.rank}.pth")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {"step": self.step, "optimizer_steps": self.optimizer_steps, "kl_controller": self.kl_ctl.state_dict(),
                     "world_size": self.world_size, "total_steps": self.total_steps}
            rundir.write_file_list(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            rundir.remove(final, self.output_dir)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-self.config.save_total_limit]:
                rundir.remove(old, self.output_dir, ignore_errors=True)
            self.log(f"[ppo] saved {final.name}")
        self.accelerator.wait_for_everyone()

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return complete_checkpoints(self.checkpoint_dir)

    def resume(self):
        """Continue from the newest checkpoint, if any."""
        found = self.checkpoints()
        if not found:
            if self.is_main:
                rundir.remove(self.output_dir / LOG_HISTORY, self.output_dir)
                rundir.remove(self.output_dir / SAMPLES_FILE, self.output_dir)
            self.accelerator.wait_for_everyone()
            return
        path = found[-1]
        state = json.loads((path / "trainer_state.json").read_text())
        self.engine.load_state(path, self.unwrapped)
        self.scheduler.load_state_dict(_load_plain(path / "scheduler.pt"))
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.step = self.resumed_from_step = int(state["step"])
        self.optimizer_steps = int(state["optimizer_steps"])
        rng = path / f"rng_state_{self.rank}.pth"
        if rng.exists():
            _set_rng_state(_load_plain(rng))
        if self.is_main:  # drop log lines and sample tables of steps the checkpoint does not contain
            kept = [r for r in self.read_log() if r["step"] <= self.step]
            (self.output_dir / LOG_HISTORY).write_text("".join(json.dumps(r) + "\n" for r in kept))
            samples = self.output_dir / SAMPLES_FILE
            if samples.exists():
                tables = re.split(r"(?m)^(?=## step \d+$)", samples.read_text())
                samples.write_text("".join(t for t in tables if t and int(t.split()[2]) <= self.step))
        self.accelerator.wait_for_everyone()
        self.log(f"[ppo] resumed from {path.name}")

    # ------------------------------------------------------------------ outputs

    def save(self, directory: Path, tokenizer=None):
        """The policy (adapter or full model) + tokenizer into `directory`, so it loads like an
        SFT output; the critic into `directory/critic`."""
        self.accelerator.wait_for_everyone()
        directory = Path(directory)
        with self.engine.full_weights(self.unwrapped.parameters()):  # gathered where sharded (ZeRO-3)
            self.roles.save_policy(directory, self.is_main)
            self.roles.save_critic(directory / "critic", self.is_main)
        if self.is_main:
            (tokenizer or self.tokenizer).save_pretrained(str(directory))
            (tokenizer or self.tokenizer).save_pretrained(str(directory / "critic"))
        self.accelerator.wait_for_everyone()


def _tracker_names(record: dict) -> dict:
    """A record under the names transformers gives trackers: eval_<key> as eval/<key>, the rest
    as train/<key>."""
    return {f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}": v for k, v in record.items() if k != "step"}


def _hparams(config: PPOConfig) -> dict:
    """The config as tracker hyperparameters: TensorBoard takes only scalars and strings."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in dataclasses.asdict(config).items()}


def _load_plain(path: Path):
    """A `.pt` file of tensors and plain values, unpickled with `weights_only=True`: a planted
    file that would run code is refused, never executed."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise AlignError(f"{path}: refused to load: it is not plain tensor data ({str(e).splitlines()[0]}); "
                         f"delete that checkpoint folder to resume from an earlier one") from None


def _rng_state() -> dict:
    """Every generator's state as tensors and plain values (numpy's key array as a tensor), so
    it loads with `weights_only=True`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    python = state["python"]  # a tuple when saved; weights_only loading keeps tuples
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
