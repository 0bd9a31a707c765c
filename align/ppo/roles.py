"""The PPO roles at run time: who plays which part (policy, reference, critic, reward).

PPO needs four networks: the policy being trained, a frozen reference (the SFT policy) for
the KL penalty, a critic that predicts per-token values, and a reward model. However they
are laid out in memory (`align.ppo.layouts` builds them), the trainer sees:

    ActorCritic   policy + critic as one trainable module (one DDP wrapper, one optimizer)
    Roles         the ActorCritic plus the frozen reference and reward, with the no-grad
                  passes a rollout needs and the final saves
    AdapterSwitch in the shared (LoRA) layout, which adapters are active for which role

In the shared layout `AdapterSwitch.use(role)` activates the role's adapters before each
forward pass. peft's `set_adapter` also flips `requires_grad`, which would silently drop the
other trainable adapter from the graph (and confuse DDP), so the switch restores the
trainable set after every change.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from align.errors import AlignError
from align.ppo.core import last_token_index

POLICY, CRITIC = "default", "critic"  # adapter names; "default" so the policy saves like an SFT adapter
_ADAPTER_PARAM = re.compile(r"\.(?:lora_[A-Za-z_]+|modules_to_save)\.([A-Za-z0-9_-]+)(?:\.|$)")


# --------------------------------------------------------------------------- helpers


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body (no LM / classification head) of a causal-LM or seq-cls model,
    also through a PeftModel (LoRA layers live inside it, so the active adapter applies)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    body = model.base_model  # transformers: getattr(model, base_model_prefix)
    if body is model:
        raise AlignError(f"model: cannot find the transformer body of {type(model).__name__}")
    return body


def score_head(model: nn.Module) -> nn.Linear:
    """The one-logit head of a sequence classifier (`score` for decoder-only models)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise AlignError(f"reward_model: {type(model).__name__} has no linear `score` head")


def hidden_states(body: nn.Module, input_ids, attention_mask, position_ids):
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def adapter_name_of(param_name: str) -> str | None:
    match = _ADAPTER_PARAM.search(param_name)
    return match.group(1) if match else None


