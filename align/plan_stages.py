"""The plan of each kind of training stage: TRL trainer stages on data (SFT, reward, DPO), align's
PPO, and TRL's critic-free online RL (RLOO, GRPO). Each fills a stage's row with its settings,
memory per device, FLOPs, steps and seconds, reading the stage's traits (what it produces, what
data it takes) rather than its type name; PPO, align's own trainer, has its own fields.

For seconds, each lists the passes one optimizer step runs (``(count, probe call)`` pairs, priced
by align.estimate.probe on a CPU).
"""

from __future__ import annotations

import math

from align import plan_inputs
from align.estimate import (
    chinchilla_tokens, count_parameters, estimate_memory, estimate_online_memory, estimate_ppo_memory, flops,
    ppo_flops, score_parameters,
)
from align.estimate.compute import gpu_peak_flops
from align.estimate.probe import ModelProbe
from align.plan_inputs import padded_length

#: Sequence length when a stage sets no ``max_length`` and its data cannot be read (TRL's default).
DEFAULT_SEQ_LEN = 1024
#: Prompt tokens assumed for PPO / RLOO when ``max_prompt_length`` is unset and prompts cannot be read.
PPO_PROMPT_LEN = 256


def _adapters(s):
    """peft LoraConfig keywords for the probe model, None for full fine-tuning."""
    if s.method == "full":
        return None
    targets = s.target_modules if isinstance(s.target_modules, str) else list(s.target_modules)
    return {"r": s.r, "lora_alpha": 2 * s.r, "target_modules": targets, "lora_dropout": s.lora_dropout}


def _gradient_checkpointing(planner, stage) -> bool:
    """The stage's field, else align's default: off on a CPU (align.training), else its config
    class's default (TRL's is on)."""
    if "gradient_checkpointing" in stage.args or gpu_peak_flops() is not None:
        return bool(planner.arg(stage, "gradient_checkpointing", False))
    return False


def _label(targets) -> str:
    return targets if isinstance(targets, str) else ",".join(targets)


def _common(row, s, **facts):
    row.update(method=s.method, r=s.r if s.method != "full" else None,
               target_modules=_label(s.target_modules) if s.method != "full" else None,
               gradient_checkpointing=s.gradient_checkpointing, dtype=s.dtype, **facts)


def _reply_lengths(planner, model_path: str) -> list[int] | None:
    """Token lengths of what the model at ``model_path`` learnt to reply, when an earlier stage of
    this recipe trained it on local data (SFT completions, DPO's chosen replies): the lengths its
    generations will have. None otherwise (the configured maximum is used)."""
    stage = planner.stage_at(model_path)
    if stage is None or stage.traits.data not in ("lm", "preference"):
        return None
    lengths = planner.lengths(stage.options.get("dataset"), model_path)
    return (lengths or {}).get("reply")


def _rollout_lengths(planner, stage, row, batch: int, max_prompt: int | None, max_reply: int):
    """(expected padded prompt length, longest prompt, expected reply length) of a generation
    batch: prompts from the stage's data, replies from what the start model learnt to reply;
    the configured maxima where those cannot be read."""
    cap = int(max_prompt or 0) or PPO_PROMPT_LEN
    prompts = (planner.lengths(stage.options.get("dataset"), row["model"]) or {}).get("prompt")
    replies = _reply_lengths(planner, row["model"])
    if prompts:
        prompt_len, peak = padded_length(prompts, batch, cap), min(cap, max(prompts))
    else:
        prompt_len = peak = cap
        if not max_prompt:
            row["notes"].append(f"prompt length assumed {PPO_PROMPT_LEN} tokens (max_prompt_length unset)")
    return prompt_len, peak, padded_length(replies, batch, max_reply) if replies else max_reply


