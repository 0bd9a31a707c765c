"""What every trainer-based stage shares: its TRL config with align's defaults, the model with
its adapter settings, resume from the last checkpoint, the divergence guard, and the final save.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from align import data, models, rundir
from align.divergence import diverged, nonfinite_value, nonfinite_weight
from align.errors import AlignError, first_line, suggest
from align.recipe import check_keys, coerce

TRAINING_OPTIONS = {"model", "dataset", "eval_dataset", "peft", "quantization"}


def trainer_config(stage, ctx, **stage_defaults):
    """The stage's TRL config: recipe fields win over stage defaults, which win over align's.

    align's defaults make a run work anywhere: checkpoints inside the stage folder, no external
    loggers, and fp32 on machines without CUDA (TRL defaults to bf16, which refuses CPU). A NaN
    loss is logged as NaN (transformers would log the mean of the finite ones), so it is seen.
    """
    on_gpu = torch.cuda.is_available()
    defaults = {
        "output_dir": str(stage.dir / rundir.CHECKPOINTS),
        "seed": ctx.seed,
        "report_to": "none",
        "save_strategy": "steps",
        "save_total_limit": 2,
        "logging_steps": 5,
        "ddp_find_unused_parameters": False,
        "disable_tqdm": not ctx.is_main,
        "logging_nan_inf_filter": False,
        **({} if on_gpu else {"use_cpu": True, "bf16": False}),
        **stage_defaults,
    }
    args = {**defaults, **stage.args}
    if args.get("gradient_checkpointing") and not on_gpu and "gradient_checkpointing" not in stage.args:
        args["gradient_checkpointing"] = False
    try:
        return stage.module.Config(**args)
    except (ValueError, TypeError) as e:
        raise AlignError(f"stages.{stage.name}: {first_line(e)}") from None


def check_training_fields(stage):
    """Checks shared by trainer stages that need no data: run at recipe load time."""
    where = f"stages.{stage.name}"
    lr = stage.args.get("learning_rate")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise AlignError(f"{where}.learning_rate: must be a positive number, got {lr}")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs"):
        if key in stage.args and not stage.args[key] > 0:
            raise AlignError(f"{where}.{key}: must be positive, got {stage.args[key]}")
    if "dataset" not in stage.options:
        raise AlignError(f"{where}.dataset: required, e.g. `dataset: {{path: data/train.jsonl}}`")
    quant = stage.options.get("quantization")
    if quant:
        check_keys(quant, _bnb_fields(), where=f"{where}.quantization", kind="BitsAndBytesConfig field")
        if not stage.options.get("peft") and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
            raise AlignError(f"{where}.quantization: a 4-bit/8-bit model cannot be fully fine-tuned; "
                             f"add a `peft:` block (QLoRA) or remove `quantization`")
    if stage.options.get("peft") is not None:
        peft_config(stage.options["peft"], task_type="CAUSAL_LM", where=f"{where}.peft")
    check_sharding(stage)


def sharding() -> str | None:
    """'zero3' or 'fsdp' when `accelerate launch` shards weights across processes, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and \
            os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "zero3"
    return None


def check_sharding(stage):
    """Refuse the combinations that fail deep inside a sharded run (axolotl #207 #1240)."""
    mode = sharding()
    if mode is None:
        return
    where = f"stages.{stage.name}"
    quant = stage.options.get("quantization") or {}
    if quant.get("load_in_4bit") and not quant.get("bnb_4bit_quant_storage"):
        raise AlignError(f"{where}.quantization: QLoRA under {mode} shards the 4-bit weights, which needs "
                         f"`bnb_4bit_quant_storage` equal to the compute dtype, e.g. bnb_4bit_quant_storage: bfloat16")
    if stage.type == "ppo":
        raise AlignError(f"{where}: PPO generates with the whole policy on every process; run it with DDP or "
                         f"DeepSpeed ZeRO-2 (recipes/accelerate/ddp.yaml, zero2.yaml), with LoRA so one base "
                         f"serves every role, not {mode}")


def _bnb_fields():
    import inspect

    from transformers import BitsAndBytesConfig

    return set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}