def classifier_on(causal: nn.Module, score_weight: torch.Tensor | None = None) -> nn.Module:
    """A one-logit sequence classifier whose body IS `causal`'s body (tensors shared, not
    copied); its score head gets `score_weight` when given."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal.config)
    config.num_labels, config.architectures = 1, None
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config, dtype=causal.dtype)
    body = backbone(causal)
    classifier.base_model.load_state_dict(body.state_dict(), assign=True)
    for name, buffer in body.named_buffers():  # non-persistent ones (rotary tables) too
        module, _, attr = name.rpartition(".")
        setattr(classifier.base_model.get_submodule(module), attr, buffer)
    head = score_head(classifier)
    weight = score_weight if score_weight is not None else torch.zeros(head.weight.shape)
    head.weight = nn.Parameter(weight.detach().to(causal.dtype), requires_grad=False)
    return classifier


# --------------------------------------------------------------------------- adapter switch


class AdapterSwitch:
    """Activates the adapters of one role on a shared PeftModel, keeping `requires_grad`
    fixed (peft's set_adapter / disable_adapter_layers change it as a side effect)."""

    def __init__(self, peft_model, stacks: dict[str, list[str]]):
        self.model = peft_model
        self.stacks = stacks
        self.current: str | None = None
        self._flags: list[tuple[nn.Parameter, bool]] = []

    def freeze_flags(self):
        """Record the current requires_grad of every parameter as the one to keep."""
        self._flags = [(p, p.requires_grad) for p in self.model.parameters()]

    def recompute_context(self):
        """`context_fn` for torch's non-reentrant checkpointing. The backward pass recomputes
        each checkpointed layer; LoRA layers read the active adapter at call time, so the
        recomputation must run under the role that ran the forward (else the critic's
        gradients would be computed through the policy's adapter). The role is left active
        afterwards: every entry point selects its role anyway, and a backward pass then
        switches once per role, not once per layer."""
        return nullcontext(), self._selected(self.current)

    @contextmanager
    def _selected(self, role: str):
        self.use(role)
        yield

    def use(self, role: str):
        if role == self.current:
            return
        names = self.stacks[role]
        tuner = self.model.base_model
        if names:
            tuner.enable_adapter_layers()
            tuner.set_adapter(names if len(names) > 1 else names[0])
        else:
            tuner.disable_adapter_layers()
        for p, flag in self._flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        self.current = role


class _NoSwitch:
    def use(self, role: str):
        pass


# --------------------------------------------------------------------------- the trainable pair


class ActorCritic(nn.Module):
    """Policy + critic as one module, so one DDP wrapper and one optimizer cover both.

    `forward(input_ids, attention_mask, position_ids, n)` returns the policy logits that
    predict the last `n` tokens, shape (B, n, V), and the critic's values at the states
    before each of them, shape (B, n) float32.

    The critic is a separate sequence classifier (`critic`), an adapter on the shared base
    read by `value_head`, or, with `on_policy=True`, `value_head` reading the policy's own
    last hidden states (the input of its LM head): then one pass gives both outputs.
    """

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None, value_head: nn.Linear | None = None,
                 switch: AdapterSwitch | None = None, on_policy: bool = False):
        super().__init__()
        self.policy = policy  # causal LM, or the shared PeftModel holding every adapter
        self.critic = critic  # separate layout: a sequence classifier
        self.value_head = value_head  # shared layout or on_policy: hidden -> 1
        self.switch = switch or _NoSwitch()
        self.on_policy = on_policy
        self.trainable_names: list[str] = []

    @property
    def shared(self) -> bool:
        return self.critic is None

    @property
    def lm(self) -> nn.Module:
        """The policy's causal LM (inside the PeftModel in the shared layout)."""
        return self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy

    def forward(self, input_ids, attention_mask, position_ids, n: int):
        if self.on_policy:
            logits, hidden = self.policy_logits(input_ids, attention_mask, position_ids, n, with_hidden=True)
            return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return (self.policy_logits(input_ids, attention_mask, position_ids, n),
                self.values(input_ids, attention_mask, position_ids, n))

    def policy_logits(self, input_ids, attention_mask, position_ids, n: int, with_hidden: bool = False):
        """Logits (B, n, V); with `with_hidden`, also the hidden states the LM head read for
        them, (B, n, H). A hook on the LM head catches its input, so whatever the model does
        before its head (final norm, logit scaling or soft-capping after it) stays its own."""
        self.switch.use("policy")
        seen = []
        hook = None
        if with_hidden:
            hook = self.lm.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        try:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, logits_to_keep=n + 1)
        finally:
            if hook is not None:
                hook.remove()
        if with_hidden:
            return out.logits[:, :-1], seen[-1][:, :-1]
        return out.logits[:, :-1]

    def values(self, input_ids, attention_mask, position_ids, n: int):
        self.switch.use("critic")
        try:
            body = backbone(self.policy if self.shared else self.critic)
            hidden = hidden_states(body, input_ids, attention_mask, position_ids)[:, -(n + 1):-1]
            head = self.value_head if self.shared else score_head(self.critic)
            return head(hidden.to(head.weight.dtype)).squeeze(-1).float()
        finally:
            self.switch.use("policy")

    @torch.no_grad()
    def generate(self, **kwargs):
        """`policy.generate` with only the caller's generation config: transformers fills
        unset fields from the checkpoint's generation_config.json (top_p, repetition
        penalty, ...), which would make the sampling distribution differ from the policy
        whose log-probs PPO computes. Eval mode keeps the KV cache on under gradient
        checkpointing."""
        from transformers import GenerationConfig

        self.switch.use("policy")
        lm = self.lm
        saved, was_training = lm.generation_config, self.training
        lm.generation_config = GenerationConfig()
        self.eval()
        try:
            return self.policy.generate(**kwargs)
        finally:
            lm.generation_config = saved
            self.train(was_training)

    # ---- parameters, checkpoints, outputs

    def record_trainable(self):
        """Fix the trainable set (names) once every adapter and head is in place."""
        self.trainable_names = [n for n, p in self.named_parameters() if p.requires_grad]
        if isinstance(self.switch, AdapterSwitch):
            self.switch.freeze_flags()

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(policy parameters, critic parameters), both trainable."""
        named = dict(self.named_parameters())
        policy, critic = [], []
        for name in self.trainable_names:
            if self.shared:
                is_critic = name.startswith("value_head.") or adapter_name_of(name) == CRITIC
            else:
                is_critic = name.startswith("critic.")
            (critic if is_critic else policy).append(named[name])
        return policy, critic

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        named = dict(self.named_parameters())
        return {n: named[n].detach().cpu().contiguous() for n in self.trainable_names}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]):
        named = dict(self.named_parameters())
        missing = [n for n in self.trainable_names if n not in state]
        if missing:
            raise AlignError(f"checkpoint does not match the model: {len(missing)} trainable tensors missing "
                             f"(first: {missing[0]})")
        with torch.no_grad():
            for n in self.trainable_names:
                named[n].copy_(state[n].to(named[n].device, named[n].dtype))


# --------------------------------------------------------------------------- all roles


@dataclasses.dataclass
class Roles:
    """The four roles, whatever the layout. Every method except the ActorCritic's forward
    is meant for no-grad rollout passes."""

    actor_critic: ActorCritic
    layout: str  # "shared" or "separate"
    ref_model: nn.Module | None = None  # separate reference LM (None: the shared model's "ref" role)
    reward_model: nn.Module | None = None  # separate sequence classifier
    reward_head: nn.Linear | None = None  # shared layout: the reward adapter's score head
    reward_tokenizer: object | None = None  # the reward model's own (None: the policy's)
    base_path: str = ""  # shared layout: the base model path (saved into adapter configs)
    description: list[str] = dataclasses.field(default_factory=list)

    @property
    def has_reward_model(self) -> bool:
        return self.reward_model is not None or self.reward_head is not None

    def frozen_modules(self) -> list[nn.Module]:
        return [m for m in (self.ref_model, self.reward_model, self.reward_head) if m is not None]

    def to(self, device):
        """Move what `accelerator.prepare` does not: the frozen models and heads, and the value
        head (a quantized base is not moved, so its small float32 head would stay behind)."""
        if self.actor_critic.value_head is not None:
            self.actor_critic.value_head.to(device)
        for module in self.frozen_modules():
            if not getattr(module, "is_loaded_in_4bit", False) and not getattr(module, "is_loaded_in_8bit", False):
                module.to(device)
        return self

    def ref_logits(self, input_ids, attention_mask, position_ids, n: int):
        ac = self.actor_critic
        if self.ref_model is not None:
            model = self.ref_model
        else:
            ac.switch.use("ref")
            model = ac.policy
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, logits_to_keep=n + 1)
            return out.logits[:, :-1]
        finally:
            ac.switch.use("policy")

    def reward_scores(self, input_ids, attention_mask, position_ids=None):
        """Sequence scores at the last real token (from the mask, never from pad ids)."""
        ac = self.actor_critic
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if self.reward_model is not None:
            body, head = backbone(self.reward_model), score_head(self.reward_model)
        else:
            ac.switch.use("reward")
            body, head = backbone(ac.policy), self.reward_head
        try:
            hidden = hidden_states(body, input_ids, attention_mask, position_ids)
        finally:
            ac.switch.use("policy")
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        return head(last.to(head.weight.dtype)).squeeze(-1).float()

    # ---- outputs

    def save_policy(self, directory: Path, is_main: bool):
        policy = self.actor_critic.policy
        if self.layout == "shared":
            policy.save_pretrained(str(directory), selected_adapters=[POLICY], is_main_process=is_main)
        elif is_main:
            policy.save_pretrained(str(directory), safe_serialization=True)

    def save_critic(self, directory: Path, is_main: bool):
        """The critic as a sequence classifier: a full model (separate layout) or a
        SEQ_CLS LoRA adapter with its `score` head (shared layout), so it loads like a
        reward model (align.models.load_model(path, kind="seq-cls"))."""
        if not is_main:
            return
        ac = self.actor_critic
        directory.mkdir(parents=True, exist_ok=True)
        if self.layout == "separate" and not ac.on_policy:
            ac.critic.save_pretrained(str(directory), safe_serialization=True)
            return
        if self.layout == "separate":  # the policy's body under the value head, sharing its tensors
            classifier_on(ac.policy, ac.value_head.weight).save_pretrained(str(directory), safe_serialization=True)
            return
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        adapter = POLICY if ac.on_policy else CRITIC
        config = copy.deepcopy(ac.policy.peft_config[adapter])
        config.task_type = "SEQ_CLS"
        # The LM head (if the policy adapter trains it) has no place in a classifier.
        config.modules_to_save = [m for m in config.modules_to_save or [] if m != "lm_head"] + ["score"]
        config.inference_mode = True
        config.base_model_name_or_path = self.base_path
        config.save_pretrained(str(directory))
        state = get_peft_model_state_dict(ac.policy, adapter_name=adapter)
        state = {k: v.detach().cpu().contiguous() for k, v in state.items() if ".lm_head." not in k}
        state["base_model.model.score.weight"] = ac.value_head.weight.detach().cpu().contiguous()
        save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