def plan_trainer(planner, stage, row, config):
    """SFT / pretraining, reward modelling (pairs, a value head) and DPO (pairs and a frozen
    reference: a copy with full fine-tuning, the adapter switched off with LoRA)."""
    notes = row["notes"]
    pairs = stage.traits.data == "preference"  # every example is two sequences (chosen and rejected)
    value_head = stage.traits.produces == "reward_model"
    reference = pairs and not value_head
    batch = int(planner.arg(stage, "per_device_train_batch_size", 8))
    accum = int(planner.arg(stage, "gradient_accumulation_steps", 1))
    max_length = int(planner.arg(stage, "max_length", DEFAULT_SEQ_LEN))
    s = planner.settings(stage, config, notes, gradient_checkpointing=_gradient_checkpointing(planner, stage))
    if value_head and s.method == "full":  # a separate sequence classifier, not an adapter
        planner.configs.future[plan_inputs.key(stage.dir)] = plan_inputs.seq_cls_config(config)
    per_batch = batch * (2 if pairs else 1)  # sequences in one micro-batch (pairs padded together)
    lengths = planner.lengths(stage.options.get("dataset"), row["model"])
    seq, peak_seq = max_length, max_length
    if lengths and lengths.get("sequence"):
        seq = padded_length(lengths["sequence"], per_batch, max_length)
        peak_seq = min(max_length, max(lengths["sequence"]))
    n = score_parameters(config) if value_head else count_parameters(config)["total"]
    examples = plan_inputs.dataset_rows(stage.options.get("dataset"), planner.known_rows)
    max_steps = int(planner.arg(stage, "max_steps", -1))
    per_step = batch * accum * planner.processes
    sequences = steps = None
    if max_steps > 0:
        sequences, steps = max_steps * per_step, max_steps
    elif examples is not None:
        sequences = math.ceil(examples * float(planner.arg(stage, "num_train_epochs", 3.0)))
        steps = math.ceil(sequences / per_step)
    else:
        notes.append("dataset size unknown (not a local file): tokens, FLOPs and time not estimated")
    _common(row, s, batch_size=batch, grad_accum=accum, seq_len=seq, examples=examples, sequences=sequences,
            steps=steps, chinchilla_tokens=chinchilla_tokens(n))

    mem = estimate_memory(config, s, batch_size=per_batch, seq_len=peak_seq, head="value" if value_head else "lm")
    if reference and s.method == "full":
        ref = estimate_memory(config, s, role="frozen", batch_size=per_batch, seq_len=peak_seq)
        mem["weights"] += ref["weights"]
        mem["total"] += ref["weights"]
        notes.append("full DPO keeps a frozen reference copy (counted in weights)")
    row.update(mem)
    if sequences is None:
        return
    row["tokens"] = sequences * seq * (2 if pairs else 1)
    total = flops(n, row["tokens"], per_param_token=6.0 if s.method == "full" else 4.0)
    if reference:
        total += flops(n, row["tokens"], per_param_token=2.0)  # reference log-probs
    row["flops"] = total
    model = ModelProbe(config, head="value" if value_head else "lm", adapters=_adapters(s),
                       checkpointing=s.gradient_checkpointing)
    L = round(seq)
    passes = [(accum, lambda: model.train(per_batch, L)), (1, model.optimizer_step)]
    if reference:
        passes.append((accum, lambda: ModelProbe(config).forward(per_batch, L)))
    row["seconds"] = planner.seconds(row, config, s, total, passes, steps, per_batch * seq)


