"""What every trainer-based stage shares: its TRL config with align's defaults, the model with
its adapter settings, resume from the last checkpoint, and the final save.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from align import data, models, rundir
from align.errors import AlignError, first_line, suggest
from align.recipe import check_keys, coerce

TRAINING_OPTIONS = {"model", "dataset", "eval_dataset", "peft", "quantization"}


def trainer_config(stage, ctx, **stage_defaults):
    """The stage's TRL config: recipe fields win over stage defaults, which win over align's.

    align's defaults make a run work anywhere: checkpoints inside the stage folder, no external
    loggers, and fp32 on machines without CUDA (TRL defaults to bf16, which refuses CPU).
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


def build_trainer(stage, ctx, trainer_cls, *, kind: str = "causal-lm", defaults=None, prepare=None,
                  **trainer_kwargs):
    """What every TRL-trainer stage builds: `trainer_cls` on the stage's data, starting model
    (`kind` "causal-lm" or "seq-cls"), tokenizer, peft config and TRL config.

    `prepare(train, evals, tokenizer) -> (train, evals)` reshapes the data once the tokenizer is
    known. `defaults` are stage-level config defaults (the recipe's fields still win), or a
    function of the training set that returns them. With held-out data, evaluation runs every epoch."""
    train, evals = load_datasets(stage, ctx)
    model, tokenizer, peft = load_policy(stage, ctx, kind=kind)
    if prepare is not None:
        train, evals = prepare(train, evals, tokenizer)
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
    models.fit_tokenizer(model, tokenizer)  # we may have added a pad / end-of-turn token
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = models.prepare_kbit_training(model, bool(stage.args.get("gradient_checkpointing", False)))
    peft = stage.options.get("peft")
    task = "SEQ_CLS" if kind == "seq-cls" else "CAUSAL_LM"
    return model, tokenizer, (peft_config(peft, task_type=task, where=f"stages.{stage.name}.peft") if peft else None)


def train_and_save(trainer, stage, ctx) -> dict:
    """Train (resuming from the last checkpoint when there is one), save into the stage folder,
    and return the metrics: first/last training loss, steps, runtime, eval results."""
    resume = rundir.last_checkpoint(stage.dir)
    if resume:
        ctx.log(f"[{stage.name}] resuming from {Path(resume).name}")
    result = trainer.train(resume_from_checkpoint=resume)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    metrics = {
        "train_loss": result.training_loss,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "global_step": trainer.state.global_step,
        "resumed_from_step": int(Path(resume).name.split("-")[-1]) if resume else 0,
        "train_runtime": result.metrics.get("train_runtime"),
    }
    if trainer.eval_dataset is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    trainer.save_model(str(stage.dir))
    if ctx.is_main:
        rundir.write_log_history(trainer.state.log_history, stage.dir)
        trainer.processing_class.save_pretrained(str(stage.dir))
        # A pickle of the arguments: not safetensors, and it can carry a hub_token.
        (stage.dir / "training_args.bin").unlink(missing_ok=True)
    return metrics