def peft_config(block: dict, *, task_type: str, where: str):
    """A peft config from a `peft:` block: `method` picks the class (lora by default); the other
    keys are that class's fields verbatim."""
    import peft

    if not isinstance(block, dict):
        raise AlignError(f"{where}: expected a mapping of peft fields, e.g. {{r: 16, lora_alpha: 32}}")
    fields = dict(block)
    method = str(fields.pop("method", "lora")).lower()
    classes = {
        "lora": peft.LoraConfig,
        "prompt_tuning": peft.PromptTuningConfig,
        "prefix_tuning": peft.PrefixTuningConfig,
        "p_tuning": peft.PromptEncoderConfig,
        "ia3": peft.IA3Config,
    }
    if method not in classes:
        raise AlignError(f"{where}.method: unknown peft method '{method}'{suggest(method, classes)} "
                         f"(methods: {', '.join(classes)})")
    cls = classes[method]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    check_keys(fields, names, where=where, kind=f"{cls.__name__} field")
    import typing

    hints = typing.get_type_hints(cls)
    fields = {k: coerce(v, hints.get(k), f"{where}.{k}") for k, v in fields.items()}
    fields.setdefault("task_type", task_type)
    try:
        return cls(**fields)
    except (ValueError, TypeError) as e:
        raise AlignError(f"{where}: {first_line(e)}") from None


def load_datasets(stage, ctx):
    """(train, eval or None) for the stage's data kind; `eval_dataset` wins over `test_size`."""
    where = f"stages.{stage.name}"
    kind = stage.traits.data
    train, evals = data.load(stage.options["dataset"], kind, f"{where}.dataset", ctx.seed)
    if stage.options.get("eval_dataset"):
        evals, _ = data.load(stage.options["eval_dataset"], kind, f"{where}.eval_dataset", ctx.seed)
    return train, evals


def build_trainer(stage, ctx, trainer_cls, *, kind: str = "causal-lm", defaults=None, **trainer_kwargs):
    """What every TRL-trainer stage builds: `trainer_cls` on the stage's data, starting model
    (`kind` "causal-lm" or "seq-cls"), tokenizer, peft config and TRL config.

    `defaults` are stage-level config defaults (the recipe's fields still win), or a function of
    the training set that returns them. With held-out data, evaluation runs every epoch."""
    train, evals = load_datasets(stage, ctx)
    model, tokenizer, peft = load_policy(stage, ctx, kind=kind)
    config_defaults = {"eval_strategy": "epoch"} if evals is not None else {}
    config_defaults.update((defaults(train) if callable(defaults) else defaults) or {})
    return trainer_cls(
        model=model,
        args=trainer_config(stage, ctx, **config_defaults),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        peft_config=peft,
        **trainer_kwargs,
    )


def run_trainer(stage, ctx, trainer_cls, **build_kwargs) -> dict:
    """Build the stage's trainer, train it (resuming from its last checkpoint), save it, and
    return its metrics."""
    return train_and_save(build_trainer(stage, ctx, trainer_cls, **build_kwargs), stage, ctx)


def load_policy(stage, ctx, kind: str = "causal-lm"):
    """The stage's starting model, k-bit-prepared when quantized, plus its tokenizer."""
    path = ctx.recipe.start_model(stage)
    trust = bool(ctx.model.get("trust_remote_code", False))
    tokenizer = models.load_tokenizer(path, trust_remote_code=trust)
    with ctx.state.main_process_first():  # a merged adapter copy is written once, then read by all
        model = models.load_model(
            path, kind=kind, dtype=ctx.model.get("dtype", "auto"), quantization=stage.options.get("quantization"),
            trust_remote_code=trust, revision=ctx.model.get("revision") if path == ctx.model.get("name_or_path")
            else None, attn_implementation=ctx.model.get("attn_implementation"),
        )
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # we added a pad / end-of-turn token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = models.prepare_kbit_training(model, bool(stage.args.get("gradient_checkpointing", False)))
    peft = stage.options.get("peft")
    task = "SEQ_CLS" if kind == "seq-cls" else "CAUSAL_LM"
    return model, tokenizer, (peft_config(peft, task_type=task, where=f"stages.{stage.name}.peft") if peft else None)


