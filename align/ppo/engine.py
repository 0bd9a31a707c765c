"""What PPO's hand-driven update does differently on each distributed engine.

accelerate hides the engine for a loop that calls `accelerator.backward` once per optimizer
step. PPO's update does more (several minibatches per rollout, micro-batches accumulated in
each, one clipping norm per network, generation between updates, its own checkpoints), so
each engine gets a small class with the same methods:

    Plain      one process or DDP: torch's optimizer and clipping; DDP's `no_sync` while
               accumulating.
    DeepSpeed  ZeRO-2 or ZeRO-3. The engine is built with PPO's micro-batch and
               accumulation; before every backward the accumulation boundary is set by hand
               (the last micro-batch of a minibatch), and `engine.step()` runs once per
               minibatch: exactly num_ppo_epochs x num_mini_batches optimizer steps per
               rollout. DeepSpeed's own clipping (one norm over policy and critic together) is
               off; each network is clipped at `max_grad_norm` from the gradient partitions
               this process holds (one all-reduce of two numbers). ZeRO-3 also shards the
               frozen reference and reward models, gathers the policy for generation (no
               collective per token, so processes may stop generating at different lengths)
               and gathers weights for the final save.

`make_engine` picks the class from the accelerator's state.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from align.errors import AlignError

DEEPSPEED_TAG = "deepspeed"  # the engine's own checkpoint folder inside checkpoint-N


def make_engine(accelerator, config):
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeed(accelerator, config)
    if accelerator.distributed_type == DistributedType.FSDP:
        # align.training.check_sharding refuses this at recipe load; this guards direct use.
        raise AlignError("PPO does not run under FSDP; use DeepSpeed ZeRO-3 (recipes/accelerate/zero3.yaml)")
    return Plain(accelerator, config)


class Plain:
    """One process or DDP."""

    def __init__(self, accelerator, config):
        self.accelerator = accelerator
        self.config = config
        self.model = self.optimizer = None
        self.policy_params: list = []
        self.critic_params: list = []
        self._stepped = False

    def prepare(self, actor_critic, optimizer, policy_params, critic_params):
        """Wrap the trainable pair and its optimizer; returns (model, optimizer)."""
        self.policy_params, self.critic_params = policy_params, critic_params
        optimizer.register_step_post_hook(self._mark_step)  # a skipped step (fp16 overflow) does not count
        self.model, self.optimizer = self.accelerator.prepare(actor_critic, optimizer)
        return self.model, self.optimizer

    def prepare_frozen(self, module):
        """A frozen model (reference, reward) as the engine wants it for no-grad passes."""
        return module

    def _mark_step(self, optimizer, args, kwargs):
        self._stepped = True

    def accumulating(self, boundary: bool):
        """Around a micro-batch's forward and backward: DDP all-reduces only at the boundary."""
        return nullcontext() if boundary else self.accelerator.no_sync(self.model)

    def backward(self, loss, boundary: bool):
        self.accelerator.backward(loss / self.config.gradient_accumulation_steps)

    def clip(self) -> tuple[float, float]:
        """Clip the policy's and the critic's gradients separately; their norms before clipping."""
        self.accelerator.unscale_gradients()
        norms = []
        for params in (self.policy_params, self.critic_params):
            with_grad = [p for p in params if p.grad is not None]
            if not with_grad:
                norms.append(0.0)
                continue
            if self.config.max_grad_norm is None:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad]))
            else:
                norm = torch.nn.utils.clip_grad_norm_(with_grad, self.config.max_grad_norm)
            norms.append(float(norm))
        return norms[0], norms[1]

    def step(self) -> bool:
        """The optimizer step of one minibatch; whether it was applied."""
        self._stepped = False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._stepped

    def generation(self):
        """Around sampling: the policy's weights usable without collectives."""
        return nullcontext()

    def full_weights(self, params):
        """Around reading whole weights (saves): gathered where they are sharded."""
        return nullcontext()

    # ---- checkpoints: trainable weights and optimizer state

    def save_state(self, folder: Path, unwrapped, is_main: bool):
        if is_main:
            from safetensors.torch import save_file

            save_file(unwrapped.trainable_state_dict(), str(folder / "trainable.safetensors"))
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load_state(self, folder: Path, unwrapped):
        from safetensors.torch import load_file

        unwrapped.load_trainable_state_dict(load_file(str(folder / "trainable.safetensors")))
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))


