"""How the PPO roles are loaded and laid out in memory: `load_roles` builds one of two
layouts from model folders; the trainer only sees the `Roles` interface (align.ppo.roles).

Separate layout (full fine-tuning: no `peft:` block)
    policy     the SFT model, trainable                                  weights + grads + Adam
    reference  a second copy of the SFT model, frozen                    weights
    critic     a sequence classifier (AutoModelForSequenceClassification) loaded from
               `value_model:` (default: the reward model; else the policy with a zeroed
               value head), trainable; its `score` head gives per-token values
                                                                         weights + grads + Adam
    reward     the reward model, frozen (absent with reward functions only)   weights
    Memory, with P parameters per model and fp32 Adam: 2 x (4 + 4 + 8) P bytes trainable +
    2 x 4 P frozen = 40 P bytes (16-bit weights: about 28 P), before activations.

Shared layout (LoRA / QLoRA: a `peft:` block)
    One base model is held once; peft's multi-adapter API switches roles on it:
    policy     adapter "default" (trainable). When the SFT output is itself a LoRA adapter
               it starts from that adapter's weights (and keeps its LoRA shape).
    reference  the base with adapters disabled; or, when the SFT output is an adapter, that
               adapter loaded frozen as "ref".
    critic     adapter "critic" (trainable) + a float32 value head (hidden -> 1). When the
               reward (or value) model is an adapter directly on the base, the critic starts
               as that adapter with its score head; otherwise a fresh adapter and a zero head
               (a score head only fits the body it was trained on).
    reward     when the reward model is a sequence-classification LoRA adapter on the same
               base (or on the SFT adapter), it is loaded frozen as "reward" + its score head;
               any other reward model is loaded separately (quantized like the base).
    Memory: the base once (2 P bytes in bf16, about 0.5 P in 4-bit) + three or four small
    adapters + Adam for the two trainable ones (16 bytes per adapter parameter).

Value head on the policy (`value_head_on_policy: true`, either layout)
    critic     no network of its own: a float32 value head (hidden -> 1, zero-initialised)
               reads the hidden states the policy's LM head reads, so one forward/backward
               pass gives logits and values (TRL 0.x's AutoModelForCausalLMWithValueHead).
               Saves the critic's weights and Adam state (separate layout: 28 P bytes
               instead of 40 P) and half the update's compute; the value loss then also
               shapes the policy's weights, which is why it is not the default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from align import models, render
from align.errors import AlignError
from align.ppo.roles import (CRITIC, POLICY, ActorCritic, AdapterSwitch, Roles, adapter_name_of, classifier_on,
                             score_head)

TRAINABLE_ADAPTERS = (POLICY, CRITIC)


# --------------------------------------------------------------------------- helpers


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.eval()
    return model


def same_model_path(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a.rstrip("/") == b.rstrip("/")


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass
class LoadOptions:
    dtype: str | None = "auto"
    quantization: dict | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    value_head_on_policy: bool = False  # the critic is a value head on the policy (no critic network)


def load_roles(*, policy_path: str, tokenizer, reward_path: str | None, value_path: str | None,
               peft_config, options: LoadOptions) -> Roles:
    """Build the layout: shared when `peft_config` is given, separate otherwise."""
    reward_tok = models.load_tokenizer(reward_path, trust_remote_code=options.trust_remote_code) if reward_path else None
    same_vocab = reward_tok is None or reward_tok.get_vocab() == tokenizer.get_vocab()
    # The critic reads the policy's tokens, so it can only start from a model with its vocabulary.
    critic_source = value_path or (reward_path if same_vocab else None)
    if options.value_head_on_policy:
        critic_source = None
    if value_path and models.load_tokenizer(value_path, trust_remote_code=options.trust_remote_code).get_vocab() \
            != tokenizer.get_vocab():
        raise AlignError(f"value_model: '{value_path}' has a different tokenizer from the policy's; the critic "
                         f"reads the policy's tokens")
    if peft_config is not None:
        roles = _load_shared(policy_path, tokenizer, reward_path, reward_tok, critic_source, peft_config, options)
    else:
        roles = _load_separate(policy_path, tokenizer, reward_path, reward_tok, critic_source, options)
    roles.reward_tokenizer = reward_tok  # the reward model reads text its own way (align.render)
    if not same_vocab:
        roles.description.append("reward tokenizer differs from the policy's: responses are decoded and re-tokenized "
                                 "for it" + ("" if options.value_head_on_policy else ", and the critic starts from the policy"))
    if reward_tok is not None and not render.reads_chat(reward_tok):
        roles.description.append("reward: its tokenizer has no chat template, so it reads plain text (prompt + "
                                 "response + EOS, as TRL trained it)")
    if not render.reads_chat(tokenizer):
        render.warn_once(f"model: '{policy_path}' has no chat template of its own; its prompts are rendered with "
                         f"align's ChatML template, as in every stage, eval and chat (train it with SFT first)")
    for module in [roles.actor_critic, *roles.frozen_modules()]:
        models.disable_dropout(module)
    for module in roles.frozen_modules():
        freeze(module)
    roles.actor_critic.record_trainable()
    return roles


def _load_lm(path: str, tokenizer, options: LoadOptions, *, kind="causal-lm", quantize=False):
    """A model with room for every token of `tokenizer` (its own tokenizer, which may have
    gained a pad token in align.models.prepare_tokenizer)."""
    model = models.load_model(path, kind=kind, dtype=options.dtype, trust_remote_code=options.trust_remote_code,
                              quantization=options.quantization if quantize else None)
    models.fit_tokenizer(model, tokenizer)
    return model


def _is_classifier_checkpoint(path: str) -> bool:
    """Whether `path` holds a trained sequence classifier (full model or SEQ_CLS adapter)."""
    return bool(models.classifier_architecture(path))


def _gradient_checkpointing(model, context_fn=None):
    kwargs = {"use_reentrant": False, **({"context_fn": context_fn} if context_fn else {})}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "config"):
        model.config.use_cache = False


def _load_classifier(path, tokenizer, options):
    """A one-logit sequence classifier from `path`. A causal-LM adapter (an SFT LoRA output)
    is merged as a causal LM first and its body moved under a new score head (peft cannot
    load a CAUSAL_LM adapter onto a classification model)."""
    if _is_classifier_checkpoint(path) or not models.is_adapter(path):
        return _load_lm(path, tokenizer, options, kind="seq-cls")
    return classifier_on(_load_lm(path, tokenizer, options))


def _load_separate(policy_path, tokenizer, reward_path, reward_tok, critic_source, options) -> Roles:
    policy = _load_lm(policy_path, tokenizer, options)
    ref = _load_lm(policy_path, tokenizer, options)
    description = [f"layout: separate (full fine-tuning): policy and reference from {policy_path}"]
    critic, value_head = None, None
    critic_path = critic_source or policy_path
    if options.value_head_on_policy:
        value_head = _zero_value_head(policy)
        description.append("critic: a value head on the policy's last hidden states (value_head_on_policy)")
    else:
        critic = _load_classifier(critic_path, tokenizer, options)
        if _is_classifier_checkpoint(critic_path):
            description.append(f"critic: sequence classifier from {critic_path}")
        else:
            with torch.no_grad():
                score_head(critic).weight.zero_()  # a fresh head: predict 0 until it has learned
            description.append(f"critic: {critic_path} with a new (zero) value head")
    reward = None
    if reward_path:
        reward = _load_lm(reward_path, reward_tok, options, kind="seq-cls")
        description.append(f"reward: sequence classifier from {reward_path}")
    # A merged adapter comes back frozen (peft loads adapters for inference); train it all.
    policy.requires_grad_(True)
    for module in (critic, value_head):
        if module is not None:
            module.requires_grad_(True)
    if options.gradient_checkpointing:
        for module in (policy, critic):
            if module is not None:
                _gradient_checkpointing(module)
    actor_critic = ActorCritic(policy, critic=critic, value_head=value_head, on_policy=options.value_head_on_policy)
    return Roles(actor_critic, "separate", ref_model=ref, reward_model=reward, description=description)


def _zero_value_head(model) -> nn.Linear:
    """hidden -> 1, float32, zero: the critic predicts 0 until it has learned (a reward
    model's score head would read features of a different network)."""
    head = nn.Linear(model.config.get_text_config().hidden_size, 1, bias=False, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    return head


def _shareable(adapter_path: str | None, base_path: str, policy_path: str, policy_is_adapter: bool):
    """How a LoRA adapter folder can ride on the shared base: None (it can't), [] (it sits on
    the base) or ["ref"] (it sits on the SFT adapter, which is loaded as "ref")."""
    if not adapter_path or not models.is_adapter(adapter_path):
        return None
    with open(Path(adapter_path) / models.ADAPTER_CONFIG) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        return None
    below = config.get("base_model_name_or_path") or ""
    if same_model_path(below, base_path):
        return []
    if policy_is_adapter and same_model_path(below, policy_path):
        # Two active adapters: only LoRA layers sum; modules_to_save copies cannot be stacked.
        with open(Path(policy_path) / models.ADAPTER_CONFIG) as f:
            if json.load(f).get("modules_to_save"):
                return None
        if [m for m in config.get("modules_to_save") or [] if m not in ("score", "classifier")]:
            return None
        return ["ref"]
    return None


def _add_adapter_from(model, folder: str, name: str, trainable: bool) -> torch.Tensor | None:
    """Load a LoRA adapter folder (causal-LM or SEQ_CLS) into the shared causal-LM PeftModel
    under `name`; return its score-head weight when it has one."""
    from peft import LoraConfig, load_peft_weights, set_peft_model_state_dict

    config = LoraConfig.from_pretrained(folder)
    config.task_type = "CAUSAL_LM"
    config.modules_to_save = [m for m in (config.modules_to_save or []) if m not in ("score", "classifier")] or None
    config.inference_mode = not trainable
    model.add_adapter(name, config)
    weights = load_peft_weights(folder, device="cpu")
    head = None
    for key in list(weights):
        if re.search(r"\.(score|classifier)\.weight$", key):
            head = weights.pop(key)
        elif re.search(r"\.(score|classifier)\.bias$", key):
            weights.pop(key)
    result = set_peft_model_state_dict(model, weights, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if name in k or "lora" in k]
    if unexpected:
        raise AlignError(f"'{folder}': adapter weights do not fit the base model ({unexpected[0]})")
    return head


def _load_shared(policy_path, tokenizer, reward_path, reward_tok, critic_source, peft_config, options) -> Roles:
    from peft import PeftModel, get_peft_model

    # The recipe check (align.stages.ppo.validate) refuses any other peft method.
    assert type(peft_config).__name__ == "LoraConfig", "the shared layout needs a LoraConfig"
    policy_is_adapter = models.is_adapter(policy_path)
    base_path = models.adapter_base(policy_path) if policy_is_adapter else policy_path
    base = _load_lm(base_path, tokenizer, options, quantize=True)
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        base = models.prepare_kbit_training(base, options.gradient_checkpointing)

    description = [f"layout: shared (LoRA): one base model from {base_path}"]
    if policy_is_adapter:
        model = PeftModel.from_pretrained(base, policy_path, adapter_name=POLICY, is_trainable=True)
        model.load_adapter(policy_path, adapter_name="ref", is_trainable=False)
        ref_stack = ["ref"]
        description.append(f"policy: adapter '{POLICY}' starting from the SFT adapter {policy_path} "
                           f"(its LoRA shape" + ("" if options.value_head_on_policy else
                                                  "; the peft block's r/targets apply to the critic") + ")")
        description.append("reference: the SFT adapter, frozen, as 'ref'")
    else:
        model = get_peft_model(base, copy.deepcopy(peft_config), adapter_name=POLICY)
        ref_stack = []
        description.append(f"policy: new LoRA adapter '{POLICY}'")
        description.append("reference: the base with adapters disabled")
    stacks = {"policy": [POLICY], "ref": ref_stack}

    # Reward: an adapter on the same base rides along; anything else is its own model.
    reward_head, reward_model = None, None
    reward_stack = _shareable(reward_path, base_path, policy_path, policy_is_adapter)
    if reward_stack is not None:
        weight = _add_adapter_from(model, reward_path, "reward", trainable=False)
        if weight is None:
            raise AlignError(f"reward_model: adapter '{reward_path}' has no score head (is it a reward model?)")
        reward_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float32)
        with torch.no_grad():
            reward_head.weight.copy_(weight.float())
        stacks["reward"] = reward_stack + ["reward"]
        where = "stacked on the SFT adapter 'ref'" if reward_stack else "on the shared base"
        description.append(f"reward: adapter 'reward' from {reward_path}, {where}")
    elif reward_path:
        reward_model = _load_lm(reward_path, reward_tok, options, kind="seq-cls", quantize=True)
        description.append(f"reward: separate sequence classifier from {reward_path}")

    # Critic: start from the value/reward adapter when it shares the base, else a fresh adapter.
    # Only an adapter sitting directly on the base is copied: a stacked critic could not be
    # saved as one adapter that loads on its own.
    if options.value_head_on_policy:
        value_head = _zero_value_head(model)
        description.append(f"critic: a value head on the hidden states of the policy adapter '{POLICY}' "
                           f"(value_head_on_policy)")
    else:
        value_head = _critic_adapter(model, stacks, critic_source, base_path, policy_path, policy_is_adapter,
                                     peft_config, description)
    # make sure the trainable adapters (and only they) train
    for name, param in model.named_parameters():
        param.requires_grad_(adapter_name_of(name) in TRAINABLE_ADAPTERS)
    switch = AdapterSwitch(model, stacks)
    if options.gradient_checkpointing:
        _gradient_checkpointing(model.get_base_model(), context_fn=switch.recompute_context)
    actor_critic = ActorCritic(model, value_head=value_head, switch=switch, on_policy=options.value_head_on_policy)
    return Roles(actor_critic, "shared", reward_model=reward_model, reward_head=reward_head, base_path=base_path,
                 description=description)


def _critic_adapter(model, stacks, critic_source, base_path, policy_path, policy_is_adapter,
                    peft_config, description) -> nn.Linear:
    """Add the trainable 'critic' adapter; return its value head.

    A score head is only worth copying onto the body it was trained on: when the critic
    source is an adapter directly on the shared base, the critic starts as that adapter and
    takes its head. Any other source (a separate reward model, a reward adapter stacked on
    the SFT adapter) has a body the critic does not share, so its head would project
    unrelated features: the critic then gets a fresh adapter and a zero head."""
    critic_stack = _shareable(critic_source, base_path, policy_path, policy_is_adapter)
    value_head = _zero_value_head(model)
    if critic_stack == []:
        weight = _add_adapter_from(model, critic_source, CRITIC, trainable=True)
        stacks["critic"] = [CRITIC]
        description.append(f"critic: adapter '{CRITIC}' starting from {critic_source}")
        if weight is not None and tuple(weight.shape) == tuple(value_head.weight.shape):
            with torch.no_grad():
                value_head.weight.copy_(weight.float())
            description.append(f"value head: copied from the score head of {critic_source}")
            return value_head
    else:
        model.add_adapter(CRITIC, _critic_config(peft_config))
        stacks["critic"] = [CRITIC]
        description.append(f"critic: new LoRA adapter '{CRITIC}'")
    description.append("value head: new, zero-initialised")
    return value_head


def _critic_config(peft_config):
    config = copy.deepcopy(peft_config)
    config.task_type = "CAUSAL_LM"
    config.modules_to_save = None  # the value head is ours; the LM head is not the critic's
    config.inference_mode = False
    return config