class Guard(TrainerCallback):
    """What align adds to every TRL trainer:

    - a non-finite logged loss or gradient norm, or a non-finite weight before a checkpoint is
      written, stops the stage (`Diverged`), so every checkpoint kept is finite;
    - every checkpoint step is also a logging step, so `log_history` (restored on resume) holds
      the loss of every step before the checkpoint: a resumed stage's train_loss is exact;
    - a resumed trainer's token count goes on from the checkpoint's instead of from 0;
    - a saved checkpoint loses its `training_args.bin` (a pickle of the arguments, which
      resuming does not read) and gets its file list (`rundir.write_file_list`).
    """

    def __init__(self, trainer, stage):
        self.trainer = trainer
        self.stage = stage

    def on_train_begin(self, args, state, control, **kwargs):
        counted = [e["num_tokens"] for e in state.log_history if "num_tokens" in e and e.get("step", 0) <= state.global_step]
        if state.global_step and counted and hasattr(self.trainer, "_total_train_tokens"):
            self.trainer._total_train_tokens = int(counted[-1])  # TRL counts from 0 in every train() call

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._before_save(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._before_save(args, state, control, model)

    def _before_save(self, args, state, control, model):
        if control.should_save:
            control.should_log = True
            bad = _nonfinite_weight(self.trainer, model)
            if bad:
                self._stop(args, state, f"weight {bad} is not finite")

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = nonfinite_value({k: (logs or {}).get(k) for k in ("loss", "grad_norm", "train_loss")})
        if bad:
            self._stop(args, state, bad)

    def _stop(self, args, state, what: str):
        from transformers.trainer_callback import ProgressCallback

        for callback in self.trainer.callback_handler.callbacks:  # the error gets a line of its own
            if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                callback.training_bar.close()
                callback.training_bar = None
        raise diverged(state.global_step, what, rundir.complete_checkpoints(self.stage.dir / rundir.CHECKPOINTS))

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            rundir.remove(checkpoint / "training_args.bin", self.stage.dir)
            rundir.write_file_list(checkpoint)


def _nonfinite_weight(trainer, model) -> str | None:
    """A non-finite trainable weight's name, decided by every process together: under FSDP each
    holds only its shard, and all must stop or none."""
    bad = nonfinite_weight((model or trainer.model).named_parameters())
    accelerator = trainer.accelerator
    if accelerator.num_processes > 1:
        flags = accelerator.gather(torch.tensor([bad is not None], dtype=torch.int32, device=accelerator.device))
        if bool(flags.any()) and not bad:
            bad = "held by another process"
    return bad


def train_and_save(trainer, stage, ctx) -> dict:
    """Train (resuming from the last checkpoint when there is one), save into the stage folder,
    and return the metrics: first/last training loss, steps, runtime, eval results."""
    trainer.add_callback(Guard(trainer, stage))
    resume = rundir.last_checkpoint(stage.dir)
    if resume:
        ctx.log(f"[{stage.name}] resuming from {Path(resume).name}")
    state = rundir.read_json(Path(resume) / "trainer_state.json") if resume else {}
    if resume and state.get("global_step", 0) >= (state.get("max_steps") or 0) > 0 and not trainer.is_deepspeed_enabled:
        # Killed between the final checkpoint and the final save: training had finished, and
        # train() would take one step too many. The final checkpoint is the model.
        from transformers import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        result = None
    else:
        result = trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    resumed = int(state.get("global_step", 0))
    metrics = {
        "train_loss": _train_loss(history, resumed, trainer.state.global_step, result),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed,
        "train_runtime": result.metrics.get("train_runtime") if result else None,
    }
    bad = _nonfinite_weight(trainer, None)
    if bad:
        raise diverged(trainer.state.global_step, f"weight {bad} is not finite",
                       rundir.complete_checkpoints(stage.dir / rundir.CHECKPOINTS))
    if trainer.eval_dataset is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    trainer.save_model(str(stage.dir))
    if ctx.is_main:
        for entry in history:  # transformers' own figure covers this train() call's steps only
            if "train_loss" in entry:
                entry["train_loss"] = metrics["train_loss"]
        rundir.write_log_history(history, stage.dir)
        trainer.processing_class.save_pretrained(str(stage.dir))
        # A pickle of the arguments: not safetensors, and never needed to load the model.
        rundir.remove(stage.dir / "training_args.bin", stage.dir)
    return metrics


def _train_loss(history: list[dict], resumed: int, global_step: int, result) -> float | None:
    """Mean loss per step over the whole stage: the steps before the resume point from the
    restored log history (each logged loss is the mean over the steps since the previous one;
    `Guard` makes the checkpoint step a logged one), the rest from this train() call."""
    total, covered = 0.0, 0
    for entry in history:
        if "loss" in entry and covered < entry.get("step", 0) <= resumed:
            total += entry["loss"] * (entry["step"] - covered)
            covered = entry["step"]
    if result is not None:
        steps = global_step - resumed
        total, covered = total + result.training_loss * steps, covered + steps
    return total / covered if covered else None