class DeepSpeed(Plain):
    """DeepSpeed ZeRO-2 / ZeRO-3 (see the module docstring)."""

    def __init__(self, accelerator, config):
        super().__init__(accelerator, config)
        self.plugin = accelerator.state.deepspeed_plugin
        self.stage = int(self.plugin.zero_stage)
        if self.stage not in (2, 3):
            raise AlignError(f"PPO under DeepSpeed needs ZeRO stage 2 or 3 (got {self.stage}): "
                             f"recipes/accelerate/zero2.yaml or zero3.yaml")
        self._frozen_engines = []  # kept alive: their ZeRO-3 hooks live on the modules

    def prepare(self, actor_critic, optimizer, policy_params, critic_params):
        self.policy_params, self.critic_params = policy_params, critic_params
        cfg, gas = self.config, self.config.gradient_accumulation_steps
        micro = cfg.micro_batch_size
        # What DeepSpeed must know that `prepare` cannot learn from a dataloader; 'auto' or not,
        # PPO's own values win, and its clipping is off (PPO clips each network itself).
        self.plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
            "train_batch_size": micro * gas * self.accelerator.num_processes, "gradient_clipping": 0.0})
        self.model, self.optimizer = self.accelerator.prepare(actor_critic, optimizer)
        return self.model, self.optimizer

    def prepare_frozen(self, module):
        if self.stage != 3:
            return module  # ZeRO-2 keeps whole weights on every process anyway
        from trl.models.utils import prepare_deepspeed

        engine = prepare_deepspeed(module, self.accelerator)
        self._frozen_engines.append(engine)
        return engine.module

    def accumulating(self, boundary: bool):
        return nullcontext()

    def backward(self, loss, boundary: bool):
        # Set before the backward pass: ZeRO reduces the gradient partitions at the boundary.
        self.model.set_gradient_accumulation_boundary(boundary)
        self.model.backward(loss)  # divides by gradient_accumulation_steps itself

    def clip(self) -> tuple[float, float]:
        groups = [self._local_grads(self.policy_params), self._local_grads(self.critic_params)]
        squares = torch.tensor([sum(float(g.float().pow(2).sum()) for _, g in grads) for grads in groups],
                               dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(squares)
        norms = squares.sqrt().tolist()
        if self.config.max_grad_norm is not None:
            for grads, norm in zip(groups, norms):
                coef = min(1.0, self.config.max_grad_norm / (norm + 1e-6))  # torch's clip_grad_norm_ rule
                if coef < 1.0:
                    for item in grads:
                        self._scale(item, coef)
        return norms[0], norms[1]

    def _local_grads(self, params) -> list:
        """This process's pieces of the reduced gradients of `params`, between the boundary's
        backward and `engine.step()`: ZeRO-3 through DeepSpeed's local-gradient API; ZeRO-2
        through the fragment map DeepSpeed's `safe_get_full_grad` reads (without its
        all-reduce of every whole gradient)."""
        grads = []
        for p in params:
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_grad

                g = safe_get_local_grad(p)
                if g is not None:
                    grads.append((p, g))
            elif getattr(p, "_hp_mapping", None) is not None:
                grads.append((p, p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)))
        return grads

    def _scale(self, item, coef: float):
        p, g = item
        if self.stage == 3:
            from deepspeed.utils import safe_set_local_grad

            safe_set_local_grad(p, g * coef)
        else:
            g.mul_(coef)

    def step(self) -> bool:
        before = self.model.global_steps, self.model.skipped_steps
        self.model.step()  # the optimizer step, then DeepSpeed zeroes the gradients
        return (self.model.global_steps, self.model.skipped_steps) == (before[0] + 1, before[1])

    @contextmanager
    def generation(self):
        if self.stage != 3:
            yield
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        # The whole policy on every process, and no ZeRO hooks re-partitioning it layer by layer.
        with deepspeed.zero.GatheredParameters(list(self.model.module.policy.parameters())):
            remove_hooks(self.model)
            try:
                yield
            finally:
                add_hooks(self.model)

    def full_weights(self, params):
        if self.stage != 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params))

    def save_state(self, folder: Path, unwrapped, is_main: bool):
        """DeepSpeed's own checkpoint (every process writes its optimizer partition)."""
        self.model.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)

    def load_state(self, folder: Path, unwrapped):
        if not (folder / DEEPSPEED_TAG).is_dir():
            raise AlignError(f"{folder}: not a DeepSpeed checkpoint (was it written by a run without DeepSpeed? "
                             f"resume it with the same accelerate config, or delete the checkpoints folder)")
        path, _ = self.model.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_module_strict=False,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise AlignError(f"{folder}: DeepSpeed could not load its checkpoint")