def plan_ppo(planner, stage, row, config):
    """align's PPO: policy, reference, critic and reward model (see estimate_ppo_memory)."""
    notes = row["notes"]
    cfg = stage.config()
    s = planner.settings(stage, config, notes, gradient_checkpointing=cfg.gradient_checkpointing)
    batch = cfg.per_device_train_batch_size
    prompt_len, peak_prompt, response_len = _rollout_lengths(planner, stage, row, batch, cfg.max_prompt_length,
                                                             cfg.response_length)
    reward_path = stage.options.get("reward_model")
    value_path = stage.options.get("value_model") or reward_path
    reward_config = value_config = None
    if reward_path:
        reward_config, note = planner.configs.get(reward_path)
        if note:
            notes.append(f"reward model: {note}; counted as the policy's architecture")
    if value_path and value_path != reward_path:
        value_config, note = planner.configs.get(value_path)
        if note:
            notes.append(f"value model: {note}; counted as the policy's architecture")
    else:
        value_config = reward_config
    n_policy = count_parameters(config)["total"]
    n_reward = score_parameters(reward_config or config) if reward_path else 0.0
    n_critic = score_parameters(value_config or config)
    if not reward_path:
        notes.append("reward from reward_funcs only: no reward-model FLOPs (memory still counts one)")

    global_batch = batch * planner.processes
    examples = plan_inputs.dataset_rows(stage.options.get("dataset"), planner.known_rows)
    if cfg.num_train_steps:
        steps = cfg.num_train_steps
    elif cfg.total_episodes:
        steps = math.ceil(cfg.total_episodes / global_batch)
    elif examples is not None:
        steps = max(1, math.ceil(cfg.num_train_epochs * examples / global_batch))
    else:
        steps = None
        notes.append("dataset size unknown (not a local file): episodes, FLOPs and time not estimated")
    episodes = steps * global_batch if steps is not None else None
    seq = prompt_len + response_len
    updates = cfg.num_mini_batches * cfg.gradient_accumulation_steps
    _common(row, s, batch_size=batch, grad_accum=updates, seq_len=seq, examples=examples, sequences=episodes,
            steps=steps, chinchilla_tokens=chinchilla_tokens(n_policy))
    mem = estimate_ppo_memory(config, s, batch_size=batch, prompt_len=peak_prompt, response_len=cfg.response_length,
                              reward_config=reward_config, value_head_on_policy=cfg.value_head_on_policy)
    row.update({k: v for k, v in mem.items() if k != "roles"})
    if episodes is None:
        return
    row["tokens"] = episodes * seq
    reuse = updates == 1 and (cfg.rollout_forward_batch_size or batch) >= batch
    f = ppo_flops(n_policy, episodes=episodes, prompt_len=prompt_len, response_len=response_len,
                  ppo_epochs=cfg.num_ppo_epochs, n_reference=n_policy, n_reward=n_reward,
                  n_critic=0 if cfg.value_head_on_policy else n_critic,
                  train_per_param_token=6.0 if s.method == "full" else 4.0, reuse_rollout_pass=reuse)
    row["flops"], row["flops_split"] = f["total"], f

    adapters, ckpt = _adapters(s), s.gradient_checkpointing
    policy, base = ModelProbe(config, adapters=adapters, checkpointing=ckpt), ModelProbe(config)
    critic = None if cfg.value_head_on_policy else ModelProbe(value_config or config, head="value",
                                                              adapters=adapters, checkpointing=ckpt)
    reward = ModelProbe(reward_config or config, head="value") if reward_path else None
    P, T, micro = round(prompt_len), round(seq), max(batch // updates, 1)
    passes = [(1, lambda: policy.generate(batch, P, round(response_len))),
              (1, lambda: base.forward(batch, T)),  # reference log-probs
              (cfg.num_ppo_epochs * cfg.num_mini_batches, policy.optimizer_step)]
    passes += [(1, lambda: reward.forward(batch, T))] if reward else []
    passes += [(cfg.num_ppo_epochs * updates, lambda: policy.train(micro, T))]
    if critic is not None:
        passes += [(cfg.num_ppo_epochs * updates, lambda: critic.train(micro, T))]
        if not reuse:
            passes += [(1, lambda: critic.forward(batch, T))]
    passes += [] if reuse else [(1, lambda: policy.forward(batch, T))]  # old log-probs and values
    row["seconds"] = planner.seconds(row, config, s, f["total"], passes, steps, batch * seq)


def plan_online(planner, stage, row, config):
    """RLOO / GRPO on TRL: each generation round samples ``per_device_train_batch_size ×
    steps_per_generation`` completions, scores them (reward model, and the reference when
    ``beta > 0``) and trains on them; every completion is a training sequence."""
    notes = row["notes"]
    batch = int(planner.arg(stage, "per_device_train_batch_size", 8))  # completions per device per step
    accum = int(planner.arg(stage, "gradient_accumulation_steps", 1))
    per_generation = int(planner.arg(stage, "steps_per_generation", accum))
    iterations = int(planner.arg(stage, "num_iterations", 1))
    completion_cap = int(planner.arg(stage, "max_completion_length", 512))
    beta = float(planner.arg(stage, "beta", 0.0))
    gen_batch = batch * per_generation
    prompt_len, peak_prompt, completion_len = _rollout_lengths(
        planner, stage, row, gen_batch, planner.arg(stage, "max_prompt_length", None), completion_cap)
    seq = prompt_len + completion_len
    s = planner.settings(stage, config, notes, gradient_checkpointing=_gradient_checkpointing(planner, stage))
    n_policy = count_parameters(config)["total"]
    reward_path = stage.options.get("reward_model")
    reward_config = None
    if reward_path:
        reward_config, note = planner.configs.get(reward_path)
        if note:
            notes.append(f"reward model: {note}; counted as the policy's architecture")
        reward_config = reward_config or config
    examples = plan_inputs.dataset_rows(stage.options.get("dataset"), planner.known_rows)
    max_steps = int(planner.arg(stage, "max_steps", -1))
    per_step = batch * accum * planner.processes
    if max_steps > 0:
        completions, steps = max_steps * per_step, max_steps
    elif examples is not None:
        completions = math.ceil(examples * float(planner.arg(stage, "num_train_epochs", 1.0))
                                * int(planner.arg(stage, "num_generations", 8)))
        steps = math.ceil(completions / per_step)
    else:
        completions = steps = None
        notes.append("dataset size unknown (not a local file): completions, FLOPs and time not estimated")
    _common(row, s, batch_size=batch, grad_accum=accum, seq_len=seq, examples=examples, sequences=completions,
            steps=steps, chinchilla_tokens=chinchilla_tokens(n_policy))
    mem = estimate_online_memory(config, s, batch_size=batch, generation_batch_size=gen_batch,
                                 prompt_len=peak_prompt, completion_len=completion_cap, beta=beta,
                                 reward_config=reward_config)
    row.update(mem)
    if completions is None:
        return
    row["tokens"] = completions * seq
    n_reward = score_parameters(reward_config) if reward_config is not None else 0
    forwards = 2.0 * (n_policy + n_reward + (n_policy if beta > 0 else 0))  # generation, reward, reference
    per_token = (6.0 if s.method == "full" else 4.0) * iterations
    row["flops"] = (forwards + per_token * n_policy) * row["tokens"]

    policy = ModelProbe(config, adapters=_adapters(s), checkpointing=s.gradient_checkpointing)
    base = ModelProbe(config)
    reward = ModelProbe(reward_config, head="value") if reward_config is not None else None
    P, T = round(prompt_len), round(seq)
    rounds = accum / (per_generation * iterations)  # generation rounds per optimizer step
    passes = [(rounds, lambda: policy.generate(gen_batch, P, round(completion_len))),
              (accum * iterations, lambda: policy.train(batch, T)), (1, policy.optimizer_step)]
    passes += [(rounds, lambda: reward.forward(gen_batch, T))] if reward else []
    passes += [(rounds, lambda: base.forward(gen_batch, T))] if beta > 0 else []
    passes += [(rounds, lambda: policy.forward(gen_batch, T))]  # old log-probs (RLOO always computes them)
    row["seconds"] = planner.seconds(row, config, s, row["flops"], passes, steps, batch * seq)
